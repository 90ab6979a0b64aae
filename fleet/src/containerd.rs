//! The containerd runtime (placeholder).
//!
//! The agent will drive containerd's API over `/run/containerd/containerd.sock` with
//! `containerd-client`: import OCI archives into the content store, unpack them into snapshots,
//! create containers with a generated runtime spec, and run their tasks through the runc shim v2.
//! Until that lands, this runtime sees no containers and reports every start as failed with a
//! clear message, so units show up as `failed` in `caisson-fleet units` instead of silently
//! doing nothing.

use crate::agent::{Container, Runtime, RuntimeError};
use crate::unit::UnitSpec;
use std::path::PathBuf;

/// containerd at a socket, in a namespace.
#[derive(Debug, Clone)]
pub struct Containerd {
    pub socket: PathBuf,
    pub namespace: String,
}

impl Containerd {
    fn unavailable(&self, message: &str) -> RuntimeError {
        RuntimeError::Unavailable {
            endpoint: self.socket.display().to_string(),
            message: message.to_string(),
        }
    }
}

const NOT_YET: &str = "running containers through containerd's API is not implemented yet";

impl Runtime for Containerd {
    async fn list(&self) -> Result<Vec<Container>, RuntimeError> {
        if !self.socket.exists() {
            return Err(self.unavailable("the socket does not exist (is containerd running?)"));
        }
        Ok(Vec::new())
    }
    async fn start(&self, spec: &UnitSpec, _spec_hash: &str) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unit {
            unit: spec.name.clone(),
            message: NOT_YET.into(),
        })
    }
    async fn restart(&self, unit: &str) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unit {
            unit: unit.into(),
            message: NOT_YET.into(),
        })
    }
    async fn remove(&self, _unit: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn logs(&self, _unit: &str, _lines: usize) -> Result<Vec<String>, RuntimeError> {
        Ok(Vec::new())
    }
}
