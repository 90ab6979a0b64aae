//! QEMU end-to-end: first-boot provisioning (provision/CONFIG.md). The minimal image boots with a
//! machine config through fw_cfg and through a config drive: host name, an extra service, files
//! and a secret written 0600, a static address; a second boot does not apply again but keeps the
//! /etc changes; an invalid config stops the boot
//! before any service with its message on the console. The host image boots with SSH keys and
//! fleet labels: the host logs in with the key through a forwarded loopback port, on both boots
//! with the same host key, and nothing but that key gets in.

#![allow(clippy::unwrap_used)]

mod common;

use common::{kept_overlay, poweroff, Server};

use caisson_layout::partition::Part;
use caisson_qemu::{Disk, FwCfgValue, Vm, VmOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const SECRET: &str = "s3cr3t-t0ken-never-echoed";

fn config() -> String {
    format!(
        r#"version = 1
hostname = "prov-1"

[[files]]
path = "/etc/app/app.conf"
contents = "listen = 8080\n"

[[files]]
path = "/var/lib/app/token"
secret = true
contents = "{SECRET}"

[[directories]]
path = "/var/lib/app/data"
mode = "0700"

[services.hello]
kind = "oneshot"
exec = "/usr/bin/caisson-ctl"
args = ["--help"]

[kernel]
sysctls = {{ "vm.swappiness" = 7 }}
"#
    )
}

/// The minimal image, built once for this file in its own directory.
fn image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let out = common::workspace().join("target/e2e/provision");
            let _ = std::fs::remove_dir_all(&out);
            common::build("images/minimal.toml", &out, &[])
        })
        .clone()
}

fn boot(disk: &Path, config: Option<&Path>, drive: Option<&Path>) -> Vm {
    let mut opts = VmOptions::new(disk);
    opts.disk = Disk::direct(disk);
    if let Some(c) = config {
        opts.fw_cfg = vec![("opt/caisson/config".into(), FwCfgValue::File(c.into()))];
    }
    if let Some(d) = drive {
        opts.extra_disks = vec![Disk::overlay(d)];
    }
    Vm::launch(opts).expect("launching QEMU")
}

fn status(vm: &Vm) -> serde_json::Value {
    common::request(vm, &common::Request::Status)["status"].clone()
}

/// Checks a provisioned machine: host name, the extra service, the secret never on the console.
fn check_provisioned(vm: &mut Vm, from: &str) {
    let applied = vm
        .wait_for("caisson: provisioning: applied", BOOT_TIMEOUT)
        .expect("the config is applied");
    assert!(applied.contains(from), "{applied}");
    vm.wait_for("caisson: ready ", BOOT_TIMEOUT)
        .expect("a provisioned machine reaches ready");
    let st = status(vm);
    assert_eq!(st["hostname"], "prov-1", "{st}");
    let hello = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "hello")
        .unwrap_or_else(|| panic!("the provisioned service is loaded: {st}"))
        .clone();
    assert_eq!(hello["ready"], true, "{hello}");
    let console = vm.console_text().unwrap();
    assert!(!console.contains(SECRET), "the secret reached the console");
}

fn debugfs(state: &Path, cmd: &str) -> String {
    common::check("debugfs", &["-R", cmd, state.to_str().unwrap()])
}

#[test]
fn fw_cfg_config_is_applied_once() {
    let image = image();
    let _one_vm = common::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("machine.toml");
    std::fs::write(&cfg, config()).unwrap();
    let disk = kept_overlay(&image, dir.path());

    let mut vm = boot(&disk, Some(&cfg), None);
    check_provisioned(&mut vm, "fw_cfg");
    poweroff(&mut vm);
    drop(vm);

    let state = common::state_of(&disk, dir.path());
    let record = debugfs(&state, "cat /lib/caisson/provisioned");
    let sha = caisson_provision::apply::sha256_hex(config().as_bytes());
    assert!(record.contains(&sha), "{record}");
    let token = debugfs(&state, "stat /lib/app/token");
    assert!(token.contains("Mode:  0600"), "{token}");
    let data = debugfs(&state, "stat /lib/app/data");
    assert!(data.contains("Mode:  0700"), "{data}");
    let conf = debugfs(&state, "cat /lib/caisson/etc/upper/app/app.conf");
    assert!(conf.contains("listen = 8080"), "{conf}");

    // Second boot, same config offered: not applied again, the record unchanged.
    let mut vm = boot(&disk, Some(&cfg), None);
    vm.wait_for("caisson: provisioning: already provisioned", BOOT_TIMEOUT)
        .expect("the second boot sees the record");
    vm.wait_for("caisson: ready ", BOOT_TIMEOUT)
        .expect("second boot reaches ready");
    // /etc changes of the first boot (host name, the extra service) are kept in the overlay.
    let st = status(&vm);
    assert_eq!(st["hostname"], "prov-1", "{st}");
    assert!(
        st["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "hello"),
        "{st}"
    );
    let console = vm.console_text().unwrap();
    assert!(!console.contains("provisioning: applied"), "applied twice");
    poweroff(&mut vm);
    drop(vm);
    let state = common::state_of(&disk, dir.path());
    assert_eq!(debugfs(&state, "cat /lib/caisson/provisioned"), record);
}

#[test]
fn an_invalid_config_stops_the_first_boot() {
    let image = image();
    let _one_vm = common::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    let bad = config().replace("mode = \"0700\"", "mode = \"0790\"");
    std::fs::write(&cfg, bad).unwrap();
    let disk = kept_overlay(&image, dir.path());
    let mut vm = boot(&disk, Some(&cfg), None);
    let line = vm
        .wait_for("caisson: provisioning failed: ", BOOT_TIMEOUT)
        .expect("the failure is on the console");
    assert!(line.contains("directories[0].mode: \"0790\""), "{line}");
    std::thread::sleep(Duration::from_secs(5));
    let console = vm.console_text().unwrap();
    assert!(
        !console.contains("caisson: ready "),
        "no ready line after a failed config"
    );
    assert!(!console.contains(SECRET));
    vm.kill().unwrap();
    drop(vm);
    let state = common::state_of(&disk, dir.path());
    // Killed, not shut down: replay the journal on the copy before reading it.
    let _ = Command::new("e2fsck")
        .arg("-fy")
        .arg(&state)
        .output()
        .unwrap();
    let out = Command::new("debugfs")
        .args(["-R", "stat /lib/caisson/provisioned"])
        .arg(&state)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("File not found"), "{text}");
    let out = Command::new("debugfs")
        .args(["-R", "stat /lib/app/token"])
        .arg(&state)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("File not found"),
        "nothing half-applied: {text}"
    );
}

#[test]
fn a_config_drive_is_applied_with_a_static_address() {
    let image = image();
    let _one_vm = common::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("machine.toml");
    let with_network = format!(
        "{}\n[network]\nmode = \"static\"\naddress = \"10.0.2.50/24\"\ngateway = \"10.0.2.2\"\ndns = [\"10.0.2.3\"]\n",
        config()
    );
    std::fs::write(&cfg, with_network).unwrap();
    let drive = dir.path().join("config.img");
    common::run_ok(
        Command::new(env!("CARGO_BIN_EXE_caisson"))
            .arg("config-drive")
            .arg(&cfg)
            .arg("-o")
            .arg(&drive),
    );
    let disk = kept_overlay(&image, dir.path());
    let mut vm = boot(&disk, None, Some(&drive));
    check_provisioned(&mut vm, "config drive");
    // The provisioned /etc/caisson/network.toml is what the init's network uses (no DHCP).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let net = loop {
        let net = status(&vm)["network"].clone();
        if net["state"] == "up" || std::time::Instant::now() > deadline {
            break net;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(net["state"], "up", "{net}");
    assert_eq!(net["address"], "10.0.2.50/24", "{net}");
    assert_eq!(net["gateway"], "10.0.2.2", "{net}");
    assert_eq!(net["dns"][0], "10.0.2.3", "{net}");
    poweroff(&mut vm);
}

/// The ESP, read in user space (never mounted) on the first boot, and found by its PARTUUID.
#[test]
fn a_config_on_the_esp_is_applied() {
    let image = image();
    let _one_vm = common::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::copy(&image, &disk).unwrap();
    let layout = caisson_disk::read_layout(&disk).unwrap();
    let esp = layout.get(Part::Esp).unwrap();
    let on_esp = format!("{}@@{}", disk.display(), esp.start);
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, config()).unwrap();
    // `caisson/` is there already: it holds each version's kernel and initramfs.
    common::check(
        "mcopy",
        &[
            "-i",
            &on_esp,
            cfg.to_str().unwrap(),
            "::/caisson/config.toml",
        ],
    );
    let mut vm = boot(&disk, None, None);
    check_provisioned(&mut vm, "ESP");
    poweroff(&mut vm);
}

/// Appends `words` to the options line of the image's first boot entry (mtools, on a raw copy).
fn add_to_cmdline(raw: &Path, words: &str, dir: &Path) {
    let layout = caisson_disk::read_layout(raw).unwrap();
    let esp = layout.get(Part::Esp).unwrap();
    let image = format!("{}@@{}", raw.display(), esp.start);
    let entry = "::/loader/entries/caisson-1.0.0-a.conf";
    let text = common::check("mtype", &["-i", &image, entry]);
    let changed: String = text
        .lines()
        .map(|l| {
            if l.starts_with("options ") {
                format!("{l} {words}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(changed.contains(words), "{text}");
    let local = dir.join("entry.conf");
    std::fs::write(&local, changed).unwrap();
    common::check(
        "mcopy",
        &["-o", "-i", &image, local.to_str().unwrap(), entry],
    );
}

#[test]
fn a_url_config_is_fetched_once_the_network_is_up() {
    let image = image();
    let _one_vm = common::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("machine.toml"), config()).unwrap();
    let server = Server::start(&www);
    let sha = caisson_provision::apply::sha256_hex(config().as_bytes());
    let url = format!("http://10.0.2.2:{}/machine.toml", server.port);
    let disk = dir.path().join("disk.raw");
    std::fs::copy(&image, &disk).unwrap();
    add_to_cmdline(
        &disk,
        &format!("caisson.config_url={url} caisson.config_sha256={sha}"),
        dir.path(),
    );
    let mut vm = boot(&disk, None, None);
    vm.wait_for(
        "provisioning: bringing the network up to fetch",
        BOOT_TIMEOUT,
    )
    .expect("the init starts the network for the URL source");
    check_provisioned(&mut vm, &url);
    poweroff(&mut vm);
    drop(server);
}

/// The host image (with openssh-server), built once for this file in its own directory.
fn host_image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let out = common::workspace().join("target/e2e/provision-host");
            let _ = std::fs::remove_dir_all(&out);
            common::build("images/host.toml", &out, &[])
        })
        .clone()
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Makes an ed25519 key pair `dir/name` and returns the public key line.
fn keygen(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    common::run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "caisson-e2e", "-f"])
            .arg(&key),
    );
    key
}

/// `ssh root@127.0.0.1 -p PORT COMMAND` with `key` only, no password ever; the host key is
/// checked against `known_hosts` under one alias, so a changed host key fails.
fn ssh(key: &Path, known_hosts: &Path, port: u16, extra: &[&str], command: &str) -> (bool, String) {
    let out = Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string()])
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
        .args(["-o", "ConnectTimeout=30", "-o", "HostKeyAlias=caisson-e2e"])
        .args(["-o", "StrictHostKeyChecking=accept-new"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args(["-F", "/dev/null"])
        .args(extra)
        .arg("root@127.0.0.1")
        .arg(command)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Tries `ssh` until it succeeds (sshd starts after its host keys are made) or `timeout` passes.
fn ssh_until_ok(vm: &mut Vm, key: &Path, known: &Path, port: u16, command: &str) -> String {
    let start = std::time::Instant::now();
    loop {
        let (ok, text) = ssh(key, known, port, &[], command);
        if ok {
            eprintln!(
                "ssh answered {:.1} s after ready",
                start.elapsed().as_secs_f64()
            );
            return text;
        }
        if start.elapsed() > Duration::from_secs(180) {
            let tail = vm.console_tail(60).unwrap_or_default();
            panic!("no SSH login: {text}\nconsole:\n{tail}");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn boot_forwarded(disk: &Path, config: &Path, port: u16) -> Vm {
    let mut opts = VmOptions::new(disk);
    opts.disk = Disk::direct(disk);
    opts.fw_cfg = vec![("opt/caisson/config".into(), FwCfgValue::File(config.into()))];
    opts.user_net = Some(caisson_qemu::UserNet {
        forwards: vec![(port, 22)],
        restrict: false,
    });
    Vm::launch(opts).expect("launching QEMU")
}

#[test]
fn ssh_login_with_the_provisioned_key_on_the_host_image() {
    let image = host_image();
    let _one_vm = common::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "admin");
    let stranger = keygen(dir.path(), "stranger");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let cfg = dir.path().join("machine.toml");
    let text = format!(
        "{}\n[ssh]\nauthorized_keys = [\"{}\"]\n\n[fleet]\nlabels = {{ zone = \"a\", role = \"web\" }}\n",
        config(),
        public.trim()
    );
    std::fs::write(&cfg, text).unwrap();
    let known = dir.path().join("known_hosts");
    let disk = kept_overlay(&image, dir.path());
    let command = "busybox hostname; busybox id -u; busybox cat /etc/caisson/fleet.toml";

    let port = free_port();
    let mut vm = boot_forwarded(&disk, &cfg, port);
    check_provisioned(&mut vm, "fw_cfg");
    let out = ssh_until_ok(&mut vm, &key, &known, port, command);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("prov-1"), "{out}");
    assert_eq!(lines.next(), Some("0"), "{out}");
    // Fleet labels visible: the agent's settings carry them.
    assert!(
        out.contains("zone = \"a\"") && out.contains("role = \"web\""),
        "{out}"
    );
    // Keys only: another key, and password or keyboard-interactive logins, are refused.
    let (ok, text) = ssh(&stranger, &known, port, &[], "true");
    assert!(
        !ok && text.contains("Permission denied (publickey)"),
        "{text}"
    );
    let no_keys = [
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "PreferredAuthentications=password,keyboard-interactive",
    ];
    let (ok, text) = ssh(&key, &known, port, &no_keys, "true");
    assert!(
        !ok && text.contains("Permission denied (publickey)"),
        "{text}"
    );
    poweroff(&mut vm);
    drop(vm);

    // Second boot: not applied again; sshd runs with the host key made on the first boot
    // (kept in the /etc overlay), which known_hosts now pins.
    let port = free_port();
    let mut vm = boot_forwarded(&disk, &cfg, port);
    vm.wait_for("caisson: provisioning: already provisioned", BOOT_TIMEOUT)
        .expect("the second boot sees the record");
    vm.wait_for("caisson: ready ", BOOT_TIMEOUT)
        .expect("second boot reaches ready");
    let out = ssh_until_ok(&mut vm, &key, &known, port, "busybox hostname");
    assert_eq!(out.trim(), "prov-1", "{out}");
    let console = vm.console_text().unwrap();
    assert!(!console.contains("provisioning: applied"), "applied twice");
    poweroff(&mut vm);
}
