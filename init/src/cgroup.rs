//! cgroup v2: the init in its own leaf (`init`), services under `system/<name>` with their limits.

use crate::service::Limits;
use std::io;
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

    /// Create (or reuse) `system/<name>`, apply its limits, and return its `cgroup.procs`.
    pub fn service(&self, name: &str, limits: &Limits) -> Result<PathBuf, CgroupError> {
        let dir = self.root.join("system").join(name);
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
}
