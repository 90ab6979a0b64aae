//! What the namespace tests share: a lab of network namespaces of the test's own, removed on
//! drop (also when the test fails), and a clear failure when the test cannot run.
#![allow(dead_code, clippy::unwrap_used)] // test support: a failed step fails the test

use caisson_net::netns::NetNs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Fails the test (never skips it) when it cannot make namespaces.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test builds network namespaces and needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN); \
         run `cargo test -p caisson-net` as root"
    );
}

/// Namespaces of one test, mounted in a temporary directory, deleted on drop.
pub struct Lab {
    dir: tempfile::TempDir,
    made: Vec<PathBuf>,
}

impl Lab {
    pub fn new() -> Lab {
        require_root();
        Lab {
            dir: tempfile::tempdir().unwrap(),
            made: Vec::new(),
        }
    }

    pub fn ns(&mut self, name: &str) -> NetNs {
        let path = self.dir.path().join(name);
        let ns = NetNs::create(&path).unwrap_or_else(|e| panic!("cannot make a namespace: {e}"));
        self.made.push(path);
        ns
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for path in self.made.iter().rev() {
            if let Err(e) = NetNs::delete(path) {
                eprintln!("lab cleanup: {e}");
            }
        }
    }
}

/// Runs a command inside `ns` (an independent view of the kernel's state) and returns stdout.
pub fn run_in(ns: &NetNs, cmd: &[&str]) -> String {
    let out = ns
        .run(|| Command::new(cmd[0]).args(&cmd[1..]).output())
        .unwrap()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is iproute2 / nftables installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP listener inside `ns` on `addr`.
pub fn listen(ns: &NetNs, addr: &str) -> TcpListener {
    ns.run(|| TcpListener::bind(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

/// Connects from inside `ns` to `to`, sends a line, and returns the line the other side
/// answers with (`serve_once` answers with the peer address it saw).
pub fn connect(ns: &NetNs, to: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let to: SocketAddr = to.parse().unwrap();
    let mut stream = ns
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))
        .unwrap()?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(b"hello\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Accepts one connection on `listener` in a thread and answers with the peer address it saw.
pub fn serve_once(listener: TcpListener) -> std::thread::JoinHandle<Option<SocketAddr>> {
    use std::io::{BufRead, BufReader, Write};
    std::thread::spawn(move || {
        listener.set_nonblocking(false).ok()?;
        let (mut stream, peer) = listener.accept().ok()?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).ok()?;
        stream.write_all(peer.ip().to_string().as_bytes()).ok()?;
        Some(peer)
    })
}

/// A current-thread tokio runtime for one test.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
