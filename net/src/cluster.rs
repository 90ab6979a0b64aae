//! The cluster network, as flannel keeps it: one private IPv4 range for every container of the
//! fleet (for example `10.42.0.0/16`), cut into one subnet per host (`/24` by default). The
//! operator writes the [`NetworkConfig`] once; each host claims a subnet and publishes a
//! [`SubnetRecord`] with the address its peers route that subnet through. This module is the
//! pure half: the formats stored in etcd, their checks, and [`pick`], which chooses a free
//! subnet. The fleet agent (`caisson-fleet`'s `network` module) does the etcd side.

pub use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// The most subnets a network may be cut into: `subnet_len` at most 16 bits past the network's
/// prefix (65 536 subnets, far more hosts than one etcd serves).
pub const MAX_SUBNET_BITS: u8 = 16;

/// The longest subnet a host may get: a `/28` still holds the bridge's address and 13
/// containers.
pub const MAX_SUBNET_LEN: u8 = 28;

/// The ranges a cluster network may come from: RFC 1918's private ranges and RFC 6598's shared
/// address space (what Kubernetes distributions also use for pods).
pub const PRIVATE_RANGES: [&str; 4] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
];

/// How packets reach another host's subnet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Backend {
    /// A route to each peer's subnet through the peer's own address: the hosts must share an
    /// L2 segment.
    #[default]
    HostGw,
    /// A kernel `vxlan` device: packets to a peer's subnet travel in UDP to the peer's address,
    /// across L3.
    Vxlan {
        /// The VXLAN network identifier.
        #[serde(default = "default_vni")]
        vni: u32,
        /// The UDP port (IANA's 4789 by default; Linux's own default is 8472).
        #[serde(default = "default_port")]
        port: u16,
    },
}

impl Backend {
    /// VXLAN with the default VNI and port.
    pub fn vxlan() -> Backend {
        Backend::Vxlan {
            vni: default_vni(),
            port: default_port(),
        }
    }
}

fn default_vni() -> u32 {
    1
}

fn default_port() -> u16 {
    4789
}

fn default_subnet_len() -> u8 {
    24
}

/// The cluster network's configuration, as stored in etcd (JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// The whole range, e.g. `10.42.0.0/16`.
    pub network: Ipv4Net,
    /// The prefix length of each host's subnet.
    #[serde(default = "default_subnet_len")]
    pub subnet_len: u8,
    #[serde(default)]
    pub backend: Backend,
}

/// Why a [`NetworkConfig`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Host bits are set: the range is not what it looks like.
    #[error("{given} has host bits set: the network is {canonical}")]
    HostBits { given: Ipv4Net, canonical: Ipv4Net },
    /// The range is public (or loopback, multicast, ...).
    #[error(
        "{0} is not a private range: use one inside 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 \
         or 100.64.0.0/10"
    )]
    NotPrivate(Ipv4Net),
    /// Subnets must be longer than the network and no longer than a /28.
    #[error(
        "subnet length /{subnet_len} does not fit network {network}: it must be longer than \
         /{} and at most /{MAX_SUBNET_LEN}",
        network.prefix_len()
    )]
    SubnetLen { network: Ipv4Net, subnet_len: u8 },
    /// Too many subnets to keep in etcd.
    #[error(
        "network {network} cut into /{subnet_len} makes 2^{bits} subnets; at most \
         2^{MAX_SUBNET_BITS}: use a longer network prefix or a shorter subnet length"
    )]
    TooManySubnets {
        network: Ipv4Net,
        subnet_len: u8,
        bits: u8,
    },
    /// VNI 0 is not a network, and VNIs have 24 bits.
    #[error("VXLAN VNI {0} is out of range (1 to 16777215)")]
    Vni(u32),
    /// UDP port 0.
    #[error("VXLAN port 0 is not a port")]
    Port,
}

impl NetworkConfig {
    /// A host-gw network cut into `/24`s.
    pub fn new(network: Ipv4Net) -> NetworkConfig {
        NetworkConfig {
            network,
            subnet_len: default_subnet_len(),
            backend: Backend::default(),
        }
    }

    /// Checks the range (canonical, private), the subnet length and the backend's numbers.
    pub fn check(&self) -> Result<(), ConfigError> {
        let n = self.network;
        if n.trunc() != n {
            return Err(ConfigError::HostBits {
                given: n,
                canonical: n.trunc(),
            });
        }
        if !private(&n) {
            return Err(ConfigError::NotPrivate(n));
        }
        if self.subnet_len <= n.prefix_len() || self.subnet_len > MAX_SUBNET_LEN {
            return Err(ConfigError::SubnetLen {
                network: n,
                subnet_len: self.subnet_len,
            });
        }
        let bits = self.subnet_len - n.prefix_len();
        if bits > MAX_SUBNET_BITS {
            return Err(ConfigError::TooManySubnets {
                network: n,
                subnet_len: self.subnet_len,
                bits,
            });
        }
        match self.backend {
            Backend::Vxlan { vni, .. } if vni == 0 || vni > 0x00ff_ffff => {
                Err(ConfigError::Vni(vni))
            }
            Backend::Vxlan { port: 0, .. } => Err(ConfigError::Port),
            _ => Ok(()),
        }
    }

    /// The networks of `others` (the machines' own networks, say) that overlap this range.
    pub fn overlaps(&self, others: &[Ipv4Net]) -> Vec<Ipv4Net> {
        others
            .iter()
            .filter(|o| overlap(&self.network, o))
            .copied()
            .collect()
    }

    /// Whether `subnet` is one a host may hold: a `subnet_len` subnet inside the range, aligned,
    /// and not the range's first (kept free, as flannel does, so no host's subnet holds the
    /// network's own address).
    pub fn is_host_subnet(&self, subnet: &Ipv4Net) -> bool {
        subnet.prefix_len() == self.subnet_len
            && subnet.trunc() == *subnet
            && self.network.contains(subnet)
            && subnet.network() != self.network.network()
    }

    /// Every subnet a host may hold, in address order.
    pub fn host_subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        self.network
            .subnets(self.subnet_len)
            .into_iter()
            .flatten()
            .filter(|s| self.is_host_subnet(s))
    }
}

/// Whether two ranges share an address.
pub fn overlap(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn private(n: &Ipv4Net) -> bool {
    PRIVATE_RANGES
        .iter()
        .filter_map(|r| r.parse::<Ipv4Net>().ok())
        .any(|r| r.contains(n))
}

/// A host's claim on a subnet, stored in etcd under the host's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetRecord {
    pub subnet: Ipv4Net,
    /// The fleet id of the machine holding it.
    pub machine: String,
    /// The address peers send the subnet's packets to (host-gw's next hop, VXLAN's remote).
    pub public_ip: Ipv4Addr,
    /// The MAC of the host's VXLAN device, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<String>,
}

/// The subnet for a host: `preferred` if it is a host subnet of `config` and not `taken`,
/// otherwise the first free one in address order; `None` when every subnet is taken.
pub fn pick(
    config: &NetworkConfig,
    taken: &[Ipv4Net],
    preferred: Option<Ipv4Net>,
) -> Option<Ipv4Net> {
    let taken: BTreeSet<Ipv4Net> = taken.iter().copied().collect();
    let free = |s: &Ipv4Net| config.is_host_subnet(s) && !taken.contains(s);
    if let Some(p) = preferred.filter(free) {
        return Some(p);
    }
    config.host_subnets().find(|s| !taken.contains(s))
}

/// The key form of a subnet: `10.42.3.0-24` (no `/`, which etcd's prefix ranges would see as a
/// level).
pub fn subnet_key(subnet: &Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

/// The subnet a key's last part names (see [`subnet_key`]).
pub fn parse_subnet_key(key: &str) -> Option<Ipv4Net> {
    let (addr, len) = key.rsplit_once('-')?;
    Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn json_is_flannels_shape_with_defaults() {
        let c: NetworkConfig = serde_json::from_str(r#"{"network":"10.42.0.0/16"}"#).unwrap();
        assert_eq!(c, NetworkConfig::new(net("10.42.0.0/16")));
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(
            json,
            r#"{"network":"10.42.0.0/16","subnet_len":24,"backend":{"type":"host-gw"}}"#
        );
        let v: NetworkConfig =
            serde_json::from_str(r#"{"network":"10.42.0.0/16","backend":{"type":"vxlan"}}"#)
                .unwrap();
        assert_eq!(v.backend, Backend::Vxlan { vni: 1, port: 4789 });
        assert!(serde_json::from_str::<NetworkConfig>(r#"{"network":"10.42.0.0"}"#).is_err());
        let r = SubnetRecord {
            subnet: net("10.42.3.0/24"),
            machine: "m1".into(),
            public_ip: "192.168.1.5".parse().unwrap(),
            vtep_mac: None,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"subnet":"10.42.3.0/24","machine":"m1","public_ip":"192.168.1.5"}"#
        );
        assert_eq!(serde_json::from_str::<SubnetRecord>(&json).unwrap(), r);
    }

    #[test]
    fn check_refuses_what_cannot_work() {
        let ok = |s: &str, len: u8| NetworkConfig {
            subnet_len: len,
            ..NetworkConfig::new(net(s))
        };
        assert_eq!(ok("10.42.0.0/16", 24).check(), Ok(()));
        assert_eq!(ok("192.168.0.0/16", 28).check(), Ok(()));
        assert_eq!(ok("100.64.0.0/10", 24).check(), Ok(()));
        let e = ok("10.42.1.0/16", 24).check().unwrap_err();
        assert!(e.to_string().contains("10.42.0.0/16"), "{e}");
        assert!(matches!(
            ok("8.8.0.0/16", 24).check(),
            Err(ConfigError::NotPrivate(_))
        ));
        assert!(matches!(
            ok("0.0.0.0/0", 16).check(),
            Err(ConfigError::NotPrivate(_))
        ));
        assert!(matches!(
            ok("10.42.0.0/16", 16).check(),
            Err(ConfigError::SubnetLen { .. })
        ));
        assert!(matches!(
            ok("10.42.0.0/16", 30).check(),
            Err(ConfigError::SubnetLen { .. })
        ));
        assert!(matches!(
            ok("10.0.0.0/8", 28).check(),
            Err(ConfigError::TooManySubnets { bits: 20, .. })
        ));
        let mut v = ok("10.42.0.0/16", 24);
        v.backend = Backend::Vxlan { vni: 0, port: 4789 };
        assert_eq!(v.check(), Err(ConfigError::Vni(0)));
        v.backend = Backend::Vxlan { vni: 1, port: 0 };
        assert_eq!(v.check(), Err(ConfigError::Port));
        v.backend = Backend::vxlan();
        assert_eq!(v.check(), Ok(()));
    }

    #[test]
    fn overlaps_names_the_ranges_that_share_addresses() {
        let c = NetworkConfig::new(net("10.42.0.0/16"));
        let machines = [
            net("10.42.7.0/24"),
            net("10.0.0.0/8"),
            net("192.168.1.0/24"),
            net("10.43.0.0/24"),
        ];
        assert_eq!(
            c.overlaps(&machines),
            [net("10.42.7.0/24"), net("10.0.0.0/8")]
        );
        assert!(c.overlaps(&[]).is_empty());
    }

    #[test]
    fn pick_prefers_then_takes_the_first_free() {
        let c = NetworkConfig::new(net("10.42.0.0/16"));
        assert_eq!(
            pick(&c, &[], None),
            Some(net("10.42.1.0/24")),
            "not the first"
        );
        let pref = Some(net("10.42.9.0/24"));
        assert_eq!(pick(&c, &[], pref), pref);
        assert_eq!(
            pick(&c, &[net("10.42.9.0/24"), net("10.42.1.0/24")], pref),
            Some(net("10.42.2.0/24"))
        );
        for bad in [
            "10.43.9.0/24",
            "10.42.0.0/24",
            "10.42.9.0/25",
            "10.42.9.128/24",
        ] {
            let b: Ipv4Net = bad.parse().unwrap();
            assert_eq!(pick(&c, &[], Some(b)), Some(net("10.42.1.0/24")), "{bad}");
        }
        let tiny = NetworkConfig {
            subnet_len: 25,
            ..NetworkConfig::new(net("10.42.0.0/24"))
        };
        assert_eq!(pick(&tiny, &[], None), Some(net("10.42.0.128/25")));
        assert_eq!(pick(&tiny, &[net("10.42.0.128/25")], None), None, "full");
    }

    #[test]
    fn subnet_keys_round_trip() {
        let s = net("10.42.3.0/24");
        assert_eq!(subnet_key(&s), "10.42.3.0-24");
        assert_eq!(parse_subnet_key("10.42.3.0-24"), Some(s));
        assert_eq!(parse_subnet_key("10.42.3.0/24"), None);
        assert_eq!(parse_subnet_key("10.42.3.0-33"), None);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn config() -> impl Strategy<Value = NetworkConfig> {
            (16u8..=24, 1u8..=6).prop_map(|(len, extra)| NetworkConfig {
                network: Ipv4Net::new(Ipv4Addr::new(10, 42, 0, 0), len)
                    .unwrap()
                    .trunc(),
                subnet_len: len + extra,
                backend: Backend::HostGw,
            })
        }

        proptest! {
            #[test]
            fn pick_never_returns_a_taken_or_foreign_subnet(
                c in config(),
                taken_idx in proptest::collection::vec(0u32..64, 0..64),
                pref in proptest::option::of((any::<u32>(), 8u8..=30)),
            ) {
                let all: Vec<Ipv4Net> = c.host_subnets().collect();
                let taken: Vec<Ipv4Net> = taken_idx
                    .iter()
                    .filter_map(|&i| all.get(i as usize).copied())
                    .collect();
                let preferred = pref.and_then(|(a, l)| Ipv4Net::new(Ipv4Addr::from(a), l).ok());
                match pick(&c, &taken, preferred) {
                    Some(s) => {
                        prop_assert!(!taken.contains(&s));
                        prop_assert!(c.network.contains(&s));
                        prop_assert_eq!(s.prefix_len(), c.subnet_len);
                        prop_assert_eq!(s.trunc(), s);
                        prop_assert!(c.is_host_subnet(&s));
                        if let Some(p) = preferred.filter(|p| c.is_host_subnet(p) && !taken.contains(p)) {
                            prop_assert_eq!(s, p);
                        }
                    }
                    None => prop_assert!(all.iter().all(|s| taken.contains(s))),
                }
            }
        }
    }
}
