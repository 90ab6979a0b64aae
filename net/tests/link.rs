//! The bridge and veths in namespaces of the test's own: two containers on one host reach
//! each other and the gateway, ensuring twice and "restarting" keeps the links, and `ip`
//! (an independent tool) sees what we made.

mod common;

use caisson_net::ipam::Ipam;
use caisson_net::link::{self, Attachment, DEFAULT_BRIDGE};
use caisson_net::netlink::Netlink;
use ipnet::Ipv4Net;

#[test]
fn containers_on_one_bridge_reach_each_other_and_the_gateway() {
    let mut lab = common::Lab::new();
    let host = lab.ns("host");
    let c1 = lab.ns("c1");
    let c2 = lab.ns("c2");
    let subnet: Ipv4Net = "10.42.3.0/24".parse().unwrap();
    let ipam = Ipam::open(lab.dir().join("ipam"), subnet).unwrap();
    let a1 = ipam.allocate("c1").unwrap();
    let a2 = ipam.allocate("c2").unwrap();

    let indices = common::rt().block_on(async {
        let nl = Netlink::in_netns(&host).unwrap();
        let bridge = link::ensure_bridge(&nl, DEFAULT_BRIDGE, subnet)
            .await
            .unwrap();
        assert_eq!(
            link::ensure_bridge(&nl, DEFAULT_BRIDGE, subnet)
                .await
                .unwrap(),
            bridge
        );
        for (ns, name, addr) in [(&c1, "c1", a1), (&c2, "c2", a2)] {
            let at = Attachment {
                bridge: DEFAULT_BRIDGE,
                host_if: link::host_ifname(name),
                netns: ns,
                address: Ipv4Net::new(addr, 24).unwrap(),
                gateway: ipam.gateway(),
                mtu: None,
            };
            link::attach(&nl, &at).await.unwrap();
            link::attach(&nl, &at).await.unwrap();
        }
        let first = nl.index(&link::host_ifname("c1")).await.unwrap();
        // An agent restart: a new connection finds the links and keeps them.
        drop(nl);
        let nl = Netlink::in_netns(&host).unwrap();
        let at = Attachment {
            bridge: DEFAULT_BRIDGE,
            host_if: link::host_ifname("c1"),
            netns: &c1,
            address: Ipv4Net::new(a1, 24).unwrap(),
            gateway: ipam.gateway(),
            mtu: None,
        };
        link::attach(&nl, &at).await.unwrap();
        (first, nl.index(&link::host_ifname("c1")).await.unwrap())
    });
    assert_eq!(indices.0, indices.1, "a second attach replaced the veth");

    let server = common::serve_once(common::listen(&c2, &format!("{a2}:8000")));
    let answer = common::connect(&c1, &format!("{a2}:8000")).expect("c1 -> c2 over the bridge");
    assert_eq!(answer, a1.to_string(), "c2 saw another source address");
    assert_eq!(server.join().unwrap().map(|p| p.ip()), Some(a1.into()));

    let gw = ipam.gateway();
    let server = common::serve_once(common::listen(&host, &format!("{gw}:8001")));
    assert_eq!(
        common::connect(&c1, &format!("{gw}:8001")).unwrap(),
        a1.to_string()
    );
    server.join().unwrap();

    // What `ip` sees in the container: eth0 with the address, a default route via the gateway.
    let addrs = common::run_in(&c1, &["ip", "-j", "-4", "addr", "show", "dev", "eth0"]);
    let addrs: serde_json::Value = serde_json::from_str(&addrs).unwrap();
    let info = &addrs[0]["addr_info"][0];
    assert_eq!(info["local"], a1.to_string());
    assert_eq!(info["prefixlen"], 24);
    let routes = common::run_in(&c1, &["ip", "-j", "-4", "route", "show", "default"]);
    let routes: serde_json::Value = serde_json::from_str(&routes).unwrap();
    assert_eq!(routes[0]["gateway"], gw.to_string(), "{routes}");
    let bridge = common::run_in(
        &host,
        &["ip", "-j", "-4", "addr", "show", "dev", "caisson0"],
    );
    assert!(bridge.contains("\"10.42.3.1\""), "{bridge}");

    // Detach: the host end goes, and eth0 with it.
    common::rt().block_on(async {
        let nl = Netlink::in_netns(&host).unwrap();
        link::detach(&nl, &link::host_ifname("c1")).await.unwrap();
        link::detach(&nl, &link::host_ifname("c1")).await.unwrap();
        assert!(nl.find(&link::host_ifname("c1")).await.unwrap().is_none());
        let inner = Netlink::in_netns(&c1).unwrap();
        assert!(inner.find("eth0").await.unwrap().is_none());
    });
}

#[test]
fn a_foreign_link_with_the_bridge_name_is_refused() {
    let mut lab = common::Lab::new();
    let host = lab.ns("host");
    common::run_in(
        &host,
        &[
            "ip", "link", "add", "caisson0", "type", "veth", "peer", "name", "x0",
        ],
    );
    common::rt().block_on(async {
        let nl = Netlink::in_netns(&host).unwrap();
        let err = link::ensure_bridge(&nl, DEFAULT_BRIDGE, "10.42.3.0/24".parse().unwrap())
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("caisson0") && msg.contains("veth"), "{msg}");
    });
}
