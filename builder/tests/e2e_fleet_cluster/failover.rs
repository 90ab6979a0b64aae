//! The failover half of the cluster test: the leader's machine is hard-killed and its unit
//! runs elsewhere within TTL + 5 s.

use super::{no_lease_lost, spread_and_running, unit, Fleet, NODES, POLL, TTL_S, UNITS};
use caisson_qemu::Vm;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// When each step of a failover was first seen from the host, in seconds after the kill.
#[derive(Debug, Default)]
struct Failover {
    expired: Option<f64>,
    new_leader: Option<f64>,
    rescheduled: Option<f64>,
    running: Option<f64>,
    /// Each survivor's heartbeats (the start of its ticks).
    ticks: BTreeMap<String, Vec<f64>>,
}

/// Hard-kills the leader's machine: within TTL + 5 s its unit runs on another, the others stay.
/// Returns the index of the killed machine and when it was killed.
pub(crate) fn fail_over(
    fleet: &Fleet,
    vms: &mut [Vm],
    ids: &BTreeMap<String, String>,
) -> (usize, Instant) {
    // Three units: the leader spreads them, one per machine, and each machine runs its own.
    let spreading = Instant::now();
    fleet.submit(&UNITS.map(unit));
    let on = fleet.until("the units spread and run", Duration::from_secs(300), |s| {
        no_lease_lost(vms, None);
        spread_and_running(s)
    });
    eprintln!(
        "units spread and running in {:.1?}: {:?}",
        spreading.elapsed(),
        on.iter().map(|(u, m)| (u, &ids[m])).collect::<Vec<_>>()
    );

    // Hard-kill the leader's machine: it loses its lease, leadership and its unit at once.
    let before = fleet.snapshot();
    let victim = before.leader.clone().expect("a leader");
    let lost = on
        .iter()
        .find(|(_, m)| **m == victim)
        .map(|(u, _)| u.clone())
        .expect("the leader runs a unit");
    let index = NODES.iter().position(|n| *n == ids[&victim]).unwrap();
    eprintln!("killing {} (the leader, running {lost})", NODES[index]);
    vms[index].kill().unwrap();
    let killed = Instant::now();
    // To line up with the guests' console (containerd logs in UTC with nanoseconds).
    let day_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 86_400_000;
    eprintln!(
        "killed at {:02}:{:02}:{:02}.{:03} UTC",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    );
    let mut seen = Failover::default();
    let limit = Duration::from_secs(TTL_S as u64 + 60);
    let mut last = String::new();
    let mut beats = before.beats.clone();
    let moved_to = loop {
        let s = fleet.snapshot();
        let t = killed.elapsed().as_secs_f64();
        let now = s.describe();
        if now != last {
            eprintln!("+{t:.1} s: {now}");
            last = now;
        }
        for (m, rev) in &s.beats {
            if beats.insert(m.clone(), *rev) != Some(*rev) {
                seen.ticks.entry(m.clone()).or_default().push(t);
            }
        }
        if seen.expired.is_none() && !s.machines.contains_key(&victim) {
            seen.expired = Some(t);
        }
        if seen.new_leader.is_none() && s.leader.as_ref().is_some_and(|l| *l != victim) {
            seen.new_leader = Some(t);
        }
        let placed = s.placement.get(&lost).cloned().unwrap_or_default();
        if seen.rescheduled.is_none() && !placed.is_empty() && !placed.contains(&victim) {
            seen.rescheduled = Some(t);
        }
        let running = s.running().get(&lost).cloned().unwrap_or_default();
        if let Some(m) = running.iter().find(|m| **m != victim) {
            seen.running = Some(t);
            break (m.clone(), s);
        }
        assert!(
            killed.elapsed() < limit,
            "{lost} does not run elsewhere within {limit:?} of the kill; steps {seen:?}; {}",
            s.describe()
        );
        std::thread::sleep(POLL);
    };
    let (moved_to, after) = moved_to;
    let took = seen.running.unwrap();
    let rescheduled = seen.rescheduled.unwrap_or(took);
    let noticed = seen.ticks.get(&moved_to).and_then(|ts| {
        ts.iter()
            .copied()
            .find(|t| *t + POLL.as_secs_f64() >= rescheduled)
    });
    let ticks: Vec<String> = seen
        .ticks
        .iter()
        .map(|(m, ts)| {
            let ts: Vec<String> = ts.iter().map(|t| format!("{t:.1}")).collect();
            format!("{} [{}]", ids[m], ts.join(" "))
        })
        .collect();
    eprintln!(
        "{lost} running on {} {took:.1} s after the kill (TTL {TTL_S} s, watches; fallback tick {:.2} s): \
         lease expired at {:.1?} s, new leader at {:.1?} s, rescheduled at {:.1?} s, \
         {} ticked (saw its assignment) at {:.1?} s, running reported at {took:.1} s; \
         survivors' ticks (s after the kill): {}",
        ids[&moved_to],
        (TTL_S as f64 / 3.0).max(0.5),
        seen.expired,
        seen.new_leader,
        seen.rescheduled,
        ids[&moved_to],
        noticed,
        ticks.join(", "),
    );

    // The survivors kept their units; nothing is placed on the dead machine.
    let moved = fleet.until("the fleet settles", Duration::from_secs(30), |s| {
        (!s.machines.contains_key(&victim) && s.leader.as_ref().is_some_and(|l| *l != victim))
            .then(|| s.placement.clone())
    });
    for (u, m) in on.iter().filter(|(u, _)| **u != lost) {
        assert_eq!(
            moved.get(u),
            Some(&BTreeSet::from([m.clone()])),
            "{u} moved; {}",
            after.describe()
        );
        assert!(
            after.running().get(u).is_some_and(|r| r.contains(m)),
            "{u} no longer runs on {}; {}",
            ids[m],
            after.describe()
        );
    }
    assert_eq!(
        moved.get(&lost),
        Some(&BTreeSet::from([moved_to.clone()])),
        "{}",
        after.describe()
    );
    assert!(
        moved.values().all(|ms| !ms.contains(&victim)),
        "{}",
        after.describe()
    );
    // No survivor lost its lease on the way (a slow tick would re-register it).
    no_lease_lost(vms, Some(index));
    assert!(
        took <= (TTL_S + 5) as f64,
        "{lost} ran elsewhere only {took:.1} s after the kill, more than TTL + 5 s; {seen:?}"
    );
    (index, killed)
}
