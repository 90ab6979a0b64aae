//! What a machine whose running root failed verification does, decided from the boot entries
//! alone.

use caisson_layout::{EntryName, Slot};

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This boot is being tried (its entry has tries left): reboot, and boot counting falls
    /// back once they are used up.
    Reboot,
    /// A blessed (or used-up) entry, and the other slot holds a version the boot loader may
    /// boot: mark this entry bad, then reboot into the other slot.
    MarkBadAndReboot { other: EntryName },
    /// Nothing better to boot: stay up, degraded.
    Degraded,
}

/// Decides for the running `version` in `slot`, given every entry on the ESP.
///
/// An entry with tries left is still being tried: a reboot lets the boot loader count it down.
/// Otherwise the running entry is blessed (or on its last try, or the boot loader's last
/// resort): rebooting helps only if the other slot has an entry that is not used up (blessed,
/// or with tries left: the updater wrote and read back that slot before adding its entry).
/// Without one, a reboot would boot this slot again: the machine stays up instead.
pub fn decide(entries: &[EntryName], version: &str, slot: Slot) -> Verdict {
    let own = entries
        .iter()
        .find(|e| e.version == version && e.slot == slot);
    if own.and_then(|e| e.counter).is_some_and(|c| c.left > 0) {
        return Verdict::Reboot;
    }
    let other = entries
        .iter()
        .filter(|e| e.slot == slot.other() && !e.is_exhausted())
        .max_by(|a, b| a.counter.is_none().cmp(&b.counter.is_none()));
    match other {
        Some(other) => Verdict::MarkBadAndReboot {
            other: other.clone(),
        },
        None => Verdict::Degraded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<EntryName> {
        v.iter().map(|n| EntryName::parse(n).unwrap()).collect()
    }

    #[test]
    fn a_tried_boot_reboots() {
        let e = names(&["caisson-1.0.0-a.conf", "caisson-2.0.0-b+2-1.conf"]);
        assert_eq!(decide(&e, "2.0.0", Slot::B), Verdict::Reboot);
    }

    #[test]
    fn a_blessed_boot_with_a_good_other_slot_marks_itself_bad_and_reboots() {
        let e = names(&["caisson-1.0.0-a.conf", "caisson-2.0.0-b.conf"]);
        assert_eq!(
            decide(&e, "2.0.0", Slot::B),
            Verdict::MarkBadAndReboot {
                other: EntryName::parse("caisson-1.0.0-a.conf").unwrap()
            }
        );
        // The other slot's update, written and waiting to be tried, is bootable too.
        let e = names(&["caisson-1.0.0-a.conf", "caisson-2.0.0-b+3-0.conf"]);
        assert!(matches!(
            decide(&e, "1.0.0", Slot::A),
            Verdict::MarkBadAndReboot { .. }
        ));
    }

    #[test]
    fn a_blessed_boot_without_a_good_other_slot_stays_up_degraded() {
        let alone = names(&["caisson-1.0.0-a.conf"]);
        assert_eq!(decide(&alone, "1.0.0", Slot::A), Verdict::Degraded);
        let other_used_up = names(&["caisson-1.0.0-a.conf", "caisson-2.0.0-b+0-3.conf"]);
        assert_eq!(decide(&other_used_up, "1.0.0", Slot::A), Verdict::Degraded);
    }

    #[test]
    fn the_last_try_or_last_resort_reboots_only_into_a_bootable_other_slot() {
        // On its last try (systemd-boot counted it down to +0 before booting it).
        let e = names(&["caisson-1.0.0-a.conf", "caisson-2.0.0-b+0-3.conf"]);
        assert!(matches!(
            decide(&e, "2.0.0", Slot::B),
            Verdict::MarkBadAndReboot { .. }
        ));
        // Marked bad before, booted as the last resort since the other is used up: no loop.
        let e = names(&["caisson-1.0.0-a+0-1.conf", "caisson-2.0.0-b+0-3.conf"]);
        assert_eq!(decide(&e, "1.0.0", Slot::A), Verdict::Degraded);
    }

    #[test]
    fn an_unknown_running_entry_counts_as_blessed() {
        let e = names(&["caisson-1.0.0-b.conf"]);
        assert!(matches!(
            decide(&e, "9.9.9", Slot::A),
            Verdict::MarkBadAndReboot { .. }
        ));
        assert_eq!(decide(&[], "9.9.9", Slot::A), Verdict::Degraded);
    }
}
