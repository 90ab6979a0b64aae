//! Applying a config to a root, once: validate and plan everything, stage every file beside its
//! target, then rename them all into place and record the config's sha256 on `state`.
//!
//! A config that fails validation writes nothing. A failure while staging removes what was
//! staged and the directories made for it. The record is written last, so a machine that loses
//! power half-way applies the whole config again on its next boot.

use crate::config::{Config, ConfigError};
use crate::plan::{plan, Checks, Kind, Plan};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// On `state` (below the root): the sha256 of the applied config, and where it came from.
pub const RECORD: &str = "/var/lib/caisson/provisioned";

/// Why a config was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The config is invalid: nothing was written.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Writing failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The config was applied; the record holds its hash.
    Applied { sha256: String, entries: usize },
    /// The machine was provisioned before (its record's hash); nothing was done.
    AlreadyProvisioned { sha256: String },
}

/// The sha256 of a config's bytes, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn under(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

/// The hash recorded under `root`, if the machine was provisioned.
pub fn recorded(root: &Path) -> Option<String> {
    let text = std::fs::read_to_string(under(root, RECORD)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("sha256 = "))
        .map(|v| v.trim_matches('"').to_string())
}

/// True once a first boot has looked for a config, whether it found one or not: later boots
/// do not look again (a machine is provisioned on its first boot only).
pub fn looked(root: &Path) -> bool {
    under(root, RECORD).exists()
}

/// Records that the first boot found no config, so later boots do not look again.
pub fn record_nothing(root: &Path) -> Result<(), ApplyError> {
    write_atomic(
        &under(root, RECORD),
        b"# the first boot found no machine config\nsource = \"none\"\n",
        0o644,
    )
}

/// Parses, validates and plans a config's bytes (what `caisson provision-config check` does).
/// Without `root`, what depends on the image (user names, the SSH server) is not checked.
pub fn check(bytes: &[u8], root: Option<&Path>, checks: &dyn Checks) -> Result<Plan, ConfigError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ConfigError::new("config", format!("not UTF-8 text: {e}")))?;
    let config = Config::parse(text)?;
    plan(&config, root, checks)
}

/// Applies the config `bytes` under `root`, unless the machine was provisioned before.
pub fn apply(
    bytes: &[u8],
    root: &Path,
    checks: &dyn Checks,
    source: &str,
) -> Result<Outcome, ApplyError> {
    if let Some(sha256) = recorded(root) {
        return Ok(Outcome::AlreadyProvisioned { sha256 });
    }
    let sha256 = sha256_hex(bytes);
    let plan = check(bytes, Some(root), checks)?;
    commit(&plan, root)?;
    let record = format!(
        "sha256 = \"{sha256}\"\nsource = {}\n",
        toml::Value::String(source.into())
    );
    write_atomic(&under(root, RECORD), record.as_bytes(), 0o644)?;
    Ok(Outcome::Applied {
        sha256,
        entries: plan.entries.len(),
    })
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ApplyError {
    let path = path.to_path_buf();
    move |source| ApplyError::Io { what, path, source }
}

/// Creates the missing ancestors of `dir` (0755), remembering which it made.
fn make_dirs(dir: &Path, made: &mut Vec<PathBuf>) -> Result<(), ApplyError> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    for d in missing.into_iter().rev() {
        std::fs::create_dir(d).map_err(io("creating", d))?;
        made.push(d.to_path_buf());
    }
    Ok(())
}

fn set_owner_mode(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<(), ApplyError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(io("reading", path))?;
    if let Some((uid, gid)) = owner.filter(|&(u, g)| meta.uid() != u || meta.gid() != g) {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io("chown", path))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", path))
}

fn temp_of(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.caisson-provision"))
}

fn stage_file(
    target: &Path,
    mode: u32,
    owner: Option<(u32, u32)>,
    bytes: &[u8],
) -> Result<PathBuf, ApplyError> {
    let tmp = temp_of(target);
    let _ = std::fs::remove_file(&tmp);
    // A secret is never readable by others, not even for a moment.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    f.write_all(bytes).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    set_owner_mode(&tmp, mode, owner)?;
    Ok(tmp)
}

struct Staged {
    made_dirs: Vec<PathBuf>,
    temps: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    fn undo(&self) {
        for (tmp, _) in &self.temps {
            let _ = std::fs::remove_file(tmp);
        }
        for d in self.made_dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn stage(plan: &Plan, root: &Path, s: &mut Staged) -> Result<(), ApplyError> {
    for e in &plan.entries {
        let target = under(root, &e.path);
        match &e.kind {
            Kind::Dir => {
                make_dirs(&target, &mut s.made_dirs)?;
                set_owner_mode(&target, e.mode, Some((e.uid, e.gid)))?;
            }
            Kind::File(bytes) => {
                if let Some(parent) = target.parent() {
                    make_dirs(parent, &mut s.made_dirs)?;
                }
                if target.is_dir() {
                    return Err(ApplyError::Config(ConfigError::new(
                        format!("{}.path", e.origin),
                        format!("{} is a directory on this machine", e.path),
                    )));
                }
                let tmp = stage_file(&target, e.mode, Some((e.uid, e.gid)), bytes)?;
                s.temps.push((tmp, target));
            }
        }
    }
    Ok(())
}

/// Stages every entry, then renames the files into place.
pub fn commit(plan: &Plan, root: &Path) -> Result<(), ApplyError> {
    let mut s = Staged {
        made_dirs: Vec::new(),
        temps: Vec::new(),
    };
    if let Err(e) = stage(plan, root, &mut s) {
        s.undo();
        return Err(e);
    }
    for (tmp, target) in &s.temps {
        std::fs::rename(tmp, target).map_err(io("renaming into place", target))?;
    }
    Ok(())
}

/// Writes a file through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ApplyError> {
    let mut made = Vec::new();
    if let Some(parent) = path.parent() {
        make_dirs(parent, &mut made)?;
    }
    let tmp = stage_file(path, mode, None, bytes)?;
    std::fs::rename(&tmp, path).map_err(io("renaming into place", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_boot_without_a_config_is_recorded_as_looked_at() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        assert!(!looked(r));
        record_nothing(r).unwrap();
        assert!(looked(r));
        assert_eq!(recorded(r), None, "no config hash");
        let text = std::fs::read_to_string(under(r, RECORD)).unwrap();
        assert!(toml::from_str::<toml::Table>(&text).is_ok(), "{text}");
    }
}
