//! The machine's slots: the disk and its partitions (read from the GPT), the boot entries on the
//! ESP with their counters, and a state model in the manner of Bottlerocket's signpost:
//! [`SlotState::load`], change in memory, one [`SlotState::write`].

use caisson_layout::cmdline::BootParams;
use caisson_layout::partition::Part;
use caisson_layout::{paths, BootCounter, EntryName, Slot};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// A disk, partition or ESP problem.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the partition table of {path}: {why}")]
    Gpt { path: PathBuf, why: String },
    #[error("{path} has no {label} partition: is this a Caisson disk?")]
    NoPartition { path: PathBuf, label: &'static str },
    #[error("no disk holds the booted root partition {uuid} (looked at {seen})")]
    NoDisk { uuid: Uuid, seen: String },
    #[error("{what} of {len} bytes at {offset} does not fit in partition {label} ({size} bytes)")]
    OutOfBounds {
        what: &'static str,
        label: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("refusing to change the entry of the running slot {0}")]
    RunningSlot(Slot),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SlotError {
    let path = path.to_path_buf();
    move |source| SlotError::Io { op, path, source }
}

/// Where a partition is on its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub number: u32,
    pub start: u64,
    pub size: u64,
    pub guid: Uuid,
}

/// A Caisson disk (a block device or an image file) and its partitions.
pub struct Disk {
    pub path: PathBuf,
    file: File,
    /// The same disk opened for reads that bypass the page cache (`O_DIRECT`), where the disk
    /// allows it (a block device does; an image file on tmpfs does not).
    direct: Option<File>,
    parts: Vec<(Part, Extent)>,
}

/// The alignment of [`Disk::read_uncached`]'s reads: of memory, offset and length (4 KiB covers
/// disks with 512-byte and 4 KiB logical blocks).
const DIRECT_ALIGN: usize = 4096;

/// A buffer for [`Disk::read_uncached`]: memory aligned for direct I/O, reused across reads.
#[derive(Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    /// Where the aligned part of `raw` begins.
    start: usize,
}

impl AlignedBuf {
    /// At least `len` aligned bytes.
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.raw.len() < self.start + len {
            self.raw = vec![0u8; len + DIRECT_ALIGN];
            let addr = self.raw.as_ptr() as usize;
            self.start = addr.next_multiple_of(DIRECT_ALIGN) - addr;
        }
        &mut self.raw[self.start..self.start + len]
    }

    /// The bytes a read left, by the range it returned.
    pub fn bytes(&self, r: std::ops::Range<usize>) -> &[u8] {
        &self.raw[self.start..][r]
    }
}

impl Disk {
    /// Opens a disk for reading and writing and reads its GPT.
    pub fn open(path: &Path) -> Result<Disk, SlotError> {
        let gpt = gpt::GptConfig::new()
            .writable(false)
            .open(path)
            .map_err(|e| SlotError::Gpt {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?;
        let lb: u64 = (*gpt.logical_block_size()).into();
        let mut parts = Vec::new();
        for part in Part::ALL {
            let found = gpt
                .partitions()
                .iter()
                .find(|(_, p)| p.name == part.label())
                .ok_or(SlotError::NoPartition {
                    path: path.to_path_buf(),
                    label: part.label(),
                })?;
            let (n, p) = found;
            parts.push((
                part,
                Extent {
                    number: *n,
                    start: p.first_lba * lb,
                    size: (p.last_lba + 1 - p.first_lba) * lb,
                    guid: p.part_guid,
                },
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("opening", path))?;
        let direct = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
        };
        let direct = match direct {
            Ok(f) => Some(f),
            Err(e) => {
                log::debug!(
                    "{}: no direct reads ({e}): reading through the page cache",
                    path.display()
                );
                None
            }
        };
        Ok(Disk {
            path: path.to_path_buf(),
            file,
            direct,
            parts,
        })
    }

    /// Where `part` is.
    pub fn extent(&self, part: Part) -> Extent {
        // `open` found every partition of Part::ALL.
        self.parts
            .iter()
            .find(|(p, _)| *p == part)
            .map(|(_, e)| *e)
            .unwrap_or(Extent {
                number: 0,
                start: 0,
                size: 0,
                guid: Uuid::nil(),
            })
    }

    fn check(
        &self,
        what: &'static str,
        part: Part,
        offset: u64,
        len: u64,
    ) -> Result<u64, SlotError> {
        let e = self.extent(part);
        if offset.checked_add(len).is_none_or(|end| end > e.size) {
            return Err(SlotError::OutOfBounds {
                what,
                label: part.label(),
                offset,
                len,
                size: e.size,
            });
        }
        Ok(e.start + offset)
    }

    /// Reads exactly `buf.len()` bytes at `offset` inside `part`.
    pub fn read_at(&self, part: Part, offset: u64, buf: &mut [u8]) -> Result<(), SlotError> {
        let at = self.check("a read", part, offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, at)
            .map_err(io_err("reading", &self.path))
    }

    /// Reads `len` bytes at `offset` inside `part` from the device itself where the disk allows
    /// it (`O_DIRECT`: what was written through the page cache is written out first, then read
    /// from the device; the page cache is neither filled nor copied from), else through the
    /// page cache. The bytes are `buf.bytes(range)` for the range returned: a direct read takes
    /// whole aligned blocks around them.
    pub fn read_uncached(
        &self,
        part: Part,
        offset: u64,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> Result<std::ops::Range<usize>, SlotError> {
        let at = self.check("a read", part, offset, len as u64)?;
        let align = DIRECT_ALIGN as u64;
        let (first, end) = (
            at / align * align,
            (at + len as u64).next_multiple_of(align),
        );
        let e = self.extent(part);
        // Whole blocks inside the partition (its start and end are whole blocks on any disk
        // the builder makes; on another, the page cache).
        let inside = first >= e.start && end <= e.start + e.size;
        if let (Some(direct), true) = (&self.direct, inside) {
            let skip = (at - first) as usize;
            match direct.read_exact_at(buf.get((end - first) as usize), first) {
                Ok(()) => return Ok(skip..skip + len),
                // A disk that takes no direct reads of this kind: the page cache will do.
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                    log::debug!("{}: direct read refused ({err})", self.path.display());
                }
                Err(err) => return Err(io_err("reading", &self.path)(err)),
            }
        }
        self.file
            .read_exact_at(buf.get(len), at)
            .map_err(io_err("reading", &self.path))?;
        Ok(0..len)
    }

    /// Writes `buf` at `offset` inside `part`.
    pub fn write_at(&self, part: Part, offset: u64, buf: &[u8]) -> Result<(), SlotError> {
        let at = self.check("a write", part, offset, buf.len() as u64)?;
        self.file
            .write_all_at(buf, at)
            .map_err(io_err("writing", &self.path))
    }

    /// Starts writing `len` bytes at `offset` inside `part` to the device without waiting: a
    /// hint, so that the final [`Disk::sync`] has less left to do (it still waits for these
    /// and reports their errors).
    pub fn start_writeback(&self, part: Part, offset: u64, len: u64) {
        if let Ok(at) = self.check("a writeback", part, offset, len) {
            if let Err(e) = crate::sys::start_writeback(&self.file, at, len) {
                log::debug!("starting writeback on {}: {e}", self.path.display());
            }
        }
    }

    /// Flushes every write to the device.
    pub fn sync(&self) -> Result<(), SlotError> {
        self.file.sync_all().map_err(io_err("syncing", &self.path))
    }
}

/// The disk under `root` (`/` on a machine) whose GPT holds the partition `uuid`, as a device node.
pub fn find_disk(root: &Path, uuid: Uuid) -> Result<PathBuf, SlotError> {
    match caisson_layout::blockdev::disk_holding(root, uuid) {
        Some((_, node, _)) => Ok(node),
        None => Err(SlotError::NoDisk {
            uuid,
            seen: caisson_layout::blockdev::candidate_disks(root).join(", "),
        }),
    }
}

/// What a slot's boot entry says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// No entry: the boot loader never chooses this slot.
    Empty,
    /// A blessed entry (no counter).
    Good,
    /// An entry with tries left: being tried.
    Trying,
    /// Every try used up: the boot loader passes over it.
    Failed,
}

/// One pending change to the entries directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Remove(EntryName),
    Write { name: EntryName, text: String },
    Rename { from: EntryName, to: EntryName },
}

/// The boot entries of both slots, as on the ESP, plus changes not yet written.
#[derive(Debug, Clone)]
pub struct SlotState {
    esp: PathBuf,
    /// The version and slot this machine booted.
    pub booted_version: String,
    pub booted_slot: Slot,
    /// Caisson entries on the ESP (other files are left alone).
    pub entries: Vec<EntryName>,
    changes: Vec<Change>,
}

impl SlotState {
    /// Reads the entries of the ESP mounted at `esp`.
    pub fn load(
        esp: &Path,
        booted_version: &str,
        booted_slot: Slot,
    ) -> Result<SlotState, SlotError> {
        let dir = esp.join(paths::ESP_ENTRIES_DIR);
        let mut entries: Vec<EntryName> = std::fs::read_dir(&dir)
            .map_err(io_err("listing", &dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| EntryName::parse(&e.file_name().to_string_lossy()).ok())
            .collect();
        entries.sort_by_key(|e| e.to_string());
        Ok(SlotState {
            esp: esp.to_path_buf(),
            booted_version: booted_version.to_string(),
            booted_slot,
            entries,
            changes: Vec::new(),
        })
    }

    /// From the booted command line.
    pub fn load_booted(esp: &Path, booted: &BootParams) -> Result<SlotState, SlotError> {
        SlotState::load(esp, &booted.version, booted.slot)
    }

    pub fn esp(&self) -> &Path {
        &self.esp
    }

    /// The entry the boot loader would pick for `slot`: the newest version in it.
    pub fn entry(&self, slot: Slot) -> Option<&EntryName> {
        self.entries
            .iter()
            .filter(|e| e.slot == slot)
            .max_by(|a, b| crate::version::compare(&a.version, &b.version))
    }

    /// The entry this machine booted from.
    pub fn booted_entry(&self) -> Option<&EntryName> {
        self.entries
            .iter()
            .find(|e| e.slot == self.booted_slot && e.version == self.booted_version)
    }

    pub fn health(&self, slot: Slot) -> Health {
        match self.entry(slot) {
            None => Health::Empty,
            Some(e) => match e.counter {
                None => Health::Good,
                Some(c) if c.left == 0 => Health::Failed,
                Some(_) => Health::Trying,
            },
        }
    }

    /// True once the running entry is blessed (or never had a counter).
    pub fn booted_is_blessed(&self) -> bool {
        self.booted_entry().is_some_and(|e| e.counter.is_none())
    }

    /// What systemd-boot boots next: entries with tries left or blessed, newest version first;
    /// used-up entries last.
    pub fn next_boot(&self) -> Option<&EntryName> {
        let mut v: Vec<&EntryName> = self.entries.iter().collect();
        v.sort_by(|a, b| {
            a.is_exhausted()
                .cmp(&b.is_exhausted())
                .then_with(|| crate::version::compare(&b.version, &a.version))
                .then_with(|| b.to_string().cmp(&a.to_string()))
        });
        v.first().copied()
    }

    /// When the boot loader fell back from a newer version in the other slot: that version.
    pub fn rolled_back_from(&self) -> Option<String> {
        let other = self.entry(self.booted_slot.other())?;
        (other.is_exhausted() && crate::version::newer(&other.version, &self.booted_version))
            .then(|| other.version.clone())
    }

    /// Removes every entry of `slot` (the first step before writing it). Never the running slot.
    pub fn invalidate(&mut self, slot: Slot) -> Result<(), SlotError> {
        if slot == self.booted_slot {
            return Err(SlotError::RunningSlot(slot));
        }
        let gone: Vec<EntryName> = self
            .entries
            .iter()
            .filter(|e| e.slot == slot)
            .cloned()
            .collect();
        for e in gone {
            self.entries.retain(|x| *x != e);
            self.changes.push(Change::Remove(e));
        }
        Ok(())
    }

    /// Adds a new entry with `+3` tries for `version` in `slot`.
    pub fn add_tried(
        &mut self,
        version: &str,
        slot: Slot,
        text: String,
    ) -> Result<EntryName, SlotError> {
        if slot == self.booted_slot {
            return Err(SlotError::RunningSlot(slot));
        }
        let name = EntryName::new_tried(version, slot);
        self.entries.push(name.clone());
        self.changes.push(Change::Write {
            name: name.clone(),
            text,
        });
        Ok(name)
    }

    /// Marks the running entry as used up, so the boot loader falls back to the other slot.
    pub fn give_up_booted(&mut self) -> Option<EntryName> {
        let from = self.booted_entry()?.clone();
        let done = from.counter.map_or(1, |c| c.done + c.left.max(1));
        let to = EntryName {
            counter: Some(BootCounter { left: 0, done }),
            ..from.clone()
        };
        for e in self.entries.iter_mut() {
            if *e == from {
                *e = to.clone();
            }
        }
        self.changes.push(Change::Rename {
            from,
            to: to.clone(),
        });
        Some(to)
    }

    /// The changes `write` would make, in order.
    pub fn pending(&self) -> &[Change] {
        &self.changes
    }

    /// Applies the pending changes in order: each removal and rename is synced before the next
    /// step; a new entry is written under a temporary name, synced, then renamed into place.
    pub fn write(&mut self) -> Result<(), SlotError> {
        let dir = self.esp.join(paths::ESP_ENTRIES_DIR);
        for change in std::mem::take(&mut self.changes) {
            match change {
                Change::Remove(e) => {
                    let p = dir.join(e.to_string());
                    match std::fs::remove_file(&p) {
                        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                            return Err(io_err("removing", &p)(err))
                        }
                        _ => {}
                    }
                }
                Change::Write { name, text } => {
                    write_synced(&dir.join(name.to_string()), text.as_bytes())?;
                }
                Change::Rename { from, to } => {
                    let (f, t) = (dir.join(from.to_string()), dir.join(to.to_string()));
                    std::fs::rename(&f, &t).map_err(io_err("renaming", &f))?;
                }
            }
            sync_dir(&dir);
        }
        Ok(())
    }

    /// Removes kernel and initramfs directories on the ESP that no entry refers to.
    pub fn remove_unused_payloads(&self) -> Result<Vec<String>, SlotError> {
        let base = self.esp.join("caisson");
        let Ok(rd) = std::fs::read_dir(&base) else {
            return Ok(Vec::new());
        };
        let used: Vec<String> = self
            .entries
            .iter()
            .map(|e| paths::esp_payload_dir(&e.version, e.slot))
            .collect();
        let mut removed = Vec::new();
        for d in rd.filter_map(|e| e.ok()) {
            let rel = format!("caisson/{}", d.file_name().to_string_lossy());
            if !used.contains(&rel) {
                std::fs::remove_dir_all(d.path()).map_err(io_err("removing", &d.path()))?;
                removed.push(rel);
            }
        }
        sync_dir(&base);
        Ok(removed)
    }
}

/// Writes a file under a temporary name (`<name>.tmp`, which the boot loader ignores), syncs it,
/// and renames it into place.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SlotError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(bytes).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err("renaming into", path))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

/// Syncs a directory so renames and removals in it are on the disk. Best effort: some file
/// systems refuse fsync on directories, and the final sync of the ESP covers them.
pub fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn esp_with(names: &[&str]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join(paths::ESP_ENTRIES_DIR);
        std::fs::create_dir_all(&d).unwrap();
        for n in names {
            std::fs::write(d.join(n), "title x\n").unwrap();
        }
        t
    }

    fn listing(esp: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(esp.join(paths::ESP_ENTRIES_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn update_then_bless_then_rollback() {
        let esp = esp_with(&[
            "caisson-1.0.0-a.conf",
            "caisson-0.9-b+0-3.conf",
            "other.conf",
        ]);
        let mut s = SlotState::load(esp.path(), "1.0.0", Slot::A).unwrap();
        assert!(s.booted_is_blessed());
        assert_eq!(s.health(Slot::B), Health::Failed);
        // 0.9 is older than what runs: not a rollback.
        assert_eq!(s.rolled_back_from(), None);
        assert!(matches!(
            s.invalidate(Slot::A),
            Err(SlotError::RunningSlot(Slot::A))
        ));
        s.invalidate(Slot::B).unwrap();
        s.add_tried("1.1.0", Slot::B, "title new\n".into()).unwrap();
        assert_eq!(s.pending().len(), 2);
        assert!(matches!(s.pending()[0], Change::Remove(_)));
        s.write().unwrap();
        assert_eq!(
            listing(esp.path()),
            [
                "caisson-1.0.0-a.conf",
                "caisson-1.1.0-b+3-0.conf",
                "other.conf"
            ]
        );
        let s = SlotState::load(esp.path(), "1.0.0", Slot::A).unwrap();
        assert_eq!(
            s.next_boot().unwrap().to_string(),
            "caisson-1.1.0-b+3-0.conf"
        );
        assert_eq!(s.health(Slot::B), Health::Trying);

        // The boot loader used every try: it falls back, and we can tell.
        let d = esp.path().join(paths::ESP_ENTRIES_DIR);
        std::fs::rename(
            d.join("caisson-1.1.0-b+3-0.conf"),
            d.join("caisson-1.1.0-b+0-3.conf"),
        )
        .unwrap();
        let s = SlotState::load(esp.path(), "1.0.0", Slot::A).unwrap();
        assert_eq!(s.next_boot().unwrap().to_string(), "caisson-1.0.0-a.conf");
        assert_eq!(s.rolled_back_from().as_deref(), Some("1.1.0"));
    }

    #[test]
    fn giving_up_the_running_entry_boots_the_other() {
        let esp = esp_with(&["caisson-1.0.0-a.conf", "caisson-1.1.0-b.conf"]);
        let mut s = SlotState::load(esp.path(), "1.1.0", Slot::B).unwrap();
        assert_eq!(s.next_boot().unwrap().to_string(), "caisson-1.1.0-b.conf");
        s.give_up_booted().unwrap();
        s.write().unwrap();
        let s = SlotState::load(esp.path(), "1.0.0", Slot::A).unwrap();
        assert_eq!(s.next_boot().unwrap().to_string(), "caisson-1.0.0-a.conf");
        assert_eq!(s.rolled_back_from().as_deref(), Some("1.1.0"));
    }

    #[test]
    fn unused_payloads_are_removed() {
        let esp = esp_with(&["caisson-1.0.0-a.conf"]);
        for d in ["caisson/1.0.0-a", "caisson/0.9-b"] {
            std::fs::create_dir_all(esp.path().join(d)).unwrap();
        }
        let s = SlotState::load(esp.path(), "1.0.0", Slot::A).unwrap();
        assert_eq!(s.remove_unused_payloads().unwrap(), ["caisson/0.9-b"]);
        assert!(esp.path().join("caisson/1.0.0-a").exists());
    }
}
