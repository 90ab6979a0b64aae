//! The image spec: one TOML file (`images/<name>.toml`) that describes an image.
//! Documented in `images/README.md`; every field is checked, and errors name the file, line and field.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A bad or unreadable spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read spec {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: field {field}: {why}")]
    Invalid {
        path: PathBuf,
        field: String,
        why: String,
    },
}

/// The whole spec.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub image: ImageSection,
    pub kernel: KernelSection,
    #[serde(default)]
    pub packages: PackagesSection,
    /// Files copied from `images/<name>/files/` into the root.
    #[serde(default)]
    pub files: Vec<FileEntry>,
    /// Extra (empty) directories in the root.
    #[serde(default)]
    pub directories: Vec<DirEntry>,
    /// Services handed to the init, by name (`/usr/lib/caisson/services/<name>.toml`).
    #[serde(default)]
    pub services: BTreeMap<String, toml::Table>,
    #[serde(default)]
    pub partitions: PartitionsSection,
    #[serde(default)]
    pub output: OutputSection,
    /// Over-the-air updates: trusted keys and the agent's configuration.
    #[serde(default)]
    pub update: UpdateSection,
}

/// `[update]`: what the image trusts and where its updates come from.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpdateSection {
    /// minisign public keys (`caisson keygen`), relative to the spec's directory; installed in
    /// `/usr/lib/caisson/update-keys/`.
    #[serde(default)]
    pub public_keys: Vec<String>,
    /// The channel URL written to `/etc/caisson/update.toml`.
    #[serde(default)]
    pub channel_url: Option<String>,
    /// `immediate`, `fleet-lock`, `etcd-lock` or `off`.
    #[serde(default)]
    pub strategy: Option<String>,
    /// How often the agent checks, in seconds.
    #[serde(default)]
    pub interval_s: Option<u64>,
}

/// Reboot strategies `[update] strategy` accepts.
pub const UPDATE_STRATEGIES: [&str; 4] = ["immediate", "fleet-lock", "etcd-lock", "off"];

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    /// Image name: lower-case letters, digits and `-`.
    pub name: String,
    /// Image version, e.g. `1.0.0`.
    pub version: String,
    /// Workspace binaries installed in `/usr/bin` (caisson-init and caisson-ctl always are).
    #[serde(default)]
    pub binaries: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KernelSection {
    /// The Debian kernel package (metapackages such as `linux-image-amd64` are followed).
    #[serde(default = "default_kernel")]
    pub package: String,
    /// Modules loaded by stage 2 (their dependencies are added).
    #[serde(default)]
    pub modules: Vec<String>,
    /// Extra kernel command line words.
    #[serde(default)]
    pub cmdline: Vec<String>,
}

fn default_kernel() -> String {
    "linux-image-amd64".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PackagesSection {
    /// Debian packages installed in the root, with their dependencies.
    #[serde(default)]
    pub include: Vec<String>,
    /// Mirror base URL; by default the one the build host's apt sources use.
    pub mirror: Option<String>,
    #[serde(default = "default_suite")]
    pub suite: String,
    /// Absolute paths (files or directories) left out of the root after extraction.
    #[serde(default)]
    pub exclude: Vec<String>,
}

impl Default for PackagesSection {
    fn default() -> Self {
        PackagesSection {
            include: Vec::new(),
            mirror: None,
            suite: default_suite(),
            exclude: Vec::new(),
        }
    }
}

fn default_suite() -> String {
    "bookworm".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path under `images/<name>/files/`.
    pub src: String,
    /// Absolute path in the root.
    pub dst: String,
    /// Octal mode, e.g. "0644".
    #[serde(default = "default_file_mode")]
    pub mode: String,
}

fn default_file_mode() -> String {
    "0644".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirEntry {
    pub path: String,
    #[serde(default = "default_dir_mode")]
    pub mode: String,
}

fn default_dir_mode() -> String {
    "0755".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartitionsSection {
    #[serde(default = "default_esp")]
    pub esp: String,
    #[serde(default = "default_slot")]
    pub slot: String,
    #[serde(default = "default_state")]
    pub state: String,
}

fn default_esp() -> String {
    "128M".into()
}
fn default_slot() -> String {
    "512M".into()
}
fn default_state() -> String {
    "64M".into()
}

impl Default for PartitionsSection {
    fn default() -> Self {
        PartitionsSection {
            esp: default_esp(),
            slot: default_slot(),
            state: default_state(),
        }
    }
}

/// Output formats.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
    Bundle,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    #[serde(default = "default_formats")]
    pub formats: Vec<Format>,
}

fn default_formats() -> Vec<Format> {
    vec![Format::Raw, Format::Qcow2, Format::Bundle]
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            formats: default_formats(),
        }
    }
}

/// Partition sizes in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub esp: u64,
    pub slot: u64,
    pub state: u64,
}

/// A spec with the place it came from.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    pub spec: Spec,
    pub path: PathBuf,
    pub sizes: Sizes,
}

impl LoadedSpec {
    /// `images/<name>/files/`.
    pub fn files_dir(&self) -> PathBuf {
        self.dir().join(&self.spec.image.name).join("files")
    }

    /// `images/<name>.lock`.
    pub fn lock_path(&self) -> PathBuf {
        self.dir().join(format!("{}.lock", self.spec.image.name))
    }

    /// The directory of the spec file: `[update] public_keys` are relative to it.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

/// Reads and checks a spec file.
pub fn load(path: &Path) -> Result<LoadedSpec, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and checks spec text; `path` is used in messages.
pub fn parse(text: &str, path: &Path) -> Result<LoadedSpec, SpecError> {
    let spec: Spec = toml::from_str(text).map_err(|e| SpecError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let invalid = |field: &str, why: String| SpecError::Invalid {
        path: path.to_path_buf(),
        field: field.to_string(),
        why,
    };
    check_name(&spec.image.name).map_err(|why| invalid("image.name", why))?;
    check_version(&spec.image.version).map_err(|why| invalid("image.version", why))?;
    for (i, f) in spec.files.iter().enumerate() {
        check_abs(&f.dst).map_err(|why| invalid(&format!("files[{i}].dst"), why))?;
        if f.src.starts_with('/') || f.src.split('/').any(|c| c == "..") {
            return Err(invalid(
                &format!("files[{i}].src"),
                format!(
                    "{:?} must be relative to the image's files/ directory",
                    f.src
                ),
            ));
        }
        parse_mode(&f.mode).map_err(|why| invalid(&format!("files[{i}].mode"), why))?;
    }
    for (i, p) in spec.packages.exclude.iter().enumerate() {
        check_abs(p).map_err(|why| invalid(&format!("packages.exclude[{i}]"), why))?;
    }
    for (i, d) in spec.directories.iter().enumerate() {
        check_abs(&d.path).map_err(|why| invalid(&format!("directories[{i}].path"), why))?;
        parse_mode(&d.mode).map_err(|why| invalid(&format!("directories[{i}].mode"), why))?;
    }
    for (i, word) in spec.kernel.cmdline.iter().enumerate() {
        caisson_layout::cmdline::check_extra(word)
            .map_err(|e| invalid(&format!("kernel.cmdline[{i}]"), e.to_string()))?;
    }
    for name in spec.services.keys() {
        check_name(name).map_err(|why| invalid(&format!("services.{name}"), why))?;
    }
    for (i, k) in spec.update.public_keys.iter().enumerate() {
        if k.is_empty() || k.split('/').any(|c| c == "..") || !k.ends_with(".pub") {
            return Err(invalid(
                &format!("update.public_keys[{i}]"),
                format!("{k:?} must be a .pub file relative to the spec's directory, without '..'"),
            ));
        }
    }
    if let Some(s) = &spec.update.strategy {
        if !UPDATE_STRATEGIES.contains(&s.as_str()) {
            return Err(invalid(
                "update.strategy",
                format!("{s:?} is not one of {}", UPDATE_STRATEGIES.join(", ")),
            ));
        }
    }
    if let Some(u) = &spec.update.channel_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            return Err(invalid(
                "update.channel_url",
                format!("{u:?} must be an http:// or https:// URL"),
            ));
        }
    }
    let size = |field: &str, v: &str| parse_size(v).map_err(|why| invalid(field, why));
    let sizes = Sizes {
        esp: size("partitions.esp", &spec.partitions.esp)?,
        slot: size("partitions.slot", &spec.partitions.slot)?,
        state: size("partitions.state", &spec.partitions.state)?,
    };
    if sizes.esp < 40 * MIB {
        return Err(invalid(
            "partitions.esp",
            "a FAT32 ESP needs at least 40M".into(),
        ));
    }
    if sizes.state < 16 * MIB {
        return Err(invalid(
            "partitions.state",
            "state needs at least 16M".into(),
        ));
    }
    if spec.output.formats.is_empty() {
        return Err(invalid("output.formats", "name at least one format".into()));
    }
    Ok(LoadedSpec {
        spec,
        path: path.to_path_buf(),
        sizes,
    })
}

const MIB: u64 = 1024 * 1024;

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be 1 to 64 lower-case letters, digits or '-', not starting with '-'"
        ))
    }
}

/// Checks a version (the rule is the on-disk contract's: `caisson_layout::version`).
pub fn check_version(v: &str) -> Result<(), String> {
    caisson_layout::version::check(v).map_err(|e| e.to_string())
}

fn check_abs(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.split('/').any(|c| c == "..") || p == "/" {
        return Err(format!(
            "{p:?} must be an absolute path below / without '..'"
        ));
    }
    Ok(())
}

/// Parses an octal mode such as "0644" or "755".
pub fn parse_mode(m: &str) -> Result<u32, String> {
    u32::from_str_radix(m, 8)
        .ok()
        .filter(|v| *v <= 0o7777)
        .ok_or_else(|| format!("{m:?} is not an octal mode such as \"0644\""))
}

/// Parses a size: bytes, or a number with K, M, G (powers of 1024), must be a multiple of 1 MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1024),
        Some((i, 'M' | 'm')) => (&t[..i], MIB),
        Some((i, 'G' | 'g')) => (&t[..i], 1024 * MIB),
        _ => (t, 1),
    };
    let bytes = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size such as \"512M\" or \"2G\""))?;
    if bytes == 0 || bytes % MIB != 0 {
        return Err(format!("{s:?} must be a whole number of MiB"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[image]
name = "mini"
version = "1.0.0"

[kernel]
modules = ["overlay"]
cmdline = ["console=ttyS0"]

[packages]
include = ["busybox-static"]

[[files]]
src = "etc/motd"
dst = "/etc/motd"

[services.hello]
exec = "/usr/bin/busybox"
args = ["sleep", "1000"]

[partitions]
slot = "256M"
"#;

    fn p(text: &str) -> Result<LoadedSpec, SpecError> {
        parse(text, Path::new("images/mini.toml"))
    }

    #[test]
    fn parses_a_good_spec_with_defaults() {
        let s = p(GOOD).unwrap();
        assert_eq!(s.spec.image.name, "mini");
        assert_eq!(s.spec.kernel.package, "linux-image-amd64");
        assert_eq!(s.sizes.slot, 256 * MIB);
        assert_eq!(s.sizes.esp, 128 * MIB);
        assert_eq!(s.spec.files[0].mode, "0644");
        assert!(s.spec.services.contains_key("hello"));
        assert_eq!(s.lock_path(), Path::new("images/mini.lock"));
        assert_eq!(s.files_dir(), Path::new("images/mini/files"));
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let text = GOOD.replace("[partitions]", "[partitions]\nslots = \"1G\"");
        let err = p(&text).unwrap_err().to_string();
        assert!(err.starts_with("images/mini.toml:"), "{err}");
        assert!(err.contains("line 22"), "{err}");
        assert!(err.contains("slots"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let text = GOOD.replace("version = \"1.0.0\"", "version = 1");
        let err = p(&text).unwrap_err().to_string();
        assert!(err.contains("version"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        for (from, to, field) in [
            ("name = \"mini\"", "name = \"Mini\"", "image.name"),
            ("version = \"1.0.0\"", "version = \"v1\"", "image.version"),
            ("dst = \"/etc/motd\"", "dst = \"etc/motd\"", "files[0].dst"),
            ("src = \"etc/motd\"", "src = \"../x\"", "files[0].src"),
            ("slot = \"256M\"", "slot = \"256X\"", "partitions.slot"),
            ("slot = \"256M\"", "slot = \"1000K\"", "partitions.slot"),
            (
                "cmdline = [\"console=ttyS0\"]",
                "cmdline = [\"console=ttyS0\", \"caisson.slot=a\"]",
                "kernel.cmdline[1]",
            ),
            (
                "cmdline = [\"console=ttyS0\"]",
                "cmdline = [\"quiet\\ninitrd /x\"]",
                "kernel.cmdline[0]",
            ),
        ] {
            let err = p(&GOOD.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(field), "{to}: {err}");
        }
    }

    #[test]
    fn update_section() {
        let text = format!(
            "{GOOD}\n[update]\npublic_keys = [\"keys/caisson.pub\"]\nchannel_url = \"http://10.0.2.2:8080/stable\"\nstrategy = \"fleet-lock\"\n"
        );
        let s = p(&text).unwrap();
        assert_eq!(s.spec.update.public_keys, ["keys/caisson.pub"]);
        assert_eq!(s.spec.update.strategy.as_deref(), Some("fleet-lock"));
        assert_eq!(p(GOOD).unwrap().spec.update, UpdateSection::default());
        for (from, field) in [
            ("keys/caisson.pub", "update.public_keys[0]"),
            ("fleet-lock", "update.strategy"),
            ("http://10.0.2.2:8080/stable", "update.channel_url"),
        ] {
            let bad = text.replace(from, "../x");
            let err = p(&bad).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn sizes_and_modes() {
        assert_eq!(parse_size("1G"), Ok(1024 * MIB));
        assert_eq!(parse_size("2048K"), Ok(2 * MIB));
        assert!(parse_size("0M").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_mode("4755"), Ok(0o4755));
        assert!(parse_mode("0988").is_err());
    }
}
