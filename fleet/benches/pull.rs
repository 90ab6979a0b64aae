//! Registry pull and agent memory benchmark (issue 17), natively on this machine.
//!
//! `cargo bench -p caisson-fleet --bench pull` (release build; root, containerd, runc,
//! busybox-static, docker-registry and skopeo: ci/deps installs them). It starts Debian's
//! docker-registry and a containerd of its own on loopback / in a temporary directory, then:
//!
//! 1. pushes an image of about `PULL_BENCH_MB` (30) MiB of incompressible data plus busybox with
//!    skopeo, and times [`Containerd::pull`] into the empty containerd (download, digest checks,
//!    unpack), then the same pull again (a second unit naming the image: nothing to fetch; the
//!    registry's blob GETs are counted), then `skopeo copy docker://… oci:DIR` of the same image
//!    (download and digest checks, no unpack) for comparison;
//! 2. runs the release `caisson-fleet agent` alone (no etcd) with 20 units of a busybox archive
//!    against that containerd, waits until all 20 run, lets it reconcile for
//!    `PULL_BENCH_AGENT_S` (10) seconds, and reads its VmRSS.
//!
//! Prints `BENCH key=value` lines. Only loopback traffic; everything is removed at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/registry.rs"]
mod registry;
#[path = "../tests/common/containerd.rs"]
mod testbed;

use caisson_fleet::agent::{ContainerState, Runtime};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testbed::{busybox_archive, busybox_layer_with, digest, missing, oci_archive, Daemon};

use registry::{noise, Registry, SKOPEO};

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let why = missing().or_else(registry::missing);
    if let Some(why) = why {
        println!("BENCH skipped={why:?}");
        return;
    }
    let mb = env_u64("PULL_BENCH_MB", 30) as usize;
    let agent_s = env_u64("PULL_BENCH_AGENT_S", 10);
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let w = work.path();

    let registry = Registry::start(&w.join("storage"), "");
    let host = registry.host();
    let reference = format!("{host}/bench/big:1");

    // The image: busybox and `mb` MiB of noise, pushed (skopeo gzips it on the way).
    let data = noise(mb << 20);
    let layer = busybox_layer_with(&["sh", "sleep"], &[("data/noise", &data)]);
    let archive = w.join("big.tar");
    oci_archive(&archive, std::slice::from_ref(&layer), &[digest(&layer)]);
    registry.push(&archive, "bench/big:1");
    let stored: u64 = walk(&w.join("storage"));
    println!("BENCH image_mib={:.1}", layer.len() as f64 / 1048576.0);
    println!(
        "BENCH registry_storage_mib={:.1}",
        stored as f64 / 1048576.0
    );

    // 1. Pull, pull again, skopeo.
    let daemon = Daemon::start();
    let mut rt = daemon.runtime("bench");
    let mut registries = caisson_fleet::distribution::Registries::default();
    registries.hosts.insert(
        host.clone(),
        caisson_fleet::distribution::HostSettings {
            insecure: true,
            ..Default::default()
        },
    );
    rt.registries = std::sync::Arc::new(registries);
    let gets0 = registry.blob_gets();
    let t = Instant::now();
    rt.pull(&reference).await.expect("pull");
    let first = t.elapsed().as_secs_f64();
    let gets1 = registry.blob_gets();
    let mut second_rt = daemon.runtime("bench");
    second_rt.registries = rt.registries.clone();
    let t = Instant::now();
    second_rt.pull(&reference).await.expect("second pull");
    let second = t.elapsed().as_secs_f64();
    let gets2 = registry.blob_gets();
    let t = Instant::now();
    let copied = Command::new(SKOPEO)
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:big", w.join("skopeo-oci").display()))
        .status()
        .unwrap();
    let skopeo = t.elapsed().as_secs_f64();
    assert!(copied.success(), "skopeo copy");
    println!("BENCH pull_s={first:.2}");
    println!(
        "BENCH pull_mib_per_s={:.1}",
        stored as f64 / 1048576.0 / first
    );
    println!("BENCH pull_blob_gets={}", gets1 - gets0);
    println!("BENCH second_pull_s={second:.3}");
    println!("BENCH second_pull_blob_gets={}", gets2 - gets1);
    println!("BENCH skopeo_copy_s={skopeo:.2}");

    // 2. The agent's memory with 20 units.
    let units = w.join("units");
    std::fs::create_dir_all(&units).unwrap();
    let small = w.join("busybox.tar");
    busybox_archive(&small, &["sh", "sleep"]);
    for i in 0..20 {
        std::fs::write(
            units.join(format!("u{i:02}.toml")),
            format!(
                "command = [\"/bin/sleep\", \"100000\"]\n[image]\npath = \"{}\"\n",
                small.display()
            ),
        )
        .unwrap();
    }
    let namespace = "bench-agent";
    std::fs::write(
        w.join("fleet.toml"),
        format!(
            "units_dir = \"{}\"\ncontainerd_socket = \"{}\"\nnamespace = \"{namespace}\"\nlog_dir = \"{}\"\n[network]\nenabled = false\n",
            units.display(),
            daemon.socket().display(),
            w.join("logs").display()
        ),
    )
    .unwrap();
    let agent = Killed(
        Command::new(env!("CARGO_BIN_EXE_caisson-fleet"))
            .arg("--config")
            .arg(w.join("fleet.toml"))
            .arg("agent")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut watch = caisson_fleet::containerd::Containerd::new(daemon.socket(), namespace);
    watch.log_dir = w.join("logs");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let running = watch
            .list()
            .await
            .map(|l| {
                l.iter()
                    .filter(|c| c.state == ContainerState::Running)
                    .count()
            })
            .unwrap_or(0);
        if running == 20 {
            break;
        }
        assert!(Instant::now() < deadline, "{running} of 20 units running");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(agent_s)).await;
    println!("BENCH agent_rss_kib_20_units={}", rss_kib(agent.0.id()));
    drop(agent);
    // Leave containerd clean for its own removal.
    for c in watch.list().await.unwrap_or_default() {
        let _ = watch.remove(&c.unit).await;
    }
}

/// The bytes of the files under `dir`.
fn walk(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.path().symlink_metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
