//! Caisson's init: stage 1 in the initramfs (modules, dm-verity, the root, `state`, `/etc`,
//! switch root) and stage 2 as PID1 on the verified root (mounts, cgroups, services, the control
//! socket, readiness, blessing, shutdown).
//!
//! System calls go through [`sys::Syscall`] so that the logic runs in plain `cargo test`.

pub mod backoff;
pub mod bless;
pub mod blockdev;
pub mod boot;
pub mod cgroup;
pub mod command;
pub mod console;
pub mod control;
pub mod deps;
pub mod devlinks;
pub mod dhcp;
pub mod dm;
pub mod esp;
pub mod expedite;
pub mod fatal;
pub mod grow;
pub mod guard;
pub mod logs;
pub mod modules;
pub mod netdev;
pub mod network;
pub mod prefetch;
pub mod provisioning;
pub mod reaper;
pub mod service;
pub mod stage1;
pub mod stage2;
pub mod supervisor;
pub mod sys;
pub mod users;
pub mod verity;

/// The init's name and version, for logs.
pub const VERSION_LINE: &str = concat!("caisson-init ", env!("CARGO_PKG_VERSION"));
