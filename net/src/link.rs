//! The host bridge and each container's veth, over netlink (`rtnetlink`), as the CNI `bridge`
//! plugin does it: a bridge (`caisson0`) holding the gateway address of the host's subnet, and
//! per instance a veth pair made with its peer directly inside the instance's namespace (named
//! `eth0` there), the host end attached to the bridge, the address on `eth0`, `lo` and `eth0`
//! up, and a default route through the gateway.
//!
//! Everything is idempotent: ensuring twice changes nothing, and an agent that restarts finds
//! the links it made and keeps them.

use crate::netlink::{errno, kind_of, Netlink, NetlinkError, EEXIST, ESRCH};
use crate::netns::NetNs;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkMessage};
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};

/// The bridge's name when the caller has no other.
pub const DEFAULT_BRIDGE: &str = "caisson0";
/// The container's end of its veth.
pub const CONTAINER_IF: &str = "eth0";

/// What can go wrong with the bridge and veths.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Netlink refused a request (the error names the link and the namespace).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A link of ours has the name but is something else (someone else's device).
    #[error("{link} in {netns} is a {kind}, not a {want}; rename or delete it")]
    WrongKind {
        link: String,
        netns: String,
        kind: String,
        want: &'static str,
    },
}
/// Makes sure the bridge `name` exists, is up and holds the gateway of `subnet` (its first
/// host, e.g. 10.42.3.1/24) and no other IPv4 address. Returns its index.
pub async fn ensure_bridge(nl: &Netlink, name: &str, subnet: Ipv4Net) -> Result<u32, LinkError> {
    let index = match nl.find(name).await? {
        Some(link) => {
            check_kind(nl, &link, name, InfoKind::Bridge, "bridge")?;
            link.header.index
        }
        None => {
            log::info!("creating bridge {name} in {}", nl.netns());
            let add = nl
                .handle()
                .link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await;
            match add {
                Err(e) if errno(&e) != Some(EEXIST) => {
                    return Err(nl.err("add bridge", name)(e).into());
                }
                _ => nl.index(name).await?,
            }
        }
    };
    // The prefix comes from a valid Ipv4Net, so this cannot fail.
    let gateway = Ipv4Net::new(crate::ipam::gateway(subnet), subnet.prefix_len()).unwrap_or(subnet);
    nl.ensure_address(index, name, gateway, true).await?;
    nl.set_up(index, name).await?;
    Ok(index)
}

fn check_kind(
    nl: &Netlink,
    link: &LinkMessage,
    name: &str,
    want: InfoKind,
    want_name: &'static str,
) -> Result<(), LinkError> {
    match kind_of(link) {
        Some(kind) if kind == want => Ok(()),
        kind => Err(LinkError::WrongKind {
            link: name.into(),
            netns: nl.netns().into(),
            kind: kind.map_or("plain link".into(), |k| k.to_string()),
            want: want_name,
        }),
    }
}

/// The host end's name of an instance's veth: `vc` and a hash of the instance's name, stable
/// across restarts and within the kernel's 15 characters.
pub fn host_ifname(instance: &str) -> String {
    // FNV-1a: stable across Rust versions, unlike DefaultHasher.
    let hash = instance.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("vc{:012x}", hash & 0xffff_ffff_ffff)
}

/// One instance's place on the host bridge.
#[derive(Debug, Clone)]
pub struct Attachment<'a> {
    /// The bridge to attach to (it must exist: [`ensure_bridge`]).
    pub bridge: &'a str,
    /// The host end's name ([`host_ifname`]).
    pub host_if: String,
    /// The instance's namespace.
    pub netns: &'a NetNs,
    /// The instance's address and the host subnet's prefix (from [`crate::ipam`]).
    pub address: Ipv4Net,
    /// The gateway: the bridge's address.
    pub gateway: Ipv4Addr,
    /// The MTU of both veth ends; `None` keeps the kernel's 1500. With VXLAN give the VXLAN
    /// device's (the underlay's less 50), as flannel does, so no packet is too big for it.
    pub mtu: Option<u32>,
}

/// Connects an instance: the veth pair (made if missing), the host end on the bridge and up,
/// `lo` and `eth0` up in the instance's namespace, its address and default route. Safe to
/// call again for an instance that is already attached.
pub async fn attach(host: &Netlink, at: &Attachment<'_>) -> Result<(), LinkError> {
    let bridge = host.index(at.bridge).await?;
    let inner = Netlink::in_netns(at.netns)?;
    let host_end = host.find(&at.host_if).await?;
    let eth0 = inner.find(CONTAINER_IF).await?;
    if host_end.is_none() || eth0.is_none() {
        // Half a pair (or a foreign eth0) cannot be trusted: start over.
        host.delete(&at.host_if).await?;
        inner.delete(CONTAINER_IF).await?;
        create_veth(host, at).await?;
    } else if let Some(link) = &host_end {
        check_kind(host, link, &at.host_if, InfoKind::Veth, "veth")?;
    }
    let index = host.index(&at.host_if).await?;
    let mut msg = LinkUnspec::new_with_index(index).controller(bridge).up();
    if let Some(mtu) = at.mtu {
        msg = msg.mtu(mtu);
    }
    let msg = msg.build();
    host.handle()
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(host.err("attach", &at.host_if))?;

    let lo = inner.index("lo").await?;
    inner.set_up(lo, "lo").await?;
    let eth0 = inner.index(CONTAINER_IF).await?;
    inner
        .ensure_address(eth0, CONTAINER_IF, at.address, true)
        .await?;
    let mut up = LinkUnspec::new_with_index(eth0).up();
    if let Some(mtu) = at.mtu {
        up = up.mtu(mtu);
    }
    let set = inner.handle().link().set(up.build()).execute().await;
    set.map_err(inner.err("set up", CONTAINER_IF))?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(at.gateway)
        .output_interface(eth0)
        .protocol(RouteProtocol::Static)
        .build();
    let add = inner.handle().route().add(route).replace().execute().await;
    add.map_err(inner.err("default route", CONTAINER_IF))?;
    log::info!(
        "attached {} ({}) to {}",
        at.netns.path().display(),
        at.address,
        at.bridge
    );
    Ok(())
}

async fn create_veth(host: &Netlink, at: &Attachment<'_>) -> Result<(), LinkError> {
    let fd = at.netns.as_fd().as_raw_fd();
    let peer = LinkUnspec::new_with_name(CONTAINER_IF)
        .setns_by_fd(fd)
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(at.host_if.clone())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    // The namespace's fd must stay open until the kernel has answered: `at` holds it.
    host.handle()
        .link()
        .add(msg)
        .execute()
        .await
        .map_err(host.err("add veth", &at.host_if))?;
    Ok(())
}

/// Disconnects an instance: deletes the host end of its veth (the kernel deletes `eth0` with
/// it). Detaching an instance that is not attached is fine.
pub async fn detach(host: &Netlink, host_if: &str) -> Result<(), LinkError> {
    match host.delete(host_if).await {
        Err(NetlinkError::Request { source, .. }) if errno(&source) == Some(ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
        Ok(deleted) => {
            if deleted {
                log::info!("detached {host_if}");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifname_is_stable_and_short() {
        let a = host_ifname("web-1");
        assert_eq!(a, host_ifname("web-1"));
        assert_ne!(a, host_ifname("web-2"));
        assert!(a.len() <= 15, "{a}");
    }

    #[test]
    fn no_runtime_is_a_clear_error() {
        let err = Netlink::current()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("tokio runtime"), "{err}");
    }
}
