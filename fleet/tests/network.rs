//! The cluster network on a real etcd: `network init` once, and each machine's subnet claimed
//! under its lease, never twice, kept across restarts, freed when the lease expires.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use caisson_fleet::etcd::Client;
use caisson_fleet::network::lease::{self, claim_exact, Saved};
use caisson_fleet::network::{
    self, Backend, Init, Ipv4Net, NetworkConfig, NetworkError, SubnetLease, SubnetRecord,
};
use caisson_fleet::registry::{Keys, MachineRecord, Member};
use common::{record, Etcd};
use std::path::Path;
use std::time::{Duration, Instant};

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn keys() -> Keys {
    Keys::new("/caisson/fleet/")
}

fn cluster() -> NetworkConfig {
    NetworkConfig::new(net("10.42.0.0/16"))
}

async fn setup(etcd: &Etcd) -> Client {
    let client = Client::new(&[etcd.endpoint()]).unwrap();
    assert_eq!(
        network::init(&client, &keys(), &cluster()).await.unwrap(),
        Init::Written
    );
    client
}

async fn member(client: &Client, rec: MachineRecord) -> Member {
    Member::join(client.clone(), keys(), rec, 30).await.unwrap()
}

fn subnet_lease(client: &Client, id: &str, state: &Path) -> SubnetLease {
    SubnetLease::new(client.clone(), keys(), id, "127.0.0.1", state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_get_different_subnets() {
    let etcd = Etcd::start();
    let client = setup(&etcd).await;
    let dir = tempfile::tempdir().unwrap();
    let ids = ["m1", "m2", "m3", "m4", "m5", "m6"];
    let mut tasks = Vec::new();
    for id in ids {
        let client = client.clone();
        let state = dir.path().join(id);
        tasks.push(tokio::spawn(async move {
            let m = member(&client, record(id)).await;
            let mut l = subnet_lease(&client, id, &state);
            l.claim(&cluster(), m.lease()).await.unwrap()
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    let mut subnets: Vec<Ipv4Net> = got.iter().map(|r| r.subnet).collect();
    subnets.sort();
    subnets.dedup();
    assert_eq!(subnets.len(), ids.len(), "one subnet each: {got:?}");
    assert!(
        !subnets.contains(&net("10.42.0.0/24")),
        "the first is kept free"
    );
    let mut peers = network::peers(&client, &keys()).await.unwrap();
    peers.sort_by(|a, b| a.machine.cmp(&b.machine));
    let mut want = got.clone();
    want.sort_by(|a, b| a.machine.cmp(&b.machine));
    assert_eq!(peers, want, "what each claimed is what etcd holds");
    // Each remembered its subnet.
    for r in &got {
        let saved = lease::load(&dir.path().join(&r.machine)).unwrap().unwrap();
        assert_eq!(saved.subnet, r.subnet);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_keeps_its_subnet_across_restarts_and_reboots() {
    let etcd = Etcd::start();
    let client = setup(&etcd).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("net/subnet.json");
    let before = net("10.42.9.0/24");
    lease::save(
        &state,
        &Saved {
            network: cluster().network,
            subnet: before,
        },
    )
    .unwrap();
    let m1 = member(&client, record("m1")).await;
    let got = subnet_lease(&client, "m1", &state)
        .claim(&cluster(), m1.lease())
        .await
        .unwrap();
    assert_eq!(got.subnet, before, "the saved subnet is preferred");
    // The agent restarts while its old lease lives: the claim moves to its new lease.
    let m1b = member(&client, record("m1")).await;
    let again = subnet_lease(&client, "m1", &state)
        .claim(&cluster(), m1b.lease())
        .await
        .unwrap();
    assert_eq!(again.subnet, before);
    m1.leave().await.unwrap();
    let kv = client.get(&keys().subnet(&before)).await.unwrap().unwrap();
    assert_eq!(kv.lease, m1b.lease(), "the old lease took nothing with it");
    // A reboot: the lease is gone and the subnet with it; another machine claims meanwhile.
    m1b.leave().await.unwrap();
    assert!(network::peers(&client, &keys()).await.unwrap().is_empty());
    let m2 = member(&client, record("m2")).await;
    let other = subnet_lease(&client, "m2", &dir.path().join("m2.json"))
        .claim(&cluster(), m2.lease())
        .await
        .unwrap();
    assert_eq!(other.subnet, net("10.42.1.0/24"));
    let m1c = member(&client, record("m1")).await;
    let mut l = subnet_lease(&client, "m1", &state);
    let back = l.ensure(&cluster(), m1c.lease()).await.unwrap().unwrap();
    assert_eq!(back.subnet, before, "the state file brings it back");
    assert_eq!(
        l.ensure(&cluster(), m1c.lease()).await.unwrap(),
        None,
        "nothing to do under the same lease"
    );
    // A lost lease: the machine registers again and claims again under the new one.
    client.lease_revoke(m1c.lease()).await.unwrap();
    let m1d = member(&client, record("m1")).await;
    let renewed = l.ensure(&cluster(), m1d.lease()).await.unwrap().unwrap();
    assert_eq!(renewed.subnet, before);
    // A lease that is gone is said so, not taken for a conflict.
    client.lease_revoke(m1d.lease()).await.unwrap();
    match subnet_lease(&client, "m1", &state)
        .claim(&cluster(), m1d.lease())
        .await
    {
        Err(NetworkError::LeaseExpired(id)) => assert_eq!(id, m1d.lease()),
        other => panic!("expected LeaseExpired, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subnet_held_by_a_live_machine_is_not_claimed_again() {
    let etcd = Etcd::start();
    let client = setup(&etcd).await;
    let dir = tempfile::tempdir().unwrap();
    let m1 = member(&client, record("m1")).await;
    let held = subnet_lease(&client, "m1", &dir.path().join("m1"))
        .claim(&cluster(), m1.lease())
        .await
        .unwrap();
    let m2 = member(&client, record("m2")).await;
    let steal = SubnetRecord {
        machine: "m2".into(),
        ..held.clone()
    };
    let e = claim_exact(&client, &keys(), &cluster(), &steal, m2.lease())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, NetworkError::Taken { holder, .. } if holder == "m1"),
        "{e}"
    );
    assert!(e.to_string().contains(&held.subnet.to_string()), "{e}");
    let foreign = SubnetRecord {
        subnet: net("10.43.1.0/24"),
        ..steal.clone()
    };
    assert!(matches!(
        claim_exact(&client, &keys(), &cluster(), &foreign, m2.lease()).await,
        Err(NetworkError::OutOfRange { .. })
    ));
    // m2 remembers m1's subnet (say it held it before a long outage): it takes another.
    let state = dir.path().join("m2");
    lease::save(
        &state,
        &Saved {
            network: cluster().network,
            subnet: held.subnet,
        },
    )
    .unwrap();
    let got = subnet_lease(&client, "m2", &state)
        .claim(&cluster(), m2.lease())
        .await
        .unwrap();
    assert_ne!(got.subnet, held.subnet);
    let kv = client
        .get(&keys().subnet(&held.subnet))
        .await
        .unwrap()
        .unwrap();
    let still: SubnetRecord = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(
        (still, kv.lease),
        (held, m1.lease()),
        "m1's claim untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_frees_its_subnet() {
    let etcd = Etcd::start();
    let client = setup(&etcd).await;
    let dir = tempfile::tempdir().unwrap();
    let short = client.lease_grant(2).await.unwrap();
    let held = subnet_lease(&client, "m1", &dir.path().join("m1"))
        .claim(&cluster(), short.id)
        .await
        .unwrap();
    let m2 = member(&client, record("m2")).await;
    let want = SubnetRecord {
        machine: "m2".into(),
        ..held.clone()
    };
    assert!(claim_exact(&client, &keys(), &cluster(), &want, m2.lease())
        .await
        .is_err());
    let deadline = Instant::now() + Duration::from_secs(15);
    while client
        .get(&keys().subnet(&held.subnet))
        .await
        .unwrap()
        .is_some()
    {
        assert!(Instant::now() < deadline, "the claim outlived its lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    claim_exact(&client, &keys(), &cluster(), &want, m2.lease())
        .await
        .unwrap();
    assert_eq!(network::peers(&client, &keys()).await.unwrap(), [want]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_writes_once_and_refuses_overlaps() {
    let etcd = Etcd::start();
    let client = Client::new(&[etcd.endpoint()]).unwrap();
    let k = keys();
    // A machine on 10.42.5.0/24 (no prefix in its record: the /24 around it is assumed).
    let mut rec = record("m1");
    rec.address = "10.42.5.7".into();
    let m1 = member(&client, rec).await;
    let e = network::init(&client, &k, &cluster()).await.unwrap_err();
    let text = e.to_string();
    for part in ["10.42.0.0/16", "10.42.5.0/24", "m1", "/24 around it"] {
        assert!(text.contains(part), "{part}: {text}");
    }
    assert_eq!(network::config(&client, &k).await.unwrap(), None);
    m1.leave().await.unwrap();
    // A range that cannot work is refused before anything is written.
    let public = NetworkConfig::new(net("8.8.0.0/16"));
    assert!(matches!(
        network::init(&client, &k, &public).await,
        Err(NetworkError::Invalid(_))
    ));
    assert_eq!(
        network::init(&client, &k, &cluster()).await.unwrap(),
        Init::Written
    );
    assert_eq!(
        network::init(&client, &k, &cluster()).await.unwrap(),
        Init::Unchanged,
        "the same again is fine"
    );
    let other = NetworkConfig {
        backend: Backend::vxlan(),
        ..NetworkConfig::new(net("10.50.0.0/16"))
    };
    let e = network::init(&client, &k, &other).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("10.42.0.0/16") && text.contains("10.50.0.0/16"),
        "{text}"
    );
    assert_eq!(
        network::config(&client, &k).await.unwrap(),
        Some(cluster()),
        "the first stays"
    );
}

fn cli(etcd: &Etcd, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_caisson-fleet"))
        .args(["--etcd", &etcd.endpoint(), "--insecure"])
        .args(["--config", "/nonexistent/fleet.toml"])
        .args(args)
        .env_remove("CAISSON_FLEET_ETCD")
        .env_remove("CAISSON_FLEET_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_the_network_and_shows_the_subnets() {
    let etcd = Etcd::start();
    let client = Client::new(&[etcd.endpoint()]).unwrap();
    let (ok, out, err) = cli(&etcd, &["network", "status"]);
    assert!(ok && out.contains("no cluster network"), "{out}{err}");
    let init = ["network", "init", "10.42.0.0/16", "--backend", "vxlan"];
    let (ok, out, err) = cli(&etcd, &init);
    assert!(
        ok && out.contains("10.42.0.0/16, /24 per host, vxlan"),
        "{out}{err}"
    );
    let (ok, out, err) = cli(&etcd, &init);
    assert!(ok && out.contains("already"), "{out}{err}");
    let (ok, _, err) = cli(&etcd, &["network", "init", "10.43.0.0/16"]);
    assert!(
        !ok && err.contains("10.42.0.0/16") && err.contains("10.43.0.0/16"),
        "{err}"
    );
    let (ok, _, err) = cli(&etcd, &["network", "init", "10.42.0.0/33"]);
    assert!(!ok && err.contains("10.42.0.0/33"), "{err}");
    // m1 is alive; m2's claim outlives its record (its lease is the test's, not a machine's).
    let m1 = member(&client, record("m1")).await;
    let config = network::config(&client, &keys()).await.unwrap().unwrap();
    assert_eq!(config.backend, Backend::vxlan());
    let dir = tempfile::tempdir().unwrap();
    let a = subnet_lease(&client, "m1", &dir.path().join("m1"))
        .claim(&config, m1.lease())
        .await
        .unwrap();
    let other = client.lease_grant(30).await.unwrap();
    let b = subnet_lease(&client, "m2", &dir.path().join("m2"))
        .claim(&config, other.id)
        .await
        .unwrap();
    client
        .put(&format!("{}10.42.200.0-24", keys().subnets()), "{", 0)
        .await
        .unwrap();
    // m3 is alive and holds no subnet: it routes to m1's, not to m2's. m1 reports nothing.
    let m3 = member(&client, record("m3")).await;
    let mut report = network::routes::RouteReport::default();
    report.routes.insert(a.subnet, network::routes::OK.into());
    report.routes.insert(b.subnet, "error: boom".into());
    network::routes::report(&client, &keys(), "m3", m3.lease(), &report)
        .await
        .unwrap();
    let (ok, out, err) = cli(&etcd, &["network", "status"]);
    assert!(ok, "{err}");
    let line = |s: &SubnetRecord| {
        out.lines()
            .find(|l| l.starts_with(&s.subnet.to_string()))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line(&a).contains("m1") && line(&a).contains(" yes ") && line(&a).ends_with(" 1/1"),
        "{out}"
    );
    assert!(
        line(&b).contains("m2")
            && line(&b).contains(" no ")
            && line(&b).ends_with(" 0/2 (m1: not reported, m3: error: boom)"),
        "{out}"
    );
    assert!(
        out.contains("INVALID") && out.contains("10.42.200.0-24"),
        "{out}"
    );
    let (ok, out, err) = cli(&etcd, &["network", "status", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["config"]["network"], "10.42.0.0/16");
    assert_eq!(v["config"]["backend"]["type"], "vxlan");
    let subnets = v["subnets"].as_array().unwrap();
    assert_eq!(subnets.len(), 2, "{out}");
    assert_eq!(subnets[0]["machine"], "m1");
    assert_eq!(subnets[0]["alive"], true);
    assert_eq!(subnets[0]["public_ip"], "127.0.0.1");
    assert_eq!(subnets[0]["routed"], "1/1");
    assert_eq!(subnets[0]["routes"]["m3"], "ok");
    assert_eq!(subnets[1]["alive"], false);
    assert_eq!(subnets[1]["routes"]["m3"], "error: boom");
    assert_eq!(v["invalid"].as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_claim_their_subnets_and_claim_again_after_a_lease_loss() {
    let etcd = Etcd::start();
    let cfg = common::config(&etcd);
    let (mut agents, store) = common::join(&cfg, &["m1", "m2"]).await;
    let dir = tempfile::tempdir().unwrap();
    for a in agents.iter_mut() {
        a.subnet_state = dir.path().join(a.member.id());
    }
    // No cluster network: nothing is claimed.
    common::tick_all(&mut agents).await;
    assert!(network::peers(&store.client, &keys())
        .await
        .unwrap()
        .is_empty());
    network::init(&store.client, &keys(), &cluster())
        .await
        .unwrap();
    common::tick_all(&mut agents).await;
    let peers = network::peers(&store.client, &keys()).await.unwrap();
    let of = |id: &str| {
        peers
            .iter()
            .find(|p| p.machine == id)
            .map(|p| p.subnet)
            .unwrap()
    };
    let (s1, s2) = (of("m1"), of("m2"));
    assert_ne!(s1, s2);
    // m1's lease is lost: its subnet goes, and its next tick registers and claims again.
    let old = agents[0].member.lease();
    store.client.lease_revoke(old).await.unwrap();
    assert_eq!(
        network::peers(&store.client, &keys()).await.unwrap().len(),
        1
    );
    agents[0].tick().await.unwrap();
    let kv = store
        .client
        .get(&keys().subnet(&s1))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(kv.lease, old);
    assert_eq!(
        kv.lease,
        agents[0].member.lease(),
        "the same subnet, under the new lease"
    );
    // Someone deletes m1's claim (any machine's credentials may): m1 finds out and claims again.
    agents[0].subnet_verify = Duration::ZERO;
    store
        .client
        .delete(&keys().subnet(&s1), false)
        .await
        .unwrap();
    agents[0].tick().await.unwrap();
    let kv = store.client.get(&keys().subnet(&s1)).await.unwrap();
    assert_eq!(kv.map(|kv| kv.lease), Some(agents[0].member.lease()));
    // Both leave, which frees both subnets; m2 started again (a new process, the same state
    // file) gets its own subnet back, not the first free one.
    assert!(s1 < s2, "m1 claimed first");
    let state = agents[1].subnet_state.clone();
    for a in agents.drain(..) {
        a.member.leave().await.unwrap();
    }
    assert!(network::peers(&store.client, &keys())
        .await
        .unwrap()
        .is_empty());
    let mut again = caisson_fleet::agent::Agent::join(
        &cfg,
        record("m2"),
        caisson_fleet::agent::FakeRuntime::default(),
    )
    .await
    .unwrap();
    again.subnet_state = state;
    again.tick().await.unwrap();
    let kv = store
        .client
        .get(&keys().subnet(&s2))
        .await
        .unwrap()
        .unwrap();
    let rec: SubnetRecord = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(
        (rec.machine.as_str(), kv.lease),
        ("m2", again.member.lease())
    );
}
