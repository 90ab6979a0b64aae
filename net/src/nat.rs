//! Outbound NAT and published ports, in one nftables table of our own, `ip caisson`:
//!
//! ```text
//! table ip caisson {
//!   chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!     ip saddr 10.42.3.0/24 ip daddr != 10.42.0.0/16 masquerade
//!     ip saddr 10.42.3.0/24 ip daddr 10.42.3.0/24 ct status dnat masquerade }
//!   chain prerouting  { type nat hook prerouting priority dstnat; policy accept;
//!     fib daddr type local jump published }
//!   chain output      { type nat hook output priority dstnat; policy accept;
//!     fib daddr type local jump published }
//!   chain published   { tcp dport 8080 dnat to 10.42.3.2:80 ... }
//! }
//! ```
//!
//! Containers reach the outside as the host (masquerade), but keep their own address towards
//! the rest of the cluster network. A published port answers on every local address of the
//! host: from other hosts (prerouting), from the host itself (output), and from the host's own
//! containers (hairpin: masqueraded to the gateway address, or the answer would go straight
//! back over the bridge with the container's address and miss the reverse NAT). A container
//! reaching its own published port through the host does not work: the kernel drops the
//! DNATed packet before the forward hook (seen with `nft monitor trace`). Loopback
//! (127.0.0.1:port) is not published: the kernel would need `route_localnet`.
//!
//! Each [`apply`] replaces the whole table in one `nft -j -f -` run: nft sends it as one
//! netlink batch (add table, delete table, add everything), which the kernel commits
//! atomically, so a failure leaves the previous rules in place.
//!
//! Why the `nftables` crate (JSON through Debian's `nft`) and not the kernel API through
//! `rustables`: the JSON schema (libnftables-json(5)) is nft's documented, stable interface,
//! the typed crate is widely used and maintained, `nft` is in the image anyway (an operator
//! debugs with it), and nft does the expression encoding (fib, nat, payload offsets) that the
//! raw netlink API would have us hand-assemble; rustables is young and covers less of it.

use crate::endpoint::Proto;
use ipnet::Ipv4Net;
use nftables::expr::{
    Expression, Fib, FibFlag, FibResult, NamedExpression, Payload, PayloadField, Prefix, CT,
};
use nftables::helper::NftablesError;
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{JumpTarget, Match, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;

/// Our table: `ip caisson`.
pub const TABLE: &str = "caisson";
const PUBLISHED: &str = "published";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// What can go wrong with NAT.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// `nft` could not be run (not installed?).
    #[error("cannot run nft for table ip {TABLE}: {0} (install Debian's `nftables` package)")]
    NftMissing(NftablesError),
    /// `nft` refused the rules; the previous rules stay in place.
    #[error("nft refused table ip {TABLE} (the previous rules stay): {hint}: {stderr}")]
    NftFailed { hint: String, stderr: String },
    /// `nft` failed in another way.
    #[error("nft on table ip {TABLE}: {0}")]
    Nft(NftablesError),
    /// Two published ports claim the same host port and protocol.
    #[error("host port {port}/{proto:?} is published twice in table ip {TABLE}")]
    DuplicatePort { port: u16, proto: Proto },
    /// The host's subnet is not inside the cluster network.
    #[error("host subnet {subnet} is not inside the cluster network {cluster}")]
    SubnetOutsideCluster { subnet: Ipv4Net, cluster: Ipv4Net },
    /// A sysctl could not be written.
    #[error("cannot write {path}: {source}")]
    Sysctl {
        path: &'static str,
        source: std::io::Error,
    },
}

impl From<NftablesError> for NatError {
    fn from(e: NftablesError) -> Self {
        match e {
            NftablesError::NftExecution { .. } => NatError::NftMissing(e),
            NftablesError::NftFailed { hint, stderr, .. } => NatError::NftFailed { hint, stderr },
            e => NatError::Nft(e),
        }
    }
}

/// A container port published on the host: `host_port` on every local address of the host
/// goes to `addr:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublishedPort {
    pub host_port: u16,
    pub proto: Proto,
    /// The container's address.
    pub addr: Ipv4Addr,
    /// The port inside the container.
    pub port: u16,
}

/// Everything the table holds for one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatConfig {
    /// This host's container subnet (10.42.3.0/24).
    pub subnet: Ipv4Net,
    /// The whole cluster network (10.42.0.0/16): traffic to it keeps its source address.
    pub cluster: Ipv4Net,
    /// The published ports of the host's instances.
    pub ports: Vec<PublishedPort>,
}

/// The nftables document that replaces our table with `cfg` (pure; [`apply`] runs it).
pub fn ruleset(cfg: &NatConfig) -> Result<Nftables<'static>, NatError> {
    let (subnet, cluster) = (cfg.subnet.trunc(), cfg.cluster.trunc());
    if !cluster.contains(&subnet) {
        return Err(NatError::SubnetOutsideCluster { subnet, cluster });
    }
    let mut seen = BTreeSet::new();
    for p in &cfg.ports {
        if !seen.insert((p.host_port, p.proto)) {
            return Err(NatError::DuplicatePort {
                port: p.host_port,
                proto: p.proto,
            });
        }
    }
    let table = Table {
        family: NfFamily::IP,
        name: TABLE.into(),
        handle: None,
    };
    let mut cmds = vec![
        // Add first so that the delete succeeds when the table is not there yet.
        NfCmd::Add(NfListObject::Table(table.clone())),
        NfCmd::Delete(NfListObject::Table(table.clone())),
        NfCmd::Add(NfListObject::Table(table)),
    ];
    for (name, hook, prio) in [
        ("postrouting", NfHook::Postrouting, 100),
        ("prerouting", NfHook::Prerouting, -100),
        ("output", NfHook::Output, -100),
    ] {
        cmds.push(NfCmd::Add(NfListObject::Chain(base_chain(
            name, hook, prio,
        ))));
    }
    let published = Chain {
        name: PUBLISHED.into(),
        ..base_chain(PUBLISHED, NfHook::Output, 0)
    };
    let published = Chain {
        _type: None,
        hook: None,
        prio: None,
        policy: None,
        ..published
    };
    cmds.push(NfCmd::Add(NfListObject::Chain(published)));

    let masquerade = vec![
        matches(payload("ip", "saddr"), Operator::EQ, prefix(subnet)),
        matches(payload("ip", "daddr"), Operator::NEQ, prefix(cluster)),
        Statement::Masquerade(None),
    ];
    cmds.push(rule("postrouting", masquerade));
    let hairpin = vec![
        matches(payload("ip", "saddr"), Operator::EQ, prefix(subnet)),
        matches(payload("ip", "daddr"), Operator::EQ, prefix(subnet)),
        matches(ct("status"), Operator::IN, string("dnat")),
        Statement::Masquerade(None),
    ];
    cmds.push(rule("postrouting", hairpin));
    for chain in ["prerouting", "output"] {
        let local = Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags: HashSet::from([FibFlag::Daddr]),
        }));
        let jump = Statement::Jump(JumpTarget {
            target: PUBLISHED.into(),
        });
        cmds.push(rule(
            chain,
            vec![matches(local, Operator::EQ, string("local")), jump],
        ));
    }
    for p in &cfg.ports {
        cmds.push(rule(PUBLISHED, published_rule(p)));
    }
    let objects: Vec<NfObject<'static>> = cmds.into_iter().map(NfObject::CmdObject).collect();
    Ok(Nftables {
        objects: Cow::Owned(objects),
    })
}

/// Replaces our table with `cfg`, atomically, in the calling thread's network namespace.
pub fn apply(cfg: &NatConfig) -> Result<(), NatError> {
    let doc = ruleset(cfg)?;
    nftables::helper::apply_ruleset(&doc)?;
    log::info!(
        "nat: table ip {TABLE}: masquerade {} -> !{}, {} published ports",
        cfg.subnet,
        cfg.cluster,
        cfg.ports.len()
    );
    Ok(())
}

/// Removes our table (and so every rule of ours); fine if it is not there.
pub fn remove() -> Result<(), NatError> {
    let table = Table {
        family: NfFamily::IP,
        name: TABLE.into(),
        handle: None,
    };
    let cmds = [
        NfCmd::Add(NfListObject::Table(table.clone())),
        NfCmd::Delete(NfListObject::Table(table)),
    ];
    let objects: Vec<NfObject<'static>> = cmds.into_iter().map(NfObject::CmdObject).collect();
    nftables::helper::apply_ruleset(&Nftables {
        objects: Cow::Owned(objects),
    })?;
    Ok(())
}

/// Turns on IPv4 forwarding (`net.ipv4.ip_forward = 1`) in the calling thread's namespace.
pub fn enable_forwarding() -> Result<(), NatError> {
    let path = Path::new(IP_FORWARD);
    std::fs::write(path, b"1\n").map_err(|source| NatError::Sysctl {
        path: IP_FORWARD,
        source,
    })
}

fn base_chain(name: &'static str, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: name.into(),
        _type: Some(NfChainType::NAT),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

fn rule(chain: &'static str, expr: Vec<Statement<'static>>) -> NfCmd<'static> {
    NfCmd::Add(NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: TABLE.into(),
        chain: chain.into(),
        expr: Cow::Owned(expr),
        ..Rule::default()
    }))
}

fn published_rule(p: &PublishedPort) -> Vec<Statement<'static>> {
    let proto = match p.proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };
    let dnat = NAT {
        addr: Some(string(&p.addr.to_string())),
        family: None,
        port: Some(Expression::Number(u32::from(p.port))),
        flags: None,
    };
    vec![
        matches(
            payload(proto, "dport"),
            Operator::EQ,
            Expression::Number(p.host_port.into()),
        ),
        Statement::DNAT(Some(dnat)),
    ]
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

fn prefix(net: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(string(&net.network().to_string())),
        len: u32::from(net.prefix_len()),
    }))
}

fn string(s: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ports: Vec<PublishedPort>) -> NatConfig {
        NatConfig {
            subnet: "10.42.3.0/24".parse().unwrap(),
            cluster: "10.42.0.0/16".parse().unwrap(),
            ports,
        }
    }

    fn port(host_port: u16, proto: Proto) -> PublishedPort {
        PublishedPort {
            host_port,
            proto,
            addr: Ipv4Addr::new(10, 42, 3, 2),
            port: 80,
        }
    }

    #[test]
    fn the_document_replaces_the_table_in_one_batch() {
        let doc = ruleset(&cfg(vec![port(8080, Proto::Tcp), port(8080, Proto::Udp)])).unwrap();
        let json = serde_json::to_value(&doc).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        assert!(cmds[0]["add"]["table"].is_object());
        assert!(cmds[1]["delete"]["table"].is_object());
        let text = json.to_string();
        assert!(text.contains("\"masquerade\""), "{text}");
        assert!(
            text.contains("\"dnat\":{\"addr\":\"10.42.3.2\",\"port\":80}"),
            "{text}"
        );
        assert!(text.contains("\"fib\""), "{text}");
    }

    #[test]
    fn bad_configs_are_refused_before_nft() {
        let dup = ruleset(&cfg(vec![port(8080, Proto::Tcp), port(8080, Proto::Tcp)]));
        assert!(matches!(
            dup,
            Err(NatError::DuplicatePort { port: 8080, .. })
        ));
        let mut outside = cfg(vec![]);
        outside.cluster = "10.43.0.0/16".parse().unwrap();
        assert!(matches!(
            ruleset(&outside),
            Err(NatError::SubnetOutsideCluster { .. })
        ));
    }
}
