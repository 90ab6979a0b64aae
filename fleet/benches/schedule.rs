//! Scheduler benchmark: 10,000 units on 1,000 machines, one full pass.
//!
//! `cargo bench -p caisson-fleet --bench schedule` (release build). Prints the median and the
//! worst of several passes for: an empty cluster, a no-op pass over that result, and a pass after
//! 10 machines have gone away.

use caisson_fleet::scheduler::{schedule, Machine, Placement, Unit};
use caisson_fleet::unit::{HostPort, Replicas};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn machines(n: usize) -> Vec<Machine> {
    (0..n)
        .map(|i| {
            let mut labels = BTreeMap::new();
            labels.insert("zone".to_string(), ["a", "b", "c"][i % 3].to_string());
            if i % 10 == 0 {
                labels.insert("disk".to_string(), "ssd".to_string());
            }
            Machine {
                id: format!("machine-{i:05}"),
                labels,
                capacity: None,
            }
        })
        .collect()
}

fn units(n: usize) -> Vec<Unit> {
    (0..n)
        .map(|i| {
            let mut labels = BTreeMap::new();
            if i % 4 == 0 {
                labels.insert("zone".to_string(), ["a", "b", "c"][i % 3].to_string());
            }
            if i % 50 == 0 {
                labels.insert("disk".to_string(), "ssd".to_string());
            }
            let conflicts = if i % 7 == 0 {
                vec![format!("unit-{:05}", (i + 1) % n)]
            } else {
                vec![]
            };
            let ports = if i % 20 == 0 {
                vec![HostPort {
                    port: 8000 + (i % 100) as u16,
                    udp: false,
                }]
            } else {
                vec![]
            };
            Unit {
                name: format!("unit-{i:05}"),
                replicas: if i % 2000 == 0 {
                    Replicas::Global
                } else {
                    Replicas::Count(1 + (i % 3) as u32)
                },
                labels,
                conflicts,
                ports,
                requests: Default::default(),
                sticky: false,
                pinned: Default::default(),
            }
        })
        .collect()
}

fn time(label: &str, runs: usize, mut f: impl FnMut() -> Placement) -> Placement {
    let mut times: Vec<Duration> = Vec::new();
    let mut out = Placement::new();
    for _ in 0..runs {
        let t = Instant::now();
        out = f();
        times.push(t.elapsed());
    }
    times.sort();
    let instances: usize = out.values().map(|m| m.len()).sum();
    println!(
        "{label}: median {:.1} ms, max {:.1} ms over {runs} runs ({instances} instances)",
        times[runs / 2].as_secs_f64() * 1e3,
        times[runs - 1].as_secs_f64() * 1e3,
    );
    out
}

fn main() {
    let ms = machines(1_000);
    let us = units(10_000);
    println!("scheduler: {} units on {} machines", us.len(), ms.len());
    let first = time("full pass, empty cluster", 11, || {
        schedule(&ms, &us, &Placement::new()).placement
    });
    time("no-op pass", 11, || schedule(&ms, &us, &first).placement);
    let fewer: Vec<Machine> = ms[10..].to_vec();
    time("10 machines lost", 11, || {
        schedule(&fewer, &us, &first).placement
    });
}
