//! The `state` filesystem: ext4 made by `mkfs.ext4 -d`, reproducible and root-owned without
//! privileges.
//!
//! `mkfs.ext4` takes its UUID and directory hash seed from the image name, its own timestamps
//! from `E2FSPROGS_FAKE_TIME`, and `-T default` so the block and inode sizes do not depend on the
//! partition size. `-d` copies the owners and times of the content files, which belong to the
//! user running the build: a `debugfs` script then sets every copied inode to uid 0, gid 0 and
//! the epoch, so the result depends on the content only.

use crate::tempout::TempOut;
use crate::tools::{epoch_env, run, run_output, Tool};
use crate::DiskError;
use caisson_layout::partition::{derive_guid, LABEL_STATE};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::path::Path;

/// Makes an ext4 filesystem of `size` bytes at `out` holding `content_dir`, if given.
pub fn make_state_fs(
    content_dir: Option<&Path>,
    out: &Path,
    size: u64,
    epoch: u64,
    image_name: &str,
) -> Result<(), DiskError> {
    if !size.is_multiple_of(4096) || size < 1024 * 1024 {
        return Err(DiskError::BadSize {
            what: format!("state filesystem {}", out.display()),
            size,
            reason: "must be a whole number of 4 KiB blocks and at least 1 MiB",
        });
    }
    let script = match content_dir {
        Some(dir) => Some(fixup_script(dir, epoch)?),
        None => None,
    };
    let tmp = TempOut::new(out)?;
    File::create(tmp.path())
        .and_then(|f| f.set_len(size))
        .map_err(DiskError::io("creating", out))?;
    let uuid = derive_guid(image_name, "state ext4");
    let hash_seed = derive_guid(image_name, "state ext4 hash seed");
    let mut args: Vec<OsString> = [
        "-q".to_string(),
        "-F".into(),
        "-t".into(),
        "ext4".into(),
        "-T".into(),
        "default".into(),
        "-L".into(),
        LABEL_STATE.into(),
        "-U".into(),
        uuid.to_string(),
        "-E".into(),
        format!("hash_seed={hash_seed},root_owner=0:0"),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    if let Some(dir) = content_dir {
        args.extend(["-d".into(), dir.as_os_str().to_owned()]);
    }
    args.push(tmp.path().as_os_str().to_owned());
    let env = epoch_env(epoch);
    run(Tool::MkfsExt4, out, args, &env)?;
    if let Some(script) = script {
        apply_debugfs(tmp.path(), out, &script, &env)?;
    }
    tmp.commit()
}

/// Runs the `debugfs` script; debugfs exits 0 even when a command fails, so any stderr line but
/// its version banner is an error.
fn apply_debugfs(
    image: &Path,
    out: &Path,
    script: &str,
    env: &[(&str, String)],
) -> Result<(), DiskError> {
    let mut script_path = image.as_os_str().to_owned();
    script_path.push(".debugfs");
    let script_path = std::path::PathBuf::from(script_path);
    std::fs::write(&script_path, script).map_err(DiskError::io("writing", &script_path))?;
    let args = [
        "-w".as_ref(),
        "-f".as_ref(),
        script_path.as_os_str(),
        image.as_os_str(),
    ];
    let result = run_output(Tool::Debugfs, out, args, env);
    let _ = std::fs::remove_file(&script_path);
    let output = result?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(DiskError::ToolFailed {
            program: Tool::Debugfs.program(),
            target: out.to_path_buf(),
            status: output.status,
            stderr: errors.join("\n"),
        })
    }
}

/// The debugfs commands that give `/` and every path under `dir` owner 0:0 and the epoch as
/// its times, in sorted order.
fn fixup_script(dir: &Path, epoch: u64) -> Result<String, DiskError> {
    let mut paths = vec!["/".to_string()];
    walk(dir, "", &mut paths)?;
    let mut script = String::new();
    for p in &paths {
        for field in ["uid", "gid"] {
            let _ = writeln!(script, "sif \"{p}\" {field} 0");
        }
        for field in ["atime", "mtime", "ctime", "crtime"] {
            let _ = writeln!(script, "sif \"{p}\" {field} {epoch}");
        }
    }
    Ok(script)
}

fn walk(dir: &Path, prefix: &str, paths: &mut Vec<String>) -> Result<(), DiskError> {
    let read_err = DiskError::io("reading", dir);
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(&read_err)?
        .collect::<Result<_, _>>()
        .map_err(&read_err)?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let name = name
            .to_str()
            .filter(|n| !n.contains(['"', '\n', '\\']))
            .ok_or_else(|| DiskError::BadPath {
                what: "state content",
                path: e.path().display().to_string(),
                reason: "is not UTF-8 or contains a quote, backslash or newline",
            })?;
        let path = format!("{prefix}/{name}");
        paths.push(path.clone());
        if e.file_type().map_err(&read_err)?.is_dir() {
            walk(&e.path(), &path, paths)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_covers_every_path_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("lib/caisson")).unwrap();
        std::fs::write(dir.path().join("lib/caisson/b"), "").unwrap();
        std::fs::write(dir.path().join("a"), "").unwrap();
        let s = fixup_script(dir.path(), 42).unwrap();
        let paths: Vec<&str> = s
            .lines()
            .filter(|l| l.ends_with(" uid 0"))
            .map(|l| l.split('"').nth(1).unwrap())
            .collect();
        assert_eq!(paths, ["/", "/a", "/lib", "/lib/caisson", "/lib/caisson/b"]);
        assert!(s.contains("sif \"/a\" crtime 42\n"));
    }

    #[test]
    fn refuses_names_debugfs_cannot_quote() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a\"b"), "").unwrap();
        assert!(fixup_script(dir.path(), 0).is_err());
    }
}
