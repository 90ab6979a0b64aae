//! Copy-on-write qcow2 overlays, so a VM never changes the image it boots.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use crate::QemuError;

/// The format of a disk image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// The name QEMU and qemu-img use.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }

    /// Reads the first bytes of `path`: qcow2 images start with `QFI\xfb`, anything else is raw.
    pub fn detect(path: &Path) -> Result<DiskFormat, QemuError> {
        let mut file = File::open(path).map_err(QemuError::io("open disk image", path))?;
        let mut magic = [0u8; 4];
        let mut got = 0;
        while got < magic.len() {
            let n = file
                .read(&mut magic[got..])
                .map_err(QemuError::io("read disk image", path))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(Self::from_magic(&magic[..got]))
    }

    fn from_magic(magic: &[u8]) -> DiskFormat {
        if magic == b"QFI\xfb" {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        }
    }
}

/// Creates `overlay`, a qcow2 file whose backing file is `base`; writes go to the overlay only.
pub fn create_overlay(
    qemu_img: &Path,
    base: &Path,
    format: DiskFormat,
    overlay: &Path,
) -> Result<(), QemuError> {
    let base = base
        .canonicalize()
        .map_err(QemuError::io("find disk image", base))?;
    let mut cmd = Command::new(qemu_img);
    cmd.arg("create")
        .arg("-q")
        .args(["-f", "qcow2", "-b"])
        .arg(&base)
        .args(["-F", format.as_str()])
        .arg(overlay);
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| QemuError::Command {
        command: shown.clone(),
        message: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(QemuError::Command {
            command: shown,
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_qcow2_magic_and_defaults_to_raw() {
        assert_eq!(DiskFormat::from_magic(b"QFI\xfb"), DiskFormat::Qcow2);
        assert_eq!(DiskFormat::from_magic(b"\0\0\0\0"), DiskFormat::Raw);
        assert_eq!(DiskFormat::from_magic(b"QF"), DiskFormat::Raw);
    }

    #[test]
    fn detect_names_a_missing_file() {
        let err = DiskFormat::detect(Path::new("/nonexistent/disk.raw")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk.raw"), "{err}");
    }
}
