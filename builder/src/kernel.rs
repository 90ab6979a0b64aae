//! The kernel: its image, its version, and the module subset an image needs, in load order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A kernel tree that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("no kernel found under {0}/usr/lib/modules (is the kernel package a linux-image-* package?)")]
    NoKernel(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("depmod failed on {dir}: {stderr}")]
    Depmod { dir: PathBuf, stderr: String },
    #[error("kernel {kver} has no module {name:?} (neither a module file nor built in)")]
    UnknownModule { kver: String, name: String },
}

/// An extracted kernel package with its module dependency graph.
#[derive(Debug)]
pub struct Kernel {
    /// The extracted package root (merged /usr).
    pub root: PathBuf,
    /// Kernel release, e.g. `6.1.0-56-amd64`.
    pub kver: String,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// Module name (with `_`) to its path relative to `root` and its dependencies' names.
    modules: BTreeMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
}

/// Module names treat `-` and `_` alike.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    normalize(stem)
}

impl Kernel {
    /// Finds the kernel in an extracted package tree and runs `depmod` on it.
    pub fn open(root: &Path) -> Result<Kernel, KernelError> {
        let modules_dir = root.join("usr/lib/modules");
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| KernelError::Io { what, path, source }
        };
        let mut kvers: Vec<String> = std::fs::read_dir(&modules_dir)
            .map_err(|_| KernelError::NoKernel(root.to_path_buf()))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        kvers.sort();
        let kver = kvers
            .pop()
            .ok_or_else(|| KernelError::NoKernel(root.to_path_buf()))?;
        let vmlinuz = root.join(format!("boot/vmlinuz-{kver}"));
        if !vmlinuz.exists() {
            return Err(KernelError::NoKernel(root.to_path_buf()));
        }
        // depmod looks in <base>/lib/modules; the tree is merged-/usr.
        let lib = root.join("lib");
        if !lib.exists() {
            std::os::unix::fs::symlink("usr/lib", &lib).map_err(io("linking", &lib))?;
        }
        let kdir = modules_dir.join(&kver);
        if !kdir.join("modules.dep").exists() {
            run_depmod(root, &kver)?;
        }
        let dep_path = kdir.join("modules.dep");
        let dep = std::fs::read_to_string(&dep_path).map_err(io("reading", &dep_path))?;
        let builtin_path = kdir.join("modules.builtin");
        let builtin = std::fs::read_to_string(&builtin_path).unwrap_or_default();
        Ok(Kernel {
            root: root.to_path_buf(),
            modules: parse_modules_dep(&dep, &format!("usr/lib/modules/{kver}")),
            builtin: builtin.lines().map(module_name).collect(),
            kver,
            vmlinuz,
        })
    }

    /// The module files (relative to the tree root) needed for `names`, dependencies first.
    /// Built-in modules need no file and are skipped.
    pub fn closure(&self, names: &[String]) -> Result<Vec<String>, KernelError> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in names {
            let n = normalize(name);
            if self.builtin.contains(&n) {
                continue;
            }
            if !self.modules.contains_key(&n) {
                return Err(KernelError::UnknownModule {
                    kver: self.kver.clone(),
                    name: name.clone(),
                });
            }
            self.visit(&n, &mut seen, &mut order);
        }
        Ok(order)
    }

    fn visit(&self, name: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(name.to_string()) {
            return;
        }
        if let Some((path, deps)) = self.modules.get(name) {
            for d in deps {
                self.visit(d, seen, order);
            }
            order.push(path.clone());
        }
    }
}

/// Runs `depmod` on an extracted tree so `modules.dep` exists.
fn run_depmod(root: &Path, kver: &str) -> Result<(), KernelError> {
    let out = Command::new("depmod")
        .arg("-b")
        .arg(root)
        .arg(kver)
        .output()
        .map_err(|source| KernelError::Io {
            what: "running depmod on",
            path: root.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(KernelError::Depmod {
            dir: root.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Parses `modules.dep`; paths are made relative to the tree root by prefixing `prefix`.
fn parse_modules_dep(text: &str, prefix: &str) -> BTreeMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(path, deps)| {
            let deps = deps.split_whitespace().map(module_name).collect();
            (
                module_name(path),
                (format!("{prefix}/{}", path.trim()), deps),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Kernel {
        let dep = "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n\
                   kernel/lib/crc16.ko:\n\
                   kernel/fs/mbcache.ko:\n\
                   kernel/fs/jbd2/jbd2.ko: kernel/lib/crc16.ko\n\
                   kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko\n\
                   kernel/drivers/md/dm-bufio.ko:\n\
                   kernel/drivers/md/dm-mod.ko:\n";
        Kernel {
            root: PathBuf::from("/k"),
            kver: "6.1.0-1-amd64".into(),
            vmlinuz: PathBuf::from("/k/boot/vmlinuz"),
            modules: parse_modules_dep(dep, "usr/lib/modules/6.1.0-1-amd64"),
            builtin: ["sha256_generic".to_string()].into_iter().collect(),
        }
    }

    #[test]
    fn dependencies_come_first_once() {
        let k = fixture();
        let order = k
            .closure(&["ext4".into(), "dm-verity".into(), "jbd2".into()])
            .unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(pos("crc16") < pos("jbd2"));
        assert!(pos("jbd2") < pos("ext4"));
        assert!(pos("mbcache") < pos("ext4"));
        assert!(pos("dm_mod") < pos("dm_verity"));
        assert_eq!(names.len(), 7);
        assert!(order[0].starts_with("usr/lib/modules/6.1.0-1-amd64/kernel/"));
    }

    #[test]
    fn builtin_is_skipped_and_unknown_is_named() {
        let k = fixture();
        assert!(k.closure(&["sha256-generic".into()]).unwrap().is_empty());
        let err = k.closure(&["nosuch".into()]).unwrap_err().to_string();
        assert!(err.contains("\"nosuch\""), "{err}");
    }
}
