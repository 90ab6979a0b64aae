//! `[fleet]` rendered: `/etc/caisson/fleet.toml` naming its credentials by path, and the
//! directory and files of `[fleet.tls]` and `[fleet.auth]` beside it.

use super::{
    generated, toml_text, Entry, Kind, FLEET_CA, FLEET_CERT, FLEET_DIR, FLEET_KEY, FLEET_PASSWORD,
    FLEET_PATH,
};
use crate::config::{ConfigError, Fleet, FleetAuth, FleetTls};
use std::collections::BTreeMap;

/// `/etc/caisson/fleet.toml` as the agent reads it: the credentials by path, never inline.
#[derive(serde::Serialize)]
struct FleetToml<'a> {
    endpoints: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    labels: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_s: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    insecure: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<TlsPaths>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<AuthPaths<'a>>,
}

#[derive(serde::Serialize)]
struct TlsPaths {
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'static str>,
}

#[derive(serde::Serialize)]
struct AuthPaths<'a> {
    user: &'a str,
    password_file: &'static str,
}

fn fleet_text(f: &Fleet) -> Result<String, ConfigError> {
    let tls = f.tls.as_ref().map(|t| TlsPaths {
        ca: t.ca.as_ref().map(|_| FLEET_CA),
        cert: t.cert.as_ref().map(|_| FLEET_CERT),
        key: t.key.as_ref().map(|_| FLEET_KEY),
    });
    let doc = FleetToml {
        endpoints: &f.endpoints,
        id: f.id.as_deref(),
        labels: &f.labels,
        ttl_s: f.ttl_s,
        address: f.address.as_deref(),
        prefix: f.prefix.as_deref(),
        insecure: f.insecure,
        tls,
        auth: f.auth.as_ref().map(|a| AuthPaths {
            user: &a.user,
            password_file: FLEET_PASSWORD,
        }),
    };
    Ok(format!(
        "# written by caisson provisioning\n{}",
        toml_text("fleet", &doc)?
    ))
}

/// A PEM text as a file ending in a newline, as PEM files do: a certificate 0644, a key a
/// secret, 0600.
fn pem_file(path: &str, origin: &str, text: &str, secret: bool) -> Entry {
    let mut text = text.to_string();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let mut e = generated(path, origin, text, if secret { 0o600 } else { 0o644 });
    e.secret = secret;
    e
}

fn tls_files(t: &FleetTls) -> Vec<Entry> {
    let mut out = Vec::new();
    if let Some(ca) = &t.ca {
        out.push(pem_file(FLEET_CA, "fleet.tls.ca", ca, false));
    }
    if let Some(cert) = &t.cert {
        out.push(pem_file(FLEET_CERT, "fleet.tls.cert", cert, false));
    }
    if let Some(key) = &t.key {
        out.push(pem_file(FLEET_KEY, "fleet.tls.key", key.expose(), true));
    }
    out
}

/// The password exactly as given, without a newline.
fn password_file(a: &FleetAuth) -> Entry {
    let mut e = generated(
        FLEET_PASSWORD,
        "fleet.auth.password",
        a.password.expose().to_string(),
        0o600,
    );
    e.secret = true;
    e
}

/// `[fleet]`: the directory of its credentials (when it has any) and its files, fleet.toml last.
pub(super) fn fleet_entries(f: &Fleet) -> Result<(Option<Entry>, Vec<Entry>), ConfigError> {
    let mut files = f.tls.as_ref().map(tls_files).unwrap_or_default();
    files.extend(f.auth.as_ref().map(password_file));
    let dir = (!files.is_empty()).then(|| Entry {
        path: FLEET_DIR.to_string(),
        kind: Kind::Dir,
        mode: 0o700,
        uid: 0,
        gid: 0,
        secret: false,
        origin: "fleet".to_string(),
    });
    files.push(generated(FLEET_PATH, "fleet", fleet_text(f)?, 0o644));
    Ok((dir, files))
}
