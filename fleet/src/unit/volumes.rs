//! A unit's storage: named volumes (a directory per unit and volume on the state partition,
//! kept until `caisson-fleet destroy --volumes`), read-only binds of provisioned files under
//! `/etc/caisson/`, and whether the volumes pin the unit to its machine.
//!
//! ```toml
//! volumes = [{ name = "pgdata", path = "/var/lib/postgresql/data" }]
//! binds = [{ source = "/etc/caisson/units/web/nginx.conf", path = "/etc/nginx/nginx.conf" }]
//! volumes_follow = "machine"        # default: the unit stays on the machine holding its data;
//!                                   # "none": it may move and starts empty elsewhere
//! ```
//!
//! No other host path can reach a container: a bind's source must be under `/etc/caisson/`
//! (after `.` and `//` are normalised; `..` is refused) and outside the machine's own
//! configuration and credentials ([`HOST_CONFIG`]).

use serde::{Deserialize, Serialize};

/// A named volume: `<volume_root>/<unit>/<name>` on the machine, at `path` in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub name: String,
    pub path: String,
}

/// A provisioned file or directory bound read-only into the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bind {
    /// On the machine, under [`BIND_ROOT`].
    pub source: String,
    /// In the container.
    pub path: String,
}

/// Where a unit with volumes may run once its data exists somewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumesFollow {
    /// Only on the machines that hold its volumes (as a Kubernetes local volume pins its pod).
    #[default]
    Machine,
    /// Anywhere: an instance placed on another machine starts with empty volumes.
    None,
}

impl VolumesFollow {
    pub fn is_default(&self) -> bool {
        *self == VolumesFollow::Machine
    }
}

/// Binds come from under this directory only.
pub const BIND_ROOT: &str = "/etc/caisson/";

/// The machine's own configuration and credentials under [`BIND_ROOT`] (first path
/// components): never bound into a container.
pub const HOST_CONFIG: [&str; 11] = [
    "fleet",
    "fleet.toml",
    "update.toml",
    "ssh",
    "services",
    "init.toml",
    "network.toml",
    "debug.toml",
    "sysctl.conf",
    "modules.conf",
    "initrd-modules",
];

/// Container paths the runtime mounts itself: nothing may be mounted on or under them.
const RESERVED: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];

/// A field's error: the field and why.
type FieldError = (String, String);

/// `path` without `.` components, repeated or trailing slashes; an error when it is not
/// absolute, has a `..` component or a NUL byte.
pub fn normalise(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} is not an absolute path"));
    }
    if path.contains('\0') {
        return Err(format!("{path:?} contains a NUL byte"));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("{path:?} has a `..` component")),
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// A container path a volume or bind may be mounted at (normalised).
fn container_path(path: &str) -> Result<String, String> {
    let p = normalise(path)?;
    if p == "/" {
        return Err("cannot mount over the container's root".into());
    }
    if let Some(r) = RESERVED
        .iter()
        .find(|r| p == **r || p.starts_with(&format!("{r}/")))
    {
        return Err(format!("{p} is under {r}, which the runtime mounts itself"));
    }
    Ok(p)
}

/// Whether `source` (normalised) may be bound into a container: under [`BIND_ROOT`], not the
/// machine's own configuration. Why not, when not.
pub fn check_bind_source(source: &str) -> Result<String, String> {
    let s = normalise(source)?;
    let Some(rest) = s.strip_prefix(BIND_ROOT).filter(|r| !r.is_empty()) else {
        return Err(format!(
            "{s} is not under {BIND_ROOT}: only provisioned files may be bound (use a volume for data)"
        ));
    };
    let first = rest.split('/').next().unwrap_or(rest);
    if HOST_CONFIG.contains(&first) {
        return Err(format!(
            "{s} is the machine's own configuration ({BIND_ROOT}{first}), never given to a container"
        ));
    }
    Ok(s)
}

/// Checks volumes and binds: valid names and paths, each name and container path once. Returns
/// them with their paths normalised.
pub fn check(volumes: &[Volume], binds: &[Bind]) -> Result<(Vec<Volume>, Vec<Bind>), FieldError> {
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut mount_at = |field: String, path: &str| -> Result<String, FieldError> {
        let p = container_path(path).map_err(|m| (field.clone(), m))?;
        if let Some((other, _)) = seen.iter().find(|(_, q)| *q == p) {
            return Err((field, format!("{p} is already mounted by {other}")));
        }
        seen.push((field, p.clone()));
        Ok(p)
    };
    let mut vs: Vec<Volume> = Vec::new();
    for (i, v) in volumes.iter().enumerate() {
        if !super::valid_name(&v.name) {
            return Err((
                format!("volumes[{i}].name"),
                format!(
                    "{:?} is not 1-63 characters of a-z, 0-9 and -, starting with a letter or digit",
                    v.name
                ),
            ));
        }
        if vs.iter().any(|o| o.name == v.name) {
            return Err((
                format!("volumes[{i}].name"),
                format!("{} is listed twice", v.name),
            ));
        }
        let path = mount_at(format!("volumes[{i}].path"), &v.path)?;
        vs.push(Volume {
            name: v.name.clone(),
            path,
        });
    }
    let mut bs = Vec::new();
    for (i, b) in binds.iter().enumerate() {
        let source = check_bind_source(&b.source).map_err(|m| (format!("binds[{i}].source"), m))?;
        let path = mount_at(format!("binds[{i}].path"), &b.path)?;
        bs.push(Bind { source, path });
    }
    Ok((vs, bs))
}

#[cfg(test)]
mod tests {
    use crate::unit::{UnitSpec, VolumesFollow};

    const IMG: &str = "[image]\npath = \"/a.tar\"\n";

    fn err(body: &str) -> String {
        UnitSpec::parse("db", &format!("{body}\n{IMG}"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn volumes_and_binds_parse_normalised() {
        let u = UnitSpec::parse(
            "db",
            &format!(
                "volumes = [{{ name = \"pgdata\", path = \"/var/lib/postgresql/data/\" }}]\n\
                 binds = [{{ source = \"/etc/caisson//units/./db/pg.conf\", path = \"/etc/pg.conf\" }}]\n\
                 volumes_follow = \"none\"\n{IMG}"
            ),
        )
        .unwrap();
        assert_eq!(u.volumes[0].name, "pgdata");
        assert_eq!(u.volumes[0].path, "/var/lib/postgresql/data");
        assert_eq!(u.binds[0].source, "/etc/caisson/units/db/pg.conf");
        assert_eq!(u.volumes_follow, VolumesFollow::None);
        let json = serde_json::to_string(&u).unwrap();
        assert_eq!(serde_json::from_str::<UnitSpec>(&json).unwrap(), u);
        assert_eq!(u.check(), Ok(()));
        // A unit without storage stores as before (its spec hash does not change).
        let plain = UnitSpec::parse("x", IMG).unwrap();
        assert_eq!(plain.volumes_follow, VolumesFollow::Machine);
        let json = serde_json::to_string(&plain).unwrap();
        assert!(
            !json.contains("volumes") && !json.contains("binds"),
            "{json}"
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        for (body, field) in [
            ("volumes = [{ name = \"PG\", path = \"/d\" }]", "`volumes[0].name`"),
            ("volumes = [{ name = \"\", path = \"/d\" }]", "`volumes[0].name`"),
            ("volumes = [{ name = \"a/b\", path = \"/d\" }]", "`volumes[0].name`"),
            ("volumes = [{ name = \"a\", path = \"d\" }]", "`volumes[0].path`"),
            ("volumes = [{ name = \"a\", path = \"/d/../etc\" }]", "`volumes[0].path`"),
            ("volumes = [{ name = \"a\", path = \"/\" }]", "`volumes[0].path`"),
            ("volumes = [{ name = \"a\", path = \"/proc/x\" }]", "`volumes[0].path`"),
            ("volumes = [{ name = \"a\", path = \"/dev\" }]", "`volumes[0].path`"),
            (
                "volumes = [{ name = \"a\", path = \"/d\" }, { name = \"a\", path = \"/e\" }]",
                "`volumes[1].name`",
            ),
            (
                "volumes = [{ name = \"a\", path = \"/d\" }, { name = \"b\", path = \"/d/\" }]",
                "`volumes[1].path`",
            ),
            ("volumes = [{ name = \"a\" }]", "path"),
            ("volumes = [{ name = \"a\", path = \"/d\", mode = \"rw\" }]", "mode"),
            ("binds = [{ source = \"/var/lib/x\", path = \"/x\" }]", "`binds[0].source`"),
            ("binds = [{ source = \"/etc/passwd\", path = \"/x\" }]", "`binds[0].source`"),
            ("binds = [{ source = \"/etc/caisson\", path = \"/x\" }]", "`binds[0].source`"),
            (
                "binds = [{ source = \"/etc/caisson/../shadow\", path = \"/x\" }]",
                "`binds[0].source`",
            ),
            ("binds = [{ source = \"etc/caisson/a\", path = \"/x\" }]", "`binds[0].source`"),
            (
                "binds = [{ source = \"/etc/caisson/fleet/client.key\", path = \"/x\" }]",
                "`binds[0].source`",
            ),
            (
                "binds = [{ source = \"/etc/caisson/fleet.toml\", path = \"/x\" }]",
                "`binds[0].source`",
            ),
            ("binds = [{ source = \"/etc/caisson/a\", path = \"/sys\" }]", "`binds[0].path`"),
            (
                "volumes = [{ name = \"a\", path = \"/x\" }]\nbinds = [{ source = \"/etc/caisson/a\", path = \"/x\" }]",
                "`binds[0].path`",
            ),
            ("volumes_follow = \"anywhere\"", "volumes_follow"),
        ] {
            let e = err(body);
            assert!(e.contains(field) && e.starts_with("unit db"), "{body}: {e}");
        }
        let e = err("binds = [{ source = \"/etc/caisson/fleet/password\", path = \"/x\" }]");
        assert!(e.contains("machine's own configuration"), "{e}");
        let e = err("volumes = [{ name = \"a\", path = \"/d\" }, { name = \"b\", path = \"/d\" }]");
        assert!(e.contains("already mounted by volumes[0].path"), "{e}");
    }

    #[test]
    fn a_stored_unit_with_a_host_path_is_refused() {
        let mut u = UnitSpec::parse(
            "db",
            &format!(
                "binds = [{{ source = \"/etc/caisson/units/db.conf\", path = \"/c\" }}]\n{IMG}"
            ),
        )
        .unwrap();
        u.binds[0].source = "/var/lib/caisson".into();
        let e = u.check().unwrap_err().to_string();
        assert!(e.contains("`binds[0].source`"), "{e}");
        // Not normalised (written by hand into etcd): refused too.
        u.binds[0].source = "/etc/caisson/units//db.conf".into();
        assert!(u.check().unwrap_err().to_string().contains("normalised"));
        u.binds.clear();
        u.volumes = vec![crate::unit::Volume {
            name: "../../x".into(),
            path: "/d".into(),
        }];
        let e = u.check().unwrap_err().to_string();
        assert!(e.contains("`volumes[0].name`"), "{e}");
    }
}
