//! The client against small loopback servers that misbehave on purpose (the real registry's
//! behaviour is tested in fleet/tests/registry.rs).

use super::*;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a fake server answers: status line + headers, and a body.
type Answer = (String, Vec<u8>);

/// A loopback HTTP server answering each request (its request line and headers, lower-cased)
/// with `f`;
/// the requests it saw are kept.
async fn serve(
    f: impl Fn(&str) -> Answer + Send + Sync + 'static,
) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (f, log) = (Arc::new(f), seen.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (f, log) = (f.clone(), log.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut b = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    if buf.first() == Some(&0x16) {
                        return; // a TLS hello: hang up at once
                    }
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                log.lock().unwrap().push(req.clone());
                let (head, body) = f(&req);
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(b"\r\n").await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    (host, seen)
}

fn ok(media_type: &str, body: &[u8]) -> Answer {
    (
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {media_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        ),
        body.to_vec(),
    )
}

fn insecure(host: &str, credentials: Option<Credentials>) -> Registries {
    let mut r = Registries::default();
    r.hosts.insert(
        host.to_string(),
        HostSettings {
            insecure: true,
            credentials,
            ..Default::default()
        },
    );
    r
}

fn repo(r: &Registries, reference: &str) -> Repository {
    r.repository(&parse_reference(reference).unwrap()).unwrap()
}

#[test]
fn references_and_digests() {
    let r = parse_reference("registry.local:5000/team/web:1.2").unwrap();
    assert_eq!(
        (r.registry(), r.repository(), r.tag()),
        ("registry.local:5000", "team/web", Some("1.2"))
    );
    let d = format!("sha256:{}", "a".repeat(64));
    let r = parse_reference(&format!("registry.local/web@{d}")).unwrap();
    assert_eq!(r.digest(), Some(d.as_str()));
    assert!(valid_digest(&d));
    assert!(!valid_digest(&format!("sha256:{}", "A".repeat(64))));
    assert!(!valid_digest("sha256:../../etc"));
    let e = parse_reference("Registry.local/UPPER:1").unwrap_err();
    assert!(e.to_string().contains("UPPER"), "{e}");
}

#[tokio::test]
async fn a_manifest_is_capped_and_checked_against_its_digest() {
    let manifest = br#"{"schemaVersion":2}"#.to_vec();
    let m = manifest.clone();
    let (host, _) = serve(move |req| {
        if req.contains("/manifests/big") {
            // No length announced: the cap is enforced while reading.
            let body = vec![b' '; MANIFEST_MAX as usize + 10];
            ("HTTP/1.1 200 OK\r\nConnection: close\r\n".into(), body)
        } else {
            ok(MANIFEST_TYPES[0], &m)
        }
    })
    .await;
    let r = insecure(&host, None);
    let repo = repo(&r, &format!("{host}/web:1"));
    let got = repo.manifest("1").await.unwrap();
    assert_eq!(got.digest, sha256_digest(&manifest));
    assert_eq!(got.media_type, MANIFEST_TYPES[0]);
    let e = repo.manifest("big").await.unwrap_err().to_string();
    assert!(e.contains("larger than 4194304 bytes"), "{e}");
    let other = format!("sha256:{}", "0".repeat(64));
    let e = repo.manifest(&other).await.unwrap_err().to_string();
    assert!(e.contains("refused") && e.contains(&other), "{e}");
}

#[tokio::test]
async fn basic_and_bearer_challenges() {
    let token_server = serve(|req| {
        if req.contains("authorization: basic dtpwdw==")
            && req.contains("scope=repository%3aweb%3apull")
        {
            ok("application/json", br#"{"token":"t0k"}"#)
        } else {
            (
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n".into(),
                vec![],
            )
        }
    })
    .await
    .0;
    let realm = format!("http://{token_server}/token");
    let (host, seen) = serve(move |req| {
        if req.contains("authorization: bearer t0k") {
            ok(MANIFEST_TYPES[0], b"{}")
        } else {
            (
                format!(
                    "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",service=\"reg\"\r\nContent-Length: 0\r\n"
                ),
                vec![],
            )
        }
    })
    .await;
    let creds = |pw: &str| {
        Some(Credentials {
            user: "u".into(),
            password: pw.into(),
        })
    };
    let good = insecure(&host, creds("pw"));
    repo(&good, &format!("{host}/web:1"))
        .manifest("1")
        .await
        .unwrap();
    assert_eq!(seen.lock().unwrap().len(), 2, "one challenge, one retry");
    let e = repo(&insecure(&host, creds("wrong")), &format!("{host}/web:1"))
        .manifest("1")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("refused the credentials") && !e.contains("wrong"),
        "{e}"
    );
    let e = repo(&insecure(&host, None), &format!("{host}/web:1"))
        .manifest("1")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("anonymous"), "{e}");

    let (basic_host, _) = serve(|req| {
        if req.contains("authorization: basic dtpwdw==") {
            ok(MANIFEST_TYPES[0], b"{}")
        } else {
            (
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"r\"\r\nContent-Length: 0\r\n".into(),
                vec![],
            )
        }
    })
    .await;
    repo(
        &insecure(&basic_host, creds("pw")),
        &format!("{basic_host}/web:1"),
    )
    .manifest("1")
    .await
    .unwrap();
    let e = repo(&insecure(&basic_host, None), &format!("{basic_host}/web:1"))
        .manifest("1")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("[registries.\"{basic_host}\"]")),
        "the message says where credentials go: {e}"
    );
}

#[tokio::test]
async fn mirrors_come_first_and_a_dead_one_is_skipped() {
    let (mirror, mirror_seen) = serve(|_| ok(MANIFEST_TYPES[0], b"{\"m\":1}")).await;
    let (origin, origin_seen) = serve(|_| ok(MANIFEST_TYPES[0], b"{\"o\":1}")).await;
    // A port nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let mut r = insecure(&origin, None);
    for h in [&mirror, &dead] {
        r.hosts.insert(
            h.clone(),
            HostSettings {
                insecure: true,
                ..Default::default()
            },
        );
    }
    r.hosts.get_mut(&origin).unwrap().mirrors = vec![dead.clone(), mirror.clone()];
    let got = repo(&r, &format!("{origin}/web:1"))
        .manifest("1")
        .await
        .unwrap();
    assert_eq!(got.bytes, b"{\"m\":1}");
    assert_eq!(mirror_seen.lock().unwrap().len(), 1);
    assert!(origin_seen.lock().unwrap().is_empty());
    // A registry that is not insecure is reached over HTTPS only: this plain server fails.
    let mut secure = Registries::default();
    secure.hosts.insert(origin.clone(), HostSettings::default());
    let e = repo(&secure, &format!("{origin}/web:1"))
        .manifest("1")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("https://{origin}")), "{e}");
}

#[tokio::test]
async fn a_blob_resumes_with_a_range() {
    let (host, seen) = serve(|req| {
        if req.contains("range: bytes=5-") {
            (
                "HTTP/1.1 206 Partial Content\r\nContent-Length: 3\r\nConnection: close\r\n".into(),
                b"xyz".to_vec(),
            )
        } else {
            ok("application/octet-stream", b"abcdexyz")
        }
    })
    .await;
    let r = insecure(&host, None);
    let repo = repo(&r, &format!("{host}/web:1"));
    let d = sha256_digest(b"abcdexyz");
    let (resp, start) = repo.blob(&d, 5).await.unwrap();
    assert_eq!(start, 5);
    assert_eq!(&resp.bytes().await.unwrap()[..], b"xyz");
    let (_, start) = repo.blob(&d, 0).await.unwrap();
    assert_eq!(start, 0);
    assert!(seen.lock().unwrap()[0].contains("/v2/web/blobs/sha256:"));
    // small_blob checks the digest.
    assert_eq!(repo.small_blob(&d, 100).await.unwrap(), b"abcdexyz");
    let e = repo.small_blob(&d, 4).await.unwrap_err().to_string();
    assert!(e.contains("larger than 4"), "{e}");
}
