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
//! expires: schedule at once). With container networking on, a third stream watches the subnet
//! claims and the service registrations (routes and DNS follow at once). The timer stays as the fallback: an etcd outage is logged and
//! retried each tick, running containers are left alone until etcd answers again, and a watch
//! whose stream drops resumes from its revision (or, when that was compacted, wakes the loop for
//! a full read). The health monitor ([`health`]) wakes the loop too, when an instance's health
//! changes, so an unhealthy one is restarted and reported at once.
//!
//! When the operator has set a cluster network (`network/config`), the agent claims its
//! machine's subnet under its lease ([`crate::network::SubnetLease`]) on the first tick that
//! finds the config, and again on the first tick under a new lease after a lease loss, or when
//! the claim is found changed (every [`Agent::subnet_verify`], the agent reads its subnet's key:
//! any machine's credentials may write the claims). A claim
//! that fails is logged and tried again on the next tick: the units keep running. Until the
//! claim holds, each tick reads the config key (one small read; no watch, so a machine whose
//! role predates the network's grants loses nothing but this read, logged once).

use crate::config::Config;
use crate::etcd::Event;
use crate::registry::{Keys, MachineRecord, Member};
use crate::store::{Store, StoreError, Target, UnitStatus};
use crate::unit::UnitSpec;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

mod fake;
pub mod health;
mod network;
mod reconcile;
pub mod templates;
mod watch;

use watch::{any_change, leader_gone, machine_joined_or_gone, next_revision, spawn_watch, Watched};

pub use fake::FakeRuntime;
pub use network::{NetState, ROUTES_RESYNC};
pub use reconcile::{
    actions, actions_with_health, apply, local_units, reconcile, reconcile_checked, run_local,
    spec_hash, Action, Container, ContainerState, Runtime, RuntimeError,
};

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
    /// Where the machine remembers its subnet of the cluster network (state partition).
    pub subnet_state: std::path::PathBuf,
    /// The machine's subnet claim, once the cluster network is set.
    subnet: Option<crate::network::SubnetLease>,
    /// How often the agent reads its subnet's key to see that its claim still stands.
    pub subnet_verify: Duration,
    /// When it last did.
    subnet_verified: Option<std::time::Instant>,
    /// The address the machine's peers reach it at (its record's).
    address: String,
    /// The last error claiming a subnet (logged once until it changes).
    subnet_error: Option<String>,
    /// The cluster network's configuration, once read.
    cluster_network: Option<caisson_net::cluster::NetworkConfig>,
    /// The host's container network, routes and service registrations.
    pub net: NetState,
    /// The units' templates, rendered from the endpoints.
    pub templates: templates::Templates,
    /// Whether the last tick found this machine leading.
    pub leading: bool,
    /// The health of the instances on this machine (its changes wake the loop).
    pub health: health::Monitor,
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

/// How often an agent checks that its subnet claim still stands.
pub const SUBNET_VERIFY: Duration = Duration::from_secs(60);

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
            subnet_state: crate::network::lease::STATE_PATH.into(),
            subnet: None,
            subnet_verify: SUBNET_VERIFY,
            subnet_verified: None,
            address: record.address.clone(),
            subnet_error: None,
            cluster_network: None,
            net: NetState::default(),
            templates: templates::Templates::new(&config.volume_root),
            leading: false,
            health: health::Monitor::new(Some(wake.clone())),
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
            self.forget_registrations();
        }
        self.claim_subnet().await;
        self.tend_network().await;
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
        let mut statuses = reconcile_checked(&self.runtime, &desired, &self.health)
            .await
            .map_err(|e| e.to_string())?;
        crate::volumes::purge(&self.store, &self.runtime, &units)
            .await
            .map_err(|e| e.to_string())?;
        let revisions: BTreeMap<String, (UnitSpec, i64)> = desired
            .iter()
            .map(|(u, spec)| {
                let rev = units.get(u).map_or(0, |(_, rev)| *rev);
                (u.clone(), (spec.clone(), rev))
            })
            .collect();
        let endpoints = self.register_services(&revisions, &statuses).await?;
        self.templates
            .update(&desired, &endpoints, &self.runtime, &mut statuses)
            .await;
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
        let _discovery = self.spawn_discovery_watch().await;
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

    /// With container networking on, a second stream watches the subnet claims and every
    /// machine's service registrations, so that routes and the DNS responder follow a change
    /// at once rather than at the next timed tick (the tick reads both again). On a stream of
    /// its own: a machine role without the network's grants loses only this.
    async fn spawn_discovery_watch(&self) -> Option<Task> {
        self.net.host.as_ref()?;
        let keys = &self.store.keys;
        let from = next_revision(&self.store.client, &keys.subnets()).await;
        let watched = |key: String| Watched {
            key,
            prefix: true,
            wanted: any_change,
            only_while: None,
        };
        Some(spawn_watch(
            self.store.client.clone(),
            vec![watched(keys.subnets()), watched(keys.services())],
            from,
            self.wake.clone(),
        ))
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
