//! The rolling-update half of the cluster test: v2 is published and the machines take it one
//! reboot at a time under the fleet's reboot lock.

use super::{common, Fleet, NODES, POLL, ROLLING_TIMEOUT, V1, V2};
use caisson_fleet::lock::Semaphore;
use caisson_qemu::Vm;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A VM's console as QEMU writes it, read from the host line by line as it grows.
struct ConsoleLines {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl ConsoleLines {
    /// From the console's current end on.
    fn from_end(vm: &Vm) -> ConsoleLines {
        let path = vm.console_path().to_path_buf();
        let offset = std::fs::metadata(&path).map_or(0, |m| m.len());
        ConsoleLines {
            path,
            offset,
            partial: Vec::new(),
        }
    }

    /// The whole lines written since the last call.
    fn read(&mut self) -> Vec<String> {
        let mut f = std::fs::File::open(&self.path).unwrap();
        f.seek(SeekFrom::Start(self.offset)).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let mut out = Vec::new();
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            out.push(caisson_qemu::clean_line(&String::from_utf8_lossy(&line)));
        }
        out
    }
}

/// The console lines a rolling update is followed by, and what the timeline calls them.
const STEPS: [(&str, &str); 9] = [
    (
        "updating 1.0.0 -> 2.0.0",
        "update agent: applying v2 into the other slot",
    ),
    (
        "strategy etcd-lock: ",
        "update agent: v2 written, reboot left to the fleet agent",
    ),
    (
        "waits for a slot of the fleet's reboot lock",
        "fleet agent: waits for the lock",
    ),
    (
        "holding the fleet's reboot lock",
        "fleet agent: holds the lock, asks for a reboot",
    ),
    (
        "Reboot requested through the control channel",
        "init: reboot (down)",
    ),
    ("caisson: ready ", "init: ready"),
    ("boot entry blessed: ", "init: blessed"),
    (
        "update to 2.0.0 succeeded",
        "update agent: success recorded, boot settled",
    ),
    (
        "released the reboot lock held by",
        "fleet agent: boot settled, lock given back",
    ),
];

/// One machine during the rolling update, as its console tells it.
#[derive(Debug, Default)]
struct Rolling {
    /// Started applying v2 (seconds after it was published).
    applying: Option<f64>,
    /// Down since: from the init's "Reboot requested" until its next "ready".
    down_since: Option<f64>,
    /// Each reboot: (down, ready again).
    reboots: Vec<(f64, f64)>,
    /// The last "ready" line, from `version=`.
    ready: Option<String>,
    /// The last blessed entry.
    blessed: Option<String>,
}

impl Rolling {
    /// Takes in one console line; returns what the timeline says of it.
    fn see(&mut self, t: f64, line: &str) -> Option<String> {
        let (marker, what) = STEPS.iter().find(|(m, _)| line.contains(m))?;
        let tail = line[line.find(marker).unwrap() + marker.len()..].trim();
        match *marker {
            "updating 1.0.0 -> 2.0.0" => self.applying = self.applying.or(Some(t)),
            "Reboot requested through the control channel" => self.down_since = Some(t),
            "caisson: ready " => {
                if let Some(down) = self.down_since.take() {
                    self.reboots.push((down, t));
                }
                self.ready = Some(tail.to_string());
                return Some(format!("{what} {tail}"));
            }
            "boot entry blessed: " => {
                self.blessed = Some(tail.to_string());
                return Some(format!("{what} {tail}"));
            }
            _ => {}
        }
        Some(what.to_string())
    }

    /// Running v2 from slot B, blessed.
    fn done(&self) -> bool {
        self.ready
            .as_deref()
            .is_some_and(|r| r.starts_with(&format!("version={V2} slot=b ")))
            && self.blessed.as_deref() == Some(&*format!("caisson-{V2}-b.conf"))
    }
}

/// The rolling update's timeline: seconds after v2 was published, the machine, what happened.
#[derive(Default)]
struct Timeline(Vec<(f64, String, String)>);

impl Timeline {
    fn push(&mut self, t: f64, node: &str, what: String) {
        self.0.push((t, node.to_string(), what));
    }

    fn show(&self) -> String {
        let mut lines: Vec<String> = self
            .0
            .iter()
            .map(|(t, n, w)| format!("  +{t:6.1} s  {n:<7} {w}"))
            .collect();
        lines.push(String::new());
        lines.join("\n")
    }
}

/// For the failure messages of [`roll_to_v2`]: the lock, who is down, the timeline so far and
/// the end of each console.
fn describe(sem: &Semaphore, down: &[usize], timeline: &Timeline, vms: &mut [Vm]) -> String {
    let tails: Vec<String> = vms
        .iter_mut()
        .zip(NODES)
        .map(|(vm, n)| format!("{n}:\n{}", vm.console_tail(15).unwrap_or_default()))
        .collect();
    format!(
        "lock {sem:?}; down {:?}\ntimeline:\n{}consoles:\n{}",
        down.iter().map(|i| NODES[*i]).collect::<Vec<_>>(),
        timeline.show(),
        tails.join("\n")
    )
}

/// Sets the reboot lock to max 1, publishes v2 (`publish_v2`) and follows the update agents as
/// they roll it out: every [`POLL`], the three consoles, then the lock key in etcd. Never more
/// than one holder, never two machines down at once, a machine down only while it holds the
/// lock; all end on v2 from slot B, blessed, the lock empty. Prints the timeline.
pub(crate) fn roll_to_v2(
    fleet: &Fleet,
    vms: &mut [Vm],
    ids: &BTreeMap<String, String>,
    publish_v2: impl FnOnce(),
) {
    let id_of: BTreeMap<&str, &str> = ids.iter().map(|(i, n)| (n.as_str(), i.as_str())).collect();
    let node_of = |id: &str| ids.get(id).cloned().unwrap_or_else(|| id.to_string());
    fleet.set_max(1);
    let mut consoles: Vec<ConsoleLines> = vms.iter().map(ConsoleLines::from_end).collect();
    let mut seen: Vec<Rolling> = NODES.iter().map(|_| Rolling::default()).collect();
    let mut timeline = Timeline::default();
    let mut holders: Vec<String> = fleet.lock().holders;
    assert!(
        holders.is_empty(),
        "the lock is held before the update: {holders:?}"
    );
    let mut most_down = 0;
    let t0 = Instant::now();
    publish_v2();
    timeline.push(
        0.0,
        "host",
        format!("v{V2} published (rollout 0 s); lock max 1"),
    );
    loop {
        let t = t0.elapsed().as_secs_f64();
        // The consoles first, then etcd: a machine seen down took the lock before it asked for
        // the reboot, and gives it back only once its new boot is blessed, so the lock read
        // after must still name it.
        for (i, c) in consoles.iter_mut().enumerate() {
            for line in c.read() {
                if let Some(what) = seen[i].see(t, &line) {
                    timeline.push(t, NODES[i], what);
                }
            }
        }
        let down: Vec<usize> = (0..NODES.len())
            .filter(|i| seen[*i].down_since.is_some())
            .collect();
        let sem = fleet.lock();
        for h in sem.holders.iter().filter(|h| !holders.contains(h)) {
            timeline.push(t, &node_of(h), "etcd: holds the reboot lock".into());
        }
        for h in holders.iter().filter(|h| !sem.holders.contains(h)) {
            timeline.push(t, &node_of(h), "etcd: reboot lock given back".into());
        }
        holders = sem.holders.clone();
        most_down = most_down.max(down.len());
        assert_eq!(sem.max, 1, "{}", describe(&sem, &down, &timeline, vms));
        assert!(
            sem.holders.len() <= 1,
            "two holders of the lock: {}",
            describe(&sem, &down, &timeline, vms)
        );
        assert!(
            down.len() <= 1,
            "two machines down at once: {}",
            describe(&sem, &down, &timeline, vms)
        );
        for i in &down {
            assert!(
                sem.holders.iter().any(|h| h == id_of[NODES[*i]]),
                "{} is down without holding the lock: {}",
                NODES[*i],
                describe(&sem, &down, &timeline, vms)
            );
        }
        let exited = vms
            .iter_mut()
            .zip(NODES)
            .find_map(|(vm, n)| vm.exit_status().unwrap().map(|st| (n, st)));
        if let Some((node, status)) = exited {
            panic!(
                "{node}'s QEMU exited ({status}): {}",
                describe(&sem, &down, &timeline, vms)
            );
        }
        if seen.iter().all(Rolling::done) && sem.holders.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < ROLLING_TIMEOUT,
            "the rolling update did not finish within {ROLLING_TIMEOUT:?}: {}",
            describe(&sem, &down, &timeline, vms)
        );
        std::thread::sleep(POLL);
    }
    let took = t0.elapsed();
    eprintln!(
        "rolling update v{V1} -> v{V2} of {} machines, lock max 1, in {took:.1?}:\n{}",
        NODES.len(),
        timeline.show()
    );

    // Each machine rebooted once, into v2; the applies ran side by side, before any reboot.
    let first_reboot = seen
        .iter()
        .filter_map(|r| r.reboots.first().map(|(down, _)| *down))
        .fold(f64::MAX, f64::min);
    for (r, node) in seen.iter().zip(NODES) {
        assert_eq!(r.reboots.len(), 1, "{node} rebooted once: {r:?}");
        let applying = r
            .applying
            .unwrap_or_else(|| panic!("{node} never applied v2"));
        assert!(
            applying < first_reboot,
            "{node} only started applying at +{applying:.1} s, after the first reboot at +{first_reboot:.1} s"
        );
    }
    let downtimes: Vec<String> = seen
        .iter()
        .zip(NODES)
        .map(|(r, n)| format!("{n} {:.1} s", r.reboots[0].1 - r.reboots[0].0))
        .collect();
    eprintln!(
        "at most {most_down} machine down at a time; reboot to ready: {}",
        downtimes.join(", ")
    );

    // What each machine says of itself, and what the fleet says of it.
    for (vm, node) in vms.iter().zip(NODES) {
        let r = common::exec(vm, &["/usr/bin/caisson-update", "status", "--json"], 60);
        let e = r
            .exec
            .unwrap_or_else(|| panic!("{node}: no exec result: {:?}", r.error));
        assert_eq!(e.code, Some(0), "{node}: {}", e.output);
        let json = e
            .output
            .find("\n{")
            .map(|i| &e.output[i + 1..])
            .or(e.output.starts_with('{').then_some(e.output.as_str()))
            .unwrap_or_else(|| panic!("{node}: no JSON status: {}", e.output));
        // The first JSON document: a log line may follow it on the same pipe.
        let status: serde_json::Value = serde_json::Deserializer::from_str(json)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{node}: no JSON status: {}", e.output))
            .unwrap_or_else(|err| panic!("{node}: {err}: {json}"));
        assert_eq!(status["version"], V2, "{node}: {status}");
        assert_eq!(status["slot"], "b", "{node}: {status}");
        assert_eq!(status["blessed"], true, "{node}: {status}");
        assert_eq!(
            status["record"]["last"]["result"], "succeeded",
            "{node}: {status}"
        );
        assert_eq!(status["record"]["last"]["version"], V2, "{node}: {status}");
        assert_eq!(
            status["rolled_back_from"],
            serde_json::Value::Null,
            "{node}: {status}"
        );
    }
    fleet.until(
        "the records say v2 from slot B",
        Duration::from_secs(60),
        |_| {
            let records = fleet.records();
            (records.len() == NODES.len()
                && records
                    .iter()
                    .all(|m| m.version.as_deref() == Some(V2) && m.slot.as_deref() == Some("b")))
            .then_some(())
        },
    );
    assert!(fleet.lock().holders.is_empty());
}
