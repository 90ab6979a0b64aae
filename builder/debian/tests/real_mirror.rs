//! Against the build host's real Debian mirror (from its apt sources): resolve the packages of
//! the host image, download them into the user's cache, and extract them all. Not run by
//! default, as it needs the network; run it by hand:
//!
//! ```text
//! cargo test -p caisson-debian --test real_mirror -- --ignored --nocapture
//! ```

#![allow(clippy::unwrap_used)] // a test file: a panic is a failed test

use std::path::Path;
use std::time::Instant;

use caisson_debian::{
    extract, fetch, host_mirror, merged_usr_skeleton, resolve, Archive, Cache, HOST_APT_DIR,
};

#[test]
#[ignore = "needs the host's Debian mirror"]
fn real_bookworm_closure() {
    let mirror = host_mirror(Path::new(HOST_APT_DIR), "bookworm").unwrap();
    let archive = Archive::bookworm(mirror);
    let cache = Cache::from_env().unwrap();
    let requested: Vec<String> = [
        "containerd",
        "runc",
        "busybox-static",
        "linux-image-amd64",
        "systemd-boot-efi",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();

    let t = Instant::now();
    let lock = resolve(&archive, &cache, &requested, true).unwrap();
    let resolve_s = t.elapsed().as_secs_f64();
    let bytes: u64 = lock.packages.iter().map(|p| p.size).sum();
    for p in &lock.packages {
        eprintln!("  {} {} {}", p.name, p.version, p.size);
    }
    let names: Vec<&str> = lock.packages.iter().map(|p| p.name.as_str()).collect();
    for wanted in &requested {
        assert!(
            names.contains(&wanted.as_str()),
            "{wanted} missing from the closure"
        );
    }
    assert!(names.contains(&"libc6"));
    assert!(names.iter().any(|n| n.starts_with("linux-image-6.")));

    let t = Instant::now();
    let debs = fetch(&archive, &cache, &lock, true).unwrap();
    let fetch_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let dest = tempfile::tempdir().unwrap();
    merged_usr_skeleton(dest.path()).unwrap();
    let mut files = 0;
    for deb in &debs {
        files += extract(deb, dest.path()).unwrap().len();
    }
    let extract_s = t.elapsed().as_secs_f64();
    assert!(dest.path().join("usr/bin/containerd").is_file());
    assert!(
        dest.path().join("bin/busybox").is_file(),
        "via the bin -> usr/bin link"
    );

    let t = Instant::now();
    let again = fetch(&archive, &cache, &lock, false).unwrap();
    let warm_s = t.elapsed().as_secs_f64();
    assert_eq!(again, debs);

    eprintln!(
        "closure: {} packages, {:.1} MiB; resolve {resolve_s:.1} s, fetch {fetch_s:.1} s, \
         extract {extract_s:.1} s ({files} entries), warm fetch {warm_s:.1} s",
        lock.packages.len(),
        bytes as f64 / 1048576.0
    );
}
