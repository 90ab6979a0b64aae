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
//! Global units are kept and placed first, then the others in name order.

use crate::unit::{matches_pattern, Port, Replicas, UnitSpec};
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
    pub ports: Vec<Port>,
    /// What each instance takes of its machine's capacity.
    pub requests: Capacity,
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
            ports: u.ports.clone(),
            requests: requests(u),
        }
    }
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
}

/// Computes the placement. See the module documentation for the rules.
pub fn schedule(machines: &[Machine], units: &[Unit], current: &Placement) -> Schedule {
    let mut s = State::new(machines, units);
    for u in 0..s.units.len() {
        s.keep(u, current);
    }
    let mut unplaced = BTreeMap::new();
    for u in 0..s.units.len() {
        let missing = s.place(u);
        if missing > 0 {
            unplaced.insert(s.units[u].name.clone(), missing);
        }
    }
    Schedule {
        placement: s.placement(),
        unplaced,
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
                    let Some(m) = self.least_loaded_fit(u) else {
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
    let mut by_port: HashMap<Port, Vec<u32>> = HashMap::new();
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn machine(id: &str, labels: &[(&str, &str)]) -> Machine {
        Machine {
            id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            capacity: None,
        }
    }

    const GIB: u64 = 1 << 30;

    fn sized(id: &str, gib: u64, cpus: u32) -> Machine {
        Machine {
            capacity: Capacity::reported(Some(gib * GIB), Some(cpus)),
            ..machine(id, &[])
        }
    }

    fn asking(name: &str, replicas: u32, gib: u64, millicpus: u64) -> Unit {
        Unit {
            requests: Capacity {
                memory_bytes: gib * GIB,
                millicpus,
            },
            ..unit(name, Replicas::Count(replicas))
        }
    }

    fn unit(name: &str, replicas: Replicas) -> Unit {
        Unit {
            name: name.into(),
            replicas,
            labels: BTreeMap::new(),
            conflicts: vec![],
            ports: vec![],
            requests: Capacity::default(),
        }
    }

    fn on(s: &Schedule, u: &str) -> Vec<String> {
        s.placement
            .get(u)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default()
    }

    #[test]
    fn spreads_replicas_and_balances() {
        let ms: Vec<_> = (0..3).map(|i| machine(&format!("m{i}"), &[])).collect();
        let us = vec![
            unit("a", Replicas::Count(3)),
            unit("b", Replicas::Count(2)),
            unit("c", Replicas::Count(1)),
        ];
        let s = schedule(&ms, &us, &Placement::new());
        assert_eq!(on(&s, "a"), ["m0", "m1", "m2"]);
        assert_eq!(s.placement["b"].len(), 2);
        let mut load = BTreeMap::new();
        for m in s.placement.values().flatten() {
            *load.entry(m.clone()).or_insert(0) += 1;
        }
        assert_eq!(load.values().copied().collect::<Vec<_>>(), [2, 2, 2]);
        assert!(s.unplaced.is_empty());
    }

    #[test]
    fn too_few_machines_is_reported() {
        let ms = vec![machine("m0", &[])];
        let s = schedule(&ms, &[unit("a", Replicas::Count(2))], &Placement::new());
        assert_eq!(on(&s, "a"), ["m0"]);
        assert_eq!(s.unplaced["a"], 1);
    }

    #[test]
    fn labels_conflicts_ports_and_global() {
        let ms = vec![
            machine("m0", &[("zone", "a")]),
            machine("m1", &[("zone", "b")]),
            machine("m2", &[("zone", "a"), ("disk", "ssd")]),
        ];
        let mut db = unit("db", Replicas::Count(1));
        db.labels.insert("disk".into(), "ssd".into());
        let mut web = unit("web", Replicas::Count(2));
        web.conflicts = vec!["d*".into()];
        web.labels.insert("zone".into(), "a".into());
        let mut mon = unit("mon", Replicas::Global);
        mon.labels.insert("zone".into(), "a".into());
        let mut p1 = unit("p1", Replicas::Count(3));
        p1.ports = vec![Port {
            port: 80,
            udp: false,
        }];
        let mut p2 = unit("p2", Replicas::Count(3));
        p2.ports = vec![Port {
            port: 80,
            udp: false,
        }];
        let s = schedule(&ms, &[db, web, mon, p1, p2], &Placement::new());
        assert_eq!(on(&s, "db"), ["m2"]);
        assert_eq!(on(&s, "web"), ["m0"], "zone a but not beside db");
        assert_eq!(s.unplaced["web"], 1);
        assert_eq!(on(&s, "mon"), ["m0", "m2"]);
        assert_eq!(on(&s, "p1"), ["m0", "m1", "m2"]);
        assert!(on(&s, "p2").is_empty(), "port 80 taken everywhere");
    }

    #[test]
    fn keeps_current_and_moves_lost_units() {
        let ms = vec![machine("m0", &[]), machine("m1", &[]), machine("m2", &[])];
        let us = vec![unit("a", Replicas::Count(1)), unit("b", Replicas::Count(1))];
        let mut cur = Placement::new();
        cur.insert("a".into(), ["m2".to_string()].into());
        cur.insert("b".into(), ["m9".to_string()].into());
        let s = schedule(&ms, &us, &cur);
        assert_eq!(on(&s, "a"), ["m2"], "kept");
        assert_eq!(on(&s, "b"), ["m0"], "machine gone: placed again");
        // Fewer replicas: trimmed, not moved.
        cur.insert("a".into(), ["m0".to_string(), "m1".to_string()].into());
        let s = schedule(&ms, &us, &cur);
        assert_eq!(on(&s, "a"), ["m0"]);
    }

    #[test]
    fn requests_count_against_what_machines_report() {
        let ms = vec![sized("m0", 4, 2), sized("m1", 2, 8), machine("m2", &[])];
        // 3 GiB and 1 CPU fit m0 only (m1 has 2 GiB); m2 reported nothing and takes anything.
        let big = asking("big", 3, 3, 1000);
        // 1.5 CPUs: m0 has 2, m1 8.
        let cpu = asking("cpu", 3, 0, 1500);
        let free = unit("free", Replicas::Count(3));
        let s = schedule(
            &ms,
            &[big.clone(), cpu.clone(), free.clone()],
            &Placement::new(),
        );
        assert_eq!(on(&s, "big"), ["m0", "m2"]);
        assert_eq!(s.unplaced["big"], 1);
        assert_eq!(on(&s, "cpu"), ["m1", "m2"], "m0 has 1 CPU left after big");
        assert_eq!(
            on(&s, "free"),
            ["m0", "m1", "m2"],
            "no requests: fits anywhere"
        );

        // A machine that reports less than its units ask keeps the first ones (by name).
        let small = vec![sized("m0", 4, 1)];
        let cur: Placement = [
            ("big".to_string(), ["m0".to_string()].into()),
            ("cpu".to_string(), ["m0".to_string()].into()),
        ]
        .into();
        let s = schedule(
            &small,
            &[asking("big", 1, 3, 0), asking("cpu", 1, 0, 1500)],
            &cur,
        );
        assert_eq!(on(&s, "big"), ["m0"]);
        assert!(on(&s, "cpu").is_empty());

        // Only memory reported: CPUs are unlimited there.
        let mem_only = vec![Machine {
            capacity: Capacity::reported(Some(GIB), None),
            ..machine("m0", &[])
        }];
        let s = schedule(&mem_only, &[asking("cpu", 1, 0, 64_000)], &Placement::new());
        assert_eq!(on(&s, "cpu"), ["m0"]);
        assert_eq!(Capacity::reported(None, None), None);
    }

    fn arb_input() -> impl Strategy<Value = (Vec<Machine>, Vec<Unit>, Placement)> {
        let zones = prop::sample::select(vec!["a", "b", "c"]);
        let capacity = prop::option::of((1u64..8, 1u32..4));
        let machines = prop::collection::vec((zones.clone(), any::<bool>(), capacity), 0..12)
            .prop_map(|v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (z, ssd, cap))| {
                        let mut l = vec![("zone", z)];
                        if ssd {
                            l.push(("disk", "ssd"));
                        }
                        Machine {
                            capacity: cap
                                .and_then(|(g, c)| Capacity::reported(Some(g * GIB), Some(c))),
                            ..machine(&format!("m{i:02}"), &l)
                        }
                    })
                    .collect::<Vec<_>>()
            });
        let unit_s = (
            0u32..6,
            prop::option::of(zones),
            any::<bool>(),
            prop::collection::vec(0usize..10, 0..3),
            prop::option::of(prop::sample::select(vec![80u16, 443])),
            (0u64..3, prop::sample::select(vec![0u64, 500, 1000, 2500])),
        );
        let units = prop::collection::vec(unit_s, 0..10).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (r, zone, ssd, conflicts, port, (gib, millicpus)))| {
                    let mut u = unit(
                        &format!("u{i}"),
                        if r == 0 {
                            Replicas::Global
                        } else {
                            Replicas::Count(r)
                        },
                    );
                    if let Some(z) = zone {
                        u.labels.insert("zone".into(), z.into());
                    }
                    if ssd {
                        u.labels.insert("disk".into(), "ssd".into());
                    }
                    u.conflicts = conflicts.iter().map(|c| format!("u{c}")).collect();
                    if i % 3 == 0 {
                        u.conflicts.push("u1*".into());
                    }
                    u.ports = port
                        .map(|p| Port {
                            port: p,
                            udp: false,
                        })
                        .into_iter()
                        .collect();
                    u.requests = Capacity {
                        memory_bytes: gib * GIB,
                        millicpus,
                    };
                    u
                })
                .collect::<Vec<_>>()
        });
        let current = prop::collection::btree_map(
            (0usize..12).prop_map(|i| format!("u{i}")),
            prop::collection::btree_set((0usize..14).prop_map(|i| format!("m{i:02}")), 0..6),
            0..12,
        );
        (machines, units, current)
    }

    fn check_constraints(ms: &[Machine], us: &[Unit], s: &Schedule) -> Result<(), TestCaseError> {
        let mut by_machine: BTreeMap<String, Vec<&Unit>> = BTreeMap::new();
        for u in us {
            let empty = BTreeSet::new();
            let on = s.placement.get(&u.name).unwrap_or(&empty);
            if let Replicas::Count(n) = u.replicas {
                prop_assert!(on.len() <= n as usize, "{} exceeds {n} replicas", u.name);
            }
            for m in on {
                let machine = ms.iter().find(|x| &x.id == m);
                prop_assert!(machine.is_some(), "{} placed on unknown {m}", u.name);
                prop_assert!(labels_match(
                    &machine.map(|x| x.labels.clone()).unwrap_or_default(),
                    &u.labels
                ));
                by_machine.entry(m.clone()).or_default().push(u);
            }
        }
        for p in s.placement.keys() {
            prop_assert!(us.iter().any(|u| &u.name == p), "unknown unit {p} placed");
        }
        for (m, here) in by_machine {
            let cap = ms.iter().find(|x| x.id == m).and_then(|x| x.capacity);
            let used = here
                .iter()
                .fold(Capacity::default(), |a, u| a.plus(u.requests));
            prop_assert!(
                cap.is_none_or(|c| used.within(c)),
                "{m} over capacity: {used:?} > {cap:?}"
            );
            for a in &here {
                for b in &here {
                    if a.name == b.name {
                        continue;
                    }
                    let named = a.conflicts.iter().any(|c| matches_pattern(c, &b.name));
                    let port = a.ports.iter().any(|p| b.ports.contains(p));
                    prop_assert!(!named && !port, "{} and {} conflict on {m}", a.name, b.name);
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn constraints_always_hold((ms, us, cur) in arb_input()) {
            let s = schedule(&ms, &us, &cur);
            check_constraints(&ms, &us, &s)?;
        }

        #[test]
        fn no_op_keeps_placement((ms, us, cur) in arb_input()) {
            let first = schedule(&ms, &us, &cur);
            let second = schedule(&ms, &us, &first.placement);
            prop_assert_eq!(&first, &second);
        }

        #[test]
        fn a_new_machine_moves_nothing((ms, us, cur) in arb_input()) {
            let first = schedule(&ms, &us, &cur);
            let mut more = ms.clone();
            more.push(machine("new", &[("zone", "a"), ("disk", "ssd")]));
            let second = schedule(&more, &us, &first.placement);
            for (u, on) in &first.placement {
                let now = second.placement.get(u).cloned().unwrap_or_default();
                prop_assert!(on.is_subset(&now), "{u} moved: {on:?} -> {now:?}");
            }
        }

        #[test]
        fn unconstrained_units_fill_and_balance(n_machines in 1usize..20, replicas in prop::collection::vec(1u32..5, 0..30)) {
            let ms: Vec<_> = (0..n_machines).map(|i| machine(&format!("m{i:02}"), &[])).collect();
            let us: Vec<_> = replicas.iter().enumerate().map(|(i, &r)| unit(&format!("u{i}"), Replicas::Count(r))).collect();
            let s = schedule(&ms, &us, &Placement::new());
            for u in &us {
                let Replicas::Count(r) = u.replicas else { continue };
                prop_assert_eq!(s.placement.get(&u.name).map_or(0, |m| m.len()), (r as usize).min(n_machines));
            }
            let mut load = vec![0usize; n_machines];
            for m in s.placement.values().flatten() {
                load[m[1..].parse::<usize>().unwrap_or(0)] += 1;
            }
            let (lo, hi) = (load.iter().min().copied().unwrap_or(0), load.iter().max().copied().unwrap_or(0));
            prop_assert!(hi - lo <= 1, "unbalanced: {load:?}");
        }
    }
}
