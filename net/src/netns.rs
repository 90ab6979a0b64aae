//! Named network namespaces, made the way `ip netns add` makes them: a thread of our own
//! unshares its network namespace and bind-mounts `/proc/thread-self/ns/net` onto a file (for
//! example `/run/caisson/netns/<instance>`), which keeps the namespace alive after the thread
//! is gone and lets anyone (runc, `ip netns exec`, a restarted agent) enter it by path.
//!
//! Code runs inside a namespace in a dedicated thread that `setns`es into it, so the caller's
//! threads (and the tokio runtime's) never change namespace. Sockets opened there stay in that
//! namespace wherever they are used later, which is how [`crate::link`] gets a netlink socket
//! into a container's namespace and how tests open listeners in one.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::statfs::{statfs, FsType};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `NSFS_MAGIC` from `<linux/magic.h>`: the filesystem type of a namespace file.
const NSFS_MAGIC: FsType = FsType(0x6e73_6673);

/// What can go wrong with a named network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A system call on the namespace failed (needs root: CAP_SYS_ADMIN).
    #[error("network namespace {path}: {op} failed: {source} (this needs root / CAP_SYS_ADMIN)")]
    Sys {
        path: PathBuf,
        op: &'static str,
        source: nix::Error,
    },
    /// The namespace file or its directory could not be made, opened or removed.
    #[error("network namespace file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The path exists but no namespace is mounted on it.
    #[error("{path} is not a network namespace (no nsfs mount on it)")]
    NotNetns { path: PathBuf },
    /// `create` found a namespace already mounted there.
    #[error("network namespace {path} already exists")]
    Exists { path: PathBuf },
    /// The dedicated thread could not be started.
    #[error("could not start a thread for network namespace {path}: {source}")]
    Thread { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> NetnsError + '_ {
    move |source| NetnsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sys_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(nix::Error) -> NetnsError + 'a {
    move |source| NetnsError::Sys {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// An open named network namespace. Dropping it closes the handle; the namespace lives on
/// until [`NetNs::delete`].
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    file: File,
}

impl NetNs {
    /// Makes a new network namespace mounted on `path` (creating its directory); fails with
    /// [`NetnsError::Exists`] if one is already there.
    pub fn create(path: impl Into<PathBuf>) -> Result<NetNs, NetnsError> {
        let path = path.into();
        if is_netns(&path)? {
            return Err(NetnsError::Exists { path });
        }
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
            share_dir(dir)?;
        }
        // An empty file left by a crash between this step and the mount is reused.
        let created = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o444)
            .open(&path);
        drop(created.map_err(io_err(&path))?);
        if let Err(e) = bind_new_netns(&path) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        log::debug!("netns: created {}", path.display());
        Self::open(path)
    }

    /// Opens the namespace mounted on `path`.
    pub fn open(path: impl Into<PathBuf>) -> Result<NetNs, NetnsError> {
        let path = path.into();
        if !is_netns(&path)? {
            return Err(NetnsError::NotNetns { path });
        }
        let file = File::open(&path).map_err(io_err(&path))?;
        Ok(NetNs { path, file })
    }

    /// Opens the namespace on `path`, making it first if there is none (an agent restart
    /// finds its instances' namespaces again).
    pub fn ensure(path: impl Into<PathBuf>) -> Result<NetNs, NetnsError> {
        let path = path.into();
        if is_netns(&path)? {
            Self::open(path)
        } else {
            Self::create(path)
        }
    }

    /// The file the namespace is mounted on (what runc's `network` namespace path takes).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in a thread of its own inside this namespace and returns what it returns.
    /// A panic in `f` is passed on to the caller.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("caisson-netns".into())
                .spawn_scoped(scope, || {
                    setns(&self.file, CloneFlags::CLONE_NEWNET)
                        .map_err(sys_err(&self.path, "setns"))?;
                    Ok(f())
                })
                .map_err(|source| NetnsError::Thread {
                    path: self.path.clone(),
                    source,
                })?;
            match thread.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Unmounts the namespace on `path` and removes the file. The namespace itself goes when
    /// the last process and socket in it are gone. Deleting a path that does not exist is fine.
    pub fn delete(path: impl AsRef<Path>) -> Result<(), NetnsError> {
        let path = path.as_ref();
        if !path.exists() {
            return Ok(());
        }
        if is_netns(path)? {
            umount2(path, MntFlags::MNT_DETACH).map_err(sys_err(path, "umount"))?;
        }
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path)(e)),
        }
        log::debug!("netns: deleted {}", path.display());
        Ok(())
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Makes `dir` a mount point with shared propagation, as `ip netns add` does with
/// `/run/netns`: namespace mounts made in it later show up in mount namespaces copied from
/// ours (runc's, a service's private ones), and unmounting one there unmounts it everywhere, so
/// a deleted namespace is not kept alive by a copy. Done once per directory; [`NetNs::create`]
/// calls it.
pub fn share_dir(dir: &Path) -> Result<(), NetnsError> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // Two threads must not both bind the directory onto itself.
    let _guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    match mount(None::<&str>, dir, None::<&str>, shared, None::<&str>) {
        Ok(()) => return Ok(()),
        Err(nix::Error::EINVAL) => {} // not a mount point yet
        Err(e) => return Err(sys_err(dir, "make shared")(e)),
    }
    let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(Some(dir), dir, None::<&str>, bind, None::<&str>).map_err(sys_err(dir, "bind mount"))?;
    mount(None::<&str>, dir, None::<&str>, shared, None::<&str>)
        .map_err(sys_err(dir, "make shared"))
}

/// Whether a namespace is mounted on `path` (false if the path does not exist).
pub fn is_netns(path: &Path) -> Result<bool, NetnsError> {
    match statfs(path) {
        Ok(fs) => Ok(fs.filesystem_type() == NSFS_MAGIC),
        Err(nix::Error::ENOENT) => Ok(false),
        Err(e) => Err(sys_err(path, "statfs")(e)),
    }
}

/// In a thread of its own: a new network namespace, bind-mounted onto `path`.
fn bind_new_netns(path: &Path) -> Result<(), NetnsError> {
    let thread = std::thread::Builder::new()
        .name("caisson-netns-new".into())
        .spawn({
            let path = path.to_path_buf();
            move || -> Result<(), NetnsError> {
                unshare(CloneFlags::CLONE_NEWNET).map_err(sys_err(&path, "unshare"))?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(sys_err(&path, "bind mount"))
            }
        })
        .map_err(|source| NetnsError::Thread {
            path: path.to_path_buf(),
            source,
        })?;
    match thread.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_file_is_not_a_netns() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x");
        fs::write(&file, b"").unwrap();
        assert!(!is_netns(&file).unwrap());
        assert!(!is_netns(&dir.path().join("missing")).unwrap());
        let err = NetNs::open(&file).unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err}");
        assert!(err.to_string().contains(&*file.to_string_lossy()));
    }

    #[test]
    fn deleting_a_missing_path_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        NetNs::delete(dir.path().join("gone")).unwrap();
    }
}
