//! Writing an update into the inactive slot, in the order that keeps the machine bootable if the
//! power goes at any moment:
//!
//! 1. remove the inactive slot's boot entry (and its kernel files): the boot loader can no longer
//!    choose the slot that is about to change;
//! 2. write the root payload into the inactive partition: chunks already there (an interrupted
//!    apply) are kept, chunks the active slot holds are copied locally, the rest is fetched;
//!    then sync;
//! 3. read the slot back and check its sha256 and its dm-verity root hash;
//! 4. write the kernel and initramfs under versioned names on the ESP (temporary name, sync,
//!    rename);
//! 5. write the new entry `caisson-<v>-<slot>+3-0.conf` (temporary name, sync, rename).
//!
//! The running slot's entry is never touched.

use crate::bundle::{Artifact, ArtifactKind, Manifest};
use crate::download::{DownloadError, Source};
use crate::slots::{self, Disk, SlotError, SlotState};
use caisson_layout::cmdline::BootParams;
use caisson_layout::partition::Part;
use caisson_layout::{entry, paths, verity, EntryName, Slot};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why an update was not written.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Download(#[from] DownloadError),
    #[error(
        "the running version {version} (slot {slot}) is not confirmed healthy yet (its boot entry \
         still counts tries): wait until it is blessed, then update"
    )]
    NotBlessed { version: String, slot: Slot },
    #[error("the root payload of {version} is {need} bytes but partition {label} holds {have}")]
    SlotTooSmall {
        version: String,
        need: u64,
        label: &'static str,
        have: u64,
    },
    #[error(
        "no space on the ESP {esp}: {need} bytes needed for the kernel and initramfs, {free} free"
    )]
    EspFull { esp: PathBuf, need: u64, free: u64 },
    #[error("the manifest has no {0:?} artifact")]
    MissingArtifact(ArtifactKind),
    #[error("{what} from {source_name}: sha256 {got}, the manifest says {want}")]
    Hash {
        what: String,
        source_name: String,
        got: String,
        want: String,
    },
    #[error("slot {slot} read back wrong after writing ({why}): the disk may be failing")]
    ReadBack { slot: Slot, why: String },
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ApplyError {
    let path = path.to_path_buf();
    move |source| ApplyError::Io { op, path, source }
}

/// What an apply reports as it goes.
pub trait Progress {
    /// `done` of `total` bytes of the root payload are in place.
    fn root(&mut self, done: u64, total: u64);
    /// A step begins (for logs and `status`).
    fn step(&mut self, what: &str);
}

/// A progress sink that says nothing.
pub struct Quiet;
impl Progress for Quiet {
    fn root(&mut self, _: u64, _: u64) {}
    fn step(&mut self, _: &str) {}
}

/// Where the bytes of the root payload came from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    /// Chunks already in the inactive slot (an interrupted apply).
    pub kept: u64,
    /// Chunks copied from the active slot.
    pub copied: u64,
    /// Chunks fetched from the source.
    pub fetched: u64,
    /// Bytes the source had to deliver (network only).
    pub downloaded_bytes: u64,
}

/// The machine an update is written to.
pub struct Target<'a> {
    pub disk: &'a Disk,
    /// Where the ESP is mounted.
    pub esp: &'a Path,
    /// The running boot's parameters.
    pub booted: &'a BootParams,
}

/// Test hooks: stop after a step, as a power cut would.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StopAfter {
    #[default]
    Never,
    Invalidate,
    RootChunks(u64),
    Root,
    Kernel,
}

/// Writes `m` into the inactive slot and adds its boot entry. Returns the entry name.
pub fn apply(
    t: &Target,
    m: &Manifest,
    src: &mut dyn Source,
    progress: &mut dyn Progress,
    stop: StopAfter,
) -> Result<(EntryName, ApplyStats), ApplyError> {
    let mut state = SlotState::load_booted(t.esp, t.booted)?;
    if !state.booted_is_blessed() {
        return Err(ApplyError::NotBlessed {
            version: t.booted.version.clone(),
            slot: t.booted.slot,
        });
    }
    let slot = t.booted.slot.other();
    let root = artifact(m, ArtifactKind::Root)?;
    let kernel = artifact(m, ArtifactKind::Kernel)?;
    let initrd = artifact(m, ArtifactKind::Initrd)?;
    let part = Part::root(slot);
    let extent = t.disk.extent(part);
    if root.size > extent.size {
        return Err(ApplyError::SlotTooSmall {
            version: m.version.clone(),
            need: root.size,
            label: part.label(),
            have: extent.size,
        });
    }
    let verity = m.verity_params().map_err(ApplyError::Manifest)?;

    // 1. The boot loader must not pick the slot while it changes.
    progress.step("invalidating the inactive slot's boot entry");
    state.invalidate(slot)?;
    state.write()?;
    state.remove_unused_payloads()?;
    check_esp_space(t.esp, kernel.size + initrd.size)?;
    if stop == StopAfter::Invalidate {
        return Ok((
            EntryName::new_tried(&m.version, slot),
            ApplyStats::default(),
        ));
    }

    // 2. The root payload.
    progress.step("writing the root payload");
    let mut stats = write_root(t, m, root, slot, src, progress, stop)?;
    if let StopAfter::RootChunks(_) = stop {
        return Ok((EntryName::new_tried(&m.version, slot), stats));
    }
    t.disk.sync()?;

    // 3. Read back.
    progress.step("verifying the written slot");
    read_back(t.disk, part, root, &verity, slot)?;
    if stop == StopAfter::Root {
        return Ok((EntryName::new_tried(&m.version, slot), stats));
    }

    // 4. Kernel and initramfs.
    progress.step("writing the kernel and initramfs");
    for (a, rel) in [
        (kernel, paths::esp_kernel(&m.version, slot)),
        (initrd, paths::esp_initrd(&m.version, slot)),
    ] {
        let mut bytes = Vec::new();
        src.read_range(a.offset, a.size, &mut bytes)?;
        let got = hex::encode(Sha256::digest(&bytes));
        if got != a.sha256 {
            return Err(ApplyError::Hash {
                what: format!("{:?}", a.kind).to_lowercase(),
                source_name: src.describe(),
                got,
                want: a.sha256.clone(),
            });
        }
        let path = t.esp.join(&rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        }
        slots::write_synced(&path, &bytes)?;
    }
    stats.downloaded_bytes = src.downloaded();
    if stop == StopAfter::Kernel {
        return Ok((EntryName::new_tried(&m.version, slot), stats));
    }

    // 5. The entry.
    progress.step("writing the boot entry");
    let params = BootParams {
        version: m.version.clone(),
        slot,
        root: extent.guid,
        state: t.booted.state,
        esp: t.booted.esp,
        verity: Some(verity),
        debug: t.booted.debug,
    };
    let name = state.add_tried(&m.version, slot, entry::render(&params, &m.cmdline_extra))?;
    state.write()?;
    Ok((name, stats))
}

fn artifact(m: &Manifest, kind: ArtifactKind) -> Result<&Artifact, ApplyError> {
    m.artifact(kind).ok_or(ApplyError::MissingArtifact(kind))
}

fn check_esp_space(esp: &Path, need: u64) -> Result<(), ApplyError> {
    let st =
        rustix::fs::statvfs(esp).map_err(|e| io_err("checking free space on", esp)(e.into()))?;
    let free = st.f_bavail * st.f_frsize;
    // Room for the files, their temporary copies' metadata and cluster rounding.
    let need = need + 1024 * 1024;
    if free < need {
        return Err(ApplyError::EspFull {
            esp: esp.to_path_buf(),
            need,
            free,
        });
    }
    Ok(())
}

/// The chunks of the active slot's payload, by hash: what a delta update can copy locally.
fn local_chunks(disk: &Disk, booted: &BootParams, chunk: u64) -> HashMap<String, u64> {
    let mut map = HashMap::new();
    let Some(v) = booted.verity else {
        return map;
    };
    let part = Part::root(booted.slot);
    let size = v.payload_size().min(disk.extent(part).size);
    let mut buf = vec![0u8; chunk as usize];
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off) as usize;
        if disk.read_at(part, off, &mut buf[..n]).is_err() {
            break;
        }
        map.entry(hex::encode(Sha256::digest(&buf[..n])))
            .or_insert(off);
        off += n as u64;
    }
    map
}

fn write_root(
    t: &Target,
    m: &Manifest,
    root: &Artifact,
    slot: Slot,
    src: &mut dyn Source,
    progress: &mut dyn Progress,
    stop: StopAfter,
) -> Result<ApplyStats, ApplyError> {
    let part = Part::root(slot);
    let chunk = m.chunk_size;
    let local = local_chunks(t.disk, t.booted, chunk);
    let mut stats = ApplyStats::default();
    let mut buf = vec![0u8; chunk as usize];
    let mut missing: Vec<u64> = Vec::new();
    let len_of = |i: u64| chunk.min(root.size - i * chunk);
    let mut done = 0u64;
    for (i, want) in root.chunks.iter().enumerate() {
        let i = i as u64;
        let (off, n) = (i * chunk, len_of(i) as usize);
        t.disk.read_at(part, off, &mut buf[..n])?;
        if hex::encode(Sha256::digest(&buf[..n])) == *want {
            stats.kept += 1;
        } else if let Some(&from) = local.get(want) {
            t.disk
                .read_at(Part::root(t.booted.slot), from, &mut buf[..n])?;
            t.disk.write_at(part, off, &buf[..n])?;
            stats.copied += 1;
        } else {
            missing.push(i);
            continue;
        }
        done += n as u64;
        progress.root(done, root.size);
    }
    // Fetch the missing chunks in runs of consecutive chunks, at most 4 MiB a request.
    let max_run = (4 * 1024 * 1024 / chunk).max(1);
    let mut fetched = Vec::new();
    let mut k = 0;
    while k < missing.len() {
        let first = missing[k];
        let mut last = first;
        while k + 1 < missing.len() && missing[k + 1] == last + 1 && last + 1 - first < max_run {
            k += 1;
            last = missing[k];
        }
        k += 1;
        let off = first * chunk;
        let len = (last - first) * chunk + len_of(last);
        src.read_range(root.offset + off, len, &mut fetched)?;
        for i in first..=last {
            let rel = ((i - first) * chunk) as usize;
            let piece = &fetched[rel..rel + len_of(i) as usize];
            let got = hex::encode(Sha256::digest(piece));
            if got != root.chunks[i as usize] {
                return Err(ApplyError::Hash {
                    what: format!("root chunk {i}"),
                    source_name: src.describe(),
                    got,
                    want: root.chunks[i as usize].clone(),
                });
            }
            t.disk.write_at(part, i * chunk, piece)?;
            stats.fetched += 1;
            done += piece.len() as u64;
            progress.root(done, root.size);
            if let StopAfter::RootChunks(n) = stop {
                if stats.fetched >= n {
                    t.disk.sync()?;
                    return Ok(stats);
                }
            }
        }
    }
    stats.downloaded_bytes = src.downloaded();
    Ok(stats)
}

fn read_back(
    disk: &Disk,
    part: Part,
    root: &Artifact,
    verity: &verity::VerityParams,
    slot: Slot,
) -> Result<(), ApplyError> {
    struct SlotReader<'a> {
        disk: &'a Disk,
        part: Part,
        pos: u64,
        end: u64,
        hash: Sha256,
    }
    impl std::io::Read for SlotReader<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = (buf.len() as u64).min(self.end - self.pos) as usize;
            if n == 0 {
                return Ok(0);
            }
            self.disk
                .read_at(self.part, self.pos, &mut buf[..n])
                .map_err(std::io::Error::other)?;
            self.hash.update(&buf[..n]);
            self.pos += n as u64;
            Ok(n)
        }
    }
    let bad = |why: String| ApplyError::ReadBack { slot, why };
    let mut r = SlotReader {
        disk,
        part,
        pos: 0,
        end: root.size,
        hash: Sha256::new(),
    };
    let tree = verity::build(
        std::io::Read::take(&mut r, verity.hash_offset),
        verity.salt,
        [0; 16],
    )
    .map_err(|e| bad(e.to_string()))?;
    std::io::copy(&mut r, &mut std::io::sink()).map_err(|e| bad(e.to_string()))?;
    let got = hex::encode(r.hash.finalize());
    if got != root.sha256 {
        return Err(bad(format!(
            "sha256 {got}, the manifest says {}",
            root.sha256
        )));
    }
    if tree.params.root_hash != verity.root_hash {
        return Err(bad(format!(
            "verity root {}, the manifest says {}",
            hex::encode(tree.params.root_hash),
            hex::encode(verity.root_hash)
        )));
    }
    Ok(())
}
