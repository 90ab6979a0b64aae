//! The entry points of the two stages. A fatal error in either ends in [`crate::fatal`].

use crate::fatal::fatal;
use crate::stage1::Stage1;
use crate::sys::Real;
use caisson_layout::paths;
use std::path::Path;

/// Which stage this process is.
pub fn in_initramfs() -> bool {
    Path::new(paths::INITRD_MARKER).exists()
}

/// The binary's entry point: the stage this process is. Never returns.
pub fn entry() -> ! {
    // What the standard runtime would have done: a write to a closed socket or pipe is an
    // error, not a fatal signal.
    crate::sys::ignore_sigpipe();
    // Before any thread starts: every panic is logged (see crate::guard).
    crate::guard::install_hook();
    if rustix::process::getpid() != rustix::process::Pid::INIT {
        // Stage 2 mounts over /tmp, moves itself into a cgroup and, at shutdown, kills every
        // process: never let it loose on a running system.
        eprintln!("caisson-init is the machine's init and runs only as PID 1; use caisson-ctl");
        std::process::exit(2);
    }
    if in_initramfs() {
        stage1_main()
    } else {
        crate::stage2::main()
    }
}

/// Stage 1: prepare the root and switch to it. Never returns.
pub(crate) fn stage1_main() -> ! {
    crate::console::init(false);
    let sys = Real;
    let stage = Stage1::default();
    let prepared = crate::guard::catch("stage 1", || stage.prepare(&sys));
    let Some(prepared) = prepared else {
        fatal(&sys, &"stage 1 panicked")
    };
    match prepared {
        Ok(p) => {
            log::info!("switching to the root of {} (slot {})", p.version, p.slot);
            let err = stage.switch_root(&sys);
            fatal(&sys, &err)
        }
        Err(e) => fatal(&sys, &e),
    }
}
