//! A host's claim on its subnet: `network/subnets/<a.b.c.d>-<len>` holding the host's
//! [`SubnetRecord`], attached to the machine's etcd lease (the one its machine record hangs
//! on), so that the subnet is freed when the machine's lease expires.
//!
//! A claim is one transaction that succeeds only if the subnet's key is absent or still holds
//! this machine's claim as it was read (compared by revision): two machines can never hold one
//! subnet. The machine prefers, in order, the subnet it holds in etcd (an agent restarted while
//! its old lease lives moves the claim onto its new lease), then the one it held last, kept in
//! a small file on the state partition ([`STATE_PATH`]) so it gets the same subnet after a
//! reboot or a lease expiry, and otherwise takes the first free one. When its lease is lost and
//! it registers again, it claims again under the new lease ([`SubnetLease::ensure`]).

use super::{claims, Claim, NetworkConfig, NetworkError, SubnetRecord};
use crate::etcd::{Client, Compare, EtcdError, Op};
use crate::registry::Keys;
use caisson_net::cluster::{self, Ipv4Net};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Where an agent remembers its subnet, on the state partition.
pub const STATE_PATH: &str = "/var/lib/caisson/net/subnet.json";

/// How many times a claim that lost a race is tried again before giving up for this tick.
const MAX_TRIES: u32 = 50;

/// The subnet a machine held last, and of which network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub network: Ipv4Net,
    pub subnet: Ipv4Net,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> NetworkError + '_ {
    move |source| NetworkError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The subnet saved at `path`; `None` when there is no file, or one that does not decode
/// (logged: the machine then takes a free subnet, which is safe).
pub fn load(path: &Path) -> Result<Option<Saved>, NetworkError> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(saved) => Ok(Some(saved)),
            Err(e) => {
                log::warn!("{}: not a saved subnet ({e}); ignoring it", path.display());
                Ok(None)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Saves `saved` at `path` atomically: a temporary file beside it, synced, renamed over it, and
/// the directory synced (made if missing).
pub fn save(path: &Path, saved: &Saved) -> Result<(), NetworkError> {
    let err = io_error(path);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(&err)?;
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(saved).map_err(|source| NetworkError::Encode {
        key: path.display().to_string(),
        source,
    })?;
    let mut f = std::fs::File::create(&tmp).map_err(&err)?;
    f.write_all(&text)
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(&err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(&err)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(&err)
}

/// Writes `record` at its subnet's key under `lease`, if the key is absent (`current` is
/// `None`) or still holds `current` as it was read: a subnet never gets a second holder.
/// `also` runs in the same transaction. Returns false when the key changed since the read.
async fn put_if(
    client: &Client,
    keys: &Keys,
    record: &SubnetRecord,
    current: Option<&Claim>,
    lease: i64,
    also: Vec<Op>,
) -> Result<bool, NetworkError> {
    let key = keys.subnet(&record.subnet);
    let value = serde_json::to_vec(record).map_err(|source| NetworkError::Encode {
        key: key.clone(),
        source,
    })?;
    let compare = match current {
        Some(c) => Compare::mod_revision(&key, c.mod_revision),
        None => Compare::absent(&key),
    };
    let mut ops = vec![Op::Put { key, value, lease }];
    ops.extend(also);
    match client.txn(&[compare], &ops, &[]).await {
        Ok(r) => Ok(r.succeeded),
        Err(EtcdError::Api { message, .. }) if message.contains("lease not found") => {
            Err(NetworkError::LeaseExpired(lease))
        }
        Err(e) => Err(e.into()),
    }
}

/// Claims exactly `record.subnet` for `record.machine` under `lease`: fails with
/// [`NetworkError::Taken`] when another machine holds it, [`NetworkError::OutOfRange`] when
/// it is not a host subnet of `config`.
pub async fn claim_exact(
    client: &Client,
    keys: &Keys,
    config: &NetworkConfig,
    record: &SubnetRecord,
    lease: i64,
) -> Result<(), NetworkError> {
    if !config.is_host_subnet(&record.subnet) {
        return Err(NetworkError::OutOfRange {
            subnet: record.subnet,
            config: *config,
        });
    }
    let key = keys.subnet(&record.subnet);
    let taken = |holder: String| NetworkError::Taken {
        subnet: record.subnet,
        holder,
    };
    let current = match client.get(&key).await? {
        None => None,
        Some(kv) => match serde_json::from_slice::<SubnetRecord>(&kv.value) {
            Ok(r) if r.machine == record.machine => Some(Claim {
                record: r,
                lease: kv.lease,
                mod_revision: kv.mod_revision,
            }),
            Ok(r) => return Err(taken(r.machine)),
            Err(_) => return Err(taken(format!("(unreadable record at {key})"))),
        },
    };
    if put_if(client, keys, record, current.as_ref(), lease, Vec::new()).await? {
        return Ok(());
    }
    Err(taken("(a claim made since it was read)".into()))
}

/// One machine's subnet claim, kept across leases.
#[derive(Debug)]
pub struct SubnetLease {
    client: Client,
    keys: Keys,
    machine: String,
    public_ip: Ipv4Addr,
    state: PathBuf,
    /// The claim made last, and the lease it was made under.
    held: Option<(SubnetRecord, i64)>,
}

impl SubnetLease {
    /// Machine `machine`, reached by its peers at `address` (its record's, with or without a
    /// prefix length; IPv4 only), remembering its
    /// subnet at `state` (see [`STATE_PATH`]).
    pub fn new(
        client: Client,
        keys: Keys,
        machine: &str,
        address: &str,
        state: impl Into<PathBuf>,
    ) -> Result<SubnetLease, NetworkError> {
        // An address may carry its prefix length (`10.0.0.5/24`).
        let public_ip = super::machine_ip(address).ok_or_else(|| NetworkError::NotIpv4 {
            machine: machine.into(),
            address: address.into(),
        })?;
        Ok(SubnetLease {
            client,
            keys,
            machine: machine.into(),
            public_ip,
            state: state.into(),
            held: None,
        })
    }

    /// The subnet claimed last.
    pub fn held(&self) -> Option<&SubnetRecord> {
        self.held.as_ref().map(|(r, _)| r)
    }

    /// The lease the last claim was made under.
    pub fn lease(&self) -> Option<i64> {
        self.held.as_ref().map(|(_, l)| *l)
    }

    /// Whether etcd still holds the last claim as it was made (same record, same lease). When
    /// it does not (another machine's credentials deleted or overwrote it, or the lease is
    /// gone), the claim is forgotten, so the next [`SubnetLease::ensure`] claims again.
    pub async fn verify(&mut self) -> Result<bool, NetworkError> {
        let Some((record, lease)) = &self.held else {
            return Ok(false);
        };
        let still = self
            .client
            .get(&self.keys.subnet(&record.subnet))
            .await?
            .is_some_and(|kv| {
                kv.lease == *lease
                    && serde_json::from_slice::<SubnetRecord>(&kv.value)
                        .ok()
                        .as_ref()
                        == Some(record)
            });
        if !still {
            self.held = None;
        }
        Ok(still)
    }

    /// Claims again only when nothing was claimed yet under `lease` (a new lease after a lease
    /// loss, or a first claim): `Some` with the record when it claimed.
    pub async fn ensure(
        &mut self,
        config: &NetworkConfig,
        lease: i64,
    ) -> Result<Option<SubnetRecord>, NetworkError> {
        match &self.held {
            Some((r, l)) if *l == lease && config.is_host_subnet(&r.subnet) => Ok(None),
            _ => self.claim(config, lease).await.map(Some),
        }
    }

    /// Claims this machine's subnet of `config` under `lease` (see the module's doc for which),
    /// drops its claims on any other subnet in the same transaction, and saves the subnet in
    /// the state file (a failure to save is logged: the claim holds, only the next boot may get
    /// another subnet).
    pub async fn claim(
        &mut self,
        config: &NetworkConfig,
        lease: i64,
    ) -> Result<SubnetRecord, NetworkError> {
        config.check()?;
        let saved = load(&self.state)?.filter(|s| s.network == config.network);
        for attempt in 0..MAX_TRIES {
            let (all, invalid) = claims(&self.client, &self.keys).await?;
            let (mine, others): (Vec<Claim>, Vec<Claim>) = all
                .into_iter()
                .partition(|c| c.record.machine == self.machine);
            // A key whose record does not decode is not free either.
            let taken: Vec<Ipv4Net> = others
                .iter()
                .map(|c| c.record.subnet)
                .chain(invalid.iter().filter_map(|i| {
                    i.key
                        .strip_prefix(&self.keys.subnets())
                        .and_then(cluster::parse_subnet_key)
                }))
                .collect();
            let preferred = mine
                .iter()
                .map(|c| c.record.subnet)
                .find(|s| config.is_host_subnet(s))
                .or(saved.map(|s| s.subnet));
            let subnet =
                cluster::pick(config, &taken, preferred).ok_or_else(|| NetworkError::Full {
                    config: *config,
                    machine: self.machine.clone(),
                })?;
            if let Some(p) = preferred.filter(|p| *p != subnet) {
                log::info!("subnet {p} is held by another machine; claiming {subnet}");
            }
            let current = mine.iter().find(|c| c.record.subnet == subnet);
            let record = SubnetRecord {
                subnet,
                machine: self.machine.clone(),
                public_ip: self.public_ip,
                vtep_mac: current.and_then(|c| c.record.vtep_mac.clone()),
            };
            let stale: Vec<Op> = mine
                .iter()
                .filter(|c| c.record.subnet != subnet)
                .map(|c| Op::delete(self.keys.subnet(&c.record.subnet)))
                .collect();
            let unchanged = current.is_some_and(|c| c.record == record && c.lease == lease);
            if (unchanged && stale.is_empty())
                || put_if(&self.client, &self.keys, &record, current, lease, stale).await?
            {
                self.remember(config, &record);
                self.held = Some((record.clone(), lease));
                return Ok(record);
            }
            let pause = 5 + u64::from(attempt) * 7 % 40;
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        }
        Err(NetworkError::Contended {
            network: config.network,
            tries: MAX_TRIES,
        })
    }

    fn remember(&self, config: &NetworkConfig, record: &SubnetRecord) {
        let saved = Saved {
            network: config.network,
            subnet: record.subnet,
        };
        if load(&self.state).ok().flatten() == Some(saved) {
            return;
        }
        if let Err(e) = save(&self.state, &saved) {
            log::warn!("{e}; after a restart this machine may get another subnet");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_state_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net/subnet.json");
        assert_eq!(load(&path).unwrap(), None);
        let s = Saved {
            network: "10.42.0.0/16".parse().unwrap(),
            subnet: "10.42.7.0/24".parse().unwrap(),
        };
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap(), Some(s));
        assert!(!path.with_extension("json.tmp").exists());
        std::fs::write(&path, "{").unwrap();
        assert_eq!(load(&path).unwrap(), None, "a torn file is ignored");
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, "").unwrap();
        let e = save(&blocked.join("subnet.json"), &s)
            .unwrap_err()
            .to_string();
        assert!(e.contains("file/subnet.json"), "{e}");
        assert!(matches!(
            SubnetLease::new(
                Client::new(&["http://127.0.0.1:1"]).unwrap(),
                Keys::new("/f/"),
                "m1",
                "unknown",
                &path
            ),
            Err(NetworkError::NotIpv4 { .. })
        ));
        let with_prefix = SubnetLease::new(
            Client::new(&["http://127.0.0.1:1"]).unwrap(),
            Keys::new("/f/"),
            "m1",
            "10.0.0.5/22",
            &path,
        )
        .unwrap();
        assert_eq!(with_prefix.public_ip, Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(with_prefix.held(), None);
    }
}
