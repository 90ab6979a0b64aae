//! Routes to the other hosts' subnets, with flannel's two backends.
//!
//! - **host-gw** (the default): one kernel route per peer, `subnet via peer_public_ip`. The
//!   peer must be on the same L2 segment as this host (its address reachable without a router),
//!   or the kernel refuses the route ("Nexthop has invalid gateway") or a router drops the
//!   packets it cannot route back. Fast: no encapsulation.
//! - **VXLAN** (kernel `vxlan`, works across L3): a device with a VNI, UDP port 4789, this
//!   host's underlay address and no learning; each host's VTEP address is its subnet's network
//!   address (10.42.3.0/32 for 10.42.3.0/24) and its VTEP MAC is derived from its subnet
//!   ([`vtep_mac`]) unless the peer says otherwise. Per peer: `subnet via vtep onlink dev
//!   vxlan`, a permanent ARP entry `vtep -> mac` and an FDB entry `mac -> public_ip`.
//!
//! [`sync`] makes the kernel's routes match a desired list: it adds what is missing, replaces
//! what changed and deletes routes of ours that are no longer desired. Ours are marked with the
//! routing protocol [`ROUTE_PROTOCOL`], so routes that others made are never touched (a foreign
//! route to a peer's exact subnet is left alone and reported).

use crate::link::LinkError;
use crate::netlink::{errno, kind_of, Netlink, NetlinkError, EEXIST};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::route::{RouteHeader, RouteProtocol};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

/// The routing protocol number that marks routes made by Caisson (`ip route show proto 202`).
pub const ROUTE_PROTOCOL: u8 = 202;
/// The VXLAN device's name when the caller has no other.
pub const DEFAULT_VXLAN: &str = "caisson.vx";
/// IANA's VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// What can go wrong with routes.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    /// Netlink refused a request (the error names the link and the namespace).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A link of ours has the name but is something else.
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Another host of the cluster: its subnet and where to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The peer's container subnet (10.42.4.0/24).
    pub subnet: Ipv4Net,
    /// The peer's own (underlay) address.
    pub public_ip: Ipv4Addr,
    /// The peer's VTEP MAC for VXLAN; `None`: derived from its subnet by [`vtep_mac`].
    #[serde(default)]
    pub vtep_mac: Option<[u8; 6]>,
}

/// One route this module manages: `dst via gateway [dev oif onlink]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// The output device's index (VXLAN); `None`: the kernel finds it (host-gw).
    pub oif: Option<u32>,
}

/// What a [`sync`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub added: Vec<Ipv4Net>,
    pub replaced: Vec<Ipv4Net>,
    pub deleted: Vec<Ipv4Net>,
    /// Desired subnets left alone because a route someone else made covers exactly them.
    pub foreign: Vec<Ipv4Net>,
}

/// The host-gw routes to `peers` (any peer whose subnet is `own` is skipped).
pub fn host_gw_routes(own: Ipv4Net, peers: &[Peer]) -> Vec<Route> {
    let others = peers.iter().filter(|p| p.subnet.trunc() != own.trunc());
    others
        .map(|p| Route {
            dst: p.subnet.trunc(),
            gateway: p.public_ip,
            oif: None,
        })
        .collect()
}

/// Makes the kernel's routes of ours (main table, [`ROUTE_PROTOCOL`]) exactly `desired`.
pub async fn sync(nl: &Netlink, desired: &[Route]) -> Result<SyncReport, RoutesError> {
    let mut report = SyncReport::default();
    let mut ours = BTreeMap::new();
    let mut foreign = BTreeMap::new();
    for msg in list_main_v4(nl).await? {
        let Some(dst) = dst_of(&msg) else { continue };
        if u8::from(msg.header.protocol) == ROUTE_PROTOCOL {
            ours.insert(dst, msg);
        } else {
            foreign.insert(dst, msg);
        }
    }
    for route in desired {
        match ours.remove(&route.dst) {
            Some(msg) if matches_route(&msg, route) => {}
            Some(_) => {
                add_route(nl, route, true).await?;
                report.replaced.push(route.dst);
            }
            None if foreign.contains_key(&route.dst) => {
                log::warn!(
                    "routes: {} has a route not made by caisson; left alone",
                    route.dst
                );
                report.foreign.push(route.dst);
            }
            None => {
                add_route(nl, route, false).await?;
                report.added.push(route.dst);
            }
        }
    }
    for (dst, msg) in ours {
        match nl.handle().route().del(msg).execute().await {
            Err(e) if errno(&e) != Some(ESRCH_ROUTE) => {
                return Err(nl.err("delete route", dst.to_string())(e).into());
            }
            _ => report.deleted.push(dst),
        }
    }
    if report != SyncReport::default() {
        log::info!("routes in {}: {report:?}", nl.netns());
    }
    Ok(report)
}

/// The kernel answers ESRCH (3) for a route already gone.
const ESRCH_ROUTE: i32 = 3;

async fn list_main_v4(nl: &Netlink) -> Result<Vec<RouteMessage>, RoutesError> {
    let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let all = nl.handle().route().get(query).execute();
    let all: Vec<RouteMessage> = all
        .try_collect()
        .await
        .map_err(nl.err("list routes", "all"))?;
    Ok(all
        .into_iter()
        .filter(|m| table_of(m) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .collect())
}

fn table_of(msg: &RouteMessage) -> u32 {
    let attr = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Table(t) => Some(*t),
        _ => None,
    });
    attr.unwrap_or(u32::from(msg.header.table))
}

fn dst_of(msg: &RouteMessage) -> Option<Ipv4Net> {
    let prefix = msg.header.destination_prefix_length;
    let addr = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(*v4),
        _ => None,
    });
    // The default route has no destination attribute: 0.0.0.0/0.
    Ipv4Net::new(addr.unwrap_or(Ipv4Addr::UNSPECIFIED), prefix).ok()
}

fn matches_route(msg: &RouteMessage, route: &Route) -> bool {
    let gateway = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(v4)) => Some(*v4),
        _ => None,
    });
    let oif = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    gateway == Some(route.gateway) && route.oif.is_none_or(|want| oif == Some(want))
}

async fn add_route(nl: &Netlink, route: &Route, replace: bool) -> Result<(), RoutesError> {
    let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.dst.network(), route.dst.prefix_len())
        .gateway(route.gateway)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
    if let Some(oif) = route.oif {
        msg = msg.output_interface(oif).onlink();
    }
    let req = nl.handle().route().add(msg.build());
    let req = if replace { req.replace() } else { req };
    match req.execute().await {
        Err(e) if errno(&e) != Some(EEXIST) || replace => {
            let what = format!("{} via {}", route.dst, route.gateway);
            Err(nl.err("add route", what)(e).into())
        }
        _ => Ok(()),
    }
}

/// The VXLAN device of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    /// The device's name ([`DEFAULT_VXLAN`]).
    pub name: String,
    /// The VXLAN network identifier, the same on every host of the cluster.
    pub vni: u32,
    /// The UDP port ([`VXLAN_PORT`]).
    pub port: u16,
    /// This host's underlay address: the source of the encapsulated packets.
    pub local: Ipv4Addr,
}

/// The VTEP MAC of a host's subnet: locally administered, unicast, `02:ca` and the subnet's
/// network address, so hosts need not exchange MACs.
pub fn vtep_mac(subnet: Ipv4Net) -> [u8; 6] {
    let [a, b, c, d] = subnet.network().octets();
    [0x02, 0xca, a, b, c, d]
}

/// Makes sure the VXLAN device exists with `cfg` (re-made if its VNI, port or local address
/// differ), has this host's VTEP MAC and address (`own`'s network address /32), and is up.
pub async fn ensure_vxlan(
    nl: &Netlink,
    cfg: &VxlanConfig,
    own: Ipv4Net,
) -> Result<u32, RoutesError> {
    if let Some(link) = nl.find(&cfg.name).await? {
        if kind_of(&link) != Some(InfoKind::Vxlan) {
            let kind = kind_of(&link).map_or("plain link".into(), |k| k.to_string());
            let (link, netns) = (cfg.name.clone(), nl.netns().to_string());
            return Err(LinkError::WrongKind {
                link,
                netns,
                kind,
                want: "vxlan",
            }
            .into());
        }
        if !vxlan_matches(&link.attributes, cfg) {
            log::info!(
                "vxlan {} in {}: settings changed, re-making it",
                cfg.name,
                nl.netns()
            );
            nl.delete(&cfg.name).await?;
        }
    }
    if nl.find(&cfg.name).await?.is_none() {
        let msg = LinkVxlan::new(&cfg.name, cfg.vni)
            .port(cfg.port)
            .local(cfg.local)
            .learning(false)
            .address(vtep_mac(own).to_vec())
            .build();
        let add = nl.handle().link().add(msg).execute().await;
        add.map_err(nl.err("add vxlan", cfg.name.as_str()))?;
    }
    let index = nl.index(&cfg.name).await?;
    let set_mac = LinkUnspec::new_with_index(index)
        .address(vtep_mac(own).to_vec())
        .build();
    let set = nl.handle().link().set(set_mac).execute().await;
    set.map_err(nl.err("set vtep mac", cfg.name.as_str()))?;
    let vtep = Ipv4Net::new(own.network(), 32).unwrap_or(own);
    nl.ensure_address(index, &cfg.name, vtep, true).await?;
    nl.set_up(index, &cfg.name).await?;
    Ok(index)
}

fn vxlan_matches(attrs: &[LinkAttribute], cfg: &VxlanConfig) -> bool {
    let infos = attrs.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => Some(infos),
        _ => None,
    });
    let data = infos.into_iter().flatten().find_map(|i| match i {
        LinkInfo::Data(InfoData::Vxlan(data)) => Some(data),
        _ => None,
    });
    let Some(data) = data else { return false };
    let (mut id, mut port, mut local) = (None, None, None);
    for info in data {
        match info {
            InfoVxlan::Id(v) => id = Some(*v),
            InfoVxlan::Port(v) => port = Some(*v),
            InfoVxlan::Local(v) => local = Some(*v),
            _ => {}
        }
    }
    id == Some(cfg.vni) && port == Some(cfg.port) && local == Some(cfg.local)
}

/// The VXLAN backend, all of it: the device, per peer its ARP and FDB entries (stale ones of
/// departed peers removed), and the routes through the device, synced as [`sync`] does.
pub async fn sync_vxlan(
    nl: &Netlink,
    cfg: &VxlanConfig,
    own: Ipv4Net,
    peers: &[Peer],
) -> Result<SyncReport, RoutesError> {
    let index = ensure_vxlan(nl, cfg, own).await?;
    let peers: Vec<&Peer> = peers
        .iter()
        .filter(|p| p.subnet.trunc() != own.trunc())
        .collect();
    let mut routes = Vec::new();
    for peer in &peers {
        let mac = peer.vtep_mac.unwrap_or_else(|| vtep_mac(peer.subnet));
        let vtep = peer.subnet.network();
        let neigh = nl.handle().neighbours().add(index, IpAddr::V4(vtep));
        let neigh = neigh.link_layer_address(&mac).replace().execute().await;
        neigh.map_err(nl.err("add neighbour", format!("{} ({vtep})", cfg.name)))?;
        // NTF_SELF: the entry is the vxlan device's own (the kernel refuses one without it).
        let fdb = nl
            .handle()
            .neighbours()
            .add_bridge(index, &mac)
            .flags(NeighbourFlags::Own);
        let fdb = fdb
            .destination(IpAddr::V4(peer.public_ip))
            .replace()
            .execute()
            .await;
        fdb.map_err(nl.err(
            "add fdb entry",
            format!("{} ({})", cfg.name, peer.public_ip),
        ))?;
        routes.push(Route {
            dst: peer.subnet.trunc(),
            gateway: vtep,
            oif: Some(index),
        });
    }
    remove_stale_neighbours(nl, cfg, index, &peers).await?;
    sync(nl, &routes).await
}

/// Deletes ARP and FDB entries on the VXLAN device that no current peer needs.
async fn remove_stale_neighbours(
    nl: &Netlink,
    cfg: &VxlanConfig,
    index: u32,
    peers: &[&Peer],
) -> Result<(), RoutesError> {
    let macs: Vec<Vec<u8>> = peers
        .iter()
        .map(|p| p.vtep_mac.unwrap_or_else(|| vtep_mac(p.subnet)).to_vec())
        .collect();
    let vteps: Vec<Ipv4Addr> = peers.iter().map(|p| p.subnet.network()).collect();
    for family in [AddressFamily::Inet, AddressFamily::Bridge] {
        let get = nl
            .handle()
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        let all: Vec<_> = get
            .try_collect()
            .await
            .map_err(nl.err("list neighbours", &cfg.name))?;
        for msg in all.into_iter().filter(|m| m.header.ifindex == index) {
            let stale = msg.attributes.iter().any(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                    family == AddressFamily::Inet && !vteps.contains(ip)
                }
                NeighbourAttribute::LinkLayerAddress(mac) => {
                    family == AddressFamily::Bridge && !macs.contains(mac)
                }
                _ => false,
            });
            if stale {
                let del = nl.handle().neighbours().del(msg).execute().await;
                del.map_err(nl.err("delete neighbour", &cfg.name))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_gw_skips_own_subnet() {
        let own: Ipv4Net = "10.42.1.0/24".parse().unwrap();
        let peer = |s: &str, ip: &str| Peer {
            subnet: s.parse().unwrap(),
            public_ip: ip.parse().unwrap(),
            vtep_mac: None,
        };
        let routes = host_gw_routes(
            own,
            &[
                peer("10.42.1.0/24", "1.1.1.1"),
                peer("10.42.2.7/24", "1.1.1.2"),
            ],
        );
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].dst, "10.42.2.0/24".parse::<Ipv4Net>().unwrap());
    }

    #[test]
    fn vtep_mac_is_unicast_local_and_per_subnet() {
        let mac = vtep_mac("10.42.3.0/24".parse().unwrap());
        assert_eq!(mac, [0x02, 0xca, 10, 42, 3, 0]);
        assert_eq!(mac[0] & 1, 0, "multicast bit set");
        assert_eq!(mac[0] & 2, 2, "not locally administered");
    }
}
