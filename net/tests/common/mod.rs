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
        // NetNs::create made the directory a mount point of its own (shared propagation).
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
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

/// One "host" of a two-host lab: its namespace, its underlay address, its container subnet
/// and one container (namespace and address) on its bridge.
pub struct Host {
    pub ns: NetNs,
    pub underlay: std::net::Ipv4Addr,
    pub subnet: ipnet::Ipv4Net,
    pub container: NetNs,
    pub container_ip: std::net::Ipv4Addr,
}

impl Host {
    /// This host as a peer of the other.
    pub fn peer(&self) -> caisson_net::routes::Peer {
        caisson_net::routes::Peer {
            subnet: self.subnet,
            public_ip: self.underlay,
            vtep_mac: None,
        }
    }
}

/// Turns on forwarding inside `ns` (each namespace has its own `ip_forward`).
pub fn forward(ns: &NetNs) {
    ns.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1"))
        .unwrap()
        .unwrap();
}

/// A veth between two namespaces: `a_if` in `a`, `b_if` in `b`.
pub fn wire(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    use caisson_net::netlink::Netlink;
    use rtnetlink::LinkUnspec;
    use std::os::fd::{AsFd, AsRawFd};
    run_in(
        a,
        &[
            "ip",
            "link",
            "add",
            a_if,
            "type",
            "veth",
            "peer",
            "name",
            "wire-peer",
        ],
    );
    rt().block_on(async {
        let nl = Netlink::in_netns(a).unwrap();
        let fd = b.as_fd().as_raw_fd();
        let msg = LinkUnspec::new_with_name("wire-peer")
            .setns_by_fd(fd)
            .build();
        nl.handle().link().set(msg).execute().await.unwrap();
    });
    run_in(b, &["ip", "link", "set", "wire-peer", "name", b_if]);
    run_in(a, &["ip", "link", "set", a_if, "up"]);
    run_in(b, &["ip", "link", "set", b_if, "up"]);
}

/// How the two hosts' own addresses reach each other.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Underlay {
    /// One L2 segment: 192.168.77.1 and .2 /24 on a veth `under0`.
    Switch,
    /// Two segments and a router namespace between them: 192.168.1.2/24 and 192.168.2.2/24,
    /// each host's default route through the router (.1).
    Router,
}

/// Two hosts joined by a veth `under0` (192.168.77.1 and .2 /24), each with the bridge on
/// 10.42.N.1/24, forwarding on, and one container at 10.42.N.2 attached through the library
/// (its veth with `mtu`).
pub fn two_hosts(lab: &mut Lab, mtu: Option<u32>) -> (Host, Host) {
    hosts(lab, mtu, Underlay::Switch)
}

/// Two hosts as [`two_hosts`] makes them, on the given underlay.
pub fn hosts(lab: &mut Lab, mtu: Option<u32>, underlay: Underlay) -> (Host, Host) {
    use caisson_net::link::{self, Attachment, DEFAULT_BRIDGE};
    use caisson_net::netlink::Netlink;

    let address = |n: u8| match underlay {
        Underlay::Switch => std::net::Ipv4Addr::new(192, 168, 77, n),
        Underlay::Router => std::net::Ipv4Addr::new(192, 168, n, 2),
    };
    let hosts: Vec<Host> = (1..=2u8)
        .map(|n| Host {
            ns: lab.ns(&format!("host{n}")),
            underlay: address(n),
            subnet: format!("10.42.{n}.0/24").parse().unwrap(),
            container: lab.ns(&format!("c{n}")),
            container_ip: std::net::Ipv4Addr::new(10, 42, n, 2),
        })
        .collect();
    match underlay {
        Underlay::Switch => wire(&hosts[0].ns, "under0", &hosts[1].ns, "under0"),
        Underlay::Router => {
            let router = lab.ns("router");
            forward(&router);
            for (n, host) in (1..=2u8).zip(&hosts) {
                let side = format!("r{n}");
                wire(&host.ns, "under0", &router, &side);
                let router_addr = format!("192.168.{n}.1/24");
                run_in(&router, &["ip", "addr", "add", &router_addr, "dev", &side]);
            }
        }
    }
    for host in &hosts {
        let addr = format!("{}/24", host.underlay);
        run_in(&host.ns, &["ip", "addr", "add", &addr, "dev", "under0"]);
        if underlay == Underlay::Router {
            let [a, b, c, _] = host.underlay.octets();
            let via = format!("{a}.{b}.{c}.1");
            run_in(&host.ns, &["ip", "route", "add", "default", "via", &via]);
        }
        forward(&host.ns);
        rt().block_on(async {
            let nl = Netlink::in_netns(&host.ns).unwrap();
            link::ensure_bridge(&nl, DEFAULT_BRIDGE, host.subnet)
                .await
                .unwrap();
            let at = Attachment {
                bridge: DEFAULT_BRIDGE,
                host_if: link::host_ifname("c"),
                netns: &host.container,
                address: ipnet::Ipv4Net::new(host.container_ip, 24).unwrap(),
                gateway: caisson_net::ipam::gateway(host.subnet),
                mtu,
            };
            link::attach(&nl, &at).await.unwrap();
        });
    }
    let mut hosts = hosts.into_iter();
    let (a, b) = (hosts.next().unwrap(), hosts.next().unwrap());
    (a, b)
}

/// `cmd` inside `ns`, parsed as JSON.
pub fn json_in(ns: &NetNs, cmd: &[&str]) -> serde_json::Value {
    let out = run_in(ns, cmd);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{cmd:?} printed no JSON ({e}): {out}"))
}

/// Sends `len` bytes from inside `from` to a listener inside `to` at `at`; returns how many
/// bytes arrived.
pub fn bulk(from: &NetNs, to: &NetNs, at: &str, len: usize) -> usize {
    use std::io::{Read, Write};
    let listener = listen(to, at);
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut got = Vec::new();
        stream.read_to_end(&mut got).ok()?;
        Some(got.len())
    });
    let to: SocketAddr = at.parse().unwrap();
    let mut stream = from
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))
        .unwrap()
        .unwrap_or_else(|e| panic!("connect {at}: {e}"));
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(&vec![0x5a; len])
        .unwrap_or_else(|e| panic!("send to {at}: {e}"));
    drop(stream);
    server.join().unwrap().unwrap_or(0)
}
