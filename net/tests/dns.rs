//! The DNS responder on real loopback sockets, asked by an independent client (`dig`, from
//! Debian's bind9-dnsutils) and forwarding to a real upstream (`dnsmasq`, from dnsmasq-base).

#![allow(clippy::unwrap_used)]

use caisson_net::dns::{Config, Responder};
use caisson_net::endpoint::{Endpoints, Instance, Port, Proto};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// A responder running on its own runtime on an ephemeral loopback port.
struct Dns {
    addr: SocketAddr,
    endpoints: watch::Sender<Endpoints>,
    _runtime: Runtime,
}

fn start(endpoints: Endpoints, config: Config) -> Dns {
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

fn instance(id: &str, address: Ipv4Addr) -> Instance {
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
fn two_webs() -> Endpoints {
    let mut e = Endpoints::default();
    e.insert("web", instance("m1", Ipv4Addr::new(10, 42, 1, 2)));
    e.insert("web", instance("m2", Ipv4Addr::new(10, 42, 2, 2)));
    e
}

/// Runs a host tool, failing the test with the Debian package to install when it is missing.
fn run(tool: &str, package: &str, args: &[String]) -> String {
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
fn dig(addr: SocketAddr, args: &[&str]) -> String {
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
fn status(out: &str) -> &str {
    let at = out
        .find("status: ")
        .unwrap_or_else(|| panic!("no answer:\n{out}"));
    out[at + 8..].split(',').next().unwrap_or_default()
}

/// The header flags dig printed (`qr aa rd ra`).
fn flags(out: &str) -> Vec<&str> {
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
struct Rr {
    name: String,
    ttl: u32,
    /// The type and the data: `A 10.42.1.2`.
    data: String,
}

/// The records of a section.
fn section(out: &str, name: &str) -> Vec<Rr> {
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
fn data(out: &str, name: &str) -> Vec<String> {
    let mut d: Vec<String> = section(out, name).into_iter().map(|r| r.data).collect();
    d.sort();
    d
}

#[test]
fn a_unit_answers_with_every_instance() {
    let dns = start(two_webs(), Config::default());
    let out = dig(dns.addr, &["web.caisson", "A"]);
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(flags(&out).contains(&"aa"), "{out}");
    assert_eq!(
        data(&out, "ANSWER"),
        ["A 10.42.1.2", "A 10.42.2.2"],
        "{out}"
    );
    assert!(
        section(&out, "ANSWER").iter().all(|r| r.ttl == 5),
        "TTL 5:\n{out}"
    );
    let one = dig(dns.addr, &["m2.web.caisson", "A"]);
    assert_eq!(data(&one, "ANSWER"), ["A 10.42.2.2"], "{one}");
}

#[test]
fn srv_names_instances_and_carries_their_addresses() {
    let dns = start(two_webs(), Config::default());
    let out = dig(dns.addr, &["_http._tcp.web.caisson", "SRV"]);
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert_eq!(
        data(&out, "ANSWER"),
        [
            "SRV 0 1 8080 m1.web.caisson.",
            "SRV 0 1 8080 m2.web.caisson."
        ],
        "{out}"
    );
    let mut extra = section(&out, "ADDITIONAL");
    extra.sort();
    assert_eq!(
        extra,
        [
            Rr {
                name: "m1.web.caisson.".into(),
                ttl: 5,
                data: "A 10.42.1.2".into()
            },
            Rr {
                name: "m2.web.caisson.".into(),
                ttl: 5,
                data: "A 10.42.2.2".into()
            },
        ],
        "{out}"
    );
}

#[test]
fn an_unknown_unit_is_nxdomain_and_a_missing_type_nodata_with_the_soa() {
    let config = Config {
        negative_ttl: 3,
        ..Config::default()
    };
    let dns = start(two_webs(), config);
    let out = dig(dns.addr, &["db.caisson", "A"]);
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    let soa = section(&out, "AUTHORITY");
    assert_eq!(soa.len(), 1, "{out}");
    assert_eq!(soa[0].name, "caisson.", "{out}");
    assert!(
        soa[0]
            .data
            .starts_with("SOA ns.caisson. hostmaster.caisson. 1 "),
        "{out}"
    );
    assert!(
        soa[0].data.ends_with(" 3"),
        "negative TTL 3 as the SOA minimum:\n{out}"
    );
    assert_eq!(soa[0].ttl, 3, "SOA TTL 3:\n{out}");

    let out = dig(dns.addr, &["web.caisson", "AAAA"]);
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(section(&out, "ANSWER").is_empty(), "{out}");
    assert_eq!(section(&out, "AUTHORITY").len(), 1, "{out}");
}

#[test]
fn tcp_answers_the_same() {
    let dns = start(two_webs(), Config::default());
    let out = dig(dns.addr, &["+tcp", "web.caisson", "A"]);
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(out.contains("(TCP)"), "{out}");
    assert_eq!(
        data(&out, "ANSWER"),
        ["A 10.42.1.2", "A 10.42.2.2"],
        "{out}"
    );
}

#[test]
fn too_many_instances_for_udp_are_truncated_and_whole_over_tcp() {
    let mut e = Endpoints::default();
    for n in 0..200u8 {
        e.insert(
            "web",
            instance(&format!("i{n}"), Ipv4Addr::new(10, 42, n, 2)),
        );
    }
    let dns = start(e, Config::default());
    let udp = dig(dns.addr, &["+ignore", "+notcp", "web.caisson", "A"]);
    assert!(flags(&udp).contains(&"tc"), "{udp}");
    assert!(section(&udp, "ANSWER").len() < 200, "{udp}");
    // dig on its own retries a truncated answer over TCP.
    let retried = dig(dns.addr, &["web.caisson", "A"]);
    assert!(
        retried.contains("Truncated, retrying in TCP mode"),
        "{retried}"
    );
    assert_eq!(section(&retried, "ANSWER").len(), 200, "{retried}");
    assert!(!flags(&retried).contains(&"tc"), "{retried}");
    // Without EDNS the limit is 512 bytes.
    let plain = dig(
        dns.addr,
        &["+ignore", "+noedns", "+notcp", "web.caisson", "A"],
    );
    assert!(flags(&plain).contains(&"tc"), "{plain}");
}

#[test]
fn the_next_query_sees_a_swapped_snapshot() {
    let dns = start(two_webs(), Config::default());
    assert_eq!(data(&dig(dns.addr, &["web.caisson"]), "ANSWER").len(), 2);
    let mut e = Endpoints::default();
    e.insert("web", instance("m3", Ipv4Addr::new(10, 42, 3, 2)));
    e.insert("db", instance("m1", Ipv4Addr::new(10, 42, 1, 3)));
    dns.endpoints.send_replace(e);
    let out = dig(dns.addr, &["web.caisson"]);
    assert_eq!(data(&out, "ANSWER"), ["A 10.42.3.2"], "{out}");
    let out = dig(dns.addr, &["db.caisson"]);
    assert_eq!(data(&out, "ANSWER"), ["A 10.42.1.3"], "{out}");
}

#[test]
fn a_configured_zone_and_ttl_are_used() {
    let config = Config {
        zone: "cluster.internal".into(),
        ttl: 30,
        ..Config::default()
    };
    let dns = start(two_webs(), config);
    let out = dig(dns.addr, &["web.cluster.internal"]);
    assert_eq!(data(&out, "ANSWER").len(), 2, "{out}");
    assert!(section(&out, "ANSWER").iter().all(|r| r.ttl == 30), "{out}");
}

#[test]
fn garbage_gets_formerr_or_nothing_and_the_responder_keeps_answering() {
    let dns = start(two_webs(), Config::default());
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    // A header (id 0x1234, a query, one question) followed by a cut question.
    let packet = [
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'e',
    ];
    socket.send_to(&packet, dns.addr).unwrap();
    let mut buf = [0; 512];
    let (n, _) = socket.recv_from(&mut buf).unwrap();
    assert!(n >= 12);
    assert_eq!(buf[..2], [0x12, 0x34]);
    assert_eq!(buf[2] & 0x80, 0x80, "a response");
    assert_eq!(buf[3] & 0x0f, 1, "FORMERR");
    socket.send_to(&[1, 2, 3], dns.addr).unwrap();
    socket.send_to(&[0; 5000], dns.addr).unwrap();
    assert_eq!(status(&dig(dns.addr, &["web.caisson"])), "NOERROR");
}

/// A dnsmasq on a free loopback port answering `example.test` (and a large TXT record),
/// stopped when dropped.
struct Upstream {
    addr: SocketAddr,
    child: Child,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dnsmasq() -> Upstream {
    let port = free_port();
    let big = vec!["x".repeat(200); 10].join("\",\"");
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
            "--address=/example.test/192.0.2.7",
            &format!("--txt-record=big.example.test,\"{big}\""),
        ])
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
    while !dig(upstream.addr, &["+time=1", "a.example.test"]).contains("192.0.2.7") {
        assert!(
            Instant::now() < deadline,
            "dnsmasq on port {port} does not answer"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    upstream
}

/// A loopback port free for both UDP and TCP right now.
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

#[test]
fn other_names_are_forwarded_to_the_upstream() {
    let upstream = dnsmasq();
    let config = Config {
        upstreams: vec![upstream.addr],
        ..Config::default()
    };
    let dns = start(two_webs(), config);
    let out = dig(dns.addr, &["www.example.test", "A"]);
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert_eq!(data(&out, "ANSWER"), ["A 192.0.2.7"], "{out}");
    // The zone still answers itself.
    assert_eq!(data(&dig(dns.addr, &["web.caisson"]), "ANSWER").len(), 2);
    // A large answer: truncated over UDP, whole over TCP (the upstream asked over TCP in turn).
    let udp = dig(dns.addr, &["+ignore", "+notcp", "big.example.test", "TXT"]);
    assert!(flags(&udp).contains(&"tc"), "{udp}");
    let tcp = dig(dns.addr, &["+tcp", "big.example.test", "TXT"]);
    assert_eq!(status(&tcp), "NOERROR", "{tcp}");
    assert!(!flags(&tcp).contains(&"tc"), "{tcp}");
    assert_eq!(section(&tcp, "ANSWER").len(), 1, "{tcp}");
    assert!(tcp.contains(&"x".repeat(200)), "{tcp}");
}

#[test]
fn a_dead_upstream_is_servfail_within_the_timeout() {
    // An upstream that takes queries and never answers, then one that refuses them.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let refused = {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let config = Config {
        upstreams: vec![silent.local_addr().unwrap(), refused],
        forward_timeout: Duration::from_millis(700),
        ..Config::default()
    };
    let dns = start(two_webs(), config);
    let began = Instant::now();
    let out = dig(dns.addr, &["www.example.test", "A"]);
    let took = began.elapsed();
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    assert!(
        took >= Duration::from_millis(700),
        "answered before the timeout: {took:?}"
    );
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    // A query that reached the silent upstream proves it was asked.
    let mut buf = [0; 512];
    silent.set_nonblocking(true).unwrap();
    assert!(
        silent.recv_from(&mut buf).is_ok(),
        "the upstream was never asked"
    );
}
