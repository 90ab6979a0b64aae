//! Unpacking the data archive of a `.deb` into a merged-/usr tree, as an unprivileged user and
//! without maintainer scripts.
//!
//! Every path is resolved inside the destination as if it were the root directory: `..` in an
//! entry is refused, and symlinks met on the way (absolute or relative, from this package or an
//! earlier one) are followed within the destination, never out of it.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::error::{DebianError, IoContext};
use crate::pipe::{pipelined, read_full, xz_reader};

/// Top-level directories that live under `/usr` in a merged-/usr system.
const MERGED: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// The ones [`merged_usr_skeleton`] links (the amd64 set).
const SKELETON: [&str; 4] = ["bin", "sbin", "lib", "lib64"];
/// Symlinks followed while resolving one path before giving up (as Linux does).
const MAX_SYMLINKS: usize = 40;

/// What kind of entry was extracted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link, with its target as written in the package.
    Symlink(PathBuf),
    /// A hard link to another path of the package (after mapping).
    Hardlink(PathBuf),
}

/// One extracted entry, for the SBOM and for the image's ownership table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractedFile {
    /// Path relative to the destination, after the merged-/usr mapping (`usr/bin/sh`).
    pub path: PathBuf,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (`0o4755`).
    pub mode: u32,
    /// Owner in the package (not applied: extraction is unprivileged).
    pub uid: u64,
    /// Group in the package (not applied).
    pub gid: u64,
    /// Size in bytes of regular files and hard links, else 0.
    pub size: u64,
    /// sha256 of regular files and hard links, lowercase hex.
    pub sha256: Option<String>,
}

/// Creates `usr/{bin,sbin,lib,lib64}` in `dest` and the top-level links `bin -> usr/bin`,
/// `sbin -> usr/sbin`, `lib -> usr/lib`, `lib64 -> usr/lib64`. Safe to call again.
pub fn merged_usr_skeleton(dest: &Path) -> Result<(), DebianError> {
    for name in SKELETON {
        let real = dest.join("usr").join(name);
        fs::create_dir_all(&real).ctx("creating", &real)?;
        let link = dest.join(name);
        let target = Path::new("usr").join(name);
        match fs::read_link(&link) {
            Ok(t) if t == target => continue,
            Ok(_) => fs::remove_file(&link).ctx("replacing", &link)?,
            Err(_) if link.symlink_metadata().is_ok() => {
                return Err(DebianError::Io {
                    action: "linking",
                    path: link,
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "exists and is not a symlink; merged /usr needs it to be one",
                    ),
                })
            }
            Err(_) => {}
        }
        std::os::unix::fs::symlink(&target, &link).ctx("linking", &link)?;
    }
    Ok(())
}

/// Extracts the data archive of `deb` (`data.tar` with xz, zstd, gzip or no compression) into
/// `dest`, mapping `/bin`, `/sbin`, `/lib*` under `/usr`. Modes (setuid included), symlinks and
/// hard links are kept; device nodes and FIFOs are skipped with a warning. Returns every entry
/// written, in archive order.
pub fn extract(deb: &Path, dest: &Path) -> Result<Vec<ExtractedFile>, DebianError> {
    extract_with(deb, dest, &ExtractOptions::default())
}

/// Choices for [`extract_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtractOptions {
    /// Paths (relative, after the merged-/usr mapping, e.g. `usr/share/doc`) whose entries,
    /// and everything below them, are neither written nor listed.
    pub skip: Vec<PathBuf>,
}

/// [`extract`], leaving out what `options` says.
pub fn extract_with(
    deb: &Path,
    dest: &Path,
    options: &ExtractOptions,
) -> Result<Vec<ExtractedFile>, DebianError> {
    let file = File::open(deb).ctx("opening", deb)?;
    let mut ar = ar::Archive::new(BufReader::new(file));
    while let Some(member) = ar.next_entry() {
        let member = member.ctx("reading", deb)?;
        let id = String::from_utf8_lossy(member.header().identifier()).to_string();
        let id = id.trim_end_matches('/');
        if let Some(compression) = id.strip_prefix("data.tar") {
            let reader = decompressor(compression, member, deb)?;
            return pipelined(reader, |r| Unpacker::new(deb, dest, options).run(r));
        }
    }
    Err(DebianError::BadDeb {
        deb: deb.to_path_buf(),
        reason: "no data.tar member; is it a Debian package?".to_string(),
    })
}

fn decompressor<'a>(
    suffix: &str,
    member: impl Read + Send + 'a,
    deb: &Path,
) -> Result<Box<dyn Read + Send + 'a>, DebianError> {
    Ok(match suffix {
        ".xz" => Box::new(xz_reader(member).ctx("reading", deb)?),
        ".zst" => Box::new(zstd::Decoder::new(member).ctx("reading", deb)?),
        ".gz" => Box::new(flate2::read::GzDecoder::new(member)),
        "" => Box::new(member),
        other => {
            return Err(DebianError::BadDeb {
                deb: deb.to_path_buf(),
                reason: format!("unsupported data.tar compression {other:?}"),
            })
        }
    })
}

/// Normalizes an archive path: drops `.` and leading `/`, refuses `..`. `None` for the root.
fn normalize(raw: &Path) -> Option<Result<PathBuf, ()>> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return Some(Err(())),
        }
    }
    (!out.as_os_str().is_empty()).then_some(Ok(out))
}

/// `bin/x` -> `usr/bin/x`, and likewise for the other merged directories.
fn map_merged_usr(rel: &Path) -> PathBuf {
    match rel.components().next() {
        Some(Component::Normal(first)) if MERGED.iter().any(|m| first == *m) => {
            Path::new("usr").join(rel)
        }
        _ => rel.to_path_buf(),
    }
}

/// The state of one extraction.
struct Unpacker<'a> {
    deb: &'a Path,
    dest: &'a Path,
    options: &'a ExtractOptions,
    /// The copy buffer, reused for every file.
    buf: Vec<u8>,
    out: Vec<ExtractedFile>,
    /// sha256 and size of regular files written so far, by mapped path, for hard links.
    hashes: HashMap<PathBuf, (String, u64)>,
    /// Directory modes, applied at the end so a read-only directory can still be filled.
    dir_modes: Vec<(PathBuf, u32)>,
}

impl<'a> Unpacker<'a> {
    fn new(deb: &'a Path, dest: &'a Path, options: &'a ExtractOptions) -> Self {
        Unpacker {
            deb,
            dest,
            options,
            buf: vec![0u8; 256 * 1024],
            out: Vec::new(),
            hashes: HashMap::new(),
            dir_modes: Vec::new(),
        }
    }

    fn run(mut self, reader: impl Read) -> Result<Vec<ExtractedFile>, DebianError> {
        fs::create_dir_all(self.dest).ctx("creating", self.dest)?;
        let mut tar = tar::Archive::new(reader);
        for entry in tar.entries().ctx("reading", self.deb)? {
            let entry = entry.ctx("reading", self.deb)?;
            self.entry(entry)?;
        }
        for (path, mode) in self.dir_modes.iter().rev() {
            set_mode(path, *mode)?;
        }
        Ok(self.out)
    }

    fn unsafe_path(&self, raw: &Path) -> DebianError {
        DebianError::UnsafePath {
            deb: self.deb.to_path_buf(),
            entry: raw.display().to_string(),
            dest: self.dest.to_path_buf(),
        }
    }

    /// The mapped relative path of an archive path (`None` for the root entry).
    fn mapped(&self, raw: &Path) -> Result<Option<PathBuf>, DebianError> {
        match normalize(raw) {
            None => Ok(None),
            Some(Err(())) => Err(self.unsafe_path(raw)),
            Some(Ok(rel)) => Ok(Some(map_merged_usr(&rel))),
        }
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), DebianError> {
        let raw = entry.path().ctx("reading", self.deb)?.into_owned();
        let Some(rel) = self.mapped(&raw)? else {
            return Ok(());
        };
        if self.skipped(&rel) {
            return Ok(());
        }
        let header = entry.header();
        let mode = header.mode().ctx("reading", self.deb)? & 0o7777;
        let uid = header.uid().ctx("reading", self.deb)?;
        let gid = header.gid().ctx("reading", self.deb)?;
        let mtime = header.mtime().unwrap_or(0);
        let link = entry
            .link_name()
            .ctx("reading", self.deb)?
            .map(|l| l.into_owned());
        let (kind, size, sha256) = match (header.entry_type(), link) {
            (tar::EntryType::Directory, _) => (self.dir(&rel, mode)?, 0, None),
            (tar::EntryType::Regular | tar::EntryType::Continuous, _) => {
                let (hash, size) = self.file(&rel, &mut entry, mode, mtime)?;
                (EntryKind::File, size, Some(hash))
            }
            (tar::EntryType::Symlink, Some(target)) => {
                if MERGED.iter().any(|m| raw_is_top(&raw, m)) {
                    log::debug!(
                        "{}: skipping {}: merged /usr owns it",
                        self.deb.display(),
                        raw.display()
                    );
                    return Ok(());
                }
                self.symlink(&rel, &target)?;
                (EntryKind::Symlink(target), 0, None)
            }
            (tar::EntryType::Link, Some(target)) => {
                let target = self
                    .mapped(&target)?
                    .ok_or_else(|| self.unsafe_path(&raw))?;
                if self.skipped(&target) {
                    log::warn!(
                        "{}: skipping {}: it links to the skipped {}",
                        self.deb.display(),
                        rel.display(),
                        target.display()
                    );
                    return Ok(());
                }
                let (hash, size) = self.hardlink(&rel, &target)?;
                (EntryKind::Hardlink(target), size, Some(hash))
            }
            (other, _) => {
                log::warn!(
                    "{}: skipping {} ({other:?}): cannot be made unprivileged",
                    self.deb.display(),
                    raw.display()
                );
                return Ok(());
            }
        };
        self.out.push(ExtractedFile {
            path: rel,
            kind,
            mode,
            uid,
            gid,
            size,
            sha256,
        });
        Ok(())
    }

    fn skipped(&self, rel: &Path) -> bool {
        self.options.skip.iter().any(|s| rel.starts_with(s))
    }

    fn dir(&mut self, rel: &Path, mode: u32) -> Result<EntryKind, DebianError> {
        let real = self.resolve(rel, true)?;
        self.dir_modes.push((real, mode));
        Ok(EntryKind::Dir)
    }

    fn file(
        &mut self,
        rel: &Path,
        data: &mut impl Read,
        mode: u32,
        mtime: u64,
    ) -> Result<(String, u64), DebianError> {
        let path = self.prepare(rel)?;
        let mut file = File::create(&path).ctx("creating", &path)?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let n = read_full(data, &mut self.buf).ctx("reading", self.deb)?;
            if n == 0 {
                break;
            }
            file.write_all(&self.buf[..n]).ctx("writing", &path)?;
            hasher.update(&self.buf[..n]);
            size += n as u64;
        }
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime))
            .ctx("setting the time of", &path)?;
        drop(file);
        set_mode(&path, mode)?;
        let hash = hex::encode(hasher.finalize());
        self.hashes.insert(rel.to_path_buf(), (hash.clone(), size));
        Ok((hash, size))
    }

    fn symlink(&mut self, rel: &Path, target: &Path) -> Result<(), DebianError> {
        let path = self.prepare(rel)?;
        std::os::unix::fs::symlink(target, &path).ctx("creating symlink", &path)
    }

    fn hardlink(&mut self, rel: &Path, target: &Path) -> Result<(String, u64), DebianError> {
        let original = self.resolve(target, false)?;
        let path = self.prepare(rel)?;
        fs::hard_link(&original, &path).ctx("linking", &path)?;
        let known = self.hashes.get(target).cloned();
        let (hash, size) = match known {
            Some(h) => h,
            None => {
                let size = fs::metadata(&path).ctx("reading", &path)?.len();
                (crate::cache::hash_file(&path)?, size)
            }
        };
        self.hashes.insert(rel.to_path_buf(), (hash.clone(), size));
        Ok((hash, size))
    }

    /// The real path to write `rel` at: its parent resolved (and created) inside the
    /// destination, and whatever non-directory was there removed.
    fn prepare(&self, rel: &Path) -> Result<PathBuf, DebianError> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        let name = rel.file_name().ok_or_else(|| self.unsafe_path(rel))?;
        let path = self.resolve(parent, true)?.join(name);
        match path.symlink_metadata() {
            Ok(m) if m.is_dir() => Err(DebianError::BadDeb {
                deb: self.deb.to_path_buf(),
                reason: format!(
                    "{} would replace the directory {}",
                    rel.display(),
                    path.display()
                ),
            }),
            Ok(_) => fs::remove_file(&path).ctx("replacing", &path).map(|_| path),
            Err(_) => Ok(path),
        }
    }

    /// Resolves `rel` inside the destination as if the destination were `/`: symlinks are
    /// followed (absolute ones from the destination), `..` stops at the destination.
    /// With `create`, missing directories are made.
    fn resolve(&self, rel: &Path, create: bool) -> Result<PathBuf, DebianError> {
        let mut done: Vec<OsString> = Vec::new();
        let mut todo: VecDeque<OsString> = parts(rel);
        let mut links = 0;
        while let Some(part) = todo.pop_front() {
            if part == ".." {
                done.pop();
                continue;
            }
            let here: PathBuf = self
                .dest
                .iter()
                .chain(done.iter().map(|p| p.as_ref()))
                .collect();
            let next = here.join(&part);
            match next.symlink_metadata() {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(self.unsafe_path(rel));
                    }
                    let target = fs::read_link(&next).ctx("reading", &next)?;
                    if target.is_absolute() {
                        done.clear();
                    }
                    for p in parts(&target).into_iter().rev() {
                        todo.push_front(p);
                    }
                }
                Ok(m) if m.is_dir() => done.push(part),
                Ok(_) if todo.is_empty() && !create => done.push(part),
                Ok(_) => {
                    return Err(DebianError::BadDeb {
                        deb: self.deb.to_path_buf(),
                        reason: format!("{} is not a directory", next.display()),
                    })
                }
                Err(_) if create => {
                    fs::create_dir(&next).ctx("creating", &next)?;
                    done.push(part);
                }
                Err(e) => return Err(e).ctx("reading", next),
            }
        }
        Ok(self
            .dest
            .iter()
            .chain(done.iter().map(|p| p.as_ref()))
            .collect())
    }
}

/// Whether an archive path is exactly the top-level directory `name` (`./bin`, `/bin`).
fn raw_is_top(raw: &Path, name: &str) -> bool {
    normalize(raw).is_some_and(|r| r.is_ok_and(|r| r == Path::new(name)))
}

/// The components of a path as names and `..`, dropping `/` and `.`.
fn parts(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

fn set_mode(path: &Path, mode: u32) -> Result<(), DebianError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).ctx("setting the mode of", path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    enum E<'a> {
        Dir(&'a str),
        File(&'a str, u32, &'a [u8]),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Fifo(&'a str),
    }

    /// Writes raw bytes into a fixed-size header field (the tar crate refuses `..`, which is
    /// the point of some tests).
    fn raw(field: &mut [u8], value: &str) {
        field.fill(0);
        field[..value.len()].copy_from_slice(value.as_bytes());
    }

    fn tar_xz(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_old();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            let (path, data, kind, mode): (&str, &[u8], _, u32) = match e {
                E::Dir(p) => (p, b"", tar::EntryType::Directory, 0o755),
                E::File(p, m, d) => (p, d, tar::EntryType::Regular, *m),
                E::Sym(p, t) => {
                    raw(&mut h.as_old_mut().linkname, t);
                    (p, b"", tar::EntryType::Symlink, 0o777)
                }
                E::Hard(p, t) => {
                    raw(&mut h.as_old_mut().linkname, t);
                    (p, b"", tar::EntryType::Link, 0o755)
                }
                E::Fifo(p) => (p, b"", tar::EntryType::Fifo, 0o644),
            };
            raw(&mut h.as_old_mut().name, path);
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&tar).unwrap();
        xz.finish().unwrap()
    }

    fn deb(dir: &Path, entries: &[E]) -> PathBuf {
        let path = dir.join("test.deb");
        let mut ar = ar::Builder::new(File::create(&path).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let header = ar::Header::new(name.as_bytes().to_vec(), data.len() as u64);
            ar.append(&header, data).unwrap();
        };
        add("debian-binary", b"2.0\n");
        add(
            "control.tar.xz",
            &tar_xz(&[E::File("./control", 0o644, b"Package: t\n")]),
        );
        add("data.tar.xz", &tar_xz(entries));
        path
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn maps_merged_usr_and_keeps_modes_and_links() {
        let tmp = tempfile::tempdir().unwrap();
        let deb = deb(
            tmp.path(),
            &[
                E::Dir("./"),
                E::Dir("./bin/"),
                E::File("./bin/busybox", 0o755, b"BUSYBOX"),
                E::Sym("./bin/sh", "busybox"),
                E::File("./usr/bin/passwd", 0o4755, b"PASSWD"),
                E::Hard("./usr/bin/ash", "./bin/busybox"),
                E::File("./lib64/ld.so", 0o644, b"LD"),
                E::Sym("./bin", "usr/bin"),
                E::Fifo("./run/initctl"),
            ],
        );
        let dest = tmp.path().join("root");
        merged_usr_skeleton(&dest).unwrap();
        merged_usr_skeleton(&dest).unwrap();
        let files = extract(&deb, &dest).unwrap();

        let meta = |p: &str| fs::symlink_metadata(dest.join(p)).unwrap();
        assert_eq!(fs::read(dest.join("usr/bin/busybox")).unwrap(), b"BUSYBOX");
        assert_eq!(
            fs::read(dest.join("bin/busybox")).unwrap(),
            b"BUSYBOX",
            "via bin -> usr/bin"
        );
        assert_eq!(
            fs::read_link(dest.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert_eq!(meta("usr/bin/passwd").mode() & 0o7777, 0o4755);
        assert_eq!(meta("usr/bin/busybox").mode() & 0o7777, 0o755);
        assert_eq!(
            fs::read_link(dest.join("usr/bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert_eq!(meta("usr/bin/ash").ino(), meta("usr/bin/busybox").ino());
        assert_eq!(fs::read(dest.join("usr/lib64/ld.so")).unwrap(), b"LD");
        assert!(!dest.join("run/initctl").exists());
        assert_eq!(meta("usr/bin/busybox").mtime(), 1_700_000_000);

        let paths: Vec<&str> = files.iter().map(|f| f.path.to_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "usr/bin",
                "usr/bin/busybox",
                "usr/bin/sh",
                "usr/bin/passwd",
                "usr/bin/ash",
                "usr/lib64/ld.so"
            ]
        );
        assert_eq!(files[1].sha256.as_deref(), Some(sha(b"BUSYBOX").as_str()));
        assert_eq!(files[1].size, 7);
        assert_eq!(files[3].mode, 0o4755);
        assert_eq!(files[2].kind, EntryKind::Symlink("busybox".into()));
        assert_eq!(files[4].kind, EntryKind::Hardlink("usr/bin/busybox".into()));
        assert_eq!(files[4].sha256, files[1].sha256);
    }

    #[test]
    fn skipped_prefixes_are_left_out() {
        let tmp = tempfile::tempdir().unwrap();
        let deb = deb(
            tmp.path(),
            &[
                E::File("./usr/share/doc/t/copyright", 0o644, b"c"),
                E::Hard("./usr/share/doc/t/copy2", "./usr/share/doc/t/copyright"),
                E::Hard("./usr/bin/c", "./usr/share/doc/t/copyright"),
                E::File("./usr/share/docs", 0o644, b"kept"),
                E::File("./bin/t", 0o755, b"t"),
            ],
        );
        let dest = tmp.path().join("root");
        let options = ExtractOptions {
            skip: vec!["usr/share/doc".into()],
        };
        let files = extract_with(&deb, &dest, &options).unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f.path.to_str().unwrap()).collect();
        assert_eq!(paths, ["usr/share/docs", "usr/bin/t"]);
        assert!(!dest.join("usr/share/doc").exists());
    }

    #[test]
    fn parent_dir_entries_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("root");
        for bad in [
            &[E::File("../escape", 0o644, b"x")][..],
            &[E::File("./usr/../../escape", 0o644, b"x")][..],
            &[E::File("./a", 0o644, b"x"), E::Hard("./b", "../escape")][..],
        ] {
            let deb = deb(tmp.path(), bad);
            let err = extract(&deb, &dest).unwrap_err();
            assert!(matches!(err, DebianError::UnsafePath { .. }), "{err}");
            assert!(err.to_string().contains("escape"), "{err}");
            assert!(!tmp.path().join("escape").exists());
        }
    }

    #[test]
    fn symlinks_are_followed_inside_dest_only() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let outside_str = outside.to_str().unwrap().to_string();
        let deb = deb(
            tmp.path(),
            &[
                E::Sym("./etc/evil", &outside_str),
                E::File("./etc/evil/pwned", 0o644, b"x"),
                E::Sym("./etc/up", "../../../../../../.."),
                E::File("./etc/up/top", 0o644, b"y"),
                E::Sym("./etc/loop", "loop"),
            ],
        );
        let dest = tmp.path().join("root");
        extract(&deb, &dest).unwrap();
        assert!(
            !outside.join("pwned").exists(),
            "wrote through an absolute symlink"
        );
        let rerooted = dest.join(outside.strip_prefix("/").unwrap()).join("pwned");
        assert_eq!(fs::read(rerooted).unwrap(), b"x");
        assert_eq!(fs::read(dest.join("top")).unwrap(), b"y");
        assert!(!tmp.path().join("top").exists());

        let deb = super::tests::deb(tmp.path(), &[E::File("./etc/loop/x", 0o644, b"z")]);
        assert!(extract(&deb, &dest).is_err(), "symlink loop");
    }

    #[test]
    fn not_a_deb() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.deb");
        fs::write(&path, b"!<arch>\nnot really").unwrap();
        let err = extract(&path, tmp.path()).unwrap_err().to_string();
        assert!(err.contains("x.deb"), "{err}");
        let err = extract(&tmp.path().join("none.deb"), tmp.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("none.deb"), "{err}");
    }

    /// Packages built by dpkg-deb itself, with each compression it offers.
    #[test]
    fn dpkg_deb_built_packages() {
        if std::process::Command::new("dpkg-deb")
            .arg("--version")
            .output()
            .is_err()
        {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("DEBIAN")).unwrap();
        fs::create_dir_all(src.join("sbin")).unwrap();
        fs::write(
            src.join("DEBIAN/control"),
            "Package: t\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t.invalid>\nDescription: t\n",
        )
        .unwrap();
        fs::write(src.join("sbin/tool"), b"TOOL").unwrap();
        fs::set_permissions(src.join("sbin/tool"), fs::Permissions::from_mode(0o4750)).unwrap();
        let mut built = 0;
        for z in ["xz", "gzip", "zstd", "none"] {
            let deb = tmp.path().join(format!("t-{z}.deb"));
            let ok = std::process::Command::new("dpkg-deb")
                .args(["--root-owner-group", &format!("-Z{z}"), "--build"])
                .arg(&src)
                .arg(&deb)
                .output()
                .unwrap()
                .status
                .success();
            if !ok {
                continue; // this dpkg-deb lacks that compressor
            }
            built += 1;
            let dest = tmp.path().join(format!("root-{z}"));
            let files = extract(&deb, &dest).unwrap();
            assert_eq!(
                fs::read(dest.join("usr/sbin/tool")).unwrap(),
                b"TOOL",
                "{z}"
            );
            let tool = files
                .iter()
                .find(|f| f.path == Path::new("usr/sbin/tool"))
                .unwrap();
            assert_eq!((tool.mode, tool.uid, tool.gid), (0o4750, 0, 0), "{z}");
        }
        assert!(built >= 3, "dpkg-deb built only {built} variants");
    }
}
