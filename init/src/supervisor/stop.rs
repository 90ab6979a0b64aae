//! Stopping a service as a whole. A service's processes are everything in its cgroup
//! (`system/<name>`), not just its main process: a forked child outlives a stop by pid, and a
//! restart would run beside it. So a stop sends SIGTERM to every process in the cgroup, after the
//! stop timeout `cgroup.kill` SIGKILLs them all at once (each one by one on a kernel before 5.14),
//! and the service counts as stopped only once its main process has been collected and its
//! cgroup is empty, or [`KILL_GRACE`] after the SIGKILL, when the init gives up on them. What
//! comes next (a start, for a restart) waits until then, and so does the end of a shutdown.
//! Without cgroups (their set-up failed) only the main process is signalled, as before.
//!
//! A service whose main process ended on its own may leave processes behind: they are stopped
//! the same way before it starts again, and at shutdown.
//!
//! A service with `kill_mode = "process"` (containerd: its shims hold the running containers) is
//! stopped by its main process alone, as systemd's `KillMode=process`: SIGTERM and SIGKILL go to
//! that process only, the stop is done once it is collected, and a start does not wait for what
//! else is in the cgroup. At shutdown it is stopped as a whole cgroup like any other service.

use super::{AfterStop, State, Supervisor, Svc};
use crate::reaper::ChildId;
use crate::service::{KillMode, ServiceSpec};
use crate::{deps, sys::Sig};
use std::time::{Duration, Instant};

/// How long after SIGKILL processes that are still there are given up on.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// The stop timeout of a service without a definition.
const STOP_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

impl Supervisor {
    /// Whether processes are left in the cgroup of `name` (never, without cgroups). A cgroup that
    /// cannot be read counts as busy: the stop's timers bound the wait.
    pub(super) fn cgroup_busy(&self, name: &str) -> bool {
        let Some(cg) = &self.config.cgroups else {
            return false;
        };
        cg.populated(name).unwrap_or_else(|e| {
            log::debug!("{name}: {e}");
            true
        })
    }

    /// Whether a stop of `name` takes its whole cgroup: always at shutdown, and otherwise unless
    /// its `kill_mode` is `process`.
    fn whole_cgroup(&self, name: &str) -> bool {
        self.shutting_down
            || self
                .services
                .get(name)
                .and_then(|s| s.spec.as_ref())
                .is_none_or(|s| s.kill_mode == KillMode::Cgroup)
    }

    /// Whether processes that a stop or start of `name` waits for are left in its cgroup: none
    /// for a `kill_mode = "process"` service outside shutdown.
    fn leftovers(&self, name: &str) -> bool {
        self.whole_cgroup(name) && self.cgroup_busy(name)
    }

    /// Starts `name`, once nothing of its previous run is left in its cgroup.
    pub(super) fn start_clean(&mut self, name: &str, now: Instant) {
        if !self.leftovers(name) {
            self.start(name, now);
            return;
        }
        if self.services.get(name).is_some_and(|s| s.abandoned) {
            let why = "processes of its previous run survived SIGKILL and are still in its cgroup";
            log::error!("{name} not started: {why}");
            self.set_state(name, State::Failed(why.into()));
            return;
        }
        log::warn!("{name}: processes of its previous run are still running; stopping them first");
        self.begin_stop(name, None, AfterStop::Start, now);
    }

    pub(super) fn stop_one(&mut self, name: &str, then: AfterStop, now: Instant) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let main = match &mut svc.state {
            State::Stopping { then: next, .. } => {
                *next = then;
                return;
            }
            State::Running { pid, .. } => Some(*pid),
            _ => None,
        };
        let abandoned = svc.abandoned;
        if main.is_some() || (!abandoned && self.leftovers(name)) {
            self.begin_stop(name, main, then, now);
        } else {
            self.after_stop(name, then);
        }
    }

    /// SIGTERM to the service's processes, and the stop timeout starts.
    fn begin_stop(&mut self, name: &str, main: Option<ChildId>, then: AfterStop, now: Instant) {
        match main {
            Some(pid) => log::info!("stopping {name} ({pid})"),
            None => log::info!("stopping what is left of {name}"),
        }
        self.signal_all(name, main, Sig::Term);
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let timeout = svc
            .spec
            .as_ref()
            .map_or(STOP_TIMEOUT_DEFAULT, |s| s.stop_timeout);
        svc.state = State::Stopping {
            pid: main,
            kill_at: now + timeout,
            killed: false,
            then,
        };
    }

    /// `sig` to the main process (through the reaper: only while it is uncollected) and to every
    /// other process in the service's cgroup (unless only the main process is to be signalled).
    fn signal_all(&self, name: &str, main: Option<ChildId>, sig: Sig) {
        let main_pid = main.and_then(|m| match self.signal(m, sig) {
            Ok(true) => Some(m.pid),
            Ok(false) => None,
            Err(e) => {
                log::warn!("{sig:?} to {name} ({m}) failed: {e}");
                None
            }
        });
        let Some(cg) = self
            .config
            .cgroups
            .as_ref()
            .filter(|_| self.whole_cgroup(name))
        else {
            return;
        };
        match cg.procs(name) {
            Ok(pids) => {
                for pid in pids.into_iter().filter(|p| Some(*p) != main_pid) {
                    // ESRCH is a process that has just exited.
                    let _ = self.sys.kill(pid, sig);
                }
            }
            Err(e) => log::warn!("{name}: {e}; only its main process was signalled"),
        }
    }

    /// SIGKILL to everything in the service's cgroup: `cgroup.kill`, or one by one where the
    /// kernel has none (to the main process only, where only it is to be signalled).
    fn kill_all(&self, name: &str, main: Option<ChildId>) {
        let Some(cg) = self
            .config
            .cgroups
            .as_ref()
            .filter(|_| self.whole_cgroup(name))
        else {
            self.signal_all(name, main, Sig::Kill);
            return;
        };
        if let Some(m) = main {
            let _ = self.signal(m, Sig::Kill);
        }
        if let Err(e) = cg.kill(name) {
            log::info!("{e}; killing {name}'s processes one by one");
            self.signal_all(name, None, Sig::Kill);
        }
    }

    /// The main process of `name` exited: if it was stopping, it is done once its cgroup is empty.
    pub(super) fn main_stopped(&mut self, name: &str) {
        let Some(Svc {
            state: State::Stopping { pid, .. },
            ..
        }) = self.services.get_mut(name)
        else {
            return;
        };
        *pid = None;
        if self.leftovers(name) {
            log::info!("{name}'s main process exited; waiting for the rest of its cgroup");
        }
        self.tick_stopping(name, Instant::now(), false);
    }

    /// A stopping service: done once its main process is collected and its cgroup is empty;
    /// SIGKILL, then giving up, when its timers run out (`timers`: check them now).
    pub(super) fn tick_stopping(&mut self, name: &str, now: Instant, timers: bool) {
        let Some(State::Stopping {
            pid,
            kill_at,
            killed,
            then,
        }) = self.services.get(name).map(|s| s.state.clone())
        else {
            return;
        };
        if pid.is_none() && !self.leftovers(name) {
            log::info!("{name} stopped");
            if let Some(svc) = self.services.get_mut(name) {
                svc.abandoned = false;
            }
            self.after_stop(name, then);
        } else if timers && now >= kill_at && killed {
            self.give_up(name, pid, then);
        } else if timers && now >= kill_at {
            let what = if self.whole_cgroup(name) {
                "its cgroup"
            } else {
                "its main process"
            };
            log::warn!("{name} did not stop in time; sending SIGKILL to {what}");
            self.kill_all(name, pid);
            if let Some(Svc {
                state: State::Stopping {
                    kill_at, killed, ..
                },
                ..
            }) = self.services.get_mut(name)
            {
                *kill_at = now + KILL_GRACE;
                *killed = true;
            }
        }
    }

    /// Processes that survived SIGKILL for [`KILL_GRACE`] (stuck in the kernel): stop waiting
    /// for them. A restart does not start beside them: the service fails instead.
    fn give_up(&mut self, name: &str, main: Option<ChildId>, then: AfterStop) {
        let what = match main {
            Some(pid) => format!("its main process ({pid})"),
            None => "processes in its cgroup".into(),
        };
        log::warn!("{name}: {what} did not exit after SIGKILL; giving up on them");
        if let Some(pid) = main {
            self.pids.remove(&pid);
        }
        let shutting_down = self.shutting_down;
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.abandoned = true;
        svc.state = match then {
            AfterStop::Start if !shutting_down => {
                State::Failed(format!("{what} did not exit after SIGKILL"))
            }
            _ => State::Stopped,
        };
    }

    fn after_stop(&mut self, name: &str, then: AfterStop) {
        let state = match then {
            AfterStop::Start if !self.shutting_down => State::Waiting,
            _ => State::Stopped,
        };
        self.set_state(name, state);
    }

    /// Begin stopping everything, dependents before their dependencies.
    pub fn begin_shutdown(&mut self, now: Instant) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        self.commands.kill_all(self.sys.as_ref(), &self.reaper);
        // A `kill_mode = "process"` service being stopped signalled its main process only; the
        // rest of its cgroup is now waited for too, and gets its SIGTERM here.
        let stopping: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| matches!(s.state, State::Stopping { .. }))
            .filter(|(_, s)| {
                s.spec
                    .as_ref()
                    .is_some_and(|s| s.kill_mode == KillMode::Process)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in stopping {
            self.signal_all(&name, None, Sig::Term);
        }
        for svc in self.services.values_mut() {
            if matches!(svc.state, State::Waiting | State::Backoff { .. }) {
                svc.state = State::Stopped;
            }
        }
        self.tick_shutdown(now);
    }

    /// Stops each service whose dependents have stopped: the running ones, and what is left in
    /// the cgroups of the others. The shutdown is done once none is stopping.
    pub(super) fn tick_shutdown(&mut self, now: Instant) {
        let specs: Vec<ServiceSpec> = self
            .services
            .values()
            .filter_map(|s| s.spec.clone())
            .collect();
        for name in self.order.clone().iter().rev() {
            if self.needs_stop_at_shutdown(name) {
                let dependents_running = deps::dependents(&specs, name)
                    .iter()
                    .any(|d| self.services.get(*d).is_some_and(|s| s.is_running()));
                if !dependents_running {
                    self.stop_one(name, AfterStop::Stay, now);
                }
            }
            self.tick_stopping(name, now, true);
        }
    }

    fn needs_stop_at_shutdown(&self, name: &str) -> bool {
        match self.services.get(name) {
            Some(Svc {
                state: State::Running { .. },
                ..
            }) => true,
            Some(Svc {
                state: State::Stopping { .. },
                ..
            }) => false,
            Some(svc) => !svc.abandoned && self.leftovers(name),
            None => false,
        }
    }
}
