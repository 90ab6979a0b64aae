//! Writing an update into the inactive slot, in the order that keeps the machine bootable if the
//! power goes at any moment:
//!
//! 1. remove the inactive slot's boot entry (and its kernel files): the boot loader can no longer
//!    choose the slot that is about to change;
//! 2. write the root payload into the inactive partition: the manifest's chunk index is
//!    fetched and checked; chunks already in place (an interrupted apply) are kept, chunks the
//!    active slot holds (by the chunk index kept when it was written, see [`chunk_cache`], or
//!    else cut with the manifest's chunking parameters) are copied locally, the rest is fetched
//!    with one Range request per run of adjacent missing chunks, each chunk, copied or fetched,
//!    checked against the index before it is written;
//! 3. read the slot back and check its sha256 and its dm-verity root hash: two threads read
//!    behind the writer (never past the first chunk not yet written), and their verdict is taken
//!    once everything is written and the slot is synced; the slot's chunk index is then kept
//!    for the next update;
//! 4. write the kernel and initramfs under versioned names on the ESP (temporary name, sync,
//!    rename), taking the chunks the running kernel and initramfs hold from them;
//! 5. write the new entry `caisson-<v>-<slot>+3-0.conf` (temporary name, sync, rename).
//!
//! The running slot's entry is never touched.
//!
//! The slots are read past the page cache where the disk allows it (`O_DIRECT`, see
//! [`Disk::read_uncached`]): the read-back reads what the device holds, not the pages just
//! written, and no byte read is copied through the kernel's cache (in a VM without SHA-NI,
//! reading 84 MB through it took up to 1.1 s of CPU, nearly a sha256 pass). Writes go through
//! the page cache: direct writes cut the writer's CPU in a VM but wait for the device at every
//! piece, and made no apply faster.

use crate::bundle::{Artifact, ArtifactKind, ChunkIndex, Chunking, Cutter, Hash, Manifest};
use crate::chunk_cache;
use crate::download::{DownloadError, Source};
use crate::slots::{self, AlignedBuf, Disk, SlotError, SlotState};
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
    #[error(
        "the running boot says slot {slot} but its root (PARTUUID {root}) is not partition {label} \
         ({expected}): refusing to write either slot; boot a Caisson entry that was not edited"
    )]
    BootedSlotMismatch {
        slot: Slot,
        root: uuid::Uuid,
        label: &'static str,
        expected: uuid::Uuid,
    },
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
    /// The running slot's chunks were taken from the chunk index cache, not cut from the slot.
    pub local_index_cached: bool,
    /// Chunks the running slot was to give that did not match the new version's index when
    /// read (a stale chunk index cache): fetched instead, and counted in `fetched`.
    pub local_mismatched: u64,
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
    /// Where the chunk indexes of installed slots are kept ([`chunk_cache`]); `None`: none are
    /// read or written.
    pub chunk_cache: Option<&'a Path>,
    /// The running slot failed dm-verity verification in this boot (the init's record,
    /// [`crate::failed_slot`]): no chunk is copied from it, every chunk is fetched.
    pub running_slot_failed: bool,
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

/// The slot the command line names must be the partition its root (the device stage 1 found by
/// that PARTUUID and mounted) is: an entry whose `caisson.slot` lies would make the apply write
/// the running root.
fn check_booted_slot(t: &Target) -> Result<(), ApplyError> {
    let part = Part::root(t.booted.slot);
    let expected = t.disk.extent(part).guid;
    if expected == t.booted.root {
        return Ok(());
    }
    Err(ApplyError::BootedSlotMismatch {
        slot: t.booted.slot,
        root: t.booted.root,
        label: part.label(),
        expected,
    })
}

/// Writes `m` into the inactive slot and adds its boot entry. Returns the entry name.
pub fn apply(
    t: &Target,
    m: &Manifest,
    src: &mut (dyn Source + Send),
    progress: &mut dyn Progress,
    stop: StopAfter,
) -> Result<(EntryName, ApplyStats), ApplyError> {
    check_booted_slot(t)?;
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
    // 3. Read back, as the written part grows; the verdict after a sync.
    let (mut stats, index) = write_root(t, m, &cutter, root, &verity, slot, src, progress, stop)?;
    if let StopAfter::RootChunks(_) = stop {
        return Ok((EntryName::new_tried(&m.version, slot), stats));
    }
    // The slot read back right: its index is what the next apply, running from it, copies by.
    if let Some(dir) = t.chunk_cache {
        let running = t.booted.verity.map(|v| v.root_hash);
        let stored = chunk_cache::store(
            dir,
            &verity.root_hash,
            &m.chunking,
            &index,
            running.as_ref(),
        );
        if let Err(e) = stored {
            log::warn!(
                "keeping the chunk index of {} for the next update: {e}",
                m.version
            );
        }
    }
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

/// The page size writeback is started in.
const PAGE: u64 = 4096;

/// Where the root step's time went, for one log line (`root timings`): wall-clock spans and
/// each thread's CPU time, summed by name, in the order first seen.
#[derive(Default)]
struct Clock {
    spans: std::sync::Mutex<Vec<(&'static str, std::time::Duration)>>,
}

/// The CPU time the calling thread has used so far.
fn thread_cpu_now() -> std::time::Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    std::time::Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

impl Clock {
    fn add(&self, what: &'static str, d: std::time::Duration) {
        let mut spans = self
            .spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match spans.iter_mut().find(|(w, _)| *w == what) {
            Some((_, sum)) => *sum += d,
            None => spans.push((what, d)),
        }
    }

    /// Runs `f`, adding its wall-clock time to `what`.
    fn time<T>(&self, what: &'static str, f: impl FnOnce() -> T) -> T {
        let t0 = std::time::Instant::now();
        let out = f();
        self.add(what, t0.elapsed());
        out
    }

    /// Adds the CPU time the calling thread has used to `what` (once, when it is done).
    fn thread_cpu(&self, what: &'static str) {
        self.add(what, thread_cpu_now());
    }

    fn line(&self) -> String {
        let spans = self
            .spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        spans
            .iter()
            .map(|(w, d)| format!("{w}={}", d.as_millis()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

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

/// The chunk lengths `index` holds, as a table by length: a local chunk of any other length
/// cannot be one of its chunks, and is not worth hashing.
fn wanted_lengths(index: &ChunkIndex, cutter: &Cutter) -> Vec<bool> {
    let mut wanted = vec![false; cutter.max_size() + 1];
    for c in &index.chunks {
        if let Some(w) = wanted.get_mut(c.len as usize) {
            *w = true;
        }
    }
    wanted
}

/// Cuts what `reader` yields as the bundle was cut and adds each chunk of a length `index`
/// holds to `local` (the first place a chunk is seen wins). Stops at a read error: what was
/// found until then stays usable.
fn cut_local<R: std::io::Read>(cutter: &Cutter, index: &ChunkIndex, reader: R, local: &mut Local) {
    let wanted = wanted_lengths(index, cutter);
    let mut off = 0u64;
    let result = cutter.for_each_chunk::<_, std::io::Error>(reader, |c| {
        if wanted.get(c.len()) == Some(&true) {
            local.entry(sha256(c)).or_insert((off, c.len() as u32));
        }
        off += c.len() as u64;
        Ok(())
    });
    if let Err(e) = result {
        log::warn!("reading local chunks stopped at byte {off}: {e}; the rest is fetched");
    }
}

/// The chunks of the active slot's payload that `index` may want: what a delta update can copy
/// locally. Taken from the chunk index cache when it holds the running slot's index (true),
/// otherwise cut from the slot (false).
fn local_chunks(
    t: &Target,
    chunking: &Chunking,
    cutter: &Cutter,
    index: &ChunkIndex,
) -> (Local, bool) {
    let mut local = HashMap::new();
    if t.running_slot_failed {
        log::warn!(
            "slot {} failed verification in this boot: no chunk is copied from it, every chunk is fetched",
            t.booted.slot
        );
        return (local, false);
    }
    let Some(v) = t.booted.verity else {
        return (local, false);
    };
    let part = Part::root(t.booted.slot);
    let end = v.payload_size().min(t.disk.extent(part).size);
    let cached = t
        .chunk_cache
        .and_then(|dir| chunk_cache::load(dir, &v.root_hash, v.payload_size(), chunking));
    if let Some(cached) = cached {
        let wanted = wanted_lengths(index, cutter);
        for c in &cached.chunks {
            let inside = c.offset + u64::from(c.len) <= end;
            if inside && wanted.get(c.len as usize) == Some(&true) {
                local.entry(c.sha256).or_insert((c.offset, c.len));
            }
        }
        return (local, true);
    }
    cut_local(
        cutter,
        index,
        SlotReader::new(t.disk, part, end),
        &mut local,
    );
    (local, false)
}

/// Which chunks of `index` are already in place in `part` (an interrupted apply wrote them),
/// read in large pieces. A read error leaves the rest "not there". Zero chunks (a slot never
/// written, as on a freshly installed machine) are recognised by a comparison, which costs a
/// fraction of a hash.
fn present_chunks(disk: &Disk, part: Part, index: &ChunkIndex) -> Vec<bool> {
    let chunks = &index.chunks;
    let mut present = vec![false; chunks.len()];
    let zero_hashes = zero_hashes(index);
    let max = chunks.iter().map(|c| c.len as usize).max().unwrap_or(0);
    let zeros = vec![0u8; max];
    let mut read = AlignedBuf::default();
    for (first, last) in runs(chunks.len(), |_| true, |i| chunks[i].len, READ_PIECE) {
        let start = chunks[first].offset;
        let end = chunks[last].offset + u64::from(chunks[last].len);
        let Ok(got) = disk.read_uncached(part, start, (end - start) as usize, &mut read) else {
            break;
        };
        let buf = read.bytes(got);
        for i in first..=last {
            let c = &chunks[i];
            let rel = (c.offset - start) as usize;
            let piece = &buf[rel..rel + c.len as usize];
            present[i] = if piece == &zeros[..piece.len()] {
                zero_hashes.get(&c.len) == Some(&c.sha256)
            } else {
                sha256(piece) == c.sha256
            };
        }
    }
    present
}

/// The sha256 of `n` zero bytes for every chunk length `n` of `index`: one hasher fed zeros up
/// to the longest, its state finalized at each length on the way (where hashing each length
/// afresh cost half a pass over the payload).
fn zero_hashes(index: &ChunkIndex) -> HashMap<u32, Hash> {
    let mut lens: Vec<u32> = index.chunks.iter().map(|c| c.len).collect();
    lens.sort_unstable();
    lens.dedup();
    let zeros = [0u8; 4096];
    let mut h = Sha256::new();
    let mut fed = 0u32;
    let mut out = HashMap::with_capacity(lens.len());
    for len in lens {
        while fed < len {
            let n = (len - fed).min(zeros.len() as u32);
            h.update(&zeros[..n as usize]);
            fed += n;
        }
        out.insert(len, h.clone().finalize().into());
    }
    out
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
        cut_local(cutter, &index, &local[..], &mut have);
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

/// Fetches the root's chunk index and decides where each chunk comes from: kept in place,
/// copied from the running slot, or fetched.
fn plan_root(
    t: &Target,
    chunking: &Chunking,
    cutter: &Cutter,
    root: &Artifact,
    part: Part,
    src: &mut (dyn Source + Send),
    clock: &Clock,
) -> Result<(ChunkIndex, Vec<Origin>, bool), ApplyError> {
    let index = clock.time("index", || fetch_index(src, root, cutter))?;
    // The active slot is cut and hashed on one core while the inactive slot is checked against
    // the index on the other.
    let (local, present) = std::thread::scope(|s| {
        let local = s.spawn(|| clock.time("local", || local_chunks(t, chunking, cutter, &index)));
        let present = clock.time("present", || present_chunks(t.disk, part, &index));
        (local.join().unwrap_or_default(), present)
    });
    let (local, cached) = local;
    let origins = plan(&index, &present, &local);
    Ok((index, origins, cached))
}

/// A fetched run of chunks `first..=last` and its bytes, not yet checked against the index.
type Fetched = Result<(usize, usize, Vec<u8>), ApplyError>;

/// Chunks `first..=last` of the slot.
type Run = (usize, usize);

/// The fetching thread: fetches `planned`, then the runs the writer sends once its local copies
/// are done (chunks whose local copy did not match), and hands each run to the writer, which
/// checks every chunk against the index before it writes it: the next run arrives while the
/// last is hashed. Stops at the first error (handed on) or when the writer stops listening.
#[allow(clippy::too_many_arguments)]
fn fetcher(
    src: &mut (dyn Source + Send),
    root: &Artifact,
    index: &ChunkIndex,
    planned: Vec<Run>,
    more: std::sync::mpsc::Receiver<Vec<Run>>,
    out: std::sync::mpsc::SyncSender<Fetched>,
    reuse: std::sync::mpsc::Receiver<Vec<u8>>,
    clock: &Clock,
) {
    let chunks = &index.chunks;
    let mut fetch = |(first, last): Run| -> bool {
        let mut buf = reuse.try_recv().unwrap_or_default();
        let start = chunks[first].offset;
        let len = chunks[last].offset + u64::from(chunks[last].len) - start;
        let got = clock
            .time("fetch_net", || {
                src.read_range(root.offset + start, len, &mut buf)
            })
            .map_err(ApplyError::from);
        let failed = got.is_err();
        // A closed channel means the writer stopped: stop fetching too.
        let sent = clock.time("fetch_handoff", || {
            out.send(got.map(|()| (first, last, buf)))
        });
        sent.is_ok() && !failed
    };
    let fetch_all = || {
        for run in planned {
            if !fetch(run) {
                return;
            }
        }
        // Nothing more comes when the writer stopped before its copies were done.
        for run in more.recv().unwrap_or_default() {
            if !fetch(run) {
                return;
            }
        }
    };
    fetch_all();
    clock.thread_cpu("fetch_cpu");
}

/// How far the read-back may read: every byte of the slot below `upto` holds what the update
/// wants there (written by this apply, or found in place), and the writer has said whether it
/// finished. The writer only moves it forward; the read-back only waits on it.
struct Mark {
    state: std::sync::Mutex<MarkState>,
    moved: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct MarkState {
    upto: u64,
    end: MarkEnd,
    /// Why the read-back failed (the first reason).
    failure: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum MarkEnd {
    #[default]
    Writing,
    /// Everything is written: the read-back may read anything.
    Written,
    /// The writer or the read-back stopped: nobody waits any more.
    Stopped,
}

impl Mark {
    fn new() -> Mark {
        Mark {
            state: std::sync::Mutex::new(MarkState::default()),
            moved: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MarkState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn advance(&self, upto: u64) {
        let mut s = self.lock();
        if upto > s.upto {
            s.upto = upto;
            self.moved.notify_all();
        }
    }

    /// The writer is done (`Written`) or gave up (`Stopped`); the first word counts.
    fn end(&self, end: MarkEnd) {
        let mut s = self.lock();
        if s.end == MarkEnd::Writing {
            s.end = end;
        }
        self.moved.notify_all();
    }

    /// The read-back failed: the writer stops at its next piece.
    fn fail(&self, why: String) {
        let mut s = self.lock();
        s.failure.get_or_insert(why);
        if s.end == MarkEnd::Writing {
            s.end = MarkEnd::Stopped;
        }
        self.moved.notify_all();
    }

    fn stopped(&self) -> bool {
        self.lock().end == MarkEnd::Stopped
    }

    fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    /// Waits until the byte at `pos` may be read; returns how far reading may go.
    fn readable(&self, pos: u64) -> std::io::Result<u64> {
        let mut s = self.lock();
        loop {
            match s.end {
                MarkEnd::Written => return Ok(u64::MAX),
                MarkEnd::Stopped => {
                    return Err(std::io::Error::other(
                        "the apply stopped before the slot was written",
                    ))
                }
                MarkEnd::Writing if s.upto > pos => return Ok(s.upto),
                MarkEnd::Writing => {
                    s = self
                        .moved
                        .wait(s)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                }
            }
        }
    }
}

/// Stops the read-back when the writer leaves without saying the slot is written (an error, a
/// power-cut hook, a panic): no reader waits for bytes that never come.
struct StopOnDrop<'a>(&'a Mark);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.end(MarkEnd::Stopped);
    }
}

/// Which chunks of the slot are final (written, or kept), and up to where all of them are.
struct Final<'a> {
    chunks: &'a [crate::bundle::Chunk],
    done: Vec<bool>,
    /// The first chunk not final.
    next: usize,
}

impl<'a> Final<'a> {
    fn new(chunks: &'a [crate::bundle::Chunk], origins: &[Origin]) -> Final<'a> {
        let done = origins.iter().map(|o| *o == Origin::Here).collect();
        let mut f = Final {
            chunks,
            done,
            next: 0,
        };
        f.skip();
        f
    }

    fn skip(&mut self) {
        while self.done.get(self.next) == Some(&true) {
            self.next += 1;
        }
    }

    /// Chunks `first..=last` are final; returns the offset below which every chunk is.
    fn set(&mut self, first: usize, last: usize) -> u64 {
        for d in &mut self.done[first..=last] {
            *d = true;
        }
        self.skip();
        self.upto()
    }

    fn upto(&self) -> u64 {
        match self.chunks.get(self.next) {
            Some(c) => c.offset,
            None => self
                .chunks
                .last()
                .map_or(0, |c| c.offset + u64::from(c.len)),
        }
    }
}

/// How the writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    All,
    /// The power-cut hook stopped it.
    Cut,
    /// The read-back failed: its reason is on the mark.
    Stopped,
}

/// Writes the root payload into the inactive slot and reads it back as the written part grows:
/// local copies first (each chunk checked against the index before it is written; a chunk that
/// does not match is fetched instead), then the fetched runs in order (checked on the writer's
/// thread). Two threads read the slot back behind the writer, one for its sha256 and one for its
/// verity tree. The slot is synced before their verdict is taken.
#[allow(clippy::too_many_arguments)]
fn write_root(
    t: &Target,
    m: &Manifest,
    cutter: &Cutter,
    root: &Artifact,
    verity: &verity::VerityParams,
    slot: Slot,
    src: &mut (dyn Source + Send),
    progress: &mut dyn Progress,
    stop: StopAfter,
) -> Result<(ApplyStats, ChunkIndex), ApplyError> {
    let part = Part::root(slot);
    let clock = Clock::default();
    let started = std::time::Instant::now();
    let (index, origins, cached) = plan_root(t, &m.chunking, cutter, root, part, src, &clock)?;
    let mut stats = ApplyStats {
        local_index_cached: cached,
        ..ApplyStats::default()
    };
    for o in &origins {
        match o {
            Origin::Here => stats.kept += 1,
            Origin::Local(_) => stats.copied += 1,
            Origin::Fetch => {}
        }
    }
    let chunks = &index.chunks;
    let wanted = |i: usize| origins[i] == Origin::Fetch;
    let planned = runs(chunks.len(), wanted, |i| chunks[i].len, READ_PIECE);
    stats.fetch_runs = planned.len() as u64;
    let mark = Mark::new();
    let mut pipe = Pipe {
        t,
        part,
        root,
        index: &index,
        origins: &origins,
        stats: &mut stats,
        progress,
        done: 0,
        kicked: 0,
        mark: &mark,
        stop,
        clock: &clock,
        source_name: src.describe(),
    };
    let planned_at = started.elapsed();
    let (written, whole, tree) = std::thread::scope(|s| {
        let clock = &clock;
        let mark = &mark;
        let whole = s.spawn(move || {
            let got = clock.time("sha_wall", || whole_sha256(t.disk, part, root.size, mark));
            clock.thread_cpu("sha_cpu");
            got
        });
        let tree = s.spawn(move || {
            let got = clock.time("verity_wall", || verity_root(t.disk, part, verity, mark));
            clock.thread_cpu("verity_cpu");
            got
        });
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (give_back, reuse) = std::sync::mpsc::channel();
        let (more_tx, more_rx) = std::sync::mpsc::channel();
        let fetch = &mut *src;
        let index = &index;
        s.spawn(move || fetcher(fetch, root, index, planned, more_rx, tx, reuse, clock));
        let cpu_before = thread_cpu_now();
        let written = {
            let _stop = StopOnDrop(mark);
            clock.time("write_wall", || pipe.write(more_tx, rx, &give_back))
        };
        clock.add("writer_cpu", thread_cpu_now().saturating_sub(cpu_before));
        let written = match written {
            Ok(Written::All) => {
                pipe.progress.step("verifying the written slot");
                clock
                    .time("sync", || t.disk.sync())
                    .map(|()| Written::All)
                    .map_err(ApplyError::from)
            }
            other => other,
        };
        let joined = |r: std::thread::Result<Result<Hash, String>>| {
            r.unwrap_or_else(|_| Err("a read-back thread panicked".into()))
        };
        let verdict = clock.time("verdict_wait", || {
            (joined(whole.join()), joined(tree.join()))
        });
        (written, verdict.0, verdict.1)
    });
    clock.add("plan", planned_at);
    clock.add("root", started.elapsed());
    log::info!("root timings (ms): {}", clock.line());
    match written? {
        Written::Cut => return Ok((stats, index)),
        Written::Stopped | Written::All => {}
    }
    stats.downloaded_bytes = src.downloaded();
    stats.root_downloaded_bytes = stats.downloaded_bytes;
    let bad = |why: String| ApplyError::ReadBack { slot, why };
    if let Some(why) = mark.failure() {
        return Err(bad(why));
    }
    let got = hex::encode(whole.map_err(bad)?);
    let tree = tree.map_err(bad)?;
    if got != root.sha256 {
        return Err(bad(format!(
            "sha256 {got}, the manifest says {}",
            root.sha256
        )));
    }
    if tree != verity.root_hash {
        return Err(bad(format!(
            "verity root {}, the manifest says {}",
            hex::encode(tree),
            hex::encode(verity.root_hash)
        )));
    }
    Ok((stats, index))
}

/// The read-back's sha256 of the first `size` bytes of `part`, read behind the writer.
fn whole_sha256(disk: &Disk, part: Part, size: u64, mark: &Mark) -> Result<Hash, String> {
    use std::io::BufRead;
    let mut hash = Sha256::new();
    let mut reader = SlotReader::behind(disk, part, size, mark);
    loop {
        match reader.fill_buf() {
            Ok([]) => return Ok(hash.finalize().into()),
            Ok(piece) => {
                hash.update(piece);
                let n = piece.len();
                reader.consume(n);
            }
            Err(e) => {
                mark.fail(e.to_string());
                return Err(e.to_string());
            }
        }
    }
}

/// The read-back's verity root hash of `part`, read behind the writer.
fn verity_root(
    disk: &Disk,
    part: Part,
    v: &verity::VerityParams,
    mark: &Mark,
) -> Result<Hash, String> {
    let reader = SlotReader::behind(disk, part, v.hash_offset, mark);
    match verity::build(reader, v.salt, [0; 16]) {
        Ok(tree) => Ok(tree.params.root_hash),
        Err(e) => {
            mark.fail(e.to_string());
            Err(e.to_string())
        }
    }
}

/// The writer's side of [`write_root`].
struct Pipe<'a, 'p> {
    t: &'a Target<'a>,
    part: Part,
    root: &'a Artifact,
    index: &'a ChunkIndex,
    origins: &'a [Origin],
    stats: &'a mut ApplyStats,
    progress: &'p mut dyn Progress,
    /// Bytes reported to `progress`.
    done: u64,
    /// Where the writeback the writer started ends.
    kicked: u64,
    mark: &'a Mark,
    stop: StopAfter,
    clock: &'a Clock,
    /// Where fetched chunks come from, for messages.
    source_name: String,
}

impl Pipe<'_, '_> {
    /// Everything below `upto` is final: the read-back may read it, and the device is started
    /// on it in large pieces (whole pages, never a page a later write may touch) so that the sync
    /// before the verdict has little left to do. Starting it is a hint: that sync still waits
    /// for it and reports its errors.
    fn finished(&mut self, upto: u64) {
        self.mark.advance(upto);
        let end = upto & !(PAGE - 1);
        if end >= self.kicked + READ_PIECE {
            self.t
                .disk
                .start_writeback(self.part, self.kicked, end - self.kicked);
            self.kicked = end;
        }
    }

    /// Progress goes chunk by chunk (at most 32 KiB at a time with the default chunking).
    fn advance(&mut self, first: usize, last: usize) {
        for c in &self.index.chunks[first..=last] {
            self.done += u64::from(c.len);
            self.progress.root(self.done, self.root.size);
        }
    }

    fn write(
        &mut self,
        more: std::sync::mpsc::Sender<Vec<Run>>,
        fetched: std::sync::mpsc::Receiver<Fetched>,
        give_back: &std::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<Written, ApplyError> {
        let chunks = &self.index.chunks;
        let mut fin = Final::new(chunks, self.origins);
        self.mark.advance(fin.upto());
        // Kept chunks first, then copied, then fetched, so every percentage is passed in order.
        for i in 0..chunks.len() {
            if self.origins[i] == Origin::Here {
                self.advance(i, i);
            }
        }
        let mut mismatched = Vec::new();
        let mut read = AlignedBuf::default();
        let running = Part::root(self.t.booted.slot);
        for r in copies(self.index, self.origins) {
            if self.mark.stopped() {
                return Ok(Written::Stopped);
            }
            let got = self
                .t
                .disk
                .read_uncached(running, r.from, r.len as usize, &mut read)?;
            let buf = read.bytes(got);
            // Each copied chunk is checked against the index before it is written: whatever
            // said the running slot holds it, a chunk that does not match is fetched instead.
            let mut good = r.first;
            for (i, c) in (r.first..=r.last).zip(&chunks[r.first..=r.last]) {
                let rel = (c.offset - r.to) as usize;
                if sha256(&buf[rel..rel + c.len as usize]) != c.sha256 {
                    self.write_copied(&mut fin, buf, r.to, good, i)?;
                    mismatched.push(i);
                    good = i + 1;
                }
            }
            self.write_copied(&mut fin, buf, r.to, good, r.last + 1)?;
        }
        if !mismatched.is_empty() {
            log::warn!(
                "{} chunks the running slot was to give did not match the new version's index \
                 (a stale chunk index cache?): fetched instead",
                mismatched.len()
            );
            let n = mismatched.len() as u64;
            self.stats.copied -= n;
            self.stats.local_mismatched = n;
            let redo = runs(
                chunks.len(),
                |i| mismatched.binary_search(&i).is_ok(),
                |i| chunks[i].len,
                READ_PIECE,
            );
            self.stats.fetch_runs += redo.len() as u64;
            // The fetcher takes them after its planned runs (it has stopped if this fails).
            let _ = more.send(redo);
        }
        // The fetcher ends once its runs are done.
        drop(more);
        let clock = self.clock;
        while let Some(got) = clock.time("write_waits", || fetched.recv().ok()) {
            if self.mark.stopped() {
                return Ok(Written::Stopped);
            }
            let (first, mut last, bytes) = got?;
            // Every fetched chunk is checked against the index before it is written.
            clock.time("check", || {
                check_run(self.index, first, last, &bytes, "root", &self.source_name)
            })?;
            // The power-cut hook: only the first n fetched chunks land.
            let mut cut = false;
            if let StopAfter::RootChunks(n) = self.stop {
                let room = n.saturating_sub(self.stats.fetched) as usize;
                if last - first + 1 >= room {
                    last = first + room.max(1) - 1;
                    cut = true;
                }
            }
            let start = chunks[first].offset;
            let len = (chunks[last].offset + u64::from(chunks[last].len) - start) as usize;
            clock.time("write_io", || {
                self.t.disk.write_at(self.part, start, &bytes[..len])
            })?;
            self.stats.fetched += (last - first + 1) as u64;
            self.advance(first, last);
            if cut {
                self.t.disk.sync()?;
                return Ok(Written::Cut);
            }
            self.finished(fin.set(first, last));
            let _ = give_back.send(bytes);
        }
        self.mark.end(MarkEnd::Written);
        Ok(Written::All)
    }

    /// Writes chunks `first..end` of a local copy starting at `to` whose bytes are in `buf`.
    fn write_copied(
        &mut self,
        fin: &mut Final,
        buf: &[u8],
        to: u64,
        first: usize,
        end: usize,
    ) -> Result<(), ApplyError> {
        if first >= end {
            return Ok(());
        }
        let chunks = &self.index.chunks;
        let start = chunks[first].offset;
        let stop = chunks[end - 1].offset + u64::from(chunks[end - 1].len);
        let piece = &buf[(start - to) as usize..(stop - to) as usize];
        self.t.disk.write_at(self.part, start, piece)?;
        self.advance(first, end - 1);
        self.finished(fin.set(first, end - 1));
        Ok(())
    }
}

/// Reads the first `end` bytes of `part` in pieces of up to [`READ_PIECE`], from the device
/// itself where it allows ([`Disk::read_uncached`]); behind a writer, only what it has written.
/// Each piece is read once and handed out in whatever sizes the caller asks.
struct SlotReader<'a> {
    disk: &'a Disk,
    part: Part,
    /// Where the next piece starts.
    pos: u64,
    end: u64,
    mark: Option<&'a Mark>,
    buf: AlignedBuf,
    /// What is left of the last piece, in `buf`.
    have: std::ops::Range<usize>,
}

impl<'a> SlotReader<'a> {
    /// The first `end` bytes of partition `part`.
    fn new(disk: &'a Disk, part: Part, end: u64) -> SlotReader<'a> {
        SlotReader {
            disk,
            part,
            pos: 0,
            end,
            mark: None,
            buf: AlignedBuf::default(),
            have: 0..0,
        }
    }

    /// The same, each byte read only once `mark` has passed it.
    fn behind(disk: &'a Disk, part: Part, end: u64, mark: &'a Mark) -> SlotReader<'a> {
        SlotReader {
            mark: Some(mark),
            ..SlotReader::new(disk, part, end)
        }
    }
}

impl std::io::BufRead for SlotReader<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.have.is_empty() && self.pos < self.end {
            let mut n = READ_PIECE.min(self.end - self.pos);
            if let Some(mark) = self.mark {
                n = n.min(mark.readable(self.pos)? - self.pos);
            }
            self.have = self
                .disk
                .read_uncached(self.part, self.pos, n as usize, &mut self.buf)
                .map_err(std::io::Error::other)?;
            self.pos += n;
        }
        Ok(self.buf.bytes(self.have.clone()))
    }

    fn consume(&mut self, amt: usize) {
        self.have.start = (self.have.start + amt).min(self.have.end);
    }
}

impl std::io::Read for SlotReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        use std::io::BufRead;
        let got = self.fill_buf()?;
        let n = got.len().min(out.len());
        out[..n].copy_from_slice(&got[..n]);
        self.consume(n);
        Ok(n)
    }
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
    fn the_read_back_waits_for_the_writer_and_stops_with_it() {
        let mark = Mark::new();
        std::thread::scope(|s| {
            let reader = s.spawn(|| mark.readable(10));
            mark.advance(5);
            mark.advance(3);
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(!reader.is_finished());
            mark.advance(20);
            assert_eq!(reader.join().unwrap().unwrap(), 20);
            // A writer that leaves without finishing stops every reader, even a late one.
            let waiting = s.spawn(|| mark.readable(30));
            drop(StopOnDrop(&mark));
            assert!(waiting.join().unwrap().is_err());
            assert!(mark.readable(0).is_err());
            assert!(mark.stopped() && mark.failure().is_none());
        });
        // Once everything is written, nothing waits; a failed read-back is remembered.
        let mark = Mark::new();
        mark.end(MarkEnd::Written);
        drop(StopOnDrop(&mark));
        assert_eq!(mark.readable(1 << 40).unwrap(), u64::MAX);
        mark.fail("bad sector".into());
        mark.fail("second".into());
        assert_eq!(mark.failure().as_deref(), Some("bad sector"));
    }

    #[test]
    fn the_final_prefix_grows_over_kept_and_written_chunks() {
        let mut index = ChunkIndex::default();
        for n in [10usize, 20, 30, 40] {
            index.push(&vec![n as u8; n]);
        }
        let origins = [Origin::Fetch, Origin::Here, Origin::Local(0), Origin::Fetch];
        let mut f = Final::new(&index.chunks, &origins);
        assert_eq!(f.upto(), 0);
        assert_eq!(f.set(2, 2), 0);
        assert_eq!(f.set(0, 0), 60);
        assert_eq!(f.set(3, 3), 100);
    }

    #[test]
    fn zero_chunk_hashes_match_hashing_zeros() {
        let mut index = ChunkIndex::default();
        for n in [1usize, 4095, 4096, 4097, 9000, 4096] {
            index.push(&vec![(n % 7) as u8; n]);
        }
        let got = zero_hashes(&index);
        assert_eq!(got.len(), 5);
        for (len, h) in got {
            assert_eq!(h, sha256(&vec![0u8; len as usize]), "{len}");
        }
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
