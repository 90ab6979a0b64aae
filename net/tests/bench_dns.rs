//! Benchmark (ignored in `cargo test`; ci/bench runs it): answers per second from one DNS
//! responder, measured by Debian's `dnsperf` on loopback, next to `dnsmasq` answering the same
//! name from its own host records, with the same load on the same machine.
//!
//! `cargo test --locked -p caisson-net --test bench_dns -- --ignored --nocapture`
//! prints `BENCH dns responder_qps=… responder_avg_ms=… dnsmasq_qps=… dnsmasq_avg_ms=… ratio=…`.

#![allow(clippy::unwrap_used)]

mod support;

use caisson_net::dns::Config;
use std::net::SocketAddr;
use std::process::Command;
use support::{dnsmasq_with, start, two_webs};

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

    let dnsmasq = dnsmasq_with(
        &[
            "--host-record=web.caisson,10.42.1.2".into(),
            "--host-record=web.caisson,10.42.2.2".into(),
        ],
        ("web.caisson", "10.42.2.2"),
    );
    let (theirs_qps, theirs_ms) = dnsperf(dnsmasq.addr, &queries);
    drop(dnsmasq);
    println!(
        "BENCH dns responder_qps={ours_qps:.0} responder_avg_ms={ours_ms:.3} \
         dnsmasq_qps={theirs_qps:.0} dnsmasq_avg_ms={theirs_ms:.3} ratio={:.2}",
        ours_qps / theirs_qps
    );
}
