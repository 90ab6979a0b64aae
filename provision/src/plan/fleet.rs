//! `[fleet]` rendered: `/etc/caisson/fleet.toml` naming its credentials by path, and the
//! directories and files of `[fleet.tls]`, `[fleet.auth]` and `[fleet.registries]` beside it.

use super::{
    generated, toml_text, Entry, Kind, FLEET_CA, FLEET_CERT, FLEET_DIR, FLEET_KEY, FLEET_PASSWORD,
    FLEET_PATH, FLEET_REGISTRIES_DIR,
};
use crate::config::{registry_field, ConfigError, Fleet, FleetAuth, FleetRegistry, FleetTls};
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
    #[serde(skip_serializing_if = "Option::is_none")]
    image_poll_s: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    registries: BTreeMap<&'a str, RegistryPaths<'a>>,
}

/// `[registries."host[:port]"]`: the CA and the password by path.
#[derive(serde::Serialize)]
struct RegistryPaths<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    insecure: Option<bool>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    mirrors: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password_file: Option<String>,
}

/// The file of registry `host` with `suffix` (`password`, `ca.crt`) in
/// [`FLEET_REGISTRIES_DIR`]: `registry.local:5000` -> `registry.local_5000.password`. A valid
/// host has no `_`, so two registries never share a file.
pub fn registry_file(host: &str, suffix: &str) -> String {
    format!("{FLEET_REGISTRIES_DIR}/{}.{suffix}", host.replace(':', "_"))
}

fn registry_paths<'a>(host: &str, r: &'a FleetRegistry) -> RegistryPaths<'a> {
    RegistryPaths {
        insecure: r.insecure,
        mirrors: &r.mirrors,
        ca: r.ca.as_ref().map(|_| registry_file(host, "ca.crt")),
        username: r.username.as_deref(),
        password_file: r.password.as_ref().map(|_| registry_file(host, "password")),
    }
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
        image_poll_s: f.image_poll_s,
        registries: f
            .registries
            .iter()
            .map(|(host, r)| (host.as_str(), registry_paths(host, r)))
            .collect(),
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

/// Each registry's CA (0644) and password (exactly as given, without a newline, 0600).
fn registry_files(f: &Fleet) -> Vec<Entry> {
    let mut out = Vec::new();
    for (host, r) in &f.registries {
        let field = registry_field(host);
        if let Some(ca) = &r.ca {
            let path = registry_file(host, "ca.crt");
            out.push(pem_file(&path, &format!("{field}.ca"), ca, false));
        }
        if let Some(p) = &r.password {
            let path = registry_file(host, "password");
            let mut e = generated(
                &path,
                &format!("{field}.password"),
                p.expose().to_string(),
                0o600,
            );
            e.secret = true;
            out.push(e);
        }
    }
    out
}

/// A directory only root can enter.
fn private_dir(path: &str, origin: &str) -> Entry {
    Entry {
        path: path.to_string(),
        kind: Kind::Dir,
        mode: 0o700,
        uid: 0,
        gid: 0,
        secret: false,
        origin: origin.to_string(),
    }
}

/// `[fleet]`: the directories of its credentials (those it has) and its files, fleet.toml last.
pub(super) fn fleet_entries(f: &Fleet) -> Result<(Vec<Entry>, Vec<Entry>), ConfigError> {
    let mut files = f.tls.as_ref().map(tls_files).unwrap_or_default();
    files.extend(f.auth.as_ref().map(password_file));
    let registries = registry_files(f);
    let mut dirs = Vec::new();
    if !files.is_empty() || !registries.is_empty() {
        dirs.push(private_dir(FLEET_DIR, "fleet"));
    }
    if !registries.is_empty() {
        dirs.push(private_dir(FLEET_REGISTRIES_DIR, "fleet.registries"));
    }
    files.extend(registries);
    files.push(generated(FLEET_PATH, "fleet", fleet_text(f)?, 0o644));
    Ok((dirs, files))
}
