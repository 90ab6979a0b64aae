//! `[fleet]`: the fleet agent's settings, and the TLS files and etcd credentials that
//! `[fleet.tls]` and `[fleet.auth]` provision (checked here, written by [`crate::plan`]), with
//! the registries of `[fleet.registries]` ([`super::registry`]).

use super::{check_url, ipv4, ConfigError, FleetRegistry};
use crate::credentials::{check_password, check_pem, check_user, PemKind, Secret};
use serde::Deserialize;
use std::collections::BTreeMap;

/// `[fleet]`, rendered to `/etc/caisson/fleet.toml` (fleet/src/config.rs), with the TLS and
/// etcd credentials of `[fleet.tls]` and `[fleet.auth]` written to files of their own.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fleet {
    pub endpoints: Vec<String>,
    /// The machine's fleet id (default: its /etc/machine-id), so that the operator can make
    /// its etcd user, `caisson-machine-<id>`, before its first boot.
    pub id: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub ttl_s: Option<i64>,
    pub address: Option<String>,
    pub prefix: Option<String>,
    /// `true` allows plain `http://` endpoints and a cluster without `[fleet.tls]` or
    /// `[fleet.auth]` (the agent logs it at every start). Passed through as given.
    pub insecure: Option<bool>,
    pub tls: Option<FleetTls>,
    pub auth: Option<FleetAuth>,
    /// How often a registry image's tag is looked up again. Passed through as given.
    pub image_poll_s: Option<u64>,
    /// `[fleet.registries."host[:port]"]`: how the machine reaches each registry (any other:
    /// HTTPS, anonymous), the CA and password written to files of their own.
    pub registries: BTreeMap<String, FleetRegistry>,
}

/// `[fleet.tls]`: PEM texts, written to `/etc/caisson/fleet/`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetTls {
    /// The CA certificate(s) that signed etcd's server certificates.
    pub ca: Option<String>,
    /// This machine's client certificate (with `key`).
    pub cert: Option<String>,
    /// Its private key (with `cert`); never shown.
    pub key: Option<Secret>,
}

/// `[fleet.auth]`: the machine's etcd user and its password (written to a file, never shown).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetAuth {
    pub user: String,
    pub password: Secret,
}

impl Fleet {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (i, e) in self.endpoints.iter().enumerate() {
            check_url(&format!("fleet.endpoints[{i}]"), e)?;
        }
        if let Some(t) = self.ttl_s {
            if t < 2 {
                return Err(ConfigError::new(
                    "fleet.ttl_s",
                    "must be at least 2 seconds",
                ));
            }
        }
        if let Some(a) = &self.address {
            // A bare address, or with its network's prefix length (the cluster network's
            // overlap check then knows the machine's network, not a /24 guess).
            match a.split_once('/') {
                Some(_) => super::parse_cidr(a).map(|_| ()).ok_or_else(|| {
                    ConfigError::new(
                        "fleet.address",
                        format!("{a:?} is not an IPv4 address or a.b.c.d/prefix"),
                    )
                })?,
                None => ipv4("fleet.address", a).map(|_| ())?,
            }
        }
        if self.image_poll_s == Some(0) {
            return Err(ConfigError::new(
                "fleet.image_poll_s",
                "must be at least 1 second",
            ));
        }
        for (host, r) in &self.registries {
            r.validate(host)?;
        }
        if let Some(id) = &self.id {
            caisson_layout::fleet_id::check(id)
                .map_err(|e| ConfigError::new("fleet.id", e.to_string()))?;
        }
        for (k, v) in &self.labels {
            let ok = |s: &str| !s.is_empty() && s.len() <= 128 && !s.contains(['\n', '/']);
            if !ok(k) || !ok(v) {
                return Err(ConfigError::new(
                    format!("fleet.labels.{k}"),
                    "labels are 1-128 characters without '/' or newlines",
                ));
            }
        }
        if let Some(t) = &self.tls {
            t.validate()?;
        }
        if let Some(a) = &self.auth {
            a.validate()?;
            self.check_user_matches_id(a)?;
        }
        if self.is_insecure() {
            self.check_insecure()
        } else {
            self.check_secure()
        }
    }

    /// With an id, the machine's etcd user is `caisson-machine-<id>` (fleet/src/access.rs):
    /// another user's role would not let it write its own keys.
    fn check_user_matches_id(&self, a: &FleetAuth) -> Result<(), ConfigError> {
        match &self.id {
            Some(id) if a.user != format!("caisson-machine-{id}") => Err(ConfigError::new(
                "fleet.auth.user",
                format!(
                    "{:?} is not this machine's etcd user: with id = {id:?} it is \
                     \"caisson-machine-{id}\" (caisson-fleet access machine {id})",
                    a.user
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Whether the config asks for plain HTTP (`insecure = true`).
    pub fn is_insecure(&self) -> bool {
        self.insecure == Some(true)
    }

    /// The fleet agent's rule, checked here so that a config it would refuse is refused
    /// before the boot: a cluster talks https:// only, checks etcd's certificate against a
    /// CA, and logs in as this machine's etcd user.
    fn check_secure(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Ok(());
        }
        if let Some((i, e)) = self
            .endpoints
            .iter()
            .enumerate()
            .find(|(_, e)| !e.starts_with("https://"))
        {
            return Err(ConfigError::new(
                format!("fleet.endpoints[{i}]"),
                format!(
                    "{e:?} is plain HTTP, which lets anyone on the network command the fleet: \
                     use https:// with [fleet.tls] and [fleet.auth], or set insecure = true (a lab only)"
                ),
            ));
        }
        if self.tls.as_ref().is_none_or(|t| t.ca.is_none()) {
            return Err(ConfigError::new(
                "fleet.tls.ca",
                "a cluster needs the CA certificate that signed etcd's server certificates \
                 (PEM text), or insecure = true (a lab only)",
            ));
        }
        if self.auth.is_none() {
            return Err(ConfigError::new(
                "fleet.auth",
                "a cluster needs this machine's etcd user and password ([fleet.auth] user, \
                 password), or insecure = true (a lab only)",
            ));
        }
        Ok(())
    }

    /// `insecure = true` allows http:// endpoints and a cluster without `[fleet.tls]` or
    /// `[fleet.auth]`, as the agent does; but a password is never sent over plain HTTP.
    fn check_insecure(&self) -> Result<(), ConfigError> {
        let plain = self.endpoints.iter().any(|e| e.starts_with("http://"));
        if plain && self.auth.is_some() {
            return Err(ConfigError::new(
                "fleet.auth",
                "an http:// endpoint would carry the password in the clear: \
                 use https:// endpoints with [fleet.tls], or remove [fleet.auth]",
            ));
        }
        Ok(())
    }
}

impl FleetTls {
    fn validate(&self) -> Result<(), ConfigError> {
        let pem = |field: &str, text: Option<&str>, kind| match text {
            Some(t) => check_pem(t, kind).map_err(|e| ConfigError::new(field, e.to_string())),
            None => Ok(()),
        };
        pem("fleet.tls.ca", self.ca.as_deref(), PemKind::Certificate)?;
        pem("fleet.tls.cert", self.cert.as_deref(), PemKind::Certificate)?;
        let key = self.key.as_ref().map(Secret::text).transpose();
        let key = key.map_err(|why| ConfigError::new("fleet.tls.key", why))?;
        pem("fleet.tls.key", key, PemKind::PrivateKey)?;
        match (&self.cert, &self.key) {
            (Some(_), None) => Err(ConfigError::new(
                "fleet.tls.key",
                "a client certificate needs its private key: give cert and key, or neither",
            )),
            (None, Some(_)) => Err(ConfigError::new(
                "fleet.tls.cert",
                "a private key needs its client certificate: give cert and key, or neither",
            )),
            _ => Ok(()),
        }
    }
}

impl FleetAuth {
    fn validate(&self) -> Result<(), ConfigError> {
        check_user(&self.user).map_err(|why| ConfigError::new("fleet.auth.user", why))?;
        check_password(&self.password).map_err(|why| ConfigError::new("fleet.auth.password", why))
    }
}
