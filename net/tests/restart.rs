//! An agent restart runs every ensure again with fresh state objects: nothing the kernel has
//! changes (links, addresses, routes, nftables), and containers keep talking.

mod common;

use caisson_net::ipam::{self, Ipam};
use caisson_net::link::{self, Attachment, DEFAULT_BRIDGE};
use caisson_net::nat::{self, NatConfig};
use caisson_net::netlink::Netlink;
use caisson_net::routes;

/// Everything the agent would do at start for host `me`; returns the host end's index.
fn agent_start(me: &common::Host, other: &common::Host, state: &std::path::Path) -> u32 {
    let ipam = Ipam::open(state, me.subnet).expect("ipam");
    let address = ipam.allocate("c").expect("allocate");
    assert_eq!(
        address, me.container_ip,
        "the test's container has the first address"
    );
    common::rt().block_on(async {
        let nl = Netlink::in_netns(&me.ns).expect("netlink");
        link::ensure_bridge(&nl, DEFAULT_BRIDGE, me.subnet)
            .await
            .expect("bridge");
        let at = Attachment {
            bridge: DEFAULT_BRIDGE,
            host_if: link::host_ifname("c"),
            netns: &me.container,
            address: ipnet::Ipv4Net::new(address, 24).expect("prefix"),
            gateway: ipam::gateway(me.subnet),
            mtu: None,
        };
        link::attach(&nl, &at).await.expect("attach");
        routes::sync(&nl, &routes::host_gw_routes(me.subnet, &[other.peer()]))
            .await
            .expect("sync");
        nl.index(&link::host_ifname("c")).await.expect("host end")
    })
}

#[test]
fn a_restarted_agent_changes_nothing() {
    let mut lab = common::Lab::new();
    let (a, b) = common::two_hosts(&mut lab, None);
    let state = lab.dir().join("ipam-a");
    let cfg = NatConfig {
        subnet: a.subnet,
        cluster: "10.42.0.0/16".parse().unwrap(),
        ports: vec![],
    };
    let first = agent_start(&a, &b, &state);
    agent_start(&b, &a, &lab.dir().join("ipam-b"));
    a.ns.run(|| nat::apply(&cfg)).unwrap().unwrap();
    let kernel = |ns| {
        let links = common::run_in(ns, &["ip", "-j", "-4", "addr", "show"]);
        let routes = common::run_in(ns, &["ip", "-j", "-4", "route", "show"]);
        (links, routes)
    };
    let nft = |ns| common::run_in(ns, &["nft", "-j", "list", "table", "ip", "caisson"]);
    let snapshot = |ns| (kernel(ns), nft(ns));
    let before = (snapshot(&a.ns), kernel(&a.container));

    let again = agent_start(&a, &b, &state);
    a.ns.run(|| nat::apply(&cfg)).unwrap().unwrap();
    assert_eq!(again, first, "the restart replaced the veth");
    let after = (snapshot(&a.ns), kernel(&a.container));
    assert_eq!(after.0 .0, before.0 .0, "host addresses or routes changed");
    assert_eq!(
        after.1, before.1,
        "the container's addresses or routes changed"
    );
    // nft prints handles that grow with every transaction; compare the rules without them.
    let strip = |s: &str| {
        let mut v: serde_json::Value = serde_json::from_str(s).unwrap();
        for o in v["nftables"].as_array_mut().unwrap() {
            for kind in ["table", "chain", "rule"] {
                if let Some(obj) = o.get_mut(kind).and_then(|x| x.as_object_mut()) {
                    obj.remove("handle");
                }
            }
            if let Some(meta) = o.get_mut("metainfo").and_then(|x| x.as_object_mut()) {
                meta.clear();
            }
        }
        v
    };
    assert_eq!(
        strip(&after.0 .1),
        strip(&before.0 .1),
        "the nftables rules changed"
    );

    let at = format!("{}:8000", b.container_ip);
    let server = common::serve_once(common::listen(&b.container, &at));
    assert_eq!(
        common::connect(&a.container, &at).unwrap(),
        a.container_ip.to_string()
    );
    server.join().unwrap();
}
