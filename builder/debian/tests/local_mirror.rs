//! A tiny signed Debian archive served over HTTP on 127.0.0.1: resolve, fetch, verify, and
//! work offline from the cache. Needs dpkg-deb, gpg and gpgv (all on the build hosts).

#![allow(clippy::unwrap_used)] // a test file: a panic is a failed test

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use caisson_debian::{
    extract, fetch, resolve, resolve_with_keyring, Archive, Cache, DebianError, Lock,
};
use sha2::{Digest, Sha256};

/// A static file server on 127.0.0.1 that can answer 503 a given number of times first.
struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(root: PathBuf, fail_first: usize) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let (stop2, served2) = (stop.clone(), served.clone());
        let thread = std::thread::spawn(move || {
            let failures = AtomicUsize::new(fail_first);
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let fail = failures
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                serve(&root, conn, fail);
                served2.fetch_add(1, Ordering::SeqCst);
            }
        });
        Server {
            port,
            stop,
            served,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/debian", self.port)
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(root: &Path, conn: TcpStream, fail: bool) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let file = path.strip_prefix("/debian/").map(|p| root.join(p));
    let body = file
        .filter(|_| !path.contains(".."))
        .and_then(|f| std::fs::read(f).ok());
    let mut conn = conn;
    let (status, body) = match (fail, body) {
        (true, _) => ("503 Service Unavailable", b"busy".to_vec()),
        (false, Some(b)) => ("200 OK", b),
        (false, None) => ("404 Not Found", b"no".to_vec()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(&body);
}

/// A throwaway OpenPGP key in its own GNUPGHOME; the agent is stopped on drop.
struct Signer {
    home: tempfile::TempDir,
    keyring: PathBuf,
}

impl Signer {
    fn new() -> Signer {
        let home = tempfile::Builder::new()
            .prefix("gpg")
            .tempdir_in("/tmp")
            .unwrap();
        let signer = Signer {
            keyring: home.path().join("archive.gpg"),
            home,
        };
        signer.gpg(&[
            "--passphrase",
            "",
            "--quick-gen-key",
            "Caisson Test Archive <archive@caisson.invalid>",
            "ed25519",
            "sign",
            "never",
        ]);
        let key = signer.gpg(&["--export"]);
        std::fs::write(&signer.keyring, key).unwrap();
        signer
    }

    fn gpg(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("gpg")
            .env("GNUPGHOME", self.home.path())
            .args(["--batch", "--pinentry-mode", "loopback"])
            .args(args)
            .output()
            .expect("gpg is installed");
        assert!(
            out.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn clearsign(&self, text: &str, out: &Path) {
        let input = out.with_extension("unsigned");
        std::fs::write(&input, text).unwrap();
        let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
        self.gpg(&["--passphrase", "", "--yes", "--clearsign", "--output", o, i]);
        std::fs::remove_file(input).unwrap();
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", self.home.path())
            .args(["--kill", "gpg-agent"])
            .status();
    }
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// (name, version, depends, a file it installs)
type Pkg<'a> = (&'a str, &'a str, &'a str, &'a str);

const PKGS: &[Pkg] = &[
    (
        "app",
        "1.0-1",
        "libthing (>= 2~), tool-a | tool-b",
        "bin/app",
    ),
    ("libthing", "2.1-3", "", "lib/libthing.so.2"),
    ("tool-b", "0.5", "", "usr/bin/tool-b"),
    ("unrelated", "9", "libthing", "usr/share/unrelated"),
];

/// Builds the debs with dpkg-deb and writes pool/, Packages, Packages.xz and a signed
/// InRelease under `root` (the mirror's /debian).
fn make_archive(root: &Path, signer: &Signer) {
    let mut packages = String::new();
    for (name, version, depends, file) in PKGS {
        let src = root.join("src").join(name);
        std::fs::create_dir_all(src.join("DEBIAN")).unwrap();
        let installed = src.join(file);
        std::fs::create_dir_all(installed.parent().unwrap()).unwrap();
        std::fs::write(&installed, format!("{name} {version}\n")).unwrap();
        let mut control = format!(
            "Package: {name}\nVersion: {version}\nArchitecture: amd64\n\
             Maintainer: Test <t@caisson.invalid>\nDescription: test package\n"
        );
        if !depends.is_empty() {
            control.push_str(&format!("Depends: {depends}\n"));
        }
        std::fs::write(src.join("DEBIAN/control"), &control).unwrap();
        let rel = format!("pool/main/{}/{name}/{name}_{version}_amd64.deb", &name[..1]);
        let deb = root.join(&rel);
        std::fs::create_dir_all(deb.parent().unwrap()).unwrap();
        let ok = Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&src)
            .arg(&deb)
            .output()
            .expect("dpkg-deb is installed")
            .status
            .success();
        assert!(ok, "dpkg-deb --build {name}");
        let data = std::fs::read(&deb).unwrap();
        packages.push_str(&control);
        packages.push_str(&format!(
            "Filename: {rel}\nSize: {}\nSHA256: {}\n\n",
            data.len(),
            sha256(&data)
        ));
    }
    let index_dir = root.join("dists/bookworm/main/binary-amd64");
    std::fs::create_dir_all(&index_dir).unwrap();
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(packages.as_bytes()).unwrap();
    let packages_xz = xz.finish().unwrap();
    std::fs::write(index_dir.join("Packages"), &packages).unwrap();
    std::fs::write(index_dir.join("Packages.xz"), &packages_xz).unwrap();
    let release = format!(
        "Origin: Caisson Test\nSuite: stable\nCodename: bookworm\nArchitectures: amd64\n\
         Components: main\nSHA256:\n {} {} main/binary-amd64/Packages\n {} {} main/binary-amd64/Packages.xz\n",
        sha256(packages.as_bytes()),
        packages.len(),
        sha256(&packages_xz),
        packages_xz.len()
    );
    signer.clearsign(&release, &root.join("dists/bookworm/InRelease"));
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    cache: Cache,
    signer: Signer,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("mirror");
        let signer = Signer::new();
        make_archive(&root, &signer);
        Fixture {
            cache: Cache::new(tmp.path().join("cache")),
            root,
            signer,
            _tmp: tmp,
        }
    }

    fn resolve(&self, server: &Server, names: &[&str]) -> Result<Lock, DebianError> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let archive = Archive::bookworm(server.url());
        resolve_with_keyring(&archive, &self.signer.keyring, &self.cache, &names, true)
    }

    fn deb_path(&self, name: &str) -> PathBuf {
        let (_, version, _, _) = PKGS.iter().find(|p| p.0 == name).unwrap();
        self.root.join(format!(
            "pool/main/{}/{name}/{name}_{version}_amd64.deb",
            &name[..1]
        ))
    }
}

#[test]
fn resolve_fetch_extract_then_offline() {
    let fx = Fixture::new();
    let mut server = Server::start(fx.root.clone(), 0);
    let lock = fx.resolve(&server, &["app"]).unwrap();
    let names: Vec<(&str, &str)> = lock
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    assert_eq!(
        names,
        [("app", "1.0-1"), ("libthing", "2.1-3"), ("tool-b", "0.5")]
    );
    assert_eq!(lock.inputs, ["app"]);
    assert_eq!(
        lock.packages[0].filename,
        "pool/main/a/app/app_1.0-1_amd64.deb"
    );

    let archive = Archive::bookworm(server.url());
    let debs = fetch(&archive, &fx.cache, &lock, true).unwrap();
    assert_eq!(debs.len(), 3);
    for (deb, p) in debs.iter().zip(&lock.packages) {
        assert_eq!(*deb, fx.cache.path(&p.sha256));
        assert_eq!(sha256(&std::fs::read(deb).unwrap()), p.sha256);
    }
    let dest = fx._tmp.path().join("root");
    let files = extract(&debs[0], &dest).unwrap();
    assert_eq!(
        std::fs::read_to_string(dest.join("usr/bin/app")).unwrap(),
        "app 1.0-1\n"
    );
    assert!(files
        .iter()
        .any(|f| f.path == Path::new("usr/bin/app") && f.sha256.is_some()));

    // The lock survives a round trip, and with the server gone the cache is enough.
    let lock_path = fx._tmp.path().join("test.lock");
    lock.save(&lock_path).unwrap();
    let lock = Lock::load(&lock_path).unwrap();
    let served = server.served.load(Ordering::SeqCst);
    server.stop();
    let again = fetch(&archive, &fx.cache, &lock, false).unwrap();
    assert_eq!(again, debs);
    assert_eq!(server.served.load(Ordering::SeqCst), served);
    // Resolving does need the server, and says which URL failed.
    let err = fx.resolve(&server, &["app"]).unwrap_err().to_string();
    assert!(err.contains("InRelease"), "{err}");
}

#[test]
fn transient_failures_are_retried() {
    let fx = Fixture::new();
    let server = Server::start(fx.root.clone(), 2);
    let lock = fx.resolve(&server, &["unrelated"]).unwrap();
    assert_eq!(lock.packages.len(), 2);
}

#[test]
fn missing_and_unsatisfiable_are_named() {
    let fx = Fixture::new();
    let server = Server::start(fx.root.clone(), 0);
    let err = fx.resolve(&server, &["app", "nosuch"]).unwrap_err();
    assert!(
        matches!(&err, DebianError::MissingPackage { name, .. } if name == "nosuch"),
        "{err}"
    );
}

#[test]
fn corrupt_deb_is_refused_and_not_cached() {
    let fx = Fixture::new();
    let server = Server::start(fx.root.clone(), 0);
    let lock = fx.resolve(&server, &["app"]).unwrap();
    let deb = fx.deb_path("libthing");
    let mut data = std::fs::read(&deb).unwrap();
    let last = data.len() - 10;
    data[last] ^= 0x01;
    std::fs::write(&deb, data).unwrap();

    let archive = Archive::bookworm(server.url());
    let err = fetch(&archive, &fx.cache, &lock, false).unwrap_err();
    assert!(matches!(err, DebianError::HashMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("libthing_2.1-3_amd64.deb"),
        "{err}"
    );
    let libthing = lock.packages.iter().find(|p| p.name == "libthing").unwrap();
    assert!(!fx.cache.path(&libthing.sha256).exists());
    let tmp = fx.cache.root().join("tmp");
    assert_eq!(
        std::fs::read_dir(tmp).unwrap().count(),
        0,
        "no partial download left"
    );
}

#[test]
fn tampered_or_foreign_inrelease_is_refused() {
    let fx = Fixture::new();
    let server = Server::start(fx.root.clone(), 0);
    let inrelease = fx.root.join("dists/bookworm/InRelease");
    let signed = std::fs::read_to_string(&inrelease).unwrap();

    // Signed by a key the Debian keyring does not have.
    let names = vec!["app".to_string()];
    let err = resolve(&Archive::bookworm(server.url()), &fx.cache, &names, false).unwrap_err();
    assert!(matches!(err, DebianError::BadSignature { .. }), "{err}");

    // One changed character in the signed text.
    std::fs::write(
        &inrelease,
        signed.replacen("Codename: bookworm", "Codename: bookwork", 1),
    )
    .unwrap();
    let err = fx.resolve(&server, &["app"]).unwrap_err();
    assert!(matches!(err, DebianError::BadSignature { .. }), "{err}");

    // Text outside the signature is ignored: only what gpgv verified is read.
    let prefixed = format!("SHA256:\n 00 1 main/binary-amd64/Packages.xz\n\n{signed}");
    std::fs::write(&inrelease, prefixed).unwrap();
    match fx.resolve(&server, &["app"]) {
        Ok(lock) => assert_eq!(lock.packages.len(), 3),
        Err(e) => assert!(matches!(e, DebianError::BadSignature { .. }), "{e}"),
    }

    // Not signed at all.
    let release = signed
        .lines()
        .skip(3)
        .take_while(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>();
    std::fs::write(&inrelease, release.join("\n")).unwrap();
    let err = fx.resolve(&server, &["app"]).unwrap_err();
    assert!(matches!(err, DebianError::BadSignature { .. }), "{err}");
}

#[test]
fn packages_index_hash_mismatch_is_refused() {
    let fx = Fixture::new();
    let server = Server::start(fx.root.clone(), 0);
    // Replace Packages.xz after InRelease was signed.
    let index = fx.root.join("dists/bookworm/main/binary-amd64/Packages.xz");
    let mut data = std::fs::read(&index).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x20;
    std::fs::write(&index, data).unwrap();
    let err = fx.resolve(&server, &["app"]).unwrap_err();
    assert!(matches!(err, DebianError::HashMismatch { .. }), "{err}");
    assert!(err.to_string().contains("Packages.xz"), "{err}");
}
