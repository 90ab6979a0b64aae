//! Agent load benchmark (issue 6): 1,000 simulated machines against a real etcd.
//!
//! `cargo bench -p caisson-fleet --bench agent_load` (release build). It starts Debian's etcd on
//! loopback ports with its data in a temporary directory under /var/tmp (a disk, as on a real
//! etcd host), then:
//!
//! 1. joins 1,000 agents at once, each a task in this process with its own etcd client and an
//!    in-memory runtime ([`Agent::join`], the path `caisson-fleet agent` takes), and times until
//!    all of them are registered;
//! 2. runs them ([`Agent::run`]: heartbeat, campaign, reconcile, report every third of the TTL),
//!    their loops spread over one tick as booted machines would be, and measures etcd over a
//!    steady-state window: requests/s (gRPC messages received, from its /metrics), raft
//!    proposals/s, its CPU (from /proc/<pid>/stat) and resident memory;
//! 3. meanwhile runs one real `caisson-fleet agent` process (the release binary) against the same
//!    etcd and its own containerd (when root and containerd is installed; otherwise none, and it
//!    says so), and reads its VmRSS after it has registered and run for at least 20 s (as one
//!    of 1,001 machines; the leader is a simulated one);
//! 4. times leader failover twice: the leader stops (it revokes its lease on the way out), then
//!    the next leader crashes (its task is dropped; its lease has to expire).
//!
//! Prints `BENCH key=value` lines. Settings from the environment: `AGENT_LOAD_MACHINES` (1000),
//! `AGENT_LOAD_WINDOW_S` (20, the steady-state window), `AGENT_LOAD_AGENT_S` (20, how long the
//! real agent runs before its memory is read). Only loopback traffic. etcd, containerd, the
//! agent and the temporary directory are removed at the end, on error and on Ctrl-C.

use anyhow::{bail, Context, Result};
use caisson_fleet::agent::{Agent, FakeRuntime};
use caisson_fleet::config::Config;
use caisson_fleet::etcd::{Client, Event};
use caisson_fleet::registry::{self, Keys, MachineRecord};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinSet};

const ETCD: &str = "/usr/bin/etcd";
const CONTAINERD: &str = "/usr/bin/containerd";
const AGENT: &str = env!("CARGO_BIN_EXE_caisson-fleet");

/// What the environment asks for.
struct Settings {
    machines: usize,
    window: Duration,
    agent_run: Duration,
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env() -> Result<Settings> {
        Ok(Settings {
            machines: usize::try_from(env_number("AGENT_LOAD_MACHINES", 1000)?)?.max(2),
            window: Duration::from_secs(env_number("AGENT_LOAD_WINDOW_S", 20)?.max(1)),
            agent_run: Duration::from_secs(env_number("AGENT_LOAD_AGENT_S", 20)?),
        })
    }
}

/// Prints one result line at once (the run is long; show progress).
fn bench(line: &str) {
    println!("BENCH {line}");
    let _ = std::io::stdout().flush();
}

// ---------------------------------------------------------------------------------------------
// Warnings from the agents: counted, the first few shown.

static WARNINGS: AtomicU64 = AtomicU64::new(0);

struct CountingLogger;

impl log::Log for CountingLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) && WARNINGS.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("agent_load: {}: {}", record.level(), record.args());
        }
    }
    fn flush(&self) {}
}

static LOGGER: CountingLogger = CountingLogger;

// ---------------------------------------------------------------------------------------------
// Child processes, killed and reaped when dropped.

struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Result<Daemon> {
        let out = std::fs::File::create(&log).with_context(|| format!("creating {log:?}"))?;
        let err = out.try_clone().with_context(|| format!("{log:?}"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Daemon { name, child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails (with the end of its log) if the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// How many warning and error lines it has logged.
    fn log_warnings(&self) -> usize {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .count()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A single-member etcd on loopback, its data under `dir`.
async fn start_etcd(dir: &Path) -> Result<(Daemon, String)> {
    if !Path::new(ETCD).exists() {
        bail!("{ETCD} is missing: apt-get install -y etcd-server (ci/deps does)");
    }
    let client = format!("http://127.0.0.1:{}", free_port()?);
    let peer = format!("http://127.0.0.1:{}", free_port()?);
    let mut cmd = Command::new(ETCD);
    cmd.arg("--name=bench")
        .arg(format!("--data-dir={}", dir.join("etcd").display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=bench={peer}"))
        .arg("--logger=zap")
        .env_remove("ETCD_UNSUPPORTED_ARCH");
    let mut etcd = Daemon::spawn("etcd", &mut cmd, dir.join("etcd.log"))?;
    let probe = Client::with_timeout(&[client.as_str()], Duration::from_secs(1))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe.get("/health-probe").await.is_err() {
        etcd.check_alive()?;
        if Instant::now() > deadline {
            bail!("etcd did not answer within 30 s:\n{}", etcd.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((etcd, client))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// A containerd of our own (root, state and socket under `dir`, CRI off), as the containerd
/// tests start it; `None` (with the reason) when not root or not installed, or it fails.
async fn start_containerd(dir: &Path) -> (Option<(Daemon, PathBuf)>, String) {
    if !is_root() {
        return (None, "none-not-root".into());
    }
    if !Path::new(CONTAINERD).exists() {
        return (None, "none-not-installed".into());
    }
    match try_start_containerd(dir).await {
        Ok(d) => (Some(d), "private".into()),
        Err(e) => {
            eprintln!("agent_load: containerd: {e:#}; measuring the agent without it");
            (None, "none-failed-to-start".into())
        }
    }
}

async fn try_start_containerd(dir: &Path) -> Result<(Daemon, PathBuf)> {
    let d = dir.join("containerd");
    std::fs::create_dir_all(&d).with_context(|| format!("creating {d:?}"))?;
    let sock = d.join("containerd.sock");
    let config = format!(
        "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
         disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
         [grpc]\n  address = \"{}\"\n[ttrpc]\n  address = \"{}.ttrpc\"\n",
        d.join("root").display(),
        d.join("state").display(),
        sock.display(),
        sock.display(),
    );
    std::fs::write(d.join("config.toml"), config)?;
    let mut cmd = Command::new(CONTAINERD);
    cmd.arg("--config").arg(d.join("config.toml"));
    let mut daemon = Daemon::spawn("containerd", &mut cmd, d.join("containerd.log"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        daemon.check_alive()?;
        if Instant::now() > deadline {
            bail!("no socket after 30 s:\n{}", daemon.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((daemon, sock))
}

/// The real `caisson-fleet agent`, configured by a fleet.toml under `dir`.
fn start_agent(dir: &Path, endpoint: &str, socket: Option<&Path>, id: &str) -> Result<Daemon> {
    let root = dir.join("agent-root");
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::write(root.join("etc/machine-id"), format!("{id}\n"))?;
    let socket = socket.map_or_else(|| dir.join("no-containerd.sock"), Path::to_path_buf);
    let config = format!(
        "endpoints = [\"{endpoint}\"]\ninsecure = true\naddress = \"127.0.0.1\"\n\
         units_dir = \"{}\"\ncontainerd_socket = \"{}\"\nnamespace = \"caisson-bench\"\n\
         [network]\nenabled = false\n",
        dir.join("agent-units").display(),
        socket.display(),
    );
    let path = dir.join("fleet.toml");
    std::fs::write(&path, config)?;
    let mut cmd = Command::new(AGENT);
    cmd.arg("--config")
        .arg(&path)
        .arg("agent")
        .arg("--root")
        .arg(&root)
        .env("RUST_LOG", "info")
        .env_remove("CAISSON_FLEET_ETCD");
    Daemon::spawn("caisson-fleet agent", &mut cmd, dir.join("agent.log"))
}

// ---------------------------------------------------------------------------------------------
// Reading processes and etcd.

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces) start at field 3, the state.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{path}: no field {}", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// A `Vm*` line of /proc/<pid>/status, in KiB.
fn status_kib(pid: &str, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{path}: no {key}"))
}

/// Busy and total jiffies of the whole machine (the first line of /proc/stat).
fn host_jiffies() -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let v: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// etcd's counters: gRPC messages received by method (the JSON gateway forwards every HTTP
/// request as one), and the raft proposals committed.
#[derive(Default)]
struct Counters {
    by_method: BTreeMap<String, f64>,
    proposals: f64,
}

impl Counters {
    async fn read(http: &reqwest::Client, endpoint: &str) -> Result<Counters> {
        let url = format!("{endpoint}/metrics");
        let text = http
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("GET {url}"))?
            .text()
            .await
            .with_context(|| format!("GET {url}"))?;
        let mut c = Counters::default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if name == "etcd_server_proposals_committed_total" {
                c.proposals = value;
            } else if let Some(labels) = name.strip_prefix("grpc_server_msg_received_total{") {
                let method = labels
                    .split("grpc_method=\"")
                    .nth(1)
                    .and_then(|m| m.split('"').next())
                    .unwrap_or("?");
                *c.by_method.entry(method.to_string()).or_default() += value;
            }
        }
        Ok(c)
    }

    fn requests(&self) -> f64 {
        self.by_method.values().sum()
    }
}

/// A snapshot of everything the steady-state window compares.
struct Snapshot {
    at: Instant,
    counters: Counters,
    etcd_ticks: u64,
    self_ticks: u64,
    host: (u64, u64),
    warnings: u64,
}

impl Snapshot {
    async fn take(http: &reqwest::Client, endpoint: &str, etcd_pid: &str) -> Result<Snapshot> {
        Ok(Snapshot {
            at: Instant::now(),
            counters: Counters::read(http, endpoint).await?,
            etcd_ticks: cpu_ticks(etcd_pid)?,
            self_ticks: cpu_ticks("self")?,
            host: host_jiffies()?,
            warnings: WARNINGS.load(Ordering::Relaxed),
        })
    }
}

fn report_window(a: &Snapshot, b: &Snapshot, etcd_pid: &str) -> Result<()> {
    let dt = (b.at - a.at).as_secs_f64();
    let hz = clock_ticks();
    let pct = |t0: u64, t1: u64| (t1 - t0) as f64 / hz / dt * 100.0;
    let (busy0, total0) = a.host;
    let (busy1, total1) = b.host;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let host = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64 * 100.0 * cores;
    let mut methods = String::new();
    for (m, v1) in &b.counters.by_method {
        let v0 = a.counters.by_method.get(m).copied().unwrap_or(0.0);
        if *v1 > v0 {
            let sep = if methods.is_empty() { "" } else { "," };
            let _ = write!(methods, "{sep}{m}:{:.0}", (v1 - v0) / dt);
        }
    }
    bench(&format!(
        "steady_window_s={dt:.1} etcd_requests_per_s={:.0} etcd_proposals_per_s={:.0} \
         etcd_cpu_pct={:.1} etcd_rss_kib={}",
        (b.counters.requests() - a.counters.requests()) / dt,
        (b.counters.proposals - a.counters.proposals) / dt,
        pct(a.etcd_ticks, b.etcd_ticks),
        status_kib(etcd_pid, "VmRSS")?,
    ));
    bench(&format!("steady_requests_per_s_by_method={methods}"));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    bench(&format!(
        "sim_process_cpu_pct={:.1} sim_process_rss_kib={} host_cpu_busy_pct={host:.0} \
         host_cores={cores} loadavg_1m={} steady_warnings={}",
        pct(a.self_ticks, b.self_ticks),
        status_kib("self", "VmRSS")?,
        load.split_whitespace().next().unwrap_or("?"),
        b.warnings - a.warnings,
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The simulated machines.

fn record(id: String) -> MachineRecord {
    MachineRecord {
        id,
        address: "127.0.0.1".into(),
        labels: BTreeMap::from([("zone".to_string(), "bench".to_string())]),
        version: None,
        slot: None,
        last_seen: 0,
        memory_bytes: None,
        cpus: None,
    }
}

/// Joins `n` agents at once; returns them when every one is registered.
async fn join_all(config: &Config, n: usize) -> Result<Vec<Agent<FakeRuntime>>> {
    let mut set = JoinSet::new();
    for i in 0..n {
        let config = config.clone();
        set.spawn(async move {
            Agent::join(
                &config,
                record(format!("sim-{i:05}")),
                FakeRuntime::default(),
            )
            .await
        });
    }
    let mut agents = Vec::with_capacity(n);
    let all = async {
        while let Some(r) = set.join_next().await {
            agents.push(r.context("an agent task failed")??);
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .context("the agents did not all join within 120 s")??;
    Ok(agents)
}

/// A running simulated machine.
struct Running {
    id: String,
    stop: Option<oneshot::Sender<()>>,
    task: AbortHandle,
}

/// Runs every agent's loop, the starts spread evenly over one tick.
fn run_all(agents: Vec<Agent<FakeRuntime>>, set: &mut JoinSet<()>) -> Vec<Running> {
    let n = agents.len() as u32;
    let mut out = Vec::with_capacity(agents.len());
    for (i, a) in agents.into_iter().enumerate() {
        let (tx, rx) = oneshot::channel::<()>();
        let delay = a.tick * i as u32 / n;
        let id = a.member.id().to_string();
        let task = set.spawn(async move {
            tokio::time::sleep(delay).await;
            a.run(async {
                let _ = rx.await;
            })
            .await;
        });
        out.push(Running {
            id,
            stop: Some(tx),
            task,
        });
    }
    out
}

/// Waits until the leader key names someone other than `old`; the time of its deletion too.
async fn next_leader(
    client: &Client,
    keys: &Keys,
    old: &str,
    act: impl FnOnce(),
) -> Result<(Duration, Duration, String)> {
    let rev = client.range(&keys.leader(), false).await?.revision;
    let mut watch = client.watch(&keys.leader(), false, rev + 1);
    let t = Instant::now();
    act();
    let mut gone = None;
    let wait = async {
        loop {
            for ev in watch.next().await? {
                match ev {
                    Event::Delete(_) => gone = gone.or(Some(t.elapsed())),
                    Event::Put(kv) if kv.value_str() != old => {
                        let new = t.elapsed();
                        return Ok::<_, anyhow::Error>((gone.unwrap_or(new), new, kv.value_str()));
                    }
                    Event::Put(_) => {}
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .context("no new leader within 60 s")?
}

async fn current_leader(client: &Client, keys: &Keys, running: &[Running]) -> Result<usize> {
    let id = registry::leader(client, keys)
        .await?
        .context("no leader is elected")?;
    running
        .iter()
        .position(|r| r.id == id)
        .with_context(|| format!("the leader {id} is not one of the simulated machines"))
}

/// Polls until `id` is registered; returns how long it took.
async fn wait_registered(
    client: &Client,
    keys: &Keys,
    id: &str,
    agent: &mut Daemon,
) -> Result<Duration> {
    let t = Instant::now();
    loop {
        if client.get(&keys.machine(id)).await?.is_some() {
            return Ok(t.elapsed());
        }
        agent.check_alive()?;
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "the agent did not register within 30 s:\n{}",
                agent.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------

async fn run(s: Settings) -> Result<()> {
    let parent = if Path::new("/var/tmp").is_dir() {
        PathBuf::from("/var/tmp")
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix("caisson-agent-load-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a directory in {parent:?}"))?;
    let (mut etcd, endpoint) = start_etcd(dir.path()).await?;
    let etcd_pid = etcd.pid().to_string();
    let (containerd, containerd_mode) = start_containerd(dir.path()).await;
    let config = Config {
        endpoints: vec![endpoint.clone()],
        address: Some("127.0.0.1".into()),
        ..Config::default()
    };
    let client = Client::new(&config.endpoints)?;
    let keys = Keys::new(&config.prefix);
    let http = reqwest::Client::builder().no_proxy().build()?;
    let tick = Duration::from_millis(config.ttl_s as u64 * 1000 / 3);
    bench(&format!(
        "machines={} ttl_s={} tick_ms={} etcd_data={}",
        s.machines,
        config.ttl_s,
        tick.as_millis(),
        parent.display()
    ));

    // 1. Registration, all at once.
    let t = Instant::now();
    let agents = join_all(&config, s.machines).await?;
    let register = t.elapsed();
    let n = registry::machines(&client, &keys).await?.len();
    if n != s.machines {
        bail!("{n} machines registered, {} expected", s.machines);
    }
    bench(&format!("register_all_ms={}", register.as_millis()));

    // 2 and 3. Steady state, with the real agent alongside.
    let mut set = JoinSet::new();
    let mut running = run_all(agents, &mut set);
    let real_id = "bench-real-agent";
    let socket = containerd.as_ref().map(|(_, s)| s.as_path());
    let mut agent = start_agent(dir.path(), &endpoint, socket, real_id)?;
    let agent_start = Instant::now();
    let agent_register = wait_registered(&client, &keys, real_id, &mut agent).await?;
    tokio::time::sleep((tick + Duration::from_secs(2)).saturating_sub(agent_start.elapsed())).await;
    etcd.check_alive()?;
    let a = Snapshot::take(&http, &endpoint, &etcd_pid).await?;
    tokio::time::sleep(s.window).await;
    let b = Snapshot::take(&http, &endpoint, &etcd_pid).await?;
    report_window(&a, &b, &etcd_pid)?;
    tokio::time::sleep(s.agent_run.saturating_sub(agent_start.elapsed())).await;
    agent.check_alive()?;
    let pid = agent.pid().to_string();
    if client.get(&keys.machine(real_id)).await?.is_none() {
        bail!(
            "the real agent is no longer registered:\n{}",
            agent.log_tail()
        );
    }
    bench(&format!(
        "agent_rss_kib={} agent_hwm_kib={} agent_ran_s={} agent_register_ms={} agent_containerd={containerd_mode} agent_warnings={}",
        status_kib(&pid, "VmRSS")?,
        status_kib(&pid, "VmHWM")?,
        agent_start.elapsed().as_secs(),
        agent_register.as_millis(),
        agent.log_warnings(),
    ));
    drop(agent); // so that it cannot take the lead below

    // 4. Failover: the leader stops (revokes its lease), then the next one crashes.
    let i = current_leader(&client, &keys, &running).await?;
    let old = running[i].id.clone();
    let stop = running[i].stop.take();
    let (gone, new, leader) = next_leader(&client, &keys, &old, move || drop(stop)).await?;
    bench(&format!(
        "failover_stop_ms={} failover_stop_key_gone_ms={} from={old} to={leader}",
        new.as_millis(),
        gone.as_millis()
    ));
    let i = current_leader(&client, &keys, &running).await?;
    let old = running[i].id.clone();
    let task = running[i].task.clone();
    let (_, new, leader) = next_leader(&client, &keys, &old, move || task.abort()).await?;
    bench(&format!(
        "failover_crash_ms={} ttl_s={} from={old} to={leader}",
        new.as_millis(),
        config.ttl_s
    ));

    // The rest leave (revoking their leases), then everything is torn down.
    for r in &mut running {
        r.stop.take();
    }
    let left = tokio::time::timeout(Duration::from_secs(30), async {
        while set.join_next().await.is_some() {}
    })
    .await;
    bench(&format!(
        "warnings_total={} all_left={}",
        WARNINGS.load(Ordering::Relaxed),
        left.is_ok()
    ));
    etcd.check_alive()?;
    drop(set);
    drop(containerd);
    drop(etcd);
    dir.close().context("removing the temporary directory")?;
    Ok(())
}

fn main() -> Result<()> {
    let settings = Settings::from_env()?;
    log::set_logger(&LOGGER).context("installing the logger")?;
    log::set_max_level(log::LevelFilter::Warn);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(settings) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = term.recv() => bail!("terminated"),
        }
    })
}
