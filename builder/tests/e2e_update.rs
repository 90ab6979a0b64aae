//! QEMU end-to-end updates:
//! - over HTTP: `caisson serve` on the host serves a channel holding a signed v2; a machine running
//!   v1 is provisioned (fw_cfg) with the channel URL and the update agent, which finds v2, writes
//!   slot B and reboots; the init blesses v2 and `caisson-update status --json` reports the
//!   success (the guest reaches the host at 10.0.2.2 through QEMU's user network); then a block
//!   of slot B changes on disk and is read through the verity device: the init reports it, marks
//!   2.0.0's blessed entry bad and reboots into 1.0.0 in slot A (init/VERITY.md);
//! - from a file in the state partition (the guest has no network):
//! - a machine running v2 applies a v3 that never becomes healthy: the init reboots each try,
//!   systemd-boot tries v3 three times, then boots v2 again, which says "rolled back from
//!   3.0.0" and refuses v3 from then on;
//! - a v4 whose kernel panics at every boot is tried three times the same way, then v2 runs again;
//! - power cuts (QEMU killed) at several points of an apply: v1 keeps booting, and the apply
//!   started again on each boot finally lands v2.
//!
//! The images (v1 to v4) are built once for the whole file; one VM runs at a time.

#![allow(clippy::unwrap_used)]

mod common;

use common::{poweroff, request, Server};

use caisson_layout::control::Request;
use caisson_layout::partition::Part;
use caisson_qemu::{Disk, Vm, VmOptions};
use serde_json::Value;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Where the test puts the bundle to apply, under `/var`.
const INBOX: &str = "lib/caisson/inbox";
/// Where the test images carry the build host's static busybox (Debian's busybox-static, which
/// ci/deps installs), for `exec` on the control channel.
const BUSYBOX: &str = "/usr/bin/busybox";
/// Seconds a tried boot may stay unhealthy before the init reboots it (the default is 300).
const UNHEALTHY_REBOOT_S: u64 = 10;

/// images/minimal.toml plus caisson-update, the test's public key, a oneshot service that applies
/// whatever bundle waits in the state partition's inbox and reboots, a oneshot `status`
/// (`caisson-update status --json`) the test starts through the control channel, and for
/// `exec` on that channel: the debug file that turns it on and the build host's static busybox
/// at [`BUSYBOX`] (minimal has no shell).
fn test_spec(dir: &Path, keys: &Path, extra: &str) -> PathBuf {
    let ws = common::workspace();
    // The spec's `[[files]]` sources are relative to `<spec dir>/minimal/files`.
    let files = dir.join("minimal/files");
    std::fs::create_dir_all(files.join("etc/caisson")).unwrap();
    let busybox = BUSYBOX.trim_start_matches('/');
    std::fs::create_dir_all(files.join(busybox).parent().unwrap()).unwrap();
    std::fs::copy("/bin/busybox", files.join(busybox)).unwrap();
    let mut init =
        std::fs::read_to_string(ws.join("images/minimal/files/etc/caisson/init.toml")).unwrap();
    init += &format!("unhealthy_reboot_s = {UNHEALTHY_REBOOT_S}\n");
    std::fs::write(dir.join("minimal/files/etc/caisson/init.toml"), init).unwrap();
    std::fs::copy(ws.join("images/minimal.lock"), dir.join("minimal.lock")).unwrap();
    if keys != dir.join("keys") {
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        std::fs::copy(keys.join("caisson.pub"), dir.join("keys/caisson.pub")).unwrap();
    }
    let mut spec = std::fs::read_to_string(ws.join("images/minimal.toml")).unwrap();
    spec = spec.replace(
        "version = \"1.0.0\"\n",
        "version = \"1.0.0\"\nbinaries = [\"caisson-update\"]\n",
    );
    spec += &common::debug_files(&files);
    spec += &format!("\n[[files]]\nsrc = \"{busybox}\"\ndst = \"{BUSYBOX}\"\nmode = \"0755\"\n");
    spec += &format!(
        r#"
[update]
public_keys = ["keys/caisson.pub"]

[services.update]
kind = "oneshot"
exec = "/usr/bin/caisson-update"
args = ["apply", "--file", "/var/{INBOX}/update.bundle", "--manifest", "/var/{INBOX}/update.manifest.json", "--reboot"]
# It mounts the ESP: vfat and its character sets are in the module lists.
after = ["modules"]
required = false

[services.status]
kind = "oneshot"
exec = "/usr/bin/caisson-update"
args = ["status", "--json"]
after = ["update"]
required = false
{extra}"#
    );
    let p = dir.join("minimal.toml");
    std::fs::write(&p, spec).unwrap();
    p
}

/// A required service that always fails: the machine never becomes ready.
const NEVER_HEALTHY: &str = r#"
[services.broken]
kind = "oneshot"
exec = "/usr/bin/caisson-update"
args = ["no-such-command"]
required = true
"#;

/// The three builds and the channel they are published in, made once.
struct Images {
    root: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
    chan: PathBuf,
    /// The directory `caisson serve` serves; its channel `http` holds v2 only.
    www: PathBuf,
}

fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let root = common::workspace().join("target/e2e/update");
        let _ = std::fs::remove_dir_all(&root);
        let caisson = env!("CARGO_BIN_EXE_caisson");
        let keys = root.join("spec/keys");
        common::run_ok(Command::new(caisson).args(["keygen", "--out"]).arg(&keys));
        let good = test_spec(&root.join("spec"), &keys, "");
        let bad = test_spec(&root.join("spec-v3"), &keys, NEVER_HEALTHY);
        let v1 = common::build(good.to_str().unwrap(), &root.join("v1"), &[]);
        let v2 = common::build(
            good.to_str().unwrap(),
            &root.join("v2"),
            &["--version", "2.0.0"],
        );
        common::build(
            bad.to_str().unwrap(),
            &root.join("v3"),
            &["--version", "3.0.0"],
        );
        // v4's kernel panics at every boot: no /init to run, so it looks for the root itself,
        // finds no disk driver and panics (panic=5 reboots).
        let panics = test_spec(&root.join("spec-v4"), &keys, "");
        let text = std::fs::read_to_string(&panics).unwrap();
        let with_rdinit = text.replace(
            "\"loglevel=4\"]",
            "\"loglevel=4\", \"rdinit=/nonexistent\"]",
        );
        assert_ne!(text, with_rdinit, "the spec's cmdline changed shape");
        std::fs::write(&panics, with_rdinit).unwrap();
        common::build(
            panics.to_str().unwrap(),
            &root.join("v4"),
            &["--version", "4.0.0"],
        );
        let chan = root.join("www/stable");
        for (dir, v) in [("v2", "2.0.0"), ("v3", "3.0.0"), ("v4", "4.0.0")] {
            common::run_ok(
                Command::new(caisson)
                    .arg("publish")
                    .arg(root.join(format!("{dir}/minimal-{v}.bundle")))
                    .arg("--channel-dir")
                    .arg(&chan)
                    .arg("--key")
                    .arg(keys.join("caisson.key")),
            );
        }
        // A channel with v2 alone, for the agent: it takes the newest version it is offered.
        common::run_ok(
            Command::new(caisson)
                .arg("publish")
                .arg(root.join("v2/minimal-2.0.0.bundle"))
                .arg("--channel-dir")
                .arg(root.join("www/http"))
                .arg("--key")
                .arg(keys.join("caisson.key")),
        );
        let www = root.join("www");
        Images {
            root,
            v1,
            v2,
            chan,
            www,
        }
    })
}

/// A raw disk for one test: a copy of `image` with `version`'s signed bundle in its inbox.
fn disk_with_update(image: &Path, version: &str, dir: &Path) -> PathBuf {
    disk_with_bundle(image, version, dir, None)
}

/// [`disk_with_update`], with the bundle's byte at `corrupt` flipped.
fn disk_with_bundle(image: &Path, version: &str, dir: &Path, corrupt: Option<u64>) -> PathBuf {
    let imgs = images();
    std::fs::create_dir_all(dir).unwrap();
    let disk = dir.join("disk.raw");
    std::fs::copy(image, &disk).unwrap();
    let state = common::extract_partition(&disk, Part::State, dir);
    let mut cmds = String::from("mkdir lib\nmkdir lib/caisson\nmkdir lib/caisson/inbox\n");
    for (from, to) in [
        ("bundle", "update.bundle"),
        ("manifest.json", "update.manifest.json"),
        ("manifest.json.minisig", "update.manifest.json.minisig"),
    ] {
        let mut f = imgs.chan.join(format!("minimal-{version}.{from}"));
        if let (Some(at), "bundle") = (corrupt, from) {
            let mut bytes = std::fs::read(&f).unwrap();
            bytes[at as usize] ^= 0x40;
            f = dir.join("corrupted.bundle");
            std::fs::write(&f, bytes).unwrap();
        }
        cmds += &format!("write {} {INBOX}/{to}\n", f.display());
    }
    let cmdfile = dir.join("debugfs.cmds");
    std::fs::write(&cmdfile, cmds).unwrap();
    common::run_ok(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&cmdfile)
            .arg(&state),
    );
    let layout = caisson_disk::read_layout(&disk).unwrap();
    let info = layout.get(Part::State).unwrap();
    let bytes = std::fs::read(&state).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.seek(SeekFrom::Start(info.start)).unwrap();
    f.write_all(&bytes).unwrap();
    disk
}

fn boot(disk: &Path) -> Vm {
    let mut opts = VmOptions::new(disk);
    opts.disk = Disk::direct(disk);
    opts.user_net = None;
    Vm::launch(opts).unwrap()
}

/// A machine config that turns on the update agent against `channel_url`.
fn agent_config(channel_url: &str) -> String {
    format!(
        r#"version = 1

[services.agent]
exec = "/usr/bin/caisson-update"
args = ["agent"]
after = ["network", "modules"]
restart = "always"
required = false

[update]
channel_url = "{channel_url}"
strategy = "immediate"
interval_s = 5
jitter_s = 0
"#
    )
}

/// Waits until the oneshot `name` has finished (exited or failed) and returns its status.
fn wait_oneshot(vm: &Vm, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = request(vm, &common::Request::Status);
        let svc = s["status"]["services"]
            .as_array()
            .and_then(|v| v.iter().find(|s| s["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no service {name}: {s}"));
        if svc["state"] == "exited" || svc["state"] == "failed" {
            return svc;
        }
        assert!(Instant::now() < deadline, "{name} did not finish: {svc}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs the `status` oneshot (`caisson-update status --json`) now and returns what it printed.
fn update_status(vm: &Vm) -> Value {
    wait_oneshot(vm, "status");
    let answer = request(
        vm,
        &common::Request::Start {
            service: "status".into(),
        },
    );
    assert_eq!(answer["ok"], true, "{answer}");
    std::thread::sleep(Duration::from_millis(500));
    let svc = wait_oneshot(vm, "status");
    assert_eq!(
        svc["state"], "exited",
        "caisson-update status failed: {svc}"
    );
    // The log holds every run since the first boot: the last JSON document is this one.
    let mut ctl = vm.control().unwrap();
    ctl.send_request(&common::Request::Logs {
        service: "status".into(),
        follow: false,
        lines: Some(400),
    })
    .unwrap();
    let mut lines = Vec::new();
    loop {
        let r = ctl.recv(Duration::from_secs(30)).unwrap();
        assert!(r.ok, "{r:?}");
        match r.line {
            Some(t) => lines.push(t),
            None => break,
        }
    }
    let start = lines.iter().rposition(|l| l == "{").expect("a JSON status");
    let text = lines[start..].join("\n");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// After a clean poweroff: the state filesystem is clean; returns the updater's record
/// (`/var/lib/caisson/update/state.json`).
fn record_on_disk(disk: &Path, dir: &Path) -> Value {
    let state = common::extract_partition(disk, Part::State, dir);
    let state = state.to_str().unwrap();
    common::check("e2fsck", &["-fn", state]);
    let out = common::check(
        "debugfs",
        &["-R", "cat /lib/caisson/update/state.json", state],
    );
    let json = &out[out.find('{').unwrap_or_else(|| panic!("no record: {out}"))..];
    // debugfs prints its banner after the file.
    serde_json::Deserializer::from_str(json)
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The boot entries on the ESP of a raw disk (mtools, no mounting).
fn entries(disk: &Path, dir: &Path) -> Vec<String> {
    let esp = common::extract_partition(disk, Part::Esp, dir);
    let out = common::check(
        "mdir",
        &["-b", "-i", esp.to_str().unwrap(), "::/loader/entries"],
    );
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter(|n| n.starts_with("caisson-"))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

#[test]
fn v1_finds_a_signed_v2_over_http_and_runs_it_blessed_from_slot_b() {
    let imgs = images();
    let dir = imgs.root.join("t-v2");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.raw");
    std::fs::copy(&imgs.v1, &disk).unwrap();
    let server = Server::start(&imgs.www);
    let config = dir.join("machine.toml");
    std::fs::write(
        &config,
        agent_config(&format!("http://10.0.2.2:{}/http", server.port)),
    )
    .unwrap();
    let _one_vm = common::vm_lock();
    let t0 = Instant::now();
    let mut opts = VmOptions::new(&disk);
    opts.disk = Disk::direct(&disk);
    opts.fw_cfg = vec![(
        "opt/caisson/config".into(),
        caisson_qemu::FwCfgValue::File(config.clone()),
    )];
    let mut vm = Vm::launch(opts).unwrap();
    let ready = vm.wait_for("caisson: ready ", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("version=1.0.0 slot=a"), "{ready}");
    // The agent finds v2 in the channel, writes slot B and a tried entry, reboots through the init.
    vm.wait_for("updating 1.0.0 -> 2.0.0", BOOT_TIMEOUT)
        .unwrap();
    vm.wait_for("next boot: caisson-2.0.0-b+3-0.conf", BOOT_TIMEOUT)
        .unwrap();
    let ready = vm
        .wait_for("caisson: ready ", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("v2 did not come up: {e}"));
    assert!(ready.contains("version=2.0.0 slot=b"), "{ready}");
    vm.wait_for("boot entry blessed: caisson-2.0.0-b.conf", BOOT_TIMEOUT)
        .unwrap();

    let status = update_status(&vm);
    assert_eq!(status["version"], "2.0.0", "{status}");
    assert_eq!(status["slot"], "b", "{status}");
    assert_eq!(status["blessed"], true, "{status}");
    assert_eq!(status["booted_entry"], "caisson-2.0.0-b.conf", "{status}");
    assert_eq!(status["record"]["last"]["result"], "succeeded", "{status}");
    assert_eq!(status["record"]["last"]["version"], "2.0.0", "{status}");
    assert_eq!(status["record"]["pending"], Value::Null, "{status}");
    assert_eq!(status["rolled_back_from"], Value::Null, "{status}");
    let to_v2 = t0.elapsed();

    // Then a block of the running slot's root changes on disk and is read through the verity
    // device: the init's watch sees the target turn corrupted, marks the blessed entry of 2.0.0
    // bad and reboots into 1.0.0 in slot A (init/VERITY.md).
    let t1 = Instant::now();
    let ordinary = vm.console_text().unwrap();
    assert!(
        !ordinary.contains("failed verification") && !ordinary.contains("is corrupted"),
        "no false alarm on the ordinary boots of v1 and v2"
    );
    let out = corrupt_and_read_root_block(&vm, CORRUPTED_BLOCK);
    assert!(out.contains("data=vda3\n"), "root-b is partition 3: {out}");
    assert!(
        out.contains("read failed"),
        "the block fails verification: {out}"
    );
    // dm-verity numbers data blocks from the start of the data device, the partition.
    vm.wait_for(
        format!("root slot b failed verification at block {CORRUPTED_BLOCK}").as_str(),
        BOOT_TIMEOUT,
    )
    .unwrap();
    vm.wait_for(
        "boot entry of 2.0.0 in slot b now caisson-2.0.0-b+0-1.conf; rebooting into 1.0.0 in slot a",
        BOOT_TIMEOUT,
    )
    .unwrap();
    let ready = vm.wait_for("caisson: ready ", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("version=1.0.0 slot=a"), "{ready}");
    // The updater cannot tell a slot marked bad from a version that never became healthy (the
    // failure record in /run is gone with the boot): it counts the fallback as a rollback and
    // never offers 2.0.0 again.
    vm.wait_for("rolled back from 2.0.0", BOOT_TIMEOUT).unwrap();
    let s = request(&vm, &Request::Status);
    assert_eq!(s["status"]["degraded"], Value::Null, "{s}");
    let console = vm.console_text().unwrap();
    // From the last line seen before the corruption (it may have been unfinished then).
    let since = ordinary.lines().count().saturating_sub(1);
    let reports: Vec<&str> = console
        .lines()
        .skip(since)
        .filter(|l| l.contains("failed verification"))
        .collect();
    assert_eq!(
        reports.len(),
        2,
        "one report of the corruption, one line saying what was done, none on v1's boot: {reports:?}"
    );
    assert!(
        !console.contains("not watching"),
        "every boot watched its root's verity target"
    );
    poweroff(&mut vm);
    drop(vm);
    drop(server);
    eprintln!(
        "v1 -> v2 over HTTP: {:.1} s in QEMU; slot B corrupted -> v1 in slot A: {:.1} s more",
        to_v2.as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );

    let rec = record_on_disk(&disk, &dir);
    assert_eq!(rec["last"]["result"], "rolled-back", "{rec}");
    assert_eq!(rec["last"]["from"], "2.0.0", "{rec}");
    assert_eq!(rec["rejected"][0], "2.0.0", "{rec}");
    assert_eq!(
        entries(&disk, &dir),
        ["caisson-1.0.0-a.conf", "caisson-2.0.0-b+0-1.conf"]
    );
}

/// The block of the running root [`corrupt_and_read_root_block`] changes.
const CORRUPTED_BLOCK: u64 = 100;

/// Through `exec`: overwrites 4 KiB block `block` of the partition under the root's verity
/// device with random bytes, then reads that block through the verity device (direct I/O:
/// nothing cached answers). Returns the output: `data=<partition>` and `read failed` or
/// `read ok`.
fn corrupt_and_read_root_block(vm: &Vm, block: u64) -> String {
    let script = format!(
        r#"set -e
bb={BUSYBOX}
dm=
for d in /sys/block/dm-*; do
  if [ "$($bb cat $d/dm/name)" = caisson-root ]; then dm=${{d##*/}}; fi
done
[ -n "$dm" ]
data=$($bb ls /sys/block/$dm/slaves)
echo "data=$data"
$bb dd if=/dev/urandom of=/dev/$data bs=4096 seek={block} count=1 conv=notrunc,fsync oflag=direct
echo 3 > /proc/sys/vm/drop_caches
if $bb dd if=/dev/$dm of=/dev/null bs=4096 skip={block} count=1 iflag=direct; then
  echo "read ok"
else
  echo "read failed"
fi
"#
    );
    let r = common::exec(vm, &[BUSYBOX, "sh", "-c", &script], 60);
    let e = r
        .exec
        .unwrap_or_else(|| panic!("no exec result: {:?}", r.error));
    assert_eq!((e.code, e.timed_out), (Some(0), false), "{e:?}");
    e.output
}

/// Puts `version` (which fails on every try) in the inbox of a v2 machine: v2 applies it and
/// reboots; each of three tries prints the `per_try` lines in order; then systemd-boot falls
/// back to v2 in slot A, which refuses `version` from then on. Returns the updater's status on
/// v2 after all that (the disk is checked here: the record and the entries).
fn tried_three_times_then_v2_again(version: &str, per_try: &[&str]) -> Value {
    let imgs = images();
    let dir = imgs.root.join(format!("t-{version}"));
    let _ = std::fs::remove_dir_all(&dir);
    let disk = disk_with_update(&imgs.v2, version, &dir);
    let _one_vm = common::vm_lock();
    let t0 = Instant::now();
    let mut vm = boot(&disk);
    let ready = vm.wait_for("caisson: ready ", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("version=2.0.0 slot=a"), "{ready}");
    vm.wait_for(
        format!("next boot: caisson-{version}-b+3-0.conf").as_str(),
        BOOT_TIMEOUT,
    )
    .unwrap();
    for _ in 0..3 {
        for line in per_try {
            vm.wait_for(*line, BOOT_TIMEOUT).unwrap();
        }
    }
    // Its tries used up, systemd-boot falls back to v2 in slot A.
    let ready = vm.wait_for("caisson: ready ", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("version=2.0.0 slot=a"), "{ready}");
    // The apply service finds the bad version in its inbox again and refuses it.
    let update = wait_oneshot(&vm, "update");
    assert_eq!(
        update["state"], "failed",
        "applying {version} again is refused: {update}"
    );
    let console = vm.console_text().unwrap();
    assert!(
        !console.contains(&format!("ready version={version}")),
        "{version} was never ready"
    );
    let last = per_try.last().unwrap();
    assert_eq!(
        console.matches(last).count(),
        3,
        "{version} was tried exactly three times"
    );
    let status = update_status(&vm);
    assert_eq!(status["version"], "2.0.0", "{status}");
    assert_eq!(status["slot"], "a", "{status}");
    assert_eq!(status["rolled_back_from"], version, "{status}");
    assert_eq!(
        status["record"]["last"]["result"], "rolled-back",
        "{status}"
    );
    assert_eq!(status["record"]["rejected"][0], version, "{status}");
    assert_eq!(status["next_boot"], "caisson-2.0.0-a.conf", "{status}");
    poweroff(&mut vm);
    drop(vm);
    eprintln!(
        "v2 -> {version} x3 -> v2: {:.1} s in QEMU",
        t0.elapsed().as_secs_f64()
    );
    let rec = record_on_disk(&disk, &dir);
    assert_eq!(rec["rejected"][0], version, "{rec}");
    assert_eq!(
        entries(&disk, &dir),
        [
            "caisson-2.0.0-a.conf".to_string(),
            format!("caisson-{version}-b+0-3.conf")
        ]
    );
    status
}

#[test]
fn v3_never_healthy_is_tried_three_times_then_v2_runs_again_and_v3_is_refused() {
    // Each try: v3 starts, never gets healthy, and the init reboots it.
    tried_three_times_then_v2_again(
        "3.0.0",
        &["stage 2: ", "not healthy in time on a tried boot entry"],
    );
}

#[test]
fn v4_whose_kernel_panics_is_tried_three_times_then_v2_runs_again() {
    tried_three_times_then_v2_again("4.0.0", &["Kernel panic - not syncing"]);
}

/// Power cuts during `apply`: the issue's 20 (about 14 s each under TCG), each at a different
/// point of writing and verifying slot B; `CAISSON_POWER_CUTS=N` runs N instead.
fn power_cuts() -> usize {
    std::env::var("CAISSON_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[test]
fn power_cuts_during_apply_keep_v1_running_then_v2_lands() {
    // Where to cut: each is a line the apply prints before the new entry is written.
    const POINTS: &[&str] = &[
        "update| [INFO  caisson_update] root payload: 10%",
        "update| [INFO  caisson_update] verifying the written slot",
        "update| [INFO  caisson_update] root payload: 50%",
        "update| [INFO  caisson_update] writing the root payload",
        "update| [INFO  caisson_update] root payload: 90%",
        "update| [INFO  caisson_update] root payload: 30%",
        "update| [INFO  caisson_update] invalidating the inactive slot's boot entry",
    ];
    let imgs = images();
    let dir = imgs.root.join("t-cuts");
    let _ = std::fs::remove_dir_all(&dir);
    let disk = disk_with_update(&imgs.v1, "2.0.0", &dir);
    let _one_vm = common::vm_lock();
    let t0 = Instant::now();
    let cuts = power_cuts();
    for i in 0..cuts {
        let mut vm = boot(&disk);
        let ready = vm.wait_for("caisson: ready ", BOOT_TIMEOUT).unwrap();
        assert!(
            ready.contains("version=1.0.0 slot=a"),
            "after {i} cuts v1 still runs: {ready}"
        );
        let point = POINTS[i % POINTS.len()];
        vm.wait_for(point, BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("cut {i}: {point}: {e}"));
        // Somewhere in the next quarter second, not on the line itself: 0, 25, ... 250 ms.
        let after = Duration::from_millis((i as u64 * 37 % 11) * 25);
        std::thread::sleep(after);
        eprintln!("cut {i}: {:?} after {point:?}", after);
        vm.kill().unwrap();
        drop(vm);
    }
    // Uninterrupted at last: the apply finishes, reboots into v2, which is blessed.
    let mut vm = boot(&disk);
    let ready = vm.wait_for("caisson: ready ", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("version=1.0.0 slot=a"), "{ready}");
    vm.wait_for("next boot: caisson-2.0.0-b+3-0.conf", BOOT_TIMEOUT)
        .unwrap();
    let ready = vm.wait_for("caisson: ready ", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("version=2.0.0 slot=b"), "{ready}");
    vm.wait_for("boot entry blessed: caisson-2.0.0-b.conf", BOOT_TIMEOUT)
        .unwrap();
    let status = update_status(&vm);
    assert_eq!(status["record"]["last"]["result"], "succeeded", "{status}");
    poweroff(&mut vm);
    drop(vm);
    eprintln!(
        "{cuts} power cuts during apply, then v2: {:.1} s in QEMU",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        entries(&disk, &dir),
        ["caisson-1.0.0-a.conf", "caisson-2.0.0-b.conf"]
    );
}

#[test]
fn a_corrupted_bundle_is_refused_and_nothing_changes() {
    let imgs = images();
    let dir = imgs.root.join("t-corrupt");
    let _ = std::fs::remove_dir_all(&dir);
    // One byte in the middle of the root payload.
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(imgs.chan.join("minimal-2.0.0.manifest.json")).unwrap(),
    )
    .unwrap();
    let root = manifest["artifacts"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["kind"] == "root"))
        .unwrap();
    let at = root["offset"].as_u64().unwrap() + root["size"].as_u64().unwrap() / 2;
    let disk = disk_with_bundle(&imgs.v1, "2.0.0", &dir, Some(at));
    let before = common::extract_partition(&disk, Part::RootB, &dir);
    let before = std::fs::read(before).unwrap();
    let entries_before = entries(&disk, &dir);
    let _one_vm = common::vm_lock();
    let mut vm = boot(&disk);
    let ready = vm.wait_for("caisson: ready ", BOOT_TIMEOUT).unwrap();
    assert!(ready.contains("version=1.0.0 slot=a"), "{ready}");
    let update = wait_oneshot(&vm, "update");
    assert_eq!(
        update["state"], "failed",
        "the corrupted bundle is refused: {update}"
    );
    let console = vm.console_text().unwrap();
    assert!(
        console.contains("sha256"),
        "the refusal names the hash mismatch"
    );
    poweroff(&mut vm);
    drop(vm);
    assert_eq!(
        entries(&disk, &dir),
        entries_before,
        "boot entries unchanged"
    );
    let after = common::extract_partition(&disk, Part::RootB, &dir);
    assert!(std::fs::read(after).unwrap() == before, "slot B unchanged");
}
