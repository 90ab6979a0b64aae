//! The containerd runtime against a real containerd (Debian's 1.6) started by the test with its
//! own root, state and socket in a temporary directory, CRI disabled. The image is a tiny OCI
//! archive made here from the host's busybox-static.
//!
//! Needs root, `containerd`, `runc` and `busybox-static` (ci/deps installs them); without them
//! the test says why and passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The test's containerd and images (fleet/tests/common/containerd.rs).
#[path = "common/containerd.rs"]
mod testbed;

use caisson_fleet::agent::{ContainerState, Runtime};
use caisson_fleet::containerd::Containerd;
use caisson_fleet::unit::UnitSpec;
use sha2::{Digest, Sha256};
use std::process::Command;
use std::time::{Duration, Instant};
use testbed::{
    add, busybox_archive, busybox_layer_with, digest, missing, oci_archive, wait_for, Daemon,
};

/// The applets the tests' image links.
const APPLETS: [&str; 3] = ["sh", "sleep", "echo"];

fn unit(name: &str, body: &str) -> UnitSpec {
    UnitSpec::parse(name, body).unwrap()
}

/// Serves one file over HTTP on loopback, forever (the test ends first).
async fn serve(bytes: Vec<u8>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    bytes.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&bytes).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_stops_and_deletes_containers_in_a_real_containerd() {
    if let Some(why) = missing() {
        eprintln!("skipping the containerd integration test: {why}");
        return;
    }
    let daemon = Daemon::start();
    let rt = daemon.runtime("containerd");
    let archive = daemon.dir.path().join("busybox.oci.tar");
    let bytes = busybox_archive(&archive, &APPLETS);

    // Import, twice: the second finds everything in place.
    let first = rt
        .import(&archive, None, "x")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    assert_eq!(first.name, "caisson.test/busybox:1");
    let again = rt
        .import(&archive, Some("caisson.test/busybox:1"), "x")
        .await
        .unwrap();
    assert_eq!(
        (again.digest, again.top),
        (first.digest.clone(), first.top.clone())
    );

    // A container that prints a line and exits 3.
    let path = archive.display();
    let hello = unit(
        "hello",
        &format!(
            "command = [\"/bin/sh\", \"-c\", \"echo hello from $WHO; exit 3\"]\nenv = {{ WHO = \"caisson\" }}\nrestart = \"never\"\n[image]\npath = \"{path}\""
        ),
    );
    rt.start(&hello, "h1")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    assert_eq!(
        wait_for(&rt, "hello", |s| s != ContainerState::Running).await,
        ContainerState::Exited(3)
    );
    assert_eq!(rt.logs("hello", 10).await.unwrap(), ["hello from caisson"]);
    let c = rt
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.unit == "hello")
        .unwrap();
    assert_eq!((c.spec_hash.as_str(), c.restarts), ("h1", 0));

    // Restarted, it runs again, counts the restart and appends to its log.
    rt.restart("hello").await.unwrap();
    wait_for(&rt, "hello", |s| s == ContainerState::Exited(3)).await;
    let c = rt
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.unit == "hello")
        .unwrap();
    assert_eq!(c.restarts, 1);
    assert_eq!(rt.logs("hello", 10).await.unwrap().len(), 2);

    // A long-lived one, from an image fetched over HTTP: SIGTERM is ignored by a PID 1
    // without a handler, so the stop ends in SIGKILL after the timeout.
    let port = serve(bytes.clone()).await;
    let sha = hex::encode(Sha256::digest(&bytes));
    let sleeper = unit(
        "sleeper",
        &format!("command = [\"/bin/sleep\", \"1000\"]\n[image]\nurl = \"http://127.0.0.1:{port}/busybox.oci.tar\"\nsha256 = \"{sha}\""),
    );
    rt.start(&sleeper, "s1")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    assert_eq!(
        wait_for(&rt, "sleeper", |_| true).await,
        ContainerState::Running
    );
    assert!(rt.cache_dir.join(format!("{sha}.oci.tar")).exists());
    let t = Instant::now();
    rt.remove("sleeper").await.unwrap();
    assert!(
        t.elapsed() >= rt.stop_timeout,
        "stopped by SIGKILL after the timeout"
    );
    assert_eq!(
        rt.list()
            .await
            .unwrap()
            .iter()
            .map(|c| c.unit.as_str())
            .collect::<Vec<_>>(),
        ["hello"]
    );

    // A container that handles SIGTERM stops at once.
    let polite = unit(
        "polite",
        &format!("command = [\"/bin/sh\", \"-c\", \"trap 'echo bye; exit 0' TERM; echo up; while true; do sleep 0.1; done\"]\n[image]\npath = \"{path}\""),
    );
    rt.start(&polite, "p1").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while rt.logs("polite", 5).await.unwrap().is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rt.stop("polite").await.unwrap(), Some(0));
    // The shim copies the output to the log on its own: the last line may land just after
    // the exit is reported.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rt.logs("polite", 5).await.unwrap() != ["up", "bye"] && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rt.logs("polite", 5).await.unwrap(), ["up", "bye"]);

    // A wrong sha256 and a missing command are clear errors, and leave nothing behind.
    let bad = unit(
        "bad",
        &format!(
            "[image]\nurl = \"http://127.0.0.1:{port}/x.tar\"\nsha256 = \"{}\"",
            "0".repeat(64)
        ),
    );
    let e = rt.start(&bad, "b").await.unwrap_err().to_string();
    assert!(e.contains("sha256 is") && e.contains("127.0.0.1"), "{e}");
    let nocmd = unit(
        "nocmd",
        &format!("command = [\"/bin/nonexistent\"]\n[image]\npath = \"{path}\""),
    );
    let e = rt.start(&nocmd, "n").await.unwrap_err().to_string();
    assert!(e.contains("nocmd") && e.contains("task"), "{e}");

    // The agent's reconciliation drives it: starts what is wanted, removes what is not.
    let mut desired = std::collections::BTreeMap::new();
    let web = unit(
        "web",
        &format!("command = [\"/bin/sleep\", \"1000\"]\n[image]\npath = \"{path}\""),
    );
    desired.insert("web".to_string(), web);
    let st = caisson_fleet::agent::reconcile(&rt, &desired)
        .await
        .unwrap();
    assert_eq!(st["web"].state, "running", "{st:?}");
    let st = caisson_fleet::agent::reconcile(&rt, &Default::default())
        .await
        .unwrap();
    assert!(st.is_empty());
    assert!(!rt.list().await.unwrap().iter().any(|c| c.unit == "web"));

    for u in ["hello", "polite", "nocmd"] {
        rt.remove(u).await.unwrap();
    }
    assert!(rt.list().await.unwrap().is_empty());
    // Removing what is gone is fine.
    rt.remove("hello").await.unwrap();
}

/// `ctr` against the test's containerd, in the runtime's namespace: its output.
fn ctr(daemon: &Daemon, rt: &Containerd, args: &[&str]) -> String {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(daemon.socket())
        .args(["--namespace", &rt.namespace])
        .args(args)
        .output()
        .expect("running ctr (Debian's containerd package has it)");
    assert!(out.status.success(), "ctr {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An archive whose layer does not unpack to its `rootfs.diff_ids` entry would plant that
/// layer's content under another image's chain ID (here busybox's own, so a later import of the
/// real busybox would find its snapshot "already there" and run the planted one); an archive
/// whose manifest and config disagree on the layer count is as wrong. Both are refused with an
/// error naming the layer, and nothing of them is imported or run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_whose_layers_do_not_match_their_diff_ids_are_refused() {
    if let Some(why) = missing() {
        eprintln!("skipping the containerd integration test: {why}");
        return;
    }
    let daemon = Daemon::start();
    let rt = daemon.runtime("containerd");
    let dir = daemon.dir.path();
    let real = busybox_layer_with(&APPLETS, &[]);
    let real_id = digest(&real);
    let mut evil = tar::Builder::new(Vec::new());
    add(&mut evil, "bin/sh", b"#!/bin/evil\n", 0o755);
    let evil = evil.into_inner().unwrap();

    let planted = dir.join("planted.oci.tar");
    oci_archive(
        &planted,
        std::slice::from_ref(&evil),
        std::slice::from_ref(&real_id),
    );
    let e = rt
        .import(&planted, None, "x")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("layer {}", digest(&evil)))
            && e.contains("diff_ids")
            && e.contains(&real_id),
        "{e}"
    );
    let snapshots = ctr(
        &daemon,
        &rt,
        &["snapshots", "--snapshotter", "overlayfs", "ls"],
    );
    assert!(!snapshots.contains(&real_id), "planted: {snapshots}");
    assert!(
        !snapshots.contains("caisson-extract"),
        "left behind: {snapshots}"
    );

    let miscounted = dir.join("miscounted.oci.tar");
    oci_archive(
        &miscounted,
        std::slice::from_ref(&real),
        &[real_id.clone(), real_id.clone()],
    );
    let e = rt
        .import(&miscounted, None, "x")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 layer(s)") && e.contains("lists 2"), "{e}");

    for (name, archive) in [("planted", &planted), ("miscounted", &miscounted)] {
        let u = unit(name, &format!("[image]\npath = \"{}\"", archive.display()));
        let e = rt.start(&u, "h").await.unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("refusing the image"), "{e}");
    }
    assert!(rt.list().await.unwrap().is_empty());
    assert_eq!(ctr(&daemon, &rt, &["images", "ls", "-q"]).trim(), "");
    assert_eq!(ctr(&daemon, &rt, &["containers", "ls", "-q"]).trim(), "");

    // The real image still imports, into its own snapshot.
    let good = dir.join("good.oci.tar");
    busybox_archive(&good, &APPLETS);
    let imported = rt.import(&good, None, "x").await.unwrap();
    assert_eq!(imported.top, real_id);
}

/// An HTTP server on loopback that announces a megabyte and sends one byte every 100 ms.
async fn serve_slowly() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                    .await?;
                loop {
                    s.write_all(b"x").await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                #[allow(unreachable_code)]
                Ok::<(), std::io::Error>(())
            });
        }
    });
    port
}

/// A unit whose image URL trickles does not hold up the others: the reconciliation starts its
/// download in the background, reports it `starting` and starts the other unit at once; when
/// the download misses its deadline the unit is reported failed with that error, and no
/// partial file is left in the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_image_download_holds_up_no_other_unit() {
    if let Some(why) = missing() {
        eprintln!("skipping the containerd integration test: {why}");
        return;
    }
    let daemon = Daemon::start();
    let mut rt = daemon.runtime("containerd");
    // runc keeps its state per namespace outside the daemon's directory: a name of its own,
    // so this test's "web" never meets the other test's.
    rt.namespace.push_str("-stalled");
    rt.fetch_limits.deadline = Duration::from_secs(10);
    let archive = daemon.dir.path().join("busybox.oci.tar");
    busybox_archive(&archive, &APPLETS);
    let port = serve_slowly().await;
    let mut desired = std::collections::BTreeMap::new();
    let slow = unit(
        "slow",
        &format!(
            "[image]\nurl = \"http://127.0.0.1:{port}/slow.oci.tar\"\nsha256 = \"{}\"",
            "ab".repeat(32)
        ),
    );
    let web = unit(
        "web",
        &format!(
            "command = [\"/bin/sleep\", \"1000\"]\n[image]\npath = \"{}\"",
            archive.display()
        ),
    );
    desired.insert("slow".to_string(), slow);
    desired.insert("web".to_string(), web);
    let t = Instant::now();
    let st = caisson_fleet::agent::reconcile(&rt, &desired)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    eprintln!("first reconciliation: {:?}", t.elapsed());
    assert!(t.elapsed() < rt.fetch_limits.deadline, "{:?}", t.elapsed());
    assert_eq!(st["web"].state, "running", "{st:?}");
    assert_eq!(
        (st["slow"].state.as_str(), &st["slow"].error),
        ("starting", &None)
    );
    let failed = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let st = caisson_fleet::agent::reconcile(&rt, &desired)
            .await
            .unwrap();
        assert_eq!(st["web"].state, "running", "{st:?}");
        if st["slow"].state != "starting" {
            break st["slow"].clone();
        }
        assert!(
            t.elapsed() < rt.fetch_limits.deadline + Duration::from_secs(10),
            "the download outlived its deadline"
        );
    };
    assert_eq!(failed.state, "failed");
    let e = failed.error.unwrap_or_default();
    assert!(
        e.contains("not complete after 10s") && e.contains("slow.oci.tar"),
        "{e}"
    );
    let left: Vec<_> = std::fs::read_dir(&rt.cache_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    rt.remove("web").await.unwrap();
}
