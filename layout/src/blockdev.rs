//! Finding partitions by PARTUUID without udev: read the GPT of every disk in `/sys/block`, then
//! map the partition number to its device node through `/sys/block/<disk>/<part>/partition`.
//! The init finds the root and `state` this way, the updater the disk it writes slots to.
//!
//! Every path is taken under `root` (`/` on a machine, a temporary directory in tests).

use std::path::{Path, PathBuf};
use uuid::Uuid;

/// The disks under `root` worth reading a partition table from (no loop, ram, dm, md, optical or
/// zram devices), sorted.
pub fn candidate_disks(root: &Path) -> Vec<String> {
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

/// The partition number of `uuid` on the disk node `disk`, read from its GPT.
fn partition_number(disk: &Path, uuid: Uuid) -> Option<u32> {
    let gpt = gpt::GptConfig::new().writable(false).open(disk).ok()?;
    gpt.partitions()
        .iter()
        .find(|(_, p)| p.part_guid == uuid)
        .map(|(n, _)| *n)
}

/// The device node of partition `number` of the disk named `disk` (`vda`, `nvme0n1`): the name
/// sysfs gives it, else the kernel's convention (`vda1`, `nvme0n1p1`).
pub fn partition_node(root: &Path, disk: &str, number: u32) -> PathBuf {
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

/// The disk whose GPT holds the partition `uuid`, as its name and its device node.
pub fn disk_holding(root: &Path, uuid: Uuid) -> Option<(String, PathBuf, u32)> {
    candidate_disks(root).into_iter().find_map(|disk| {
        let node = root.join("dev").join(&disk);
        let number = partition_number(&node, uuid)?;
        Some((disk, node, number))
    })
}

/// The device node of the partition `uuid`, if it exists now.
pub fn find_partuuid(root: &Path, uuid: Uuid) -> Option<PathBuf> {
    let (disk, _, number) = disk_holding(root, uuid)?;
    let node = partition_node(root, &disk, number);
    node.exists().then_some(node)
}

/// A fake `/sys` and `/dev` for tests (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::*;

    /// Makes `root/dev/vda`, an 8 MiB GPT disk with one 1 MiB partition per uuid, with its
    /// partitions in `/sys/block/vda` and `/dev`, and a `loop0` to be skipped.
    ///
    /// # Panics
    /// On any I/O or GPT error: it is a test fixture.
    #[allow(clippy::unwrap_used)]
    pub fn fake_disk(root: &Path, uuids: &[Uuid]) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_partitions_and_their_disk_by_partuuid() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Uuid::from_u128(0xaaaa);
        let b = Uuid::from_u128(0xbbbb);
        testing::fake_disk(tmp.path(), &[a, b]);
        assert_eq!(
            find_partuuid(tmp.path(), b),
            Some(tmp.path().join("dev/vda2"))
        );
        assert_eq!(find_partuuid(tmp.path(), Uuid::from_u128(1)), None);
        assert_eq!(
            disk_holding(tmp.path(), a),
            Some(("vda".into(), tmp.path().join("dev/vda"), 1))
        );
        assert_eq!(candidate_disks(tmp.path()), ["vda"], "loop0 is skipped");
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
