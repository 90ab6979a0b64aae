//! A real etcd for integration tests: Debian's `/usr/bin/etcd` on loopback ports picked at
//! random, with a temporary data dir; killed when dropped.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod pki;

use caisson_fleet::registry::MachineRecord;
use std::collections::BTreeMap;

/// An agent's configuration for a test etcd, with a 2 s lease.
pub fn config(etcd: &Etcd) -> caisson_fleet::config::Config {
    caisson_fleet::config::Config {
        endpoints: vec![etcd.endpoint()],
        ttl_s: 2,
        ..Default::default()
    }
}

/// Agents with in-memory runtimes joined as these machines, and a store on the first one's
/// connection (the operator's view in tests without roles).
pub async fn join(
    cfg: &caisson_fleet::config::Config,
    ids: &[&str],
) -> (
    Vec<caisson_fleet::agent::Agent<caisson_fleet::agent::FakeRuntime>>,
    caisson_fleet::store::Store,
) {
    let mut agents = Vec::new();
    for id in ids {
        agents.push(
            caisson_fleet::agent::Agent::join(cfg, record(id), Default::default())
                .await
                .unwrap(),
        );
    }
    let store = caisson_fleet::store::Store::new(
        agents[0].store.client.clone(),
        agents[0].store.keys.clone(),
    );
    (agents, store)
}

/// One tick of each agent, in order.
pub async fn tick_all(
    agents: &mut [caisson_fleet::agent::Agent<caisson_fleet::agent::FakeRuntime>],
) {
    for a in agents.iter_mut() {
        a.tick().await.unwrap();
    }
}

/// The record of a test machine on loopback.
pub fn record(id: &str) -> MachineRecord {
    MachineRecord {
        id: id.into(),
        address: "127.0.0.1".into(),
        labels: BTreeMap::new(),
        version: None,
        slot: None,
        last_seen: 0,
        memory_bytes: None,
        cpus: None,
    }
}

pub const ETCD: &str = "/usr/bin/etcd";

/// The server side of TLS: etcd's certificate and key, and the CA its clients must come from.
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// One single-member etcd.
pub struct Etcd {
    pub client_port: u16,
    pub peer_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    tls: Option<ServerTls>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    /// Starts etcd and waits until it answers. Panics with a hint if etcd is not installed.
    pub fn start() -> Etcd {
        Etcd::start_with(None)
    }

    /// etcd over TLS only, checking client certificates against `tls.client_ca`.
    pub fn start_tls(tls: ServerTls) -> Etcd {
        Etcd::start_with(Some(tls))
    }

    fn start_with(tls: Option<ServerTls>) -> Etcd {
        assert!(
            std::path::Path::new(ETCD).exists(),
            "{ETCD} is missing: apt-get install -y etcd-server (ci/deps does)"
        );
        let mut e = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            tls,
        };
        e.spawn();
        e
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let mut cmd = Command::new(ETCD);
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cert-file={}", t.cert.display()))
                .arg(format!("--key-file={}", t.key.display()))
                .arg(format!("--trusted-ca-file={}", t.client_ca.display()))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--logger=zap")
            .env_remove("ETCD_UNSUPPORTED_ARCH")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        self.child = Some(child);
        self.wait_healthy();
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        if self.tls.is_some() {
            // No TLS client here: etcd says when it serves (after a restart, a new line).
            let before = self.log().matches("serving client").count();
            while Instant::now() < deadline {
                if self.log().matches("serving client").count() > before {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!("etcd did not start serving; log:\n{}", self.log());
        }
        let addr = format!("127.0.0.1:{}", self.client_port);
        while Instant::now() < deadline {
            if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
                use std::io::{Read, Write};
                let body = r#"{"key":"AA=="}"#;
                let req = format!(
                    "POST /v3/kv/range HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                if s.write_all(req.as_bytes()).is_ok() {
                    let mut out = String::new();
                    let _ = s.read_to_string(&mut out);
                    if out.starts_with("HTTP/1.1 200") {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd did not become healthy; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Kills etcd (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills etcd and starts it again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts etcd again after [`Etcd::kill`].
    pub fn resume(&mut self) {
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
