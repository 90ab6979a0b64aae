//! cgroup v2: the init in its own leaf (`init`), services under `system/<name>` with their limits.
//! A service is stopped as a whole through its cgroup: every process in it (`cgroup.procs`) gets
//! SIGTERM, `cgroup.kill` SIGKILLs them all at once, and `cgroup.events` says when none is left.

use crate::service::Limits;
use crate::sys::Pid;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A cgroup file operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("cgroup: {action} {path}: {source}")]
pub struct CgroupError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn write(path: &Path, text: &str) -> Result<(), CgroupError> {
    std::fs::write(path, text).map_err(|source| CgroupError {
        action: "writing",
        path: path.to_path_buf(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError {
        action: "reading",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes to a file that must exist already (a cgroup's control files cannot be created).
fn write_existing(path: &Path, text: &str) -> Result<(), CgroupError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| CgroupError {
            action: "writing",
            path: path.to_path_buf(),
            source,
        })
}

fn is_not_found(e: &CgroupError) -> bool {
    e.source.kind() == io::ErrorKind::NotFound
}

/// The pids in a `cgroup.procs` text.
pub fn parse_procs(text: &str) -> Vec<Pid> {
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The `populated` key of a `cgroup.events` text (`None` when it is missing).
pub fn parse_populated(text: &str) -> Option<bool> {
    text.lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v.trim() != "0")
}

/// Whether any process is left in the cgroup `dir` or below it. A cgroup that does not exist holds
/// none.
pub fn populated(dir: &Path) -> Result<bool, CgroupError> {
    let path = dir.join("cgroup.events");
    match read(&path) {
        Ok(text) => parse_populated(&text).ok_or_else(|| CgroupError {
            action: "parsing",
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, "no `populated` line"),
        }),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path).map_err(|source| CgroupError {
        action: "creating",
        path: path.to_path_buf(),
        source,
    })
}

/// The cgroup hierarchy mounted at `root` (`/sys/fs/cgroup`).
#[derive(Debug, Clone)]
pub struct Cgroups {
    pub root: PathBuf,
}

impl Cgroups {
    /// Move the init into `init/` and enable the controllers for `system/`.
    pub fn setup(&self) -> Result<(), CgroupError> {
        let leaf = self.root.join("init");
        mkdir(&leaf)?;
        write(&leaf.join("cgroup.procs"), "0\n")?;
        let available =
            std::fs::read_to_string(self.root.join("cgroup.controllers")).unwrap_or_default();
        let wanted: Vec<String> = ["cpu", "memory", "pids", "io"]
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| format!("+{c}"))
            .collect();
        let control = wanted.join(" ");
        write(&self.root.join("cgroup.subtree_control"), &control)?;
        let system = self.root.join("system");
        mkdir(&system)?;
        write(&system.join("cgroup.subtree_control"), &control)?;
        Ok(())
    }

    /// The cgroup of the service `name`.
    pub fn service_dir(&self, name: &str) -> PathBuf {
        self.root.join("system").join(name)
    }

    /// The processes in the service's cgroup (none when it does not exist). A pid read here may
    /// have exited by the time it is signalled, and (after a full wrap of the pid space) belong to
    /// another process: systemd accepts that window when it stops a unit the same way; the final
    /// [`Cgroups::kill`] has none.
    pub fn procs(&self, name: &str) -> Result<Vec<Pid>, CgroupError> {
        match read(&self.service_dir(name).join("cgroup.procs")) {
            Ok(text) => Ok(parse_procs(&text)),
            Err(e) if is_not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Whether any process is left in the service's cgroup.
    pub fn populated(&self, name: &str) -> Result<bool, CgroupError> {
        populated(&self.service_dir(name))
    }

    /// SIGKILL every process in the service's cgroup and below, in one step (`cgroup.kill`,
    /// Linux 5.14 and later; on an older kernel the file is missing and this fails).
    pub fn kill(&self, name: &str) -> Result<(), CgroupError> {
        write_existing(&self.service_dir(name).join("cgroup.kill"), "1")
    }

    /// The cgroups at the top of the hierarchy that still hold a process, the init's own leaf
    /// aside (services are below `system`, containers wherever their runtime put them).
    pub fn populated_outside_init(&self) -> Result<Vec<String>, CgroupError> {
        let entries = std::fs::read_dir(&self.root).map_err(|source| CgroupError {
            action: "listing",
            path: self.root.clone(),
            source,
        })?;
        let mut busy = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && name != "init" && populated(&entry.path())? {
                busy.push(name);
            }
        }
        busy.sort();
        Ok(busy)
    }

    /// Create (or reuse) `system/<name>`, apply its limits, and return its `cgroup.procs`.
    pub fn service(&self, name: &str, limits: &Limits) -> Result<PathBuf, CgroupError> {
        let dir = self.service_dir(name);
        mkdir(&dir)?;
        if let Some(m) = limits.memory_max {
            write(&dir.join("memory.max"), &m.to_string())?;
        }
        if let Some(w) = limits.cpu_weight {
            write(&dir.join("cpu.weight"), &w.to_string())?;
        }
        if let Some(p) = limits.pids_max {
            write(&dir.join("pids.max"), &p.to_string())?;
        }
        Ok(dir.join("cgroup.procs"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_limits_and_controllers() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let cg = Cgroups {
            root: tmp.path().to_path_buf(),
        };
        cg.setup().unwrap();
        let ctl = std::fs::read_to_string(tmp.path().join("system/cgroup.subtree_control"));
        assert_eq!(ctl.unwrap(), "+cpu +memory +pids +io");
        let procs = cg
            .service(
                "containerd",
                &Limits {
                    memory_max: Some(1024),
                    cpu_weight: Some(50),
                    pids_max: None,
                },
            )
            .unwrap();
        assert_eq!(procs, tmp.path().join("system/containerd/cgroup.procs"));
        let mem = std::fs::read_to_string(tmp.path().join("system/containerd/memory.max"));
        assert_eq!(mem.unwrap(), "1024");
        assert!(!tmp.path().join("system/containerd/pids.max").exists());
    }

    #[test]
    fn procs_populated_and_kill() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = Cgroups {
            root: tmp.path().to_path_buf(),
        };
        // A cgroup that does not exist holds nothing.
        assert_eq!(cg.procs("web").unwrap(), Vec::<Pid>::new());
        assert!(!cg.populated("web").unwrap());
        let dir = tmp.path().join("system/web");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), "12\n345\n").unwrap();
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert_eq!(cg.procs("web").unwrap(), [12, 345]);
        assert!(cg.populated("web").unwrap());
        std::fs::write(dir.join("cgroup.events"), "frozen 0\n").unwrap();
        let e = cg.populated("web").unwrap_err().to_string();
        assert!(
            e.contains("cgroup.events") && e.contains("populated"),
            "{e}"
        );
        // A kernel without cgroup.kill: an error naming the file, and nothing created.
        let e = cg.kill("web").unwrap_err().to_string();
        assert!(e.contains("system/web/cgroup.kill"), "{e}");
        assert!(!dir.join("cgroup.kill").exists());
        std::fs::write(dir.join("cgroup.kill"), "").unwrap();
        cg.kill("web").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.kill")).unwrap(),
            "1"
        );
    }

    #[test]
    fn populated_outside_the_init_leaf() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = Cgroups {
            root: tmp.path().to_path_buf(),
        };
        for (dir, populated) in [("init", 1), ("system", 1), ("default", 0), ("k8s", 1)] {
            std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
            let events = format!("populated {populated}\n");
            std::fs::write(tmp.path().join(dir).join("cgroup.events"), events).unwrap();
        }
        std::fs::write(tmp.path().join("cgroup.procs"), "1\n").unwrap();
        assert_eq!(cg.populated_outside_init().unwrap(), ["k8s", "system"]);
    }
}
