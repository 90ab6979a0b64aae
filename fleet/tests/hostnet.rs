//! The host side of container networking alone (no containerd), in a network namespace of the
//! test's own standing in for the host: when the host's subnet changes (its claim was lost and
//! another one made), an instance attached under the old subnet moves to the new one in place,
//! and its old address is freed. Checked with iproute2's `ip` inside the instance's namespace.
//!
//! Needs root, nftables and iproute2 (ci/deps installs them).

#![allow(clippy::unwrap_used)]

use caisson_fleet::hostnet::{HostNet, Settings};
use caisson_net::ipam::Ipam;
use caisson_net::netns::NetNs;
use std::path::Path;
use std::process::Command;

/// The IPv4 addresses of `eth0` in the namespace bound at `netns`, and its default gateway.
fn addresses(netns: &Path) -> (Vec<String>, String) {
    let ip = |args: &[&str]| {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .arg("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let addrs = ip(&["-j", "-4", "addr", "show", "dev", "eth0"]);
    let list = addrs[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    let routes = ip(&["-j", "-4", "route", "show", "default"]);
    (
        list,
        routes[0]["gateway"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn a_new_subnet_moves_the_attached_instances() {
    for (tool, pkg) in [
        ("/usr/sbin/nft", "nftables"),
        ("/usr/bin/ip", "iproute2"),
        ("/usr/bin/nsenter", "util-linux"),
    ] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: apt-get install -y {pkg} (ci/deps does)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let settings = Settings {
        dns: false,
        netns_dir: d.join("netns"),
        state_dir: d.join("net"),
        ..Settings::default()
    };
    let net = HostNet::new(settings);
    let host = NetNs::create(d.join("host-ns")).unwrap();
    let cluster = "10.214.0.0/16".parse().unwrap();
    let (a, b) = (
        "10.214.3.0/24".parse().unwrap(),
        "10.214.9.0/24".parse().unwrap(),
    );
    let netns = net.netns_path("web");
    let moved = {
        let net = net.clone();
        host.run(move || {
            let tokio = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            tokio.block_on(async {
                assert!(net.configure(a, cluster, false).await.unwrap());
                let first = net.attach("web").await.unwrap();
                assert!(a.contains(&first), "{first}");
                let before = addresses(&net.netns_path("web"));
                // The claim on a was lost; the host now holds b.
                assert!(net.configure(b, cluster, false).await.unwrap());
                (first, before, addresses(&net.netns_path("web")))
            })
        })
        .unwrap()
    };
    let (first, before, after) = moved;
    assert_eq!(before, (vec![format!("{first}/24")], "10.214.3.1".into()));
    assert_eq!(after.1, "10.214.9.1", "{after:?}");
    assert_eq!(after.0.len(), 1, "{after:?}");
    let now: std::net::Ipv4Addr = after.0[0].trim_end_matches("/24").parse().unwrap();
    assert!(b.contains(&now), "{after:?}");
    assert_eq!(net.address("web"), Some(now));
    // The old subnet's address is free again.
    let old = Ipam::open(d.join("net/ipam").join("10.214.3.0-24"), a).unwrap();
    assert!(old.list().unwrap().is_empty(), "{:?}", old.list());
    assert!(netns.exists());
}
