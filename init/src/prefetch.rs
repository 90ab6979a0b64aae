//! Page-cache hints for what stage 2 runs first.
//!
//! Every page of the verified root is read and checked against the verity tree on its first
//! use. Left to page faults, stage 2's own binary comes in a few dozen kilobytes at a time, each
//! fault waiting for its read and its hashes in turn, and the same for each service's
//! executable at its `exec`. Stage 1 asks for those files up front instead (`POSIX_FADV_WILLNEED`
//! queues the reads and returns), so they are read in large requests and checked while stage 1
//! finishes. Only a hint: a file that is missing or cannot be read is skipped.

use crate::service;
use caisson_layout::paths;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

/// How much of each service's executable is asked for: its headers and the code that runs first.
pub const EXEC_BYTES: u64 = 2 << 20;

/// The kernel reads at most its read-ahead window (128 KiB unless the device says more) per
/// `WILLNEED`, so a longer range is asked for in windows of this size.
const WINDOW: u64 = 128 << 10;

/// Asks the kernel to start reading the first `max` bytes of `path` (all of it for `None`).
pub fn file(path: &Path, max: Option<u64>) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let end = max.map_or(size, |m| m.min(size));
    let mut at = 0;
    while at < end {
        let len = WINDOW.min(end - at);
        rustix::fs::fadvise(&f, at, NonZeroU64::new(len), rustix::fs::Advice::WillNeed)?;
        at += len;
    }
    Ok(())
}

/// The services' executables under `sysroot`, from the image's and /etc's service files, each
/// once, in name order.
pub fn service_executables(sysroot: &Path) -> Vec<PathBuf> {
    let image = sysroot.join(paths::IMAGE_SERVICES_DIR.trim_start_matches('/'));
    let etc = sysroot.join(paths::ETC_SERVICES_DIR.trim_start_matches('/'));
    let mut out: Vec<PathBuf> = Vec::new();
    for spec in service::load_dirs(&[&image, &etc]).specs {
        let exe = sysroot.join(spec.exec.strip_prefix("/").unwrap_or(&spec.exec));
        if !out.contains(&exe) {
            out.push(exe);
        }
    }
    out
}

/// Asks for the services' executables under `sysroot`; returns how many hints were taken.
pub fn services(sysroot: &Path) -> usize {
    service_executables(sysroot)
        .iter()
        .filter(|exe| match file(exe, Some(EXEC_BYTES)) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("prefetching {}: {e}", exe.display());
                false
            }
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_come_from_both_service_dirs_once_each() {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("usr/lib/caisson/services");
        let etc = tmp.path().join("etc/caisson/services");
        std::fs::create_dir_all(&image).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(image.join("a.toml"), "exec = \"/usr/bin/a\"\n").unwrap();
        std::fs::write(image.join("b.toml"), "exec = \"/usr/bin/shared\"\n").unwrap();
        std::fs::write(etc.join("c.toml"), "exec = \"/usr/bin/shared\"\n").unwrap();
        // /etc's file replaces the image's file of the same name.
        std::fs::write(etc.join("a.toml"), "exec = \"/opt/a2\"\n").unwrap();
        std::fs::write(etc.join("broken.toml"), "exec = 3\n").unwrap();
        assert_eq!(
            service_executables(tmp.path()),
            [tmp.path().join("opt/a2"), tmp.path().join("usr/bin/shared")]
        );
    }

    #[test]
    fn hints_are_taken_for_files_that_exist_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("usr/lib/caisson/services");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(tmp.path().join("usr/bin")).unwrap();
        std::fs::write(tmp.path().join("usr/bin/there"), vec![7u8; 8192]).unwrap();
        std::fs::write(dir.join("there.toml"), "exec = \"/usr/bin/there\"\n").unwrap();
        std::fs::write(dir.join("gone.toml"), "exec = \"/usr/bin/gone\"\n").unwrap();
        assert_eq!(services(tmp.path()), 1);
        let err = file(&tmp.path().join("usr/bin/gone"), None).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        file(&tmp.path().join("usr/bin/there"), Some(4096)).unwrap();
    }
}
