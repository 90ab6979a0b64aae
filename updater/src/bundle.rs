//! The update bundle and its manifest: the one place that owns their format.
//!
//! A bundle is the slot payload (root filesystem with its verity tree), the kernel and the
//! initramfs, each starting at a 4 KiB-aligned offset in one file, followed by one binary chunk
//! index per artifact, so a machine can fetch any artifact, index or chunk with an HTTP Range
//! request. The manifest (JSON, signed) lists each artifact's offset, size and sha256, where its
//! chunk index is and that index's sha256, the chunking scheme with its parameters, and what the
//! boot entry needs.
//!
//! Format 2 cuts artifacts into content-defined chunks (FastCDC 2020, [`Chunking`]): an
//! insertion or removal moves the cut points only around the change, so a machine that cuts its
//! running slot with the same parameters finds nearly every chunk of a new version that shares
//! files with it, wherever they moved. A chunk index is a sequence of [`INDEX_ENTRY`]-byte
//! entries: the chunk's length (u32, little-endian) and its sha256; chunk offsets are the sums
//! of the lengths before them. The index lives in the bundle rather than the manifest: the
//! manifest stays small for every `check`, and the index is only fetched by an apply (and
//! counted in its download), checked against the sha256 the signed manifest gives.

use caisson_layout::verity::VerityParams;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The manifest format version this code reads and writes.
pub const FORMAT: u32 = 2;
/// Artifact alignment inside the bundle.
pub const ALIGN: u64 = 4096;
/// The one chunking scheme this build knows: FastCDC as in the 2020 paper, the `fastcdc`
/// crate's `v2020` cut function with its default gear table (seed 0).
pub const SCHEME_FASTCDC_2020: &str = "fastcdc-2020";
/// Bytes per chunk index entry: length (u32 LE) and sha256.
pub const INDEX_ENTRY: usize = 4 + 32;

/// A sha256 digest, compared as bytes.
pub type Hash = [u8; 32];

/// How artifacts are cut into chunks. Written into the manifest, so the machine cuts its running
/// slot exactly as the builder cut the bundle and never guesses.
///
/// The default, 2 / 8 / 32 KiB (min / average / max, casync's ¼ and 4× ratios) with
/// normalization level 1, was measured against 4, 16 and 32 KiB averages (BENCHMARKS.md, issue
/// 5): erofs lays files out in 4 KiB blocks and a changed package touches scattered blocks
/// (inodes, directories, the data it adds), so what one changed block costs is about one average
/// chunk; 8 KiB fetched the fewest bytes for a real one-package update of images/host.toml
/// (1.66 MB against 1.86 / 1.88 / 2.45 MB for 4 / 16 / 32 KiB) and for scattered changes, and
/// its index (36 bytes per chunk, about 0.35 % of the payload, 0.3 MB for an 84 MB root) stays
/// small next to that. Smaller averages grow the index faster than they save chunk bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunking {
    /// The cut algorithm; this build knows [`SCHEME_FASTCDC_2020`].
    pub scheme: String,
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
    /// FastCDC's normalized-chunking level, 0 to 3.
    pub normalization: u8,
}

impl Default for Chunking {
    fn default() -> Self {
        Chunking {
            scheme: SCHEME_FASTCDC_2020.to_string(),
            min_size: 2 * 1024,
            avg_size: 8 * 1024,
            max_size: 32 * 1024,
            normalization: 1,
        }
    }
}

impl Chunking {
    /// The checked parameters, ready to cut; an unknown scheme or parameters out of the
    /// algorithm's range are refused (never handed to the chunker, which would misbehave).
    pub fn cutter(&self) -> Result<Cutter, String> {
        use fastcdc::v2020 as cdc;
        if self.scheme != SCHEME_FASTCDC_2020 {
            return Err(format!(
                "chunking scheme {:?} is not supported (this caisson-update knows \
                 {SCHEME_FASTCDC_2020:?}): update caisson-update to a version that knows it",
                self.scheme
            ));
        }
        let (min, avg, max) = (
            self.min_size as usize,
            self.avg_size as usize,
            self.max_size as usize,
        );
        let level = match self.normalization {
            0 => cdc::Normalization::Level0,
            1 => cdc::Normalization::Level1,
            2 => cdc::Normalization::Level2,
            3 => cdc::Normalization::Level3,
            n => return Err(format!("chunking normalization {n} is not 0 to 3")),
        };
        let in_range = (cdc::MINIMUM_MIN..=cdc::MINIMUM_MAX).contains(&min)
            && (cdc::AVERAGE_MIN..=cdc::AVERAGE_MAX).contains(&avg)
            && (cdc::MAXIMUM_MIN..=cdc::MAXIMUM_MAX).contains(&max)
            && min <= avg
            && avg <= max
            && [min, avg, max].iter().all(|n| n.is_multiple_of(2));
        if !in_range {
            return Err(format!(
                "chunk sizes {min}/{avg}/{max} (min/avg/max) are not even, ordered sizes within \
                 FastCDC's ranges ({}..={}, {}..={}, {}..={})",
                cdc::MINIMUM_MIN,
                cdc::MINIMUM_MAX,
                cdc::AVERAGE_MIN,
                cdc::AVERAGE_MAX,
                cdc::MAXIMUM_MIN,
                cdc::MAXIMUM_MAX
            ));
        }
        let (mask_s, mask_l) = cdc::select_masks(avg, level);
        Ok(Cutter {
            min,
            avg,
            max,
            mask_s,
            mask_l,
        })
    }
}

/// Checked chunking parameters: cuts byte streams into content-defined chunks.
#[derive(Debug, Clone, Copy)]
pub struct Cutter {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
}

/// How much one read takes when cutting a stream.
const CUT_PIECE: usize = 4 * 1024 * 1024;

impl Cutter {
    /// The largest chunk this cutter makes.
    pub fn max_size(&self) -> usize {
        self.max
    }

    /// The length of the chunk at the start of `data`, when `data` holds at least `max_size`
    /// bytes or everything up to the end of the stream.
    fn cut(&self, data: &[u8]) -> usize {
        let (_, n) = fastcdc::v2020::cut(
            data,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        n
    }

    /// Cuts everything `src` yields into chunks, calling `each` with every chunk in order;
    /// returns the number of bytes read. The same cut points as `fastcdc::v2020::StreamCDC`,
    /// without copying each chunk out: reads go into one large buffer.
    pub fn for_each_chunk<R: Read, E: From<io::Error>>(
        &self,
        mut src: R,
        mut each: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut buf = vec![0u8; CUT_PIECE.max(2 * self.max)];
        let (mut pos, mut len, mut eof, mut total) = (0usize, 0usize, false, 0u64);
        loop {
            if !eof && len - pos < self.max {
                buf.copy_within(pos..len, 0);
                len -= pos;
                pos = 0;
                while len < buf.len() {
                    match src.read(&mut buf[len..]) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => len += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            if pos == len {
                return Ok(total);
            }
            let n = self.cut(&buf[pos..len]);
            each(&buf[pos..pos + n])?;
            pos += n;
            total += n as u64;
        }
    }
}

/// One chunk of an artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Offset in the artifact.
    pub offset: u64,
    pub len: u32,
    pub sha256: Hash,
}

/// The chunks of one artifact, in order, as the bundle's binary index holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkIndex {
    pub chunks: Vec<Chunk>,
}

impl ChunkIndex {
    /// Adds the next chunk.
    pub fn push(&mut self, data: &[u8]) {
        let offset = self.size();
        self.chunks.push(Chunk {
            offset,
            len: data.len() as u32,
            sha256: Sha256::digest(data).into(),
        });
    }

    /// The bytes the chunks cover.
    pub fn size(&self) -> u64 {
        self.chunks
            .last()
            .map_or(0, |c| c.offset + u64::from(c.len))
    }

    /// The binary form: [`INDEX_ENTRY`] bytes per chunk.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.chunks.len() * INDEX_ENTRY);
        for c in &self.chunks {
            out.extend_from_slice(&c.len.to_le_bytes());
            out.extend_from_slice(&c.sha256);
        }
        out
    }

    /// Reads the binary form of the index of an artifact of `size` bytes whose chunks are at most
    /// `max_chunk` long; refuses an index that does not cover exactly the artifact.
    pub fn decode(bytes: &[u8], size: u64, max_chunk: usize) -> Result<ChunkIndex, String> {
        if !bytes.len().is_multiple_of(INDEX_ENTRY) {
            return Err(format!(
                "chunk index of {} bytes is not made of {INDEX_ENTRY}-byte entries",
                bytes.len()
            ));
        }
        let mut index = ChunkIndex::default();
        let mut offset = 0u64;
        for (i, e) in bytes.chunks_exact(INDEX_ENTRY).enumerate() {
            let (len, sha) = e.split_at(4);
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
            if len == 0 || len as usize > max_chunk {
                return Err(format!(
                    "chunk {i} is {len} bytes long (chunks are 1 to {max_chunk})"
                ));
            }
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(sha);
            index.chunks.push(Chunk {
                offset,
                len,
                sha256,
            });
            offset += u64::from(len);
        }
        if offset != size {
            return Err(format!(
                "the chunks cover {offset} bytes, the artifact has {size}"
            ));
        }
        Ok(index)
    }
}

/// What a bundle artifact is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// The slot payload: erofs root and dm-verity tree.
    Root,
    Kernel,
    Initrd,
}

/// Where an artifact's chunk index is in the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexRef {
    /// Byte offset in the bundle.
    pub offset: u64,
    pub size: u64,
    /// sha256 of the index bytes, hex.
    pub sha256: String,
}

impl IndexRef {
    /// How many chunks the index lists.
    pub fn chunk_count(&self) -> u64 {
        self.size / INDEX_ENTRY as u64
    }
}

/// One artifact inside the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub kind: ArtifactKind,
    /// Byte offset in the bundle.
    pub offset: u64,
    pub size: u64,
    /// sha256 of the artifact, hex.
    pub sha256: String,
    /// Its chunk index.
    pub index: IndexRef,
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
    /// How the artifacts are cut into chunks.
    pub chunking: Chunking,
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

    /// Parses manifest JSON; `path` is used in messages. Refuses another format version or an
    /// unknown chunking scheme with a message that says so (rather than a field-level error).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Manifest, BundleError> {
        let bad = |why: String| BundleError::Manifest {
            path: path.to_path_buf(),
            why,
        };
        /// Just the version, read before the rest: another format's fields differ.
        #[derive(Deserialize)]
        struct Probe {
            format: u32,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if probe.format != FORMAT {
            return Err(bad(format!(
                "format {} is not supported (this caisson-update reads format {FORMAT}): \
                 update caisson-update, or publish a bundle built for it",
                probe.format
            )));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        // The version names ESP directories and boot entries, and cmdline_extra is appended
        // after the entry's pinning keys: neither may escape or override them.
        caisson_layout::version::check(&m.version).map_err(|e| bad(e.to_string()))?;
        if let Some(min) = &m.min_version {
            caisson_layout::version::check(min).map_err(|e| bad(format!("min_version: {e}")))?;
        }
        caisson_layout::cmdline::check_extra(&m.cmdline_extra).map_err(|e| bad(e.to_string()))?;
        m.chunking.cutter().map_err(bad)?;
        m.verity_params().map_err(|e| bad(format!("verity: {e}")))?;
        for kind in [
            ArtifactKind::Root,
            ArtifactKind::Kernel,
            ArtifactKind::Initrd,
        ] {
            let Some(a) = m.artifact(kind) else {
                return Err(bad(format!("no {kind:?} artifact")));
            };
            if !a.index.size.is_multiple_of(INDEX_ENTRY as u64)
                || hex_hash(&a.index.sha256).is_err()
            {
                return Err(bad(format!(
                    "{kind:?} artifact: its chunk index entry is malformed"
                )));
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

/// Writes the bundle to `bundle_path` with the default [`Chunking`] and returns its manifest
/// (the caller writes it beside). The bundle is written under a temporary name and renamed at
/// the end.
pub fn write_bundle(input: &BundleInput, bundle_path: &Path) -> Result<Manifest, BundleError> {
    write_bundle_chunked(input, bundle_path, &Chunking::default())
}

/// [`write_bundle`] with other chunking parameters (benchmarks compare them).
pub fn write_bundle_chunked(
    input: &BundleInput,
    bundle_path: &Path,
    chunking: &Chunking,
) -> Result<Manifest, BundleError> {
    let tmp = tmp_name(bundle_path);
    let result = write_bundle_to(input, &tmp, chunking);
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

fn write_bundle_to(
    input: &BundleInput,
    tmp: &Path,
    chunking: &Chunking,
) -> Result<Manifest, BundleError> {
    let cutter = chunking.cutter().map_err(|why| BundleError::Manifest {
        path: tmp.to_path_buf(),
        why,
    })?;
    let file = File::create(tmp).map_err(io_err("creating", tmp))?;
    let mut out = BufWriter::with_capacity(1024 * 1024, file);
    let mut offset = 0u64;
    let mut artifacts = Vec::new();
    let mut indexes = Vec::new();
    let pad = |out: &mut BufWriter<File>, size: u64| {
        let padded = size.div_ceil(ALIGN) * ALIGN;
        out.write_all(&vec![0u8; (padded - size) as usize])
            .map(|()| padded)
            .map_err(io_err("writing", tmp))
    };
    for (kind, path) in [
        (ArtifactKind::Root, input.root),
        (ArtifactKind::Kernel, input.kernel),
        (ArtifactKind::Initrd, input.initrd),
    ] {
        let src = File::open(path).map_err(io_err("opening", path))?;
        let (size, sha256, index) = copy_chunked(&cutter, src, &mut out)
            .map_err(io_err("copying into the bundle", path))?;
        let start = offset;
        offset += pad(&mut out, size)?;
        artifacts.push(Artifact {
            kind,
            offset: start,
            size,
            sha256,
            index: IndexRef {
                offset: 0,
                size: 0,
                sha256: String::new(),
            },
        });
        indexes.push(index.encode());
    }
    for (a, bytes) in artifacts.iter_mut().zip(&indexes) {
        out.write_all(bytes).map_err(io_err("writing", tmp))?;
        a.index = IndexRef {
            offset,
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
        };
        offset += pad(&mut out, bytes.len() as u64)?;
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
        chunking: chunking.clone(),
        artifacts,
    })
}

/// Copies `src` to `dst` cut into chunks, returning size, sha256 (hex) and the chunk index.
pub fn copy_chunked<R: Read, W: Write>(
    cutter: &Cutter,
    src: R,
    dst: &mut W,
) -> io::Result<(u64, String, ChunkIndex)> {
    let mut whole = Sha256::new();
    let mut index = ChunkIndex::default();
    let size = cutter.for_each_chunk(src, |chunk| {
        whole.update(chunk);
        index.push(chunk);
        dst.write_all(chunk)
    })?;
    Ok((size, hex::encode(whole.finalize()), index))
}

/// A hex sha256 as bytes.
pub fn hex_hash(s: &str) -> Result<Hash, String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|e| format!("sha256 {s:?}: {e}"))?;
    Ok(out)
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
        // The index sits in the bundle, after the artifacts, and covers the root exactly.
        let bytes = std::fs::read(&bundle).unwrap();
        let ix = &bytes[r.index.offset as usize..(r.index.offset + r.index.size) as usize];
        assert_eq!(hex::encode(Sha256::digest(ix)), r.index.sha256);
        let index = ChunkIndex::decode(ix, r.size, 65536).unwrap();
        assert!(index.chunks.len() >= 4, "{}", index.chunks.len());
        assert_eq!(index.chunks.len() as u64, r.index.chunk_count());
        let root_bytes = std::fs::read(&root).unwrap();
        for c in &index.chunks {
            let piece = &root_bytes[c.offset as usize..(c.offset + u64::from(c.len)) as usize];
            assert_eq!(<Hash>::from(Sha256::digest(piece)), c.sha256);
        }
        assert!(ChunkIndex::decode(ix, r.size + 1, 65536).is_err());
        assert!(ChunkIndex::decode(&ix[1..], r.size, 65536).is_err());
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
        let json = m.to_json().replace("\"format\": 2", "\"format\": 9");
        let err = Manifest::parse(json.as_bytes(), Path::new("x.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("format 9 is not supported"), "{err}");
        // A format-1 manifest (fixed 64 KiB chunks listed inline) says so, not "unknown field".
        let old = "{\"format\": 1, \"chunk_size\": 65536, \"artifacts\": []}";
        let err = Manifest::parse(old.as_bytes(), Path::new("x.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("format 1 is not supported"), "{err}");
        // An unknown chunking scheme or impossible parameters are refused before any use.
        let json = m.to_json().replace("fastcdc-2020", "rabin-1");
        let err = Manifest::parse(json.as_bytes(), Path::new("x.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chunking scheme \"rabin-1\" is not supported"),
            "{err}"
        );
        let json = m
            .to_json()
            .replace("\"max_size\": 32768", "\"max_size\": 1000");
        let err = Manifest::parse(json.as_bytes(), Path::new("x.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("chunk sizes"), "{err}");
    }

    #[test]
    fn refuses_a_version_or_command_line_that_escapes_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a", 10, 1);
        let m = write_bundle(&input(&a, &a, &a), &dir.path().join("b")).unwrap();
        let json = m.to_json();
        assert!(Manifest::parse(json.as_bytes(), Path::new("x.json")).is_ok());
        for (field, evil, expect) in [
            ("version", "../../loader/x", "version"),
            ("version", "1.0.0\\n", "version"),
            ("cmdline_extra", "console=ttyS0 caisson.slot=a", "reserved"),
            ("cmdline_extra", "quiet\\ninitrd /x", "control character"),
        ] {
            let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
            v[field] = serde_json::Value::String(evil.replace("\\n", "\n"));
            let bytes = serde_json::to_vec(&v).unwrap();
            let err = Manifest::parse(&bytes, Path::new("x.json"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{field}={evil:?}: {err}");
        }
    }

    /// Deterministic bytes that look random (a xorshift stream).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    fn cut_points(data: &[u8], c: &Chunking) -> Vec<usize> {
        let mut out = Vec::new();
        c.cutter()
            .unwrap()
            .for_each_chunk::<_, io::Error>(data, |chunk| {
                out.push(chunk.len());
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn cuts_like_the_crates_stream_chunker() {
        let c = Chunking::default();
        let data = noise(3 * 1024 * 1024 + 12345, 42);
        let ours = cut_points(&data, &c);
        let theirs: Vec<usize> = fastcdc::v2020::StreamCDC::new(&data[..], 2048, 8192, 32768)
            .map(|r| r.unwrap().length)
            .collect();
        assert_eq!(ours, theirs);
        assert_eq!(ours.iter().sum::<usize>(), data.len());
        // Fixed cut points for fixed bytes: a crate upgrade that moves them (and so would make
        // machines and bundles cut differently) fails here first.
        assert_eq!(ours.len(), 328, "{:?}", &ours[..8]);
        assert_eq!(&ours[..4], [8349, 4592, 2466, 4293], "{:?}", &ours[..8]);
    }

    #[test]
    fn an_insertion_moves_only_nearby_cut_points() {
        let c = Chunking::default();
        let data = noise(2 * 1024 * 1024, 7);
        let mut changed = data.clone();
        let at = 1024 * 1024 + 100;
        changed.splice(at..at, noise(4096, 9));
        let hashes = |d: &[u8]| {
            let mut index = ChunkIndex::default();
            c.cutter()
                .unwrap()
                .for_each_chunk::<_, io::Error>(d, |chunk| {
                    index.push(chunk);
                    Ok(())
                })
                .unwrap();
            index
        };
        let (old, new) = (hashes(&data), hashes(&changed));
        let known: std::collections::HashSet<Hash> = old.chunks.iter().map(|c| c.sha256).collect();
        let fresh: u64 = new
            .chunks
            .iter()
            .filter(|c| !known.contains(&c.sha256))
            .map(|c| u64::from(c.len))
            .sum();
        assert!(fresh < 4096 + 3 * 32768, "{fresh} new bytes");
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
