//! Routes to the other hosts' subnets, with flannel's two backends.
//!
//! - **host-gw** (the default): one kernel route per peer, `subnet via peer_public_ip`. The
//!   peer must be on the same L2 segment as this host (its address reachable without a router),
//!   or the kernel refuses the route (ENETUNREACH: [`RoutesError::PeerNotOnLink`]). Fast: no
//!   encapsulation.
//! - **VXLAN** (kernel `vxlan`, works across L3): see [`crate::vxlan`], which brings the
//!   device, ARP and FDB entries and syncs its routes through [`sync`].
//!
//! [`sync`] makes the kernel's routes match a desired list: it adds what is missing, replaces
//! what changed and deletes routes of ours that are no longer desired. Ours are marked with the
//! routing protocol [`ROUTE_PROTOCOL`], so routes that others made are never touched (a foreign
//! route to a peer's exact subnet is left alone and reported).

use crate::netlink::{errno, Netlink, NetlinkError, EEXIST, ESRCH};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::route::{RouteFlags, RouteHeader, RouteProtocol};
use rtnetlink::RouteMessageBuilder;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The routing protocol number that marks routes made by Caisson (`ip route show proto 202`).
pub const ROUTE_PROTOCOL: u8 = 202;

/// What can go wrong with routes.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    /// Netlink refused a request (the error names the link and the namespace).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A host-gw route whose peer is not on a segment this host is on.
    #[error(
        "host-gw route {dst} via {gateway} in {netns}: the peer is not on this host's L2 segment \
         (the kernel says the network is unreachable); use the VXLAN backend"
    )]
    PeerNotOnLink {
        dst: Ipv4Net,
        gateway: Ipv4Addr,
        netns: String,
    },
}

/// The kernel's answer to a gateway that is not on any attached network.
const ENETUNREACH: i32 = 101;

/// Another host of the cluster: its subnet and where to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The peer's container subnet (10.42.4.0/24).
    pub subnet: Ipv4Net,
    /// The peer's own (underlay) address.
    pub public_ip: Ipv4Addr,
    /// The peer's VTEP MAC for VXLAN; `None`: derived from its subnet by
    /// [`crate::vxlan::vtep_mac`].
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
            Err(e) if errno(&e) != Some(ESRCH) => {
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

/// The routes of ours the kernel has now (for a status view: which peers are routed). `oif`
/// is set only on routes bound to a device (VXLAN's).
pub async fn installed(nl: &Netlink) -> Result<Vec<Route>, RoutesError> {
    let ours = list_main_v4(nl).await?;
    let ours = ours
        .iter()
        .filter(|m| u8::from(m.header.protocol) == ROUTE_PROTOCOL);
    Ok(ours.filter_map(route_of).collect())
}

fn route_of(msg: &RouteMessage) -> Option<Route> {
    let (gateway, oif) = gateway_and_oif(msg);
    let onlink = msg.header.flags.contains(RouteFlags::Onlink);
    Some(Route {
        dst: dst_of(msg)?,
        gateway: gateway?,
        oif: oif.filter(|_| onlink),
    })
}

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

fn gateway_and_oif(msg: &RouteMessage) -> (Option<Ipv4Addr>, Option<u32>) {
    let gateway = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(v4)) => Some(*v4),
        _ => None,
    });
    let oif = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    (gateway, oif)
}

fn matches_route(msg: &RouteMessage, route: &Route) -> bool {
    let (gateway, oif) = gateway_and_oif(msg);
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
        Err(e) if errno(&e) == Some(ENETUNREACH) && route.oif.is_none() => {
            Err(RoutesError::PeerNotOnLink {
                dst: route.dst,
                gateway: route.gateway,
                netns: nl.netns().to_string(),
            })
        }
        Err(e) if errno(&e) != Some(EEXIST) || replace => {
            let what = format!("{} via {}", route.dst, route.gateway);
            Err(nl.err("add route", what)(e).into())
        }
        _ => Ok(()),
    }
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
}
