//! `/etc/caisson/update.toml`: where updates come from and how reboots are coordinated.
//!
//! ```toml
//! channel_url = "http://updates.example/stable"   # a channel directory served over HTTP
//! interval_s = 3600            # the agent checks this often...
//! jitter_s = 300               # ...plus up to this much, so a fleet does not check at once
//! strategy = "immediate"       # immediate | fleet-lock | etcd-lock | off
//! fleet_lock_url = "http://lock.example:8080"     # for fleet-lock
//! fleet_lock_group = "default"
//! [maintenance_window]         # optional: reboot only inside it (UTC)
//! start = "02:00"
//! length_minutes = 120
//! ```

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where the file lives on a machine.
pub const CONFIG_PATH: &str = "/etc/caisson/update.toml";

/// A bad configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Parse { path: PathBuf, why: String },
}

/// How the machine reboots into a new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Reboot as soon as the update is written.
    #[default]
    Immediate,
    /// Ask a FleetLock server for a slot first.
    FleetLock,
    /// The fleet agent's etcd semaphore.
    EtcdLock,
    /// Never reboot by itself.
    Off,
}

/// A daily maintenance window, UTC.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// `HH:MM`.
    pub start: String,
    pub length_minutes: u64,
}

impl Window {
    /// True when `now` (seconds since the epoch) is inside the window.
    pub fn contains(&self, now: u64) -> bool {
        let Some((h, m)) = self.start.split_once(':') else {
            return false;
        };
        let (Ok(h), Ok(m)) = (h.parse::<u64>(), m.parse::<u64>()) else {
            return false;
        };
        let start = (h * 60 + m) * 60;
        let t = now % 86400;
        let rel = (t + 86400 - start) % 86400;
        rel < self.length_minutes * 60
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub channel_url: Option<String>,
    #[serde(default = "default_interval")]
    pub interval_s: u64,
    #[serde(default = "default_jitter")]
    pub jitter_s: u64,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub fleet_lock_url: Option<String>,
    #[serde(default = "default_group")]
    pub fleet_lock_group: String,
    #[serde(default)]
    pub maintenance_window: Option<Window>,
}

fn default_interval() -> u64 {
    3600
}
fn default_jitter() -> u64 {
    300
}
fn default_group() -> String {
    "default".into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            channel_url: None,
            interval_s: default_interval(),
            jitter_s: default_jitter(),
            strategy: Strategy::default(),
            fleet_lock_url: None,
            fleet_lock_group: default_group(),
            maintenance_window: None,
        }
    }
}

impl Config {
    /// Reads the file; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(t) => Config::parse(&t, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            why: e.to_string().trim_end().to_string(),
        })?;
        if c.strategy == Strategy::FleetLock && c.fleet_lock_url.is_none() {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                why: "strategy = \"fleet-lock\" needs fleet_lock_url".into(),
            });
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_defaults() {
        let p = Path::new("update.toml");
        let c = Config::parse("channel_url = \"http://x/stable\"\nstrategy = \"fleet-lock\"\nfleet_lock_url = \"http://l\"\n", p).unwrap();
        assert_eq!(c.strategy, Strategy::FleetLock);
        assert_eq!(c.interval_s, 3600);
        assert!(Config::parse("strategy = \"fleet-lock\"\n", p).is_err());
        let err = Config::parse("chanel_url = \"x\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("chanel_url"), "{err}");
        assert_eq!(
            Config::load(Path::new("/nonexistent/u.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn window() {
        let w = Window {
            start: "23:00".into(),
            length_minutes: 120,
        };
        assert!(w.contains(23 * 3600 + 10));
        assert!(w.contains(86400 * 3 + 1800));
        assert!(!w.contains(86400 * 3 + 3600));
        assert!(!w.contains(2 * 3600));
    }
}
