//! Registry, leader election, rescheduling, submission and the reboot lock against a real etcd.

#![allow(clippy::unwrap_used)]

mod common;

use caisson_fleet::etcd::Client;
use caisson_fleet::lock::{self, RebootLock};
use caisson_fleet::registry::{self, Keys, MachineRecord, Member};
use caisson_fleet::store::{Store, Target};
use caisson_fleet::unit::UnitSpec;
use common::Etcd;
use std::collections::BTreeMap;
use std::time::Duration;

fn record(id: &str, zone: &str) -> MachineRecord {
    MachineRecord {
        id: id.into(),
        address: "127.0.0.1".into(),
        labels: BTreeMap::from([("zone".to_string(), zone.to_string())]),
        version: Some("1.0.0".into()),
        slot: Some("a".into()),
        last_seen: 0,
        memory_bytes: None,
        cpus: None,
    }
}

fn unit(name: &str, extra: &str) -> UnitSpec {
    UnitSpec::parse(
        name,
        &format!("{extra}\n[image]\npath = \"/img/{name}.tar\"\n"),
    )
    .unwrap()
}

#[tokio::test]
async fn registry_leases_and_leader_failover() {
    let etcd = Etcd::start();
    let c = Client::new(&[etcd.endpoint()]).unwrap();
    let keys = Keys::new("/caisson/fleet/");
    let m1 = Member::join(c.clone(), keys.clone(), record("m1", "a"), 2)
        .await
        .unwrap();
    let mut m2 = Member::join(c.clone(), keys.clone(), record("m2", "b"), 2)
        .await
        .unwrap();
    let ids: Vec<String> = registry::machines(&c, &keys)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, ["m1", "m2"]);
    assert!(m1.campaign().await.unwrap());
    assert!(m1.campaign().await.unwrap(), "stays leader");
    assert!(!m2.campaign().await.unwrap());
    assert_eq!(
        registry::leader(&c, &keys).await.unwrap().as_deref(),
        Some("m1")
    );
    // m1 stops heart-beating: its record and leadership expire; m2 takes over.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        m2.heartbeat().await.unwrap();
    }
    let ids: Vec<String> = registry::machines(&c, &keys)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, ["m2"]);
    assert!(m2.campaign().await.unwrap());
    // m1 comes back: its lease is gone, it registers again and does not lead.
    let mut m1 = m1;
    assert!(m1.heartbeat().await.unwrap(), "re-registered");
    assert!(!m1.campaign().await.unwrap());
    assert_eq!(registry::machines(&c, &keys).await.unwrap().len(), 2);
    m2.leave().await.unwrap();
    assert_eq!(registry::leader(&c, &keys).await.unwrap(), None);
    assert!(m1.campaign().await.unwrap());
}

#[tokio::test]
async fn refresh_rewrites_the_record_and_registers_again_once_the_lease_is_gone() {
    let etcd = Etcd::start();
    let c = Client::new(&[etcd.endpoint()]).unwrap();
    let keys = Keys::new("/r/");
    let mut m = Member::join(c.clone(), keys.clone(), record("m1", "a"), 5)
        .await
        .unwrap();
    let first = m.lease();
    let before = c.get(&keys.machine("m1")).await.unwrap().unwrap();
    assert!(!m.refresh().await.unwrap(), "the lease is alive");
    let after = c.get(&keys.machine("m1")).await.unwrap().unwrap();
    assert!(
        after.mod_revision > before.mod_revision,
        "the record was rewritten"
    );
    assert_eq!(after.lease, first);
    // The lease goes (revoked here; expired after an outage): the next refresh registers again.
    c.lease_revoke(first).await.unwrap();
    assert_eq!(c.get(&keys.machine("m1")).await.unwrap(), None);
    assert!(m.refresh().await.unwrap(), "registered again");
    let back = c.get(&keys.machine("m1")).await.unwrap().unwrap();
    assert_ne!(back.lease, first);
    assert_eq!(back.lease, m.lease());
}

#[tokio::test]
async fn leader_schedules_and_reschedules_after_expiry() {
    let etcd = Etcd::start();
    let c = Client::new(&[etcd.endpoint()]).unwrap();
    let keys = Keys::new("/t/");
    let store = Store::new(c.clone(), keys.clone());
    let mut lead = Member::join(c.clone(), keys.clone(), record("m1", "a"), 2)
        .await
        .unwrap();
    let doomed = Member::join(c.clone(), keys.clone(), record("m2", "a"), 2)
        .await
        .unwrap();
    assert!(lead.campaign().await.unwrap());
    store
        .submit(&[
            unit("web", "replicas = 2"),
            unit("db", "[constraints]\nlabels = { zone = \"b\" }"),
        ])
        .await
        .unwrap();
    let s = store
        .schedule_pass(&lead.leader_fence())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.placement["web"].len(), 2);
    assert_eq!(s.unplaced["db"], 1, "no zone b machine");
    assert_eq!(
        store.assigned("m2").await.unwrap().0,
        ["web".to_string()].into()
    );
    // A machine that is not the leader cannot write assignments.
    assert!(store
        .schedule_pass(&doomed.leader_fence())
        .await
        .unwrap()
        .is_none());
    // m2's lease expires: its assignment goes, web runs once (only m1 left).
    drop(doomed);
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        lead.heartbeat().await.unwrap();
    }
    let s = store
        .schedule_pass(&lead.leader_fence())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.placement["web"].iter().collect::<Vec<_>>(), ["m1"]);
    assert!(store.assigned("m2").await.unwrap().0.is_empty());
    // A stopped unit is unassigned; destroy removes it.
    store.set_target("web", Target::Stopped).await.unwrap();
    store
        .schedule_pass(&lead.leader_fence())
        .await
        .unwrap()
        .unwrap();
    assert!(store.assigned("m1").await.unwrap().0.is_empty());
    store.destroy("web").await.unwrap();
    assert!(store
        .destroy("web")
        .await
        .unwrap_err()
        .to_string()
        .contains("no unit named"));
    assert!(store.set_target("nope", Target::Running).await.is_err());
}

#[tokio::test]
async fn submit_is_all_or_nothing() {
    let etcd = Etcd::start();
    let c = Client::new(&[etcd.endpoint()]).unwrap();
    let store = Store::new(c.clone(), Keys::new("/t/"));
    store.submit(&[unit("a", "")]).await.unwrap();
    store.set_target("a", Target::Stopped).await.unwrap();
    // Resubmitting keeps the target; both units land in one revision.
    store
        .submit(&[unit("a", "replicas = 3"), unit("b", "")])
        .await
        .unwrap();
    let units = store.units().await.unwrap();
    assert_eq!(units["a"].0.target, Target::Stopped);
    assert_eq!(
        units["a"].0.spec.replicas,
        caisson_fleet::unit::Replicas::Count(3)
    );
    assert_eq!(units["a"].1, units["b"].1, "one transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_lock_under_concurrent_takers() {
    let etcd = Etcd::start();
    let c = Client::new(&[etcd.endpoint()]).unwrap();
    let lock = RebootLock::new(c.clone(), lock::key("/t/"));
    assert_eq!(lock.status().await.unwrap().max, 1);
    lock.set_max(2).await.unwrap();
    // Ten machines race for two slots: exactly two win.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let lock = lock.clone();
        tasks.push(tokio::spawn(async move {
            (
                format!("m{i}"),
                lock.acquire(&format!("m{i}")).await.unwrap(),
            )
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (id, won) = t.await.unwrap();
        if won {
            winners.push(id);
        }
    }
    assert_eq!(winners.len(), 2, "{winners:?}");
    let s = lock.status().await.unwrap();
    winners.sort();
    let mut holders = s.holders.clone();
    holders.sort();
    assert_eq!(holders, winners);
    assert!(lock.acquire(&winners[0]).await.unwrap(), "idempotent");
    assert!(!lock.acquire("late").await.unwrap());
    assert!(lock.release(&winners[0]).await.unwrap());
    assert!(!lock.release(&winners[0]).await.unwrap());
    assert!(lock.acquire("late").await.unwrap());
    assert!(lock.set_max(0).await.is_err());
    // A machine's slot is its own key; a max that is not a count is named.
    assert!(c
        .get(&lock::holder_key(&lock::key("/t/"), "late"))
        .await
        .unwrap()
        .is_some());
    c.put(&lock::max_key(&lock::key("/t/")), "many", 0)
        .await
        .unwrap();
    let e = lock.acquire("x").await.unwrap_err().to_string();
    assert!(
        e.contains("/t/lock/reboot/max") && e.contains("many"),
        "{e}"
    );
}
