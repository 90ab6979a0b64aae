//! The scheduler: a pure function from (machines, units, current placement) to a new placement.
//!
//! - Constraints hold: a unit runs only on machines carrying its labels, never beside a unit it
//!   conflicts with (by name or pattern, either way round, or because both use a host port), and
//!   at most once per machine (so replicas spread).
//! - Capacity: the memory and CPU requests (a unit's `[resources]` memory and cpus) of the units
//!   on a machine never add up to more than the machine reported. A unit without requests counts
//!   zero; a machine that reported no capacity takes anything. When a machine reports less than
//!   its current units request, the units kept first (global ones, then by name) stay.
//! - A unit with `replicas = n` runs at most n times; a global unit on every machine that fits.
//! - Minimal movement: every instance of the current placement that still fits stays where it is;
//!   only missing instances are placed, each on the least-loaded machine that fits (ties: the
//!   machine id). Scheduling a placement the scheduler made changes nothing.
//!
//! - Volumes pin: a unit whose volumes stay on their machine (`sticky`: it has volumes and does
//!   not say `volumes_follow = "none"`; never a global unit) runs only on the machines that
//!   hold its data (`pinned`), each of which keeps one of its replica slots whether it is up or
//!   not; only the replicas beyond those (`replicas - pinned`) may go to other machines, where
//!   they start empty. A pinned machine that is gone, or cannot take the unit now, leaves its
//!   slot empty: the unit is listed in [`Schedule::waiting`] with that machine, never moved.
//!   [`Schedule::pins`] is the new pinning of every sticky unit: the old one plus where it is
//!   placed now (a pin is never dropped here; `caisson-fleet destroy --volumes` drops it).
//!
//! Global units are kept and placed first, then the others in name order.

use crate::unit::{matches_pattern, HostPort, Replicas, UnitSpec};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// A machine as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// What units may request on it (`None`: unknown, anything fits).
    pub capacity: Option<Capacity>,
}

/// Memory and CPU: what a machine has, or what a unit requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub memory_bytes: u64,
    /// Thousandths of a CPU.
    pub millicpus: u64,
}

impl Capacity {
    /// `self + other`, saturating.
    pub fn plus(self, other: Capacity) -> Capacity {
        Capacity {
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            millicpus: self.millicpus.saturating_add(other.millicpus),
        }
    }

    /// Whether `self` is within `limit` on both counts.
    pub fn within(self, limit: Capacity) -> bool {
        self.memory_bytes <= limit.memory_bytes && self.millicpus <= limit.millicpus
    }

    /// A machine's capacity from what it reported: an unreported count is unlimited; `None`
    /// when it reported neither.
    pub fn reported(memory_bytes: Option<u64>, cpus: Option<u32>) -> Option<Capacity> {
        if memory_bytes.is_none() && cpus.is_none() {
            return None;
        }
        Some(Capacity {
            memory_bytes: memory_bytes.unwrap_or(u64::MAX),
            millicpus: cpus.map_or(u64::MAX, |c| u64::from(c) * 1000),
        })
    }
}

/// A unit to run, as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub name: String,
    pub replicas: Replicas,
    /// Required machine labels.
    pub labels: BTreeMap<String, String>,
    /// Names or patterns of units it never shares a machine with.
    pub conflicts: Vec<String>,
    /// Host ports it uses: two units using one port conflict.
    pub ports: Vec<HostPort>,
    /// What each instance takes of its machine's capacity.
    pub requests: Capacity,
    /// Whether its volumes stay on the machines that hold them (see the module documentation).
    pub sticky: bool,
    /// The machines that hold its volumes (a sticky unit is held to them).
    pub pinned: BTreeSet<String>,
}

/// What one instance of the unit requests: its memory and CPU limits (zero when unlimited).
pub fn requests(u: &UnitSpec) -> Capacity {
    Capacity {
        memory_bytes: u.resources.memory.unwrap_or(0),
        millicpus: u.resources.millicpus.map_or(0, u64::from),
    }
}

impl From<&UnitSpec> for Unit {
    fn from(u: &UnitSpec) -> Unit {
        Unit {
            name: u.name.clone(),
            replicas: u.replicas,
            labels: u.constraints.labels.clone(),
            conflicts: u.constraints.conflicts.clone(),
            ports: u.host_ports(),
            requests: requests(u),
            sticky: sticky(u),
            pinned: BTreeSet::new(),
        }
    }
}

/// Whether a unit's volumes hold it to their machines: it has volumes, does not say
/// `volumes_follow = "none"`, and is not global (a global unit runs on every machine anyway,
/// each with its own volumes).
pub fn sticky(u: &UnitSpec) -> bool {
    !u.volumes.is_empty()
        && u.volumes_follow == crate::unit::VolumesFollow::Machine
        && u.replicas != Replicas::Global
}

/// Unit name to the machines it runs on.
pub type Placement = BTreeMap<String, BTreeSet<String>>;

/// A scheduling result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Where each unit runs (units placed nowhere are absent).
    pub placement: Placement,
    /// Units with fewer instances than asked for, and how many are missing.
    pub unplaced: BTreeMap<String, u32>,
    /// Sticky units missing instances because machines holding their volumes are gone or cannot
    /// take them now: the unit and those machines.
    pub waiting: BTreeMap<String, BTreeSet<String>>,
    /// Every sticky unit's machines holding its volumes: its pins plus where it runs now.
    pub pins: BTreeMap<String, BTreeSet<String>>,
}

/// Computes the placement. See the module documentation for the rules.
pub fn schedule(machines: &[Machine], units: &[Unit], current: &Placement) -> Schedule {
    let mut s = State::new(machines, units);
    for u in 0..s.units.len() {
        s.keep(u, current);
    }
    let mut unplaced = BTreeMap::new();
    let mut waiting = BTreeMap::new();
    for u in 0..s.units.len() {
        let missing = s.place(u);
        if missing > 0 {
            unplaced.insert(s.units[u].name.clone(), missing);
            let away = s.pins_away(u);
            if !away.is_empty() {
                waiting.insert(s.units[u].name.clone(), away);
            }
        }
    }
    let placement = s.placement();
    let pins = s
        .units
        .iter()
        .filter(|u| u.sticky)
        .filter_map(|u| {
            let mut p = u.pinned.clone();
            p.extend(placement.get(&u.name).into_iter().flatten().cloned());
            (!p.is_empty()).then(|| (u.name.clone(), p))
        })
        .collect();
    Schedule {
        placement,
        unplaced,
        waiting,
        pins,
    }
}

/// Whether a machine's labels satisfy a unit's.
pub fn labels_match(machine: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| machine.get(k) == Some(v))
}

struct State<'a> {
    machines: Vec<&'a Machine>,
    machine_index: HashMap<&'a str, u32>,
    units: Vec<&'a Unit>,
    /// For each unit, the units it conflicts with (symmetric, without itself).
    conflicts: Vec<Vec<u32>>,
    /// For each unit, the machines it may run on (`None`: all of them).
    eligible: Vec<Option<std::rc::Rc<Vec<bool>>>>,
    /// For each machine, the units on it.
    hosted: Vec<HashSet<u32>>,
    /// For each unit, the machines it is on.
    placed: Vec<Vec<u32>>,
    /// Machines ordered by (load, index).
    by_load: BTreeSet<(u32, u32)>,
    load: Vec<u32>,
    /// For each machine, the requests of the units on it.
    used: Vec<Capacity>,
}

impl<'a> State<'a> {
    fn new(machines: &'a [Machine], units: &'a [Unit]) -> State<'a> {
        let mut machines: Vec<&Machine> = machines.iter().collect();
        machines.sort_by(|a, b| a.id.cmp(&b.id));
        machines.dedup_by(|a, b| a.id == b.id);
        let mut units: Vec<&Unit> = units.iter().collect();
        units.sort_by(|a, b| {
            let global = |u: &Unit| u.replicas != Replicas::Global;
            (global(a), &a.name).cmp(&(global(b), &b.name))
        });
        units.dedup_by(|a, b| a.name == b.name);
        let machine_index = machines
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.as_str(), i as u32))
            .collect();
        let conflicts = conflict_sets(&units);
        let mut cache: HashMap<&BTreeMap<String, String>, std::rc::Rc<Vec<bool>>> = HashMap::new();
        let eligible = units
            .iter()
            .map(|u| {
                if u.labels.is_empty() {
                    return None;
                }
                let e = cache.entry(&u.labels).or_insert_with(|| {
                    std::rc::Rc::new(
                        machines
                            .iter()
                            .map(|m| labels_match(&m.labels, &u.labels))
                            .collect(),
                    )
                });
                Some(e.clone())
            })
            .collect();
        let n = machines.len();
        State {
            machine_index,
            conflicts,
            eligible,
            hosted: vec![HashSet::new(); n],
            placed: vec![Vec::new(); units.len()],
            by_load: (0..n as u32).map(|m| (0, m)).collect(),
            load: vec![0; n],
            used: vec![Capacity::default(); n],
            machines,
            units,
        }
    }

    fn is_eligible(&self, u: usize, m: u32) -> bool {
        self.eligible[u].as_ref().is_none_or(|e| e[m as usize])
    }

    /// Whether unit `u` may go on machine `m` now.
    fn fits(&self, u: usize, m: u32) -> bool {
        let hosted = &self.hosted[m as usize];
        self.is_eligible(u, m)
            && !hosted.contains(&(u as u32))
            && !self.conflicts[u].iter().any(|c| hosted.contains(c))
            && self.has_room(u, m)
            && self.pin_allows(u, m)
    }

    fn is_pinned(&self, u: usize, m: u32) -> bool {
        self.units[u].pinned.contains(&self.machines[m as usize].id)
    }

    /// A sticky unit goes on a machine that does not hold its volumes only while it has fewer
    /// instances there than the replicas its pinned machines leave free.
    fn pin_allows(&self, u: usize, m: u32) -> bool {
        let unit = self.units[u];
        if !unit.sticky || self.is_pinned(u, m) {
            return true;
        }
        let Replicas::Count(n) = unit.replicas else {
            return true;
        };
        let free = (n as usize).saturating_sub(unit.pinned.len());
        let elsewhere = self.placed[u]
            .iter()
            .filter(|&&p| !self.is_pinned(u, p))
            .count();
        elsewhere < free
    }

    /// The least-loaded machine holding `u`'s volumes that fits it now.
    fn pinned_fit(&self, u: usize) -> Option<u32> {
        self.units[u]
            .pinned
            .iter()
            .filter_map(|id| self.machine_index.get(id.as_str()).copied())
            .filter(|&m| self.fits(u, m))
            .min_by_key(|&m| (self.load[m as usize], m))
    }

    /// The machines holding a sticky unit's volumes that it is not on (gone, or full now).
    fn pins_away(&self, u: usize) -> BTreeSet<String> {
        let unit = self.units[u];
        if !unit.sticky {
            return BTreeSet::new();
        }
        unit.pinned
            .iter()
            .filter(|id| {
                self.machine_index
                    .get(id.as_str())
                    .is_none_or(|m| !self.placed[u].contains(m))
            })
            .cloned()
            .collect()
    }

    /// Whether machine `m` has room left for unit `u`'s requests.
    fn has_room(&self, u: usize, m: u32) -> bool {
        self.machines[m as usize]
            .capacity
            .is_none_or(|c| self.used[m as usize].plus(self.units[u].requests).within(c))
    }

    fn add(&mut self, u: usize, m: u32) {
        let l = self.load[m as usize];
        self.by_load.remove(&(l, m));
        self.by_load.insert((l + 1, m));
        self.load[m as usize] = l + 1;
        self.hosted[m as usize].insert(u as u32);
        self.placed[u].push(m);
        self.used[m as usize] = self.used[m as usize].plus(self.units[u].requests);
    }

    /// Keeps the instances of the current placement that still fit.
    fn keep(&mut self, u: usize, current: &Placement) {
        let Some(on) = current.get(&self.units[u].name) else {
            return;
        };
        let limit = match self.units[u].replicas {
            Replicas::Count(n) => n as usize,
            Replicas::Global => usize::MAX,
        };
        // Machines holding its volumes first: those are where a sticky unit belongs.
        let mut on: Vec<&String> = on.iter().collect();
        on.sort_by_key(|id| !self.units[u].pinned.contains(*id));
        for id in on {
            if self.placed[u].len() >= limit {
                break;
            }
            if let Some(&m) = self.machine_index.get(id.as_str()) {
                if self.fits(u, m) {
                    self.add(u, m);
                }
            }
        }
    }

    /// Places the missing instances of `u`; returns how many could not be placed.
    fn place(&mut self, u: usize) -> u32 {
        match self.units[u].replicas {
            Replicas::Global => {
                for m in 0..self.machines.len() as u32 {
                    if self.fits(u, m) {
                        self.add(u, m);
                    }
                }
                0
            }
            Replicas::Count(n) => {
                let mut missing = (n as usize).saturating_sub(self.placed[u].len());
                while missing > 0 {
                    let Some(m) = self.pinned_fit(u).or_else(|| self.least_loaded_fit(u)) else {
                        break;
                    };
                    self.add(u, m);
                    missing -= 1;
                }
                missing as u32
            }
        }
    }

    fn least_loaded_fit(&self, u: usize) -> Option<u32> {
        // A unit that fits few machines: scan those; otherwise walk machines by load.
        if let Some(e) = &self.eligible[u] {
            let count = e.iter().filter(|&&x| x).count();
            if count * 8 < self.machines.len() {
                return (0..self.machines.len() as u32)
                    .filter(|&m| e[m as usize] && self.fits(u, m))
                    .min_by_key(|&m| (self.load[m as usize], m));
            }
        }
        self.by_load
            .iter()
            .map(|&(_, m)| m)
            .find(|&m| self.fits(u, m))
    }

    fn placement(&self) -> Placement {
        let mut p = Placement::new();
        for (u, on) in self.placed.iter().enumerate() {
            if on.is_empty() {
                continue;
            }
            p.insert(
                self.units[u].name.clone(),
                on.iter()
                    .map(|&m| self.machines[m as usize].id.clone())
                    .collect(),
            );
        }
        p
    }
}

/// The symmetric conflict sets: by name, by pattern, and by shared host ports.
fn conflict_sets(units: &[&Unit]) -> Vec<Vec<u32>> {
    let by_name: HashMap<&str, u32> = units
        .iter()
        .enumerate()
        .map(|(i, u)| (u.name.as_str(), i as u32))
        .collect();
    let mut sets: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); units.len()];
    let mut link = |a: u32, b: u32| {
        if a != b {
            sets[a as usize].insert(b);
            sets[b as usize].insert(a);
        }
    };
    let mut by_port: HashMap<HostPort, Vec<u32>> = HashMap::new();
    for (i, u) in units.iter().enumerate() {
        let i = i as u32;
        for pattern in &u.conflicts {
            if pattern.contains('*') {
                for (j, other) in units.iter().enumerate() {
                    if matches_pattern(pattern, &other.name) {
                        link(i, j as u32);
                    }
                }
            } else if let Some(&j) = by_name.get(pattern.as_str()) {
                link(i, j);
            }
        }
        for p in &u.ports {
            by_port.entry(*p).or_default().push(i);
        }
    }
    for users in by_port.values() {
        for (k, &a) in users.iter().enumerate() {
            for &b in &users[k + 1..] {
                link(a, b);
            }
        }
    }
    sets.into_iter().map(|s| s.into_iter().collect()).collect()
}

#[cfg(test)]
mod tests;
