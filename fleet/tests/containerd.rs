//! The containerd runtime against a real containerd (Debian's 1.6) started by the test with its
//! own root, state and socket in a temporary directory, CRI disabled. The image is a tiny OCI
//! archive made here from the host's busybox-static.
//!
//! Needs root, `containerd`, `runc` and `busybox-static` (ci/deps installs them); without them
//! the test says why and passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use caisson_fleet::agent::{ContainerState, Runtime};
use caisson_fleet::containerd::Containerd;
use caisson_fleet::unit::UnitSpec;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CONTAINERD: &str = "/usr/bin/containerd";
const BUSYBOX: &str = "/bin/busybox";

fn missing() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root".into());
    }
    for (paths, pkg) in [
        (&[CONTAINERD][..], "containerd"),
        (&["/usr/bin/containerd-shim-runc-v2"][..], "containerd"),
        (&["/usr/sbin/runc", "/usr/bin/runc"][..], "runc"),
        (&[BUSYBOX][..], "busybox-static"),
    ] {
        if !paths.iter().any(|p| Path::new(p).exists()) {
            return Some(format!(
                "{} is missing (apt-get install -y {pkg})",
                paths[0]
            ));
        }
    }
    None
}

/// A containerd of the test's own, killed when dropped.
struct Daemon {
    dir: tempfile::TempDir,
    child: Child,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new(CONTAINERD)
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = Daemon { dir, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !daemon.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn runtime(&self) -> Containerd {
        let mut c = Containerd::new(
            self.socket(),
            format!("caisson-test-{}", std::process::id()),
        );
        c.log_dir = self.dir.path().join("logs");
        c.cache_dir = self.dir.path().join("cache");
        c.stop_timeout = Duration::from_secs(2);
        c
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Snapshots are overlay mounts; the temp dir cannot go while they are mounted.
        let root = self.dir.path().display().to_string();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            for line in mounts.lines() {
                if let Some(mp) = line.split(' ').nth(4).filter(|m| m.starts_with(&root)) {
                    let _ = Command::new("umount").arg("-l").arg(mp).status();
                }
            }
        }
    }
}

fn add(t: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_cksum();
    t.append_data(&mut h, name, data).unwrap();
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// An OCI archive with one layer: /bin/busybox and links to it.
fn busybox_archive(path: &Path) -> Vec<u8> {
    let layer = busybox_layer();
    let l = digest(&layer);
    oci_archive(path, &[layer], &[l])
}

/// A layer (an uncompressed tar): /bin/busybox and links to it.
fn busybox_layer() -> Vec<u8> {
    let mut layer = tar::Builder::new(Vec::new());
    for d in ["bin/", "etc/", "tmp/"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        h.set_cksum();
        layer.append_data(&mut h, d, std::io::empty()).unwrap();
    }
    add(
        &mut layer,
        "bin/busybox",
        &std::fs::read(BUSYBOX).unwrap(),
        0o755,
    );
    for l in ["sh", "sleep", "echo"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(0);
        h.set_cksum();
        layer
            .append_link(&mut h, format!("bin/{l}"), "busybox")
            .unwrap();
    }
    layer.into_inner().unwrap()
}

/// An OCI archive of one image (`caisson.test/busybox:1`) with these layers (uncompressed
/// tars) and these `rootfs.diff_ids` in its config, which a test may get wrong on purpose.
fn oci_archive(path: &Path, layers: &[Vec<u8>], diff_ids: &[String]) -> Vec<u8> {
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let c = digest(config.as_bytes());
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|l| {
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                               "digest": digest(l), "size": l.len()})
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c,
                   "size": config.len()},
        "layers": layer_descs,
    })
    .to_string();
    let m = digest(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{m}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"caisson.test/busybox:1"}}}}]}}"#,
        manifest.len()
    );
    let mut t = tar::Builder::new(Vec::new());
    add(
        &mut t,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    );
    add(&mut t, "index.json", index.as_bytes(), 0o644);
    let mut blobs: Vec<&[u8]> = layers.iter().map(|l| l.as_slice()).collect();
    blobs.extend([config.as_bytes(), manifest.as_bytes()]);
    for b in blobs {
        add(
            &mut t,
            &format!("blobs/sha256/{}", &digest(b)[7..]),
            b,
            0o644,
        );
    }
    let bytes = t.into_inner().unwrap();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

fn unit(name: &str, body: &str) -> UnitSpec {
    UnitSpec::parse(name, body).unwrap()
}

async fn wait_for(
    rt: &Containerd,
    unit: &str,
    want: impl Fn(ContainerState) -> bool,
) -> ContainerState {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = rt.list().await.unwrap();
        if let Some(c) = list.iter().find(|c| c.unit == unit) {
            if want(c.state) {
                return c.state;
            }
        }
        assert!(Instant::now() < deadline, "unit {unit}: {list:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let rt = daemon.runtime();
    let archive = daemon.dir.path().join("busybox.oci.tar");
    let bytes = busybox_archive(&archive);

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
    let rt = daemon.runtime();
    let dir = daemon.dir.path();
    let real = busybox_layer();
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
    busybox_archive(&good);
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
    let mut rt = daemon.runtime();
    // runc keeps its state per namespace outside the daemon's directory: a name of its own,
    // so this test's "web" never meets the other test's.
    rt.namespace.push_str("-stalled");
    rt.fetch_limits.deadline = Duration::from_secs(10);
    let archive = daemon.dir.path().join("busybox.oci.tar");
    busybox_archive(&archive);
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
