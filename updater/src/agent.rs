//! The update agent: after each boot it records what happened (success, rollback) and releases
//! the reboot lock; then it checks the channel on an interval with jitter, applies an update once
//! the machine's wave has come, and reboots as the strategy allows.

use crate::apply::Progress;
use crate::config::{Config, Strategy};
use crate::machine::Machine;
use crate::reboot::{self, FleetLock, NoLock, RebootLock};
use crate::record::{self, Outcome};
use crate::{waves, Error};
use std::path::Path;
use std::time::Duration;

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

/// One round: reconcile, check, maybe apply and reboot.
pub fn round(
    m: &Machine,
    config: &Config,
    opts: AgentOptions,
    progress: &mut dyn Progress,
    control_socket: &Path,
) -> Result<Round, Error> {
    let mut lock = lock_for(config, &m.machine_id)?;
    if let Some(Outcome::Succeeded { .. }) = m.reconcile()? {
        if let Err(e) = lock.release() {
            log::warn!("releasing the reboot lock: {e}");
        }
    }
    if !m.slots()?.booted_is_blessed() {
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
        && reboot_when_allowed_for(
            config,
            lock.as_mut(),
            control_socket,
            &offer.manifest.version,
        )?;
    Ok(Round::Applied {
        version: offer.manifest.version,
        rebooting,
    })
}

/// Waits for the strategy's permission, then asks the init to reboot into `version`. False for
/// `off`, and for `etcd-lock`, where the fleet agent reboots once it holds the fleet's reboot
/// lock (asked through [`caisson_layout::paths::REBOOT_NEEDED`]).
pub fn reboot_when_allowed_for(
    config: &Config,
    lock: &mut dyn RebootLock,
    control_socket: &Path,
    version: &str,
) -> Result<bool, Error> {
    match config.strategy {
        Strategy::Off => return Ok(false),
        Strategy::EtcdLock => {
            reboot::ask_fleet_for_reboot(Path::new(caisson_layout::paths::REBOOT_NEEDED), version)?;
            log::info!(
                "strategy etcd-lock: {} written; the fleet agent reboots once it holds the fleet's reboot lock",
                caisson_layout::paths::REBOOT_NEEDED
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
    reboot::request_reboot(control_socket)?;
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
