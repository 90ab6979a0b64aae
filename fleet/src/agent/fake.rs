//! An in-memory runtime for tests and simulations.

use super::{Container, ContainerState, Runtime, RuntimeError};
use crate::unit::UnitSpec;
use std::collections::BTreeMap;
use std::time::Duration;

/// An in-memory runtime: containers "run" until told otherwise. For tests and simulations.
#[derive(Debug, Default)]
pub struct FakeRuntime {
    pub containers: std::sync::Mutex<BTreeMap<String, Container>>,
    /// Units whose start fails.
    pub failing: std::sync::Mutex<Vec<String>>,
    /// How long a start takes (an image import under load, say).
    pub start_delay: std::sync::Mutex<Duration>,
}

impl FakeRuntime {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes a unit's container exit with `code`.
    pub fn exit(&self, unit: &str, code: u32) {
        if let Some(c) = self.lock().get_mut(unit) {
            c.state = ContainerState::Exited(code);
        }
    }

    /// The units with a container.
    pub fn units(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

impl Runtime for FakeRuntime {
    async fn list(&self) -> Result<Vec<Container>, RuntimeError> {
        Ok(self.lock().values().cloned().collect())
    }
    async fn start(&self, spec: &UnitSpec, spec_hash: &str) -> Result<(), RuntimeError> {
        let delay = *self.start_delay.lock().unwrap_or_else(|e| e.into_inner());
        tokio::time::sleep(delay).await;
        let failing = self
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&spec.name);
        if failing {
            return Err(RuntimeError::Unit {
                unit: spec.name.clone(),
                message: "image import failed".into(),
            });
        }
        self.lock().insert(
            spec.name.clone(),
            Container {
                unit: spec.name.clone(),
                spec_hash: spec_hash.to_string(),
                state: ContainerState::Running,
                restarts: 0,
            },
        );
        Ok(())
    }
    async fn restart(&self, unit: &str) -> Result<(), RuntimeError> {
        if let Some(c) = self.lock().get_mut(unit) {
            c.state = ContainerState::Running;
            c.restarts += 1;
        }
        Ok(())
    }
    async fn remove(&self, unit: &str) -> Result<(), RuntimeError> {
        self.lock().remove(unit);
        Ok(())
    }
    async fn logs(&self, unit: &str, _lines: usize) -> Result<Vec<String>, RuntimeError> {
        Ok(vec![format!("{unit}: fake output")])
    }
}
