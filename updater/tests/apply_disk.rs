//! The whole update path against a real GPT disk image file and a temporary ESP directory:
//! signed channel, delta download over HTTP, write order, interrupted applies (power cuts),
//! corrupted bundles, rollback records.

#![allow(clippy::unwrap_used)]

use caisson_disk::PartitionContent;
use caisson_layout::cmdline::BootParams;
use caisson_layout::partition::{partition_guid, Part};
use caisson_layout::{entry, paths, verity, EntryName, Slot};
use caisson_update::agent::{self, AgentOptions, Round, RunPaths};
use caisson_update::apply::{Quiet, StopAfter};
use caisson_update::bundle::{write_bundle, BundleInput, ChunkIndex, Chunking, Manifest};
use caisson_update::channel::{self, PublishOptions, Server};
use caisson_update::download::{DownloadError, FileSource, Source};
use caisson_update::machine::Machine;
use caisson_update::record::Outcome;
use caisson_update::slots::Disk;
use caisson_update::{chunk_cache, sign, Error};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const MIB: u64 = 1024 * 1024;
const IMAGE: &str = "host";

/// A root payload: `blocks` 4 KiB data blocks (`changed` of them differ by version) plus its tree.
fn payload(
    dir: &Path,
    version: &str,
    blocks: usize,
    changed: &[usize],
) -> (PathBuf, verity::VerityParams) {
    let seeds = (0..blocks)
        .map(|b| {
            if changed.contains(&b) {
                format!("{version}-{b}")
            } else {
                format!("{b}")
            }
        })
        .collect::<Vec<_>>();
    payload_of(dir, version, &seeds)
}

/// A root payload whose 4 KiB data blocks are made from `seeds` (sha256 in counter mode: as
/// incompressible as an lz4hc erofs nearly is), plus its tree.
fn payload_of(dir: &Path, version: &str, seeds: &[String]) -> (PathBuf, verity::VerityParams) {
    let mut data = Vec::with_capacity(seeds.len() * 4096);
    for seed in seeds {
        for j in 0..128u32 {
            data.extend_from_slice(&Sha256::digest(format!("{seed}/{j}")));
        }
    }
    let tree = verity::build(&data[..], [7; 32], [0; 16]).unwrap();
    data.extend_from_slice(&tree.bytes);
    let p = dir.join(format!("root-{version}.img"));
    std::fs::write(&p, &data).unwrap();
    (p, tree.params)
}

struct Fixture {
    dir: tempfile::TempDir,
    disk: PathBuf,
    esp: PathBuf,
    keys: PathBuf,
    secret: PathBuf,
    v1: verity::VerityParams,
}

fn booted(version: &str, slot: Slot, v: verity::VerityParams) -> BootParams {
    BootParams {
        version: version.into(),
        slot,
        root: partition_guid(IMAGE, Part::root(slot)),
        state: partition_guid(IMAGE, Part::State),
        esp: partition_guid(IMAGE, Part::Esp),
        verity: Some(v),
        debug: false,
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (root1, v1) = payload(dir.path(), "1.0.0", 600, &[]);
    let disk = dir.path().join("disk.raw");
    let parts = [
        PartitionContent {
            part: Part::Esp,
            size: 2 * MIB,
            content: None,
        },
        PartitionContent {
            part: Part::RootA,
            size: 4 * MIB,
            content: Some(root1),
        },
        PartitionContent {
            part: Part::RootB,
            size: 4 * MIB,
            content: None,
        },
        PartitionContent {
            part: Part::State,
            size: MIB,
            content: None,
        },
    ];
    caisson_disk::write_disk(&parts, &disk, IMAGE, "1.0.0").unwrap();
    let esp = dir.path().join("esp");
    std::fs::create_dir_all(esp.join(paths::ESP_ENTRIES_DIR)).unwrap();
    let first = EntryName::new_blessed("1.0.0", Slot::A);
    let mut f = Fixture {
        disk,
        esp: esp.clone(),
        keys: dir.path().join("keys"),
        secret: PathBuf::new(),
        v1,
        dir,
    };
    let b = booted("1.0.0", Slot::A, v1);
    std::fs::write(
        esp.join(paths::ESP_ENTRIES_DIR).join(first.to_string()),
        entry::render(&b, ""),
    )
    .unwrap();
    std::fs::create_dir_all(esp.join(paths::esp_payload_dir("1.0.0", Slot::A))).unwrap();
    let (sk, _, _) = sign::keygen(&f.keys).unwrap();
    f.secret = sk;
    f
}

fn machine(f: &Fixture, version: &str, slot: Slot, v: verity::VerityParams) -> Machine {
    Machine::from_parts(
        Disk::open(&f.disk).unwrap(),
        &f.esp,
        booted(version, slot, v),
        IMAGE,
        &f.keys,
        &f.dir.path().join("state"),
        "0123456789abcdef0123456789abcdef",
    )
}

/// Builds and publishes version `version` into the channel dir; returns its manifest.
fn release(f: &Fixture, version: &str, changed: &[usize]) -> (Manifest, PathBuf, PathBuf) {
    let (root, v) = payload(f.dir.path(), version, 600, changed);
    release_root(f, version, &root, v)
}

/// Publishes `version` with the root payload `root` into the channel dir.
fn release_root(
    f: &Fixture,
    version: &str,
    root: &Path,
    v: verity::VerityParams,
) -> (Manifest, PathBuf, PathBuf) {
    let kernel = f.dir.path().join(format!("vmlinuz-{version}"));
    std::fs::write(&kernel, format!("kernel {version}").repeat(1000)).unwrap();
    let initrd = f.dir.path().join(format!("initrd-{version}"));
    std::fs::write(&initrd, format!("initrd {version}").repeat(3000)).unwrap();
    let out = f.dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let bundle = out.join(format!("{IMAGE}-{version}.bundle"));
    let m = write_bundle(
        &BundleInput {
            image: IMAGE,
            version,
            build_time: 1,
            verity: v,
            cmdline_extra: "console=ttyS0",
            root,
            kernel: &kernel,
            initrd: &initrd,
        },
        &bundle,
    )
    .unwrap();
    let mpath = out.join(format!("{IMAGE}-{version}.manifest.json"));
    std::fs::write(&mpath, m.to_json()).unwrap();
    let chan = f.dir.path().join("www/stable");
    channel::publish(
        &bundle,
        &mpath,
        &chan,
        &f.secret,
        &PublishOptions::default(),
    )
    .unwrap();
    let signed = chan.join(format!("{IMAGE}-{version}.manifest.json"));
    (
        Manifest::load(&signed).unwrap(),
        chan.join(format!("{IMAGE}-{version}.bundle")),
        signed,
    )
}

fn entries(f: &Fixture) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(f.esp.join(paths::ESP_ENTRIES_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn slot_bytes(f: &Fixture, part: Part, len: usize) -> Vec<u8> {
    let d = Disk::open(&f.disk).unwrap();
    let mut b = vec![0; len];
    d.read_at(part, 0, &mut b).unwrap();
    b
}

#[test]
fn update_over_http_with_delta_then_bless_then_rollback() {
    let f = fixture();
    let (m2, _, _) = release(&f, "2.0.0", &[3, 4, 5, 400]);
    let addr = Server::bind(&f.dir.path().join("www"), "127.0.0.1:0")
        .unwrap()
        .spawn();
    let url = format!("http://{addr}/stable");

    let m = machine(&f, "1.0.0", Slot::A, f.v1);
    let offer = m.check(&url).unwrap().expect("2.0.0 is offered");
    assert_eq!(offer.manifest.version, "2.0.0");
    let stats = m.apply_offer(&offer, &mut Quiet).unwrap();
    // Only the chunks holding changed blocks (and the tree) travel.
    assert!(stats.copied > 0, "{stats:?}");
    // 1.0.0 came with the image: its slot was cut and hashed. 2.0.0's index is kept for the
    // next update, under its verity root.
    assert!(!stats.local_index_cached, "{stats:?}");
    let cache = f.dir.path().join("state").join(chunk_cache::DIR);
    let v2_root = m2.verity_params().unwrap().root_hash;
    assert!(chunk_cache::path(&cache, &v2_root).is_file());
    let root = m2
        .artifact(caisson_update::bundle::ArtifactKind::Root)
        .unwrap();
    assert!(
        stats.downloaded_bytes < root.size / 2 + 200_000,
        "{stats:?}"
    );
    assert_eq!(
        entries(&f),
        ["caisson-1.0.0-a.conf", "caisson-2.0.0-b+3-0.conf"]
    );
    let text = std::fs::read_to_string(
        f.esp
            .join(paths::ESP_ENTRIES_DIR)
            .join("caisson-2.0.0-b+3-0.conf"),
    )
    .unwrap();
    let params =
        BootParams::parse(text.lines().find(|l| l.starts_with("options ")).unwrap()).unwrap();
    assert_eq!(params.root, partition_guid(IMAGE, Part::RootB));
    assert_eq!(params.slot, Slot::B);
    assert_eq!(params.verity.unwrap(), m2.verity_params().unwrap());
    assert!(text.contains("console=ttyS0"));
    assert!(f.esp.join(paths::esp_kernel("2.0.0", Slot::B)).is_file());
    let root_bytes = std::fs::read(f.dir.path().join("root-2.0.0.img")).unwrap();
    assert_eq!(slot_bytes(&f, Part::RootB, root_bytes.len()), root_bytes);
    assert_eq!(m.status().unwrap().record.pending.as_deref(), Some("2.0.0"));
    // The agent's next round before the reboot leaves the written slot alone.
    assert!(m.is_pending("2.0.0").unwrap());
    let config: caisson_update::config::Config =
        toml::from_str(&format!("channel_url = \"{url}\"\n")).unwrap();
    let round = caisson_update::agent::round(
        &m,
        &config,
        caisson_update::agent::AgentOptions {
            now: true,
            reboot: true,
        },
        &mut Quiet,
        &run_paths(&f),
    );
    assert_eq!(
        round.unwrap(),
        caisson_update::agent::Round::AwaitingReboot {
            version: "2.0.0".into()
        }
    );
    assert_eq!(
        entries(&f),
        ["caisson-1.0.0-a.conf", "caisson-2.0.0-b+3-0.conf"]
    );
    // Not blessed yet on the new slot: no further update.
    drop(m);

    // The machine boots 2.0.0 from B (the loader counted one try) and the init blesses it.
    let d = f.esp.join(paths::ESP_ENTRIES_DIR);
    std::fs::rename(
        d.join("caisson-2.0.0-b+3-0.conf"),
        d.join("caisson-2.0.0-b+2-1.conf"),
    )
    .unwrap();
    let m = machine(&f, "2.0.0", Slot::B, m2.verity_params().unwrap());
    assert!(m.reconcile().unwrap().is_none());
    std::fs::rename(
        d.join("caisson-2.0.0-b+2-1.conf"),
        d.join("caisson-2.0.0-b.conf"),
    )
    .unwrap();
    assert!(matches!(
        m.reconcile().unwrap(),
        Some(Outcome::Succeeded { .. })
    ));
    assert_eq!(m.check(&url).unwrap().map(|o| o.manifest.version), None);

    // 3.0.0 is written into A; it never gets healthy: the loader uses its tries and falls back.
    let (_, _, _) = release(&f, "3.0.0", &[9]);
    let offer = m.check(&url).unwrap().unwrap();
    let stats = m.apply_offer(&offer, &mut Quiet).unwrap();
    // The running 2.0.0's chunks came from the index kept when it was written (slot A still
    // holds 1.0.0, so most chunks are found in place).
    assert!(stats.local_index_cached && stats.kept > 0, "{stats:?}");
    assert_eq!(stats.local_mismatched, 0, "{stats:?}");
    let root3 = std::fs::read(f.dir.path().join("root-3.0.0.img")).unwrap();
    assert_eq!(slot_bytes(&f, Part::RootA, root3.len()), root3);
    assert_eq!(
        entries(&f),
        ["caisson-2.0.0-b.conf", "caisson-3.0.0-a+3-0.conf"]
    );
    // The old version's kernel files went with its entry.
    assert!(!f
        .esp
        .join(paths::esp_payload_dir("1.0.0", Slot::A))
        .exists());
    std::fs::rename(
        d.join("caisson-3.0.0-a+3-0.conf"),
        d.join("caisson-3.0.0-a+0-3.conf"),
    )
    .unwrap();
    let out = m.reconcile().unwrap();
    assert!(
        matches!(out, Some(Outcome::RolledBack { ref from, .. }) if from == "3.0.0"),
        "{out:?}"
    );
    let st = m.status().unwrap();
    assert_eq!(st.rolled_back_from.as_deref(), Some("3.0.0"));
    assert!(
        st.text().contains("rolled back from 3.0.0"),
        "{}",
        st.text()
    );
    // Never offered again, and refused when asked for directly.
    assert!(m.check(&url).unwrap().is_none());
    assert!(matches!(
        m.apply_offer(&offer, &mut Quiet),
        Err(Error::Rejected(_))
    ));
}

/// The agent's /run files in the fixture's directory.
fn run_paths(f: &Fixture) -> RunPaths {
    let run = f.dir.path().join("run");
    RunPaths {
        control_socket: run.join("init.sock"),
        reboot_needed: run.join("reboot-needed"),
        boot_settled: run.join("boot-settled"),
    }
}

/// One agent round with no channel (it only records what the boot tells).
fn record_round(f: &Fixture, m: &Machine) -> Result<Round, Error> {
    let config: caisson_update::config::Config =
        toml::from_str("strategy = \"etcd-lock\"").unwrap();
    agent::round(
        m,
        &config,
        AgentOptions::default(),
        &mut Quiet,
        &run_paths(f),
    )
}

fn settled(f: &Fixture) -> Option<String> {
    std::fs::read_to_string(run_paths(f).boot_settled).ok()
}

#[test]
fn boot_settled_marker_once_blessed_and_recorded() {
    let f = fixture();
    let d = f.esp.join(paths::ESP_ENTRIES_DIR);
    let (m2, bundle, manifest) = release(&f, "2.0.0", &[3]);
    let m = machine(&f, "1.0.0", Slot::A, f.v1);
    m.apply_file(&bundle, &manifest, &mut Quiet).unwrap();
    drop(m);
    // The machine boots 2.0.0 from B; the loader counted one try; the init has not blessed it.
    std::fs::rename(
        d.join("caisson-2.0.0-b+3-0.conf"),
        d.join("caisson-2.0.0-b+2-1.conf"),
    )
    .unwrap();
    let m = machine(&f, "2.0.0", Slot::B, m2.verity_params().unwrap());
    for _ in 0..2 {
        assert_eq!(record_round(&f, &m).unwrap(), Round::NotBlessed);
        assert_eq!(settled(&f), None, "settled before the boot was blessed");
    }
    assert_eq!(m.status().unwrap().record.pending.as_deref(), Some("2.0.0"));
    // Blessed: the round records the success, then says the boot has settled.
    std::fs::rename(
        d.join("caisson-2.0.0-b+2-1.conf"),
        d.join("caisson-2.0.0-b.conf"),
    )
    .unwrap();
    assert_eq!(record_round(&f, &m).unwrap(), Round::NoChannel);
    assert_eq!(settled(&f).as_deref(), Some("blessed 2.0.0\n"));
    let rec = m.status().unwrap().record;
    assert!(
        matches!(rec.last, Some(Outcome::Succeeded { ref version, .. }) if version == "2.0.0"),
        "{rec:?}"
    );
    assert_eq!(rec.pending, None);
}

#[test]
fn boot_settled_marker_only_after_the_rollback_is_recorded() {
    let f = fixture();
    let d = f.esp.join(paths::ESP_ENTRIES_DIR);
    let (_, bundle, manifest) = release(&f, "2.0.0", &[3]);
    let m = machine(&f, "1.0.0", Slot::A, f.v1);
    m.apply_file(&bundle, &manifest, &mut Quiet).unwrap();
    drop(m);
    // 2.0.0 used its three tries; the loader booted 1.0.0 from A again.
    std::fs::rename(
        d.join("caisson-2.0.0-b+3-0.conf"),
        d.join("caisson-2.0.0-b+0-3.conf"),
    )
    .unwrap();
    // While the records cannot be written, the rollback is not recorded: no marker.
    let state = f.dir.path().join("state");
    let aside = f.dir.path().join("state.aside");
    std::fs::rename(&state, &aside).unwrap();
    std::fs::write(&state, "not a directory").unwrap();
    let m = machine(&f, "1.0.0", Slot::A, f.v1);
    assert!(record_round(&f, &m).is_err());
    assert_eq!(
        settled(&f),
        None,
        "settled before the rollback was recorded"
    );
    std::fs::remove_file(&state).unwrap();
    std::fs::rename(&aside, &state).unwrap();
    assert_eq!(record_round(&f, &m).unwrap(), Round::NoChannel);
    assert_eq!(settled(&f).as_deref(), Some("rolled-back 2.0.0 1.0.0\n"));
    let rec = m.status().unwrap().record;
    assert!(
        matches!(rec.last, Some(Outcome::RolledBack { ref from, .. }) if from == "2.0.0"),
        "{rec:?}"
    );
    assert_eq!(rec.rejected, ["2.0.0"]);
}

#[test]
fn power_cuts_at_every_step_leave_the_running_entry_and_resume() {
    let f = fixture();
    let (m2, bundle, _) = release(&f, "2.0.0", &(0..600).step_by(7).collect::<Vec<_>>());
    let m = machine(&f, "1.0.0", Slot::A, f.v1);
    for stop in [
        StopAfter::Invalidate,
        StopAfter::RootChunks(3),
        StopAfter::RootChunks(20),
        StopAfter::Root,
        StopAfter::Kernel,
    ] {
        let mut src = FileSource::open(&bundle).unwrap();
        m.apply(&m2, &mut src, &mut Quiet, stop).unwrap();
        // Whatever was cut, the boot loader still only sees the running version.
        assert_eq!(entries(&f), ["caisson-1.0.0-a.conf"], "{stop:?}");
    }
    let mut src = FileSource::open(&bundle).unwrap();
    let stats = m
        .apply(&m2, &mut src, &mut Quiet, StopAfter::Never)
        .unwrap();
    // Everything written before the last cut was kept.
    assert_eq!(stats.fetched, 0, "{stats:?}");
    assert_eq!(
        entries(&f),
        ["caisson-1.0.0-a.conf", "caisson-2.0.0-b+3-0.conf"]
    );
}

#[test]
fn corrupted_or_unsigned_bundles_change_nothing() {
    let f = fixture();
    let (_, bundle, mpath) = release(&f, "2.0.0", &[1]);
    let m = machine(&f, "1.0.0", Slot::A, f.v1);
    let before = std::fs::read(&f.disk).unwrap();

    let mut bytes = std::fs::read(&bundle).unwrap();
    bytes[5000] ^= 1;
    let bad = f.dir.path().join("bad.bundle");
    std::fs::write(&bad, &bytes).unwrap();
    let err = m
        .apply_file(&bad, &mpath, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sha256"), "{err}");

    let mut text = std::fs::read_to_string(&mpath).unwrap();
    text = text.replace("\"2.0.0\"", "\"2.0.1\"");
    let forged = f.dir.path().join("forged.manifest.json");
    std::fs::write(&forged, text).unwrap();
    std::fs::copy(sign::sig_path(&mpath), sign::sig_path(&forged)).unwrap();
    let err = m
        .apply_file(&bundle, &forged, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("signature"), "{err}");

    assert_eq!(std::fs::read(&f.disk).unwrap(), before);
    assert_eq!(entries(&f), ["caisson-1.0.0-a.conf"]);

    // The good one from a file, without any network.
    m.apply_file(&bundle, &mpath, &mut Quiet).unwrap();
    assert_eq!(
        entries(&f),
        ["caisson-1.0.0-a.conf", "caisson-2.0.0-b+3-0.conf"]
    );
    // And nothing older than what runs.
    let m2 = machine(&f, "3.0.0", Slot::A, f.v1);
    let err = m2
        .apply_file(&bundle, &mpath, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("downgrade"), "{err}");
}

/// An entry edited to say `caisson.slot=b` while its root is slot a's partition: the apply would
/// write the running root. It is refused before anything changes.
#[test]
fn a_boot_whose_slot_lies_about_its_root_is_not_applied() {
    let f = fixture();
    let (_, bundle, mpath) = release(&f, "2.0.0", &[1]);
    let mut lying = booted("1.0.0", Slot::B, f.v1);
    lying.root = partition_guid(IMAGE, Part::RootA);
    let esp_entries = f.esp.join(paths::ESP_ENTRIES_DIR);
    std::fs::write(
        esp_entries.join(EntryName::new_blessed("1.0.0", Slot::B).to_string()),
        entry::render(&lying, ""),
    )
    .unwrap();
    let m = Machine::from_parts(
        Disk::open(&f.disk).unwrap(),
        &f.esp,
        lying,
        IMAGE,
        &f.keys,
        &f.dir.path().join("state"),
        "0123456789abcdef0123456789abcdef",
    );
    let before = std::fs::read(&f.disk).unwrap();
    let listed = entries(&f);
    let err = m
        .apply_file(&bundle, &mpath, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("says slot b but its root") && err.contains("root-b"),
        "{err}"
    );
    assert_eq!(std::fs::read(&f.disk).unwrap(), before);
    assert_eq!(entries(&f), listed);
}

#[test]
fn manual_rollback_needs_a_bootable_other_slot() {
    let f = fixture();
    let m = machine(&f, "1.0.0", Slot::A, f.v1);
    assert!(matches!(
        m.rollback(),
        Err(Error::NothingToRollBackTo { .. })
    ));
    let d = f.esp.join(paths::ESP_ENTRIES_DIR);
    std::fs::write(d.join("caisson-0.9.0-b.conf"), "title old\n").unwrap();
    assert_eq!(m.rollback().unwrap(), "0.9.0");
    assert_eq!(
        entries(&f),
        ["caisson-0.9.0-b.conf", "caisson-1.0.0-a+0-1.conf"]
    );
}

/// Records the root payload's progress in percent.
#[derive(Default)]
struct Seen(Vec<u64>);

impl caisson_update::apply::Progress for Seen {
    fn root(&mut self, done: u64, total: u64) {
        self.0.push(done * 100 / total);
    }
    fn step(&mut self, _: &str) {}
}

/// Serves the fixture's channel; returns the channel URL.
fn serve(f: &Fixture) -> String {
    let addr = Server::bind(&f.dir.path().join("www"), "127.0.0.1:0")
        .unwrap()
        .spawn();
    format!("http://{addr}/stable")
}

#[test]
fn one_block_inserted_fetches_a_few_chunks_and_the_running_kernel_is_reused() {
    let f = fixture();
    // v2: one new 4 KiB block in the middle, everything after it moved by 4 KiB.
    let mut seeds: Vec<String> = (0..600).map(|b| format!("{b}")).collect();
    seeds.insert(300, "new".into());
    let (root, v) = payload_of(f.dir.path(), "2.0.0", &seeds);
    let (m2, _, _) = release_root(&f, "2.0.0", &root, v);
    // The running version booted the same kernel as 2.0.0's.
    std::fs::write(
        f.esp.join(paths::esp_kernel("1.0.0", Slot::A)),
        format!("kernel {}", "2.0.0").repeat(1000),
    )
    .unwrap();
    let url = serve(&f);
    let m = machine(&f, "1.0.0", Slot::A, f.v1);
    let offer = m.check(&url).unwrap().unwrap();
    let mut seen = Seen::default();
    let stats = m.apply_offer(&offer, &mut seen).unwrap();
    // Progress passes every percentage in order, copied chunks too (the QEMU power-cut test
    // cuts at "root payload: 10%").
    assert_eq!(seen.0.last(), Some(&100));
    assert!(
        seen.0.windows(2).all(|w| w[0] <= w[1] && w[1] - w[0] <= 3),
        "{:?}",
        seen.0
    );
    let root_a = m2
        .artifact(caisson_update::bundle::ArtifactKind::Root)
        .unwrap();
    let initrd = m2
        .artifact(caisson_update::bundle::ArtifactKind::Initrd)
        .unwrap();
    eprintln!(
        "insertion: {stats:?}, root {} bytes, index {} bytes, initrd {} bytes",
        root_a.size, root_a.index.size, initrd.size
    );
    // The new block, the chunks around it, the changed part of the verity tree and the
    // root's index; the initramfs (different in every fixture version) whole; no kernel.
    let root_fetched = stats.downloaded_bytes - initrd.size;
    assert!(
        root_fetched < root_a.size / 20,
        "{root_fetched} of {} bytes: {stats:?}",
        root_a.size
    );
    assert!(stats.copied > stats.fetched * 10, "{stats:?}");
    // Adjacent missing chunks come in one request each run.
    assert!(stats.fetch_runs < stats.fetched, "{stats:?}");
    let want = std::fs::read(&root).unwrap();
    assert_eq!(slot_bytes(&f, Part::RootB, want.len()), want);
    assert_eq!(
        std::fs::read(f.esp.join(paths::esp_kernel("2.0.0", Slot::B))).unwrap(),
        format!("kernel {}", "2.0.0").repeat(1000).into_bytes()
    );
}

#[test]
fn a_running_slot_that_failed_verification_gives_no_chunk() {
    let f = fixture();
    let mut seeds: Vec<String> = (0..600).map(|b| format!("{b}")).collect();
    seeds.insert(300, "new".into());
    let (root, v) = payload_of(f.dir.path(), "2.0.0", &seeds);
    release_root(&f, "2.0.0", &root, v);
    let url = serve(&f);
    let mut m = machine(&f, "1.0.0", Slot::A, f.v1);
    // The init's record (init/VERITY.md): slot A, the running one, read a corrupted block.
    m.verity_failed = f.dir.path().join("verity-failed");
    std::fs::write(&m.verity_failed, "slot=a block=17\n").unwrap();
    let offer = m.check(&url).unwrap().unwrap();
    let stats = m.apply_offer(&offer, &mut Seen::default()).unwrap();
    assert_eq!(stats.copied, 0, "{stats:?}");
    assert!(stats.fetched > 0 && !stats.local_index_cached, "{stats:?}");
    let want = std::fs::read(&root).unwrap();
    assert_eq!(slot_bytes(&f, Part::RootB, want.len()), want);
}

#[test]
fn a_failure_record_of_the_other_slot_still_copies_from_the_running_one() {
    let f = fixture();
    let mut seeds: Vec<String> = (0..600).map(|b| format!("{b}")).collect();
    seeds.insert(300, "new".into());
    let (root, v) = payload_of(f.dir.path(), "2.0.0", &seeds);
    release_root(&f, "2.0.0", &root, v);
    let url = serve(&f);
    let mut m = machine(&f, "1.0.0", Slot::A, f.v1);
    m.verity_failed = f.dir.path().join("verity-failed");
    std::fs::write(&m.verity_failed, "slot=b block=unknown\n").unwrap();
    let offer = m.check(&url).unwrap().unwrap();
    let stats = m.apply_offer(&offer, &mut Seen::default()).unwrap();
    assert!(stats.copied > stats.fetched * 10, "{stats:?}");
}

#[test]
fn scattered_changed_blocks_fetch_a_chunk_each() {
    let f = fixture();
    // Six blocks of 600 (1 %), far apart.
    let changed = [10, 110, 220, 330, 440, 550];
    let (m2, _, _) = release(&f, "2.0.0", &changed);
    let url = serve(&f);
    let m = machine(&f, "1.0.0", Slot::A, f.v1);
    let offer = m.check(&url).unwrap().unwrap();
    let stats = m.apply_offer(&offer, &mut Quiet).unwrap();
    let root = m2
        .artifact(caisson_update::bundle::ArtifactKind::Root)
        .unwrap();
    let boot: u64 = [
        caisson_update::bundle::ArtifactKind::Kernel,
        caisson_update::bundle::ArtifactKind::Initrd,
    ]
    .iter()
    .map(|k| m2.artifact(*k).unwrap().size)
    .sum();
    eprintln!("scattered: {stats:?}, root {} bytes", root.size);
    // Each changed block costs about one chunk (8 KiB on average, at most 32 KiB), plus the
    // tree's changed hash blocks and the index.
    let root_fetched = stats.downloaded_bytes - boot;
    assert!(
        root_fetched < changed.len() as u64 * 32 * 1024 + 64 * 1024,
        "{root_fetched} bytes: {stats:?}"
    );
    let want = std::fs::read(f.dir.path().join("root-2.0.0.img")).unwrap();
    assert_eq!(slot_bytes(&f, Part::RootB, want.len()), want);
}

#[test]
fn a_manifest_with_an_unknown_chunking_scheme_is_refused() {
    let f = fixture();
    let (_, _, signed) = release(&f, "2.0.0", &[1]);
    // A correctly signed manifest from a newer builder, cut with a scheme this build lacks.
    let json = std::fs::read_to_string(&signed)
        .unwrap()
        .replace("\"fastcdc-2020\"", "\"fastcdc-2031\"");
    assert!(json.contains("fastcdc-2031"));
    let sig = sign::SecretKey::load(&f.secret)
        .unwrap()
        .sign(json.as_bytes(), "image:host version:2.0.0")
        .unwrap();
    std::fs::write(&signed, &json).unwrap();
    std::fs::write(sign::sig_path(&signed), sig).unwrap();
    let before = std::fs::read(&f.disk).unwrap();
    let url = serve(&f);
    let m = machine(&f, "1.0.0", Slot::A, f.v1);
    let err = m.check(&url).unwrap_err().to_string();
    assert!(
        err.contains("chunking scheme \"fastcdc-2031\" is not supported"),
        "{err}"
    );
    assert!(err.contains("update caisson-update"), "{err}");
    let bundle = f.dir.path().join("www/stable/host-2.0.0.bundle");
    let err = m
        .apply_file(&bundle, &signed, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("fastcdc-2031"), "{err}");
    assert_eq!(std::fs::read(&f.disk).unwrap(), before);
    assert_eq!(entries(&f), ["caisson-1.0.0-a.conf"]);
}

/// A bundle file that misbehaves once the root's chunks are asked for: `hook` runs at the n-th
/// root range request and may fail it.
struct Faulty<H: FnMut(u64) -> Result<(), DownloadError>> {
    inner: FileSource,
    root: std::ops::Range<u64>,
    requests: u64,
    hook: H,
}

impl<H: FnMut(u64) -> Result<(), DownloadError>> Source for Faulty<H> {
    fn read_range(
        &mut self,
        offset: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), DownloadError> {
        if self.root.contains(&offset) {
            self.requests += 1;
            (self.hook)(self.requests)?;
        }
        self.inner.read_range(offset, len, out)
    }
    fn downloaded(&self) -> u64 {
        self.inner.downloaded()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn faulty<H: FnMut(u64) -> Result<(), DownloadError>>(
    bundle: &Path,
    m: &Manifest,
    hook: H,
) -> Faulty<H> {
    let root = m
        .artifact(caisson_update::bundle::ArtifactKind::Root)
        .unwrap();
    Faulty {
        inner: FileSource::open(bundle).unwrap(),
        root: root.offset..root.offset + root.size,
        requests: 0,
        hook,
    }
}

/// Runs `f` on a thread; fails the test instead of hanging when it does not return.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .expect("the apply hung")
}

#[test]
fn a_byte_changed_in_the_slot_while_it_is_written_is_caught_by_the_read_back() {
    let f = std::sync::Arc::new(fixture());
    use std::os::unix::fs::FileExt;
    // Block 0 changes: its chunk is fetched, the rest is copied from slot A. The read-back
    // cannot pass chunk 0 before it is fetched, so while chunk 0 is being fetched, a byte
    // changed in the copied part (once the copy is there) is read after the change.
    let (m2, bundle, _) = release(&f, "2.0.0", &[0]);
    let off = 1024 * 1024;
    let at = Disk::open(&f.disk).unwrap().extent(Part::RootB).start + off;
    let want = std::fs::read(f.dir.path().join("root-2.0.0.img")).unwrap();
    let copied = want[off as usize..off as usize + 64].to_vec();
    let disk_path = f.disk.clone();
    let mut src = faulty(&bundle, &m2, move |n| {
        if n == 1 {
            let disk = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&disk_path)
                .unwrap();
            let mut b = vec![0u8; copied.len()];
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while {
                disk.read_exact_at(&mut b, at).unwrap();
                b != copied
            } {
                assert!(std::time::Instant::now() < deadline, "never copied");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            disk.write_all_at(&[b[0] ^ 0x40], at).unwrap();
        }
        Ok(())
    });
    let g = f.clone();
    let (err, stats) = within(120, move || {
        let m = machine(&g, "1.0.0", Slot::A, g.v1);
        let err = m
            .apply(&m2, &mut src, &mut Quiet, StopAfter::Never)
            .unwrap_err();
        // Once more from an honest source: the changed chunk is not "in place", it is copied
        // again, and the slot reads back right.
        let mut src = FileSource::open(&bundle).unwrap();
        let stats = m
            .apply(&m2, &mut src, &mut Quiet, StopAfter::Never)
            .unwrap();
        (err, stats)
    });
    assert!(
        matches!(
            err,
            Error::Apply(caisson_update::apply::ApplyError::ReadBack { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("read back wrong"), "{err}");
    assert!(stats.copied > 0 && stats.kept > 0, "{stats:?}");
    assert_eq!(
        entries(&f),
        ["caisson-1.0.0-a.conf", "caisson-2.0.0-b+3-0.conf"]
    );
    let want = std::fs::read(f.dir.path().join("root-2.0.0.img")).unwrap();
    assert_eq!(slot_bytes(&f, Part::RootB, want.len()), want);
}

#[test]
fn a_source_failing_mid_apply_stops_every_thread_with_its_error() {
    let f = std::sync::Arc::new(fixture());
    // Every 7th block changed: many fetch runs, the read-back waiting between them.
    let (m2, bundle, _) = release(&f, "2.0.0", &(0..600).step_by(7).collect::<Vec<_>>());
    let mut src = faulty(&bundle, &m2, |n| {
        if n == 5 {
            return Err(DownloadError::Status {
                url: "http://127.0.0.1/stable/host-2.0.0.bundle".into(),
                status: 503,
            });
        }
        Ok(())
    });
    let g = f.clone();
    let err = within(120, move || {
        let m = machine(&g, "1.0.0", Slot::A, g.v1);
        m.apply(&m2, &mut src, &mut Quiet, StopAfter::Never)
            .unwrap_err()
    });
    assert!(
        matches!(
            err,
            Error::Apply(caisson_update::apply::ApplyError::Download(_))
        ),
        "{err}"
    );
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(entries(&f), ["caisson-1.0.0-a.conf"]);
}

#[test]
fn a_manifest_whose_root_hash_disagrees_with_its_chunks_writes_no_entry() {
    let f = std::sync::Arc::new(fixture());
    let (mut m2, bundle, _) = release(&f, "2.0.0", &[3, 300]);
    // Every chunk matches the index; the whole does not match the manifest: only the read-back
    // can tell. (Manifests are signed; apply itself takes a verified one.)
    let root = m2
        .artifacts
        .iter_mut()
        .find(|a| a.kind == caisson_update::bundle::ArtifactKind::Root)
        .unwrap();
    root.sha256 = hex::encode([0x55u8; 32]);
    let g = f.clone();
    let err = within(120, move || {
        let m = machine(&g, "1.0.0", Slot::A, g.v1);
        let mut src = FileSource::open(&bundle).unwrap();
        m.apply(&m2, &mut src, &mut Quiet, StopAfter::Never)
            .unwrap_err()
    });
    let text = err.to_string();
    assert!(
        text.contains("read back wrong") && text.contains("sha256"),
        "{text}"
    );
    assert_eq!(entries(&f), ["caisson-1.0.0-a.conf"]);
}

/// The chunk index of a root payload file, cut as the bundle cuts it.
fn index_of(root: &Path) -> ChunkIndex {
    let mut index = ChunkIndex::default();
    Chunking::default()
        .cutter()
        .unwrap()
        .for_each_chunk::<_, std::io::Error>(std::fs::File::open(root).unwrap(), |c| {
            index.push(c);
            Ok(())
        })
        .unwrap();
    index
}

#[test]
fn a_stale_chunk_index_cache_still_writes_the_right_slot() {
    let f = fixture();
    let changed = [3, 200, 201, 450];
    let (m2, bundle, _) = release(&f, "2.0.0", &changed);
    // The cache says slot A (1.0.0) holds 2.0.0's chunks: the same size, right where the blocks
    // did not change, wrong where they did.
    let v2 = f.dir.path().join("root-2.0.0.img");
    let cache = f.dir.path().join("state").join(chunk_cache::DIR);
    let c = Chunking::default();
    chunk_cache::store(&cache, &f.v1.root_hash, &c, &index_of(&v2), None).unwrap();
    let m = machine(&f, "1.0.0", Slot::A, f.v1);
    let mut src = FileSource::open(&bundle).unwrap();
    let stats = m
        .apply(&m2, &mut src, &mut Quiet, StopAfter::Never)
        .unwrap();
    assert!(stats.local_index_cached, "{stats:?}");
    // Each chunk it promised wrongly was caught before it was written, and fetched.
    assert!(
        stats.local_mismatched >= changed.len() as u64 - 1,
        "{stats:?}"
    );
    assert!(stats.copied > 0, "{stats:?}");
    let want = std::fs::read(&v2).unwrap();
    assert_eq!(slot_bytes(&f, Part::RootB, want.len()), want);
    assert_eq!(
        entries(&f),
        ["caisson-1.0.0-a.conf", "caisson-2.0.0-b+3-0.conf"]
    );
    // The cache now holds 2.0.0's index, and 1.0.0's (the running slot's) beside it.
    let v2_root = m2.verity_params().unwrap().root_hash;
    assert_eq!(
        chunk_cache::load(&cache, &v2_root, want.len() as u64, &c),
        Some(index_of(&v2))
    );
    assert!(chunk_cache::path(&cache, &f.v1.root_hash).is_file());
}

#[test]
fn a_damaged_chunk_index_cache_is_ignored() {
    let f = fixture();
    let (m2, bundle, _) = release(&f, "2.0.0", &[3, 400]);
    let cache = f.dir.path().join("state").join(chunk_cache::DIR);
    let v1 = f.dir.path().join("root-1.0.0.img");
    chunk_cache::store(
        &cache,
        &f.v1.root_hash,
        &Chunking::default(),
        &index_of(&v1),
        None,
    )
    .unwrap();
    let p = chunk_cache::path(&cache, &f.v1.root_hash);
    let mut bytes = std::fs::read(&p).unwrap();
    let at = bytes.len() - 40;
    bytes[at] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    let m = machine(&f, "1.0.0", Slot::A, f.v1);
    let mut src = FileSource::open(&bundle).unwrap();
    let stats = m
        .apply(&m2, &mut src, &mut Quiet, StopAfter::Never)
        .unwrap();
    // Cut from the slot instead, as without a cache.
    assert!(!stats.local_index_cached, "{stats:?}");
    assert!(stats.copied > 0 && stats.local_mismatched == 0, "{stats:?}");
    let want = std::fs::read(f.dir.path().join("root-2.0.0.img")).unwrap();
    assert_eq!(slot_bytes(&f, Part::RootB, want.len()), want);
}

#[test]
fn uncached_reads_give_the_bytes_just_written_at_any_offset_and_length() {
    let f = fixture();
    let d = Disk::open(&f.disk).unwrap();
    let size = d.extent(Part::RootB).size;
    let pattern: Vec<u8> = (0..3 * MIB as usize + 12_345)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    // Written through the page cache, not synced: a direct read writes it out first.
    d.write_at(Part::RootB, 1000, &pattern).unwrap();
    let mut buf = caisson_update::slots::AlignedBuf::default();
    for (off, len) in [
        (1000u64, pattern.len()),
        (0, 4096),
        (4096, 8192),
        (1001, 1),
        (5000, 70_000),
        (size - 4097, 4097),
    ] {
        let got = d.read_uncached(Part::RootB, off, len, &mut buf).unwrap();
        let mut want = vec![0u8; len];
        d.read_at(Part::RootB, off, &mut want).unwrap();
        assert!(buf.bytes(got) == want.as_slice(), "{off} +{len}");
    }
    let got = d
        .read_uncached(Part::RootB, 1000, pattern.len(), &mut buf)
        .unwrap();
    assert!(buf.bytes(got) == pattern.as_slice());
    // Past the partition: refused, as any read is.
    assert!(d
        .read_uncached(Part::RootB, size - 10, 11, &mut buf)
        .is_err());
}

/// How the hostile channel server answers for its target file.
#[derive(Debug, Clone, Copy)]
enum Hostile {
    /// The head, then one byte every 100 ms for as long as the client listens.
    Trickle,
    /// An answer without a length that never ends.
    Endless,
}

/// A channel server on 127.0.0.1 that serves `www` whole, except `target` (a file name), for
/// which it behaves as `how`; returns the channel URL.
fn hostile_server(www: PathBuf, target: &'static str, how: Hostile) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let www = www.clone();
            std::thread::spawn(move || {
                let mut first = String::new();
                let mut reader = BufReader::new(s.try_clone().unwrap());
                reader.read_line(&mut first).unwrap_or_default();
                let mut line = String::new();
                let mut range = (0, 999_999);
                while reader.read_line(&mut line).unwrap_or_default() > 2 {
                    let lower = line.to_ascii_lowercase();
                    if let Some((a, b)) = lower
                        .strip_prefix("range: bytes=")
                        .and_then(|r| r.trim().split_once('-'))
                    {
                        range = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
                    }
                    line.clear();
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
                if path.ends_with(&format!("/{target}")) {
                    match how {
                        Hostile::Trickle => {
                            let (a, b): (u64, u64) = range;
                            let head = format!("HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/100000000\r\n\r\n", b + 1 - a);
                            let _ = s.write_all(head.as_bytes());
                            while s.write_all(b"{").is_ok() {
                                std::thread::sleep(std::time::Duration::from_millis(100));
                            }
                        }
                        Hostile::Endless => {
                            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
                            while s.write_all(&[b' '; 65536]).is_ok() {}
                        }
                    }
                    return;
                }
                match std::fs::read(www.join(path.trim_start_matches('/'))) {
                    Ok(body) => {
                        let head =
                            format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                        let _ = s.write_all(head.as_bytes());
                        let _ = s.write_all(&body);
                    }
                    Err(_) => {
                        let _ = s.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                    }
                }
            });
        }
    });
    format!("http://{addr}/stable")
}

/// Deadlines small enough that a refusal takes a second or two.
fn small_limits() -> caisson_update::download::Limits {
    caisson_update::download::Limits {
        document_deadline: std::time::Duration::from_millis(500),
        range_base: std::time::Duration::from_secs(2),
        min_rate: 1024 * 1024,
        retry: caisson_update::download::Retry {
            attempts: 2,
            first_backoff: std::time::Duration::from_millis(10),
            max_backoff: std::time::Duration::from_millis(20),
        },
        ..Default::default()
    }
}

#[test]
fn a_hostile_channel_server_fails_the_check_in_bounded_time_and_writes_nothing() {
    let f = std::sync::Arc::new(fixture());
    release(&f, "2.0.0", &[3]);
    let before = slot_bytes(&f, Part::RootB, 4 * MIB as usize);
    let esp_before = entries(&f);
    for (target, how) in [
        ("index.json", Hostile::Trickle),
        ("index.json", Hostile::Endless),
        ("host-2.0.0.manifest.json", Hostile::Trickle),
        ("host-2.0.0.manifest.json", Hostile::Endless),
        ("host-2.0.0.manifest.json.minisig", Hostile::Trickle),
        ("host-2.0.0.manifest.json.minisig", Hostile::Endless),
    ] {
        let url = hostile_server(f.dir.path().join("www"), target, how);
        let g = f.clone();
        let t0 = std::time::Instant::now();
        let err = within(20, move || {
            let mut m = machine(&g, "1.0.0", Slot::A, g.v1);
            m.net = small_limits();
            m.check(&url).map(|_| ()).unwrap_err().to_string()
        });
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "{target} {how:?}: {:?}",
            t0.elapsed()
        );
        assert!(err.contains(&format!("/stable/{target}")), "{how:?}: {err}");
        assert!(
            err.contains("within 0.5 s") || err.contains("larger than"),
            "{how:?}: {err}"
        );
    }
    assert_eq!(slot_bytes(&f, Part::RootB, 4 * MIB as usize), before);
    assert_eq!(entries(&f), esp_before);
}

#[test]
fn a_stalled_bundle_server_fails_the_apply_in_bounded_time_and_a_rollback_names_it() {
    let f = std::sync::Arc::new(fixture());
    release(&f, "2.0.0", &[3]);
    let url = serve(&f);
    let mut offer = machine(&f, "1.0.0", Slot::A, f.v1)
        .check(&url)
        .unwrap()
        .unwrap();
    let bad = hostile_server(
        f.dir.path().join("www"),
        "host-2.0.0.bundle",
        Hostile::Trickle,
    );
    offer.bundle_url = format!("{bad}/host-2.0.0.bundle");
    let bundle_url = offer.bundle_url.clone();
    let g = f.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut m = machine(&g, "1.0.0", Slot::A, g.v1);
        m.net = small_limits();
        let t0 = std::time::Instant::now();
        let got = m.apply_offer(&offer, &mut Quiet).map(|_| ());
        let _ = tx.send((got, t0.elapsed()));
    });
    // While the apply holds the update lock, a rollback waits only so long and names it.
    let lock = f.dir.path().join("state/update.lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&lock)
        .unwrap_or_default()
        .contains("applying")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the apply never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let g = f.clone();
    let err = within(10, move || {
        let mut r = machine(&g, "1.0.0", Slot::A, g.v1);
        r.records = caisson_update::record::Records::new(&g.dir.path().join("state"))
            .with_lock_wait(std::time::Duration::from_millis(300));
        r.rollback().unwrap_err().to_string()
    });
    assert!(
        err.contains(&format!("applying 2.0.0 from {bundle_url}")),
        "{err}"
    );
    // The apply gives up by itself, naming the URL, and the running entry is untouched.
    let (got, took) = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the apply hung");
    let err = got.unwrap_err().to_string();
    assert!(
        err.contains(&bundle_url) && err.contains("stalled"),
        "{err}"
    );
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    assert_eq!(entries(&f), ["caisson-1.0.0-a.conf"]);
    // Once it has, the lock is free again.
    assert!(matches!(
        machine(&f, "1.0.0", Slot::A, f.v1).rollback(),
        Err(Error::NothingToRollBackTo { .. })
    ));
}
