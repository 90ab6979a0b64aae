//! The chunk index of an installed slot, kept on the state partition (`<state dir>/chunk-index/`)
//! under the slot's dm-verity root hash. An apply writes the index it fetched once the slot it
//! wrote has read back right; the next apply, running from that slot, takes the chunks it can
//! copy from this file instead of cutting and hashing the whole running slot.
//!
//! Nothing here is trusted: the file carries its own sha256 and is ignored (with a warning) when
//! it does not hold, does not match the running slot's root hash and size, or was cut with other
//! chunking parameters than the new version's; and every chunk copied on its word is checked
//! against the new version's index before it is written (see `apply`).

use crate::bundle::{ChunkIndex, Chunking};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The directory under the updater's state directory.
pub const DIR: &str = "chunk-index";

/// The first line of every file.
const MAGIC: &[u8] = b"caisson-chunk-index 1\n";

/// A cache file that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] crate::slots::SlotError),
    #[error("the default chunking: {0}")]
    Chunking(String),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io { op, path, source }
}

/// The JSON line after the magic line; the binary index follows it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    /// The slot's dm-verity root hash (hex).
    verity_root: String,
    /// The bytes the index covers (the root payload: data and verity tree).
    size: u64,
    chunking: Chunking,
    /// sha256 of the binary index that follows (hex).
    sha256: String,
}

/// The cache directory inside the state partition (see [`crate::record::STATE_DIR_IN_PARTITION`]).
pub fn dir_in_state_partition() -> PathBuf {
    Path::new(crate::record::STATE_DIR_IN_PARTITION).join(DIR)
}

/// The file for the slot whose verity root hash is `root`.
pub fn path(dir: &Path, root: &[u8; 32]) -> PathBuf {
    dir.join(format!("{}.idx", hex::encode(root)))
}

/// Writes the index of the slot whose verity root is `root` ([`crate::slots::write_synced`]),
/// then removes every other file in `dir` but `keep`'s: one file per installed slot at most.
pub fn store(
    dir: &Path,
    root: &[u8; 32],
    chunking: &Chunking,
    index: &ChunkIndex,
    keep: Option<&[u8; 32]>,
) -> Result<(), CacheError> {
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let body = index.encode();
    let header = Header {
        verity_root: hex::encode(root),
        size: index.size(),
        chunking: chunking.clone(),
        sha256: hex::encode(Sha256::digest(&body)),
    };
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&serde_json::to_vec(&header).unwrap_or_default());
    bytes.push(b'\n');
    bytes.extend_from_slice(&body);
    let p = path(dir, root);
    crate::slots::write_synced(&p, &bytes)?;
    let wanted = [Some(p), keep.map(|k| path(dir, k))];
    for e in std::fs::read_dir(dir)
        .map_err(io_err("listing", dir))?
        .flatten()
    {
        let other = e.path();
        if !wanted.contains(&Some(other.clone())) {
            if let Err(e) = std::fs::remove_file(&other) {
                log::warn!("removing the old chunk index {}: {e}", other.display());
            }
        }
    }
    Ok(())
}

/// Cuts the slot payload in the file `payload` (data and verity tree, as a bundle carries it)
/// with the default chunking and keeps its index in `dir`: an image builder does this on a
/// fresh image's state partition, so that the first update after an install copies by a cached
/// index like every later one instead of cutting and hashing the running slot first.
pub fn store_payload(dir: &Path, root: &[u8; 32], payload: &Path) -> Result<(), CacheError> {
    let chunking = Chunking::default();
    let cutter = chunking.cutter().map_err(CacheError::Chunking)?;
    let file = std::fs::File::open(payload).map_err(io_err("opening", payload))?;
    let reader = std::io::BufReader::with_capacity(4 << 20, file);
    let (_, _, index) = crate::bundle::copy_chunked(&cutter, reader, &mut std::io::sink())
        .map_err(io_err("reading", payload))?;
    store(dir, root, &chunking, &index, None)
}

/// The cached index of the slot whose verity root is `root` and payload `size` bytes, cut as
/// `chunking` cuts; `None` when there is none or it does not hold (a warning says why).
pub fn load(dir: &Path, root: &[u8; 32], size: u64, chunking: &Chunking) -> Option<ChunkIndex> {
    let p = path(dir, root);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!(
                "reading the chunk index cache {}: {e}; ignored",
                p.display()
            );
            return None;
        }
    };
    match parse(&bytes, root, size, chunking) {
        Ok(Some(index)) => Some(index),
        // Cut with other parameters: right, but of no use to this version.
        Ok(None) => None,
        Err(why) => {
            log::warn!(
                "the chunk index cache {} is unusable ({why}); ignored, the running slot is \
                 read instead",
                p.display()
            );
            None
        }
    }
}

fn parse(
    bytes: &[u8],
    root: &[u8; 32],
    size: u64,
    chunking: &Chunking,
) -> Result<Option<ChunkIndex>, String> {
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or("not a chunk index file (bad first line)")?;
    let nl = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let (line, body) = (&rest[..nl], &rest[nl + 1..]);
    let h: Header = serde_json::from_slice(line).map_err(|e| format!("header: {e}"))?;
    if hex::encode(Sha256::digest(body)) != h.sha256 {
        return Err("its sha256 does not match: the file is damaged".into());
    }
    if h.verity_root != hex::encode(root) || h.size != size {
        return Err(format!(
            "it describes a slot with root hash {} and {} bytes, the running slot has {} and {size}",
            h.verity_root,
            h.size,
            hex::encode(root)
        ));
    }
    if &h.chunking != chunking {
        return Ok(None);
    }
    let cutter = chunking.cutter()?;
    ChunkIndex::decode(body, size, cutter.max_size()).map(Some)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn index() -> ChunkIndex {
        let mut index = ChunkIndex::default();
        for n in [3000usize, 9000, 2048] {
            index.push(&vec![n as u8; n]);
        }
        index
    }

    #[test]
    fn round_trip_keeps_one_file_per_slot() {
        let dir = tempfile::tempdir().unwrap();
        let c = Chunking::default();
        let (a, b, old) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        store(dir.path(), &old, &c, &index(), None).unwrap();
        store(dir.path(), &a, &c, &index(), None).unwrap();
        assert!(!path(dir.path(), &old).exists());
        store(dir.path(), &b, &c, &index(), Some(&a)).unwrap();
        assert_eq!(load(dir.path(), &a, index().size(), &c), Some(index()));
        assert_eq!(load(dir.path(), &b, index().size(), &c), Some(index()));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        // Another size, other chunking, another slot: nothing.
        assert_eq!(load(dir.path(), &a, 1, &c), None);
        let other = Chunking {
            avg_size: 16 * 1024,
            ..c.clone()
        };
        assert_eq!(load(dir.path(), &a, index().size(), &other), None);
        assert_eq!(load(dir.path(), &[9; 32], index().size(), &c), None);
    }

    #[test]
    fn a_damaged_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let c = Chunking::default();
        let root = [1u8; 32];
        store(dir.path(), &root, &c, &index(), None).unwrap();
        let p = path(dir.path(), &root);
        let good = std::fs::read(&p).unwrap();
        for (at, len) in [(good.len() - 5, good.len()), (3, good.len()), (0, 0)] {
            let mut bad = good.clone();
            if len == good.len() {
                bad[at] ^= 1;
            } else {
                bad.truncate(len);
            }
            std::fs::write(&p, &bad).unwrap();
            assert_eq!(load(dir.path(), &root, index().size(), &c), None);
        }
        // A file renamed to another slot's name says which slot it describes.
        std::fs::write(&p, &good).unwrap();
        std::fs::rename(&p, path(dir.path(), &[2; 32])).unwrap();
        assert_eq!(load(dir.path(), &[2; 32], index().size(), &c), None);
    }

    #[test]
    fn a_payload_file_is_kept_as_the_bundle_would_cut_it() {
        let dir = tempfile::tempdir().unwrap();
        let payload = dir.path().join("root.img");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let bytes: Vec<u8> = (0..(1 << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(&payload, &bytes).unwrap();
        let cache = dir.path().join("cache");
        let root = [7u8; 32];
        store_payload(&cache, &root, &payload).unwrap();
        let c = Chunking::default();
        let (_, _, want) =
            crate::bundle::copy_chunked(&c.cutter().unwrap(), &bytes[..], &mut std::io::sink())
                .unwrap();
        assert!(want.chunks.len() > 10, "cut into content-defined chunks");
        assert_eq!(load(&cache, &root, bytes.len() as u64, &c), Some(want));
        let err = store_payload(&cache, &root, &dir.path().join("gone")).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
    }
}
