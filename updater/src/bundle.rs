//! The update bundle and its manifest: the one place that owns their format.
//!
//! A bundle is the slot payload (root filesystem with its verity tree), the kernel and the
//! initramfs, each starting at a 4 KiB-aligned offset in one file, so a machine can fetch any
//! artifact or chunk with an HTTP Range request. The manifest (JSON) lists each artifact's offset,
//! size, sha256 and a fixed-size chunk index, plus what the boot entry needs.

use caisson_layout::verity::VerityParams;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The manifest format version this code reads and writes.
pub const FORMAT: u32 = 1;
/// Size of an index chunk.
pub const CHUNK_SIZE: u64 = 64 * 1024;
/// Artifact alignment inside the bundle.
pub const ALIGN: u64 = 4096;

/// What a bundle artifact is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// The slot payload: erofs root and dm-verity tree.
    Root,
    Kernel,
    Initrd,
}

/// One artifact inside the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub kind: ArtifactKind,
    /// Byte offset in the bundle.
    pub offset: u64,
    pub size: u64,
    /// sha256 of the artifact, hex.
    pub sha256: String,
    /// sha256 of each `CHUNK_SIZE` chunk (the last may be shorter), hex.
    pub chunks: Vec<String>,
}

/// The verity parameters of the root artifact, as hex and numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerityInfo {
    pub root_hash: String,
    pub salt: String,
    pub data_blocks: u64,
    pub hash_offset: u64,
}

/// The manifest of one bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// Image name (os-release IMAGE_ID).
    pub image: String,
    pub version: String,
    /// Architecture, `x86_64`.
    pub arch: String,
    /// Build time (SOURCE_DATE_EPOCH), seconds since the epoch.
    pub build_time: u64,
    /// Set when published: the channel.
    #[serde(default)]
    pub channel: Option<String>,
    /// Set when published: the oldest version that may update to this one.
    #[serde(default)]
    pub min_version: Option<String>,
    /// Set when published: the rollout window in seconds from `published_at`.
    #[serde(default)]
    pub rollout_seconds: Option<u64>,
    #[serde(default)]
    pub published_at: Option<u64>,
    /// Set when published: after this time (seconds since the epoch) machines refuse the
    /// manifest, so a frozen or replayed channel cannot hold machines on an old version forever.
    #[serde(default)]
    pub expires_at: Option<u64>,
    pub verity: VerityInfo,
    /// Kernel command line words beyond what pins the slot (console, quiet...).
    pub cmdline_extra: String,
    pub chunk_size: u64,
    pub artifacts: Vec<Artifact>,
}

/// A bundle or manifest that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("manifest {path}: {why}")]
    Manifest { path: PathBuf, why: String },
    #[error("bundle artifact {kind:?}: {why}")]
    Mismatch { kind: ArtifactKind, why: String },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BundleError {
    let path = path.to_path_buf();
    move |source| BundleError::Io { op, path, source }
}

impl Manifest {
    /// The root artifact's verity parameters, decoded.
    pub fn verity_params(&self) -> Result<VerityParams, String> {
        let hex32 = |s: &str| -> Result<[u8; 32], String> {
            hex::decode(s)
                .map_err(|e| e.to_string())?
                .try_into()
                .map_err(|_| format!("{s:?} is not 32 bytes of hex"))
        };
        Ok(VerityParams {
            root_hash: hex32(&self.verity.root_hash)?,
            salt: hex32(&self.verity.salt)?,
            data_blocks: self.verity.data_blocks,
            hash_offset: self.verity.hash_offset,
        })
    }

    /// The artifact of a kind.
    pub fn artifact(&self, kind: ArtifactKind) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.kind == kind)
    }

    /// Parses manifest JSON; `path` is used in messages.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Manifest, BundleError> {
        let bad = |why: String| BundleError::Manifest {
            path: path.to_path_buf(),
            why,
        };
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if m.format != FORMAT {
            return Err(bad(format!(
                "format {} is not supported (this build reads format {FORMAT})",
                m.format
            )));
        }
        m.verity_params().map_err(|e| bad(format!("verity: {e}")))?;
        for kind in [
            ArtifactKind::Root,
            ArtifactKind::Kernel,
            ArtifactKind::Initrd,
        ] {
            if m.artifact(kind).is_none() {
                return Err(bad(format!("no {kind:?} artifact")));
            }
        }
        Ok(m)
    }

    /// Reads a manifest file.
    pub fn load(path: &Path) -> Result<Manifest, BundleError> {
        let bytes = std::fs::read(path).map_err(io_err("reading", path))?;
        Manifest::parse(&bytes, path)
    }

    /// Pretty JSON, as written to disk and signed.
    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

/// What the builder knows about a bundle before writing it.
pub struct BundleInput<'a> {
    pub image: &'a str,
    pub version: &'a str,
    pub build_time: u64,
    pub verity: VerityParams,
    pub cmdline_extra: &'a str,
    pub root: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
}

/// Writes the bundle to `bundle_path` and returns its manifest (the caller writes it beside).
/// The bundle is written under a temporary name and renamed at the end.
pub fn write_bundle(input: &BundleInput, bundle_path: &Path) -> Result<Manifest, BundleError> {
    let tmp = tmp_name(bundle_path);
    let result = write_bundle_to(input, &tmp);
    match result {
        Ok(m) => {
            std::fs::rename(&tmp, bundle_path).map_err(io_err("renaming into", bundle_path))?;
            Ok(m)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

fn write_bundle_to(input: &BundleInput, tmp: &Path) -> Result<Manifest, BundleError> {
    let file = File::create(tmp).map_err(io_err("creating", tmp))?;
    let mut out = BufWriter::new(file);
    let mut offset = 0u64;
    let mut artifacts = Vec::new();
    for (kind, path) in [
        (ArtifactKind::Root, input.root),
        (ArtifactKind::Kernel, input.kernel),
        (ArtifactKind::Initrd, input.initrd),
    ] {
        let mut src = File::open(path).map_err(io_err("opening", path))?;
        let (size, sha256, chunks) =
            copy_hashing(&mut src, &mut out).map_err(io_err("copying into the bundle", path))?;
        let padded = size.div_ceil(ALIGN) * ALIGN;
        out.write_all(&vec![0u8; (padded - size) as usize])
            .map_err(io_err("writing", tmp))?;
        artifacts.push(Artifact {
            kind,
            offset,
            size,
            sha256,
            chunks,
        });
        offset += padded;
    }
    out.flush().map_err(io_err("writing", tmp))?;
    out.get_ref().sync_all().map_err(io_err("syncing", tmp))?;
    Ok(Manifest {
        format: FORMAT,
        image: input.image.to_string(),
        version: input.version.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        build_time: input.build_time,
        channel: None,
        min_version: None,
        rollout_seconds: None,
        published_at: None,
        expires_at: None,
        verity: VerityInfo {
            root_hash: hex::encode(input.verity.root_hash),
            salt: hex::encode(input.verity.salt),
            data_blocks: input.verity.data_blocks,
            hash_offset: input.verity.hash_offset,
        },
        cmdline_extra: input.cmdline_extra.to_string(),
        chunk_size: CHUNK_SIZE,
        artifacts,
    })
}

/// Copies `src` to `dst`, returning size, sha256 and the chunk index.
pub fn copy_hashing<R: Read, W: Write>(
    src: &mut R,
    dst: &mut W,
) -> io::Result<(u64, String, Vec<String>)> {
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    let mut size = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match src.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            break;
        }
        let chunk = &buf[..filled];
        whole.update(chunk);
        chunks.push(hex::encode(Sha256::digest(chunk)));
        dst.write_all(chunk)?;
        size += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    Ok((size, hex::encode(whole.finalize()), chunks))
}

/// Checks that an artifact inside a bundle file matches its manifest entry.
pub fn verify_artifact(bundle: &Path, artifact: &Artifact) -> Result<(), BundleError> {
    let mut f = File::open(bundle).map_err(io_err("opening", bundle))?;
    f.seek(SeekFrom::Start(artifact.offset))
        .map_err(io_err("seeking in", bundle))?;
    // One sha256 pass in large reads: the chunk index is checked as the chunks are written.
    let mut part = io::BufReader::with_capacity(4 * 1024 * 1024, f.take(artifact.size));
    let mut hash = Sha256::new();
    let size = io::copy(&mut part, &mut hash).map_err(io_err("reading", bundle))?;
    let sha256 = hex::encode(hash.finalize());
    let mismatch = |why: String| BundleError::Mismatch {
        kind: artifact.kind,
        why,
    };
    if size != artifact.size {
        return Err(mismatch(format!(
            "{size} bytes in the bundle, manifest says {}",
            artifact.size
        )));
    }
    if sha256 != artifact.sha256 {
        return Err(mismatch(format!(
            "sha256 {sha256}, manifest says {}",
            artifact.sha256
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A manifest for tests of the modules that read manifests.
    pub(crate) fn sample_manifest() -> Manifest {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a", 10, 1);
        write_bundle(&input(&a, &a, &a), &dir.path().join("b")).unwrap()
    }

    fn write(dir: &Path, name: &str, len: usize, seed: u8) -> PathBuf {
        let p = dir.join(name);
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    fn input<'a>(root: &'a Path, kernel: &'a Path, initrd: &'a Path) -> BundleInput<'a> {
        BundleInput {
            image: "host",
            version: "1.0.0",
            build_time: 1700000000,
            verity: VerityParams {
                root_hash: [1; 32],
                salt: [2; 32],
                data_blocks: 10,
                hash_offset: 40960,
            },
            cmdline_extra: "console=ttyS0",
            root,
            kernel,
            initrd,
        }
    }

    #[test]
    fn round_trip_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let root = write(dir.path(), "root", 200_000, 3);
        let kernel = write(dir.path(), "kernel", 5000, 5);
        let initrd = write(dir.path(), "initrd", 70_000, 7);
        let bundle = dir.path().join("b.bundle");
        let m = write_bundle(&input(&root, &kernel, &initrd), &bundle).unwrap();
        assert!(!dir.path().join("b.bundle.partial").exists());
        let r = m.artifact(ArtifactKind::Root).unwrap();
        assert_eq!(r.chunks.len(), 4);
        let k = m.artifact(ArtifactKind::Kernel).unwrap();
        assert_eq!(k.offset % ALIGN, 0);
        assert!(k.offset >= 200_000);
        let parsed = Manifest::parse(m.to_json().as_bytes(), Path::new("m.json")).unwrap();
        assert_eq!(parsed, m);
        for a in &m.artifacts {
            verify_artifact(&bundle, a).unwrap();
        }
        // One flipped byte in the kernel is caught.
        let mut bytes = std::fs::read(&bundle).unwrap();
        bytes[k.offset as usize + 10] ^= 1;
        std::fs::write(&bundle, bytes).unwrap();
        assert!(verify_artifact(&bundle, k).is_err());
    }

    #[test]
    fn rejects_foreign_manifests() {
        let err = Manifest::parse(b"{\"format\": 1}", Path::new("x.json"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("manifest x.json:"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a", 10, 1);
        let m = write_bundle(&input(&a, &a, &a), &dir.path().join("b")).unwrap();
        let json = m.to_json().replace("\"format\": 1", "\"format\": 9");
        let err = Manifest::parse(json.as_bytes(), Path::new("x.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("format 9"), "{err}");
    }

    #[test]
    fn a_missing_input_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a", 10, 1);
        let missing = dir.path().join("missing");
        let bundle = dir.path().join("b.bundle");
        let err = write_bundle(&input(&a, &missing, &a), &bundle).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(!bundle.exists());
        assert!(!dir.path().join("b.bundle.partial").exists());
    }
}
