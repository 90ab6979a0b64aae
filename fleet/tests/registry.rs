//! Registry pulls against a real registry (Debian's `docker-registry`, distribution 2.8) started
//! by the test on loopback, images pushed with Debian's `skopeo`, into a real containerd.
//!
//! Needs root, `containerd`, `runc`, `busybox-static`, `docker-registry` and `skopeo` (ci/deps
//! installs them); without them the test says why and passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The test's registry (fleet/tests/common/registry.rs).
#[path = "common/registry.rs"]
mod registry;
/// The test's containerd and images (fleet/tests/common/containerd.rs).
#[path = "common/containerd.rs"]
mod testbed;

use base64::Engine;
use caisson_fleet::agent::{reconcile, ContainerState, Runtime};
use caisson_fleet::containerd::Containerd;
use caisson_fleet::distribution::{HostSettings, Registries};
use caisson_fleet::etcd::Credentials;
use caisson_fleet::unit::UnitSpec;
use registry::{push, Registry};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testbed::{busybox_layer_with, digest, missing, oci_archive, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn skip() -> bool {
    let why = missing().or_else(registry::missing);
    if let Some(why) = &why {
        eprintln!("skipping: {why}");
    }
    why.is_some()
}

/// The largest blob in a registry's storage (the layer, which skopeo compressed on the way):
/// its digest and its file.
fn largest_blob(storage: &Path) -> (String, PathBuf) {
    let blobs = storage.join("docker/registry/v2/blobs/sha256");
    let mut best: Option<(u64, String, PathBuf)> = None;
    for prefix in std::fs::read_dir(&blobs).unwrap() {
        for dir in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let dir = dir.unwrap().path();
            let data = dir.join("data");
            let size = std::fs::metadata(&data).unwrap().len();
            if best.as_ref().is_none_or(|b| size > b.0) {
                let hex = dir.file_name().unwrap().to_string_lossy().to_string();
                best = Some((size, format!("sha256:{hex}"), data));
            }
        }
    }
    let (_, digest, data) = best.unwrap();
    (digest, data)
}

/// An image whose /etc/version holds `version`, with sh and sleep.
fn image(dir: &Path, version: &str) -> PathBuf {
    let layer = busybox_layer_with(&["sh", "sleep"], &[("etc/version", version.as_bytes())]);
    let d = digest(&layer);
    let path = dir.join(format!("image-{version}.tar"));
    oci_archive(&path, &[layer], &[d]);
    path
}

fn insecure(host: &str, credentials: Option<Credentials>) -> Arc<Registries> {
    let mut r = Registries::default();
    r.hosts.insert(
        host.to_string(),
        HostSettings {
            insecure: true,
            credentials,
            ..Default::default()
        },
    );
    Arc::new(r)
}

/// A unit that prints its image's version and stays up.
fn unit(name: &str, reference: &str) -> UnitSpec {
    UnitSpec::parse(
        name,
        &format!(
            "command = [\"/bin/sh\", \"-c\", \"read v < /etc/version; echo version $v; exec sleep 600\"]\n\
             [image]\nref = \"{reference}\""
        ),
    )
    .unwrap()
}

/// Reconciles until `done` says so (or fails after a minute, showing the statuses).
async fn reconcile_until(
    rt: &Containerd,
    desired: &BTreeMap<String, UnitSpec>,
    done: impl Fn(&Containerd) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = reconcile(rt, desired).await.unwrap();
        if done(rt) {
            return;
        }
        assert!(Instant::now() < deadline, "statuses: {st:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn logged(rt: &Containerd, unit: &str, text: &str) -> bool {
    rt.tail(unit, 20).unwrap().iter().any(|l| l.contains(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_once_follows_a_moving_tag_and_runs_offline() {
    if skip() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    let registry = Registry::start(&storage, "");
    let reference = format!("{}/team/app:stable", registry.host());
    push(&image(work.path(), "one"), &reference);

    let daemon = Daemon::start();
    let mut rt = daemon.runtime("registry");
    rt.registries = insecure(&registry.host(), None);
    rt.image_poll = Duration::from_secs(1);
    // Two units, one image: pulled once.
    let desired: BTreeMap<String, UnitSpec> = ["a", "b"]
        .iter()
        .map(|n| (n.to_string(), unit(n, &reference)))
        .collect();
    reconcile_until(&rt, &desired, |rt| {
        logged(rt, "a", "version one") && logged(rt, "b", "version one")
    })
    .await;
    assert_eq!(
        registry.blob_gets(),
        2,
        "the layer and the config, once each: {}",
        registry.log()
    );
    // An agent that starts afresh finds every blob in containerd: only the manifest is asked.
    let mut fresh = daemon.runtime("registry");
    fresh.registries = rt.registries.clone();
    fresh.pull(&reference).await.unwrap();
    assert_eq!(registry.blob_gets(), 2, "{}", registry.log());
    let first = rt.pin(&desired["a"]);

    // The tag moves: the new image is pulled and both units restart on it.
    push(&image(work.path(), "two"), &reference);
    reconcile_until(&rt, &desired, |rt| {
        logged(rt, "a", "version two") && logged(rt, "b", "version two")
    })
    .await;
    assert_ne!(rt.pin(&desired["a"]), first, "pinned to the new digest");
    for c in rt.list().await.unwrap() {
        assert_eq!(c.state, ContainerState::Running, "{c:?}");
    }

    // The agent restarts while the registry is down: it runs what it pulled before.
    drop(registry);
    rt.remove("a").await.unwrap();
    let mut again = daemon.runtime("registry");
    again.registries = rt.registries.clone();
    let one: BTreeMap<String, UnitSpec> = [("a".to_string(), desired["a"].clone())].into();
    reconcile_until(&again, &one, |rt| logged(rt, "a", "version two")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_does_not_match_its_digest_is_refused() {
    if skip() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    let registry = Registry::start(&storage, "");
    let reference = format!("{}/team/bad:1", registry.host());
    let archive = image(work.path(), "bad");
    push(&archive, &reference);
    // Flip one byte of the layer in the registry's storage: same size, another digest.
    let (layer, data) = largest_blob(&storage);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let daemon = Daemon::start();
    let mut rt = daemon.runtime("registry");
    rt.registries = insecure(&registry.host(), None);
    let e = rt.pull(&reference).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("blob {layer} refused")),
        "the error names the blob: {e}"
    );
    // Nothing runs, and the agent reports why.
    let desired: BTreeMap<String, UnitSpec> = [("bad".to_string(), unit("bad", &reference))].into();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = reconcile(&rt, &desired).await.unwrap();
        if let Some(err) = &st["bad"].error {
            assert!(err.contains("refused"), "{err}");
            break;
        }
        assert!(Instant::now() < deadline, "{st:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(rt.list().await.unwrap().is_empty());
    assert!(rt.local_image(&reference).await.unwrap().is_none());
}

/// A token server for the registry: grants pulls to `user:password` (basic auth), signing
/// ES256 tokens whose certificate (in the `x5c` header) is the registry's trusted root.
struct TokenServer {
    port: u16,
    cert_pem: String,
}

async fn token_server(user: &'static str, password: &'static str) -> TokenServer {
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["caisson-token".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let x5c = base64::engine::general_purpose::STANDARD.encode(cert.der());
    let rng = ring::rand::SystemRandom::new();
    let signer = Arc::new(
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key.serialize_der(), &rng)
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let want = format!(
        "authorization: basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
    .to_ascii_lowercase();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (signer, x5c, want) = (signer.clone(), x5c.clone(), want.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut b = [0u8; 2048];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                if !req.contains(&want) {
                    let _ = s
                        .write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                }
                let scope = req
                    .split(['?', '&', ' '])
                    .find_map(|p| p.strip_prefix("scope="))
                    .unwrap_or("")
                    .replace("%3a", ":")
                    .replace("%2f", "/");
                let repo = scope.split(':').nth(1).unwrap_or("").to_string();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
                let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
                let claims = serde_json::json!({
                    "iss": "caisson-test-issuer", "sub": "puller", "aud": "caisson-test",
                    "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{repo}"),
                    "access": [{"type": "repository", "name": repo, "actions": ["pull"]}],
                });
                let signing_input = format!(
                    "{}.{}",
                    b64(header.to_string().as_bytes()),
                    b64(claims.to_string().as_bytes())
                );
                let rng = ring::rand::SystemRandom::new();
                let sig = signer.sign(&rng, signing_input.as_bytes()).unwrap();
                let token = format!("{signing_input}.{}", b64(sig.as_ref()));
                let body = serde_json::json!({"token": token, "expires_in": 300}).to_string();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    TokenServer {
        port,
        cert_pem: cert.pem(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_needs_a_token() {
    if skip() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    // Pushed through an open registry on the same storage; pulled from the guarded one.
    let open = Registry::start(&storage, "");
    push(
        &image(work.path(), "guarded"),
        &format!("{}/team/app:1", open.host()),
    );
    drop(open);
    let tokens = token_server("puller", "s3cret").await;
    let bundle = work.path().join("token.crt");
    std::fs::write(&bundle, &tokens.cert_pem).unwrap();
    let registry = Registry::start(
        &storage,
        &format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: caisson-test\n    \
             issuer: caisson-test-issuer\n    rootcertbundle: {}\n",
            tokens.port,
            bundle.display()
        ),
    );
    let reference = format!("{}/team/app:1", registry.host());
    let daemon = Daemon::start();
    let creds = |password: &str| {
        Some(Credentials {
            user: "puller".into(),
            password: password.into(),
        })
    };
    let mut rt = daemon.runtime("registry");
    rt.registries = insecure(&registry.host(), None);
    let e = rt.pull(&reference).await.unwrap_err().to_string();
    assert!(e.contains("anonymous"), "{e}");
    rt.registries = insecure(&registry.host(), creds("wrong"));
    let e = rt.pull(&reference).await.unwrap_err().to_string();
    assert!(
        e.contains("refused the credentials") && !e.contains("wrong"),
        "{e}"
    );
    rt.registries = insecure(&registry.host(), creds("s3cret"));
    let pulled = rt.pull(&reference).await.unwrap_or_else(|e| {
        panic!("{e}\nregistry log:\n{}", registry.log());
    });
    assert!(pulled.ref_digest.starts_with("sha256:"));
    let desired: BTreeMap<String, UnitSpec> = [("g".to_string(), unit("g", &reference))].into();
    reconcile_until(&rt, &desired, |rt| logged(rt, "g", "version guarded")).await;
    // Its shim would outlive the test's containerd.
    rt.remove("g").await.unwrap();
}

/// A loopback proxy to `upstream` that cuts, once, the connection of a blob's GET whose answer
/// passes `after` bytes; the requests it saw are kept (lower-cased).
async fn cutting_proxy(upstream: u16, after: usize) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let cut_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                .await
                .unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (log, armed2) = (log.clone(), armed.clone());
            let cut_done = cut_done.clone();
            tokio::spawn(async move {
                let mut b = vec![0u8; 16384];
                while let Ok(n) = cr.read(&mut b).await {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&b[..n]).to_ascii_lowercase();
                    if text.starts_with("get ") {
                        log.lock().unwrap().push(text.clone());
                        armed2.store(
                            text.contains("/blobs/"),
                            std::sync::atomic::Ordering::SeqCst,
                        );
                    }
                    if sw.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let mut b = vec![0u8; 16384];
                let mut sent = 0;
                while let Ok(n) = sr.read(&mut b).await {
                    if n == 0 {
                        break;
                    }
                    if armed.load(std::sync::atomic::Ordering::SeqCst)
                        && !cut_done.load(std::sync::atomic::Ordering::SeqCst)
                    {
                        if sent + n > after {
                            cut_done.store(true, std::sync::atomic::Ordering::SeqCst);
                            let _ = cw.write_all(&b[..after - sent]).await;
                            return; // both halves dropped: the connection is cut
                        }
                        sent += n;
                    }
                    if cw.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resumes_where_it_broke() {
    if skip() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    let registry = Registry::start(&storage, "");
    push(
        &image(work.path(), "resumed"),
        &format!("{}/team/app:1", registry.host()),
    );
    let (layer, data) = largest_blob(&storage);
    let size = std::fs::metadata(data).unwrap().len();
    let (port, seen) = cutting_proxy(registry.port, 300_000).await;
    let host = format!("127.0.0.1:{port}");
    let daemon = Daemon::start();
    let mut rt = daemon.runtime("registry");
    rt.registries = insecure(&host, None);
    rt.pull(&format!("{host}/team/app:1"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{:?}", seen.lock().unwrap()));
    let seen = seen.lock().unwrap().clone();
    let gets: Vec<&String> = seen.iter().filter(|r| r.contains(&layer)).collect();
    assert_eq!(gets.len(), 2, "cut once, resumed once: {gets:?}");
    let range = gets[1]
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes="))
        .unwrap_or_else(|| panic!("the second GET asks for a range: {}", gets[1]));
    let from: u64 = range.trim_end_matches('-').trim().parse().unwrap();
    assert!(
        from > 0 && from < size,
        "resumed from byte {from} of {size}"
    );
}

/// The bytes of the files under `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_images_are_collected_and_the_space_comes_back() {
    if skip() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start(&work.path().join("storage"), "");
    let (one, two) = (
        format!("{}/team/app:one", registry.host()),
        format!("{}/team/app:two", registry.host()),
    );
    push(&image(work.path(), "one"), &one);
    push(&image(work.path(), "two"), &two);
    let daemon = Daemon::start();
    let mut rt = daemon.runtime("gc");
    rt.registries = insecure(&registry.host(), None);
    let root = daemon.dir.path().join("root");
    let mut desired: BTreeMap<String, UnitSpec> = [("u".to_string(), unit("u", &one))].into();
    reconcile_until(&rt, &desired, |rt| logged(rt, "u", "version one")).await;
    let old_layer = rt
        .local_image(&one)
        .await
        .unwrap()
        .unwrap()
        .image
        .chosen
        .manifest
        .layers[0]
        .digest
        .clone();
    desired.insert("u".into(), unit("u", &two));
    reconcile_until(&rt, &desired, |rt| logged(rt, "u", "version two")).await;
    let before = du(&root);

    // The one unused image is among the last few kept.
    let kept = rt.collect_garbage(&desired, 1).await.unwrap();
    assert!(kept.images.is_empty(), "{kept:?}");
    assert!(rt.local_image(&one).await.unwrap().is_some());

    let gone = rt.collect_garbage(&desired, 0).await.unwrap();
    assert_eq!(gone.images, std::slice::from_ref(&one));
    assert!(rt.local_image(&one).await.unwrap().is_none());
    let blob = root.join(format!(
        "io.containerd.content.v1.content/blobs/sha256/{}",
        &old_layer[7..]
    ));
    assert!(
        !blob.exists(),
        "the old layer's blob is gone: {}",
        blob.display()
    );
    let after = du(&root);
    let busybox = std::fs::metadata(testbed::BUSYBOX).unwrap().len();
    assert!(
        after + busybox < before,
        "at least the unpacked busybox of the old image came back: {before} -> {after}"
    );
    // The image in use stays, and the unit runs on.
    assert!(rt.local_image(&two).await.unwrap().is_some());
    assert_eq!(rt.list().await.unwrap()[0].state, ContainerState::Running);
    // Its shim would outlive the test's containerd.
    rt.remove("u").await.unwrap();
}
