//! The service supervisor's state machine. It runs on PID1's main thread: events (exits, control
//! requests, signals) come in, [`Supervisor::tick`] starts, restarts, probes and stops services,
//! and returns [`Notice`]s for the main loop. Time is passed in, so tests drive it with a fake
//! clock and the recording [`Syscall`].

use crate::backoff::Backoff;
use crate::cgroup::Cgroups;
use crate::command::{Commands, Reply};
use crate::deps;
use crate::logs::OutputSink;
use crate::reaper::{ChildId, Reaper};
use crate::service::{Kind, ReadyCheck, Restart, ServiceError, ServiceSpec};
use crate::sys::{ExecPlan, Exit, Pid, Sig, Syscall};
use crate::users;
use caisson_layout::control::ServiceStatus;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often readiness is probed.
const PROBE_EVERY: Duration = Duration::from_millis(200);

/// What happens when a stopping service has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    Stay,
    Start,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Waiting for its dependencies.
    Waiting,
    Running {
        pid: ChildId,
        since: Instant,
        ready: bool,
        probe: Option<ChildId>,
        next_probe: Instant,
    },
    /// Waiting to be restarted.
    Backoff { until: Instant },
    /// Its processes were signalled; done once the main one (`pid`, until collected) and every
    /// other one in its cgroup are gone (see `stop.rs`).
    Stopping {
        pid: Option<ChildId>,
        kill_at: Instant,
        killed: bool,
        then: AfterStop,
    },
    /// Stopped on request (or at shutdown).
    Stopped,
    /// A oneshot that completed, or a daemon that exited 0 without restart.
    Exited,
    /// Will not be started again without a request.
    Failed(String),
}

#[derive(Debug)]
struct Svc {
    spec: Option<ServiceSpec>,
    state: State,
    failures: u32,
    restarts: u32,
    last_exit: Option<Exit>,
    ever_started: bool,
    required: bool,
    /// Processes of its last run survived SIGKILL: not waited for again, and no automatic start
    /// beside them (a control request tries again).
    abandoned: bool,
}

impl Svc {
    fn is_ready(&self) -> bool {
        matches!(self.state, State::Running { ready: true, .. })
            || (self.state == State::Exited
                && self.spec.as_ref().is_some_and(|s| s.kind == Kind::Oneshot))
    }

    fn is_running(&self) -> bool {
        matches!(self.state, State::Running { .. } | State::Stopping { .. })
    }

    fn child(&self) -> Option<ChildId> {
        match self.state {
            State::Running { pid, .. } => Some(pid),
            State::Stopping { pid, .. } => pid,
            _ => None,
        }
    }

    fn pid(&self) -> Option<Pid> {
        self.child().map(|c| c.pid)
    }

    /// Whether a service that runs `after` this one may start.
    fn settled(&self) -> bool {
        self.is_ready()
            || matches!(
                self.state,
                State::Exited | State::Failed(_) | State::Stopped
            )
            || (self.ever_started && matches!(self.state, State::Backoff { .. }))
    }
}

/// What the main loop must do after a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Every required service is ready, for the first time.
    Ready,
    /// Every required service has been ready for the healthy period: bless the boot entry.
    Healthy,
    /// Shutdown requested and every service has stopped.
    ShutdownDone,
}

/// A control request on a service that cannot be done.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("no service named {0:?}")]
    Unknown(String),
    #[error("the machine is shutting down")]
    ShuttingDown,
    #[error("service {0} has no usable definition: {1}")]
    Broken(String, String),
}

/// Supervisor settings.
pub struct Config {
    /// The root for `/etc/passwd` and `/etc/group` (`/`).
    pub root: PathBuf,
    /// Where services' cgroups go; `None` runs them in the init's cgroup.
    pub cgroups: Option<Cgroups>,
    pub backoff: Backoff,
    /// How long every required service must stay ready before [`Notice::Healthy`].
    pub healthy_after: Duration,
    /// PATH for services that set none.
    pub default_path: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from("/"),
            cgroups: None,
            backoff: Backoff::default(),
            healthy_after: Duration::from_secs(30),
            default_path: "/usr/sbin:/usr/bin:/sbin:/bin".into(),
        }
    }
}

/// The supervisor.
pub struct Supervisor {
    sys: Arc<dyn Syscall>,
    reaper: Arc<Reaper>,
    output: Arc<dyn OutputSink>,
    config: Config,
    order: Vec<String>,
    services: BTreeMap<String, Svc>,
    /// Services' and probes' processes; exits are matched by [`ChildId`], never by pid alone
    /// (see [`crate::reaper`]).
    pids: HashMap<ChildId, String>,
    probes: HashMap<ChildId, String>,
    shutting_down: bool,
    ready_announced: bool,
    healthy_since: Option<Instant>,
    healthy_announced: bool,
    shutdown_announced: bool,
    /// Pseudo services (`network`, `modules`) not settled yet: services with one of them in
    /// `after` wait (see SERVICES.md).
    held: std::collections::BTreeSet<String>,
    /// Commands of the control channel's `exec`.
    commands: Commands,
}

impl Supervisor {
    /// A supervisor for `specs`, plus `broken` definitions (which count as failed).
    pub fn new(
        sys: Arc<dyn Syscall>,
        reaper: Arc<Reaper>,
        output: Arc<dyn OutputSink>,
        config: Config,
        specs: Vec<ServiceSpec>,
        broken: Vec<(String, ServiceError)>,
    ) -> Self {
        let (order, cycle) = match deps::start_order(&specs) {
            Ok(order) => (order, None),
            Err(e) => {
                let deps::DepError::Cycle(names) = &e;
                let rest: Vec<ServiceSpec> = specs
                    .iter()
                    .filter(|s| !names.contains(&s.name))
                    .cloned()
                    .collect();
                let mut order = deps::start_order(&rest).unwrap_or_default();
                let missing: Vec<String> = names
                    .iter()
                    .filter(|n| !order.contains(n))
                    .cloned()
                    .collect();
                order.extend(missing);
                (order, Some((names.clone(), e.to_string())))
            }
        };
        let mut services = BTreeMap::new();
        for spec in specs {
            let mut state = State::Waiting;
            if let Some((names, msg)) = &cycle {
                if names.contains(&spec.name) {
                    log::error!("{msg}");
                    state = State::Failed(msg.clone());
                }
            }
            let required = spec.required;
            services.insert(
                spec.name.clone(),
                Svc {
                    spec: Some(spec),
                    state,
                    failures: 0,
                    restarts: 0,
                    last_exit: None,
                    ever_started: false,
                    required,
                    abandoned: false,
                },
            );
        }
        let mut order = order;
        for (name, err) in broken {
            log::error!("{err}");
            order.push(name.clone());
            services.insert(
                name,
                Svc {
                    spec: None,
                    state: State::Failed(err.to_string()),
                    failures: 0,
                    restarts: 0,
                    last_exit: None,
                    ever_started: false,
                    required: true,
                    abandoned: false,
                },
            );
        }
        Supervisor {
            sys,
            reaper,
            output,
            config,
            order,
            services,
            pids: HashMap::new(),
            probes: HashMap::new(),
            shutting_down: false,
            ready_announced: false,
            healthy_since: None,
            healthy_announced: false,
            shutdown_announced: false,
            held: Default::default(),
            commands: Commands::default(),
        }
    }

    /// Holds back services with the pseudo service `name` in `after` (`network`, `modules`)
    /// until [`Supervisor::release`] (unless a real service has that name).
    pub fn hold(&mut self, name: &str) {
        self.held.insert(name.to_string());
    }

    /// The pseudo service `name` has settled: release the services after it.
    pub fn release(&mut self, name: &str) {
        self.held.remove(name);
    }

    /// The start order (shutdown goes the other way).
    pub fn order(&self) -> &[String] {
        &self.order
    }

    /// A child exited. Every child is registered before its exit can be delivered (it is started
    /// on this thread, and the exit comes through the reaper's channel to this thread), so the
    /// exit of a child that is not known is stale: of a child already dealt with.
    pub fn on_exit(&mut self, pid: ChildId, exit: Exit, now: Instant) {
        if self.commands.claim(pid, exit) {
            return;
        }
        if let Some(name) = self.probes.remove(&pid) {
            self.probe_done(&name, pid, exit, now);
            return;
        }
        let Some(name) = self.pids.remove(&pid) else {
            log::debug!("exit of {pid} ({exit}), no longer tracked");
            return;
        };
        self.service_exited(&name, pid, exit, now);
    }

    /// Signals one of the services' processes, unless it has been collected already.
    fn signal(&self, child: ChildId, sig: Sig) -> std::io::Result<bool> {
        self.reaper.signal(self.sys.as_ref(), child, sig, false)
    }

    fn probe_done(&mut self, name: &str, pid: ChildId, exit: Exit, now: Instant) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        if let State::Running {
            probe,
            ready,
            next_probe,
            ..
        } = &mut svc.state
        {
            if *probe == Some(pid) {
                *probe = None;
                *next_probe = now + PROBE_EVERY;
                if exit.success() {
                    *ready = true;
                    log::info!("{name} is ready");
                }
            }
        }
    }

    fn service_exited(&mut self, name: &str, pid: ChildId, exit: Exit, now: Instant) {
        let backoff = self.config.backoff;
        let shutting_down = self.shutting_down;
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        if svc.child() != Some(pid) {
            return;
        }
        svc.last_exit = Some(exit);
        let (restart, kind) = match &svc.spec {
            Some(s) => (s.restart, s.kind),
            None => (Restart::Never, Kind::Daemon),
        };
        match svc.state.clone() {
            State::Stopping { .. } => log::info!("{name}'s main process exited ({exit})"),
            State::Running { since, .. } => {
                let wants_restart = match restart {
                    Restart::Always => !(kind == Kind::Oneshot && exit.success()),
                    Restart::OnFailure => !exit.success(),
                    Restart::Never => false,
                };
                if shutting_down {
                    svc.state = State::Stopped;
                } else if kind == Kind::Oneshot && exit.success() {
                    log::info!("{name} finished");
                    svc.state = State::Exited;
                } else if wants_restart {
                    svc.failures = backoff.next_failures(svc.failures, now - since);
                    let delay = backoff.delay(svc.failures);
                    log::warn!(
                        "{name} exited ({exit}); restarting in {} ms",
                        delay.as_millis()
                    );
                    svc.state = State::Backoff { until: now + delay };
                } else if exit.success() {
                    log::info!("{name} exited ({exit})");
                    svc.state = State::Exited;
                } else {
                    log::error!("{name} failed ({exit}); restart = never");
                    svc.state = State::Failed(format!("exited with {exit}"));
                }
            }
            _ => {}
        }
        if let Some(probe) = self.probe_of(name) {
            let _ = self.signal(probe, Sig::Kill);
        }
        self.main_stopped(name);
    }

    fn probe_of(&self, name: &str) -> Option<ChildId> {
        self.probes
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(p, _)| *p)
    }

    /// Decide on what to start, probe, kill or announce now.
    pub fn tick(&mut self, now: Instant) -> Vec<Notice> {
        let mut notices = Vec::new();
        self.commands.expire(self.sys.as_ref(), &self.reaper, now);
        if self.shutting_down {
            self.tick_shutdown(now);
            if !self.shutdown_announced && self.services.values().all(|s| !s.is_running()) {
                self.shutdown_announced = true;
                notices.push(Notice::ShutdownDone);
            }
            return notices;
        }
        for name in self.order.clone() {
            self.tick_service(&name, now);
        }
        let all_ready = self
            .services
            .values()
            .filter(|s| s.required)
            .all(|s| s.is_ready());
        if all_ready {
            if !self.ready_announced {
                self.ready_announced = true;
                notices.push(Notice::Ready);
            }
            let since = *self.healthy_since.get_or_insert(now);
            if !self.healthy_announced && now - since >= self.config.healthy_after {
                self.healthy_announced = true;
                notices.push(Notice::Healthy);
            }
        } else {
            self.healthy_since = None;
        }
        notices
    }

    fn tick_service(&mut self, name: &str, now: Instant) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        match svc.state.clone() {
            State::Waiting => match self.deps_status(name) {
                DepStatus::Ready => self.start_clean(name, now),
                DepStatus::Wait => {}
                DepStatus::Failed(why) => {
                    log::error!("{name} not started: {why}");
                    self.set_state(name, State::Failed(why));
                }
            },
            State::Backoff { until } if now >= until => self.start_clean(name, now),
            State::Running {
                pid,
                since,
                ready: false,
                probe: None,
                next_probe,
            } if now >= next_probe => self.probe(name, pid, since, now),
            State::Stopping { .. } => self.tick_stopping(name, now, true),
            _ => {}
        }
    }

    fn set_state(&mut self, name: &str, state: State) {
        if let Some(s) = self.services.get_mut(name) {
            s.state = state;
        }
    }

    fn deps_status(&self, name: &str) -> DepStatus {
        let Some(spec) = self.services.get(name).and_then(|s| s.spec.as_ref()) else {
            return DepStatus::Failed("no definition".into());
        };
        for dep in &spec.requires {
            match self.services.get(dep) {
                None => return DepStatus::Failed(format!("requires {dep}, which does not exist")),
                Some(d) if matches!(d.state, State::Failed(_)) => {
                    return DepStatus::Failed(format!("requires {dep}, which failed"))
                }
                Some(d) if !d.is_ready() => return DepStatus::Wait,
                Some(_) => {}
            }
        }
        for dep in &spec.after {
            match self.services.get(dep) {
                Some(d) if !d.settled() => return DepStatus::Wait,
                None if self.held.contains(dep) => return DepStatus::Wait,
                _ => {}
            }
        }
        DepStatus::Ready
    }

    fn plan(&self, spec: &ServiceSpec) -> Result<ExecPlan, String> {
        let root = &self.config.root;
        let (mut uid, mut gid) = (None, None);
        if let Some(u) = &spec.user {
            let (u, g) = users::user(root, u).map_err(|e| e.to_string())?;
            uid = Some(u);
            gid = Some(g);
        }
        if let Some(g) = &spec.group {
            gid = Some(users::group(root, g).map_err(|e| e.to_string())?);
        }
        let cgroup_procs = match &self.config.cgroups {
            Some(cg) => Some(
                cg.service(&spec.name, &spec.limits)
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let mut env: Vec<(String, String)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !spec.env.contains_key("PATH") {
            env.push(("PATH".into(), self.config.default_path.clone()));
        }
        Ok(ExecPlan {
            program: spec.exec.clone(),
            args: spec.args.clone(),
            env,
            uid,
            gid,
            cgroup_procs,
            oom_score_adj: spec.oom_score_adj,
            capture_output: true,
        })
    }

    fn start(&mut self, name: &str, now: Instant) {
        let Some(spec) = self.services.get(name).and_then(|s| s.spec.clone()) else {
            return;
        };
        let planning = Instant::now();
        let plan = match self.plan(&spec) {
            Ok(p) => p,
            Err(why) => {
                log::error!("{name} cannot start: {why}");
                self.set_state(name, State::Failed(why));
                return;
            }
        };
        let spawning = Instant::now();
        let spawned = self.reaper.start(self.sys.as_ref(), &plan);
        let (plan_ms, spawn_ms) = (
            spawning.duration_since(planning).as_millis(),
            spawning.elapsed().as_millis(),
        );
        match spawned {
            Ok((child, sp)) => {
                let pid = sp.pid;
                if let Some(out) = sp.output {
                    self.output.attach(name, out);
                }
                let ready = spec.ready == ReadyCheck::Started && spec.kind == Kind::Daemon;
                if let Some(svc) = self.services.get_mut(name) {
                    if svc.ever_started {
                        svc.restarts += 1;
                    }
                    svc.ever_started = true;
                    svc.state = State::Running {
                        pid: child,
                        since: now,
                        ready,
                        probe: None,
                        next_probe: now,
                    };
                }
                match crate::sys::elapsed_ms() {
                    Some(ms) => log::info!(
                        "spawned {name} (pid {pid}) at +{ms} ms (set-up {plan_ms} ms, \
                         spawn {spawn_ms} ms)"
                    ),
                    None => log::info!("started {name} (pid {pid})"),
                }
                self.pids.insert(child, name.to_string());
            }
            Err(e) => {
                let why = format!("starting {} failed: {e}", spec.exec.display());
                log::error!("{name}: {why}");
                let backoff = self.config.backoff;
                if let Some(svc) = self.services.get_mut(name) {
                    if spec.restart == Restart::Never {
                        svc.state = State::Failed(why);
                    } else {
                        svc.failures = svc.failures.saturating_add(1);
                        svc.state = State::Backoff {
                            until: now + backoff.delay(svc.failures),
                        };
                    }
                }
            }
        }
    }

    fn probe(&mut self, name: &str, pid: ChildId, since: Instant, now: Instant) {
        let Some(spec) = self.services.get(name).and_then(|s| s.spec.clone()) else {
            return;
        };
        if spec.kind == Kind::Oneshot {
            return;
        }
        if now - since > spec.ready_timeout {
            log::error!(
                "{name} was not ready within {} s; killing it",
                spec.ready_timeout.as_secs()
            );
            let _ = self.signal(pid, Sig::Kill);
            self.update_running(name, |_, next| *next = now + spec.ready_timeout);
            return;
        }
        let result = match &spec.ready {
            ReadyCheck::Started => Some(true),
            ReadyCheck::Path(p) => Some(p.exists()),
            ReadyCheck::UnixSocket(p) => Some(std::os::unix::net::UnixStream::connect(p).is_ok()),
            ReadyCheck::Tcp(addr) => {
                Some(std::net::TcpStream::connect_timeout(addr, Duration::from_millis(100)).is_ok())
            }
            ReadyCheck::Command(argv) => {
                self.spawn_probe(name, argv);
                None
            }
        };
        match result {
            Some(true) => {
                log::info!("{name} is ready");
                self.update_running(name, |ready, _| *ready = true);
            }
            Some(false) => self.update_running(name, |_, next| *next = now + PROBE_EVERY),
            None => {}
        }
    }

    fn update_running(&mut self, name: &str, f: impl FnOnce(&mut bool, &mut Instant)) {
        if let Some(Svc {
            state: State::Running {
                ready, next_probe, ..
            },
            ..
        }) = self.services.get_mut(name)
        {
            f(ready, next_probe);
        }
    }

    fn spawn_probe(&mut self, name: &str, argv: &[String]) {
        let plan = ExecPlan {
            program: PathBuf::from(&argv[0]),
            args: argv[1..].to_vec(),
            env: vec![("PATH".into(), self.config.default_path.clone())],
            ..Default::default()
        };
        match self.reaper.start(self.sys.as_ref(), &plan) {
            Ok((child, _)) => {
                self.probes.insert(child, name.to_string());
                if let Some(Svc {
                    state: State::Running { probe, .. },
                    ..
                }) = self.services.get_mut(name)
                {
                    *probe = Some(child);
                }
            }
            Err(e) => log::warn!("{name}: readiness command {} failed: {e}", argv[0]),
        }
    }

    /// Runs `argv` as root for the control channel's `exec`; `reply` gets the answer when it has
    /// exited (or was killed after `timeout`). An error means nothing was started.
    pub fn run_command(
        &mut self,
        argv: &[String],
        timeout: Duration,
        now: Instant,
        reply: Reply,
    ) -> Result<(), String> {
        if self.shutting_down {
            return Err("the machine is shutting down".into());
        }
        let Some((program, args)) = argv.split_first() else {
            return Err("exec: argv is empty".into());
        };
        let plan = ExecPlan {
            program: PathBuf::from(program),
            args: args.to_vec(),
            env: vec![("PATH".into(), self.config.default_path.clone())],
            capture_output: true,
            ..Default::default()
        };
        self.commands
            .start(self.sys.as_ref(), &self.reaper, &plan, timeout, now, reply)?;
        Ok(())
    }

    /// True once [`Self::begin_shutdown`] was called.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// `caisson-ctl start`.
    pub fn start_service(&mut self, name: &str, now: Instant) -> Result<(), ControlError> {
        self.control_check(name)?;
        if let Some(svc) = self.services.get_mut(name) {
            if !svc.is_running() {
                svc.failures = 0;
                svc.abandoned = false;
                svc.state = State::Waiting;
            }
        }
        self.tick_service(name, now);
        Ok(())
    }

    /// `caisson-ctl stop`.
    pub fn stop_service(&mut self, name: &str, now: Instant) -> Result<(), ControlError> {
        self.control_check(name)?;
        self.stop_one(name, AfterStop::Stay, now);
        Ok(())
    }

    /// `caisson-ctl restart`.
    pub fn restart_service(&mut self, name: &str, now: Instant) -> Result<(), ControlError> {
        self.control_check(name)?;
        if let Some(svc) = self.services.get_mut(name) {
            svc.failures = 0;
            svc.abandoned = false;
        }
        self.stop_one(name, AfterStop::Start, now);
        self.tick_service(name, now);
        Ok(())
    }

    fn control_check(&self, name: &str) -> Result<(), ControlError> {
        if self.shutting_down {
            return Err(ControlError::ShuttingDown);
        }
        match self.services.get(name) {
            None => Err(ControlError::Unknown(name.to_string())),
            Some(Svc {
                spec: None, state, ..
            }) => Err(ControlError::Broken(name.to_string(), format!("{state:?}"))),
            Some(_) => Ok(()),
        }
    }

    /// Every service, in start order.
    pub fn status(&self) -> Vec<ServiceStatus> {
        self.order
            .iter()
            .filter_map(|n| self.services.get(n).map(|s| (n, s)))
            .map(|(name, s)| {
                let (state, error) = match &s.state {
                    State::Waiting => ("waiting", None),
                    State::Running { ready: true, .. } => ("running", None),
                    State::Running { .. } => ("starting", None),
                    State::Backoff { .. } => ("restarting", None),
                    State::Stopping { .. } => ("stopping", None),
                    State::Stopped => ("stopped", None),
                    State::Exited => ("exited", None),
                    State::Failed(why) => ("failed", Some(why.clone())),
                };
                ServiceStatus {
                    name: name.clone(),
                    state: state.into(),
                    pid: s.pid(),
                    ready: s.is_ready(),
                    required: s.required,
                    restarts: s.restarts,
                    last_exit: s.last_exit.map(|e| e.to_string()),
                    error,
                }
            })
            .collect()
    }

    /// Pids of running services (for the final kill at shutdown, and tests).
    pub fn running_pids(&self) -> Vec<Pid> {
        self.services.values().filter_map(|s| s.pid()).collect()
    }
}

enum DepStatus {
    Ready,
    Wait,
    Failed(String),
}

mod stop;
#[cfg(test)]
mod tests;
