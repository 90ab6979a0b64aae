//! The VXLAN backend (kernel `vxlan`, works across L3), flannel's scheme: a device with a VNI,
//! UDP port 4789, this host's underlay address and no learning; each host's VTEP address is its
//! subnet's network address (10.42.3.0/32 for 10.42.3.0/24) and its VTEP MAC is derived from
//! its subnet ([`vtep_mac`]) unless the peer says otherwise, so hosts need not exchange MACs.
//! Per peer: `subnet via vtep onlink dev caisson.vx` (synced by [`crate::routes::sync`], marked
//! as ours), a permanent ARP entry `vtep -> mac` and an FDB entry `mac -> public_ip`. Give the
//! containers' veths the device's MTU (the underlay's less 50).

use crate::link::LinkError;
use crate::netlink::{kind_of, Netlink, NetlinkError};
use crate::routes::{sync, Peer, Route, RoutesError, SyncReport};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, LinkVxlan};
use std::net::{IpAddr, Ipv4Addr};

/// The VXLAN device's name when the caller has no other.
pub const DEFAULT_VXLAN: &str = "caisson.vx";
/// IANA's VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// What can go wrong with the VXLAN backend.
#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    /// Netlink refused a request (the error names the link and the namespace).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A link of ours has the name but is something else.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The routes through the device could not be synced.
    #[error(transparent)]
    Routes(#[from] RoutesError),
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
) -> Result<u32, VxlanError> {
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
) -> Result<SyncReport, VxlanError> {
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
    Ok(sync(nl, &routes).await?)
}

/// Deletes ARP and FDB entries on the VXLAN device that no current peer needs.
async fn remove_stale_neighbours(
    nl: &Netlink,
    cfg: &VxlanConfig,
    index: u32,
    peers: &[&Peer],
) -> Result<(), VxlanError> {
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
    fn vtep_mac_is_unicast_local_and_per_subnet() {
        let mac = vtep_mac("10.42.3.0/24".parse().unwrap());
        assert_eq!(mac, [0x02, 0xca, 10, 42, 3, 0]);
        assert_eq!(mac[0] & 1, 0, "multicast bit set");
        assert_eq!(mac[0] & 2, 2, "not locally administered");
    }
}
