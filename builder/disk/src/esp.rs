//! The EFI System Partition: FAT32 made by `mkfs.fat` and filled with mtools, no mounts.
//!
//! `--invariant` fixes what mkfs.fat would take from the clock, `-i` sets a volume id derived
//! from the image name. mtools stamps new directories and files with `SOURCE_DATE_EPOCH` (when
//! `mcopy` is not asked to keep the host file's time with `-m`), and the tools run in UTC, so the
//! FAT timestamps are the epoch and the host files are never touched.

use crate::tempout::TempOut;
use crate::tools::{epoch_env, run, Tool};
use crate::DiskError;
use caisson_layout::partition::derive_guid;
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The FAT volume label.
pub const VOLUME_LABEL: &str = "ESP";
const WHAT: &str = "ESP";
const MTOOLS_FLAGS: [(&str, &str); 5] = [
    ("MTOOLS_SKIP_CHECK", "1"),
    ("MTOOLS_NO_VFAT", "0"),
    ("MTOOLS_LOWER_CASE", "0"),
    ("MTOOLS_NAME_NUMERIC_TAIL", "1"),
    ("MTOOLS_DEFAULT_CODEPAGE", "850"),
];
/// The smallest FAT32 that mkfs.fat makes with the minimum cluster count: below it firmware
/// would, by the FAT specification, take the filesystem for FAT16.
pub const MIN_SIZE: u64 = 33 * 1024 * 1024;

/// Makes a FAT32 ESP of `size` bytes at `out` holding `files`, each an (ESP path, host file)
/// pair such as `("EFI/BOOT/BOOTX64.EFI", "/usr/lib/systemd/boot/efi/systemd-bootx64.efi")`.
pub fn make_esp(
    files: &[(String, PathBuf)],
    out: &Path,
    size: u64,
    epoch: u64,
    image_name: &str,
) -> Result<(), DiskError> {
    if !size.is_multiple_of(1024) || size < MIN_SIZE {
        return Err(DiskError::BadSize {
            what: format!("ESP {}", out.display()),
            size,
            reason:
                "must be a whole number of KiB and at least 33 MiB (FAT32 needs 65525 clusters)",
        });
    }
    let (dirs, files) = plan(files)?;
    let tmp = TempOut::new(out)?;
    let env = {
        let mut env = epoch_env(epoch);
        // Environment variables override mtools.conf and ~/.mtoolsrc: pin the flags that
        // change what lands on the disk to their defaults.
        for (k, v) in MTOOLS_FLAGS {
            env.push((k, v.into()));
        }
        env
    };
    let args: Vec<OsString> = vec![
        "-F".into(),
        "32".into(),
        "--invariant".into(),
        "-i".into(),
        format!("{:08X}", volume_id(image_name)).into(),
        "-n".into(),
        VOLUME_LABEL.into(),
        "-C".into(),
        tmp.path().into(),
        (size / 1024).to_string().into(),
    ];
    run(Tool::MkfsFat, out, args, &env)?;
    let image: OsString = tmp.path().into();
    if !dirs.is_empty() {
        let mut args: Vec<OsString> = vec!["-i".into(), image.clone()];
        args.extend(dirs.iter().map(|d| OsString::from(format!("::/{d}"))));
        run(Tool::Mmd, out, args, &env)?;
    }
    for (dest, src) in &files {
        let args: Vec<OsString> = vec![
            "-i".into(),
            image.clone(),
            src.as_os_str().to_owned(),
            format!("::/{dest}").into(),
        ];
        run(Tool::Mcopy, src, args, &env)?;
    }
    tmp.commit()
}

/// The FAT volume id (serial number) of an image.
pub fn volume_id(image_name: &str) -> u32 {
    let b = derive_guid(image_name, "esp volume id").into_bytes();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

type Plan<'a> = (BTreeSet<String>, Vec<(String, &'a Path)>);

/// The directories to make (parents first) and the files to copy (sorted), after checking paths.
fn plan(files: &[(String, PathBuf)]) -> Result<Plan<'_>, DiskError> {
    let mut dirs = BTreeSet::new();
    let mut dests = BTreeSet::new();
    let mut copies = Vec::new();
    for (dest, src) in files {
        let dest = normalize(dest)?;
        if !src.is_file() {
            return Err(DiskError::BadPath {
                what: WHAT,
                path: src.display().to_string(),
                reason: "is not a regular file",
            });
        }
        let mut parent = dest.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            parent = p;
            dirs.insert(p.to_string());
        }
        if !dests.insert(dest.to_ascii_lowercase()) {
            return Err(DiskError::Duplicate {
                what: WHAT,
                path: dest,
            });
        }
        copies.push((dest, src.as_path()));
    }
    if let Some(clash) = dirs
        .iter()
        .find(|d| dests.contains(&d.to_ascii_lowercase()))
    {
        return Err(DiskError::BadPath {
            what: WHAT,
            path: clash.clone(),
            reason: "is both a file and a directory",
        });
    }
    copies.sort();
    Ok((dirs, copies))
}

/// `/EFI//BOOT/x` becomes `EFI/BOOT/x`; `.`, `..`, backslashes, colons, NUL, non-ASCII (whose
/// encoding would depend on the code page) and empty paths are refused.
fn normalize(path: &str) -> Result<String, DiskError> {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let reason = if parts.is_empty() {
        Some("is empty")
    } else if parts.iter().any(|c| *c == "." || *c == "..") {
        Some("contains . or ..")
    } else if !path.is_ascii() || path.contains(['\\', '\0', ':']) {
        Some("is not ASCII or contains a backslash, colon or NUL")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(DiskError::BadPath {
            what: WHAT,
            path: path.to_string(),
            reason,
        }),
        None => Ok(parts.join("/")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_makes_parents_first_and_refuses_clashes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        let files = vec![
            ("/loader/entries/a.conf".to_string(), f.clone()),
            ("EFI/BOOT/BOOTX64.EFI".to_string(), f.clone()),
        ];
        let (dirs, copies) = plan(&files).unwrap();
        let dirs: Vec<&str> = dirs.iter().map(String::as_str).collect();
        assert_eq!(dirs, ["EFI", "EFI/BOOT", "loader", "loader/entries"]);
        assert_eq!(copies[0].0, "EFI/BOOT/BOOTX64.EFI");

        let dup = vec![
            ("a/B".to_string(), f.clone()),
            ("a/b".to_string(), f.clone()),
        ];
        assert!(plan(&dup).unwrap_err().to_string().contains("given twice"));
        let clash = vec![("a".to_string(), f.clone()), ("a/b".to_string(), f.clone())];
        assert!(plan(&clash)
            .unwrap_err()
            .to_string()
            .contains("both a file"));
        let up = vec![("../x".to_string(), f.clone())];
        assert!(plan(&up).is_err());
        let accented = vec![("caf\u{e9}".to_string(), f.clone())];
        assert!(plan(&accented)
            .unwrap_err()
            .to_string()
            .contains("not ASCII"));
        let missing = vec![("x".to_string(), dir.path().join("nope"))];
        assert!(plan(&missing).unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn volume_id_is_derived() {
        assert_eq!(volume_id("host"), volume_id("host"));
        assert_ne!(volume_id("host"), volume_id("minimal"));
    }
}
