//! The agent: keeps its machine registered, schedules when it leads, and reconciles the
//! containers on its machine with the units assigned to it (or, without etcd, with the unit
//! files in `/etc/caisson/units/`).
//!
//! The loop runs a tick (heartbeat, campaign, schedule when leading, reconcile, report) when etcd
//! says something it cares about changed, and otherwise every third of the lease TTL. A watch
//! task sends a wake-up on a channel: every agent watches the leader key (a deletion means the
//! leader is gone: campaign at once), the units, its own assignment and, while it waits for a
//! slot to reboot, the reboot lock, all on one etcd stream (one connection per agent); the
//! leader also watches the machine records on a second (a machine that registers or whose lease
//! expires: schedule at once). The timer stays as the fallback: an etcd outage is logged and
//! retried each tick, running containers are left alone until etcd answers again, and a watch
//! whose stream drops resumes from its revision (or, when that was compacted, wakes the loop for
//! a full read).

use crate::config::Config;
use crate::etcd::{Client, Event};
use crate::registry::{self, Keys, MachineRecord, Member};
use crate::store::{Store, StoreError, Target, UnitStatus};
use crate::unit::{Restart, UnitError, UnitSpec};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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

/// The container runtime, behind a trait so reconciliation runs in plain tests.
#[allow(async_fn_in_trait)]
pub trait Runtime {
    /// Every container the agent manages.
    async fn list(&self) -> Result<Vec<Container>, RuntimeError>;
    /// Gets what the unit needs before its container can be (re)created, without blocking the
    /// tick: [`RuntimeError::Pending`] while that is under way (an image downloading).
    async fn prepare(&self, _spec: &UnitSpec) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// Fetches the unit's image if needed, creates its container and starts it.
    async fn start(&self, spec: &UnitSpec, spec_hash: &str) -> Result<(), RuntimeError>;
    /// Starts an exited container again.
    async fn restart(&self, unit: &str) -> Result<(), RuntimeError>;
    /// Stops (SIGTERM, then SIGKILL) and deletes a unit's container.
    async fn remove(&self, unit: &str) -> Result<(), RuntimeError>;
    /// The last `lines` lines of a unit's output.
    async fn logs(&self, unit: &str, lines: usize) -> Result<Vec<String>, RuntimeError>;
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
}

/// What to do to make `actual` match `desired`. Pure.
pub fn actions(desired: &BTreeMap<String, UnitSpec>, actual: &[Container]) -> Vec<Action> {
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
            Action::Restart(u) => (u, rt.restart(u).await),
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

/// One reconciliation against the runtime; returns the statuses to report.
pub async fn reconcile<R: Runtime>(
    rt: &R,
    desired: &BTreeMap<String, UnitSpec>,
) -> Result<BTreeMap<String, UnitStatus>, RuntimeError> {
    let before = rt.list().await?;
    let todo = actions(desired, &before);
    let errors = apply(rt, desired, &todo).await;
    let after = rt.list().await?;
    let now = registry::now_s();
    let mut out = BTreeMap::new();
    for name in desired.keys() {
        let c = after.iter().find(|c| &c.unit == name);
        let pending = matches!(errors.get(name), Some(RuntimeError::Pending { .. }));
        let (state, exit_code) = match c.map(|c| c.state) {
            Some(ContainerState::Running) => ("running", None),
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
            },
        );
    }
    Ok(out)
}

/// How many lines of each unit's output the agent publishes for `caisson-fleet logs`.
pub const LOG_LINES: usize = 50;

/// The agent's state between ticks in a cluster.
pub struct Agent<R: Runtime> {
    pub store: Store,
    pub member: Member,
    pub runtime: R,
    /// How long the loop waits for a watch's wake-up before it ticks anyway.
    pub tick: Duration,
    /// Where the updater asks for a reboot, and where the init takes it.
    pub reboot: RebootPaths,
    reported: BTreeMap<String, UnitStatus>,
    logged: BTreeMap<String, String>,
    /// The init was asked to reboot on this boot: nothing more to ask.
    reboot_asked: bool,
    /// The version already said to wait for the lock (one log line, not one per tick).
    waiting_told: Option<String>,
    /// This boot has settled (the updater said so) or the machine held no slot of the reboot
    /// lock: nothing left to give back, and the agent may take a slot for the next reboot.
    settled: bool,
    /// When the agent first found its slot held while the boot had not settled (for the log).
    unsettled_since: Option<std::time::Instant>,
    /// Whether the late warning about an unsettled boot was logged.
    unsettled_warned: bool,
    /// Whether the last tick found this machine leading.
    pub leading: bool,
    /// The watches' and the keepalive's wake-ups: a tick is due.
    wake: mpsc::Sender<()>,
    woken: mpsc::Receiver<()>,
    /// The leader's watch on the machine records (none while following).
    machines_watch: Option<Task>,
    /// The task that renews the lease, while [`Agent::run`] runs: ticks then only rewrite the
    /// record (without it, as in tests that tick by hand, each tick renews the lease too).
    keepalive: Option<Task>,
    /// The updater asked for a reboot and the lock had no free slot: a change to the lock wakes
    /// the loop.
    waiting_for_lock: Arc<AtomicBool>,
}

/// A background task that ends with its owner (also when the owner's future is dropped, as a
/// crashed agent's would be in tests).
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One key an agent watches (every key under it when `prefix`), and which of its changes
/// matter.
struct Watched {
    key: String,
    prefix: bool,
    wanted: fn(&Event) -> bool,
    /// Changes matter only while this is set (none: always).
    only_while: Option<Arc<AtomicBool>>,
}

/// Watches `keys` from revision `from`, all on one etcd stream (one connection), and sends a
/// wake-up for each batch with a change that its key's `wanted` says matters. A dropped stream
/// resumes from each key's revision (the client does that); when etcd compacted that revision
/// away or refused the watch, the task watches again from the current revision and wakes the
/// loop for a full read.
fn spawn_watch(client: Client, keys: Vec<Watched>, from: i64, wake: mpsc::Sender<()>) -> Task {
    Task(tokio::spawn(async move {
        let ranges: Vec<(&str, bool)> = keys.iter().map(|k| (k.key.as_str(), k.prefix)).collect();
        let mut watch = client.watch_all(&ranges, from);
        loop {
            match watch.next_tagged().await {
                Ok((i, events)) => {
                    let wanted = keys.get(i).is_none_or(|k| {
                        k.only_while
                            .as_ref()
                            .is_none_or(|on| on.load(Ordering::SeqCst))
                            && events.iter().any(k.wanted)
                    });
                    if wanted {
                        // Full: a wake-up is already pending, which is as good.
                        let _ = wake.try_send(());
                    }
                }
                Err(e) => {
                    log::warn!("{e}; reading the fleet's state again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let from = match keys.first() {
                        Some(k) => next_revision(&client, &k.key).await,
                        None => 0,
                    };
                    watch = client.watch_all(&ranges, from);
                    let _ = wake.try_send(());
                }
            }
        }
    }))
}

/// The revision after the store's current one, for a watch that must miss nothing after a read
/// that follows it (0, "from now on", when etcd does not answer).
async fn next_revision(client: &Client, key: &str) -> i64 {
    client.range(key, false).await.map_or(0, |r| r.revision + 1)
}

/// Changes to the leader key that matter: its deletion (the leader left or its lease expired).
fn leader_gone(e: &Event) -> bool {
    matches!(e, Event::Delete(_))
}

/// Changes to machine records that matter to the leader: a machine registers or is gone. The
/// heartbeats that rewrite a record do not (the leader's own tick would wake it again).
fn machine_joined_or_gone(e: &Event) -> bool {
    match e {
        Event::Delete(_) => true,
        Event::Put(kv) => kv.create_revision == kv.mod_revision,
    }
}

fn any_change(_: &Event) -> bool {
    true
}

/// The updater's `etcd-lock` strategy (caisson_layout::paths::REBOOT_NEEDED): the updater
/// writes the marker, the agent takes the fleet's reboot lock, then asks the init to reboot.
/// After the reboot the agent keeps its slot until the updater writes `settled`
/// (caisson_layout::paths::BOOT_SETTLED): the new version is blessed and its success recorded,
/// or the boot loader fell back and the rollback is recorded.
#[derive(Debug, Clone)]
pub struct RebootPaths {
    pub marker: std::path::PathBuf,
    pub control_socket: std::path::PathBuf,
    pub settled: std::path::PathBuf,
}

impl Default for RebootPaths {
    fn default() -> Self {
        RebootPaths {
            marker: caisson_layout::paths::REBOOT_NEEDED.into(),
            control_socket: caisson_layout::paths::CONTROL_SOCKET.into(),
            settled: caisson_layout::paths::BOOT_SETTLED.into(),
        }
    }
}

/// After this long holding a slot of the reboot lock on an unsettled boot, the agent warns that
/// the rolling update waits for this machine.
pub const UNSETTLED_WARNING: Duration = Duration::from_secs(600);

/// How soon a lease renewal that failed (not because the lease is gone) is tried again.
const KEEPALIVE_RETRY: Duration = Duration::from_secs(1);

/// How often a machine holding a slot of the reboot lock looks for the updater's marker.
const SETTLED_POLL: Duration = Duration::from_millis(500);

/// Resolves once `path` exists, looking every [`SETTLED_POLL`] (first after one period, so a
/// marker whose release failed is retried at that pace); never when `look` is false.
async fn appears(path: &Path, look: bool) {
    if !look {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(SETTLED_POLL).await;
        if tokio::fs::try_exists(path).await.unwrap_or(false) {
            return;
        }
    }
}

impl<R: Runtime> Agent<R> {
    /// Joins the cluster (retrying until etcd answers). A slot of the reboot lock this machine
    /// still holds is given back by [`Agent::release_when_settled`] once the boot has settled.
    pub async fn join(
        config: &Config,
        record: MachineRecord,
        runtime: R,
    ) -> anyhow::Result<Agent<R>> {
        if config.insecure {
            log::warn!(
                "insecure = true: etcd traffic may be plain HTTP and unauthenticated; anyone who \
                 reaches etcd ({}) controls every machine of this fleet",
                config.endpoints.join(", ")
            );
        }
        let client = config.client()?;
        if let Some(user) = client.user() {
            log::info!("etcd user {user}");
        }
        let keys = Keys::new(&config.prefix);
        let mut wait = Duration::from_millis(200);
        let member = loop {
            match Member::join(client.clone(), keys.clone(), record.clone(), config.ttl_s).await {
                Ok(m) => break m,
                Err(e) => {
                    log::warn!("joining the fleet: {e}; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        };
        log::info!(
            "joined the fleet as {} (lease {:x})",
            record.id,
            member.lease()
        );
        let (wake, woken) = mpsc::channel(1);
        Ok(Agent {
            store: Store::new(client, keys),
            member,
            runtime,
            tick: renewal(config.ttl_s),
            reboot: RebootPaths::default(),
            reported: BTreeMap::new(),
            logged: BTreeMap::new(),
            reboot_asked: false,
            waiting_told: None,
            settled: false,
            unsettled_since: None,
            unsettled_warned: false,
            leading: false,
            wake,
            woken,
            machines_watch: None,
            keepalive: None,
            waiting_for_lock: Arc::default(),
        })
    }

    /// Gives back the slot of the fleet's reboot lock this machine took before its reboot,
    /// once this boot has settled: the updater wrote [`RebootPaths::settled`] (the new version
    /// is blessed and its success recorded, or the boot loader fell back and the rollback is
    /// recorded). Until then the slot stays held, so a version that fails late does not spread
    /// to the next machine; the agent asks again on each tick. A machine that holds no slot has
    /// nothing to wait for. True once settled (then the agent may take a slot again).
    ///
    /// If the updater never writes the marker (not running, not configured for this machine, or
    /// its rounds fail) the slot stays held and the rolling update waits: the safe side. The
    /// agent warns after [`UNSETTLED_WARNING`]; `caisson-fleet lock release ID` frees it by hand.
    pub async fn release_when_settled(&mut self) -> bool {
        if self.settled {
            return true;
        }
        let lock = crate::lock::RebootLock::new(self.store.client.clone(), self.store.keys.lock());
        let me = self.member.id().to_string();
        match tokio::fs::read_to_string(&self.reboot.settled).await {
            Ok(how) => {
                match lock.release(&me).await {
                    Ok(true) => log::info!(
                        "this boot has settled ({}): released the reboot lock held by {me}",
                        how.trim()
                    ),
                    Ok(false) => {}
                    Err(e) => {
                        log::warn!("releasing the reboot lock: {e}; trying again on the next tick");
                        return false;
                    }
                }
                self.settled = true;
                return true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("reading {}: {e}", self.reboot.settled.display()),
        }
        match lock.status().await {
            Ok(s) if !s.holders.contains(&me) => {
                self.settled = true;
                return true;
            }
            Ok(_) => {}
            Err(e) => {
                log::warn!("reading the reboot lock: {e}");
                return false;
            }
        }
        match self.unsettled_since {
            None => {
                log::info!(
                    "{me} holds a slot of the fleet's reboot lock: keeping it until this boot has settled ({} from the updater)",
                    self.reboot.settled.display()
                );
                self.unsettled_since = Some(std::time::Instant::now());
            }
            Some(t) if !self.unsettled_warned && t.elapsed() >= UNSETTLED_WARNING => {
                log::warn!(
                    "{me} still holds a slot of the fleet's reboot lock after {:?}: no {} from the updater (is caisson-update agent running?); the rolling update waits; `caisson-fleet lock release {me}` frees it by hand",
                    t.elapsed(),
                    self.reboot.settled.display()
                );
                self.unsettled_warned = true;
            }
            Some(_) => {}
        }
        false
    }

    /// When the updater asked for a reboot: take a slot of the fleet's reboot lock, then ask the
    /// init to reboot. Without a slot, asks again on the next tick. True once the init took it.
    pub async fn reboot_if_asked(&mut self) -> bool {
        if self.reboot_asked {
            return true;
        }
        let Ok(text) = tokio::fs::read_to_string(&self.reboot.marker).await else {
            return false;
        };
        let version = text.trim().to_string();
        let lock = crate::lock::RebootLock::new(self.store.client.clone(), self.store.keys.lock());
        let acquired = lock.acquire(self.member.id()).await;
        self.waiting_for_lock
            .store(matches!(acquired, Ok(false)), Ordering::SeqCst);
        match acquired {
            Ok(true) => {
                log::info!("holding the fleet's reboot lock: rebooting into {version}");
                let socket = self.reboot.control_socket.clone();
                let asked = tokio::task::spawn_blocking(move || {
                    caisson_layout::control::request_reboot(&socket)
                })
                .await;
                match asked {
                    Ok(Ok(())) => self.reboot_asked = true,
                    Ok(Err(e)) => log::warn!("{e}; asking again on the next tick"),
                    Err(e) => log::warn!("asking the init to reboot: {e}"),
                }
            }
            Ok(false) => {
                if self.waiting_told.as_deref() != Some(version.as_str()) {
                    log::info!("{version} waits for a slot of the fleet's reboot lock");
                    self.waiting_told = Some(version);
                }
            }
            Err(e) => log::warn!("taking the fleet's reboot lock: {e}"),
        }
        self.reboot_asked
    }

    /// One tick: heartbeat, lead if possible, reconcile, report.
    pub async fn tick(&mut self) -> Result<(), String> {
        let registered_again = if self.keepalive.is_some() {
            self.member.refresh().await
        } else {
            self.member.heartbeat().await
        };
        if registered_again.map_err(|e| e.to_string())? {
            self.reported.clear();
            self.logged.clear();
        }
        self.leading = self.member.campaign().await.map_err(|e| e.to_string())?;
        if !self.leading {
            self.machines_watch = None;
        } else {
            if self.machines_watch.is_none() {
                // From before the pass reads the machines: no deletion falls between the two.
                let from = next_revision(&self.store.client, &self.store.keys.leader()).await;
                let machines = Watched {
                    key: self.store.keys.machines(),
                    prefix: true,
                    wanted: machine_joined_or_gone,
                    only_while: None,
                };
                self.machines_watch = Some(spawn_watch(
                    self.store.client.clone(),
                    vec![machines],
                    from,
                    self.wake.clone(),
                ));
            }
            if let Some(s) = self
                .store
                .schedule_pass(&self.member.leader_fence())
                .await
                .map_err(|e| e.to_string())?
            {
                for (u, n) in &s.unplaced {
                    log::debug!("unit {u}: {n} instance(s) could not be placed");
                }
            }
        }
        let me = self.member.id().to_string();
        let Some(assigned) = self.own_assignment().await? else {
            return Ok(());
        };
        let units = self.store.units().await.map_err(|e| e.to_string())?;
        let desired: BTreeMap<String, UnitSpec> = assigned
            .iter()
            .filter_map(|u| units.get(u))
            .filter(|(r, _)| r.target == Target::Running)
            .map(|(r, _)| (r.spec.name.clone(), r.spec.clone()))
            .collect();
        let statuses = reconcile(&self.runtime, &desired)
            .await
            .map_err(|e| e.to_string())?;
        for (u, st) in &statuses {
            let same = self.reported.get(u).is_some_and(|old| {
                UnitStatus {
                    since: st.since,
                    ..old.clone()
                } == *st
            });
            if !same {
                self.store
                    .report(&me, u, st, self.member.lease())
                    .await
                    .map_err(|e| e.to_string())?;
                self.reported.insert(u.clone(), st.clone());
            }
        }
        for u in statuses.keys() {
            if let Ok(lines) = self.runtime.logs(u, LOG_LINES).await {
                let text = lines.join("\n");
                if self.logged.get(u) == Some(&text) {
                    continue;
                }
                let key = self.store.keys.logs(&me, u);
                self.logged.insert(u.clone(), text.clone());
                self.store
                    .client
                    .put(&key, text, self.member.lease())
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        let gone: Vec<String> = self
            .reported
            .keys()
            .filter(|u| !statuses.contains_key(*u))
            .cloned()
            .collect();
        for u in gone {
            self.store
                .clear_status(&me, &u)
                .await
                .map_err(|e| e.to_string())?;
            self.reported.remove(&u);
        }
        Ok(())
    }

    /// The units assigned to this machine; `None` when the assignment does not decode (logged
    /// once): the containers are then left as they are until the leader writes it again.
    async fn own_assignment(&self) -> Result<Option<std::collections::BTreeSet<String>>, String> {
        let key = self.store.keys.assign(self.member.id());
        match self.store.assigned(self.member.id()).await {
            Ok((units, _)) => {
                self.store.skipped.note_one(&key, None);
                Ok(Some(units))
            }
            Err(StoreError::Invalid(bad)) => {
                self.store.skipped.note_one(&key, Some(&bad));
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Ticks until `stop` resolves, then leaves the fleet (its units move elsewhere): at once
    /// when a watch sees a change that matters, otherwise every [`Agent::tick`].
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        self.keepalive = Some(self.spawn_keepalive());
        let _watches = self.spawn_watches().await;
        loop {
            if let Err(e) = self.tick().await {
                log::warn!("fleet tick: {e} (containers keep running; retrying)");
            }
            // A slot taken before this boot is given back only once the boot has settled; a
            // new one is taken only after that.
            if self.release_when_settled().await {
                self.reboot_if_asked().await;
            }
            // While this machine holds a slot for a boot that has not settled, the updater's
            // marker is looked for more often than the tick: the next machine waits for it.
            let holding = !self.settled && self.unsettled_since.is_some();
            tokio::select! {
                biased;
                _ = &mut stop => break,
                _ = self.woken.recv() => {}
                _ = appears(&self.reboot.settled, holding) => {}
                _ = tokio::time::sleep(self.tick) => {}
            }
        }
        self.keepalive = None;
        self.machines_watch = None;
        if let Err(e) = self.member.leave().await {
            log::warn!("leaving the fleet: {e}");
        }
    }

    /// The watches every agent keeps, on one stream: the leader key, the units, its own
    /// assignment, and the reboot lock (which matters only while this machine waits for a slot:
    /// a slot given back elsewhere is taken at once), from the current revision (the first tick
    /// reads after it).
    async fn spawn_watches(&self) -> Task {
        let keys = &self.store.keys;
        let from = next_revision(&self.store.client, &keys.leader()).await;
        let watched = |key: String, prefix: bool, wanted: fn(&Event) -> bool| Watched {
            key,
            prefix,
            wanted,
            only_while: None,
        };
        let lock = Watched {
            only_while: Some(self.waiting_for_lock.clone()),
            ..watched(keys.lock(), true, any_change)
        };
        spawn_watch(
            self.store.client.clone(),
            vec![
                watched(keys.leader(), false, leader_gone),
                watched(keys.units(), true, any_change),
                watched(keys.assign(self.member.id()), false, any_change),
                lock,
            ],
            from,
            self.wake.clone(),
        )
    }

    /// Renews the machine's lease every third of its TTL on its own task (a renewal that fails
    /// is tried again after [`KEEPALIVE_RETRY`]; the tick renews nothing while this runs): a tick
    /// that spends longer than the TTL starting or stopping containers (an image import, a
    /// container that ignores SIGTERM) must not let the lease expire, or the machine's units
    /// would be moved away while they run. When the lease is gone anyway, it wakes the loop to
    /// register again.
    fn spawn_keepalive(&self) -> Task {
        let client = self.store.client.clone();
        let lease = self.member.lease_handle();
        let every = renewal(self.member.ttl_s());
        let wake = self.wake.clone();
        Task(tokio::spawn(async move {
            let mut wait = every;
            loop {
                tokio::time::sleep(wait).await;
                let id = lease.load(Ordering::SeqCst);
                wait = every;
                match client.lease_keepalive(id).await {
                    Ok(_) => {}
                    Err(crate::etcd::EtcdError::LeaseExpired(_)) => {
                        let _ = wake.try_send(());
                    }
                    Err(e) => {
                        // An overloaded or unreachable etcd: try again soon, well within the TTL.
                        log::debug!("lease keepalive: {e}");
                        wait = KEEPALIVE_RETRY.min(every);
                    }
                }
            }
        }))
    }
}

/// How often a lease of `ttl_s` seconds is renewed (and the fallback tick): a third of it.
fn renewal(ttl_s: i64) -> Duration {
    Duration::from_millis((ttl_s.max(0) as u64 * 1000 / 3).max(500))
}

/// Without etcd: runs the local units until `stop` resolves.
pub async fn run_local<R: Runtime>(
    config: &Config,
    runtime: &R,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    log::info!(
        "no etcd endpoints configured: running the units in {} on this machine alone",
        config.units_dir.display()
    );
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    loop {
        match local_units(&config.units_dir) {
            Ok(desired) => match reconcile(runtime, &desired).await {
                Ok(st) => {
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
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
        }
    }
}

/// One line per unit whose state changed since the last call (`unit web: running`,
/// `unit job: exited 3 (restarts 0)`), so the console shows what the agent does.
fn log_changes(shown: &mut BTreeMap<String, String>, statuses: &BTreeMap<String, UnitStatus>) {
    shown.retain(|u, _| statuses.contains_key(u));
    for (u, s) in statuses {
        let line = match s.exit_code {
            Some(code) => format!("{} {code} (restarts {})", s.state, s.restarts),
            None => format!("{} (restarts {})", s.state, s.restarts),
        };
        if shown.get(u) != Some(&line) {
            log::info!("unit {u}: {line}");
            shown.insert(u.clone(), line);
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
