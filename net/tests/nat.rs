//! NAT on two "hosts" joined by host-gw routes: containers keep their address inside the
//! cluster and are masqueraded outside it; a published port answers from the other host and
//! from the host itself, for TCP and UDP; a failed update leaves the old rules; `nft -j`
//! (an independent view) shows the table.

mod common;

use caisson_net::endpoint::Proto;
use caisson_net::link::{self, Attachment, DEFAULT_BRIDGE};
use caisson_net::nat::{self, NatConfig, PublishedPort};
use caisson_net::netlink::Netlink;
use caisson_net::routes;
use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

fn config(host: &common::Host, ports: Vec<PublishedPort>) -> NatConfig {
    NatConfig {
        subnet: host.subnet,
        cluster: "10.42.0.0/16".parse().expect("cidr"),
        ports,
    }
}

fn published(host: &common::Host) -> Vec<PublishedPort> {
    vec![
        PublishedPort {
            host_port: 8080,
            proto: Proto::Tcp,
            addr: host.container_ip,
            port: 80,
        },
        PublishedPort {
            host_port: 5353,
            proto: Proto::Udp,
            addr: host.container_ip,
            port: 53,
        },
    ]
}

/// Sends a datagram from inside `from` to `to` and returns the answer and who answered.
fn udp_ask(from: &caisson_net::netns::NetNs, to: &str) -> std::io::Result<String> {
    let socket = from
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .expect("enter netns")?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket.send_to(b"ping", to)?;
    let mut buf = [0u8; 64];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn masquerade_and_published_ports() {
    let mut lab = common::Lab::new();
    let (a, b) = common::two_hosts(&mut lab, None);
    common::rt().block_on(async {
        for (me, other) in [(&a, &b), (&b, &a)] {
            let nl = Netlink::in_netns(&me.ns).unwrap();
            routes::sync(&nl, &routes::host_gw_routes(me.subnet, &[other.peer()]))
                .await
                .unwrap();
        }
    });
    for host in [&a, &b] {
        host.ns.run(nat::enable_forwarding).unwrap().unwrap();
        host.ns
            .run(|| nat::apply(&config(host, published(host))))
            .unwrap()
            .unwrap();
        // Applying the same set again is fine (the table is replaced, not added to).
        host.ns
            .run(|| nat::apply(&config(host, published(host))))
            .unwrap()
            .unwrap();
    }

    // Inside the cluster network the source address is kept.
    let at = format!("{}:8000", b.container_ip);
    let server = common::serve_once(common::listen(&b.container, &at));
    assert_eq!(
        common::connect(&a.container, &at).unwrap(),
        a.container_ip.to_string()
    );
    server.join().unwrap();

    // Outside it (host 2's own address), host 2 sees host 1's address: masquerade.
    let server = common::serve_once(common::listen(&b.ns, "192.168.77.2:9000"));
    assert_eq!(
        common::connect(&a.container, "192.168.77.2:9000").unwrap(),
        "192.168.77.1"
    );
    server.join().unwrap();

    // The published TCP port from the other host and from the host itself.
    for (from, seen) in [(&b.ns, "192.168.77.2"), (&a.ns, "192.168.77.1")] {
        let server = common::serve_once(common::listen(&a.container, "0.0.0.0:80"));
        assert_eq!(common::connect(from, "192.168.77.1:8080").unwrap(), seen);
        server.join().unwrap();
    }

    // A published port from another container of the same host (hairpin): answered, and the
    // container behind the port sees the gateway.
    let c3 = lab.ns("c3");
    common::rt().block_on(async {
        let nl = Netlink::in_netns(&a.ns).unwrap();
        let at = Attachment {
            bridge: DEFAULT_BRIDGE,
            host_if: link::host_ifname("c3"),
            netns: &c3,
            address: "10.42.1.3/24".parse().unwrap(),
            gateway: "10.42.1.1".parse().unwrap(),
            mtu: None,
        };
        link::attach(&nl, &at).await.unwrap();
    });
    let mut ports = published(&a);
    ports.push(PublishedPort {
        host_port: 8083,
        proto: Proto::Tcp,
        addr: "10.42.1.3".parse().unwrap(),
        port: 80,
    });
    a.ns.run(|| nat::apply(&config(&a, ports)))
        .unwrap()
        .unwrap();
    let server = common::serve_once(common::listen(&c3, "0.0.0.0:80"));
    assert_eq!(
        common::connect(&a.container, "192.168.77.1:8083").unwrap(),
        "10.42.1.1"
    );
    server.join().unwrap();

    // The published UDP port from the other host.
    let udp = a
        .container
        .run(|| UdpSocket::bind("0.0.0.0:53"))
        .unwrap()
        .unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (_, peer) = udp.recv_from(&mut buf).ok()?;
        udp.send_to(peer.ip().to_string().as_bytes(), peer).ok()
    });
    assert_eq!(udp_ask(&b.ns, "192.168.77.1:5353").unwrap(), "192.168.77.2");
    echo.join().unwrap();

    // What nft itself lists.
    let table = common::json_in(&a.ns, &["nft", "-j", "list", "table", "ip", "caisson"]);
    let text = table.to_string();
    assert!(text.contains("\"masquerade\""), "{text}");
    assert!(
        text.contains("\"dnat\":{\"addr\":\"10.42.1.2\",\"port\":80}"),
        "{text}"
    );
    assert!(
        text.contains("\"dnat\":{\"addr\":\"10.42.1.2\",\"port\":53}"),
        "{text}"
    );
    let chains = table["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["chain"].is_object());
    assert_eq!(chains.count(), 4, "{text}");
}

#[test]
fn a_failed_update_keeps_the_old_rules_and_ports_are_replaced_as_a_set() {
    let mut lab = common::Lab::new();
    let ns = lab.ns("host");
    let host = common::Host {
        ns,
        underlay: Ipv4Addr::new(192, 168, 77, 1),
        subnet: "10.42.1.0/24".parse().unwrap(),
        container: lab.ns("c"),
        container_ip: Ipv4Addr::new(10, 42, 1, 2),
    };
    let list = |ns| common::run_in(ns, &["nft", "-j", "list", "table", "ip", "caisson"]);
    host.ns
        .run(|| nat::apply(&config(&host, published(&host))))
        .unwrap()
        .unwrap();
    let before = list(&host.ns);

    // The same document with one command the kernel refuses (a rule in a chain that does not
    // exist): nft must reject the whole batch.
    let mut doc = nat::ruleset(&config(&host, vec![])).unwrap();
    let bad: serde_json::Value = serde_json::json!({"add": {"rule": {
        "family": "ip", "table": "caisson", "chain": "missing", "expr": [{"accept": null}]}}});
    doc.objects
        .to_mut()
        .push(serde_json::from_value(bad).unwrap());
    let err = host
        .ns
        .run(|| nftables::helper::apply_ruleset(&doc))
        .unwrap();
    assert!(err.is_err(), "nft accepted a rule in a missing chain");
    assert_eq!(list(&host.ns), before, "a failed update changed the rules");

    // A new set replaces the old one entirely.
    let one = vec![PublishedPort {
        host_port: 9090,
        proto: Proto::Tcp,
        addr: host.container_ip,
        port: 90,
    }];
    host.ns
        .run(|| nat::apply(&config(&host, one)))
        .unwrap()
        .unwrap();
    let after = list(&host.ns);
    assert!(after.contains("9090") && !after.contains("8080"), "{after}");

    host.ns.run(nat::remove).unwrap().unwrap();
    host.ns.run(nat::remove).unwrap().unwrap();
    let tables = common::run_in(&host.ns, &["nft", "list", "tables"]);
    assert!(!tables.contains("caisson"), "{tables}");
}
