//! The root slot payload: an erofs filesystem made by `mkfs.erofs`, padded to 4 KiB, followed by
//! its dm-verity superblock and hash tree from `caisson_layout::verity`.
//!
//! Reproducible: `-T<epoch> --ignore-mtime` sets every timestamp to the epoch (erofs-utils 1.5
//! clamps only newer ones with `-T` alone), `--all-root` every owner (so no privileges
//! are needed to make root-owned files), `-x-1` leaves out extended attributes of the build
//! host, the filesystem UUID is derived from the image name and epoch, the verity salt from the
//! filesystem's sha256 and the verity UUID from the image name and that digest.

use crate::tempout::TempOut;
use crate::tools::{run, Tool};
use crate::DiskError;
use caisson_layout::partition::derive_guid;
use caisson_layout::verity::{self, VerityParams, BLOCK_SIZE};
use sha2::{Digest, Sha256};
use std::fs::OpenOptions;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use uuid::Uuid;

/// What the boot entry, the bundle and the updater need to know about a root payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootPayload {
    /// Root hash, salt, data blocks and hash offset (the filesystem size).
    pub verity: VerityParams,
    /// The size of the whole payload: filesystem, verity superblock and tree.
    pub size: u64,
    /// The sha256 of the whole payload.
    pub sha256: [u8; 32],
    /// The erofs filesystem UUID.
    pub fs_uuid: Uuid,
    /// The UUID in the verity superblock.
    pub verity_uuid: Uuid,
}

/// Makes the payload of `rootfs_dir` at `out` (under a temporary name first).
pub fn make_root_payload(
    rootfs_dir: &Path,
    out: &Path,
    epoch: u64,
    image_name: &str,
) -> Result<RootPayload, DiskError> {
    if !rootfs_dir.is_dir() {
        return Err(DiskError::BadPath {
            what: "root filesystem",
            path: rootfs_dir.display().to_string(),
            reason: "is not a directory",
        });
    }
    let tmp = TempOut::new(out)?;
    let fs_uuid = derive_guid(image_name, &format!("root erofs\0{epoch}"));
    let args = [
        "-zlz4hc".into(),
        "-x-1".into(),
        "--all-root".into(),
        // Without it, -T only clamps newer mtimes to the epoch and keeps older ones.
        "--ignore-mtime".into(),
        format!("-T{epoch}").into(),
        format!("-U{fs_uuid}").into(),
        tmp.path().as_os_str().to_owned(),
        rootfs_dir.as_os_str().to_owned(),
    ];
    // No SOURCE_DATE_EPOCH: with it, erofs-utils 1.5 clamps mtimes even under --ignore-mtime.
    run::<_, std::ffi::OsString>(Tool::MkfsErofs, rootfs_dir, args, &[])?;
    let payload = append_verity(tmp.path(), out, image_name, fs_uuid)?;
    tmp.commit()?;
    Ok(payload)
}

/// Pads the filesystem at `path` to whole blocks and appends its hash tree; `out` names it in errors.
fn append_verity(
    path: &Path,
    out: &Path,
    image_name: &str,
    fs_uuid: Uuid,
) -> Result<RootPayload, DiskError> {
    let io_err = DiskError::io("writing the root payload", out);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(&io_err)?;
    let fs_len = file.metadata().map_err(&io_err)?.len();
    let data_len = fs_len.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    file.set_len(data_len).map_err(&io_err)?;

    let hasher = sha256_of(&mut file).map_err(&io_err)?;
    let data_sha: [u8; 32] = hasher.clone().finalize().into();
    let verity_uuid = derive_guid(
        image_name,
        &format!("root verity\0{}", hex::encode(data_sha)),
    );
    file.seek(SeekFrom::Start(0)).map_err(&io_err)?;
    let tree = verity::build(
        BufReader::with_capacity(1 << 20, &mut file),
        verity::derive_salt(&data_sha),
        *verity_uuid.as_bytes(),
    )
    .map_err(|source| DiskError::Verity {
        path: out.to_path_buf(),
        source,
    })?;
    file.write_all_at(&tree.bytes, data_len).map_err(&io_err)?;
    file.sync_all().map_err(&io_err)?;

    let mut hasher = hasher;
    hasher.update(&tree.bytes);
    Ok(RootPayload {
        verity: tree.params,
        size: tree.params.payload_size(),
        sha256: hasher.finalize().into(),
        fs_uuid,
        verity_uuid,
    })
}

fn sha256_of(r: &mut impl Read) -> std::io::Result<Sha256> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(hasher),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
