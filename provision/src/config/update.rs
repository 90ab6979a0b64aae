//! `[update]`: the update agent's settings, rendered to `/etc/caisson/update.toml`
//! (updater/src/config.rs) as given, after the checks here.

use super::{check_url, ConfigError};
use serde::Deserialize;

/// A daily maintenance window, UTC.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub start: String,
    pub length_minutes: u64,
}

/// `[update]`, rendered to `/etc/caisson/update.toml` (updater/src/config.rs).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Update {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_lock_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_lock_group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance_window: Option<Window>,
}

impl Update {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(u) = &self.channel_url {
            check_url("update.channel_url", u)?;
        }
        if let Some(u) = &self.fleet_lock_url {
            check_url("update.fleet_lock_url", u)?;
        }
        match self.strategy.as_deref() {
            None | Some("immediate" | "etcd-lock" | "off") => {}
            Some("fleet-lock") if self.fleet_lock_url.is_none() => {
                return Err(ConfigError::new(
                    "update.fleet_lock_url",
                    "strategy = \"fleet-lock\" needs fleet_lock_url",
                ))
            }
            Some("fleet-lock") => {}
            Some(other) => {
                return Err(ConfigError::new(
                    "update.strategy",
                    format!("{other:?}: expected immediate, fleet-lock, etcd-lock or off"),
                ))
            }
        }
        if let Some(w) = &self.maintenance_window {
            let hm = w.start.split_once(':').and_then(|(h, m)| {
                let (h, m) = (h.parse::<u32>().ok()?, m.parse::<u32>().ok()?);
                (h < 24 && m < 60 && w.start.len() == 5).then_some(())
            });
            if hm.is_none() {
                return Err(ConfigError::new(
                    "update.maintenance_window.start",
                    format!("{:?} is not HH:MM (UTC)", w.start),
                ));
            }
            if w.length_minutes == 0 || w.length_minutes > 24 * 60 {
                return Err(ConfigError::new(
                    "update.maintenance_window.length_minutes",
                    "must be 1..=1440",
                ));
            }
        }
        Ok(())
    }
}
