//! The one error type of the harness.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Everything that can go wrong while launching or driving a VM.
///
/// Every I/O variant names what it was working on; console-related variants carry the last console
/// lines so a failing test shows what the guest was doing.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A host tool or firmware file is missing.
    #[error("{what} not found ({path}): install the Debian package {package} (apt-get install -y {package})")]
    Missing {
        what: &'static str,
        path: PathBuf,
        package: &'static str,
    },
    /// An I/O error on a file or directory.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A host command could not be started or failed.
    #[error("{command}: {message}")]
    Command { command: String, message: String },
    /// QEMU exited while it was being started.
    #[error("QEMU exited during start-up ({status}): {stderr}")]
    StartFailed { status: ExitStatus, stderr: String },
    /// QEMU did not open its sockets in time.
    #[error("QEMU did not create {path} within {timeout:?}")]
    StartTimeout { path: PathBuf, timeout: Duration },
    /// The console never printed the pattern.
    #[error(
        "timed out after {timeout:?} waiting for {pattern:?} on the console; last lines:\n{tail}"
    )]
    ConsoleTimeout {
        pattern: String,
        timeout: Duration,
        tail: String,
    },
    /// QEMU exited before the console printed the pattern.
    #[error(
        "QEMU exited ({status}) before {pattern:?} appeared on the console; last lines:\n{tail}"
    )]
    ExitedBeforePattern {
        pattern: String,
        status: ExitStatus,
        tail: String,
    },
    /// A regular expression did not compile.
    #[error("bad console pattern: {0}")]
    Pattern(#[from] regex::Error),
    /// The QMP socket misbehaved.
    #[error("QMP {command}: {message}")]
    Qmp { command: String, message: String },
    /// QEMU answered a QMP command with an error.
    #[error("QMP {command} failed: {class}: {desc}")]
    QmpError {
        command: String,
        class: String,
        desc: String,
    },
    /// QEMU did not exit in time.
    #[error("QEMU (pid {pid}) still running after {timeout:?}")]
    ExitTimeout { pid: u32, timeout: Duration },
    /// The guest did not answer on the control channel in time.
    #[error("no answer on the control channel {path} within {timeout:?} (is the init listening on the virtio-serial port?)")]
    ChannelTimeout { path: PathBuf, timeout: Duration },
    /// The guest closed the control channel.
    #[error("the control channel {path} closed before an answer")]
    ChannelClosed { path: PathBuf },
    /// The control channel carried something the init's protocol does not allow.
    #[error(transparent)]
    Control(caisson_layout::control::ClientError),
    /// A bad option.
    #[error("invalid option: {0}")]
    Invalid(String),
}

impl QemuError {
    /// Wraps an I/O error with what was being done and on which path.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> QemuError {
        let path = path.into();
        move |source| QemuError::Io {
            action,
            path,
            source,
        }
    }
}
