//! Boot Loader Specification entry names and systemd-boot boot counters.
//!
//! An entry is `caisson-<version>-<slot>.conf` (blessed, or the first image's entry), or
//! `caisson-<version>-<slot>+<left>-<done>.conf` while it is being tried. systemd-boot decrements
//! `left` and increments `done` before it boots the entry, and sorts entries with `left == 0` last.

use crate::Slot;
use std::fmt;

/// The prefix of every Caisson entry file name.
pub const PREFIX: &str = "caisson-";
/// The suffix of every entry file name.
pub const SUFFIX: &str = ".conf";
/// How many tries a freshly written entry gets.
pub const INITIAL_TRIES: u32 = 3;

/// The boot counter part of an entry name: `+left-done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootCounter {
    pub left: u32,
    pub done: u32,
}

/// A parsed entry file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryName {
    pub version: String,
    pub slot: Slot,
    pub counter: Option<BootCounter>,
}

/// An entry file name that does not follow the Caisson pattern.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a Caisson boot entry name (caisson-<version>-<a|b>[+L[-D]].conf)")]
pub struct BadEntryName(pub String);

impl EntryName {
    /// A new entry for `version` in `slot`, with the counter a fresh update gets.
    pub fn new_tried(version: &str, slot: Slot) -> Self {
        EntryName {
            version: version.to_string(),
            slot,
            counter: Some(BootCounter {
                left: INITIAL_TRIES,
                done: 0,
            }),
        }
    }

    /// A blessed entry (no counter), as in the first image.
    pub fn new_blessed(version: &str, slot: Slot) -> Self {
        EntryName {
            version: version.to_string(),
            slot,
            counter: None,
        }
    }

    /// The file name without the counter: what it becomes once blessed.
    pub fn blessed(&self) -> EntryName {
        EntryName {
            counter: None,
            ..self.clone()
        }
    }

    /// The name that marks the entry bad, as the Boot Loader Specification does for a used-up
    /// entry (`+0-N`): systemd-boot sorts it after every entry with tries left or none counted,
    /// and boots it only when nothing else is left. Tries already made are kept; a blessed
    /// entry counts one.
    pub fn marked_bad(&self) -> EntryName {
        let done = self.counter.map_or(1, |c| c.done.max(1));
        EntryName {
            counter: Some(BootCounter { left: 0, done }),
            ..self.clone()
        }
    }

    /// The entry id systemd-boot shows (the file name without counter and suffix).
    pub fn id(&self) -> String {
        format!("{PREFIX}{}-{}", self.version, self.slot)
    }

    /// True when the boot loader has used up every try of this entry.
    pub fn is_exhausted(&self) -> bool {
        matches!(self.counter, Some(BootCounter { left: 0, .. }))
    }

    /// Parses a file name such as `caisson-1.1.0-b+2-1.conf`.
    pub fn parse(file_name: &str) -> Result<Self, BadEntryName> {
        let bad = || BadEntryName(file_name.to_string());
        let stem = file_name
            .strip_prefix(PREFIX)
            .and_then(|s| s.strip_suffix(SUFFIX))
            .ok_or_else(bad)?;
        let (base, counter) = match stem.rsplit_once('+') {
            Some((base, c)) => (base, Some(parse_counter(c).ok_or_else(bad)?)),
            None => (stem, None),
        };
        let (version, slot) = base.rsplit_once('-').ok_or_else(bad)?;
        let slot = match slot {
            "a" => Slot::A,
            "b" => Slot::B,
            _ => return Err(bad()),
        };
        if version.is_empty() || version.contains('/') {
            return Err(bad());
        }
        Ok(EntryName {
            version: version.to_string(),
            slot,
            counter,
        })
    }
}

fn parse_counter(s: &str) -> Option<BootCounter> {
    let (left, done) = match s.split_once('-') {
        Some((l, d)) => (l, d),
        None => (s, "0"),
    };
    Some(BootCounter {
        left: left.parse().ok()?,
        done: done.parse().ok()?,
    })
}

impl fmt::Display for EntryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.id())?;
        if let Some(c) = self.counter {
            write!(f, "+{}-{}", c.left, c.done)?;
        }
        f.write_str(SUFFIX)
    }
}

/// systemd-boot's configuration: no menu, no automatic entries.
pub const LOADER_CONF: &str =
    "timeout 0\nconsole-mode keep\neditor no\nauto-entries no\nauto-firmware no\n";

/// The text of the Boot Loader Specification entry that boots `params`: its own kernel and
/// initramfs, and a command line that pins its slot, root partition and verity root hash.
pub fn render(params: &crate::cmdline::BootParams, cmdline_extra: &str) -> String {
    use crate::paths::{esp_initrd, esp_kernel};
    let options = if cmdline_extra.is_empty() {
        params.render()
    } else {
        format!("{} {}", params.render(), cmdline_extra)
    };
    format!(
        "title Caisson {v} (slot {s})\nversion {v}\nsort-key caisson\nlinux /{k}\ninitrd /{i}\noptions {options}\n",
        v = params.version,
        s = params.slot,
        k = esp_kernel(&params.version, params.slot),
        i = esp_initrd(&params.version, params.slot),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_systemd_boot_writes() {
        let e = EntryName::parse("caisson-1.1.0-b+2-1.conf").unwrap();
        assert_eq!(e.version, "1.1.0");
        assert_eq!(e.slot, Slot::B);
        assert_eq!(e.counter, Some(BootCounter { left: 2, done: 1 }));
        assert_eq!(e.to_string(), "caisson-1.1.0-b+2-1.conf");
        assert_eq!(e.blessed().to_string(), "caisson-1.1.0-b.conf");
        let plain = EntryName::parse("caisson-1.0.0-rc1-a.conf").unwrap();
        assert_eq!(plain.version, "1.0.0-rc1");
        assert_eq!(plain.counter, None);
        let left_only = EntryName::parse("caisson-2-a+3.conf").unwrap();
        assert_eq!(left_only.counter, Some(BootCounter { left: 3, done: 0 }));
    }

    #[test]
    fn exhausted_and_new() {
        assert!(EntryName::parse("caisson-1-a+0-3.conf")
            .unwrap()
            .is_exhausted());
        assert_eq!(
            EntryName::new_tried("1.2.0", Slot::B).to_string(),
            "caisson-1.2.0-b+3-0.conf"
        );
    }

    #[test]
    fn marked_bad_sorts_last() {
        let blessed = EntryName::new_blessed("1.0.0", Slot::A);
        assert_eq!(blessed.marked_bad().to_string(), "caisson-1.0.0-a+0-1.conf");
        assert!(blessed.marked_bad().is_exhausted());
        let tried = EntryName::parse("caisson-2.0.0-b+1-2.conf").unwrap();
        assert_eq!(tried.marked_bad().to_string(), "caisson-2.0.0-b+0-2.conf");
    }

    #[test]
    fn rejects_foreign_names() {
        for n in [
            "other.conf",
            "caisson-1.0-c.conf",
            "caisson--a.conf",
            "caisson-1-a+x.conf",
            "caisson-1-a",
        ] {
            assert!(EntryName::parse(n).is_err(), "{n}");
        }
    }
}
