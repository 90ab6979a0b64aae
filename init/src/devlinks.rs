//! The links in `/dev` that devtmpfs does not make and that programs expect: `/dev/fd` and
//! `/dev/stdin`, `/dev/stdout`, `/dev/stderr` into `/proc/self/fd`, as systemd (tmpfiles' static
//! nodes), udev and container runtimes set them up. Without `/dev/stdin`, `nft -f -` (how the
//! fleet agent's NAT hands its rules to nft) fails with "Could not open file /dev/stdin".

use std::path::Path;

/// Each link under `/dev` and where it points.
pub const LINKS: [(&str, &str); 4] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// Makes the [`LINKS`] under `dev` (the devtmpfs mount); whatever is already there stays, and a
/// link that cannot be made is logged.
pub fn ensure(dev: &Path) {
    for (name, target) in LINKS {
        let link = dev.join(name);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Err(e) = std::os::unix::fs::symlink(target, &link) {
            log::warn!("linking {} to {target}: {e}", link.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_point_into_proc_self_fd_and_existing_entries_stay() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stderr"), b"a file of its own").unwrap();
        ensure(dir.path());
        let target = |name: &str| std::fs::read_link(dir.path().join(name)).unwrap();
        assert_eq!(target("fd"), Path::new("/proc/self/fd"));
        assert_eq!(target("stdin"), Path::new("/proc/self/fd/0"));
        assert_eq!(target("stdout"), Path::new("/proc/self/fd/1"));
        assert!(dir.path().join("stderr").is_file());
        // Again: nothing to do, nothing fails.
        ensure(dir.path());
        assert_eq!(target("stdin"), Path::new("/proc/self/fd/0"));
    }
}
