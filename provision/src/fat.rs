//! A FAT volume checked before the `fatfs` crate reads it.
//!
//! `fatfs` 0.3 trusts the volume: it turns a cluster number into an offset as
//! `first_data_sector + (cluster - 2) * sectors_per_cluster` in `u32`, so a directory entry or a
//! FAT entry naming cluster 0 or 1 underflows (a panic in a debug build, a read of the FATs or
//! the root directory in place of data in a release one), a cluster past the last one reads
//! past the volume, and a boot sector whose FAT count or FAT size is huge overflows its sums.
//! A config drive is anyone's to hand a machine, so before `fatfs` sees one this module checks,
//! with arithmetic that cannot overflow: the boot sector's numbers; that the volume fits on the
//! device; and, walking every directory from the root, that every directory entry and every
//! step of every cluster chain names a cluster from 2 to the last one, and that no chain loops
//! or runs into another. What it reads is bounded ([`MAX_FAT_BYTES`], [`MAX_DIR_BYTES`]).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;

/// The largest FAT read: two million FAT32 clusters, an 8 GiB volume of 4 KiB clusters (a
/// config drive's FAT is a few KiB, an ESP's a few hundred).
pub const MAX_FAT_BYTES: u64 = 8 << 20;
/// The most directory bytes read (a quarter of a million entries).
pub const MAX_DIR_BYTES: u64 = 8 << 20;

/// Why a cluster number is not one of the volume's data clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// 0 or 1: those FAT entries are reserved and name no data.
    Reserved,
    /// Past the last cluster the volume has.
    PastEnd { last: u32 },
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Range::Reserved => write!(f, "which is reserved (clusters 0 and 1 hold no data)"),
            Range::PastEnd { last } => write!(f, "past the last cluster, {last}"),
        }
    }
}

/// What is wrong with a FAT volume.
#[derive(Debug, thiserror::Error)]
pub enum FatError {
    /// Reading the device failed.
    #[error("reading its {what}: {source}")]
    Read {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A boot sector field is out of range.
    #[error("its boot sector gives {field} as {value}: {why}")]
    BootSector {
        field: &'static str,
        value: u64,
        why: &'static str,
    },
    /// The boot sector describes a volume larger than the device.
    #[error("its boot sector describes {need} bytes, but the device holds {have}")]
    Truncated { need: u64, have: u64 },
    /// The FAT is larger than this reader takes.
    #[error("its FAT is {bytes} bytes, more than the {MAX_FAT_BYTES} read here")]
    FatTooLarge { bytes: u64 },
    /// The FAT32 root directory's first cluster is out of range.
    #[error("its root directory starts at cluster {cluster}, {why}")]
    RootCluster { cluster: u32, why: Range },
    /// A directory entry names a cluster out of range.
    #[error("the directory entry {name:?} starts at cluster {cluster}, {why}")]
    Entry {
        name: String,
        cluster: u32,
        why: Range,
    },
    /// A FAT entry sends a chain to a cluster out of range.
    #[error("the FAT entry of cluster {cluster} leads to cluster {next}, {why}")]
    Chain { cluster: u32, next: u32, why: Range },
    /// A chain meets a cluster already seen: it loops, or runs into another chain.
    #[error("cluster {cluster} is met twice: a cluster chain loops or runs into another")]
    Loop { cluster: u32 },
    /// The directories are larger than this reader takes.
    #[error("its directories hold more than {MAX_DIR_BYTES} bytes")]
    DirsTooLarge,
}

fn bad(field: &'static str, value: u64, why: &'static str) -> FatError {
    FatError::BootSector { field, value, why }
}

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

/// The FAT type, decided by the cluster count as `fatfs` and every FAT driver decide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fat12,
    Fat16,
    Fat32,
}

impl Kind {
    fn of(clusters: u64) -> Kind {
        match clusters {
            0..4085 => Kind::Fat12,
            4085..65525 => Kind::Fat16,
            _ => Kind::Fat32,
        }
    }

    fn bits(self) -> u64 {
        match self {
            Kind::Fat12 => 12,
            Kind::Fat16 => 16,
            Kind::Fat32 => 32,
        }
    }

    /// The lowest FAT value that ends a chain (bad cluster or end of chain), as `fatfs` reads it.
    fn end(self) -> u32 {
        match self {
            Kind::Fat12 => 0xFF7,
            Kind::Fat16 => 0xFFF7,
            Kind::Fat32 => 0x0FFF_FFF7,
        }
    }
}

/// Where the root directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    /// FAT12/16: a fixed region after the FATs.
    Region { offset: u64, bytes: u64 },
    /// FAT32: a cluster chain.
    Cluster(u32),
}

/// The boot sector's numbers, checked: every offset below fits the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    kind: Kind,
    cluster_bytes: u64,
    /// The FAT `fatfs` reads (the first, or FAT32's active one), in bytes from the start.
    fat_offset: u64,
    fat_bytes: u64,
    root: Root,
    data_offset: u64,
    /// The last cluster number (the first is 2).
    last: u32,
}

fn cluster_range(cluster: u32, last: u32) -> Result<(), Range> {
    match cluster {
        0 | 1 => Err(Range::Reserved),
        c if c > last => Err(Range::PastEnd { last }),
        _ => Ok(()),
    }
}

/// Bytes per sector and sectors per cluster.
fn sizes(b: &[u8]) -> Result<(u64, u64), FatError> {
    let bps = le16(b, 11);
    if !bps.is_power_of_two() || !(512..=4096).contains(&bps) {
        return Err(bad(
            "bytes per sector",
            bps,
            "not a power of two from 512 to 4096",
        ));
    }
    let spc = u64::from(b[13]);
    if !spc.is_power_of_two() {
        return Err(bad(
            "sectors per cluster",
            spc,
            "not a power of two from 1 to 128",
        ));
    }
    Ok((bps, spc))
}

/// The total sector count: exactly one of the 16- and 32-bit fields is set.
fn total_sectors(b: &[u8]) -> Result<u64, FatError> {
    match (le16(b, 19), le32(b, 32)) {
        (0, 0) => Err(bad("total sectors", 0, "the volume is empty")),
        (0, t) | (t, 0) => Ok(t),
        (t, _) => Err(bad(
            "total sectors (16-bit)",
            t,
            "set together with the 32-bit count",
        )),
    }
}

/// FAT32's active FAT when mirroring is off (bit 7 of the extended flags), else the first.
fn active_fat(b: &[u8], fat32: bool, fats: u64) -> Result<u64, FatError> {
    let flags = if fat32 { le16(b, 40) } else { 0 };
    let active = if flags & 0x80 != 0 { flags & 0x0F } else { 0 };
    if active >= fats {
        return Err(bad("active FAT", active, "there are not that many FATs"));
    }
    Ok(active)
}

impl Geometry {
    /// Checks the boot sector `b` (at least 512 bytes) of a device of `device_len` bytes.
    fn parse(b: &[u8], device_len: u64) -> Result<Geometry, FatError> {
        let (bps, spc) = sizes(b)?;
        let reserved = le16(b, 14);
        let fats = u64::from(b[16]);
        let root_entries = le16(b, 17);
        let fat32 = le16(b, 22) == 0;
        let spf = if fat32 { le32(b, 36) } else { le16(b, 22) };
        if reserved == 0 {
            return Err(bad("reserved sectors", 0, "the boot sector is one of them"));
        }
        if fats == 0 || spf == 0 {
            return Err(bad("FAT count or size", 0, "a volume needs a FAT"));
        }
        if fat32 == (root_entries != 0) {
            return Err(bad(
                "root directory entries",
                root_entries,
                "FAT32 has none, FAT12/16 need some",
            ));
        }
        let total = total_sectors(b)?;
        if total * bps > device_len {
            return Err(FatError::Truncated {
                need: total * bps,
                have: device_len,
            });
        }
        let fat_bytes = spf * bps;
        if fat_bytes > MAX_FAT_BYTES {
            return Err(FatError::FatTooLarge { bytes: fat_bytes });
        }
        let root_offset = reserved + fats * spf;
        let first_data = root_offset + (root_entries * 32).div_ceil(bps);
        if first_data >= total {
            return Err(bad(
                "total sectors",
                total,
                "no room for data after the FATs and the root directory",
            ));
        }
        let clusters = (total - first_data) / spc;
        let kind = Kind::of(clusters);
        if (kind == Kind::Fat32) != fat32 {
            return Err(bad(
                "cluster count",
                clusters,
                "does not match the FAT type the boot sector claims",
            ));
        }
        if clusters > 0x0FFF_FFF4 || fat_bytes * 8 / kind.bits() < clusters + 2 {
            return Err(bad("cluster count", clusters, "more than the FAT holds"));
        }
        let last =
            u32::try_from(clusters + 1).map_err(|_| bad("cluster count", clusters, "too many"))?;
        let root = if fat32 {
            let c = u32::try_from(le32(b, 44)).unwrap_or(u32::MAX);
            cluster_range(c, last).map_err(|why| FatError::RootCluster { cluster: c, why })?;
            Root::Cluster(c)
        } else {
            Root::Region {
                offset: root_offset * bps,
                bytes: root_entries * 32,
            }
        };
        let active = active_fat(b, fat32, fats)?;
        Ok(Geometry {
            kind,
            cluster_bytes: spc * bps,
            fat_offset: (reserved + active * spf) * bps,
            fat_bytes,
            root,
            data_offset: first_data * bps,
            last,
        })
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.data_offset + u64::from(cluster - 2) * self.cluster_bytes
    }
}

/// The FAT, read whole (it is at most [`MAX_FAT_BYTES`]).
struct Table {
    kind: Kind,
    bytes: Vec<u8>,
}

impl Table {
    /// The raw value of cluster `c`'s entry (`c` is at most the last cluster, which the FAT
    /// was checked to hold).
    fn get(&self, c: u32) -> u32 {
        let c = c as usize;
        let b = &self.bytes;
        match self.kind {
            Kind::Fat12 => {
                let at = c + c / 2;
                let v = u16::from_le_bytes([b[at], b[at + 1]]);
                u32::from(if c.is_multiple_of(2) {
                    v & 0x0FFF
                } else {
                    v >> 4
                })
            }
            Kind::Fat16 => u32::from(u16::from_le_bytes([b[2 * c], b[2 * c + 1]])),
            Kind::Fat32 => {
                let at = 4 * c;
                u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) & 0x0FFF_FFFF
            }
        }
    }
}

fn read_at(dev: &File, offset: u64, len: u64, what: &'static str) -> Result<Vec<u8>, FatError> {
    let read = |source| FatError::Read { what, source };
    let mut buf = vec![0u8; usize::try_from(len).map_err(|e| read(std::io::Error::other(e)))?];
    dev.read_exact_at(&mut buf, offset).map_err(read)?;
    Ok(buf)
}

/// The walk over every directory: the FAT, the clusters seen and the bytes read so far.
struct Walk<'a> {
    dev: &'a File,
    g: Geometry,
    fat: Table,
    seen: Vec<bool>,
    dir_bytes: u64,
}

/// The 8.3 name of a directory entry, for messages.
fn short_name(e: &[u8]) -> String {
    let part = |b: &[u8]| String::from_utf8_lossy(b).trim_end().to_string();
    let (name, ext) = (part(&e[..8]), part(&e[8..11]));
    if ext.is_empty() {
        name
    } else {
        format!("{name}.{ext}")
    }
}

impl Walk<'_> {
    /// The clusters of the chain starting at `first` (checked in range by the caller), each
    /// step checked; a cluster met before is a loop or a cross-link.
    fn chain(&mut self, first: u32) -> Result<Vec<u32>, FatError> {
        let mut out = Vec::new();
        let mut c = first;
        loop {
            let seen = &mut self.seen[c as usize];
            if std::mem::replace(seen, true) {
                return Err(FatError::Loop { cluster: c });
            }
            out.push(c);
            let next = self.fat.get(c);
            if next >= self.g.kind.end() {
                return Ok(out);
            }
            cluster_range(next, self.g.last).map_err(|why| FatError::Chain {
                cluster: c,
                next,
                why,
            })?;
            c = next;
        }
    }

    /// The bytes of the directory whose chain starts at `first`, within [`MAX_DIR_BYTES`].
    fn dir_clusters(&mut self, first: u32) -> Result<Vec<u8>, FatError> {
        let mut out = Vec::new();
        for c in self.chain(first)? {
            self.count(self.g.cluster_bytes)?;
            let at = self.g.cluster_offset(c);
            out.extend(read_at(self.dev, at, self.g.cluster_bytes, "directories")?);
        }
        Ok(out)
    }

    fn count(&mut self, bytes: u64) -> Result<(), FatError> {
        self.dir_bytes += bytes;
        if self.dir_bytes > MAX_DIR_BYTES {
            return Err(FatError::DirsTooLarge);
        }
        Ok(())
    }

    /// Checks the entries of one directory; the subdirectories it holds go on `dirs`.
    fn entries(&mut self, dir: &[u8], dirs: &mut Vec<u32>) -> Result<(), FatError> {
        for e in dir.chunks_exact(32) {
            let attr = e[11];
            match e[0] {
                0 => return Ok(()),
                0xE5 => continue,
                _ if attr == 0x0F || attr & 0x08 != 0 => continue,
                _ => {}
            }
            let hi = if self.g.kind == Kind::Fat32 {
                le16(e, 20)
            } else {
                0
            };
            let cluster = u32::try_from(hi << 16 | le16(e, 26)).unwrap_or(u32::MAX);
            let is_dir = attr & 0x10 != 0;
            let dots = matches!(&e[..11], b".          " | b"..         ");
            if cluster == 0 && (!is_dir || dots) {
                continue; // an empty file; `..` of a directory in the root
            }
            cluster_range(cluster, self.g.last).map_err(|why| FatError::Entry {
                name: short_name(e),
                cluster,
                why,
            })?;
            match (is_dir, dots) {
                (_, true) => {}
                (true, false) => dirs.push(cluster),
                (false, false) => {
                    self.chain(cluster)?;
                }
            }
        }
        Ok(())
    }

    /// Every directory from the root down, each cluster read once.
    fn run(&mut self) -> Result<(), FatError> {
        let mut dirs = Vec::new();
        let root = match self.g.root {
            Root::Region { offset, bytes } => {
                self.count(bytes)?;
                read_at(self.dev, offset, bytes, "root directory")?
            }
            Root::Cluster(c) => self.dir_clusters(c)?,
        };
        self.entries(&root, &mut dirs)?;
        while let Some(first) = dirs.pop() {
            let dir = self.dir_clusters(first)?;
            self.entries(&dir, &mut dirs)?;
        }
        Ok(())
    }
}

/// Checks the FAT volume on `dev` (see the module's documentation) and leaves it positioned at
/// its start, as `fatfs` takes it.
pub fn check(dev: &mut File) -> Result<(), FatError> {
    let seek = |source| FatError::Read {
        what: "size",
        source,
    };
    let len = dev.seek(SeekFrom::End(0)).map_err(seek)?;
    dev.seek(SeekFrom::Start(0)).map_err(seek)?;
    let boot = read_at(dev, 0, 512, "boot sector")?;
    let g = Geometry::parse(&boot, len)?;
    let fat = Table {
        kind: g.kind,
        bytes: read_at(dev, g.fat_offset, g.fat_bytes, "FAT")?,
    };
    Walk {
        dev,
        g,
        fat,
        seen: vec![false; g.last as usize + 1],
        dir_bytes: 0,
    }
    .run()
}
