//! The hash tree computed in Rust must be byte-for-byte what `veritysetup format` writes, and
//! `veritysetup verify` must accept a slot laid out as the builder lays it out.

use caisson_layout::verity::{self, BLOCK_SIZE};
use std::process::Command;

fn veritysetup_available() -> bool {
    Command::new("veritysetup")
        .arg("--version")
        .output()
        .is_ok()
}

fn data(blocks: u64) -> Vec<u8> {
    // Deterministic, non-repeating content: a hash chain.
    let mut out = Vec::with_capacity((blocks * BLOCK_SIZE) as usize);
    let mut state = [0u8; 32];
    while (out.len() as u64) < blocks * BLOCK_SIZE {
        use sha2::Digest;
        state = sha2::Sha256::digest(state).into();
        out.extend_from_slice(&state);
    }
    out
}

#[test]
fn tree_equals_veritysetup_format() {
    assert!(
        veritysetup_available(),
        "veritysetup is missing: apt-get install cryptsetup-bin"
    );
    let uuid = uuid::Uuid::from_u128(0x12345678_9abc_4def_8123_456789abcdef);
    for blocks in [1u64, 2, 128, 129, 16385] {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(blocks);
        let data_path = dir.path().join("data");
        let hash_path = dir.path().join("hash");
        std::fs::write(&data_path, &bytes).unwrap();
        let salt = [0xa5u8; 32];
        let out = Command::new("veritysetup")
            .arg("format")
            .arg(&data_path)
            .arg(&hash_path)
            .arg(format!("--salt={}", hex::encode(salt)))
            .arg(format!("--uuid={uuid}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let tree = verity::build(&bytes[..], salt, *uuid.as_bytes()).unwrap();
        let root = hex::encode(tree.params.root_hash);
        assert!(
            stdout.contains(&format!("Root hash:      \t{root}")),
            "{blocks} blocks: root {root} not in\n{stdout}"
        );
        let theirs = std::fs::read(&hash_path).unwrap();
        assert_eq!(
            theirs.len(),
            tree.bytes.len(),
            "{blocks} blocks: hash area size"
        );
        assert!(theirs == tree.bytes, "{blocks} blocks: hash area differs");
    }
}

#[test]
fn veritysetup_verifies_a_slot_and_catches_a_flip() {
    let dir = tempfile::tempdir().unwrap();
    let mut slot = data(300);
    let tree = verity::build(&slot[..], verity::derive_salt(&[1; 32]), [2; 16]).unwrap();
    slot.extend_from_slice(&tree.bytes);
    assert_eq!(slot.len() as u64, tree.params.payload_size());
    let path = dir.path().join("slot");
    std::fs::write(&path, &slot).unwrap();
    let verify = |p: &std::path::Path| {
        Command::new("veritysetup")
            .arg("verify")
            .arg(p)
            .arg(p)
            .arg(hex::encode(tree.params.root_hash))
            .arg(format!("--hash-offset={}", tree.params.hash_offset))
            .output()
            .unwrap()
    };
    let ok = verify(&path);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    slot[4096 * 200 + 17] ^= 0x40;
    std::fs::write(&path, &slot).unwrap();
    assert!(
        !verify(&path).status.success(),
        "a flipped byte must fail verification"
    );
}
