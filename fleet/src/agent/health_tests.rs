//! Tests of the health checks: the state rules (pure), each probe against real loopback
//! listeners, and the monitor with reconciliation on the in-memory runtime.

use super::*;
use crate::agent::{actions_with_health, reconcile_checked, Action, FakeRuntime};
use crate::unit::{Health, Probe};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A check with a 100 ms interval, a 300 ms timeout and no start period.
fn check(probe: Probe, retries: u32) -> Health {
    Health {
        probe,
        interval_ms: 100,
        timeout_ms: 300,
        retries,
        start_period_ms: 0,
    }
}

/// Long enough for anything these tests wait for, on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);

#[test]
fn retries_and_the_start_period() {
    let fail = || Err("refused".to_string());
    let mut s = Status::default();
    assert_eq!(s.state, State::Starting);
    // Within the start period, failures before the first success do not count.
    for _ in 0..5 {
        assert!(!s.record(fail(), true, 2, 1));
    }
    assert_eq!((s.state, s.failures), (State::Starting, 0));
    assert_eq!(s.last_failure.as_deref(), Some("refused"));
    // After it, they do: `retries` in a row make it unhealthy.
    assert!(!s.record(fail(), false, 2, 2));
    assert_eq!((s.state, s.failures), (State::Starting, 1));
    assert!(s.record(fail(), false, 2, 3));
    assert_eq!(s.state, State::Unhealthy);
    // One success heals it and resets the count.
    assert!(s.record(Ok(()), false, 2, 4));
    assert_eq!(
        (s.state, s.failures, s.last_check),
        (State::Healthy, 0, Some(4))
    );
    // Once it succeeded, the start period no longer excuses failures.
    assert!(!s.record(fail(), true, 2, 5));
    assert_eq!((s.state, s.failures), (State::Healthy, 1));
    assert!(s.record(fail(), true, 2, 6));
    assert_eq!(s.state, State::Unhealthy);
    // Not consecutive: a success in between starts the count again.
    let mut s = Status::default();
    for outcome in [fail(), fail(), Ok(()), fail(), fail()] {
        s.record(outcome, false, 3, 0);
    }
    assert_eq!((s.state, s.failures), (State::Healthy, 2));
}

/// A listener on a free loopback port that answers each connection with `reply` (after
/// reading the request), then keeps the connection open when `hold`.
async fn answering(reply: Vec<u8>, hold: bool) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&reply).await;
                if hold {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            });
        }
    });
    port
}

/// A loopback port nothing listens on.
async fn refusing() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

async fn http_check(port: u16) -> Result<(), String> {
    let c = check(
        Probe::Http {
            port,
            path: "/healthz".into(),
        },
        1,
    );
    probe(&FakeRuntime::default(), "web", &c).await
}

#[tokio::test]
async fn tcp_checks() {
    let rt = FakeRuntime::default();
    let open = answering(Vec::new(), false).await;
    assert_eq!(probe(&rt, "web", &check(Probe::Tcp(open), 1)).await, Ok(()));
    let closed = refusing().await;
    let e = probe(&rt, "web", &check(Probe::Tcp(closed), 1))
        .await
        .unwrap_err();
    assert!(e.contains(&format!("127.0.0.1:{closed}")), "{e}");
}

#[tokio::test]
async fn http_checks() {
    let ok = answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        false,
    )
    .await;
    assert_eq!(http_check(ok).await, Ok(()));
    let moved = answering(
        b"HTTP/1.0 302 Found\r\nLocation: /x\r\n\r\n".to_vec(),
        false,
    )
    .await;
    assert_eq!(http_check(moved).await, Ok(()));
    let broken = answering(
        b"HTTP/1.1 500 Internal Server Error\r\n\r\n".to_vec(),
        false,
    )
    .await;
    let e = http_check(broken).await.unwrap_err();
    assert!(
        e.contains("HTTP 500 Internal Server Error") && e.contains("/healthz"),
        "{e}"
    );
    let garbage = answering(b"SSH-2.0-OpenSSH\r\n".to_vec(), false).await;
    let e = http_check(garbage).await.unwrap_err();
    assert!(e.contains("not an HTTP answer"), "{e}");
    let mute = answering(Vec::new(), false).await;
    let e = http_check(mute).await.unwrap_err();
    assert!(e.contains("closed without an answer"), "{e}");
    let e = http_check(refusing().await).await.unwrap_err();
    assert!(e.contains("connecting to 127.0.0.1:"), "{e}");
}

#[tokio::test]
async fn an_http_check_that_stalls_fails_at_its_timeout() {
    // Accepts, reads the request, answers nothing.
    let stalled = answering(Vec::new(), true).await;
    let t = std::time::Instant::now();
    let e = http_check(stalled).await.unwrap_err();
    assert!(e.contains("no answer within 300ms"), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(t.elapsed() < PATIENCE, "{:?}", t.elapsed());
    // Headers, then a body that never ends: still bounded by the timeout.
    let trickle = answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nx".to_vec(),
        true,
    )
    .await;
    let e = http_check(trickle).await.unwrap_err();
    assert!(e.contains("no answer within"), "{e}");
}

#[tokio::test]
async fn an_http_body_past_the_cap_is_not_read() {
    // 4 MiB of body and the connection held open: only the first HTTP_READ_CAP bytes are
    // read, and the 200 decides, well within the timeout.
    let mut reply = b"HTTP/1.1 200 OK\r\nContent-Length: 4194304\r\n\r\n".to_vec();
    reply.resize(reply.len() + 4 * 1024 * 1024, b'x');
    let big = answering(reply, true).await;
    assert_eq!(http_check(big).await, Ok(()));
    // A cap-sized answer with no status line at its start is refused, not read on.
    let mut junk = vec![b'x'; HTTP_READ_CAP as usize * 4];
    junk.extend(b"\r\n");
    let junk = answering(junk, true).await;
    let e = http_check(junk).await.unwrap_err();
    assert!(e.contains("not an HTTP answer"), "{e}");
    assert!(e.len() < HTTP_READ_CAP as usize + 200, "{}", e.len());
}

#[tokio::test]
async fn exec_checks_run_in_the_runtime() {
    let rt = FakeRuntime::default();
    let spec = UnitSpec::parse("web", "[image]\npath = \"/w.tar\"").unwrap();
    rt.start(&spec, "h").await.unwrap();
    let c = check(
        Probe::Exec(vec!["test".into(), "-f".into(), "/ok".into()]),
        1,
    );
    let e = probe(&rt, "web", &c).await.unwrap_err();
    assert!(e.contains("no running task"), "{e}");
    rt.set_exec("web", 0);
    assert_eq!(probe(&rt, "web", &c).await, Ok(()));
    rt.set_exec("web", 1);
    let e = probe(&rt, "web", &c).await.unwrap_err();
    assert!(e.contains("exited with 1"), "{e}");
    assert_eq!(rt.execs.lock().unwrap()[0], ("web".into(), c_argv(&c)));
}

fn c_argv(c: &Health) -> Vec<String> {
    match &c.probe {
        Probe::Exec(a) => a.clone(),
        _ => Vec::new(),
    }
}

fn unit(name: &str, restart: &str, health: Health) -> UnitSpec {
    let mut u = UnitSpec::parse(
        name,
        &format!("restart = \"{restart}\"\n[image]\npath = \"/i.tar\""),
    )
    .unwrap();
    u.health = Some(health);
    u
}

#[test]
fn unhealthy_instances_follow_the_restart_policy() {
    let h = check(Probe::Tcp(1), 1);
    let desired: BTreeMap<String, UnitSpec> = [
        ("a", "always"),
        ("b", "on-failure"),
        ("c", "never"),
        ("d", "always"),
    ]
    .iter()
    .map(|(n, r)| (n.to_string(), unit(n, r, h.clone())))
    .collect();
    let running = |u: &str| Container {
        unit: u.into(),
        spec_hash: crate::agent::spec_hash(&desired[u]),
        state: ContainerState::Running,
        restarts: 0,
    };
    let actual: Vec<_> = ["a", "b", "c", "d"].into_iter().map(running).collect();
    let sick: BTreeSet<String> = ["a", "b", "c"].into_iter().map(String::from).collect();
    assert_eq!(
        actions_with_health(&desired, &actual, &sick),
        [Action::Recover("a".into()), Action::Recover("b".into())]
    );
}

/// Reconciles until `unit`'s reported state is `want`; its status.
async fn until_state(
    rt: &FakeRuntime,
    desired: &BTreeMap<String, UnitSpec>,
    m: &Monitor,
    unit: &str,
    want: &str,
) -> crate::store::UnitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let st = reconcile_checked(rt, desired, m).await.unwrap();
        if st[unit].state == want {
            return st[unit].clone();
        }
        assert!(Instant::now() < deadline, "waiting for {want}: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the monitor says `unit` is in `want`, without reconciling.
async fn until_health(m: &Monitor, unit: &str, want: State) -> Status {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(s) = m.all().get(unit).filter(|s| s.state == want) {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "waiting for {want:?}: {:?}",
            m.all()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn starting_healthy_unhealthy_restarted_healthy() {
    let rt = FakeRuntime::default();
    let (wake, mut woken) = mpsc::channel(1);
    let m = Monitor::new(Some(wake));
    let argv = vec!["test".to_string(), "-f".into(), "/ok".into()];
    let mut desired = BTreeMap::new();
    desired.insert(
        "web".to_string(),
        unit("web", "on-failure", check(Probe::Exec(argv), 3)),
    );
    let st = reconcile_checked(&rt, &desired, &m).await.unwrap();
    assert_eq!(
        (st["web"].state.as_str(), st["web"].restarts),
        ("starting", 0)
    );
    rt.set_exec("web", 0);
    until_state(&rt, &desired, &m, "web", "healthy").await;
    assert!(woken.try_recv().is_ok(), "the change woke the loop");

    // Failing checks: unhealthy after three in a row (the monitor says so before any
    // reconciliation), which wakes the loop; the reconciliation then restarts it.
    rt.set_exec("web", 1);
    let execs = rt.execs.lock().unwrap().len();
    let s = until_health(&m, "web", State::Unhealthy).await;
    assert!(rt.execs.lock().unwrap().len() >= execs + 3);
    assert_eq!(s.failures, 3);
    assert!(s.last_failure.unwrap().contains("exited with 1"));
    tokio::time::timeout(PATIENCE, woken.recv()).await.unwrap();
    let st = reconcile_checked(&rt, &desired, &m).await.unwrap();
    // The new instance starts over: its predecessor's failures do not count.
    assert_eq!(
        (st["web"].state.as_str(), st["web"].restarts),
        ("starting", 1)
    );
    assert!(st["web"].health_error.is_none(), "{st:?}");
    assert_eq!(m.all()["web"].failures, 0);
    rt.set_exec("web", 0);
    let st = until_state(&rt, &desired, &m, "web", "healthy").await;
    assert_eq!(st.restarts, 1);
    assert!(st.health_error.is_none());

    // The container goes: so do its checks.
    reconcile_checked(&rt, &BTreeMap::new(), &m).await.unwrap();
    assert!(m.all().is_empty());
    let execs = rt.execs.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rt.execs.lock().unwrap().len(), execs);
}

#[tokio::test]
async fn never_leaves_an_unhealthy_instance_running_and_says_why() {
    let rt = FakeRuntime::default();
    let m = Monitor::new(None);
    let port = refusing().await;
    let mut desired = BTreeMap::new();
    desired.insert(
        "db".to_string(),
        unit("db", "never", check(Probe::Tcp(port), 2)),
    );
    let st = until_state(&rt, &desired, &m, "db", "unhealthy").await;
    assert_eq!(st.restarts, 0);
    assert!(
        st.health_error
            .unwrap()
            .contains(&format!("127.0.0.1:{port}")),
        "the last failure is reported"
    );
    // Still unhealthy and running on the next reconciliations: nothing restarts it.
    for _ in 0..3 {
        let st = reconcile_checked(&rt, &desired, &m).await.unwrap();
        assert_eq!(
            (st["db"].state.as_str(), st["db"].restarts),
            ("unhealthy", 0)
        );
    }
    // It exits: reported exited, no checks.
    rt.exit("db", 2);
    let st = reconcile_checked(&rt, &desired, &m).await.unwrap();
    assert_eq!(
        (st["db"].state.as_str(), st["db"].exit_code),
        ("exited", Some(2))
    );
    assert!(m.all().is_empty());
}

#[tokio::test]
async fn the_start_period_excuses_early_failures_only() {
    let rt = FakeRuntime::default();
    let m = Monitor::new(None);
    let argv = vec!["check".to_string()];
    let mut desired = BTreeMap::new();
    let h = Health {
        start_period_ms: 600_000,
        ..check(Probe::Exec(argv), 1)
    };
    desired.insert("app".to_string(), unit("app", "always", h));
    rt.set_exec("app", 1);
    reconcile_checked(&rt, &desired, &m).await.unwrap();
    // Several failures in the start period: still starting, with the reason recorded.
    let deadline = Instant::now() + PATIENCE;
    while rt.execs.lock().unwrap().len() < 4 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = reconcile_checked(&rt, &desired, &m).await.unwrap();
    assert_eq!(
        (st["app"].state.as_str(), st["app"].restarts),
        ("starting", 0)
    );
    assert!(st["app"]
        .health_error
        .as_deref()
        .unwrap()
        .contains("exited with 1"));
    // Once it has succeeded, one failure (retries = 1) makes it unhealthy, start period or not.
    rt.set_exec("app", 0);
    until_health(&m, "app", State::Healthy).await;
    rt.set_exec("app", 1);
    until_health(&m, "app", State::Unhealthy).await;
}

#[tokio::test]
async fn a_new_instance_starts_from_starting() {
    let rt = FakeRuntime::default();
    let m = Monitor::new(None);
    let port = refusing().await;
    let mut desired = BTreeMap::new();
    desired.insert(
        "web".to_string(),
        unit("web", "always", check(Probe::Tcp(port), 1)),
    );
    let spec = desired["web"].clone();
    rt.start(&spec, &crate::agent::spec_hash(&spec))
        .await
        .unwrap();
    let listed = rt.list().await.unwrap();
    m.sync(&rt, &desired, &listed);
    until_health(&m, "web", State::Unhealthy).await;
    assert_eq!(m.unhealthy(&listed).len(), 1);
    // The same unit restarted (by hand here): another instance, checked afresh, and the old
    // verdict no longer applies to it.
    rt.stop_task("web").await.unwrap();
    rt.restart("web").await.unwrap();
    let relisted = rt.list().await.unwrap();
    assert!(m.unhealthy(&relisted).is_empty());
    m.sync(&rt, &desired, &relisted);
    assert_eq!(m.all()["web"], Status::default());
}

#[test]
fn older_status_records_decode() {
    let old = r#"{"state":"running","exit_code":null,"error":null,"restarts":2,"since":5}"#;
    let st: crate::store::UnitStatus = serde_json::from_str(old).unwrap();
    assert_eq!((st.state.as_str(), &st.health_error), ("running", &None));
    let json = serde_json::to_string(&st).unwrap();
    assert!(!json.contains("health_error"), "{json}");
}
