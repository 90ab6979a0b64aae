//! The one owner of `waitpid`, and the registry that ties each exit to the spawn it belongs to.
//!
//! The signal thread calls [`Reaper::reap_all`] on every SIGCHLD; every spawn goes through
//! [`Reaper::start`]. Both hold the same lock, so a reap can never run while a spawn is in
//! progress: the standard library's `Command::spawn` waits for a child whose `exec` failed, and
//! that wait must not be raced.
//!
//! A pid alone does not say which process ended. Exits travel from the signal thread to the
//! supervisor through a channel, and between the reap and the delivery the kernel may hand the
//! same pid to a new child (a service, a readiness probe): matched by pid, the old exit would be
//! taken as the new child's (a probe "succeeds" before it ran, and a false ready feeds blessing).
//! So every spawn gets a [`ChildId`], a pid plus a serial number never used twice, and the
//! registry maps each live pid to its `ChildId`:
//!
//! - it is inserted by [`Reaper::start`] right after `clone` returns, with the lock still held,
//!   so no reap can come before it;
//! - it is removed by [`Reaper::reap_all`] under the same lock, in the same step that collects
//!   the zombie. While a zombie is not collected, its pid cannot be given to anyone else, so at
//!   that moment the registered `ChildId` is exactly the process that ended;
//! - [`Reaper::signal`] sends a signal only while the child is registered, under the lock: the
//!   process is alive or an uncollected zombie, so its pid is still its own.
//!
//! An exit is delivered as its `ChildId`, and the supervisor matches `ChildId`s, never bare pids:
//! a stale exit cannot match a later child with the same pid, since their serials differ. Exits of
//! processes the init did not start (orphans reparented to PID 1) have no `ChildId` and are only
//! collected. (A pidfd would name the process too, but `waitpid(-1)` still reports pids, so the
//! pid-to-process question would remain at delivery; the registry answers it at the reap, where
//! it is unambiguous, and needs no kernel feature.)

use crate::sys::{ExecPlan, Exit, Pid, Sig, Spawned, Syscall};
use std::collections::HashMap;
use std::io;
use std::sync::{Mutex, MutexGuard};

/// One process the init started: its pid and a serial number unique for the init's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChildId {
    pub pid: Pid,
    serial: u64,
}

impl std::fmt::Display for ChildId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}", self.pid)
    }
}

/// The children started and not yet collected.
#[derive(Debug, Default)]
struct Registry {
    live: HashMap<Pid, u64>,
    next_serial: u64,
}

/// Serialises spawning and reaping, and keeps the registry.
#[derive(Debug, Default)]
pub struct Reaper {
    lock: Mutex<Registry>,
}

impl Reaper {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start `plan` with reaping held off, and register the child.
    pub fn start(&self, sys: &dyn Syscall, plan: &ExecPlan) -> io::Result<(ChildId, Spawned)> {
        let mut reg = self.registry();
        let spawned = sys.spawn(plan)?;
        reg.next_serial += 1;
        let id = ChildId {
            pid: spawned.pid,
            serial: reg.next_serial,
        };
        reg.live.insert(id.pid, id.serial);
        Ok((id, spawned))
    }

    /// Collect every exited child (services, probes and orphans alike); returns the exits of the
    /// children [`Reaper::start`] started.
    pub fn reap_all(&self, sys: &dyn Syscall) -> Vec<(ChildId, Exit)> {
        let mut reg = self.registry();
        let mut exits = Vec::new();
        loop {
            match sys.reap_one() {
                Ok(Some((pid, exit))) => match reg.live.remove(&pid) {
                    Some(serial) => exits.push((ChildId { pid, serial }, exit)),
                    None => log::debug!("collected pid {pid}, not started by the init ({exit})"),
                },
                Ok(None) => break,
                Err(e) => {
                    log::warn!("waitpid failed: {e}");
                    break;
                }
            }
        }
        exits
    }

    /// Send `sig` to `child` (`group`: to its process group) if it has not been collected yet;
    /// `Ok(false)` when it has, and nothing was sent.
    pub fn signal(
        &self,
        sys: &dyn Syscall,
        child: ChildId,
        sig: Sig,
        group: bool,
    ) -> io::Result<bool> {
        let reg = self.registry();
        if reg.live.get(&child.pid) != Some(&child.serial) {
            return Ok(false);
        }
        let target = if group { -child.pid } else { child.pid };
        sys.kill(target, sig)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, Recording};

    fn plan() -> ExecPlan {
        ExecPlan {
            program: "/bin/true".into(),
            ..Default::default()
        }
    }

    #[test]
    fn reaps_everything_waiting_and_reports_only_its_own_children() {
        let sys = Recording::new(std::path::Path::new("/"));
        let r = Reaper::default();
        let (a, _) = r.start(&sys, &plan()).unwrap();
        let (b, _) = r.start(&sys, &plan()).unwrap();
        sys.push_exit(a.pid, Exit::Code(0));
        sys.push_exit(4242, Exit::Code(1));
        sys.push_exit(b.pid, Exit::Signal(9));
        assert_eq!(r.reap_all(&sys), [(a, Exit::Code(0)), (b, Exit::Signal(9))]);
        assert!(r.reap_all(&sys).is_empty());
    }

    #[test]
    fn a_recycled_pid_is_a_different_child() {
        let sys = Recording::new(std::path::Path::new("/"));
        let r = Reaper::default();
        sys.set_next_pid(300);
        let (old, _) = r.start(&sys, &plan()).unwrap();
        sys.push_exit(300, Exit::Code(0));
        let exits = r.reap_all(&sys);
        // The kernel gives pid 300 to the next child before the old exit is delivered.
        sys.set_next_pid(300);
        let (new, _) = r.start(&sys, &plan()).unwrap();
        assert_eq!(new.pid, old.pid);
        assert_ne!(new, old);
        assert_eq!(exits, [(old, Exit::Code(0))]);
    }

    #[test]
    fn a_collected_child_is_not_signalled() {
        let sys = Recording::new(std::path::Path::new("/"));
        let r = Reaper::default();
        let (c, _) = r.start(&sys, &plan()).unwrap();
        assert!(r.signal(&sys, c, Sig::Term, false).unwrap());
        sys.push_exit(c.pid, Exit::Code(0));
        r.reap_all(&sys);
        assert!(!r.signal(&sys, c, Sig::Kill, true).unwrap());
        let kills: Vec<Call> = sys
            .calls()
            .into_iter()
            .filter(|k| matches!(k, Call::Kill(..)))
            .collect();
        assert_eq!(kills, [Call::Kill(c.pid, Sig::Term)]);
    }
}
