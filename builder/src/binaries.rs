//! The workspace's own binaries that go into an image, built statically in release mode.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Rust target the image binaries are built for.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Binaries every image has.
pub const ALWAYS: [&str; 2] = ["caisson-init", "caisson-ctl"];

/// A binary that could not be built or found.
#[derive(Debug, thiserror::Error)]
pub enum BinariesError {
    #[error("no Cargo workspace above {0}: build from a Caisson checkout or pass --binaries DIR")]
    NoWorkspace(PathBuf),
    #[error("running cargo in {dir}: {source}")]
    Spawn {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cargo build of {bins} failed (exit {status}); its output is above")]
    Build { bins: String, status: String },
    #[error("binary {0} not found (looked for {1})")]
    Missing(String, PathBuf),
}

/// Finds the Cargo workspace root at or above `start`.
pub fn find_workspace(start: &Path) -> Result<PathBuf, BinariesError> {
    let abs = std::fs::canonicalize(start).unwrap_or_else(|_| start.to_path_buf());
    abs.ancestors()
        .find(|d| {
            std::fs::read_to_string(d.join("Cargo.toml"))
                .map(|t| t.contains("[workspace]"))
                .unwrap_or(false)
        })
        .map(Path::to_path_buf)
        .ok_or(BinariesError::NoWorkspace(abs))
}

/// The binaries to install: the always-present ones and the spec's, deduplicated, sorted.
pub fn wanted(extra: &[String]) -> Vec<String> {
    let mut all: Vec<String> = ALWAYS.iter().map(|s| s.to_string()).collect();
    all.extend(extra.iter().cloned());
    all.sort();
    all.dedup();
    all
}

/// Builds `bins` statically in `workspace` (in its own target dir, so it never waits on or
/// disturbs the developer's builds) and returns their paths, in the order given.
pub fn build(workspace: &Path, bins: &[String]) -> Result<Vec<PathBuf>, BinariesError> {
    let target_dir = workspace.join("target").join("caisson-image");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace)
        .args(["build", "--release", "--locked", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    for b in bins {
        cmd.args(["--bin", b]);
    }
    log::info!("building {} (static, release)", bins.join(", "));
    let status = cmd.status().map_err(|source| BinariesError::Spawn {
        dir: workspace.to_path_buf(),
        source,
    })?;
    if !status.success() {
        return Err(BinariesError::Build {
            bins: bins.join(", "),
            status: status.to_string(),
        });
    }
    locate(&target_dir.join(TARGET).join("release"), bins)
}

/// Finds prebuilt `bins` in `dir`.
pub fn locate(dir: &Path, bins: &[String]) -> Result<Vec<PathBuf>, BinariesError> {
    bins.iter()
        .map(|b| {
            let p = dir.join(b);
            if p.is_file() {
                Ok(p)
            } else {
                Err(BinariesError::Missing(b.clone(), p))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_always_has_the_init() {
        let w = wanted(&["caisson-update".into(), "caisson-ctl".into()]);
        assert_eq!(w, vec!["caisson-ctl", "caisson-init", "caisson-update"]);
    }

    #[test]
    fn finds_this_workspace_and_names_missing_binaries() {
        let ws = find_workspace(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(ws.join("builder").is_dir());
        let dir = tempfile::tempdir().unwrap();
        let err = locate(dir.path(), &["nope".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
        assert!(matches!(
            find_workspace(Path::new("/")),
            Err(BinariesError::NoWorkspace(_))
        ));
    }
}
