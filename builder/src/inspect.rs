//! `caisson inspect`: what is in a disk image, read back from the image itself.

use caisson_layout::cmdline::BootParams;
use caisson_layout::partition::Part;
use caisson_layout::{paths, EntryName};
use serde::Serialize;
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

/// An image that cannot be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Disk(#[from] caisson_disk::DiskError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the image has no {0} partition: is it a Caisson disk?")]
    NoPartition(&'static str),
    #[error("reading the root filesystem with fsck.erofs: {0}")]
    Erofs(String),
    #[error("reading the ESP with {tool}: {stderr}")]
    Mtools { tool: &'static str, stderr: String },
}

/// What an image holds.
#[derive(Debug, Serialize)]
pub struct Report {
    pub partitions: Vec<PartitionReport>,
    pub entries: Vec<EntryReport>,
    pub slots: Vec<SlotReport>,
}

#[derive(Debug, Serialize)]
pub struct PartitionReport {
    pub number: u32,
    pub label: String,
    pub type_guid: String,
    pub guid: String,
    pub start: u64,
    pub size: u64,
}

#[derive(Debug, Serialize)]
pub struct EntryReport {
    pub file: String,
    pub version: String,
    pub slot: String,
    pub tries_left: Option<u32>,
    pub verity_root_hash: Option<String>,
    pub options: String,
}

#[derive(Debug, Serialize)]
pub struct SlotReport {
    pub slot: String,
    /// `erofs` when the slot holds a root filesystem, `empty` otherwise.
    pub content: String,
    /// Whether a verity superblock sits where the slot's entry says.
    pub verity_superblock: Option<bool>,
    /// os-release IMAGE_VERSION of the root in the slot.
    pub version: Option<String>,
    /// The packages of the root's SBOM, `name version`.
    pub packages: Vec<String>,
}

const EROFS_MAGIC: u32 = 0xE0F5_E1E2;

/// Reads partitions, boot entries and slots from a raw disk image.
pub fn inspect(image: &Path) -> Result<Report, InspectError> {
    let layout = caisson_disk::read_layout(image)?;
    let partitions: Vec<PartitionReport> = layout
        .partitions
        .iter()
        .map(|p| PartitionReport {
            number: p.number,
            label: p.label.clone(),
            type_guid: p.type_guid.to_string(),
            guid: p.guid.to_string(),
            start: p.start,
            size: p.size,
        })
        .collect();
    let find = |part: Part| {
        partitions
            .iter()
            .find(|p| p.label == part.label())
            .ok_or(InspectError::NoPartition(part.label()))
    };
    let esp = find(Part::Esp)?;
    let entries = read_entries(image, esp.start)?;
    let mut slots = Vec::new();
    for slot in caisson_layout::Slot::ALL {
        let part = find(Part::root(slot))?;
        let magic = read_u32(image, part.start + 1024)?;
        let entry = entries.iter().find(|e| e.slot == slot.as_str());
        let verity = entry
            .and_then(|e| BootParams::parse(&e.options).ok())
            .and_then(|p| p.verity);
        let verity_superblock = match verity {
            Some(v) => Some(read_bytes(image, part.start + v.hash_offset, 8)? == b"verity\0\0"),
            None => None,
        };
        let is_erofs = magic == EROFS_MAGIC;
        let (version, packages) = match (is_erofs, verity) {
            (true, Some(v)) => read_root(image, part.start, v.hash_offset)?,
            _ => (None, Vec::new()),
        };
        slots.push(SlotReport {
            slot: slot.to_string(),
            content: if is_erofs { "erofs" } else { "empty" }.into(),
            verity_superblock,
            version,
            packages,
        });
    }
    Ok(Report {
        partitions,
        entries,
        slots,
    })
}

/// Reads os-release and the SBOM out of a slot's erofs (copied out, then `fsck.erofs --extract`).
fn read_root(
    image: &Path,
    start: u64,
    fs_size: u64,
) -> Result<(Option<String>, Vec<String>), InspectError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| InspectError::Io { what, path, source }
    };
    let tmp = tempfile::tempdir().map_err(io("creating a temporary directory for", image))?;
    let fs = tmp.path().join("root.erofs");
    let mut src = std::fs::File::open(image).map_err(io("opening", image))?;
    src.seek(SeekFrom::Start(start))
        .map_err(io("seeking in", image))?;
    let mut dst = std::fs::File::create(&fs).map_err(io("creating", &fs))?;
    std::io::copy(&mut src.take(fs_size), &mut dst).map_err(io("copying the root of", image))?;
    let dir = tmp.path().join("root");
    let out = Command::new("fsck.erofs")
        .arg(format!("--extract={}", dir.display()))
        .arg(&fs)
        .output()
        .map_err(io(
            "running fsck.erofs (apt-get install erofs-utils) on",
            &fs,
        ))?;
    if !out.status.success() {
        return Err(InspectError::Erofs(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let os =
        std::fs::read_to_string(dir.join(caisson_layout::osrelease::PATH.trim_start_matches('/')))
            .ok()
            .and_then(|t| caisson_layout::osrelease::OsRelease::parse(&t).ok())
            .map(|o| o.version);
    let sbom_path = dir.join(paths::SBOM.trim_start_matches('/'));
    let packages = std::fs::read(&sbom_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["packages"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|p| {
            format!(
                "{} {}",
                p["name"].as_str().unwrap_or("?"),
                p["version"].as_str().unwrap_or("?")
            )
        })
        .collect();
    Ok((os, packages))
}

fn read_bytes(image: &Path, offset: u64, len: usize) -> Result<Vec<u8>, InspectError> {
    let io = |what| {
        move |source| InspectError::Io {
            what,
            path: image.to_path_buf(),
            source,
        }
    };
    let mut f = std::fs::File::open(image).map_err(io("opening"))?;
    f.seek(SeekFrom::Start(offset)).map_err(io("seeking in"))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).map_err(io("reading"))?;
    Ok(buf)
}

fn read_u32(image: &Path, offset: u64) -> Result<u32, InspectError> {
    let b = read_bytes(image, offset, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn mtools(tool: &'static str, args: &[String]) -> Result<String, InspectError> {
    let out = Command::new(tool)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .map_err(|e| InspectError::Mtools {
            tool,
            stderr: format!("{e} (apt-get install mtools)"),
        })?;
    if !out.status.success() {
        return Err(InspectError::Mtools {
            tool,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read_entries(image: &Path, esp_start: u64) -> Result<Vec<EntryReport>, InspectError> {
    let img = format!("{}@@{esp_start}", image.display());
    let listing = mtools(
        "mdir",
        &[
            "-b".into(),
            "-i".into(),
            img.clone(),
            format!("::/{}", paths::ESP_ENTRIES_DIR),
        ],
    )?;
    let mut entries = Vec::new();
    for line in listing.lines() {
        let file = line.rsplit('/').next().unwrap_or(line).trim().to_string();
        let Ok(name) = EntryName::parse(&file) else {
            continue;
        };
        let text = mtools(
            "mtype",
            &[
                "-i".into(),
                img.clone(),
                format!("::/{}/{file}", paths::ESP_ENTRIES_DIR),
            ],
        )?;
        let options = text
            .lines()
            .find_map(|l| l.strip_prefix("options "))
            .unwrap_or("")
            .trim()
            .to_string();
        let verity_root_hash = BootParams::parse(&options)
            .ok()
            .and_then(|p| p.verity)
            .map(|v| hex::encode(v.root_hash));
        entries.push(EntryReport {
            file,
            version: name.version.clone(),
            slot: name.slot.to_string(),
            tries_left: name.counter.map(|c| c.left),
            verity_root_hash,
            options,
        });
    }
    entries.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(entries)
}

impl Report {
    /// The human-readable form.
    pub fn text(&self) -> String {
        let mut s = String::from("partitions:\n");
        for p in &self.partitions {
            let _ = writeln!(
                s,
                "  {} {:<7} start {:>6} MiB  size {:>6} MiB  partuuid {}",
                p.number,
                p.label,
                p.start >> 20,
                p.size >> 20,
                p.guid
            );
        }
        s.push_str("boot entries:\n");
        for e in &self.entries {
            let tries = e
                .tries_left
                .map_or("blessed".to_string(), |t| format!("{t} tries left"));
            let _ = writeln!(
                s,
                "  {}  version {} slot {} ({tries})\n    verity root {}",
                e.file,
                e.version,
                e.slot,
                e.verity_root_hash.as_deref().unwrap_or("none (unverified)")
            );
        }
        s.push_str("slots:\n");
        for sl in &self.slots {
            let sb = match sl.verity_superblock {
                Some(true) => ", verity superblock present",
                Some(false) => ", verity superblock MISSING",
                None => "",
            };
            let version = sl
                .version
                .as_deref()
                .map_or(String::new(), |v| format!(" version {v}"));
            let _ = writeln!(s, "  {}: {}{version}{sb}", sl.slot, sl.content);
            for p in &sl.packages {
                let _ = writeln!(s, "    {p}");
            }
        }
        s
    }
}
