//! The OCI runtime spec of a unit's container: the image's process (or the unit's command),
//! the unit's environment on top of the image's, the host's network, containerd's default
//! mounts, capabilities and masked paths.

use super::archive::RunConfig;
use crate::unit::UnitSpec;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Why a runtime spec cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Neither the unit nor the image says what to run.
    #[error(
        "unit {unit}: no command: the image has no Entrypoint or Cmd; set `command` in the unit"
    )]
    NoCommand { unit: String },
    /// The image runs as a user that is not numeric.
    #[error(
        "unit {unit}: the image's user {user:?} is not numeric (uid[:gid]); names are not resolved"
    )]
    User { unit: String, user: String },
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// containerd's default capability set (the same as Docker's).
const CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The process arguments: the unit's command, else the image's entrypoint + cmd.
pub fn args(spec: &UnitSpec, image: &RunConfig) -> Result<Vec<String>, SpecError> {
    let args = if spec.command.is_empty() {
        let mut a = image.entrypoint.clone().unwrap_or_default();
        a.extend(image.cmd.clone().unwrap_or_default());
        a
    } else {
        spec.command.clone()
    };
    if args.is_empty() {
        return Err(SpecError::NoCommand {
            unit: spec.name.clone(),
        });
    }
    Ok(args)
}

/// The environment: a default PATH, the image's, then the unit's (later wins).
pub fn env(spec: &UnitSpec, image: &RunConfig) -> Vec<String> {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |k: &str, v: &str| {
        if vars.insert(k.to_string(), v.to_string()).is_none() {
            order.push(k.to_string());
        }
    };
    let image_env = image.env.clone().unwrap_or_default();
    for kv in std::iter::once(DEFAULT_PATH).chain(image_env.iter().map(String::as_str)) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        set(k, v);
    }
    for (k, v) in &spec.env {
        set(k, v);
    }
    order
        .iter()
        .map(|k| format!("{k}={}", vars.get(k).map_or("", String::as_str)))
        .collect()
}

/// The image's user as uid and gid (root when unset).
pub fn user(spec: &UnitSpec, image: &RunConfig) -> Result<(u32, u32), SpecError> {
    let user = image.user.as_deref().unwrap_or("").trim();
    if user.is_empty() || user == "root" {
        return Ok((0, 0));
    }
    let bad = || SpecError::User {
        unit: spec.name.clone(),
        user: user.to_string(),
    };
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    let uid: u32 = u.parse().map_err(|_| bad())?;
    let gid: u32 = if g.is_empty() {
        uid
    } else {
        g.parse().map_err(|_| bad())?
    };
    Ok((uid, gid))
}

fn mount(dest: &str, kind: &str, source: &str, options: &[&str]) -> Value {
    json!({"destination": dest, "type": kind, "source": source, "options": options})
}

/// The runtime spec (config.json) for a unit's container in `namespace`.
/// `host_files` are host files bound read-only at the same path (resolv.conf, hosts).
pub fn runtime_spec(
    spec: &UnitSpec,
    image: &RunConfig,
    namespace: &str,
    host_files: &[&str],
) -> Result<Value, SpecError> {
    let (uid, gid) = user(spec, image)?;
    let cwd = image
        .working_dir
        .clone()
        .filter(|w| w.starts_with('/'))
        .unwrap_or_else(|| "/".into());
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
        mount(
            "/run",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
    ];
    for f in host_files {
        mounts.push(mount(f, "bind", f, &["rbind", "ro", "nosuid", "nodev"]));
    }
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": args(spec, image)?,
            "env": env(spec, image),
            "cwd": cwd,
            "capabilities": {
                "bounding": CAPABILITIES,
                "effective": CAPABILITIES,
                "permitted": CAPABILITIES,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "",
        "mounts": mounts,
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "cgroupsPath": format!("/{namespace}/{}", spec.name),
            // No network namespace: the host's network (units declare their host ports).
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(extra: &str) -> UnitSpec {
        UnitSpec::parse("web", &format!("{extra}\n[image]\npath = \"/i.tar\"")).unwrap()
    }

    fn image() -> RunConfig {
        RunConfig {
            user: Some("1000:50".into()),
            env: Some(vec!["PATH=/bin".into(), "MODE=dev".into(), "X".into()]),
            entrypoint: Some(vec!["/bin/httpd".into()]),
            cmd: Some(vec!["-f".into()]),
            working_dir: Some("/srv".into()),
        }
    }

    #[test]
    fn image_process_with_unit_overrides() {
        let s = runtime_spec(
            &unit("env = { MODE = \"prod\" }"),
            &image(),
            "caisson",
            &["/etc/hosts"],
        )
        .unwrap();
        let p = &s["process"];
        assert_eq!(p["args"], json!(["/bin/httpd", "-f"]));
        assert_eq!(p["env"], json!(["PATH=/bin", "MODE=prod", "X="]));
        assert_eq!(p["cwd"], "/srv");
        assert_eq!(p["user"], json!({"uid": 1000, "gid": 50}));
        assert_eq!(s["linux"]["cgroupsPath"], "/caisson/web");
        let ns = s["linux"]["namespaces"].as_array().unwrap();
        assert!(!ns.iter().any(|n| n["type"] == "network"), "host network");
        assert!(s["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["destination"] == "/etc/hosts"));
        let s = runtime_spec(
            &unit("command = [\"/bin/sh\", \"-c\", \"true\"]"),
            &RunConfig::default(),
            "n",
            &[],
        )
        .unwrap();
        assert_eq!(s["process"]["args"], json!(["/bin/sh", "-c", "true"]));
        assert_eq!(s["process"]["env"][0], DEFAULT_PATH);
        assert_eq!(s["process"]["cwd"], "/");
    }

    #[test]
    fn clear_errors() {
        let e = runtime_spec(&unit(""), &RunConfig::default(), "n", &[]).unwrap_err();
        assert_eq!(e, SpecError::NoCommand { unit: "web".into() });
        let named = RunConfig {
            user: Some("www-data".into()),
            ..image()
        };
        assert!(runtime_spec(&unit(""), &named, "n", &[])
            .unwrap_err()
            .to_string()
            .contains("www-data"));
    }
}
