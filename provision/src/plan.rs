//! A validated config turned into what it writes: directories and files with their modes and
//! owners, resolved against the root it is applied to. Nothing is written here.

mod fleet;

pub use fleet::registry_file;

use crate::config::{parse_mode, sysctl_value, Config, ConfigError, Id, NetMode};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// The init's network settings.
pub const NETWORK_PATH: &str = "/etc/caisson/network.toml";
/// The fleet agent's settings.
pub const FLEET_PATH: &str = "/etc/caisson/fleet.toml";
/// The fleet agent's TLS and etcd credentials (`[fleet.tls]`, `[fleet.auth]`): a directory
/// only root can enter, the CA and client certificates 0644, the key and password 0600.
pub const FLEET_DIR: &str = "/etc/caisson/fleet";
pub const FLEET_CA: &str = "/etc/caisson/fleet/ca.crt";
pub const FLEET_CERT: &str = "/etc/caisson/fleet/client.crt";
pub const FLEET_KEY: &str = "/etc/caisson/fleet/client.key";
pub const FLEET_PASSWORD: &str = "/etc/caisson/fleet/password";
/// The CA and password of each of `[fleet.registries]`, named by its host with `:` made `_`
/// ([`registry_file`]): a directory only root can enter, the CA 0644, the password 0600.
pub const FLEET_REGISTRIES_DIR: &str = "/etc/caisson/fleet/registries";
/// The update agent's settings.
pub const UPDATE_PATH: &str = "/etc/caisson/update.toml";
/// Kernel modules the init loads on every boot, one name a line.
pub const MODULES_PATH: &str = "/etc/caisson/modules.conf";
/// Sysctls the init sets on every boot, `key = value` lines.
pub const SYSCTL_PATH: &str = "/etc/caisson/sysctl.conf";
/// Provisioned service files.
pub const SERVICES_DIR: &str = "/etc/caisson/services";
/// The SSH server's configuration and the admin's keys.
pub const SSHD_CONFIG: &str = "/etc/caisson/ssh/sshd_config";
pub const AUTHORIZED_KEYS: &str = "/etc/caisson/ssh/authorized_keys";
/// The SSH server the `[ssh]` section needs in the image (Debian's openssh-server).
pub const SSHD: &str = "/usr/sbin/sshd";
/// What makes sshd's privilege-separation directory (`/run/sshd`, on tmpfs) on every boot:
/// the init's service format has no runtime directories, and sshd does not start without it.
pub const BUSYBOX: &str = "/usr/bin/busybox";

/// Checks that belong to other crates (the init's parsers), given by the caller.
pub trait Checks {
    /// A service file, as `caisson_init::service::ServiceSpec::parse` would take it.
    fn service(&self, _name: &str, _text: &str) -> Result<(), String> {
        Ok(())
    }
    /// The rendered `/etc/caisson/network.toml`.
    fn network(&self, _text: &str) -> Result<(), String> {
        Ok(())
    }
}

/// No checks beyond the schema's.
pub struct NoChecks;
impl Checks for NoChecks {}

/// What an entry is.
#[derive(Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(Vec<u8>),
}

/// One path to write.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// Absolute, as on the machine.
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Contents never logged; written 0600 or 0400.
    pub secret: bool,
    /// The config field it comes from, for messages.
    pub origin: String,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.kind {
            Kind::Dir => "dir".to_string(),
            Kind::File(b) if self.secret => format!("secret file, {} bytes", b.len()),
            Kind::File(b) => format!("file, {} bytes", b.len()),
        };
        write!(
            f,
            "{} ({what}, {:04o}, {}:{}, from {})",
            self.path, self.mode, self.uid, self.gid, self.origin
        )
    }
}

/// Everything a config writes, directories first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub entries: Vec<Entry>,
}

/// The most of `/etc/passwd` or `/etc/group` read to resolve a name.
pub const ID_FILE_LIMIT: u64 = 4 << 20;

/// The ids of `name` in the root's `file` (`/etc/passwd`: uid and primary gid; `/etc/group`:
/// gid twice). The file is read beneath the root as provisioned files are written: a symbolic
/// link on the way, or in its place, is refused with its name, never followed.
fn lookup(root: &Path, file: &str, name: &str) -> Result<Option<(u32, u32)>, String> {
    let bytes = crate::apply::read_file_beneath(root, file, ID_FILE_LIMIT)
        .map_err(|e| format!("cannot look up {name:?} in {file}: {e}"))?;
    let text = String::from_utf8_lossy(bytes.as_deref().unwrap_or_default());
    Ok(text.lines().find_map(|l| id_line(l, name)))
}

/// The ids on a `name:x:id:gid:...` line for `name`.
fn id_line(line: &str, name: &str) -> Option<(u32, u32)> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 3 || f[0] != name {
        return None;
    }
    let id = f[2].parse().ok()?;
    Some((id, f.get(3).and_then(|g| g.parse().ok()).unwrap_or(id)))
}

/// The ids of a name, or why not: `what` is `user` or `group`.
fn resolve(
    root: &Path,
    field: String,
    what: &str,
    file: &str,
    name: &str,
) -> Result<(u32, u32), ConfigError> {
    match lookup(root, file, name) {
        Ok(Some(ids)) => Ok(ids),
        Ok(None) => Err(ConfigError::new(
            field,
            format!("no {what} {name:?} in {file}"),
        )),
        Err(why) => Err(ConfigError::new(field, why)),
    }
}

/// Owner and group of an entry: names from the root's /etc/passwd and /etc/group.
fn owners(
    root: Option<&Path>,
    field: &str,
    owner: Option<&Id>,
    group: Option<&Id>,
) -> Result<(u32, u32), ConfigError> {
    let (uid, primary) = match (owner, root) {
        (None, _) => (0, 0),
        (Some(Id::Number(n)), _) => (*n, *n),
        (Some(Id::Name(_)), None) => (0, 0),
        (Some(Id::Name(n)), Some(r)) => {
            resolve(r, format!("{field}.owner"), "user", "/etc/passwd", n)?
        }
    };
    let gid = match (group, root) {
        (None, _) => primary,
        (Some(Id::Number(n)), _) => *n,
        (Some(Id::Name(_)), None) => 0,
        (Some(Id::Name(n)), Some(r)) => {
            resolve(r, format!("{field}.group"), "group", "/etc/group", n)?.0
        }
    };
    Ok((uid, gid))
}

fn generated(path: &str, origin: &str, text: String, mode: u32) -> Entry {
    Entry {
        path: path.to_string(),
        kind: Kind::File(text.into_bytes()),
        mode,
        uid: 0,
        gid: 0,
        secret: false,
        origin: origin.to_string(),
    }
}

fn toml_text<T: serde::Serialize>(field: &str, v: &T) -> Result<String, ConfigError> {
    toml::to_string(v)
        .map_err(|e| ConfigError::new(field, format!("cannot be written as TOML: {e}")))
}

fn network_text(n: &crate::config::Network) -> Result<String, ConfigError> {
    let mut t = String::from("# written by caisson provisioning\n");
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let list = |v: &[String]| {
        format!(
            "[{}]",
            v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
        )
    };
    if let Some(i) = &n.interface {
        let _ = writeln!(t, "interface = {}", q(i));
    }
    if let Some(m) = &n.mac {
        let _ = writeln!(t, "mac = {}", q(m));
    }
    let mode = match n.mode {
        NetMode::Dhcp => "dhcp",
        NetMode::Static => "static",
        NetMode::Off => "off",
    };
    let _ = writeln!(t, "mode = {}", q(mode));
    if let Some(a) = &n.address {
        let _ = writeln!(t, "address = {}", q(a));
    }
    if let Some(g) = n.default_gateway()? {
        let _ = writeln!(t, "gateway = {}", q(&g.to_string()));
    }
    if !n.dns.is_empty() {
        let _ = writeln!(t, "dns = {}", list(&n.dns));
    }
    if !n.search.is_empty() {
        let _ = writeln!(t, "search = {}", list(&n.search));
    }
    if let Some(s) = n.timeout_s {
        let _ = writeln!(t, "timeout_s = {s}");
    }
    for l in &n.links {
        let _ = writeln!(t, "\n[[links]]");
        if let Some(i) = &l.interface {
            let _ = writeln!(t, "interface = {}", q(i));
        }
        if let Some(m) = &l.mac {
            let _ = writeln!(t, "mac = {}", q(m));
        }
        let _ = writeln!(t, "address = {}", q(&l.address));
    }
    Ok(t)
}

fn ssh_entries(root: Option<&Path>, keys: &[String]) -> Result<Vec<Entry>, ConfigError> {
    let missing = |p: &str| root.is_some_and(|r| !r.join(p.trim_start_matches('/')).exists());
    if missing(SSHD) {
        return Err(ConfigError::new(
            "ssh",
            format!("this image has no SSH server ({SSHD}, Debian's openssh-server): build one with it to use [ssh]"),
        ));
    }
    if missing(BUSYBOX) {
        return Err(ConfigError::new(
            "ssh",
            format!("this image has no {BUSYBOX} (Debian's busybox-static) to make sshd's /run/sshd: build one with it to use [ssh]"),
        ));
    }
    let config = format!(
        "# written by caisson provisioning: keys only, never passwords\n\
         PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
         AuthorizedKeysFile {AUTHORIZED_KEYS}\nUsePAM no\nPidFile none\n\
         Subsystem sftp internal-sftp\n"
    );
    let keygen = "description = \"SSH host keys (made once, kept in the /etc overlay)\"\n\
                  kind = \"oneshot\"\nexec = \"/usr/bin/ssh-keygen\"\nargs = [\"-A\"]\nrequired = false\n";
    let rundir = format!(
        "description = \"sshd's privilege-separation directory\"\n\
         kind = \"oneshot\"\nexec = \"{BUSYBOX}\"\nargs = [\"mkdir\", \"-p\", \"-m\", \"0755\", \"/run/sshd\"]\n\
         required = false\n"
    );
    let sshd = format!(
        "description = \"OpenSSH server (keys from provisioning)\"\nexec = \"{SSHD}\"\n\
         args = [\"-D\", \"-e\", \"-f\", \"{SSHD_CONFIG}\"]\n\
         requires = [\"ssh-keygen\", \"sshd-rundir\"]\n\
         after = [\"network\"]\nrequired = false\nrestart = \"always\"\n"
    );
    let mut authorized = keys.join("\n");
    authorized.push('\n');
    Ok(vec![
        generated(SSHD_CONFIG, "ssh", config, 0o644),
        generated(AUTHORIZED_KEYS, "ssh.authorized_keys", authorized, 0o600),
        generated(
            &format!("{SERVICES_DIR}/ssh-keygen.toml"),
            "ssh",
            keygen.into(),
            0o644,
        ),
        generated(
            &format!("{SERVICES_DIR}/sshd-rundir.toml"),
            "ssh",
            rundir,
            0o644,
        ),
        generated(&format!("{SERVICES_DIR}/sshd.toml"), "ssh", sshd, 0o644),
    ])
}

fn kernel_entries(k: &crate::config::Kernel) -> Result<Vec<Entry>, ConfigError> {
    let mut out = Vec::new();
    if !k.modules.is_empty() {
        let mut t = k.modules.join("\n");
        t.push('\n');
        out.push(generated(MODULES_PATH, "kernel.modules", t, 0o644));
    }
    if !k.sysctls.is_empty() {
        let mut t = String::new();
        for (key, v) in &k.sysctls {
            let v = sysctl_value(v).map_err(|why| ConfigError::new("kernel.sysctls", why))?;
            let _ = writeln!(t, "{key} = {v}");
        }
        out.push(generated(SYSCTL_PATH, "kernel.sysctls", t, 0o644));
    }
    Ok(out)
}

/// Everything `config` writes under `root`. Without a root (checking a config away from the
/// machine) user and group names and the SSH server in the image are not checked.
pub fn plan(
    config: &Config,
    root: Option<&Path>,
    checks: &dyn Checks,
) -> Result<Plan, ConfigError> {
    config.validate()?;
    let mut files: Vec<Entry> = Vec::new();
    if let Some(h) = &config.hostname {
        files.push(generated(
            "/etc/hostname",
            "hostname",
            format!("{h}\n"),
            0o644,
        ));
    }
    if let Some(n) = &config.network {
        let text = network_text(n)?;
        checks
            .network(&text)
            .map_err(|why| ConfigError::new("network", why))?;
        files.push(generated(NETWORK_PATH, "network", text, 0o644));
    }
    if let Some(s) = config
        .ssh
        .as_ref()
        .filter(|s| !s.authorized_keys.is_empty())
    {
        files.extend(ssh_entries(root, &s.authorized_keys)?);
    }
    for (name, table) in &config.services {
        let field = format!("services.{name}");
        let text = toml_text(&field, table)?;
        checks
            .service(name, &text)
            .map_err(|why| ConfigError::new(&field, why))?;
        // An environment may hold secrets (tokens, passwords): such a file is not for others.
        let has_env = table.contains_key("env");
        let mut entry = generated(
            &format!("{SERVICES_DIR}/{name}.toml"),
            &field,
            text,
            if has_env { 0o600 } else { 0o644 },
        );
        entry.secret = has_env;
        files.push(entry);
    }
    if let Some(k) = &config.kernel {
        files.extend(kernel_entries(k)?);
    }
    let mut entries = Vec::new();
    if let Some(f) = &config.fleet {
        let (dirs, written) = fleet::fleet_entries(f)?;
        entries.extend(dirs);
        files.extend(written);
    }
    if let Some(u) = &config.update {
        let text = format!(
            "# written by caisson provisioning\n{}",
            toml_text("update", u)?
        );
        files.push(generated(UPDATE_PATH, "update", text, 0o644));
    }
    let mut seen: BTreeMap<String, String> = files
        .iter()
        .map(|e| (e.path.clone(), e.origin.clone()))
        .collect();
    for (i, f) in config.files.iter().enumerate() {
        let field = format!("files[{i}]");
        if let Some(other) = seen.insert(f.path.clone(), field.clone()) {
            return Err(ConfigError::new(
                format!("{field}.path"),
                format!("{} is already written by {other}", f.path),
            ));
        }
        let (uid, gid) = owners(root, &field, f.owner.as_ref(), f.group.as_ref())?;
        let mode = f
            .mode_bits()
            .map_err(|why| ConfigError::new(format!("{field}.mode"), why))?;
        let bytes = f
            .bytes()
            .map_err(|(sub, why)| ConfigError::new(format!("{field}.{sub}"), why))?;
        files.push(Entry {
            path: f.path.clone(),
            kind: Kind::File(bytes),
            mode,
            uid,
            gid,
            secret: f.secret,
            origin: field,
        });
    }
    for (i, d) in config.directories.iter().enumerate() {
        let field = format!("directories[{i}]");
        if let Some(other) = seen.get(&d.path) {
            return Err(ConfigError::new(
                format!("{field}.path"),
                format!("{} is a file written by {other}", d.path),
            ));
        }
        let (uid, gid) = owners(root, &field, d.owner.as_ref(), d.group.as_ref())?;
        let mode = parse_mode(d.mode.as_ref(), 0o755)
            .map_err(|why| ConfigError::new(format!("{field}.mode"), why))?;
        entries.push(Entry {
            path: d.path.clone(),
            kind: Kind::Dir,
            mode,
            uid,
            gid,
            secret: false,
            origin: field,
        });
    }
    for f in &files {
        if let Some(d) = entries
            .iter()
            .find(|d| Path::new(&d.path).starts_with(&f.path))
        {
            return Err(ConfigError::new(
                format!("{}.path", d.origin),
                format!("{} is below the file {} ({})", d.path, f.path, f.origin),
            ));
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    entries.extend(files);
    Ok(Plan { entries })
}
