//! Shared by the integration and end-to-end tests: images are built once per test run, with the
//! real `caisson` binary, into `target/e2e/`, and reused by every test that needs them.

#![allow(dead_code, clippy::unwrap_used)]

/// A real OCI registry on loopback (the fleet's test helper).
#[path = "../../../fleet/tests/common/registry.rs"]
pub mod registry;

pub use caisson_layout::control::{Request, Response};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// The fixed timestamp every test build uses.
pub const EPOCH: &str = "1700000000";

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("builder/ has a parent")
        .to_path_buf()
}

/// Runs `caisson build SPEC --out OUT` and returns the raw image path.
pub fn build(spec: &str, out: &Path, extra: &[&str]) -> PathBuf {
    let ws = workspace();
    let status = Command::new(env!("CARGO_BIN_EXE_caisson"))
        .current_dir(&ws)
        .arg("build")
        .arg(spec)
        .arg("--out")
        .arg(out)
        .arg("--locked")
        .args(extra)
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .status()
        .expect("running caisson build");
    assert!(status.success(), "caisson build {spec} failed");
    let json = std::fs::read_dir(out)
        .expect("listing the output dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let stem = Path::new(spec)
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            name.starts_with(&format!("{stem}-")) && name.ends_with(".raw")
        });
    json.expect("the build wrote a .raw image")
}

/// The image of `images/<name>.toml`, built once per test process.
pub fn image(name: &'static str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(&'static str, PathBuf)>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(n, _)| *n == name) {
        return p.clone();
    }
    let out = workspace().join("target/e2e").join(name);
    let _ = std::fs::remove_dir_all(&out);
    let raw = build(&format!("images/{name}.toml"), &out, &[]);
    built.push((name, raw.clone()));
    raw
}

/// Where test images keep the init's debug switches (init/CONTROL.md).
pub const DEBUG_CONFIG: &str = "/etc/caisson/debug.toml";

/// Writes the init's debug file, which turns on `exec` on the virtio control port (the shipped
/// images leave it off), under `files` (a spec's files directory) and returns the `[[files]]`
/// table to append to the spec.
pub fn debug_files(files: &Path) -> String {
    let src = DEBUG_CONFIG.trim_start_matches('/');
    let path = files.join(src);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(
        &path,
        "# Test image: the harness runs commands through the control channel's exec.\n\
         virtio_exec = true\n",
    )
    .unwrap();
    format!("\n[[files]]\nsrc = \"{src}\"\ndst = \"{DEBUG_CONFIG}\"\n")
}

/// The image of `images/<name>.toml` as the VM tests that use `exec` boot it: the shipped spec,
/// lock and files plus [`debug_files`], built once per test process.
pub fn vm_image(name: &'static str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(&'static str, PathBuf)>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(n, _)| *n == name) {
        return p.clone();
    }
    let ws = workspace();
    let dir = ws.join("target/e2e").join(format!("{name}-vm"));
    let _ = std::fs::remove_dir_all(&dir);
    let spec_dir = dir.join("spec");
    std::fs::create_dir_all(spec_dir.join(name)).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(ws.join("images").join(name).join("files"))
            .arg(spec_dir.join(name).join("files")),
    );
    let lock = format!("{name}.lock");
    std::fs::copy(ws.join("images").join(&lock), spec_dir.join(&lock)).unwrap();
    let spec_path = spec_dir.join(format!("{name}.toml"));
    let spec = std::fs::read_to_string(ws.join("images").join(format!("{name}.toml"))).unwrap()
        + &debug_files(&spec_dir.join(name).join("files"));
    std::fs::write(&spec_path, spec).unwrap();
    let raw = build(spec_path.to_str().unwrap(), &dir.join("out"), &[]);
    built.push((name, raw.clone()));
    raw
}

/// One VM at a time: the machine has two cores and TCG is slow.
pub fn vm_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Copies partition `part` of a raw disk into its own file, for tools that take no offset.
pub fn extract_partition(
    disk: &Path,
    part: caisson_layout::partition::Part,
    dir: &Path,
) -> PathBuf {
    use std::io::{Read, Seek, SeekFrom, Write};
    let layout = caisson_disk::read_layout(disk).expect("reading the GPT");
    let info = layout.get(part).expect("the partition exists");
    let out = dir.join(part.label());
    let mut src = std::fs::File::open(disk).unwrap();
    src.seek(SeekFrom::Start(info.start)).unwrap();
    let mut dst = std::fs::File::create(&out).unwrap();
    let mut limited = src.take(info.size);
    // Zero blocks become holes: a grown state partition is mostly empty, and CI disks can be small.
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = limited.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|&b| b == 0) {
            dst.seek(SeekFrom::Current(n as i64)).unwrap();
        } else {
            dst.write_all(&buf[..n]).unwrap();
        }
    }
    dst.set_len(info.size).unwrap();
    out
}

/// Runs a checking tool and asserts it succeeds, showing its output when it does not.
pub fn check(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?} failed:\n{text}");
    text
}

/// A qcow2 overlay over `image` that the test keeps, so a second boot sees what the first wrote.
pub fn kept_overlay(image: &Path, dir: &Path) -> PathBuf {
    let overlay = dir.join("disk.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(image)
            .arg(&overlay),
    );
    overlay
}

/// Boots `disk` as it is (no overlay of the harness's own), with user-mode networking.
pub fn boot(disk: &Path) -> caisson_qemu::Vm {
    let mut opts = caisson_qemu::VmOptions::new(disk);
    opts.disk = caisson_qemu::Disk::direct(disk);
    caisson_qemu::Vm::launch(opts).expect("launching QEMU")
}

/// One request on the init's control channel, its answer as JSON for the tests to pick at.
pub fn request(vm: &caisson_qemu::Vm, req: &Request) -> serde_json::Value {
    let answer = call(vm, req);
    serde_json::to_value(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

/// One request on the init's control channel, its answer as the init sent it.
pub fn call(vm: &caisson_qemu::Vm, req: &Request) -> Response {
    let mut ctl = vm.control().expect("connecting to the guest channel");
    ctl.call(req)
        .unwrap_or_else(|e| panic!("the init answers {req:?} on the control channel: {e}"))
}

/// Runs `argv` in the guest through the control channel's `exec` and returns the init's answer.
pub fn exec(vm: &caisson_qemu::Vm, argv: &[&str], timeout_s: u64) -> Response {
    call(
        vm,
        &Request::Exec {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            timeout_s: Some(timeout_s),
        },
    )
}

/// Asks the init to power off and waits for a clean exit.
pub fn poweroff(vm: &mut caisson_qemu::Vm) {
    let answer = call(vm, &Request::Poweroff);
    assert!(answer.ok, "{answer:?}");
    match vm.wait_exit(std::time::Duration::from_secs(90)) {
        Ok(status) => assert!(status.success(), "QEMU exited with {status}"),
        Err(e) => {
            let tail = vm.console_tail(60).unwrap_or_default();
            panic!("the machine did not power off: {e}\nconsole:\n{tail}");
        }
    }
}

/// `caisson serve DIR` on a free loopback port, killed when dropped.
pub struct Server {
    child: std::process::Child,
    pub port: u16,
}

impl Server {
    pub fn start(dir: &Path) -> Server {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_caisson"))
            .arg("serve")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "serving DIR on http://127.0.0.1:PORT"
        let port = line
            .trim()
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        Server { child, port }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The state partition of a qcow2 disk, as a raw file (for e2fsck and debugfs).
pub fn state_of(disk: &Path, dir: &Path) -> PathBuf {
    let raw = dir.join("flat.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(disk)
            .arg(&raw),
    );
    extract_partition(&raw, caisson_layout::partition::Part::State, dir)
}

/// Runs `cmd` and returns what it printed (stdout, then stderr); panics with both when it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

pub fn digest(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b))
    )
}

pub fn tar(dir: &Path, dest: &Path, members: &[&str]) {
    run_ok(
        Command::new("tar")
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mtime=@0",
                "-C",
            ])
            .arg(dir)
            .arg("-cf")
            .arg(dest)
            .args(members),
    );
}

/// Where [`host_spec_with_busybox`] puts the busybox OCI archive in the image.
pub const BUSYBOX_ARCHIVE: &str = "/usr/lib/caisson/images/busybox.oci.tar";

/// `images/host.toml` with its lock and files copied into `dir`, the busybox OCI archive added
/// at [`BUSYBOX_ARCHIVE`], `exec` on the control channel turned on ([`debug_files`]) and `extra`
/// TOML appended; returns the spec's path. More files can
/// go under `dir/host/files` before the build.
pub fn host_spec_with_busybox(dir: &Path, extra: &str) -> String {
    let ws = workspace();
    let files = dir.join("host/files");
    std::fs::create_dir_all(dir.join("host")).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(ws.join("images/host/files"))
            .arg(&files),
    );
    std::fs::copy(ws.join("images/host.lock"), dir.join("host.lock")).unwrap();
    let archive = BUSYBOX_ARCHIVE.trim_start_matches('/');
    busybox_archive(dir, &files.join(archive));
    let spec = std::fs::read_to_string(ws.join("images/host.toml")).unwrap()
        + &format!("\n[[files]]\nsrc = \"{archive}\"\ndst = \"{BUSYBOX_ARCHIVE}\"\n")
        + &debug_files(&files)
        + extra;
    let path = dir.join("host.toml");
    std::fs::write(&path, spec).unwrap();
    path.display().to_string()
}

/// An OCI archive (`caisson.test/busybox:1`) of one layer: the build host's /bin/busybox, with
/// /bin/sh and /bin/sleep linked to it (Debian's busybox-static, which ci/deps installs).
pub fn busybox_archive(work: &Path, dest: &Path) {
    let layer_dir = work.join("layer");
    std::fs::create_dir_all(layer_dir.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", layer_dir.join("bin/busybox")).unwrap();
    for l in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", layer_dir.join("bin").join(l)).unwrap();
    }
    let layer_tar = work.join("layer.tar");
    tar(&layer_dir, &layer_tar, &["bin"]);
    let layer = std::fs::read(&layer_tar).unwrap();
    let l = digest(&layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["{l}"]}}}}"#
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{l}","size":{}}}]}}"#,
        digest(config.as_bytes()),
        config.len(),
        layer.len()
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"caisson.test/busybox:1"}}}}]}}"#,
        digest(manifest.as_bytes()),
        manifest.len()
    );
    let oci = work.join("oci");
    let blobs = oci.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for b in [layer.as_slice(), config.as_bytes(), manifest.as_bytes()] {
        std::fs::write(blobs.join(&digest(b)[7..]), b).unwrap();
    }
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(oci.join("index.json"), index).unwrap();
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    tar(&oci, dest, &["oci-layout", "index.json", "blobs"]);
}
