//! Service registrations against a real etcd: agents (in-memory runtimes) register each
//! serving instance under `services/<machine>/<unit>` with their lease; an unhealthy one is not
//! registered; a stopped unit's registrations go at once and a dead machine's with its lease;
//! `caisson-fleet endpoints` lists what is registered.

#![allow(clippy::unwrap_used)]

#[path = "common/cli.rs"]
mod cli;
mod common;

use caisson_fleet::services;
use caisson_fleet::store::Target;
use caisson_fleet::unit::UnitSpec;
use common::{config, join, tick_all, Etcd};
use std::time::Duration;

fn unit(name: &str, extra: &str) -> UnitSpec {
    UnitSpec::parse(
        name,
        &format!("network = \"host\"\n{extra}\n[image]\npath = \"/img/{name}.tar\"\n"),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn serving_instances_are_registered_and_go_when_they_stop_serving() {
    let etcd = Etcd::start();
    let cfg = config(&etcd);
    let (mut agents, store) = join(&cfg, &["m1", "m2"]).await;
    store
        .submit(&[
            unit(
                "web",
                "replicas = 2\nports = [{ name = \"http\", port = 8080 }]",
            ),
            // Its exec check fails in the in-memory runtime: never healthy.
            unit(
                "sick",
                "restart = \"never\"\n[health]\nexec = [\"check\"]\ninterval = \"100ms\"\nretries = 1",
            ),
        ])
        .await
        .unwrap();
    for _ in 0..4 {
        tick_all(&mut agents).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (e, invalid) = services::endpoints(&store.client, &store.keys)
        .await
        .unwrap();
    assert!(invalid.is_empty(), "{invalid:?}");
    let web = e.instances("web");
    let on: Vec<&str> = web.iter().map(|i| i.machine.as_str()).collect();
    assert_eq!(on, ["m1", "m2"], "{e:?}");
    assert_eq!(web[0].address.to_string(), "127.0.0.1");
    assert_eq!(web[0].ports[0].name.as_deref(), Some("http"));
    assert_eq!(web[0].ports[0].port, 8080);
    assert!(web[0].revision > 0);
    assert!(
        e.instances("sick").is_empty(),
        "unhealthy is not served: {e:?}"
    );

    // The operator's view.
    let (ok, out, err) = cli::fleet(&etcd.endpoint(), &["endpoints", "web"]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("web ")).count(),
        2,
        "{out}"
    );
    assert!(out.contains("http=8080/tcp"), "{out}");
    let (ok, out, _) = cli::fleet(&etcd.endpoint(), &["endpoints", "--json"]);
    assert!(ok);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["units"]["web"].as_array().unwrap().len(), 2, "{out}");

    // m2 dies (no more ticks, no leave): its registration goes with its lease.
    let m2 = agents.pop().unwrap();
    drop(m2);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        tick_all(&mut agents).await;
        let (e, _) = services::endpoints(&store.client, &store.keys)
            .await
            .unwrap();
        let on: Vec<String> = e
            .instances("web")
            .iter()
            .map(|i| i.machine.clone())
            .collect();
        if on == ["m1"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "m2 still registered: {on:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Stopping the unit takes its registrations away at once.
    store.set_target("web", Target::Stopped).await.unwrap();
    tick_all(&mut agents).await;
    tick_all(&mut agents).await;
    let (e, _) = services::endpoints(&store.client, &store.keys)
        .await
        .unwrap();
    assert!(e.units.is_empty(), "{e:?}");
    let (ok, out, _) = cli::fleet(&etcd.endpoint(), &["endpoints"]);
    assert!(ok && out.contains("no serving instance"), "{out}");
}
