//! The one error type of this crate: every variant names the file or tool it is about.

use crate::tools::Tool;
use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// A failure to make an image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Host tools are missing: one line per tool, naming the Debian package to install.
    #[error("{}", missing_lines(.0))]
    ToolsMissing(Vec<Tool>),
    /// A host tool ran and failed; its stderr follows.
    #[error("{program} failed ({status}) on {}: {}", target.display(), stderr.trim_end())]
    ToolFailed {
        program: &'static str,
        target: PathBuf,
        status: ExitStatus,
        stderr: String,
    },
    /// A host tool could not be started.
    #[error("cannot run {program} on {}: {source}", target.display())]
    ToolSpawn {
        program: &'static str,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading or writing a file failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A path handed to an image writer is not acceptable.
    #[error("{what} path {path:?}: {reason}")]
    BadPath {
        what: &'static str,
        path: String,
        reason: &'static str,
    },
    /// The same path is given twice.
    #[error("{what} path {path:?} is given twice")]
    Duplicate { what: &'static str, path: String },
    /// A file changed while it was being copied into an image.
    #[error("{} changed size while being copied (expected {expected} bytes): is something else writing it?", path.display())]
    FileChanged { path: PathBuf, expected: u64 },
    /// The dm-verity tree could not be computed.
    #[error("computing the dm-verity tree of {}: {source}", path.display())]
    Verity {
        path: PathBuf,
        #[source]
        source: caisson_layout::verity::VerityError,
    },
    /// The gpt crate failed to read or write a partition table.
    #[error("partition table of {}: {source}", path.display())]
    Gpt {
        path: PathBuf,
        #[source]
        source: ::gpt::GptError,
    },
    /// A partition's content does not fit in it.
    #[error("partition {label}: {} is {content} bytes, larger than the partition ({size} bytes): raise its size in the spec", path.display())]
    ContentTooLarge {
        label: &'static str,
        path: PathBuf,
        content: u64,
        size: u64,
    },
    /// The partitions handed to `write_disk` are not each partition of the layout exactly once.
    #[error("the disk needs each of esp, root-a, root-b and state exactly once: {0}")]
    Partitions(String),
    /// A size is unusable.
    #[error("{what}: size {size} bytes: {reason}")]
    BadSize {
        what: String,
        size: u64,
        reason: &'static str,
    },
    /// A disk read back does not have the expected layout.
    #[error("{}: {reason}", path.display())]
    BadDisk { path: PathBuf, reason: String },
}

fn missing_lines(tools: &[Tool]) -> String {
    let lines: Vec<String> = tools
        .iter()
        .map(|t| format!("{} not found: apt-get install {}", t.program(), t.package()))
        .collect();
    lines.join("\n")
}

impl DiskError {
    /// An I/O error on `path` while doing `action` ("reading", "creating", ...).
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl Fn(io::Error) -> Self {
        let path = path.into();
        move |source| DiskError::Io {
            action,
            path: path.clone(),
            source,
        }
    }
}
