//! `caisson unpack`: only the packages of a spec's root, extracted into a directory, the way
//! the build does it. For looking at what packages bring, and for the benchmark against
//! `mmdebstrap --variant=extract`.

use crate::build::{archive, BuildError};
use crate::{lockfile, rootfs, spec};
use std::path::Path;
use std::time::Instant;

/// Timings of an unpack, in seconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct UnpackTimes {
    pub resolve: f64,
    pub fetch: f64,
    pub extract: f64,
    pub packages: usize,
}

/// Resolves (or reads the lock), fetches and extracts the spec's root packages into `dest`,
/// which must not exist yet.
pub fn unpack(
    spec_path: &Path,
    dest: &Path,
    mirror: Option<&str>,
    locked: bool,
    progress: bool,
) -> Result<UnpackTimes, BuildError> {
    if dest.exists() {
        return Err(BuildError::Io {
            what: "unpacking into",
            path: dest.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the destination already exists; name a new directory",
            ),
        });
    }
    let t = Instant::now();
    let spec = spec::load(spec_path)?;
    let archive = archive(&spec, mirror)?;
    let cache = caisson_debian::Cache::from_env()?;
    let lock = lockfile::ensure(&spec, &archive, &cache, locked, progress)?;
    let resolve = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let debs = caisson_debian::fetch(&archive, &cache, &lock.rootfs, progress)?;
    let fetch = t.elapsed().as_secs_f64();
    let t = Instant::now();
    rootfs::skeleton(dest)?;
    rootfs::install_packages(dest, &debs)?;
    Ok(UnpackTimes {
        resolve,
        fetch,
        extract: t.elapsed().as_secs_f64(),
        packages: debs.len(),
    })
}
