//! Stage 2: PID1 on the verified root. Mounts, cgroups, hostname, loopback, modules, then the
//! supervisor's event loop; the ready line, blessing, the control socket, signals and shutdown.

use crate::cgroup::Cgroups;
use crate::control::{self, Dispatch, Request, Response, Status};
use crate::logs::LogPump;
use crate::modules::{List, Loading};
use crate::reaper::Reaper;
use crate::service;
use crate::stage1::EARLY_MOUNTS;
use crate::supervisor::{self, Notice, Supervisor};
use crate::sys::{self, Exit, MountFlags, Power, Real, Sig, Syscall};
use caisson_layout::cmdline::BootParams;
use caisson_layout::{osrelease, paths, Slot};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The init's own settings, `/etc/caisson/init.toml`.
pub const CONFIG_PATH: &str = "/etc/caisson/init.toml";

/// `/etc/caisson/init.toml` (every field optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InitConfig {
    /// Seconds every required service must stay ready before the boot entry is blessed.
    pub bless_after_s: u64,
    /// Size at which a service log is rotated.
    pub log_max_bytes: u64,
    /// Console lines a service may print at once, and per second after that.
    pub console_burst: u32,
    pub console_lines_per_s: u32,
    /// Bound on the final `sync` at shutdown.
    pub sync_timeout_s: u64,
    /// A boot that is being tried (its entry still counts tries) and is not healthy within
    /// `bless_after_s` plus this many seconds of stage 2 starting is rebooted, so the boot loader
    /// tries it again or falls back to the other slot. 0: never. A blessed boot is never rebooted.
    pub unhealthy_reboot_s: u64,
}

impl Default for InitConfig {
    fn default() -> Self {
        InitConfig {
            bless_after_s: 30,
            log_max_bytes: 4 << 20,
            console_burst: 200,
            console_lines_per_s: 50,
            sync_timeout_s: 10,
            unhealthy_reboot_s: 300,
        }
    }
}

impl InitConfig {
    /// Reads the file; a missing file gives the defaults, a broken one is logged and ignored.
    pub fn load(path: &Path) -> InitConfig {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).unwrap_or_else(|e| {
                log::error!("{}: {e}; using the defaults", path.display());
                InitConfig::default()
            }),
            Err(_) => InitConfig::default(),
        }
    }
}

/// What the main loop waits for.
pub enum Event {
    Exits(Vec<(crate::reaper::ChildId, Exit)>),
    Signal(i32),
    Control(Request, Sender<Response>),
    Blessed,
    /// A tried boot did not become healthy in time, or the root failed verification: reboot.
    Unhealthy,
    /// The network is configured or gave up waiting (see [`crate::network`]).
    NetworkSettled,
    /// Both module lists are loaded.
    ModulesLoaded,
}

/// Services with this name in `after` start once every stage-2 module is loaded (SERVICES.md).
pub const MODULES_PSEUDO_SERVICE: &str = "modules";

/// Signals PID1 handles; everything else keeps its default (which for PID1 means ignored).
const SIGNALS: [i32; 5] = [
    libc::SIGCHLD,
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGPWR,
    libc::SIGHUP,
];

/// Version and slot of this boot.
#[derive(Debug, Clone)]
pub struct Identity {
    pub version: String,
    pub slot: Option<Slot>,
    pub params: Option<BootParams>,
}

impl Identity {
    fn read() -> Identity {
        let params = std::fs::read_to_string("/proc/cmdline")
            .ok()
            .and_then(|t| BootParams::parse(&t).ok());
        let version = params.as_ref().map(|p| p.version.clone()).or_else(|| {
            std::fs::read_to_string(osrelease::PATH)
                .ok()
                .and_then(|t| osrelease::OsRelease::parse(&t).ok())
                .map(|o| o.version)
        });
        Identity {
            version: version.unwrap_or_else(|| "unknown".into()),
            slot: params.as_ref().map(|p| p.slot),
            params,
        }
    }

    fn slot_text(&self) -> String {
        self.slot
            .map_or_else(|| "unknown".into(), |s| s.to_string())
    }
}

fn mount_logged(
    sys: &dyn Syscall,
    src: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) {
    let t = Path::new(target);
    if let Err(e) = std::fs::create_dir_all(t) {
        log::warn!("creating {target}: {e}");
    }
    if let Err(e) = sys.mount(src, t, fstype, flags, data) {
        log::warn!("mounting {fstype} at {target} failed: {e}");
    }
}

/// The stage-2 mounts (the early ones too, when there was no stage 1).
pub fn mounts(sys: &dyn Syscall) {
    if !Path::new("/proc/self").exists() {
        for (src, target, fstype, flags, data) in EARLY_MOUNTS {
            mount_logged(sys, src, target, fstype, flags, data);
        }
        // No stage 1 ran (it would have mounted these): expedite here instead.
        crate::expedite::set(Path::new("/"), true);
    }
    let nosuid_nodev = MountFlags::NOSUID | MountFlags::NODEV;
    mount_logged(
        sys,
        "devpts",
        "/dev/pts",
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    );
    mount_logged(sys, "tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777");
    crate::devlinks::ensure(Path::new("/dev"));
    mount_logged(sys, "tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777");
    mount_cgroup2(sys, Path::new(CGROUP2_AT));
    if let Err(e) = sys.make_rshared(Path::new("/")) {
        log::warn!("making / shared failed: {e}");
    }
}

/// How long the control thread looks for the virtio control port after `virtio_console` has
/// loaded: the device announces its ports asynchronously, and a single early look can miss it.
const VIRTIO_PORT_WAIT: Duration = Duration::from_secs(120);

/// Where the unified cgroup hierarchy is mounted.
const CGROUP2_AT: &str = "/sys/fs/cgroup";

/// Mounts cgroup2 with `favordynmods` where the kernel has it (Linux 6.0 and later), else without.
/// Without it, every move of a process between cgroups waits for an RCU grace period: ftrace
/// under TCG showed 17-27 ms per move (the init into its leaf, each service into its cgroup),
/// against 0.4-1.8 ms with it. The price is a slower fork and exit path, which a host that
/// starts few processes does not notice.
fn mount_cgroup2(sys: &dyn Syscall, target: &Path) {
    if let Err(e) = std::fs::create_dir_all(target) {
        log::warn!("creating {}: {e}", target.display());
    }
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let mut result = sys.mount("cgroup2", target, "cgroup2", flags, CGROUP2_FAVOURED);
    if let Err(e) = &result {
        log::info!("cgroup2 without favordynmods ({e})");
        result = sys.mount("cgroup2", target, "cgroup2", flags, CGROUP2_PLAIN);
    }
    if let Err(e) = result {
        log::warn!("mounting cgroup2 at {} failed: {e}", target.display());
    }
}

/// cgroup2's mount options, and the ones for a kernel without `favordynmods`.
const CGROUP2_FAVOURED: &str = "nsdelegate,favordynmods";
const CGROUP2_PLAIN: &str = "nsdelegate";

fn hostname(sys: &dyn Syscall) {
    let name = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "caisson".into());
    if let Err(e) = sys.sethostname(&name) {
        log::warn!("setting the hostname to {name} failed: {e}");
    }
}

/// The init's resident memory, VmRSS from `/proc/self/status`, in KiB.
pub fn rss_kib(proc_status: &str) -> Option<u64> {
    proc_status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Stage 2. Never returns.
pub(crate) fn main() -> ! {
    sys::mark_stage2_start();
    crate::console::attach_console();
    crate::console::init(false);
    let sys: Arc<dyn Syscall> = Arc::new(Real);
    if let Err(e) = sys::block_signals(&SIGNALS) {
        log::error!("blocking signals failed: {e}");
    }
    if let Err(e) = sys.disable_ctrl_alt_del() {
        log::warn!("ctrl-alt-del stays a hard reboot: {e}");
    }
    match crate::guard::catch("stage 2", || run(sys.clone())) {
        Some(Ok(power)) => finish(sys.as_ref(), power),
        Some(Err(e)) => crate::fatal::fatal(sys.as_ref(), &e),
        None => crate::fatal::fatal(sys.as_ref(), &"stage 2 panicked while starting"),
    }
}

/// A stage-2 failure that ends in a reboot.
#[derive(Debug, thiserror::Error)]
pub enum Stage2Error {
    #[error("starting the {0} thread failed: {1}")]
    Thread(&'static str, #[source] std::io::Error),
}

/// How long each step of stage 2 took before the first service could start, for one log line.
#[derive(Default)]
struct Steps {
    last: Option<Instant>,
    taken: Vec<(&'static str, u128)>,
}

impl Steps {
    fn mark(&mut self, step: &'static str) {
        let now = Instant::now();
        let since = self.last.or_else(sys::stage2_started).unwrap_or(now);
        self.taken
            .push((step, now.duration_since(since).as_millis()));
        self.last = Some(now);
    }

    fn line(&self) -> String {
        let parts: Vec<String> = self
            .taken
            .iter()
            .map(|(step, ms)| format!("{step} {ms}"))
            .collect();
        format!("stage 2 steps (ms): {}", parts.join(", "))
    }
}

fn run(sys: Arc<dyn Syscall>) -> Result<Power, Stage2Error> {
    let mut steps = Steps::default();
    mounts(sys.as_ref());
    steps.mark("mounts");
    // Before any other thread starts: moving the init into its leaf and enabling the
    // controllers on a thread of its own, beside the steps below, once hung a guest under TCG
    // (both threads stuck in the kernel, soft lockups, the RCU kthread starved). Enabling
    // the controllers after containerd had started instead took 110-160 ms there.
    let c = Cgroups {
        root: PathBuf::from(CGROUP2_AT),
    };
    let cgroups = match c.setup() {
        Ok(()) => Some(c),
        Err(e) => {
            log::warn!("{e}; services run without cgroup limits");
            None
        }
    };
    steps.mark("cgroups");
    // Bringing lo up waits for the network stack (10-20 ms under emulation): on a thread,
    // beside identity, provisioning and the service files; joined before the first service
    // starts.
    let lo = {
        let sys = sys.clone();
        std::thread::Builder::new()
            .name("lo".into())
            .stack_size(64 * 1024)
            .spawn(move || sys.loopback_up())
    };
    let must_look = crate::provisioning::must_look();
    let id = Identity::read();
    if let Some(p) = &id.params {
        crate::console::set_debug(p.debug);
    }
    log::info!(
        "stage 2: {} on {} slot {}",
        crate::VERSION_LINE,
        id.version,
        id.slot_text()
    );
    steps.mark("identity");
    // The module lists load on a thread; whatever needs a module waits for its list: blessing
    // (vfat), the network and the virtio control port the early one, services
    // `after = ["modules"]` all three. A boot that must look for a machine config needs the
    // sources' driver (fw_cfg; config drives and the ESP are read in user space) before it
    // goes on, and the network's only if the config is fetched from a URL. The rest load
    // right after the first services started (or when a provisioned config's modules are
    // waited for): loading beside the steps below held the first spawn back by ~15 ms under
    // emulation (the loader's reads and relocations compete for the same CPUs), and nothing
    // started before then needs a module.
    let modules = Loading::prepare(
        sys.clone(),
        vec![
            (List::Sources, paths::ROOT_MODULES_SOURCES_LIST),
            (List::Early, paths::ROOT_MODULES_LIST),
            (List::Late, paths::ROOT_MODULES_LATE_LIST),
        ],
    );
    if must_look {
        modules.wait(List::Sources);
        steps.mark("modules");
    }
    for d in ["/run/caisson", paths::LOG_DIR] {
        if let Err(e) = std::fs::create_dir_all(d) {
            log::warn!("creating {d}: {e}");
        }
    }
    // Before the host name is set and any service file is read (provision/CONFIG.md).
    // A config fetched from a URL needs the network before any service: then it starts here.
    let mut early_net: Option<crate::network::Shared> = None;
    let esp = id.params.as_ref().map(|p| p.esp);
    crate::provisioning::first_boot(sys.as_ref(), esp, &modules, &mut || {
        if early_net.is_none() {
            early_net = Some(network_now(&modules));
        }
    });
    steps.mark("provisioning");
    hostname(sys.as_ref());
    steps.mark("hostname");
    // Under emulation most of this step is the first run of the TOML parser's code (QEMU
    // translates code as it first runs). Reading on a thread beside the steps above was tried
    // twice: with the host's cores busy the spawn came later, and on a quiet host it gained
    // nothing measurable (81 against 82.5 ms, BENCHMARKS.md).
    let config = InitConfig::load(Path::new(CONFIG_PATH));
    let loaded = service::load_dirs(&[
        Path::new(paths::IMAGE_SERVICES_DIR),
        Path::new(paths::ETC_SERVICES_DIR),
    ]);
    log::info!(
        "{} services ({} unusable)",
        loaded.specs.len(),
        loaded.broken.len()
    );
    steps.mark("config and service files");
    let pump = LogPump {
        dir: PathBuf::from(paths::LOG_DIR),
        max_bytes: config.log_max_bytes,
        console_burst: config.console_burst,
        console_per_sec: config.console_lines_per_s,
        console: true,
    };
    let reaper = Arc::new(Reaper::default());
    let sup_config = supervisor::Config {
        cgroups,
        healthy_after: Duration::from_secs(config.bless_after_s),
        ..Default::default()
    };
    let mut sup = Supervisor::new(
        sys.clone(),
        reaper.clone(),
        Arc::new(pump),
        sup_config,
        loaded.specs,
        loaded.broken,
    );
    steps.mark("services");
    // What waits for the network or the modules is held before the first tick; what waits for
    // nothing (containerd) starts in it, before the init's own threads: each costs a few
    // milliseconds under emulation, and none is needed until a service has started (a child
    // that exits meanwhile stays a zombie, its SIGCHLD pending, until the signal thread reaps).
    if early_net.is_none() {
        sup.hold(crate::network::PSEUDO_SERVICE);
    }
    let modules_held = !modules.is_loaded(List::Late);
    if modules_held {
        sup.hold(MODULES_PSEUDO_SERVICE);
    }
    let lo_up = match lo {
        Ok(thread) => thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("its thread panicked"))),
        Err(_) => sys.loopback_up(),
    };
    if let Err(e) = lo_up {
        log::warn!("bringing up lo failed: {e}");
    }
    steps.mark("lo");
    let first = sup.tick(Instant::now());
    steps.mark("first services");
    modules.begin();
    let (tx, rx) = channel();
    start_signal_thread(sys.clone(), reaper, tx.clone())?;
    let net = match early_net {
        Some(n) => n,
        None => start_network(&tx, &modules),
    };
    if modules_held {
        wait_for_modules(&mut sup, &tx, &modules);
    }
    let debug = id.params.as_ref().is_some_and(|p| p.debug);
    start_control(tx.clone(), &modules, control::ExecGate::new(debug));
    let reboot = tx.clone();
    crate::verity::start(
        id.params.clone(),
        modules.clone(),
        Box::new(move || drop(reboot.send(Event::Unhealthy))),
    );
    steps.mark("threads");
    log::info!("{}", steps.line());
    let watchdog = (config.unhealthy_reboot_s > 0).then(|| {
        Instant::now() + Duration::from_secs(config.bless_after_s + config.unhealthy_reboot_s)
    });
    let env = LoopEnv {
        id: &id,
        net: &net,
        modules: &modules,
    };
    Ok(supervise(&mut sup, first, &rx, &tx, &env, watchdog))
}

/// The network thread started before the services (for provisioning), waited on until it has
/// settled, which its own `timeout_s` bounds.
fn network_now(modules: &Loading) -> crate::network::Shared {
    let net = crate::network::Shared::default();
    let (tx, rx) = channel::<()>();
    let tx = std::sync::Mutex::new(tx);
    crate::network::start(
        net.clone(),
        modules.clone(),
        Box::new(move || {
            if let Ok(t) = tx.lock() {
                let _ = t.send(());
            }
        }),
    );
    if rx.recv_timeout(Duration::from_secs(300)).is_err() {
        log::warn!("network: not settled after 300 s; going on");
    }
    net
}

/// The network thread; services `after = ["network"]`, held until it settles, are released by
/// its event.
fn start_network(tx: &Sender<Event>, modules: &Loading) -> crate::network::Shared {
    let net = crate::network::Shared::default();
    let tx = std::sync::Mutex::new(tx.clone());
    crate::network::start(
        net.clone(),
        modules.clone(),
        Box::new(move || {
            if let Ok(t) = tx.lock() {
                let _ = t.send(Event::NetworkSettled);
            }
        }),
    );
    net
}

/// Services `after = ["modules"]`, held, are released once both module lists are loaded.
fn wait_for_modules(sup: &mut Supervisor, tx: &Sender<Event>, modules: &Loading) {
    let (modules, tx) = (modules.clone(), tx.clone());
    let spawned = std::thread::Builder::new()
        .name("modules-wait".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            modules.wait(List::Late);
            let _ = tx.send(Event::ModulesLoaded);
        });
    if let Err(e) = spawned {
        log::warn!("no thread to wait for the modules ({e}); not holding services for them");
        sup.release(MODULES_PSEUDO_SERVICE);
    }
}

fn start_signal_thread(
    sys: Arc<dyn Syscall>,
    reaper: Arc<Reaper>,
    tx: Sender<Event>,
) -> Result<(), Stage2Error> {
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            crate::guard::restarting("the signal thread", Duration::from_secs(1), || {
                signal_loop(sys.as_ref(), &reaper, &tx)
            })
        })
        .map(|_| ())
        .map_err(|e| Stage2Error::Thread("signal", e))
}

/// Reaps on SIGCHLD and passes the other signals on; returns once the event loop is gone.
fn signal_loop(sys: &dyn Syscall, reaper: &Reaper, tx: &Sender<Event>) {
    loop {
        match sys::wait_signal(&SIGNALS) {
            Ok(libc::SIGCHLD) => {
                let exits = reaper.reap_all(sys);
                if !exits.is_empty() && tx.send(Event::Exits(exits)).is_err() {
                    return;
                }
            }
            Ok(sig) => {
                if tx.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
            Err(e) => {
                log::error!("sigwait failed: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// The control socket, and the virtio port once it appears (`exec` there only as `gate` allows).
fn start_control(tx: Sender<Event>, modules: &Loading, gate: control::ExecGate) {
    let tx = std::sync::Mutex::new(tx);
    let dispatch: Dispatch = Arc::new(move |req| {
        let within = req.answer_within();
        let (rtx, rrx) = channel();
        let sent = tx
            .lock()
            .map(|t| t.send(Event::Control(req, rtx)).is_ok())
            .unwrap_or(false);
        if !sent {
            return Response::error("the init is not accepting requests");
        }
        rrx.recv_timeout(within)
            .unwrap_or_else(|_| Response::error("the init did not answer"))
    });
    let log_dir = PathBuf::from(paths::LOG_DIR);
    if let Err(e) = control::serve_socket(
        Path::new(paths::CONTROL_SOCKET),
        dispatch.clone(),
        log_dir.clone(),
    ) {
        log::error!("control socket {}: {e}", paths::CONTROL_SOCKET);
    }
    // The port appears once virtio_console (in the early list) is loaded.
    let modules = modules.clone();
    let virtio = move || {
        modules.wait(List::Early);
        let found = control::wait_for_virtio_port(
            Path::new("/"),
            paths::VIRTIO_CONTROL_PORT,
            VIRTIO_PORT_WAIT,
        );
        match found {
            Some(port) => {
                log::info!("control channel on {}", port.display());
                if let Err(e) = control::serve_virtio(port, dispatch, log_dir, gate) {
                    log::error!("virtio control port: {e}");
                }
            }
            None => log::debug!(
                "no virtio port {} after {} s",
                paths::VIRTIO_CONTROL_PORT,
                VIRTIO_PORT_WAIT.as_secs()
            ),
        }
    };
    let spawned = std::thread::Builder::new()
        .name("control-find".into())
        .stack_size(64 * 1024)
        .spawn(virtio);
    if let Err(e) = spawned {
        log::error!("no thread for the virtio control port: {e}");
    }
}

/// What the event loop reads but never changes.
struct LoopEnv<'a> {
    id: &'a Identity,
    net: &'a crate::network::Shared,
    modules: &'a Loading,
}

/// What the event loop keeps across turns, outside it so that a restart after a panic (see
/// [`crate::guard`]) goes on from it.
struct LoopState {
    power: Power,
    ready: bool,
    shutdown_deadline: Option<Instant>,
    /// The notices of the tick before the loop, then a tick per turn: services start at once,
    /// not after the first wait for an event.
    pending: Vec<Notice>,
    watchdog: Option<Instant>,
}

/// The supervisor's loop, restarted after a panic; returns what to do once every service has
/// stopped.
fn supervise(
    sup: &mut Supervisor,
    first: Vec<Notice>,
    rx: &Receiver<Event>,
    tx: &Sender<Event>,
    env: &LoopEnv,
    watchdog: Option<Instant>,
) -> Power {
    let mut state = LoopState {
        power: Power::PowerOff,
        ready: false,
        shutdown_deadline: None,
        pending: first,
        watchdog,
    };
    crate::guard::restarting("the event loop", Duration::from_millis(100), || {
        event_loop(sup, &mut state, rx, tx, env)
    })
}

fn event_loop(
    sup: &mut Supervisor,
    state: &mut LoopState,
    rx: &Receiver<Event>,
    tx: &Sender<Event>,
    env: &LoopEnv,
) -> Power {
    let LoopEnv { id, net, modules } = *env;
    let LoopState {
        power,
        ready,
        shutdown_deadline,
        pending,
        watchdog,
    } = state;
    loop {
        let now = Instant::now();
        if sup.shutting_down() && shutdown_deadline.is_none() {
            *shutdown_deadline = Some(now + Duration::from_secs(90));
        }
        let mut notices = std::mem::take(pending);
        notices.extend(sup.tick(now));
        for notice in notices {
            match notice {
                Notice::Ready => {
                    *ready = true;
                    announce_ready(id);
                }
                Notice::Healthy => {
                    *watchdog = None;
                    start_bless(id, tx.clone(), modules.clone());
                }
                Notice::ShutdownDone => return *power,
            }
        }
        if watchdog.is_some_and(|d| now >= d) && !sup.shutting_down() {
            *watchdog = None;
            start_watchdog(id, tx.clone());
        }
        if shutdown_deadline.is_some_and(|d| now >= d) {
            log::error!("services did not stop in time; shutting down anyway");
            return *power;
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Exits(exits)) => {
                let now = Instant::now();
                for (pid, exit) in exits {
                    sup.on_exit(pid, exit, now);
                }
            }
            Ok(Event::Signal(sig)) => match sig {
                libc::SIGINT => {
                    log::info!("ctrl-alt-del: rebooting");
                    *power = Power::Reboot;
                    sup.begin_shutdown(Instant::now());
                }
                libc::SIGTERM | libc::SIGPWR => {
                    log::info!("power off requested");
                    *power = Power::PowerOff;
                    sup.begin_shutdown(Instant::now());
                }
                other => log::debug!("ignoring signal {other}"),
            },
            Ok(Event::Control(Request::Exec { argv, timeout_s }, reply)) => {
                let timeout = timeout_s
                    .unwrap_or(control::EXEC_TIMEOUT_DEFAULT_S)
                    .min(control::EXEC_TIMEOUT_MAX_S);
                let answer = reply.clone();
                let started = sup.run_command(
                    &argv,
                    Duration::from_secs(timeout),
                    Instant::now(),
                    Box::new(move |r| {
                        let _ = answer.send(r);
                    }),
                );
                if let Err(why) = started {
                    let _ = reply.send(Response::error(why));
                }
            }
            Ok(Event::Control(req, reply)) => {
                let resp = control_request(sup, req, *ready, id, power, net);
                let _ = reply.send(resp);
            }
            Ok(Event::Unhealthy) => {
                if !sup.shutting_down() {
                    *power = Power::Reboot;
                    sup.begin_shutdown(Instant::now());
                }
            }
            Ok(Event::NetworkSettled) => sup.release(crate::network::PSEUDO_SERVICE),
            Ok(Event::ModulesLoaded) => sup.release(MODULES_PSEUDO_SERVICE),
            Ok(Event::Blessed) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {}
        }
    }
}

fn control_request(
    sup: &mut Supervisor,
    req: Request,
    ready: bool,
    id: &Identity,
    power: &mut Power,
    net: &crate::network::Shared,
) -> Response {
    let now = Instant::now();
    let result = match req {
        Request::Status => {
            return Response {
                ok: true,
                status: Some(Status {
                    version: id.version.clone(),
                    slot: id.slot_text(),
                    ready,
                    shutting_down: sup.shutting_down(),
                    services: sup.status(),
                    network: net.lock().ok().map(|n| n.clone()),
                    init_rss_kib: std::fs::read_to_string("/proc/self/status")
                        .ok()
                        .and_then(|t| rss_kib(&t)),
                    hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .ok()
                        .map(|h| h.trim().to_string()),
                    degraded: crate::verity::degraded(),
                }),
                ..Default::default()
            }
        }
        Request::Start { service } => sup.start_service(&service, now),
        Request::Stop { service } => sup.stop_service(&service, now),
        Request::Restart { service } => sup.restart_service(&service, now),
        Request::Reboot | Request::Poweroff => {
            *power = if matches!(req, Request::Reboot) {
                Power::Reboot
            } else {
                Power::PowerOff
            };
            log::info!("{req:?} requested through the control channel");
            sup.begin_shutdown(now);
            Ok(())
        }
        Request::Logs { .. } => return Response::error("logs are served by the connection"),
        Request::Exec { .. } => return Response::error("exec is run by the event loop"),
    };
    match result {
        Ok(()) => Response::ok(),
        Err(e) => Response::error(e),
    }
}

/// The exact line the tests wait for.
pub fn ready_line(version: &str, slot: &str, boot_ms: u64) -> String {
    format!("ready version={version} slot={slot} boot_ms={boot_ms}")
}

fn announce_ready(id: &Identity) {
    let line = ready_line(&id.version, &id.slot_text(), sys::boot_ms());
    log::info!("{line}");
    crate::expedite::set(Path::new("/"), false);
    if let Some(kib) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| rss_kib(&t))
    {
        log::info!("init resident memory {kib} KiB");
    }
    if let Err(e) = std::fs::write(paths::READY_FILE, format!("{line}\n")) {
        log::warn!("writing {}: {e}", paths::READY_FILE);
    }
}

fn start_bless(id: &Identity, tx: Sender<Event>, modules: Loading) {
    let Some(params) = id.params.clone() else {
        log::info!("no boot parameters on the command line: nothing to bless");
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("bless".into())
        .spawn(move || {
            // The ESP is vfat, an early module.
            modules.wait(List::Early);
            if let Err(e) = bless_now(&Real, &params) {
                log::error!("blessing the boot entry failed: {e}");
            }
            let _ = tx.send(Event::Blessed);
        });
    if let Err(e) = spawned {
        log::error!("no bless thread: {e}");
    }
}

/// The machine was not healthy in time: if this boot is being tried, ask the loop to reboot (the
/// boot loader then tries again or falls back); a blessed boot stays up to be looked at.
fn start_watchdog(id: &Identity, tx: Sender<Event>) {
    let Some(params) = id.params.clone() else {
        log::warn!("not healthy in time, and no boot parameters: staying up");
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            match with_esp(&Real, &params, |esp| {
                crate::bless::is_counting(esp, &params.version, params.slot)
            }) {
                Ok(true) => {
                    log::error!(
                        "not healthy in time on a tried boot entry: rebooting (the boot loader tries it again or falls back)"
                    );
                    let _ = tx.send(Event::Unhealthy);
                }
                Ok(false) => log::warn!(
                    "not healthy in time, but the boot entry is blessed: staying up, not rebooting"
                ),
                Err(e) => log::error!("not healthy in time; checking the boot entry failed: {e}"),
            }
        });
    if let Err(e) = spawned {
        log::error!("no watchdog thread: {e}");
    }
}

/// A failure while blessing: the ESP could not be reached, or the entry not renamed.
pub type BlessStepError = crate::esp::EspError;

/// Mount the ESP, bless this boot's entry, unmount it.
pub fn bless_now(sys: &dyn Syscall, params: &BootParams) -> Result<(), BlessStepError> {
    match with_esp(sys, params, |esp| {
        crate::bless::bless(esp, &params.version, params.slot)
    })? {
        Some(name) => log::info!("boot entry blessed: {name}"),
        None => log::info!("boot entry has no counter: nothing to bless"),
    }
    Ok(())
}

/// Mount the ESP at its mount point, run `f` on it, sync, unmount it.
fn with_esp<T>(
    sys: &dyn Syscall,
    params: &BootParams,
    f: impl FnOnce(&Path) -> Result<T, crate::bless::BlessError>,
) -> Result<T, BlessStepError> {
    crate::esp::with_esp(sys, params, Path::new(paths::ESP_MOUNT), f)
}

/// Disk filesystems from `/proc/self/mountinfo`, deepest first.
pub fn disk_mounts(mountinfo: &str) -> Vec<String> {
    const VIRTUAL: [&str; 14] = [
        "proc",
        "sysfs",
        "devtmpfs",
        "tmpfs",
        "devpts",
        "cgroup2",
        "mqueue",
        "debugfs",
        "tracefs",
        "securityfs",
        "pstore",
        "bpf",
        "configfs",
        "fusectl",
    ];
    let mut out: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let target = left.split_whitespace().nth(4)?;
            let fstype = right.split_whitespace().next()?;
            (!VIRTUAL.contains(&fstype) && target != "/").then(|| unescape(target))
        })
        .collect();
    out.reverse();
    out
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// How long the remaining processes get after SIGTERM, and after SIGKILL, to be gone.
const TERM_WAIT: Duration = Duration::from_millis(500);
const KILL_WAIT: Duration = Duration::from_secs(5);

/// After the services: kill the rest, wait (bounded) until no process is left outside the init's
/// own cgroup, so that none holds a file open on the state partition, sync (bounded), unmount,
/// reboot or power off.
pub fn finish(sys: &dyn Syscall, power: Power) -> ! {
    log::info!("stopping remaining processes");
    let cgroups = Cgroups {
        root: PathBuf::from(CGROUP2_AT),
    };
    let _ = sys.kill(-1, Sig::Term);
    if !wait_until_empty(&cgroups, TERM_WAIT) {
        let _ = sys.kill(-1, Sig::Kill);
        if !wait_until_empty(&cgroups, KILL_WAIT) {
            log::warn!(
                "processes are left {} s after SIGKILL; unmounting anyway (what stays busy is \
                 remounted read-only)",
                KILL_WAIT.as_secs()
            );
        }
    }
    let config = InitConfig::load(Path::new(CONFIG_PATH));
    bounded_sync(Duration::from_secs(config.sync_timeout_s));
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for target in disk_mounts(&info) {
        let t = Path::new(&target);
        if sys.unmount(t, false).is_err() {
            match sys.remount_ro(t) {
                Ok(()) => log::info!("{target} remounted read-only"),
                Err(e) => log::warn!("{target} stays mounted read-write: {e}"),
            }
        }
    }
    sys.sync();
    log::info!(
        "{}",
        if power == Power::Reboot {
            "rebooting"
        } else {
            "powering off"
        }
    );
    if let Err(e) = sys.reboot(power) {
        crate::fatal::fatal(sys, &format!("reboot(2) failed: {e}"));
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Waits until every cgroup but the init's own is empty, for at most `within`; true when they
/// are. Without a readable hierarchy there is nothing to wait on: the caller's pause was all.
fn wait_until_empty(cgroups: &Cgroups, within: Duration) -> bool {
    let start = Instant::now();
    loop {
        match cgroups.populated_outside_init() {
            Ok(busy) if busy.is_empty() => return true,
            Ok(busy) if start.elapsed() >= within => {
                log::info!("processes left in {}", busy.join(", "));
                return false;
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                log::warn!("{e}; not waiting for the remaining processes");
                std::thread::sleep(within.saturating_sub(start.elapsed()));
                return false;
            }
        }
    }
}

fn bounded_sync(timeout: Duration) {
    let (tx, rx) = channel();
    let spawned = std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || {
            rustix::fs::sync();
            let _ = tx.send(());
        });
    if spawned.is_ok() && rx.recv_timeout(timeout).is_err() {
        log::warn!("sync did not finish within {} s", timeout.as_secs());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_wait_ends_when_the_cgroups_are_empty_or_its_time_is_up() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = Cgroups {
            root: tmp.path().to_path_buf(),
        };
        let set = |dir: &str, populated: u8| {
            std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
            let events = format!("populated {populated}\n");
            std::fs::write(tmp.path().join(dir).join("cgroup.events"), events).unwrap();
        };
        // The init's own leaf is never waited for.
        set("init", 1);
        set("system", 0);
        let t = Instant::now();
        assert!(wait_until_empty(&cg, Duration::from_secs(60)));
        assert!(t.elapsed() < Duration::from_secs(5));
        set("system", 1);
        let t = Instant::now();
        assert!(!wait_until_empty(&cg, Duration::from_millis(100)));
        assert!(t.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn rss_from_proc_status() {
        let text = "Name:\tcaisson-init\nVmPeak:\t  9000 kB\nVmRSS:\t    2345 kB\nThreads: 4\n";
        assert_eq!(rss_kib(text), Some(2345));
        assert_eq!(rss_kib("Name: x\n"), None);
    }

    #[test]
    fn ready_line_format() {
        assert_eq!(
            ready_line("1.2.0", "b", 4321),
            "ready version=1.2.0 slot=b boot_ms=4321"
        );
    }

    #[test]
    fn disk_mounts_deepest_first_without_virtual_ones() {
        let info = "\
22 1 253:0 / / ro,relatime - erofs /dev/dm-0 ro
23 22 0:5 / /dev rw - devtmpfs devtmpfs rw
24 22 254:4 / /var rw,relatime - ext4 /dev/vda4 rw
25 22 0:30 / /etc rw - overlay overlay rw,lowerdir=/etc
26 22 0:31 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
27 24 254:1 / /var/lib/my\\040dir rw - ext4 /dev/vdb rw
";
        assert_eq!(disk_mounts(info), ["/var/lib/my dir", "/etc", "/var"]);
    }

    #[test]
    fn config_defaults_and_overrides() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("init.toml");
        assert_eq!(InitConfig::load(&p).bless_after_s, 30);
        std::fs::write(&p, "bless_after_s = 0\n").unwrap();
        let c = InitConfig::load(&p);
        assert_eq!(c.bless_after_s, 0);
        assert_eq!(c.sync_timeout_s, 10);
        assert_eq!(c.unhealthy_reboot_s, 300);
        std::fs::write(&p, "unhealthy_reboot_s = 20\n").unwrap();
        assert_eq!(InitConfig::load(&p).unhealthy_reboot_s, 20);
    }

    fn cgroup_mounts(sys: &crate::sys::Recording) -> Vec<String> {
        sys.calls()
            .into_iter()
            .filter_map(|c| match c {
                crate::sys::Call::Mount { fstype, data, .. } if fstype == "cgroup2" => Some(data),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn cgroup2_prefers_favordynmods_and_falls_back_without_it() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("sys/fs/cgroup");
        let sys = crate::sys::Recording::new(tmp.path());
        mount_cgroup2(&sys, &target);
        assert_eq!(cgroup_mounts(&sys), ["nsdelegate,favordynmods"]);

        // A kernel before 6.0 refuses the option: the hierarchy is mounted without it.
        let old = crate::sys::Recording::new(tmp.path());
        old.fail_on("favordynmods");
        mount_cgroup2(&old, &target);
        assert_eq!(
            cgroup_mounts(&old),
            ["nsdelegate,favordynmods", "nsdelegate"]
        );
    }
}
