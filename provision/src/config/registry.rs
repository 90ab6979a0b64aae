//! `[fleet.registries."host[:port]"]`: how the machine reaches one OCI registry: plain HTTP
//! only when `insecure`, the mirrors tried first, a CA besides the system's, credentials for
//! basic or bearer-token auth. Checked as the fleet agent checks `[registries]` in fleet.toml
//! (fleet/src/config.rs); the CA and the password are written to files by [`crate::plan`].

use super::ConfigError;
use crate::credentials::{check_password, check_pem, PemError, PemKind, Secret};
use serde::Deserialize;

/// One registry's settings; the table's key is its `host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetRegistry {
    /// `true`: plain HTTP, for a registry on a trusted network. Passed through as given.
    pub insecure: Option<bool>,
    /// Hosts (`host[:port]`) tried first, in order; each may have a table of its own.
    pub mirrors: Vec<String>,
    /// CA certificate(s) (PEM text) trusted for this registry besides the system's.
    pub ca: Option<String>,
    /// For basic auth, or to ask a token server for a bearer token (with `password`).
    pub username: Option<String>,
    /// Written to a 0600 file; never shown.
    pub password: Option<Secret>,
}

/// The field of registry `host` in messages: `fleet.registries."registry.local:5000"`.
pub fn registry_field(host: &str) -> String {
    format!("fleet.registries.{host:?}")
}

/// Whether `s` is a `host[:port]`, no scheme, no path: the fleet agent's rule for a registry
/// or mirror. It has no `_`, so `host` with `:` made `_` names one file per registry.
pub fn valid_registry_host(s: &str) -> bool {
    let (host, port) = s.rsplit_once(':').unwrap_or((s, "80"));
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port.parse::<u16>().is_ok()
}

impl FleetRegistry {
    pub(super) fn validate(&self, host: &str) -> Result<(), ConfigError> {
        let field = registry_field(host);
        let at = |sub: &str, why: String| ConfigError::new(format!("{field}.{sub}"), why);
        if !valid_registry_host(host) {
            return Err(ConfigError::new(
                &field,
                "the key is not a registry host[:port] (no scheme, no path), \
                 e.g. \"registry.local:5000\"",
            ));
        }
        for (i, m) in self.mirrors.iter().enumerate() {
            if !valid_registry_host(m) {
                return Err(at(
                    &format!("mirrors[{i}]"),
                    format!("{m:?} is not a host[:port] (no scheme, no path)"),
                ));
            }
        }
        if let Some(ca) = &self.ca {
            check_pem(ca, PemKind::Certificate).map_err(|e| at("ca", ca_error(e)))?;
        }
        match (&self.username, &self.password) {
            (Some(u), Some(p)) => {
                check_username(u).map_err(|why| at("username", why))?;
                check_password(p).map_err(|why| at("password", why))
            }
            (Some(_), None) => Err(at(
                "password",
                "a username needs its password: give username and password, or neither".into(),
            )),
            (None, Some(_)) => Err(at(
                "username",
                "a password needs its username: give username and password, or neither".into(),
            )),
            (None, None) => Ok(()),
        }
    }
}

/// A PEM error for a registry's CA: the generic advice about `fleet.tls.key` does not apply.
fn ca_error(e: PemError) -> String {
    match e {
        PemError::KeyInCertificates => {
            "holds a private key: this file is readable by all, give the CA certificate(s) only"
                .into()
        }
        other => other.to_string(),
    }
}

/// A registry user name: 1-256 characters, no `:` (basic auth ends the user name there) and no
/// control character (it is written into fleet.toml and sent in a header).
fn check_username(u: &str) -> Result<(), String> {
    if u.is_empty() || u.chars().count() > 256 || u.contains(':') || u.contains(char::is_control) {
        return Err(format!(
            "{u:?} is not a registry user name (1-256 characters, no ':' or control characters)"
        ));
    }
    Ok(())
}
