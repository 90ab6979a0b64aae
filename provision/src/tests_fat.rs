//! Hostile FAT volumes, crafted from images mkfs.fat and mtools make: every refusal is an error
//! naming the device and what is wrong, never a panic (these run with overflow checks on, so
//! an underflow or overflow in the reader would fail them) and never a read out of range.

use crate::source::{self, SourceError};
use crate::tests::{fat_image, le16, mtools, put, set_fat12};
use std::path::{Path, PathBuf};

const CONFIG: &str = "version = 1\n";

fn le32(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

fn set16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Where things are on an image.
struct Layout {
    /// The first FAT, in bytes.
    fat: usize,
    /// The root directory, in bytes (FAT32: its first cluster).
    root: usize,
    /// The last cluster number.
    last: usize,
}

fn layout(b: &[u8]) -> Layout {
    let (bps, spc, reserved, fats) = (
        le16(b, 11),
        usize::from(b[13]),
        le16(b, 14),
        usize::from(b[16]),
    );
    let fat32 = le16(b, 22) == 0;
    let spf = if fat32 { le32(b, 36) } else { le16(b, 22) };
    let total = if le16(b, 19) == 0 {
        le32(b, 32)
    } else {
        le16(b, 19)
    };
    let root_region = (reserved + fats * spf) * bps;
    let data = root_region + le16(b, 17) * 32;
    let root = if fat32 {
        data + (le32(b, 44) - 2) * spc * bps
    } else {
        root_region
    };
    Layout {
        fat: reserved * bps,
        root,
        last: (total - data / bps) / spc + 1,
    }
}

/// The offset of the short entry (not a long name's part, not the label) in the directory at
/// `dir` whose name starts with `prefix`.
fn entry(b: &[u8], dir: usize, prefix: &[u8]) -> usize {
    (0..512)
        .map(|i| dir + i * 32)
        .find(|&at| b[at + 11] & 0x08 == 0 && b[at..].starts_with(prefix))
        .expect("the directory entry")
}

/// A FAT12 config drive holding a config of `len` bytes (more than one cluster when large).
fn drive(dir: &Path, len: usize) -> (PathBuf, Vec<u8>) {
    let img = fat_image(dir, "CAISSON-CFG");
    let mut text = CONFIG.to_string();
    text.push_str(&"#".repeat(len.saturating_sub(text.len())));
    put(&img, "::/caisson.toml", &text);
    let b = std::fs::read(&img).unwrap();
    (img, b)
}

/// The error reading `caisson.toml` from `b` written to `img`, checked to name the device.
fn refused(img: &Path, b: &[u8]) -> String {
    std::fs::write(img, b).unwrap();
    let e = source::read_from_volume(img, "caisson.toml").unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, SourceError::FatRefused { .. }), "{text}");
    assert!(text.contains(&img.display().to_string()), "{text}");
    text
}

#[test]
fn volumes_mkfs_makes_are_read_as_before() {
    let tmp = tempfile::tempdir().unwrap();
    for (fat, kib) in [("12", 1440), ("16", 16384), ("32", 34000)] {
        let img = tmp.path().join(format!("fat{fat}.img"));
        let out = std::process::Command::new("mkfs.fat")
            .args(["-C", "-s", "1", "-F", fat, "-n", "CAISSON-CFG"])
            .arg(&img)
            .arg(kib.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        mtools("mmd", &img, &["::/caisson", "::/caisson/deeper"]);
        put(&img, "::/caisson/config.toml", &"# big\n".repeat(400));
        put(&img, "::/caisson.toml", CONFIG);
        let got = source::read_from_volume(&img, "caisson.toml").unwrap();
        assert_eq!(got.as_deref(), Some(CONFIG.as_bytes()), "FAT{fat}");
        let got = source::read_from_volume(&img, "caisson/config.toml").unwrap();
        assert_eq!(got.map(|b| b.len()), Some(2400), "FAT{fat}");
    }
}

#[test]
fn a_fat_chain_into_cluster_0_or_1_or_past_the_end_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, b) = drive(tmp.path(), 8192);
    let l = layout(&b);
    let first = le16(&b, entry(&b, l.root, b"CAISSO") + 26);
    for (next, says) in [
        (1, "leads to cluster 1, which is reserved".to_string()),
        (0, "leads to cluster 0, which is reserved".to_string()),
        (l.last + 1, format!("past the last cluster, {}", l.last)),
        (0xFF0, format!("past the last cluster, {}", l.last)),
    ] {
        let mut bad = b.clone();
        set_fat12(&mut bad, first, next as u16);
        let e = refused(&img, &bad);
        assert!(e.contains(&format!("FAT entry of cluster {first}")), "{e}");
        assert!(e.contains(&says), "{e}");
    }
}

#[test]
fn a_directory_entry_at_cluster_1_or_past_the_end_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, b) = drive(tmp.path(), 100);
    let l = layout(&b);
    let at = entry(&b, l.root, b"CAISSO") + 26;
    for (cluster, says) in [
        (1, "starts at cluster 1, which is reserved".to_string()),
        (l.last + 1, format!("past the last cluster, {}", l.last)),
        (0xFFFF, format!("past the last cluster, {}", l.last)),
    ] {
        let mut bad = b.clone();
        set16(&mut bad, at, cluster as u16);
        let e = refused(&img, &bad);
        assert!(e.contains("directory entry"), "{e}");
        assert!(e.contains(&says), "{e}");
    }
}

#[test]
fn a_subdirectory_at_cluster_0_or_1_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let img = fat_image(tmp.path(), "CAISSON-CFG");
    mtools("mmd", &img, &["::/CAISSON"]);
    put(&img, "::/CAISSON/config.toml", CONFIG);
    let b = std::fs::read(&img).unwrap();
    let at = entry(&b, layout(&b).root, b"CAISSON    ") + 26;
    for cluster in [0u16, 1] {
        let mut bad = b.clone();
        set16(&mut bad, at, cluster);
        let e = refused(&img, &bad);
        assert!(
            e.contains(&format!(
                "\"CAISSON\" starts at cluster {cluster}, which is reserved"
            )),
            "{e}"
        );
    }
}

/// A FAT32 image (one sector a cluster) with `/caisson.toml`.
fn fat32(dir: &Path) -> (PathBuf, Vec<u8>) {
    let img = dir.join("fat32.img");
    let out = std::process::Command::new("mkfs.fat")
        .args(["-C", "-F", "32", "-s", "1", "-n", "CAISSON-CFG"])
        .arg(&img)
        .arg("34000")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    put(&img, "::/caisson.toml", &"#".repeat(2000));
    let b = std::fs::read(&img).unwrap();
    (img, b)
}

#[test]
fn fat32_clusters_whose_arithmetic_would_overflow_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, b) = fat32(tmp.path());
    let l = layout(&b);
    let at = entry(&b, l.root, b"CAISSO");
    let first = le16(&b, at + 26);

    // The high half of the first cluster: 0xFFFF0003 times sectors per cluster overflows u32.
    let mut bad = b.clone();
    set16(&mut bad, at + 20, 0xFFFF);
    let e = refused(&img, &bad);
    assert!(
        e.contains(&format!("starts at cluster {}", 0xFFFF_0000usize + first)),
        "{e}"
    );
    assert!(e.contains("past the last cluster"), "{e}");

    // A chain step to the highest data cluster value FAT32 has.
    let mut bad = b.clone();
    let fat_at = l.fat + 4 * first;
    bad[fat_at..fat_at + 4].copy_from_slice(&0x0FFF_FFF6u32.to_le_bytes());
    let e = refused(&img, &bad);
    assert!(
        e.contains(&format!("leads to cluster {}", 0x0FFF_FFF6u32)),
        "{e}"
    );

    // The root directory at cluster 1.
    let mut bad = b.clone();
    bad[44..48].copy_from_slice(&1u32.to_le_bytes());
    let e = refused(&img, &bad);
    assert!(
        e.contains("root directory starts at cluster 1, which is reserved"),
        "{e}"
    );

    // An active FAT (mirroring off) that is not there.
    let mut bad = b.clone();
    set16(&mut bad, 40, 0x80 | 5);
    assert!(refused(&img, &bad).contains("active FAT as 5"));
}

#[test]
fn hostile_boot_sector_numbers_are_refused_without_overflow() {
    let tmp = tempfile::tempdir().unwrap();
    let (img12, b12) = drive(tmp.path(), 100);
    let (img32, b32) = fat32(tmp.path());
    type Edit = fn(&mut Vec<u8>);
    let cases: [(&Path, &[u8], Edit, &str); 12] = [
        (&img12, &b12, |b| set16(b, 11, 0), "bytes per sector as 0"),
        (
            &img12,
            &b12,
            |b| set16(b, 11, 520),
            "bytes per sector as 520",
        ),
        (
            &img12,
            &b12,
            |b| set16(b, 11, 8192),
            "bytes per sector as 8192",
        ),
        (&img12, &b12, |b| b[13] = 0, "sectors per cluster as 0"),
        (&img12, &b12, |b| b[13] = 3, "sectors per cluster as 3"),
        (&img12, &b12, |b| set16(b, 14, 0), "reserved sectors as 0"),
        (&img12, &b12, |b| b[16] = 0, "FAT count or size as 0"),
        // Many large FATs: their sum passes the end of the volume.
        (
            &img12,
            &b12,
            |b| {
                b[16] = 255;
                set16(b, 22, 0xFFFF)
            },
            "FAT is 33553920 bytes",
        ),
        (
            &img12,
            &b12,
            |b| {
                b[16] = 255;
                set16(b, 22, 100)
            },
            "no room for data",
        ),
        // FAT32: 255 FATs of 2^32-1 sectors overflow any u32 sum of them.
        (
            &img32,
            &b32,
            |b| {
                b[16] = 255;
                b[36..40].copy_from_slice(&[0xFF; 4])
            },
            "FAT is",
        ),
        // A volume larger than the device it is on.
        (&img12, &b12, |b| set16(b, 19, 0xFFFF), "holds 1048576"),
        (
            &img32,
            &b32,
            |b| b[32..36].copy_from_slice(&u32::MAX.to_le_bytes()),
            "device holds",
        ),
    ];
    for (img, good, edit, says) in cases {
        let mut bad = good.to_vec();
        edit(&mut bad);
        let e = refused(img, &bad);
        assert!(e.contains(says), "{says}: {e}");
    }
}

#[test]
fn a_volume_as_a_block_device_reads_its_size_by_seeking() {
    // A block device's metadata gives no length: check() seeks, and leaves the volume at 0.
    let tmp = tempfile::tempdir().unwrap();
    let (img, _) = drive(tmp.path(), 100);
    let mut f = std::fs::File::open(&img).unwrap();
    crate::fat::check(&mut f).unwrap();
    use std::io::Seek;
    assert_eq!(f.stream_position().unwrap(), 0);
}
