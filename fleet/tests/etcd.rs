//! The etcd client against a real etcd on loopback.

#![allow(clippy::unwrap_used)]

mod common;

use caisson_fleet::etcd::{Client, Compare, EtcdError, Event, Op};
use common::Etcd;
use std::time::Duration;

#[tokio::test]
async fn kv_range_put_delete() {
    let etcd = Etcd::start();
    let c = Client::new(&[etcd.endpoint()]).unwrap();
    assert_eq!(c.get("/t/a").await.unwrap(), None);
    let r1 = c.put("/t/a", "1", 0).await.unwrap();
    c.put("/t/b", b"\x00\xff", 0).await.unwrap();
    c.put("/u", "x", 0).await.unwrap();
    let a = c.get("/t/a").await.unwrap().unwrap();
    assert_eq!(a.value, b"1");
    assert_eq!(a.mod_revision, r1);
    let all = c.range("/t/", true).await.unwrap();
    assert_eq!(
        all.kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
        ["/t/a", "/t/b"]
    );
    assert_eq!(all.kvs[1].value, b"\x00\xff");
    assert_eq!(c.delete("/t/", true).await.unwrap(), 2);
    assert!(c.range("/t/", true).await.unwrap().kvs.is_empty());
    assert_eq!(c.get("/u").await.unwrap().unwrap().value_str(), "x");
}

#[tokio::test]
async fn txn_compare_and_swap() {
    let etcd = Etcd::start();
    let c = Client::new(&[etcd.endpoint()]).unwrap();
    let created = c
        .txn(&[Compare::absent("/k")], &[Op::put("/k", "v1")], &[])
        .await
        .unwrap();
    assert!(created.succeeded);
    let again = c
        .txn(
            &[Compare::absent("/k")],
            &[Op::put("/k", "v2")],
            &[Op::Get {
                key: "/k".into(),
                prefix: false,
            }],
        )
        .await
        .unwrap();
    assert!(!again.succeeded);
    assert_eq!(again.responses[0][0].value, b"v1");
    let rev = again.responses[0][0].mod_revision;
    let swapped = c
        .txn(
            &[Compare::mod_revision("/k", rev)],
            &[Op::put("/k", "v3")],
            &[],
        )
        .await
        .unwrap();
    assert!(swapped.succeeded);
    let stale = c
        .txn(
            &[Compare::mod_revision("/k", rev)],
            &[Op::put("/k", "v4")],
            &[],
        )
        .await
        .unwrap();
    assert!(!stale.succeeded);
    let by_value = c
        .txn(&[Compare::value("/k", "v3")], &[Op::delete("/k")], &[])
        .await
        .unwrap();
    assert!(by_value.succeeded);
    assert_eq!(c.get("/k").await.unwrap(), None);
}

#[tokio::test]
async fn leases_keepalive_expire_revoke() {
    let etcd = Etcd::start();
    let c = Client::new(&[etcd.endpoint()]).unwrap();
    let lease = c.lease_grant(2).await.unwrap();
    assert_eq!(lease.ttl_s, 2);
    c.put("/leased", "x", lease.id).await.unwrap();
    assert_eq!(c.get("/leased").await.unwrap().unwrap().lease, lease.id);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(c.lease_keepalive(lease.id).await.unwrap() > 0);
    }
    assert!(c.get("/leased").await.unwrap().is_some(), "kept alive");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(c.get("/leased").await.unwrap(), None, "expired");
    assert!(matches!(
        c.lease_keepalive(lease.id).await,
        Err(EtcdError::LeaseExpired(_))
    ));
    let l2 = c.lease_grant(60).await.unwrap();
    c.put("/leased2", "x", l2.id).await.unwrap();
    c.lease_revoke(l2.id).await.unwrap();
    assert_eq!(c.get("/leased2").await.unwrap(), None, "revoked");
}

#[tokio::test]
async fn failover_between_endpoints() {
    let etcd = Etcd::start();
    // A dead endpoint first: the client moves on and stays on the live one.
    let dead = format!("http://127.0.0.1:{}", etcd.peer_port + 1);
    let c = Client::with_timeout(&[dead.clone(), etcd.endpoint()], Duration::from_secs(2)).unwrap();
    c.put("/f", "1", 0).await.unwrap();
    assert_eq!(c.get("/f").await.unwrap().unwrap().value, b"1");
    let only_dead = Client::new(&[dead]).unwrap();
    let err = only_dead.get("/f").await.unwrap_err();
    assert!(matches!(err, EtcdError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
}

fn puts(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| match e {
            Event::Put(kv) => (kv.key.clone(), kv.value_str()),
            Event::Delete(kv) => (kv.key.clone(), "<deleted>".into()),
        })
        .collect()
}

async fn collect(w: &mut caisson_fleet::etcd::Watch, n: usize) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let batch = tokio::time::timeout(Duration::from_secs(20), w.next())
            .await
            .expect("watch event in time")
            .unwrap();
        seen.extend(puts(&batch));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_drop_and_restart() {
    let mut etcd = Etcd::start();
    let c = Client::new(&[etcd.endpoint()]).unwrap();
    let rev = c.put("/w/before", "0", 0).await.unwrap();
    let mut w = c.watch("/w/", true, rev + 1);
    c.put("/w/a", "1", 0).await.unwrap();
    c.delete("/w/before", false).await.unwrap();
    assert_eq!(
        collect(&mut w, 2).await,
        [
            ("/w/a".into(), "1".into()),
            ("/w/before".into(), "<deleted>".into())
        ]
    );
    // The stream drops; changes made meanwhile arrive once, in order, after resuming.
    w.disconnect();
    c.put("/w/b", "2", 0).await.unwrap();
    c.put("/w/c", "3", 0).await.unwrap();
    assert_eq!(
        collect(&mut w, 2).await,
        [("/w/b".into(), "2".into()), ("/w/c".into(), "3".into())]
    );
    // etcd itself restarts while the watch waits.
    let waiter = tokio::spawn(async move {
        let got = collect(&mut w, 2).await;
        (w, got)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| etcd.restart());
    c.put("/w/d", "4", 0).await.unwrap();
    c.put("/w/e", "5", 0).await.unwrap();
    let (_w, got) = waiter.await.unwrap();
    assert_eq!(
        got,
        [("/w/d".into(), "4".into()), ("/w/e".into(), "5".into())]
    );
}

async fn next_tagged(w: &mut caisson_fleet::etcd::Watch) -> (usize, Vec<(String, String)>) {
    let (i, batch) = tokio::time::timeout(Duration::from_secs(20), w.next_tagged())
        .await
        .expect("watch event in time")
        .unwrap();
    (i, puts(&batch))
}

/// The next two batches, sorted: each key's changes come in order; between keys, etcd does not
/// promise one.
async fn next_two(w: &mut caisson_fleet::etcd::Watch) -> Vec<(usize, Vec<(String, String)>)> {
    let mut got = vec![next_tagged(w).await, next_tagged(w).await];
    got.sort();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_carries_several_watches_and_resumes_each() {
    let etcd = Etcd::start();
    let c = Client::new(&[etcd.endpoint()]).unwrap();
    let rev = c.put("/m/other", "0", 0).await.unwrap();
    let mut w = c.watch_all(&[("/m/leader", false), ("/m/units/", true)], rev + 1);
    c.put("/m/units/a", "1", 0).await.unwrap();
    c.put("/m/other", "not watched", 0).await.unwrap();
    c.put("/m/leader", "me", 0).await.unwrap();
    assert_eq!(
        next_two(&mut w).await,
        [
            (0, vec![("/m/leader".into(), "me".into())]),
            (1, vec![("/m/units/a".into(), "1".into())])
        ]
    );
    // After a dropped stream each key resumes after its own last change: nothing is replayed.
    w.disconnect();
    c.put("/m/units/b", "2", 0).await.unwrap();
    c.put("/m/leader", "you", 0).await.unwrap();
    assert_eq!(
        next_two(&mut w).await,
        [
            (0, vec![("/m/leader".into(), "you".into())]),
            (1, vec![("/m/units/b".into(), "2".into())])
        ]
    );
    c.delete("/m/units/a", false).await.unwrap();
    assert_eq!(
        next_tagged(&mut w).await,
        (1, vec![("/m/units/a".into(), "<deleted>".into())])
    );
}

#[tokio::test]
async fn watch_reports_compaction() {
    let etcd = Etcd::start();
    let c = Client::new(&[etcd.endpoint()]).unwrap();
    let r1 = c.put("/x", "1", 0).await.unwrap();
    let r2 = c.put("/x", "2", 0).await.unwrap();
    c.put("/x", "3", 0).await.unwrap();
    // Compact through the raw gateway: the client has no need for it otherwise.
    reqwest::Client::new()
        .post(format!("{}/v3/kv/compaction", etcd.endpoint()))
        .body(format!(r#"{{"revision":"{r2}"}}"#))
        .send()
        .await
        .unwrap();
    let mut w = c.watch("/x", false, r1);
    let err = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, EtcdError::Compacted { .. }), "{err}");
}
