//! Waiting for a partition by PARTUUID (caisson_layout::blockdev finds it), and what to say
//! when it does not show up.
//!
//! Every path is taken under `root` (`/` on a machine, a temporary directory in tests).

pub use caisson_layout::blockdev::find_partuuid;
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
mod tests {
    use super::*;
    use caisson_layout::blockdev::testing::fake_disk;

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
    fn a_partition_that_is_there_is_found_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        fake_disk(tmp.path(), &[Uuid::from_u128(5)]);
        let node = wait_for_partuuid(
            tmp.path(),
            Uuid::from_u128(5),
            "root",
            Duration::from_millis(30),
            Duration::from_millis(10),
        )
        .unwrap();
        assert_eq!(node, tmp.path().join("dev/vda1"));
    }
}
