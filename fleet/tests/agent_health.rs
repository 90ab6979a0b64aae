//! Health checks in a clustered agent (in-memory runtime, real etcd): with a fallback tick far
//! longer than the test, a change of health alone makes the agent report it and act on it, and
//! `caisson-fleet units` shows it.

#![allow(clippy::unwrap_used)]

mod common;

use caisson_fleet::agent::{Agent, FakeRuntime};
use caisson_fleet::config::Config;
use caisson_fleet::store::{Store, UnitStatus};
use caisson_fleet::unit::UnitSpec;
use common::{record, Etcd};
use std::process::Command;
use std::time::{Duration, Instant};

/// Long enough for anything here on a loaded machine, far shorter than the agent's tick.
const PATIENCE: Duration = Duration::from_secs(20);

async fn status(store: &Store, unit: &str) -> Option<UnitStatus> {
    let st = store.statuses().await.ok()?;
    st.get(&("m1".to_string(), unit.to_string())).cloned()
}

/// Polls until `unit`'s status on m1 satisfies `want`; that status.
async fn until(store: &Store, unit: &str, want: impl Fn(&UnitStatus) -> bool) -> UnitStatus {
    let t = Instant::now();
    loop {
        let st = status(store, unit).await;
        if let Some(s) = st.as_ref().filter(|s| want(s)) {
            return s.clone();
        }
        assert!(t.elapsed() < PATIENCE, "{unit}: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_changes_are_reported_and_acted_on_at_once() {
    let etcd = Etcd::start();
    let cfg = Config {
        endpoints: vec![etcd.endpoint()],
        ttl_s: 2,
        ..Config::default()
    };
    let rt = FakeRuntime::default();
    rt.set_exec("api", 0);
    let mut a = Agent::join(&cfg, record("m1"), rt.clone()).await.unwrap();
    a.tick = Duration::from_secs(600);
    let store = Store::new(a.store.client.clone(), a.store.keys.clone());
    let agent = tokio::spawn(a.run(std::future::pending()));

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = UnitSpec::parse(
        "api",
        "restart = \"always\"\n[image]\npath = \"/a.tar\"\n[health]\nexec = [\"check\"]\ninterval = \"100ms\"\nretries = 2",
    )
    .unwrap();
    let db = UnitSpec::parse(
        "db",
        &format!("restart = \"never\"\n[image]\npath = \"/d.tar\"\n[health]\ntcp = {closed}\ninterval = \"100ms\"\nretries = 1"),
    )
    .unwrap();
    store.submit(&[api, db]).await.unwrap();

    // Healthy: reported without waiting for the tick.
    let s = until(&store, "api", |s| s.state == "healthy").await;
    assert_eq!((s.restarts, &s.health_error), (0, &None));
    // Failing checks: restarted by its policy at once, then healthy again.
    rt.set_exec("api", 1);
    until(&store, "api", |s| s.restarts >= 1).await;
    rt.set_exec("api", 0);
    let s = until(&store, "api", |s| s.state == "healthy").await;
    assert!(s.restarts >= 1);
    // `never`: left running, reported unhealthy with the reason.
    let s = until(&store, "db", |s| s.state == "unhealthy").await;
    assert_eq!(s.restarts, 0);
    let why = s.health_error.unwrap();
    assert!(why.contains(&format!("127.0.0.1:{closed}")), "{why}");
    assert_eq!(rt.units(), ["api", "db"]);

    // The CLI shows both states, and why db is unhealthy.
    let out = Command::new(env!("CARGO_BIN_EXE_caisson-fleet"))
        .args(["--etcd", &etcd.endpoint(), "--insecure"])
        .args(["--config", "/nonexistent/fleet.toml", "units"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("m1:healthy"), "{text}");
    assert!(text.contains("m1:unhealthy"), "{text}");
    assert!(
        text.contains(&format!("m1: connecting to 127.0.0.1:{closed}")),
        "{text}"
    );
    agent.abort();
}
