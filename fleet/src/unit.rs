//! Unit files: what to run (an OCI archive and a command), how many, where, with what limits
//! and privileges, and how to check it. The file format and its parsing are in [`file`]; the validated types here.
//!
//! ```toml
//! name = "web"                      # optional: the file name without .toml
//! description = "the web front end" # optional
//! command = ["/bin/httpd", "-f", "-p", "8080"]   # optional: the image's entrypoint + cmd
//! env = { MODE = "prod" }
//! network = "bridge"               # default: its own network namespace; "host": the host's
//! ports = [80, "8080:81", "5353:53/udp", { name = "http", port = 80 }]  # the container's ports,
//!                                   # "H:C" published on host port H (see [`ports`]); two units
//!                                   # publishing one host port never share a machine
//! replicas = 2                      # default 1; or `global = true`: one on every matching machine
//! restart = "always"                # "always" (default) | "on-failure" | "never"
//! capabilities = ["NET_RAW"]        # added to the default set (Docker's minus NET_RAW)
//! privileged = false                # true: every capability and device, no seccomp filter
//! volumes = [{ name = "pgdata", path = "/var/lib/postgresql/data" }]  # kept on the machine
//!                                   # (<volume_root>/<unit>/<name>) until `destroy --volumes`
//! binds = [{ source = "/etc/caisson/units/web/nginx.conf", path = "/etc/nginx/nginx.conf" }]
//!                                   # read-only; sources only under /etc/caisson/ (see volumes)
//! volumes_follow = "machine"        # default: a unit with volumes stays on the machine(s)
//!                                   # holding them; "none": it may move and starts empty
//!
//! [image]                           # exactly one of ref, path or url
//! ref = "registry.local:5000/team/web:1.2"      # from a registry (see fleet.toml [registries]);
//!                                               # `...@sha256:<hex>` pins it: nothing else runs
//! # path = "/usr/lib/caisson/images/web.oci.tar" # or an OCI archive on the machine
//! # url = "http://10.0.2.2:8000/web.oci.tar"     # or fetched over HTTP ...
//! # sha256 = "<64 hex digits>"                   # ... and then verified (required with url)
//! # name = "registry.local/team/web:1"          # the image in the archive (default: its only one)
//!
//! [constraints]
//! labels = { zone = "a" }           # only machines with all these labels
//! conflicts = ["db", "cache-*"]     # never on a machine running one of these units
//!
//! [resources]                       # cgroup limits; memory and cpus are also the scheduler's
//! memory = "512M"                   # requests. Bytes, or K/M/G/T (powers of 1024); no limit if absent
//! cpus = 1.5                        # CPU time per wall second (cpu.max); no limit if absent
//! pids = 512                        # processes and threads (pids.max); default DEFAULT_PIDS
//!
//! [health]                          # optional; exactly one of exec, http or tcp
//! exec = ["test", "-f", "/tmp/ok"]  # run in the container: exit 0 is healthy
//! # http = "http://127.0.0.1:8080/healthz"   # GET to the container: 2xx or 3xx is healthy
//! # tcp = 8080                               # the container accepts a TCP connection
//! interval = "10s"                  # default 10s; durations: "500ms", "10s", "2m", "1m30s"
//! timeout = "5s"                    # default 5s, each check's deadline
//! retries = 3                       # default 3 consecutive failures make it unhealthy
//! start_period = "30s"              # default 0s (as Docker): failures before the first
//!                                   # success within this time after a start do not count
//!
//! [[templates]]                     # optional, repeated: confd-style files (see [`templates`])
//! src = "/etc/caisson/units/lb/haproxy.cfg.tmpl"  # a Jinja2 template, provisioned (bind rules)
//! dest = "haproxy.cfg"              # relative to the volume, no `..`
//! volume = "conf"                   # one of the unit's volumes
//! services = ["web"]                # the units whose healthy instances it sees
//! reload = ["/bin/sh", "-c", "kill -HUP 1"]  # optional: run in the container after a change
//! ```
//!
//! An unhealthy instance is restarted when `restart` is `always` or `on-failure`; with `never`
//! it is left running and shown unhealthy (see `crate::agent::health`).
//!
//! Volumes ([`volumes`]) survive container restarts, replacement (a changed spec), `stop`, a
//! plain `destroy`, reboots and OS updates; only `caisson-fleet destroy UNIT --volumes` has the
//! machines delete them. How they pin a unit: `crate::scheduler` and `crate::volumes`.
//!
//! Templates ([`templates`]) are rendered by the agent from the endpoints of the units they name
//! (the context: `crate::templates`) and written into the volume only when their text changes.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

mod health;
mod ports;
pub mod templates;
pub mod volumes;
pub use health::{parse_duration, Health, Probe};
pub use ports::{HostPort, Network, Port};
pub use templates::Template;
pub use volumes::{Bind, Volume, VolumesFollow};

/// Why a unit file is not valid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    /// The file cannot be read.
    #[error("reading unit file {path}: {message}")]
    Read { path: String, message: String },
    /// The TOML does not parse or has unknown or mistyped fields (toml names the key and line).
    #[error("unit {unit}: {message}")]
    Toml { unit: String, message: String },
    /// A field has a value that is not allowed.
    #[error("unit {unit}: field `{field}`: {message}")]
    Field {
        unit: String,
        field: String,
        message: String,
    },
}

/// A validated unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub image: Image,
    /// Empty: the image's own entrypoint and command.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Its own network namespace or the host's ([`ports`]).
    #[serde(default = "Network::record_default")]
    pub network: Network,
    #[serde(default)]
    pub ports: Vec<Port>,
    pub replicas: Replicas,
    pub restart: Restart,
    #[serde(default)]
    pub constraints: Constraints,
    #[serde(default)]
    pub resources: Resources,
    /// Capabilities added to the default set ([`crate::capability::DEFAULT`]), kernel names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Every capability and device, no seccomp filter, no masked paths (Docker's `--privileged`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
    /// How the agent checks that an instance works (none: running is enough).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Named volumes, kept on the machine across restarts, updates and `stop`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Provisioned files under `/etc/caisson/`, bound read-only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<Bind>,
    /// Whether a unit with volumes is held to the machines that hold them.
    #[serde(default, skip_serializing_if = "VolumesFollow::is_default")]
    pub volumes_follow: VolumesFollow,
    /// Files rendered from the cluster's endpoints into the unit's volumes ([`templates`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<Template>,
}

/// Where the OCI archive comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Image {
    /// An OCI archive on the machine (baked into the image or provisioned).
    Path {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// An OCI archive fetched over HTTP and checked against its sha256.
    Url {
        url: String,
        sha256: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// An image in an OCI registry, by tag or digest.
    Ref {
        #[serde(rename = "ref")]
        reference: String,
        /// The digest the reference resolved to on the machine running it (set by the agent,
        /// never by a unit file: it makes a moved tag replace the container).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resolved: Option<String>,
    },
}

/// How many instances, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Replicas {
    /// This many, each on a different machine.
    Count(u32),
    /// One on every machine that matches the constraints.
    Global,
}

/// When a container that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    #[default]
    Always,
    OnFailure,
    Never,
}

/// Where a unit may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    /// The machine must carry every one of these labels with these values.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Unit names (`*` matches any run of characters) this unit never shares a machine with.
    #[serde(default)]
    pub conflicts: Vec<String>,
}

pub mod file;
use file::{check_image, ImageFile};

/// The pids limit of a unit that sets none: enough for a busy server's threads and workers,
/// few enough that a fork bomb stops long before the host's limit (`pid_max`, 4M at most).
pub const DEFAULT_PIDS: u32 = 1024;
/// The most pids a unit may ask for (the kernel's `PID_MAX_LIMIT`).
pub const MAX_PIDS: u32 = 4_194_304;
/// The least memory limit: below it runc and the kernel's own accounting fail to start anything.
pub const MIN_MEMORY: u64 = 6 << 20;
/// The least CPU limit, in thousandths of a CPU: 1 ms per 100 ms period, the kernel's minimum.
pub const MIN_MILLICPUS: u32 = 10;
/// The most CPUs a unit may ask for, in thousandths.
pub const MAX_MILLICPUS: u32 = 1024 * 1000;

/// The cgroup limits of a unit's container. `memory` and `millicpus` are also what the
/// scheduler counts against a machine's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// `memory.max`, in bytes (`None`: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// `cpu.max`, in thousandths of a CPU (`None`: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub millicpus: Option<u32>,
    /// `pids.max`.
    #[serde(default = "default_pids")]
    pub pids: u32,
}

fn default_pids() -> u32 {
    DEFAULT_PIDS
}

impl Default for Resources {
    fn default() -> Resources {
        Resources {
            memory: None,
            millicpus: None,
            pids: DEFAULT_PIDS,
        }
    }
}

impl Resources {
    /// Whether the limits are in range: the field that is not and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(m) = self.memory {
            if m < MIN_MEMORY {
                return Err((
                    "resources.memory",
                    format!("{m} bytes is less than the least limit, 6M"),
                ));
            }
        }
        if let Some(c) = self.millicpus {
            if !(MIN_MILLICPUS..=MAX_MILLICPUS).contains(&c) {
                return Err((
                    "resources.cpus",
                    format!(
                        "{} is not between 0.01 and {}",
                        f64::from(c) / 1000.0,
                        MAX_MILLICPUS / 1000
                    ),
                ));
            }
        }
        if self.pids == 0 || self.pids > MAX_PIDS {
            return Err((
                "resources.pids",
                format!("{} is not between 1 and {MAX_PIDS}", self.pids),
            ));
        }
        Ok(())
    }
}

/// The kernel names of `names` (given with or without `CAP_`), each at most once; the field
/// (`capabilities[i]`) and why when one is unknown or repeated.
pub fn check_capabilities(names: &[String]) -> Result<Vec<String>, (String, String)> {
    let mut out: Vec<String> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let field = format!("capabilities[{i}]");
        let Some(cap) = crate::capability::canonical(n) else {
            return Err((
                field,
                format!("{n:?} is not a Linux capability (e.g. NET_ADMIN or CAP_NET_ADMIN)"),
            ));
        };
        if out.iter().any(|c| c == cap) {
            return Err((field, format!("{cap} is listed twice")));
        }
        out.push(cap.to_string());
    }
    Ok(out)
}

/// The most replicas a unit may ask for.
pub const MAX_REPLICAS: u32 = 10_000;

/// Whether `name` is a valid unit name: 1-63 of `a-z 0-9 -`, starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

/// Whether `name` matches a conflict pattern (`*` matches any run of characters).
pub fn matches_pattern(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

impl UnitSpec {
    /// Checks a unit read back from etcd, which anyone with write access to the units could
    /// have written without `caisson-fleet submit`: the fields the agent builds paths, requests
    /// and loops from (name, image, replicas) get the unit file's rules.
    pub fn check(&self) -> Result<(), UnitError> {
        let field = |field: &str, message: String| UnitError::Field {
            unit: self.name.clone(),
            field: field.to_string(),
            message,
        };
        if !valid_name(&self.name) {
            return Err(field("name", format!("{:?} is not a unit name", self.name)));
        }
        let image = match self.image.clone() {
            Image::Ref {
                reference,
                resolved,
            } => {
                if let Some(r) = resolved.filter(|r| !crate::distribution::valid_digest(r)) {
                    return Err(field(
                        "image.resolved",
                        format!("{r:?} is not a sha256 digest"),
                    ));
                }
                ImageFile {
                    reference: Some(reference),
                    path: None,
                    url: None,
                    sha256: None,
                    name: None,
                }
            }
            Image::Path { path, name } => ImageFile {
                reference: None,
                path: Some(path),
                url: None,
                sha256: None,
                name,
            },
            Image::Url { url, sha256, name } => ImageFile {
                reference: None,
                path: None,
                url: Some(url),
                sha256: Some(sha256),
                name,
            },
        };
        check_image(image).map_err(|(f, m)| field(f, m))?;
        self.resources.check().map_err(|(f, m)| field(f, m))?;
        let caps = check_capabilities(&self.capabilities).map_err(|(f, m)| field(&f, m))?;
        if caps != self.capabilities {
            return Err(field(
                "capabilities",
                "not in the kernel's spelling (CAP_...)".into(),
            ));
        }
        if let Some(h) = &self.health {
            h.check().map_err(|(f, m)| field(&f, m))?;
        }
        let (volumes, binds) =
            volumes::check(&self.volumes, &self.binds).map_err(|(f, m)| field(&f, m))?;
        if volumes != self.volumes || binds != self.binds {
            return Err(field(
                "volumes",
                "a volume's or bind's path is not normalised (written without submit?)".into(),
            ));
        }
        let templates =
            templates::check(&self.volumes, &self.templates).map_err(|(f, m)| field(&f, m))?;
        if templates != self.templates {
            return Err(field(
                "templates",
                "a template's src or dest is not normalised (written without submit?)".into(),
            ));
        }
        match self.replicas {
            Replicas::Count(n) if n == 0 || n > MAX_REPLICAS => Err(field(
                "replicas",
                format!("{n} is not between 1 and {MAX_REPLICAS}"),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::file::tests::WEB;
    use super::*;

    #[test]
    fn a_stored_unit_is_checked_again() {
        let u = UnitSpec::parse("web", WEB).unwrap();
        assert_eq!(u.check(), Ok(()));
        let named = UnitSpec {
            name: "../../etc/x".into(),
            ..u.clone()
        };
        assert!(named.check().unwrap_err().to_string().contains("`name`"));
        let url = UnitSpec {
            image: Image::Url {
                url: "http://h/x.tar".into(),
                sha256: "../../x".into(),
                name: None,
            },
            ..u.clone()
        };
        assert!(url
            .check()
            .unwrap_err()
            .to_string()
            .contains("image.sha256"));
        let many = UnitSpec {
            replicas: Replicas::Count(u32::MAX),
            ..u
        };
        assert!(many.check().unwrap_err().to_string().contains("`replicas`"));
    }

    #[test]
    fn stored_limits_and_capabilities_are_checked_again() {
        let u = UnitSpec::parse("web", WEB).unwrap();
        let no_pids = UnitSpec {
            resources: Resources {
                pids: 0,
                ..u.resources
            },
            ..u.clone()
        };
        assert!(no_pids
            .check()
            .unwrap_err()
            .to_string()
            .contains("resources.pids"));
        let tiny = UnitSpec {
            resources: Resources {
                memory: Some(1),
                ..u.resources
            },
            ..u.clone()
        };
        assert!(tiny
            .check()
            .unwrap_err()
            .to_string()
            .contains("resources.memory"));
        let odd = UnitSpec {
            capabilities: vec!["net_admin".into()],
            ..u.clone()
        };
        assert!(odd
            .check()
            .unwrap_err()
            .to_string()
            .contains("`capabilities`"));
        // A record written before limits existed decodes with the default pids limit.
        let mut json = serde_json::to_value(&u).unwrap();
        json.as_object_mut().unwrap().remove("resources");
        let old: UnitSpec = serde_json::from_value(json).unwrap();
        assert_eq!(old.resources, Resources::default());
        assert_eq!(old.resources.pids, DEFAULT_PIDS);
        assert!(!old.privileged && old.capabilities.is_empty());
    }

    #[test]
    fn patterns() {
        assert!(matches_pattern("db", "db"));
        assert!(!matches_pattern("db", "db2"));
        assert!(matches_pattern("web-*", "web-1"));
        assert!(matches_pattern("*-cache", "a-cache"));
        assert!(matches_pattern("a*b*c", "axxbyyc"));
        assert!(!matches_pattern("a*b*c", "axxbyy"));
        assert!(matches_pattern("*", "anything"));
    }
}
