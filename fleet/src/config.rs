//! `/etc/caisson/fleet.toml`: how the agent reaches etcd and how it describes its machine.
//!
//! ```toml
//! endpoints = ["http://10.0.2.2:2379"]   # none (or no file): run /etc/caisson/units alone
//! labels = { zone = "a" }
//! ttl_s = 10                             # the machine's lease; its units move after it expires
//! address = "10.0.2.15"                  # default: the source address towards the first endpoint
//! prefix = "/caisson/fleet/"             # the keyspace in etcd
//! units_dir = "/etc/caisson/units"       # local units (used without etcd)
//! containerd_socket = "/run/containerd/containerd.sock"
//! namespace = "caisson"                  # containerd namespace of the agent's containers
//! image_timeout_s = 1800                 # an image URL's whole download, request to last byte
//! image_max_bytes = 4294967296           # the largest image archive a URL may send (4 GiB)
//! ```
//!
//! An image download that misses its deadline or passes its cap fails (its partial file is
//! removed) and is tried again a minute later; other units are reconciled meanwhile.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the agent's configuration lives.
pub const PATH: &str = "/etc/caisson/fleet.toml";
/// Where local units live.
pub const UNITS_DIR: &str = "/etc/caisson/units";

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub endpoints: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub ttl_s: i64,
    pub address: Option<String>,
    pub prefix: String,
    pub units_dir: PathBuf,
    pub containerd_socket: PathBuf,
    pub namespace: String,
    pub image_timeout_s: u64,
    pub image_max_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            endpoints: Vec::new(),
            labels: BTreeMap::new(),
            ttl_s: 10,
            address: None,
            prefix: "/caisson/fleet/".into(),
            units_dir: UNITS_DIR.into(),
            containerd_socket: "/run/containerd/containerd.sock".into(),
            namespace: "caisson".into(),
            image_timeout_s: crate::containerd::fetch::DEFAULT_DEADLINE.as_secs(),
            image_max_bytes: crate::containerd::fetch::DEFAULT_MAX_BYTES,
        }
    }
}

impl Config {
    /// Reads the file; a missing file is the default configuration (no etcd).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.into(),
                source,
            }),
        }
    }

    /// Parses the file's text.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let bad = |message: String| ConfigError::Parse {
            path: path.into(),
            message,
        };
        let mut c: Config = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if c.ttl_s < 2 {
            return Err(bad(format!(
                "ttl_s = {}: must be at least 2 seconds",
                c.ttl_s
            )));
        }
        if c.image_timeout_s == 0 || c.image_max_bytes == 0 {
            return Err(bad(
                "image_timeout_s and image_max_bytes must be at least 1".into(),
            ));
        }
        if !c.prefix.ends_with('/') {
            c.prefix.push('/');
        }
        Ok(c)
    }

    /// The deadline and size cap of each image download.
    pub fn fetch_limits(&self) -> crate::containerd::FetchLimits {
        crate::containerd::FetchLimits {
            deadline: std::time::Duration::from_secs(self.image_timeout_s),
            max_bytes: self.image_max_bytes,
        }
    }

    /// Whether the agent is part of a cluster (otherwise it runs its local units alone).
    pub fn clustered(&self) -> bool {
        !self.endpoints.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_fields() {
        let p = Path::new("fleet.toml");
        let c = Config::parse(p, "").unwrap();
        assert!(!c.clustered());
        assert_eq!(c.ttl_s, 10);
        let c = Config::parse(
            p,
            "endpoints = [\"http://a:2379\"]\nprefix = \"/x\"\nlabels = { zone = \"a\" }",
        )
        .unwrap();
        assert!(c.clustered());
        assert_eq!(c.prefix, "/x/");
        assert!(Config::parse(p, "ttl_s = 1")
            .unwrap_err()
            .to_string()
            .contains("ttl_s"));
        assert_eq!(c.fetch_limits(), crate::containerd::FetchLimits::default());
        let small = Config::parse(p, "image_timeout_s = 60\nimage_max_bytes = 1024").unwrap();
        assert_eq!(small.fetch_limits().deadline.as_secs(), 60);
        assert_eq!(small.fetch_limits().max_bytes, 1024);
        assert!(Config::parse(p, "image_max_bytes = 0")
            .unwrap_err()
            .to_string()
            .contains("image_max_bytes"));
        assert!(Config::parse(p, "endpoint = []")
            .unwrap_err()
            .to_string()
            .contains("endpoint"));
        assert_eq!(
            Config::load(Path::new("/nonexistent/fleet.toml")).unwrap(),
            Config::default()
        );
    }
}
