//! The fatal path of both stages: a fatal error is logged and ends in a reboot after a pause,
//! never in an exit of PID1 (which would panic the kernel and hide why). A leaf: it needs only
//! the system calls.

use crate::sys::{Power, Syscall};
use std::time::Duration;

/// How long the reason stays on the screen before the reboot.
pub const FATAL_PAUSE: Duration = Duration::from_secs(10);

/// Log `err`, wait, sync and reboot. Never returns.
pub fn fatal(sys: &dyn Syscall, err: &dyn std::fmt::Display) -> ! {
    log::error!("{err}");
    log::error!("rebooting in {} s", FATAL_PAUSE.as_secs());
    std::thread::sleep(FATAL_PAUSE);
    sys.sync();
    if let Err(e) = sys.reboot(Power::Reboot) {
        log::error!("reboot failed: {e}");
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
