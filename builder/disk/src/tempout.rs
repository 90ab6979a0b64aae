//! An output file written under a temporary name next to its final name, renamed into place on
//! success and removed when dropped before that.

use crate::DiskError;
use std::fs;
use std::path::{Path, PathBuf};

/// A temporary path beside `out`; removed on drop unless [`TempOut::commit`] ran.
pub(crate) struct TempOut {
    tmp: PathBuf,
    out: PathBuf,
    done: bool,
}

impl TempOut {
    /// Reserves `.<name>.tmp-<pid>` beside `out`, removing a stale one left by a crash.
    pub(crate) fn new(out: &Path) -> Result<Self, DiskError> {
        let name = out
            .file_name()
            .ok_or_else(|| DiskError::BadPath {
                what: "output",
                path: out.display().to_string(),
                reason: "has no file name",
            })?
            .to_string_lossy();
        let tmp = out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        remove_if_exists(&tmp)?;
        Ok(TempOut {
            tmp,
            out: out.to_path_buf(),
            done: false,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the temporary file to the output name.
    pub(crate) fn commit(mut self) -> Result<(), DiskError> {
        fs::rename(&self.tmp, &self.out)
            .map_err(DiskError::io("renaming into place", &self.out))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for TempOut {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<(), DiskError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(DiskError::io("removing", path)(e))
        }
        _ => Ok(()),
    }
}
