//! QEMU end-to-end: the fleet agent on one machine without etcd. A spec made from
//! `images/host.toml` bakes in an OCI archive (busybox from the build host) and two units in
//! `/etc/caisson/units/`; the agent imports the image into containerd and runs them: `hello`
//! prints a line and exits 3, `web` keeps running. The console shows the agent's state lines;
//! the line `hello` printed is in its log on the state partition.

#![allow(clippy::unwrap_used)]

mod common;

use common::request;

use caisson_layout::partition::Part;
use caisson_qemu::{Disk, Vm, VmOptions};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(420);
const BUSYBOX: &str = "/bin/busybox";

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// An OCI archive of one layer: /bin/busybox and /bin/sh, /bin/sleep linked to it.
fn busybox_archive(work: &Path, dest: &Path) {
    let layer_dir = work.join("layer");
    std::fs::create_dir_all(layer_dir.join("bin")).unwrap();
    std::fs::copy(BUSYBOX, layer_dir.join("bin/busybox")).unwrap();
    for l in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", layer_dir.join("bin").join(l)).unwrap();
    }
    let layer_tar = work.join("layer.tar");
    run(Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-C",
        ])
        .arg(&layer_dir)
        .arg("-cf")
        .arg(&layer_tar)
        .arg("bin"));
    let layer = std::fs::read(&layer_tar).unwrap();
    let l = digest(&layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["{l}"]}}}}"#
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{l}","size":{}}}]}}"#,
        digest(config.as_bytes()),
        config.len(),
        layer.len()
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"caisson.test/busybox:1"}}}}]}}"#,
        digest(manifest.as_bytes()),
        manifest.len()
    );
    let oci = work.join("oci");
    let blobs = oci.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for b in [layer.as_slice(), config.as_bytes(), manifest.as_bytes()] {
        std::fs::write(blobs.join(&digest(b)[7..]), b).unwrap();
    }
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(oci.join("index.json"), index).unwrap();
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    run(Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-C",
        ])
        .arg(&oci)
        .arg("-cf")
        .arg(dest)
        .args(["oci-layout", "index.json", "blobs"]));
}

const HELLO: &str = r#"command = ["/bin/sh", "-c", "echo hello from $WHO; exit 3"]
env = { WHO = "a caisson container" }
restart = "never"
[image]
path = "/usr/lib/caisson/images/busybox.oci.tar"
"#;

const WEB: &str = r#"command = ["/bin/sleep", "100000"]
[image]
path = "/usr/lib/caisson/images/busybox.oci.tar"
"#;

const EXTRA: &str = r#"
[[files]]
src = "usr/lib/caisson/images/busybox.oci.tar"
dst = "/usr/lib/caisson/images/busybox.oci.tar"

[[files]]
src = "etc/caisson/units/hello.toml"
dst = "/etc/caisson/units/hello.toml"

[[files]]
src = "etc/caisson/units/web.toml"
dst = "/etc/caisson/units/web.toml"
"#;

/// `images/host.toml` plus the archive and the units, in `dir` (with host's lock and files).
fn fleet_spec(dir: &Path) -> String {
    let ws = common::workspace();
    let files = dir.join("host/files");
    std::fs::create_dir_all(dir.join("host")).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg(ws.join("images/host/files"))
        .arg(&files));
    std::fs::copy(ws.join("images/host.lock"), dir.join("host.lock")).unwrap();
    busybox_archive(dir, &files.join("usr/lib/caisson/images/busybox.oci.tar"));
    let units = files.join("etc/caisson/units");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(units.join("hello.toml"), HELLO).unwrap();
    std::fs::write(units.join("web.toml"), WEB).unwrap();
    let spec = std::fs::read_to_string(ws.join("images/host.toml")).unwrap() + EXTRA;
    let path = dir.join("host.toml");
    std::fs::write(&path, spec).unwrap();
    path.display().to_string()
}

#[test]
fn the_agent_runs_local_units_without_etcd() {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: apt-get install -y busybox-static (ci/deps does)"
    );
    // Inside the workspace: the build finds the workspace above the spec for its binaries.
    let e2e = common::workspace().join("target/e2e");
    std::fs::create_dir_all(&e2e).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("fleet-")
        .tempdir_in(&e2e)
        .unwrap();
    let spec = fleet_spec(dir.path());
    let image = common::build(&spec, &dir.path().join("out"), &[]);
    let _one_vm = common::vm_lock();
    let disk = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&image)
        .arg(&disk));
    let mut opts = VmOptions::new(&disk);
    opts.disk = Disk::direct(&disk);
    let mut vm = Vm::launch(opts).expect("launching QEMU");

    let line = vm
        .wait_for("unit hello: exited 3", TIMEOUT)
        .expect("the agent runs hello to its exit code");
    assert!(line.contains("restarts 0"), "{line}");
    // web may report running before or after hello's exit: look back, then wait.
    if !vm.console_text().unwrap().contains("unit web: running") {
        vm.wait_for("unit web: running", TIMEOUT)
            .expect("the agent runs web");
    }
    let answer = request(&vm, r#"{"cmd":"poweroff"}"#);
    assert_eq!(answer["ok"], true, "{answer}");
    let status = vm.wait_exit(Duration::from_secs(120)).expect("powers off");
    assert!(status.success(), "QEMU exited with {status}");

    // hello's output, in its log on the state partition (mounted at /var).
    let raw = dir.path().join("flat.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&disk)
        .arg(&raw));
    let state = common::extract_partition(&raw, Part::State, dir.path());
    let log = common::check(
        "debugfs",
        &[
            "-R",
            "cat /log/caisson/fleet/hello.log",
            state.to_str().unwrap(),
        ],
    );
    assert!(log.contains("hello from a caisson container"), "{log}");
}
