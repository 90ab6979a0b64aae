//! QEMU end-to-end: a fleet of three machines on etcd. Three VMs of `images/host.toml` (plus a
//! busybox OCI archive baked in, no local units) are provisioned through fw_cfg with their own
//! host name, a `node` label and the etcd on the host (`10.0.2.2`); etcd runs on host loopback.
//! The test submits three units through the fleet library (the CLI's code path); the leader
//! spreads them one per machine and each reports running. Then the leader's VM is hard-killed
//! (SIGKILL to QEMU): within TTL + 5 s its unit is reported running on one of the other two,
//! the others stay where they were. The time of each step (lease expiry, new leader, the
//! scheduling pass, running) is measured from the host and printed. The agents react to etcd
//! watches (the leader key, the machines, their assignment), so the failover is the TTL plus the
//! container start; the VMs' part of the test takes about a minute and a half under TCG.

#![allow(clippy::unwrap_used)]

mod common;

// The fleet's own etcd harness: Debian's etcd on free loopback ports, killed when dropped.
#[path = "../../fleet/tests/common/mod.rs"]
mod etcd_harness;

use caisson_fleet::etcd::Client;
use caisson_fleet::registry::{self, Keys, MachineRecord};
use caisson_fleet::scheduler::Placement;
use caisson_fleet::store::{Store, UnitStatus};
use caisson_fleet::unit::UnitSpec;
use caisson_qemu::{FwCfgValue, Vm, VmOptions};
use etcd_harness::Etcd;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// The machines' lease: a dead machine's units move after it expires.
const TTL_S: i64 = 10;
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
const UNITS: [&str; 3] = ["svc-a", "svc-b", "svc-c"];
const BUSYBOX: &str = "/bin/busybox";
const ARCHIVE: &str = common::BUSYBOX_ARCHIVE;
const POLL: Duration = Duration::from_millis(100);

/// `images/host.toml` plus the archive, in `dir`: no local units, they come from etcd.
fn cluster_spec(dir: &Path) -> String {
    common::host_spec_with_busybox(dir, "")
}

/// The machine config of one node: its host name, its label and the etcd on the host.
fn machine_config(node: &str, etcd_port: u16) -> String {
    format!(
        r#"version = 1
hostname = "{node}"

[fleet]
endpoints = ["http://{}:{etcd_port}"]
labels = {{ node = "{node}" }}
ttl_s = {TTL_S}
"#,
        caisson_qemu::HOST_FROM_GUEST
    )
}

fn unit(name: &str) -> UnitSpec {
    UnitSpec::parse(
        name,
        &format!("command = [\"/bin/sleep\", \"100000\"]\n[image]\npath = \"{ARCHIVE}\"\n"),
    )
    .unwrap()
}

/// The fleet's state in etcd as the CLI reads it, through the library.
struct Fleet {
    rt: tokio::runtime::Runtime,
    store: Store,
}

/// One reading of everything the test looks at.
#[derive(Debug, Default)]
struct Snapshot {
    /// Machine id to its node label.
    machines: BTreeMap<String, String>,
    /// Machine id to the revision of its record (changes on every heartbeat).
    beats: BTreeMap<String, i64>,
    leader: Option<String>,
    placement: Placement,
    statuses: BTreeMap<(String, String), UnitStatus>,
}

impl Snapshot {
    fn node(&self, id: &str) -> String {
        self.machines
            .get(id)
            .cloned()
            .unwrap_or_else(|| format!("gone:{}", &id[..id.len().min(8)]))
    }

    /// Unit to the machines where it is reported running.
    fn running(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for ((m, u), s) in &self.statuses {
            if s.state == "running" {
                out.entry(u.clone()).or_default().insert(m.clone());
            }
        }
        out
    }

    /// For the failure messages: nodes instead of machine ids.
    fn describe(&self) -> String {
        let place: Vec<String> = self
            .placement
            .iter()
            .map(|(u, ms)| {
                let on: Vec<String> = ms.iter().map(|m| self.node(m)).collect();
                format!("{u}->{}", on.join("+"))
            })
            .collect();
        let st: Vec<String> = self
            .statuses
            .iter()
            .map(|((m, u), s)| format!("{u}@{}:{}", self.node(m), s.state))
            .collect();
        format!(
            "machines {:?}, leader {:?}, placement [{}], statuses [{}]",
            self.machines.values().collect::<Vec<_>>(),
            self.leader.as_deref().map(|l| self.node(l)),
            place.join(" "),
            st.join(" ")
        )
    }
}

impl Fleet {
    fn new(endpoint: &str) -> Fleet {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = Client::new(&[endpoint]).unwrap();
        Fleet {
            rt,
            store: Store::new(client, Keys::new("/caisson/fleet/")),
        }
    }

    fn records(&self) -> Vec<MachineRecord> {
        self.rt
            .block_on(registry::machines(&self.store.client, &self.store.keys))
            .unwrap()
    }

    fn snapshot(&self) -> Snapshot {
        self.rt.block_on(async {
            let s = &self.store;
            // The records with their revisions: each agent rewrites its record when its tick
            // starts (the heartbeat), so a new revision marks a tick.
            let r = s.client.range(&s.keys.machines(), true).await.unwrap();
            let mut machines = BTreeMap::new();
            let mut beats = BTreeMap::new();
            for kv in r.kvs {
                let m: MachineRecord = serde_json::from_slice(&kv.value).unwrap();
                machines.insert(
                    m.id.clone(),
                    m.labels.get("node").cloned().unwrap_or_default(),
                );
                beats.insert(m.id, kv.mod_revision);
            }
            Snapshot {
                machines,
                beats,
                leader: registry::leader(&s.client, &s.keys).await.unwrap(),
                placement: s.placement().await.unwrap(),
                statuses: s.statuses().await.unwrap(),
            }
        })
    }

    fn submit(&self, specs: &[UnitSpec]) {
        self.rt.block_on(self.store.submit(specs)).unwrap();
    }

    /// Polls until `done` gives a value; panics with the last state after `timeout`.
    fn until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Snapshot) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.snapshot();
            if let Some(v) = done(&s) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; {}",
                s.describe()
            );
            std::thread::sleep(POLL);
        }
    }
}

/// Each unit on exactly one machine, all on different machines, each running where placed.
fn spread_and_running(s: &Snapshot) -> Option<BTreeMap<String, String>> {
    let running = s.running();
    let mut on = BTreeMap::new();
    for u in UNITS {
        let ms = s.placement.get(u)?;
        let m = ms.first()?;
        if ms.len() != 1 || running.get(u) != Some(ms) {
            return None;
        }
        on.insert(u.to_string(), m.clone());
    }
    let distinct: BTreeSet<&String> = on.values().collect();
    (distinct.len() == UNITS.len()).then_some(on)
}

/// Fails the test when an agent lost its machine's lease (its units would move away).
fn no_lease_lost(vms: &mut [Vm], skip: Option<usize>) {
    for (i, (vm, node)) in vms.iter_mut().zip(NODES).enumerate() {
        if Some(i) == skip {
            continue;
        }
        let console = vm.console_text().unwrap();
        assert!(
            !console.contains("machine lease expired"),
            "{node} lost its lease (its agent did not renew it within {TTL_S} s):\n{}",
            vm.console_tail(30).unwrap_or_default()
        );
    }
}

fn boot(image: &Path, config: &Path) -> Vm {
    let mut opts = VmOptions::new(image);
    opts.memory_mib = 1024;
    // Three guests on two host cores: one vCPU each keeps TCG threads from fighting.
    opts.smp = 1;
    opts.fw_cfg = vec![("opt/caisson/config".into(), FwCfgValue::File(config.into()))];
    Vm::launch(opts).expect("launching QEMU")
}

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

#[test]
fn three_machines_spread_units_and_move_them_off_a_dead_one() {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: apt-get install -y busybox-static (ci/deps does)"
    );
    let started = Instant::now();
    // Inside the workspace: the build finds the workspace above the spec for its binaries.
    let e2e = common::workspace().join("target/e2e");
    std::fs::create_dir_all(&e2e).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("fleet-cluster-")
        .tempdir_in(&e2e)
        .unwrap();
    let spec = cluster_spec(dir.path());
    let image = common::build(&spec, &dir.path().join("out"), &[]);
    eprintln!("image built in {:.0?}", started.elapsed());

    let _one_vm = common::vm_lock();
    let etcd = Etcd::start();
    let fleet = Fleet::new(&etcd.endpoint());

    // Three machines, booted together, each with its own config.
    let booting = Instant::now();
    let mut vms: Vec<Vm> = NODES
        .iter()
        .map(|node| {
            let cfg = dir.path().join(format!("{node}.toml"));
            std::fs::write(&cfg, machine_config(node, etcd.client_port)).unwrap();
            boot(&image, &cfg)
        })
        .collect();
    for (vm, node) in vms.iter_mut().zip(NODES) {
        vm.wait_for("caisson: ready ", BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{node} does not reach ready: {e}"));
        let st = common::request(vm, r#"{"cmd":"status"}"#);
        assert_eq!(st["status"]["hostname"], node, "{st}");
    }
    let ids: BTreeMap<String, String> = fleet.until("three machines register", BOOT_TIMEOUT, |s| {
        let nodes: BTreeSet<&str> = s.machines.values().map(String::as_str).collect();
        (nodes == BTreeSet::from(NODES)).then(|| s.machines.clone())
    });
    eprintln!(
        "three machines ready and registered in {:.0?}",
        booting.elapsed()
    );
    for m in fleet.records() {
        assert_eq!(m.version.as_deref(), Some("1.0.0"), "{m:?}");
        assert!(m.slot.is_some(), "{m:?}");
    }

    // Three units: the leader spreads them, one per machine, and each machine runs its own.
    let spreading = Instant::now();
    fleet.submit(&UNITS.map(unit));
    let on = fleet.until("the units spread and run", Duration::from_secs(300), |s| {
        no_lease_lost(&mut vms, None);
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
    no_lease_lost(&mut vms, Some(index));
    drop(vms);
    drop(etcd);
    eprintln!("whole test: {:.0?}", started.elapsed());
    assert!(
        took <= (TTL_S + 5) as f64,
        "{lost} ran elsewhere only {took:.1} s after the kill, more than TTL + 5 s; {seen:?}"
    );
}
