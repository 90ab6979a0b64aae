//! Two "hosts" (network namespaces joined by a veth), each with the bridge and a container:
//! the containers reach each other through host-gw routes, and again through VXLAN, and the
//! kernel's state is checked with `ip -j`.

mod common;

use caisson_net::netlink::Netlink;
use caisson_net::routes::{self, Peer};
use caisson_net::vxlan::{self, VxlanConfig, DEFAULT_VXLAN, VXLAN_PORT};
use ipnet::Ipv4Net;

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("a CIDR")
}

/// c1 (on host 1) connects to c2 (on host 2) and back; each side sees the other's own address.
fn containers_talk(a: &common::Host, b: &common::Host) {
    for (from, to) in [(a, b), (b, a)] {
        let at = format!("{}:8000", to.container_ip);
        let server = common::serve_once(common::listen(&to.container, &at));
        let answer = common::connect(&from.container, &at)
            .unwrap_or_else(|e| panic!("{} -> {at}: {e}", from.container_ip));
        assert_eq!(
            answer,
            from.container_ip.to_string(),
            "source address rewritten on the way"
        );
        server.join().expect("the server thread");
    }
}

#[test]
fn host_gw_routes_join_two_hosts() {
    let mut lab = common::Lab::new();
    let (a, b) = common::two_hosts(&mut lab, None);
    // Without routes, c1 cannot reach c2.
    assert!(common::connect(&a.container, &format!("{}:8000", b.container_ip)).is_err());

    common::run_in(
        &a.ns,
        &["ip", "route", "add", "10.99.0.0/16", "via", "192.168.77.2"],
    );
    common::rt().block_on(async {
        for (me, other) in [(&a, &b), (&b, &a)] {
            let nl = Netlink::in_netns(&me.ns).unwrap();
            let desired = routes::host_gw_routes(me.subnet, &[me.peer(), other.peer()]);
            let report = routes::sync(&nl, &desired).await.unwrap();
            assert_eq!(report.added, [other.subnet]);
            let again = routes::sync(&nl, &desired).await.unwrap();
            assert_eq!(
                again,
                routes::SyncReport::default(),
                "a second sync changed something"
            );
            assert_eq!(routes::installed(&nl).await.unwrap(), desired);
        }
    });
    containers_talk(&a, &b);

    let ours = common::json_in(&a.ns, &["ip", "-j", "-4", "route", "show", "proto", "202"]);
    assert_eq!(ours.as_array().map(Vec::len), Some(1), "{ours}");
    assert_eq!(ours[0]["dst"], "10.42.2.0/24");
    assert_eq!(ours[0]["gateway"], "192.168.77.2");

    common::rt().block_on(async {
        let nl = Netlink::in_netns(&a.ns).unwrap();
        // A peer moved: its route is replaced. A peer gone: its route deleted.
        let moved = Peer {
            public_ip: "192.168.77.9".parse().unwrap(),
            ..b.peer()
        };
        let report = routes::sync(&nl, &routes::host_gw_routes(a.subnet, &[moved]))
            .await
            .unwrap();
        assert_eq!(report.replaced, [b.subnet]);
        let report = routes::sync(&nl, &[]).await.unwrap();
        assert_eq!(report.deleted, [b.subnet]);
        // A route someone else made for a peer's exact subnet is left alone and reported.
        let foreign = Peer {
            subnet: net("10.99.0.0/16"),
            ..b.peer()
        };
        let report = routes::sync(&nl, &routes::host_gw_routes(a.subnet, &[foreign]))
            .await
            .unwrap();
        assert_eq!(report.foreign, [net("10.99.0.0/16")]);
        routes::sync(&nl, &[]).await.unwrap();
    });
    let all = common::json_in(&a.ns, &["ip", "-j", "-4", "route", "show"]);
    let dsts: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["dst"].as_str())
        .collect();
    assert!(
        dsts.contains(&"10.99.0.0/16"),
        "sync deleted a route it did not make: {all}"
    );
    assert!(!dsts.contains(&"10.42.2.0/24"), "{all}");
    assert!(common::connect(&a.container, &format!("{}:8000", b.container_ip)).is_err());
}

fn vxlan(host: &common::Host) -> VxlanConfig {
    VxlanConfig {
        name: DEFAULT_VXLAN.into(),
        vni: 42,
        port: VXLAN_PORT,
        local: host.underlay,
    }
}

#[test]
fn vxlan_joins_two_hosts() {
    let mut lab = common::Lab::new();
    // The veths get the VXLAN device's MTU (1500 less 50), as flannel does.
    let (a, b) = common::two_hosts(&mut lab, Some(1450));
    common::rt().block_on(async {
        for (me, other) in [(&a, &b), (&b, &a)] {
            let nl = Netlink::in_netns(&me.ns).unwrap();
            let peers = [me.peer(), other.peer()];
            let report = vxlan::sync_vxlan(&nl, &vxlan(me), me.subnet, &peers)
                .await
                .unwrap();
            assert_eq!(report.added, [other.subnet]);
            let again = vxlan::sync_vxlan(&nl, &vxlan(me), me.subnet, &peers)
                .await
                .unwrap();
            assert_eq!(again, routes::SyncReport::default());
        }
    });
    containers_talk(&a, &b);
    let at = format!("{}:8001", b.container_ip);
    let sent = common::bulk(&a.container, &b.container, &at, 1 << 20);
    assert_eq!(
        sent,
        1 << 20,
        "a bulk transfer through the tunnel lost data"
    );
    let eth0 = common::json_in(&a.container, &["ip", "-j", "link", "show", "eth0"]);
    assert_eq!(eth0[0]["mtu"], 1450, "{eth0}");

    // The traffic went through the tunnel: the device sent packets, with the settings asked.
    let dev = common::json_in(
        &a.ns,
        &["ip", "-j", "-d", "-s", "link", "show", DEFAULT_VXLAN],
    );
    let info = &dev[0]["linkinfo"]["info_data"];
    assert_eq!(info["id"], 42, "{dev}");
    assert_eq!(info["port"], 4789, "{dev}");
    assert_eq!(info["local"], "192.168.77.1", "{dev}");
    assert_eq!(info["learning"], false, "{dev}");
    assert!(
        dev[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or(0) > 0,
        "{dev}"
    );
    let ours = common::json_in(&a.ns, &["ip", "-j", "-4", "route", "show", "proto", "202"]);
    assert_eq!(ours[0]["dst"], "10.42.2.0/24", "{ours}");
    assert_eq!(ours[0]["gateway"], "10.42.2.0", "{ours}");
    assert_eq!(ours[0]["dev"], DEFAULT_VXLAN, "{ours}");
    common::rt().block_on(async {
        let nl = Netlink::in_netns(&a.ns).unwrap();
        let installed = routes::installed(&nl).await.unwrap();
        assert_eq!(installed.len(), 1);
        assert_eq!(
            installed[0].gateway,
            "10.42.2.0".parse::<std::net::Ipv4Addr>().unwrap()
        );
        assert_eq!(
            installed[0].oif,
            Some(nl.index(DEFAULT_VXLAN).await.unwrap())
        );
    });
    let fdb = common::run_in(&a.ns, &["bridge", "fdb", "show", "dev", DEFAULT_VXLAN]);
    assert!(fdb.contains("02:ca:0a:2a:02:00 dst 192.168.77.2"), "{fdb}");

    // The peer leaves: its route, ARP and FDB entries go.
    common::rt().block_on(async {
        let nl = Netlink::in_netns(&a.ns).unwrap();
        let report = vxlan::sync_vxlan(&nl, &vxlan(&a), a.subnet, &[])
            .await
            .unwrap();
        assert_eq!(report.deleted, [b.subnet]);
    });
    let fdb = common::run_in(&a.ns, &["bridge", "fdb", "show", "dev", DEFAULT_VXLAN]);
    assert!(!fdb.contains("192.168.77.2"), "{fdb}");
    let neigh = common::run_in(&a.ns, &["ip", "neigh", "show", "dev", DEFAULT_VXLAN]);
    assert!(!neigh.contains("10.42.2.0"), "{neigh}");
}

#[test]
fn across_a_router_vxlan_works_and_host_gw_is_refused() {
    let mut lab = common::Lab::new();
    let (a, b) = common::hosts(&mut lab, Some(1450), common::Underlay::Router);
    common::rt().block_on(async {
        // host-gw needs the peer on the same segment: the kernel refuses the route.
        let nl = Netlink::in_netns(&a.ns).unwrap();
        let err = routes::sync(&nl, &routes::host_gw_routes(a.subnet, &[b.peer()]))
            .await
            .expect_err("a host-gw route to a peer behind a router was accepted");
        let msg = err.to_string();
        assert!(
            msg.contains("10.42.2.0/24 via 192.168.2.2") && msg.contains("VXLAN"),
            "{msg}"
        );
        for (me, other) in [(&a, &b), (&b, &a)] {
            let nl = Netlink::in_netns(&me.ns).unwrap();
            let peers = [other.peer()];
            vxlan::sync_vxlan(&nl, &vxlan(me), me.subnet, &peers)
                .await
                .unwrap();
        }
    });
    containers_talk(&a, &b);
    let at = format!("{}:8001", b.container_ip);
    assert_eq!(
        common::bulk(&a.container, &b.container, &at, 1 << 20),
        1 << 20
    );
}
