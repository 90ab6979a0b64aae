//! The ESP mounted for a moment: found by its PARTUUID, mounted, used, synced, unmounted.

use crate::sys::{MountFlags, Syscall};
use caisson_layout::cmdline::BootParams;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A failure to reach the ESP.
#[derive(Debug, thiserror::Error)]
pub enum EspError {
    #[error(transparent)]
    Block(#[from] crate::blockdev::BlockError),
    #[error("creating the ESP mount point {path}: {source}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting the ESP {dev} at {at}: {source}")]
    Mount {
        dev: PathBuf,
        at: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bless(#[from] crate::bless::BlessError),
}

/// Mounts the ESP of `params` at `at`, runs `f` on it, syncs and unmounts it.
pub fn with_esp<T>(
    sys: &dyn Syscall,
    params: &BootParams,
    at: &Path,
    f: impl FnOnce(&Path) -> Result<T, crate::bless::BlessError>,
) -> Result<T, EspError> {
    let dev = crate::blockdev::wait_for_partuuid(
        Path::new("/"),
        params.esp,
        "ESP",
        Duration::from_secs(10),
        Duration::from_millis(100),
    )?;
    std::fs::create_dir_all(at).map_err(|source| EspError::MountPoint {
        path: at.to_path_buf(),
        source,
    })?;
    sys.mount(
        &dev.to_string_lossy(),
        at,
        "vfat",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        "umask=0077",
    )
    .map_err(|source| EspError::Mount {
        dev: dev.clone(),
        at: at.to_path_buf(),
        source,
    })?;
    let result = f(at);
    sys.sync();
    if let Err(e) = sys.unmount(at, false) {
        log::warn!("unmounting {}: {e}", at.display());
    }
    Ok(result?)
}
