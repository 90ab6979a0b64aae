//! Watching the root's dm-verity target (init/VERITY.md).
//!
//! dm-verity fails every read of a block that does not match the hash tree, and the services
//! that read it die (containerd of SIGBUS) and are restarted forever. A thread asks the kernel
//! for the target's status every few seconds (one `DM_TABLE_STATUS` ioctl); once it turns to
//! `C`, it prints one line (`root slot a failed verification at block N`), records the failure
//! for the updater ([`caisson_layout::paths::VERITY_FAILED`]), and acts on what the boot
//! entries allow ([`decide`]): reboot a tried boot, mark a blessed one bad and reboot into the
//! other slot, or stay up degraded, the reason in `caisson-ctl status`.

mod decide;
mod status;

pub use decide::{decide, Verdict};
pub use status::{corrupted_data_block, kmsg_message, verity, Verity};

use crate::modules::{List, Loading};
use caisson_layout::cmdline::BootParams;
use caisson_layout::corruption::VerityFailure;
use caisson_layout::paths;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// How often the target's status is asked for.
pub const POLL: Duration = Duration::from_secs(5);

/// Where the watch mounts the ESP when it must change an entry: its own mount point, so that it
/// never meets the blessing thread's.
const ESP_AT: &str = "/run/caisson/verity-esp";

/// Why the machine runs degraded, once it does.
static DEGRADED: Mutex<Option<String>> = Mutex::new(None);

/// Why the machine runs degraded (the root failed verification and nothing better can be
/// booted); `None` while it is not.
pub fn degraded() -> Option<String> {
    DEGRADED.lock().ok().and_then(|d| d.clone())
}

fn set_degraded(reason: String) {
    log::error!("{reason}");
    if let Ok(mut d) = DEGRADED.lock() {
        *d = Some(reason);
    }
}

/// Asks the event loop to reboot (its normal shutdown: services stopped, disks unmounted).
pub type Reboot = Box<dyn FnOnce() + Send>;

/// Starts the watch on a thread of its own. Without verity parameters on the command line (a
/// development boot) there is nothing to watch.
pub fn start(params: Option<BootParams>, modules: Loading, reboot: Reboot) {
    let Some(params) = params.filter(|p| p.verity.is_some()) else {
        log::info!("the root is not a dm-verity device: not watching it");
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("verity".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            crate::guard::catch("the verity watch", || watch(&params, &modules, reboot));
        });
    if let Err(e) = spawned {
        log::error!("no thread to watch the root's verification: {e}");
    }
}

/// Polls until the target turns corrupted, then reports and acts. Returns early when the
/// status cannot be read (logged once).
fn watch(params: &BootParams, modules: &Loading, reboot: Reboot) {
    let control = match crate::dm::Control::open() {
        Ok(c) => c,
        Err(e) => {
            log::warn!("{e}; not watching the root's verification");
            return;
        }
    };
    loop {
        match control.status(paths::VERITY_DM_NAME).map(|t| verity(&t)) {
            Ok(Some(Verity::Verified)) => std::thread::sleep(POLL),
            Ok(Some(Verity::Corrupted)) => break,
            Ok(None) => {
                log::warn!(
                    "{} has no verity status this init knows; not watching it",
                    paths::VERITY_DM_NAME
                );
                return;
            }
            Err(e) => {
                log::warn!("{e}; not watching the root's verification");
                return;
            }
        }
    }
    let failure = VerityFailure {
        slot: params.slot,
        block: status::first_corrupted_block_in_kmsg(),
    };
    log::error!("{}", failure.message());
    record(&failure);
    // The ESP is vfat, an early module.
    modules.wait(List::Early);
    act(params, &failure, reboot);
}

/// Writes the record the updater reads (replaced whole, never half-written).
fn record(failure: &VerityFailure) {
    let path = Path::new(paths::VERITY_FAILED);
    let tmp = path.with_extension("tmp");
    let written =
        std::fs::write(&tmp, failure.to_string()).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        log::error!(
            "recording the failure in {}: {e}; the updater may copy chunks from this slot",
            path.display()
        );
    }
}

/// Reads the entries, decides, marks the entry bad when the verdict says so, then reboots or
/// stays up degraded.
fn act(params: &BootParams, failure: &VerityFailure, reboot: Reboot) {
    let (version, slot) = (params.version.as_str(), params.slot);
    let outcome = crate::esp::with_esp(&crate::sys::Real, params, Path::new(ESP_AT), |esp| {
        let verdict = decide(&crate::bless::entries(esp)?, version, slot);
        let renamed = match verdict {
            Verdict::MarkBadAndReboot { .. } => crate::bless::mark_bad(esp, version, slot)?,
            _ => None,
        };
        Ok((verdict, renamed))
    });
    let what = failure.message();
    match outcome {
        Ok((Verdict::Reboot, _)) => {
            log::error!(
                "{what}: this boot is being tried; rebooting, so that the boot loader counts it down and falls back"
            );
            reboot();
        }
        Ok((Verdict::MarkBadAndReboot { other }, renamed)) => {
            let marked =
                renamed.map_or_else(|| "already marked bad".into(), |n| format!("now {n}"));
            log::error!(
                "{what}: boot entry of {version} in slot {slot} {marked}; rebooting into {} in slot {}",
                other.version,
                other.slot
            );
            reboot();
        }
        Ok((Verdict::Degraded, _)) => set_degraded(format!(
            "{what}; no other slot holds a version to boot: staying up, degraded"
        )),
        Err(e) => set_degraded(format!(
            "{what}; the boot entries could not be read or changed ({e}): staying up, degraded"
        )),
    }
}
