//! Launch Caisson images under QEMU, for people (`caisson run`) and for tests.
//!
//! A [`Vm`] boots a disk under OVMF (UEFI) with TCG by default, behind a copy-on-write overlay so
//! the image never changes. Its serial console is captured to a file ([`Vm::wait_for`]), QMP
//! drives power events ([`Vm::powerdown`], [`Vm::reset`], [`Vm::quit`], [`Vm::kill`]), and a
//! virtio-serial port carries the init's control protocol ([`Vm::control`]). The guest reaches
//! host loopback at [`HOST_FROM_GUEST`] (`10.0.2.2`). Dropping a `Vm` kills QEMU.

mod channel;
mod console;
mod error;
mod launch;
mod network;
mod overlay;
mod qmp;

pub use channel::{Control, DEFAULT_REQUEST_TIMEOUT};
pub use console::{clean_line, Pattern};
pub use error::QemuError;
pub use launch::{
    run_interactive, Accel, DirectKernel, Disk, DiskMode, FwCfgValue, QemuPaths, RunOptions,
    UserNet, Vm, VmOptions, HOST_FROM_GUEST,
};
pub use network::{NetAttachment, VirtualNetwork};
pub use overlay::{create_overlay, DiskFormat};
pub use regex::Regex;
