//! Registry pull benchmark in a VM (issue 17): the fleet agent pulling an image of about 30 MiB
//! from a registry on the host, timed against what bounds it in the same guest and against
//! skopeo on the host.
//!
//! `cargo test --locked -p caisson-builder --test bench_pull_vm -- --ignored --nocapture` (also
//! in `ci/bench`). Debian's docker-registry on host loopback (the guest reaches it at
//! 10.0.2.2), an image of busybox plus `PULL_BENCH_MB` (30) MiB of incompressible bytes pushed
//! with skopeo (gzip). One TCG boot (2 vCPUs, 1 GiB) of `images/host.toml` with two units baked
//! in that name the image by reference, so the agent starts pulling as soon as it runs:
//! 1. the pull: from the agent's `pulling image` console line to its `pulled image` line, as the
//!    host sees the console (manifest, config, the layer streamed into containerd's content
//!    store with its digest checked, unpacked onto a snapshot);
//! 2. both units running, and the registry's blob GETs: the second unit pulls nothing;
//! 3. in the same guest, through the control channel: busybox `wget` of the same layer blob to
//!    /dev/null (the network and the guest's CPU, no checks, nothing written);
//! 4. on the host: `skopeo copy docker://… oci:DIR` of the same image (download and digest
//!    checks, no unpack) — skopeo is not in the image.
//!
//! Prints `BENCH pull_vm key=value ...`. Only loopback and the VM's own network.

#![allow(clippy::unwrap_used)]

mod common;

#[path = "../../fleet/tests/common/containerd.rs"]
mod testbed;

use common::registry::{noise, Registry, SKOPEO};
use std::process::Command;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(600);

const EXTRA: &str = r#"
[[files]]
src = "etc/caisson/fleet.toml"
dst = "/etc/caisson/fleet.toml"

[[files]]
src = "etc/caisson/units/big-1.toml"
dst = "/etc/caisson/units/big-1.toml"

[[files]]
src = "etc/caisson/units/big-2.toml"
dst = "/etc/caisson/units/big-2.toml"
"#;

/// The pushed image's manifest, as skopeo reads it from the registry.
fn manifest(reference: &str) -> serde_json::Value {
    let raw = common::run_ok(
        Command::new(SKOPEO)
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{reference}")),
    );
    serde_json::from_str(&raw).unwrap()
}

/// Waits for `pattern` on the console after `from` bytes; the host's time when it was seen.
fn seen(vm: &mut caisson_qemu::Vm, from: usize, pattern: &str) -> Instant {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = vm.console_text().unwrap();
        if text.get(from..).is_some_and(|t| t.contains(pattern)) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{pattern:?} not on the console: {}",
            vm.console_tail(30).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "a benchmark: ci/bench runs it"]
fn bench_registry_pull_in_a_vm() {
    if let Some(why) = testbed::missing().or_else(common::registry::missing) {
        panic!("{why}");
    }
    let mb: usize = std::env::var("PULL_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let e2e = common::workspace().join("target/e2e");
    std::fs::create_dir_all(&e2e).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("bench-pull-")
        .tempdir_in(&e2e)
        .unwrap();
    let w = dir.path();

    let registry = Registry::start(&w.join("storage"), "");
    let layer = testbed::busybox_layer_with(&["sh", "sleep"], &[("data/noise", &noise(mb << 20))]);
    let archive = w.join("big.tar");
    testbed::oci_archive(
        &archive,
        std::slice::from_ref(&layer),
        &[testbed::digest(&layer)],
    );
    registry.push(&archive, "bench/big:1");
    let m = manifest(&format!("{}/bench/big:1", registry.host()));
    let blob = m["layers"][0]["digest"].as_str().unwrap().to_string();
    let blob_bytes = m["layers"][0]["size"].as_u64().unwrap();

    let spec = common::host_spec_with_busybox(w, EXTRA);
    let files = w.join("host/files/etc/caisson");
    std::fs::create_dir_all(files.join("units")).unwrap();
    let reference = format!("{}/bench/big:1", registry.guest_host());
    for unit in ["big-1", "big-2"] {
        std::fs::write(
            files.join(format!("units/{unit}.toml")),
            format!("command = [\"/bin/sleep\", \"100000\"]\n[image]\nref = \"{reference}\"\n"),
        )
        .unwrap();
    }
    std::fs::write(
        files.join("fleet.toml"),
        format!(
            "[registries.\"{}\"]\ninsecure = true\n",
            registry.guest_host()
        ),
    )
    .unwrap();
    let image = common::build(&spec, &w.join("out"), &[]);
    let disk = w.join("disk.qcow2");
    common::run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&image)
            .arg(&disk),
    );
    let mut opts = caisson_qemu::VmOptions::new(&disk);
    opts.disk = caisson_qemu::Disk::direct(&disk);
    opts.memory_mib = 1024;
    opts.smp = 2;
    let gets0 = registry.blob_gets();
    let mut vm = caisson_qemu::Vm::launch(opts).expect("launching QEMU");

    let t0 = seen(&mut vm, 0, "pulling image ");
    let t1 = seen(&mut vm, 0, "pulled image ");
    let pull_s = (t1 - t0).as_secs_f64();
    seen(&mut vm, 0, "unit big-1: running");
    seen(&mut vm, 0, "unit big-2: running");
    seen(&mut vm, 0, "caisson: ready ");
    let gets = registry.blob_gets() - gets0;
    let pulling = vm.console_text().unwrap().matches("pulling image ").count();

    // The same blob with busybox wget, timed in the guest.
    let url = format!("http://{}/v2/bench/big/blobs/{blob}", registry.guest_host());
    let script = format!(
        "sync; echo 3 > /proc/sys/vm/drop_caches; read a _ < /proc/uptime; \
         /bin/busybox wget -q -O /dev/null {url} || exit 9; read b _ < /proc/uptime; echo \"WGET $a $b\""
    );
    let r = common::exec(&vm, &["/bin/busybox", "sh", "-c", &script], 300);
    let e = r
        .exec
        .unwrap_or_else(|| panic!("no exec result: {:?}", r.error));
    assert_eq!(e.code, Some(0), "{}", e.output);
    let times: Vec<f64> = e
        .output
        .lines()
        .find_map(|l| l.strip_prefix("WGET "))
        .unwrap_or_else(|| panic!("no times: {}", e.output))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let wget_s = times[1] - times[0];
    common::poweroff(&mut vm);

    let t = Instant::now();
    common::run_ok(
        Command::new(SKOPEO)
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{}/bench/big:1", registry.host()))
            .arg(format!("oci:{}:big", w.join("skopeo-oci").display())),
    );
    let skopeo_s = t.elapsed().as_secs_f64();
    let mib = blob_bytes as f64 / 1048576.0;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "BENCH pull_vm layer_mib={mib:.1} pull_s={pull_s:.2} pull_mib_s={:.1} blob_gets={gets} \
         pulls_started={pulling} wget_s={wget_s:.2} wget_mib_s={:.1} pull_vs_wget={:.2} \
         host_skopeo_copy_s={skopeo_s:.2} load={}",
        mib / pull_s,
        mib / wget_s,
        pull_s / wget_s,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join("/")
    );
    assert_eq!(pulling, 1, "one pull for two units");
}
