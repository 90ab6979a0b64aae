//! The cluster network half of the cluster test. Each machine has a second NIC on a private
//! segment (`caisson_qemu::VirtualNetwork`, a hub on host loopback) with a static address from
//! its machine config (`[[network.links]]`), which is also its fleet address; the operator set
//! the cluster network `10.42.0.0/16` (host-gw) before the machines booted.
//!
//! Discovery: `web` (two replicas, port 80 published as 8080, healthy while no flag file is in
//! a bind from the host) runs on two machines and `client` on the third. The client resolves
//! `web.caisson` through its machine's DNS responder and fetches its page twice a second: the
//! answers' order rotates, so it must get both instances' pages, each naming the instance's own
//! container address in another machine's subnet (host-gw routes over the private segment),
//! and renders a template of web's addresses into its volume. A published port answers on its
//! machine's private address from another machine. A flag file makes one instance unhealthy: it
//! leaves the DNS answer and the rendered file; the flag removed, it comes back to both.
//!
//! Routes follow machines: when a machine is hard-killed, the survivors drop the route to its
//! subnet once its lease is gone; when it boots again, they route to it again.

use super::{Fleet, NODES, POLL, TTL_S};
use caisson_fleet::network;
use caisson_fleet::services;
use caisson_fleet::unit::UnitSpec;
use caisson_net::cluster::{Backend, Ipv4Net, NetworkConfig};
use caisson_qemu::{NetAttachment, Vm};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// The cluster network the operator sets.
pub(crate) const CLUSTER: &str = "10.42.0.0/16";
/// How often web's health check runs; one failure makes it unhealthy.
const HEALTH_INTERVAL_S: u64 = 1;
/// Where the test puts the flag that makes a web instance unhealthy, on the machine.
const FLAGS: &str = "/etc/caisson/flags";
/// The client's template (confd-style), written on every machine: web's serving addresses.
const TEMPLATE: &str = "/etc/caisson/tmpl/web.list.tmpl";
/// Where the client's rendered template lands on its machine (its volume `conf`).
const RENDERED: &str = "/var/lib/caisson/volumes/client/conf/web.list";

/// Machine `i`'s address on the private segment.
pub(crate) fn private_address(i: usize) -> String {
    format!("192.168.50.{}", 11 + i)
}

/// The machine config's part for the private segment: the NIC by its MAC, its address.
pub(crate) fn machine_config(i: usize, nic: &NetAttachment) -> String {
    format!(
        "[[network.links]]\nmac = \"{}\"\naddress = \"{}/24\"\n",
        nic.mac,
        private_address(i)
    )
}

/// `caisson-fleet network init 10.42.0.0/16` (host-gw), through the library.
pub(crate) fn init(fleet: &Fleet) {
    let config = NetworkConfig {
        network: CLUSTER.parse().unwrap(),
        subnet_len: 24,
        backend: Backend::HostGw,
    };
    let s = &fleet.store;
    fleet
        .rt
        .block_on(network::init(&s.client, &s.keys, &config))
        .unwrap();
}

/// Each node's subnet, once all three have claimed one, each with its private address.
fn subnets(fleet: &Fleet, ids: &BTreeMap<String, String>) -> BTreeMap<String, Ipv4Net> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = &fleet.store;
        let peers = fleet
            .rt
            .block_on(network::peers(&s.client, &s.keys))
            .unwrap();
        let by_node: BTreeMap<String, Ipv4Net> = peers
            .iter()
            .filter_map(|p| ids.get(&p.machine).map(|n| (n.clone(), p.subnet)))
            .collect();
        if by_node.len() == NODES.len() {
            for p in &peers {
                let i = NODES.iter().position(|n| *n == ids[&p.machine]).unwrap();
                assert_eq!(p.public_ip.to_string(), private_address(i), "{p:?}");
            }
            return by_node;
        }
        assert!(
            Instant::now() < deadline,
            "three subnet claims, not {peers:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// Runs `argv` on the machine; its output, or a panic with what went wrong.
fn run(vm: &Vm, argv: &[&str]) -> String {
    let r = super::common::exec(vm, argv, 20);
    let e = r.exec.unwrap_or_else(|| panic!("{argv:?}: {:?}", r.error));
    assert_eq!(e.code, Some(0), "{argv:?}: {e:?}");
    e.output
}

/// The destinations of the machine's routes (`/proc/net/route`), with their gateways.
fn routes(vm: &Vm) -> BTreeMap<Ipv4Net, Ipv4Addr> {
    let table = run(vm, &["/bin/busybox", "cat", "/proc/net/route"]);
    let hex = |h: &str| Ipv4Addr::from(u32::from_str_radix(h, 16).unwrap().swap_bytes());
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dest, gw, mask) = (hex(f.get(1)?), hex(f.get(2)?), hex(f.get(7)?));
            let net = Ipv4Net::new(dest, u32::from(mask).count_ones() as u8).ok()?;
            Some((net, gw))
        })
        .collect()
}

/// The addresses a DNS query for `name` at `server` answers, from the machine.
fn resolve(vm: &Vm, name: &str, server: Ipv4Addr) -> BTreeSet<Ipv4Addr> {
    let r = super::common::exec(
        vm,
        &["/bin/busybox", "nslookup", name, &server.to_string()],
        20,
    );
    let out = r.exec.map(|e| e.output).unwrap_or_default();
    // The server's own line is `Address: 10.42.1.1:53`; the answers carry no port.
    out.lines()
        .filter_map(|l| l.strip_prefix("Address:"))
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

fn unit(name: &str, text: &str) -> UnitSpec {
    UnitSpec::parse(name, text).unwrap()
}

/// web: its page names its own container address; healthy while `FLAGS/sick` is absent.
fn web() -> UnitSpec {
    unit(
        "web",
        &format!(
            r#"command = ["/bin/busybox", "sh", "-c", "a=$(/bin/busybox ip -4 -o addr show dev eth0 | /bin/busybox awk '{{print $4}}' | /bin/busybox cut -d/ -f1); /bin/busybox mkdir -p /www; echo web@$a > /www/index.html; exec /bin/busybox httpd -f -p 80 -h /www"]
ports = ["8080:80"]
replicas = 2
restart = "never"
binds = [{{ source = "{FLAGS}", path = "/flags" }}]
[image]
path = "{}"
[health]
exec = ["/bin/busybox", "sh", "-c", "! /bin/busybox test -e /flags/sick"]
interval = "{HEALTH_INTERVAL_S}s"
retries = 1
"#,
            super::ARCHIVE
        ),
    )
}

/// client: every half second (no `wget -T`: Debian 12's busybox-static wget dies of SIGSEGV
/// with it), the page of `web.caisson` (each DNS answer in another order, so
/// both instances serve it in turn), one line each: `got=web@<address>`.
fn client() -> UnitSpec {
    unit(
        "client",
        &format!(
            r#"command = ["/bin/busybox", "sh", "-c", "while true; do echo got=$(/bin/busybox wget -q -O - http://web.caisson/); /bin/busybox sleep 0.5; done"]
volumes = [{{ name = "conf", path = "/conf" }}]
[constraints]
conflicts = ["web"]
[image]
path = "{}"
[[templates]]
src = "{TEMPLATE}"
dest = "web.list"
volume = "conf"
services = ["web"]
"#,
            super::ARCHIVE
        ),
    )
}

/// The addresses in the client's rendered template, from its machine.
fn rendered(vm: &Vm) -> BTreeSet<Ipv4Addr> {
    let r = super::common::exec(vm, &["/bin/busybox", "cat", RENDERED], 20);
    let text = r.exec.map(|e| e.output).unwrap_or_default();
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Discovery and routing across the three machines (see the module's comment); removes its
/// units at the end. Returns each node's subnet.
pub(crate) fn discovery(
    fleet: &Fleet,
    vms: &[Vm],
    ids: &BTreeMap<String, String>,
) -> BTreeMap<String, Ipv4Net> {
    let started = Instant::now();
    let subnets = subnets(fleet, ids);
    eprintln!("subnets claimed: {subnets:?}");
    // Every machine routes to the others' subnets through their private addresses (once it
    // has seen the last claim).
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, vm) in vms.iter().enumerate() {
        loop {
            let table = routes(vm);
            let missing: Vec<&str> = NODES
                .iter()
                .enumerate()
                .filter(|(j, node)| {
                    *j != i
                        && table.get(&subnets[**node]).map(|g| g.to_string())
                            != Some(private_address(*j))
                })
                .map(|(_, node)| *node)
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} routes not to {missing:?}'s subnets through their private addresses: {table:?}",
                NODES[i]
            );
            std::thread::sleep(POLL);
        }
        run(vm, &["/bin/busybox", "mkdir", "-p", FLAGS]);
        let write = format!(
            "/bin/busybox mkdir -p $(/bin/busybox dirname {TEMPLATE}) && printf '%s\\n' \
             '{{% for i in services.web %}}{{{{ i.address }}}}' '{{% endfor %}}' > {TEMPLATE}"
        );
        run(vm, &["/bin/busybox", "sh", "-c", &write]);
        // The host keeps its own resolvers (the containers' resolv.conf is another file).
        let host_resolv = run(vm, &["/bin/busybox", "cat", "/etc/resolv.conf"]);
        assert!(
            host_resolv.contains("nameserver 10.0.2.3") && !host_resolv.contains("10.42."),
            "{}'s /etc/resolv.conf: {host_resolv}",
            NODES[i]
        );
    }
    eprintln!("every machine routes to the others' subnets");
    // ... and says so in etcd (what `caisson-fleet network status` shows).
    let s = &fleet.store;
    let (reports, bad) = fleet
        .rt
        .block_on(network::routes::reports(&s.client, &s.keys))
        .unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    for (id, node) in ids {
        let report = &reports[id];
        assert_eq!(report.own, Some(subnets[node]), "{node}: {report:?}");
        for other in NODES.iter().filter(|n| *n != node) {
            assert_eq!(
                report.state(&subnets[*other]),
                Some(network::routes::OK),
                "{node}: {report:?}"
            );
        }
    }
    fleet.submit(&[web(), client()]);
    // Both web instances registered (healthy), on two machines; client on the third.
    let (instances, client_node) = loop {
        let (endpoints, _) = fleet
            .rt
            .block_on(services::endpoints(&s.client, &s.keys))
            .unwrap();
        let snap = fleet.snapshot();
        let web: Vec<_> = endpoints.units.get("web").cloned().unwrap_or_default();
        let client_on = snap
            .running()
            .get("client")
            .and_then(|ms| ms.first().cloned());
        if web.len() == 2 {
            if let Some(c) = client_on {
                break (web, ids[&c].clone());
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "web twice and client: {endpoints:?}; {}",
            snap.describe()
        );
        std::thread::sleep(POLL);
    };
    let web_nodes: BTreeSet<String> = instances.iter().map(|i| ids[&i.machine].clone()).collect();
    assert_eq!(web_nodes.len(), 2, "{instances:?}");
    assert!(!web_nodes.contains(&client_node), "{instances:?}");
    for i in &instances {
        let subnet = subnets[&ids[&i.machine]];
        assert!(subnet.contains(&i.address), "{i:?} not in {subnet}");
    }
    let want: BTreeSet<Ipv4Addr> = instances.iter().map(|i| i.address).collect();
    eprintln!(
        "web on {web_nodes:?} at {want:?}, client on {client_node}, after {:.1?}",
        started.elapsed()
    );
    let ci = NODES.iter().position(|n| *n == client_node).unwrap();
    let cvm = &vms[ci];
    // The client got both instances' pages by name, each from the instance's own container
    // address in another machine's subnet.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = run(
            cvm,
            &["/bin/busybox", "cat", "/var/log/caisson/fleet/client.log"],
        );
        let got: BTreeSet<String> = log
            .lines()
            .filter_map(|l| l.trim().strip_prefix("got=web@"))
            .map(String::from)
            .collect();
        if want.iter().all(|a| got.contains(&a.to_string())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "client did not get both of {want:?} by name; its log:\n{log}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("client reached both web instances by name across machines");
    // Its template holds both (rendered by its agent from the same endpoints).
    let deadline = Instant::now() + Duration::from_secs(60);
    while rendered(cvm) != want {
        assert!(
            Instant::now() < deadline,
            "the client's template: {:?}, not {want:?}",
            rendered(cvm)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The published port answers on a web machine's private address, from another machine.
    for node in &web_nodes {
        let j = NODES.iter().position(|n| n == node).unwrap();
        let url = format!("http://{}:8080/", private_address(j));
        let page = run(cvm, &["/bin/busybox", "wget", "-q", "-O", "-", &url]);
        assert!(page.starts_with("web@10.42."), "{url}: {page}");
    }
    // One instance unhealthy: it leaves the DNS answer of the client's machine.
    let dns = caisson_net::ipam::gateway(subnets[&client_node]);
    let sick = &instances[0];
    let si = NODES.iter().position(|n| *n == ids[&sick.machine]).unwrap();
    assert_eq!(resolve(cvm, "web.caisson", dns), want);
    run(
        &vms[si],
        &["/bin/busybox", "touch", &format!("{FLAGS}/sick")],
    );
    let flagged = Instant::now();
    let healthy: BTreeSet<Ipv4Addr> = want
        .iter()
        .copied()
        .filter(|a| *a != sick.address)
        .collect();
    // When the DNS answer and the client's rendered template each hold only the healthy one.
    let (mut dns_gone, mut file_gone) = (None, None);
    while dns_gone.is_none() || file_gone.is_none() {
        if dns_gone.is_none() && resolve(cvm, "web.caisson", dns) == healthy {
            dns_gone = Some(flagged.elapsed());
        }
        if file_gone.is_none() && rendered(cvm) == healthy {
            file_gone = Some(flagged.elapsed());
        }
        assert!(
            flagged.elapsed() < Duration::from_secs(60),
            "{} still in DNS ({dns_gone:?}) or the template ({file_gone:?})",
            sick.address
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let gone = dns_gone
        .unwrap_or_default()
        .max(file_gone.unwrap_or_default());
    eprintln!(
        "unhealthy instance {} left DNS on another machine {:.1} s and the client's template {:.1} s after its flag (health interval {HEALTH_INTERVAL_S} s)",
        sick.address,
        dns_gone.unwrap_or_default().as_secs_f64(),
        file_gone.unwrap_or_default().as_secs_f64()
    );
    run(&vms[si], &["/bin/busybox", "rm", &format!("{FLAGS}/sick")]);
    let healed = Instant::now();
    while resolve(cvm, "web.caisson", dns) != want || rendered(cvm) != want {
        assert!(
            healed.elapsed() < Duration::from_secs(60),
            "{} did not come back into DNS and the template",
            sick.address
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "healthy again, back in DNS and the template after {:.1} s; discovery took {:.0?}",
        healed.elapsed().as_secs_f64(),
        started.elapsed()
    );
    fleet.rt.block_on(s.destroy("web")).unwrap();
    fleet.rt.block_on(s.destroy("client")).unwrap();
    fleet.until("web and client gone", Duration::from_secs(120), |s| {
        (!s.placement.contains_key("web") && !s.placement.contains_key("client")).then_some(())
    });
    assert!(
        gone <= Duration::from_secs(HEALTH_INTERVAL_S + 2 + 3),
        "the unhealthy instance left DNS or the template only after {gone:?}"
    );
    subnets
}

/// After the machine `killed` was hard-killed at `at`: the survivors drop their route to its
/// subnet within TTL + 5 s. Returns how long that took.
pub(crate) fn routes_dropped(vms: &[Vm], killed: usize, at: Instant, subnet: Ipv4Net) -> Duration {
    loop {
        let left: Vec<&str> = vms
            .iter()
            .enumerate()
            .filter(|(i, vm)| *i != killed && routes(vm).contains_key(&subnet))
            .map(|(i, _)| NODES[i])
            .collect();
        if left.is_empty() {
            let took = at.elapsed();
            eprintln!(
                "the survivors dropped the route to {subnet} {:.1} s after the kill (TTL {TTL_S} s)",
                took.as_secs_f64()
            );
            assert!(
                took <= Duration::from_secs(TTL_S as u64 + 5),
                "routes to {subnet} stayed {took:?} after the kill"
            );
            return took;
        }
        assert!(
            at.elapsed() < Duration::from_secs(TTL_S as u64 + 60),
            "{left:?} still route to {subnet}"
        );
        std::thread::sleep(POLL);
    }
}

/// The machine `back` rejoined: every other machine routes to its subnet again, through its
/// private address.
pub(crate) fn routes_back(fleet: &Fleet, vms: &[Vm], back: usize, ids: &BTreeMap<String, String>) {
    let subnets = subnets(fleet, ids);
    let subnet = subnets[NODES[back]];
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, vm) in vms.iter().enumerate().filter(|(i, _)| *i != back) {
        while routes(vm).get(&subnet).map(|g| g.to_string()) != Some(private_address(back)) {
            assert!(
                Instant::now() < deadline,
                "{} routes to {subnet} through {} again: {:?}",
                NODES[i],
                private_address(back),
                routes(vm)
            );
            std::thread::sleep(POLL);
        }
    }
    eprintln!("{} is routed to again at {subnet}", NODES[back]);
}
