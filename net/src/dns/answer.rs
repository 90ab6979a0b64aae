//! The cluster zone's answers, computed from one [`Endpoints`] snapshot: no I/O, no clock.
//!
//! Names in the zone (`caisson.` here, whatever the configuration says):
//!
//! | name | records |
//! |---|---|
//! | `<unit>.caisson.` | A: every healthy instance's address, rotated per query |
//! | `<instance>.<unit>.caisson.` | A: that instance's address |
//! | `_<port>._<tcp\|udp>.<unit>.caisson.` | SRV `0 1 <port> <instance>.<unit>.caisson.` per instance, its A in the additional section |
//! | `_<tcp\|udp>.<unit>.caisson.` | none (an empty non-terminal: NODATA) |
//! | `caisson.` | SOA |
//!
//! Anything else in the zone is NXDOMAIN, with the zone's SOA in the authority section so that
//! resolvers cache the negative answer only for the (short) negative TTL. A name that exists
//! without records of the asked type is NOERROR with no answer and the SOA (NODATA).
//!
//! The SRV layout is the one Consul and Kubernetes' cluster DNS use: the target is a name of
//! the instance's own in the zone, whose A record travels in the additional section, so a client
//! needs one query for host and port.

use crate::endpoint::{Endpoints, Instance, Proto};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// Serial of the zone's SOA. Nothing transfers this zone, so it does not change.
const SOA_SERIAL: u32 = 1;

/// Errors in the zone's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    /// The cluster zone name is not a valid domain name.
    #[error("the cluster DNS zone {zone:?} is not a valid domain name: {source}")]
    BadName {
        zone: String,
        source: hickory_proto::ProtoError,
    },
}

/// The cluster zone: its name, TTLs and SOA.
#[derive(Debug, Clone)]
pub(crate) struct Zone {
    name: Name,
    ttl: u32,
    soa: Record,
}

/// What the zone says about one question.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Answer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

/// The names the zone holds below its apex.
enum Node<'a> {
    Apex,
    Unit(&'a [Instance]),
    Instance(&'a Instance),
    /// `_tcp.<unit>`: exists (no records) when an instance has a named port of that protocol.
    ProtoOf,
    Service(&'a str, &'a [Instance], &'a str, Proto),
}

impl Zone {
    /// The zone `name` (for example `caisson.`; a missing final dot is added), answering with
    /// `ttl` seconds and caching negative answers for `negative_ttl` seconds.
    pub(crate) fn new(name: &str, ttl: u32, negative_ttl: u32) -> Result<Self, ZoneError> {
        let bad = |source| ZoneError::BadName {
            zone: name.to_string(),
            source,
        };
        let mut zone = Name::from_ascii(name).map_err(bad)?.to_lowercase();
        zone.set_fqdn(true);
        let mname = zone.prepend_label("ns").map_err(bad)?;
        let rname = zone.prepend_label("hostmaster").map_err(bad)?;
        let soa = SOA::new(mname, rname, SOA_SERIAL, 60, 30, 3600, negative_ttl);
        let soa = Record::from_rdata(zone.clone(), negative_ttl, RData::SOA(soa));
        Ok(Zone {
            name: zone,
            ttl,
            soa,
        })
    }

    /// Whether `name` is in the zone (the zone's answers are authoritative there).
    pub(crate) fn contains(&self, name: &Name) -> bool {
        self.name.zone_of(name)
    }

    /// The zone's answer to `qtype` `qname` from `endpoints`, multi-record answers rotated by
    /// `rotate`; `None` when `qname` is not in the zone.
    pub(crate) fn answer(
        &self,
        qname: &Name,
        qtype: RecordType,
        qclass: DNSClass,
        endpoints: &Endpoints,
        rotate: usize,
    ) -> Option<Answer> {
        if !self.contains(qname) {
            return None;
        }
        if qclass != DNSClass::IN && qclass != DNSClass::ANY {
            return Some(Answer {
                rcode: ResponseCode::Refused,
                ..Answer::default()
            });
        }
        let labels: Vec<String> = qname
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .collect();
        let below = labels
            .len()
            .saturating_sub(usize::from(self.name.num_labels()));
        let Some(node) = find(&labels[..below], endpoints) else {
            return Some(self.negative(ResponseCode::NXDomain));
        };
        let mut answer = Answer::default();
        let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;
        match node {
            Node::Apex if wants(RecordType::SOA) => answer.answers.push(self.soa.clone()),
            Node::Unit(instances) if wants(RecordType::A) => {
                for i in rotated(instances, rotate) {
                    answer.answers.push(self.a(qname.clone(), i));
                }
            }
            Node::Instance(instance) if wants(RecordType::A) => {
                answer.answers.push(self.a(qname.clone(), instance));
            }
            Node::Service(unit, instances, port, proto) if wants(RecordType::SRV) => {
                self.srv(&mut answer, qname, unit, instances, port, proto, rotate);
            }
            _ => {}
        }
        if answer.answers.is_empty() {
            return Some(self.negative(ResponseCode::NoError));
        }
        Some(answer)
    }

    /// NXDOMAIN or NODATA: no answer, the SOA in the authority section.
    fn negative(&self, rcode: ResponseCode) -> Answer {
        Answer {
            rcode,
            authorities: vec![self.soa.clone()],
            ..Answer::default()
        }
    }

    fn a(&self, name: Name, instance: &Instance) -> Record {
        Record::from_rdata(name, self.ttl, RData::A(A(instance.address)))
    }

    /// The SRV records of port `port`/`proto` of `unit`'s instances and, in the additional
    /// section, their targets' A records. An instance whose id is not a DNS label is skipped.
    #[allow(clippy::too_many_arguments)]
    fn srv(
        &self,
        answer: &mut Answer,
        qname: &Name,
        unit: &str,
        instances: &[Instance],
        port: &str,
        proto: Proto,
        rotate: usize,
    ) {
        for instance in rotated(instances, rotate) {
            let Some(p) = named_port(instance, port, proto) else {
                continue;
            };
            let target = match Name::from_labels([instance.id.as_str(), unit])
                .and_then(|n| n.append_domain(&self.name))
            {
                Ok(target) => target,
                Err(e) => {
                    log::warn!(
                        "dns: instance {:?} of unit {unit:?} has no SRV record: its id is not a DNS label: {e}",
                        instance.id
                    );
                    continue;
                }
            };
            let srv = SRV::new(0, 1, p, target.clone());
            answer
                .answers
                .push(Record::from_rdata(qname.clone(), self.ttl, RData::SRV(srv)));
            answer.additionals.push(self.a(target, instance));
        }
    }
}

/// The node at `labels` (the labels below the zone's apex, leftmost first).
fn find<'a>(labels: &'a [String], endpoints: &'a Endpoints) -> Option<Node<'a>> {
    let (unit_label, rest) = match labels.split_last() {
        None => return Some(Node::Apex),
        Some(split) => split,
    };
    let (unit, instances) = endpoints
        .units
        .iter()
        .find(|(name, list)| name.eq_ignore_ascii_case(unit_label) && !list.is_empty())?;
    match rest {
        [] => Some(Node::Unit(instances)),
        [label] => {
            if let Some(proto) = proto_of(label) {
                let any = instances
                    .iter()
                    .flat_map(|i| &i.ports)
                    .any(|p| p.proto == proto && p.name.is_some());
                return any.then_some(Node::ProtoOf);
            }
            let instance = instances
                .iter()
                .find(|i| i.id.eq_ignore_ascii_case(label))?;
            Some(Node::Instance(instance))
        }
        [service, proto] => {
            let proto = proto_of(proto)?;
            let port = service.strip_prefix('_')?;
            let any = instances
                .iter()
                .any(|i| named_port(i, port, proto).is_some());
            any.then_some(Node::Service(unit, instances, port, proto))
        }
        _ => None,
    }
}

fn proto_of(label: &str) -> Option<Proto> {
    [Proto::Tcp, Proto::Udp]
        .into_iter()
        .find(|p| p.srv_label() == label)
}

fn named_port(instance: &Instance, name: &str, proto: Proto) -> Option<u16> {
    instance
        .ports
        .iter()
        .find(|p| {
            p.proto == proto
                && p.name
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .map(|p| p.port)
}

/// `list` starting at `by` modulo its length, wrapping around.
fn rotated<T>(list: &[T], by: usize) -> impl Iterator<Item = &T> {
    let start = if list.is_empty() { 0 } else { by % list.len() };
    list[start..].iter().chain(&list[..start])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Port;
    use std::net::Ipv4Addr;

    fn endpoints() -> Endpoints {
        let mut e = Endpoints::default();
        for (id, last) in [("m1", 1), ("m2", 2)] {
            e.insert(
                "web",
                Instance {
                    id: id.into(),
                    address: Ipv4Addr::new(10, 42, last, 2),
                    ports: vec![Port {
                        name: Some("http".into()),
                        port: 8080,
                        proto: Proto::Tcp,
                    }],
                    machine: id.into(),
                    revision: 1,
                },
            );
        }
        e
    }

    fn ask(name: &str, t: RecordType) -> Option<Answer> {
        let zone = Zone::new("caisson", 5, 2).unwrap();
        let name = Name::from_ascii(name).unwrap();
        zone.answer(&name, t, DNSClass::IN, &endpoints(), 1)
    }

    fn addresses(records: &[Record]) -> Vec<String> {
        records.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn a_unit_is_all_its_instances_rotated() {
        let a = ask("WEB.caisson.", RecordType::A).unwrap();
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert_eq!(addresses(&a.answers), ["10.42.2.2", "10.42.1.2"]);
        assert!(a.answers.iter().all(|r| r.ttl == 5));
    }

    #[test]
    fn an_instance_has_its_own_name() {
        let a = ask("m2.web.caisson.", RecordType::A).unwrap();
        assert_eq!(addresses(&a.answers), ["10.42.2.2"]);
    }

    #[test]
    fn srv_targets_instances_with_their_a_records_additional() {
        let a = ask("_http._tcp.web.caisson.", RecordType::SRV).unwrap();
        let srv: Vec<String> = addresses(&a.answers);
        assert_eq!(
            srv,
            ["0 1 8080 m2.web.caisson.", "0 1 8080 m1.web.caisson."]
        );
        assert_eq!(addresses(&a.additionals), ["10.42.2.2", "10.42.1.2"]);
        assert_eq!(a.additionals[0].name.to_ascii(), "m2.web.caisson.");
    }

    #[test]
    fn unknown_names_are_nxdomain_and_missing_types_nodata_both_with_the_soa() {
        for name in [
            "db.caisson.",
            "m3.web.caisson.",
            "_ftp._tcp.web.caisson.",
            "_udp.web.caisson.",
            "a.b.c.web.caisson.",
        ] {
            let a = ask(name, RecordType::A).unwrap();
            assert_eq!(a.rcode, ResponseCode::NXDomain, "{name}");
            assert_eq!(a.authorities.len(), 1, "{name}");
            assert_eq!(a.authorities[0].record_type(), RecordType::SOA);
            assert_eq!(a.authorities[0].ttl, 2);
        }
        for (name, t) in [
            ("web.caisson.", RecordType::AAAA),
            ("web.caisson.", RecordType::SRV),
            ("_tcp.web.caisson.", RecordType::SRV),
            ("_http._tcp.web.caisson.", RecordType::A),
            ("caisson.", RecordType::A),
        ] {
            let a = ask(name, t).unwrap();
            assert_eq!(a.rcode, ResponseCode::NoError, "{name} {t}");
            assert!(a.answers.is_empty(), "{name} {t}");
            assert_eq!(a.authorities[0].record_type(), RecordType::SOA);
        }
    }

    #[test]
    fn names_outside_the_zone_are_not_ours() {
        assert!(ask("example.org.", RecordType::A).is_none());
        assert!(ask("caisson.example.org.", RecordType::A).is_none());
        let apex = ask("caisson.", RecordType::SOA).unwrap();
        assert_eq!(apex.answers[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn a_bad_zone_name_is_an_error() {
        assert!(Zone::new("a..b", 5, 2).is_err());
    }
}
