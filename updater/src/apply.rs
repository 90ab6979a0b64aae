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
    src: &mut (dyn Source + Send),
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

/// A sha256 digest, compared as bytes.
type Hash = [u8; 32];

/// How much of a slot one read takes when hashing it chunk by chunk.
const READ_PIECE: u64 = 4 * 1024 * 1024;

/// The sha256 of each `chunk`-sized piece of the first `size` bytes of `part`, read in large
/// pieces. Stops early at a read error: the caller treats a missing hash as "not there".
/// Zero chunks (a slot never written, as on a freshly installed machine) are recognised by a
/// comparison, which costs a fraction of a hash.
fn chunk_hashes(disk: &Disk, part: Part, size: u64, chunk: u64) -> Vec<Hash> {
    let piece = READ_PIECE.max(chunk) / chunk * chunk;
    let mut buf = vec![0u8; piece as usize];
    let zeros = vec![0u8; chunk as usize];
    let zero_hash = sha256(&zeros);
    let hash = |c: &[u8]| if c == zeros { zero_hash } else { sha256(c) };
    let mut hashes = Vec::with_capacity(size.div_ceil(chunk) as usize);
    let mut off = 0;
    while off < size {
        let n = piece.min(size - off) as usize;
        if disk.read_at(part, off, &mut buf[..n]).is_err() {
            break;
        }
        hashes.extend(buf[..n].chunks(chunk as usize).map(hash));
        off += n as u64;
    }
    hashes
}

fn sha256(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

/// The chunks of the active slot's payload, by hash: what a delta update can copy locally.
fn local_chunks(disk: &Disk, booted: &BootParams, chunk: u64) -> HashMap<Hash, u64> {
    let Some(v) = booted.verity else {
        return HashMap::new();
    };
    let part = Part::root(booted.slot);
    let size = v.payload_size().min(disk.extent(part).size);
    let mut map = HashMap::new();
    for (i, h) in chunk_hashes(disk, part, size, chunk)
        .into_iter()
        .enumerate()
    {
        map.entry(h).or_insert(i as u64 * chunk);
    }
    map
}

/// The manifest's chunk index as bytes.
fn wanted_chunks(root: &Artifact) -> Result<Vec<Hash>, ApplyError> {
    root.chunks
        .iter()
        .map(|h| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h, &mut out)
                .map_err(|e| ApplyError::Manifest(format!("root chunk hash {h:?}: {e}")))?;
            Ok(out)
        })
        .collect()
}

fn write_root(
    t: &Target,
    m: &Manifest,
    root: &Artifact,
    slot: Slot,
    src: &mut (dyn Source + Send),
    progress: &mut dyn Progress,
    stop: StopAfter,
) -> Result<ApplyStats, ApplyError> {
    let part = Part::root(slot);
    let chunk = m.chunk_size;
    let wanted = wanted_chunks(root)?;
    // The two slots are read and hashed at the same time, one per core.
    let (local, present) = std::thread::scope(|s| {
        let local = s.spawn(|| local_chunks(t.disk, t.booted, chunk));
        let present = chunk_hashes(t.disk, part, root.size, chunk);
        (local.join().unwrap_or_default(), present)
    });
    let mut stats = ApplyStats::default();
    let mut buf = vec![0u8; chunk as usize];
    let mut missing: Vec<u64> = Vec::new();
    let len_of = |i: u64| chunk.min(root.size - i * chunk);
    let mut done = 0u64;
    for (i, want) in wanted.iter().enumerate() {
        let n = len_of(i as u64) as usize;
        if present.get(i) == Some(want) {
            stats.kept += 1;
        } else if let Some(&from) = local.get(want) {
            t.disk
                .read_at(Part::root(t.booted.slot), from, &mut buf[..n])?;
            t.disk.write_at(part, i as u64 * chunk, &buf[..n])?;
            stats.copied += 1;
        } else {
            missing.push(i as u64);
            continue;
        }
        done += n as u64;
        progress.root(done, root.size);
    }
    let runs = runs_of(&missing, (READ_PIECE / chunk).max(1));
    let source_name = src.describe();
    // One thread fetches the next run while this one checks and writes the last.
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (give_back, reuse) = std::sync::mpsc::channel::<Vec<u8>>();
        let fetch = &mut *src;
        s.spawn(move || {
            for (first, last) in runs {
                let mut buf = reuse.try_recv().unwrap_or_default();
                let len = (last - first) * chunk + len_of(last);
                let got = fetch.read_range(root.offset + first * chunk, len, &mut buf);
                let failed = got.is_err();
                // A closed channel means the writer stopped: stop fetching too.
                if tx.send(got.map(|()| (first, last, buf))).is_err() || failed {
                    break;
                }
            }
        });
        for got in rx {
            let (first, last, fetched) = got?;
            for i in first..=last {
                let rel = ((i - first) * chunk) as usize;
                let piece = &fetched[rel..rel + len_of(i) as usize];
                let got = sha256(piece);
                if got != wanted[i as usize] {
                    return Err(ApplyError::Hash {
                        what: format!("root chunk {i}"),
                        source_name: source_name.clone(),
                        got: hex::encode(got),
                        want: root.chunks[i as usize].clone(),
                    });
                }
                t.disk.write_at(part, i * chunk, piece)?;
                stats.fetched += 1;
                done += piece.len() as u64;
                progress.root(done, root.size);
                if matches!(stop, StopAfter::RootChunks(n) if stats.fetched >= n) {
                    t.disk.sync()?;
                    return Ok(());
                }
            }
            let _ = give_back.send(fetched);
        }
        Ok(())
    })?;
    stats.downloaded_bytes = src.downloaded();
    Ok(stats)
}

/// Consecutive chunk numbers of `missing` (sorted) as `(first, last)` runs of at most `max`.
fn runs_of(missing: &[u64], max: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &i in missing {
        match runs.last_mut() {
            Some((first, last)) if *last + 1 == i && i - *first < max => *last = i,
            _ => runs.push((i, i)),
        }
    }
    runs
}

/// Reads `part` from `pos` to `end`, in large pieces.
struct SlotReader<'a> {
    disk: &'a Disk,
    part: Part,
    pos: u64,
    end: u64,
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
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads the written slot back and checks its sha256 and its verity root: two passes over the
/// same bytes, one per core (the second read mostly comes from the page cache the first filled).
fn read_back(
    disk: &Disk,
    part: Part,
    root: &Artifact,
    verity: &verity::VerityParams,
    slot: Slot,
) -> Result<(), ApplyError> {
    let bad = |why: String| ApplyError::ReadBack { slot, why };
    let reader = |end| {
        std::io::BufReader::with_capacity(
            READ_PIECE as usize,
            SlotReader {
                disk,
                part,
                pos: 0,
                end,
            },
        )
    };
    let (whole, tree) = std::thread::scope(|s| {
        let whole = s.spawn(|| {
            let mut hash = Sha256::new();
            std::io::copy(&mut reader(root.size), &mut hash).map(|_| hash.finalize())
        });
        let tree = verity::build(reader(verity.hash_offset), verity.salt, [0; 16]);
        let whole = whole
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the hashing thread panicked")));
        (whole, tree)
    });
    let got = hex::encode(whole.map_err(|e| bad(e.to_string()))?);
    let tree = tree.map_err(|e| bad(e.to_string()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_chunks_are_fetched_in_bounded_runs() {
        assert_eq!(runs_of(&[], 4), []);
        assert_eq!(
            runs_of(&[0, 1, 2, 3, 4, 5, 7, 9, 10], 4),
            [(0, 3), (4, 5), (7, 7), (9, 10)]
        );
    }
}
