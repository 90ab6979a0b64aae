//! Blessing the boot entry: once the machine has been healthy for the configured period, rename
//! `loader/entries/caisson-<version>-<slot>+L-D.conf` to `caisson-<version>-<slot>.conf`, so that
//! systemd-boot stops counting tries. An entry without a counter needs nothing.

use caisson_layout::{paths, EntryName, Slot};
use std::path::{Path, PathBuf};

/// A failure to bless.
#[derive(Debug, thiserror::Error)]
pub enum BlessError {
    #[error("reading {path} failed: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("renaming {from} to {to} failed: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Bless the entry of `version` in `slot` on the ESP mounted at `esp`. Returns the new name when
/// something was renamed.
pub fn bless(esp: &Path, version: &str, slot: Slot) -> Result<Option<String>, BlessError> {
    let dir = esp.join(paths::ESP_ENTRIES_DIR);
    let rd = std::fs::read_dir(&dir).map_err(|source| BlessError::Read {
        path: dir.clone(),
        source,
    })?;
    for e in rd.filter_map(|e| e.ok()) {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let Ok(entry) = EntryName::parse(&file_name) else {
            continue;
        };
        if entry.version != version || entry.slot != slot || entry.counter.is_none() {
            continue;
        }
        let blessed = entry.blessed().to_string();
        let to = dir.join(&blessed);
        std::fs::rename(e.path(), &to).map_err(|source| BlessError::Rename {
            from: e.path(),
            to: to.clone(),
            source,
        })?;
        return Ok(Some(blessed));
    }
    Ok(None)
}

/// True when the entry of `version` in `slot` on the ESP mounted at `esp` still counts tries: this
/// boot is being tried, and the boot loader falls back once its tries are used up.
pub fn is_counting(esp: &Path, version: &str, slot: Slot) -> Result<bool, BlessError> {
    let dir = esp.join(paths::ESP_ENTRIES_DIR);
    let rd = std::fs::read_dir(&dir).map_err(|source| BlessError::Read {
        path: dir.clone(),
        source,
    })?;
    Ok(rd.filter_map(|e| e.ok()).any(|e| {
        EntryName::parse(&e.file_name().to_string_lossy())
            .is_ok_and(|n| n.version == version && n.slot == slot && n.counter.is_some())
    }))
}

/// Every Caisson entry on the ESP mounted at `esp` (other files are skipped).
pub fn entries(esp: &Path) -> Result<Vec<EntryName>, BlessError> {
    let dir = esp.join(paths::ESP_ENTRIES_DIR);
    let rd = std::fs::read_dir(&dir).map_err(|source| BlessError::Read {
        path: dir.clone(),
        source,
    })?;
    Ok(rd
        .filter_map(|e| e.ok())
        .filter_map(|e| EntryName::parse(&e.file_name().to_string_lossy()).ok())
        .collect())
}

/// Marks the entry of `version` in `slot` bad (`+0-N`, see [`EntryName::marked_bad`]), so that
/// systemd-boot boots the other slot first. Returns the new name when something was renamed;
/// an entry already marked needs nothing.
pub fn mark_bad(esp: &Path, version: &str, slot: Slot) -> Result<Option<String>, BlessError> {
    let dir = esp.join(paths::ESP_ENTRIES_DIR);
    let Some(entry) = entries(esp)?
        .into_iter()
        .find(|e| e.version == version && e.slot == slot)
    else {
        return Ok(None);
    };
    let bad = entry.marked_bad();
    if bad == entry {
        return Ok(None);
    }
    let (from, to) = (dir.join(entry.to_string()), dir.join(bad.to_string()));
    std::fs::rename(&from, &to).map_err(|source| BlessError::Rename {
        from: from.clone(),
        to: to.clone(),
        source,
    })?;
    Ok(Some(bad.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_only_our_counted_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("loader/entries");
        std::fs::create_dir_all(&dir).unwrap();
        for n in [
            "caisson-1.1.0-b+1-2.conf",
            "caisson-1.0.0-a.conf",
            "caisson-1.1.0-a+3-0.conf",
            "other.conf",
        ] {
            std::fs::write(dir.join(n), "title x\n").unwrap();
        }
        let got = bless(tmp.path(), "1.1.0", Slot::B).unwrap();
        assert_eq!(got.as_deref(), Some("caisson-1.1.0-b.conf"));
        assert!(dir.join("caisson-1.1.0-b.conf").exists());
        assert!(!dir.join("caisson-1.1.0-b+1-2.conf").exists());
        assert!(dir.join("caisson-1.1.0-a+3-0.conf").exists());
        assert_eq!(bless(tmp.path(), "1.1.0", Slot::B).unwrap(), None);
        assert_eq!(bless(tmp.path(), "1.0.0", Slot::A).unwrap(), None);
    }

    #[test]
    fn counting_only_for_our_entry_with_a_counter() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("loader/entries");
        std::fs::create_dir_all(&dir).unwrap();
        for n in ["caisson-2.0.0-a.conf", "caisson-3.0.0-b+0-3.conf"] {
            std::fs::write(dir.join(n), "title x\n").unwrap();
        }
        assert!(is_counting(tmp.path(), "3.0.0", Slot::B).unwrap());
        assert!(!is_counting(tmp.path(), "2.0.0", Slot::A).unwrap());
        assert!(!is_counting(tmp.path(), "3.0.0", Slot::A).unwrap());
    }

    #[test]
    fn marking_bad_renames_our_entry_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("loader/entries");
        std::fs::create_dir_all(&dir).unwrap();
        for n in ["caisson-1.0.0-a.conf", "caisson-2.0.0-b.conf", "other.conf"] {
            std::fs::write(dir.join(n), "title x\n").unwrap();
        }
        let got = mark_bad(tmp.path(), "2.0.0", Slot::B).unwrap();
        assert_eq!(got.as_deref(), Some("caisson-2.0.0-b+0-1.conf"));
        assert!(dir.join("caisson-2.0.0-b+0-1.conf").exists());
        assert!(dir.join("caisson-1.0.0-a.conf").exists());
        assert_eq!(mark_bad(tmp.path(), "2.0.0", Slot::B).unwrap(), None);
        assert_eq!(mark_bad(tmp.path(), "9.0.0", Slot::A).unwrap(), None);
        let mut names: Vec<String> = entries(tmp.path())
            .unwrap()
            .iter()
            .map(|e| e.to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["caisson-1.0.0-a.conf", "caisson-2.0.0-b+0-1.conf"]);
    }
}
