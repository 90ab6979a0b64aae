//! The workspace's own binaries that go into an image, built statically in release mode by `ci/build`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Binaries every image has.
pub const ALWAYS: [&str; 2] = ["caisson-init", "caisson-ctl"];

/// A binary that could not be built or found.
#[derive(Debug, thiserror::Error)]
pub enum BinariesError {
    #[error("no Cargo workspace above {0}: build from a Caisson checkout or pass --binaries DIR")]
    NoWorkspace(PathBuf),
    #[error("running bash ci/build in {dir}: {source}")]
    Spawn {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is missing: build from a Caisson checkout or pass --binaries DIR")]
    NoScript(PathBuf),
    #[error("cargo build of {bins} failed (exit {status}); its output is above")]
    Build { bins: String, status: String },
    #[error("ci/build printed no output directory as its last line (it printed {0:?})")]
    NoDir(String),
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

/// The script that owns the release build of every Caisson binary (flags, target, feature set,
/// path remapping, and the init's own panic strategy), relative to the workspace. `ci/demo` runs it for the `caisson` tool, and
/// this runs it for an image's binaries, so both share one compile of the dependency tree.
pub const BUILD_SCRIPT: &str = "ci/build";

/// Builds the workspace's binaries with [`BUILD_SCRIPT`] (cargo's progress goes to stderr) and
/// returns the paths of `bins`, in the order given.
pub fn build(workspace: &Path, bins: &[String]) -> Result<Vec<PathBuf>, BinariesError> {
    let script = workspace.join(BUILD_SCRIPT);
    if !script.is_file() {
        return Err(BinariesError::NoScript(script));
    }
    log::info!(
        "building {} with {BUILD_SCRIPT} (the static release build shared with the caisson tool; \
         seconds when it is up to date)",
        bins.join(", ")
    );
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(workspace)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|source| BinariesError::Spawn {
            dir: workspace.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(BinariesError::Build {
            bins: bins.join(", "),
            status: out.status.to_string(),
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| l.starts_with('/'))
        .ok_or_else(|| BinariesError::NoDir(stdout.trim().to_string()))?;
    locate(Path::new(dir), bins)
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
