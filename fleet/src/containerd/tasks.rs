//! Containers' tasks: start (output appended to the unit's log), state, restart (counted in a
//! label), stop (SIGTERM, then SIGKILL after the stop timeout) and delete, and the log's tail.

use super::{
    call, found, io, Conn, Containerd, ContainerdError, LABEL_HASH, LABEL_NETWORK, LABEL_RESTARTS,
    LABEL_UNIT, LOST_TASK_EXIT,
};
use crate::agent::{Container, ContainerState};
use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::types::Mount;
use std::time::Duration;

impl Containerd {
    /// Wires a bridge unit's namespace into the host's network (nothing without one: runc
    /// then makes the namespace, loopback only).
    pub(super) async fn attach(&self, unit: &str) -> Result<(), ContainerdError> {
        let Some(net) = &self.network else {
            return Ok(());
        };
        let address = net
            .attach(unit)
            .await
            .map_err(|source| ContainerdError::Network {
                unit: unit.to_string(),
                source: Box::new(source),
            })?;
        log::debug!("unit {unit}: on the host's bridge at {address}");
        Ok(())
    }

    /// Creates and starts the container's task; `fresh` starts a new log file.
    pub(super) async fn start_task(
        &self,
        conn: &Conn,
        id: &str,
        fresh: bool,
    ) -> Result<(), ContainerdError> {
        let mounts: Vec<Mount> = conn
            .snapshots()
            .mounts(conn.req(snap::MountsRequest {
                snapshotter: self.snapshotter.clone(),
                key: id.to_string(),
            }))
            .await
            .map_err(call("snapshot mounts", id))?
            .into_inner()
            .mounts;
        std::fs::create_dir_all(&self.log_dir).map_err(io(&self.log_dir))?;
        let log = self.log_path(id);
        let mut open = std::fs::OpenOptions::new();
        open.create(true);
        if fresh {
            open.write(true).truncate(true);
        } else {
            open.append(true);
        }
        open.open(&log).map_err(io(&log))?;
        // The runc shim appends stdout and stderr to a `file://` URI.
        let uri = format!("file://{}", log.display());
        let mut tasks = conn.tasks();
        tasks
            .create(conn.req(api::CreateTaskRequest {
                container_id: id.to_string(),
                rootfs: mounts,
                stdout: uri.clone(),
                stderr: uri,
                ..Default::default()
            }))
            .await
            .map_err(call("task create", id))?;
        tasks
            .start(conn.req(api::StartRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
            .map_err(call("task start", id))?;
        Ok(())
    }

    /// The agent's containers and their states.
    pub async fn containers(&self) -> Result<Vec<Container>, ContainerdError> {
        let conn = self.connect().await?;
        let list = conn
            .containers()
            .list(conn.req(api::ListContainersRequest { filters: vec![] }))
            .await
            .map_err(call("container list", &self.namespace))?
            .into_inner()
            .containers;
        let mut out = Vec::new();
        for c in list {
            let Some(unit) = c.labels.get(LABEL_UNIT) else {
                continue;
            };
            let state = match self.task_state(&conn, &c.id).await? {
                Some(s) => s,
                None => ContainerState::Exited(LOST_TASK_EXIT),
            };
            out.push(Container {
                unit: unit.clone(),
                spec_hash: c.labels.get(LABEL_HASH).cloned().unwrap_or_default(),
                state,
                restarts: c
                    .labels
                    .get(LABEL_RESTARTS)
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// The task's state, `None` without a task.
    pub(super) async fn task_state(
        &self,
        conn: &Conn,
        id: &str,
    ) -> Result<Option<ContainerState>, ContainerdError> {
        use containerd_client::types::v1::Status;
        let got = found(
            conn.tasks()
                .get(conn.req(api::GetRequest {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                }))
                .await
                .map_err(call("task get", id)),
        )?;
        Ok(got.and_then(|r| r.into_inner().process).map(|p| {
            if p.status == Status::Stopped as i32 {
                ContainerState::Exited(p.exit_status)
            } else {
                ContainerState::Running
            }
        }))
    }

    /// Starts an exited container's task again and counts the restart.
    pub async fn restart_unit(&self, unit: &str) -> Result<(), ContainerdError> {
        let conn = self.connect().await?;
        self.delete_task(&conn, unit).await?;
        let mut containers = conn.containers();
        let mut c = containers
            .get(conn.req(api::GetContainerRequest {
                id: unit.to_string(),
            }))
            .await
            .map_err(call("container get", unit))?
            .into_inner()
            .container
            .unwrap_or_default();
        let restarts: u32 = c
            .labels
            .get(LABEL_RESTARTS)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        c.labels
            .insert(LABEL_RESTARTS.into(), (restarts + 1).to_string());
        let bridge = c.labels.get(LABEL_NETWORK).is_some_and(|n| n == "bridge");
        containers
            .update(conn.req(api::UpdateContainerRequest {
                container: Some(c),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![format!("labels.{LABEL_RESTARTS}")],
                }),
            }))
            .await
            .map_err(call("container update", unit))?;
        // After a reboot /run is empty: the namespace is made and wired again.
        if bridge {
            self.attach(unit).await?;
        }
        self.start_task(&conn, unit, false).await
    }

    pub(super) async fn delete_task(
        &self,
        conn: &Conn,
        id: &str,
    ) -> Result<Option<u32>, ContainerdError> {
        let r = found(
            conn.tasks()
                .delete(conn.req(api::DeleteTaskRequest {
                    container_id: id.to_string(),
                }))
                .await
                .map_err(call("task delete", id)),
        )?;
        Ok(r.map(|r| r.into_inner().exit_status))
    }

    pub(super) async fn kill(
        &self,
        conn: &Conn,
        id: &str,
        signal: u32,
    ) -> Result<(), ContainerdError> {
        found(
            conn.tasks()
                .kill(conn.req(api::KillRequest {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                    signal,
                    all: false,
                }))
                .await
                .map_err(call("task kill", id)),
        )
        .map(|_| ())
    }

    /// Waits up to `limit` for the task to exit; its exit code, `None` on timeout.
    pub(super) async fn wait(
        &self,
        conn: &Conn,
        id: &str,
        limit: Duration,
    ) -> Result<Option<u32>, ContainerdError> {
        let waited = tokio::time::timeout(
            limit,
            conn.tasks().wait(conn.req(api::WaitRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            })),
        )
        .await;
        match waited {
            Err(_) => Ok(None),
            Ok(r) => {
                Ok(found(r.map_err(call("task wait", id)))?.map(|r| r.into_inner().exit_status))
            }
        }
    }

    /// Stops a container's task: SIGTERM, then SIGKILL after the stop timeout.
    /// The exit code, or `None` when there was no running task.
    pub async fn stop(&self, unit: &str) -> Result<Option<u32>, ContainerdError> {
        let conn = self.connect().await?;
        self.stop_with(&conn, unit).await
    }

    pub(super) async fn stop_with(
        &self,
        conn: &Conn,
        id: &str,
    ) -> Result<Option<u32>, ContainerdError> {
        match self.task_state(conn, id).await? {
            None => return Ok(None),
            Some(ContainerState::Exited(code)) => return Ok(Some(code)),
            Some(ContainerState::Running) => {}
        }
        const SIGTERM: u32 = 15;
        const SIGKILL: u32 = 9;
        self.kill(conn, id, SIGTERM).await?;
        if let Some(code) = self.wait(conn, id, self.stop_timeout).await? {
            return Ok(Some(code));
        }
        log::info!(
            "container {id}: no exit {:?} after SIGTERM; SIGKILL",
            self.stop_timeout
        );
        self.kill(conn, id, SIGKILL).await?;
        self.wait(conn, id, Duration::from_secs(30)).await
    }

    /// Stops and deletes a unit's task, container and snapshot (each only if there).
    pub(super) async fn delete(&self, conn: &Conn, id: &str) -> Result<(), ContainerdError> {
        self.stop_with(conn, id).await?;
        self.delete_task(conn, id).await?;
        found(
            conn.containers()
                .delete(conn.req(api::DeleteContainerRequest { id: id.to_string() }))
                .await
                .map_err(call("container delete", id)),
        )?;
        self.remove_snapshot(conn, id).await
    }

    /// The last `lines` lines of a unit's log.
    pub fn tail(&self, unit: &str, lines: usize) -> Result<Vec<String>, ContainerdError> {
        let path = self.log_path(unit);
        let text = match std::fs::read(&path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&path)(e)),
        };
        let all: Vec<&str> = text.lines().collect();
        Ok(all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|s| s.to_string())
            .collect())
    }
}
