//! `/etc/caisson/network.toml`: what the network thread configures.

use super::{Mode, NetworkError};
use serde::Deserialize;
use std::net::Ipv4Addr;
use std::path::Path;

/// `/etc/caisson/network.toml` (every field optional).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// The interface to configure, by name; default: the first Ethernet interface with a link
    /// (by name), else the first by name, leaving out the ones `links` name.
    pub interface: Option<String>,
    /// The interface to configure, by MAC address (`52:54:00:12:34:56`); not with `interface`.
    pub mac: Option<String>,
    pub mode: Mode,
    /// Static: `a.b.c.d/prefix`.
    pub address: Option<String>,
    /// Static: the default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// Name servers (static; with DHCP they replace the server's list when given).
    pub dns: Vec<Ipv4Addr>,
    /// Search domains for resolv.conf.
    pub search: Vec<String>,
    /// How long services `after = ["network"]` wait for it.
    pub timeout_s: u64,
    /// More interfaces with a static address each and no gateway: for example a cluster's
    /// private segment beside the interface that reaches the outside.
    pub links: Vec<Link>,
}

/// `[[links]]`: one more interface, named by `interface` or `mac`, with a static address.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub interface: Option<String>,
    pub mac: Option<String>,
    /// `a.b.c.d/prefix`.
    pub address: String,
}

/// How an interface is named in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    Name(String),
    Mac([u8; 6]),
}

impl std::fmt::Display for Select {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Select::Name(n) => write!(f, "interface {n}"),
            Select::Mac(m) => write!(f, "the interface with MAC {}", format_mac(m)),
        }
    }
}

/// `52:54:00:12:34:56`.
pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Six hexadecimal bytes separated by colons, either case.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| {
            (h.len() == 2)
                .then(|| u8::from_str_radix(h, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

/// `interface` or `mac` (at most one), checked; `where_` names the place for the message.
fn select(
    interface: &Option<String>,
    mac: &Option<String>,
    where_: &str,
) -> Result<Option<Select>, String> {
    match (interface, mac) {
        (Some(_), Some(_)) => Err(format!("{where_}: give `interface` or `mac`, not both")),
        (Some(n), None) => Ok(Some(Select::Name(n.clone()))),
        (None, Some(m)) => parse_mac(m).map(|m| Some(Select::Mac(m))).ok_or_else(|| {
            format!("{where_}: mac {m:?} is not six hexadecimal bytes like 52:54:00:12:34:56")
        }),
        (None, None) => Ok(None),
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            interface: None,
            mode: Mode::Dhcp,
            address: None,
            gateway: None,
            dns: Vec::new(),
            search: Vec::new(),
            timeout_s: 30,
            mac: None,
            links: Vec::new(),
        }
    }
}

/// An address with its prefix length, `10.0.2.15/24`.
pub fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = text.trim().split_once('/')?;
    let prefix: u8 = p.parse().ok()?;
    (prefix <= 32).then_some(())?;
    Some((a.parse().ok()?, prefix))
}

impl NetworkConfig {
    /// Parses and checks the file's text.
    pub fn parse(text: &str) -> Result<NetworkConfig, String> {
        let c: NetworkConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if c.mode == Mode::Static {
            let addr = c
                .address
                .as_deref()
                .ok_or("mode = \"static\" needs `address = \"a.b.c.d/prefix\"`")?;
            parse_cidr(addr).ok_or_else(|| {
                format!("address {addr:?} is not of the form a.b.c.d/prefix (e.g. 192.168.1.10/24)")
            })?;
        }
        select(&c.interface, &c.mac, "the main interface")?;
        for (i, l) in c.links.iter().enumerate() {
            let where_ = format!("links[{i}]");
            if select(&l.interface, &l.mac, &where_)?.is_none() {
                return Err(format!("{where_}: name it by `interface` or `mac`"));
            }
            parse_cidr(&l.address).ok_or_else(|| {
                format!(
                    "{where_}: address {:?} is not of the form a.b.c.d/prefix",
                    l.address
                )
            })?;
        }
        Ok(c)
    }

    /// How the file names the main interface, if it does (checked by [`NetworkConfig::parse`]).
    pub fn main_interface(&self) -> Option<Select> {
        select(&self.interface, &self.mac, "").ok().flatten()
    }

    /// Reads the file: missing means the defaults (DHCP).
    pub fn load(path: &Path) -> Result<NetworkConfig, NetworkError> {
        match std::fs::read_to_string(path) {
            Ok(text) => NetworkConfig::parse(&text).map_err(|message| NetworkError::Config {
                path: path.to_path_buf(),
                message,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NetworkConfig::default()),
            Err(e) => Err(NetworkError::Config {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
        }
    }
}

impl Link {
    /// How the link names its interface (checked by [`NetworkConfig::parse`]).
    pub fn select(&self) -> Option<Select> {
        select(&self.interface, &self.mac, "").ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine config's `[network]`, as provisioning writes it, is a file this parser takes.
    #[test]
    fn a_machine_configs_links_reach_the_init() {
        let c = caisson_provision::Config::parse(
            r#"version = 1
[network]
mac = "52:54:00:aa:00:01"
[[network.links]]
mac = "52:54:00:aa:00:02"
address = "192.168.50.11/24"
[[network.links]]
interface = "eth2"
address = "192.168.60.11/24"
"#,
        )
        .unwrap();
        let plan =
            caisson_provision::plan::plan(&c, None, &crate::provisioning::InitChecks).unwrap();
        let text = plan
            .entries
            .iter()
            .find(|e| e.path == super::super::CONFIG_PATH)
            .and_then(|e| match &e.kind {
                caisson_provision::plan::Kind::File(b) => String::from_utf8(b.clone()).ok(),
                caisson_provision::plan::Kind::Dir => None,
            })
            .unwrap();
        let n = NetworkConfig::parse(&text).unwrap();
        assert_eq!(
            n.main_interface(),
            Some(Select::Mac([0x52, 0x54, 0, 0xaa, 0, 1]))
        );
        assert_eq!(n.links.len(), 2, "{text}");
        assert_eq!(n.links[0].address, "192.168.50.11/24");
        assert_eq!(n.links[1].select(), Some(Select::Name("eth2".into())));
    }

    #[test]
    fn links_and_macs() {
        let c = NetworkConfig::parse(
            r#"
mac = "52:54:00:AA:00:01"
[[links]]
mac = "52:54:00:aa:00:02"
address = "192.168.50.11/24"
[[links]]
interface = "eth2"
address = "192.168.60.11/24"
"#,
        )
        .unwrap();
        assert_eq!(
            c.main_interface(),
            Some(Select::Mac([0x52, 0x54, 0, 0xaa, 0, 1]))
        );
        assert_eq!(
            c.links[0].select(),
            Some(Select::Mac([0x52, 0x54, 0, 0xaa, 0, 2]))
        );
        assert_eq!(c.links[1].select(), Some(Select::Name("eth2".into())));
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0xaa, 0, 2]),
            "52:54:00:aa:00:02"
        );
        for (text, want) in [
            ("mac = \"52:54:00:aa:00\"\n", "six hexadecimal bytes"),
            ("mac = \"52:54:00:aa:00:1\"\n", "six hexadecimal bytes"),
            (
                "interface = \"eth0\"\nmac = \"52:54:00:aa:00:01\"\n",
                "not both",
            ),
            (
                "[[links]]\naddress = \"10.1.0.1/24\"\n",
                "links[0]: name it",
            ),
            (
                "[[links]]\ninterface = \"eth1\"\naddress = \"10.1.0.1\"\n",
                "links[0]: address",
            ),
            ("[[links]]\ninterface = \"eth1\"\n", "address"),
        ] {
            let e = NetworkConfig::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn defaults_to_dhcp() {
        let c = NetworkConfig::parse("").unwrap();
        assert_eq!(c, NetworkConfig::default());
        assert_eq!(c.mode, Mode::Dhcp);
        assert_eq!(c.timeout_s, 30);
    }

    #[test]
    fn static_config() {
        let c = NetworkConfig::parse(
            r#"
interface = "eth1"
mode = "static"
address = "192.168.10.5/24"
gateway = "192.168.10.1"
dns = ["192.168.10.1", "9.9.9.9"]
search = ["lab.example"]
timeout_s = 5
"#,
        )
        .unwrap();
        assert_eq!(c.interface.as_deref(), Some("eth1"));
        assert_eq!(c.mode, Mode::Static);
        assert_eq!(
            parse_cidr(c.address.as_deref().unwrap()),
            Some((Ipv4Addr::new(192, 168, 10, 5), 24))
        );
        assert_eq!(c.gateway, Some(Ipv4Addr::new(192, 168, 10, 1)));
        assert_eq!(c.dns.len(), 2);
    }

    #[test]
    fn config_errors_say_what_is_wrong() {
        let e = NetworkConfig::parse("mode = \"static\"\n").unwrap_err();
        assert!(e.contains("needs `address"), "{e}");
        let e = NetworkConfig::parse("mode = \"static\"\naddress = \"10.0.0.1\"\n").unwrap_err();
        assert!(e.contains("a.b.c.d/prefix"), "{e}");
        let e = NetworkConfig::parse("mode = \"ppp\"\n").unwrap_err();
        assert!(e.contains("ppp"), "{e}");
        let e = NetworkConfig::parse("adress = \"10.0.0.1/8\"\n").unwrap_err();
        assert!(e.contains("adress"), "{e}");
        let e = NetworkConfig::parse("gateway = \"10.0.0\"\n").unwrap_err();
        assert!(e.contains("gateway") || e.contains("line 1"), "{e}");
    }

    #[test]
    fn cidr() {
        assert_eq!(
            parse_cidr("10.0.2.15/24"),
            Some((Ipv4Addr::new(10, 0, 2, 15), 24))
        );
        assert_eq!(parse_cidr("10.0.2.15/33"), None);
        assert_eq!(parse_cidr("10.0.2/24"), None);
    }
}
