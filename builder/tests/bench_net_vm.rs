//! Container network benchmark in VMs (issue 18): throughput and request latency from a
//! container on one machine to a container on another, next to the same from host to host on
//! the same two machines, once with host-gw routes and once with VXLAN.
//!
//! `cargo test --locked -p caisson-builder --test bench_net_vm -- --ignored --nocapture` (also in
//! `ci/bench`). Two TCG VMs of `images/host.toml` (one vCPU, 1 GiB each) with a second NIC each
//! on a private segment (`caisson_qemu::VirtualNetwork`, a hub on host loopback), a fleet on an
//! etcd on host loopback (plain HTTP: only the VMs reach it) with the cluster network
//! `10.42.0.0/16` set before they boot. On machine 1 a unit `sink` serves a 32 MiB file and a
//! small one with busybox `httpd`; on machine 0 a unit `client` sleeps, and the measurements run
//! in its network namespace (`busybox nsenter --net=/run/caisson/netns/client`). The host-to-host
//! peer is busybox `httpd` on machine 1's own namespace, fetched from machine 0's.
//! - throughput: `busybox wget` of the 32 MiB file, the best of three;
//! - latency: 50 sequential `wget`s of the small file, the average per request.
//!
//! No `wget -T`: Debian 12's busybox-static wget dies of SIGSEGV with it.
//!
//! Prints `BENCH net_vm backend=… host_mib_s=… container_mib_s=… ratio=… host_req_ms=…
//! container_req_ms=…` for each backend. Only loopback and the VMs' own networks.

#![allow(clippy::unwrap_used)]

mod common;

#[path = "../../fleet/tests/common/mod.rs"]
mod etcd_harness;

use caisson_fleet::etcd::Client;
use caisson_fleet::network;
use caisson_fleet::registry::Keys;
use caisson_fleet::services;
use caisson_fleet::store::Store;
use caisson_fleet::unit::UnitSpec;
use caisson_net::cluster::{Backend, NetworkConfig};
use caisson_qemu::{Disk, FwCfgValue, NetAttachment, VirtualNetwork, Vm, VmOptions};
use etcd_harness::Etcd;
use std::path::Path;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(600);
const BIG_MIB: u32 = 32;
const REQUESTS: u32 = 50;
const HOST_PORT: u16 = 8099;

fn private_address(i: usize) -> String {
    format!("192.168.50.{}", 21 + i)
}

fn machine_config(i: usize, nic: &NetAttachment, etcd_port: u16) -> String {
    format!(
        r#"version = 1
hostname = "bench-{i}"

[[network.links]]
mac = "{}"
address = "{}/24"

[fleet]
id = "bench-{i}"
endpoints = ["http://{}:{etcd_port}"]
insecure = true
ttl_s = 10
address = "{}/24"
labels = {{ node = "bench-{i}" }}
"#,
        nic.mac,
        private_address(i),
        caisson_qemu::HOST_FROM_GUEST,
        private_address(i),
    )
}

fn boot(disk: &Path, config: &Path, nic: &NetAttachment) -> Vm {
    let mut opts = VmOptions::new(disk);
    opts.disk = Disk::direct(disk);
    opts.memory_mib = 1024;
    opts.smp = 1;
    opts.networks = vec![nic.clone()];
    opts.fw_cfg = vec![("opt/caisson/config".into(), FwCfgValue::File(config.into()))];
    Vm::launch(opts).expect("launching QEMU")
}

/// Runs `argv` on the machine; its output (stdout and stderr), or a panic.
fn run(vm: &Vm, argv: &[&str]) -> String {
    let r = common::exec(vm, argv, 120);
    let e = r.exec.unwrap_or_else(|| panic!("{argv:?}: {:?}", r.error));
    assert_eq!(e.code, Some(0), "{argv:?}: {e:?}");
    e.output
}

/// Seconds from busybox `time`'s `real 0m 1.23s` line.
fn real_seconds(out: &str) -> f64 {
    let line = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("real"))
        .unwrap_or_else(|| panic!("no `real` line in {out:?}"));
    let (m, s) = line.trim().split_once('m').unwrap();
    m.trim().parse::<f64>().unwrap() * 60.0 + s.trim().trim_end_matches('s').parse::<f64>().unwrap()
}

/// `argv` timed by busybox `time`, in machine 0's own namespace or `client`'s.
fn timed(vm: &Vm, in_container: bool, script: &str) -> f64 {
    let mut argv = vec![];
    if in_container {
        argv.extend(["/bin/busybox", "nsenter", "--net=/run/caisson/netns/client"]);
    }
    argv.extend(["/bin/busybox", "time", "/bin/busybox", "sh", "-c", script]);
    real_seconds(&run(vm, &argv))
}

/// (MiB/s of the best of three fetches of the big file, ms per small request) from `base`.
fn measure(vm: &Vm, in_container: bool, base: &str) -> (f64, f64) {
    let big = format!("/bin/busybox wget -q -O /dev/null {base}/big");
    let best = (0..3)
        .map(|_| timed(vm, in_container, &big))
        .fold(f64::INFINITY, f64::min);
    let small = format!(
        "for i in $(/bin/busybox seq {REQUESTS}); do /bin/busybox wget -q -O /dev/null {base}/small; done"
    );
    let all = timed(vm, in_container, &small);
    (
        f64::from(BIG_MIB) / best,
        all * 1000.0 / f64::from(REQUESTS),
    )
}

fn units(archive: &str) -> Vec<UnitSpec> {
    let sink = format!(
        r#"command = ["/bin/busybox", "sh", "-c", "/bin/busybox mkdir -p /www && /bin/busybox dd if=/dev/zero of=/www/big bs=1M count={BIG_MIB} && echo x > /www/small && exec /bin/busybox httpd -f -p 80 -h /www"]
[constraints]
labels = {{ node = "bench-1" }}
[image]
path = "{archive}"
"#
    );
    let client = format!(
        r#"command = ["/bin/busybox", "sleep", "100000"]
[constraints]
labels = {{ node = "bench-0" }}
[image]
path = "{archive}"
"#
    );
    vec![
        UnitSpec::parse("sink", &sink).unwrap(),
        UnitSpec::parse("client", &client).unwrap(),
    ]
}

/// One backend: a fresh etcd and fresh disks, two machines, the measurements.
fn bench_backend(image: &Path, dir: &Path, backend: Backend, name: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = Etcd::start();
    let client = Client::new(&[etcd.endpoint()]).unwrap();
    let keys = Keys::new("/caisson/fleet/");
    let config = NetworkConfig {
        network: "10.42.0.0/16".parse().unwrap(),
        subnet_len: 24,
        backend,
    };
    rt.block_on(network::init(&client, &keys, &config)).unwrap();
    let segment = VirtualNetwork::new().unwrap();
    let mut vms: Vec<Vm> = (0..2)
        .map(|i| {
            let own = dir.join(format!("{name}-{i}"));
            std::fs::create_dir_all(&own).unwrap();
            let nic = segment.attach().unwrap();
            let cfg = own.join("machine.toml");
            std::fs::write(&cfg, machine_config(i, &nic, etcd.client_port)).unwrap();
            boot(&common::kept_overlay(image, &own), &cfg, &nic)
        })
        .collect();
    for vm in &mut vms {
        vm.wait_for("caisson: ready ", TIMEOUT).unwrap();
    }
    let store = Store::new(client.clone(), keys.clone());
    rt.block_on(store.submit(&units(common::BUSYBOX_ARCHIVE)))
        .unwrap();
    // The sink registered (it serves), the client runs, both subnets routed.
    let deadline = Instant::now() + TIMEOUT;
    let sink = loop {
        let (endpoints, _) = rt.block_on(services::endpoints(&client, &keys)).unwrap();
        let statuses = rt.block_on(store.statuses()).unwrap();
        let client_runs = statuses
            .iter()
            .any(|((_, u), s)| u == "client" && s.state == "running");
        if let (Some(sink), true) = (
            endpoints.units.get("sink").and_then(|v| v.first()),
            client_runs,
        ) {
            break sink.address;
        }
        assert!(Instant::now() < deadline, "sink and client: {endpoints:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    // The host-to-host peer: busybox httpd in machine 1's own namespace (it daemonizes).
    run(
        &vms[1],
        &[
            "/bin/busybox",
            "sh",
            "-c",
            &format!(
                "/bin/busybox mkdir -p /run/bench && /bin/busybox dd if=/dev/zero of=/run/bench/big bs=1M count={BIG_MIB} && echo x > /run/bench/small && /bin/busybox httpd -p {HOST_PORT} -h /run/bench"
            ),
        ],
    );
    // Wait until the container path answers (routes synced on both sides).
    let base = format!("http://{sink}");
    let probe = [
        "/bin/busybox",
        "nsenter",
        "--net=/run/caisson/netns/client",
        "/bin/busybox",
        "wget",
        "-q",
        "-O",
        "/dev/null",
        &format!("{base}/small"),
    ];
    while common::exec(&vms[0], &probe, 30)
        .exec
        .is_none_or(|e| e.code != Some(0))
    {
        assert!(
            Instant::now() < deadline,
            "{base} never answered the client"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let host_base = format!("http://{}:{HOST_PORT}", private_address(1));
    let (host_mib_s, host_ms) = measure(&vms[0], false, &host_base);
    let (ct_mib_s, ct_ms) = measure(&vms[0], true, &base);
    println!(
        "BENCH net_vm backend={name} host_mib_s={host_mib_s:.1} container_mib_s={ct_mib_s:.1} \
         ratio={:.2} host_req_ms={host_ms:.1} container_req_ms={ct_ms:.1} req_ratio={:.2}",
        ct_mib_s / host_mib_s,
        ct_ms / host_ms
    );
    drop(vms);
    drop(segment);
    drop(etcd);
}

#[test]
#[ignore = "a benchmark: ci/bench runs it"]
fn bench_container_network_across_two_vms() {
    let e2e = common::workspace().join("target/e2e");
    std::fs::create_dir_all(&e2e).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("bench-net-")
        .tempdir_in(&e2e)
        .unwrap();
    let spec = common::host_spec_with_busybox(dir.path(), "");
    let image = common::build(&spec, &dir.path().join("out"), &[]);
    let _one_vm = common::vm_lock();
    bench_backend(&image, dir.path(), Backend::HostGw, "host-gw");
    bench_backend(&image, dir.path(), Backend::vxlan(), "vxlan");
}
