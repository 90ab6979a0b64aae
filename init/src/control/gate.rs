//! Which requests a control channel may make. Every request is answered on both channels except
//! `exec`, which runs any command as root: the unix socket serves only root (`SO_PEERCRED`), who
//! may do that anyway, but the virtio-serial port serves whoever runs the VM. There `exec` is off
//! unless this boot's kernel command line says `caisson.debug`, or [`DEBUG_CONFIG_PATH`] (which
//! an image or a machine config may provision) says `virtio_exec = true`.
//! The file is read at each `exec`, so a machine config applied after the port opened counts.

use super::Request;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The init's debug switches, off when the file is absent.
pub const DEBUG_CONFIG_PATH: &str = "/etc/caisson/debug.toml";

/// `/etc/caisson/debug.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugConfig {
    /// `exec` is answered on the virtio control port (`org.caisson.ctl`).
    #[serde(default)]
    pub virtio_exec: bool,
}

/// A debug configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DebugConfigError {
    /// The file exists but cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl DebugConfig {
    /// Reads `path`; a missing file is the default, everything off.
    pub fn load(path: &Path) -> Result<DebugConfig, DebugConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DebugConfig::default()),
            Err(source) => {
                return Err(DebugConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        toml::from_str(&text).map_err(|e| DebugConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().trim().to_string(),
        })
    }
}

/// Whether `exec` may run on the virtio port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecGate {
    /// The kernel command line has `caisson.debug`.
    pub cmdline_debug: bool,
    /// Where [`DebugConfig`] is read ([`DEBUG_CONFIG_PATH`] on a machine).
    pub config: PathBuf,
}

impl ExecGate {
    /// The gate of this machine: `cmdline_debug` from its boot parameters.
    pub fn new(cmdline_debug: bool) -> ExecGate {
        ExecGate {
            cmdline_debug,
            config: PathBuf::from(DEBUG_CONFIG_PATH),
        }
    }

    /// `Ok` when `exec` may run; otherwise why not, and how to turn it on.
    pub fn check(&self) -> Result<(), String> {
        if self.cmdline_debug {
            return Ok(());
        }
        let how = format!(
            "boot with caisson.debug on the kernel command line, or provision {} with \
             virtio_exec = true (init/CONTROL.md)",
            self.config.display()
        );
        match DebugConfig::load(&self.config) {
            Ok(c) if c.virtio_exec => Ok(()),
            Ok(_) => Err(format!("exec is refused on the virtio control port: {how}")),
            Err(e) => Err(format!(
                "exec is refused on the virtio control port ({e}): {how}"
            )),
        }
    }
}

/// The channel a connection came in on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// The unix socket: root alone.
    Socket,
    /// The virtio-serial port: whoever runs the VM.
    Virtio(ExecGate),
}

impl Channel {
    /// `Ok` when `req` may be answered on this channel; otherwise the refusal's message.
    pub fn admit(&self, req: &Request) -> Result<(), String> {
        match (self, req) {
            (Channel::Virtio(gate), Request::Exec { .. }) => gate.check(),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> Request {
        Request::Exec {
            argv: vec!["/bin/true".into()],
            timeout_s: None,
        }
    }

    fn virtio(cmdline_debug: bool, config: &Path) -> Channel {
        Channel::Virtio(ExecGate {
            cmdline_debug,
            config: config.to_path_buf(),
        })
    }

    #[test]
    fn exec_on_the_virtio_port_needs_caisson_debug_or_the_debug_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("debug.toml");
        let why = virtio(false, &file).admit(&exec()).unwrap_err();
        assert!(why.contains("caisson.debug"), "{why}");
        assert!(why.contains("virtio_exec = true"), "{why}");
        assert!(why.contains(&file.display().to_string()), "{why}");
        assert_eq!(virtio(true, &file).admit(&exec()), Ok(()));
        std::fs::write(&file, "virtio_exec = false\n").unwrap();
        assert!(virtio(false, &file).admit(&exec()).is_err());
        std::fs::write(&file, "virtio_exec = true\n").unwrap();
        assert_eq!(virtio(false, &file).admit(&exec()), Ok(()));
    }

    #[test]
    fn a_broken_debug_file_keeps_exec_off_and_says_why() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("debug.toml");
        std::fs::write(&file, "virtio_exce = true\n").unwrap();
        let why = virtio(false, &file).admit(&exec()).unwrap_err();
        assert!(why.contains("virtio_exce"), "{why}");
        assert!(why.contains("refused"), "{why}");
    }

    #[test]
    fn other_requests_and_the_socket_are_not_gated() {
        let tmp = tempfile::tempdir().unwrap();
        let off = virtio(false, &tmp.path().join("missing.toml"));
        for req in [
            Request::Status,
            Request::Restart {
                service: "containerd".into(),
            },
            Request::Reboot,
        ] {
            assert_eq!(off.admit(&req), Ok(()));
        }
        assert_eq!(Channel::Socket.admit(&exec()), Ok(()));
    }
}
