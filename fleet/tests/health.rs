//! Health checks against a real containerd (started by the test, see `testbed`): an `exec`
//! check runs in the container through Tasks.Exec, an unhealthy instance is restarted by its
//! policy and its successor checked afresh; an `http` check reaches busybox httpd in the
//! container (on the host's network: a free loopback port) and tells 200 from 404.
//!
//! Needs root, `containerd`, `runc` and `busybox-static`; without them the tests say why and
//! pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The test's containerd and images (fleet/tests/common/containerd.rs).
#[path = "common/containerd.rs"]
mod testbed;

use caisson_fleet::agent::health::{Monitor, State, Status};
use caisson_fleet::agent::{reconcile_checked, Runtime};
use caisson_fleet::containerd::Containerd;
use caisson_fleet::store::UnitStatus;
use caisson_fleet::unit::UnitSpec;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use testbed::{busybox_archive, missing, Daemon, APPLETS};

/// Long enough for anything here on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(60);

fn units(list: &[(&str, String)]) -> BTreeMap<String, UnitSpec> {
    list.iter()
        .map(|(name, body)| (name.to_string(), UnitSpec::parse(name, body).unwrap()))
        .collect()
}

/// Reconciles every 200 ms until `done` holds for the statuses (or the monitor); the last
/// statuses.
async fn reconcile_until(
    rt: &Containerd,
    daemon: &Daemon,
    desired: &BTreeMap<String, UnitSpec>,
    m: &Monitor,
    done: impl Fn(&BTreeMap<String, UnitStatus>) -> bool,
) -> BTreeMap<String, UnitStatus> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let st = reconcile_checked(rt, desired, m)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
        if done(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{st:#?}\n{:?}", m.all());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits, without reconciling, until the monitor finds `unit` in `want`.
async fn until_health(m: &Monitor, unit: &str, want: State) -> Status {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(s) = m.all().get(unit).filter(|s| s.state == want) {
            return s.clone();
        }
        assert!(Instant::now() < deadline, "{want:?}: {:?}", m.all());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_check_fails_and_the_policy_restarts_the_container() {
    if let Some(why) = missing() {
        eprintln!("skipping the containerd health test: {why}");
        return;
    }
    let daemon = Daemon::start();
    let mut rt = daemon.runtime("health");
    // runc keeps its state per namespace outside the daemon's directory: one of its own.
    rt.namespace.push_str("-exec");
    let archive = daemon.dir.path().join("busybox.oci.tar");
    busybox_archive(&archive, &APPLETS);
    // The first run never makes /tmp/ok; a restart (same writable snapshot) does.
    let desired = units(&[(
        "probe",
        format!(
            r#"command = ["/bin/sh", "-c", "if [ -f /tmp/started ]; then touch /tmp/ok; fi; touch /tmp/started; exec sleep 1000"]
restart = "on-failure"
[health]
exec = ["test", "-f", "/tmp/ok"]
interval = "300ms"
timeout = "10s"
retries = 2
[image]
path = "{}""#,
            archive.display()
        ),
    )]);
    let m = Monitor::new(None);
    let st = reconcile_until(&rt, &daemon, &desired, &m, |_| true).await;
    assert_eq!(
        (st["probe"].state.as_str(), st["probe"].restarts),
        ("starting", 0),
        "{st:?}"
    );
    let sick = until_health(&m, "probe", State::Unhealthy).await;
    let why = sick.last_failure.unwrap_or_default();
    assert!(why.contains("exited with 1"), "{why}");
    assert_eq!(sick.failures, 2);
    // The next reconciliation stops and starts it again: one restart, checked afresh.
    let st = reconcile_until(&rt, &daemon, &desired, &m, |_| true).await;
    assert_eq!(st["probe"].restarts, 1, "{st:?}");
    assert_ne!(st["probe"].state, "unhealthy", "{st:?}");
    let st = reconcile_until(&rt, &daemon, &desired, &m, |st| {
        st["probe"].state == "healthy"
    })
    .await;
    assert_eq!(st["probe"].restarts, 1, "{st:?}");
    assert_eq!(st["probe"].health_error, None);
    // An exec reports its exit code; one that outlives its timeout is killed and fails.
    let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let exit7 = argv(&["sh", "-c", "exit 7"]);
    let code = rt.exec("probe", &exit7, Duration::from_secs(10)).await;
    assert_eq!(code.unwrap(), 7);
    let t = Instant::now();
    let e = rt
        .exec("probe", &argv(&["sleep", "100"]), Duration::from_secs(1))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("did not exit within 1s; killed"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // The exec processes were deleted: only the container's own process is left in its task.
    let ps = std::process::Command::new("ctr")
        .arg("--address")
        .arg(daemon.socket())
        .args(["--namespace", &rt.namespace, "tasks", "ps", "probe"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&ps.stdout);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    reconcile_until(&rt, &daemon, &BTreeMap::new(), &m, |st| st.is_empty()).await;
    assert!(m.all().is_empty(), "{:?}", m.all());
    assert!(rt.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_check_reaches_httpd_in_the_container() {
    if let Some(why) = missing() {
        eprintln!("skipping the containerd health test: {why}");
        return;
    }
    let daemon = Daemon::start();
    let mut rt = daemon.runtime("health");
    rt.namespace.push_str("-http");
    let archive = daemon.dir.path().join("busybox.oci.tar");
    busybox_archive(&archive, &APPLETS);
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    // The start period excuses the refusals before httpd listens (for "web"). The host's
    // network: this runtime has no bridge (the test must not change the host's network), so
    // the check reaches httpd on loopback.
    let httpd = |port: u16, path: &str, restart: &str, start_period: &str| {
        format!(
            r#"command = ["/bin/sh", "-c", "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && exec httpd -f -p 127.0.0.1:{port} -h /tmp/www"]
network = "host"
restart = "{restart}"
[health]
http = "http://127.0.0.1:{port}{path}"
interval = "300ms"
timeout = "5s"
retries = 2
start_period = "{start_period}"
[image]
path = "{}""#,
            archive.display()
        )
    };
    let (good, bad) = (free(), free());
    let desired = units(&[
        ("web", httpd(good, "/index.html", "always", "1m")),
        ("missing", httpd(bad, "/missing.html", "never", "0s")),
    ]);
    let m = Monitor::new(None);
    let st = reconcile_until(&rt, &daemon, &desired, &m, |st| {
        st["web"].state == "healthy"
            && st["missing"].state == "unhealthy"
            && st["missing"]
                .health_error
                .as_deref()
                .is_some_and(|e| e.contains("HTTP 404"))
    })
    .await;
    assert_eq!(st["web"].restarts, 0, "{st:?}");
    assert_eq!(st["web"].health_error, None);
    // `never`: the unhealthy one is left running, not restarted.
    assert_eq!(st["missing"].restarts, 0, "{st:?}");
    let st = reconcile_until(&rt, &daemon, &desired, &m, |_| true).await;
    assert_eq!(
        (st["missing"].state.as_str(), st["missing"].restarts),
        ("unhealthy", 0)
    );
    // Removed, its checks end with it.
    reconcile_until(&rt, &daemon, &BTreeMap::new(), &m, |st| st.is_empty()).await;
    assert!(m.all().is_empty(), "{:?}", m.all());
    assert!(rt.list().await.unwrap().is_empty());
}
