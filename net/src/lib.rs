//! Container networking on a Caisson host, in the line of flannel and a CNI bridge plugin, and
//! the DNS half of service discovery. The fleet agent (`caisson-fleet`) keeps the cluster's
//! state in etcd and calls in here for what happens on the host:
//!
//! - [`cluster`]: the cluster network's configuration, each host's subnet record, and the
//!   choice of a free subnet (flannel's formats; the fleet keeps them in etcd).
//! - [`endpoint`]: what discovery serves: a unit's healthy instances, their addresses and named
//!   ports. The one type the agent's service registry, the DNS responder and templates share.
//! - [`dns`]: the DNS responder: the cluster zone from the endpoints, everything else forwarded.
//!
//! Nothing here talks to etcd; everything here that changes the host (links, addresses,
//! routes, nftables) is tested in network namespaces of the test's own.

pub mod cluster;
pub mod dns;
pub mod endpoint;
