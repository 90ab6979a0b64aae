//! Update benchmark in a VM (issue 5): a full update's apply throughput against a raw sequential
//! write of the same bytes to the same virtual disk, in the same boot.
//!
//! `cargo test --locked -p caisson-builder --test bench_update_vm -- --ignored --nocapture`
//! (also section 8 of `ci/bench`). One QEMU boot (TCG, `-cpu max`, 2 vCPUs, 1 GiB, the raw disk
//! as a virtio-blk drive with QEMU's default writeback cache) of `images/host.toml` built as v1
//! with a test key. v2 is a release of the same image whose root payload shares no chunk with
//! v1's: as many 4 KiB data blocks as v1's root, each from a seeded generator (incompressible,
//! as an lz4hc erofs nearly is), and their dm-verity tree, bundled by the crate's
//! `write_bundle_chunked` with v1's kernel and initramfs (unchanged, so taken from the ESP) and
//! published with `channel::publish`; `caisson serve` serves it on host loopback and the guest
//! reaches it at 10.0.2.2. Every root chunk is fetched; none is copied.
//!
//! In the guest, through the control channel's `exec` (times from `/proc/uptime`, after
//! dropping the page cache):
//! 1. `dd if=/dev/zero of=<root-b> bs=4M count=N conv=fsync` and with `oflag=direct` too:
//!    N × 4 MiB ≥ the root payload, into the inactive slot's partition, found by its partition
//!    number and start (from the image's GPT) under `/sys/block`;
//! 2. `caisson-update --config /run/bench-update.toml apply --now`: the updater's own timers
//!    (`+N ms` on each step line) give the time from its start to the slot verified (the step
//!    "writing the kernel and initramfs" begins once the read-back matched), and the
//!    `root timings` line how the root step was spent;
//! 3. the raw writes again (the apply sits between two of each), then what bounds the apply:
//!    `wget` of the bundle to /dev/null (the network), a read of the slot (the disk) and the
//!    guest CPU's flags (`sha_ni`).
//!
//! Prints `BENCH vm_apply key=value ...` lines. `BENCH_VM_MEM_MIB` and `BENCH_VM_SMP` change the
//! VM; `BENCH_VM_BINARIES=DIR` builds the image with the binaries in DIR (`caisson build
//! --binaries`: caisson-init, caisson-ctl, caisson-fleet, caisson-update), to compare builds.
//! Only loopback and the VM's own network.

#![allow(clippy::unwrap_used)]

mod common;

use caisson_layout::partition::Part;
use caisson_update::bundle::{write_bundle_chunked, ArtifactKind, BundleInput, Chunking, Manifest};
use caisson_update::channel::{self, PublishOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const BLOCK: usize = 4096;
const MIB: u64 = 1024 * 1024;

/// splitmix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(",")
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `images/host.toml` with its lock and files in `dir`, the test key baked in, and `exec` on the
/// control channel.
fn host_spec(dir: &Path) -> PathBuf {
    let ws = common::workspace();
    std::fs::create_dir_all(dir.join("host")).unwrap();
    common::run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(ws.join("images/host/files"))
            .arg(dir.join("host/files")),
    );
    std::fs::copy(ws.join("images/host.lock"), dir.join("host.lock")).unwrap();
    let spec = std::fs::read_to_string(ws.join("images/host.toml")).unwrap()
        + &common::debug_files(&dir.join("host/files"))
        + "\n[update]\npublic_keys = [\"keys/caisson.pub\"]\n";
    let path = dir.join("host.toml");
    std::fs::write(&path, spec).unwrap();
    path
}

/// Publishes into `www/stable` a v2 of the image built at `v1` (its bundle and manifest beside
/// it) whose root is `data_blocks` generated blocks and their verity tree; returns its manifest.
fn publish_v2(v1_raw: &Path, dir: &Path, key: &Path, www: &Path) -> Manifest {
    let v1_manifest = v1_raw.with_extension("manifest.json");
    let v1 = Manifest::load(&v1_manifest).unwrap();
    let v1_bundle = std::fs::File::open(v1_raw.with_extension("bundle")).unwrap();
    let out = dir.join("v2");
    std::fs::create_dir_all(&out).unwrap();
    let take = |kind: ArtifactKind, name: &str| {
        let a = v1.artifact(kind).unwrap();
        let mut buf = vec![0u8; a.size as usize];
        v1_bundle.read_exact_at(&mut buf, a.offset).unwrap();
        let p = out.join(name);
        std::fs::write(&p, buf).unwrap();
        p
    };
    let kernel = take(ArtifactKind::Kernel, "vmlinuz");
    let initrd = take(ArtifactKind::Initrd, "initrd");

    let blocks = v1.verity.data_blocks as usize;
    let mut data = vec![0u8; blocks * BLOCK];
    let mut s = mix(0x0B5E_55ED_u64);
    for w in data.chunks_exact_mut(8) {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        w.copy_from_slice(&mix(s).to_le_bytes());
    }
    let sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&data).into();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sha[..16]);
    let salt = caisson_layout::verity::derive_salt(&sha);
    let tree = caisson_layout::verity::build(&data[..], salt, uuid).unwrap();
    let root = out.join("root");
    let mut f = std::fs::File::create(&root).unwrap();
    f.write_all(&data).unwrap();
    f.write_all(&tree.bytes).unwrap();
    drop(f);
    drop(data);

    let bundle = out.join("host-2.0.0.bundle");
    let m = write_bundle_chunked(
        &BundleInput {
            image: &v1.image,
            version: "2.0.0",
            build_time: v1.build_time + 1,
            verity: tree.params,
            cmdline_extra: &v1.cmdline_extra,
            root: &root,
            kernel: &kernel,
            initrd: &initrd,
        },
        &bundle,
        &Chunking::default(),
    )
    .unwrap();
    let mpath = out.join("host-2.0.0.manifest.json");
    std::fs::write(&mpath, m.to_json()).unwrap();
    let chan = www.join("stable");
    channel::publish(&bundle, &mpath, &chan, key, &PublishOptions::default()).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    Manifest::load(&chan.join("host-2.0.0.manifest.json")).unwrap()
}

/// Runs `script` with the guest's busybox sh; returns its output (panics unless it exits 0).
fn sh(vm: &caisson_qemu::Vm, script: &str, timeout_s: u64) -> String {
    let r = common::exec(vm, &["/bin/busybox", "sh", "-c", script], timeout_s);
    let e = r
        .exec
        .unwrap_or_else(|| panic!("no exec result for {script:?}"));
    assert_eq!(e.code, Some(0), "{script}:\n{}", e.output);
    e.output
}

/// The seconds between the first two `/proc/uptime` lines `script` printed (its first field).
fn uptimes(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("UPTIME "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Runs `cmd` in the guest between two uptime readings, after syncing and dropping the page
/// cache; returns the seconds between them and the output.
fn timed(vm: &caisson_qemu::Vm, cmd: &str, timeout_s: u64) -> (f64, String) {
    let script = format!(
        "sync; echo 3 > /proc/sys/vm/drop_caches; echo UPTIME $(cat /proc/uptime); {cmd}; \
         rc=$?; echo UPTIME $(cat /proc/uptime); exit $rc"
    );
    let out = sh(vm, &script, timeout_s);
    let t = uptimes(&out);
    assert_eq!(t.len(), 2, "{out}");
    (t[1] - t[0], out)
}

fn mb_s(bytes: u64, s: f64) -> f64 {
    bytes as f64 / 1e6 / s
}

/// The `+N ms` the updater printed on the line holding `step`.
fn step_ms(out: &str, step: &str) -> Option<u64> {
    let line = out.lines().find(|l| l.contains(step))?;
    let at = line.rfind("(+")?;
    line[at + 2..].split(" ms").next()?.trim().parse().ok()
}

#[test]
#[ignore = "a benchmark: ci/bench runs it"]
fn bench_full_apply_in_a_vm_against_a_raw_write() {
    let root = common::workspace().join("target/e2e/bench-update-vm");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let caisson = env!("CARGO_BIN_EXE_caisson");
    let keys = root.join("spec/keys");
    common::run_ok(Command::new(caisson).args(["keygen", "--out"]).arg(&keys));
    let spec = host_spec(&root.join("spec"));
    // BENCH_VM_BINARIES=DIR: the image's own binaries prebuilt (`caisson build --binaries`), to
    // compare two builds of the updater.
    let binaries = std::env::var("BENCH_VM_BINARIES").ok();
    let extra: Vec<&str> = match &binaries {
        Some(dir) => vec!["--binaries", dir],
        None => vec![],
    };
    let v1 = common::build(spec.to_str().unwrap(), &root.join("v1"), &extra);
    let www = root.join("www");
    let m = publish_v2(&v1, &root, &keys.join("caisson.key"), &www);
    let payload = m.artifact(ArtifactKind::Root).unwrap().size;
    let layout = caisson_disk::read_layout(&v1).unwrap();
    let slot_b = layout.get(Part::RootB).unwrap().clone();

    let disk = root.join("disk.raw");
    common::run_ok(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&v1)
            .arg(&disk),
    );
    let server = common::Server::start(&www);
    let _one_vm = common::vm_lock();
    let mut opts = caisson_qemu::VmOptions::new(&disk);
    opts.disk = caisson_qemu::Disk::direct(&disk);
    opts.memory_mib = env_u64("BENCH_VM_MEM_MIB", 1024);
    opts.smp = env_u64("BENCH_VM_SMP", 2) as u32;
    let mut vm = caisson_qemu::Vm::launch(opts).unwrap();
    let ready = vm.wait_for("caisson: ready ", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("version=1.0.0 slot=a"), "{ready}");

    // The inactive slot's partition, by its number and start on the image's GPT.
    let parts = sh(
        &vm,
        "for p in /sys/block/*/*/partition; do d=${p%/partition}; \
         echo PART ${d##*/} $(cat $p) $(cat $d/start); done",
        30,
    );
    let dev = parts
        .lines()
        .filter_map(|l| l.strip_prefix("PART "))
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (n, start) = (
                f.get(1)?.parse::<u32>().ok()?,
                f.get(2)?.parse::<u64>().ok()?,
            );
            (n == slot_b.number && start * 512 == slot_b.start).then(|| format!("/dev/{}", f[0]))
        })
        .unwrap_or_else(|| {
            panic!(
                "no partition {} at {}:\n{parts}",
                slot_b.number, slot_b.start
            )
        });
    let count = payload.div_ceil(4 * MIB);
    let raw_bytes = count * 4 * MIB;
    assert!(raw_bytes <= slot_b.size);
    let flags = sh(&vm, "grep -m1 '^flags' /proc/cpuinfo", 30);
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    let cpu = format!(
        "sha_ni={} avx2={} ssse3={}",
        has("sha_ni"),
        has("avx2"),
        has("ssse3")
    );
    let dd = |direct: bool| {
        let cmd = format!(
            "busybox dd if=/dev/zero of={dev} bs=4M count={count} {}conv=fsync 2>&1",
            if direct { "oflag=direct " } else { "" }
        );
        let (s, out) = timed(&vm, &cmd, 1200);
        eprintln!("{cmd}: {s:.2} s\n{out}");
        s
    };
    let mut fsync = vec![dd(false)];
    let mut direct = vec![dd(true)];

    sh(
        &vm,
        &format!(
            "printf 'channel_url = \"http://10.0.2.2:{}/stable\"\\nstrategy = \"off\"\\n' \
             > /run/bench-update.toml",
            server.port
        ),
        30,
    );
    let load_before = loadavg();
    let (apply_s, out) = timed(
        &vm,
        "caisson-update --config /run/bench-update.toml apply --now 2>&1",
        3000,
    );
    eprintln!("caisson-update apply: {apply_s:.2} s\n{out}");
    assert!(out.contains("2.0.0 applied"), "{out}");
    // Start of the process to the slot verified: the kernel step begins once the read-back
    // matched.
    let verified_ms = step_ms(&out, "writing the kernel and initramfs").unwrap_or_else(|| {
        panic!("no step times in the updater's output:\n{out}");
    });
    let root_start_ms = step_ms(&out, "writing the root payload").unwrap_or(0);
    // "... (N chunks kept, N copied locally, N fetched in N requests, ...)"
    let copied: Option<u64> = out.split(" copied locally").next().and_then(|h| {
        h.rsplit(|c: char| !c.is_ascii_digit())
            .find(|w| !w.is_empty())?
            .parse()
            .ok()
    });
    let fetched = copied == Some(0);
    fsync.push(dd(false));
    direct.push(dd(true));
    let load_after = loadavg();

    // What bounds the apply: the network, the disk's read, the CPU.
    let (wget_s, _) = timed(
        &vm,
        &format!(
            "busybox wget -q -O /dev/null http://10.0.2.2:{}/stable/host-2.0.0.bundle",
            server.port
        ),
        1200,
    );
    let bundle_bytes = std::fs::metadata(www.join("stable/host-2.0.0.bundle"))
        .unwrap()
        .len();
    let (read_s, _) = timed(
        &vm,
        &format!("busybox dd if={dev} of=/dev/null bs=4M count={count} 2>&1"),
        1200,
    );
    let (sha_s, _) = timed(
        &vm,
        &format!("busybox dd if={dev} bs=4M count={count} 2>/dev/null | busybox sha256sum"),
        1200,
    );
    common::poweroff(&mut vm);
    drop(server);

    let apply_verified_s = verified_ms as f64 / 1000.0;
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    let apply_mb = mb_s(payload, apply_verified_s);
    let fsync_mb = mb_s(raw_bytes, best(&fsync));
    let direct_mb = mb_s(raw_bytes, best(&direct));
    let list = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    println!(
        "BENCH vm_apply payload_bytes={payload} apply_to_verified_s={apply_verified_s:.2} \
         root_step_starts_s={:.2} apply_command_s={apply_s:.2} apply_mb_s={apply_mb:.1} \
         all_fetched={fetched} raw_bytes={raw_bytes} dd_fsync_s={} dd_fsync_mb_s={fsync_mb:.1} \
         dd_direct_s={} dd_direct_mb_s={direct_mb:.1} apply_vs_dd_fsync={:.3} \
         apply_vs_dd_direct={:.3} load_before={load_before} load_after={load_after}",
        root_start_ms as f64 / 1000.0,
        list(&fsync),
        list(&direct),
        apply_mb / fsync_mb,
        apply_mb / direct_mb,
    );
    println!(
        "BENCH vm_apply_bounds wget_bundle_mb_s={:.1} read_slot_mb_s={:.1} \
         read_slot_busybox_sha256_mb_s={:.1} guest_{cpu}",
        mb_s(bundle_bytes, wget_s),
        mb_s(raw_bytes, read_s),
        mb_s(raw_bytes, sha_s),
    );
    for l in out.lines().filter(|l| l.contains("root timings")) {
        println!("BENCH vm_apply_root_timings {}", l.trim());
    }
}
