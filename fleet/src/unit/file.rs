//! The unit file format (TOML) and its parsing into a validated [`UnitSpec`].

use super::{
    check_capabilities, valid_name, Constraints, Image, Network, Replicas, Resources, Restart,
    UnitError, UnitSpec, DEFAULT_PIDS, MAX_REPLICAS,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnitFile {
    name: Option<String>,
    description: Option<String>,
    image: ImageFile,
    command: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    network: Option<Network>,
    #[serde(default)]
    ports: Vec<super::ports::PortFile>,
    replicas: Option<u32>,
    #[serde(default)]
    global: bool,
    #[serde(default)]
    restart: Restart,
    #[serde(default)]
    constraints: Constraints,
    #[serde(default)]
    resources: ResourcesFile,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    privileged: bool,
    health: Option<super::health::HealthFile>,
    #[serde(default)]
    volumes: Vec<super::Volume>,
    #[serde(default)]
    binds: Vec<super::Bind>,
    #[serde(default)]
    volumes_follow: super::VolumesFollow,
    #[serde(default)]
    templates: Vec<super::Template>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResourcesFile {
    memory: Option<SizeFile>,
    cpus: Option<f64>,
    pids: Option<i64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeFile {
    Bytes(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ImageFile {
    #[serde(rename = "ref")]
    pub(super) reference: Option<String>,
    pub(super) path: Option<String>,
    pub(super) url: Option<String>,
    pub(super) sha256: Option<String>,
    pub(super) name: Option<String>,
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
        let network = file.network.unwrap_or_else(Network::file_default);
        let ports = super::ports::check(&file.ports, network).map_err(|(f, m)| field(&f, m))?;
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
        let resources = parse_resources(&file.resources).map_err(|(f, m)| field(f, m))?;
        let capabilities = check_capabilities(&file.capabilities).map_err(|(f, m)| field(&f, m))?;
        let health = match file.health {
            Some(h) => Some(h.check().map_err(|(f, m)| field(&f, m))?),
            None => None,
        };
        let (volumes, binds) =
            super::volumes::check(&file.volumes, &file.binds).map_err(|(f, m)| field(&f, m))?;
        let templates =
            super::templates::check(&volumes, &file.templates).map_err(|(f, m)| field(&f, m))?;
        Ok(UnitSpec {
            name,
            description: file.description,
            image,
            command,
            env: file.env,
            network,
            ports,
            replicas,
            restart: file.restart,
            constraints: file.constraints,
            resources,
            capabilities,
            privileged: file.privileged,
            health,
            volumes,
            binds,
            volumes_follow: file.volumes_follow,
            templates,
        })
    }
}

pub(super) fn check_image(f: ImageFile) -> Result<Image, (&'static str, String)> {
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

fn parse_resources(f: &ResourcesFile) -> Result<Resources, (&'static str, String)> {
    let memory = match &f.memory {
        None => None,
        Some(m) => Some(parse_size(m).map_err(|e| ("resources.memory", e))?),
    };
    let millicpus = match f.cpus {
        None => None,
        Some(c) if c.is_finite() && c > 0.0 && c <= f64::from(super::MAX_MILLICPUS) / 1000.0 => {
            // In range: the product fits a u32.
            Some((c * 1000.0).round() as u32)
        }
        Some(c) => {
            return Err((
                "resources.cpus",
                format!("{c} is not a number of CPUs above 0 (e.g. 0.5 or 2)"),
            ))
        }
    };
    let pids = match f.pids {
        None => DEFAULT_PIDS,
        Some(p) => u32::try_from(p).map_err(|_| {
            (
                "resources.pids",
                format!("{p} is not between 1 and {}", super::MAX_PIDS),
            )
        })?,
    };
    let r = Resources {
        memory,
        millicpus,
        pids,
    };
    r.check()?;
    Ok(r)
}

/// Bytes from a number, or a number with a K, M, G or T suffix (powers of 1024).
fn parse_size(s: &SizeFile) -> Result<u64, String> {
    let bad = |t: &str| {
        format!("{t:?} is not a size: bytes, or a number with K, M, G or T (powers of 1024)")
    };
    match s {
        SizeFile::Bytes(n) => u64::try_from(*n).map_err(|_| bad(&n.to_string())),
        SizeFile::Text(t) => {
            let trimmed = t.trim();
            let (digits, shift) = match trimmed.chars().last().map(|c| c.to_ascii_uppercase()) {
                Some('K') => (&trimmed[..trimmed.len() - 1], 10),
                Some('M') => (&trimmed[..trimmed.len() - 1], 20),
                Some('G') => (&trimmed[..trimmed.len() - 1], 30),
                Some('T') => (&trimmed[..trimmed.len() - 1], 40),
                _ => (trimmed, 0),
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(t));
            }
            let n: u64 = digits.parse().map_err(|_| bad(t))?;
            n.checked_mul(1u64 << shift).ok_or_else(|| bad(t))
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::unit) const WEB: &str = r#"
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
        let ports: Vec<String> = u.ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(ports, ["8080/tcp", "53/udp"]);
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
    fn limits_and_capabilities() {
        let img = "[image]\npath = \"/a.tar\"\n";
        let u = UnitSpec::parse(
            "db",
            &format!("capabilities = [\"net_admin\", \"CAP_SYS_PTRACE\"]\n{img}[resources]\nmemory = \"512M\"\ncpus = 1.5\npids = 64\n"),
        )
        .unwrap();
        assert_eq!(u.capabilities, ["CAP_NET_ADMIN", "CAP_SYS_PTRACE"]);
        assert!(!u.privileged);
        assert_eq!(
            u.resources,
            Resources {
                memory: Some(512 << 20),
                millicpus: Some(1500),
                pids: 64
            }
        );
        let json = serde_json::to_string(&u).unwrap();
        assert_eq!(serde_json::from_str::<UnitSpec>(&json).unwrap(), u);
        let plain = UnitSpec::parse("x", img).unwrap();
        assert_eq!(plain.resources, Resources::default());
        assert_eq!(plain.resources.pids, DEFAULT_PIDS);
        let whole = UnitSpec::parse(
            "x",
            &format!("privileged = true\n{img}[resources]\nmemory = 8388608\ncpus = 2\n"),
        )
        .unwrap();
        assert!(whole.privileged);
        assert_eq!(
            (whole.resources.memory, whole.resources.millicpus),
            (Some(8 << 20), Some(2000))
        );
        assert_eq!(
            UnitSpec::parse("x", &format!("{img}[resources]\nmemory = \"2g\""))
                .unwrap()
                .resources
                .memory,
            Some(2 << 30)
        );
        for (body, field) in [
            ("memory = \"12X\"", "`resources.memory`"),
            ("memory = \"M\"", "`resources.memory`"),
            ("memory = -5", "`resources.memory`"),
            ("memory = \"1K\"", "`resources.memory`"),
            ("memory = \"99999999999T\"", "`resources.memory`"),
            ("cpus = 0", "`resources.cpus`"),
            ("cpus = -1.5", "`resources.cpus`"),
            ("cpus = 0.001", "`resources.cpus`"),
            ("cpus = nan", "`resources.cpus`"),
            ("cpus = 5000", "`resources.cpus`"),
            ("pids = 0", "`resources.pids`"),
            ("pids = -1", "`resources.pids`"),
            ("pids = 99999999", "`resources.pids`"),
        ] {
            let e = err(&format!("{img}[resources]\n{body}"));
            assert!(e.contains(field) && e.starts_with("unit t:"), "{body}: {e}");
        }
        let e = err(&format!("{img}[resources]\nswap = 1"));
        assert!(e.contains("swap"), "{e}");
        let e = err(&format!("capabilities = [\"NET_WIZARD\"]\n{img}"));
        assert!(
            e.contains("`capabilities[0]`") && e.contains("NET_WIZARD"),
            "{e}"
        );
        let e = err(&format!(
            "capabilities = [\"NET_RAW\", \"cap_net_raw\"]\n{img}"
        ));
        assert!(
            e.contains("`capabilities[1]`") && e.contains("twice"),
            "{e}"
        );
        let e = err(&format!("privileged = \"yes\"\n{img}"));
        assert!(e.contains("privileged"), "{e}");
    }
}
