//! The on-disk contract of a Caisson machine.
//!
//! Builder, init and updater import these facts and never restate them: partition types and labels,
//! slot names, boot entry names and their boot counters, the kernel command line keys, the paths on
//! the ESP and in the root, how a partition is found by PARTUUID, the os-release fields, the
//! dm-verity hash tree format, and the init's control protocol with its one client
//! ([`control::Client`]).

pub mod blockdev;
pub mod cmdline;
pub mod control;
pub mod corruption;
pub mod entry;
pub mod fleet_id;
pub mod osrelease;
pub mod partition;
pub mod paths;
pub mod slot;
pub mod verity;
pub mod version;

pub use entry::{BootCounter, EntryName};
pub use slot::Slot;
