//! Where units' volumes live in the fleet, and how they are deleted.
//!
//! - On a machine a volume is the directory `<volume_root>/<unit>/<name>` (default root
//!   `/var/lib/caisson/volumes` on the state partition), made by the runtime before the
//!   container is created (`crate::containerd::volumes`). Nothing but a purge deletes it: not a
//!   restart, a replaced container, `stop`, a plain `destroy`, a reboot or an OS update (the
//!   state partition is never rewritten by an update).
//! - Pins (`volumes/<unit>` in etcd, written by the leader in the same fenced transaction as the
//!   assignments): the machines that hold a sticky unit's volumes (`crate::scheduler`), recorded
//!   when it is first placed there. A pin outlives a plain `destroy`: the unit submitted again
//!   finds its data on the same machine.
//! - Purges (`purge/<unit>`, written by `caisson-fleet destroy UNIT --volumes` in one transaction
//!   that also deletes the unit and its pin): each agent deletes `<volume_root>/<unit>` once the
//!   unit is gone and no container of it is left on its machine. A machine that is down then
//!   does it when it comes back, as the mark stays. Submitting the unit again deletes the mark
//!   in the same transaction that writes the unit, so the data of a unit that exists is never
//!   deleted: an agent deletes only after reading the units (without it) and then the mark.
//! - Without etcd, removing a unit file removes its container and keeps its volumes.

use crate::agent::Runtime;
use crate::etcd::{Compare, Op};
use crate::records::Invalid;
use crate::store::{decode, encode, Store, StoreError, Units};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Unit name to the machines holding its volumes.
pub type Pins = BTreeMap<String, BTreeSet<String>>;

/// A request to delete a gone unit's volumes on every machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purge {
    /// When it was asked for (unix seconds).
    pub since: u64,
}

/// What `destroy --volumes` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destroyed {
    /// The unit was removed and its volumes are to be deleted.
    Unit,
    /// There was no such unit: only the volumes it left (if any) are to be deleted.
    VolumesOnly,
}

impl Store {
    /// Every unit's pins; a pin that does not decode (or names no unit) is skipped and logged
    /// once: that unit is then placed as if it had none, and its pin written again.
    pub async fn pins(&self) -> Result<Pins, StoreError> {
        let prefix = self.keys.pins();
        let r = self.client.range(&prefix, true).await?;
        let mut out = Pins::new();
        let mut invalid = Vec::new();
        for kv in r.kvs {
            let unit = &kv.key[prefix.len()..];
            match decode::<BTreeSet<String>>(&kv) {
                Ok(machines) if crate::unit::valid_name(unit) => {
                    out.insert(unit.to_string(), machines);
                }
                Ok(_) => invalid.push(Invalid::new(
                    &kv.key,
                    &kv.value,
                    kv.mod_revision,
                    "the key names no unit",
                )),
                Err(bad) => invalid.push(bad),
            }
        }
        self.skipped.note(&prefix, &invalid);
        Ok(out)
    }

    /// The units whose volumes machines are asked to delete.
    pub async fn purges(&self) -> Result<BTreeMap<String, Purge>, StoreError> {
        let prefix = self.keys.purges();
        let r = self.client.range(&prefix, true).await?;
        let mut out = BTreeMap::new();
        let mut invalid = Vec::new();
        for kv in r.kvs {
            let unit = &kv.key[prefix.len()..];
            match decode::<Purge>(&kv) {
                Ok(p) if crate::unit::valid_name(unit) => {
                    out.insert(unit.to_string(), p);
                }
                Ok(_) => invalid.push(Invalid::new(
                    &kv.key,
                    &kv.value,
                    kv.mod_revision,
                    "the key names no unit",
                )),
                Err(bad) => invalid.push(bad),
            }
        }
        self.skipped.note(&prefix, &invalid);
        Ok(out)
    }

    /// `caisson-fleet destroy UNIT --volumes`: in one transaction, removes the unit and its pin
    /// and asks every machine to delete its volumes. A unit that no longer exists (destroyed
    /// without `--volumes`) still has its volumes deleted.
    pub async fn destroy_with_volumes(&self, name: &str) -> Result<Destroyed, StoreError> {
        if !crate::unit::valid_name(name) {
            return Err(StoreError::NoSuchUnit(name.to_string()));
        }
        let key = self.keys.unit(name);
        let mark = self.keys.purge(name);
        let purge = Purge {
            since: crate::registry::now_s(),
        };
        for _ in 0..20 {
            let existing = self.client.get(&key).await?;
            let rev = existing.as_ref().map_or(0, |kv| kv.mod_revision);
            let r = self
                .client
                .txn(
                    &[Compare::mod_revision(&key, rev)],
                    &[
                        Op::delete(key.clone()),
                        Op::delete(self.keys.pin(name)),
                        Op::put(&mark, encode(&mark, &purge)?),
                    ],
                    &[],
                )
                .await?;
            if r.succeeded {
                return Ok(if existing.is_some() {
                    Destroyed::Unit
                } else {
                    Destroyed::VolumesOnly
                });
            }
        }
        Err(StoreError::Conflict)
    }
}

/// Why a purge was not done on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// The unit exists (submitted again): its volumes are its own.
    Exists,
    /// A container of it is still here (removed by this tick's reconciliation; next tick).
    Running,
}

/// Which of `purges` may be done now: the unit is not in `units` (read before the purges) and
/// has no container in `containers`. Pure.
pub fn due(
    purges: &BTreeMap<String, Purge>,
    units: &Units,
    containers: &[String],
) -> BTreeMap<String, Result<(), Skip>> {
    purges
        .keys()
        .map(|u| {
            let r = if units.contains_key(u) {
                Err(Skip::Exists)
            } else if containers.iter().any(|c| c == u) {
                Err(Skip::Running)
            } else {
                Ok(())
            };
            (u.clone(), r)
        })
        .collect()
}

/// The agent's purge pass, after its reconciliation: deletes the volumes of the gone units
/// that `destroy --volumes` named. `units` must have been read before this call (see the
/// module documentation). Returns the units whose volumes were deleted here.
pub async fn purge<R: Runtime>(
    store: &Store,
    runtime: &R,
    units: &Units,
) -> Result<Vec<String>, StoreError> {
    let purges = store.purges().await?;
    if purges.is_empty() {
        return Ok(Vec::new());
    }
    let containers: Vec<String> = match runtime.list().await {
        Ok(list) => list.into_iter().map(|c| c.unit).collect(),
        Err(e) => {
            log::warn!("volume purge waits: {e}");
            return Ok(Vec::new());
        }
    };
    let mut deleted = Vec::new();
    for (u, ok) in due(&purges, units, &containers) {
        if ok.is_err() {
            continue;
        }
        match runtime.delete_volumes(&u).await {
            Ok(true) => {
                log::info!("unit {u} was destroyed with --volumes: deleted its volumes here");
                deleted.push(u);
            }
            Ok(false) => {}
            Err(e) => log::warn!("deleting the volumes of destroyed unit {u}: {e}"),
        }
    }
    Ok(deleted)
}

/// The machines a running sticky unit waits for (shown by `caisson-fleet units`): those holding
/// its volumes that it does not run on, while it runs fewer instances than asked for. Empty
/// for any other unit. `live` are the registered machines (one that is not is named "gone").
pub fn waiting_for(
    spec: &crate::unit::UnitSpec,
    running: bool,
    pins: Option<&BTreeSet<String>>,
    placed: &BTreeSet<String>,
) -> BTreeSet<String> {
    let short = match spec.replicas {
        crate::unit::Replicas::Count(n) => placed.len() < n as usize,
        crate::unit::Replicas::Global => false,
    };
    if !running || !short || !crate::scheduler::sticky(spec) {
        return BTreeSet::new();
    }
    pins.map(|p| p.difference(placed).cloned().collect())
        .unwrap_or_default()
}

/// The lines `caisson-fleet units` prints under a unit's row: where its volumes are
/// (`volumes_on`, a JSON list or null) and each machine it waits for (`waiting_for`), saying
/// whether that machine is gone (not in `live`) or cannot take the unit now.
pub fn notes(
    volumes_on: &serde_json::Value,
    waiting_for: &serde_json::Value,
    live: &BTreeSet<String>,
) -> Vec<String> {
    let names = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m.as_str().map(String::from))
            .collect()
    };
    let mut out = Vec::new();
    let on = names(volumes_on);
    if !on.is_empty() {
        out.push(format!("volumes on {}", on.join(", ")));
    }
    for m in names(waiting_for) {
        let why = if live.contains(&m) {
            "it cannot take the unit now"
        } else {
            "gone"
        };
        out.push(format!(
            "waiting for machine {m}, which holds its volumes ({why}); `destroy --volumes` or \
             volumes_follow = \"none\" lets it start empty elsewhere"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Target, UnitRecord};
    use crate::unit::UnitSpec;

    #[test]
    fn only_gone_units_without_containers_are_purged() {
        let spec = UnitSpec::parse("db", "[image]\npath = \"/a.tar\"").unwrap();
        let units: Units = [(
            "db".to_string(),
            (
                UnitRecord {
                    spec,
                    target: Target::Stopped,
                },
                1,
            ),
        )]
        .into();
        let mark = Purge { since: 1 };
        let purges: BTreeMap<String, Purge> = ["db", "old", "busy"]
            .iter()
            .map(|u| (u.to_string(), mark.clone()))
            .collect();
        let d = due(&purges, &units, &["busy".to_string()]);
        // A stopped unit keeps its volumes even with a stale mark; a container still here waits.
        assert_eq!(d["db"], Err(Skip::Exists));
        assert_eq!(d["busy"], Err(Skip::Running));
        assert_eq!(d["old"], Ok(()));
    }

    #[test]
    fn a_pinned_unit_short_of_instances_waits_for_its_machines() {
        let db = UnitSpec::parse(
            "db",
            "volumes = [{ name = \"d\", path = \"/d\" }]\n[image]\npath = \"/a.tar\"",
        )
        .unwrap();
        let pins: BTreeSet<String> = ["m1".to_string()].into();
        let none = BTreeSet::new();
        assert_eq!(waiting_for(&db, true, Some(&pins), &none), pins);
        assert!(waiting_for(&db, true, Some(&pins), &pins).is_empty());
        assert!(
            waiting_for(&db, false, Some(&pins), &none).is_empty(),
            "stopped"
        );
        assert!(
            waiting_for(&db, true, None, &none).is_empty(),
            "never placed"
        );
        let free = UnitSpec {
            volumes_follow: crate::unit::VolumesFollow::None,
            ..db
        };
        assert!(waiting_for(&free, true, Some(&pins), &none).is_empty());
        let lines = notes(
            &serde_json::json!(["m1", "m2"]),
            &serde_json::json!(["m1", "m2"]),
            &["m2".to_string()].into(),
        );
        assert_eq!(lines[0], "volumes on m1, m2");
        assert!(lines[1].starts_with("waiting for machine m1,") && lines[1].contains("(gone)"));
        assert!(lines[2].contains("machine m2") && lines[2].contains("cannot take"));
        assert!(notes(
            &serde_json::Value::Null,
            &serde_json::json!([]),
            &live_none()
        )
        .is_empty());
    }

    fn live_none() -> BTreeSet<String> {
        BTreeSet::new()
    }
}
