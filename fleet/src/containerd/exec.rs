//! Running a command in a unit's running container, for `exec` health checks: Tasks.Exec with
//! the container's own process spec (user, environment, working directory, capabilities) and
//! other arguments, its output discarded, under an exec id of its own. The exec process is
//! killed when it outlives its timeout and deleted afterwards, also when the caller gives up
//! on it (the health check's task ended).

use super::{api, call, found, Conn, Containerd, ContainerdError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The Any type of an OCI process spec.
const PROCESS_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
const SIGKILL: u32 = 9;
/// How long a killed exec process has to be reaped before it is deleted anyway.
const REAP: Duration = Duration::from_secs(5);

/// Makes exec ids unique within this agent (with its pid, across agents too).
static NEXT_EXEC: AtomicU64 = AtomicU64::new(0);

fn exec_error(unit: &str, message: String) -> ContainerdError {
    ContainerdError::Exec {
        unit: unit.to_string(),
        message,
    }
}

/// Kills and deletes an exec process when dropped armed (its caller was cancelled).
struct Cleanup {
    rt: Containerd,
    unit: String,
    exec_id: String,
    armed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (rt, unit, exec_id) = (self.rt.clone(), self.unit.clone(), self.exec_id.clone());
        handle.spawn(async move {
            if let Ok(conn) = rt.connect().await {
                rt.end_exec(&conn, &unit, &exec_id).await;
            }
        });
    }
}

impl Containerd {
    /// Runs `argv` in the unit's running container and waits up to `timeout` for it to exit
    /// (then kills it, and fails): its exit code.
    pub async fn exec_in(
        &self,
        unit: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<i32, ContainerdError> {
        if argv.is_empty() {
            return Err(exec_error(unit, "nothing to run".into()));
        }
        let conn = self.connect().await?;
        let process = self.exec_process(&conn, unit, argv).await?;
        let exec_id = format!(
            "health-{}-{}",
            std::process::id(),
            NEXT_EXEC.fetch_add(1, Ordering::Relaxed)
        );
        conn.tasks()
            .exec(conn.req(api::ExecProcessRequest {
                container_id: unit.to_string(),
                stdin: String::new(),
                stdout: String::new(),
                stderr: String::new(),
                terminal: false,
                spec: Some(process),
                exec_id: exec_id.clone(),
            }))
            .await
            .map_err(call("task exec", unit))?;
        let mut cleanup = Cleanup {
            rt: self.clone(),
            unit: unit.to_string(),
            exec_id: exec_id.clone(),
            armed: true,
        };
        let r = self.start_and_wait(&conn, unit, &exec_id, timeout).await;
        cleanup.armed = false;
        self.end_exec(&conn, unit, &exec_id).await;
        match r? {
            Some(code) => Ok(i32::try_from(code).unwrap_or(i32::MAX)),
            None => Err(exec_error(
                unit,
                format!("{argv:?} did not exit within {timeout:?}; killed"),
            )),
        }
    }

    /// The container's process spec with `argv` as its arguments, as an Any.
    async fn exec_process(
        &self,
        conn: &Conn,
        unit: &str,
        argv: &[String],
    ) -> Result<prost_types::Any, ContainerdError> {
        let container = conn
            .containers()
            .get(conn.req(api::GetContainerRequest {
                id: unit.to_string(),
            }))
            .await
            .map_err(call("container get", unit))?
            .into_inner()
            .container
            .unwrap_or_default();
        let spec: serde_json::Value = container
            .spec
            .as_ref()
            .and_then(|s| serde_json::from_slice(&s.value).ok())
            .ok_or_else(|| exec_error(unit, "the container has no runtime spec".into()))?;
        let mut process = spec
            .get("process")
            .cloned()
            .filter(serde_json::Value::is_object)
            .ok_or_else(|| exec_error(unit, "the container's spec has no process".into()))?;
        process["args"] = serde_json::json!(argv);
        process["terminal"] = serde_json::Value::Bool(false);
        Ok(prost_types::Any {
            type_url: PROCESS_TYPE.into(),
            value: process.to_string().into_bytes(),
        })
    }

    /// Starts the exec process and waits for its exit code (`None` after `timeout`).
    async fn start_and_wait(
        &self,
        conn: &Conn,
        unit: &str,
        exec_id: &str,
        timeout: Duration,
    ) -> Result<Option<u32>, ContainerdError> {
        conn.tasks()
            .start(conn.req(api::StartRequest {
                container_id: unit.to_string(),
                exec_id: exec_id.to_string(),
            }))
            .await
            .map_err(call("exec start", unit))?;
        let waited = tokio::time::timeout(
            timeout,
            conn.tasks().wait(conn.req(api::WaitRequest {
                container_id: unit.to_string(),
                exec_id: exec_id.to_string(),
            })),
        )
        .await;
        match waited {
            Err(_) => Ok(None),
            Ok(r) => Ok(Some(
                r.map_err(call("exec wait", unit))?.into_inner().exit_status,
            )),
        }
    }

    /// Kills the exec process if it still runs, waits a little for it, and deletes it; errors
    /// are logged (the container may be gone with it).
    async fn end_exec(&self, conn: &Conn, unit: &str, exec_id: &str) {
        let killed = found(
            conn.tasks()
                .kill(conn.req(api::KillRequest {
                    container_id: unit.to_string(),
                    exec_id: exec_id.to_string(),
                    signal: SIGKILL,
                    all: false,
                }))
                .await
                .map_err(call("exec kill", unit)),
        );
        if let Ok(Some(_)) = killed {
            let _ = tokio::time::timeout(
                REAP,
                conn.tasks().wait(conn.req(api::WaitRequest {
                    container_id: unit.to_string(),
                    exec_id: exec_id.to_string(),
                })),
            )
            .await;
        }
        let deleted = found(
            conn.tasks()
                .delete_process(conn.req(api::DeleteProcessRequest {
                    container_id: unit.to_string(),
                    exec_id: exec_id.to_string(),
                }))
                .await
                .map_err(call("exec delete", unit)),
        );
        if let Err(e) = deleted {
            log::debug!("unit {unit}: deleting health check {exec_id}: {e}");
        }
    }
}
