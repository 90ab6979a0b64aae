//! The machine config schema (`version = 1`, see CONFIG.md), its parsing and its validation.
//!
//! Validation here needs nothing but the text; what depends on the root it is applied to
//! (user and group names, whether the image has an SSH server) is checked by [`crate::plan`].

mod fleet;
mod registry;
mod update;

pub use fleet::{Fleet, FleetAuth, FleetTls};
pub use registry::{registry_field, valid_registry_host, FleetRegistry};
pub use update::{Update, Window};

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Component, Path};

/// The schema version this crate reads.
pub const VERSION: u32 = 1;

/// A config that cannot be applied: the field (`network.dns[1]`, `files[0].mode`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct ConfigError {
    pub field: String,
    pub why: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, why: impl Into<String>) -> ConfigError {
        ConfigError {
            field: field.into(),
            why: why.into(),
        }
    }
}

/// The whole machine config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub version: u32,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub network: Option<Network>,
    #[serde(default)]
    pub ssh: Option<Ssh>,
    #[serde(default)]
    pub files: Vec<FileSpec>,
    #[serde(default)]
    pub directories: Vec<DirSpec>,
    /// Service files in the init's format (SERVICES.md), by name.
    #[serde(default)]
    pub services: BTreeMap<String, toml::Table>,
    #[serde(default)]
    pub kernel: Option<Kernel>,
    #[serde(default)]
    pub fleet: Option<Fleet>,
    #[serde(default)]
    pub update: Option<Update>,
}

/// How the interface gets its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    #[default]
    Dhcp,
    Static,
    Off,
}

/// `[network]`, rendered to the init's `/etc/caisson/network.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    pub interface: Option<String>,
    /// The main interface by MAC address, instead of `interface`.
    pub mac: Option<String>,
    pub mode: NetMode,
    /// Static: `a.b.c.d/prefix`.
    pub address: Option<String>,
    /// The default gateway (or give it as a route `to = "default"`).
    pub gateway: Option<String>,
    pub routes: Vec<Route>,
    pub dns: Vec<String>,
    pub search: Vec<String>,
    pub timeout_s: Option<u64>,
    /// `[[network.links]]`: more interfaces, each with a static address and no gateway.
    pub links: Vec<NetLink>,
}

/// One more interface (by `interface` or `mac`) and its static address `a.b.c.d/prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetLink {
    pub interface: Option<String>,
    pub mac: Option<String>,
    pub address: String,
}

/// A route; the init configures the default route only.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub to: String,
    pub via: String,
}

/// `[ssh]`: the admin's public keys; the SSH server runs only when there are some.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ssh {
    pub authorized_keys: Vec<String>,
}

/// An owner or group: a name or a number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Id {
    Number(u32),
    Name(String),
}

/// A file under /etc or /var.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub path: String,
    #[serde(default)]
    pub mode: Option<toml::Value>,
    #[serde(default)]
    pub owner: Option<Id>,
    #[serde(default)]
    pub group: Option<Id>,
    #[serde(default)]
    pub contents: Option<String>,
    #[serde(default)]
    pub contents_base64: Option<String>,
    /// Written 0600 (or 0400) and never logged.
    #[serde(default)]
    pub secret: bool,
}

impl std::fmt::Debug for FileSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSpec")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .field("owner", &self.owner)
            .field("group", &self.group)
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

/// A directory under /etc or /var.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirSpec {
    pub path: String,
    #[serde(default)]
    pub mode: Option<toml::Value>,
    #[serde(default)]
    pub owner: Option<Id>,
    #[serde(default)]
    pub group: Option<Id>,
}

/// `[kernel]`: modules loaded and sysctls set on every boot.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Kernel {
    pub modules: Vec<String>,
    pub sysctls: BTreeMap<String, toml::Value>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map_or(0, |t| t.matches('\n').count())
        + 1
}

/// A TOML error without the source excerpt (which may hold a secret).
fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_string();
    let at = e
        .span()
        .map(|s| format!(" (line {})", line_of(text, s.start)))
        .unwrap_or_default();
    let quoted = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|r| r.split('`').next())
            .map(str::to_string)
    };
    if let Some(name) = quoted("unknown field `") {
        return ConfigError::new(name, format!("unknown field{at}; {message}"));
    }
    if let Some(name) = quoted("missing field `") {
        return ConfigError::new(name, format!("missing{at}"));
    }
    ConfigError::new("config", format!("{message}{at}"))
}

impl Config {
    /// Parses and validates a config's text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        c.validate()?;
        Ok(c)
    }

    /// Every check that needs only the config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version != VERSION {
            return Err(ConfigError::new(
                "version",
                format!(
                    "{} is not supported; this machine reads version = {VERSION}",
                    self.version
                ),
            ));
        }
        if let Some(h) = &self.hostname {
            check_hostname(h).map_err(|why| ConfigError::new("hostname", why))?;
        }
        if let Some(n) = &self.network {
            n.validate()?;
        }
        if let Some(s) = &self.ssh {
            for (i, k) in s.authorized_keys.iter().enumerate() {
                check_ssh_key(k)
                    .map_err(|why| ConfigError::new(format!("ssh.authorized_keys[{i}]"), why))?;
            }
        }
        for (i, f) in self.files.iter().enumerate() {
            f.validate(&format!("files[{i}]"))?;
        }
        for (i, d) in self.directories.iter().enumerate() {
            let field = format!("directories[{i}]");
            check_path(&d.path).map_err(|why| ConfigError::new(format!("{field}.path"), why))?;
            parse_mode(d.mode.as_ref(), 0o755)
                .map_err(|why| ConfigError::new(format!("{field}.mode"), why))?;
        }
        for name in self.services.keys() {
            if !valid_service_name(name) {
                return Err(ConfigError::new(
                    format!("services.{name}"),
                    "a service name is 1-64 characters of A-Z a-z 0-9 - _ . @",
                ));
            }
        }
        if let Some(k) = &self.kernel {
            k.validate()?;
        }
        if let Some(f) = &self.fleet {
            f.validate()?;
        }
        if let Some(u) = &self.update {
            u.validate()?;
        }
        Ok(())
    }
}

/// RFC 1123 host name, at most 64 bytes (the kernel's limit).
pub fn check_hostname(h: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if h.is_empty() || h.len() > 64 || !h.split('.').all(label_ok) {
        return Err(format!(
            "{h:?} is not a host name (letters, digits and '-' in dot-separated labels, at most 64 characters)"
        ));
    }
    Ok(())
}

fn check_ssh_key(k: &str) -> Result<(), String> {
    const TYPES: [&str; 6] = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
    ];
    let mut words = k.split_whitespace();
    let kind = words.next().unwrap_or_default();
    let blob = words.next().unwrap_or_default();
    if k.contains('\n') || !TYPES.contains(&kind) || blob.len() < 16 {
        return Err(format!(
            "not an SSH public key line (\"<type> <base64> [comment]\", type one of {})",
            TYPES.join(", ")
        ));
    }
    Ok(())
}

fn ipv4(field: &str, text: &str) -> Result<Ipv4Addr, ConfigError> {
    text.parse()
        .map_err(|_| ConfigError::new(field, format!("{text:?} is not an IPv4 address")))
}

/// `a.b.c.d/prefix`.
pub fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = text.split_once('/')?;
    (!p.is_empty() && p.bytes().all(|c| c.is_ascii_digit())).then_some(())?;
    let prefix: u8 = p.parse().ok()?;
    (prefix <= 32).then_some(())?;
    Some((a.parse().ok()?, prefix))
}

/// An interface named by `interface` or `mac` (at most one; `needed`: exactly one), checked.
fn check_interface(
    field: &str,
    interface: &Option<String>,
    mac: &Option<String>,
    needed: bool,
) -> Result<(), ConfigError> {
    if let Some(i) = interface {
        if i.is_empty() || i.len() > 15 || i.contains(['/', ' ', '\n']) {
            return Err(ConfigError::new(
                format!("{field}interface"),
                format!("{i:?} is not an interface name"),
            ));
        }
    }
    if let Some(m) = mac {
        let ok = m.split(':').count() == 6
            && m.split(':')
                .all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()));
        if !ok {
            return Err(ConfigError::new(
                format!("{field}mac"),
                format!("{m:?} is not a MAC address like 52:54:00:12:34:56"),
            ));
        }
    }
    match (interface, mac) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            format!("{field}mac"),
            "give `interface` or `mac`, not both",
        )),
        (None, None) if needed => Err(ConfigError::new(
            format!("{field}interface"),
            "name the interface by `interface` or `mac`",
        )),
        _ => Ok(()),
    }
}

impl Network {
    fn validate(&self) -> Result<(), ConfigError> {
        check_interface("network.", &self.interface, &self.mac, false)?;
        for (i, l) in self.links.iter().enumerate() {
            let field = format!("network.links[{i}].");
            check_interface(&field, &l.interface, &l.mac, true)?;
            parse_cidr(&l.address).ok_or_else(|| {
                ConfigError::new(
                    format!("{field}address"),
                    format!("{:?} is not of the form a.b.c.d/prefix", l.address),
                )
            })?;
        }
        match (&self.address, self.mode) {
            (None, NetMode::Static) => {
                return Err(ConfigError::new(
                    "network.address",
                    "mode = \"static\" needs an address a.b.c.d/prefix",
                ))
            }
            (Some(a), NetMode::Static) => {
                parse_cidr(a).ok_or_else(|| {
                    ConfigError::new(
                        "network.address",
                        format!("{a:?} is not of the form a.b.c.d/prefix (e.g. 192.168.1.10/24)"),
                    )
                })?;
            }
            (Some(_), _) => {
                return Err(ConfigError::new(
                    "network.address",
                    "an address needs mode = \"static\"",
                ))
            }
            (None, _) => {}
        }
        self.default_gateway()?;
        for (i, d) in self.dns.iter().enumerate() {
            ipv4(&format!("network.dns[{i}]"), d)?;
        }
        for (i, s) in self.search.iter().enumerate() {
            check_hostname(s)
                .map_err(|why| ConfigError::new(format!("network.search[{i}]"), why))?;
        }
        Ok(())
    }

    /// The gateway, from `gateway` or a default route (only one may be given).
    pub fn default_gateway(&self) -> Result<Option<Ipv4Addr>, ConfigError> {
        let mut gw = match &self.gateway {
            Some(g) => Some(ipv4("network.gateway", g)?),
            None => None,
        };
        for (i, r) in self.routes.iter().enumerate() {
            let field = format!("network.routes[{i}]");
            if !matches!(r.to.as_str(), "default" | "0.0.0.0/0") {
                return Err(ConfigError::new(
                    format!("{field}.to"),
                    format!(
                        "{:?}: only the default route (\"default\") is supported",
                        r.to
                    ),
                ));
            }
            let via = ipv4(&format!("{field}.via"), &r.via)?;
            if gw.is_some_and(|g| g != via) {
                return Err(ConfigError::new(
                    format!("{field}.via"),
                    "a second, different default gateway",
                ));
            }
            gw = Some(via);
        }
        Ok(gw)
    }
}

/// An absolute, normalized path under /etc or /var.
pub fn check_path(p: &str) -> Result<(), String> {
    let path = Path::new(p);
    let normal = path
        .components()
        .skip(1)
        .all(|c| matches!(c, Component::Normal(_)));
    if !p.starts_with('/') || !normal || p.contains("//") || p.ends_with('/') {
        return Err(format!(
            "{p:?} is not an absolute, normalized path (no '.', '..', '//' or trailing '/')"
        ));
    }
    let top = path.components().nth(1);
    let allowed = matches!(top, Some(Component::Normal(t)) if t == "etc" || t == "var");
    if !allowed || path.components().count() < 3 {
        return Err(format!(
            "{p:?}: only paths below /etc and /var can be written"
        ));
    }
    if path.starts_with("/var/lib/caisson") || path.starts_with("/etc/caisson/services") {
        return Err(format!(
            "{p:?} is reserved (services go in [services], the machine's state is the init's)"
        ));
    }
    if path.starts_with("/etc/caisson/fleet") {
        return Err(format!(
            "{p:?} is reserved for the fleet agent's credentials: give them in [fleet.tls], \
             [fleet.auth] and [fleet.registries]"
        ));
    }
    Ok(())
}

/// A mode from `"0644"`, `"644"` or an integer (`0o644`); `default` when not given.
pub fn parse_mode(v: Option<&toml::Value>, default: u32) -> Result<u32, String> {
    let n = match v {
        None => return Ok(default),
        Some(toml::Value::Integer(n)) => u32::try_from(*n).ok(),
        Some(toml::Value::String(s)) => u32::from_str_radix(s.trim_start_matches("0o"), 8).ok(),
        Some(_) => None,
    };
    match n {
        Some(n) if n <= 0o7777 => Ok(n),
        _ => Err(format!(
            "{} is not a file mode (octal text such as \"0644\", or 0o644)",
            v.map(|v| v.to_string()).unwrap_or_default()
        )),
    }
}

impl FileSpec {
    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        check_path(&self.path).map_err(|why| ConfigError::new(format!("{field}.path"), why))?;
        self.mode_bits()
            .map_err(|why| ConfigError::new(format!("{field}.mode"), why))?;
        self.bytes()
            .map_err(|(sub, why)| ConfigError::new(format!("{field}.{sub}"), why))?;
        Ok(())
    }

    /// The mode the file is written with: 0644 by default, 0600 for a secret.
    pub fn mode_bits(&self) -> Result<u32, String> {
        let default = if self.secret { 0o600 } else { 0o644 };
        let mode = parse_mode(self.mode.as_ref(), default)?;
        if self.secret && mode & 0o077 != 0 {
            return Err(format!(
                "{mode:04o} would let others read a secret: a secret is written 0600 (or 0400)"
            ));
        }
        Ok(mode)
    }

    /// The contents (empty when neither field is given); errors name the sub-field.
    pub fn bytes(&self) -> Result<Vec<u8>, (&'static str, String)> {
        use base64::Engine;
        match (&self.contents, &self.contents_base64) {
            (Some(_), Some(_)) => Err((
                "contents_base64",
                "give contents or contents_base64, not both".into(),
            )),
            (Some(t), None) => Ok(t.as_bytes().to_vec()),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| ("contents_base64", base64_error(&e))),
            (None, None) => Ok(Vec::new()),
        }
    }
}

/// A base64 error by offset and kind only: the decoder's own message quotes the offending
/// byte, and the value may be a secret.
fn base64_error(e: &base64::DecodeError) -> String {
    use base64::DecodeError as D;
    match e {
        D::InvalidByte(at, _) => {
            format!("not base64: a character that is not base64 at offset {at}")
        }
        D::InvalidLength(n) => format!("not base64: {n} symbols is not a valid length"),
        D::InvalidLastSymbol(at, _) => {
            format!("not base64: the last symbol (offset {at}) has bits set that padding forbids")
        }
        D::InvalidPadding => "not base64: missing or extra '=' padding".to_string(),
    }
}

/// The init's service name rule.
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
}

impl Kernel {
    fn validate(&self) -> Result<(), ConfigError> {
        for (i, m) in self.modules.iter().enumerate() {
            if m.is_empty()
                || !m
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            {
                return Err(ConfigError::new(
                    format!("kernel.modules[{i}]"),
                    format!("{m:?} is not a module name"),
                ));
            }
        }
        for (k, v) in &self.sysctls {
            let field = format!("kernel.sysctls.{k:?}");
            let key_ok = !k.is_empty()
                && !k.starts_with(['.', '/'])
                && !k.contains("..")
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
            if !key_ok {
                return Err(ConfigError::new(
                    field,
                    "not a sysctl name (e.g. net.ipv4.ip_forward)",
                ));
            }
            sysctl_value(v).map_err(|why| ConfigError::new(field, why))?;
        }
        Ok(())
    }
}

/// The text a sysctl value is written as.
pub fn sysctl_value(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) if !s.contains('\n') => Ok(s.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Boolean(b) => Ok(if *b { "1" } else { "0" }.into()),
        other => Err(format!(
            "{other} is not a sysctl value (a string, integer or boolean)"
        )),
    }
}

fn check_url(field: &str, u: &str) -> Result<(), ConfigError> {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') && !u.contains(char::is_whitespace) => {
            Ok(())
        }
        _ => Err(ConfigError::new(
            field,
            format!("{u:?} is not an http:// or https:// URL"),
        )),
    }
}
