//! The record the init leaves when the running root fails dm-verity verification
//! ([`crate::paths::VERITY_FAILED`], under `/run`, so it lasts one boot): which slot, and the first
//! corrupted data block when the kernel named it. The updater reads it and copies no chunk from
//! that slot.
//!
//! One line: `slot=<a|b> block=<N|unknown>`.

use crate::Slot;
use std::fmt;

/// A root slot that failed verification in this boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerityFailure {
    pub slot: Slot,
    /// The first corrupted data block (4 KiB units from the start of the slot), when known.
    pub block: Option<u64>,
}

/// A record that does not follow the format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a verity failure record (slot=<a|b> block=<N|unknown>)")]
pub struct BadRecord(pub String);

impl VerityFailure {
    /// Parses the record's text (surrounding white space ignored).
    pub fn parse(text: &str) -> Result<Self, BadRecord> {
        let bad = || BadRecord(text.trim().to_string());
        let mut words = text.split_whitespace();
        let slot = words
            .next()
            .and_then(|w| w.strip_prefix("slot="))
            .and_then(|s| s.parse::<Slot>().ok())
            .ok_or_else(bad)?;
        let block = match words.next().and_then(|w| w.strip_prefix("block=")) {
            Some("unknown") => None,
            Some(n) => Some(n.parse().map_err(|_| bad())?),
            None => return Err(bad()),
        };
        if words.next().is_some() {
            return Err(bad());
        }
        Ok(VerityFailure { slot, block })
    }

    /// The console line the init prints, without the `caisson: ` prefix.
    pub fn message(&self) -> String {
        match self.block {
            Some(n) => format!("root slot {} failed verification at block {n}", self.slot),
            None => format!(
                "root slot {} failed verification at an unknown block",
                self.slot
            ),
        }
    }
}

impl fmt::Display for VerityFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot={} block=", self.slot)?;
        match self.block {
            Some(n) => writeln!(f, "{n}"),
            None => writeln!(f, "unknown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for f in [
            VerityFailure {
                slot: Slot::A,
                block: Some(1234),
            },
            VerityFailure {
                slot: Slot::B,
                block: None,
            },
        ] {
            assert_eq!(VerityFailure::parse(&f.to_string()), Ok(f));
        }
        assert_eq!(
            VerityFailure {
                slot: Slot::A,
                block: Some(7)
            }
            .to_string(),
            "slot=a block=7\n"
        );
    }

    #[test]
    fn messages() {
        let f = VerityFailure {
            slot: Slot::A,
            block: Some(42),
        };
        assert_eq!(f.message(), "root slot a failed verification at block 42");
        let f = VerityFailure {
            slot: Slot::B,
            block: None,
        };
        assert_eq!(
            f.message(),
            "root slot b failed verification at an unknown block"
        );
    }

    #[test]
    fn rejects_what_is_not_a_record() {
        for t in [
            "",
            "slot=c block=1",
            "slot=a",
            "slot=a block=x",
            "block=1 slot=a",
            "slot=a block=1 more",
        ] {
            assert!(VerityFailure::parse(t).is_err(), "{t}");
        }
    }
}
