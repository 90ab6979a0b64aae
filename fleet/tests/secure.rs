//! The fleet against a real etcd with TLS, client certificates and authentication on, set up by
//! `caisson-fleet access`: each machine's credentials write only its own keys, the leader role
//! alone writes assignments, the operator alone writes units; a wrong CA, an expired or
//! unknown client certificate and a name mismatch are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use caisson_fleet::access::machine_user;
use caisson_fleet::agent::{Agent, FakeRuntime};
use caisson_fleet::config::{Auth, Config, Tls};
use caisson_fleet::etcd::{Access, Client, EtcdError, Op};
use caisson_fleet::lock::RebootLock;
use caisson_fleet::registry::{self, Keys};
use common::pki::{Ca, Pair};
use common::record;
use common::{Etcd, ServerTls};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// etcd with TLS on, its CA, and a directory for the credentials.
struct Site {
    dir: tempfile::TempDir,
    ca: Ca,
    etcd: Etcd,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "ca");
        let server = ca.server(dir.path(), &["127.0.0.1"]);
        let etcd = Etcd::start_tls(ServerTls {
            cert: server.cert,
            key: server.key,
            client_ca: ca.cert.clone(),
        });
        Site { dir, ca, etcd }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A fleet.toml's settings for `user`, with a client certificate of its own.
    fn config(&self, name: &str, user: &str) -> Config {
        let pair = self.ca.client(self.dir.path(), name, false);
        Config {
            endpoints: vec![self.etcd.endpoint()],
            ttl_s: 2,
            tls: Some(Tls {
                ca: Some(self.ca.cert.clone()),
                cert: Some(pair.cert),
                key: Some(pair.key),
            }),
            auth: Some(Auth {
                user: user.into(),
                password_file: self.path(&format!("{name}.pw")),
            }),
            ..Config::default()
        }
    }

    /// The operator's config file (as an operator would write it).
    fn operator_file(&self) -> PathBuf {
        let c = self.config("operator", "caisson-operator");
        let tls = c.tls.unwrap();
        let text = format!(
            "endpoints = [\"{}\"]\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [auth]\nuser = \"caisson-operator\"\npassword_file = \"{}\"\n",
            self.etcd.endpoint(),
            tls.ca.unwrap().display(),
            tls.cert.unwrap().display(),
            tls.key.unwrap().display(),
            c.auth.unwrap().password_file.display()
        );
        let path = self.path("operator.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `caisson-fleet access init`, and a user for each machine (`leader`: may lead).
    fn secure(&self, machines: &[(&str, bool)]) -> PathBuf {
        let op = self.operator_file();
        let root = self.path("root.pw");
        let (ok, out, err) = cli(
            &op,
            &[
                "access",
                "init",
                "--root-password-file",
                root.to_str().unwrap(),
                "--operator-password-file",
                self.path("operator.pw").to_str().unwrap(),
            ],
        );
        assert!(ok, "{err}");
        assert!(out.contains("authentication is on"), "{out}");
        for (id, leader) in machines {
            let pw = self.path(&format!("{id}.pw"));
            let mut args = vec![
                "access",
                "machine",
                id,
                "--root-password-file",
                root.to_str().unwrap(),
                "--password-file",
                pw.to_str().unwrap(),
            ];
            if *leader {
                args.push("--leader");
            }
            let (ok, out, err) = cli(&op, &args);
            assert!(ok, "{err}");
            assert_eq!(out.trim(), machine_user(id));
        }
        op
    }
}

fn cli(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_caisson-fleet"))
        .arg("--config")
        .arg(config)
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

/// An error and every cause under it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn denied<T: std::fmt::Debug>(what: &str, r: Result<T, EtcdError>) {
    match r {
        Err(e) if e.is_permission_denied() => {}
        other => panic!("{what}: expected permission denied, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_writes_only_its_own_keys() {
    let site = Site::new();
    let op = site.secure(&[("m1", true), ("m2", false)]);
    let keys = Keys::new("/caisson/fleet/");
    // The operator submits units with the CLI.
    let web = site.path("web.toml");
    std::fs::write(&web, "replicas = 2\n[image]\npath = \"/w.tar\"\n").unwrap();
    let (ok, out, err) = cli(&op, &["submit", web.to_str().unwrap()]);
    assert!(ok && out.contains("submitted web"), "{err}");
    // Two agents with their own credentials: m1 may lead, m2 may not; both run web.
    let mut agents = Vec::new();
    for id in ["m1", "m2"] {
        let cfg = site.config(id, &machine_user(id));
        agents.push(
            Agent::join(&cfg, record(id), FakeRuntime::default())
                .await
                .unwrap(),
        );
    }
    for _ in 0..3 {
        for a in agents.iter_mut() {
            a.tick().await.unwrap();
        }
    }
    assert!(
        agents.iter().all(|a| a.runtime.units() == ["web"]),
        "web runs on both"
    );
    let m2 = agents[1].store.client.clone();
    assert_eq!(
        registry::leader(&m2, &keys).await.unwrap().as_deref(),
        Some("m1")
    );
    // m1 goes: m2 has no leader role, so nobody leads and m2 keeps its units.
    agents.remove(0).member.leave().await.unwrap();
    for _ in 0..2 {
        agents[0].tick().await.unwrap();
    }
    assert_eq!(registry::leader(&m2, &keys).await.unwrap(), None);
    assert_eq!(agents[0].runtime.units(), ["web"]);

    // What m2's credentials cannot do.
    denied("put a unit", m2.put(&keys.unit("evil"), "{}", 0).await);
    denied(
        "write its own assignment",
        m2.txn(&[], &[Op::put(keys.assign("m2"), "[\"evil\"]")], &[])
            .await,
    );
    denied("take the leader key", m2.put(&keys.leader(), "m2", 0).await);
    denied(
        "write another machine's record",
        m2.put(&keys.machine("m1"), "{}", 0).await,
    );
    denied(
        "write another machine's status",
        m2.put(&keys.status("m1", "web"), "{}", 0).await,
    );
    denied(
        "read another machine's logs",
        m2.range(&format!("{}m1/", keys.all_logs()), true).await,
    );
    denied("delete every unit", m2.delete(&keys.units(), true).await);
    // Its own keys it may write; its slot of the reboot lock, not another's.
    m2.put(&keys.status("m2", "x"), "{}", 0).await.unwrap();
    let lock = RebootLock::new(m2.clone(), keys.lock());
    assert!(lock.acquire("m2").await.unwrap());
    let other = site.config("m1", &machine_user("m1")).client().unwrap();
    let lock_m1 = RebootLock::new(other, keys.lock());
    assert!(
        !lock_m1.acquire("m1").await.unwrap(),
        "one slot, m2 holds it"
    );
    match lock_m1.release("m2").await {
        Err(caisson_fleet::lock::LockError::Etcd(e)) if e.is_permission_denied() => {}
        other => panic!("m1 released m2's slot: {other:?}"),
    }
    match lock.set_max(5).await {
        Err(caisson_fleet::lock::LockError::Etcd(e)) if e.is_permission_denied() => {}
        other => panic!("a machine changed the lock's max: {other:?}"),
    }
    // The operator may.
    let (ok, _, err) = cli(&op, &["lock", "release", "m2"]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&op, &["units"]);
    assert!(ok && out.contains("m2:running"), "{out}{err}");
    // Without the password file, or with a wrong password, nothing is read.
    let mut wrong = site.config("m2", &machine_user("m2"));
    let bad = site.path("bad.pw");
    std::fs::write(&bad, "not-the-password\n").unwrap();
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    wrong.auth.as_mut().unwrap().password_file = bad;
    let e = wrong.client().unwrap().range(&keys.units(), true).await;
    match e {
        Err(e @ EtcdError::Auth { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("caisson-machine-m2") && !text.contains("not-the-password"),
                "{text}"
            );
        }
        other => panic!("wrong password accepted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_etcd_forgot_is_replaced() {
    let mut site = Site::new();
    site.secure(&[("m1", false)]);
    let keys = Keys::new("/caisson/fleet/");
    let c = site.config("m1", &machine_user("m1")).client().unwrap();
    c.put(&keys.machine("m1"), "{}", 0).await.unwrap();
    // Simple tokens live in the member's memory: a restart forgets them.
    site.etcd.restart();
    c.put(&keys.machine("m1"), "{}", 0).await.unwrap();
    assert_eq!(
        c.get(&keys.machine("m1")).await.unwrap().unwrap().value,
        b"{}"
    );
}

/// A client with these TLS settings (and no credentials).
fn client(endpoint: &str, ca: &Path, pair: Option<&Pair>) -> Client {
    let access = Access {
        ca_pem: Some(std::fs::read(ca).unwrap()),
        identity_pem: pair.map(|p| {
            let mut pem = std::fs::read(&p.cert).unwrap();
            pem.extend(std::fs::read(&p.key).unwrap());
            pem
        }),
        credentials: None,
    };
    Client::connect(&[endpoint], &access, Duration::from_secs(5)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_do_not_belong_are_refused() {
    let site = Site::new();
    let dir = site.dir.path();
    let endpoint = site.etcd.endpoint();
    let good = site.ca.client(dir, "good", false);
    // The baseline: the right CA and a current client certificate are let in.
    client(&endpoint, &site.ca.cert, Some(&good))
        .range("/", false)
        .await
        .unwrap();
    let refused = |what: &str, r: Result<_, EtcdError>, expect: &str| match r {
        Err(e @ EtcdError::Unreachable { .. }) => {
            let text = chain(&e).to_lowercase();
            // In TLS 1.3 the server checks the client's certificate after the client has
            // finished its side of the handshake: its alert may lose the race with the
            // connection closing, and then the client sees only the close.
            let closed = expect == "alert: badcertificate"
                && [
                    "connection reset",
                    "broken pipe",
                    "unexpected eof",
                    "connection closed",
                    "connection was not ready",
                ]
                .iter()
                .any(|c| text.contains(c));
            assert!(text.contains(expect) || closed, "{what}: {text}");
        }
        other => panic!("{what}: expected a refusal, got {other:?}"),
    };
    let other_ca = Ca::new(dir, "other-ca");
    refused(
        "a server certificate from a CA we do not trust",
        client(&endpoint, &other_ca.cert, Some(&good))
            .range("/", false)
            .await,
        "unknownissuer",
    );
    refused(
        "an expired client certificate",
        client(
            &endpoint,
            &site.ca.cert,
            Some(&site.ca.client(dir, "old", true)),
        )
        .range("/", false)
        .await,
        "alert: badcertificate",
    );
    refused(
        "a client certificate from another CA",
        client(
            &endpoint,
            &site.ca.cert,
            Some(&other_ca.client(dir, "stranger", false)),
        )
        .range("/", false)
        .await,
        "alert: badcertificate",
    );
    refused(
        "no client certificate",
        client(&endpoint, &site.ca.cert, None)
            .range("/", false)
            .await,
        "alert: badcertificate",
    );
    // The server's certificate names 127.0.0.1 only.
    let by_name = endpoint.replace("127.0.0.1", "localhost");
    refused(
        "a name the server certificate does not carry",
        client(&by_name, &site.ca.cert, Some(&good))
            .range("/", false)
            .await,
        "not valid for name \"localhost\"",
    );
    // Credentials against an etcd that does not check them: refused, with the way out.
    let mut cfg = site.config("m9", "caisson-machine-m9");
    let pw = site.path("m9.pw");
    std::fs::write(&pw, "pw\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    cfg.auth.as_mut().unwrap().password_file = pw;
    match cfg.client().unwrap().range("/", false).await {
        Err(e @ EtcdError::AuthNotEnabled { .. }) => {
            assert!(e.to_string().contains("caisson-fleet access init"), "{e}")
        }
        other => panic!("expected AuthNotEnabled, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_claim_subnets_and_write_only_their_own_services() {
    use caisson_fleet::network::{self, NetworkError, SubnetLease};
    let site = Site::new();
    let op = site.secure(&[("m1", false), ("m2", false)]);
    let keys = Keys::new("/caisson/fleet/");
    let (ok, out, err) = cli(&op, &["network", "init", "10.42.0.0/16"]);
    assert!(ok && out.contains("10.42.0.0/16"), "{out}{err}");
    let m1 = site.config("m1", &machine_user("m1")).client().unwrap();
    let m2 = site.config("m2", &machine_user("m2")).client().unwrap();
    // A machine reads the config and claims its subnet under its own lease.
    let member = registry::Member::join(m1.clone(), keys.clone(), record("m1"), 30)
        .await
        .unwrap();
    let config = network::config(&m1, &keys).await.unwrap().unwrap();
    let held = SubnetLease::new(
        m1.clone(),
        keys.clone(),
        "m1",
        "127.0.0.1",
        site.path("m1-subnet.json"),
    )
    .unwrap()
    .claim(&config, member.lease())
    .await
    .unwrap();
    assert_eq!(network::peers(&m2, &keys).await.unwrap(), [held]);
    // Neither machine may change the network's config.
    denied(
        "rewrite the network's config",
        m2.put(&keys.network_config(), "{}", 0).await,
    );
    let other = network::NetworkConfig::new("10.99.0.0/16".parse().unwrap());
    match network::init(&m2, &keys, &other).await {
        Err(NetworkError::Etcd(e)) if e.is_permission_denied() => {}
        other => panic!("a machine wrote the network's config: {other:?}"),
    }
    // Each writes its own service registrations, reads everyone's, writes no one else's.
    m2.put(&keys.service("m2", "web"), "{}", 0).await.unwrap();
    denied(
        "register a service as another machine",
        m2.put(&keys.service("m1", "web"), "{}", 0).await,
    );
    denied(
        "delete another machine's registrations",
        m2.delete(&keys.machine_services("m1"), true).await,
    );
    let seen = m1.range(&keys.services(), true).await.unwrap();
    assert_eq!(seen.kvs.len(), 1);
    let (ok, out, err) = cli(&op, &["network", "status"]);
    assert!(
        ok && out.contains("m1") && out.contains("yes"),
        "{out}{err}"
    );
}
