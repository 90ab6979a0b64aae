//! The update agent: after each boot it records what happened (success, rollback), releases
//! the reboot lock and tells the fleet agent that the boot has settled; then it checks the channel on an interval with jitter, applies an update once
//! the machine's wave has come, and reboots as the strategy allows.

use crate::apply::Progress;
use crate::config::{Config, Strategy};
use crate::machine::Machine;
use crate::reboot::{self, FleetLock, NoLock, RebootLock};
use crate::record::{self, Outcome};
use crate::slots::SlotState;
use crate::{waves, Error};
use std::path::PathBuf;
use std::time::Duration;

/// How soon the agent looks again while the running version is not blessed yet
/// ([`Round::NotBlessed`]): the init blesses `bless_after_s` (30 s by default) after "ready",
/// and the fleet's reboot lock is given back only once the result is recorded.
pub const NOT_BLESSED_RECHECK: Duration = Duration::from_secs(2);

/// Where the agent meets the rest of the machine, all in /run on a machine (tests use a
/// temporary directory).
#[derive(Debug, Clone)]
pub struct RunPaths {
    /// The init's control socket.
    pub control_socket: PathBuf,
    /// Strategy `etcd-lock`: the version waiting for the fleet agent's reboot.
    pub reboot_needed: PathBuf,
    /// Written once this boot has settled (see [`settlement`]).
    pub boot_settled: PathBuf,
}

impl Default for RunPaths {
    fn default() -> Self {
        RunPaths {
            control_socket: caisson_layout::paths::CONTROL_SOCKET.into(),
            reboot_needed: caisson_layout::paths::REBOOT_NEEDED.into(),
            boot_settled: caisson_layout::paths::BOOT_SETTLED.into(),
        }
    }
}

/// What one round of the agent did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    UpToDate,
    /// An update exists; this machine's wave starts later.
    Waiting {
        version: String,
        starts_at: u64,
    },
    /// Applied; a reboot was requested (or is left to someone else).
    Applied {
        version: String,
        rebooting: bool,
    },
    /// The offered version is already written to the other slot and waits for a reboot: it is
    /// not written again (the reboot was requested, or is left to the strategy).
    AwaitingReboot {
        version: String,
    },
    /// The running version is not blessed yet: nothing is changed until it is.
    NotBlessed,
    /// No `channel_url` is configured: the round only recorded what the last boot tells
    /// (updates come by `apply --file`).
    NoChannel,
}

/// Options of `agent` and `apply`.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentOptions {
    /// Ignore waves.
    pub now: bool,
    /// Reboot after applying (per strategy).
    pub reboot: bool,
}

/// The reboot lock the configuration asks for.
pub fn lock_for(config: &Config, machine_id: &str) -> Result<Box<dyn RebootLock>, Error> {
    match (config.strategy, &config.fleet_lock_url) {
        (Strategy::FleetLock, Some(url)) => Ok(Box::new(FleetLock::new(
            url,
            &config.fleet_lock_group,
            machine_id.trim(),
        )?)),
        _ => Ok(Box::new(NoLock)),
    }
}

/// How this boot has settled, once it has, as the one line of
/// [`caisson_layout::paths::BOOT_SETTLED`]: `rolled-back <from> <running>` when the boot loader
/// fell back from a newer version, `blessed <running>` when the booted entry is blessed; `None`
/// while the booted entry still counts tries. Only meaningful after [`Machine::reconcile`]
/// succeeded: the success or the rollback is recorded by then.
pub fn settlement(slots: &SlotState, running: &str) -> Option<String> {
    if let Some(from) = slots.rolled_back_from() {
        return Some(format!("rolled-back {from} {running}"));
    }
    slots
        .booted_is_blessed()
        .then(|| format!("blessed {running}"))
}

/// One round: record the last boot's result (and say when the boot has settled), check, maybe
/// apply and reboot.
pub fn round(
    m: &Machine,
    config: &Config,
    opts: AgentOptions,
    progress: &mut dyn Progress,
    run: &RunPaths,
) -> Result<Round, Error> {
    let mut lock = lock_for(config, &m.machine_id)?;
    if let Some(Outcome::Succeeded { .. } | Outcome::RolledBack { .. }) = m.reconcile()? {
        if let Err(e) = lock.release() {
            log::warn!("releasing the reboot lock: {e}");
        }
    }
    let slots = m.slots()?;
    if let Some(how) = settlement(&slots, &m.booted.version) {
        // Not fatal to the round: without the marker a fleet agent keeps its slot of the
        // reboot lock (the rolling update waits), which is the safe side.
        if let Err(e) = reboot::tell_fleet_settled(&run.boot_settled, &how) {
            log::warn!("{e}");
        }
    }
    if !slots.booted_is_blessed() {
        return Ok(Round::NotBlessed);
    }
    let Some(url) = config.channel_url.as_deref() else {
        return Ok(Round::NoChannel);
    };
    let Some(offer) = m.check(url)? else {
        return Ok(Round::UpToDate);
    };
    if m.is_pending(&offer.manifest.version)? {
        return Ok(Round::AwaitingReboot {
            version: offer.manifest.version,
        });
    }
    let now = record::now();
    if !opts.now && offer.wave_start > now {
        return Ok(Round::Waiting {
            version: offer.manifest.version.clone(),
            starts_at: offer.wave_start,
        });
    }
    log::info!(
        "updating {} -> {} (wave seed {}, signed by {})",
        m.booted.version,
        offer.manifest.version,
        waves::seed(&m.machine_id),
        offer.keyid
    );
    m.apply_offer(&offer, progress)?;
    let rebooting = opts.reboot
        && reboot_when_allowed_for(config, lock.as_mut(), run, &offer.manifest.version)?;
    Ok(Round::Applied {
        version: offer.manifest.version,
        rebooting,
    })
}

/// Waits for the strategy's permission, then asks the init to reboot into `version`. False for
/// `off`, and for `etcd-lock`, where the fleet agent reboots once it holds the fleet's reboot
/// lock (asked through [`RunPaths::reboot_needed`]).
pub fn reboot_when_allowed_for(
    config: &Config,
    lock: &mut dyn RebootLock,
    run: &RunPaths,
    version: &str,
) -> Result<bool, Error> {
    match config.strategy {
        Strategy::Off => return Ok(false),
        Strategy::EtcdLock => {
            reboot::ask_fleet_for_reboot(&run.reboot_needed, version)?;
            log::info!(
                "strategy etcd-lock: {} written; the fleet agent reboots once it holds the fleet's reboot lock",
                run.reboot_needed.display()
            );
            return Ok(false);
        }
        _ => {}
    }
    let mut wait = Duration::from_secs(5);
    loop {
        let in_window = config
            .maintenance_window
            .as_ref()
            .is_none_or(|w| w.contains(record::now()));
        if in_window && lock.acquire()? {
            break;
        }
        log::info!("reboot not allowed yet; asking again in {wait:?}");
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_secs(300));
    }
    log::info!("rebooting into the new version");
    reboot::request_reboot(&run.control_socket)?;
    Ok(true)
}

/// A jittered sleep: `interval` plus up to `jitter` seconds, seeded by the machine-id and time.
pub fn next_sleep(config: &Config, machine_id: &str, round: u64) -> Duration {
    let j = if config.jitter_s == 0 {
        0
    } else {
        waves::seed(&format!("{machine_id}\0{round}\0{}", record::now())) % (config.jitter_s + 1)
    };
    Duration::from_secs(config.interval_s + j)
}
