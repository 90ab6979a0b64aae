//! The DNS responder on real loopback sockets, asked by an independent client (`dig`, from
//! Debian's bind9-dnsutils) and forwarding to a real upstream (`dnsmasq`, from dnsmasq-base).

#![allow(clippy::unwrap_used)]

mod support;

use caisson_net::dns::Config;
use caisson_net::endpoint::Endpoints;
use std::io::Write;
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};
use support::{
    data, dig, dnsmasq, flags, instance, section, start, status, tcp_answer, tcp_query, two_webs,
    Rr,
};

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
    // The next query gets them in another order.
    let first = |out: &str| section(out, "ANSWER")[0].data.clone();
    let again = dig(dns.addr, &["web.caisson", "A"]);
    assert_ne!(first(&out), first(&again), "not rotated:\n{out}\n{again}");
    // A stub resolver asks A and AAAA for every lookup: the AAAA query does not turn the
    // rotation, so the next lookup still gets the other order.
    let aaaa = dig(dns.addr, &["web.caisson", "AAAA"]);
    assert_eq!(data(&aaaa, "ANSWER"), Vec::<String>::new(), "{aaaa}");
    let third = dig(dns.addr, &["web.caisson", "A"]);
    assert_ne!(
        first(&again),
        first(&third),
        "AAAA turned the rotation:\n{again}\n{third}"
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
    // An EDNS version that does not exist.
    let out = dig(dns.addr, &["+edns=1", "+noednsnegotiation", "web.caisson"]);
    assert_eq!(status(&out), "BADVERS", "{out}");
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

#[test]
fn an_idle_tcp_connection_is_closed_after_its_deadline() {
    let config = Config {
        tcp_timeout: Duration::from_millis(400),
        ..Config::default()
    };
    let dns = start(two_webs(), config);
    let mut stream = TcpStream::connect(dns.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Two queries on one connection are both answered.
    for _ in 0..2 {
        stream.write_all(&tcp_query("web.caisson.")).unwrap();
        assert_eq!(tcp_answer(&mut stream).unwrap().answers.len(), 2);
    }
    // Then half a length prefix, and nothing more.
    stream.write_all(&[0]).unwrap();
    let began = Instant::now();
    assert!(
        tcp_answer(&mut stream).is_none(),
        "an answer to half a query"
    );
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(300), "closed after {took:?}");
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
}

#[test]
fn tcp_connections_beyond_the_limit_are_closed_and_the_others_served() {
    let config = Config {
        max_tcp_connections: 2,
        ..Config::default()
    };
    let dns = start(two_webs(), config);
    let mut open: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(dns.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(dns.addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = extra.write_all(&tcp_query("web.caisson."));
    assert!(
        tcp_answer(&mut extra).is_none(),
        "a third connection was served"
    );
    for stream in &mut open {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(&tcp_query("web.caisson.")).unwrap();
        assert_eq!(tcp_answer(stream).unwrap().answers.len(), 2);
    }
    // A closed connection frees its place.
    open.pop();
    std::thread::sleep(Duration::from_millis(200));
    let mut again = TcpStream::connect(dns.addr).unwrap();
    again
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    again.write_all(&tcp_query("web.caisson.")).unwrap();
    assert_eq!(tcp_answer(&mut again).unwrap().answers.len(), 2);
}

#[test]
fn forwards_beyond_the_limit_are_servfail_at_once() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let config = Config {
        upstreams: vec![silent.local_addr().unwrap()],
        forward_timeout: Duration::from_secs(3),
        max_forwards: 1,
        ..Config::default()
    };
    let dns = start(two_webs(), config);
    let addr = dns.addr;
    let first = std::thread::spawn(move || dig(addr, &["one.example.test"]));
    // Wait until the first forward reaches the upstream, so that it holds the only place.
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    silent.recv_from(&mut [0; 512]).unwrap();
    let began = Instant::now();
    let second = dig(dns.addr, &["two.example.test"]);
    assert_eq!(status(&second), "SERVFAIL", "{second}");
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "took {:?}",
        began.elapsed()
    );
    // The zone is answered meanwhile.
    assert_eq!(status(&dig(dns.addr, &["web.caisson"])), "NOERROR");
    assert_eq!(status(&first.join().unwrap()), "SERVFAIL");
}
