//! A unit's network and ports.
//!
//! ```toml
//! network = "bridge"        # default: its own network namespace and an address on the host's
//!                           # bridge, in the host's subnet of the cluster network
//! # network = "host"        # the host's network namespace, as Docker's host mode
//! ports = [
//!   80,                     # the container listens on 80/tcp (found through discovery)
//!   "8080:80",              # ... and the host publishes it on its port 8080
//!   "5353:53/udp",
//!   { name = "http", port = 80, host = 8080, proto = "tcp" },  # named: an SRV record
//! ]
//! ```
//!
//! With `network = "host"` a port is the host's port (`"8080:80"` is refused: nothing maps it).
//! The host ports a unit takes ([`UnitSpec::host_ports`]) are what the scheduler keeps apart:
//! two units publishing one port never share a machine.

use super::UnitSpec;
use serde::{Deserialize, Serialize};

/// Which network namespace a unit's containers run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Its own namespace, a veth into the host's bridge, an address of the host's subnet.
    Bridge,
    /// The host's namespace.
    Host,
}

impl Network {
    /// A unit file that names no network: its own.
    pub fn file_default() -> Network {
        Network::Bridge
    }

    /// A unit record stored before units had a network ran in the host's: it keeps doing so.
    pub fn record_default() -> Network {
        Network::Host
    }
}

/// A port a unit's container listens on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Port {
    /// The container's port (with `network = "host"`, the host's).
    pub port: u16,
    pub udp: bool,
    /// Published on the host's addresses at this port (bridge network only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<u16>,
    /// Its name in discovery: `_<name>._<tcp|udp>.<unit>.caisson.` SRV records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Port {
    /// Its protocol, as discovery and NAT name it.
    pub fn proto(&self) -> caisson_net::endpoint::Proto {
        if self.udp {
            caisson_net::endpoint::Proto::Udp
        } else {
            caisson_net::endpoint::Proto::Tcp
        }
    }
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(name) = &self.name {
            write!(f, "{name}=")?;
        }
        if let Some(host) = self.host {
            write!(f, "{host}:")?;
        }
        write!(f, "{}/{}", self.port, if self.udp { "udp" } else { "tcp" })
    }
}

/// A port of the host a unit takes: two units taking one never share a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostPort {
    pub port: u16,
    pub udp: bool,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, if self.udp { "udp" } else { "tcp" })
    }
}

impl UnitSpec {
    /// The host's ports this unit takes on its machine: every port with `network = "host"`,
    /// the published ones otherwise.
    pub fn host_ports(&self) -> Vec<HostPort> {
        self.ports
            .iter()
            .filter_map(|p| {
                let port = match self.network {
                    Network::Host => Some(p.port),
                    Network::Bridge => p.host,
                }?;
                Some(HostPort { port, udp: p.udp })
            })
            .collect()
    }
}

/// A port as a unit file writes it.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum PortFile {
    Number(i64),
    Text(String),
    Table(PortTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PortTable {
    name: Option<String>,
    port: i64,
    host: Option<i64>,
    #[serde(default)]
    proto: Option<String>,
}

fn number(n: i64) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{n} is not a port number (1-65535)"))
}

fn text_number(t: &str) -> Result<u16, String> {
    t.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{t:?} is not a port number (1-65535)"))
}

fn proto(p: Option<&str>) -> Result<bool, String> {
    match p {
        None | Some("tcp") => Ok(false),
        Some("udp") => Ok(true),
        Some(other) => Err(format!("protocol {other:?} is not tcp or udp")),
    }
}

/// A DNS label for SRV names, as Kubernetes' port names: 1-15 of a-z, 0-9 and `-`, with a
/// letter, not starting or ending with `-`.
fn valid_port_name(n: &str) -> bool {
    (1..=15).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && n.bytes().any(|b| b.is_ascii_lowercase())
        && !n.starts_with('-')
        && !n.ends_with('-')
}

fn parse_one(p: &PortFile) -> Result<Port, String> {
    match p {
        PortFile::Number(n) => Ok(Port {
            port: number(*n)?,
            udp: false,
            host: None,
            name: None,
        }),
        PortFile::Text(t) => {
            let (ports, udp) = match t.split_once('/') {
                None => (t.as_str(), false),
                Some((n, p)) => (n, proto(Some(p))?),
            };
            let (host, port) = match ports.split_once(':') {
                None => (None, text_number(ports)?),
                Some((h, c)) => (Some(text_number(h)?), text_number(c)?),
            };
            Ok(Port {
                port,
                udp,
                host,
                name: None,
            })
        }
        PortFile::Table(t) => {
            if let Some(n) = &t.name {
                if !valid_port_name(n) {
                    return Err(format!(
                        "name {n:?} is not 1-15 of a-z, 0-9 and -, with a letter, not starting or ending with -"
                    ));
                }
            }
            Ok(Port {
                port: number(t.port)?,
                udp: proto(t.proto.as_deref())?,
                host: t.host.map(number).transpose()?,
                name: t.name.clone(),
            })
        }
    }
}

/// Parses and checks a unit file's `ports` for its `network`: the field that is wrong and why.
pub(super) fn check(files: &[PortFile], network: Network) -> Result<Vec<Port>, (String, String)> {
    let mut out: Vec<Port> = Vec::new();
    for (i, p) in files.iter().enumerate() {
        let at = |m: String| (format!("ports[{i}]"), m);
        let mut port = parse_one(p).map_err(at)?;
        if network == Network::Host {
            match port.host {
                Some(h) if h != port.port => {
                    return Err(at(format!(
                        "{h}:{}: with network = \"host\" the container listens on the host's port; nothing maps one to another",
                        port.port
                    )))
                }
                _ => port.host = None,
            }
        }
        if out.iter().any(|o| o.port == port.port && o.udp == port.udp) {
            return Err(at(format!("{port} is listed twice")));
        }
        if let Some(h) = port.host {
            if out.iter().any(|o| o.host == Some(h) && o.udp == port.udp) {
                return Err(at(format!("host port {h} is published twice")));
            }
        }
        if let Some(n) = &port.name {
            if out.iter().any(|o| o.name.as_ref() == Some(n)) {
                return Err(at(format!("the name {n:?} is given twice")));
            }
        }
        out.push(port);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(text: &str) -> Result<UnitSpec, String> {
        UnitSpec::parse("t", &format!("{text}\n[image]\npath = \"/a.tar\"\n"))
            .map_err(|e| e.to_string())
    }

    fn hp(port: u16, udp: bool) -> HostPort {
        HostPort { port, udp }
    }

    #[test]
    fn bridge_ports_publish_only_what_they_map() {
        let u = unit(
            r#"ports = [80, "8080:81", "5353:53/udp", { name = "http", port = 90, host = 9090 }, { name = "dns", port = 54, proto = "udp" }]"#,
        )
        .unwrap();
        assert_eq!(u.network, Network::Bridge);
        assert_eq!(u.ports[0].to_string(), "80/tcp");
        assert_eq!(u.ports[1].to_string(), "8080:81/tcp");
        assert_eq!(u.ports[3].to_string(), "http=9090:90/tcp");
        assert_eq!(u.ports[4].to_string(), "dns=54/udp");
        assert_eq!(
            u.host_ports(),
            [hp(8080, false), hp(5353, true), hp(9090, false)]
        );
    }

    #[test]
    fn host_network_ports_are_host_ports() {
        let u = unit("network = \"host\"\nports = [80, \"53/udp\", \"8080:8080\"]").unwrap();
        assert_eq!(u.network, Network::Host);
        assert_eq!(
            u.host_ports(),
            [hp(80, false), hp(53, true), hp(8080, false)]
        );
        let e = unit("network = \"host\"\nports = [\"8080:80\"]").unwrap_err();
        assert!(e.contains("`ports[0]`") && e.contains("host"), "{e}");
    }

    #[test]
    fn bad_ports_name_their_entry() {
        for (text, says) in [
            ("ports = [\"80/sctp\"]", "sctp"),
            ("ports = [70000]", "70000"),
            ("ports = [0]", "port number"),
            ("ports = [\"x:80\"]", "\"x\""),
            ("ports = [80, \"80/tcp\"]", "twice"),
            ("ports = [\"80:1\", \"80:2\"]", "published twice"),
            ("ports = [{ name = \"Http\", port = 1 }]", "name"),
            (
                "ports = [{ name = \"a\", port = 1 }, { name = \"a\", port = 2 }]",
                "twice",
            ),
            ("ports = [{ port = 1, color = \"red\" }]", "ports"),
        ] {
            let e = unit(text).unwrap_err();
            assert!(e.contains("ports") && e.contains(says), "{text}: {e}");
        }
        assert!(unit("network = \"overlay\"")
            .unwrap_err()
            .contains("network"));
    }

    #[test]
    fn a_record_without_a_network_kept_the_host_s() {
        let u = unit("ports = [8080]").unwrap();
        let mut json: serde_json::Value = serde_json::to_value(&u).unwrap();
        json.as_object_mut().unwrap().remove("network");
        let old: UnitSpec = serde_json::from_value(json).unwrap();
        assert_eq!(old.network, Network::Host);
        assert_eq!(old.host_ports(), [hp(8080, false)]);
        let again: UnitSpec = serde_json::from_str(&serde_json::to_string(&u).unwrap()).unwrap();
        assert_eq!(again, u);
    }
}
