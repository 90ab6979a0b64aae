//! The host side of container networking, as the agent drives it: fleet.toml's `[network]`,
//! the bridge and NAT of this host's subnet, each bridge unit's namespace, address and veth,
//! the published ports, routes to the other hosts, and the DNS responder on the bridge. The
//! kernel work is `caisson_net`'s; this module decides when and with what.
//!
//! ```toml
//! [network]
//! enabled = true                # false: bridge units get a namespace with loopback only
//! subnet = "10.88.0.0/24"       # this host's subnet when the fleet has no cluster network
//! bridge = "caisson0"
//! dns = true                    # the DNS responder on the bridge address, port 53
//! netns_dir = "/run/caisson/netns"
//! state_dir = "/var/lib/caisson/net"   # IPAM (addresses survive agent restarts and reboots)
//! ```
//!
//! Without etcd (or before the operator sets a cluster network) the host uses `subnet`; once
//! it holds a subnet of the cluster network (`crate::network`), that one. A bridge unit's
//! container joins `<netns_dir>/<unit>`, made and wired when its task starts (again after a
//! reboot, where `/run` is empty), torn down when the container is removed; its address comes
//! from the host's IPAM and is the one its health checks and registrations use.

use caisson_net::cluster::{Backend, Ipv4Net};
use caisson_net::endpoint::Endpoints;
use caisson_net::ipam::Ipam;
use caisson_net::link::{self, Attachment};
use caisson_net::nat::{self, NatConfig, PublishedPort};
use caisson_net::netlink::Netlink;
use caisson_net::netns::NetNs;
use caisson_net::routes::{self, Peer, SyncReport};
use caisson_net::vxlan::{self, VxlanConfig};
use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::unit::{Network, UnitSpec};

/// fleet.toml's `[network]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub enabled: bool,
    pub subnet: Ipv4Net,
    pub bridge: String,
    pub dns: bool,
    pub netns_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enabled: true,
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 88, 0, 0), 24).unwrap_or_default(),
            bridge: link::DEFAULT_BRIDGE.into(),
            dns: true,
            netns_dir: "/run/caisson/netns".into(),
            state_dir: "/var/lib/caisson/net".into(),
        }
    }
}

impl Settings {
    /// What is wrong with the section, if anything.
    pub fn check(&self) -> Result<(), String> {
        if self.subnet.prefix_len() > 28 || self.subnet != self.subnet.trunc() {
            return Err(format!(
                "[network] subnet = \"{}\": a network address with a prefix of /28 or shorter",
                self.subnet
            ));
        }
        if self.bridge.is_empty() || self.bridge.len() > 15 || self.bridge.contains('/') {
            return Err(format!(
                "[network] bridge = {:?}: 1-15 characters, no /",
                self.bridge
            ));
        }
        for (name, p) in [
            ("netns_dir", &self.netns_dir),
            ("state_dir", &self.state_dir),
        ] {
            if !p.is_absolute() {
                return Err(format!(
                    "[network] {name} = {p:?}: must be an absolute path"
                ));
            }
        }
        Ok(())
    }
}

/// The veths' MTU with the VXLAN backend.
pub const VXLAN_MTU: u32 = 1450;

/// What went wrong on the host's network.
#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    /// The host's subnet is not known yet (the cluster network's claim is under way).
    #[error("waiting for this host's subnet of the cluster network")]
    NotConfigured,
    #[error(transparent)]
    Netlink(#[from] caisson_net::netlink::NetlinkError),
    #[error(transparent)]
    Link(#[from] caisson_net::link::LinkError),
    #[error(transparent)]
    Netns(#[from] caisson_net::netns::NetnsError),
    #[error(transparent)]
    Ipam(#[from] caisson_net::ipam::IpamError),
    #[error(transparent)]
    Nat(#[from] caisson_net::nat::NatError),
    #[error(transparent)]
    Dns(#[from] caisson_net::dns::ServerError),
    #[error(transparent)]
    Routes(#[from] caisson_net::routes::RoutesError),
    #[error(transparent)]
    Vxlan(#[from] caisson_net::vxlan::VxlanError),
    /// VXLAN needs this host's own address, as its record gives it.
    #[error("the VXLAN backend needs this machine's IPv4 address (fleet.toml `address`)")]
    NoLocalAddress,
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The host's network once its subnet is known.
struct Configured {
    subnet: Ipv4Net,
    cluster: Ipv4Net,
    nl: Arc<Netlink>,
    ipam: Ipam,
    /// The published ports last written to nftables.
    published: Vec<PublishedPort>,
    /// The veths' MTU: VXLAN's 50 bytes of headers off the underlay's 1500.
    mtu: Option<u32>,
}

/// The host's container network; shared by the runtime (attach, detach) and the agent
/// (configure, publish, DNS).
pub struct HostNet {
    pub settings: Settings,
    state: Mutex<Option<Configured>>,
    endpoints: tokio::sync::watch::Sender<Endpoints>,
    dns: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for HostNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostNet")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Drop for HostNet {
    fn drop(&mut self) {
        if let Some(task) = self.dns.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HostNet {
    pub fn new(settings: Settings) -> Arc<HostNet> {
        Arc::new(HostNet {
            settings,
            state: Mutex::new(None),
            endpoints: tokio::sync::watch::channel(Endpoints::default()).0,
            dns: Mutex::new(None),
        })
    }

    /// Where a unit's network namespace is bound.
    pub fn netns_path(&self, unit: &str) -> PathBuf {
        self.settings.netns_dir.join(unit)
    }

    /// The resolv.conf bridge units see (the host's DNS responder, or the host's resolvers):
    /// `container-resolv.conf` beside the namespaces' directory. Never `resolv.conf` there:
    /// with the default directory that is `/run/caisson/resolv.conf`, the init's file behind
    /// the host's own `/etc/resolv.conf`, and the host would lose its resolvers (and the
    /// responder its upstreams).
    pub fn resolv_conf(&self) -> PathBuf {
        self.settings
            .netns_dir
            .with_file_name("container-resolv.conf")
    }

    /// The host's subnet, once configured.
    pub fn subnet(&self) -> Option<Ipv4Net> {
        lock(&self.state).as_ref().map(|c| c.subnet)
    }

    /// Sets the host up for `subnet` of `cluster` (the same range without a cluster network):
    /// the bridge with the gateway address, forwarding, masquerade, the resolv.conf of bridge
    /// units and the DNS responder. Nothing is done again for the same subnet. Needs a tokio
    /// runtime.
    pub async fn configure(
        &self,
        subnet: Ipv4Net,
        cluster: Ipv4Net,
        vxlan: bool,
    ) -> Result<bool, HostNetError> {
        let mtu = vxlan.then_some(VXLAN_MTU);
        if lock(&self.state)
            .as_ref()
            .is_some_and(|c| c.subnet == subnet && c.cluster == cluster && c.mtu == mtu)
        {
            return Ok(false);
        }
        // The instances attached under another subnet, moved to this one below.
        let old = lock(&self.state)
            .as_ref()
            .filter(|c| c.subnet != subnet)
            .map(|c| c.ipam.clone());
        let nl = Arc::new(Netlink::current()?);
        link::ensure_bridge(&nl, &self.settings.bridge, subnet).await?;
        nat::enable_forwarding()?;
        let key = caisson_net::cluster::subnet_key(&subnet);
        let ipam = Ipam::open(self.settings.state_dir.join("ipam").join(key), subnet)?;
        let gateway = ipam.gateway();
        let published = lock(&self.state)
            .as_ref()
            .filter(|c| c.subnet == subnet)
            .map(|c| c.published.clone())
            .unwrap_or_default();
        nat::apply(&NatConfig {
            subnet,
            cluster,
            ports: published.clone(),
        })?;
        self.write_resolv_conf(gateway)?;
        if self.settings.dns {
            self.start_dns(gateway).await?;
        }
        log::info!(
            "container network: bridge {} at {gateway}/{}, subnet {subnet} of {cluster}",
            self.settings.bridge,
            subnet.prefix_len()
        );
        *lock(&self.state) = Some(Configured {
            subnet,
            cluster,
            nl,
            ipam,
            published,
            mtu,
        });
        if let Some(old) = old {
            self.readdress(&old).await;
        }
        Ok(true)
    }

    /// After the host's subnet changed: gives every instance attached under `old` an address of
    /// the new subnet in place (address and default route in its namespace; it keeps running)
    /// and frees the old one. One that fails is logged; its next start attaches it again.
    async fn readdress(&self, old: &Ipam) {
        let attached = match old.list() {
            Ok(list) => list,
            Err(e) => {
                log::warn!("container network: the instances of {}: {e}", old.subnet());
                return;
            }
        };
        for (was, unit) in attached {
            if self.netns_path(&unit).exists() {
                match self.attach(&unit).await {
                    Ok(now) => log::info!(
                        "container network: {unit} moved from {was} to {now} with the host's subnet"
                    ),
                    Err(e) => log::warn!("container network: moving {unit} to the new subnet: {e}"),
                }
            }
            if let Err(e) = old.release(&unit) {
                log::warn!("container network: releasing {was} of {unit}: {e}");
            }
        }
    }

    fn write_resolv_conf(&self, gateway: Ipv4Addr) -> Result<(), HostNetError> {
        let path = self.resolv_conf();
        let text = if self.settings.dns {
            format!("nameserver {gateway}\nsearch caisson\noptions ndots:1\n")
        } else {
            std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
        };
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text.as_bytes())?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|source| HostNetError::Write {
            path: path.clone(),
            source,
        })
    }

    async fn start_dns(&self, gateway: Ipv4Addr) -> Result<(), HostNetError> {
        let own = SocketAddr::from((gateway, 53));
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let config = caisson_net::dns::Config {
            upstreams: caisson_net::dns::upstreams_from_resolv_conf(&resolv, Some(own)),
            ..Default::default()
        };
        let responder =
            caisson_net::dns::Responder::bind(own, config, self.endpoints.subscribe()).await?;
        let task = tokio::spawn(async move {
            if let Err(e) = responder.run().await {
                log::warn!("DNS responder on {own}: {e}");
            }
        });
        if let Some(old) = lock(&self.dns).replace(task) {
            old.abort();
        }
        Ok(())
    }

    /// Gives the DNS responder a new snapshot of the endpoints.
    pub fn set_endpoints(&self, endpoints: Endpoints) {
        self.endpoints.send_if_modified(|old| {
            let changed = *old != endpoints;
            *old = endpoints;
            changed
        });
    }

    /// Connects `unit`'s namespace to the bridge with its address (the same one again for a
    /// unit that had one); safe to call for a unit already attached.
    pub async fn attach(&self, unit: &str) -> Result<Ipv4Addr, HostNetError> {
        let (nl, ipam, subnet, mtu) = {
            let state = lock(&self.state);
            let c = state.as_ref().ok_or(HostNetError::NotConfigured)?;
            (c.nl.clone(), c.ipam.clone(), c.subnet, c.mtu)
        };
        let ns = NetNs::ensure(self.netns_path(unit))?;
        let address = ipam.allocate(unit)?;
        let at = Attachment {
            bridge: &self.settings.bridge,
            host_if: link::host_ifname(unit),
            netns: &ns,
            address: Ipv4Net::new(address, subnet.prefix_len()).unwrap_or_default(),
            gateway: ipam.gateway(),
            mtu,
        };
        link::attach(&nl, &at).await?;
        Ok(address)
    }

    /// Takes `unit` off the bridge: its veth, its namespace and its address.
    pub async fn detach(&self, unit: &str) -> Result<(), HostNetError> {
        let configured = {
            let state = lock(&self.state);
            state.as_ref().map(|c| (c.nl.clone(), c.ipam.clone()))
        };
        if let Some((nl, ipam)) = configured {
            link::detach(&nl, &link::host_ifname(unit)).await?;
            ipam.release(unit)?;
        }
        NetNs::delete(self.netns_path(unit))?;
        Ok(())
    }

    /// Routes to the other hosts' subnets: through each peer (host-gw) or the VXLAN device
    /// (`local` is this host's underlay address). Only the routes this module made change.
    pub async fn sync_routes(
        &self,
        backend: &Backend,
        own: Ipv4Net,
        local: Option<Ipv4Addr>,
        peers: &[Peer],
    ) -> Result<SyncReport, HostNetError> {
        let nl = lock(&self.state)
            .as_ref()
            .map(|c| c.nl.clone())
            .ok_or(HostNetError::NotConfigured)?;
        match backend {
            Backend::HostGw => Ok(routes::sync(&nl, &routes::host_gw_routes(own, peers)).await?),
            Backend::Vxlan { vni, port } => {
                let cfg = VxlanConfig {
                    name: vxlan::DEFAULT_VXLAN.into(),
                    vni: *vni,
                    port: *port,
                    local: local.ok_or(HostNetError::NoLocalAddress)?,
                };
                Ok(vxlan::sync_vxlan(&nl, &cfg, own, peers).await?)
            }
        }
    }

    /// The address of `unit`'s container, if it has one.
    pub fn address(&self, unit: &str) -> Option<Ipv4Addr> {
        let ipam = lock(&self.state).as_ref().map(|c| c.ipam.clone())?;
        ipam.find(unit).ok().flatten()
    }

    /// Publishes the host ports of the bridge units in `desired` that have an address (one
    /// nftables transaction, only when the set changed). Two units publishing one port: the
    /// first by name keeps it, the other is named in the log.
    pub fn publish<'a>(
        &self,
        desired: impl IntoIterator<Item = &'a UnitSpec>,
    ) -> Result<(), HostNetError> {
        let Some((ipam, subnet, cluster, old)) = lock(&self.state)
            .as_ref()
            .map(|c| (c.ipam.clone(), c.subnet, c.cluster, c.published.clone()))
        else {
            return Ok(());
        };
        let mut ports: Vec<PublishedPort> = Vec::new();
        for spec in desired {
            if spec.network != Network::Bridge {
                continue;
            }
            let Some(addr) = ipam.find(&spec.name).ok().flatten() else {
                continue;
            };
            for p in &spec.ports {
                let Some(host_port) = p.host else { continue };
                let proto = p.proto();
                if ports
                    .iter()
                    .any(|o| o.host_port == host_port && o.proto == proto)
                {
                    log::warn!(
                        "unit {}: host port {host_port} is published by another unit here; not published",
                        spec.name
                    );
                    continue;
                }
                ports.push(PublishedPort {
                    host_port,
                    proto,
                    addr,
                    port: p.port,
                });
            }
        }
        ports.sort();
        if ports == old {
            return Ok(());
        }
        nat::apply(&NatConfig {
            subnet,
            cluster,
            ports: ports.clone(),
        })?;
        if let Some(c) = lock(&self.state).as_mut() {
            c.published = ports;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn settings_default_and_checks() {
        let s = Settings::default();
        assert!(s.check().is_ok());
        assert_eq!(s.subnet.to_string(), "10.88.0.0/24");
        let bad = Settings {
            subnet: "10.88.0.1/24".parse().unwrap(),
            ..Settings::default()
        };
        assert!(bad.check().unwrap_err().contains("network address"));
        let bad = Settings {
            bridge: "a-very-long-bridge-name".into(),
            ..Settings::default()
        };
        assert!(bad.check().unwrap_err().contains("bridge"));
        let bad = Settings {
            state_dir: "net".into(),
            ..Settings::default()
        };
        assert!(bad.check().unwrap_err().contains("state_dir"));
        let h = HostNet::new(Settings::default());
        assert_eq!(h.netns_path("web"), Path::new("/run/caisson/netns/web"));
        assert_eq!(
            h.resolv_conf(),
            Path::new("/run/caisson/container-resolv.conf")
        );
        assert!(h.address("web").is_none());
    }
}
