//! The Caisson image builder: `caisson build`, `lock`, `inspect` and `run`.

pub mod binaries;
pub mod build;
pub mod inspect;
pub mod kernel;
pub mod lockfile;
pub mod rootfs;
pub mod run;
pub mod spec;
pub mod unpack;
