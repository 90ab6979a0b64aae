//! The messages of the init's control protocol (init/CONTROL.md): one [`Request`] per line from
//! the client, one [`Response`] per line from the init.
//!
//! The serde attributes are the wire format: a field added later is optional
//! (`#[serde(default, skip_serializing_if = "Option::is_none")]`) so older peers on either side
//! keep working, and the structs derive `Default` so code that builds them can end with
//! `..Default::default()` and not change when a field is added.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// An `exec` without `timeout_s` is killed after this many seconds.
pub const EXEC_TIMEOUT_DEFAULT_S: u64 = 60;
/// The longest `timeout_s` an `exec` may ask for.
pub const EXEC_TIMEOUT_MAX_S: u64 = 3600;
/// How long a client waits for the answer to anything but an `exec`.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest request line the init reads. A longer one is refused and skipped without being
/// kept in memory (an `exec` with its arguments fits many times over).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// The longest answer line a client reads: an `exec` answer carries at most 1 MiB of output,
/// which JSON escaping can make six times longer; the rest of the answer is small.
pub const MAX_RESPONSE_LINE: usize = 8 * 1024 * 1024;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Start {
        service: String,
    },
    Stop {
        service: String,
    },
    Restart {
        service: String,
    },
    Logs {
        service: String,
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        lines: Option<usize>,
    },
    Reboot,
    Poweroff,
    /// Run one command as root and answer with its exit and output (see [`ExecResult`]).
    Exec {
        argv: Vec<String>,
        /// Seconds before its process group is killed; [`EXEC_TIMEOUT_DEFAULT_S`] when absent.
        #[serde(default)]
        timeout_s: Option<u64>,
    },
}

impl Request {
    /// How long a client may have to wait for this request's answer.
    pub fn answer_within(&self) -> Duration {
        match self {
            Request::Exec { timeout_s, .. } => {
                let run = timeout_s
                    .unwrap_or(EXEC_TIMEOUT_DEFAULT_S)
                    .min(EXEC_TIMEOUT_MAX_S);
                Duration::from_secs(run) + ANSWER_TIMEOUT
            }
            _ => ANSWER_TIMEOUT,
        }
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// One log line (`logs` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    /// How the command ended (`exec` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecResult>,
}

impl Response {
    /// `{"ok":true}`.
    pub fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }

    /// `{"ok":false,"error":...}`.
    pub fn error(e: impl ToString) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }

    /// One line of a `logs` answer.
    pub fn line(l: impl Into<String>) -> Self {
        Response {
            ok: true,
            line: Some(l.into()),
            ..Default::default()
        }
    }
}

/// The machine as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Status {
    pub version: String,
    pub slot: String,
    pub ready: bool,
    pub shutting_down: bool,
    pub services: Vec<ServiceStatus>,
    /// The network (interface, address, state); absent from older inits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetStatus>,
    /// The init's resident memory (VmRSS) in KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_rss_kib: Option<u64>,
    /// The kernel's host name (provisioned or `caisson`); absent from older inits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Why the machine runs degraded (its root failed verification and no other slot can be
    /// booted, init/VERITY.md); absent while it is not, and from older inits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

/// One service as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ServiceStatus {
    pub name: String,
    /// `waiting`, `starting`, `running`, `restarting`, `stopping`, `stopped`, `exited` or
    /// `failed`.
    pub state: String,
    pub pid: Option<i32>,
    pub ready: bool,
    pub required: bool,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub error: Option<String>,
}

/// How the network interface gets its address (also the `mode` of `/etc/caisson/network.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    #[default]
    Dhcp,
    Static,
    Off,
}

/// The network as `caisson-ctl status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStatus {
    /// `configuring`, `up`, `failed` or `off`.
    pub state: String,
    pub interface: Option<String>,
    pub mode: Option<NetworkMode>,
    /// `a.b.c.d/prefix`.
    pub address: Option<String>,
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
    pub error: Option<String>,
    /// The extra interfaces with their static addresses: `eth1 192.168.50.11/24`. Left out
    /// when there are none, so a status without links reads as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<String>,
}

/// How an `exec` ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecResult {
    /// Its exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// stdout and stderr as they came (one pipe), lossily UTF-8, at most 1 MiB.
    pub output: String,
    /// The output was longer than what `output` holds.
    pub truncated: bool,
    /// It ran past `timeout_s` and was killed.
    pub timed_out: bool,
}
