//! The machine registry and leader election.
//!
//! Keys (under the fleet prefix, `/caisson/fleet/` by default):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `machines/<id>` | [`MachineRecord`] JSON | the machine's |
//! | `leader` | the leader's machine id | the leader's |
//! | `units/<name>` | [`crate::store::UnitRecord`] JSON | none |
//! | `assign/<id>` | JSON list of the unit names the machine runs | none (written by the leader) |
//! | `status/<id>/<unit>` | [`crate::store::UnitStatus`] JSON | the machine's |
//! | `logs/<id>/<unit>` | the unit's last output lines on that machine | the machine's |
//! | `volumes/<unit>` | JSON list of the machines holding the unit's volumes (it is pinned there) | none (written by the leader) |
//! | `purge/<unit>` | [`crate::volumes::Purge`] JSON: machines delete the volumes of this unit, which is gone | none (written by `destroy --volumes`, deleted by `submit`) |
//! | `lock/reboot/max` | how many machines may hold the reboot lock (absent: 1) | none |
//! | `lock/reboot/holders/<id>` | when the machine took its slot (unix seconds) | none |
//! | `network/config` | [`caisson_net::cluster::NetworkConfig`] JSON: the cluster network | none (written once by `network init`) |
//! | `network/subnets/<a.b.c.d>-<len>` | [`caisson_net::cluster::SubnetRecord`] JSON: the machine holding that subnet | the machine's |
//! | `network/routes/<id>` | [`crate::network::routes::RouteReport`] JSON: the state of the machine's routes to the other subnets | the machine's |
//! | `services/<id>/<unit>` | the unit's registrations on that machine (by machine first, so a machine's role writes only its own) | the machine's |

use crate::etcd::{Client, Compare, EtcdError, Op};
use crate::records::{self, Invalid};
use caisson_layout::cmdline::BootParams;
use caisson_layout::osrelease::OsRelease;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// What went wrong describing the machine or registering it.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no machine id (1-64 of A-Z a-z 0-9 . _ -)")]
    NoMachineId { path: String },
    #[error("machine record {key:?}: cannot encode it: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A machine as registered in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    pub id: String,
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The OS version (os-release `IMAGE_VERSION`), if known.
    #[serde(default)]
    pub version: Option<String>,
    /// The boot slot (`a` or `b`) from the kernel command line, if booted by Caisson.
    #[serde(default)]
    pub slot: Option<String>,
    /// Seconds since the epoch at the last heartbeat that rewrote the record.
    #[serde(default)]
    pub last_seen: u64,
    /// The machine's memory in bytes (`MemTotal`), if it reported it: the scheduler places
    /// units' memory requests against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The machine's CPUs, if it reported them: the scheduler places units' `cpus` against them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
}

/// Keys of the fleet keyspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }
    pub fn machines(&self) -> String {
        format!("{}machines/", self.prefix)
    }
    pub fn machine(&self, id: &str) -> String {
        format!("{}machines/{id}", self.prefix)
    }
    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }
    pub fn units(&self) -> String {
        format!("{}units/", self.prefix)
    }
    pub fn unit(&self, name: &str) -> String {
        format!("{}units/{name}", self.prefix)
    }
    pub fn assigns(&self) -> String {
        format!("{}assign/", self.prefix)
    }
    pub fn assign(&self, id: &str) -> String {
        format!("{}assign/{id}", self.prefix)
    }
    pub fn statuses(&self) -> String {
        format!("{}status/", self.prefix)
    }
    pub fn status(&self, id: &str, unit: &str) -> String {
        format!("{}status/{id}/{unit}", self.prefix)
    }
    pub fn logs(&self, id: &str, unit: &str) -> String {
        format!("{}logs/{id}/{unit}", self.prefix)
    }
    pub fn all_logs(&self) -> String {
        format!("{}logs/", self.prefix)
    }
    pub fn lock(&self) -> String {
        crate::lock::key(&self.prefix)
    }
    pub fn pins(&self) -> String {
        format!("{}volumes/", self.prefix)
    }
    pub fn pin(&self, unit: &str) -> String {
        format!("{}volumes/{unit}", self.prefix)
    }
    pub fn purges(&self) -> String {
        format!("{}purge/", self.prefix)
    }
    pub fn purge(&self, unit: &str) -> String {
        format!("{}purge/{unit}", self.prefix)
    }
    pub fn network_config(&self) -> String {
        format!("{}network/config", self.prefix)
    }
    pub fn subnets(&self) -> String {
        format!("{}network/subnets/", self.prefix)
    }
    /// `network/subnets/10.42.3.0-24`.
    pub fn subnet(&self, subnet: &caisson_net::cluster::Ipv4Net) -> String {
        format!(
            "{}{}",
            self.subnets(),
            caisson_net::cluster::subnet_key(subnet)
        )
    }
    /// Every machine's [`crate::network::routes::RouteReport`].
    pub fn route_reports(&self) -> String {
        format!("{}network/routes/", self.prefix)
    }
    pub fn route_report(&self, id: &str) -> String {
        format!("{}network/routes/{id}", self.prefix)
    }
    pub fn services(&self) -> String {
        format!("{}services/", self.prefix)
    }
    /// Every registration of machine `id`.
    pub fn machine_services(&self, id: &str) -> String {
        format!("{}services/{id}/", self.prefix)
    }
    pub fn service(&self, id: &str, unit: &str) -> String {
        format!("{}services/{id}/{unit}", self.prefix)
    }
}

/// Seconds since the epoch.
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads the machine id from `/etc/machine-id` (under `root`).
pub fn machine_id(root: &Path) -> Result<String, RegistryError> {
    let path = root.join("etc/machine-id");
    let text = std::fs::read_to_string(&path).map_err(|source| RegistryError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let id = text.trim().to_string();
    if !valid_id(&id) {
        return Err(RegistryError::NoMachineId {
            path: path.display().to_string(),
        });
    }
    Ok(id)
}

/// A machine id names keys and an etcd role (`caisson_layout::fleet_id`).
pub fn valid_id(id: &str) -> bool {
    caisson_layout::fleet_id::check(id).is_ok()
}

/// The OS version and boot slot of the machine under `root` (either may be unknown).
pub fn os_facts(root: &Path) -> (Option<String>, Option<String>) {
    let rel = root.join(caisson_layout::osrelease::PATH.trim_start_matches('/'));
    let version = std::fs::read_to_string(rel)
        .ok()
        .and_then(|t| OsRelease::parse(&t).ok())
        .map(|o| o.version);
    let slot = std::fs::read_to_string(root.join("proc/cmdline"))
        .ok()
        .and_then(|t| BootParams::parse(&t).ok())
        .map(|b| b.slot.to_string());
    (version, slot)
}

/// The memory (`MemTotal` of `/proc/meminfo` under `root`, in bytes) and the CPUs this process
/// may use, each `None` when unknown.
pub fn capacity(root: &Path) -> (Option<u64>, Option<u32>) {
    let memory = std::fs::read_to_string(root.join("proc/meminfo"))
        .ok()
        .and_then(|t| mem_total(&t));
    let cpus = std::thread::available_parallelism()
        .ok()
        .and_then(|n| u32::try_from(n.get()).ok());
    (memory, cpus)
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => kib.checked_mul(1024),
        Some(_) => None,
    }
}

/// The address other machines reach this one at: the source address of the route to `endpoint`
/// (no packet is sent).
pub fn local_address(endpoint: &str) -> Option<String> {
    let hostport = endpoint.split("://").nth(1)?.split('/').next()?.to_string();
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect(hostport).ok()?;
    Some(sock.local_addr().ok()?.ip().to_string())
}

/// A machine's membership: its lease, its record, and leadership.
#[derive(Debug)]
pub struct Member {
    client: Client,
    keys: Keys,
    record: MachineRecord,
    ttl_s: i64,
    lease: i64,
    /// The current lease, for a keepalive that runs beside the agent's ticks.
    lease_now: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// etcd refused this machine's campaign: its user has no leader role (said once).
    may_not_lead: std::sync::atomic::AtomicBool,
}

impl Member {
    /// Registers `record` under a new lease of `ttl_s` seconds.
    pub async fn join(
        client: Client,
        keys: Keys,
        record: MachineRecord,
        ttl_s: i64,
    ) -> Result<Member, RegistryError> {
        let mut m = Member {
            client,
            keys,
            record,
            ttl_s,
            lease: 0,
            lease_now: Default::default(),
            may_not_lead: Default::default(),
        };
        m.register().await?;
        Ok(m)
    }

    /// The machine's id.
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// The address other machines reach this one at, as its record says.
    pub fn address(&self) -> &str {
        &self.record.address
    }

    /// The TTL of the machine's lease, in seconds.
    pub fn ttl_s(&self) -> i64 {
        self.ttl_s
    }

    /// The lease the machine's keys hang on.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// The lease, as it changes when the machine registers again (see [`Member::heartbeat`]).
    pub fn lease_handle(&self) -> std::sync::Arc<std::sync::atomic::AtomicI64> {
        self.lease_now.clone()
    }

    async fn register(&mut self) -> Result<(), RegistryError> {
        let lease = self.client.lease_grant(self.ttl_s).await?;
        self.lease = lease.id;
        self.lease_now
            .store(lease.id, std::sync::atomic::Ordering::SeqCst);
        self.write_record().await
    }

    async fn write_record(&mut self) -> Result<(), RegistryError> {
        self.record.last_seen = now_s();
        let value = serde_json::to_vec(&self.record).map_err(|source| RegistryError::Corrupt {
            key: self.keys.machine(&self.record.id),
            source,
        })?;
        self.client
            .put(&self.keys.machine(&self.record.id), value, self.lease)
            .await?;
        Ok(())
    }

    /// Renews the lease and refreshes the record; when the lease had expired (an etcd outage or
    /// a long pause), registers again under a new one. Returns true when it re-registered.
    pub async fn heartbeat(&mut self) -> Result<bool, RegistryError> {
        match self.client.lease_keepalive(self.lease).await {
            // A lease that is gone makes the record's write fail: refresh registers again.
            Ok(_) | Err(EtcdError::LeaseExpired(_)) => self.refresh().await,
            Err(e) => Err(e.into()),
        }
    }

    /// Refreshes the record only, for a caller whose lease another task renews (the agent's
    /// keepalive): one request instead of two. When the lease is gone the write fails and the
    /// machine registers again under a new one. Returns true when it re-registered.
    pub async fn refresh(&mut self) -> Result<bool, RegistryError> {
        match self.write_record().await {
            Ok(()) => Ok(false),
            Err(RegistryError::Etcd(EtcdError::LeaseExpired(_))) => {
                log::warn!("machine lease expired; registering again");
                self.register().await?;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// Tries to become (or stay) the leader. True if this machine leads. A machine whose etcd
    /// user may not write the leader key (no `caisson-leader` role) never leads; it says so once.
    pub async fn campaign(&self) -> Result<bool, RegistryError> {
        let key = self.keys.leader();
        let id = self.record.id.as_bytes().to_vec();
        let r = match self
            .client
            .txn(
                &[Compare::absent(&key)],
                &[Op::Put {
                    key: key.clone(),
                    value: id.clone(),
                    lease: self.lease,
                }],
                &[Op::Get {
                    key: key.clone(),
                    prefix: false,
                }],
            )
            .await
        {
            Err(e) if e.is_permission_denied() => {
                if !self
                    .may_not_lead
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    log::info!(
                        "{}: etcd does not let this machine's user write {key:?} (no leader \
                         role); it runs units and never leads",
                        self.record.id
                    );
                }
                return Ok(false);
            }
            r => r?,
        };
        if r.succeeded {
            log::info!("{} is now the fleet leader", self.record.id);
            return Ok(true);
        }
        let holder = r.responses.first().and_then(|kvs| kvs.first());
        Ok(holder.is_some_and(|kv| kv.value == id && kv.lease == self.lease))
    }

    /// The comparison that fences a leader's writes: it still holds the leader key.
    pub fn leader_fence(&self) -> Compare {
        Compare::value(self.keys.leader(), self.record.id.as_bytes().to_vec())
    }

    /// Leaves: revokes the lease (the record, statuses and leadership go with it).
    pub async fn leave(self) -> Result<(), RegistryError> {
        match self.client.lease_revoke(self.lease).await {
            Ok(()) | Err(EtcdError::LeaseExpired(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Every registered (live) machine whose record decodes (see [`machine_records`]).
pub async fn machines(client: &Client, keys: &Keys) -> Result<Vec<MachineRecord>, RegistryError> {
    Ok(machine_records(client, keys).await?.0)
}

/// Every registered machine, and the records under the machines prefix that do not decode
/// (a newer version's record with changed fields, say) or that name another machine than
/// their key.
pub async fn machine_records(
    client: &Client,
    keys: &Keys,
) -> Result<(Vec<MachineRecord>, Vec<Invalid>), RegistryError> {
    let r = client.range(&keys.machines(), true).await?;
    let mut good = Vec::new();
    let mut invalid = Vec::new();
    for kv in &r.kvs {
        let decoded = records::decode(&kv.key, &kv.value, kv.mod_revision, |m: &MachineRecord| {
            if kv.key == keys.machine(&m.id) {
                Ok(())
            } else {
                Err(format!("it names machine {:?}", m.id))
            }
        });
        match decoded {
            Ok(m) => good.push(m),
            Err(bad) => invalid.push(bad),
        }
    }
    Ok((good, invalid))
}

/// The current leader's machine id.
pub async fn leader(client: &Client, keys: &Keys) -> Result<Option<String>, RegistryError> {
    Ok(client.get(&keys.leader()).await?.map(|kv| kv.value_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_facts_from_a_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::create_dir_all(root.path().join("usr/lib")).unwrap();
        std::fs::create_dir_all(root.path().join("proc")).unwrap();
        assert!(machine_id(root.path()).is_err());
        std::fs::write(root.path().join("etc/machine-id"), "abc123\n").unwrap();
        assert_eq!(machine_id(root.path()).unwrap(), "abc123");
        let rel = OsRelease {
            image_id: "host".into(),
            version: "1.2.0".into(),
        };
        std::fs::write(root.path().join("usr/lib/os-release"), rel.render()).unwrap();
        std::fs::write(
            root.path().join("proc/cmdline"),
            "root=PARTUUID=6b3b2d55-0b4c-4b0e-9d0c-1c8b2a4f0a11 caisson.slot=b caisson.version=1.2.0 \
             caisson.state=PARTUUID=6b3b2d55-0b4c-4b0e-9d0c-1c8b2a4f0a12 \
             caisson.esp=PARTUUID=6b3b2d55-0b4c-4b0e-9d0c-1c8b2a4f0a13 caisson.insecure\n",
        )
        .unwrap();
        assert_eq!(
            os_facts(root.path()),
            (Some("1.2.0".into()), Some("b".into()))
        );
        assert_eq!(
            local_address("http://127.0.0.1:2379").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(capacity(root.path()).0, None);
        std::fs::write(
            root.path().join("proc/meminfo"),
            "MemTotal:        2014244 kB\nMemFree:          123 kB\n",
        )
        .unwrap();
        let (memory, cpus) = capacity(root.path());
        assert_eq!(memory, Some(2014244 * 1024));
        assert!(cpus.is_some_and(|n| n >= 1));
        assert_eq!(mem_total("MemTotal: 12 MB\n"), None);
    }

    #[test]
    fn records_without_capacity_still_decode() {
        let old = r#"{"id":"m1","address":"10.0.0.1","labels":{},"last_seen":5}"#;
        let r: MachineRecord = serde_json::from_str(old).unwrap();
        assert_eq!((r.memory_bytes, r.cpus), (None, None));
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("memory_bytes"), "{json}");
    }
}
