//! What the DNS tests share: a responder on its own runtime, `dig` and its output, a
//! `dnsmasq` upstream.

// Each test binary uses a part of it.
#![allow(dead_code)]

use caisson_net::dns::{Config, Responder};
use caisson_net::endpoint::{Endpoints, Instance, Port, Proto};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// A responder running on its own runtime on an ephemeral loopback port.
pub struct Dns {
    pub addr: SocketAddr,
    pub endpoints: watch::Sender<Endpoints>,
    _runtime: Runtime,
}

pub fn start(endpoints: Endpoints, config: Config) -> Dns {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = watch::channel(endpoints);
    let responder = runtime
        .block_on(Responder::bind("127.0.0.1:0".parse().unwrap(), config, rx))
        .unwrap();
    let addr = responder.local_addr();
    runtime.spawn(async move {
        if let Err(e) = responder.run().await {
            panic!("the responder stopped: {e}");
        }
    });
    Dns {
        addr,
        endpoints: tx,
        _runtime: runtime,
    }
}

pub fn instance(id: &str, address: Ipv4Addr) -> Instance {
    Instance {
        id: id.into(),
        address,
        ports: vec![Port {
            name: Some("http".into()),
            port: 8080,
            proto: Proto::Tcp,
        }],
        machine: id.into(),
        revision: 1,
    }
}

/// `web` on two machines.
pub fn two_webs() -> Endpoints {
    let mut e = Endpoints::default();
    e.insert("web", instance("m1", Ipv4Addr::new(10, 42, 1, 2)));
    e.insert("web", instance("m2", Ipv4Addr::new(10, 42, 2, 2)));
    e
}

/// Runs a host tool, failing the test with the Debian package to install when it is missing.
pub fn run(tool: &str, package: &str, args: &[String]) -> String {
    let out = match Command::new(tool).args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            panic!("{tool} is not installed: install Debian's {package} (ci/deps does)")
        }
        Err(e) => panic!("cannot run {tool}: {e}"),
    };
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// dig's whole answer to `args` from the server at `addr`, one try of 5 s.
pub fn dig(addr: SocketAddr, args: &[&str]) -> String {
    let mut all = vec![
        format!("@{}", addr.ip()),
        "-p".into(),
        addr.port().to_string(),
        "+time=5".into(),
        "+tries=1".into(),
    ];
    all.extend(args.iter().map(ToString::to_string));
    run("dig", "bind9-dnsutils", &all)
}

/// The status dig printed (NOERROR, NXDOMAIN, ...).
pub fn status(out: &str) -> &str {
    let at = out
        .find("status: ")
        .unwrap_or_else(|| panic!("no answer:\n{out}"));
    out[at + 8..].split(',').next().unwrap_or_default()
}

/// The header flags dig printed (`qr aa rd ra`).
pub fn flags(out: &str) -> Vec<&str> {
    let at = out
        .find(";; flags: ")
        .unwrap_or_else(|| panic!("no flags:\n{out}"));
    out[at + 10..]
        .split(';')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect()
}

/// A record as dig printed it.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rr {
    pub name: String,
    pub ttl: u32,
    /// The type and the data: `A 10.42.1.2`.
    pub data: String,
}

/// The records of a section.
pub fn section(out: &str, name: &str) -> Vec<Rr> {
    let header = format!(";; {name} SECTION:");
    let Some(at) = out.find(&header) else {
        return Vec::new();
    };
    out[at + header.len()..]
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| !l.starts_with(';'))
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            Rr {
                name: fields[0].into(),
                ttl: fields[1].parse().unwrap(),
                data: fields[3..].join(" "),
            }
        })
        .collect()
}

/// The type and data of a section's records, sorted.
pub fn data(out: &str, name: &str) -> Vec<String> {
    let mut d: Vec<String> = section(out, name).into_iter().map(|r| r.data).collect();
    d.sort();
    d
}

/// A dnsmasq on a free loopback port, stopped when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    child: Child,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// dnsmasq answering `example.test` (and a large TXT record).
pub fn dnsmasq() -> Upstream {
    let big = vec!["x".repeat(200); 10].join("\",\"");
    dnsmasq_with(
        &[
            "--address=/example.test/192.0.2.7".into(),
            format!("--txt-record=big.example.test,\"{big}\""),
        ],
        ("a.example.test", "192.0.2.7"),
    )
}

/// A dnsmasq on a free loopback port with `records` (its own options), once it answers
/// `probe.0` with `probe.1`.
pub fn dnsmasq_with(records: &[String], probe: (&str, &str)) -> Upstream {
    let port = free_port();
    let child = Command::new("dnsmasq")
        .args([
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file",
            &format!("--port={port}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
        ])
        .args(records)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            panic!("dnsmasq is not installed: install Debian's dnsmasq-base (ci/deps does)")
        }
        Err(e) => panic!("cannot run dnsmasq: {e}"),
    };
    let upstream = Upstream {
        addr: (Ipv4Addr::LOCALHOST, port).into(),
        child,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dig(upstream.addr, &["+time=1", probe.0]).contains(probe.1) {
        assert!(
            Instant::now() < deadline,
            "dnsmasq on port {port} does not answer"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    upstream
}

/// A loopback port free for both UDP and TCP right now.
pub fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A query for `name` A in DNS wire format, framed for TCP (a two-byte length first).
pub fn tcp_query(name: &str) -> Vec<u8> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let bytes = m.to_vec().unwrap();
    let mut framed = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
    framed.extend(bytes);
    framed
}

/// One answer read from a TCP connection, decoded; `None` if the server closed it.
pub fn tcp_answer(stream: &mut std::net::TcpStream) -> Option<hickory_proto::op::Message> {
    use std::io::Read;
    let mut len = [0; 2];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return None,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("reading an answer over TCP: {e}"),
    }
    let mut answer = vec![0; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).unwrap();
    Some(hickory_proto::op::Message::from_vec(&answer).unwrap())
}
