//! The scheduler's tests: examples, and properties over random fleets.

use super::*;
use proptest::prelude::*;

fn machine(id: &str, labels: &[(&str, &str)]) -> Machine {
    Machine {
        id: id.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        capacity: None,
    }
}

const GIB: u64 = 1 << 30;

fn sized(id: &str, gib: u64, cpus: u32) -> Machine {
    Machine {
        capacity: Capacity::reported(Some(gib * GIB), Some(cpus)),
        ..machine(id, &[])
    }
}

fn asking(name: &str, replicas: u32, gib: u64, millicpus: u64) -> Unit {
    Unit {
        requests: Capacity {
            memory_bytes: gib * GIB,
            millicpus,
        },
        ..unit(name, Replicas::Count(replicas))
    }
}

fn unit(name: &str, replicas: Replicas) -> Unit {
    Unit {
        name: name.into(),
        replicas,
        labels: BTreeMap::new(),
        conflicts: vec![],
        ports: vec![],
        requests: Capacity::default(),
        sticky: false,
        pinned: BTreeSet::new(),
    }
}

fn pinned(name: &str, replicas: u32, on: &[&str]) -> Unit {
    Unit {
        sticky: true,
        pinned: on.iter().map(|m| m.to_string()).collect(),
        ..unit(name, Replicas::Count(replicas))
    }
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|m| m.to_string()).collect()
}

fn on(s: &Schedule, u: &str) -> Vec<String> {
    s.placement
        .get(u)
        .map(|m| m.iter().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn spreads_replicas_and_balances() {
    let ms: Vec<_> = (0..3).map(|i| machine(&format!("m{i}"), &[])).collect();
    let us = vec![
        unit("a", Replicas::Count(3)),
        unit("b", Replicas::Count(2)),
        unit("c", Replicas::Count(1)),
    ];
    let s = schedule(&ms, &us, &Placement::new());
    assert_eq!(on(&s, "a"), ["m0", "m1", "m2"]);
    assert_eq!(s.placement["b"].len(), 2);
    let mut load = BTreeMap::new();
    for m in s.placement.values().flatten() {
        *load.entry(m.clone()).or_insert(0) += 1;
    }
    assert_eq!(load.values().copied().collect::<Vec<_>>(), [2, 2, 2]);
    assert!(s.unplaced.is_empty());
}

#[test]
fn too_few_machines_is_reported() {
    let ms = vec![machine("m0", &[])];
    let s = schedule(&ms, &[unit("a", Replicas::Count(2))], &Placement::new());
    assert_eq!(on(&s, "a"), ["m0"]);
    assert_eq!(s.unplaced["a"], 1);
}

#[test]
fn labels_conflicts_ports_and_global() {
    let ms = vec![
        machine("m0", &[("zone", "a")]),
        machine("m1", &[("zone", "b")]),
        machine("m2", &[("zone", "a"), ("disk", "ssd")]),
    ];
    let mut db = unit("db", Replicas::Count(1));
    db.labels.insert("disk".into(), "ssd".into());
    let mut web = unit("web", Replicas::Count(2));
    web.conflicts = vec!["d*".into()];
    web.labels.insert("zone".into(), "a".into());
    let mut mon = unit("mon", Replicas::Global);
    mon.labels.insert("zone".into(), "a".into());
    let mut p1 = unit("p1", Replicas::Count(3));
    p1.ports = vec![HostPort {
        port: 80,
        udp: false,
    }];
    let mut p2 = unit("p2", Replicas::Count(3));
    p2.ports = vec![HostPort {
        port: 80,
        udp: false,
    }];
    let s = schedule(&ms, &[db, web, mon, p1, p2], &Placement::new());
    assert_eq!(on(&s, "db"), ["m2"]);
    assert_eq!(on(&s, "web"), ["m0"], "zone a but not beside db");
    assert_eq!(s.unplaced["web"], 1);
    assert_eq!(on(&s, "mon"), ["m0", "m2"]);
    assert_eq!(on(&s, "p1"), ["m0", "m1", "m2"]);
    assert!(on(&s, "p2").is_empty(), "port 80 taken everywhere");
}

#[test]
fn keeps_current_and_moves_lost_units() {
    let ms = vec![machine("m0", &[]), machine("m1", &[]), machine("m2", &[])];
    let us = vec![unit("a", Replicas::Count(1)), unit("b", Replicas::Count(1))];
    let mut cur = Placement::new();
    cur.insert("a".into(), ["m2".to_string()].into());
    cur.insert("b".into(), ["m9".to_string()].into());
    let s = schedule(&ms, &us, &cur);
    assert_eq!(on(&s, "a"), ["m2"], "kept");
    assert_eq!(on(&s, "b"), ["m0"], "machine gone: placed again");
    // Fewer replicas: trimmed, not moved.
    cur.insert("a".into(), ["m0".to_string(), "m1".to_string()].into());
    let s = schedule(&ms, &us, &cur);
    assert_eq!(on(&s, "a"), ["m0"]);
}

#[test]
fn requests_count_against_what_machines_report() {
    let ms = vec![sized("m0", 4, 2), sized("m1", 2, 8), machine("m2", &[])];
    // 3 GiB and 1 CPU fit m0 only (m1 has 2 GiB); m2 reported nothing and takes anything.
    let big = asking("big", 3, 3, 1000);
    // 1.5 CPUs: m0 has 2, m1 8.
    let cpu = asking("cpu", 3, 0, 1500);
    let free = unit("free", Replicas::Count(3));
    let s = schedule(
        &ms,
        &[big.clone(), cpu.clone(), free.clone()],
        &Placement::new(),
    );
    assert_eq!(on(&s, "big"), ["m0", "m2"]);
    assert_eq!(s.unplaced["big"], 1);
    assert_eq!(on(&s, "cpu"), ["m1", "m2"], "m0 has 1 CPU left after big");
    assert_eq!(
        on(&s, "free"),
        ["m0", "m1", "m2"],
        "no requests: fits anywhere"
    );

    // A machine that reports less than its units ask keeps the first ones (by name).
    let small = vec![sized("m0", 4, 1)];
    let cur: Placement = [
        ("big".to_string(), ["m0".to_string()].into()),
        ("cpu".to_string(), ["m0".to_string()].into()),
    ]
    .into();
    let s = schedule(
        &small,
        &[asking("big", 1, 3, 0), asking("cpu", 1, 0, 1500)],
        &cur,
    );
    assert_eq!(on(&s, "big"), ["m0"]);
    assert!(on(&s, "cpu").is_empty());

    // Only memory reported: CPUs are unlimited there.
    let mem_only = vec![Machine {
        capacity: Capacity::reported(Some(GIB), None),
        ..machine("m0", &[])
    }];
    let s = schedule(&mem_only, &[asking("cpu", 1, 0, 64_000)], &Placement::new());
    assert_eq!(on(&s, "cpu"), ["m0"]);
    assert_eq!(Capacity::reported(None, None), None);
}

#[test]
fn volumes_pin_a_unit_to_its_machines() {
    let ms = vec![machine("m0", &[]), machine("m1", &[]), machine("m2", &[])];
    // First placement: anywhere, and pinned there.
    let db = pinned("db", 1, &[]);
    let s = schedule(&ms, &[db], &Placement::new());
    assert_eq!(on(&s, "db"), ["m0"]);
    assert_eq!(s.pins["db"], set(&["m0"]));
    // Its machine is gone: it waits for it rather than start empty elsewhere.
    let db = pinned("db", 1, &["m0"]);
    let s = schedule(&ms[1..], std::slice::from_ref(&db), &Placement::new());
    assert!(on(&s, "db").is_empty());
    assert_eq!(s.unplaced["db"], 1);
    assert_eq!(s.waiting["db"], set(&["m0"]));
    assert_eq!(s.pins["db"], set(&["m0"]));
    // It comes back: the unit goes back there, even when another machine is less loaded.
    let busy = unit("busy", Replicas::Count(1));
    let cur: Placement = [("busy".to_string(), set(&["m0"]))].into();
    let s = schedule(&ms, &[db.clone(), busy], &cur);
    assert_eq!(on(&s, "db"), ["m0"]);
    assert!(s.waiting.is_empty() && s.unplaced.is_empty());
    // volumes_follow = "none" (not sticky): placed elsewhere at once, no pin recorded.
    let free = Unit {
        sticky: false,
        ..db.clone()
    };
    let s = schedule(&ms[1..], &[free], &Placement::new());
    assert_eq!(on(&s, "db"), ["m1"]);
    assert!(s.pins.is_empty() && s.waiting.is_empty());
    // A pinned machine without room: it waits too (named), rather than move.
    let small = vec![sized("m0", 1, 1), sized("m1", 8, 8)];
    let big = Unit {
        requests: Capacity {
            memory_bytes: 2 * GIB,
            millicpus: 0,
        },
        ..db.clone()
    };
    let s = schedule(&small, &[big], &Placement::new());
    assert!(on(&s, "db").is_empty());
    assert_eq!(s.waiting["db"], set(&["m0"]));
}

#[test]
fn replicas_beyond_the_pinned_machines_go_anywhere() {
    let ms: Vec<_> = (0..4).map(|i| machine(&format!("m{i}"), &[])).collect();
    // Three replicas, data on m1 and on m9 (gone): m1 takes one, one more may go elsewhere,
    // m9's slot waits.
    let u = pinned("kv", 3, &["m1", "m9"]);
    let s = schedule(&ms, &[u], &Placement::new());
    let placed = on(&s, "kv");
    assert_eq!(placed.len(), 2, "{placed:?}");
    assert!(placed.contains(&"m1".to_string()));
    assert_eq!(s.unplaced["kv"], 1);
    assert_eq!(s.waiting["kv"], set(&["m9"]));
    let mut want = set(&["m1", "m9"]);
    want.extend(placed);
    assert_eq!(s.pins["kv"], want);
    // Fewer replicas than pinned machines: only pinned ones, the current first.
    let u = pinned("kv", 1, &["m1", "m2"]);
    let cur: Placement = [("kv".to_string(), set(&["m0", "m2"]))].into();
    let s = schedule(&ms, &[u], &cur);
    assert_eq!(on(&s, "kv"), ["m2"]);
}

fn arb_input() -> impl Strategy<Value = (Vec<Machine>, Vec<Unit>, Placement)> {
    let zones = prop::sample::select(vec!["a", "b", "c"]);
    let capacity = prop::option::of((1u64..8, 1u32..4));
    let machines =
        prop::collection::vec((zones.clone(), any::<bool>(), capacity), 0..12).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (z, ssd, cap))| {
                    let mut l = vec![("zone", z)];
                    if ssd {
                        l.push(("disk", "ssd"));
                    }
                    Machine {
                        capacity: cap.and_then(|(g, c)| Capacity::reported(Some(g * GIB), Some(c))),
                        ..machine(&format!("m{i:02}"), &l)
                    }
                })
                .collect::<Vec<_>>()
        });
    let unit_s = (
        0u32..6,
        prop::option::of(zones),
        any::<bool>(),
        prop::collection::vec(0usize..10, 0..3),
        prop::option::of(prop::sample::select(vec![80u16, 443])),
        (0u64..3, prop::sample::select(vec![0u64, 500, 1000, 2500])),
        (
            any::<bool>(),
            prop::collection::btree_set((0usize..14).prop_map(|i| format!("m{i:02}")), 0..3),
        ),
    );
    let units = prop::collection::vec(unit_s, 0..10).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(
                |(i, (r, zone, ssd, conflicts, port, (gib, millicpus), (sticky, pins)))| {
                    let mut u = unit(
                        &format!("u{i}"),
                        if r == 0 {
                            Replicas::Global
                        } else {
                            Replicas::Count(r)
                        },
                    );
                    if let Some(z) = zone {
                        u.labels.insert("zone".into(), z.into());
                    }
                    if ssd {
                        u.labels.insert("disk".into(), "ssd".into());
                    }
                    u.conflicts = conflicts.iter().map(|c| format!("u{c}")).collect();
                    if i % 3 == 0 {
                        u.conflicts.push("u1*".into());
                    }
                    u.ports = port
                        .map(|p| HostPort {
                            port: p,
                            udp: false,
                        })
                        .into_iter()
                        .collect();
                    u.requests = Capacity {
                        memory_bytes: gib * GIB,
                        millicpus,
                    };
                    u.sticky = sticky && r > 0;
                    u.pinned = if u.sticky { pins } else { BTreeSet::new() };
                    u
                },
            )
            .collect::<Vec<_>>()
    });
    let current = prop::collection::btree_map(
        (0usize..12).prop_map(|i| format!("u{i}")),
        prop::collection::btree_set((0usize..14).prop_map(|i| format!("m{i:02}")), 0..6),
        0..12,
    );
    (machines, units, current)
}

fn check_constraints(ms: &[Machine], us: &[Unit], s: &Schedule) -> Result<(), TestCaseError> {
    let mut by_machine: BTreeMap<String, Vec<&Unit>> = BTreeMap::new();
    for u in us {
        let empty = BTreeSet::new();
        let on = s.placement.get(&u.name).unwrap_or(&empty);
        if let Replicas::Count(n) = u.replicas {
            prop_assert!(on.len() <= n as usize, "{} exceeds {n} replicas", u.name);
        }
        for m in on {
            let machine = ms.iter().find(|x| &x.id == m);
            prop_assert!(machine.is_some(), "{} placed on unknown {m}", u.name);
            prop_assert!(labels_match(
                &machine.map(|x| x.labels.clone()).unwrap_or_default(),
                &u.labels
            ));
            by_machine.entry(m.clone()).or_default().push(u);
        }
    }
    for p in s.placement.keys() {
        prop_assert!(us.iter().any(|u| &u.name == p), "unknown unit {p} placed");
    }
    for u in us.iter().filter(|u| u.sticky) {
        let Replicas::Count(n) = u.replicas else {
            continue;
        };
        let empty = BTreeSet::new();
        let on = s.placement.get(&u.name).unwrap_or(&empty);
        let elsewhere = on.difference(&u.pinned).count();
        prop_assert!(
            elsewhere <= (n as usize).saturating_sub(u.pinned.len()),
            "{} left its volumes: on {on:?}, pinned {:?}",
            u.name,
            u.pinned
        );
        // Pins only grow, and cover where it runs.
        let pins = s.pins.get(&u.name).cloned().unwrap_or_default();
        prop_assert!(u.pinned.is_subset(&pins) && on.is_subset(&pins));
        // Missing instances with pinned machines away: those machines are named.
        let away: BTreeSet<String> = u.pinned.difference(on).cloned().collect();
        if s.unplaced.contains_key(&u.name) && !away.is_empty() {
            prop_assert_eq!(s.waiting.get(&u.name), Some(&away));
        }
    }
    for u in us.iter().filter(|u| !u.sticky) {
        prop_assert!(!s.pins.contains_key(&u.name) && !s.waiting.contains_key(&u.name));
    }
    for (m, here) in by_machine {
        let cap = ms.iter().find(|x| x.id == m).and_then(|x| x.capacity);
        let used = here
            .iter()
            .fold(Capacity::default(), |a, u| a.plus(u.requests));
        prop_assert!(
            cap.is_none_or(|c| used.within(c)),
            "{m} over capacity: {used:?} > {cap:?}"
        );
        for a in &here {
            for b in &here {
                if a.name == b.name {
                    continue;
                }
                let named = a.conflicts.iter().any(|c| matches_pattern(c, &b.name));
                let port = a.ports.iter().any(|p| b.ports.contains(p));
                prop_assert!(!named && !port, "{} and {} conflict on {m}", a.name, b.name);
            }
        }
    }
    Ok(())
}

/// The units with the pins a schedule recorded.
fn with_pins(us: &[Unit], s: &Schedule) -> Vec<Unit> {
    us.iter()
        .map(|u| Unit {
            pinned: s
                .pins
                .get(&u.name)
                .cloned()
                .unwrap_or_else(|| u.pinned.clone()),
            ..u.clone()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn constraints_always_hold((ms, us, cur) in arb_input()) {
        let s = schedule(&ms, &us, &cur);
        check_constraints(&ms, &us, &s)?;
    }

    #[test]
    fn no_op_keeps_placement((ms, us, cur) in arb_input()) {
        let first = schedule(&ms, &us, &cur);
        let second = schedule(&ms, &us, &first.placement);
        prop_assert_eq!(&first, &second);
    }

    #[test]
    fn recorded_pins_keep_the_placement((ms, us, cur) in arb_input()) {
        // The leader records the pins, then schedules again: nothing changes.
        let first = schedule(&ms, &us, &cur);
        let pinned = with_pins(&us, &first);
        let second = schedule(&ms, &pinned, &first.placement);
        prop_assert_eq!(&first.placement, &second.placement);
        prop_assert_eq!(&first.pins, &second.pins);
        check_constraints(&ms, &pinned, &second)?;
    }

    #[test]
    fn a_sticky_unit_never_moves_off_its_machines((ms, us, cur) in arb_input(), gone in 0usize..12) {
        // Pin every sticky unit where it runs, then take one machine away.
        let first = schedule(&ms, &us, &cur);
        let pinned = with_pins(&us, &first);
        let lost = format!("m{gone:02}");
        let fewer: Vec<Machine> = ms.iter().filter(|m| m.id != lost).cloned().collect();
        let second = schedule(&fewer, &pinned, &first.placement);
        check_constraints(&fewer, &pinned, &second)?;
        for u in pinned.iter().filter(|u| u.sticky) {
            let Replicas::Count(n) = u.replicas else { continue };
            let was_there = first.placement.get(&u.name).is_some_and(|on| on.contains(&lost));
            if was_there && u.pinned.len() >= n as usize {
                let on = second.placement.get(&u.name).cloned().unwrap_or_default();
                prop_assert!(on.is_subset(&u.pinned), "{} moved to {on:?}", u.name);
                if second.unplaced.contains_key(&u.name) {
                    prop_assert!(second.waiting.get(&u.name).is_some_and(|w| w.contains(&lost)),
                        "{} does not wait for {lost}: {:?}", u.name, second.waiting);
                }
            }
        }
    }

    #[test]
    fn a_new_machine_moves_nothing((ms, us, cur) in arb_input()) {
        let first = schedule(&ms, &us, &cur);
        let mut more = ms.clone();
        more.push(machine("new", &[("zone", "a"), ("disk", "ssd")]));
        let second = schedule(&more, &us, &first.placement);
        for (u, on) in &first.placement {
            let now = second.placement.get(u).cloned().unwrap_or_default();
            prop_assert!(on.is_subset(&now), "{u} moved: {on:?} -> {now:?}");
        }
    }

    #[test]
    fn unconstrained_units_fill_and_balance(n_machines in 1usize..20, replicas in prop::collection::vec(1u32..5, 0..30)) {
        let ms: Vec<_> = (0..n_machines).map(|i| machine(&format!("m{i:02}"), &[])).collect();
        let us: Vec<_> = replicas.iter().enumerate().map(|(i, &r)| unit(&format!("u{i}"), Replicas::Count(r))).collect();
        let s = schedule(&ms, &us, &Placement::new());
        for u in &us {
            let Replicas::Count(r) = u.replicas else { continue };
            prop_assert_eq!(s.placement.get(&u.name).map_or(0, |m| m.len()), (r as usize).min(n_machines));
        }
        let mut load = vec![0usize; n_machines];
        for m in s.placement.values().flatten() {
            load[m[1..].parse::<usize>().unwrap_or(0)] += 1;
        }
        let (lo, hi) = (load.iter().min().copied().unwrap_or(0), load.iter().max().copied().unwrap_or(0));
        prop_assert!(hi - lo <= 1, "unbalanced: {load:?}");
    }
}
