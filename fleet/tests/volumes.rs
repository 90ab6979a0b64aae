//! Volumes in a fleet, against a real etcd with in-memory runtimes: a unit with volumes is
//! pinned to the machine that made them, waits for it when it is gone (and `caisson-fleet
//! units` says so), survives `stop` and a plain `destroy`, and only `destroy --volumes` has the
//! machine delete them; a unit submitted again is never purged; `volumes_follow = "none"` moves.

#![allow(clippy::unwrap_used)]

#[path = "common/cli.rs"]
mod cli;
mod common;

use caisson_fleet::agent::{Agent, FakeRuntime};
use caisson_fleet::store::Target;
use caisson_fleet::unit::UnitSpec;
use caisson_fleet::volumes::Destroyed;
use common::{config, join, record, tick_all, Etcd};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn db(extra: &str) -> UnitSpec {
    UnitSpec::parse(
        "db",
        &format!("volumes = [{{ name = \"data\", path = \"/data\" }}]\n{extra}\n[image]\npath = \"/db.tar\""),
    )
    .unwrap()
}

fn volumes_on(a: &Agent<FakeRuntime>) -> BTreeSet<String> {
    a.runtime.volumes.lock().unwrap().clone()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn fleet(etcd: &Etcd, args: &[&str]) -> String {
    let (ok, out, err) = cli::fleet(&etcd.endpoint(), args);
    assert!(ok, "{args:?}: {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_stays_with_its_volumes_until_destroyed_with_them() {
    let etcd = Etcd::start();
    let cfg = config(&etcd);
    let (mut agents, store) = join(&cfg, &["m1", "m2", "m3"]).await;
    // m1 leads; db goes to m2 (m1 is busier), which makes its volume; the pin is recorded.
    let web = UnitSpec::parse("web", "[image]\npath = \"/w.tar\"").unwrap();
    store.submit(&[web]).await.unwrap();
    tick_all(&mut agents).await;
    tick_all(&mut agents).await;
    store.submit(&[db("")]).await.unwrap();
    tick_all(&mut agents).await;
    tick_all(&mut agents).await;
    let holder = agents
        .iter()
        .position(|a| a.runtime.units().contains(&"db".to_string()))
        .expect("db runs somewhere");
    let holder_id = format!("m{}", holder + 1);
    assert_ne!(holder, 0, "the leader runs web");
    assert_eq!(volumes_on(&agents[holder]), set(&["db"]));
    assert_eq!(store.pins().await.unwrap()["db"], set(&[&holder_id]));

    // Stop: the container goes, the volume and the pin stay; start: back on the same machine.
    store.set_target("db", Target::Stopped).await.unwrap();
    tick_all(&mut agents).await;
    tick_all(&mut agents).await;
    assert!(!agents[holder].runtime.units().contains(&"db".to_string()));
    assert_eq!(volumes_on(&agents[holder]), set(&["db"]));
    store.set_target("db", Target::Running).await.unwrap();
    tick_all(&mut agents).await;
    tick_all(&mut agents).await;
    assert!(agents[holder].runtime.units().contains(&"db".to_string()));

    // The holder dies: db is not started empty elsewhere; `units` names the machine it waits for.
    let dead = agents.remove(holder);
    let dead_runtime = dead.runtime.clone();
    std::mem::forget(dead);
    let t = Instant::now();
    while store
        .placement()
        .await
        .unwrap()
        .values()
        .flatten()
        .any(|m| *m == holder_id)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tick_all(&mut agents).await;
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the holder never left"
        );
    }
    tick_all(&mut agents).await;
    assert!(agents
        .iter()
        .all(|a| !a.runtime.units().contains(&"db".to_string())));
    let out = fleet(&etcd, &["units"]);
    assert!(
        out.contains(&format!("waiting for machine {holder_id}")) && out.contains("gone"),
        "{out}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&fleet(&etcd, &["units", "--json"])).unwrap();
    let row = json
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "db")
        .unwrap();
    assert_eq!(row["waiting_for"], serde_json::json!([holder_id]));
    assert_eq!(row["volumes_on"], serde_json::json!([holder_id]));

    // It comes back (same id, same disk, rebooted: no containers): db runs there again.
    dead_runtime.containers.lock().unwrap().clear();
    let back = Agent::join(&cfg, record(&holder_id), dead_runtime)
        .await
        .unwrap();
    agents.push(back);
    tick_all(&mut agents).await;
    tick_all(&mut agents).await;
    let holder = agents.len() - 1;
    assert_eq!(agents[holder].runtime.units(), ["db"]);

    // A plain destroy keeps the volume and the pin: submitted again, it goes back there.
    store.destroy("db").await.unwrap();
    tick_all(&mut agents).await;
    tick_all(&mut agents).await;
    assert!(agents[holder].runtime.units().is_empty());
    assert_eq!(volumes_on(&agents[holder]), set(&["db"]));
    store.submit(&[db("")]).await.unwrap();
    tick_all(&mut agents).await;
    tick_all(&mut agents).await;
    assert_eq!(agents[holder].runtime.units(), ["db"]);

    // destroy --volumes: the container, then the volume go; the pin is gone.
    assert_eq!(
        store.destroy_with_volumes("db").await.unwrap(),
        Destroyed::Unit
    );
    for _ in 0..3 {
        tick_all(&mut agents).await;
    }
    assert!(agents[holder].runtime.units().is_empty());
    assert!(volumes_on(&agents[holder]).is_empty());
    assert!(!store.pins().await.unwrap().contains_key("db"));

    // Submitted again, the purge mark is gone with it: its new data is never deleted.
    store.submit(&[db("")]).await.unwrap();
    assert!(store.purges().await.unwrap().is_empty());
    for _ in 0..3 {
        tick_all(&mut agents).await;
    }
    let runs: Vec<usize> = (0..agents.len())
        .filter(|&i| agents[i].runtime.units().contains(&"db".to_string()))
        .collect();
    assert_eq!(runs.len(), 1);
    assert_eq!(volumes_on(&agents[runs[0]]), set(&["db"]));

    // The CLI: `destroy --volumes` of a unit already gone still asks for the purge.
    store.destroy("db").await.unwrap();
    let out = fleet(&etcd, &["destroy", "db", "--volumes"]);
    assert!(out.contains("no unit db"), "{out}");
    for _ in 0..2 {
        tick_all(&mut agents).await;
    }
    assert!(agents.iter().all(|a| volumes_on(a).is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_follow_none_lets_a_unit_move() {
    let etcd = Etcd::start();
    let cfg = config(&etcd);
    let (mut agents, store) = join(&cfg, &["m1", "m2"]).await;
    store
        .submit(&[db("volumes_follow = \"none\"")])
        .await
        .unwrap();
    tick_all(&mut agents).await;
    tick_all(&mut agents).await;
    assert!(store.pins().await.unwrap().is_empty(), "nothing pinned");
    let holder = agents
        .iter()
        .position(|a| a.runtime.units() == ["db"])
        .unwrap();
    let dead = agents.remove(holder);
    std::mem::forget(dead);
    let t = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tick_all(&mut agents).await;
        if agents[0].runtime.units() == ["db"] {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "db did not move");
    }
    // It starts empty there (a volume of its own).
    assert_eq!(volumes_on(&agents[0]), set(&["db"]));
}
