//! The cluster network on etcd, with flannel's semantics: the operator writes the network's
//! configuration once ([`init`], `caisson-fleet network init 10.42.0.0/16`), and each agent
//! claims one subnet of it under its machine's lease ([`lease::SubnetLease`]), so a machine that
//! goes away frees its subnet when its lease expires and every host can list the others'
//! subnets to route to them ([`peers`]). The formats and the choice of a subnet are
//! `caisson_net::cluster`'s; the keys are [`crate::registry::Keys`]' (`network/config`,
//! `network/subnets/<a.b.c.d>-<len>`).
//!
//! A machine's own network is what its record's `address` says: a bare address is taken as
//! the `/24` around it (a machine record carries no prefix length), so [`init`] refuses a
//! cluster range that overlaps the `/24` of any registered machine. An address written with its
//! prefix (`10.0.0.5/22`) is taken as it is; one that is not IPv4 (`unknown`) is skipped.

pub mod lease;
pub mod routes;

pub use caisson_net::cluster::{Backend, ConfigError, Ipv4Net, NetworkConfig, SubnetRecord};
pub use lease::SubnetLease;

use crate::etcd::{Client, Compare, EtcdError, Op};
use crate::records::{self, Invalid};
use crate::registry::{self, Keys, MachineRecord, RegistryError};
use std::net::Ipv4Addr;

/// What went wrong with the cluster network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The configuration asked for cannot be used.
    #[error("cluster network: {0}")]
    Invalid(#[from] ConfigError),
    /// Another configuration is already in etcd.
    #[error(
        "the cluster network is already {existing:?} ({key}); not replacing it with {wanted:?}: \
         hosts hold subnets of it (delete the key by hand only when no host uses the network)"
    )]
    Conflict {
        key: String,
        existing: NetworkConfig,
        wanted: NetworkConfig,
    },
    /// The range overlaps a machine's own network.
    #[error(
        "cluster network {network} overlaps {overlapping}, the network of machine {machine} \
         (address {address}{assumed}): choose a range none of the machines' networks use"
    )]
    Overlaps {
        network: Ipv4Net,
        overlapping: Ipv4Net,
        machine: String,
        address: String,
        assumed: &'static str,
    },
    /// A stored configuration that does not decode.
    #[error("{key} holds no network configuration this version reads: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// A record could not be encoded (never happens with these types).
    #[error("encoding {key}: {source}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// The subnet is held by another machine.
    #[error("subnet {subnet} is held by machine {holder}; a subnet has one holder")]
    Taken { subnet: Ipv4Net, holder: String },
    /// The subnet is not one a host of this network may hold.
    #[error("{subnet} is not a /{} subnet of {} a host may hold", config.subnet_len, config.network)]
    OutOfRange {
        subnet: Ipv4Net,
        config: NetworkConfig,
    },
    /// Every subnet is held.
    #[error("every /{} subnet of {} is held: no subnet for machine {machine}", config.subnet_len, config.network)]
    Full {
        config: NetworkConfig,
        machine: String,
    },
    /// Claims kept racing with other machines'.
    #[error("claiming a subnet of {network}: the claims kept changing under us ({tries} tries); trying again later")]
    Contended { network: Ipv4Net, tries: u32 },
    /// The lease the claim was to hang on is gone.
    #[error("etcd lease {0:x} has expired; the machine must register again before it claims")]
    LeaseExpired(i64),
    /// The subnet's peers need an IPv4 address to send its packets to.
    #[error("machine {machine}'s address {address:?} is not an IPv4 address; the cluster network routes over IPv4 (set `address` in fleet.toml)")]
    NotIpv4 { machine: String, address: String },
    /// The state file could not be written or read.
    #[error("subnet state file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The configuration in etcd, if the operator wrote one.
pub async fn config(client: &Client, keys: &Keys) -> Result<Option<NetworkConfig>, NetworkError> {
    let key = keys.network_config();
    let Some(kv) = client.get(&key).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&kv.value)
        .map(Some)
        .map_err(|source| NetworkError::Corrupt { key, source })
}

/// What [`init`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// The configuration was written.
    Written,
    /// The same configuration was already there.
    Unchanged,
}

/// The network a machine's record places it in: `address` as `a.b.c.d/len`, or a bare address
/// taken as the `/24` around it (true: assumed). `None` for an address that is not IPv4.
pub fn machine_network(address: &str) -> Option<(Ipv4Net, bool)> {
    if let Ok(net) = address.parse::<Ipv4Net>() {
        return Some((net.trunc(), false));
    }
    let ip: Ipv4Addr = address.parse().ok()?;
    Some((Ipv4Net::new(ip, 24).ok()?.trunc(), true))
}

/// The IPv4 address of a machine record's `address` (bare or `a.b.c.d/len`).
pub fn machine_ip(address: &str) -> Option<Ipv4Addr> {
    address.split('/').next().unwrap_or(address).parse().ok()
}

/// The first of `machines` whose own network overlaps `config`'s range.
pub fn overlapping(config: &NetworkConfig, machines: &[MachineRecord]) -> Option<NetworkError> {
    machines.iter().find_map(|m| {
        let (net, assumed) = machine_network(&m.address)?;
        let hit = config.overlaps(&[net]).into_iter().next()?;
        Some(NetworkError::Overlaps {
            network: config.network,
            overlapping: hit,
            machine: m.id.clone(),
            address: m.address.clone(),
            assumed: if assumed {
                "; its record has no prefix length: the /24 around it is assumed"
            } else {
                ""
            },
        })
    })
}

/// Writes the cluster network's configuration if there is none: checked, and refused when it
/// overlaps a registered machine's own network. The same configuration again is fine; another
/// is an error naming both.
pub async fn init(
    client: &Client,
    keys: &Keys,
    config: &NetworkConfig,
) -> Result<Init, NetworkError> {
    config.check()?;
    let machines = registry::machines(client, keys).await?;
    if let Some(e) = overlapping(config, &machines) {
        return Err(e);
    }
    let key = keys.network_config();
    let value = serde_json::to_vec(config).map_err(|source| NetworkError::Encode {
        key: key.clone(),
        source,
    })?;
    let r = client
        .txn(
            &[Compare::absent(&key)],
            &[Op::put(&key, value)],
            &[Op::Get {
                key: key.clone(),
                prefix: false,
            }],
        )
        .await?;
    if r.succeeded {
        return Ok(Init::Written);
    }
    let existing = r.responses.first().and_then(|kvs| kvs.first());
    let existing: NetworkConfig = match existing {
        Some(kv) => serde_json::from_slice(&kv.value).map_err(|source| NetworkError::Corrupt {
            key: key.clone(),
            source,
        })?,
        // Deleted between the two halves of the transaction: impossible, it is atomic.
        None => return Ok(Init::Unchanged),
    };
    if existing == *config {
        Ok(Init::Unchanged)
    } else {
        Err(NetworkError::Conflict {
            key,
            existing,
            wanted: *config,
        })
    }
}

/// A subnet claim as read from etcd, with the lease it hangs on and its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub record: SubnetRecord,
    pub lease: i64,
    pub mod_revision: i64,
}

/// Every subnet claim, and the records under the subnets' prefix that do not decode or that
/// name another subnet than their key.
pub async fn claims(
    client: &Client,
    keys: &Keys,
) -> Result<(Vec<Claim>, Vec<Invalid>), NetworkError> {
    let prefix = keys.subnets();
    let r = client.range(&prefix, true).await?;
    let mut good = Vec::new();
    let mut invalid = Vec::new();
    for kv in &r.kvs {
        let named = kv
            .key
            .strip_prefix(&prefix)
            .and_then(caisson_net::cluster::parse_subnet_key);
        let decoded = records::decode(&kv.key, &kv.value, kv.mod_revision, |s: &SubnetRecord| {
            if named == Some(s.subnet) {
                Ok(())
            } else {
                Err(format!("it names subnet {}", s.subnet))
            }
        });
        match decoded {
            Ok(record) => good.push(Claim {
                record,
                lease: kv.lease,
                mod_revision: kv.mod_revision,
            }),
            Err(bad) => invalid.push(bad),
        }
    }
    Ok((good, invalid))
}

/// Every host's subnet (for the routes to them); records that do not decode are skipped.
pub async fn peers(client: &Client, keys: &Keys) -> Result<Vec<SubnetRecord>, NetworkError> {
    let (good, invalid) = claims(client, keys).await?;
    for bad in &invalid {
        log::debug!("{bad}");
    }
    Ok(good.into_iter().map(|c| c.record).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn machine(id: &str, address: &str) -> MachineRecord {
        MachineRecord {
            id: id.into(),
            address: address.into(),
            labels: Default::default(),
            version: None,
            slot: None,
            last_seen: 0,
            memory_bytes: None,
            cpus: None,
        }
    }

    #[test]
    fn a_machine_network_is_its_prefix_or_the_24_around_it() {
        assert_eq!(
            machine_network("10.42.7.9"),
            Some(("10.42.7.0/24".parse().unwrap(), true))
        );
        assert_eq!(
            machine_network("10.40.7.9/14"),
            Some(("10.40.0.0/14".parse().unwrap(), false))
        );
        assert_eq!(machine_network("unknown"), None);
        assert_eq!(machine_network("fd00::1"), None);
        let c = NetworkConfig::new("10.42.0.0/16".parse().unwrap());
        let ms = [
            machine("a", "192.168.1.4"),
            machine("b", "unknown"),
            machine("c", "10.42.200.17"),
        ];
        let e = overlapping(&c, &ms).unwrap().to_string();
        for part in [
            "10.42.0.0/16",
            "10.42.200.0/24",
            "machine c",
            "/24 around it",
        ] {
            assert!(e.contains(part), "{part}: {e}");
        }
        assert!(overlapping(&c, &ms[..2]).is_none());
        let wide = [machine("d", "10.40.0.5/14")];
        let e = overlapping(&c, &wide).unwrap().to_string();
        assert!(e.contains("10.40.0.0/14") && !e.contains("assumed"), "{e}");
    }
}
