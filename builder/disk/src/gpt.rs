//! The GPT disk: protective MBR, primary and backup partition tables (written with the `gpt`
//! crate), the partitions of `caisson_layout::partition::Part::ALL` in order, 1 MiB aligned, and
//! their contents copied in without writing all-zero blocks, so the raw file stays sparse.
//!
//! Every GUID comes from `caisson_layout::partition`: the disk GUID from the image name and
//! version, the partition GUIDs from the image name. The `gpt` crate would make random ones
//! (`Uuid::new_v4`) in `add_partition` and when no disk GUID is given, so this module builds the
//! partition entries itself and hands them over with `update_partitions`.

use crate::tempout::TempOut;
use crate::DiskError;
use ::gpt::disk::LogicalBlockSize;
use ::gpt::mbr::ProtectiveMBR;
use ::gpt::partition::Partition;
use ::gpt::partition_types::{OperatingSystem, Type};
use ::gpt::GptConfig;
use caisson_layout::partition::{self as layout, Part, ALIGN};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use uuid::Uuid;

const SECTOR: u64 = 512;
const LB_SIZE: LogicalBlockSize = LogicalBlockSize::Lb512;
/// Blocks of this size that are all zero are not written.
const SPARSE_BLOCK: usize = 4096;
const COPY_CHUNK: usize = 1024 * 1024;

/// One partition of the disk to write: its size (rounded up to 1 MiB) and the image to copy in
/// (`None` leaves it empty, as slot B of a fresh image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionContent {
    pub part: Part,
    pub size: u64,
    pub content: Option<PathBuf>,
}

/// A partition as written or read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The 1-based partition number.
    pub number: u32,
    /// The Caisson partition with this label, if it is one.
    pub part: Option<Part>,
    pub label: String,
    pub type_guid: Uuid,
    /// The unique partition GUID (PARTUUID).
    pub guid: Uuid,
    pub attributes: u64,
    /// Offset of the first byte.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The partitions of a disk image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayout {
    pub disk_guid: Uuid,
    /// The size of the whole disk image in bytes.
    pub disk_size: u64,
    /// In partition-number order.
    pub partitions: Vec<PartitionInfo>,
}

impl DiskLayout {
    /// The Caisson partition `part`, if the disk has it.
    pub fn get(&self, part: Part) -> Option<&PartitionInfo> {
        self.partitions.iter().find(|p| p.part == Some(part))
    }
}

/// Writes a GPT disk image of `parts` (each partition of the layout exactly once, any order) to
/// `out`, under a temporary name that is removed on error.
pub fn write_disk(
    parts: &[PartitionContent],
    out: &Path,
    image_name: &str,
    version: &str,
) -> Result<DiskLayout, DiskError> {
    let ordered = in_layout_order(parts)?;
    let layout = plan(&ordered, image_name, version)?;
    let tmp = TempOut::new(out)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(tmp.path())
        .map_err(DiskError::io("creating", out))?;
    file.set_len(layout.disk_size)
        .map_err(DiskError::io("sizing", out))?;
    let file = write_tables(file, &layout, out)?;
    for (info, pc) in layout.partitions.iter().zip(&ordered) {
        if let Some(src) = &pc.content {
            copy_sparse(src, &file, info.start, out)?;
        }
    }
    file.sync_all().map_err(DiskError::io("writing", out))?;
    drop(file);
    tmp.commit()?;
    Ok(layout)
}

/// `parts` sorted into `Part::ALL` order, refusing missing and repeated partitions.
fn in_layout_order(parts: &[PartitionContent]) -> Result<Vec<&PartitionContent>, DiskError> {
    Part::ALL
        .iter()
        .map(|&want| {
            let mut found = parts.iter().filter(|p| p.part == want);
            match (found.next(), found.next()) {
                (Some(p), None) => Ok(p),
                (None, _) => Err(DiskError::Partitions(format!(
                    "{} is missing",
                    want.label()
                ))),
                (Some(_), Some(_)) => Err(DiskError::Partitions(format!(
                    "{} is given twice",
                    want.label()
                ))),
            }
        })
        .collect()
}

/// Places the partitions from 1 MiB on, each size rounded up to 1 MiB, and leaves 1 MiB at the
/// end for the backup table. Checks that every content fits.
fn plan(
    ordered: &[&PartitionContent],
    image_name: &str,
    version: &str,
) -> Result<DiskLayout, DiskError> {
    let mut start = ALIGN;
    let mut partitions = Vec::new();
    for pc in ordered {
        let part = pc.part;
        if pc.size == 0 {
            return Err(DiskError::BadSize {
                what: format!("partition {}", part.label()),
                size: 0,
                reason: "a partition cannot be empty",
            });
        }
        let size = pc.size.div_ceil(ALIGN) * ALIGN;
        if let Some(src) = &pc.content {
            let content = src.metadata().map_err(DiskError::io("reading", src))?.len();
            if content > size {
                return Err(DiskError::ContentTooLarge {
                    label: part.label(),
                    path: src.clone(),
                    content,
                    size,
                });
            }
        }
        partitions.push(PartitionInfo {
            number: part.number(),
            part: Some(part),
            label: part.label().to_string(),
            type_guid: part.type_guid(),
            guid: layout::partition_guid(image_name, part),
            attributes: part.attributes(),
            start,
            size,
        });
        start += size;
    }
    Ok(DiskLayout {
        disk_guid: layout::disk_guid(image_name, version),
        disk_size: start + ALIGN,
        partitions,
    })
}

/// Writes the protective MBR and both GPTs.
fn write_tables(file: File, layout: &DiskLayout, out: &Path) -> Result<File, DiskError> {
    let gpt_err = |source| DiskError::Gpt {
        path: out.to_path_buf(),
        source,
    };
    let mut disk = GptConfig::new()
        .writable(true)
        .logical_block_size(LB_SIZE)
        .create_from_device(file, Some(layout.disk_guid))
        .map_err(gpt_err)?;
    let entries: BTreeMap<u32, Partition> = layout
        .partitions
        .iter()
        .map(|p| (p.number, to_entry(p)))
        .collect();
    disk.update_partitions(entries).map_err(gpt_err)?;
    let mut file = disk.write().map_err(gpt_err)?;
    let sectors = layout.disk_size / SECTOR - 1;
    ProtectiveMBR::with_lb_size(u32::try_from(sectors).unwrap_or(u32::MAX))
        .overwrite_lba0(&mut file)
        .map_err(|e| DiskError::Gpt {
            path: out.to_path_buf(),
            source: ::gpt::GptError::Io(std::io::Error::other(e.to_string())),
        })?;
    Ok(file)
}

fn to_entry(p: &PartitionInfo) -> Partition {
    Partition {
        part_type_guid: Type {
            guid: p.type_guid,
            os: OperatingSystem::None,
        },
        part_guid: p.guid,
        first_lba: p.start / SECTOR,
        last_lba: (p.start + p.size) / SECTOR - 1,
        flags: p.attributes,
        name: p.label.clone(),
    }
}

/// Copies `src` to `offset` in `disk`, skipping all-zero 4 KiB blocks.
fn copy_sparse(src: &Path, disk: &File, offset: u64, out: &Path) -> Result<(), DiskError> {
    let mut input = File::open(src).map_err(DiskError::io("reading", src))?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut pos = offset;
    loop {
        let n = read_full(&mut input, &mut buf).map_err(DiskError::io("reading", src))?;
        if n == 0 {
            return Ok(());
        }
        write_nonzero(disk, &buf[..n], pos).map_err(DiskError::io("writing", out))?;
        pos += n as u64;
    }
}

/// Writes the runs of `data` that are not all-zero blocks at `pos`.
fn write_nonzero(disk: &File, data: &[u8], pos: u64) -> std::io::Result<()> {
    let mut run_start: Option<usize> = None;
    for (i, block) in data.chunks(SPARSE_BLOCK).enumerate() {
        let at = i * SPARSE_BLOCK;
        let zero = block.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(at),
            (true, Some(s)) => {
                disk.write_all_at(&data[s..at], pos + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run_start {
        disk.write_all_at(&data[s..], pos + s as u64)?;
    }
    Ok(())
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads the GPT of a disk image back.
pub fn read_layout(disk: &Path) -> Result<DiskLayout, DiskError> {
    let gpt = GptConfig::new()
        .writable(false)
        .logical_block_size(LB_SIZE)
        .open(disk)
        .map_err(|source| DiskError::Gpt {
            path: disk.to_path_buf(),
            source,
        })?;
    let disk_size = OpenOptions::new()
        .read(true)
        .open(disk)
        .and_then(|f| f.metadata())
        .map_err(DiskError::io("reading", disk))?
        .len();
    let partitions = gpt
        .partitions()
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(&number, p)| PartitionInfo {
            number,
            part: Part::ALL.into_iter().find(|x| x.label() == p.name),
            label: p.name.clone(),
            type_guid: p.part_type_guid.guid,
            guid: p.part_guid,
            attributes: p.flags,
            start: p.first_lba * SECTOR,
            size: (p.last_lba + 1 - p.first_lba) * SECTOR,
        })
        .collect();
    Ok(DiskLayout {
        disk_guid: *gpt.guid(),
        disk_size,
        partitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use caisson_layout::partition::TYPE_ROOT_X86_64;
    use std::os::unix::fs::MetadataExt;

    fn parts(content: Option<PathBuf>) -> Vec<PartitionContent> {
        let mib = 1024 * 1024;
        vec![
            PartitionContent {
                part: Part::State,
                size: 4 * mib,
                content: None,
            },
            PartitionContent {
                part: Part::Esp,
                size: 3 * mib + 1,
                content: None,
            },
            PartitionContent {
                part: Part::RootA,
                size: 8 * mib,
                content,
            },
            PartitionContent {
                part: Part::RootB,
                size: 8 * mib,
                content: None,
            },
        ]
    }

    #[test]
    fn layout_is_aligned_ordered_and_derived() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("d.raw");
        let l = write_disk(&parts(None), &out, "host", "1.0.0").unwrap();
        let mib = 1024 * 1024;
        let got: Vec<(u32, u64, u64)> = l
            .partitions
            .iter()
            .map(|p| (p.number, p.start / mib, p.size / mib))
            .collect();
        assert_eq!(got, [(1, 1, 4), (2, 5, 8), (3, 13, 8), (4, 21, 4)]);
        assert_eq!(l.disk_size, 26 * mib);
        assert_eq!(l.disk_guid, layout::disk_guid("host", "1.0.0"));
        let a = l.get(Part::RootA).unwrap();
        assert_eq!(a.guid, layout::partition_guid("host", Part::RootA));
        assert_eq!(a.type_guid, TYPE_ROOT_X86_64);
        assert_eq!(a.attributes, layout::ATTR_READ_ONLY);
        assert_eq!(read_layout(&out).unwrap(), l);
    }

    #[test]
    fn same_inputs_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
        write_disk(&parts(None), &a, "host", "1.0.0").unwrap();
        write_disk(&parts(None), &b, "host", "1.0.0").unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        write_disk(&parts(None), &b, "host", "1.0.1").unwrap();
        assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }

    #[test]
    fn content_lands_at_the_partition_start_and_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("root.img");
        let mut data = vec![0u8; 6 * 1024 * 1024];
        data[0] = 0xAA;
        data[4096 * 3 + 7] = 0xBB;
        data[6 * 1024 * 1024 - 1] = 0xCC;
        std::fs::write(&src, &data).unwrap();
        let out = dir.path().join("d.raw");
        let l = write_disk(&parts(Some(src)), &out, "host", "1.0.0").unwrap();
        let disk = std::fs::read(&out).unwrap();
        let start = l.get(Part::RootA).unwrap().start as usize;
        assert_eq!(&disk[start..start + data.len()], &data[..]);
        // 3 data blocks plus the tables, not 26 MiB.
        let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(allocated < 256 * 1024, "{allocated} bytes allocated");
    }

    #[test]
    fn refuses_bad_partition_sets_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("d.raw");
        let mut p = parts(None);
        p.pop();
        let e = write_disk(&p, &out, "h", "1").unwrap_err().to_string();
        assert!(e.contains("root-b is missing"), "{e}");
        let mut p = parts(None);
        p.push(p[0].clone());
        let e = write_disk(&p, &out, "h", "1").unwrap_err().to_string();
        assert!(e.contains("state is given twice"), "{e}");
        let big = dir.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(9 * 1024 * 1024)
            .unwrap();
        let e = write_disk(&parts(Some(big)), &out, "h", "1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("partition root-a") && e.contains("larger than"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "only `big` is left"
        );
    }
}
