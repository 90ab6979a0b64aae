//! First boot: grow `state` to the end of the disk. The GPT is rewritten (the `state` entry ends
//! at the last usable LBA, the backup header moves to the disk's new end), the kernel is told
//! with `BLKPG_RESIZE_PARTITION`, and the mounted ext4 grows online with `EXT4_IOC_RESIZE_FS`.
//! `lib/caisson/state-grown` on `state` records that it was done.
//!
//! With [`crate::sys`], [`crate::netdev`] and [`crate::dm`], one of the few modules with `unsafe`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// A step of the growth that failed (the boot goes on with the old size).
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the GPT of {path}: {source}")]
    Gpt {
        path: PathBuf,
        #[source]
        source: gpt::GptError,
    },
    #[error("no partition with PARTUUID {uuid} in the GPT of {path}")]
    NoPartition { uuid: Uuid, path: PathBuf },
    #[error("cannot find the disk and partition number of {0} in /sys/class/block")]
    NoParent(PathBuf),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> GrowError + 'a {
    move |source| GrowError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Where a partition sits, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// The kernel's partition number (the GPT entry's 1-based index).
    pub number: u32,
    pub start: u64,
    pub len: u64,
}

/// Rewrites the GPT of `disk` so the partition `uuid` ends at the last usable LBA. Returns its
/// new extent, or `None` when it already ends there (nothing written).
pub fn grow_gpt(disk: &Path, uuid: Uuid) -> Result<Option<Extent>, GrowError> {
    let gpt_err = |source| GrowError::Gpt {
        path: disk.to_path_buf(),
        source,
    };
    let mut gpt = gpt::GptConfig::new()
        .writable(true)
        .open(disk)
        .map_err(gpt_err)?;
    let lb = u64::from(*gpt.logical_block_size());
    let old_backup = gpt.header().backup_lba;
    let parts: BTreeMap<u32, gpt::partition::Partition> = gpt.partitions().clone();
    let (&number, _) = parts
        .iter()
        .find(|(_, p)| p.part_guid == uuid)
        .ok_or_else(|| GrowError::NoPartition {
            uuid,
            path: disk.to_path_buf(),
        })?;
    // Recompute the headers for the disk's current size (moves the backup to the end).
    gpt.update_partitions(parts.clone()).map_err(gpt_err)?;
    let last_usable = gpt.header().last_usable;
    let mut parts = parts;
    let Some(p) = parts.get_mut(&number) else {
        return Ok(None);
    };
    if p.last_lba >= last_usable {
        return Ok(None);
    }
    p.last_lba = last_usable;
    let extent = Extent {
        number,
        start: p.first_lba * lb,
        len: (p.last_lba - p.first_lba + 1) * lb,
    };
    gpt.update_partitions(parts).map_err(gpt_err)?;
    let mut file = gpt.write().map_err(gpt_err)?;
    // The old backup header now lies inside the grown partition: wipe its signature.
    if old_backup < last_usable {
        file.seek(SeekFrom::Start(old_backup * lb))
            .and_then(|_| file.write_all(&vec![0u8; lb as usize]))
            .and_then(|_| file.sync_all())
            .map_err(io_err("wiping the old backup GPT header on", disk))?;
    }
    Ok(Some(extent))
}

/// The disk node and partition number of a partition node, through `<root>/sys/class/block`.
pub fn parent_disk(root: &Path, part_dev: &Path) -> Result<(PathBuf, u32), GrowError> {
    let none = || GrowError::NoParent(part_dev.to_path_buf());
    let name = part_dev.file_name().ok_or_else(none)?;
    let sys = root.join("sys/class/block").join(name);
    let number: u32 = std::fs::read_to_string(sys.join("partition"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(none)?;
    let real = std::fs::canonicalize(&sys).map_err(|_| none())?;
    let disk = real.parent().and_then(|p| p.file_name()).ok_or_else(none)?;
    Ok((root.join("dev").join(disk), number))
}

/// `struct blkpg_partition` from `<linux/blkpg.h>`.
#[repr(C)]
struct BlkpgPartition {
    start: libc::c_longlong,
    length: libc::c_longlong,
    pno: libc::c_int,
    devname: [libc::c_char; 64],
    volname: [libc::c_char; 64],
}

/// `struct blkpg_ioctl_arg`.
#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

/// `BLKPG` = `_IO(0x12, 105)`.
const BLKPG: libc::c_ulong = 0x1269;
const BLKPG_RESIZE_PARTITION: libc::c_int = 3;
/// `EXT4_IOC_RESIZE_FS` = `_IOW('f', 16, __u64)`.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Tells the kernel partition `extent.number` of the open disk now has `extent`'s size.
pub fn blkpg_resize(disk: &File, extent: Extent) -> io::Result<()> {
    let mut part = BlkpgPartition {
        start: extent.start as libc::c_longlong,
        length: extent.len as libc::c_longlong,
        pno: extent.number as libc::c_int,
        devname: [0; 64],
        volname: [0; 64],
    };
    let arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: (&mut part as *mut BlkpgPartition).cast(),
    };
    // SAFETY: `arg` and the `part` it points to are initialised and live across the call; the
    // kernel copies `datalen` bytes from `data` and writes nothing back.
    let r = unsafe { libc::ioctl(disk.as_raw_fd(), BLKPG as _, &arg as *const BlkpgIoctlArg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Grows the ext4 filesystem mounted at `mount` to `blocks` filesystem blocks.
pub fn ext4_resize(mount: &Path, blocks: u64) -> io::Result<()> {
    let dir = File::open(mount)?;
    let count: u64 = blocks;
    // SAFETY: `count` is a valid u64 that outlives the call; the ioctl only reads it.
    let r = unsafe {
        libc::ioctl(
            dir.as_raw_fd(),
            EXT4_IOC_RESIZE_FS as _,
            &count as *const u64,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The whole first-boot growth of the partition `uuid` at `part_dev`, mounted at `mount`.
/// Writes the marker `marker` when done (or when there is nothing to grow).
pub fn grow_state(
    root: &Path,
    part_dev: &Path,
    uuid: Uuid,
    mount: &Path,
    marker: &Path,
) -> Result<Option<u64>, GrowError> {
    let (disk, _) = parent_disk(root, part_dev)?;
    let grown = grow_gpt(&disk, uuid)?;
    let mut new_bytes = None;
    if let Some(extent) = grown {
        let f = OpenOptions::new()
            .read(true)
            .open(&disk)
            .map_err(io_err("opening", &disk))?;
        blkpg_resize(&f, extent).map_err(io_err("BLKPG_RESIZE_PARTITION on", &disk))?;
        let bsize = rustix::fs::statfs(mount)
            .map_err(io::Error::from)
            .map_err(io_err("statfs", mount))?
            .f_bsize as u64;
        ext4_resize(mount, extent.len / bsize.max(1024))
            .map_err(io_err("EXT4_IOC_RESIZE_FS on", mount))?;
        new_bytes = Some(extent.len);
    }
    if let Some(dir) = marker.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    }
    std::fs::write(marker, "grown\n").map_err(io_err("writing", marker))?;
    Ok(new_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A disk image like the builder's: ESP, root-a, root-b, state at the end.
    fn image(path: &Path, size: u64) -> Uuid {
        let f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let mut gpt = gpt::GptConfig::new()
            .writable(true)
            .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
            .create(path)
            .unwrap();
        let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(((size / 512) - 1) as u32);
        let mut dev = OpenOptions::new()
            .write(true)
            .read(true)
            .open(path)
            .unwrap();
        mbr.overwrite_lba0(&mut dev).unwrap();
        gpt.add_partition("esp", 4 * MIB, gpt::partition_types::EFI, 0, None)
            .unwrap();
        gpt.add_partition(
            "root-a",
            4 * MIB,
            gpt::partition_types::LINUX_ROOT_X64,
            0,
            None,
        )
        .unwrap();
        gpt.add_partition(
            "root-b",
            4 * MIB,
            gpt::partition_types::LINUX_ROOT_X64,
            0,
            None,
        )
        .unwrap();
        let id = gpt
            .add_partition("state", 4 * MIB, gpt::partition_types::LINUX_FS, 0, None)
            .unwrap();
        let uuid = gpt.partitions()[&id].part_guid;
        gpt.write().unwrap();
        uuid
    }

    fn sfdisk_json(path: &Path) -> Option<serde_json::Value> {
        let out = std::process::Command::new("sfdisk")
            .arg("--json")
            .arg(path)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    #[test]
    fn grows_the_last_partition_to_the_disk_end() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("disk.raw");
        let uuid = image(&disk, 32 * MIB);
        // Nothing to do on a disk that has not grown.
        let before = grow_gpt(&disk, uuid).unwrap();
        assert!(
            before.is_none_or(|e| e.start + e.len <= 32 * MIB - 33 * 512),
            "{before:?}"
        );
        let f = OpenOptions::new().write(true).open(&disk).unwrap();
        f.set_len(64 * MIB).unwrap();
        drop(f);
        let e = grow_gpt(&disk, uuid).unwrap().expect("grown");
        assert_eq!(e.number, 4);
        // The entry ends right before the backup partition array (32 sectors) and header.
        assert_eq!(e.start + e.len, 64 * MIB - 33 * 512);
        let gpt = gpt::GptConfig::new().writable(false).open(&disk).unwrap();
        assert_eq!(gpt.header().backup_lba, 64 * MIB / 512 - 1);
        assert_eq!(gpt.partitions()[&4].last_lba, 64 * MIB / 512 - 34);
        assert_eq!(gpt.partitions()[&4].part_guid, uuid);
        // Second run: nothing left to grow.
        assert!(grow_gpt(&disk, uuid).unwrap().is_none());
        // An independent reader agrees.
        if let Some(j) = sfdisk_json(&disk) {
            let parts = j["partitiontable"]["partitions"].as_array().unwrap();
            let state = &parts[3];
            assert_eq!(
                state["start"].as_u64().unwrap() + state["size"].as_u64().unwrap(),
                64 * MIB / 512 - 33
            );
            assert_eq!(j["partitiontable"]["lastlba"], 64 * MIB / 512 - 34);
        }
    }

    #[test]
    fn unknown_partition_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("disk.raw");
        image(&disk, 32 * MIB);
        let e = grow_gpt(&disk, Uuid::from_u128(7)).unwrap_err();
        assert!(matches!(e, GrowError::NoPartition { .. }), "{e}");
    }

    #[test]
    fn finds_the_parent_disk_in_sysfs() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        let devdir = r.join("sys/devices/virtio1/block/vda");
        std::fs::create_dir_all(devdir.join("vda4")).unwrap();
        std::fs::write(devdir.join("vda4/partition"), "4\n").unwrap();
        std::fs::create_dir_all(r.join("sys/class/block")).unwrap();
        std::os::unix::fs::symlink(devdir.join("vda4"), r.join("sys/class/block/vda4")).unwrap();
        let (disk, n) = parent_disk(r, Path::new("/dev/vda4")).unwrap();
        assert_eq!(disk, r.join("dev/vda"));
        assert_eq!(n, 4);
        assert!(parent_disk(r, Path::new("/dev/vdb1")).is_err());
    }

    #[test]
    fn ioctl_structs_have_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<BlkpgPartition>(), 152);
        assert_eq!(std::mem::size_of::<BlkpgIoctlArg>(), 24);
    }
}
