//! QEMU end-to-end: real images boot under OVMF + systemd-boot to the ready line, answer on the
//! init's control channel, power off cleanly, and keep their state across boots; the host image
//! carries what container networking needs (nft, the nftables and VXLAN modules).

#![allow(clippy::unwrap_used)]

mod common;

use common::{boot, kept_overlay, poweroff, request, Request};

use std::path::Path;
use std::time::Duration;

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

fn machine_id(state: &Path) -> String {
    let path = format!("/{}", caisson_layout::paths::STATE_MACHINE_ID);
    let out = common::check(
        "debugfs",
        &["-R", &format!("cat {path}"), state.to_str().unwrap()],
    );
    out.lines()
        .find(|l| l.len() == 32 && l.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no machine-id in state: {out}"))
        .to_string()
}

#[test]
fn minimal_boots_to_ready_powers_off_clean_and_keeps_state() {
    let image = common::image("minimal");
    let _one_vm = common::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let disk = kept_overlay(&image, dir.path());

    let mut vm = boot(&disk);
    let ready = vm
        .wait_for("caisson: ready ", BOOT_TIMEOUT)
        .expect("first boot reaches ready");
    assert!(ready.contains("version=1.0.0 slot=a boot_ms="), "{ready}");
    let status = request(&vm, &Request::Status);
    assert_eq!(status["status"]["ready"], true, "{status}");
    assert_eq!(status["status"]["slot"], "a", "{status}");
    // The shipped image (no caisson.debug, no debug file) refuses exec on the virtio port.
    let r = common::exec(&vm, &["/bin/true"], 10);
    assert!(!r.ok && r.exec.is_none(), "{r:?}");
    let why = r.error.unwrap_or_default();
    assert!(why.contains("caisson.debug"), "{why}");
    poweroff(&mut vm);
    drop(vm);

    // A clean shutdown leaves the state filesystem clean; first boot made a machine-id.
    let state = common::state_of(&disk, dir.path());
    common::check("e2fsck", &["-fn", state.to_str().unwrap()]);
    let first_id = machine_id(&state);

    let mut vm = boot(&disk);
    vm.wait_for("caisson: ready ", BOOT_TIMEOUT)
        .expect("second boot reaches ready");
    poweroff(&mut vm);
    drop(vm);
    let state = common::state_of(&disk, dir.path());
    common::check("e2fsck", &["-fn", state.to_str().unwrap()]);
    assert_eq!(machine_id(&state), first_id, "machine-id kept across boots");
}

#[test]
fn host_runs_containerd_under_the_init() {
    let image = common::vm_image("host");
    let _one_vm = common::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let disk = kept_overlay(&image, dir.path());
    let mut vm = boot(&disk);
    vm.wait_for("caisson: ready ", BOOT_TIMEOUT)
        .expect("host reaches ready");
    let status = request(&vm, &Request::Status);
    let services = status["status"]["services"].as_array().expect("services");
    let containerd = services
        .iter()
        .find(|s| s["name"] == "containerd")
        .unwrap_or_else(|| panic!("no containerd in {status}"));
    assert_eq!(containerd["state"], "running", "{containerd}");
    assert_eq!(containerd["ready"], true, "{containerd}");

    // Restarting containerd through the control channel brings it back ready.
    let answer = request(
        &vm,
        &Request::Restart {
            service: "containerd".into(),
        },
    );
    assert_eq!(answer["ok"], true, "{answer}");
    let mut back = false;
    for _ in 0..60 {
        std::thread::sleep(Duration::from_secs(1));
        let status = request(&vm, &Request::Status);
        let c = status["status"]["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "containerd").cloned());
        if c.is_some_and(|c| c["ready"] == true && c["state"] == "running") {
            back = true;
            break;
        }
    }
    assert!(back, "containerd came back ready after a restart");

    // A command through the control channel: its output (stdout and stderr) and exit code.
    let r = common::exec(
        &vm,
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox cat /proc/sys/kernel/hostname; echo to-stderr >&2; exit 3",
        ],
        30,
    );
    let e = r
        .exec
        .unwrap_or_else(|| panic!("no exec result: {:?}", r.error));
    assert_eq!(
        (e.code, e.signal, e.timed_out),
        (Some(3), None, false),
        "{e:?}"
    );
    assert_eq!(e.output, "caisson\nto-stderr\n");
    // One past its timeout has its process group killed, children included.
    let sleeps = "/bin/busybox sleep 60 & /bin/busybox sleep 60";
    let r = common::exec(&vm, &["/bin/busybox", "sh", "-c", sleeps], 1);
    let e = r
        .exec
        .unwrap_or_else(|| panic!("no exec result: {:?}", r.error));
    assert_eq!((e.signal, e.timed_out), (Some(9), true), "{e:?}");
    let ps = common::exec(&vm, &["/bin/busybox", "ps"], 30).exec.unwrap();
    assert!(
        !ps.output.contains("sleep 60"),
        "the sleeps were killed:\n{}",
        ps.output
    );
    // A program that is not there: a clear refusal, and the machine carries on.
    let r = common::exec(&vm, &["/no/such/program"], 30);
    assert!(!r.ok, "{r:?}");
    assert!(r.error.unwrap_or_default().contains("/no/such/program"));
    container_networking(&vm);
    poweroff(&mut vm);
}

/// Runs `script` with busybox sh in the guest; panics with its output unless it exits 0.
fn sh(vm: &caisson_qemu::Vm, script: &str) -> String {
    let r = common::exec(vm, &["/bin/busybox", "sh", "-c", script], 60);
    let e = r
        .exec
        .unwrap_or_else(|| panic!("no exec result for {script:?}: {:?}", r.error));
    assert_eq!(
        (e.code, e.signal, e.timed_out),
        (Some(0), None, false),
        "{script}\n{}",
        e.output
    );
    e.output
}

/// What the fleet agent's container networking (caisson-net) needs from the host image, with
/// nothing loaded on demand (the image has no modprobe): `nft` and its libraries, the nftables
/// expressions of the agent's own NAT table (nat chains, masquerade, dnat, ct, fib), a bridge
/// with a veth on it, and the VXLAN driver.
fn container_networking(vm: &caisson_qemu::Vm) {
    use caisson_net::{endpoint::Proto, nat};
    let empty: serde_json::Value =
        serde_json::from_str(&sh(vm, "/usr/sbin/nft -j list ruleset")).expect("nft -j prints JSON");
    assert!(empty["nftables"][0]["metainfo"].is_object(), "{empty}");

    // The very document the agent applies: one masquerade for the subnet, one for hairpin
    // (ct status dnat), fib daddr type local in prerouting and output, one dnat per port.
    let cfg = nat::NatConfig {
        subnet: "10.42.3.0/24".parse().unwrap(),
        cluster: "10.42.0.0/16".parse().unwrap(),
        ports: vec![nat::PublishedPort {
            host_port: 8080,
            proto: Proto::Tcp,
            addr: "10.42.3.2".parse().unwrap(),
            port: 80,
        }],
    };
    let doc = serde_json::to_string(&nat::ruleset(&cfg).unwrap()).unwrap();
    assert!(!doc.contains('\''), "{doc}");
    sh(vm, &format!("echo '{doc}' | /usr/sbin/nft -j -f -"));
    let table = sh(vm, "/usr/sbin/nft list table ip caisson");
    for rule in [
        "ip saddr 10.42.3.0/24 ip daddr != 10.42.0.0/16 masquerade",
        "ct status dnat masquerade",
        "fib daddr type local jump published",
        "tcp dport 8080 dnat to 10.42.3.2:80",
    ] {
        assert!(table.contains(rule), "no {rule:?} in:\n{table}");
    }
    let listed: serde_json::Value =
        serde_json::from_str(&sh(vm, "/usr/sbin/nft -j list table ip caisson")).unwrap();
    let rules = listed["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["rule"].is_object())
        .count();
    assert_eq!(rules, 5, "{listed}");
    sh(vm, "/usr/sbin/nft delete table ip caisson");
    let text = sh(vm, "/usr/sbin/nft list ruleset");
    assert!(text.trim().is_empty(), "left behind:\n{text}");

    // A bridge with one end of a veth pair on it (busybox names the peer itself), then gone.
    let links = sh(
        vm,
        "set -e; ip='/bin/busybox ip'
        $ip link add caisson-t0 type bridge
        $ip link add caisson-t1 type veth
        $ip link set caisson-t1 master caisson-t0
        $ip link set caisson-t0 up
        ls /sys/class/net/caisson-t0/brif
        $ip link del caisson-t1
        $ip link del caisson-t0
        ls /sys/class/net",
    );
    let (brif, after) = links.split_once('\n').unwrap();
    assert_eq!(brif, "caisson-t1", "{links}");
    assert!(
        !after.contains("caisson-t") && !after.contains("veth"),
        "{links}"
    );

    // busybox's ip cannot give a VXLAN its VNI: the driver is loaded, with its UDP tunnels.
    let loaded = sh(vm, "cat /proc/modules");
    let loaded: Vec<&str> = loaded.lines().filter_map(|l| l.split(' ').next()).collect();
    for m in [
        "vxlan",
        "udp_tunnel",
        "ip6_udp_tunnel",
        "veth",
        "bridge",
        "nf_tables",
    ] {
        assert!(loaded.contains(&m), "{m} not loaded: {loaded:?}");
    }
}

/// The host image carries `caisson-update`: its state partition holds slot a's chunk index where
/// the updater keeps the index of each installed slot, read back here with debugfs and loaded
/// by the updater's own code against the manifest's root hash and size.
#[test]
fn host_state_holds_slot_a_chunk_index_for_the_first_update() {
    let image = common::image("host");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.with_extension("manifest.json")).unwrap())
            .unwrap();
    let root_hex = manifest["verity"]["root_hash"].as_str().unwrap();
    let mut root = [0u8; 32];
    hex::decode_to_slice(root_hex, &mut root).unwrap();
    let size = manifest["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "root")
        .and_then(|a| a["size"].as_u64())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state =
        common::extract_partition(&image, caisson_layout::partition::Part::State, dir.path());
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let inside =
        caisson_update::chunk_cache::dir_in_state_partition().join(format!("{root_hex}.idx"));
    let out = cache.join(format!("{root_hex}.idx"));
    common::check(
        "debugfs",
        &[
            "-R",
            &format!("dump /{} {}", inside.display(), out.display()),
            state.to_str().unwrap(),
        ],
    );
    assert!(out.is_file(), "debugfs found no {}", inside.display());
    let chunking = caisson_update::bundle::Chunking::default();
    let index = caisson_update::chunk_cache::load(&cache, &root, size, &chunking)
        .expect("the kept index loads for slot a's root hash and size");
    assert_eq!(index.size(), size);
    assert!(index.chunks.len() > 1000, "{} chunks", index.chunks.len());
}
