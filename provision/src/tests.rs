//! Schema, apply and source tests on temporary roots.

use crate::apply::{apply, check, recorded, sha256_hex, Outcome, RECORD};
use crate::config::{Config, ConfigError};
use crate::plan::{Checks, NoChecks};
use crate::source::{self, Env, Source};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub(crate) const EXAMPLE: &str = include_str!("../testdata/machine.toml");

pub(crate) fn err(text: &str) -> ConfigError {
    Config::parse(text).unwrap_err()
}

/// A root with what `[ssh]` and owner names need.
pub(crate) fn root() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    std::fs::create_dir_all(r.join("usr/sbin")).unwrap();
    std::fs::write(r.join("usr/sbin/sshd"), b"").unwrap();
    std::fs::create_dir_all(r.join("usr/bin")).unwrap();
    std::fs::write(r.join("usr/bin/busybox"), b"").unwrap();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(r.join("etc/group"), "root:x:0:\napp:x:1000:\nadm:x:4:\n").unwrap();
    tmp
}

pub(crate) fn read(root: &Path, p: &str) -> String {
    std::fs::read_to_string(root.join(p.trim_start_matches('/'))).unwrap()
}

pub(crate) fn mode(root: &Path, p: &str) -> u32 {
    std::fs::metadata(root.join(p.trim_start_matches('/')))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Lists every path below `root`, for "nothing was written" checks.
pub(crate) fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn the_example_parses() {
    let c = Config::parse(EXAMPLE).unwrap();
    assert_eq!(c.hostname.as_deref(), Some("web-1"));
    assert_eq!(c.files.len(), 2);
    assert!(c.files[1].secret);
    // Debug never shows contents.
    assert!(!format!("{c:?}").contains("czNjcjN0"));
}

#[test]
fn errors_name_the_field() {
    let e = err("version = 1\nhostnme = \"x\"\n");
    assert_eq!(e.field, "hostnme");
    assert!(e.why.contains("line 2"), "{e}");
    let e = err("version = 1\n[network]\nmode = \"static\"\naddres = \"1.2.3.4/24\"\n");
    assert_eq!(e.field, "addres", "{e}");
    assert_eq!(err("hostname = \"a\"\n").field, "version");
    assert_eq!(err("version = 2\n").field, "version");
    assert_eq!(err("version = 1\nhostname = \"-bad\"\n").field, "hostname");
    let e = err("version = 1\n[network]\nmode = \"static\"\naddress = \"10.0.0.300/24\"\n");
    assert_eq!(e.field, "network.address");
    assert_eq!(
        err("version = 1\n[network]\nmode = \"static\"\naddress = \"10.0.0.3\"\n").field,
        "network.address"
    );
    assert_eq!(
        err("version = 1\n[network]\ndns = [\"10.0.0.1\", \"x\"]\n").field,
        "network.dns[1]"
    );
    assert_eq!(
        err("version = 1\n[network]\nroutes = [{ to = \"10.1.0.0/16\", via = \"10.0.0.1\" }]\n")
            .field,
        "network.routes[0].to"
    );
    for (links, field) in [
        ("[[network.links]]\naddress = \"10.1.0.1/24\"\n", "network.links[0].interface"),
        (
            "[[network.links]]\nmac = \"52:54:00:aa:00\"\naddress = \"10.1.0.1/24\"\n",
            "network.links[0].mac",
        ),
        (
            "[[network.links]]\ninterface = \"eth1\"\nmac = \"52:54:00:aa:00:01\"\naddress = \"10.1.0.1/24\"\n",
            "network.links[0].mac",
        ),
        (
            "[[network.links]]\ninterface = \"eth1\"\naddress = \"10.1.0.1/+4\"\n",
            "network.links[0].address",
        ),
        ("[network]\nmac = \"52-54-00-aa-00-01\"\n", "network.mac"),
        ("[fleet]\naddress = \"10.0.0.5/33\"\n", "fleet.address"),
    ] {
        assert_eq!(err(&format!("version = 1\n{links}")).field, field, "{links}");
    }
    let e = err("version = 1\n[[files]]\npath = \"/etc/a\"\nmode = \"0999\"\n");
    assert_eq!(e.field, "files[0].mode");
    assert!(e.to_string().starts_with("files[0].mode: "), "{e}");
    assert_eq!(
        err("version = 1\n[[files]]\npath = \"/etc/a\"\nmode = 70000\n").field,
        "files[0].mode"
    );
    assert_eq!(
        err("version = 1\n[[files]]\npath = \"/usr/bin/x\"\n").field,
        "files[0].path"
    );
    assert_eq!(
        err("version = 1\n[[files]]\npath = \"/etc/../usr/x\"\n").field,
        "files[0].path"
    );
    assert_eq!(
        err("version = 1\n[[files]]\npath = \"/etc/k\"\nsecret = true\nmode = \"0644\"\n").field,
        "files[0].mode"
    );
    assert_eq!(
        err("version = 1\n[[files]]\npath = \"/etc/k\"\ncontents_base64 = \"***\"\n").field,
        "files[0].contents_base64"
    );
    assert_eq!(
        err("version = 1\n[[directories]]\npath = \"/var/x\"\nmode = \"rwx\"\n").field,
        "directories[0].mode"
    );
    assert_eq!(
        err("version = 1\n[ssh]\nauthorized_keys = [\"hunter2\"]\n").field,
        "ssh.authorized_keys[0]"
    );
    assert_eq!(
        err("version = 1\n[update]\nstrategy = \"fleet-lock\"\n").field,
        "update.fleet_lock_url"
    );
    assert_eq!(
        err("version = 1\n[update]\nmaintenance_window = { start = \"25:00\", length_minutes = 5 }\n").field,
        "update.maintenance_window.start"
    );
    assert_eq!(
        err("version = 1\n[fleet]\nendpoints = [\"etcd:2379\"]\n").field,
        "fleet.endpoints[0]"
    );
    assert_eq!(
        err("version = 1\n[kernel]\nmodules = [\"../x\"]\n").field,
        "kernel.modules[0]"
    );
    assert_eq!(
        err("version = 1\n[services.\"a b\"]\nexec = \"/x\"\n").field,
        "services.a b"
    );
}

#[test]
fn a_toml_error_does_not_echo_the_line() {
    let e = err(
        "version = 1\n[[files]]\npath = \"/etc/k\"\nsecret = true\ncontents = \"hunter2\" oops\n",
    );
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert!(e.to_string().contains("line 5"), "{e}");
}

#[test]
fn apply_writes_everything_once() {
    let tmp = root();
    let r = tmp.path();
    let out = apply(EXAMPLE.as_bytes(), r, &NoChecks, "test").unwrap();
    let sha = sha256_hex(EXAMPLE.as_bytes());
    assert_eq!(
        out,
        Outcome::Applied {
            sha256: sha.clone(),
            entries: 20
        }
    );
    assert_eq!(read(r, "/etc/hostname"), "web-1\n");
    assert_eq!(read(r, "/etc/app/app.conf"), "listen = 8080\n");
    assert_eq!(mode(r, "/etc/app/app.conf"), 0o644);
    assert_eq!(read(r, "/etc/app/token"), "s3cr3t-t0ken");
    assert_eq!(mode(r, "/etc/app/token"), 0o600);
    assert_eq!(mode(r, "/var/lib/app"), 0o750);
    assert_eq!(mode(r, "/etc/caisson/ssh/authorized_keys"), 0o600);
    let sshd = read(r, "/etc/caisson/services/sshd.toml");
    assert!(sshd.contains("/usr/sbin/sshd"), "{sshd}");
    assert!(
        sshd.contains(r#"requires = ["ssh-keygen", "sshd-rundir"]"#),
        "{sshd}"
    );
    assert!(read(r, "/etc/caisson/services/sshd-rundir.toml").contains("/run/sshd"));
    let config = read(r, "/etc/caisson/ssh/sshd_config");
    assert!(config.contains("PasswordAuthentication no\n"), "{config}");
    assert!(
        config.contains("KbdInteractiveAuthentication no\n"),
        "{config}"
    );
    assert!(read(r, "/etc/caisson/services/hello.toml").contains("oneshot"));
    assert_eq!(read(r, "/etc/caisson/modules.conf"), "br_netfilter\n");
    assert_eq!(
        read(r, "/etc/caisson/sysctl.conf"),
        "net.ipv4.ip_forward = 1\nvm.swappiness = 10\n"
    );
    let net = read(r, "/etc/caisson/network.toml");
    assert!(
        net.contains("mode = \"static\"") && net.contains("gateway = \"10.0.2.2\""),
        "{net}"
    );
    assert_eq!(recorded(r), Some(sha.clone()));
    assert!(read(r, RECORD).contains("source = \"test\""));
    // No staging leftovers.
    assert!(!tree(r)
        .iter()
        .any(|p| p.to_string_lossy().contains("caisson-provision")));

    // The second boot: nothing is applied again, even a changed file stays as it is.
    std::fs::write(r.join("etc/app/app.conf"), "changed\n").unwrap();
    let record = read(r, RECORD);
    let again = apply(EXAMPLE.as_bytes(), r, &NoChecks, "test").unwrap();
    assert_eq!(
        again,
        Outcome::AlreadyProvisioned {
            sha256: sha.clone()
        }
    );
    assert_eq!(read(r, "/etc/app/app.conf"), "changed\n");
    assert_eq!(read(r, RECORD), record);
    // Nor a different config.
    let other = apply(b"version = 1\nhostname = \"other\"\n", r, &NoChecks, "test").unwrap();
    assert_eq!(other, Outcome::AlreadyProvisioned { sha256: sha });
    assert_eq!(read(r, "/etc/hostname"), "web-1\n");
}

#[test]
fn owners_are_resolved_in_the_root() {
    let tmp = root();
    let r = tmp.path();
    let cfg =
        "version = 1\n[[files]]\npath = \"/var/lib/app/x\"\nowner = \"app\"\ngroup = \"adm\"\n";
    apply(cfg.as_bytes(), r, &NoChecks, "t").unwrap();
    let m = std::fs::metadata(r.join("var/lib/app/x")).unwrap();
    if rustix_root() {
        assert_eq!((m.uid(), m.gid()), (1000, 4));
    }
    let e = check(
        b"version = 1\n[[files]]\npath = \"/etc/x\"\nowner = \"nobody-here\"\n",
        Some(r),
        &NoChecks,
    )
    .unwrap_err();
    assert_eq!(e.field, "files[0].owner");
}

pub(crate) fn rustix_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[test]
fn an_invalid_config_writes_nothing() {
    let tmp = root();
    let r = tmp.path();
    let before = tree(r);
    let bad = EXAMPLE.replace("mode = \"0750\"", "mode = \"0780\"");
    let e = apply(bad.as_bytes(), r, &NoChecks, "t").unwrap_err();
    assert_eq!(
        e.to_string(),
        "directories[0].mode: \"0780\" is not a file mode (octal text such as \"0644\", or 0o644)"
    );
    assert_eq!(tree(r), before);
    assert_eq!(recorded(r), None);

    // A failure while staging (a file's target is a directory) removes what was staged.
    std::fs::create_dir_all(r.join("etc/app/token")).unwrap();
    let before = tree(r);
    let e = apply(EXAMPLE.as_bytes(), r, &NoChecks, "t").unwrap_err();
    assert!(e.to_string().starts_with("files[1].path: "), "{e}");
    assert_eq!(tree(r), before);
}

#[test]
fn ssh_needs_a_server_in_the_image() {
    let tmp = root();
    std::fs::remove_file(tmp.path().join("usr/sbin/sshd")).unwrap();
    let e = check(EXAMPLE.as_bytes(), Some(tmp.path()), &NoChecks).unwrap_err();
    assert_eq!(e.field, "ssh");
    assert!(e.to_string().contains("openssh-server"), "{e}");
    let tmp = root();
    std::fs::remove_file(tmp.path().join("usr/bin/busybox")).unwrap();
    let e = check(EXAMPLE.as_bytes(), Some(tmp.path()), &NoChecks).unwrap_err();
    assert!(e.to_string().contains("/run/sshd"), "{e}");
}

#[test]
fn ssh_is_off_without_keys() {
    let tmp = root();
    // No SSH server needed in the image either.
    std::fs::remove_file(tmp.path().join("usr/sbin/sshd")).unwrap();
    for text in [
        "version = 1\n",
        "version = 1\n[ssh]\nauthorized_keys = []\n",
    ] {
        let plan = check(text.as_bytes(), Some(tmp.path()), &NoChecks).unwrap();
        assert!(
            !plan.entries.iter().any(|e| e.path.contains("ssh")),
            "{:?}",
            plan.entries
        );
    }
}

struct RejectServices;
impl Checks for RejectServices {
    fn service(&self, name: &str, text: &str) -> Result<(), String> {
        assert!(text.contains("exec"));
        Err(format!("{name} is not allowed"))
    }
}

#[test]
fn the_callers_checks_name_the_service() {
    let tmp = root();
    let e = check(EXAMPLE.as_bytes(), Some(tmp.path()), &RejectServices).unwrap_err();
    assert_eq!(e.to_string(), "services.hello: hello is not allowed");
}

#[test]
fn rendered_update_file_parses_in_its_agent() {
    let tmp = root();
    let r = tmp.path();
    apply(EXAMPLE.as_bytes(), r, &NoChecks, "t").unwrap();
    let u = caisson_update::config::Config::parse(
        &read(r, "/etc/caisson/update.toml"),
        Path::new("update.toml"),
    )
    .unwrap();
    assert_eq!(u.strategy, caisson_update::config::Strategy::FleetLock);
    assert_eq!(u.maintenance_window.unwrap().length_minutes, 120);
}

pub(crate) fn fat_image(dir: &Path, label: &str) -> PathBuf {
    fat_image_kib(dir, label, 1024)
}

pub(crate) fn fat_image_kib(dir: &Path, label: &str, kib: u32) -> PathBuf {
    let img = dir.join(format!("{label}.img"));
    let st = std::process::Command::new("mkfs.fat")
        .args(["-C", "-n", label])
        .arg(&img)
        .arg(kib.to_string())
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    img
}

/// Runs an mtools command on the image `img` (`mcopy -i IMG ...`).
pub(crate) fn mtools(tool: &str, img: &Path, args: &[&str]) {
    let out = std::process::Command::new(tool)
        .arg("-i")
        .arg(img)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Puts `text` at `path` (`::/dir/file`) on the FAT image `img`.
pub(crate) fn put(img: &Path, path: &str, text: &str) {
    let src = img.with_extension("put");
    std::fs::write(&src, text).unwrap();
    mtools("mcopy", img, &["-o", &src.to_string_lossy(), path]);
}

#[test]
fn sources_first_found_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path().join("root");
    let env = |esp: Option<PathBuf>| Env {
        root: &r,
        cmdline: "console=ttyS0",
        esp,
    };
    std::fs::create_dir_all(&r).unwrap();
    assert_eq!(source::discover_local(&env(None)).unwrap(), None);

    // The ESP, read without mounting it; its file names are matched without regard to case.
    let esp = fat_image(tmp.path(), "ESP");
    let found = source::discover_local(&env(Some(esp.clone()))).unwrap();
    assert_eq!(found, None, "an ESP without a config");
    mtools("mmd", &esp, &["::/CAISSON"]);
    put(&esp, "::/CAISSON/Config.toml", "version = 1 # esp\n");
    let found = source::discover_local(&env(Some(esp.clone())))
        .unwrap()
        .unwrap();
    assert_eq!(found.source, Source::Esp(esp.clone()));
    assert_eq!(found.bytes, b"version = 1 # esp\n");
    let before = std::fs::read(&esp).unwrap();

    // A config drive, found by its FAT label, beats the ESP.
    std::fs::create_dir_all(r.join("sys/class/block/vdb")).unwrap();
    std::fs::create_dir_all(r.join("sys/class/block/vda")).unwrap();
    std::fs::create_dir_all(r.join("dev")).unwrap();
    std::fs::write(r.join("dev/vda"), vec![0u8; 4096]).unwrap();
    let drive = fat_image(tmp.path(), "CAISSON-CFG");
    put(&drive, "::/caisson.toml", "version = 1\n");
    std::fs::copy(&drive, r.join("dev/vdb")).unwrap();
    let found = source::discover_local(&env(Some(esp.clone())))
        .unwrap()
        .unwrap();
    assert_eq!(found.source, Source::Drive(r.join("dev/vdb")));
    assert_eq!(found.bytes, b"version = 1\n");

    // fw_cfg beats everything.
    let fw = r.join(source::FW_CFG_PATH.trim_start_matches('/'));
    std::fs::create_dir_all(fw.parent().unwrap()).unwrap();
    std::fs::write(&fw, "version = 1 # fw_cfg\n").unwrap();
    let found = source::discover_local(&env(None)).unwrap().unwrap();
    assert_eq!(found.source, Source::FwCfg);

    // Reading changed nothing on the volumes.
    assert_eq!(std::fs::read(&esp).unwrap(), before);
    assert_eq!(
        std::fs::read(r.join("dev/vdb")).unwrap(),
        std::fs::read(&drive).unwrap()
    );
}

#[test]
fn a_fat_volume_read_in_user_space_refuses_what_it_cannot_take() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path().join("root");
    std::fs::create_dir_all(r.join("sys/class/block/vdb")).unwrap();
    std::fs::create_dir_all(r.join("dev")).unwrap();
    let env = |esp: Option<PathBuf>| Env {
        root: &r,
        cmdline: "",
        esp,
    };

    // A config drive without the file is an error that names the device and the file.
    let drive = fat_image_kib(tmp.path(), "CAISSON-CFG", 4096);
    std::fs::copy(&drive, r.join("dev/vdb")).unwrap();
    let e = source::discover_local(&env(None)).unwrap_err();
    assert!(e.to_string().contains("dev/vdb"), "{e}");
    assert!(e.to_string().contains("caisson.toml"), "{e}");

    // A config larger than the limit is refused.
    let big = "#".repeat(source::MAX_SIZE as usize + 1);
    put(&drive, "::/caisson.toml", &big);
    std::fs::copy(&drive, r.join("dev/vdb")).unwrap();
    let e = source::discover_local(&env(None)).unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");

    // An ESP that is not a FAT volume is logged and passed over: the boot goes on.
    std::fs::remove_file(r.join("dev/vdb")).unwrap();
    let junk = tmp.path().join("junk");
    std::fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
    assert_eq!(
        source::discover_local(&env(Some(junk.clone()))).unwrap(),
        None
    );
    let e = source::read_from_volume(&junk, "caisson/config.toml").unwrap_err();
    assert!(e.to_string().contains("FAT volume"), "{e}");
}

#[test]
fn fat_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let img = fat_image(tmp.path(), "CAISSON-CFG");
    let bytes = std::fs::read(img).unwrap();
    assert_eq!(
        source::fat_label(&bytes[..512]).as_deref(),
        Some("CAISSON-CFG")
    );
    assert_eq!(source::fat_label(&[0u8; 512]), None);
}

#[test]
fn url_source_needs_a_pinned_hash() {
    assert_eq!(source::url_source("quiet").unwrap(), None);
    assert!(source::url_source("caisson.config_url=http://x/c.toml").is_err());
    let sha = "A".repeat(64);
    let (url, got) = source::url_source(&format!(
        "caisson.config_url=http://x/c.toml caisson.config_sha256={sha}"
    ))
    .unwrap()
    .unwrap();
    assert_eq!((url.as_str(), got), ("http://x/c.toml", "a".repeat(64)));
}

#[test]
fn fetches_over_http_and_checks_the_hash() {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let body = "version = 1\nhostname = \"from-url\"\n";
    std::thread::spawn(move || {
        for s in listener.incoming().take(2) {
            let mut s = s.unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            let reply = if line.starts_with("GET /machine.toml ") {
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.0 404 Not Found\r\n\r\n".to_string()
            };
            s.write_all(reply.as_bytes()).unwrap();
        }
    });
    let url = format!("http://{addr}/machine.toml");
    let got = source::http_get(&url, std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(got, body.as_bytes());
    let e = source::http_get(
        &format!("http://{addr}/nope"),
        std::time::Duration::from_secs(5),
    )
    .unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");

    // Through discover, with the hash pinned (and a wrong one refused).
    let tmp = tempfile::tempdir().unwrap();
    let sha = sha256_hex(body.as_bytes());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().take(2) {
            let mut s = s.unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            let reply = format!("HTTP/1.0 200 OK\r\n\r\n{body}");
            s.write_all(reply.as_bytes()).unwrap();
        }
    });
    for (pin, ok) in [(sha.clone(), true), ("0".repeat(64), false)] {
        let cmdline =
            format!("caisson.config_url=http://{addr}/m.toml caisson.config_sha256={pin}");
        let env = Env {
            root: tmp.path(),
            cmdline: &cmdline,
            esp: None,
        };
        let r = source::discover(&env, std::time::Duration::from_secs(5));
        match ok {
            true => assert_eq!(
                r.unwrap().unwrap().source,
                Source::Url(format!("http://{addr}/m.toml"))
            ),
            false => assert!(
                r.unwrap_err().to_string().contains("sha256"),
                "wrong pin accepted"
            ),
        }
    }
}

#[test]
fn a_config_drive_is_found_by_its_label() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("machine.toml");
    std::fs::write(&cfg, EXAMPLE).unwrap();
    let img = tmp.path().join("config.img");
    crate::drive::make(&cfg, &img).unwrap();
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(
        source::fat_label(&bytes[..512]).as_deref(),
        Some("CAISSON-CFG")
    );
    let out = std::process::Command::new("fsck.fat")
        .arg("-n")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = std::process::Command::new("mtype")
        .args(["-i"])
        .arg(&img)
        .arg("::/caisson.toml")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), EXAMPLE);
    let read = source::read_from_volume(&img, "caisson.toml").unwrap();
    assert_eq!(read.as_deref(), Some(EXAMPLE.as_bytes()));
}

/// The little-endian u16 at `at`.
pub(crate) fn le16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Sets FAT12 entry `cluster` to `value` in every FAT of the image `b`.
pub(crate) fn set_fat12(b: &mut [u8], cluster: usize, value: u16) {
    let (bps, reserved, fats, per_fat) =
        (le16(b, 11), le16(b, 14), usize::from(b[16]), le16(b, 22));
    for n in 0..fats {
        let at = (reserved + n * per_fat) * bps + cluster + cluster / 2;
        if cluster.is_multiple_of(2) {
            b[at] = value as u8;
            b[at + 1] = (b[at + 1] & 0xF0) | ((value >> 8) as u8 & 0x0F);
        } else {
            b[at] = (b[at] & 0x0F) | ((value as u8 & 0x0F) << 4);
            b[at + 1] = (value >> 4) as u8;
        }
    }
}

/// A FAT12 image whose directory `/CAISSON` is one cluster whose chain leads back to itself,
/// every entry after `.` and `..` a deleted one: a reader that follows the chain never meets the
/// end of the directory.
fn looping_directory_image(dir: &Path) -> PathBuf {
    let img = fat_image(dir, "CAISSON-CFG");
    mtools("mmd", &img, &["::/CAISSON"]);
    let mut b = std::fs::read(&img).unwrap();
    let (bps, spc, reserved) = (le16(&b, 11), usize::from(b[13]), le16(&b, 14));
    let (fats, root_entries, per_fat) = (usize::from(b[16]), le16(&b, 17), le16(&b, 22));
    let root = (reserved + fats * per_fat) * bps;
    let entry = (0..root_entries)
        .map(|i| root + i * 32)
        .find(|&at| &b[at..at + 11] == b"CAISSON    ")
        .expect("the directory entry");
    let cluster = le16(&b, entry + 26);
    let data = root + root_entries * 32;
    let start = data + (cluster - 2) * spc * bps;
    for at in (start + 64..start + spc * bps).step_by(32) {
        b[at..at + 32].copy_from_slice(&[0xE5; 32]);
    }
    set_fat12(&mut b, cluster, cluster as u16);
    std::fs::write(&img, &b).unwrap();
    img
}

#[test]
fn a_directory_whose_cluster_chain_loops_is_refused_in_bounded_time() {
    let tmp = tempfile::tempdir().unwrap();
    let img = looping_directory_image(tmp.path());
    let (tx, rx) = std::sync::mpsc::channel();
    let read = img.clone();
    std::thread::spawn(move || {
        let _ = tx.send(source::read_from_volume(&read, "caisson/config.toml"));
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("reading a looping directory hung");
    let e = got.unwrap_err().to_string();
    assert!(e.contains(&img.display().to_string()), "{e}");
    assert!(e.contains("is met twice"), "{e}");
    // Through discovery, as the first boot reads the ESP: passed over, the boot goes on.
    let r = tmp.path().join("root");
    std::fs::create_dir_all(&r).unwrap();
    let env = Env {
        root: &r,
        cmdline: "",
        esp: Some(img),
    };
    assert_eq!(source::discover_local(&env).unwrap(), None);
}

#[test]
fn a_trickling_or_endless_config_server_is_cut_off() {
    use std::io::{BufRead, BufReader, Write};
    let serve = |body: fn(&mut std::net::TcpStream)| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap_or_default();
                body(&mut s);
            }
        });
        format!("http://{addr}/machine.toml")
    };
    // One byte every 100 ms for ever: each read is quick, the try as a whole is not.
    let url = serve(|s| {
        let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
        while s.write_all(b"#").is_ok() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let fetch = url.clone();
    std::thread::spawn(move || {
        let _ = tx.send(source::http_get(&fetch, std::time::Duration::from_secs(1)));
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("a trickling server kept the fetch past its deadline");
    let e = got.unwrap_err().to_string();
    assert!(e.contains(&url) && e.contains("within 1 s"), "{e}");
    // A body that never ends is refused at the size cap.
    let url = serve(|s| {
        let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
        while s.write_all(&[b'#'; 65536]).is_ok() {}
    });
    let e = source::http_get(&url, std::time::Duration::from_secs(10)).unwrap_err();
    assert!(matches!(e, source::SourceError::TooLarge { .. }), "{e}");
}

#[test]
fn a_service_with_an_environment_is_written_0600() {
    let tmp = root();
    let r = tmp.path();
    let config = "version = 1\n\
        [services.app]\nexec = \"/usr/bin/app\"\nenv = { TOKEN = \"hunter2\" }\n\
        [services.plain]\nexec = \"/usr/bin/plain\"\n";
    let plan = check(config.as_bytes(), Some(r), &NoChecks).unwrap();
    let shown = format!("{plan:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    apply(config.as_bytes(), r, &NoChecks, "test").unwrap();
    assert_eq!(mode(r, "/etc/caisson/services/app.toml"), 0o600);
    assert!(read(r, "/etc/caisson/services/app.toml").contains("hunter2"));
    assert_eq!(mode(r, "/etc/caisson/services/plain.toml"), 0o644);
}

#[test]
fn a_base64_error_shows_no_byte_of_the_value() {
    // Each value is bad in a different way; none of its characters may appear in the message.
    for (value, kind) in [
        ("czNj!!!!", "offset 4"),
        ("czNjc", "length"),
        ("czNjcg=", "padding"),
        ("czNjcZ==", "last symbol"),
    ] {
        let e = err(&format!(
            "version = 1\n[[files]]\npath = \"/etc/k\"\nsecret = true\ncontents_base64 = \"{value}\"\n"
        ));
        let text = e.to_string();
        assert!(text.contains("contents_base64"), "{text}");
        assert!(text.contains(kind), "{value}: {text}");
        for needle in ["!", "czN", "'Z'", "90", "33", "0x"] {
            assert!(!text.contains(needle), "{value}: {needle:?} in {text}");
        }
    }
}

/// A root whose /var/run is a link to the root's /run, whose /var/x is a link to a directory
/// outside it, and whose /etc/linked.conf is a link to a file outside it.
fn linked_root() -> (tempfile::TempDir, tempfile::TempDir) {
    let tmp = root();
    let outside = tempfile::tempdir().unwrap();
    let r = tmp.path();
    std::fs::create_dir_all(r.join("var")).unwrap();
    std::fs::create_dir_all(r.join("run")).unwrap();
    std::os::unix::fs::symlink("../run", r.join("var/run")).unwrap();
    std::os::unix::fs::symlink(outside.path(), r.join("var/x")).unwrap();
    std::fs::write(outside.path().join("file"), "outside\n").unwrap();
    std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(outside.path().join("file"), r.join("etc/linked.conf")).unwrap();
    (tmp, outside)
}

/// Each config writes a good file first (in a directory it makes), then one through a link.
#[test]
fn a_symbolic_link_on_the_way_or_at_the_target_is_refused() {
    let (tmp, outside) = linked_root();
    let r = tmp.path();
    let o = outside.path();
    let good = "version = 1\n[[files]]\npath = \"/etc/app/a.conf\"\ncontents = \"a\"\n";
    let cases = [
        (
            "[[files]]\npath = \"/var/run/app/app.pid\"\ncontents = \"1\"\n",
            "var/run",
        ),
        (
            "[[files]]\npath = \"/var/x/token\"\nsecret = true\ncontents = \"hunter2\"\n",
            "var/x",
        ),
        (
            "[[files]]\npath = \"/etc/linked.conf\"\ncontents = \"inside\"\n",
            "etc/linked.conf",
        ),
        (
            "[[directories]]\npath = \"/var/x\"\nmode = \"0700\"\nowner = 0\n",
            "var/x",
        ),
        ("[[directories]]\npath = \"/var/run/sub\"\n", "var/run"),
    ];
    for (bad, link) in cases {
        let before = tree(r);
        let outside_before = tree(o);
        let config = format!("{good}{bad}");
        let e = apply(config.as_bytes(), r, &NoChecks, "t").unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, crate::ApplyError::Symlink { .. }),
            "{bad}: {text}"
        );
        assert!(
            text.contains(&r.join(link).display().to_string()) && text.contains("symbolic link"),
            "{bad}: {text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(tree(r), before, "{bad}: nothing half-written inside");
        assert_eq!(tree(o), outside_before, "{bad}: nothing written outside");
        assert_eq!(recorded(r), None);
    }
    assert_eq!(read(o, "file"), "outside\n");
    assert_eq!(
        mode(o, ""),
        0o755,
        "the outside directory's mode is untouched"
    );
    assert!(std::fs::read_dir(r.join("run")).unwrap().next().is_none());
    assert!(std::fs::symlink_metadata(r.join("etc/linked.conf"))
        .unwrap()
        .file_type()
        .is_symlink());

    // A link in /var/lib/caisson cannot take the record elsewhere either.
    std::fs::create_dir_all(r.join("var/lib")).unwrap();
    std::os::unix::fs::symlink(o, r.join("var/lib/caisson")).unwrap();
    let e = crate::record_nothing(r).unwrap_err();
    assert!(matches!(e, crate::ApplyError::Symlink { .. }), "{e}");
    assert!(!o.join("provisioned").exists());
}

#[test]
fn a_record_behind_a_link_is_not_taken_for_one() {
    let tmp = root();
    let outside = tempfile::tempdir().unwrap();
    let r = tmp.path();
    std::fs::write(
        outside.path().join("provisioned"),
        "sha256 = \"00\"\nsource = \"elsewhere\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(r.join("var/lib")).unwrap();
    std::os::unix::fs::symlink(outside.path(), r.join("var/lib/caisson")).unwrap();
    assert!(!crate::looked(r));
    assert_eq!(recorded(r), None);
    let before = tree(r);
    let e = apply(b"version = 1\nhostname = \"h\"\n", r, &NoChecks, "t").unwrap_err();
    assert!(matches!(e, crate::ApplyError::Symlink { .. }), "{e}");
    assert_eq!(tree(r), before, "nothing of the config is written");
}
