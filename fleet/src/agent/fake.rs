//! An in-memory runtime for tests and simulations.

use super::{Container, ContainerState, Runtime, RuntimeError};
use crate::unit::UnitSpec;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An exec the fake ran: the unit and the command.
pub type Exec = (String, Vec<String>);

/// The exit code of a task stopped by [`Runtime::stop_task`] (SIGKILL).
pub const KILLED: u32 = 137;

/// An in-memory runtime: containers "run" until told otherwise. For tests and simulations.
/// Clones share their state.
#[derive(Debug, Default, Clone)]
pub struct FakeRuntime {
    pub containers: Arc<Mutex<BTreeMap<String, Container>>>,
    /// Units whose start fails.
    pub failing: Arc<Mutex<Vec<String>>>,
    /// How long a start takes (an image import under load, say).
    pub start_delay: Arc<Mutex<Duration>>,
    /// The exit code of each unit's exec health check (none set: the exec fails).
    pub exec_codes: Arc<Mutex<BTreeMap<String, i32>>>,
    /// Every exec run, as (unit, argv).
    pub execs: Arc<Mutex<Vec<Exec>>>,
    /// The units whose volumes exist on this "machine" (made by a start, kept by a remove).
    pub volumes: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

impl FakeRuntime {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the unit's exec health checks exit with `code`.
    pub fn set_exec(&self, unit: &str, code: i32) {
        self.exec_codes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(unit.to_string(), code);
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
        if !spec.volumes.is_empty() {
            self.volumes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(spec.name.clone());
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
    async fn delete_volumes(&self, unit: &str) -> Result<bool, RuntimeError> {
        Ok(self
            .volumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(unit))
    }
    async fn logs(&self, unit: &str, _lines: usize) -> Result<Vec<String>, RuntimeError> {
        Ok(vec![format!("{unit}: fake output")])
    }
    async fn exec(
        &self,
        unit: &str,
        argv: &[String],
        _timeout: Duration,
    ) -> Result<i32, RuntimeError> {
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((unit.to_string(), argv.to_vec()));
        let running = self
            .lock()
            .get(unit)
            .is_some_and(|c| c.state == ContainerState::Running);
        let code = self
            .exec_codes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(unit)
            .copied();
        match code.filter(|_| running) {
            Some(code) => Ok(code),
            None => Err(RuntimeError::Unit {
                unit: unit.to_string(),
                message: "no running task to exec in".into(),
            }),
        }
    }
    async fn stop_task(&self, unit: &str) -> Result<(), RuntimeError> {
        if let Some(c) = self.lock().get_mut(unit) {
            if c.state == ContainerState::Running {
                c.state = ContainerState::Exited(KILLED);
            }
        }
        Ok(())
    }
}
