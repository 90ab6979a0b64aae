//! Container networking on a Caisson host, in the line of flannel and a CNI bridge plugin, and
//! the DNS half of service discovery. The fleet agent (`caisson-fleet`) keeps the cluster's
//! state in etcd and calls in here for what happens on the host:
//!
//! - [`endpoint`]: what discovery serves: a unit's healthy instances, their addresses and named
//!   ports. The one type the agent's service registry, the DNS responder and templates share.
//! - [`ipam`]: host-local addresses of the host's subnet, one file per address on disk.
//! - [`netns`]: named network namespaces (`ip netns add` style) and running code inside them.
//! - [`netlink`]: a netlink connection into one namespace, and the helpers the others share.
//! - [`link`]: the host bridge and each instance's veth, address and default route.
//! - [`nat`]: outbound masquerade and published ports in nftables (table `ip caisson`).
//! - [`routes`]: routes to the other hosts' subnets, host-gw or VXLAN (flannel's backends).
//!
//! Nothing here talks to etcd; everything here that changes the host (links, addresses,
//! routes, nftables) is tested in network namespaces of the test's own.

pub mod endpoint;
pub mod ipam;
pub mod link;
pub mod nat;
pub mod netlink;
pub mod netns;
pub mod routes;
