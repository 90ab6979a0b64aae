//! What service discovery serves: each unit's healthy instances, where they listen. The fleet
//! agent builds an [`Endpoints`] from the registrations in etcd (only instances whose health
//! check passes are registered); the DNS responder answers from it and templates render it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// A transport protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The label of an SRV name: `_tcp` or `_udp`.
    pub fn srv_label(self) -> &'static str {
        match self {
            Proto::Tcp => "_tcp",
            Proto::Udp => "_udp",
        }
    }
}

/// A port an instance listens on inside its container; `name` (if any) makes it an SRV
/// record `_<name>._<proto>.<unit>.caisson.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Port {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    pub proto: Proto,
}

/// One running, healthy instance of a unit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Instance {
    /// The instance's id, unique within its unit (the machine id for one instance per machine).
    pub id: String,
    /// The container's address on the cluster network (or the host's, for host networking).
    pub address: Ipv4Addr,
    #[serde(default)]
    pub ports: Vec<Port>,
    /// The machine that runs it.
    pub machine: String,
    /// The unit's revision (its record's etcd revision) the instance runs.
    #[serde(default)]
    pub revision: i64,
}

/// Every unit's healthy instances, by unit name; units without one are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    pub units: BTreeMap<String, Vec<Instance>>,
}

impl Endpoints {
    /// The healthy instances of `unit`, in a stable order (none if it has none).
    pub fn instances(&self, unit: &str) -> &[Instance] {
        self.units.get(unit).map_or(&[], Vec::as_slice)
    }

    /// Adds one instance, kept sorted so that two equal sets compare equal.
    pub fn insert(&mut self, unit: &str, instance: Instance) {
        let list = self.units.entry(unit.to_string()).or_default();
        list.retain(|i| i.id != instance.id);
        list.push(instance);
        list.sort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(id: &str, last: u8) -> Instance {
        Instance {
            id: id.into(),
            address: Ipv4Addr::new(10, 42, last, 2),
            ports: vec![Port {
                name: Some("http".into()),
                port: 80,
                proto: Proto::Tcp,
            }],
            machine: format!("m{last}"),
            revision: 7,
        }
    }

    #[test]
    fn insertion_order_does_not_matter_and_an_id_is_kept_once() {
        let mut a = Endpoints::default();
        a.insert("web", web("m1", 1));
        a.insert("web", web("m2", 2));
        let mut b = Endpoints::default();
        b.insert("web", web("m2", 2));
        b.insert("web", web("m1", 9));
        b.insert("web", web("m1", 1));
        assert_eq!(a, b);
        assert_eq!(a.instances("web").len(), 2);
        assert!(a.instances("db").is_empty());
    }

    #[test]
    fn the_json_form_is_what_etcd_holds() {
        let i = web("m1", 1);
        let text = serde_json::to_string(&i).unwrap();
        assert_eq!(
            text,
            r#"{"id":"m1","address":"10.42.1.2","ports":[{"name":"http","port":80,"proto":"tcp"}],"machine":"m1","revision":7}"#
        );
        assert_eq!(serde_json::from_str::<Instance>(&text).unwrap(), i);
    }
}
