//! Service registrations: where each machine's healthy instances listen, for discovery (the DNS
//! responder and templates, through [`caisson_net::endpoint::Endpoints`]).
//!
//! A machine writes `<prefix>services/<machine>/<unit>` (an [`Instance`] as JSON) under its
//! lease for every unit it runs whose health check passes (`healthy`), or that runs and has
//! none (`running`), and deletes it as soon as the unit is anything else; the key goes with the
//! lease when the machine dies. The machine comes first in the key so that etcd's prefix
//! permissions let a machine write only its own registrations (see [`crate::access`]).
//!
//! The health state itself stays where the agent's monitor puts it (`crate::agent::health`,
//! reported under `status/`): a registration is derived from it, never decided here.

use crate::etcd::{Client, EtcdError};
use crate::records::{self, Invalid};
use crate::registry::Keys;
use crate::store::UnitStatus;
use crate::unit::{Network, UnitSpec};
use caisson_net::endpoint::{Endpoints, Instance, Port};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

/// What went wrong registering this machine's instances.
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("{key:?}: cannot encode the registration: {source}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The states in which an instance is registered.
pub const SERVING: [&str; 2] = ["healthy", "running"];

/// Whether an instance in this state takes traffic.
pub fn serving(status: &UnitStatus) -> bool {
    SERVING.contains(&status.state.as_str())
}

/// The registration of one instance of `spec` on `machine`: `address` is where it listens (the
/// container's address, or the machine's for host networking).
pub fn instance(machine: &str, spec: &UnitSpec, address: Ipv4Addr, revision: i64) -> Instance {
    Instance {
        id: machine.to_string(),
        address,
        ports: spec
            .ports
            .iter()
            .map(|p| Port {
                name: p.name.clone(),
                port: p.port,
                proto: p.proto(),
            })
            .collect(),
        machine: machine.to_string(),
        revision,
    }
}

/// Whether other machines reach this machine's containers at their own addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The cluster network routes every host's subnet (or there is one machine): a bridge
    /// instance is registered at its container's address, with its container ports.
    Routed,
    /// No cluster network: every host uses the same local subnet, so a bridge instance is
    /// registered at its machine's address with its published host ports only.
    Published,
}

/// What this machine should have registered: each serving unit of `statuses`, at the address
/// `address_of` gives for it, or `machine_address` (host networking, or [`Reach::Published`]).
/// A unit without an IPv4 address to give is left out (logged).
pub fn wanted(
    machine: &str,
    machine_address: Option<Ipv4Addr>,
    reach: Reach,
    desired: &BTreeMap<String, (UnitSpec, i64)>,
    statuses: &BTreeMap<String, UnitStatus>,
    address_of: impl Fn(&str) -> IpAddr,
) -> BTreeMap<String, Instance> {
    let mut out = BTreeMap::new();
    for (unit, status) in statuses {
        let Some((spec, revision)) = desired.get(unit) else {
            continue;
        };
        if !serving(status) {
            continue;
        }
        let address = match (spec.network, reach) {
            (Network::Host, _) | (Network::Bridge, Reach::Published) => machine_address,
            (Network::Bridge, Reach::Routed) => match address_of(unit) {
                IpAddr::V4(a) if !a.is_loopback() => Some(a),
                _ => None,
            },
        };
        let Some(a) = address else {
            log::debug!("unit {unit}: no IPv4 address to register it at");
            continue;
        };
        let mut i = instance(machine, spec, a, *revision);
        if spec.network == Network::Bridge && reach == Reach::Published {
            // Only what the host publishes is reachable, at the host's port.
            i.ports = spec
                .ports
                .iter()
                .filter_map(|p| {
                    Some(Port {
                        name: p.name.clone(),
                        port: p.host?,
                        proto: p.proto(),
                    })
                })
                .collect();
        }
        out.insert(unit.clone(), i);
    }
    out
}

/// What this machine has registered in etcd, so that a tick writes only what changed.
#[derive(Debug, Default)]
pub struct Registrations {
    registered: BTreeMap<String, Instance>,
}

impl Registrations {
    /// Forgets what was written: after the machine registered again under a new lease, its
    /// old keys are gone and everything is written again.
    pub fn clear(&mut self) {
        self.registered.clear();
    }

    /// Makes etcd hold `want` for `machine`: puts what is new or changed under `lease`, deletes
    /// what is no longer wanted.
    pub async fn sync(
        &mut self,
        client: &Client,
        keys: &Keys,
        machine: &str,
        lease: i64,
        want: &BTreeMap<String, Instance>,
    ) -> Result<(), ServicesError> {
        for (unit, instance) in want {
            if self.registered.get(unit) == Some(instance) {
                continue;
            }
            let key = keys.service(machine, unit);
            let value = serde_json::to_vec(instance).map_err(|source| ServicesError::Encode {
                key: key.clone(),
                source,
            })?;
            client.put(&key, value, lease).await?;
            log::info!(
                "unit {unit}: registered at {} for discovery",
                instance.address
            );
            self.registered.insert(unit.clone(), instance.clone());
        }
        let gone: Vec<String> = self
            .registered
            .keys()
            .filter(|u| !want.contains_key(*u))
            .cloned()
            .collect();
        for unit in gone {
            client.delete(&keys.service(machine, &unit), false).await?;
            log::info!("unit {unit}: no longer registered for discovery");
            self.registered.remove(&unit);
        }
        Ok(())
    }
}

/// Every registered instance in etcd, by unit, and the records that did not decode.
pub async fn endpoints(
    client: &Client,
    keys: &Keys,
) -> Result<(Endpoints, Vec<Invalid>), EtcdError> {
    let r = client.range(&keys.services(), true).await?;
    let mut out = Endpoints::default();
    let mut invalid = Vec::new();
    for kv in &r.kvs {
        let Some((machine, unit)) = kv
            .key
            .strip_prefix(&keys.services())
            .and_then(|rest| rest.split_once('/'))
        else {
            continue;
        };
        let checked = records::decode::<Instance>(&kv.key, &kv.value, kv.mod_revision, |i| {
            if i.machine == machine {
                Ok(())
            } else {
                Err(format!("registered by {machine} for machine {}", i.machine))
            }
        });
        match checked {
            Ok(instance) => out.insert(unit, instance),
            Err(bad) => invalid.push(bad),
        }
    }
    Ok((out, invalid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use caisson_net::endpoint::Proto;

    fn unit(text: &str) -> UnitSpec {
        UnitSpec::parse("web", &format!("{text}\n[image]\npath = \"/a.tar\"\n")).unwrap()
    }

    fn status(state: &str) -> UnitStatus {
        UnitStatus {
            state: state.into(),
            exit_code: None,
            error: None,
            restarts: 0,
            since: 0,
            health_error: None,
        }
    }

    #[test]
    fn only_serving_instances_are_wanted_at_their_address() {
        let bridge = unit("ports = [{ name = \"http\", port = 80, host = 8080 }]");
        let mut host = unit("network = \"host\"\nports = [\"53/udp\"]");
        host.name = "dns".into();
        let mut sick = unit("");
        sick.name = "sick".into();
        let desired = BTreeMap::from([
            ("web".to_string(), (bridge, 7)),
            ("dns".to_string(), (host, 9)),
            ("sick".to_string(), (sick, 3)),
        ]);
        let statuses = BTreeMap::from([
            ("web".to_string(), status("healthy")),
            ("dns".to_string(), status("running")),
            ("sick".to_string(), status("unhealthy")),
        ]);
        let addr = |u: &str| -> IpAddr {
            match u {
                "web" => Ipv4Addr::new(10, 42, 1, 5).into(),
                _ => Ipv4Addr::LOCALHOST.into(),
            }
        };
        let w = wanted(
            "m1",
            Some(Ipv4Addr::new(192, 0, 2, 1)),
            Reach::Routed,
            &desired,
            &statuses,
            addr,
        );
        assert_eq!(w.keys().collect::<Vec<_>>(), ["dns", "web"]);
        assert_eq!(w["web"].address, Ipv4Addr::new(10, 42, 1, 5));
        assert_eq!(w["web"].revision, 7);
        assert_eq!(
            w["web"].ports,
            [Port {
                name: Some("http".into()),
                port: 80,
                proto: Proto::Tcp
            }]
        );
        assert_eq!(w["dns"].address, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(w["dns"].ports[0].proto, Proto::Udp);
        // A bridge unit whose container has no address yet is not registered.
        let w = wanted("m1", None, Reach::Routed, &desired, &statuses, |_| {
            Ipv4Addr::LOCALHOST.into()
        });
        assert!(w.is_empty(), "{w:?}");
        // Without a cluster network: the machine's address and the published port only.
        let w = wanted(
            "m1",
            Some(Ipv4Addr::new(192, 0, 2, 1)),
            Reach::Published,
            &desired,
            &statuses,
            addr,
        );
        assert_eq!(w["web"].address, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(w["web"].ports.len(), 1);
        assert_eq!(w["web"].ports[0].port, 8080);
        assert_eq!(w["web"].ports[0].name.as_deref(), Some("http"));
    }
}
