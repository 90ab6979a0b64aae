//! Finding partitions by PARTUUID without udev: read the GPT of every disk in `/sys/block`, then
//! map the partition number to its device node through `/sys/block/<disk>/<part>/partition`.
//!
//! Every path is taken under `root` (`/` on a machine, a temporary directory in tests).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A partition that did not show up.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(
        "no partition with PARTUUID {uuid} ({what}) appeared within {secs} s; block devices \
         seen: [{seen}]. Check that the disk driver (virtio_blk, nvme, ahci...) is in the \
         initramfs module list and that the boot entry matches this disk"
    )]
    Timeout {
        uuid: Uuid,
        what: String,
        secs: u64,
        seen: String,
    },
}

/// Disks worth reading a partition table from.
fn candidate_disks(root: &Path) -> Vec<String> {
    let mut disks: Vec<String> = std::fs::read_dir(root.join("sys/block"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    !["loop", "ram", "dm-", "sr", "zram", "md"]
                        .iter()
                        .any(|p| n.starts_with(p))
                })
                .collect()
        })
        .unwrap_or_default();
    disks.sort();
    disks
}

/// The names of all block devices the kernel knows (for error messages).
pub fn seen(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("sys/class/block"))
        .or_else(|_| std::fs::read_dir(root.join("sys/block")))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The partition number of `uuid` on `disk`, read from its GPT.
fn partition_number(disk: &Path, uuid: Uuid) -> Option<u32> {
    let gpt = gpt::GptConfig::new().writable(false).open(disk).ok()?;
    gpt.partitions()
        .iter()
        .find(|(_, p)| p.part_guid == uuid)
        .map(|(n, _)| *n)
}

/// The device node of partition `number` of `disk`.
fn partition_node(root: &Path, disk: &str, number: u32) -> PathBuf {
    let sys = root.join("sys/block").join(disk);
    let from_sysfs = std::fs::read_dir(&sys).ok().and_then(|rd| {
        rd.filter_map(|e| e.ok()).find_map(|e| {
            let n = std::fs::read_to_string(e.path().join("partition")).ok()?;
            (n.trim().parse::<u32>().ok()? == number)
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
    });
    let name = from_sysfs.unwrap_or_else(|| {
        if disk.ends_with(|c: char| c.is_ascii_digit()) {
            format!("{disk}p{number}")
        } else {
            format!("{disk}{number}")
        }
    });
    root.join("dev").join(name)
}

/// The device node of the partition `uuid`, if it exists now.
pub fn find_partuuid(root: &Path, uuid: Uuid) -> Option<PathBuf> {
    candidate_disks(root).into_iter().find_map(|disk| {
        let number = partition_number(&root.join("dev").join(&disk), uuid)?;
        let node = partition_node(root, &disk, number);
        node.exists().then_some(node)
    })
}

/// Wait until the partition `uuid` shows up, polling every `poll`.
pub fn wait_for_partuuid(
    root: &Path,
    uuid: Uuid,
    what: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<PathBuf, BlockError> {
    let start = Instant::now();
    let mut told = false;
    loop {
        if let Some(node) = find_partuuid(root, uuid) {
            return Ok(node);
        }
        if start.elapsed() >= timeout {
            return Err(BlockError::Timeout {
                uuid,
                what: what.to_string(),
                secs: timeout.as_secs(),
                seen: seen(root).join(", "),
            });
        }
        if !told && start.elapsed() >= Duration::from_secs(2) {
            log::info!("waiting for the {what} partition (PARTUUID {uuid})");
            told = true;
        }
        std::thread::sleep(poll);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fake /sys and /dev with one GPT disk `vda` holding two partitions.
    pub(crate) fn fake_disk(root: &Path, uuids: &[Uuid]) {
        use std::fs;
        fs::create_dir_all(root.join("dev")).unwrap();
        let disk = root.join("dev/vda");
        let f = fs::File::create(&disk).unwrap();
        f.set_len(8 * 1024 * 1024).unwrap();
        drop(f);
        let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(
            u32::try_from((8 * 1024 * 1024) / 512 - 1).unwrap(),
        );
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        mbr.overwrite_lba0(&mut file).unwrap();
        let mut g = gpt::GptConfig::new()
            .writable(true)
            .create_from_device(file, None)
            .unwrap();
        for (i, u) in uuids.iter().enumerate() {
            let id = g
                .add_partition(
                    &format!("p{i}"),
                    1024 * 1024,
                    gpt::partition_types::LINUX_FS,
                    0,
                    None,
                )
                .unwrap();
            let mut parts = g.partitions().clone();
            parts.get_mut(&id).unwrap().part_guid = *u;
            g.update_partitions(parts).unwrap();
        }
        g.write().unwrap();
        for i in 1..=uuids.len() {
            let d = root.join(format!("sys/block/vda/vda{i}"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("partition"), format!("{i}\n")).unwrap();
            fs::write(root.join(format!("dev/vda{i}")), "").unwrap();
        }
        fs::create_dir_all(root.join("sys/block/loop0")).unwrap();
    }

    #[test]
    fn finds_partitions_by_partuuid() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Uuid::from_u128(0xaaaa);
        let b = Uuid::from_u128(0xbbbb);
        fake_disk(tmp.path(), &[a, b]);
        assert_eq!(
            find_partuuid(tmp.path(), b),
            Some(tmp.path().join("dev/vda2"))
        );
        assert_eq!(find_partuuid(tmp.path(), Uuid::from_u128(1)), None);
    }

    #[test]
    fn timeout_lists_what_was_seen() {
        let tmp = tempfile::tempdir().unwrap();
        fake_disk(tmp.path(), &[Uuid::from_u128(5)]);
        let err = wait_for_partuuid(
            tmp.path(),
            Uuid::from_u128(6),
            "root",
            Duration::from_millis(30),
            Duration::from_millis(10),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("vda"), "{err}");
        assert!(err.contains("loop0"), "{err}");
        assert!(err.contains("root"), "{err}");
    }

    #[test]
    fn node_names_for_nvme_style_disks() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            partition_node(tmp.path(), "nvme0n1", 2),
            tmp.path().join("dev/nvme0n1p2")
        );
        assert_eq!(
            partition_node(tmp.path(), "sda", 1),
            tmp.path().join("dev/sda1")
        );
    }
}
