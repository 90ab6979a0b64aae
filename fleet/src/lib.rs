//! Caisson's fleet agent and CLI on etcd.
//!
//! - [`etcd`]: the etcd v3 client over the JSON gateway (failover, leases, resumable watches).

pub mod etcd;
