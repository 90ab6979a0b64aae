//! QEMU end-to-end for the init's own features: DHCP on the first Ethernet interface, first-boot
//! growth of `state`, restart with backoff, a container from an OCI archive baked into the image,
//! and the numbers `ci/bench` reads (containerd spawn time, the init's resident memory).

#![allow(clippy::unwrap_used)]

mod common;

use common::{boot, kept_overlay, poweroff, request};

use caisson_layout::partition::Part;
use caisson_qemu::Vm;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

fn status(vm: &Vm) -> serde_json::Value {
    request(vm, &common::Request::Status)["status"].clone()
}

fn service(status: &serde_json::Value, name: &str) -> serde_json::Value {
    status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no service {name} in {status}"))
}

/// Polls `status` until `f` accepts it.
fn wait_status(vm: &Vm, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = status(vm);
        if f(&s) {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{what}: not seen in 120 s; last status {s}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn dhcp_address_and_state_grown_on_first_boot() {
    let image = common::image("minimal");
    let _one_vm = common::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let disk = kept_overlay(&image, dir.path());
    common::run_ok(
        Command::new("qemu-img")
            .arg("resize")
            .arg("-q")
            .arg(&disk)
            .arg("+1G"),
    );

    let mut vm = boot(&disk);
    vm.wait_for("caisson: ready ", BOOT_TIMEOUT)
        .expect("first boot reaches ready");
    let s = wait_status(&vm, "network up", |s| s["network"]["state"] == "up");
    assert_eq!(s["network"]["interface"], "eth0", "{s}");
    assert_eq!(s["network"]["address"], "10.0.2.15/24", "{s}");
    assert_eq!(s["network"]["gateway"], "10.0.2.2", "{s}");
    assert_eq!(s["network"]["dns"][0], "10.0.2.3", "{s}");
    let rss = s["init_rss_kib"].as_u64().expect("init_rss_kib");
    assert!(rss > 100 && rss < 64 * 1024, "{rss} KiB");
    let console = vm.console_text().unwrap();
    assert!(console.contains("first boot: state grown to"), "{console}");
    assert!(
        console.contains("network: eth0 10.0.2.15/24 via 10.0.2.2"),
        "{console}"
    );
    poweroff(&mut vm);
    drop(vm);

    // The partition ends where the disk's usable space does; ext4 fills it and is clean.
    let raw = dir.path().join("flat.raw");
    common::run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&disk)
            .arg(&raw),
    );
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    let state = parts.last().unwrap();
    let end = state["start"].as_u64().unwrap() + state["size"].as_u64().unwrap() - 1;
    assert_eq!(
        end,
        table["partitiontable"]["lastlba"].as_u64().unwrap(),
        "{table}"
    );
    let part_bytes = state["size"].as_u64().unwrap() * 512;
    assert!(part_bytes > 1 << 30, "{table}");
    common::run_ok(Command::new("sfdisk").arg("-V").arg(&raw));
    let state_img = common::extract_partition(&raw, Part::State, dir.path());
    common::check("e2fsck", &["-fn", state_img.to_str().unwrap()]);
    let header = common::check("dumpe2fs", &["-h", state_img.to_str().unwrap()]);
    let field = |name: &str| -> u64 {
        header
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {header}"))
    };
    let fs_bytes = field("Block count:") * field("Block size:");
    assert!(
        fs_bytes <= part_bytes && part_bytes - fs_bytes < 4 << 20,
        "filesystem {fs_bytes} B in a {part_bytes} B partition"
    );
    let marker = common::check(
        "debugfs",
        &[
            "-R",
            &format!("stat /{}", caisson_layout::paths::STATE_GROWN_MARKER),
            state_img.to_str().unwrap(),
        ],
    );
    assert!(marker.contains("Inode:"), "{marker}");
}

/// Slot a's kernel, initramfs and command line, copied out of `image`'s ESP into `dir`: the
/// entry as `caisson inspect` reads it, its files where the layout puts them.
fn slot_a_boot_files(image: &Path, dir: &Path) -> (PathBuf, PathBuf, String) {
    use caisson_layout::{paths, slot::Slot};
    let report = caisson_builder::inspect::inspect(image).unwrap();
    let entry = report
        .entries
        .iter()
        .find(|e| e.slot == Slot::A.as_str())
        .unwrap_or_else(|| panic!("no slot-a entry in {:?}", report.entries));
    let esp = common::extract_partition(image, Part::Esp, dir);
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd"));
    for (from, to) in [
        (paths::esp_kernel(&entry.version, Slot::A), &kernel),
        (paths::esp_initrd(&entry.version, Slot::A), &initrd),
    ] {
        common::check(
            "mcopy",
            &[
                "-o",
                "-i",
                esp.to_str().unwrap(),
                &format!("::/{from}"),
                to.to_str().unwrap(),
            ],
        );
    }
    (kernel, initrd, entry.options.clone())
}

/// Boots slot a of a copy of `image` (in `dir`) with its kernel loaded directly and the kernel
/// trace `events` printed to the console as they happen.
fn launch_traced(image: &Path, dir: &Path, events: &str) -> Vm {
    let disk = kept_overlay(image, dir);
    let (kernel, initrd, options) = slot_a_boot_files(image, dir);
    let mut opts = caisson_qemu::VmOptions::new(&disk);
    opts.disk = caisson_qemu::Disk::direct(&disk);
    opts.kernel = Some(caisson_qemu::DirectKernel {
        kernel,
        initrd,
        cmdline: format!("{options} loglevel=5 tp_printk trace_event={events}"),
    });
    Vm::launch(opts).expect("launching QEMU")
}

/// The console lines after line `from` up to the first one containing `until` (which must
/// appear; `what` names it in the failure), and the block requests PID 1's task (`[init]`)
/// issued among them.
fn init_reads_until<'a>(
    lines: &[&'a str],
    from: usize,
    until: &str,
    what: &str,
) -> (Vec<&'a str>, Vec<&'a str>) {
    let end = from
        + lines[from..]
            .iter()
            .position(|l| l.contains(until))
            .unwrap_or_else(|| panic!("no trace of {what}:\n{}", lines.join("\n")));
    let window = lines[from + 1..end].to_vec();
    let reads = window
        .iter()
        .copied()
        .filter(|l| l.contains("block_rq_issue") && l.trim_end().ends_with("[init]"))
        .collect();
    (window, reads)
}

/// Stage 1 asks for stage 2's binary before the switch (init/src/prefetch.rs), so stage 2 starts
/// without reading its own code from the verified root a page fault at a time. The kernel traces
/// every block request to the console: from stage 2's exec to its first cgroup (the step after
/// its mounts), PID 1 must issue none. Without the prefetch, about a dozen were traced there.
#[test]
fn stage2_starts_without_reading_its_own_binary() {
    let image = common::image("minimal");
    let _one_vm = common::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut vm = launch_traced(
        &image,
        dir.path(),
        "sched:sched_process_exec,cgroup:cgroup_mkdir,block:block_rq_issue",
    );
    vm.wait_for("caisson: ready ", BOOT_TIMEOUT)
        .expect("minimal reaches ready");
    let console = vm.console_text().unwrap();
    let lines: Vec<&str> = console.lines().collect();
    let exec = lines
        .iter()
        .position(|l| l.contains("sched_process_exec: filename=/sbin/init pid=1"))
        .unwrap_or_else(|| panic!("no trace of stage 2's exec on the console:\n{console}"));
    let (window, reads) = init_reads_until(&lines, exec, "cgroup_mkdir:", "the init's cgroup");
    assert!(
        reads.is_empty(),
        "stage 2 read from disk before its first cgroup:\n{}",
        window.join("\n")
    );
    poweroff(&mut vm);
}

/// Stage 1 also asks for each service's ELF interpreter, looked up inside the new root (Debian's
/// loader path is an absolute link). containerd is dynamically linked: between its clone and its
/// exec, the child (still named `init` until the exec's point of no return, while PID 1's
/// spawning thread waits for it) must issue no block request. Before the interpreter was
/// prefetched, four were traced there: the loader's directory, inode and header.
#[test]
fn host_services_exec_without_reading_the_loader() {
    let image = common::image("host");
    let _one_vm = common::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut vm = launch_traced(
        &image,
        dir.path(),
        "sched:sched_process_fork,sched:sched_process_exec,block:block_rq_issue",
    );
    vm.wait_for("caisson: ready ", BOOT_TIMEOUT)
        .expect("host reaches ready");
    let console = vm.console_text().unwrap();
    // containerd's pid from the kernel's own trace of its exec: a trace record is printed
    // whole, while the init's "spawned containerd (pid N)" line can be cut by one.
    let pid: u32 = console
        .lines()
        .find_map(|l| l.split("filename=/usr/bin/containerd pid=").nth(1))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no trace of containerd's exec:\n{console}"));
    let lines: Vec<&str> = console.lines().collect();
    let fork = lines
        .iter()
        .position(|l| l.contains(&format!("pid=1 child_comm=init child_pid={pid}")))
        .unwrap_or_else(|| panic!("no trace of containerd's clone (pid {pid}):\n{console}"));
    let (window, reads) = init_reads_until(
        &lines,
        fork,
        &format!("filename=/usr/bin/containerd pid={pid}"),
        "containerd's exec",
    );
    assert!(
        reads.is_empty(),
        "containerd's exec read from disk before its point of no return:\n{}",
        window.join("\n")
    );
    poweroff(&mut vm);
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Writes `blob` into an OCI layout's blob store and returns its descriptor.
fn put_blob(layout: &Path, media_type: &str, blob: &[u8]) -> serde_json::Value {
    let digest = sha256_hex(blob);
    std::fs::write(layout.join("blobs/sha256").join(&digest), blob).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{digest}"), "size": blob.len()})
}

fn tar_dir(dir: &Path, out: &Path) {
    common::run_ok(
        Command::new("tar")
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mtime=@1700000000",
                "-cf",
            ])
            .arg(out)
            .arg("-C")
            .arg(dir)
            .arg("."),
    );
}

/// An OCI image-layout archive of one layer holding the build host's static busybox.
fn busybox_oci_archive(work: &Path, out: &Path) {
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    let layer_tar = work.join("layer.tar");
    tar_dir(&rootfs, &layer_tar);
    let layout = work.join("oci");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let layer = std::fs::read(&layer_tar).unwrap();
    let layer_desc = put_blob(&layout, "application/vnd.oci.image.layer.v1.tar", &layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "echo", "hello-from-container"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    });
    let config_desc = put_blob(
        &layout,
        "application/vnd.oci.image.config.v1+json",
        config.to_string().as_bytes(),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    });
    let mut manifest_desc = put_blob(
        &layout,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    );
    manifest_desc["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
    manifest_desc["annotations"] = serde_json::json!({
        "io.containerd.image.name": "docker.io/caisson/hello:1",
        "org.opencontainers.image.ref.name": "1",
    });
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest_desc]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    tar_dir(&layout, out);
}

/// images/host.toml plus a service that fails every second, a oneshot that imports an OCI
/// archive baked into the image and runs it with ctr, and `exec` on the control channel.
fn host_test_spec(dir: &Path) -> PathBuf {
    let ws = common::workspace();
    let files = dir.join("host/files");
    for f in ["etc/caisson/init.toml", "etc/containerd/config.toml"] {
        std::fs::create_dir_all(files.join(f).parent().unwrap()).unwrap();
        std::fs::copy(ws.join("images/host/files").join(f), files.join(f)).unwrap();
    }
    std::fs::create_dir_all(files.join("usr/lib/caisson-test")).unwrap();
    busybox_oci_archive(
        &dir.join("oci-work"),
        &files.join("usr/lib/caisson-test/hello.tar"),
    );
    std::fs::copy(ws.join("images/host.lock"), dir.join("host.lock")).unwrap();
    let mut spec = std::fs::read_to_string(ws.join("images/host.toml")).unwrap();
    spec += &common::debug_files(&files);
    let sock = "/run/containerd/containerd.sock";
    spec += &format!(
        r#"
[[files]]
src = "usr/lib/caisson-test/hello.tar"
dst = "/usr/lib/caisson-test/hello.tar"

[services.flaky]
exec = "/bin/busybox"
args = ["sh", "-c", "echo flaky-start; sleep 1; exit 3"]
restart = "on-failure"
required = false

[services.hello]
kind = "oneshot"
exec = "/bin/busybox"
args = ["sh", "-c", "ctr -a {sock} images import /usr/lib/caisson-test/hello.tar && ctr -a {sock} run --rm docker.io/caisson/hello:1 hello /bin/busybox echo hello-from-container"]
requires = ["containerd"]
required = false
"#
    );
    let p = dir.join("host.toml");
    std::fs::write(&p, spec).unwrap();
    p
}

#[test]
fn host_restarts_a_failing_service_and_runs_a_baked_container() {
    let root = common::workspace().join("target/e2e/init-host");
    let _ = std::fs::remove_dir_all(&root);
    let spec = host_test_spec(&root.join("spec"));
    let raw = common::build(spec.to_str().unwrap(), &root.join("out"), &[]);
    let _one_vm = common::vm_lock();
    let disk = kept_overlay(&raw, &root);
    let mut vm = boot(&disk);
    let ready = vm
        .wait_for("caisson: ready ", BOOT_TIMEOUT)
        .expect("host reaches ready");
    eprintln!("{ready}");
    vm.wait_for("hello| hello-from-container", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("the container did not run: {e}"));
    let s = wait_status(&vm, "hello exited", |s| {
        service(s, "hello")["state"] == "exited"
    });
    assert_eq!(service(&s, "hello")["last_exit"], "exit code 0", "{s}");

    // flaky fails every second: restarted with a growing delay, containerd untouched.
    let containerd_pid = service(&s, "containerd")["pid"].clone();
    let first = service(&s, "flaky")["restarts"].as_u64().unwrap();
    let s = wait_status(&vm, "flaky restarted twice more", |s| {
        service(s, "flaky")["restarts"].as_u64().unwrap() >= first + 2
    });
    assert_eq!(service(&s, "flaky")["last_exit"], "exit code 3", "{s}");
    assert_eq!(service(&s, "containerd")["pid"], containerd_pid, "{s}");
    assert_eq!(service(&s, "containerd")["state"], "running", "{s}");
    assert_eq!(s["ready"], true, "{s}");
    let console = vm.console_text().unwrap();
    let starts = console.matches("flaky| flaky-start").count();
    assert!(starts >= 3, "{starts} starts:\n{console}");
    let spawned = console
        .lines()
        .find(|l| l.contains("spawned containerd"))
        .unwrap_or_else(|| panic!("no spawn time on the console:\n{console}"));
    eprintln!("{spawned}; init memory {} KiB", s["init_rss_kib"]);
    // RCU grace periods are expedited only until ready; cgroup2 favours dynamic moves.
    let out = common::exec(
        &vm,
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "cat /sys/kernel/rcu_expedited; grep cgroup2 /proc/mounts",
        ],
        30,
    );
    let text = out.exec.expect("an exec result").output;
    assert!(text.starts_with("0\n"), "{text}");
    assert!(text.contains("favordynmods"), "{text}");
    poweroff(&mut vm);
}

/// For `ci/bench`: boots images/host.toml twice and prints the init's numbers for each boot,
/// `BENCH boot=<1|2> containerd_spawn_ms=<ms since stage 2 began> init_rss_kib=<KiB after ready>`
/// and the init's own `stage 2 steps (ms)` line. The first boot looks for a machine config (and
/// finds none); the second, like every later boot of a machine, does not.
#[test]
#[ignore = "a benchmark: ci/bench runs it"]
fn bench_host_init_numbers() {
    let image = common::image("host");
    let _one_vm = common::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let disk = kept_overlay(&image, dir.path());
    for n in 1..=2 {
        let mut vm = boot(&disk);
        vm.wait_for("caisson: ready ", BOOT_TIMEOUT)
            .expect("host reaches ready");
        let console = vm.console_text().unwrap();
        let spawned = console
            .lines()
            .find(|l| l.contains("spawned containerd"))
            .unwrap_or_else(|| panic!("no spawn line on the console:\n{console}"));
        let ms: u64 = spawned
            .rsplit_once("at +")
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|num| num.parse().ok())
            .unwrap_or_else(|| panic!("no time in {spawned:?}"));
        // Let the boot settle before reading the init's memory.
        std::thread::sleep(Duration::from_secs(5));
        let rss = status(&vm)["init_rss_kib"].as_u64().expect("init_rss_kib");
        println!("BENCH boot={n} containerd_spawn_ms={ms} init_rss_kib={rss}");
        if let Some(steps) = console.lines().find(|l| l.contains("stage 2 steps (ms):")) {
            println!("BENCH boot={n} {}", steps.trim());
        }
        println!("BENCH boot={n} {}", spawned.trim());
        poweroff(&mut vm);
    }
}
