//! Unit files: what to run (an OCI archive and a command), how many and where.
//!
//! ```toml
//! name = "web"                      # optional: the file name without .toml
//! description = "the web front end" # optional
//! command = ["/bin/httpd", "-f", "-p", "8080"]   # optional: the image's entrypoint + cmd
//! env = { MODE = "prod" }
//! ports = ["8080", "5353/udp"]      # host ports (host network): two units sharing one never meet
//! replicas = 2                      # default 1; or `global = true`: one on every matching machine
//! restart = "always"                # "always" (default) | "on-failure" | "never"
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
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

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
    #[serde(default)]
    pub ports: Vec<Port>,
    pub replicas: Replicas,
    pub restart: Restart,
    #[serde(default)]
    pub constraints: Constraints,
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

/// A host port a unit listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Port {
    pub port: u16,
    pub udp: bool,
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, if self.udp { "udp" } else { "tcp" })
    }
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnitFile {
    name: Option<String>,
    description: Option<String>,
    image: ImageFile,
    command: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<PortFile>,
    replicas: Option<u32>,
    #[serde(default)]
    global: bool,
    #[serde(default)]
    restart: Restart,
    #[serde(default)]
    constraints: Constraints,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageFile {
    #[serde(rename = "ref")]
    reference: Option<String>,
    path: Option<String>,
    url: Option<String>,
    sha256: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PortFile {
    Number(i64),
    Text(String),
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
    /// Reads and validates a unit file; the unit's name defaults to the file's stem.
    pub fn load(path: &Path) -> Result<UnitSpec, UnitError> {
        let text = std::fs::read_to_string(path).map_err(|e| UnitError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        UnitSpec::parse(&stem, &text)
    }

    /// Parses and validates a unit file's text; `default_name` is used when it has no `name`.
    pub fn parse(default_name: &str, text: &str) -> Result<UnitSpec, UnitError> {
        let file: UnitFile = toml::from_str(text).map_err(|e| UnitError::Toml {
            unit: default_name.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let name = file
            .name
            .clone()
            .unwrap_or_else(|| default_name.to_string());
        let field = |field: &str, message: String| UnitError::Field {
            unit: name.clone(),
            field: field.to_string(),
            message,
        };
        if !valid_name(&name) {
            return Err(field(
                "name",
                format!("{name:?} is not 1-63 characters of a-z, 0-9 and -, starting with a letter or digit"),
            ));
        }
        let image = check_image(file.image).map_err(|(f, m)| field(f, m))?;
        let command_given = file.command.is_some();
        let command = file.command.unwrap_or_default();
        if command.first().is_some_and(|c| c.is_empty()) || (command_given && command.is_empty()) {
            return Err(field("command", "the program (first word) is empty".into()));
        }
        for (k, v) in &file.env {
            let ok = k.bytes().enumerate().all(|(i, b)| {
                b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit())
            });
            if k.is_empty() || !ok {
                return Err(field(
                    &format!("env.{k}"),
                    "a variable name is letters, digits and _, not starting with a digit".into(),
                ));
            }
            if v.contains('\0') {
                return Err(field(
                    &format!("env.{k}"),
                    "the value contains a NUL byte".into(),
                ));
            }
        }
        let mut ports = Vec::new();
        for (i, p) in file.ports.iter().enumerate() {
            let port = parse_port(p).map_err(|m| field(&format!("ports[{i}]"), m))?;
            if ports.contains(&port) {
                return Err(field(
                    &format!("ports[{i}]"),
                    format!("{port} is listed twice"),
                ));
            }
            ports.push(port);
        }
        let replicas = match (file.global, file.replicas) {
            (true, Some(_)) => {
                return Err(field("replicas", "a global unit runs on every matching machine: give replicas or global = true, not both".into()))
            }
            (true, None) => Replicas::Global,
            (false, None) => Replicas::Count(1),
            (false, Some(0)) => {
                return Err(field("replicas", "must be at least 1 (use `caisson-fleet stop` to stop a unit)".into()))
            }
            (false, Some(n)) if n > MAX_REPLICAS => {
                return Err(field("replicas", format!("{n} is more than the limit of {MAX_REPLICAS}")))
            }
            (false, Some(n)) => Replicas::Count(n),
        };
        for (k, v) in &file.constraints.labels {
            if k.is_empty() || v.is_empty() {
                return Err(field(
                    &format!("constraints.labels.{k}"),
                    "labels and their values must not be empty".into(),
                ));
            }
        }
        for (i, c) in file.constraints.conflicts.iter().enumerate() {
            let plain = c.replace('*', "a");
            if !valid_name(&plain) {
                return Err(field(
                    &format!("constraints.conflicts[{i}]"),
                    format!("{c:?} is not a unit name or a pattern with *"),
                ));
            }
        }
        Ok(UnitSpec {
            name,
            description: file.description,
            image,
            command,
            env: file.env,
            ports,
            replicas,
            restart: file.restart,
            constraints: file.constraints,
        })
    }
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
        match self.replicas {
            Replicas::Count(n) if n == 0 || n > MAX_REPLICAS => Err(field(
                "replicas",
                format!("{n} is not between 1 and {MAX_REPLICAS}"),
            )),
            _ => Ok(()),
        }
    }
}

fn check_image(f: ImageFile) -> Result<Image, (&'static str, String)> {
    if let Some(n) = &f.name {
        if n.is_empty() || n.contains(char::is_whitespace) {
            return Err(("image.name", format!("{n:?} is not an image reference")));
        }
    }
    if let Some(reference) = f.reference {
        if f.path.is_some() || f.url.is_some() {
            return Err(("image", "give one of ref, path or url".into()));
        }
        if f.sha256.is_some() || f.name.is_some() {
            return Err((
                "image.ref",
                "sha256 and name go with path or url; pin a registry image with ref = \"...@sha256:<hex>\"".into(),
            ));
        }
        let parsed = crate::distribution::parse_reference(&reference)
            .map_err(|e| ("image.ref", e.to_string()))?;
        if let Some(d) = parsed.digest() {
            if !crate::distribution::valid_digest(d) {
                return Err((
                    "image.ref",
                    format!("digest {d:?}: only sha256 digests are accepted"),
                ));
            }
        }
        return Ok(Image::Ref {
            reference,
            resolved: None,
        });
    }
    match (f.path, f.url) {
        (Some(_), Some(_)) => Err(("image", "give one of ref, path or url".into())),
        (None, None) => Err((
            "image",
            "give ref (an image in a registry), path (an OCI archive on the machine) or url and sha256".into(),
        )),
        (Some(path), None) => {
            if f.sha256.is_some() {
                return Err(("image.sha256", "only used with url".into()));
            }
            if !path.starts_with('/') {
                return Err(("image.path", format!("{path:?} is not an absolute path")));
            }
            Ok(Image::Path { path, name: f.name })
        }
        (None, Some(url)) => {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err((
                    "image.url",
                    format!("{url:?} is not an http:// or https:// URL"),
                ));
            }
            let Some(sha256) = f.sha256 else {
                return Err((
                    "image.sha256",
                    "required with url: the archive's sha256 in hex".into(),
                ));
            };
            let sha256 = sha256.to_ascii_lowercase();
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(("image.sha256", format!("{sha256:?} is not 64 hex digits")));
            }
            Ok(Image::Url {
                url,
                sha256,
                name: f.name,
            })
        }
    }
}

fn parse_port(p: &PortFile) -> Result<Port, String> {
    let (number, udp) = match p {
        PortFile::Number(n) => (n.to_string(), false),
        PortFile::Text(t) => match t.split_once('/') {
            None => (t.clone(), false),
            Some((n, "tcp")) => (n.to_string(), false),
            Some((n, "udp")) => (n.to_string(), true),
            Some((_, proto)) => return Err(format!("protocol {proto:?} is not tcp or udp")),
        },
    };
    match number.parse::<u16>() {
        Ok(port) if port > 0 => Ok(Port { port, udp }),
        _ => Err(format!("{number:?} is not a port number (1-65535)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = r#"
        command = ["/bin/httpd", "-f"]
        env = { MODE = "prod" }
        ports = [8080, "53/udp"]
        replicas = 2
        restart = "on-failure"
        [image]
        path = "/usr/lib/caisson/images/web.tar"
        [constraints]
        labels = { zone = "a" }
        conflicts = ["db", "web-*"]
    "#;

    fn err(text: &str) -> String {
        UnitSpec::parse("t", text).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_full_unit() {
        let u = UnitSpec::parse("web", WEB).unwrap();
        assert_eq!(u.name, "web");
        assert_eq!(u.replicas, Replicas::Count(2));
        assert_eq!(u.restart, Restart::OnFailure);
        assert_eq!(
            u.ports,
            [
                Port {
                    port: 8080,
                    udp: false
                },
                Port {
                    port: 53,
                    udp: true
                }
            ]
        );
        assert_eq!(u.constraints.conflicts, ["db", "web-*"]);
        // Stored as JSON in etcd: round-trips.
        let json = serde_json::to_string(&u).unwrap();
        assert_eq!(serde_json::from_str::<UnitSpec>(&json).unwrap(), u);
    }

    #[test]
    fn defaults_and_global() {
        let text = format!(
            "global = true\n[image]\nurl = \"http://h/x.tar\"\nsha256 = \"{}\"\n",
            "ab".repeat(32)
        );
        let u = UnitSpec::parse("x", &text).unwrap();
        assert_eq!(u.replicas, Replicas::Global);
        assert_eq!(u.restart, Restart::Always);
        assert!(u.command.is_empty());
        let one = UnitSpec::parse("y", "[image]\npath = \"/a.tar\"").unwrap();
        assert_eq!(one.replicas, Replicas::Count(1));
    }

    #[test]
    fn errors_name_the_field() {
        let img = "[image]\npath = \"/a.tar\"\n";
        assert!(err("[image]\npath = \"a.tar\"").contains("`image.path`"));
        assert!(err("[image]\nurl = \"http://x/a\"").contains("`image.sha256`"));
        assert!(err("[image]\nurl = \"http://x/a\"\nsha256 = \"12\"").contains("64 hex"));
        assert!(err("[image]").contains("`image`"));
        assert!(err(&format!("replicas = 0\n{img}")).contains("`replicas`"));
        assert!(err(&format!("replicas = 2\nglobal = true\n{img}")).contains("not both"));
        assert!(err(&format!("ports = [\"80/sctp\"]\n{img}")).contains("`ports[0]`"));
        assert!(err(&format!("ports = [70000]\n{img}")).contains("`ports[0]`"));
        assert!(err(&format!("ports = [80, \"80/tcp\"]\n{img}")).contains("twice"));
        assert!(err(&format!("env = {{ \"1X\" = \"a\" }}\n{img}")).contains("`env.1X`"));
        assert!(err(&format!("name = \"Web\"\n{img}")).contains("`name`"));
        assert!(err(&format!("command = []\n{img}")).contains("`command`"));
        assert!(err(&format!("[constraints]\nconflicts = [\"a b\"]\n{img}"))
            .contains("constraints.conflicts[0]"));
        let unknown = err(&format!("replica = 2\n{img}"));
        assert!(unknown.contains("replica"), "{unknown}");
        let typed = err(&format!("replicas = \"two\"\n{img}"));
        assert!(typed.contains("replicas"), "{typed}");
    }

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
