//! QEMU end-to-end: a fleet of three machines on etcd, then a rolling update of all three.
//! Three VMs of `images/host.toml` (plus a busybox OCI archive baked in, no local units) are
//! provisioned through fw_cfg with their own host name, fleet id and `node` label, the etcd on
//! the host (`10.0.2.2`; etcd runs on host loopback) and an update channel served by `caisson
//! serve` on the host, with strategy `etcd-lock`. etcd runs as a fleet's should: TLS only, client
//! certificates checked, authentication on, set up with `caisson_fleet::access` (the code of
//! `caisson-fleet access`); each machine config carries the CA, its own client certificate and
//! key and its etcd user's password, and the test reads etcd as the operator.
//!
//! Failover: the test submits three units through the fleet library (the CLI's code path); the
//! leader spreads them one per machine and each reports running. Then the leader's VM is
//! hard-killed (SIGKILL to QEMU): within TTL + 5 s its unit is reported running on one of the
//! other two, the others stay where they were. The time of each step (lease expiry, new leader,
//! the scheduling pass, running) is measured from the host and printed. The agents react to etcd
//! watches (the leader key, the machines, their assignment), so the failover is the TTL plus the
//! container start.
//!
//! Rolling update: the killed machine boots again from its disk and rejoins; the reboot lock is
//! set to max 1 and a signed v2 is published with a rollout window of 0. Each machine's update
//! agent (checking every 2 s) applies v2 into slot B at once, all three in parallel, then asks
//! its fleet agent for the reboot, which takes the fleet's reboot lock first and keeps it until
//! v2 is blessed there. Every 100 ms the host reads the lock key in etcd and the three consoles:
//! never more than one holder, never two machines down at once, and a machine is only down
//! while it holds the lock. All three end on v2 from slot B, blessed, with the success recorded,
//! and the lock empty; the timeline (lock taken, reboot, ready, blessed, released) is printed.
//! The VMs' part takes about four and a half minutes under TCG, three of them the update.
//!
//! Volumes: before the update the test submits `keeper`, whose volume holds a token it wrote on
//! its first run; pinned to its machine, it waits for it through the reboot and finds the token
//! again on v2 (`e2e_fleet_cluster/volume.rs`).

#![allow(clippy::unwrap_used)]

mod common;

// The fleet's own etcd harness: Debian's etcd on free loopback ports, killed when dropped.
#[path = "../../fleet/tests/common/mod.rs"]
mod etcd_harness;

#[path = "e2e_fleet_cluster/failover.rs"]
mod failover;
#[path = "e2e_fleet_cluster/network.rs"]
mod network;
#[path = "e2e_fleet_cluster/rolling.rs"]
mod rolling;
#[path = "e2e_fleet_cluster/volume.rs"]
mod volume;

use caisson_fleet::access;
use caisson_fleet::etcd::{Access, Client, Credentials};
use caisson_fleet::lock::{RebootLock, Semaphore};
use caisson_fleet::registry::{self, Keys, MachineRecord};
use caisson_fleet::scheduler::Placement;
use caisson_fleet::store::{Store, UnitStatus};
use caisson_fleet::unit::UnitSpec;
use caisson_qemu::{Disk, FwCfgValue, NetAttachment, VirtualNetwork, Vm, VmOptions};
use etcd_harness::pki::Ca;
use etcd_harness::{Etcd, ServerTls};
use failover::fail_over;
use rolling::roll_to_v2;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The machines' lease: a dead machine's units move after it expires.
const TTL_S: i64 = 10;
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
const UNITS: [&str; 3] = ["svc-a", "svc-b", "svc-c"];
const BUSYBOX: &str = "/bin/busybox";
const ARCHIVE: &str = common::BUSYBOX_ARCHIVE;
const POLL: Duration = Duration::from_millis(100);
const V1: &str = "1.0.0";
const V2: &str = "2.0.0";
/// The init blesses a tried boot after this long healthy (30 s in `images/host.toml`): each
/// machine holds the reboot lock from its reboot until then, so it paces the rolling update.
const BLESS_AFTER_S: u64 = 10;
/// How often the update agents look at the channel.
const UPDATE_INTERVAL_S: u64 = 2;
/// The whole rolling update, from publishing v2 to the lock given back by the last machine.
const ROLLING_TIMEOUT: Duration = Duration::from_secs(900);

/// `images/host.toml` plus the archive and the public key of `dir/keys` (made here), in `dir`:
/// no local units, they come from etcd; tried boots are blessed after [`BLESS_AFTER_S`].
fn cluster_spec(dir: &Path) -> String {
    common::run_ok(
        Command::new(env!("CARGO_BIN_EXE_caisson"))
            .args(["keygen", "--out"])
            .arg(dir.join("keys")),
    );
    let spec =
        common::host_spec_with_busybox(dir, "\n[update]\npublic_keys = [\"keys/caisson.pub\"]\n");
    let init = dir.join("host/files/etc/caisson/init.toml");
    let text = std::fs::read_to_string(&init).unwrap();
    let faster = text.replace(
        "bless_after_s = 30",
        &format!("bless_after_s = {BLESS_AFTER_S}"),
    );
    assert_ne!(text, faster, "images/host's init.toml changed shape");
    std::fs::write(&init, faster).unwrap();
    spec
}

/// What a node needs to reach the fleet's etcd: the CA, its client certificate and key (PEM),
/// its etcd password.
struct Creds {
    ca: String,
    cert: String,
    key: String,
    password: String,
}

/// The machine config of one node: its host name, its NIC on the private segment, fleet id and
/// label, its fleet address (on that segment), the etcd on the host with its credentials, and
/// the update channel, with reboots coordinated through the fleet's reboot lock.
fn machine_config(
    i: usize,
    nic: &NetAttachment,
    etcd_port: u16,
    channel_url: &str,
    creds: &Creds,
) -> String {
    let node = NODES[i];
    format!(
        r#"version = 1
hostname = "{node}"

{}
[fleet]
id = "{node}"
endpoints = ["https://{}:{etcd_port}"]
labels = {{ node = "{node}" }}
ttl_s = {TTL_S}
address = "{}/24"

[fleet.tls]
ca = """{}"""
cert = """{}"""
key = """{}"""

[fleet.auth]
user = "{}"
password = "{}"

[update]
channel_url = "{channel_url}"
strategy = "etcd-lock"
interval_s = {UPDATE_INTERVAL_S}
jitter_s = 0
"#,
        network::machine_config(i, nic),
        caisson_qemu::HOST_FROM_GUEST,
        network::private_address(i),
        creds.ca,
        creds.cert,
        creds.key,
        access::machine_user(node),
        creds.password,
    )
}

/// `caisson publish BUNDLE --channel-dir CHANNEL --key KEY --rollout 0s`: every machine's wave
/// starts at once.
fn publish(bundle: &Path, channel: &Path, key: &Path) {
    common::run_ok(
        Command::new(env!("CARGO_BIN_EXE_caisson"))
            .arg("publish")
            .arg(bundle)
            .arg("--channel-dir")
            .arg(channel)
            .arg("--key")
            .arg(key)
            .args(["--rollout", "0s"]),
    );
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
    /// Turns authentication on in `etcd` (TLS, client certificates from `ca`), makes a user
    /// that may lead for each node, and returns the operator's view and each node's credentials.
    fn secure(etcd: &Etcd, ca: &Ca, dir: &Path) -> (Fleet, BTreeMap<&'static str, Creds>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let keys = Keys::new("/caisson/fleet/");
        let ca_pem = std::fs::read_to_string(&ca.cert).unwrap();
        let identity = |name: &str| {
            let pair = ca.client(dir, name, false);
            (
                std::fs::read_to_string(&pair.cert).unwrap(),
                std::fs::read_to_string(&pair.key).unwrap(),
            )
        };
        let endpoint = etcd.endpoint();
        let connect = |(cert, key): &(String, String), user: Option<(&str, &str)>| {
            let access = Access {
                ca_pem: Some(ca_pem.clone().into_bytes()),
                identity_pem: Some(format!("{cert}\n{key}").into_bytes()),
                credentials: user.map(|(user, password)| Credentials {
                    user: user.into(),
                    password: password.into(),
                }),
            };
            Client::connect(&[endpoint.as_str()], &access, Duration::from_secs(5)).unwrap()
        };
        let operator = identity("operator");
        let mut creds = BTreeMap::new();
        rt.block_on(async {
            // Before authentication is on, etcd takes no credentials.
            let setup = connect(&operator, None);
            access::init(&setup, &keys, "root-pw", "caisson-operator", "op-pw")
                .await
                .unwrap();
            let root = connect(&operator, Some((access::ROOT, "root-pw")));
            for node in NODES {
                let password = format!("pw-of-{node}");
                access::add_machine(&root, &keys, node, &password, true)
                    .await
                    .unwrap();
                let (cert, key) = identity(node);
                creds.insert(
                    node,
                    Creds {
                        ca: ca_pem.clone(),
                        cert,
                        key,
                        password,
                    },
                );
            }
        });
        let client = connect(&operator, Some(("caisson-operator", "op-pw")));
        let fleet = Fleet {
            rt,
            store: Store::new(client, keys),
        };
        (fleet, creds)
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

    fn reboot_lock(&self) -> RebootLock {
        RebootLock::new(self.store.client.clone(), self.store.keys.lock())
    }

    /// The reboot semaphore as it is now.
    fn lock(&self) -> Semaphore {
        self.rt.block_on(self.reboot_lock().status()).unwrap()
    }

    /// `caisson-fleet lock set-max N`, through the library.
    fn set_max(&self, max: u32) {
        self.rt.block_on(self.reboot_lock().set_max(max)).unwrap()
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

/// Boots a machine's own disk (an overlay the test keeps, so a killed machine can boot again),
/// with a second NIC on the private segment.
fn boot(disk: &Path, config: &Path, nic: &NetAttachment) -> Vm {
    let mut opts = VmOptions::new(disk);
    opts.networks = vec![nic.clone()];
    opts.disk = Disk::direct(disk);
    opts.memory_mib = 1024;
    // Three guests on two host cores: one vCPU each keeps TCG threads from fighting.
    opts.smp = 1;
    opts.fw_cfg = vec![("opt/caisson/config".into(), FwCfgValue::File(config.into()))];
    Vm::launch(opts).expect("launching QEMU")
}

#[test]
fn three_machines_fail_over_then_roll_to_v2_one_reboot_at_a_time() {
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
    let v2 = common::build(&spec, &dir.path().join("out-v2"), &["--version", V2]);
    eprintln!("v1 and v2 built in {:.0?}", started.elapsed());
    // The channel holds v1 until the rolling update: the agents find nothing newer.
    let channel = dir.path().join("www/stable");
    let key = dir.path().join("keys/caisson.key");
    publish(&image.with_extension("bundle"), &channel, &key);
    let server = common::Server::start(&dir.path().join("www"));
    let channel_url = format!(
        "http://{}:{}/stable",
        caisson_qemu::HOST_FROM_GUEST,
        server.port
    );

    let _one_vm = common::vm_lock();
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ca = Ca::new(&pki, "ca");
    let served = ca.server(&pki, &["127.0.0.1", caisson_qemu::HOST_FROM_GUEST]);
    let etcd = Etcd::start_tls(ServerTls {
        cert: served.cert,
        key: served.key,
        client_ca: ca.cert.clone(),
    });
    let (fleet, creds) = Fleet::secure(&etcd, &ca, &pki);
    // The operator sets the cluster network before the machines come.
    network::init(&fleet);

    // Three machines, booted together, each with its own config, its own disk and a NIC on
    // the private segment.
    let segment = VirtualNetwork::new().unwrap();
    let booting = Instant::now();
    let machines: Vec<(PathBuf, PathBuf, NetAttachment)> = NODES
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let own = dir.path().join(node);
            std::fs::create_dir_all(&own).unwrap();
            let cfg = own.join("machine.toml");
            let nic = segment.attach().unwrap();
            let text = machine_config(i, &nic, etcd.client_port, &channel_url, &creds[node]);
            std::fs::write(&cfg, text).unwrap();
            (common::kept_overlay(&image, &own), cfg, nic)
        })
        .collect();
    let mut vms: Vec<Vm> = machines.iter().map(|(d, c, n)| boot(d, c, n)).collect();
    for (vm, node) in vms.iter_mut().zip(NODES) {
        vm.wait_for("caisson: ready ", BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{node} does not reach ready: {e}"));
        let st = common::request(vm, &common::Request::Status);
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
        assert_eq!(m.version.as_deref(), Some(V1), "{m:?}");
        assert!(m.slot.is_some(), "{m:?}");
    }

    let subnets = network::discovery(&fleet, &vms, &ids);

    let (killed, at) = fail_over(&fleet, &mut vms, &ids);
    network::routes_dropped(&vms, killed, at, subnets[NODES[killed]]);

    // The killed machine boots again from its disk and rejoins the fleet.
    let back = Instant::now();
    let (disk, cfg, nic) = &machines[killed];
    vms[killed] = boot(disk, cfg, nic);
    vms[killed]
        .wait_for("caisson: ready ", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{} does not come back: {e}", NODES[killed]));
    fleet.until("the killed machine rejoins", BOOT_TIMEOUT, |s| {
        let nodes: BTreeSet<&str> = s.machines.values().map(String::as_str).collect();
        (nodes == BTreeSet::from(NODES)).then_some(())
    });
    eprintln!(
        "{} back from its disk and registered in {:.0?}",
        NODES[killed],
        back.elapsed()
    );
    network::routes_back(&fleet, &vms, killed, &ids);

    let keeper = volume::start(&fleet);
    roll_to_v2(&fleet, &mut vms, &ids, || {
        publish(&v2.with_extension("bundle"), &channel, &key)
    });
    volume::found_after_update(&fleet, &vms, &ids, &keeper);
    drop(vms);
    drop(server);
    drop(etcd);
    drop(segment);
    eprintln!("whole test: {:.0?}", started.elapsed());
}
