//! The image formats of a Caisson disk, made without privileges and reproducibly: the same inputs
//! and `SOURCE_DATE_EPOCH` give byte-identical outputs.
//!
//! - [`cpio`]: the initramfs (newc cpio, zstd), written here.
//! - [`erofs`]: the root slot payload, `mkfs.erofs` plus the dm-verity tree of `caisson_layout::verity`.
//! - [`ext4`]: the `state` filesystem, `mkfs.ext4 -d` with ownership and times fixed by `debugfs`.
//! - [`esp`]: the FAT32 EFI System Partition, `mkfs.fat` and mtools.
//! - [`gpt`]: the partitioned disk (protective MBR, primary and backup GPT), sparse.
//! - [`qcow2`]: `qemu-img convert`.
//!
//! No function here needs root, a loop device or a mount. Every GUID, UUID, salt and volume id is
//! derived from the image name (and version or content) through `caisson_layout::partition`.
//! Outputs are written under a temporary name and renamed at the end, so a failure never leaves a
//! partial file under the output name.

pub mod cpio;
pub mod erofs;
mod error;
pub mod esp;
pub mod ext4;
pub mod gpt;
pub mod qcow2;
mod tempout;
pub mod tools;

pub use cpio::{write_initramfs, write_initramfs_with_level, CpioData, CpioEntry, CpioKind};
pub use erofs::{make_root_payload, RootPayload};
pub use error::DiskError;
pub use esp::make_esp;
pub use ext4::make_state_fs;
pub use gpt::{read_layout, write_disk, DiskLayout, PartitionContent, PartitionInfo};
pub use qcow2::to_qcow2;
pub use tools::{check_host_tools, Tool};
