//! Agents (with an in-memory runtime) against a real etcd, and the CLI binary.

#![allow(clippy::unwrap_used)]

#[path = "common/cli.rs"]
mod cli;
mod common;

use caisson_fleet::agent::{Agent, FakeRuntime};
use caisson_fleet::store::Store;
use caisson_fleet::unit::UnitSpec;
use common::{config, join, record, tick_all, Etcd};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test]
async fn units_spread_and_move_when_a_machine_dies() {
    let etcd = Etcd::start();
    let cfg = config(&etcd);
    let (mut agents, store) = join(&cfg, &["m1", "m2", "m3"]).await;
    let web = UnitSpec::parse("web", "replicas = 2\n[image]\npath = \"/w.tar\"").unwrap();
    store.submit(&[web]).await.unwrap();
    // First tick: m1 leads and schedules; second: everyone sees its assignment.
    tick_all(&mut agents).await;
    tick_all(&mut agents).await;
    let running: Vec<&str> = ["m1", "m2", "m3"]
        .into_iter()
        .zip(&agents)
        .filter(|(_, a)| a.runtime.units() == ["web"])
        .map(|(id, _)| id)
        .collect();
    assert_eq!(running, ["m1", "m2"]);
    let st = store.statuses().await.unwrap();
    assert_eq!(st[&("m1".to_string(), "web".to_string())].state, "running");
    // m1 (the leader, running web) dies without a word: within the TTL and a few ticks the
    // survivors elect a leader and web runs on m2 and m3.
    let dead = agents.remove(0);
    std::mem::forget(dead);
    let t = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tick_all(&mut agents).await;
        if agents.iter().all(|a| a.runtime.units() == ["web"]) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(7),
            "web did not move within TTL + 5 s"
        );
    }
    // Stopping the unit removes the containers everywhere.
    store
        .set_target("web", caisson_fleet::store::Target::Stopped)
        .await
        .unwrap();
    tick_all(&mut agents).await;
    tick_all(&mut agents).await;
    assert!(agents.iter().all(|a| a.runtime.units().is_empty()));
}

fn fleet(etcd: &Etcd, args: &[&str]) -> (bool, String, String) {
    cli::fleet(&etcd.endpoint(), args)
}

#[test]
fn cli_submit_units_lock() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("web.toml");
    std::fs::write(&good, "replicas = 2\n[image]\npath = \"/w.tar\"\n").unwrap();
    let bad = dir.path().join("db.toml");
    std::fs::write(&bad, "[image]\nurl = \"http://x/db.tar\"\n").unwrap();
    // One bad file: nothing is submitted.
    let (ok, _, err) = fleet(
        &etcd,
        &["submit", good.to_str().unwrap(), bad.to_str().unwrap()],
    );
    assert!(!ok);
    assert!(err.contains("image.sha256"), "{err}");
    let (ok, out, _) = fleet(&etcd, &["units", "--json"]);
    assert!(ok);
    assert_eq!(out.trim(), "[]");
    let (ok, out, err) = fleet(&etcd, &["submit", good.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("submitted web"));
    let (_, out, _) = fleet(&etcd, &["units"]);
    assert!(out.contains("web") && out.contains("running"), "{out}");
    assert!(fleet(&etcd, &["stop", "web"]).0);
    let (_, out, _) = fleet(&etcd, &["units", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["target"], "stopped");
    let (ok, _, err) = fleet(&etcd, &["start", "nope"]);
    assert!(!ok && err.contains("no unit named"), "{err}");
    assert!(fleet(&etcd, &["destroy", "web"]).0);
    let (ok, out, _) = fleet(&etcd, &["machines", "--json"]);
    assert!(ok);
    assert_eq!(out.trim(), "[]");
    assert!(fleet(&etcd, &["lock", "set-max", "3"]).0);
    let (_, out, _) = fleet(&etcd, &["lock", "status"]);
    assert_eq!(out.trim(), "max 3 holders []");
    let (ok, _, err) = fleet(&etcd, &["lock", "set-max", "0"]);
    assert!(!ok && err.contains("at least 1"), "{err}");
}

#[test]
fn cli_without_etcd_says_how_to_configure() {
    let out = Command::new(env!("CARGO_BIN_EXE_caisson-fleet"))
        .args(["--config", "/nonexistent/fleet.toml", "units"])
        .env_remove("CAISSON_FLEET_ETCD")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--etcd"));
}

/// A stand-in for the init's control socket that answers every request "ok" and counts reboots.
fn fake_init(path: &std::path::Path) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::io::{BufRead, BufReader, Write};
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    let c = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let conn = conn.unwrap();
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line).unwrap();
            if line.trim() == caisson_layout::control::REBOOT_REQUEST {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            (&conn).write_all(b"{\"ok\":true}\n").unwrap();
        }
    });
    count
}

/// Points `a`'s reboot paths (the updater's markers, the init's socket) into `dir` under `id`,
/// behind a fake init; returns its reboot count.
fn fake_machine(
    a: &mut Agent<FakeRuntime>,
    dir: &std::path::Path,
    id: &str,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    a.reboot.marker = dir.join(format!("{id}.reboot-needed"));
    a.reboot.control_socket = dir.join(format!("{id}.sock"));
    a.reboot.settled = dir.join(format!("{id}.boot-settled"));
    fake_init(&a.reboot.control_socket)
}

#[tokio::test]
async fn etcd_lock_reboots_one_machine_at_a_time() {
    use std::sync::atomic::Ordering;
    let etcd = Etcd::start();
    let cfg = config(&etcd);
    let dir = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    let mut reboots = Vec::new();
    for id in ["m1", "m2", "m3"] {
        let mut a = Agent::join(&cfg, record(id), FakeRuntime::default())
            .await
            .unwrap();
        reboots.push(fake_machine(&mut a, dir.path(), id));
        agents.push(a);
    }
    let total = |r: &[std::sync::Arc<std::sync::atomic::AtomicUsize>]| {
        r.iter().map(|c| c.load(Ordering::SeqCst)).sum::<usize>()
    };
    // No marker: nobody reboots.
    for a in agents.iter_mut() {
        assert!(!a.reboot_if_asked().await);
    }
    assert_eq!(total(&reboots), 0);
    // The updater of every machine wrote 2.0.0 and asks for a reboot; the lock's max is 1.
    for a in &agents {
        std::fs::write(&a.reboot.marker, "2.0.0\n").unwrap();
    }
    let mut done: Vec<usize> = Vec::new();
    for round in 1..=3 {
        for _ in 0..2 {
            for (i, a) in agents.iter_mut().enumerate() {
                if a.reboot_if_asked().await && !done.contains(&i) {
                    done.push(i);
                }
            }
        }
        assert_eq!(done.len(), round, "machines rebooting after round {round}");
        assert_eq!(
            total(&reboots),
            round,
            "reboot requests after round {round}"
        );
        // The holder comes back on 2.0.0 (/run is empty again, a new agent process); it gives
        // its slot back once the updater says the boot has settled.
        let i = done[round - 1];
        std::fs::remove_file(&agents[i].reboot.marker).unwrap();
        let reboot = agents[i].reboot.clone();
        agents[i] = Agent::join(&cfg, record(["m1", "m2", "m3"][i]), FakeRuntime::default())
            .await
            .unwrap();
        agents[i].reboot = reboot;
        assert!(!agents[i].release_when_settled().await);
        std::fs::write(&agents[i].reboot.settled, "blessed 2.0.0\n").unwrap();
        assert!(agents[i].release_when_settled().await);
    }
    let mut order = done.clone();
    order.sort();
    assert_eq!(order, [0, 1, 2], "every machine rebooted once");
}

/// The reboot lock's holders now.
async fn holders(store: &Store) -> Vec<String> {
    caisson_fleet::lock::RebootLock::new(store.client.clone(), store.keys.lock())
        .status()
        .await
        .unwrap()
        .holders
}

/// Back from its reboot, a machine keeps its slot of the reboot lock while the updater has not
/// said the boot settled (the new version is not blessed yet): the next machine cannot reboot.
/// Once the marker appears, the running agent gives the slot back within a second, without
/// waiting for its tick (here far longer than the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reboot_lock_is_released_only_once_the_boot_has_settled() {
    let etcd = Etcd::start();
    let cfg = config(&etcd); // TTL 2 s: a tick every 667 ms
    let dir = tempfile::tempdir().unwrap();
    let mut next = Agent::join(&cfg, record("next"), FakeRuntime::default())
        .await
        .unwrap();
    let next_reboots = fake_machine(&mut next, dir.path(), "next");
    let store = Store::new(next.store.client.clone(), next.store.keys.clone());
    let lock = caisson_fleet::lock::RebootLock::new(store.client.clone(), store.keys.lock());
    // "back" took the only slot before its reboot.
    assert!(lock.acquire("back").await.unwrap());
    let mut back = Agent::join(&cfg, record("back"), FakeRuntime::default())
        .await
        .unwrap();
    let _back_reboots = fake_machine(&mut back, dir.path(), "back");
    back.tick = Duration::from_secs(600);
    let settled = back.reboot.settled.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(back.run(async {
        let _ = stop_rx.await;
    }));
    // "next" has not settled either, but holds nothing: nothing to wait for.
    assert!(next.release_when_settled().await);
    std::fs::write(&next.reboot.marker, "2.0.0\n").unwrap();
    // Three seconds of "back" without the marker: the slot stays held, "next" waits.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(holders(&store).await, ["back"]);
        assert!(!next.reboot_if_asked().await);
    }
    assert_eq!(
        next_reboots.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the next machine rebooted while the first had not settled"
    );
    // The updater records the success and writes the marker: released within a second or so.
    std::fs::write(&settled, "blessed 2.0.0\n").unwrap();
    let took = within("the slot given back", Duration::from_secs(3), || async {
        holders(&store).await.is_empty()
    })
    .await;
    eprintln!("slot given back {took:?} after the marker");
    assert!(next.reboot_if_asked().await);
    assert_eq!(holders(&store).await, ["next"]);
    assert_eq!(next_reboots.load(std::sync::atomic::Ordering::SeqCst), 1);
    let _ = stop_tx.send(());
    running.await.unwrap();
}

/// A machine that waits for a slot of the reboot lock takes it as soon as it is given back
/// elsewhere: its agent watches the lock while it waits, instead of finding out on a tick
/// (here, far longer than the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_machine_takes_the_slot_as_soon_as_it_is_given_back() {
    let etcd = Etcd::start();
    let cfg = config(&etcd);
    let dir = tempfile::tempdir().unwrap();
    let mut next = Agent::join(&cfg, record("next"), FakeRuntime::default())
        .await
        .unwrap();
    next.tick = Duration::from_secs(600);
    let reboots = fake_machine(&mut next, dir.path(), "next");
    let store = Store::new(next.store.client.clone(), next.store.keys.clone());
    let lock = caisson_fleet::lock::RebootLock::new(store.client.clone(), store.keys.lock());
    assert!(lock.acquire("other").await.unwrap());
    std::fs::write(&next.reboot.marker, "2.0.0\n").unwrap();
    let running = tokio::spawn(next.run(std::future::pending()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(holders(&store).await, ["other"]);
    assert_eq!(reboots.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(lock.release("other").await.unwrap());
    let took = within("the freed slot taken", Duration::from_secs(3), || async {
        reboots.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    eprintln!("slot taken {took:?} after it was given back");
    assert_eq!(holders(&store).await, ["next"]);
    running.abort();
}

/// An agent whose updater never writes the marker keeps the slot (the rollout waits; the
/// operator frees it with `caisson-fleet lock release`), and takes no new slot meanwhile.
#[tokio::test]
async fn without_the_marker_the_slot_is_kept_until_released_by_hand() {
    let etcd = Etcd::start();
    let cfg = config(&etcd);
    let dir = tempfile::tempdir().unwrap();
    let mut a = Agent::join(&cfg, record("m1"), FakeRuntime::default())
        .await
        .unwrap();
    let _reboots = fake_machine(&mut a, dir.path(), "m1");
    let store = Store::new(a.store.client.clone(), a.store.keys.clone());
    let lock = caisson_fleet::lock::RebootLock::new(store.client.clone(), store.keys.lock());
    assert!(lock.acquire("m1").await.unwrap());
    for _ in 0..3 {
        a.tick().await.unwrap();
        assert!(!a.release_when_settled().await);
        assert_eq!(holders(&store).await, ["m1"]);
    }
    // Released by hand: nothing held, nothing to wait for any more.
    assert!(lock.release("m1").await.unwrap());
    assert!(a.release_when_settled().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_container_start_does_not_cost_the_machine_its_lease() {
    let etcd = Etcd::start();
    let cfg = config(&etcd); // TTL 2 s
    let runtime = FakeRuntime::default();
    *runtime.start_delay.lock().unwrap() = Duration::from_secs(7);
    let agent = Agent::join(&cfg, record("slow"), runtime).await.unwrap();
    let lease = agent.member.lease_handle();
    let first = lease.load(std::sync::atomic::Ordering::SeqCst);
    let store = Store::new(agent.store.client.clone(), agent.store.keys.clone());
    let web = UnitSpec::parse("web", "[image]\npath = \"/w.tar\"").unwrap();
    store.submit(&[web]).await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(agent.run(async {
        let _ = stop_rx.await;
    }));
    // The first tick spends 7 s starting web: more than three TTLs.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        lease.load(std::sync::atomic::Ordering::SeqCst),
        first,
        "the machine registered again: its lease expired during the slow start"
    );
    let machines = caisson_fleet::registry::machines(&store.client, &store.keys)
        .await
        .unwrap();
    assert!(machines.iter().any(|m| m.id == "slow"), "{machines:?}");
    let _ = stop_tx.send(());
    running.await.unwrap();
}

/// Where `web` is reported running, by machine id.
async fn web_running_on(store: &Store) -> std::collections::BTreeSet<String> {
    let st = store.statuses().await.unwrap_or_default();
    st.into_iter()
        .filter(|((_, u), s)| u == "web" && s.state == "running")
        .map(|((m, _), _)| m)
        .collect()
}

/// Polls `check` every 50 ms until it holds; how long that took, or a panic after `limit`.
async fn within<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while !check().await {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.elapsed()
}

/// With a fallback tick far longer than the test, everything below can only come from the
/// watches: a submission is placed and started, a dead leader is replaced and its unit moved, a
/// dead follower's unit moved, each within the TTL (2 s) and a small margin of the event, and
/// again after etcd restarted under the agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_react_well_before_the_tick() {
    const TICK: Duration = Duration::from_secs(600);
    let mut etcd = Etcd::start();
    let cfg = config(&etcd); // TTL 2 s
    let limit = Duration::from_secs(cfg.ttl_s as u64 + 2);
    let client = caisson_fleet::etcd::Client::new(&[etcd.endpoint()]).unwrap();
    let store = Store::new(
        client.clone(),
        caisson_fleet::registry::Keys::new(&cfg.prefix),
    );
    let leader = || async {
        caisson_fleet::registry::leader(&store.client, &store.keys)
            .await
            .ok()
            .flatten()
    };
    let mut running = BTreeMap::new();
    for id in ["m1", "m2", "m3", "m4"] {
        let mut a = Agent::join(&cfg, record(id), FakeRuntime::default())
            .await
            .unwrap();
        a.tick = TICK;
        running.insert(id.to_string(), tokio::spawn(a.run(std::future::pending())));
        if id == "m1" {
            within("m1 leads", limit, || async { leader().await.is_some() }).await;
        }
    }
    assert_eq!(leader().await.as_deref(), Some("m1"));

    // A submission: the leader places web on two machines, and they start it.
    let web = UnitSpec::parse("web", "replicas = 2\n[image]\npath = \"/w.tar\"").unwrap();
    store.submit(&[web]).await.unwrap();
    let took = within("web placed and running", limit, || async {
        web_running_on(&store).await.len() == 2
    })
    .await;
    eprintln!("submitted to running on two machines: {took:?}");
    let first = web_running_on(&store).await;
    assert!(first.contains("m1"), "the leader runs web: {first:?}");

    // The leader (running web) dies without a word: its lease expires, the others see the
    // leader key go, one takes over and moves web.
    running.remove("m1").unwrap().abort();
    let took = within("m1's web moved by a new leader", limit, || async {
        let on = web_running_on(&store).await;
        let l = leader().await;
        on.len() == 2 && !on.contains("m1") && l.is_some_and(|l| l != "m1")
    })
    .await;
    eprintln!("leader killed to web running elsewhere: {took:?}");

    // etcd restarts under the agents: their watches resume and still react.
    tokio::task::block_in_place(|| etcd.restart());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now_leader = leader().await.unwrap();
    let on = web_running_on(&store).await;
    let victim = on.iter().find(|m| **m != now_leader).unwrap().clone();
    let spare = ["m2", "m3", "m4"]
        .into_iter()
        .find(|m| !on.contains(*m))
        .unwrap();
    running.remove(&victim).unwrap().abort();
    let took = within("a follower's web moved", limit, || async {
        let on = web_running_on(&store).await;
        on.len() == 2 && !on.contains(&victim) && on.contains(spare)
    })
    .await;
    eprintln!("follower {victim} killed to web running on {spare}: {took:?}");
    assert_eq!(leader().await, Some(now_leader), "the leader stayed");
    for (_, h) in running {
        h.abort();
    }
}

/// A machine that was away longer than its lease (paused, cut off from etcd) comes back to find
/// its unit moved: it registers again and stops its copy, and the unit does not move back.
#[tokio::test]
async fn a_machine_that_comes_back_stops_what_is_no_longer_its_own() {
    let etcd = Etcd::start();
    let cfg = config(&etcd); // TTL 2 s
    let mut m1 = Agent::join(&cfg, record("m1"), FakeRuntime::default())
        .await
        .unwrap();
    let mut m2 = Agent::join(&cfg, record("m2"), FakeRuntime::default())
        .await
        .unwrap();
    let store = Store::new(m1.store.client.clone(), m1.store.keys.clone());
    let web = UnitSpec::parse("web", "[image]\npath = \"/w.tar\"").unwrap();
    store.submit(&[web]).await.unwrap();
    m1.tick().await.unwrap(); // leads, places web on itself, starts it
    m2.tick().await.unwrap();
    assert_eq!(m1.runtime.units(), ["web"]);
    assert!(m1.leading && !m2.leading);
    // m1 goes quiet past its TTL; m2 keeps ticking, takes over and runs web.
    let t = Instant::now();
    while m2.runtime.units().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(7), "web did not move");
        tokio::time::sleep(Duration::from_millis(300)).await;
        m2.tick().await.unwrap();
    }
    assert!(m2.leading);
    assert_eq!(m1.runtime.units(), ["web"], "m1 still runs its old copy");
    // m1 is back: one tick and its copy is gone; web stays on m2.
    m1.tick().await.unwrap();
    assert!(m1.runtime.units().is_empty(), "{:?}", m1.runtime.units());
    assert!(!m1.leading);
    m2.tick().await.unwrap();
    m1.tick().await.unwrap();
    assert_eq!(m2.runtime.units(), ["web"]);
    assert!(m1.runtime.units().is_empty());
    let placement = store.placement().await.unwrap();
    assert_eq!(
        placement["web"],
        std::collections::BTreeSet::from(["m2".to_string()])
    );
    let machines = caisson_fleet::registry::machines(&store.client, &store.keys)
        .await
        .unwrap();
    assert_eq!(machines.len(), 2, "m1 registered again: {machines:?}");
}

/// One record that does not decode never stops the fleet: `{}` under the units prefix, a unit
/// record under another unit's name, a machine record from a "newer version" whose address
/// changed type, and an assignment that is not a list. The agents keep ticking, the good unit
/// is placed and runs, the leader rewrites the bad assignment, the CLI lists the bad records
/// as invalid with their key and error, and submitting a unit replaces a bad record of its name.
#[tokio::test]
async fn records_that_do_not_decode_are_skipped_and_listed() {
    let etcd = Etcd::start();
    let cfg = config(&etcd);
    let (mut agents, store) = join(&cfg, &["m1", "m2"]).await;
    let keys = &store.keys;
    let put = |key: String, value: &'static str| {
        let c = store.client.clone();
        async move { c.put(&key, value, 0).await.unwrap() }
    };
    put(keys.unit("broken"), "{}").await;
    let other = r#"{"spec":{"name":"web","image":{"path":{"path":"/evil.tar"}},"replicas":{"count":1},"restart":"always"},"target":"running"}"#;
    put(keys.unit("alias"), other).await;
    put(
        keys.machine("ghost"),
        r#"{"id":"ghost","address":{"v6":"::1"},"labels":{}}"#,
    )
    .await;
    put(keys.assign("m2"), r#""not a list""#).await;
    put(keys.status("m9", "web"), "[]").await;
    let web = UnitSpec::parse("web", "replicas = 2\n[image]\npath = \"/w.tar\"").unwrap();
    store.submit(&[web]).await.unwrap();
    for _ in 0..3 {
        tick_all(&mut agents).await;
    }
    for a in &agents {
        assert_eq!(a.runtime.units(), ["web"], "{}", a.member.id());
    }
    assert_eq!(
        store
            .assigned("m2")
            .await
            .unwrap()
            .0
            .into_iter()
            .collect::<Vec<_>>(),
        ["web"],
        "the leader wrote the bad assignment again"
    );
    let st = store.statuses().await.unwrap();
    assert_eq!(st[&("m2".to_string(), "web".to_string())].state, "running");
    assert_eq!(
        caisson_fleet::registry::machines(&store.client, &store.keys)
            .await
            .unwrap()
            .len(),
        2
    );

    let (ok, out, err) = fleet(&etcd, &["units", "--json"]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let invalid: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| r.get("invalid").is_some())
        .map(|r| (r["name"].as_str().unwrap(), r["invalid"].as_str().unwrap()))
        .collect();
    assert_eq!(invalid.len(), 3, "{out}");
    assert_eq!(invalid[0].0, "alias");
    assert!(invalid[0].1.contains("names unit \"web\""), "{out}");
    assert_eq!(invalid[1].0, "broken");
    assert!(invalid[1].1.contains("missing field"), "{out}");
    // A status record that does not decode is listed by its key under the prefix.
    assert_eq!(invalid[2].0, "status/m9/web");
    assert!(invalid[2].1.contains("expected struct UnitStatus"), "{out}");
    assert_eq!(
        rows.iter().filter(|r| r["name"] == "web").count(),
        1,
        "{out}"
    );
    let (ok, out, _) = fleet(&etcd, &["units"]);
    assert!(ok);
    assert!(
        out.lines().any(|l| l.starts_with("broken")
            && l.contains("INVALID")
            && l.contains("units/broken")),
        "{out}"
    );
    let (ok, out, _) = fleet(&etcd, &["machines", "--json"]);
    assert!(ok);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let ghost = rows.iter().find(|r| r["id"] == "ghost").unwrap();
    assert!(
        ghost["invalid"].as_str().unwrap().contains("invalid type"),
        "{out}"
    );
    assert_eq!(rows.len(), 3, "{out}");

    // Submitting a unit named like a bad record replaces it.
    let fixed = UnitSpec::parse("broken", "[image]\npath = \"/b.tar\"").unwrap();
    store.submit(&[fixed]).await.unwrap();
    assert!(store.units().await.unwrap().contains_key("broken"));
}
