//! Confinement and limits of a unit's container against a real containerd and runc: inside a
//! default unit, what must fail fails (a user namespace, a raw socket, a mount, a write to
//! /proc/sys, forks beyond `pids`), the unit's limits are in its cgroup, and the host and
//! another unit stay fine; a unit that adds `NET_RAW` can ping, and a privileged one can mount.
//!
//! Needs root, `containerd`, `runc` and `busybox-static`; without them the test says why and
//! passes. The cgroup files are checked on cgroup v2 (`memory.max`, `cpu.max`, `pids.max`)
//! and, on a host still on v1 (as some CI machines are), on v1's (`memory.limit_in_bytes`,
//! `cpu.cfs_quota_us`, `pids.max`): runc writes the same limits to whichever the host has.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The test's containerd and images (fleet/tests/common/containerd.rs).
#[path = "common/containerd.rs"]
mod testbed;

use caisson_fleet::agent::{ContainerState, Runtime};
use caisson_fleet::containerd::Containerd;
use caisson_fleet::unit::{UnitSpec, DEFAULT_PIDS};
use std::path::{Path, PathBuf};
use testbed::{busybox_archive, log_until, missing, wait_for, Daemon};

const APPLETS: [&str; 10] = [
    "sh", "sleep", "echo", "cat", "true", "unshare", "ping", "mount", "seq", "hostname",
];

/// Where this host keeps cgroups, or why the test cannot read them.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cgroups {
    V2,
    V1,
}

fn cgroups() -> Result<Cgroups, String> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        Ok(Cgroups::V2)
    } else if root.join("pids").is_dir() && root.join("memory").is_dir() {
        Ok(Cgroups::V1)
    } else {
        Err("/sys/fs/cgroup is neither cgroup v2 nor v1 with pids and memory".into())
    }
}

fn cgroup_file(v: Cgroups, rt: &Containerd, unit: &str, controller: &str, file: &str) -> PathBuf {
    let path = format!("{}/{unit}", rt.namespace);
    match v {
        Cgroups::V2 => Path::new("/sys/fs/cgroup").join(path).join(file),
        Cgroups::V1 => Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(path)
            .join(file),
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .trim()
        .to_string()
}

fn unit(name: &str, archive: &Path, body: &str) -> UnitSpec {
    UnitSpec::parse(
        name,
        &format!(
            "restart = \"never\"\n{body}\n[image]\npath = \"{}\"",
            archive.display()
        ),
    )
    .unwrap()
}

/// The line of `log` that starts with `key=`: the exit status it reports.
fn status(log: &[String], key: &str) -> i32 {
    log.iter()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {log:#?}"))
}

/// The neighbour's last count.
async fn last_tick(rt: &Containerd) -> u64 {
    let log = rt.logs("neighbour", 5).await.unwrap();
    log.iter()
        .rev()
        .find_map(|l| l.strip_prefix("tick=")?.parse().ok())
        .unwrap_or_else(|| panic!("the neighbour has not counted: {log:?}"))
}

/// The test's steps, each printing `name=<exit status>` after its own output; then a fork bomb
/// in a subshell (ash gives up a script on a failed fork) that leaves its sleeps running.
const ESCAPES: &str = r#"
unshare -Urn true 2>&1; echo unshare=$?
ping -c1 -W2 127.0.0.1 2>&1; echo ping=$?
mount -t tmpfs x /mnt 2>&1; echo mount=$?
(echo evil > /proc/sys/kernel/hostname) 2>&1; echo sysctl=$?
(echo 1 > /proc/sysrq-trigger) 2>&1; echo sysrq=$?
cat /dev/kmsg 2>&1 | head -1; echo kmsg=$?
echo escapes-done
(for i in $(seq 60); do sleep 1000 & done) 2>&1
echo forks-done
exec sleep 1000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_unit_is_confined_and_limited() {
    if let Some(why) = missing() {
        eprintln!("skipping the confinement test: {why}");
        return;
    }
    let v = match cgroups() {
        Ok(v) => v,
        Err(why) => {
            eprintln!("skipping the confinement test: {why}");
            return;
        }
    };
    eprintln!("cgroups: {v:?}");
    let daemon = Daemon::start();
    let rt = daemon.runtime("confine");
    let archive = daemon.dir.path().join("busybox.oci.tar");
    busybox_archive(&archive, &APPLETS);

    // A neighbour that forks a sleep every 0.2 s and counts: it must keep counting.
    let neighbour = unit(
        "neighbour",
        &archive,
        "command = [\"/bin/sh\", \"-c\", \"i=0; while true; do i=$((i+1)); echo tick=$i; sleep 0.2; done\"]",
    );
    rt.start(&neighbour, "n1")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    log_until(&rt, "neighbour", "tick=1").await;

    let script = ESCAPES.replace('"', "\\\"").replace('\n', "\\n");
    let jail = unit(
        "jail",
        &archive,
        &format!(
            "command = [\"/bin/sh\", \"-c\", \"{script}\"]\n[resources]\nmemory = \"64M\"\ncpus = 0.5\npids = 20"
        ),
    );
    rt.start(&jail, "j1")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let log = log_until(&rt, "jail", "escapes-done").await;
    eprintln!("{log:#?}");

    // A user namespace (and a network one): seccomp refuses unshare with EPERM.
    assert_ne!(status(&log, "unshare"), 0);
    assert!(
        log.iter()
            .any(|l| l.contains("unshare") && l.contains("Operation not permitted")),
        "{log:#?}"
    );
    // A raw socket: no CAP_NET_RAW (busybox says so as "are you root?").
    assert_ne!(status(&log, "ping"), 0);
    assert!(
        log.iter().any(|l| l.starts_with("ping:")
            && (l.contains("permission denied") || l.contains("not permitted"))),
        "{log:#?}"
    );
    // A mount: no CAP_SYS_ADMIN and seccomp refuses mount.
    assert_ne!(status(&log, "mount"), 0);
    assert!(
        log.iter().any(
            |l| l.starts_with("mount:") && l.contains("ermission denied")
                || l.contains("Operation not permitted")
        ),
        "{log:#?}"
    );
    // /proc/sys and /proc/sysrq-trigger are read-only.
    assert_ne!(status(&log, "sysctl"), 0);
    assert_ne!(status(&log, "sysrq"), 0);
    assert!(
        log.iter()
            .any(|l| l.contains("/proc/sys/kernel/hostname") && l.contains("Read-only")),
        "{log:#?}"
    );
    // No device but the standard few: /dev/kmsg cannot be opened (or does not exist).
    assert!(
        log.iter()
            .any(|l| l.starts_with("cat: can't open '/dev/kmsg'")),
        "{log:#?}"
    );

    // The limits are the container's cgroup's.
    let file = |controller: &str, name: &str| read(&cgroup_file(v, &rt, "jail", controller, name));
    match v {
        Cgroups::V2 => {
            assert_eq!(file("memory", "memory.max"), (64u64 << 20).to_string());
            assert_eq!(file("cpu", "cpu.max"), "50000 100000");
        }
        Cgroups::V1 => {
            assert_eq!(
                file("memory", "memory.limit_in_bytes"),
                (64u64 << 20).to_string()
            );
            assert_eq!(file("cpu", "cpu.cfs_quota_us"), "50000");
            assert_eq!(file("cpu", "cpu.cfs_period_us"), "100000");
        }
    }
    assert_eq!(file("pids", "pids.max"), "20");

    // The fork bomb: 60 sleeps asked for, the pids limit stops it at 20 tasks.
    let log = log_until(&rt, "jail", "forks-done").await;
    assert!(
        log.iter()
            .any(|l| l.contains("can't fork") || l.contains("Resource temporarily unavailable")),
        "{log:#?}"
    );
    let current: u32 = file("pids", "pids.current").parse().unwrap();
    assert!(current <= 20, "pids.current {current}");
    if v == Cgroups::V2 || cgroup_file(v, &rt, "jail", "pids", "pids.events").exists() {
        let events = file("pids", "pids.events");
        assert!(!events.ends_with(" 0"), "no fork was refused: {events}");
    }
    // The host stays fine: it forks, containerd answers, and the neighbour keeps counting.
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
    let ticks = last_tick(&rt).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(
        last_tick(&rt).await > ticks,
        "the neighbour stopped at {ticks}"
    );
    assert_eq!(
        wait_for(&rt, "jail", |_| true).await,
        ContainerState::Running
    );

    // A unit that adds NET_RAW can ping; a unit without limits gets the default pids limit.
    let pinger = unit(
        "pinger",
        &archive,
        "capabilities = [\"NET_RAW\"]\ncommand = [\"/bin/sh\", \"-c\", \"ping -c1 -W2 127.0.0.1 2>&1; echo ping=$?; exec sleep 1000\"]",
    );
    rt.start(&pinger, "p1").await.unwrap();
    let log = log_until(&rt, "pinger", "ping=0").await;
    assert!(
        log.iter().any(|l| l.contains("1 packets received")),
        "{log:#?}"
    );
    assert_eq!(
        read(&cgroup_file(v, &rt, "pinger", "pids", "pids.max")),
        DEFAULT_PIDS.to_string()
    );

    // A privileged unit may mount.
    let root = unit(
        "root",
        &archive,
        "privileged = true\ncommand = [\"/bin/sh\", \"-c\", \"mount -t tmpfs x /mnt 2>&1; echo mount=$?\"]",
    );
    rt.start(&root, "r1").await.unwrap();
    wait_for(&rt, "root", |s| s != ContainerState::Running).await;
    let log = log_until(&rt, "root", "mount=0").await;
    eprintln!("{log:#?}");

    for u in ["jail", "pinger", "root", "neighbour"] {
        rt.remove(u).await.unwrap();
    }
    assert!(rt.list().await.unwrap().is_empty());
}
