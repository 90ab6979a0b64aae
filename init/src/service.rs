//! Service definitions: one TOML file per service (format in `init/SERVICES.md`), in
//! `/usr/lib/caisson/services/` (the image) and `/etc/caisson/services/` (provisioned; a file there
//! replaces the image's file of the same name).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A service definition that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServiceError {
    /// The TOML does not parse or has an unknown field or a wrong type.
    #[error("service {service}: {}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
    Toml {
        service: String,
        line: Option<usize>,
        message: String,
    },
    /// A field has a value the init cannot use.
    #[error("service {service}: field `{field}`: {why}")]
    Invalid {
        service: String,
        field: &'static str,
        why: String,
    },
    /// A service file could not be read.
    #[error("service file {path}: {message}")]
    Read { path: PathBuf, message: String },
}

/// When a service is started again after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Whatever the exit status.
    Always,
    /// Unless it exits with code 0.
    #[default]
    OnFailure,
    /// Never.
    Never,
}

/// A long-running daemon, or a task that runs to completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    #[default]
    Daemon,
    /// Ready once it has exited with code 0; not restarted after success.
    Oneshot,
}

/// What a stop or restart signals: the whole cgroup, or only the main process (systemd's
/// `KillMode=control-group` and `KillMode=process`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KillMode {
    /// Every process in the service's cgroup; a start waits until the cgroup is empty.
    #[default]
    Cgroup,
    /// Only the main process; what else is in the cgroup is left alone (containerd's shims and
    /// the containers they hold outlive a restart of containerd). Everything is still killed at
    /// shutdown.
    Process,
}

impl KillMode {
    fn parse(s: &str) -> Option<KillMode> {
        match s {
            "cgroup" => Some(KillMode::Cgroup),
            "process" => Some(KillMode::Process),
            _ => None,
        }
    }
}

/// How the init knows a started service is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyCheck {
    /// Ready as soon as it has been started (no `[ready]` table).
    Started,
    /// This path exists.
    Path(PathBuf),
    /// This unix socket accepts a connection.
    UnixSocket(PathBuf),
    /// This TCP address accepts a connection.
    Tcp(std::net::SocketAddr),
    /// This command exits with code 0.
    Command(Vec<String>),
}

/// cgroup v2 limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// `memory.max` in bytes.
    pub memory_max: Option<u64>,
    /// `cpu.weight` (1 to 10000).
    pub cpu_weight: Option<u32>,
    /// `pids.max`.
    pub pids_max: Option<u64>,
}

/// A parsed, validated service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub description: String,
    pub kind: Kind,
    pub exec: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub after: Vec<String>,
    pub requires: Vec<String>,
    pub restart: Restart,
    pub required: bool,
    pub ready: ReadyCheck,
    pub ready_timeout: Duration,
    pub user: Option<String>,
    pub group: Option<String>,
    pub limits: Limits,
    pub oom_score_adj: Option<i32>,
    pub stop_timeout: Duration,
    pub kill_mode: KillMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    description: String,
    #[serde(default)]
    kind: Kind,
    exec: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default)]
    requires: Vec<String>,
    restart: Option<Restart>,
    #[serde(default = "yes")]
    required: bool,
    ready: Option<RawReady>,
    user: Option<String>,
    group: Option<String>,
    #[serde(default)]
    limits: RawLimits,
    oom_score_adj: Option<i32>,
    #[serde(default = "default_stop_timeout")]
    stop_timeout_s: u64,
    kill_mode: Option<String>,
}

fn yes() -> bool {
    true
}

fn default_stop_timeout() -> u64 {
    10
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReady {
    path: Option<String>,
    unix_socket: Option<String>,
    tcp: Option<String>,
    command: Option<Vec<String>>,
    #[serde(default = "default_ready_timeout")]
    timeout_s: u64,
}

fn default_ready_timeout() -> u64 {
    120
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory_max: Option<toml::Value>,
    cpu_weight: Option<u32>,
    pids_max: Option<u64>,
}

/// A valid service name: it names a file, a log file and a cgroup.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

fn key_on_line(text: &str, line: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let (key, _) = l.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()).then(|| key.to_string())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl ServiceSpec {
    /// Parses and validates the service `name` from its file's text.
    pub fn parse(name: &str, toml_text: &str) -> Result<ServiceSpec, ServiceError> {
        let invalid = |field: &'static str, why: String| ServiceError::Invalid {
            service: name.to_string(),
            field,
            why,
        };
        if !valid_name(name) {
            return Err(invalid(
                "name",
                "a service name is 1-64 characters of A-Z a-z 0-9 - _ . @".into(),
            ));
        }
        let raw: RawService = toml::from_str(toml_text).map_err(|e| {
            let line = e.span().map(|s| line_of(toml_text, s.start));
            let mut message = e.message().trim().to_string();
            // Type errors do not say which field: name the key on the offending line.
            if let Some(key) = line.and_then(|l| key_on_line(toml_text, l)) {
                if !message.contains(&key) {
                    message = format!("field `{key}`: {message}");
                }
            }
            ServiceError::Toml {
                service: name.to_string(),
                line,
                message,
            }
        })?;
        if !raw.exec.starts_with('/') {
            return Err(invalid(
                "exec",
                format!("{:?} is not an absolute path", raw.exec),
            ));
        }
        for (field, list) in [("after", &raw.after), ("requires", &raw.requires)] {
            if let Some(bad) = list.iter().find(|d| !valid_name(d) || *d == name) {
                return Err(invalid(
                    field,
                    format!("{bad:?} is not another service's name"),
                ));
            }
        }
        if let Some(k) = raw.env.keys().find(|k| k.is_empty() || k.contains('=')) {
            return Err(invalid("env", format!("{k:?} is not a variable name")));
        }
        let ready_timeout = Duration::from_secs(
            raw.ready
                .as_ref()
                .map(|r| r.timeout_s)
                .unwrap_or_else(default_ready_timeout),
        );
        let ready = match raw.ready {
            None => ReadyCheck::Started,
            Some(r) => parse_ready(r).map_err(|(field, why)| invalid(field, why))?,
        };
        let limits = parse_limits(raw.limits).map_err(|(field, why)| invalid(field, why))?;
        if let Some(adj) = raw.oom_score_adj {
            if !(-1000..=1000).contains(&adj) {
                return Err(invalid(
                    "oom_score_adj",
                    format!("{adj} is not in -1000..=1000"),
                ));
            }
        }
        let kill_mode = match raw.kill_mode.as_deref() {
            None => KillMode::default(),
            Some(m) => KillMode::parse(m).ok_or_else(|| {
                invalid(
                    "kill_mode",
                    format!("{m:?} is neither \"cgroup\" (the default) nor \"process\""),
                )
            })?,
        };
        let restart = raw.restart.unwrap_or(match raw.kind {
            Kind::Daemon => Restart::OnFailure,
            Kind::Oneshot => Restart::Never,
        });
        Ok(ServiceSpec {
            name: name.to_string(),
            description: raw.description,
            kind: raw.kind,
            exec: PathBuf::from(raw.exec),
            args: raw.args,
            env: raw.env,
            after: raw.after,
            requires: raw.requires,
            restart,
            required: raw.required,
            ready,
            ready_timeout,
            user: raw.user,
            group: raw.group,
            limits,
            oom_score_adj: raw.oom_score_adj,
            stop_timeout: Duration::from_secs(raw.stop_timeout_s),
            kill_mode,
        })
    }

    /// Every service this one waits for (`requires` and `after`).
    pub fn dependencies(&self) -> impl Iterator<Item = &String> {
        self.requires.iter().chain(self.after.iter())
    }
}

type FieldError = (&'static str, String);

fn parse_ready(r: RawReady) -> Result<ReadyCheck, FieldError> {
    let mut checks = Vec::new();
    if let Some(p) = r.path {
        checks.push(absolute("ready.path", p).map(ReadyCheck::Path));
    }
    if let Some(p) = r.unix_socket {
        checks.push(absolute("ready.unix_socket", p).map(ReadyCheck::UnixSocket));
    }
    if let Some(t) = r.tcp {
        checks.push(t.parse().map(ReadyCheck::Tcp).map_err(|e| {
            (
                "ready.tcp",
                format!("{t:?} is not an address like 127.0.0.1:80: {e}"),
            )
        }));
    }
    if let Some(c) = r.command {
        checks.push(match c.first() {
            Some(p) if p.starts_with('/') => Ok(ReadyCheck::Command(c)),
            _ => Err((
                "ready.command",
                "expected a list starting with an absolute program path".into(),
            )),
        });
    }
    match checks.len() {
        1 => checks.remove(0),
        0 => Err((
            "ready",
            "give one of path, unix_socket, tcp or command".into(),
        )),
        _ => Err((
            "ready",
            "give only one of path, unix_socket, tcp or command".into(),
        )),
    }
}

fn absolute(field: &'static str, p: String) -> Result<PathBuf, FieldError> {
    if p.starts_with('/') {
        Ok(PathBuf::from(p))
    } else {
        Err((field, format!("{p:?} is not an absolute path")))
    }
}

fn parse_limits(l: RawLimits) -> Result<Limits, FieldError> {
    let memory_max = match l.memory_max {
        None => None,
        Some(toml::Value::Integer(n)) if n > 0 => Some(n as u64),
        Some(toml::Value::String(s)) => Some(parse_size(&s).ok_or((
            "limits.memory_max",
            format!("{s:?} is not a size like 512M, 2G or 1048576"),
        ))?),
        Some(other) => {
            return Err((
                "limits.memory_max",
                format!("{other} is not a size like \"512M\" or a positive byte count"),
            ))
        }
    };
    if let Some(w) = l.cpu_weight {
        if !(1..=10000).contains(&w) {
            return Err(("limits.cpu_weight", format!("{w} is not in 1..=10000")));
        }
    }
    if l.pids_max == Some(0) {
        return Err((
            "limits.pids_max",
            "0 would forbid the service itself".into(),
        ));
    }
    Ok(Limits {
        memory_max,
        cpu_weight: l.cpu_weight,
        pids_max: l.pids_max,
    })
}

/// `512M`, `2G`, `64K`, `1048576` (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().ok()?;
    n.checked_mul(mult).filter(|v| *v > 0)
}

/// The services found in the service directories.
#[derive(Debug, Default)]
pub struct Loaded {
    pub specs: Vec<ServiceSpec>,
    /// Files that could not be used, by service name (they count as failed, required services).
    pub broken: Vec<(String, ServiceError)>,
}

/// Reads `*.toml` from each directory in order; a later directory's file replaces an earlier one
/// of the same name. Missing directories are fine.
pub fn load_dirs(dirs: &[&Path]) -> Loaded {
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("toml") {
                continue;
            }
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                files.insert(stem.to_string(), path);
            }
        }
    }
    let mut loaded = Loaded::default();
    for (name, path) in files {
        let parsed = std::fs::read_to_string(&path)
            .map_err(|e| ServiceError::Read {
                path: path.clone(),
                message: e.to_string(),
            })
            .and_then(|text| ServiceSpec::parse(&name, &text));
        match parsed {
            Ok(s) => loaded.specs.push(s),
            Err(e) => loaded.broken.push((name, e)),
        }
    }
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
description = "container runtime"
exec = "/usr/bin/containerd"
args = ["--log-level", "info"]
env = { PATH = "/usr/bin" }
after = ["network"]
requires = ["setup"]
restart = "always"
required = true
user = "root"
group = "root"
oom_score_adj = -999
stop_timeout_s = 20
kill_mode = "process"

[ready]
unix_socket = "/run/containerd/containerd.sock"
timeout_s = 30

[limits]
memory_max = "512M"
cpu_weight = 200
pids_max = 4096
"#;

    #[test]
    fn parses_every_field() {
        let s = ServiceSpec::parse("containerd", FULL).unwrap();
        assert_eq!(s.exec, PathBuf::from("/usr/bin/containerd"));
        assert_eq!(s.args, ["--log-level", "info"]);
        assert_eq!(s.env["PATH"], "/usr/bin");
        assert_eq!(s.restart, Restart::Always);
        assert_eq!(
            s.ready,
            ReadyCheck::UnixSocket("/run/containerd/containerd.sock".into())
        );
        assert_eq!(s.ready_timeout, Duration::from_secs(30));
        assert_eq!(s.limits.memory_max, Some(512 << 20));
        assert_eq!(s.limits.cpu_weight, Some(200));
        assert_eq!(s.limits.pids_max, Some(4096));
        assert_eq!(s.oom_score_adj, Some(-999));
        assert_eq!(s.stop_timeout, Duration::from_secs(20));
        assert_eq!(s.kill_mode, KillMode::Process);
        assert_eq!(s.dependencies().count(), 2);
    }

    #[test]
    fn defaults() {
        let s = ServiceSpec::parse("x", "exec = \"/bin/x\"\n").unwrap();
        assert_eq!(s.restart, Restart::OnFailure);
        assert!(s.required);
        assert_eq!(s.ready, ReadyCheck::Started);
        assert_eq!(s.kill_mode, KillMode::Cgroup);
        let o = ServiceSpec::parse("o", "exec = \"/bin/x\"\nkind = \"oneshot\"\n").unwrap();
        assert_eq!(o.restart, Restart::Never);
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let err = ServiceSpec::parse("x", "exec = \"/bin/x\"\nrestrat = \"always\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("restrat"), "{text}");
        assert!(text.contains("line 2"), "{text}");
        assert!(text.contains("service x"), "{text}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            ("exec = \"bin/x\"", "exec"),
            ("exec = \"/x\"\nrestart = \"sometimes\"", "sometimes"),
            ("exec = \"/x\"\n[ready]\ntcp = \"nowhere\"", "ready.tcp"),
            (
                "exec = \"/x\"\n[ready]\npath = \"/a\"\ntcp = \"127.0.0.1:1\"",
                "only one",
            ),
            ("exec = \"/x\"\n[ready]\ntimeout_s = 3", "one of"),
            (
                "exec = \"/x\"\n[limits]\nmemory_max = \"lots\"",
                "limits.memory_max",
            ),
            (
                "exec = \"/x\"\n[limits]\ncpu_weight = 0",
                "limits.cpu_weight",
            ),
            ("exec = \"/x\"\noom_score_adj = 5000", "oom_score_adj"),
            ("exec = \"/x\"\nafter = [\"x\"]", "after"),
            (
                "exec = \"/x\"\nkill_mode = \"mixed\"",
                "field `kill_mode`: \"mixed\" is neither \"cgroup\" (the default) nor \"process\"",
            ),
            ("exec = \"/x\"\nkill_mode = 1", "kill_mode"),
            ("args = []", "exec"),
            ("exec = 3", "exec"),
        ];
        for (text, needle) in cases {
            let err = ServiceSpec::parse("x", text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} gave {err}");
        }
        assert!(ServiceSpec::parse("../x", "exec = \"/x\"").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("M"), None);
    }

    #[test]
    fn etc_replaces_image_files_and_broken_files_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("img");
        let etc = tmp.path().join("etc");
        std::fs::create_dir_all(&img).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(img.join("a.toml"), "exec = \"/img/a\"").unwrap();
        std::fs::write(etc.join("a.toml"), "exec = \"/etc/a\"").unwrap();
        std::fs::write(img.join("b.toml"), "exec = 1").unwrap();
        std::fs::write(img.join("README"), "not a service").unwrap();
        let l = load_dirs(&[&img, &etc, &tmp.path().join("missing")]);
        assert_eq!(l.specs.len(), 1);
        assert_eq!(l.specs[0].exec, PathBuf::from("/etc/a"));
        assert_eq!(l.broken.len(), 1);
        assert_eq!(l.broken[0].0, "b");
    }
}
