//! Launching QEMU: options, the command line, and the [`Vm`] handle.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use caisson_layout::paths::VIRTIO_CONTROL_PORT;
use serde_json::Value;

use crate::channel::Control;
use crate::console::{Console, Pattern};
use crate::network::NetAttachment;
use crate::overlay::{create_overlay, DiskFormat};
use crate::QemuError;

/// The address the guest uses to reach the host's loopback under user-mode networking:
/// slirp's default gateway. A guest connection to `10.0.2.2:PORT` arrives at `127.0.0.1:PORT`
/// on the host (unless [`UserNet::restrict`] is set).
pub const HOST_FROM_GUEST: &str = "10.0.2.2";

/// How many console lines an error shows.
const TAIL_LINES: usize = 30;
/// How often the console and the process are polled.
const POLL: Duration = Duration::from_millis(50);

/// Where the host tools and the firmware are; each can be overridden (tests point at missing ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuPaths {
    /// `qemu-system-x86_64`, looked up in `PATH` when it has no `/`.
    pub qemu_system: PathBuf,
    /// `qemu-img`, looked up in `PATH` when it has no `/`.
    pub qemu_img: PathBuf,
    /// OVMF code, mapped read-only.
    pub ovmf_code: PathBuf,
    /// OVMF variables template, copied for every VM.
    pub ovmf_vars: PathBuf,
}

impl Default for QemuPaths {
    fn default() -> Self {
        QemuPaths {
            qemu_system: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            ovmf_code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            ovmf_vars: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
        }
    }
}

/// The accelerator. TCG is the default: KVM guests hang on the project's build machines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Accel {
    #[default]
    Tcg,
    Kvm,
}

/// How a disk is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiskMode {
    /// Through a qcow2 overlay in the VM's temporary directory: the file never changes.
    #[default]
    Overlay,
    /// The file itself: writes land in it. For state that must survive several boots, create an
    /// overlay yourself with [`crate::create_overlay`] and attach it directly each boot.
    Direct,
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    /// Detected from the file's first bytes when `None`.
    pub format: Option<DiskFormat>,
    pub mode: DiskMode,
}

impl Disk {
    /// A disk seen through a throw-away copy-on-write overlay.
    pub fn overlay(path: impl Into<PathBuf>) -> Disk {
        Disk {
            path: path.into(),
            format: None,
            mode: DiskMode::Overlay,
        }
    }

    /// A disk written in place.
    pub fn direct(path: impl Into<PathBuf>) -> Disk {
        Disk {
            path: path.into(),
            format: None,
            mode: DiskMode::Direct,
        }
    }
}

/// The content of a fw_cfg entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FwCfgValue {
    File(PathBuf),
    String(String),
}

/// User-mode (slirp) networking: the guest reaches the host as [`HOST_FROM_GUEST`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserNet {
    /// TCP forwards `(host port, guest port)`: `127.0.0.1:host` on the host reaches the guest's port.
    pub forwards: Vec<(u16, u16)>,
    /// Cut the guest off from everything but the forwards (slirp `restrict=on`).
    pub restrict: bool,
}

/// A kernel the firmware starts itself (QEMU's `-kernel`), instead of the boot disk's boot loader:
/// for a test that needs its own kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectKernel {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

/// Everything [`Vm::launch`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOptions {
    /// The boot disk (bootindex 0).
    pub disk: Disk,
    pub extra_disks: Vec<Disk>,
    pub memory_mib: u64,
    pub smp: u32,
    pub accel: Accel,
    /// `None` leaves the VM without user-mode networking.
    pub user_net: Option<UserNet>,
    /// NICs on private virtual networks, see [`crate::VirtualNetwork`].
    pub networks: Vec<NetAttachment>,
    /// fw_cfg entries, e.g. `("opt/caisson/config", FwCfgValue::File(..))`.
    pub fw_cfg: Vec<(String, FwCfgValue)>,
    pub paths: QemuPaths,
    /// Appended to QEMU's command line as they are.
    pub extra_args: Vec<OsString>,
    /// Boot this kernel rather than the disk's boot loader (the disk then has no boot index).
    pub kernel: Option<DirectKernel>,
    /// How long QEMU may take to open its QMP socket.
    pub start_timeout: Duration,
}

impl VmOptions {
    /// 1 GiB, 2 CPUs, TCG, user-mode networking without forwards, the image behind an overlay.
    pub fn new(image: impl Into<PathBuf>) -> VmOptions {
        VmOptions {
            disk: Disk::overlay(image),
            extra_disks: Vec::new(),
            memory_mib: 1024,
            smp: 2,
            accel: Accel::Tcg,
            user_net: Some(UserNet::default()),
            networks: Vec::new(),
            fw_cfg: Vec::new(),
            paths: QemuPaths::default(),
            extra_args: Vec::new(),
            kernel: None,
            start_timeout: Duration::from_secs(30),
        }
    }
}

/// Options for [`run_interactive`] (`caisson run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    pub memory_mib: u64,
    pub smp: u32,
    /// TCP forwards `(host port, guest port)` on host loopback.
    pub forwards: Vec<(u16, u16)>,
    pub accel: Accel,
    pub paths: QemuPaths,
    /// fw_cfg entries, e.g. the machine config (`opt/caisson/config`).
    pub fw_cfg: Vec<(String, FwCfgValue)>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            memory_mib: 1024,
            smp: 2,
            forwards: Vec::new(),
            accel: Accel::Tcg,
            paths: QemuPaths::default(),
            fw_cfg: Vec::new(),
        }
    }
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Serial {
    File(PathBuf),
    /// The terminal, multiplexed with the monitor (ctrl-a x quits).
    Stdio,
}

/// A resolved plan: every path exists, every overlay is made. Turned into arguments by [`Plan::args`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    ovmf_code: PathBuf,
    ovmf_vars: PathBuf,
    /// `(path, format)`, boot disk first.
    disks: Vec<(PathBuf, DiskFormat)>,
    memory_mib: u64,
    smp: u32,
    accel: Accel,
    user_net: Option<UserNet>,
    networks: Vec<NetAttachment>,
    fw_cfg: Vec<(String, FwCfgValue)>,
    serial: Serial,
    qmp: Option<PathBuf>,
    control: Option<PathBuf>,
    kernel: Option<DirectKernel>,
    extra_args: Vec<OsString>,
}

/// Doubles commas, QEMU's escape inside option values.
fn esc(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

impl Plan {
    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<String> = vec![
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-machine".into(),
            "q35".into(),
            "-display".into(),
            "none".into(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-smp".into(),
            self.smp.to_string(),
        ];
        match self.accel {
            Accel::Tcg => a.extend(["-accel", "tcg", "-cpu", "max"].map(String::from)),
            Accel::Kvm => a.extend(["-accel", "kvm", "-cpu", "host"].map(String::from)),
        }
        a.push("-drive".into());
        a.push(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            esc(&self.ovmf_code)
        ));
        a.push("-drive".into());
        a.push(format!(
            "if=pflash,format=raw,unit=1,file={}",
            esc(&self.ovmf_vars)
        ));
        for (i, (path, format)) in self.disks.iter().enumerate() {
            a.push("-drive".into());
            a.push(format!(
                "if=none,id=disk{i},format={},file={}",
                format.as_str(),
                esc(path)
            ));
            a.push("-device".into());
            a.push(if i == 0 && self.kernel.is_none() {
                // A boot index keeps OVMF from trying PXE on the NICs before its shell.
                format!("virtio-blk-pci,drive=disk{i},serial=caisson-disk{i},bootindex=0")
            } else {
                format!("virtio-blk-pci,drive=disk{i},serial=caisson-disk{i}")
            });
        }
        if let Some(net) = &self.user_net {
            let mut netdev = "user,id=net0".to_string();
            if net.restrict {
                netdev.push_str(",restrict=on");
            }
            for (host, guest) in &net.forwards {
                netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
            }
            a.extend(["-netdev".into(), netdev, "-device".into()]);
            a.push("virtio-net-pci,netdev=net0,romfile=".into());
        }
        for (i, n) in self.networks.iter().enumerate() {
            a.push("-netdev".into());
            a.push(format!(
                "socket,id=vnet{i},udp={},localaddr={}",
                n.hub, n.local
            ));
            a.push("-device".into());
            a.push(format!(
                "virtio-net-pci,netdev=vnet{i},mac={},romfile=",
                n.mac
            ));
        }
        for (name, value) in &self.fw_cfg {
            a.push("-fw_cfg".into());
            a.push(match value {
                FwCfgValue::File(p) => format!("name={},file={}", name, esc(p)),
                FwCfgValue::String(s) => format!("name={},string={}", name, s.replace(',', ",,")),
            });
        }
        a.extend(["-device", "virtio-rng-pci"].map(String::from));
        match &self.serial {
            Serial::File(p) => {
                a.push("-chardev".into());
                a.push(format!("file,id=serial0,path={}", esc(p)));
                a.extend(["-serial", "chardev:serial0"].map(String::from));
            }
            Serial::Stdio => a.extend(["-serial", "mon:stdio"].map(String::from)),
        }
        if let Some(q) = &self.qmp {
            a.push("-qmp".into());
            a.push(format!("unix:{},server=on,wait=off", esc(q)));
        }
        if let Some(c) = &self.control {
            a.push("-device".into());
            a.push("virtio-serial-pci,id=vser0".into());
            a.push("-chardev".into());
            a.push(format!("socket,id=ctl,path={},server=on,wait=off", esc(c)));
            a.push("-device".into());
            a.push(format!(
                "virtserialport,bus=vser0.0,chardev=ctl,name={VIRTIO_CONTROL_PORT}"
            ));
        }
        let mut out: Vec<OsString> = a.into_iter().map(OsString::from).collect();
        if let Some(k) = &self.kernel {
            out.extend([
                "-kernel".into(),
                k.kernel.clone().into(),
                "-initrd".into(),
                k.initrd.clone().into(),
                "-append".into(),
                k.cmdline.clone().into(),
            ]);
        }
        out.extend(self.extra_args.iter().cloned());
        out
    }
}

/// Finds a program: a path with `/` as it is, otherwise the first match in `PATH`.
fn find_program(
    program: &Path,
    what: &'static str,
    package: &'static str,
) -> Result<PathBuf, QemuError> {
    let missing = || QemuError::Missing {
        what,
        path: program.to_path_buf(),
        package,
    };
    if program.components().count() > 1 || program.is_absolute() {
        return if program.is_file() {
            Ok(program.to_path_buf())
        } else {
            Err(missing())
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .ok_or_else(missing)
}

fn need_file(path: &Path, what: &'static str, package: &'static str) -> Result<(), QemuError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(QemuError::Missing {
            what,
            path: path.to_path_buf(),
            package,
        })
    }
}

/// What [`prepare`] found and made.
struct Prepared {
    qemu: PathBuf,
    vars: PathBuf,
    disks: Vec<(PathBuf, DiskFormat)>,
}

/// Checks the tools and firmware, copies the OVMF variables and makes the overlays in `dir`.
fn prepare(paths: &QemuPaths, disks: &[&Disk], dir: &Path) -> Result<Prepared, QemuError> {
    let qemu = find_program(&paths.qemu_system, "qemu-system-x86_64", "qemu-system-x86")?;
    need_file(&paths.ovmf_code, "OVMF firmware", "ovmf")?;
    need_file(&paths.ovmf_vars, "OVMF variables", "ovmf")?;
    let vars = dir.join("OVMF_VARS.fd");
    std::fs::copy(&paths.ovmf_vars, &vars)
        .map_err(QemuError::io("copy OVMF variables to", &vars))?;
    let qemu_img = if disks.iter().any(|d| d.mode == DiskMode::Overlay) {
        Some(find_program(&paths.qemu_img, "qemu-img", "qemu-utils")?)
    } else {
        None
    };
    let mut resolved = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        let format = match disk.format {
            Some(f) => f,
            None => DiskFormat::detect(&disk.path)?,
        };
        match (disk.mode, &qemu_img) {
            (DiskMode::Overlay, Some(img)) => {
                let overlay = dir.join(format!("disk{i}.qcow2"));
                create_overlay(img, &disk.path, format, &overlay)?;
                resolved.push((overlay, DiskFormat::Qcow2));
            }
            _ => {
                need_file(&disk.path, "disk image", "(none: build the image first)")?;
                resolved.push((disk.path.clone(), format));
            }
        }
    }
    Ok(Prepared {
        qemu,
        vars,
        disks: resolved,
    })
}

/// A QEMU child process that is killed and reaped when dropped.
#[derive(Debug)]
struct Process {
    child: Child,
    status: Option<ExitStatus>,
}

impl Process {
    fn poll(&mut self) -> Result<Option<ExitStatus>, QemuError> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(QemuError::io(
                "wait for",
                format!("QEMU pid {}", self.child.id()),
            ))?;
        }
        Ok(self.status)
    }

    fn kill(&mut self) -> Result<ExitStatus, QemuError> {
        if let Some(s) = self.poll()? {
            return Ok(s);
        }
        let pid = self.child.id();
        // It may exit between poll and kill; wait tells.
        let _ = self.child.kill();
        let s = self
            .child
            .wait()
            .map_err(QemuError::io("reap", format!("QEMU pid {pid}")))?;
        self.status = Some(s);
        Ok(s)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            log::warn!("stopping QEMU: {e}");
        }
    }
}

/// When a test panics with a VM alive, its console is kept at
/// `<temp dir>/<vm dir name>-console.log` and the path is printed with the last lines, so a
/// failure in CI shows what the guest said.
impl Drop for Vm {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let name = self
            .dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "caisson-vm".into());
        let kept = std::env::temp_dir().join(format!("{name}-console.log"));
        let copied = std::fs::copy(self.console.path(), &kept);
        let tail = self.console_tail(40).unwrap_or_default();
        match copied {
            Ok(_) => eprintln!("VM console kept at {}; its last lines:", kept.display()),
            Err(e) => eprintln!("keeping the VM console failed ({e}); its last lines:"),
        }
        eprintln!("{tail}");
    }
}

/// A running VM. Dropping it kills QEMU and removes its temporary directory.
#[derive(Debug)]
pub struct Vm {
    // Declared first so QEMU dies before its directory goes.
    process: Process,
    qmp: crate::qmp::Qmp,
    console: Console,
    control_path: PathBuf,
    disk_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Vm {
    /// Starts QEMU headless and connects QMP. The console goes to `console.log` in [`Vm::dir`].
    pub fn launch(opts: VmOptions) -> Result<Vm, QemuError> {
        let dir = tempfile::Builder::new()
            .prefix("caisson-vm-")
            .tempdir()
            .map_err(QemuError::io(
                "create a temporary directory in",
                std::env::temp_dir(),
            ))?;
        let disks: Vec<&Disk> = std::iter::once(&opts.disk)
            .chain(opts.extra_disks.iter())
            .collect();
        let Prepared { qemu, vars, disks } = prepare(&opts.paths, &disks, dir.path())?;
        let console_path = dir.path().join("console.log");
        let qmp_path = dir.path().join("qmp.sock");
        let control_path = dir.path().join("control.sock");
        let disk_path = disks.first().map(|d| d.0.clone()).unwrap_or_default();
        let plan = Plan {
            ovmf_code: opts.paths.ovmf_code.clone(),
            ovmf_vars: vars,
            disks,
            memory_mib: opts.memory_mib,
            smp: opts.smp,
            accel: opts.accel,
            user_net: opts.user_net.clone(),
            networks: opts.networks.clone(),
            fw_cfg: opts.fw_cfg.clone(),
            serial: Serial::File(console_path.clone()),
            qmp: Some(qmp_path.clone()),
            control: Some(control_path.clone()),
            kernel: opts.kernel.clone(),
            extra_args: opts.extra_args.clone(),
        };
        let stderr_path = dir.path().join("qemu.stderr");
        let stderr = File::create(&stderr_path).map_err(QemuError::io("create", &stderr_path))?;
        let mut cmd = Command::new(&qemu);
        cmd.args(plan.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        log::debug!("launching {cmd:?}");
        let child = cmd.spawn().map_err(|e| QemuError::Command {
            command: format!("{cmd:?}"),
            message: e.to_string(),
        })?;
        let mut process = Process {
            child,
            status: None,
        };
        let qmp = connect_qmp(&mut process, &qmp_path, &stderr_path, opts.start_timeout)?;
        Ok(Vm {
            process,
            qmp,
            console: Console::new(&console_path),
            control_path,
            disk_path,
            dir,
        })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// The VM's private temporary directory (console log, sockets, overlays, OVMF variables).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file QEMU uses as the boot disk: the overlay, or the disk itself in direct mode.
    pub fn disk_path(&self) -> &Path {
        &self.disk_path
    }

    /// The console log file.
    pub fn console_path(&self) -> &Path {
        self.console.path()
    }

    /// The host end of the virtio-serial control port.
    pub fn control_socket(&self) -> &Path {
        &self.control_path
    }

    /// Waits until a console line after the previous match matches `pattern`, and returns it
    /// (cleaned of escape sequences). Fails on timeout or when QEMU exits first, with the last
    /// console lines in the error.
    pub fn wait_for(
        &mut self,
        pattern: impl Into<Pattern>,
        timeout: Duration,
    ) -> Result<String, QemuError> {
        let pattern = pattern.into();
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.process.poll()?;
            self.console.refresh()?;
            if let Some(line) = self.console.find(&pattern) {
                return Ok(line);
            }
            if let Some(status) = exited {
                return Err(QemuError::ExitedBeforePattern {
                    pattern: pattern.to_string(),
                    status,
                    tail: self.console.tail(TAIL_LINES),
                });
            }
            if Instant::now() >= deadline {
                return Err(QemuError::ConsoleTimeout {
                    pattern: pattern.to_string(),
                    timeout,
                    tail: self.console.tail(TAIL_LINES),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// The whole console so far, cleaned of escape sequences.
    pub fn console_text(&mut self) -> Result<String, QemuError> {
        self.console.refresh()?;
        Ok(self.console.text())
    }

    /// The last `n` console lines.
    pub fn console_tail(&mut self, n: usize) -> Result<String, QemuError> {
        self.console.refresh()?;
        Ok(self.console.tail(n))
    }

    /// Runs any QMP command and returns its `return` value.
    pub fn qmp(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QemuError> {
        self.qmp.execute(command, arguments)
    }

    /// QMP events (SHUTDOWN, RESET, POWERDOWN, ...) received so far; the list is emptied.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.qmp.take_events()
    }

    /// Presses the ACPI power button; the guest decides what to do. See [`Vm::wait_exit`].
    pub fn powerdown(&mut self) -> Result<(), QemuError> {
        self.qmp("system_powerdown", None).map(drop)
    }

    /// Resets the machine, like the reset button.
    pub fn reset(&mut self) -> Result<(), QemuError> {
        self.qmp("system_reset", None).map(drop)
    }

    /// Asks QEMU to quit at once (the guest gets no say) and waits for it.
    pub fn quit(&mut self) -> Result<ExitStatus, QemuError> {
        match self.qmp.execute("quit", None) {
            Ok(_) => {}
            // QEMU may close the socket before it answers; wait_exit tells whether it quit.
            Err(QemuError::Qmp { .. }) => {}
            Err(e) => return Err(e),
        }
        self.wait_exit(Duration::from_secs(10))
    }

    /// Kills QEMU with SIGKILL, a power cut: nothing is flushed.
    pub fn kill(&mut self) -> Result<ExitStatus, QemuError> {
        self.process.kill()
    }

    /// Waits for QEMU to exit, e.g. after the guest powered off.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.process.poll()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(QemuError::ExitTimeout {
                    pid: self.pid(),
                    timeout,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// QEMU's exit status, if it has exited.
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>, QemuError> {
        self.process.poll()
    }

    /// Connects to the guest's control port (virtio-serial).
    pub fn control(&self) -> Result<Control, QemuError> {
        Control::connect(&self.control_path)
    }
}

/// Waits for QEMU to open its QMP socket, then does the handshake.
fn connect_qmp(
    process: &mut Process,
    path: &Path,
    stderr_path: &Path,
    timeout: Duration,
) -> Result<crate::qmp::Qmp, QemuError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = process.poll()? {
            let stderr = std::fs::read_to_string(stderr_path).unwrap_or_default();
            return Err(QemuError::StartFailed {
                status,
                stderr: stderr.trim().to_string(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            // That probe connection is gone; QEMU accepts the next one.
            return crate::qmp::Qmp::connect(path);
        }
        if Instant::now() >= deadline {
            return Err(QemuError::StartTimeout {
                path: path.to_path_buf(),
                timeout,
            });
        }
        std::thread::sleep(POLL);
    }
}

/// Boots `image` for a person: the console on this terminal (ctrl-a x quits), the image behind
/// an overlay in a temporary directory. Returns QEMU's exit status.
pub fn run_interactive(image: &Path, opts: RunOptions) -> Result<ExitStatus, QemuError> {
    let dir = tempfile::Builder::new()
        .prefix("caisson-run-")
        .tempdir()
        .map_err(QemuError::io(
            "create a temporary directory in",
            std::env::temp_dir(),
        ))?;
    let disk = Disk::overlay(image);
    let Prepared { qemu, vars, disks } = prepare(&opts.paths, &[&disk], dir.path())?;
    let plan = Plan {
        ovmf_code: opts.paths.ovmf_code.clone(),
        ovmf_vars: vars,
        disks,
        memory_mib: opts.memory_mib,
        smp: opts.smp,
        accel: opts.accel,
        user_net: Some(UserNet {
            forwards: opts.forwards.clone(),
            restrict: false,
        }),
        networks: Vec::new(),
        fw_cfg: opts.fw_cfg.clone(),
        serial: Serial::Stdio,
        qmp: None,
        control: Some(dir.path().join("control.sock")),
        kernel: None,
        extra_args: Vec::new(),
    };
    eprintln!("{}", banner(image, &opts));
    let mut cmd = Command::new(&qemu);
    cmd.args(plan.args());
    let status = cmd.status().map_err(|e| QemuError::Command {
        command: format!("{cmd:?}"),
        message: e.to_string(),
    })?;
    Ok(status)
}

/// The one line `caisson run` prints before the console takes the terminal.
fn banner(image: &Path, opts: &RunOptions) -> String {
    let forwards = if opts.forwards.is_empty() {
        "no port forwards".to_string()
    } else {
        let list: Vec<String> = opts
            .forwards
            .iter()
            .map(|(h, g)| format!("127.0.0.1:{h} -> guest:{g}"))
            .collect();
        format!("forwards {}", list.join(", "))
    };
    format!(
        "Booting {} ({}, {} MiB, changes discarded); {forwards}; the guest reaches host loopback at {HOST_FROM_GUEST}. Quit: ctrl-a x",
        image.display(),
        match opts.accel {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        },
        opts.memory_mib
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            ovmf_code: "/fw/CODE.fd".into(),
            ovmf_vars: "/vm/VARS.fd".into(),
            disks: vec![
                ("/vm/disk0.qcow2".into(), DiskFormat::Qcow2),
                ("/data/a,b.raw".into(), DiskFormat::Raw),
            ],
            memory_mib: 2048,
            smp: 2,
            accel: Accel::Tcg,
            user_net: Some(UserNet {
                forwards: vec![(8080, 80), (2222, 22)],
                restrict: false,
            }),
            networks: vec![NetAttachment {
                hub: "127.0.0.1:4000".parse().unwrap(),
                local: "127.0.0.1:4001".parse().unwrap(),
                mac: "52:54:00:0f:a0:01".into(),
            }],
            fw_cfg: vec![(
                "opt/caisson/config".into(),
                FwCfgValue::File("/cfg/c.toml".into()),
            )],
            serial: Serial::File("/vm/console.log".into()),
            qmp: Some("/vm/qmp.sock".into()),
            control: Some("/vm/control.sock".into()),
            kernel: None,
            extra_args: vec!["-S".into()],
        }
    }

    fn joined(p: &Plan) -> String {
        p.args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_command_line_has_every_part() {
        let line = joined(&plan());
        for want in [
            "-machine q35",
            "-display none",
            "-m 2048M",
            "-smp 2",
            "-accel tcg -cpu max",
            "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd",
            "if=pflash,format=raw,unit=1,file=/vm/VARS.fd",
            "if=none,id=disk0,format=qcow2,file=/vm/disk0.qcow2",
            "virtio-blk-pci,drive=disk0,serial=caisson-disk0,bootindex=0",
            "if=none,id=disk1,format=raw,file=/data/a,,b.raw",
            "user,id=net0,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:2222-:22",
            "socket,id=vnet0,udp=127.0.0.1:4000,localaddr=127.0.0.1:4001",
            "mac=52:54:00:0f:a0:01",
            "-fw_cfg name=opt/caisson/config,file=/cfg/c.toml",
            "file,id=serial0,path=/vm/console.log",
            "-qmp unix:/vm/qmp.sock,server=on,wait=off",
            "socket,id=ctl,path=/vm/control.sock,server=on,wait=off",
            "name=org.caisson.ctl",
        ] {
            assert!(line.contains(want), "missing {want:?} in {line}");
        }
        assert!(line.ends_with(" -S"), "{line}");
        assert!(!line.contains("kvm"), "{line}");
    }

    #[test]
    fn kvm_interactive_and_no_network() {
        let mut p = plan();
        p.accel = Accel::Kvm;
        p.serial = Serial::Stdio;
        p.user_net = None;
        p.networks.clear();
        let line = joined(&p);
        assert!(line.contains("-accel kvm -cpu host"), "{line}");
        assert!(line.contains("-serial mon:stdio"), "{line}");
        assert!(!line.contains("netdev"), "{line}");
    }

    #[test]
    fn a_direct_kernel_takes_the_boot_index_from_the_disk() {
        let mut p = plan();
        p.kernel = Some(DirectKernel {
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/initrd".into(),
            cmdline: "console=ttyS0 a=b,c".into(),
        });
        let args: Vec<String> = p
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].clone()
        };
        assert_eq!(after("-kernel"), "/k/vmlinuz");
        assert_eq!(after("-initrd"), "/k/initrd");
        assert_eq!(after("-append"), "console=ttyS0 a=b,c");
        assert!(!args.iter().any(|a| a.contains("bootindex")), "{args:?}");
    }

    #[test]
    fn the_banner_says_how_to_quit_and_lists_forwards() {
        let opts = RunOptions {
            forwards: vec![(8080, 80)],
            ..Default::default()
        };
        let b = banner(Path::new("out/host.raw"), &opts);
        assert!(
            b.contains("ctrl-a x") && b.contains("127.0.0.1:8080 -> guest:80"),
            "{b}"
        );
        assert!(!b.contains('\n'));
    }

    #[test]
    fn missing_programs_name_their_package() {
        let err = find_program(
            Path::new("no-such-qemu-xyz"),
            "qemu-system-x86_64",
            "qemu-system-x86",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("qemu-system-x86") && err.contains("apt-get"),
            "{err}"
        );
        assert!(find_program(Path::new("sh"), "sh", "dash").is_ok());
    }
}
