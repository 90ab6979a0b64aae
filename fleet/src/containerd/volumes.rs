//! A unit's storage on the machine (see `crate::volumes` for the fleet's side): the volume
//! directories `<volume_root>/<unit>/<name>` made before its container is created, as Docker
//! makes a named volume on first use (mode 0755, owned by root, or by the image's numeric user
//! when it runs as another, so a non-root server can write its data); a directory that exists
//! is used as it is (its owner and content are the data's). Unlike Docker, the image's content
//! at the volume's path is not copied in: a new volume starts empty.
//!
//! Bind sources are checked again on the machine, after symbolic links: a provisioned file must
//! exist and resolve to a path the unit file rules allow (`crate::unit::volumes`).

use super::spec;
use super::ContainerdError;
use crate::containerd::archive::RunConfig;
use crate::unit::UnitSpec;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Where volumes live on a Caisson machine: on the state partition, which updates never touch.
pub const DEFAULT_ROOT: &str = "/var/lib/caisson/volumes";

fn io(path: &Path, e: std::io::Error) -> ContainerdError {
    ContainerdError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Makes the unit's volume directories that do not exist yet (and the root and the unit's
/// directory, 0755 root), and checks its bind sources. The image's user owns a new volume.
pub fn prepare(root: &Path, spec: &UnitSpec, image: &RunConfig) -> Result<(), ContainerdError> {
    for b in &spec.binds {
        check_source(&spec.name, &b.source)?;
    }
    if spec.volumes.is_empty() {
        return Ok(());
    }
    let (uid, gid) = spec::user(spec, image)?;
    let unit_dir = root.join(&spec.name);
    make_dir(root)?;
    make_dir(&unit_dir)?;
    for v in &spec.volumes {
        let dir = spec::volume_dir(root, &spec.name, &v.name);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => {
                return Err(ContainerdError::Io {
                    path: dir.display().to_string(),
                    message: format!(
                        "volume {} of unit {} is not a directory; move it away",
                        v.name, spec.name
                    ),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&dir, e)),
        }
        make_dir(&dir)?;
        if (uid, gid) != (0, 0) {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| io(&dir, e))?;
        }
        log::info!(
            "unit {}: made volume {} at {} (owner {uid}:{gid})",
            spec.name,
            v.name,
            dir.display()
        );
    }
    Ok(())
}

/// Makes `dir` (and its parents) with mode 0755, whatever the umask.
fn make_dir(dir: &Path) -> Result<(), ContainerdError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| io(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| io(dir, e))
}

/// A bind's source exists and, symbolic links followed, is still a path binds may come from.
fn check_source(unit: &str, source: &str) -> Result<(), ContainerdError> {
    let path = Path::new(source);
    let real = std::fs::canonicalize(path).map_err(|e| ContainerdError::Io {
        path: source.to_string(),
        message: format!(
            "bind source of unit {unit}: {e} (provision the file on this machine before starting the unit)"
        ),
    })?;
    let real = real.display().to_string();
    crate::unit::volumes::check_bind_source(&real).map_err(|why| ContainerdError::Io {
        path: source.to_string(),
        message: format!("bind source of unit {unit} resolves to {real}: {why}"),
    })?;
    Ok(())
}

/// Deletes `<root>/<unit>` and everything in it; true when it existed.
pub fn delete(root: &Path, unit: &str) -> Result<bool, ContainerdError> {
    if !crate::unit::valid_name(unit) {
        return Ok(false);
    }
    let dir = root.join(unit);
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(&dir, e)),
        // remove_dir_all does not follow symbolic links inside the volume.
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&dir)
            .map(|()| true)
            .map_err(|e| io(&dir, e)),
        Ok(_) => std::fs::remove_file(&dir)
            .map(|()| true)
            .map_err(|e| io(&dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn unit(body: &str) -> UnitSpec {
        UnitSpec::parse("db", &format!("{body}\n[image]\npath = \"/i.tar\"")).unwrap()
    }

    #[test]
    fn volumes_are_made_once_and_kept() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().join("volumes");
        let u = unit("volumes = [{ name = \"data\", path = \"/data\" }]");
        prepare(&r, &u, &RunConfig::default()).unwrap();
        let dir = r.join("db/data");
        let m = std::fs::metadata(&dir).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o777, 0o755);
        // Data in it survives a second start.
        std::fs::write(dir.join("f"), "x").unwrap();
        prepare(&r, &u, &RunConfig::default()).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("f")).unwrap(), "x");
        // A file where the volume should be: a clear error.
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, "").unwrap();
        let e = prepare(&r, &u, &RunConfig::default()).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        // Deleted only on purpose; an odd name deletes nothing.
        assert!(!delete(&r, "..").unwrap());
        assert!(delete(&r, "db").unwrap());
        assert!(!r.join("db").exists() && r.exists());
        assert!(!delete(&r, "db").unwrap());
    }

    #[test]
    fn a_non_root_image_owns_its_new_volumes() {
        let uid = std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(1);
        let root = tempfile::tempdir().unwrap();
        let u = unit("volumes = [{ name = \"data\", path = \"/data\" }]");
        let image = RunConfig {
            user: Some("1000:1001".into()),
            ..RunConfig::default()
        };
        let r = prepare(root.path(), &u, &image);
        if uid != 0 {
            // chown needs root: the error names the directory.
            let e = r.unwrap_err().to_string();
            assert!(e.contains("db/data"), "{e}");
            return;
        }
        r.unwrap();
        let m = std::fs::metadata(root.path().join("db/data")).unwrap();
        assert_eq!((m.uid(), m.gid()), (1000, 1001));
    }

    #[test]
    fn bind_sources_must_exist_and_stay_under_etc_caisson() {
        let e = prepare(
            Path::new("/nonexistent"),
            &unit("binds = [{ source = \"/etc/caisson/no/such/file\", path = \"/c\" }]"),
            &RunConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/etc/caisson/no/such/file") && e.contains("provision"),
            "{e}"
        );
        assert!(check_source("db", "/etc/caisson/../../proc/self/exe").is_err());
    }
}
