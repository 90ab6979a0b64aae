//! Making a config drive on the build host: a small FAT volume labelled `CAISSON-CFG` holding
//! `/caisson.toml`, made with `mkfs.fat` and `mcopy` (dosfstools, mtools), without root.

use crate::source::{DRIVE_FILE, DRIVE_LABEL};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The drive's size in KiB (FAT12).
pub const SIZE_KIB: u32 = 1440;

/// A drive that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error("running {tool} (Debian package {package}): {source}")]
    Spawn {
        tool: &'static str,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed on {path}: {stderr}")]
    Failed {
        tool: &'static str,
        path: PathBuf,
        stderr: String,
    },
    #[error("{path} is larger than the drive ({SIZE_KIB} KiB)")]
    TooLarge { path: PathBuf },
    #[error("removing the old {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn run(
    tool: &'static str,
    package: &'static str,
    args: &[&std::ffi::OsStr],
    path: &Path,
) -> Result<(), DriveError> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|source| DriveError::Spawn {
            tool,
            package,
            source,
        })?;
    if !out.status.success() {
        return Err(DriveError::Failed {
            tool,
            path: path.into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Writes the drive image `out` holding `config` (a file already checked by the caller).
pub fn make(config: &Path, out: &Path) -> Result<(), DriveError> {
    let len = std::fs::metadata(config).map(|m| m.len()).unwrap_or(0);
    if len > u64::from(SIZE_KIB - 64) * 1024 {
        return Err(DriveError::TooLarge {
            path: config.into(),
        });
    }
    match std::fs::remove_file(out) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(DriveError::Remove {
                path: out.into(),
                source: e,
            })
        }
        _ => {}
    }
    let size = SIZE_KIB.to_string();
    run(
        "mkfs.fat",
        "dosfstools",
        &[
            "-C".as_ref(),
            "-n".as_ref(),
            DRIVE_LABEL.as_ref(),
            out.as_os_str(),
            size.as_ref(),
        ],
        out,
    )?;
    let target = format!("::/{DRIVE_FILE}");
    run(
        "mcopy",
        "mtools",
        &[
            "-i".as_ref(),
            out.as_os_str(),
            config.as_os_str(),
            target.as_ref(),
        ],
        out,
    )
}
