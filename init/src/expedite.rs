//! RCU grace periods expedited while the machine boots.
//!
//! The kernel expedites RCU grace periods during its own boot and stops when it starts the
//! init. Much of what the init does next waits for a grace period: mounting cgroup2 with
//! `favordynmods`, bringing up the loopback interface, moving a process into a cgroup, loading
//! modules. Under TCG ftrace showed 20-33 ms for each of the first two. Stage 1 turns
//! expediting back on (`/sys/kernel/rcu_expedited`) and stage 2 turns it off once the machine
//! is ready, so a running host pays no extra inter-processor interrupts. A command line that
//! sets `rcupdate.rcu_expedited` itself is the administrator's choice and is left alone.

use std::path::Path;

/// The kernel's switch, relative to the root.
pub const KNOB: &str = "sys/kernel/rcu_expedited";

/// Whether the init may touch the switch: not when the command line sets it.
pub fn ours(cmdline: &str) -> bool {
    !cmdline
        .split_whitespace()
        .any(|w| w.starts_with("rcupdate.rcu_expedited"))
}

/// Turns expediting on or off under `root`, unless the command line in `root/proc/cmdline`
/// chose. Returns whether it wrote the switch; a failure is logged, never fatal.
pub fn set(root: &Path, on: bool) -> bool {
    let cmdline = std::fs::read_to_string(root.join("proc/cmdline")).unwrap_or_default();
    if !ours(&cmdline) {
        return false;
    }
    let knob = root.join(KNOB);
    match std::fs::write(&knob, if on { "1\n" } else { "0\n" }) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("writing {}: {e}", knob.display());
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(cmdline: &str) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("proc")).unwrap();
        std::fs::create_dir_all(tmp.path().join("sys/kernel")).unwrap();
        std::fs::write(tmp.path().join("proc/cmdline"), cmdline).unwrap();
        std::fs::write(tmp.path().join(KNOB), "0\n").unwrap();
        tmp
    }

    #[test]
    fn turned_on_then_off() {
        let r = root("root=PARTUUID=x console=ttyS0\n");
        assert!(set(r.path(), true));
        assert_eq!(std::fs::read_to_string(r.path().join(KNOB)).unwrap(), "1\n");
        assert!(set(r.path(), false));
        assert_eq!(std::fs::read_to_string(r.path().join(KNOB)).unwrap(), "0\n");
    }

    #[test]
    fn a_command_line_that_chose_is_left_alone() {
        let r = root("console=ttyS0 rcupdate.rcu_expedited=1\n");
        std::fs::write(r.path().join(KNOB), "1\n").unwrap();
        assert!(!set(r.path(), false));
        assert_eq!(std::fs::read_to_string(r.path().join(KNOB)).unwrap(), "1\n");
        assert!(ours("console=ttyS0 rcupdate.rcu_normal=1"));
    }

    #[test]
    fn a_kernel_without_the_switch_is_not_an_error() {
        let r = root("console=ttyS0\n");
        std::fs::remove_file(r.path().join(KNOB)).unwrap();
        std::fs::remove_dir(r.path().join("sys/kernel")).unwrap();
        assert!(!set(r.path(), true));
    }
}
