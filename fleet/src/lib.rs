//! Caisson's fleet agent and CLI on etcd.
//!
//! - [`etcd`]: the etcd v3 client over the JSON gateway (failover, leases, resumable watches).
//! - [`unit`]: unit files (what to run, how many, where) and their validation.
//! - [`scheduler`]: the pure placement function.

pub mod config;
pub mod etcd;
pub mod lock;
pub mod registry;
pub mod scheduler;
pub mod store;
pub mod unit;
