//! Units, assignments and statuses in etcd, and the leader's scheduling pass.

use crate::etcd::{Client, Compare, EtcdError, KeyValue, Op};
use crate::records::{self, Invalid, Skipped};
use crate::registry::{self, Keys, MachineRecord, RegistryError};
use crate::scheduler::{self, Placement, Schedule};
use crate::unit::UnitSpec;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What went wrong reading or changing the fleet's state.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{key:?}: cannot encode the record: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("no unit named {0:?} (see `caisson-fleet units`)")]
    NoSuchUnit(String),
    #[error("units changed while submitting; nothing was written, try again")]
    Conflict,
    #[error("no units to submit")]
    Empty,
}

/// Whether a unit should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Running,
    Stopped,
}

/// A unit as stored: its spec and whether it should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitRecord {
    pub spec: UnitSpec,
    pub target: Target,
}

/// What an agent reports about one of its units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitStatus {
    /// `starting` (the image is on its way, or no health check has passed yet), `running` (a
    /// unit without a health check), `healthy`, `unhealthy` (its last `retries` checks failed),
    /// `exited` (see `exit_code`) or `failed` (see `error`). The agent's health monitor
    /// (`crate::agent::health`) decides the health states.
    pub state: String,
    #[serde(default)]
    pub exit_code: Option<u32>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub since: u64,
    /// Why the last health check failed, while the unit is not healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_error: Option<String>,
}

/// Decodes a record that needs no check against its key.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, Invalid> {
    records::decode(&kv.key, &kv.value, kv.mod_revision, |_| Ok(()))
}

/// Decodes a unit record: its spec passes [`UnitSpec::check`] and is named as its key.
fn decode_unit(keys: &Keys, kv: &KeyValue) -> Result<UnitRecord, Invalid> {
    records::decode(&kv.key, &kv.value, kv.mod_revision, |r: &UnitRecord| {
        r.spec.check().map_err(|e| e.to_string())?;
        if kv.key != keys.unit(&r.spec.name) {
            return Err(format!("it names unit {:?}", r.spec.name));
        }
        Ok(())
    })
}

pub(crate) fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

/// The fleet's state in etcd.
#[derive(Debug, Clone)]
pub struct Store {
    pub client: Client,
    pub keys: Keys,
    /// The records that did not decode and were logged (shared by clones).
    pub skipped: Skipped,
}

/// Every unit with its record and revision.
pub type Units = BTreeMap<String, (UnitRecord, i64)>;

impl Store {
    pub fn new(client: Client, keys: Keys) -> Store {
        Store {
            client,
            keys,
            skipped: Skipped::default(),
        }
    }

    /// Every unit, by name, with the revision of its record; a record that does not decode is
    /// skipped and logged once (see [`Store::unit_records`]).
    pub async fn units(&self) -> Result<Units, StoreError> {
        let (units, invalid) = self.unit_records().await?;
        self.skipped.note(&self.keys.units(), &invalid);
        Ok(units)
    }

    /// Every unit, and the records under the units prefix that do not decode.
    pub async fn unit_records(&self) -> Result<(Units, Vec<Invalid>), StoreError> {
        let r = self.client.range(&self.keys.units(), true).await?;
        let mut out = BTreeMap::new();
        let mut invalid = Vec::new();
        for kv in r.kvs {
            match decode_unit(&self.keys, &kv) {
                Ok(rec) => {
                    out.insert(rec.spec.name.clone(), (rec, kv.mod_revision));
                }
                Err(bad) => invalid.push(bad),
            }
        }
        Ok((out, invalid))
    }

    /// Writes every unit in one transaction, or none: a unit that changed since it was read
    /// fails the whole submission. New units start running; existing ones keep their target.
    pub async fn submit(&self, specs: &[UnitSpec]) -> Result<(), StoreError> {
        if specs.is_empty() {
            return Err(StoreError::Empty);
        }
        let (existing, invalid) = self.unit_records().await?;
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        for spec in specs {
            let key = self.keys.unit(&spec.name);
            // A record that does not decode is replaced.
            let unusable = invalid.iter().find(|i| i.key == key);
            let (target, rev) = match (existing.get(&spec.name), unusable) {
                (Some((rec, rev)), _) => (rec.target, *rev),
                (None, Some(bad)) => (Target::Running, bad.revision),
                (None, None) => (Target::Running, 0),
            };
            compares.push(Compare::mod_revision(&key, rev));
            let rec = UnitRecord {
                spec: spec.clone(),
                target,
            };
            ops.push(Op::put(&key, encode(&key, &rec)?));
            // A unit submitted again cancels a purge of its old volumes that machines have not
            // done yet: its data is never deleted while it exists (see crate::volumes).
            ops.push(Op::delete(self.keys.purge(&spec.name)));
        }
        let r = self.client.txn(&compares, &ops, &[]).await?;
        if r.succeeded {
            Ok(())
        } else {
            Err(StoreError::Conflict)
        }
    }

    /// Sets a unit's target (start or stop).
    pub async fn set_target(&self, name: &str, target: Target) -> Result<(), StoreError> {
        let key = self.keys.unit(name);
        for _ in 0..20 {
            let Some(kv) = self.client.get(&key).await? else {
                return Err(StoreError::NoSuchUnit(name.to_string()));
            };
            let mut rec = decode_unit(&self.keys, &kv)?;
            if rec.target == target {
                return Ok(());
            }
            rec.target = target;
            let r = self
                .client
                .txn(
                    &[Compare::mod_revision(&key, kv.mod_revision)],
                    &[Op::put(&key, encode(&key, &rec)?)],
                    &[],
                )
                .await?;
            if r.succeeded {
                return Ok(());
            }
        }
        Err(StoreError::Conflict)
    }

    /// Removes a unit; the leader unassigns it and agents remove its containers. Its volumes
    /// stay on their machines, and it stays pinned there should it come back (see
    /// [`Store::destroy_with_volumes`]).
    pub async fn destroy(&self, name: &str) -> Result<(), StoreError> {
        if self.client.delete(&self.keys.unit(name), false).await? == 0 {
            return Err(StoreError::NoSuchUnit(name.to_string()));
        }
        Ok(())
    }

    /// The placement the leader last wrote: unit to machines. An assignment that does not
    /// decode is skipped and logged once.
    pub async fn placement(&self) -> Result<Placement, StoreError> {
        let (p, invalid) = self.placement_records().await?;
        self.skipped.note(&self.keys.assigns(), &invalid);
        Ok(p)
    }

    /// The placement, and the assignments that do not decode.
    pub async fn placement_records(&self) -> Result<(Placement, Vec<Invalid>), StoreError> {
        let prefix = self.keys.assigns();
        let r = self.client.range(&prefix, true).await?;
        let mut p = Placement::new();
        let mut invalid = Vec::new();
        for kv in r.kvs {
            let machine = kv.key[prefix.len()..].to_string();
            match decode::<Vec<String>>(&kv) {
                Ok(units) => {
                    for u in units {
                        p.entry(u).or_default().insert(machine.clone());
                    }
                }
                Err(bad) => invalid.push(bad),
            }
        }
        Ok((p, invalid))
    }

    /// The units assigned to one machine, and the revision of the assignment;
    /// [`StoreError::Invalid`] when the assignment does not decode.
    pub async fn assigned(&self, machine: &str) -> Result<(BTreeSet<String>, i64), StoreError> {
        let key = self.keys.assign(machine);
        let r = self.client.range(&key, false).await?;
        match r.kvs.first() {
            None => Ok((BTreeSet::new(), r.revision)),
            Some(kv) => Ok((decode(kv)?, r.revision)),
        }
    }

    /// Every status, by (machine, unit); a status that does not decode is skipped and logged
    /// once.
    pub async fn statuses(&self) -> Result<BTreeMap<(String, String), UnitStatus>, StoreError> {
        let (out, invalid) = self.status_records().await?;
        self.skipped.note(&self.keys.statuses(), &invalid);
        Ok(out)
    }

    /// Every status, and the status records that do not decode (or whose key names no unit).
    pub async fn status_records(
        &self,
    ) -> Result<(BTreeMap<(String, String), UnitStatus>, Vec<Invalid>), StoreError> {
        let prefix = self.keys.statuses();
        let r = self.client.range(&prefix, true).await?;
        let mut out = BTreeMap::new();
        let mut invalid = Vec::new();
        for kv in r.kvs {
            let Some((machine, unit)) = kv.key[prefix.len()..].split_once('/') else {
                invalid.push(Invalid::new(
                    &kv.key,
                    &kv.value,
                    kv.mod_revision,
                    "the key names no unit (status/<machine>/<unit>)",
                ));
                continue;
            };
            match decode(&kv) {
                Ok(st) => {
                    out.insert((machine.to_string(), unit.to_string()), st);
                }
                Err(bad) => invalid.push(bad),
            }
        }
        Ok((out, invalid))
    }

    /// Reports a unit's status on a machine (under the machine's lease).
    pub async fn report(
        &self,
        machine: &str,
        unit: &str,
        status: &UnitStatus,
        lease: i64,
    ) -> Result<(), StoreError> {
        let key = self.keys.status(machine, unit);
        self.client.put(&key, encode(&key, status)?, lease).await?;
        Ok(())
    }

    /// Removes a unit's status on a machine.
    pub async fn clear_status(&self, machine: &str, unit: &str) -> Result<(), StoreError> {
        self.client
            .delete(&self.keys.status(machine, unit), false)
            .await?;
        Ok(())
    }

    /// The leader's pass: reads machines, units and the current placement, schedules, and
    /// writes the assignments that changed, fenced by `fence` (the leader key still ours).
    /// Returns the schedule, or `None` when this machine turned out not to lead.
    /// Records that do not decode are left out (and logged once): a machine whose record does
    /// not decode gets no units, a unit that does not decode is not placed, and an assignment
    /// that does not decode is written again (or deleted).
    pub async fn schedule_pass(&self, fence: &Compare) -> Result<Option<Schedule>, StoreError> {
        let (machines, bad_machines) = registry::machine_records(&self.client, &self.keys).await?;
        self.skipped.note(&self.keys.machines(), &bad_machines);
        let units = self.units().await?;
        let (current, bad_assigns) = self.placement_records().await?;
        self.skipped.note(&self.keys.assigns(), &bad_assigns);
        let pins = self.pins().await?;
        let s = plan(&machines, &units, &current, &pins);
        let before = by_machine(&current);
        let after = by_machine(&s.placement);
        let mut ops = Vec::new();
        for (m, list) in &after {
            if before.get(m) != Some(list) {
                let key = self.keys.assign(m);
                ops.push(Op::put(&key, encode(&key, list)?));
            }
        }
        for m in before.keys().filter(|m| !after.contains_key(*m)) {
            ops.push(Op::delete(self.keys.assign(m)));
        }
        for (u, machines) in &s.pins {
            if pins.get(u) != Some(machines) {
                let key = self.keys.pin(u);
                ops.push(Op::put(&key, encode(&key, machines)?));
            }
        }
        for bad in &bad_assigns {
            let machine = &bad.key[self.keys.assigns().len()..];
            if !after.contains_key(machine) {
                ops.push(Op::delete(bad.key.clone()));
            }
        }
        // etcd allows 128 operations per transaction by default; with nothing to write, the
        // empty transaction still checks the fence.
        let chunks: Vec<&[Op]> = if ops.is_empty() {
            vec![&[]]
        } else {
            ops.chunks(100).collect()
        };
        for chunk in chunks {
            let r = self
                .client
                .txn(std::slice::from_ref(fence), chunk, &[])
                .await?;
            if !r.succeeded {
                return Ok(None);
            }
        }
        Ok(Some(s))
    }
}

/// The scheduler's view of the stored state: running units only, each held to the machines
/// `pins` says hold its volumes.
pub fn plan(
    machines: &[MachineRecord],
    units: &Units,
    current: &Placement,
    pins: &crate::volumes::Pins,
) -> Schedule {
    let ms: Vec<scheduler::Machine> = machines
        .iter()
        .map(|m| scheduler::Machine {
            id: m.id.clone(),
            labels: m.labels.clone(),
            capacity: scheduler::Capacity::reported(m.memory_bytes, m.cpus),
        })
        .collect();
    let us: Vec<scheduler::Unit> = units
        .values()
        .filter(|(r, _)| r.target == Target::Running)
        .map(|(r, _)| scheduler::Unit {
            pinned: pins.get(&r.spec.name).cloned().unwrap_or_default(),
            ..scheduler::Unit::from(&r.spec)
        })
        .collect();
    scheduler::schedule(&ms, &us, current)
}

/// Inverts a placement: machine to its sorted units.
pub fn by_machine(p: &Placement) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (u, ms) in p {
        for m in ms {
            out.entry(m.clone()).or_default().insert(u.clone());
        }
    }
    out
}
