//! What a provisioned machine does on every boot: set the sysctls of
//! `/etc/caisson/sysctl.conf` and find the module files named in `/etc/caisson/modules.conf`
//! (the init loads them through its own system call layer).

use crate::plan::{MODULES_PATH, SYSCTL_PATH};
use std::path::{Path, PathBuf};

/// A sysctl that could not be set, or a module that is not in the image.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("sysctl {key}: writing {path}: {source}")]
    Sysctl {
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "kernel module {0:?} is not in this image (add it to the image spec's kernel.modules)"
    )]
    NoModule(String),
}

fn under(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

/// The `key = value` pairs of the sysctl file (none without it).
pub fn sysctls(root: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(under(root, SYSCTL_PATH))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Writes every sysctl under `<root>/proc/sys`; returns the failures (the others are set).
pub fn apply_sysctls(root: &Path) -> Vec<BootError> {
    let mut failed = Vec::new();
    for (key, value) in sysctls(root) {
        let path = root.join("proc/sys").join(key.replace('.', "/"));
        if let Err(source) = std::fs::write(&path, format!("{value}\n")) {
            failed.push(BootError::Sysctl { key, path, source });
        }
    }
    failed
}

/// The module names of the modules file (none without it).
pub fn module_names(root: &Path) -> Vec<String> {
    std::fs::read_to_string(under(root, MODULES_PATH))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn find_module(dir: &Path, want: &str) -> Option<PathBuf> {
    let rd = std::fs::read_dir(dir).ok()?;
    let mut subdirs = Vec::new();
    for e in rd.filter_map(|e| e.ok()) {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            subdirs.push(path);
        } else if name
            .split_once(".ko")
            .is_some_and(|(stem, _)| normalize(stem) == want)
        {
            return Some(path);
        }
    }
    subdirs.iter().find_map(|d| find_module(d, want))
}

/// The module files for `names` in `<root>/usr/lib/modules/<release>`, in order.
pub fn module_paths(
    root: &Path,
    release: &str,
    names: &[String],
) -> Vec<Result<PathBuf, BootError>> {
    let dir = root.join("usr/lib/modules").join(release);
    names
        .iter()
        .map(|n| find_module(&dir, &normalize(n)).ok_or_else(|| BootError::NoModule(n.clone())))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_and_modules_from_their_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("etc/caisson")).unwrap();
        std::fs::create_dir_all(root.join("proc/sys/net/ipv4")).unwrap();
        std::fs::write(
            root.join("etc/caisson/sysctl.conf"),
            "net.ipv4.ip_forward = 1\nvm.nope = 2\n",
        )
        .unwrap();
        let failed = apply_sysctls(root);
        assert_eq!(
            std::fs::read_to_string(root.join("proc/sys/net/ipv4/ip_forward")).unwrap(),
            "1\n"
        );
        assert_eq!(failed.len(), 1);
        assert!(failed[0].to_string().contains("vm.nope"));

        let kdir = root.join("usr/lib/modules/6.1.0/kernel/net/bridge");
        std::fs::create_dir_all(&kdir).unwrap();
        std::fs::write(kdir.join("br_netfilter.ko.xz"), b"").unwrap();
        std::fs::write(
            root.join("etc/caisson/modules.conf"),
            "br-netfilter\nmissing\n",
        )
        .unwrap();
        let names = module_names(root);
        let found = module_paths(root, "6.1.0", &names);
        assert_eq!(found[0].as_ref().unwrap(), &kdir.join("br_netfilter.ko.xz"));
        assert!(found[1]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("missing"));
    }
}
