//! Caisson's init: stage 1 in the initramfs (modules, dm-verity, the root, `state`, `/etc`,
//! switch root) and stage 2 as PID1 on the verified root (mounts, cgroups, services, the control
//! socket, readiness, blessing, shutdown).
//!
//! System calls go through [`sys::Syscall`] so that the logic runs in plain `cargo test`.

pub mod backoff;
pub mod blockdev;
pub mod cgroup;
pub mod console;
pub mod deps;
pub mod dm;
pub mod reaper;
pub mod service;
pub mod supervisor;
pub mod sys;
pub mod users;
