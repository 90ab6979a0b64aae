//! Panics in PID 1. If PID 1 ends, the kernel panics and the machine is gone, with the reason
//! scrolled off the console. With `panic = "abort"` any panic on any of the init's threads did
//! that. Proving that no input reaches a panic is not possible for code that parses files,
//! network answers and control requests and indexes slices, and a proof would not survive the
//! next change. So the `caisson-init` binary is built with `panic = "unwind"` (`ci/build` builds it
//! on its own for that; the workspace's other binaries abort), and the init catches panics where
//! they would end it:
//!
//! - the hook ([`install_hook`]) logs every panic with its thread and place, on the console and
//!   in the journal of the boot, and counts it;
//! - the threads that must always run (the event loop, the signal and reaping thread, the control
//!   socket's listener) run their body under [`restarting`]: a panic is caught and the body runs
//!   again after a pause, with the state it keeps outside the body;
//! - any other thread (one control connection, the log pump of one service, blessing) just ends:
//!   its work is lost, the init goes on;
//! - a panic while stage 1 or stage 2 is setting up is a fatal error: logged, then a reboot, as for
//!   any other fatal error (see [`crate::fatal::fatal`]).
//!
//! A panic in the middle of a supervisor tick may leave one service's state half-updated; the
//! next turn of the loop works from it. That is far better than a kernel panic. A build of the
//! `caisson-init` binary with `panic = "abort"` would make all of this dead code: it does not
//! compile (`init/src/main.rs`). This library may be built with abort (`caisson` and `caisson-ctl`
//! link it to parse service files and speak the control protocol): there a panic ends that tool.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Panics caught since the init started.
static PANICS: AtomicU64 = AtomicU64::new(0);

/// How many panics [`catch`] has caught.
pub fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// Logs every panic (the default hook's message, through the init's logger).
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        log::error!("panic in the init's {name} thread: {info}");
    }));
}

/// Runs `body`; a panic is caught (the hook has logged it) and gives `None`.
pub fn catch<T>(what: &str, body: impl FnOnce() -> T) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => Some(v),
        Err(_) => {
            PANICS.fetch_add(1, Ordering::Relaxed);
            log::error!("{what} panicked; the init goes on");
            None
        }
    }
}

/// Runs `body` until it returns; after a panic, `pause` and run it again.
pub fn restarting<T>(what: &str, pause: Duration, mut body: impl FnMut() -> T) -> T {
    loop {
        if let Some(v) = catch(what, &mut body) {
            return v;
        }
        log::error!("restarting {what} in {} ms", pause.as_millis());
        std::thread::sleep(pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_body_is_caught_counted_and_run_again() {
        let before = panics();
        let mut runs = 0;
        let result = restarting("the test loop", Duration::from_millis(1), || {
            runs += 1;
            if runs < 3 {
                panic!("boom {runs}");
            }
            runs * 10
        });
        assert_eq!((runs, result), (3, 30));
        assert!(panics() >= before + 2);
    }

    #[test]
    fn a_thread_that_panics_ends_alone() {
        let t = std::thread::Builder::new()
            .name("doomed".into())
            .spawn(|| {
                let v: Vec<u8> = Vec::new();
                #[allow(clippy::indexing_slicing)]
                v[1]
            })
            .unwrap();
        assert!(t.join().is_err());
        assert_eq!(catch("fine", || 5), Some(5));
    }
}
