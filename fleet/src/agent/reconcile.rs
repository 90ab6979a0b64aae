//! Reconciliation: what the containers on this machine should be, what they are, and the
//! actions between (an unhealthy instance, as [`super::health`] judges it, counts as failed);
//! the [`Runtime`] trait the agent drives (containerd, or the in-memory
//! [`super::FakeRuntime`] in tests); and the loop that runs the local units without etcd.

use super::health::{Monitor, State};
use crate::config::Config;
use crate::registry;
use crate::store::UnitStatus;
use crate::unit::{Restart, UnitError, UnitSpec};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

/// What went wrong running containers.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime cannot be reached.
    #[error("container runtime at {endpoint}: {message}")]
    Unavailable { endpoint: String, message: String },
    /// An operation on one unit's container failed.
    #[error("unit {unit}: {message}")]
    Unit { unit: String, message: String },
    /// The unit cannot start yet (its image is downloading); a later tick tries again.
    #[error("unit {unit}: {message}")]
    Pending { unit: String, message: String },
}

/// A container the agent manages, as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub unit: String,
    /// The hash of the unit spec it was created from ([`spec_hash`]).
    pub spec_hash: String,
    pub state: ContainerState,
    pub restarts: u32,
}

/// A container's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    Running,
    Exited(u32),
}

/// The container runtime, behind a trait so reconciliation runs in plain tests. A runtime is a
/// cheap handle (cloned into each health check's task).
#[allow(async_fn_in_trait)]
pub trait Runtime: Clone + Send + Sync + 'static {
    /// Every container the agent manages.
    async fn list(&self) -> Result<Vec<Container>, RuntimeError>;
    /// The unit as this machine runs it: its registry image pinned to the digest pulled for it
    /// (so a container made from another digest no longer matches).
    fn pin(&self, spec: &UnitSpec) -> UnitSpec {
        spec.clone()
    }
    /// Called for every wanted unit each reconciliation, before [`Runtime::pin`]: looks again,
    /// in the background, at what may have moved (a registry tag).
    async fn refresh(&self, _spec: &UnitSpec) {}
    /// Called after each reconciliation with the wanted units: removes what none of them needs
    /// any more (unused images), when it is time to.
    async fn tidy(&self, _desired: &BTreeMap<String, UnitSpec>) {}
    /// Gets what the unit needs before its container can be (re)created, without blocking the
    /// tick: [`RuntimeError::Pending`] while that is under way (an image downloading).
    async fn prepare(&self, _spec: &UnitSpec) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// Fetches the unit's image if needed, creates its container and starts it.
    async fn start(&self, spec: &UnitSpec, spec_hash: &str) -> Result<(), RuntimeError>;
    /// Starts an exited container again.
    async fn restart(&self, unit: &str) -> Result<(), RuntimeError>;
    /// Stops (SIGTERM, then SIGKILL) and deletes a unit's container (never its volumes).
    async fn remove(&self, unit: &str) -> Result<(), RuntimeError>;
    /// Deletes every volume of a unit that is gone (`destroy --volumes`, see
    /// [`crate::volumes`]); true when there were some. A runtime without volumes has none.
    async fn delete_volumes(&self, _unit: &str) -> Result<bool, RuntimeError> {
        Ok(false)
    }
    /// The last `lines` lines of a unit's output.
    async fn logs(&self, unit: &str, lines: usize) -> Result<Vec<String>, RuntimeError>;
    /// Runs `argv` in the unit's running container (a health check) and waits up to `timeout`
    /// for it to exit (then kills it): its exit code.
    fn exec(
        &self,
        unit: &str,
        argv: &[String],
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<i32, RuntimeError>> + Send {
        let _ = (argv, timeout);
        let unit = unit.to_string();
        async move {
            Err(RuntimeError::Unit {
                unit,
                message: "this container runtime cannot run exec health checks".into(),
            })
        }
    }
    /// Stops the unit's running task (SIGTERM, then SIGKILL) and keeps the container, to be
    /// started again by [`Runtime::restart`] (an unhealthy instance).
    async fn stop_task(&self, unit: &str) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unit {
            unit: unit.to_string(),
            message: "this container runtime cannot stop a task alone".into(),
        })
    }
    /// The address the unit's container listens on, where its health checks go: its address
    /// on the host's bridge, or loopback (host network, or a runtime without a bridge).
    fn address(&self, _unit: &str) -> std::net::IpAddr {
        super::health::loopback()
    }
}

/// The hash that tells whether a container still matches its unit.
pub fn spec_hash(spec: &UnitSpec) -> String {
    let json = serde_json::to_vec(spec).unwrap_or_default();
    hex::encode(&Sha256::digest(&json)[..8])
}

/// One step of reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create and start the unit's container.
    Start(String),
    /// Start the unit's exited container again (its restart policy says so).
    Restart(String),
    /// Remove the container and create it again (the unit changed).
    Replace(String),
    /// Remove the container (the unit is no longer this machine's).
    Remove(String),
    /// Stop the unit's unhealthy container and start it again (its restart policy says so).
    Recover(String),
}

/// What to do to make `actual` match `desired`. Pure.
pub fn actions(desired: &BTreeMap<String, UnitSpec>, actual: &[Container]) -> Vec<Action> {
    actions_with_health(desired, actual, &BTreeSet::new())
}

/// What to do to make `actual` match `desired` when the running containers of `unhealthy`
/// failed their health checks: they count as failed, so `always` and `on-failure` restart them
/// and `never` leaves them running. Pure.
pub fn actions_with_health(
    desired: &BTreeMap<String, UnitSpec>,
    actual: &[Container],
    unhealthy: &BTreeSet<String>,
) -> Vec<Action> {
    let mut out = Vec::new();
    let by_unit: BTreeMap<&str, &Container> = actual.iter().map(|c| (c.unit.as_str(), c)).collect();
    for c in actual {
        if !desired.contains_key(&c.unit) {
            out.push(Action::Remove(c.unit.clone()));
        }
    }
    for (name, spec) in desired {
        match by_unit.get(name.as_str()) {
            None => out.push(Action::Start(name.clone())),
            Some(c) if c.spec_hash != spec_hash(spec) => out.push(Action::Replace(name.clone())),
            Some(c) if c.state == ContainerState::Running => {
                if unhealthy.contains(name) && spec.restart != Restart::Never {
                    out.push(Action::Recover(name.clone()));
                }
            }
            Some(c) => {
                if let ContainerState::Exited(code) = c.state {
                    let again = match spec.restart {
                        Restart::Always => true,
                        Restart::OnFailure => code != 0,
                        Restart::Never => false,
                    };
                    if again {
                        out.push(Action::Restart(name.clone()));
                    }
                }
            }
        }
    }
    out
}

/// Applies the actions; returns the error of each unit that failed or has to wait (others still
/// proceed). A unit is started or replaced only once [`Runtime::prepare`] says its image is
/// there, so a replaced container keeps running while the new image downloads.
pub async fn apply<R: Runtime>(
    rt: &R,
    desired: &BTreeMap<String, UnitSpec>,
    actions: &[Action],
) -> BTreeMap<String, RuntimeError> {
    let mut errors = BTreeMap::new();
    for a in actions {
        let (unit, r) = match a {
            Action::Remove(u) => (u, rt.remove(u).await),
            Action::Restart(u) => {
                // A restart reuses the container's spec: say again what it runs with.
                if desired.get(u).is_some_and(|s| s.privileged) {
                    log::warn!(
                        "unit {u}: restarting privileged: every capability and device, no seccomp filter"
                    );
                }
                (u, rt.restart(u).await)
            }
            Action::Recover(u) => {
                log::warn!("unit {u}: unhealthy; restarting it");
                let r = match rt.stop_task(u).await {
                    Ok(()) => rt.restart(u).await,
                    Err(e) => Err(e),
                };
                (u, r)
            }
            Action::Start(u) | Action::Replace(u) => {
                let Some(spec) = desired.get(u) else { continue };
                (u, start(rt, spec, matches!(a, Action::Replace(_))).await)
            }
        };
        match r {
            Ok(()) => {}
            Err(e @ RuntimeError::Pending { .. }) => {
                log::debug!("{e}");
                errors.insert(unit.clone(), e);
            }
            Err(e) => {
                log::warn!("{e}");
                errors.insert(unit.clone(), e);
            }
        }
    }
    errors
}

/// Prepares, removes the old container when `replace`, and starts the unit's container.
async fn start<R: Runtime>(rt: &R, spec: &UnitSpec, replace: bool) -> Result<(), RuntimeError> {
    rt.prepare(spec).await?;
    if replace {
        rt.remove(&spec.name).await?;
    }
    rt.start(spec, &spec_hash(spec)).await
}

/// Reads every `*.toml` in `dir` (none when the directory does not exist).
pub fn local_units(dir: &Path) -> Result<BTreeMap<String, UnitSpec>, UnitError> {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(UnitError::Read {
                path: dir.display().to_string(),
                message: e.to_string(),
            })
        }
    };
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    for p in paths {
        let spec = UnitSpec::load(&p)?;
        out.insert(spec.name.clone(), spec);
    }
    Ok(out)
}

/// One reconciliation against the runtime, without health checks (a unit with one is
/// reported `running` while it runs); returns the statuses to report.
pub async fn reconcile<R: Runtime>(
    rt: &R,
    desired: &BTreeMap<String, UnitSpec>,
) -> Result<BTreeMap<String, UnitStatus>, RuntimeError> {
    reconcile_inner(rt, desired, None).await
}

/// One reconciliation with the health checks of `health`: unhealthy instances are restarted as
/// their restart policy says, checks follow the containers, and a checked unit that runs is
/// reported `starting`, `healthy` or `unhealthy` (with the last failed check's message).
pub async fn reconcile_checked<R: Runtime>(
    rt: &R,
    desired: &BTreeMap<String, UnitSpec>,
    health: &Monitor,
) -> Result<BTreeMap<String, UnitStatus>, RuntimeError> {
    reconcile_inner(rt, desired, Some(health)).await
}

async fn reconcile_inner<R: Runtime>(
    rt: &R,
    desired: &BTreeMap<String, UnitSpec>,
    health: Option<&Monitor>,
) -> Result<BTreeMap<String, UnitStatus>, RuntimeError> {
    for spec in desired.values() {
        rt.refresh(spec).await;
    }
    let desired: BTreeMap<String, UnitSpec> = desired
        .iter()
        .map(|(name, spec)| (name.clone(), rt.pin(spec)))
        .collect();
    let desired = &desired;
    let before = rt.list().await?;
    let unhealthy = match health {
        Some(m) => {
            m.sync(rt, desired, &before);
            m.unhealthy(&before)
        }
        None => BTreeSet::new(),
    };
    let todo = actions_with_health(desired, &before, &unhealthy);
    let errors = apply(rt, desired, &todo).await;
    let after = rt.list().await?;
    if let Some(m) = health {
        m.sync(rt, desired, &after);
    }
    rt.tidy(desired).await;
    let now = registry::now_s();
    let mut out = BTreeMap::new();
    for name in desired.keys() {
        let c = after.iter().find(|c| &c.unit == name);
        let pending = matches!(errors.get(name), Some(RuntimeError::Pending { .. }));
        let checked = c.and_then(|c| health.and_then(|m| m.status(c)));
        let (state, exit_code) = match c.map(|c| c.state) {
            Some(ContainerState::Running) => match &checked {
                Some(h) => (h.state.as_str(), None),
                None => ("running", None),
            },
            Some(ContainerState::Exited(code)) => ("exited", Some(code)),
            None if pending => ("starting", None),
            None => ("failed", None),
        };
        out.insert(
            name.clone(),
            UnitStatus {
                state: state.to_string(),
                exit_code,
                error: errors.get(name).filter(|_| !pending).map(|e| e.to_string()),
                restarts: c.map_or(0, |c| c.restarts),
                since: now,
                health_error: checked
                    .filter(|h| h.state != State::Healthy)
                    .and_then(|h| h.last_failure),
            },
        );
    }
    Ok(out)
}

/// Without etcd: runs the local units until `stop` resolves.
pub async fn run_local<R: Runtime>(
    config: &Config,
    runtime: &R,
    network: Option<std::sync::Arc<crate::hostnet::HostNet>>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    log::info!(
        "no etcd endpoints configured: running the units in {} on this machine alone",
        config.units_dir.display()
    );
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    // A change of an instance's health wakes the loop at once.
    let (wake, mut woken) = tokio::sync::mpsc::channel(1);
    let health = Monitor::new(Some(wake));
    let mut network_error = None;
    let mut templates = super::templates::Templates::new(&config.volume_root);
    loop {
        if let Some(net) = &network {
            let s = &net.settings;
            let r = net.configure(s.subnet, s.subnet, false).await;
            let text = r.err().map(|e| e.to_string());
            if text.is_some() && text != network_error {
                log::warn!("container network: {}", text.as_deref().unwrap_or(""));
            }
            network_error = text;
        }
        match local_units(&config.units_dir) {
            Ok(desired) => match reconcile_checked(runtime, &desired, &health).await {
                Ok(mut st) => {
                    // Host-network units: reached at the bridge's address.
                    let host = network
                        .as_ref()
                        .and_then(|n| n.subnet())
                        .map(caisson_net::ipam::gateway);
                    let endpoints = local_endpoints(runtime, host, &desired, &st);
                    templates
                        .update(&desired, &endpoints, runtime, &mut st)
                        .await;
                    if let Some(net) = &network {
                        net.set_endpoints(endpoints);
                    }
                    for (u, s) in st.iter().filter(|(_, s)| s.error.is_some()) {
                        log::warn!("unit {u}: {}", s.error.as_deref().unwrap_or(""));
                    }
                    log_changes(&mut shown, &st);
                }
                Err(e) => log::warn!("{e}"),
            },
            Err(e) => log::warn!("{e}"),
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = woken.recv() => {}
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
        }
    }
}

/// Without etcd, discovery serves this machine's own serving instances.
fn local_endpoints<R: Runtime>(
    runtime: &R,
    host: Option<std::net::Ipv4Addr>,
    desired: &BTreeMap<String, UnitSpec>,
    statuses: &BTreeMap<String, UnitStatus>,
) -> caisson_net::endpoint::Endpoints {
    let with_rev: BTreeMap<String, (UnitSpec, i64)> = desired
        .iter()
        .map(|(u, s)| (u.clone(), (s.clone(), 0)))
        .collect();
    let mut out = caisson_net::endpoint::Endpoints::default();
    let reach = crate::services::Reach::Routed;
    for (unit, instance) in
        crate::services::wanted("local", host, reach, &with_rev, statuses, |u| {
            runtime.address(u)
        })
    {
        out.insert(&unit, instance);
    }
    out
}

/// One line per unit whose state changed since the last call (`unit web: running`,
/// `unit job: exited 3 (restarts 0)`, `unit api: unhealthy (restarts 1): <why>`), so the
/// console shows what the agent does, health changes included.
fn log_changes(shown: &mut BTreeMap<String, String>, statuses: &BTreeMap<String, UnitStatus>) {
    shown.retain(|u, _| statuses.contains_key(u));
    for (u, s) in statuses {
        let mut line = match s.exit_code {
            Some(code) => format!("{} {code} (restarts {})", s.state, s.restarts),
            None => format!("{} (restarts {})", s.state, s.restarts),
        };
        if let Some(why) = &s.health_error {
            line = format!("{line}: {why}");
        }
        if shown.get(u) != Some(&line) {
            log::info!("unit {u}: {line}");
            shown.insert(u.clone(), line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::FakeRuntime;

    fn spec(name: &str, restart: &str) -> UnitSpec {
        UnitSpec::parse(
            name,
            &format!("restart = \"{restart}\"\n[image]\npath = \"/i.tar\""),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn reconciles_starts_restarts_replaces_removes() {
        let rt = FakeRuntime::default();
        let mut desired = BTreeMap::new();
        desired.insert("a".to_string(), spec("a", "always"));
        desired.insert("b".to_string(), spec("b", "on-failure"));
        desired.insert("c".to_string(), spec("c", "never"));
        let st = reconcile(&rt, &desired).await.unwrap();
        assert_eq!(rt.units(), ["a", "b", "c"]);
        assert!(st.values().all(|s| s.state == "running"));
        rt.exit("a", 0);
        rt.exit("b", 0);
        rt.exit("c", 3);
        assert_eq!(
            actions(&desired, &rt.list().await.unwrap()),
            [Action::Restart("a".into())]
        );
        let st = reconcile(&rt, &desired).await.unwrap();
        assert_eq!(st["a"].state, "running");
        assert_eq!(st["a"].restarts, 1);
        assert_eq!(
            (st["b"].state.as_str(), st["b"].exit_code),
            ("exited", Some(0))
        );
        assert_eq!(st["c"].exit_code, Some(3));
        // A changed unit is replaced; a unit no longer wanted is removed.
        desired.insert(
            "a".to_string(),
            UnitSpec {
                command: vec!["/x".into()],
                ..spec("a", "always")
            },
        );
        desired.remove("c");
        let todo = actions(&desired, &rt.list().await.unwrap());
        assert!(todo.contains(&Action::Replace("a".into())));
        assert!(todo.contains(&Action::Remove("c".into())));
        reconcile(&rt, &desired).await.unwrap();
        assert_eq!(rt.units(), ["a", "b"]);
        // A failed start is reported, the others proceed.
        rt.failing.lock().unwrap().push("d".into());
        desired.insert("d".to_string(), spec("d", "always"));
        let st = reconcile(&rt, &desired).await.unwrap();
        assert_eq!(st["d"].state, "failed");
        assert!(st["d"]
            .error
            .as_deref()
            .unwrap()
            .contains("image import failed"));
    }

    #[test]
    fn local_units_from_a_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(local_units(&dir.path().join("none")).unwrap().is_empty());
        std::fs::write(dir.path().join("web.toml"), "[image]\npath = \"/w.tar\"").unwrap();
        std::fs::write(dir.path().join("README"), "not a unit").unwrap();
        assert_eq!(
            local_units(dir.path()).unwrap().keys().collect::<Vec<_>>(),
            ["web"]
        );
        std::fs::write(dir.path().join("bad.toml"), "[image]\npath = \"w.tar\"").unwrap();
        assert!(local_units(dir.path())
            .unwrap_err()
            .to_string()
            .contains("image.path"));
    }
}
