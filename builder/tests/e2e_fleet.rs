//! QEMU end-to-end: the fleet agent on one machine without etcd. A spec made from
//! `images/host.toml` bakes in an OCI archive (busybox from the build host) and two units in
//! `/etc/caisson/units/`; the agent imports the image into containerd and runs them: `hello`
//! prints a line and exits 3, `web` keeps running. A third unit, `pulled`, names its image by
//! reference in a registry on the host (Debian's docker-registry on loopback, reached from the
//! guest at 10.0.2.2, the image pushed there with skopeo): the agent pulls it over the user
//! network and runs it. A fourth, `keeper`, has a volume: its first run writes a token there
//! and exits 1, its restart finds the token; the machine reboots and the unit, started again,
//! finds it once more. The console shows the agent's state lines; what the units printed is in
//! their logs on the state partition, and the token in the volume's directory there.
//!
//! Networking: the units run in their own network namespaces on the machine's bridge. `web`
//! (busybox httpd on its port 80) publishes 8080, which the host reaches through QEMU's
//! forward; `finder` finds `web.caisson` through the machine's DNS responder and fetches the
//! page, which its log shows.

#![allow(clippy::unwrap_used)]

mod common;

use common::registry::Registry;
use common::request;

use caisson_layout::partition::Part;
use caisson_qemu::{Disk, Vm, VmOptions};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(420);
const BUSYBOX: &str = "/bin/busybox";

const HELLO: &str = r#"command = ["/bin/sh", "-c", "echo hello from $WHO; exit 3"]
env = { WHO = "a caisson container" }
restart = "never"
[image]
path = "/usr/lib/caisson/images/busybox.oci.tar"
"#;

/// busybox httpd on the container's port 80, published on the machine's 8080.
const WEB: &str = r#"command = ["/bin/sh", "-c", "mkdir -p /tmp/www && echo hello-web > /tmp/www/index.html && exec /bin/busybox httpd -f -p 80 -h /tmp/www"]
ports = ["8080:80"]
[image]
path = "/usr/lib/caisson/images/busybox.oci.tar"
"#;

/// Finds web by name through the machine's DNS responder and fetches its page.
const FINDER: &str = r#"command = ["/bin/sh", "-c", "i=0; while [ $i -lt 300 ]; do if page=$(/bin/busybox wget -q -O - http://web.caisson/index.html); then echo got=$page; exit 0; fi; i=$((i+1)); sleep 1; done; echo gave-up; exit 1"]
restart = "never"
[image]
path = "/usr/lib/caisson/images/busybox.oci.tar"
"#;

const EXTRA: &str = r#"
[[files]]
src = "etc/caisson/units/hello.toml"
dst = "/etc/caisson/units/hello.toml"

[[files]]
src = "etc/caisson/units/pulled.toml"
dst = "/etc/caisson/units/pulled.toml"

[[files]]
src = "etc/caisson/fleet.toml"
dst = "/etc/caisson/fleet.toml"

[[files]]
src = "etc/caisson/units/keeper.toml"
dst = "/etc/caisson/units/keeper.toml"

[[files]]
src = "etc/caisson/units/web.toml"
dst = "/etc/caisson/units/web.toml"

[[files]]
src = "etc/caisson/units/finder.toml"
dst = "/etc/caisson/units/finder.toml"
"#;

/// A unit whose first run writes `token` into its volume and fails; every later run finds it.
fn keeper(token: &str) -> String {
    format!(
        r#"command = ["/bin/sh", "-c", "if read m < /data/mark; then echo found $m; exec sleep 100000; fi; echo {token} > /data/mark; echo created {token}; exit 1"]
volumes = [{{ name = "data", path = "/data" }}]
[image]
path = "/usr/lib/caisson/images/busybox.oci.tar"
"#
    )
}

/// `images/host.toml` plus the archive and the units, in `dir` (with host's lock and files);
/// the archive is pushed to `registry` too, for the unit that pulls it.
fn fleet_spec(dir: &Path, registry: &Registry, token: &str) -> String {
    let spec = common::host_spec_with_busybox(dir, EXTRA);
    let files = dir.join("host/files");
    let archive = files.join(common::BUSYBOX_ARCHIVE.trim_start_matches('/'));
    registry.push(&archive, "team/busybox:1");
    let reference = format!("{}/team/busybox:1", registry.guest_host());
    let units = files.join("etc/caisson/units");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(units.join("hello.toml"), HELLO).unwrap();
    std::fs::write(units.join("web.toml"), WEB).unwrap();
    std::fs::write(units.join("finder.toml"), FINDER).unwrap();
    std::fs::write(units.join("keeper.toml"), keeper(token)).unwrap();
    std::fs::write(
        units.join("pulled.toml"),
        format!(
            "command = [\"/bin/sh\", \"-c\", \"echo pulled from a registry; exit 0\"]\n\
             restart = \"never\"\n[image]\nref = \"{reference}\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        files.join("etc/caisson/fleet.toml"),
        format!(
            "[registries.\"{}\"]\ninsecure = true\n",
            registry.guest_host()
        ),
    )
    .unwrap();
    spec
}

/// GETs `/index.html` from the host's `port` until the answer holds `want`.
fn fetch_until(port: u16, want: &str, timeout: Duration) -> String {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        let got = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match got {
            Ok(page) if page.contains(want) => return page,
            Ok(page) => last = page,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!("port {port} did not answer {want:?} within {timeout:?}: {last}");
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
    if let Some(why) = common::registry::missing() {
        panic!("{why}");
    }
    let registry = Registry::start(&dir.path().join("registry"), "");
    let token = format!(
        "token-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let spec = fleet_spec(dir.path(), &registry, &token);
    let image = common::build(&spec, &dir.path().join("out"), &[]);
    let _one_vm = common::vm_lock();
    let disk = dir.path().join("disk.qcow2");
    common::run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&image)
            .arg(&disk),
    );
    let mut opts = VmOptions::new(&disk);
    opts.disk = Disk::direct(&disk);
    // The host reaches web's published port 8080 through QEMU's forward.
    let web_port = common::registry::free_port();
    opts.user_net = Some(caisson_qemu::UserNet {
        forwards: vec![(web_port, 8080)],
        restrict: false,
    });
    let mut vm = Vm::launch(opts).expect("launching QEMU");

    let line = vm
        .wait_for("unit hello: exited 3", TIMEOUT)
        .expect("the agent runs hello to its exit code");
    assert!(line.contains("restarts 0"), "{line}");
    // web may report running before or after hello's exit: look back, then wait.
    for line in ["unit web: running", "unit pulled: exited 0"] {
        if !vm.console_text().unwrap().contains(line) {
            vm.wait_for(line, TIMEOUT).unwrap_or_else(|e| {
                panic!(
                    "{e}: waiting for {line:?}\nregistry log:\n{}",
                    registry.log()
                )
            });
        }
    }
    // web is on its own address on the machine's bridge; its published port answers.
    let page = fetch_until(web_port, "hello-web", TIMEOUT);
    assert!(page.contains("hello-web"), "{page}");
    // finder found web by name (the machine's DNS responder) and fetched its page.
    if !vm.console_text().unwrap().contains("unit finder: exited 0") {
        vm.wait_for("unit finder: exited 0", TIMEOUT)
            .unwrap_or_else(|e| {
                panic!(
                    "{e}: finder did not reach web by name\n{}",
                    vm.console_tail(40).unwrap_or_default()
                )
            });
    }
    // keeper: written, failed, restarted, found.
    if !vm
        .console_text()
        .unwrap()
        .contains("unit keeper: running (restarts 1)")
    {
        vm.wait_for("unit keeper: running (restarts 1)", TIMEOUT)
            .expect("keeper is restarted after its first run");
    }
    // A reboot: the task is gone, the agent starts it again on the same volume.
    let readies = |vm: &mut Vm| {
        vm.console_text()
            .unwrap()
            .matches("caisson: ready ")
            .count()
    };
    if readies(&mut vm) == 0 {
        vm.wait_for("caisson: ready ", TIMEOUT)
            .expect("the first boot is ready");
    }
    let before = readies(&mut vm);
    let _ = request(&vm, &common::Request::Reboot);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while readies(&mut vm) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the machine does not come back: {}",
            vm.console_tail(30).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    vm.wait_for("unit keeper: running (restarts 2)", TIMEOUT)
        .expect("keeper runs again after the reboot");
    let answer = request(&vm, &common::Request::Poweroff);
    assert_eq!(answer["ok"], true, "{answer}");
    let status = vm.wait_exit(Duration::from_secs(120)).expect("powers off");
    assert!(status.success(), "QEMU exited with {status}");

    // hello's output, in its log on the state partition (mounted at /var).
    let raw = dir.path().join("flat.raw");
    common::run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&disk)
            .arg(&raw),
    );
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
    let pulled = common::check(
        "debugfs",
        &[
            "-R",
            "cat /log/caisson/fleet/pulled.log",
            state.to_str().unwrap(),
        ],
    );
    assert!(pulled.contains("pulled from a registry"), "{pulled}");
    let cat = |path: &str| {
        common::check(
            "debugfs",
            &["-R", &format!("cat {path}"), state.to_str().unwrap()],
        )
    };
    let found = cat("/log/caisson/fleet/finder.log");
    assert!(found.contains("got=hello-web"), "finder's log: {found}");
    let kept = cat("/lib/caisson/volumes/keeper/data/mark");
    // debugfs adds its version line: the file's first line is the token.
    assert_eq!(
        kept.lines().next().unwrap_or("").trim(),
        token,
        "the volume on the state partition: {kept}"
    );
    let log = cat("/log/caisson/fleet/keeper.log");
    assert_eq!(
        log.matches(&format!("created {token}")).count(),
        1,
        "written once: {log}"
    );
    assert_eq!(
        log.matches(&format!("found {token}")).count(),
        2,
        "found after the restart and after the reboot: {log}"
    );
}
