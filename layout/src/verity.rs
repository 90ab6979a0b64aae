//! The dm-verity hash tree, in veritysetup's on-disk format (format version 1, sha256, 4 KiB data
//! and hash blocks, salt before the data), computed here so the builder needs no privileges, and
//! read back by the updater and the init.
//!
//! A slot holds `[filesystem, padded to 4 KiB][superblock block][hash tree, top level first]`.
//! `hash_offset` is where the superblock starts; the kernel's `hash_start` block is the one after it.

use sha2::{Digest, Sha256};
use std::io::{self, Read};

/// Data and hash block size.
pub const BLOCK_SIZE: u64 = 4096;
const DIGEST: usize = 32;
const HASHES_PER_BLOCK: u64 = BLOCK_SIZE / DIGEST as u64;

/// What the kernel needs to verify a slot, and what the boot entry pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerityParams {
    pub root_hash: [u8; 32],
    pub salt: [u8; 32],
    /// Number of 4 KiB data blocks (the filesystem).
    pub data_blocks: u64,
    /// Byte offset of the verity superblock in the slot (equal to the data size).
    pub hash_offset: u64,
}

/// A failure to compute or check a hash tree.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("reading the data to hash failed: {0}")]
    Read(#[source] io::Error),
    #[error("the data is {0} bytes, which is not a whole number of 4096-byte blocks")]
    Unaligned(u64),
    #[error("the data is empty: a verity tree needs at least one block")]
    Empty,
}

impl VerityParams {
    /// The first block of the hash tree, as the kernel's table wants it.
    pub fn hash_start_block(&self) -> u64 {
        self.hash_offset / BLOCK_SIZE + 1
    }

    /// The number of hash blocks below the root (the tree, without the superblock).
    pub fn tree_blocks(&self) -> u64 {
        level_sizes(self.data_blocks).iter().sum()
    }

    /// The total size of the slot payload: data, superblock block and tree.
    pub fn payload_size(&self) -> u64 {
        self.hash_offset + BLOCK_SIZE + self.tree_blocks() * BLOCK_SIZE
    }

    /// The device-mapper `verity` target parameters, data and hash on the same device.
    pub fn dm_table_params(&self, device: &str) -> String {
        format!(
            "1 {device} {device} {bs} {bs} {blocks} {start} sha256 {root} {salt}",
            bs = BLOCK_SIZE,
            blocks = self.data_blocks,
            start = self.hash_start_block(),
            root = hex::encode(self.root_hash),
            salt = hex::encode(self.salt),
        )
    }
}

/// The number of hash blocks of each level, level 0 (hashes of data blocks) first.
fn level_sizes(data_blocks: u64) -> Vec<u64> {
    let mut sizes = Vec::new();
    let mut n = data_blocks;
    while n > 1 {
        n = n.div_ceil(HASHES_PER_BLOCK);
        sizes.push(n);
    }
    sizes
}

fn salted_digest(salt: &[u8; 32], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// A computed tree: the bytes to write after the data, and the parameters.
pub struct Tree {
    pub params: VerityParams,
    /// Superblock block followed by the hash levels, top level first.
    pub bytes: Vec<u8>,
}

/// Hashes `data` (a whole number of 4 KiB blocks) and builds the tree that follows it.
/// `uuid` goes into the superblock, as `veritysetup format --uuid` does.
pub fn build<R: Read>(mut data: R, salt: [u8; 32], uuid: [u8; 16]) -> Result<Tree, VerityError> {
    let mut level0 = Vec::new();
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    let mut data_blocks = 0u64;
    loop {
        let n = read_full(&mut data, &mut block).map_err(VerityError::Read)?;
        if n == 0 {
            break;
        }
        if n < block.len() {
            return Err(VerityError::Unaligned(data_blocks * BLOCK_SIZE + n as u64));
        }
        level0.extend_from_slice(&salted_digest(&salt, &block));
        data_blocks += 1;
    }
    if data_blocks == 0 {
        return Err(VerityError::Empty);
    }
    // Each level's digests, padded into whole blocks; the next level hashes those blocks.
    let mut levels: Vec<Vec<u8>> = Vec::new();
    let mut digests = level0;
    while digests.len() > DIGEST {
        let padded_len = digests.len().div_ceil(BLOCK_SIZE as usize) * BLOCK_SIZE as usize;
        digests.resize(padded_len, 0);
        let next: Vec<u8> = digests
            .chunks(BLOCK_SIZE as usize)
            .flat_map(|b| salted_digest(&salt, b))
            .collect();
        levels.push(std::mem::replace(&mut digests, next));
    }
    let mut root_hash = [0u8; 32];
    root_hash.copy_from_slice(&digests);
    let params = VerityParams {
        root_hash,
        salt,
        data_blocks,
        hash_offset: data_blocks * BLOCK_SIZE,
    };
    let mut bytes = superblock(&params, uuid).to_vec();
    for level in levels.iter().rev() {
        bytes.extend_from_slice(level);
    }
    Ok(Tree { params, bytes })
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// veritysetup's 512-byte superblock, padded to a whole hash block.
fn superblock(p: &VerityParams, uuid: [u8; 16]) -> [u8; BLOCK_SIZE as usize] {
    let mut sb = [0u8; BLOCK_SIZE as usize];
    sb[0..8].copy_from_slice(b"verity\0\0");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes()); // superblock version
    sb[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash type: normal
    sb[16..32].copy_from_slice(&uuid);
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    sb[68..72].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    sb[72..80].copy_from_slice(&p.data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(p.salt.len() as u16).to_le_bytes());
    sb[88..88 + p.salt.len()].copy_from_slice(&p.salt);
    sb
}

/// A salt derived from the data's own digest, so the same filesystem always gets the same tree.
pub fn derive_salt(data_sha256: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"caisson verity salt\0");
    h.update(data_sha256);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_sizes_match_the_tree_shape() {
        assert_eq!(level_sizes(1), Vec::<u64>::new());
        assert_eq!(level_sizes(2), vec![1]);
        assert_eq!(level_sizes(128), vec![1]);
        assert_eq!(level_sizes(129), vec![2, 1]);
        assert_eq!(level_sizes(16385), vec![129, 2, 1]);
    }

    #[test]
    fn refuses_unaligned_and_empty() {
        assert!(matches!(
            build(&[0u8; 100][..], [0; 32], [0; 16]),
            Err(VerityError::Unaligned(100))
        ));
        assert!(matches!(
            build(&[][..], [0; 32], [0; 16]),
            Err(VerityError::Empty)
        ));
    }

    #[test]
    fn one_flipped_bit_changes_the_root() {
        let mut data = vec![0u8; 3 * BLOCK_SIZE as usize];
        let a = build(&data[..], [1; 32], [0; 16]).unwrap();
        data[5000] ^= 1;
        let b = build(&data[..], [1; 32], [0; 16]).unwrap();
        assert_ne!(a.params.root_hash, b.params.root_hash);
        assert_eq!(a.bytes.len() as u64, BLOCK_SIZE * 2);
        assert_eq!(a.params.payload_size(), 5 * BLOCK_SIZE);
    }
}
