//! The Caisson image builder: `caisson build`, `lock`, `inspect` and `run`.

pub mod spec;
pub mod kernel;
pub mod binaries;
pub mod rootfs;
pub mod lockfile;
pub mod build;
pub mod run;
pub mod inspect;
