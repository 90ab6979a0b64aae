//! The host tools the image writers run: found on `PATH` or in the sbin directories (a user's
//! `PATH` on Debian lacks `/usr/sbin`, where `mkfs.ext4` and `mkfs.fat` live), and run with a
//! fixed locale and time zone so their output does not depend on the user's environment.

use crate::DiskError;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A host tool, with the Debian package that ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tool {
    MkfsErofs,
    MkfsExt4,
    /// Fixes ownership and times in the `state` filesystem.
    Debugfs,
    MkfsFat,
    Mcopy,
    Mmd,
    QemuImg,
    Depmod,
}

/// Directories searched after `PATH`.
const SBIN_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

impl Tool {
    /// Every tool a full build needs.
    pub const ALL: [Tool; 8] = [
        Tool::MkfsErofs,
        Tool::MkfsExt4,
        Tool::Debugfs,
        Tool::MkfsFat,
        Tool::Mcopy,
        Tool::Mmd,
        Tool::QemuImg,
        Tool::Depmod,
    ];

    /// The program name.
    pub fn program(self) -> &'static str {
        match self {
            Tool::MkfsErofs => "mkfs.erofs",
            Tool::MkfsExt4 => "mkfs.ext4",
            Tool::Debugfs => "debugfs",
            Tool::MkfsFat => "mkfs.fat",
            Tool::Mcopy => "mcopy",
            Tool::Mmd => "mmd",
            Tool::QemuImg => "qemu-img",
            Tool::Depmod => "depmod",
        }
    }

    /// The Debian package that ships the program.
    pub fn package(self) -> &'static str {
        match self {
            Tool::MkfsErofs => "erofs-utils",
            Tool::MkfsExt4 | Tool::Debugfs => "e2fsprogs",
            Tool::MkfsFat => "dosfstools",
            Tool::Mcopy | Tool::Mmd => "mtools",
            Tool::QemuImg => "qemu-utils",
            Tool::Depmod => "kmod",
        }
    }

    /// The program's full path, if it is installed.
    pub fn find(self) -> Option<PathBuf> {
        let path_var = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path_var)
            .chain(SBIN_DIRS.iter().map(PathBuf::from))
            .map(|dir| dir.join(self.program()))
            .find(|p| is_executable(p))
    }

    fn locate(self) -> Result<PathBuf, DiskError> {
        self.find().ok_or(DiskError::ToolsMissing(vec![self]))
    }
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Checks that every tool is installed; the error lists each missing one with its package.
pub fn check_host_tools(tools: &[Tool]) -> Result<(), DiskError> {
    let mut missing: Vec<Tool> = tools
        .iter()
        .copied()
        .filter(|t| t.find().is_none())
        .collect();
    missing.dedup();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DiskError::ToolsMissing(missing))
    }
}

/// Runs `tool` with `args` and extra `env`, in the C locale and UTC; `target` names the file it
/// works on in errors. `SOURCE_DATE_EPOCH` and `E2FSPROGS_FAKE_TIME` are never inherited: only
/// the arguments decide the output. Returns its stdout; a failure carries its stderr.
pub(crate) fn run<I, S>(
    tool: Tool,
    target: &Path,
    args: I,
    env: &[(&str, String)],
) -> Result<Vec<u8>, DiskError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_output(tool, target, args, env).map(|o| o.stdout)
}

/// Like [`run`], returning stdout and stderr of a successful run, for tools (debugfs) that
/// report some failures on stderr only.
pub(crate) fn run_output<I, S>(
    tool: Tool,
    target: &Path,
    args: I,
    env: &[(&str, String)],
) -> Result<Output, DiskError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let program = tool.locate()?;
    let mut cmd = Command::new(&program);
    cmd.args(args)
        .env("LC_ALL", "C")
        .env("TZ", "UTC")
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("E2FSPROGS_FAKE_TIME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    log::debug!("running {cmd:?}");
    let out = cmd.output().map_err(|source| DiskError::ToolSpawn {
        program: tool.program(),
        target: target.to_path_buf(),
        source,
    })?;
    if !out.status.success() {
        return Err(DiskError::ToolFailed {
            program: tool.program(),
            target: target.to_path_buf(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out)
}

/// The environment that makes the tools reproducible at `epoch`.
pub(crate) fn epoch_env(epoch: u64) -> Vec<(&'static str, String)> {
    vec![
        ("SOURCE_DATE_EPOCH", epoch.to_string()),
        ("E2FSPROGS_FAKE_TIME", epoch.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_message_names_the_package() {
        let e = DiskError::ToolsMissing(vec![Tool::MkfsErofs, Tool::MkfsFat]);
        assert_eq!(
            e.to_string(),
            "mkfs.erofs not found: apt-get install erofs-utils\n\
             mkfs.fat not found: apt-get install dosfstools"
        );
    }

    #[test]
    fn every_tool_has_a_package() {
        for t in Tool::ALL {
            assert!(!t.package().is_empty() && !t.program().is_empty());
        }
    }

    #[test]
    fn failing_tool_reports_its_stderr() {
        // qemu-img with a bad subcommand fails and says why on stderr.
        if Tool::QemuImg.find().is_none() {
            return;
        }
        let e = run(Tool::QemuImg, Path::new("x.raw"), ["no-such-command"], &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.starts_with("qemu-img failed"), "{e}");
        assert!(e.contains("x.raw") && e.contains("no-such-command"), "{e}");
    }
}
