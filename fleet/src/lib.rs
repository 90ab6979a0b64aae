//! Caisson's fleet agent and CLI on etcd.
//!
//! - [`access`]: the etcd roles and users: who may write which keys.
//! - [`etcd`]: the etcd v3 client over the JSON gateway (failover, leases, resumable watches).
//! - [`unit`]: unit files (what to run, how many, where, limits, privileges) and their validation.
//! - [`capability`]: Linux capabilities by name, and the set a container gets by default.
//! - [`scheduler`]: the pure placement function.
//! - [`registry`]: machine records under leases, leader election, the keyspace.
//! - [`records`]: records in etcd this version cannot use: skipped, logged once, listed.
//! - [`store`]: units, assignments, statuses, and the leader's scheduling pass.
//! - [`network`]: the cluster network's config and each host's subnet lease (flannel's semantics).
//! - [`lock`]: the reboot semaphore the updater's `etcd-lock` strategy uses.
//! - [`agent`]: the agent loop, and reconciliation against an [`agent::Runtime`] (`agent::reconcile`).
//! - [`containerd`]: the containerd runtime.
//! - [`distribution`]: images from OCI registries (manifests, blobs, auth, mirrors).
//! - [`templates`]: confd-style files rendered from the endpoints into units' volumes
//!   (the agent's side: [`agent_templates`]).
//! - [`config`]: the agent configuration file, /etc/caisson/fleet.toml.
//! - [`cli`]: the `caisson-fleet` command line.

pub mod access;
pub mod agent;
pub mod capability;
pub mod cli;
pub mod config;
pub mod containerd;
pub mod distribution;
pub mod etcd;
pub mod hostnet;
pub mod lock;
pub mod network;
pub mod records;
pub mod registry;
pub mod scheduler;
pub mod services;
pub mod store;
pub mod templates;
pub mod unit;
pub mod volumes;
