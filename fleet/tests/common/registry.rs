//! A real OCI registry for tests: Debian's `docker-registry` (distribution 2.8) on a loopback
//! port, storing where the test says, images pushed with Debian's `skopeo`; killed when
//! dropped. A QEMU guest on the user network reaches it at 10.0.2.2. Shared by the fleet's
//! registry tests and benchmark and the builder's end-to-end tests (included by path).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGISTRY: &str = "/usr/bin/docker-registry";
pub const SKOPEO: &str = "/usr/bin/skopeo";

/// Why a registry test cannot run here (a package missing), or `None`.
pub fn missing() -> Option<String> {
    [(REGISTRY, "docker-registry"), (SKOPEO, "skopeo")]
        .iter()
        .find(|(p, _)| !Path::new(p).exists())
        .map(|(p, pkg)| format!("{p} is missing (apt-get install -y {pkg}; ci/deps does)"))
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A docker-registry serving `storage` on a loopback port, killed when dropped.
pub struct Registry {
    pub dir: tempfile::TempDir,
    child: Child,
    pub port: u16,
}

impl Registry {
    /// `auth`: YAML lines for the `auth:` section (empty: none).
    pub fn start(storage: &Path, auth: &str) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            storage.display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let r = Registry { dir, child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not start: {}",
                r.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        r
    }

    /// The registry's host:port on this machine.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's host:port as a QEMU guest on the user network sees it.
    pub fn guest_host(&self) -> String {
        format!("10.0.2.2:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many GETs of blobs the registry answered (its access log lines).
    pub fn blob_gets(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/"))
            .count()
    }

    /// Pushes an OCI archive to this registry as `repo:tag` over plain HTTP.
    pub fn push(&self, archive: &Path, repo_tag: &str) {
        push(archive, &format!("{}/{repo_tag}", self.host()));
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pushes an OCI archive to `dest` (`host/repo:tag`) over plain HTTP.
pub fn push(archive: &Path, dest: &str) {
    let out = Command::new(SKOPEO)
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker://{dest}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes that do not compress (xorshift), so a pushed layer stays as large as asked.
pub fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
