//! The harness against real QEMU and OVMF: a blank disk boots to OVMF's UEFI shell.
//!
//! With nothing to boot, OVMF prints `BdsDxe: ...` lines, then starts its internal shell, which
//! prints `UEFI Interactive Shell v2.2` about 5 s in under TCG (then a 5 s startup.nsh countdown
//! and the `Shell>` prompt).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use caisson_qemu::{
    create_overlay, Disk, DiskFormat, QemuError, QemuPaths, VirtualNetwork, Vm, VmOptions,
};

const SHELL: &str = "UEFI Interactive Shell";
const BOOT: Duration = Duration::from_secs(60);

/// A 64 MiB raw disk whose first MiB holds a pattern, so any write to it shows.
fn blank_disk(dir: &Path) -> PathBuf {
    let path = dir.join("blank.raw");
    let mut data: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    data.resize(64 * 1024 * 1024, 0);
    std::fs::write(&path, data).unwrap();
    path
}

fn small(image: &Path) -> VmOptions {
    VmOptions {
        memory_mib: 256,
        ..VmOptions::new(image)
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Writes 64 KiB of 0xab at offset 0 of the boot disk through QEMU's block layer.
fn guest_write(vm: &mut Vm) {
    vm.qmp(
        "human-monitor-command",
        Some(serde_json::json!({
            "command-line": "qemu-io disk0 \"write -P 0xab 0 64k\""
        })),
    )
    .unwrap();
}

/// Whether two disk images hold different contents (`qemu-img compare` exits 1).
fn differ(a: &Path, b: &Path) -> bool {
    let status = std::process::Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(a)
        .arg(b)
        .status()
        .unwrap();
    assert!(
        matches!(status.code(), Some(0 | 1)),
        "qemu-img compare: {status}"
    );
    status.code() == Some(1)
}

#[test]
fn console_waits_times_out_with_the_tail_resets_and_quits() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::launch(small(&blank_disk(dir.path()))).unwrap();

    let line = vm.wait_for(SHELL, BOOT).unwrap();
    assert!(line.contains("UEFI Interactive Shell v"), "{line:?}");
    assert!(vm.console_text().unwrap().contains("BdsDxe"));

    let err = vm
        .wait_for("this is never printed", Duration::from_secs(2))
        .unwrap_err();
    assert!(matches!(err, QemuError::ConsoleTimeout { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("this is never printed") && msg.contains(SHELL),
        "{msg}"
    );

    // The cursor is past the first banner: seeing it again needs a second boot.
    vm.reset().unwrap();
    let re = caisson_qemu::Pattern::regex(r"^UEFI Interactive Shell v\d").unwrap();
    vm.wait_for(re, BOOT).unwrap();
    let events = vm.take_events();
    assert!(events.iter().any(|e| e["event"] == "RESET"), "{events:?}");

    let status = vm.quit().unwrap();
    assert!(status.success(), "{status}");
    assert!(!pid_alive(vm.pid()));
    let err = vm.wait_for("Shell>x", Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(err, QemuError::ExitedBeforePattern { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(SHELL), "{err}");
}

#[test]
fn kill_is_a_power_cut_and_drop_leaves_no_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let disk = blank_disk(dir.path());
    let mut vm = Vm::launch(small(&disk)).unwrap();
    vm.wait_for("BdsDxe", BOOT).unwrap();
    let status = vm.kill().unwrap();
    assert!(!status.success());
    assert_eq!(vm.wait_exit(Duration::from_secs(1)).unwrap(), status);

    let vm = Vm::launch(small(&disk)).unwrap();
    let (pid, vm_dir) = (vm.pid(), vm.dir().to_path_buf());
    assert!(pid_alive(pid));
    drop(vm);
    assert!(!pid_alive(pid), "QEMU pid {pid} survived its handle");
    assert!(!vm_dir.exists(), "{} was not removed", vm_dir.display());
}

#[test]
fn drop_kills_qemu_when_a_test_panics() {
    let dir = tempfile::tempdir().unwrap();
    let disk = blank_disk(dir.path());
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let vm = Vm::launch(small(&disk)).unwrap();
        tx.send(vm.pid()).unwrap();
        panic!("a failing test");
    })
    .join();
    assert!(result.is_err());
    let pid = rx.recv().unwrap();
    assert!(!pid_alive(pid), "QEMU pid {pid} survived a panic");
}

#[test]
fn the_overlay_keeps_the_image_and_direct_disks_persist() {
    let dir = tempfile::tempdir().unwrap();
    let disk = blank_disk(dir.path());
    let before = std::fs::read(&disk).unwrap();

    let mut vm = Vm::launch(small(&disk)).unwrap();
    assert_ne!(vm.disk_path(), disk.as_path());
    guest_write(&mut vm);
    vm.quit().unwrap();
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "the base image changed"
    );
    assert!(
        differ(&disk, vm.disk_path()),
        "the write missed the overlay"
    );

    // A test that wants state across boots keeps its own overlay and attaches it directly.
    let kept = dir.path().join("kept.qcow2");
    create_overlay(Path::new("qemu-img"), &disk, DiskFormat::Raw, &kept).unwrap();
    let mut vm = Vm::launch(VmOptions {
        disk: Disk::direct(&kept),
        ..small(&disk)
    })
    .unwrap();
    assert_eq!(vm.disk_path(), kept.as_path());
    guest_write(&mut vm);
    vm.quit().unwrap();
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "the base image changed"
    );
    assert!(differ(&disk, &kept), "the write missed the kept overlay");
}

#[test]
fn the_control_socket_accepts_and_a_silent_guest_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::launch(small(&blank_disk(dir.path()))).unwrap();
    let mut ctl = vm.control().unwrap();
    let err = ctl
        .request_timeout("{\"op\":\"status\"}", Duration::from_millis(500))
        .unwrap_err();
    assert!(matches!(err, QemuError::ChannelTimeout { .. }), "{err}");
}

#[test]
fn forwards_listen_on_loopback_and_vms_share_a_virtual_network() {
    let dir = tempfile::tempdir().unwrap();
    let disk = blank_disk(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let net = VirtualNetwork::new().unwrap();
    let mut opts = small(&disk);
    opts.user_net.as_mut().unwrap().forwards.push((port, 22));
    opts.networks.push(net.attach().unwrap());
    let _a = Vm::launch(opts).unwrap();
    let mut opts = small(&disk);
    let b_nic = net.attach().unwrap();
    opts.networks.push(b_nic.clone());
    let _b = Vm::launch(opts).unwrap();
    // QEMU holds the NIC's loopback UDP port: frames from the hub reach it.
    let err = std::net::UdpSocket::bind(b_nic.local).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
}

#[test]
fn missing_tools_and_firmware_name_the_debian_package() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("tiny.raw");
    std::fs::write(&disk, [0u8; 512]).unwrap();
    let cases = [
        (
            QemuPaths {
                qemu_system: "/nonexistent/qemu-system-x86_64".into(),
                ..Default::default()
            },
            "qemu-system-x86",
        ),
        (
            QemuPaths {
                qemu_img: "/nonexistent/qemu-img".into(),
                ..Default::default()
            },
            "qemu-utils",
        ),
        (
            QemuPaths {
                ovmf_code: "/nonexistent/OVMF_CODE_4M.fd".into(),
                ..Default::default()
            },
            "ovmf",
        ),
    ];
    for (paths, package) in cases {
        let err = Vm::launch(VmOptions {
            paths,
            ..VmOptions::new(&disk)
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, QemuError::Missing { .. }), "{msg}");
        assert!(
            msg.contains(&format!("install the Debian package {package} ")),
            "{msg}"
        );
        assert!(
            msg.contains("/nonexistent/") && !msg.contains('\n'),
            "{msg}"
        );
    }
}

#[test]
fn a_bad_option_fails_at_start_with_qemu_s_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = small(&blank_disk(dir.path()));
    opts.extra_args.push("-no-such-option".into());
    let err = Vm::launch(opts).unwrap_err();
    assert!(matches!(err, QemuError::StartFailed { .. }), "{err}");
    assert!(err.to_string().contains("no-such-option"), "{err}");
}
