//! Benchmark (ignored in `cargo test`; ci/bench runs it): answers per second from one DNS
//! responder, measured by Debian's `dnsperf` on loopback, next to `dnsmasq` answering the same
//! name from its own host records, with the same load on the same machine.
//!
//! `cargo test --locked -p caisson-net --test bench_dns -- --ignored --nocapture`
//! prints `BENCH dns responder_qps=… responder_avg_ms=… dnsmasq_qps=… dnsmasq_avg_ms=… ratio=…`.

#![allow(clippy::unwrap_used)]

mod support;

use caisson_net::dns::Config;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{dig, free_port, start, two_webs};

/// How long each dnsperf run lasts.
const SECONDS: u32 = 10;
/// Queries dnsperf keeps outstanding.
const OUTSTANDING: u32 = 100;

/// One dnsperf run against `addr`: (queries per second, average latency in ms).
fn dnsperf(addr: SocketAddr, queries: &std::path::Path) -> (f64, f64) {
    let out = Command::new("dnsperf")
        .args(["-s", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .arg("-d")
        .arg(queries)
        .args(["-l", &SECONDS.to_string(), "-q", &OUTSTANDING.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("dnsperf ({e}): apt-get install dnsperf (ci/bench does)"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "dnsperf: {text}");
    let field = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name:?} in dnsperf's output:\n{text}"))
    };
    let lost = field("Queries lost:");
    let sent = field("Queries sent:");
    assert!(lost <= sent / 100.0, "more than 1 % lost:\n{text}");
    (
        field("Queries per second:"),
        field("Average Latency (s):") * 1000.0,
    )
}

#[test]
#[ignore = "benchmark: ci/bench runs it"]
fn answers_per_second_against_dnsmasq() {
    let dir = tempfile::tempdir().unwrap();
    let queries = dir.path().join("queries");
    std::fs::write(&queries, "web.caisson A\n").unwrap();

    let dns = start(two_webs(), Config::default());
    let (ours_qps, ours_ms) = dnsperf(dns.addr, &queries);
    drop(dns);

    let port = free_port();
    let mut dnsmasq = Command::new("dnsmasq")
        .args([
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file",
            &format!("--port={port}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--host-record=web.caisson,10.42.1.2",
            "--host-record=web.caisson,10.42.2.2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (Debian's dnsmasq-base)");
    let addr: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dig(addr, &["+time=1", "web.caisson"]).contains("10.42.2.2") {
        assert!(Instant::now() < deadline, "dnsmasq does not answer");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (theirs_qps, theirs_ms) = dnsperf(addr, &queries);
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    println!(
        "BENCH dns responder_qps={ours_qps:.0} responder_avg_ms={ours_ms:.3} \
         dnsmasq_qps={theirs_qps:.0} dnsmasq_avg_ms={theirs_ms:.3} ratio={:.2}",
        ours_qps / theirs_qps
    );
}
