//! The OCI runtime spec of a unit's container: the image's process (or the unit's command),
//! the unit's environment on top of the image's, the host's network, containerd's default
//! mounts and masked paths, and confinement by default: Docker's capability set minus
//! `CAP_NET_RAW` (plus what the unit adds), `no_new_privs`, our [`seccomp`] profile, no device
//! but the standard few, and the unit's cgroup limits (`memory.max`, `cpu.max`, `pids.max`).
//! A privileged unit gets what Docker's `--privileged` gives: every capability and device, no
//! seccomp filter, no masked or read-only paths.
//!
//! A unit's volumes are bind mounts of `<volume_root>/<unit>/<name>` (`rbind`, `rw`, `nosuid`,
//! `nodev`; made by `containerd::volumes` before the container is created), its binds are
//! read-only bind mounts of provisioned files; both after the runtime's own mounts, parents
//! before what is mounted inside them.

pub mod seccomp;

use super::archive::RunConfig;
use crate::capability;
use crate::unit::{Resources, UnitSpec};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

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

/// The CFS period of `cpu.max`, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// The device nodes a container may use (`type`, major, minor; `None`: any minor), as
/// containerd allows: null, zero, full, random, urandom, tty, console, ptmx, and its own ptys.
const DEVICES: [(&str, i64, Option<i64>); 9] = [
    ("c", 1, Some(3)),
    ("c", 1, Some(5)),
    ("c", 1, Some(7)),
    ("c", 1, Some(8)),
    ("c", 1, Some(9)),
    ("c", 5, Some(0)),
    ("c", 5, Some(1)),
    ("c", 5, Some(2)),
    ("c", 136, None),
];

/// The capabilities of the unit's container, kernel names: a privileged one gets every one
/// the agent holds.
pub fn capabilities(spec: &UnitSpec) -> Vec<&'static str> {
    if spec.privileged {
        capability::held()
    } else {
        capability::with(&spec.capabilities)
    }
}

/// `linux.resources`: the device cgroup and the unit's limits.
fn resources(r: &Resources, privileged: bool) -> Value {
    let devices: Vec<Value> = if privileged {
        vec![json!({"allow": true, "access": "rwm"})]
    } else {
        std::iter::once(json!({"allow": false, "access": "rwm"}))
            .chain(DEVICES.iter().map(|(kind, major, minor)| {
                let mut d = json!({"allow": true, "type": kind, "major": major, "access": "rwm"});
                if let Some(minor) = minor {
                    d["minor"] = json!(minor);
                }
                d
            }))
            .collect()
    };
    let mut v = json!({"devices": devices, "pids": {"limit": r.pids}});
    if let Some(bytes) = r.memory {
        v["memory"] = json!({"limit": bytes});
    }
    if let Some(m) = r.millicpus {
        // millicpus / 1000 of each period.
        let quota = u64::from(m) * CPU_PERIOD_US / 1000;
        v["cpu"] = json!({"quota": quota, "period": CPU_PERIOD_US});
    }
    v
}

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

/// Paths under /proc and /sys a container sees empty (containerd's list).
const MASKED: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

/// Paths under /proc a container may read and not write (containerd's list).
const READONLY: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn mount(dest: &str, kind: &str, source: &str, options: &[&str]) -> Value {
    json!({"destination": dest, "type": kind, "source": source, "options": options})
}

/// The host directory of a unit's volume: `<volume_root>/<unit>/<name>`.
pub fn volume_dir(volume_root: &Path, unit: &str, volume: &str) -> std::path::PathBuf {
    volume_root.join(unit).join(volume)
}

/// The mounts of the unit's volumes (read-write) and binds (read-only), parents first.
pub fn storage_mounts(spec: &UnitSpec, volume_root: &Path) -> Vec<Value> {
    let volumes = spec.volumes.iter().map(|v| {
        let dir = volume_dir(volume_root, &spec.name, &v.name);
        (
            v.path.as_str(),
            mount(
                &v.path,
                "bind",
                &dir.display().to_string(),
                &["rbind", "rw", "nosuid", "nodev"],
            ),
        )
    });
    let binds = spec.binds.iter().map(|b| {
        (
            b.path.as_str(),
            mount(
                &b.path,
                "bind",
                &b.source,
                &["rbind", "ro", "nosuid", "nodev"],
            ),
        )
    });
    let mut all: Vec<(&str, Value)> = volumes.chain(binds).collect();
    // Stable: equal depths keep the unit's order.
    all.sort_by_key(|(path, _)| path.matches('/').count());
    all.into_iter().map(|(_, m)| m).collect()
}

/// Puts a bridge unit's container into its own network namespace: the one bound at `netns`
/// (made and wired by the host's network, `crate::hostnet`), or with no path a new one that
/// runc makes with loopback only (a runtime without a host network, as in tests); and, with
/// `resolv_conf`, that file as its /etc/resolv.conf instead of the host's.
pub fn join_network(spec: &mut Value, netns: Option<&Path>, resolv_conf: Option<&Path>) {
    let mut ns = json!({"type": "network"});
    if let Some(path) = netns {
        ns["path"] = json!(path.display().to_string());
    }
    if let Some(list) = spec["linux"]["namespaces"].as_array_mut() {
        list.push(ns);
    }
    if let Some(file) = resolv_conf {
        if let Some(mounts) = spec["mounts"].as_array_mut() {
            mounts.retain(|m| m["destination"] != "/etc/resolv.conf");
            mounts.push(mount(
                "/etc/resolv.conf",
                "bind",
                &file.display().to_string(),
                &["rbind", "ro", "nosuid", "nodev"],
            ));
        }
    }
}

/// The runtime spec (config.json) for a unit's container in `namespace`.
/// `host_files` are host files bound read-only at the same path (resolv.conf, hosts); the
/// unit's volumes are under `volume_root`.
pub fn runtime_spec(
    spec: &UnitSpec,
    image: &RunConfig,
    namespace: &str,
    host_files: &[&str],
    volume_root: &Path,
) -> Result<Value, SpecError> {
    let (uid, gid) = user(spec, image)?;
    let privileged = spec.privileged;
    if privileged {
        log::warn!(
            "unit {}: privileged: every capability and device, no seccomp filter, no masked paths",
            spec.name
        );
    }
    let caps = capabilities(spec);
    // Docker's --privileged mounts /sys and the cgroup tree writable.
    let sys = if privileged {
        ["nosuid", "noexec", "nodev", "rw"]
    } else {
        ["nosuid", "noexec", "nodev", "ro"]
    };
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
        mount("/sys", "sysfs", "sysfs", &sys),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &[&sys[..], &["relatime"]].concat(),
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
    mounts.extend(storage_mounts(spec, volume_root));
    let (masked, readonly): (&[&str], &[&str]) = if privileged {
        (&[], &[])
    } else {
        (&MASKED, &READONLY)
    };
    let mut linux = json!({
        "resources": resources(&spec.resources, privileged),
        "cgroupsPath": format!("/{namespace}/{}", spec.name),
        // The host's network; a bridge unit joins its own (join_network).
        "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
        "maskedPaths": masked,
        "readonlyPaths": readonly,
    });
    if !privileged {
        linux["seccomp"] = seccomp::profile(&caps);
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
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            // As Docker's --privileged: setuid programs (sudo) keep working there.
            "noNewPrivileges": !privileged,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "",
        "mounts": mounts,
        "linux": linux,
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
            Path::new("/v"),
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
            Path::new("/v"),
        )
        .unwrap();
        assert_eq!(s["process"]["args"], json!(["/bin/sh", "-c", "true"]));
        assert_eq!(s["process"]["env"][0], DEFAULT_PATH);
        assert_eq!(s["process"]["cwd"], "/");
    }

    fn cmd() -> RunConfig {
        RunConfig {
            cmd: Some(vec!["/bin/sh".into()]),
            ..RunConfig::default()
        }
    }

    #[test]
    fn limits_map_to_linux_resources() {
        let s = runtime_spec(
            &unit("[resources]\nmemory = \"512M\"\ncpus = 1.5\npids = 20"),
            &cmd(),
            "n",
            &[],
            Path::new("/v"),
        )
        .unwrap();
        let r = &s["linux"]["resources"];
        assert_eq!(r["memory"], json!({"limit": 512u64 << 20}));
        assert_eq!(r["cpu"], json!({"quota": 150_000, "period": 100_000}));
        assert_eq!(r["pids"], json!({"limit": 20}));
        // No limit asked: none set but the default pids limit.
        let s = runtime_spec(&unit(""), &cmd(), "n", &[], Path::new("/v")).unwrap();
        let r = &s["linux"]["resources"];
        assert!(r.get("memory").is_none() && r.get("cpu").is_none());
        assert_eq!(r["pids"]["limit"], crate::unit::DEFAULT_PIDS);
    }

    #[test]
    fn confined_by_default() {
        let s = runtime_spec(&unit(""), &cmd(), "n", &[], Path::new("/v")).unwrap();
        let caps = &s["process"]["capabilities"];
        for set in ["bounding", "effective", "permitted"] {
            let list = caps[set].as_array().unwrap();
            assert!(!list.contains(&json!("CAP_NET_RAW")), "{set}: {list:?}");
            assert!(!list.contains(&json!("CAP_SYS_ADMIN")), "{set}: {list:?}");
            assert!(
                list.contains(&json!("CAP_NET_BIND_SERVICE")),
                "{set}: {list:?}"
            );
        }
        assert_eq!(s["process"]["noNewPrivileges"], true);
        let linux = &s["linux"];
        assert_eq!(linux["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(
            linux["seccomp"]["architectures"],
            json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
        );
        let devices = linux["resources"]["devices"].as_array().unwrap();
        assert_eq!(devices[0], json!({"allow": false, "access": "rwm"}));
        assert!(devices[1..]
            .iter()
            .all(|d| d["allow"] == true && d["type"] == "c"));
        assert!(devices.contains(
            &json!({"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"})
        ));
        assert!(!devices.iter().any(|d| d["major"] == 8), "no disks");
        assert!(linux["maskedPaths"]
            .as_array()
            .unwrap()
            .contains(&json!("/proc/kcore")));
        assert!(linux["readonlyPaths"]
            .as_array()
            .unwrap()
            .contains(&json!("/proc/sys")));
        let sys = s["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys")
            .unwrap();
        assert!(sys["options"].as_array().unwrap().contains(&json!("ro")));

        // Added capabilities join the set, and the calls they need come back.
        let s = runtime_spec(
            &unit("capabilities = [\"NET_RAW\", \"SYS_ADMIN\"]"),
            &cmd(),
            "n",
            &[],
            Path::new("/v"),
        )
        .unwrap();
        let bounding = s["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(
            bounding.contains(&json!("CAP_NET_RAW")) && bounding.contains(&json!("CAP_SYS_ADMIN"))
        );
        let allowed = seccomp::allowed(&s["linux"]["seccomp"]);
        assert!(allowed.iter().any(|c| c == "mount"));
    }

    #[test]
    fn privileged_lifts_confinement() {
        let s = runtime_spec(
            &unit("privileged = true"),
            &cmd(),
            "n",
            &[],
            Path::new("/v"),
        )
        .unwrap();
        let bounding = s["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert_eq!(bounding.len(), capability::held().len());
        assert!(
            bounding.contains(&json!("CAP_SYS_ADMIN")) && bounding.contains(&json!("CAP_NET_RAW"))
        );
        assert_eq!(s["process"]["noNewPrivileges"], false);
        let linux = &s["linux"];
        assert!(linux.get("seccomp").is_none());
        assert_eq!(
            linux["resources"]["devices"],
            json!([{"allow": true, "access": "rwm"}])
        );
        assert_eq!(linux["maskedPaths"], json!([]));
        assert_eq!(linux["readonlyPaths"], json!([]));
        // Limits still hold.
        assert_eq!(
            linux["resources"]["pids"]["limit"],
            crate::unit::DEFAULT_PIDS
        );
    }

    #[test]
    fn volumes_and_binds_are_mounted() {
        let u = unit(
            "volumes = [{ name = \"data\", path = \"/srv/data\" }, { name = \"cache\", path = \"/srv/data/cache\" }, { name = \"top\", path = \"/srv\" }]\n\
             binds = [{ source = \"/etc/caisson/units/web/nginx.conf\", path = \"/etc/nginx/nginx.conf\" }]",
        );
        let s = runtime_spec(
            &u,
            &cmd(),
            "n",
            &["/etc/hosts"],
            Path::new("/var/lib/caisson/volumes"),
        )
        .unwrap();
        let mounts = s["mounts"].as_array().unwrap();
        let storage: Vec<&Value> = mounts
            .iter()
            .skip_while(|m| m["destination"] != "/etc/hosts")
            .skip(1)
            .collect();
        assert_eq!(
            storage,
            [
                &json!({"destination": "/srv", "type": "bind",
                        "source": "/var/lib/caisson/volumes/web/top",
                        "options": ["rbind", "rw", "nosuid", "nodev"]}),
                &json!({"destination": "/srv/data", "type": "bind",
                        "source": "/var/lib/caisson/volumes/web/data",
                        "options": ["rbind", "rw", "nosuid", "nodev"]}),
                &json!({"destination": "/srv/data/cache", "type": "bind",
                        "source": "/var/lib/caisson/volumes/web/cache",
                        "options": ["rbind", "rw", "nosuid", "nodev"]}),
                &json!({"destination": "/etc/nginx/nginx.conf", "type": "bind",
                        "source": "/etc/caisson/units/web/nginx.conf",
                        "options": ["rbind", "ro", "nosuid", "nodev"]}),
            ],
            "after the runtime's mounts, parents first"
        );
        // No storage: no extra mounts.
        let plain = runtime_spec(&unit(""), &cmd(), "n", &[], Path::new("/v")).unwrap();
        assert_eq!(plain["mounts"].as_array().unwrap().len(), 8);
    }

    #[test]
    fn clear_errors() {
        let e =
            runtime_spec(&unit(""), &RunConfig::default(), "n", &[], Path::new("/v")).unwrap_err();
        assert_eq!(e, SpecError::NoCommand { unit: "web".into() });
        let named = RunConfig {
            user: Some("www-data".into()),
            ..image()
        };
        assert!(runtime_spec(&unit(""), &named, "n", &[], Path::new("/v"))
            .unwrap_err()
            .to_string()
            .contains("www-data"));
    }

    #[test]
    fn a_bridge_unit_joins_its_namespace_and_resolver() {
        let unit = UnitSpec::parse(
            "web",
            "command = [\"/bin/true\"]\n[image]\npath = \"/a.tar\"",
        )
        .unwrap();
        let image = RunConfig::default();
        let mut s = runtime_spec(
            &unit,
            &image,
            "caisson",
            &["/etc/resolv.conf", "/etc/hosts"],
            Path::new("/v"),
        )
        .unwrap();
        let mut none = s.clone();
        join_network(&mut none, None, None);
        let ns = none["linux"]["namespaces"].as_array().unwrap();
        assert!(ns
            .iter()
            .any(|n| n["type"] == "network" && n.get("path").is_none()));
        join_network(
            &mut s,
            Some(Path::new("/run/caisson/netns/web")),
            Some(Path::new("/run/caisson/resolv.conf")),
        );
        let ns = s["linux"]["namespaces"].as_array().unwrap();
        assert!(ns
            .iter()
            .any(|n| n["type"] == "network" && n["path"] == "/run/caisson/netns/web"));
        let resolv: Vec<&Value> = s["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["destination"] == "/etc/resolv.conf")
            .collect();
        assert_eq!(resolv.len(), 1);
        assert_eq!(resolv[0]["source"], "/run/caisson/resolv.conf");
    }
}
