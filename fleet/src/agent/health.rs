//! Health: the one place that knows whether each running instance on this machine works.
//!
//! For every running container whose unit has a `[health]` table, the [`Monitor`] keeps a
//! background task that checks it every `interval` (the first check one interval after the
//! agent found it running), each check bounded by `timeout`: `exec` runs a command in the
//! container ([`Runtime::exec`]), `http` GETs a path (2xx and 3xx are healthy, at most
//! [`HTTP_READ_CAP`] bytes of the answer are read), `tcp` connects. Every check goes to
//! [`target`], the container's address.
//!
//! An instance is `starting` until its first successful check, `healthy` after a success, and
//! `unhealthy` after `retries` consecutive failures. Failures before the first success within
//! `start_period` of the start do not count (Docker's rule). A container is one instance per
//! (spec hash, restart count): a restart or a replacement starts a new instance from
//! `starting`, and the old instance's check task is ended, its late answers dropped. When the
//! container exits or goes, its task ends.
//!
//! What follows from the state (see `reconcile`): an unhealthy instance counts as failed, so
//! with `restart = "always"` or `"on-failure"` its task is stopped and started again (one more
//! restart); with `"never"` it is left running and shown `unhealthy`, as Docker leaves an
//! unhealthy container alone (its checks go on, so it may become healthy again). A change of
//! state wakes the agent's loop at once.

use super::{Container, ContainerState, Runtime};
use crate::unit::{Probe, UnitSpec};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The most bytes of an HTTP check's answer that are read (status line, headers, body).
pub const HTTP_READ_CAP: u64 = 64 * 1024;
/// How much longer than its timeout an exec check may take before it is given up (the runtime
/// enforces the timeout itself, and cleans up after).
const EXEC_GRACE: Duration = Duration::from_secs(5);

/// An instance's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No successful check yet.
    Starting,
    Healthy,
    /// `retries` consecutive checks failed.
    Unhealthy,
}

impl State {
    /// The name reported in the unit's status.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Healthy => "healthy",
            State::Unhealthy => "unhealthy",
        }
    }
}

/// What the checks of one instance found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    /// Consecutive failures that counted.
    pub failures: u32,
    /// When the last check ended (Unix seconds); `None` before the first.
    pub last_check: Option<u64>,
    /// Why the last failed check failed (kept after a success, for the record).
    pub last_failure: Option<String>,
    /// Whether any check succeeded (then the start period is over).
    pub succeeded: bool,
}

impl Default for Status {
    fn default() -> Status {
        Status {
            state: State::Starting,
            failures: 0,
            last_check: None,
            last_failure: None,
            succeeded: false,
        }
    }
}

impl Status {
    /// Records one check's outcome at `now` (Unix seconds); `in_start_period`: the instance
    /// started less than its start period ago. True when the state changed. Pure.
    pub fn record(
        &mut self,
        outcome: Result<(), String>,
        in_start_period: bool,
        retries: u32,
        now: u64,
    ) -> bool {
        let before = self.state;
        self.last_check = Some(now);
        match outcome {
            Ok(()) => {
                self.failures = 0;
                self.succeeded = true;
                self.state = State::Healthy;
            }
            Err(why) => {
                self.last_failure = Some(why);
                // Before the first success, the start period excuses failures.
                if self.succeeded || !in_start_period {
                    self.failures = self.failures.saturating_add(1);
                    if self.failures >= retries {
                        self.state = State::Unhealthy;
                    }
                }
            }
        }
        self.state != before
    }
}

/// One container of a unit: a restart or a replacement is another instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub spec_hash: String,
    pub restarts: u32,
}

impl Instance {
    pub fn of(c: &Container) -> Instance {
        Instance {
            spec_hash: c.spec_hash.clone(),
            restarts: c.restarts,
        }
    }
}

/// A task that is aborted when dropped.
struct Checks(tokio::task::JoinHandle<()>);

impl Drop for Checks {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Entry {
    instance: Instance,
    status: Status,
    _checks: Checks,
}

type Entries = Mutex<BTreeMap<String, Entry>>;

fn lock(m: &Entries) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The health of every checked instance on this machine, and the tasks that check them.
/// Dropping it ends every check.
pub struct Monitor {
    entries: Arc<Entries>,
    /// Woken when an instance's state changes (the agent's loop).
    wake: Option<mpsc::Sender<()>>,
}

impl Monitor {
    /// A monitor that sends on `wake` (if any) whenever an instance's state changes.
    pub fn new(wake: Option<mpsc::Sender<()>>) -> Monitor {
        Monitor {
            entries: Arc::default(),
            wake,
        }
    }

    /// Matches the checks to the containers as `rt` listed them: a running container of a
    /// unit with a health check gets its checks (a new instance starts from `starting`);
    /// checks of instances that exited, were restarted, replaced or removed end.
    pub fn sync<R: Runtime>(
        &self,
        rt: &R,
        desired: &BTreeMap<String, UnitSpec>,
        containers: &[Container],
    ) {
        let checked: BTreeMap<&str, (&Container, &crate::unit::Health)> = containers
            .iter()
            .filter(|c| c.state == ContainerState::Running)
            .filter_map(|c| {
                let h = desired.get(&c.unit)?.health.as_ref()?;
                Some((c.unit.as_str(), (c, h)))
            })
            .collect();
        let mut entries = lock(&self.entries);
        entries.retain(|u, e| {
            checked
                .get(u.as_str())
                .is_some_and(|(c, _)| Instance::of(c) == e.instance)
        });
        for (unit, (c, check)) in checked {
            if entries.contains_key(unit) {
                continue;
            }
            let instance = Instance::of(c);
            let task = tokio::spawn(run_checks(
                Arc::downgrade(&self.entries),
                self.wake.clone(),
                rt.clone(),
                unit.to_string(),
                instance.clone(),
                check.clone(),
            ));
            entries.insert(
                unit.to_string(),
                Entry {
                    instance,
                    status: Status::default(),
                    _checks: Checks(task),
                },
            );
        }
    }

    /// The health of this container, when it is the instance being checked.
    pub fn status(&self, c: &Container) -> Option<Status> {
        lock(&self.entries)
            .get(&c.unit)
            .filter(|e| e.instance == Instance::of(c))
            .map(|e| e.status.clone())
    }

    /// The units whose listed container is unhealthy.
    pub fn unhealthy(&self, containers: &[Container]) -> BTreeSet<String> {
        containers
            .iter()
            .filter(|c| self.status(c).is_some_and(|s| s.state == State::Unhealthy))
            .map(|c| c.unit.clone())
            .collect()
    }

    /// Every checked unit and its health (for discovery and rollouts to read).
    pub fn all(&self) -> BTreeMap<String, Status> {
        lock(&self.entries)
            .iter()
            .map(|(u, e)| (u.clone(), e.status.clone()))
            .collect()
    }
}

/// Checks one instance every interval until it is no longer the one in `entries`.
async fn run_checks<R: Runtime>(
    entries: Weak<Entries>,
    wake: Option<mpsc::Sender<()>>,
    rt: R,
    unit: String,
    instance: Instance,
    check: crate::unit::Health,
) {
    let started = Instant::now();
    loop {
        tokio::time::sleep(check.interval()).await;
        let outcome = probe(&rt, &unit, &check).await;
        let in_start_period = started.elapsed() < check.start_period();
        let Some(entries) = entries.upgrade() else {
            return;
        };
        let changed = {
            let mut map = lock(&entries);
            let Some(e) = map.get_mut(&unit).filter(|e| e.instance == instance) else {
                return;
            };
            let changed = e.status.record(
                outcome,
                in_start_period,
                check.retries,
                crate::registry::now_s(),
            );
            if changed {
                match (e.status.state, &e.status.last_failure) {
                    (State::Unhealthy, Some(why)) => log::warn!(
                        "unit {unit}: unhealthy after {} failed checks: {why}",
                        e.status.failures
                    ),
                    (state, _) => log::info!("unit {unit}: {}", state.as_str()),
                }
            }
            changed
        };
        if changed {
            if let Some(w) = &wake {
                // Full: a wake-up is already pending, which is as good.
                let _ = w.try_send(());
            }
        }
    }
}

/// Where the checks of `unit` on `port` go: the container's address ([`Runtime::address`]):
/// its own on the host's bridge, or loopback for a unit on the host's network.
pub fn target<R: Runtime>(rt: &R, unit: &str, port: u16) -> SocketAddr {
    SocketAddr::new(rt.address(unit), port)
}

/// Runs one check of `unit`, within its timeout: `Err` says why it failed.
pub async fn probe<R: Runtime>(
    rt: &R,
    unit: &str,
    check: &crate::unit::Health,
) -> Result<(), String> {
    let limit = check.timeout();
    let late = || format!("no answer within {limit:?}");
    match &check.probe {
        Probe::Tcp(port) => {
            let addr = target(rt, unit, *port);
            tokio::time::timeout(limit, tcp(addr))
                .await
                .unwrap_or_else(|_| Err(format!("{} to {addr}", late())))
        }
        Probe::Http { port, path } => {
            let addr = target(rt, unit, *port);
            tokio::time::timeout(limit, http(addr, path))
                .await
                .unwrap_or_else(|_| Err(format!("{} from http://{addr}{path}", late())))
        }
        Probe::Exec(argv) => {
            match tokio::time::timeout(limit + EXEC_GRACE, rt.exec(unit, argv, limit)).await {
                Err(_) => Err(late()),
                Ok(Ok(0)) => Ok(()),
                Ok(Ok(code)) => Err(format!("{argv:?} exited with {code}")),
                // The status is the unit's: its name need not be said again.
                Ok(Err(super::RuntimeError::Unit { message, .. })) => Err(message),
                Ok(Err(e)) => Err(e.to_string()),
            }
        }
    }
}

async fn tcp(addr: SocketAddr) -> Result<(), String> {
    tokio::net::TcpStream::connect(addr)
        .await
        .map(drop)
        .map_err(|e| format!("connecting to {addr}: {e}"))
}

/// GETs `path` (HTTP/1.0, the connection closed by the server) and reads at most
/// [`HTTP_READ_CAP`] bytes of the answer: healthy on a 2xx or 3xx status.
async fn http(addr: SocketAddr, path: &str) -> Result<(), String> {
    let url = format!("http://{addr}{path}");
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: caisson-fleet-health\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("{url}: sending the request: {e}"))?;
    let mut answer = Vec::new();
    (&mut s)
        .take(HTTP_READ_CAP)
        .read_to_end(&mut answer)
        .await
        .map_err(|e| format!("{url}: reading the answer: {e}"))?;
    let line = answer.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let code = match (words.next(), words.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(code))) if v.starts_with("HTTP/") => code,
        _ if answer.is_empty() => return Err(format!("{url}: closed without an answer")),
        _ => return Err(format!("{url}: not an HTTP answer: {:?}", line.trim_end())),
    };
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!(
            "{url}: HTTP {}",
            line.trim_end().split_once(' ').map_or("", |(_, s)| s)
        ))
    }
}

/// The loopback address, where units on the host's network listen.
pub fn loopback() -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
}

#[cfg(test)]
#[path = "health_tests.rs"]
mod tests;
