//! Writing an update into the inactive slot, in the order that keeps the machine bootable if the
//! power goes at any moment:
//!
//! 1. remove the inactive slot's boot entry (and its kernel files): the boot loader can no longer
//!    choose the slot that is about to change;
//! 2. write the root payload into the inactive partition: the manifest's chunk index is
//!    fetched and checked; chunks already in place (an interrupted apply) are kept, chunks the
//!    active slot holds (cut with the manifest's chunking parameters) are copied locally, the
//!    rest is fetched with one Range request per run of adjacent missing chunks, each chunk
//!    checked against the index before it is written; then sync;
//! 3. read the slot back and check its sha256 and its dm-verity root hash;
//! 4. write the kernel and initramfs under versioned names on the ESP (temporary name, sync,
//!    rename), taking the chunks the running kernel and initramfs hold from them;
//! 5. write the new entry `caisson-<v>-<slot>+3-0.conf` (temporary name, sync, rename).
//!
//! The running slot's entry is never touched.

use crate::bundle::{Artifact, ArtifactKind, ChunkIndex, Cutter, Hash, Manifest};
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
    /// Range requests for root chunks (adjacent missing chunks share one).
    pub fetch_runs: u64,
    /// Bytes the source delivered for the root: its chunk index and its chunks.
    pub root_downloaded_bytes: u64,
    /// Bytes the source had to deliver (network only): chunk indexes, chunks, kernel and
    /// initramfs chunks.
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
    let cutter = m.chunking.cutter().map_err(ApplyError::Manifest)?;

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
    let mut stats = write_root(t, &cutter, root, slot, src, progress, stop)?;
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
    for (a, rel, running) in [
        (
            kernel,
            paths::esp_kernel(&m.version, slot),
            paths::esp_kernel(&t.booted.version, t.booted.slot),
        ),
        (
            initrd,
            paths::esp_initrd(&m.version, slot),
            paths::esp_initrd(&t.booted.version, t.booted.slot),
        ),
    ] {
        // What the running version booted from: a kernel that did not change is not fetched.
        let local = std::fs::read(t.esp.join(&running)).unwrap_or_default();
        let bytes = boot_file(src, &cutter, a, local)?;
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

/// How much of a slot one read or one Range request takes (a run may pass it by one chunk).
const READ_PIECE: u64 = 4 * 1024 * 1024;

fn sha256(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

fn kind_name(kind: ArtifactKind) -> String {
    format!("{kind:?}").to_lowercase()
}

/// Fetches an artifact's chunk index and checks it against the manifest.
fn fetch_index(
    src: &mut (dyn Source + Send),
    a: &Artifact,
    cutter: &Cutter,
) -> Result<ChunkIndex, ApplyError> {
    let mut bytes = Vec::new();
    src.read_range(a.index.offset, a.index.size, &mut bytes)?;
    let got = hex::encode(sha256(&bytes));
    if got != a.index.sha256 {
        return Err(ApplyError::Hash {
            what: format!("{} chunk index", kind_name(a.kind)),
            source_name: src.describe(),
            got,
            want: a.index.sha256.clone(),
        });
    }
    ChunkIndex::decode(&bytes, a.size, cutter.max_size())
        .map_err(|e| ApplyError::Manifest(format!("{} chunk index: {e}", kind_name(a.kind))))
}

/// Chunks held locally, by hash: their offset and length in the local bytes.
type Local = HashMap<Hash, (u64, u32)>;

/// Cuts what `reader` yields as the bundle was cut and adds each chunk to `local` (the first
/// place a chunk is seen wins). Stops at a read error: what was found until then stays usable.
fn cut_local<R: std::io::Read>(cutter: &Cutter, reader: R, local: &mut Local) {
    let mut off = 0u64;
    let result = cutter.for_each_chunk::<_, std::io::Error>(reader, |c| {
        local.entry(sha256(c)).or_insert((off, c.len() as u32));
        off += c.len() as u64;
        Ok(())
    });
    if let Err(e) = result {
        log::warn!("reading local chunks stopped at byte {off}: {e}; the rest is fetched");
    }
}

/// The chunks of the active slot's payload: what a delta update can copy locally.
fn local_chunks(disk: &Disk, booted: &BootParams, cutter: &Cutter) -> Local {
    let mut local = HashMap::new();
    let Some(v) = booted.verity else {
        return local;
    };
    let part = Part::root(booted.slot);
    let end = v.payload_size().min(disk.extent(part).size);
    cut_local(cutter, SlotReader::buffered(disk, part, end), &mut local);
    local
}

/// Which chunks of `index` are already in place in `part` (an interrupted apply wrote them),
/// read in large pieces. A read error leaves the rest "not there". Zero chunks (a slot never
/// written, as on a freshly installed machine) are recognised by a comparison, which costs a
/// fraction of a hash.
fn present_chunks(disk: &Disk, part: Part, index: &ChunkIndex) -> Vec<bool> {
    let chunks = &index.chunks;
    let mut present = vec![false; chunks.len()];
    let max = chunks.iter().map(|c| c.len as usize).max().unwrap_or(0);
    let zeros = vec![0u8; max];
    let mut zero_hashes: HashMap<u32, Hash> = HashMap::new();
    let mut buf = Vec::new();
    for (first, last) in runs(chunks.len(), |_| true, |i| chunks[i].len, READ_PIECE) {
        let start = chunks[first].offset;
        let end = chunks[last].offset + u64::from(chunks[last].len);
        buf.resize((end - start) as usize, 0);
        if disk.read_at(part, start, &mut buf).is_err() {
            break;
        }
        for i in first..=last {
            let c = &chunks[i];
            let rel = (c.offset - start) as usize;
            let piece = &buf[rel..rel + c.len as usize];
            present[i] = if piece == &zeros[..piece.len()] {
                *zero_hashes.entry(c.len).or_insert_with(|| sha256(piece)) == c.sha256
            } else {
                sha256(piece) == c.sha256
            };
        }
    }
    present
}

/// Runs of consecutive chunk numbers below `n` for which `pick` holds, as `(first, last)`, each
/// of at most `max` bytes (`len` gives a chunk's length) unless a single chunk is longer.
fn runs(
    n: usize,
    pick: impl Fn(usize) -> bool,
    len: impl Fn(usize) -> u32,
    max: u64,
) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut bytes = 0u64;
    for i in (0..n).filter(|&i| pick(i)) {
        let l = u64::from(len(i));
        match out.last_mut() {
            Some((_, last)) if *last + 1 == i && bytes + l <= max => {
                *last = i;
                bytes += l;
            }
            _ => {
                out.push((i, i));
                bytes = l;
            }
        }
    }
    out
}

/// Where a wanted chunk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Already in place.
    Here,
    /// Copied from this offset of the local bytes.
    Local(u64),
    Fetch,
}

fn plan(index: &ChunkIndex, present: &[bool], local: &Local) -> Vec<Origin> {
    index
        .chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if present.get(i) == Some(&true) {
                Origin::Here
            } else {
                match local.get(&c.sha256) {
                    Some(&(from, len)) if len == c.len => Origin::Local(from),
                    _ => Origin::Fetch,
                }
            }
        })
        .collect()
}

/// A run of chunks copied from the local bytes at one go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Copy {
    /// The chunks `first..=last`.
    first: usize,
    last: usize,
    /// Where the first one starts in the artifact and in the local bytes, and the run's length.
    to: u64,
    from: u64,
    len: u64,
}

/// Local copies: chunks adjacent on both sides are merged, up to `READ_PIECE` bytes.
fn copies(index: &ChunkIndex, origins: &[Origin]) -> Vec<Copy> {
    let mut out: Vec<Copy> = Vec::new();
    for (i, (c, o)) in index.chunks.iter().zip(origins).enumerate() {
        let Origin::Local(from) = *o else { continue };
        let len = u64::from(c.len);
        match out.last_mut() {
            Some(r) if r.last + 1 == i && r.from + r.len == from && r.len + len <= READ_PIECE => {
                r.last = i;
                r.len += len;
            }
            _ => out.push(Copy {
                first: i,
                last: i,
                to: c.offset,
                from,
                len,
            }),
        }
    }
    out
}

/// Checks a fetched run of chunks `first..=last` against the index; returns the bad chunk's
/// error.
fn check_run(
    index: &ChunkIndex,
    first: usize,
    last: usize,
    fetched: &[u8],
    what: &str,
    source_name: &str,
) -> Result<(), ApplyError> {
    let start = index.chunks[first].offset;
    if fetched.len() as u64 != index.chunks[last].offset + u64::from(index.chunks[last].len) - start
    {
        return Err(ApplyError::Manifest(format!(
            "{what}: {} bytes arrived for chunks {first} to {last}",
            fetched.len()
        )));
    }
    for i in first..=last {
        let c = &index.chunks[i];
        let rel = (c.offset - start) as usize;
        let got = sha256(&fetched[rel..rel + c.len as usize]);
        if got != c.sha256 {
            return Err(ApplyError::Hash {
                what: format!("{what} chunk {i}"),
                source_name: source_name.to_string(),
                got: hex::encode(got),
                want: hex::encode(c.sha256),
            });
        }
    }
    Ok(())
}

/// The bytes of a kernel or initramfs: taken whole from `local` (the running version's file)
/// when it is the same, otherwise assembled from its chunks, those `local` holds copied and the
/// rest fetched in runs; every fetched chunk and the whole are checked against the manifest.
fn boot_file(
    src: &mut (dyn Source + Send),
    cutter: &Cutter,
    a: &Artifact,
    local: Vec<u8>,
) -> Result<Vec<u8>, ApplyError> {
    let source_name = src.describe();
    let bytes = if hex::encode(sha256(&local)) == a.sha256 {
        local
    } else {
        let index = fetch_index(src, a, cutter)?;
        let mut have = HashMap::new();
        cut_local(cutter, &local[..], &mut have);
        let origins = plan(&index, &[], &have);
        let mut out = vec![0u8; a.size as usize];
        for r in copies(&index, &origins) {
            let (to, from, len) = (r.to as usize, r.from as usize, r.len as usize);
            out[to..to + len].copy_from_slice(&local[from..from + len]);
        }
        let chunks = &index.chunks;
        let mut fetched = Vec::new();
        let wanted = |i: usize| origins[i] == Origin::Fetch;
        for (first, last) in runs(chunks.len(), wanted, |i| chunks[i].len, READ_PIECE) {
            let start = chunks[first].offset;
            let len = chunks[last].offset + u64::from(chunks[last].len) - start;
            src.read_range(a.offset + start, len, &mut fetched)?;
            check_run(
                &index,
                first,
                last,
                &fetched,
                &kind_name(a.kind),
                &source_name,
            )?;
            out[start as usize..(start + len) as usize].copy_from_slice(&fetched);
        }
        out
    };
    let got = hex::encode(sha256(&bytes));
    if got != a.sha256 {
        return Err(ApplyError::Hash {
            what: kind_name(a.kind),
            source_name,
            got,
            want: a.sha256.clone(),
        });
    }
    Ok(bytes)
}

fn write_root(
    t: &Target,
    cutter: &Cutter,
    root: &Artifact,
    slot: Slot,
    src: &mut (dyn Source + Send),
    progress: &mut dyn Progress,
    stop: StopAfter,
) -> Result<ApplyStats, ApplyError> {
    let part = Part::root(slot);
    // The active slot is cut and hashed on one core while the index is fetched and the
    // inactive slot is checked against it on the other.
    let (local, index_present) = std::thread::scope(|s| {
        let local = s.spawn(|| local_chunks(t.disk, t.booted, cutter));
        let index_present = fetch_index(&mut *src, root, cutter).map(|index| {
            let present = present_chunks(t.disk, part, &index);
            (index, present)
        });
        (local.join().unwrap_or_default(), index_present)
    });
    let (index, present) = index_present?;
    let chunks = &index.chunks;
    let origins = plan(&index, &present, &local);
    drop(local);
    let mut stats = ApplyStats::default();
    // Progress goes chunk by chunk (at most 32 KiB at a time with the default chunking), kept
    // chunks first, then copied, then fetched, so every percentage is passed in order.
    let mut done = 0u64;
    let mut advance = |first: usize, last: usize| {
        for c in &chunks[first..=last] {
            done += u64::from(c.len);
            progress.root(done, root.size);
        }
    };
    for (i, o) in origins.iter().enumerate() {
        match o {
            Origin::Here => {
                stats.kept += 1;
                advance(i, i);
            }
            Origin::Local(_) => stats.copied += 1,
            Origin::Fetch => {}
        }
    }
    let mut buf = Vec::new();
    for r in copies(&index, &origins) {
        buf.resize(r.len as usize, 0);
        t.disk
            .read_at(Part::root(t.booted.slot), r.from, &mut buf)?;
        t.disk.write_at(part, r.to, &buf)?;
        advance(r.first, r.last);
    }
    let wanted = |i: usize| origins[i] == Origin::Fetch;
    let fetch_runs = runs(chunks.len(), wanted, |i| chunks[i].len, READ_PIECE);
    stats.fetch_runs = fetch_runs.len() as u64;
    let source_name = src.describe();
    // One thread fetches the next run while this one checks and writes the last.
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (give_back, reuse) = std::sync::mpsc::channel::<Vec<u8>>();
        let fetch = &mut *src;
        s.spawn(move || {
            for (first, last) in fetch_runs {
                let mut buf = reuse.try_recv().unwrap_or_default();
                let start = chunks[first].offset;
                let len = chunks[last].offset + u64::from(chunks[last].len) - start;
                let got = fetch.read_range(root.offset + start, len, &mut buf);
                let failed = got.is_err();
                // A closed channel means the writer stopped: stop fetching too.
                if tx.send(got.map(|()| (first, last, buf))).is_err() || failed {
                    break;
                }
            }
        });
        for got in rx {
            let (first, mut last, fetched) = got?;
            check_run(&index, first, last, &fetched, "root", &source_name)?;
            // The power-cut hook: only the first n fetched chunks land.
            let mut cut = false;
            if let StopAfter::RootChunks(n) = stop {
                let room = n.saturating_sub(stats.fetched) as usize;
                if last - first + 1 >= room {
                    last = first + room.max(1) - 1;
                    cut = true;
                }
            }
            let start = chunks[first].offset;
            let len = (chunks[last].offset + u64::from(chunks[last].len) - start) as usize;
            t.disk.write_at(part, start, &fetched[..len])?;
            stats.fetched += (last - first + 1) as u64;
            advance(first, last);
            if cut {
                t.disk.sync()?;
                return Ok(());
            }
            let _ = give_back.send(fetched);
        }
        Ok::<(), ApplyError>(())
    })?;
    stats.downloaded_bytes = src.downloaded();
    stats.root_downloaded_bytes = stats.downloaded_bytes;
    Ok(stats)
}

/// Reads `part` from `pos` to `end`, in large pieces.
struct SlotReader<'a> {
    disk: &'a Disk,
    part: Part,
    pos: u64,
    end: u64,
}

impl<'a> SlotReader<'a> {
    /// The first `end` bytes of partition `part`, read in [`READ_PIECE`]s.
    fn buffered(disk: &'a Disk, part: Part, end: u64) -> std::io::BufReader<SlotReader<'a>> {
        std::io::BufReader::with_capacity(
            READ_PIECE as usize,
            SlotReader {
                disk,
                part,
                pos: 0,
                end,
            },
        )
    }
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
    let reader = |end| SlotReader::buffered(disk, part, end);
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
        let missing = [0usize, 1, 2, 3, 4, 5, 7, 9, 10];
        let pick = |i: usize| missing.contains(&i);
        assert_eq!(runs(12, |_| false, |_| 10, 40), []);
        assert_eq!(
            runs(12, pick, |_| 10, 40),
            [(0, 3), (4, 5), (7, 7), (9, 10)]
        );
        // A chunk longer than the bound still makes a run of its own.
        assert_eq!(runs(3, |_| true, |_| 100, 40), [(0, 0), (1, 1), (2, 2)]);
    }

    #[test]
    fn local_copies_merge_when_adjacent_on_both_sides() {
        let mut index = ChunkIndex::default();
        for n in [10usize, 20, 30, 40] {
            index.push(&vec![n as u8; n]);
        }
        let origins = [
            Origin::Local(100),
            Origin::Local(110),
            Origin::Local(500),
            Origin::Fetch,
        ];
        let runs: Vec<_> = copies(&index, &origins)
            .iter()
            .map(|r| (r.first, r.last, r.to, r.from, r.len))
            .collect();
        assert_eq!(runs, [(0, 1, 0, 100, 30), (2, 2, 30, 500, 30)]);
    }
}
