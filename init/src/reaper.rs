//! The one owner of `waitpid`.
//!
//! The signal thread calls [`Reaper::reap_all`] on every SIGCHLD; every spawn goes through
//! [`Reaper::spawn`]. Both hold the same lock, so a reap can never run while a spawn is in
//! progress: the standard library's `Command::spawn` waits for a child whose `exec` failed, and
//! that wait must not be raced. Exits are handed to the supervisor in order through a channel;
//! the supervisor records a spawned pid before it reads the next exit, and keeps exits of pids it
//! does not know yet (see `Supervisor::on_exit`), so no exit status is lost.

use crate::sys::{Exit, Pid, Syscall};
use std::sync::Mutex;

/// Serialises spawning and reaping.
#[derive(Debug, Default)]
pub struct Reaper {
    lock: Mutex<()>,
}

impl Reaper {
    /// Run `spawn` with reaping held off.
    pub fn spawn<T>(&self, spawn: impl FnOnce() -> T) -> T {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        spawn()
    }

    /// Collect every exited child (services, probes and orphans alike).
    pub fn reap_all(&self, sys: &dyn Syscall) -> Vec<(Pid, Exit)> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut exits = Vec::new();
        loop {
            match sys.reap_one() {
                Ok(Some(e)) => exits.push(e),
                Ok(None) => break,
                Err(e) => {
                    log::warn!("waitpid failed: {e}");
                    break;
                }
            }
        }
        exits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::Recording;

    #[test]
    fn reaps_everything_waiting() {
        let sys = Recording::new(std::path::Path::new("/"));
        sys.push_exit(10, Exit::Code(0));
        sys.push_exit(11, Exit::Signal(9));
        let r = Reaper::default();
        assert_eq!(
            r.reap_all(&sys),
            [(10, Exit::Code(0)), (11, Exit::Signal(9))]
        );
        assert!(r.reap_all(&sys).is_empty());
        assert_eq!(r.spawn(|| 5), 5);
    }
}
