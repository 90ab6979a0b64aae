//! A content-addressed download cache: `<root>/sha256/<hex>`.
//!
//! Files enter it only through [`Cache::store`], which writes to a temporary file in
//! `<root>/tmp`, checks size and sha256, and renames into place; so the cache never holds a
//! file under a hash it does not have.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{DebianError, IoContext};

/// The package and index cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    root: PathBuf,
}

/// Where [`Cache::store`]'s filler writes; hashes and counts what passes through.
pub struct Sink {
    out: BufWriter<File>,
    path: PathBuf,
    hasher: Sha256,
    size: u64,
}

impl Sink {
    /// Appends `buf`.
    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), DebianError> {
        self.out.write_all(buf).ctx("writing", &self.path)?;
        self.hasher.update(buf);
        self.size += buf.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Cache {
    /// A cache rooted at `root` (created on first store).
    pub fn new(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    /// The user's cache: `$XDG_CACHE_HOME/caisson`, else `$HOME/.cache/caisson`.
    pub fn from_env() -> Result<Cache, DebianError> {
        let non_empty = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty());
        if let Some(xdg) = non_empty("XDG_CACHE_HOME") {
            return Ok(Cache::new(PathBuf::from(xdg).join("caisson")));
        }
        let home = non_empty("HOME").ok_or(DebianError::NoCacheDir)?;
        Ok(Cache::new(
            PathBuf::from(home).join(".cache").join("caisson"),
        ))
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the file with this sha256 lives (whether or not it is there).
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(sha256.to_ascii_lowercase())
    }

    /// The cached file with this sha256 and size, after checking both. A cached file that fails
    /// the check is removed, and `None` returned, so it is downloaded again.
    pub fn get(&self, sha256: &str, size: u64) -> Result<Option<PathBuf>, DebianError> {
        let path = self.path(sha256);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx("reading", path),
        };
        if meta.len() == size && hash_file(&path)? == sha256.to_ascii_lowercase() {
            return Ok(Some(path));
        }
        log::warn!("{}: corrupt cache entry, removing it", path.display());
        std::fs::remove_file(&path).ctx("removing", &path)?;
        Ok(None)
    }

    /// Stores what `fill` writes under `sha256`, if it has exactly that hash and `size`;
    /// otherwise nothing is stored and [`DebianError::HashMismatch`] names `what`.
    pub fn store(
        &self,
        sha256: &str,
        size: u64,
        what: &str,
        fill: impl FnOnce(&mut Sink) -> Result<(), DebianError>,
    ) -> Result<PathBuf, DebianError> {
        let tmp_dir = self.root.join("tmp");
        let final_dir = self.root.join("sha256");
        for dir in [&tmp_dir, &final_dir] {
            std::fs::create_dir_all(dir).ctx("creating", dir)?;
        }
        let tmp = tempfile::NamedTempFile::new_in(&tmp_dir).ctx("creating a file in", &tmp_dir)?;
        let file = tmp.reopen().ctx("opening", tmp.path())?;
        let mut sink = Sink {
            out: BufWriter::new(file),
            path: tmp.path().to_path_buf(),
            hasher: Sha256::new(),
            size: 0,
        };
        fill(&mut sink)?;
        sink.out.flush().ctx("writing", tmp.path())?;
        let actual = hex::encode(sink.hasher.finalize());
        let expected = sha256.to_ascii_lowercase();
        if actual != expected || sink.size != size {
            return Err(DebianError::HashMismatch {
                what: what.to_string(),
                expected_sha256: expected,
                actual_sha256: actual,
                expected_size: size,
                actual_size: sink.size,
            });
        }
        let path = self.path(&expected);
        let readable = std::fs::Permissions::from_mode(0o644);
        tmp.as_file()
            .set_permissions(readable)
            .ctx("setting the mode of", tmp.path())?;
        tmp.persist(&path)
            .map_err(|e| e.error)
            .ctx("renaming into", &path)?;
        Ok(path)
    }
}

/// The sha256 of a file, lowercase hex.
pub fn hash_file(path: &Path) -> Result<String, DebianError> {
    let mut file = File::open(path).ctx("opening", path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).ctx("reading", path)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO_SHA: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn store_verifies_and_get_rechecks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        assert_eq!(cache.get(HELLO_SHA, 5).unwrap(), None);
        let p = cache
            .store(HELLO_SHA, 5, "hello", |s| s.write_all(b"hello"))
            .unwrap();
        assert_eq!(p, dir.path().join("sha256").join(HELLO_SHA));
        assert_eq!(cache.get(HELLO_SHA, 5).unwrap(), Some(p.clone()));
        // A corrupted entry is noticed and removed.
        std::fs::write(&p, b"hellO").unwrap();
        assert_eq!(cache.get(HELLO_SHA, 5).unwrap(), None);
        assert!(!p.exists());
    }

    #[test]
    fn mismatch_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let err = cache
            .store(HELLO_SHA, 5, "x.deb", |s| s.write_all(b"hellO"))
            .unwrap_err();
        assert!(matches!(err, DebianError::HashMismatch { .. }), "{err}");
        assert!(err.to_string().contains("x.deb"));
        let err = cache
            .store(HELLO_SHA, 6, "x.deb", |s| s.write_all(b"hello"))
            .unwrap_err();
        assert!(err.to_string().contains("expected 6 bytes"), "{err}");
        assert!(!cache.path(HELLO_SHA).exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
