//! The initramfs: a newc ("070701") cpio archive, compressed with zstd.
//!
//! Entries are sorted by path, so parents come before their children (a prefix sorts first) and
//! the order never depends on how the caller listed them; missing parent directories are added
//! with mode 0755. Every entry is owned by root, has the given mtime, and gets the next inode
//! number; a directory's link count is 2 plus its subdirectories.

use crate::tempout::TempOut;
use crate::DiskError;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// The zstd level of the initramfs: zstd's default, fast to build; level 19 saves about a
/// tenth of the size for twenty times the time.
pub const ZSTD_LEVEL: i32 = 3;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const PERM_MASK: u32 = 0o7777;
const WHAT: &str = "initramfs";

/// Where a file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpioData {
    Bytes(Vec<u8>),
    /// A file on the host, read while the archive is written.
    Path(PathBuf),
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpioKind {
    Dir,
    File(CpioData),
    /// A symbolic link to the given target.
    Symlink(String),
}

/// One entry of the archive. `path` is relative to the archive root (a leading `/` is ignored);
/// `mode` holds the permission bits (the file type bits come from `kind`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    pub path: String,
    pub kind: CpioKind,
    pub mode: u32,
}

impl CpioEntry {
    pub fn dir(path: impl Into<String>, mode: u32) -> Self {
        CpioEntry {
            path: path.into(),
            kind: CpioKind::Dir,
            mode,
        }
    }

    pub fn file(path: impl Into<String>, bytes: impl Into<Vec<u8>>, mode: u32) -> Self {
        CpioEntry {
            path: path.into(),
            kind: CpioKind::File(CpioData::Bytes(bytes.into())),
            mode,
        }
    }

    pub fn file_from(path: impl Into<String>, host: impl Into<PathBuf>, mode: u32) -> Self {
        CpioEntry {
            path: path.into(),
            kind: CpioKind::File(CpioData::Path(host.into())),
            mode,
        }
    }

    pub fn symlink(path: impl Into<String>, target: impl Into<String>) -> Self {
        CpioEntry {
            path: path.into(),
            kind: CpioKind::Symlink(target.into()),
            mode: 0o777,
        }
    }

    fn type_bits(&self) -> u32 {
        match self.kind {
            CpioKind::Dir => S_IFDIR,
            CpioKind::File(_) => S_IFREG,
            CpioKind::Symlink(_) => S_IFLNK,
        }
    }
}

/// Writes the archive of `entries`, zstd-compressed at [`ZSTD_LEVEL`], to `out` (under a
/// temporary name first).
pub fn write_initramfs(entries: &[CpioEntry], mtime: u64, out: &Path) -> Result<(), DiskError> {
    write_initramfs_with_level(entries, mtime, out, ZSTD_LEVEL)
}

/// [`write_initramfs`] at another zstd level: level 19 runs at about 3 MB/s on this machine,
/// a lower level trades size for build time.
pub fn write_initramfs_with_level(
    entries: &[CpioEntry],
    mtime: u64,
    out: &Path,
    level: i32,
) -> Result<(), DiskError> {
    let tmp = TempOut::new(out)?;
    let file = File::create(tmp.path()).map_err(DiskError::io("creating", out))?;
    let mut enc = zstd::Encoder::new(BufWriter::new(file), level)
        .and_then(|mut e| e.include_checksum(true).map(|()| e))
        .map_err(DiskError::io("compressing", out))?;
    write_cpio(entries, mtime, &mut enc, out)?;
    let buf = enc.finish().map_err(DiskError::io("compressing", out))?;
    let file = buf
        .into_inner()
        .map_err(|e| DiskError::io("writing", out)(e.into_error()))?;
    file.sync_all().map_err(DiskError::io("writing", out))?;
    tmp.commit()
}

/// Writes the uncompressed archive of `entries` to `w`; `dest` names it in errors.
pub fn write_cpio<W: Write>(
    entries: &[CpioEntry],
    mtime: u64,
    w: W,
    dest: &Path,
) -> Result<(), DiskError> {
    let mtime = u32::try_from(mtime).map_err(|_| DiskError::BadSize {
        what: "initramfs mtime".into(),
        size: mtime,
        reason: "does not fit the 32-bit newc field",
    })?;
    let tree = Tree::new(entries)?;
    let mut w = Counting {
        inner: w,
        written: 0,
    };
    let write_err = DiskError::io("writing", dest);
    let mut ino = 0u32;
    for (path, node) in &tree.nodes {
        ino += 1;
        let mode = node.type_bits | node.mode;
        let nlink = match node.type_bits {
            S_IFDIR => 2 + tree.subdirs(path),
            _ => 1,
        };
        match node.data {
            Some(Source::Bytes(bytes)) => {
                let size = size32(bytes.len() as u64, path)?;
                header(&mut w, ino, mode, nlink, mtime, size, path).map_err(&write_err)?;
                w.write_all(bytes).map_err(&write_err)?;
            }
            Some(Source::Path(host)) => copy_file(&mut w, ino, mode, mtime, path, host, dest)?,
            None => header(&mut w, ino, mode, nlink, mtime, 0, path).map_err(&write_err)?,
        }
        pad4(&mut w).map_err(&write_err)?;
    }
    header(&mut w, 0, 0, 1, 0, 0, TRAILER).map_err(&write_err)?;
    w.flush().map_err(write_err)
}

fn copy_file<W: Write>(
    w: &mut Counting<W>,
    ino: u32,
    mode: u32,
    mtime: u32,
    path: &str,
    host: &Path,
    dest: &Path,
) -> Result<(), DiskError> {
    let file = File::open(host).map_err(DiskError::io("reading", host))?;
    let len = file
        .metadata()
        .map_err(DiskError::io("reading", host))?
        .len();
    let size = size32(len, path)?;
    header(w, ino, mode, 1, mtime, size, path).map_err(DiskError::io("writing", dest))?;
    let copied = io::copy(&mut file.take(len), w).map_err(|e| {
        // io::copy does not say which side failed: name both.
        DiskError::io("copying into the initramfs", host)(e)
    })?;
    if copied != len {
        return Err(DiskError::FileChanged {
            path: host.to_path_buf(),
            expected: len,
        });
    }
    Ok(())
}

fn size32(len: u64, path: &str) -> Result<u32, DiskError> {
    u32::try_from(len).map_err(|_| DiskError::BadSize {
        what: format!("initramfs file {path}"),
        size: len,
        reason: "newc cpio files must be under 4 GiB",
    })
}

fn header<W: Write>(
    w: &mut Counting<W>,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    size: u32,
    name: &str,
) -> io::Result<()> {
    let namesize = name.len() + 1;
    write!(
        w,
        "{MAGIC}{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}\
         {z:08X}{z:08X}{z:08X}{z:08X}{namesize:08X}{z:08X}",
        uid = 0,
        gid = 0,
        z = 0,
    )?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w)
}

fn pad4<W: Write>(w: &mut Counting<W>) -> io::Result<()> {
    let pad = (4 - (w.written % 4) as usize) % 4;
    w.write_all(&[0u8; 3][..pad])
}

/// A writer that counts bytes, for the 4-byte alignment.
struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Source<'a> {
    Bytes(&'a [u8]),
    Path(&'a Path),
}

struct Node<'a> {
    type_bits: u32,
    mode: u32,
    data: Option<Source<'a>>,
}

/// The entries by normalized path, with implied parent directories added.
struct Tree<'a> {
    nodes: BTreeMap<String, Node<'a>>,
}

impl<'a> Tree<'a> {
    fn new(entries: &'a [CpioEntry]) -> Result<Self, DiskError> {
        let mut nodes = BTreeMap::new();
        for e in entries {
            let path = normalize(&e.path)?;
            let data = match &e.kind {
                CpioKind::Dir => None,
                CpioKind::File(CpioData::Bytes(b)) => Some(Source::Bytes(b)),
                CpioKind::File(CpioData::Path(p)) => Some(Source::Path(p)),
                CpioKind::Symlink(t) if t.is_empty() || t.contains('\0') => {
                    return Err(bad(&e.path, "symlink target is empty or contains NUL"))
                }
                CpioKind::Symlink(t) => Some(Source::Bytes(t.as_bytes())),
            };
            let node = Node {
                type_bits: e.type_bits(),
                mode: e.mode & PERM_MASK,
                data,
            };
            if nodes.insert(path.clone(), node).is_some() {
                return Err(DiskError::Duplicate { what: WHAT, path });
            }
        }
        let mut tree = Tree { nodes };
        tree.add_parents()?;
        Ok(tree)
    }

    fn add_parents(&mut self) -> Result<(), DiskError> {
        let paths: Vec<String> = self.nodes.keys().cloned().collect();
        for path in paths {
            let mut parent = path.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                parent = p;
                match self.nodes.get(parent) {
                    Some(n) if n.type_bits != S_IFDIR => {
                        return Err(bad(&path, "its parent is not a directory"))
                    }
                    Some(_) => {}
                    None => {
                        let dir = Node {
                            type_bits: S_IFDIR,
                            mode: 0o755,
                            data: None,
                        };
                        self.nodes.insert(parent.to_string(), dir);
                    }
                }
            }
        }
        Ok(())
    }

    /// The number of direct subdirectories of `dir`.
    fn subdirs(&self, dir: &str) -> u32 {
        let prefix = format!("{dir}/");
        let n = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .filter(|(p, n)| n.type_bits == S_IFDIR && !p[prefix.len()..].contains('/'))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

fn bad(path: &str, reason: &'static str) -> DiskError {
    DiskError::BadPath {
        what: WHAT,
        path: path.to_string(),
        reason,
    }
}

/// `/a//b/` becomes `a/b`; `.`, `..`, NUL and the root itself are refused.
fn normalize(path: &str) -> Result<String, DiskError> {
    if path.contains('\0') {
        return Err(bad(path, "contains NUL"));
    }
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if parts.is_empty() {
        return Err(bad(path, "names the archive root"));
    }
    if parts.iter().any(|c| *c == "." || *c == "..") {
        return Err(bad(path, "contains . or .."));
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry parsed back from a newc archive.
    #[derive(Debug, PartialEq)]
    struct Parsed {
        ino: u32,
        mode: u32,
        uid: u32,
        gid: u32,
        nlink: u32,
        mtime: u32,
        name: String,
        data: Vec<u8>,
    }

    fn hex(b: &[u8]) -> u32 {
        u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap()
    }

    /// A tiny independent newc reader: checks magic, padding and the trailer.
    fn parse(mut b: &[u8]) -> Vec<Parsed> {
        let total = b.len();
        let mut out = Vec::new();
        loop {
            assert_eq!((total - b.len()) % 4, 0, "header not 4-byte aligned");
            assert_eq!(&b[..6], b"070701");
            let f = |i: usize| hex(&b[6 + 8 * i..14 + 8 * i]);
            let (namesize, filesize) = (f(11) as usize, f(6) as usize);
            assert_eq!(f(12), 0, "check field");
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(b[110 + namesize - 1], 0);
            let data_at = (110 + namesize).div_ceil(4) * 4;
            assert!(b[110 + namesize..data_at].iter().all(|&x| x == 0));
            let data = b[data_at..data_at + filesize].to_vec();
            let next = (data_at + filesize).div_ceil(4) * 4;
            let p = Parsed {
                ino: f(0),
                mode: f(1),
                uid: f(2),
                gid: f(3),
                nlink: f(4),
                mtime: f(5),
                name,
                data,
            };
            b = &b[next.min(b.len())..];
            if p.name == TRAILER {
                assert!(b.is_empty(), "bytes after the trailer");
                return out;
            }
            out.push(p);
        }
    }

    fn sample() -> Vec<CpioEntry> {
        vec![
            CpioEntry::file("/usr/lib/modules/a.ko", b"module".to_vec(), 0o644),
            CpioEntry::symlink("/sbin", "usr/sbin"),
            CpioEntry::file("init", b"#!ELF".to_vec(), 0o755),
            CpioEntry::dir("/usr/sbin", 0o700),
            CpioEntry::file("etc/initrd-release", Vec::new(), 0o644),
        ]
    }

    fn archive(entries: &[CpioEntry]) -> Vec<u8> {
        let mut buf = Vec::new();
        write_cpio(entries, 1_700_000_000, &mut buf, Path::new("test")).unwrap();
        buf
    }

    #[test]
    fn round_trips_through_an_independent_reader() {
        let parsed = parse(&archive(&sample()));
        let names: Vec<&str> = parsed.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc",
                "etc/initrd-release",
                "init",
                "sbin",
                "usr",
                "usr/lib",
                "usr/lib/modules",
                "usr/lib/modules/a.ko",
                "usr/sbin"
            ]
        );
        let inos: Vec<u32> = parsed.iter().map(|p| p.ino).collect();
        assert_eq!(inos, (1..=9).collect::<Vec<_>>());
        for p in &parsed {
            assert_eq!((p.uid, p.gid, p.mtime), (0, 0, 1_700_000_000), "{}", p.name);
        }
        let get = |n: &str| parsed.iter().find(|p| p.name == n).unwrap();
        assert_eq!(get("init").mode, 0o100755);
        assert_eq!(get("init").data, b"#!ELF");
        assert_eq!(get("sbin").mode, 0o120777);
        assert_eq!(get("sbin").data, b"usr/sbin");
        assert_eq!(get("usr/sbin").mode, 0o040700);
        assert_eq!(get("usr/lib/modules/a.ko").data, b"module");
        assert_eq!(get("usr").nlink, 4, "usr has lib and sbin below it");
        assert_eq!(get("etc").nlink, 2);
        assert_eq!(get("etc/initrd-release").nlink, 1);
    }

    #[test]
    fn order_does_not_depend_on_the_input_order() {
        let mut reversed = sample();
        reversed.reverse();
        assert_eq!(archive(&sample()), archive(&reversed));
    }

    #[test]
    fn reads_host_files() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("f");
        std::fs::write(&host, b"from the host, 31 bytes long..").unwrap();
        let parsed = parse(&archive(&[CpioEntry::file_from("x/f", &host, 0o600)]));
        assert_eq!(parsed[1].data, b"from the host, 31 bytes long..");
        assert_eq!(parsed[1].mode, 0o100600);
    }

    #[test]
    fn refuses_bad_input() {
        let err = |e: Vec<CpioEntry>| {
            let mut buf = Vec::new();
            write_cpio(&e, 0, &mut buf, Path::new("t"))
                .unwrap_err()
                .to_string()
        };
        assert!(err(vec![CpioEntry::dir("a/../b", 0o755)]).contains("contains . or .."));
        assert!(err(vec![CpioEntry::dir("/", 0o755)]).contains("archive root"));
        assert!(err(vec![
            CpioEntry::dir("a", 0o755),
            CpioEntry::dir("/a/", 0o755)
        ])
        .contains("given twice"));
        assert!(err(vec![
            CpioEntry::file("a", Vec::new(), 0o644),
            CpioEntry::file("a/b", Vec::new(), 0o644)
        ])
        .contains("parent is not a directory"));
        assert!(
            err(vec![CpioEntry::file_from("a", "/nonexistent/x", 0o644)])
                .contains("/nonexistent/x")
        );
        let mut buf = Vec::new();
        assert!(write_cpio(&[], u64::from(u32::MAX) + 1, &mut buf, Path::new("t")).is_err());
    }

    #[test]
    fn empty_archive_is_just_the_trailer() {
        let b = archive(&[]);
        assert_eq!(
            b.len(),
            124,
            "110-byte header + \"TRAILER!!!\\0\", padded to 4"
        );
        assert!(parse(&b).is_empty());
    }
}
