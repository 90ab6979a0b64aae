//! `/etc/caisson/fleet.toml`: how the agent reaches etcd and how it describes its machine.
//!
//! ```toml
//! endpoints = ["https://10.0.2.2:2379"]  # none (or no file): run /etc/caisson/units alone
//! insecure = false                       # true: allow http:// and no [tls]/[auth] (logged)
//! id = "web-1"                           # the machine's fleet id (default: /etc/machine-id)
//! labels = { zone = "a" }
//! ttl_s = 10                             # the machine's lease; its units move after it expires
//! address = "10.0.2.15"                  # or "10.0.2.15/24"; default: the source address towards
//!                                        # the first endpoint (the cluster network routes to it)
//! prefix = "/caisson/fleet/"             # the keyspace in etcd
//! units_dir = "/etc/caisson/units"       # local units (used without etcd)
//! containerd_socket = "/run/containerd/containerd.sock"
//! namespace = "caisson"                  # containerd namespace of the agent's containers
//! log_dir = "/var/log/caisson/fleet"     # each unit's output, <unit>.log
//! image_timeout_s = 1800                 # an image URL's whole download, request to last byte
//! image_max_bytes = 4294967296           # the largest image archive a URL may send (4 GiB)
//!                                        # (both also bound a registry pull, all layers together)
//! image_poll_s = 300                     # how often a registry image's tag is looked up again
//! image_keep = 3                         # unused images kept (the rest removed every 10 minutes)
//! volume_root = "/var/lib/caisson/volumes"  # units' volumes (<unit>/<name>), on the state partition
//!
//! [network]                             # the host's container network: see crate::hostnet
//! subnet = "10.88.0.0/24"                # used while the fleet has no cluster network
//!
//! [tls]
//! ca = "/etc/caisson/fleet/ca.crt"        # the only CA trusted for etcd's server certificate
//! cert = "/etc/caisson/fleet/client.crt"  # this machine's client certificate (with key)
//! key = "/etc/caisson/fleet/client.key"   # mode 0600 or stricter
//!
//! [auth]
//! user = "caisson-machine-<id>"                 # see `caisson-fleet access machine`
//! password_file = "/etc/caisson/fleet/password" # mode 0600 or stricter
//!
//! [registries."registry.local:5000"]     # how to reach one registry (any other: HTTPS, anonymous)
//! insecure = false                       # true: plain HTTP, for a registry on a trusted network
//! mirrors = ["mirror.lan:5000"]          # tried first, in order (each may have its own table)
//! ca = "/etc/caisson/fleet/registry-ca.crt"  # a CA for its certificate besides the system's
//! username = "puller"                    # basic auth, or the credentials for a bearer token
//! password_file = "/etc/caisson/fleet/registries/registry.local_5000.password"  # mode 0600
//! ```
//!
//! Unless `insecure = true`, a clustered configuration must use `https://` endpoints, name the
//! CA and give credentials: without them anyone who reaches etcd controls every machine.
//!
//! An image download that misses its deadline or passes its cap fails (its partial file is
//! removed) and is tried again a minute later; other units are reconciled meanwhile.

use crate::etcd::{Access, Client, Credentials};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
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
    #[error("{path}: mode {mode:04o} lets other users read it; make it 0600 (chmod 600 {path})")]
    Exposed { path: PathBuf, mode: u32 },
}

/// `[tls]`: the CA of etcd's server certificates and this machine's client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// `[auth]`: the etcd user and the file holding its password.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub user: String,
    pub password_file: PathBuf,
}

/// `[registries."host:port"]`: how the machine reaches one registry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub mirrors: Vec<String>,
    pub ca: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// The agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub endpoints: Vec<String>,
    pub id: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub ttl_s: i64,
    pub address: Option<String>,
    pub prefix: String,
    pub units_dir: PathBuf,
    pub containerd_socket: PathBuf,
    pub namespace: String,
    pub log_dir: PathBuf,
    pub image_timeout_s: u64,
    pub image_max_bytes: u64,
    pub image_poll_s: u64,
    pub image_keep: usize,
    pub volume_root: PathBuf,
    pub registries: BTreeMap<String, Registry>,
    pub insecure: bool,
    pub tls: Option<Tls>,
    pub auth: Option<Auth>,
    /// `[network]`: the host's container network ([`crate::hostnet`]).
    pub network: crate::hostnet::Settings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            endpoints: Vec::new(),
            id: None,
            labels: BTreeMap::new(),
            ttl_s: 10,
            address: None,
            prefix: "/caisson/fleet/".into(),
            units_dir: UNITS_DIR.into(),
            containerd_socket: "/run/containerd/containerd.sock".into(),
            namespace: "caisson".into(),
            log_dir: "/var/log/caisson/fleet".into(),
            image_timeout_s: crate::containerd::fetch::DEFAULT_DEADLINE.as_secs(),
            image_max_bytes: crate::containerd::fetch::DEFAULT_MAX_BYTES,
            image_poll_s: crate::containerd::pull::DEFAULT_POLL.as_secs(),
            image_keep: crate::containerd::gc::DEFAULT_KEEP,
            volume_root: crate::containerd::volumes::DEFAULT_ROOT.into(),
            registries: BTreeMap::new(),
            insecure: false,
            tls: None,
            auth: None,
            network: crate::hostnet::Settings::default(),
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
        if c.image_timeout_s == 0 || c.image_max_bytes == 0 || c.image_poll_s == 0 {
            return Err(bad(
                "image_timeout_s, image_max_bytes and image_poll_s must be at least 1".into(),
            ));
        }
        if !c.volume_root.is_absolute() {
            return Err(bad(format!(
                "volume_root = {:?}: must be an absolute path",
                c.volume_root
            )));
        }
        for (host, r) in &c.registries {
            let at = |m: String| bad(format!("[registries.\"{host}\"]: {m}"));
            if !valid_host(host) {
                return Err(at("the key is not a registry host[:port]".into()));
            }
            if let Some(m) = r.mirrors.iter().find(|m| !valid_host(m)) {
                return Err(at(format!(
                    "mirror {m:?} is not a host[:port] (no scheme, no path)"
                )));
            }
            if r.username.is_some() != r.password_file.is_some() {
                return Err(at("username and password_file go together".into()));
            }
        }
        if !c.prefix.ends_with('/') {
            c.prefix.push('/');
        }
        if let Some(id) = &c.id {
            if !crate::registry::valid_id(id) {
                return Err(bad(format!(
                    "id = {id:?}: 1-64 of A-Z a-z 0-9 . _ - (it names etcd keys and a role)"
                )));
            }
        }
        c.check_access().map_err(bad)?;
        c.network.check().map_err(bad)?;
        Ok(c)
    }

    /// The rules of `insecure`, `[tls]` and `[auth]`.
    pub fn check_access(&self) -> Result<(), String> {
        if let Some(t) = &self.tls {
            if t.cert.is_some() != t.key.is_some() {
                return Err("[tls] cert and key go together: give both or neither".into());
            }
        }
        if let Some(a) = &self.auth {
            if a.user.is_empty() || a.user.contains(char::is_whitespace) {
                return Err(format!("[auth] user {:?} is not an etcd user name", a.user));
            }
        }
        if self.insecure || !self.clustered() {
            return Ok(());
        }
        const HOW: &str = "anyone who reaches etcd would control every machine; \
                           use https:// with [tls] ca and [auth], or set insecure = true";
        if let Some(e) = self.endpoints.iter().find(|e| !e.starts_with("https://")) {
            return Err(format!("endpoint {e:?} is not https://: {HOW}"));
        }
        if self.tls.as_ref().and_then(|t| t.ca.as_ref()).is_none() {
            return Err(format!("[tls] ca is missing: {HOW}"));
        }
        if self.auth.is_none() {
            return Err(format!("[auth] is missing: {HOW}"));
        }
        Ok(())
    }

    /// Reads the CA, the client certificate and key and the password named by `[tls]` and
    /// `[auth]`. The key and the password must not be readable by other users.
    pub fn access(&self) -> Result<Access, ConfigError> {
        let mut access = Access::default();
        if let Some(t) = &self.tls {
            if let Some(ca) = &t.ca {
                access.ca_pem = Some(read(ca)?);
            }
            if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
                let mut pem = read(cert)?;
                pem.push(b'\n');
                pem.extend(read_secret(key)?);
                access.identity_pem = Some(pem);
            }
        }
        if let Some(a) = &self.auth {
            access.credentials = Some(Credentials {
                user: a.user.clone(),
                password: read_password(&a.password_file)?,
            });
        }
        Ok(access)
    }

    /// A client for the configured endpoints with the configured TLS and credentials.
    pub fn client(&self) -> anyhow::Result<Client> {
        let access = self.access()?;
        Ok(Client::connect(
            &self.endpoints,
            &access,
            std::time::Duration::from_secs(5),
        )?)
    }

    /// The deadline and size cap of each image download.
    pub fn fetch_limits(&self) -> crate::containerd::FetchLimits {
        crate::containerd::FetchLimits {
            deadline: std::time::Duration::from_secs(self.image_timeout_s),
            max_bytes: self.image_max_bytes,
        }
    }

    /// The registry settings, their CA and password files read (passwords must be 0600).
    pub fn registries(&self) -> Result<crate::distribution::Registries, ConfigError> {
        let mut out = crate::distribution::Registries::default();
        for (host, r) in &self.registries {
            let credentials = match (&r.username, &r.password_file) {
                (Some(user), Some(file)) => Some(Credentials {
                    user: user.clone(),
                    password: read_password(file)?,
                }),
                _ => None,
            };
            let ca_pem = r.ca.as_deref().map(read).transpose()?;
            out.hosts.insert(
                host.clone(),
                crate::distribution::HostSettings {
                    insecure: r.insecure,
                    mirrors: r.mirrors.clone(),
                    credentials,
                    ca_pem,
                },
            );
        }
        Ok(out)
    }

    /// Whether the agent is part of a cluster (otherwise it runs its local units alone).
    pub fn clustered(&self) -> bool {
        !self.endpoints.is_empty()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })
}

/// Whether `s` is a `host[:port]` (a registry or mirror), no scheme and no path.
fn valid_host(s: &str) -> bool {
    let (host, port) = s.rsplit_once(':').unwrap_or((s, "80"));
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port.parse::<u16>().is_ok()
}

/// A password file's text without its line end: private (0600), UTF-8, not empty.
fn read_password(path: &Path) -> Result<String, ConfigError> {
    let bytes = read_secret(path)?;
    let bad = |message: &str| ConfigError::Parse {
        path: path.into(),
        message: message.into(),
    };
    let text = String::from_utf8(bytes).map_err(|_| bad("the password is not UTF-8 text"))?;
    let password = text.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err(bad("the password file is empty"));
    }
    Ok(password)
}

/// Reads a file that holds a secret, refusing one that group or others may read (as ssh does
/// with private keys).
fn read_secret(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::Exposed {
            path: path.into(),
            mode,
        });
    }
    read(path)
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
            "endpoints = [\"http://a:2379\"]\ninsecure = true\nprefix = \"/x\"\nlabels = { zone = \"a\" }",
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

    #[test]
    fn without_insecure_tls_and_auth_are_required() {
        let p = Path::new("fleet.toml");
        let err = |text: &str| Config::parse(p, text).unwrap_err().to_string();
        let e = err("endpoints = [\"http://a:2379\"]");
        assert!(
            e.contains("not https://") && e.contains("insecure = true"),
            "{e}"
        );
        let e =
            err("endpoints = [\"https://a:2379\"]\n[auth]\nuser = \"u\"\npassword_file = \"/p\"");
        assert!(e.contains("[tls] ca is missing"), "{e}");
        let e = err("endpoints = [\"https://a:2379\"]\n[tls]\nca = \"/ca\"");
        assert!(e.contains("[auth] is missing"), "{e}");
        let e = err("insecure = true\n[tls]\ncert = \"/c\"");
        assert!(e.contains("cert and key go together"), "{e}");
        let ok = Config::parse(
            p,
            "endpoints = [\"https://a:2379\"]\n[tls]\nca = \"/ca\"\n\
             [auth]\nuser = \"u\"\npassword_file = \"/p\"",
        )
        .unwrap();
        assert!(!ok.insecure);
        assert!(err("id = \"a/b\"").contains("id = \"a/b\""));
        assert_eq!(
            Config::parse(p, "id = \"web-1\"").unwrap().id.as_deref(),
            Some("web-1")
        );
        // No endpoints: the machine runs alone, nothing to secure.
        assert!(Config::parse(p, "").is_ok());
    }

    #[test]
    fn registries() {
        use std::os::unix::fs::PermissionsExt;
        let p = Path::new("fleet.toml");
        let err = |text: &str| Config::parse(p, text).unwrap_err().to_string();
        let e = err("[registries.\"http://r\"]\ninsecure = true");
        assert!(
            e.contains("[registries.\"http://r\"]") && e.contains("host[:port]"),
            "{e}"
        );
        let e = err("[registries.\"r:5000\"]\nmirrors = [\"m/x\"]");
        assert!(e.contains("mirror \"m/x\""), "{e}");
        let e = err("[registries.\"r:5000\"]\nusername = \"u\"");
        assert!(e.contains("username and password_file go together"), "{e}");
        assert!(err("[registries.\"r\"]\nnope = 1").contains("nope"));
        assert!(err("image_poll_s = 0").contains("image_poll_s"));
        assert!(err("volume_root = \"vols\"").contains("volume_root"));

        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "hunter2\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
        let c = Config::parse(
            p,
            &format!(
                "[registries.\"r.lan:5000\"]\ninsecure = true\nmirrors = [\"m.lan\"]\n\
                 username = \"u\"\npassword_file = \"{}\"",
                pw.display()
            ),
        )
        .unwrap();
        let e = c.registries().unwrap_err().to_string();
        assert!(e.contains("0640") && !e.contains("hunter2"), "{e}");
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let r = c.registries().unwrap();
        let h = &r.hosts["r.lan:5000"];
        assert!(h.insecure);
        assert_eq!(h.mirrors, ["m.lan"]);
        assert_eq!(h.credentials.as_ref().unwrap().password, "hunter2");
        assert!(
            !format!("{r:?}").contains("hunter2"),
            "never in Debug output"
        );
    }

    #[test]
    fn secrets_must_be_private_and_are_read_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("password");
        std::fs::write(&pw, "s3cret\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            "endpoints = [\"https://a:2379\"]\n[tls]\nca = \"{0}/ca\"\n\
             [auth]\nuser = \"u\"\npassword_file = \"{1}\"",
            dir.path().display(),
            pw.display()
        );
        let c = Config::parse(Path::new("fleet.toml"), &text).unwrap();
        let e = c.access().unwrap_err().to_string();
        assert!(
            e.contains(&format!("{}/ca", dir.path().display())),
            "the missing CA is named: {e}"
        );
        std::fs::write(dir.path().join("ca"), "PEM").unwrap();
        let e = c.access().unwrap_err().to_string();
        assert!(
            e.contains("0644") && e.contains("chmod 600") && !e.contains("s3cret"),
            "{e}"
        );
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let a = c.access().unwrap();
        assert_eq!(a.credentials.unwrap().password, "s3cret");
        assert_eq!(a.ca_pem.unwrap(), b"PEM");
    }
}
