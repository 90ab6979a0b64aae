//! The supervisor with real processes (not as PID1): spawn, capture output, reap, restart with
//! backoff, readiness by path, and shutdown by SIGTERM.

use caisson_init::logs::{self, LogPump};
use caisson_init::reaper::Reaper;
use caisson_init::service::ServiceSpec;
use caisson_init::supervisor::{Config, Notice, Supervisor};
use caisson_init::sys::{Real, Syscall};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn real_processes_end_to_end() {
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
