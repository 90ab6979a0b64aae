//! A real OCI registry for end-to-end tests: Debian's `docker-registry` on a loopback port of
//! the host (a QEMU guest on the user network reaches it at 10.0.2.2), images pushed with
//! Debian's `skopeo`; killed when dropped.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGISTRY: &str = "/usr/bin/docker-registry";
pub const SKOPEO: &str = "/usr/bin/skopeo";

pub struct Registry {
    pub dir: tempfile::TempDir,
    child: Child,
    pub port: u16,
}

impl Registry {
    /// Starts a registry without authentication, storing under a temporary directory.
    pub fn start() -> Registry {
        for (p, pkg) in [(REGISTRY, "docker-registry"), (SKOPEO, "skopeo")] {
            assert!(
                Path::new(p).exists(),
                "{p} is missing: apt-get install -y {pkg} (ci/deps does)"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let config = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("storage").display()
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Pushes an OCI archive as `repo:tag`; returns the reference a QEMU guest uses.
    pub fn push(&self, archive: &Path, repo_tag: &str) -> String {
        let out = Command::new(SKOPEO)
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://127.0.0.1:{}/{repo_tag}", self.port))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("{}/{repo_tag}", self.guest_host())
    }

    /// The registry's host:port as a QEMU guest on the user network sees it.
    pub fn guest_host(&self) -> String {
        format!("10.0.2.2:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
