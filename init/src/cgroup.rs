//! cgroup v2: the init in its own leaf (`init`), services under `system/<name>` with their limits.

use crate::service::Limits;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    /// True once the controllers are enabled for `system/`; shared by the clones.
    controllers: Arc<Mutex<bool>>,
}

impl Cgroups {
    pub fn new(root: PathBuf) -> Cgroups {
        Cgroups {
            root,
            controllers: Arc::default(),
        }
    }

    /// Move the init into `init/` and create `system/`. The controllers are enabled apart
    /// ([`Self::enable_controllers`]): under emulation that write takes 10–25 ms, and the first
    /// services need no controller unless they have limits.
    pub fn setup(&self) -> Result<(), CgroupError> {
        let leaf = self.root.join("init");
        mkdir(&leaf)?;
        write(&leaf.join("cgroup.procs"), "0\n")?;
        mkdir(&self.root.join("system"))
    }

    /// Enable cpu, memory, pids and io (those the kernel has) for `system/` and its services;
    /// done once, later calls return at once. Services already started gain them too.
    pub fn enable_controllers(&self) -> Result<(), CgroupError> {
        let mut done = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        if *done {
            return Ok(());
        }
        let available =
            std::fs::read_to_string(self.root.join("cgroup.controllers")).unwrap_or_default();
        let wanted: Vec<String> = ["cpu", "memory", "pids", "io"]
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| format!("+{c}"))
            .collect();
        let control = wanted.join(" ");
        write(&self.root.join("cgroup.subtree_control"), &control)?;
        write(&self.root.join("system/cgroup.subtree_control"), &control)?;
        *done = true;
        Ok(())
    }

    /// Create (or reuse) `system/<name>`, apply its limits, and return its `cgroup.procs`.
    pub fn service(&self, name: &str, limits: &Limits) -> Result<PathBuf, CgroupError> {
        let dir = self.root.join("system").join(name);
        mkdir(&dir)?;
        if *limits != Limits::default() {
            self.enable_controllers()?;
        }
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
    fn controllers_come_with_the_first_limits_or_when_asked() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let cg = Cgroups::new(tmp.path().to_path_buf());
        cg.setup().unwrap();
        let init = std::fs::read_to_string(tmp.path().join("init/cgroup.procs"));
        assert_eq!(init.unwrap(), "0\n");
        let control = tmp.path().join("system/cgroup.subtree_control");
        // A service without limits needs no controller.
        let procs = cg.service("plain", &Limits::default()).unwrap();
        assert_eq!(procs, tmp.path().join("system/plain/cgroup.procs"));
        assert!(!control.exists());
        // The first one with limits enables them (on a clone: the flag is shared).
        let procs = cg
            .clone()
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
        assert_eq!(
            std::fs::read_to_string(&control).unwrap(),
            "+cpu +memory +pids +io"
        );
        let root = std::fs::read_to_string(tmp.path().join("cgroup.subtree_control"));
        assert_eq!(root.unwrap(), "+cpu +memory +pids +io");
        let mem = std::fs::read_to_string(tmp.path().join("system/containerd/memory.max"));
        assert_eq!(mem.unwrap(), "1024");
        assert!(!tmp.path().join("system/containerd/pids.max").exists());
        // Once: a later call writes nothing (the file here would be rewritten otherwise).
        std::fs::write(&control, "changed").unwrap();
        cg.enable_controllers().unwrap();
        assert_eq!(std::fs::read_to_string(&control).unwrap(), "changed");
    }
}
