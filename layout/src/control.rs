//! The init's control protocol (documented in `init/CONTROL.md`): JSON lines over the unix socket
//! [`crate::paths::CONTROL_SOCKET`] and over the virtio-serial port
//! [`crate::paths::VIRTIO_CONTROL_PORT`]. Its messages ([`Request`], [`Response`] and what they
//! carry) and its one client ([`Client`]) live here; the init serves them, and `caisson-ctl`,
//! the updater, the fleet agent and the QEMU harness are clients.

mod client;
mod wire;

pub use client::{Client, ClientError, Stream, Unbounded};
pub use wire::{
    ExecResult, NetStatus, NetworkMode, Request, Response, ServiceStatus, Status, ANSWER_TIMEOUT,
    EXEC_TIMEOUT_DEFAULT_S, EXEC_TIMEOUT_MAX_S, MAX_REQUEST_LINE, MAX_RESPONSE_LINE,
};

use std::path::Path;

/// The request line that asks the init to reboot (what [`Request::Reboot`] is on the wire).
pub const REBOOT_REQUEST: &str = r#"{"cmd":"reboot"}"#;

/// A request the init did not take.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The init could not be reached, or did not answer properly.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The init answered with an error.
    #[error("the init refused {request}: {answer}")]
    Refused { request: String, answer: String },
}

/// Connects to the init's socket, sends `req` and returns its answer, an error unless it says
/// `"ok":true`. Waits at most [`Request::answer_within`] for it.
pub fn request(socket: &Path, req: &Request) -> Result<Response, ControlError> {
    let answer = Client::connect(socket)?.call(req)?;
    if answer.ok {
        return Ok(answer);
    }
    Err(ControlError::Refused {
        request: serde_json::to_string(req).map_err(ClientError::Encode)?,
        answer: answer
            .error
            .unwrap_or_else(|| "an error without a reason".into()),
    })
}

/// Asks the init to reboot the machine (it stops the services first).
pub fn request_reboot(socket: &Path) -> Result<(), ControlError> {
    request(socket, &Request::Reboot).map(drop)
}

#[cfg(test)]
mod tests;
