//! A real containerd for integration tests (Debian's 1.6, CRI disabled) with its own root,
//! state and socket in a temporary directory, killed when dropped; and tiny OCI images made
//! from the host's busybox-static, with the applets and files a test names.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use caisson_fleet::agent::{ContainerState, Runtime};
use caisson_fleet::containerd::Containerd;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CONTAINERD: &str = "/usr/bin/containerd";
pub const BUSYBOX: &str = "/bin/busybox";
/// The busybox applets the health checks' image links into its /bin.
pub const APPLETS: [&str; 10] = [
    "sh", "sleep", "echo", "test", "[", "touch", "mkdir", "httpd", "cat", "rm",
];

/// Why containerd tests cannot run here (not root, a package missing), or `None`.
pub fn missing() -> Option<String> {
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
pub struct Daemon {
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Daemon {
    pub fn start() -> Daemon {
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

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// The runtime on this daemon, in a namespace named after `test` and the process.
    pub fn runtime(&self, test: &str) -> Containerd {
        let mut c = Containerd::new(
            self.socket(),
            format!("caisson-{test}-{}", std::process::id()),
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

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_cksum();
    h
}

pub fn add(t: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], mode: u32) {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
    t.append_data(&mut h, name, data).unwrap();
}

pub fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A layer (an uncompressed tar): /bin/busybox and links to it named `applets`, plus `files`
/// (path, content).
pub fn busybox_layer_with(applets: &[&str], files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut layer = tar::Builder::new(Vec::new());
    for d in [
        "bin/", "etc/", "tmp/", "mnt/", "proc/", "sys/", "dev/", "run/",
    ] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        layer.append_data(&mut h, d, std::io::empty()).unwrap();
    }
    add(
        &mut layer,
        "bin/busybox",
        &std::fs::read(BUSYBOX).unwrap(),
        0o755,
    );
    for l in applets {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        layer
            .append_link(&mut h, format!("bin/{l}"), "busybox")
            .unwrap();
    }
    for (path, data) in files {
        add(&mut layer, path, data, 0o644);
    }
    layer.into_inner().unwrap()
}

/// An OCI archive (`caisson.test/busybox:1`) of one layer: /bin/busybox, a link to it per
/// applet, and the directories a container needs.
pub fn busybox_archive(path: &Path, applets: &[&str]) -> Vec<u8> {
    let layer = busybox_layer_with(applets, &[]);
    let d = digest(&layer);
    oci_archive(path, &[layer], &[d])
}

/// An OCI archive of one image (`caisson.test/busybox:1`) with these layers (uncompressed
/// tars) and these `rootfs.diff_ids` in its config, which a test may get wrong on purpose.
pub fn oci_archive(path: &Path, layers: &[Vec<u8>], diff_ids: &[String]) -> Vec<u8> {
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

/// Waits until the unit's container is in a state `want` accepts.
pub async fn wait_for(
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

/// Waits until the unit's log has a line `last`; returns the whole log.
pub async fn log_until(rt: &Containerd, unit: &str, last: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = rt.logs(unit, 200).await.unwrap_or_default();
        if lines.iter().any(|l| l == last) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "unit {unit} never printed {last:?}: {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Directories the test made under /etc, removed (deepest first) when dropped.
pub struct Made(Vec<PathBuf>);

impl Made {
    pub fn dir(path: &Path) -> Made {
        let mut made = Vec::new();
        let mut p = PathBuf::new();
        for c in path.components() {
            p.push(c);
            if !p.exists() {
                std::fs::create_dir(&p).unwrap();
                made.push(p.clone());
            }
        }
        Made(made)
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
