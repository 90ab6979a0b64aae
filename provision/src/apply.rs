//! Applying a config to a root, once: validate and plan everything, stage every file beside its
//! target, then rename them all into place and record the config's sha256 on `state`.
//!
//! A config that fails validation writes nothing. A failure while staging removes what was
//! staged and the directories made for it. The record is written last, so a machine that loses
//! power half-way applies the whole config again on its next boot.

use crate::config::{Config, ConfigError};
use crate::plan::{plan, Checks, Kind, Plan};
use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Uid};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

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
    /// A path on the way to a provisioned path is a symbolic link: links are never followed,
    /// so nothing lands outside the root or anywhere but where the config says.
    #[error("{path}: {link} is a symbolic link (to {to}); provisioning does not follow links: write below a real directory")]
    Symlink {
        path: PathBuf,
        link: PathBuf,
        to: String,
    },
    /// Something on the way is not a directory.
    #[error("{path}: {on} is not a directory")]
    NotADirectory { path: PathBuf, on: PathBuf },
    /// The path to write is a directory.
    #[error("{0} is a directory")]
    IsADirectory(PathBuf),
    /// The path is not a plain absolute path beneath the root.
    #[error("{0} is not a plain path beneath the root")]
    NotBeneath(PathBuf),
    /// A file provisioning reads from the root (`/etc/passwd`, `/etc/group`, the record) is a
    /// symbolic link or is reached through one: it is not followed, so nothing outside the
    /// root is read in its place.
    #[error("{path}: {link} is a symbolic link (to {to}); provisioning reads only the image's own file and never follows a link: make it a plain file")]
    ReadThroughLink {
        path: PathBuf,
        link: PathBuf,
        to: String,
    },
    /// A file read from the root is larger than provisioning reads.
    #[error("{path} is larger than {limit} bytes, the most provisioning reads of it")]
    TooLarge { path: PathBuf, limit: u64 },
    /// A file read from the root is not a regular file (a FIFO, a device, a directory).
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
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

/// The most of the record read back.
const RECORD_LIMIT: u64 = 64 * 1024;

/// The text of `abs` beneath `root`, read without following a symbolic link anywhere on the
/// way; `None` when it is missing, a link, too large or unreadable.
fn read_beneath(root: &Path, abs: &str) -> Option<String> {
    let bytes = read_file_beneath(root, abs, RECORD_LIMIT).ok()??;
    String::from_utf8(bytes).ok()
}

/// The bytes of the file `abs` beneath `root`, at most `limit` of them, opened the way
/// provisioned files are written: one component at a time from the root ([`walk`]), no
/// symbolic link followed, the file itself included. `None` when it or a directory on its way
/// is missing; a link is [`ApplyError::ReadThroughLink`], naming it.
pub(crate) fn read_file_beneath(
    root: &Path,
    abs: &str,
    limit: u64,
) -> Result<Option<Vec<u8>>, ApplyError> {
    let (dir, name, target) = split(root, abs)?;
    let root_fd = open_root(root)?;
    let parent = match walk(root, &root_fd, dir, &target, None) {
        Ok(fd) => fd,
        Err(e) if is_missing(&e) => return Ok(None),
        Err(e) => return Err(as_read(e)),
    };
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(&parent, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(Errno::LOOP) => return Err(as_read(symlink(&parent, name, &target, &target))),
        Err(e) => return Err(sys("opening", &target)(e)),
    };
    read_regular(fd, &target, limit).map(Some)
}

fn is_missing(e: &ApplyError) -> bool {
    matches!(e, ApplyError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// A link met while reading is reported as such, not with a writer's advice.
fn as_read(e: ApplyError) -> ApplyError {
    match e {
        ApplyError::Symlink { path, link, to } => ApplyError::ReadThroughLink { path, link, to },
        other => other,
    }
}

/// At most `limit` bytes of an open regular file.
fn read_regular(fd: OwnedFd, path: &Path, limit: u64) -> Result<Vec<u8>, ApplyError> {
    let st = rustix::fs::fstat(&fd).map_err(sys("reading", path))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(ApplyError::NotAFile(path.to_path_buf()));
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io("reading", path))?;
    if bytes.len() as u64 > limit {
        return Err(ApplyError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(bytes)
}

/// The hash recorded under `root`, if the machine was provisioned.
pub fn recorded(root: &Path) -> Option<String> {
    let text = read_beneath(root, RECORD)?;
    text.lines()
        .find_map(|l| l.strip_prefix("sha256 = "))
        .map(|v| v.trim_matches('"').to_string())
}

/// True once a first boot has looked for a config, whether it found one or not: later boots
/// do not look again (a machine is provisioned on its first boot only).
pub fn looked(root: &Path) -> bool {
    read_beneath(root, RECORD).is_some()
}

/// Records that the first boot found no config, so later boots do not look again.
pub fn record_nothing(root: &Path) -> Result<(), ApplyError> {
    write_beneath(
        root,
        RECORD,
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
    let record = format!(
        "sha256 = \"{sha256}\"\nsource = {}\n",
        toml::Value::String(source.into())
    );
    // The record is staged with the files (a link on its way refuses the whole config) and
    // renamed into place last.
    commit_with(&plan, root, Some(record.as_bytes()))?;
    Ok(Outcome::Applied {
        sha256,
        entries: plan.entries.len(),
    })
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ApplyError {
    let path = path.to_path_buf();
    move |source| ApplyError::Io { what, path, source }
}

fn sys(what: &'static str, path: &Path) -> impl FnOnce(Errno) -> ApplyError {
    let path = path.to_path_buf();
    move |e| ApplyError::Io {
        what,
        path,
        source: e.into(),
    }
}

/// The components of an absolute machine path, each a plain name.
fn names<'a>(root: &Path, abs: &'a str) -> Result<Vec<&'a OsStr>, ApplyError> {
    let mut out = Vec::new();
    for c in Path::new(abs).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n),
            _ => return Err(ApplyError::NotBeneath(under(root, abs))),
        }
    }
    Ok(out)
}

fn open_root(root: &Path) -> Result<OwnedFd, ApplyError> {
    rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys("opening", root))
}

fn open_dir_at(dir: &OwnedFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Why `name` in `dir` could not be opened as a directory: a symbolic link, something else
/// than a directory, or an I/O error.
fn refusal(dir: &OwnedFd, name: &OsStr, at: &Path, target: &Path, e: Errno) -> ApplyError {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
            symlink(dir, name, at, target)
        }
        Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {
            ApplyError::NotADirectory {
                path: target.to_path_buf(),
                on: at.to_path_buf(),
            }
        }
        _ => sys("opening", at)(e),
    }
}

fn symlink(dir: &OwnedFd, name: &OsStr, at: &Path, target: &Path) -> ApplyError {
    let to = rustix::fs::readlinkat(dir, name, Vec::new())
        .map(|t| String::from_utf8_lossy(t.as_bytes()).into_owned())
        .unwrap_or_else(|_| "?".into());
    ApplyError::Symlink {
        path: target.to_path_buf(),
        link: at.to_path_buf(),
        to,
    }
}

/// `abs` as its directory and its name, and where it is beneath the root (for messages).
fn split<'a>(root: &Path, abs: &'a str) -> Result<(&'a str, &'a OsStr, PathBuf), ApplyError> {
    let target = under(root, abs);
    let parts = Path::new(abs)
        .parent()
        .and_then(Path::to_str)
        .zip(Path::new(abs).file_name());
    match parts {
        Some((dir, name)) => Ok((dir, name, target)),
        None => Err(ApplyError::NotBeneath(target)),
    }
}

/// A directory made while staging, removed again if staging fails.
struct Made {
    parent: OwnedFd,
    name: OsString,
}

/// Opens the directory `abs` beneath the root one component at a time, never following a
/// symbolic link, and makes what is missing (0755) when `made` is given. `target` is the
/// provisioned path, for messages.
fn walk(
    root: &Path,
    root_fd: &OwnedFd,
    abs: &str,
    target: &Path,
    mut made: Option<&mut Vec<Made>>,
) -> Result<OwnedFd, ApplyError> {
    let mut cur = root_fd.try_clone().map_err(io("opening", root))?;
    let mut at = root.to_path_buf();
    for name in names(root, abs)? {
        at.push(name);
        let next = match (open_dir_at(&cur, name), made.as_deref_mut()) {
            (Ok(fd), _) => fd,
            (Err(Errno::NOENT), Some(made)) => {
                rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(0o755))
                    .map_err(sys("creating", &at))?;
                made.push(Made {
                    parent: cur.try_clone().map_err(io("opening", &at))?,
                    name: name.to_os_string(),
                });
                open_dir_at(&cur, name).map_err(|e| refusal(&cur, name, &at, target, e))?
            }
            (Err(e), _) => return Err(refusal(&cur, name, &at, target, e)),
        };
        cur = next;
    }
    Ok(cur)
}

/// Sets owner and mode through the open file, never by path.
fn set_owner_mode(
    fd: &OwnedFd,
    path: &Path,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), ApplyError> {
    let st = rustix::fs::fstat(fd).map_err(sys("reading", path))?;
    if let Some((uid, gid)) = owner.filter(|&(u, g)| st.st_uid != u || st.st_gid != g) {
        if uid == u32::MAX || gid == u32::MAX {
            return Err(ApplyError::Io {
                what: "chown",
                path: path.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        rustix::fs::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(sys("chown", path))?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(sys("chmod", path))
}

/// A file written beside its target, renamed into place once everything is staged.
struct Temp {
    parent: OwnedFd,
    tmp: OsString,
    name: OsString,
    path: PathBuf,
}

/// Stages `abs` beneath the root: its directory is walked (and made) without following links,
/// the target must not be a symbolic link or a directory, and the file is written beside it.
fn stage_file(
    root: &Path,
    root_fd: &OwnedFd,
    abs: &str,
    mode: u32,
    owner: Option<(u32, u32)>,
    bytes: &[u8],
    made: &mut Vec<Made>,
) -> Result<Temp, ApplyError> {
    let (dir, name, target) = split(root, abs)?;
    let parent = walk(root, root_fd, dir, &target, Some(made))?;
    match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => return Err(symlink(&parent, name, &target, &target)),
            FileType::Directory => return Err(ApplyError::IsADirectory(target)),
            _ => {}
        },
        Err(Errno::NOENT) => {}
        Err(e) => return Err(sys("reading", &target)(e)),
    }
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(".caisson-provision");
    let tmp_path = target.with_file_name(&tmp);
    let _ = rustix::fs::unlinkat(&parent, &tmp, AtFlags::empty());
    // A secret is never readable by others, not even for a moment.
    let fd = rustix::fs::openat(
        &parent,
        &tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(sys("creating", &tmp_path))?;
    let staged = Temp {
        parent,
        tmp,
        name: name.to_os_string(),
        path: target,
    };
    let mut f = std::fs::File::from(fd);
    let written = f
        .write_all(bytes)
        .map_err(io("writing", &tmp_path))
        .and_then(|()| f.sync_all().map_err(io("syncing", &tmp_path)))
        .and_then(|()| set_owner_mode(&OwnedFd::from(f), &tmp_path, mode, owner));
    if let Err(e) = written {
        staged.remove();
        return Err(e);
    }
    Ok(staged)
}

impl Temp {
    fn remove(&self) {
        let _ = rustix::fs::unlinkat(&self.parent, &self.tmp, AtFlags::empty());
    }

    fn rename(&self) -> Result<(), ApplyError> {
        rustix::fs::renameat(&self.parent, &self.tmp, &self.parent, &self.name)
            .map_err(sys("renaming into place", &self.path))
    }
}

#[derive(Default)]
struct Staged {
    made_dirs: Vec<Made>,
    temps: Vec<Temp>,
}

impl Staged {
    fn undo(&self) {
        for t in &self.temps {
            t.remove();
        }
        for d in self.made_dirs.iter().rev() {
            let _ = rustix::fs::unlinkat(&d.parent, &d.name, AtFlags::REMOVEDIR);
        }
    }
}

fn stage(plan: &Plan, root: &Path, s: &mut Staged) -> Result<(), ApplyError> {
    let root_fd = open_root(root)?;
    for e in &plan.entries {
        let target = under(root, &e.path);
        match &e.kind {
            Kind::Dir => {
                let fd = walk(root, &root_fd, &e.path, &target, Some(&mut s.made_dirs))?;
                set_owner_mode(&fd, &target, e.mode, Some((e.uid, e.gid)))?;
            }
            Kind::File(bytes) => {
                let staged = stage_file(
                    root,
                    &root_fd,
                    &e.path,
                    e.mode,
                    Some((e.uid, e.gid)),
                    bytes,
                    &mut s.made_dirs,
                )
                .map_err(|err| match err {
                    ApplyError::IsADirectory(_) => ApplyError::Config(ConfigError::new(
                        format!("{}.path", e.origin),
                        format!("{} is a directory on this machine", e.path),
                    )),
                    other => other,
                })?;
                s.temps.push(staged);
            }
        }
    }
    Ok(())
}

/// Stages every entry, then renames the files into place.
pub fn commit(plan: &Plan, root: &Path) -> Result<(), ApplyError> {
    commit_with(plan, root, None)
}

fn commit_with(plan: &Plan, root: &Path, record: Option<&[u8]>) -> Result<(), ApplyError> {
    let mut s = Staged::default();
    let staged = stage(plan, root, &mut s).and_then(|()| {
        let Some(bytes) = record else { return Ok(()) };
        let root_fd = open_root(root)?;
        let t = stage_file(root, &root_fd, RECORD, 0o644, None, bytes, &mut s.made_dirs)?;
        s.temps.push(t);
        Ok(())
    });
    if let Err(e) = staged {
        s.undo();
        return Err(e);
    }
    for t in &s.temps {
        t.rename()?;
    }
    Ok(())
}

/// Writes `abs` beneath `root` through a temporary sibling and a rename.
fn write_beneath(root: &Path, abs: &str, bytes: &[u8], mode: u32) -> Result<(), ApplyError> {
    let root_fd = open_root(root)?;
    let mut made = Vec::new();
    stage_file(root, &root_fd, abs, mode, None, bytes, &mut made)?.rename()
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
