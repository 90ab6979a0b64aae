//! The supervisor with real processes (not as PID1): spawn, capture output, reap, restart with
//! backoff, readiness by path, and shutdown by SIGTERM; and, where a cgroup v2 hierarchy can be
//! written, a stop that ends a service's forked children too.
//!
//! The tests reap with `waitpid(-1)`, which would collect each other's children: they take
//! [`SERIAL`] to run one at a time.

use caisson_init::cgroup::{self, Cgroups};
use caisson_init::logs::{self, LogPump};
use caisson_init::reaper::Reaper;
use caisson_init::service::ServiceSpec;
use caisson_init::supervisor::{Config, Notice, Supervisor};
use caisson_init::sys::{Real, Syscall};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn real_processes_end_to_end() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let flag = tmp.path().join("up");
    let specs = vec![
        ServiceSpec::parse(
            "hello",
            "exec = \"/bin/sh\"\nargs = [\"-c\", \"echo hello from $GREETING; exit 0\"]\n\
             kind = \"oneshot\"\nenv = { GREETING = \"caisson\" }\n",
        )
        .unwrap(),
        ServiceSpec::parse(
            "flaky",
            "exec = \"/bin/sh\"\nargs = [\"-c\", \"echo boom >&2; exit 1\"]\nrequired = false\n",
        )
        .unwrap(),
        ServiceSpec::parse(
            "daemon",
            &format!(
                "exec = \"/bin/sh\"\nargs = [\"-c\", \"touch {}; exec sleep 60\"]\n\
                 requires = [\"hello\"]\n[ready]\npath = \"{}\"\n",
                flag.display(),
                flag.display()
            ),
        )
        .unwrap(),
    ];
    let sys: Arc<dyn Syscall> = Arc::new(Real);
    let reaper = Arc::new(Reaper::default());
    let pump = LogPump {
        dir: tmp.path().to_path_buf(),
        max_bytes: 1 << 20,
        console_burst: 10,
        console_per_sec: 10,
        console: false,
    };
    let config = Config {
        healthy_after: Duration::from_millis(0),
        ..Default::default()
    };
    let mut sup = Supervisor::new(
        sys.clone(),
        reaper.clone(),
        Arc::new(pump),
        config,
        specs,
        vec![],
    );
    let mut notices = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        for (pid, exit) in reaper.reap_all(sys.as_ref()) {
            sup.on_exit(pid, exit, Instant::now());
        }
        notices.extend(sup.tick(Instant::now()));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(notices.contains(&Notice::Ready), "{:?}", sup.status());
    assert!(notices.contains(&Notice::Healthy));
    let status = sup.status();
    let get = |n: &str| status.iter().find(|s| s.name == n).unwrap().clone();
    assert_eq!(get("hello").state, "exited");
    assert_eq!(get("daemon").state, "running");
    assert!(get("flaky").restarts >= 2, "{:?}", get("flaky"));
    assert_eq!(
        logs::tail(tmp.path(), "hello", 5).unwrap(),
        ["hello from caisson"]
    );
    assert!(logs::tail(tmp.path(), "flaky", 1).unwrap() == ["boom"]);

    sup.begin_shutdown(Instant::now());
    let start = Instant::now();
    let mut done = false;
    while start.elapsed() < Duration::from_secs(5) && !done {
        for (pid, exit) in reaper.reap_all(sys.as_ref()) {
            sup.on_exit(pid, exit, Instant::now());
        }
        done = sup.tick(Instant::now()).contains(&Notice::ShutdownDone);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(done, "{:?}", sup.status());
    assert_eq!(get("daemon").name, "daemon");
    assert!(sup.running_pids().is_empty());
}

/// A cgroup v2 directory of our own, removed (with anything left in it killed) when dropped.
struct TestCgroup(PathBuf);

impl TestCgroup {
    /// One under the first writable cgroup2 mount, or why there is none.
    fn create() -> Result<TestCgroup, String> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        let mounts: Vec<&str> = info
            .lines()
            .filter(|l| {
                l.split_once(" - ")
                    .is_some_and(|(_, r)| r.starts_with("cgroup2 "))
            })
            .filter_map(|l| l.split_whitespace().nth(4))
            .collect();
        if mounts.is_empty() {
            return Err("no cgroup2 hierarchy is mounted".into());
        }
        let mut why = Vec::new();
        for m in mounts {
            let dir = Path::new(m).join(format!("caisson-init-test-{}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) if dir.join("cgroup.kill").exists() => return Ok(TestCgroup(dir)),
                Ok(()) => {
                    let _ = std::fs::remove_dir(&dir);
                    why.push(format!("{m}: no cgroup.kill (kernel before 5.14)"));
                }
                Err(e) => why.push(format!("{m}: {e}")),
            }
        }
        Err(why.join("; "))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let service = self.0.join("system/forker");
        let _ = std::fs::write(service.join("cgroup.kill"), "1");
        for _ in 0..50 {
            if !cgroup::populated(&service).unwrap_or(false) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir(&service);
        let _ = std::fs::remove_dir(self.0.join("system"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Reap, tick and wait until `done` holds, for at most `within`.
fn run_until(
    sup: &mut Supervisor,
    reaper: &Reaper,
    sys: &dyn Syscall,
    within: Duration,
    mut done: impl FnMut(&Supervisor) -> bool,
) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        for (child, exit) in reaper.reap_all(sys) {
            sup.on_exit(child, exit, Instant::now());
        }
        sup.tick(Instant::now());
        if done(sup) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A process is gone when it no longer exists or is a zombie (its parent, which may not be us
/// once it was orphaned, has not collected it yet).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[test]
fn stop_ends_the_forked_children_too() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let cg = match TestCgroup::create() {
        Ok(cg) => cg,
        Err(why) => {
            eprintln!(
                "SKIPPED stop_ends_the_forked_children_too: no writable cgroup v2 here ({why})"
            );
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let spec = ServiceSpec::parse(
        "forker",
        "exec = \"/bin/sh\"\nargs = [\"-c\", \"sleep 1000 & exec sleep 1000\"]\n\
         stop_timeout_s = 2\n",
    )
    .unwrap();
    let sys: Arc<dyn Syscall> = Arc::new(Real);
    let reaper = Arc::new(Reaper::default());
    let config = Config {
        cgroups: Some(Cgroups { root: cg.0.clone() }),
        ..Default::default()
    };
    let pump = LogPump {
        dir: tmp.path().to_path_buf(),
        max_bytes: 1 << 20,
        console_burst: 10,
        console_per_sec: 10,
        console: false,
    };
    let mut sup = Supervisor::new(
        sys.clone(),
        reaper.clone(),
        Arc::new(pump),
        config,
        vec![spec],
        vec![],
    );
    let cgroups = Cgroups { root: cg.0.clone() };
    let mut pids = Vec::new();
    let forked = run_until(
        &mut sup,
        &reaper,
        sys.as_ref(),
        Duration::from_secs(5),
        |_| {
            pids = cgroups.procs("forker").unwrap_or_default();
            pids.len() == 2
        },
    );
    assert!(
        forked,
        "the service and its child: {pids:?}, {:?}",
        sup.status()
    );
    let main = sup.status()[0].pid.unwrap();
    assert!(pids.contains(&main), "{pids:?} {main}");

    sup.stop_service("forker", Instant::now()).unwrap();
    let stopped = run_until(
        &mut sup,
        &reaper,
        sys.as_ref(),
        Duration::from_secs(5),
        |s| s.status()[0].state == "stopped",
    );
    assert!(stopped, "{:?}", sup.status());
    assert!(!cgroups.populated("forker").unwrap());
    for pid in &pids {
        assert!(
            gone(*pid),
            "pid {pid} of the service is still running after stop"
        );
    }
    // SIGTERM was enough: it never came to cgroup.kill's SIGKILL.
    assert_eq!(sup.status()[0].last_exit.as_deref(), Some("signal 15"));
}
