//! A volume across an OS update: before the rolling update the test submits `keeper`, a unit
//! with a volume whose first run writes a token there and fails; its restart finds the token.
//! The unit is pinned to the machine that holds its volume, so while that machine reboots into
//! v2 it waits for it rather than start empty elsewhere; on v2 it starts again and finds the
//! token once more, read back from the guest's state partition through the control channel.

use super::{common, Fleet, ARCHIVE, NODES};
use caisson_fleet::unit::UnitSpec;
use caisson_qemu::Vm;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const UNIT: &str = "keeper";
/// Where the unit's volume lies on its machine (`volume_root` of fleet.toml's default).
const MARK: &str = "/var/lib/caisson/volumes/keeper/data/mark";
/// The unit's output on its machine (the agent's default `log_dir`).
const LOG: &str = "/var/log/caisson/fleet/keeper.log";

/// The unit on its machine, with the token it wrote.
pub(crate) struct Keeper {
    token: String,
    machine: String,
}

fn spec(token: &str) -> UnitSpec {
    let text = format!(
        r#"command = ["/bin/sh", "-c", "if read m < /data/mark; then echo found $m; exec sleep 100000; fi; echo {token} > /data/mark; echo created {token}; exit 1"]
volumes = [{{ name = "data", path = "/data" }}]
[image]
path = "{ARCHIVE}"
"#
    );
    UnitSpec::parse(UNIT, &text).unwrap()
}

/// Submits `keeper` and waits until it runs again after its first run wrote the token: placed
/// on one machine, pinned there.
pub(crate) fn start(fleet: &Fleet) -> Keeper {
    let token = format!("token-{}", std::process::id());
    let started = Instant::now();
    fleet.submit(&[spec(&token)]);
    let machine = fleet.until(
        "keeper runs again after writing its volume",
        Duration::from_secs(300),
        |s| {
            let on = s.placement.get(UNIT)?;
            let m = on.first()?;
            let st = s.statuses.get(&(m.clone(), UNIT.to_string()))?;
            (on.len() == 1 && st.state == "running" && st.restarts >= 1).then(|| m.clone())
        },
    );
    eprintln!(
        "{UNIT} wrote its volume and runs again on {machine} after {:.1?}",
        started.elapsed()
    );
    Keeper { token, machine }
}

/// After the update: `keeper` runs on the machine that holds its volume (never placed anywhere
/// else), found its token after the restart and again on v2, and the token is on the volume.
pub(crate) fn found_after_update(
    fleet: &Fleet,
    vms: &[Vm],
    ids: &BTreeMap<String, String>,
    keeper: &Keeper,
) {
    let node = &ids[&keeper.machine];
    let vm = &vms[NODES.iter().position(|n| n == node).unwrap()];
    let found = format!("found {}", keeper.token);
    let deadline = Instant::now() + Duration::from_secs(300);
    let log = loop {
        let log = read(vm, node, LOG);
        if log.matches(&found).count() >= 2 {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "{UNIT} on {node} did not find its token on v2: {log}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(
        log.matches(&format!("created {}", keeper.token)).count(),
        1,
        "written once: {log}"
    );
    assert_eq!(read(vm, node, MARK).trim(), keeper.token);
    let s = fleet.snapshot();
    assert_eq!(
        s.placement.get(UNIT),
        Some(&BTreeSet::from([keeper.machine.clone()])),
        "{UNIT} stays with its volume: {}",
        s.describe()
    );
    eprintln!("{UNIT} found its volume's token on {node} after the update to v2");
}

/// A file of the guest, through the control channel's exec.
fn read(vm: &Vm, node: &str, path: &str) -> String {
    let r = common::exec(vm, &["/bin/busybox", "cat", path], 30);
    let e = r
        .exec
        .unwrap_or_else(|| panic!("{node}: no exec result: {:?}", r.error));
    assert_eq!(e.code, Some(0), "{node}: cat {path}: {}", e.output);
    e.output
}
