//! Container networking on a Caisson host, in the line of flannel and a CNI bridge plugin, and
//! the DNS half of service discovery. The fleet agent (`caisson-fleet`) keeps the cluster's
//! state in etcd and calls in here for what happens on the host:
//!
//! - [`cluster`]: the cluster network's configuration, each host's subnet record, and the
//!   choice of a free subnet (flannel's formats; the fleet keeps them in etcd).
//! - [`endpoint`]: what discovery serves: a unit's healthy instances, their addresses and named
//!   ports. The one type the agent's service registry, the DNS responder and templates share.
//! - [`ipam`]: host-local addresses of the host's subnet, one file per address on disk.
//! - [`netns`]: named network namespaces (`ip netns add` style) and running code inside them.
//! - [`netlink`]: a netlink connection into one namespace, and the helpers the others share.
//! - [`link`]: the host bridge and each instance's veth, address and default route.
//! - [`nat`]: outbound masquerade and published ports in nftables (table `ip caisson`).
//! - [`routes`]: routes to the other hosts' subnets (host-gw, flannel's default backend).
//! - [`vxlan`]: flannel's VXLAN backend, for hosts on different L3 segments.
//! - [`dns`]: the DNS responder: the cluster zone from the endpoints, everything else forwarded.
//!
//! Nothing here talks to etcd; everything here that changes the host (links, addresses,
//! routes, nftables) is tested in network namespaces of the test's own.
//!
//! # Host networking, as the agent uses it
//!
//! Once per host (and again whenever the peers change), with the subnet leased in etcd; all of
//! it is idempotent, so an agent that restarts runs the same calls and keeps what is there:
//!
//! ```no_run
//! # async fn host() -> Result<(), Box<dyn std::error::Error>> {
//! use caisson_net::{ipam::Ipam, link, nat, netlink::Netlink, netns::NetNs, routes};
//! let subnet = "10.42.3.0/24".parse()?; // this host's lease
//! let cluster = "10.42.0.0/16".parse()?;
//! let peers: Vec<routes::Peer> = vec![]; // the other hosts' leases
//! let nl = Netlink::current()?; // the host's namespace
//! link::ensure_bridge(&nl, link::DEFAULT_BRIDGE, subnet).await?;
//! nat::enable_forwarding()?;
//! routes::sync(&nl, &routes::host_gw_routes(subnet, &peers)).await?;
//! // or, across L3: vxlan::sync_vxlan(&nl, &vxlan_config, subnet, &peers).await?;
//!
//! // Per instance: a namespace, an address, a veth on the bridge.
//! let ipam = Ipam::open("/var/lib/caisson/ipam", subnet)?;
//! let ns = NetNs::ensure("/run/caisson/netns/web-1")?; // give runc this path
//! let address = ipam.allocate("web-1")?;
//! let at = link::Attachment {
//!     bridge: link::DEFAULT_BRIDGE,
//!     host_if: link::host_ifname("web-1"),
//!     netns: &ns,
//!     address: ipnet::Ipv4Net::new(address, subnet.prefix_len())?,
//!     gateway: ipam.gateway(),
//!     mtu: None,
//! };
//! link::attach(&nl, &at).await?;
//! // The published ports of every instance on the host, as one set.
//! let ports = vec![nat::PublishedPort {
//!     host_port: 8080,
//!     proto: caisson_net::endpoint::Proto::Tcp,
//!     addr: address,
//!     port: 80,
//! }];
//! nat::apply(&nat::NatConfig { subnet, cluster, ports })?;
//!
//! // When the instance goes:
//! link::detach(&nl, &link::host_ifname("web-1")).await?;
//! NetNs::delete(ns.path())?;
//! ipam.release("web-1")?;
//! # Ok(()) }
//! ```
//!
//! The netlink calls need a tokio runtime; [`nat`] and [`netns`] are synchronous (`nat` runs
//! Debian's `nft`, in the calling thread's namespace).

pub mod cluster;
pub mod dns;
pub mod endpoint;
pub mod ipam;
pub mod link;
pub mod nat;
pub mod netlink;
pub mod netns;
pub mod routes;
pub mod vxlan;
