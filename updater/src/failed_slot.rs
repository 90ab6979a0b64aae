//! Whether the running slot failed dm-verity verification in this boot: the init's record
//! ([`caisson_layout::paths::VERITY_FAILED`], init/VERITY.md). A slot that failed gives no chunk
//! to an update: every chunk is fetched instead.

use caisson_layout::corruption::VerityFailure;
use caisson_layout::Slot;
use std::path::Path;

/// True when the record at `path` says `slot` failed verification. A record that cannot be
/// read or understood counts as a failure of any slot (logged): copying from a slot that may
/// be corrupted costs more than fetching it all.
pub fn failed(path: &Path, slot: Slot) -> bool {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
        Err(e) => {
            log::warn!(
                "reading {}: {e}; treating slot {slot} as failed verification",
                path.display()
            );
            return true;
        }
    };
    match VerityFailure::parse(&text) {
        Ok(f) => f.slot == slot,
        Err(e) => {
            log::warn!(
                "{}: {e}; treating slot {slot} as failed verification",
                path.display()
            );
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_recorded_slot_failed() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("verity-failed");
        assert!(!failed(&p, Slot::A));
        std::fs::write(&p, "slot=a block=12\n").unwrap();
        assert!(failed(&p, Slot::A));
        assert!(!failed(&p, Slot::B));
        std::fs::write(&p, "garbage").unwrap();
        assert!(failed(&p, Slot::B));
    }
}
