//! The system calls the init makes, behind a trait (youki's `Syscall` is the model): [`Real`] makes
//! them through `rustix` (and `libc` where rustix has no wrapper), [`Recording`] records them so
//! stage ordering, the supervisor and shutdown run in plain `cargo test`.
//!
//! This module (with [`spawn`], how services start) and [`crate::dm`] are the only places with
//! `unsafe`.

use crate::dm;
use caisson_layout::verity::VerityParams;
use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

pub use rustix::mount::MountFlags;

mod spawn;

/// A process id.
pub type Pid = i32;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It called exit with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    /// True for `exit(0)`.
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// What `reboot(2)` should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Reboot,
    PowerOff,
}

/// Signals the init sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Term,
    Kill,
}

impl Sig {
    fn number(self) -> i32 {
        match self {
            Sig::Term => libc::SIGTERM,
            Sig::Kill => libc::SIGKILL,
        }
    }
}

/// Everything needed to start a service process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecPlan {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The `cgroup.procs` file the child joins before it executes.
    pub cgroup_procs: Option<PathBuf>,
    pub oom_score_adj: Option<i32>,
    /// Capture stdout and stderr into one pipe (the log pump reads it).
    pub capture_output: bool,
}

/// A started process.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    /// The read end of its stdout+stderr pipe, when captured.
    pub output: Option<File>,
}

/// The system calls of the init.
pub trait Syscall: Send + Sync {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()>;
    /// Remount an existing mount read-only.
    fn remount_ro(&self, target: &Path) -> io::Result<()>;
    /// Make a mount and everything below it shared (mount propagation).
    fn make_rshared(&self, target: &Path) -> io::Result<()>;
    fn unmount(&self, target: &Path, detach: bool) -> io::Result<()>;
    /// `mount --move`.
    fn move_mount(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn chdir(&self, path: &Path) -> io::Result<()>;
    fn chroot(&self, path: &Path) -> io::Result<()>;
    /// `finit_module`; `.ko.xz` and `.ko.zst` are handed to the kernel compressed.
    fn load_module(&self, path: &Path) -> io::Result<()>;
    /// Set up the dm-verity device `name` over `device`; returns its minor (`/dev/dm-<minor>`).
    fn verity_setup(&self, name: &str, device: &Path, params: &VerityParams) -> io::Result<u32>;
    fn reboot(&self, how: Power) -> io::Result<()>;
    /// Make ctrl-alt-del send SIGINT to PID 1 instead of rebooting at once.
    fn disable_ctrl_alt_del(&self) -> io::Result<()>;
    /// `kill(2)`; `pid` -1 is every process but the init.
    fn kill(&self, pid: Pid, sig: Sig) -> io::Result<()>;
    /// `waitpid(-1, WNOHANG)`: one exited child, or `None` when none is waiting.
    fn reap_one(&self) -> io::Result<Option<(Pid, Exit)>>;
    fn sethostname(&self, name: &str) -> io::Result<()>;
    fn sync(&self);
    /// Bring the loopback interface up.
    fn loopback_up(&self) -> io::Result<()>;
    /// Start a process. The caller holds the reaper's spawn lock (see [`crate::reaper`]).
    fn spawn(&self, plan: &ExecPlan) -> io::Result<Spawned>;
    /// Replace this process with `program`; returns only on failure.
    fn exec(&self, program: &Path) -> io::Error;
}

/// The real system calls.
#[derive(Debug, Default)]
pub struct Real;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// `MODULE_INIT_COMPRESSED_FILE` from `<linux/module.h>`.
const MODULE_INIT_COMPRESSED_FILE: i32 = 4;

impl Syscall for Real {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()> {
        let data = cstr(data)?;
        rustix::mount::mount(source, target, fstype, flags, data.as_c_str())?;
        Ok(())
    }

    fn remount_ro(&self, target: &Path) -> io::Result<()> {
        rustix::mount::mount_remount(target, MountFlags::RDONLY, "")?;
        Ok(())
    }

    fn make_rshared(&self, target: &Path) -> io::Result<()> {
        use rustix::mount::MountPropagationFlags as P;
        rustix::mount::mount_change(target, P::SHARED | P::REC)?;
        Ok(())
    }

    fn unmount(&self, target: &Path, detach: bool) -> io::Result<()> {
        let flags = if detach {
            rustix::mount::UnmountFlags::DETACH
        } else {
            rustix::mount::UnmountFlags::empty()
        };
        rustix::mount::unmount(target, flags)?;
        Ok(())
    }

    fn move_mount(&self, from: &Path, to: &Path) -> io::Result<()> {
        rustix::mount::mount_move(from, to)?;
        Ok(())
    }

    fn chdir(&self, path: &Path) -> io::Result<()> {
        rustix::process::chdir(path)?;
        Ok(())
    }

    fn chroot(&self, path: &Path) -> io::Result<()> {
        rustix::process::chroot(path)?;
        Ok(())
    }

    fn load_module(&self, path: &Path) -> io::Result<()> {
        let file = File::open(path)?;
        let name = path.as_os_str().as_bytes();
        let flags = if name.ends_with(b".xz") || name.ends_with(b".zst") || name.ends_with(b".gz") {
            MODULE_INIT_COMPRESSED_FILE
        } else {
            0
        };
        match rustix::system::finit_module(&file, c"", flags) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::EXIST) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn verity_setup(&self, name: &str, device: &Path, params: &VerityParams) -> io::Result<u32> {
        dm::create_verity(name, device, params).map_err(io::Error::other)
    }

    fn reboot(&self, how: Power) -> io::Result<()> {
        let cmd = match how {
            Power::Reboot => rustix::system::RebootCommand::Restart,
            Power::PowerOff => rustix::system::RebootCommand::PowerOff,
        };
        rustix::system::reboot(cmd)?;
        Ok(())
    }

    fn disable_ctrl_alt_del(&self) -> io::Result<()> {
        rustix::system::reboot(rustix::system::RebootCommand::CadOff)?;
        Ok(())
    }

    fn kill(&self, pid: Pid, sig: Sig) -> io::Result<()> {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        let r = unsafe { libc::kill(pid, sig.number()) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn reap_one(&self) -> io::Result<Option<(Pid, Exit)>> {
        use rustix::process::{wait, WaitOptions};
        // `wait` is waitpid(-1): any child. (rustix's `waitpid(None)` is waitpid(0): only our
        // process group, which misses services, since each runs in its own session.)
        match wait(WaitOptions::NOHANG) {
            Ok(Some((pid, status))) => {
                let raw = std::process::ExitStatus::from_raw(status.as_raw());
                let exit = match (raw.code(), raw.signal()) {
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(s)) => Exit::Signal(s),
                    (None, None) => Exit::Code(-1),
                };
                Ok(Some((pid.as_raw_nonzero().get(), exit)))
            }
            Ok(None) => Ok(None),
            Err(rustix::io::Errno::CHILD) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn sethostname(&self, name: &str) -> io::Result<()> {
        rustix::system::sethostname(name.as_bytes())?;
        Ok(())
    }

    fn sync(&self) {
        rustix::fs::sync();
    }

    fn loopback_up(&self) -> io::Result<()> {
        interface_up("lo")
    }

    fn spawn(&self, plan: &ExecPlan) -> io::Result<Spawned> {
        spawn::spawn(plan)
    }

    fn exec(&self, program: &Path) -> io::Error {
        Command::new(program).exec()
    }
}

/// `SIOCGIFFLAGS` / `SIOCSIFFLAGS` with `IFF_UP` on an `AF_INET` datagram socket.
fn interface_up(name: &str) -> io::Result<()> {
    let sock = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: `req` is a valid, initialised ifreq that outlives the call; SIOCGIFFLAGS writes
    // only `ifr_flags` inside it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS just initialised the `ifru_flags` member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Ignore SIGPIPE (the binary starts without the standard runtime's set-up, see `main.rs`).
pub fn ignore_sigpipe() {
    // SAFETY: installing SIG_IGN for SIGPIPE involves no handler code and no shared state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Block the signals PID1 handles, so that the signal thread receives them through
/// [`wait_signal`]. Call before any thread starts: threads inherit the mask.
pub fn block_signals(signals: &[i32]) -> io::Result<()> {
    let set = sigset(signals);
    // SAFETY: `set` is an initialised sigset_t; the old mask is not requested.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain old data; sigemptyset initialises it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: as above; an invalid signal number only makes sigaddset fail.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Wait for one of `signals` (which must be blocked).
pub fn wait_signal(signals: &[i32]) -> io::Result<i32> {
    let set = sigset(signals);
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` and `sig` are valid for the duration of the call.
    let r = unsafe { libc::sigwait(&set, &mut sig) };
    if r == 0 {
        Ok(sig)
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// When stage 2 began (its first instruction, as near as Rust allows).
static STAGE2_STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Records that stage 2 begins now (its first call; later calls change nothing).
pub fn mark_stage2_start() {
    let _ = STAGE2_STARTED.set(std::time::Instant::now());
}

/// When stage 2 began, once it has (`None` in stage 1 and in tests).
pub fn stage2_started() -> Option<std::time::Instant> {
    STAGE2_STARTED.get().copied()
}

/// Milliseconds since stage 2 began, once it has (`None` in stage 1 and in tests).
pub fn elapsed_ms() -> Option<u128> {
    stage2_started().map(|t| t.elapsed().as_millis())
}

/// Milliseconds since the kernel started (`CLOCK_BOOTTIME`).
pub fn boot_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    (t.tv_sec as u64) * 1000 + (t.tv_nsec as u64) / 1_000_000
}

/// One recorded system call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mount {
        source: String,
        target: String,
        fstype: String,
        ro: bool,
        data: String,
    },
    RemountRo(String),
    MakeRshared(String),
    Unmount(String),
    Move {
        from: String,
        to: String,
    },
    Chdir(String),
    Chroot(String),
    LoadModule(String),
    Verity {
        name: String,
        device: String,
    },
    Reboot(Power),
    DisableCad,
    Kill(Pid, Sig),
    Sethostname(String),
    Sync,
    LoopbackUp,
    Spawn(String),
    Exec(String),
}

/// A fake that records every call and succeeds, except where told to fail. Paths are recorded
/// relative to `root` (so `<tmp>/sysroot` is recorded as `/sysroot`).
#[derive(Debug, Default)]
pub struct Recording {
    root: PathBuf,
    calls: Mutex<Vec<Call>>,
    exits: Mutex<VecDeque<(Pid, Exit)>>,
    next_pid: AtomicI32,
    fail: Mutex<Vec<String>>,
}

impl Recording {
    pub fn new(root: &Path) -> Self {
        Recording {
            root: root.to_path_buf(),
            next_pid: AtomicI32::new(100),
            ..Default::default()
        }
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Make calls whose debug text contains `needle` fail with EIO.
    pub fn fail_on(&self, needle: &str) {
        if let Ok(mut f) = self.fail.lock() {
            f.push(needle.to_string());
        }
    }

    /// The pid the next `spawn` hands out (then counting up from it), to play a recycled pid.
    pub fn set_next_pid(&self, pid: Pid) {
        self.next_pid.store(pid, Ordering::SeqCst);
    }

    /// Queue an exit for `reap_one` to return.
    pub fn push_exit(&self, pid: Pid, exit: Exit) {
        if let Ok(mut e) = self.exits.lock() {
            e.push_back((pid, exit));
        }
    }

    fn rel(&self, p: &Path) -> String {
        let r = p.strip_prefix(&self.root).unwrap_or(p);
        let s = r.to_string_lossy();
        if s.starts_with('/') {
            s.into_owned()
        } else {
            format!("/{s}")
        }
    }

    fn record(&self, call: Call) -> io::Result<()> {
        let text = format!("{call:?}");
        if let Ok(mut c) = self.calls.lock() {
            c.push(call);
        }
        let fails = self
            .fail
            .lock()
            .map(|f| f.iter().any(|n| text.contains(n.as_str())));
        if fails.unwrap_or(false) {
            return Err(io::Error::other(format!("injected failure: {text}")));
        }
        Ok(())
    }
}

impl Syscall for Recording {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()> {
        self.record(Call::Mount {
            source: source.replace(&*self.root.to_string_lossy(), ""),
            target: self.rel(target),
            fstype: fstype.to_string(),
            ro: flags.contains(MountFlags::RDONLY),
            data: data.replace(&*self.root.to_string_lossy(), ""),
        })
    }
    fn remount_ro(&self, target: &Path) -> io::Result<()> {
        self.record(Call::RemountRo(self.rel(target)))
    }
    fn make_rshared(&self, target: &Path) -> io::Result<()> {
        self.record(Call::MakeRshared(self.rel(target)))
    }
    fn unmount(&self, target: &Path, _detach: bool) -> io::Result<()> {
        self.record(Call::Unmount(self.rel(target)))
    }
    fn move_mount(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.record(Call::Move {
            from: self.rel(from),
            to: self.rel(to),
        })
    }
    fn chdir(&self, path: &Path) -> io::Result<()> {
        self.record(Call::Chdir(self.rel(path)))
    }
    fn chroot(&self, path: &Path) -> io::Result<()> {
        self.record(Call::Chroot(self.rel(path)))
    }
    fn load_module(&self, path: &Path) -> io::Result<()> {
        self.record(Call::LoadModule(self.rel(path)))
    }
    fn verity_setup(&self, name: &str, device: &Path, _params: &VerityParams) -> io::Result<u32> {
        self.record(Call::Verity {
            name: name.to_string(),
            device: self.rel(device),
        })?;
        Ok(0)
    }
    fn reboot(&self, how: Power) -> io::Result<()> {
        self.record(Call::Reboot(how))
    }
    fn disable_ctrl_alt_del(&self) -> io::Result<()> {
        self.record(Call::DisableCad)
    }
    fn kill(&self, pid: Pid, sig: Sig) -> io::Result<()> {
        self.record(Call::Kill(pid, sig))
    }
    fn reap_one(&self) -> io::Result<Option<(Pid, Exit)>> {
        Ok(self.exits.lock().ok().and_then(|mut e| e.pop_front()))
    }
    fn sethostname(&self, name: &str) -> io::Result<()> {
        self.record(Call::Sethostname(name.to_string()))
    }
    fn sync(&self) {
        let _ = self.record(Call::Sync);
    }
    fn loopback_up(&self) -> io::Result<()> {
        self.record(Call::LoopbackUp)
    }
    fn spawn(&self, plan: &ExecPlan) -> io::Result<Spawned> {
        self.record(Call::Spawn(plan.program.to_string_lossy().into_owned()))?;
        Ok(Spawned {
            pid: self.next_pid.fetch_add(1, Ordering::SeqCst),
            output: None,
        })
    }
    fn exec(&self, program: &Path) -> io::Error {
        match self.record(Call::Exec(self.rel(program))) {
            Err(e) => e,
            Ok(()) => io::Error::other("exec recorded (fake)"),
        }
    }
}
