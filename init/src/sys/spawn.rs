//! Starting a process without copying PID 1.
//!
//! `fork` copies PID 1's page tables (its heap, its threads' stacks, its mappings), and both
//! processes then take copy-on-write faults; under emulation that cost 10–50 ms per service on
//! the path to containerd. Here the child is created with `clone(CLONE_VM | CLONE_VFORK)`: it
//! shares PID 1's memory and runs on a small stack of its own until its `execve`, and the calling
//! thread sleeps until then (the other threads go on). This is how the C library's
//! `posix_spawn` works; it is done here because the child must join its cgroup, set its
//! `oom_score_adj` and start a session before it executes, which `posix_spawn` cannot do.
//!
//! The rules for the child, because it shares memory with a running multi-threaded process:
//! everything it touches is prepared before the clone, it allocates nothing, takes no lock and
//! makes only system calls (user and group changes are raw system calls: the C library's
//! wrappers would signal PID 1's threads to change theirs too). A failure is written into memory
//! the parent reads once the child has exited.

use super::{ExecPlan, Pid, Spawned};
use std::ffi::{c_char, c_int, c_void, CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

/// The child's stack: its deepest call is a system call wrapper a few frames down.
const STACK_BYTES: usize = 64 * 1024;

/// The step of the child that failed, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Step {
    Session = 1,
    Cgroup,
    OomScore,
    Stdio,
    Signals,
    Groups,
    Gid,
    Uid,
    Exec,
}

impl Step {
    fn from_u8(v: u8) -> Option<Step> {
        [
            Step::Session,
            Step::Cgroup,
            Step::OomScore,
            Step::Stdio,
            Step::Signals,
            Step::Groups,
            Step::Gid,
            Step::Uid,
            Step::Exec,
        ]
        .into_iter()
        .find(|s| *s as u8 == v)
    }

    fn what(self) -> &'static str {
        match self {
            Step::Session => "starting a session",
            Step::Cgroup => "joining its cgroup",
            Step::OomScore => "setting oom_score_adj",
            Step::Stdio => "setting up stdin, stdout and stderr",
            Step::Signals => "resetting signals",
            Step::Groups => "dropping supplementary groups",
            Step::Gid => "setting the group",
            Step::Uid => "setting the user",
            Step::Exec => "executing",
        }
    }
}

/// Everything the child reads, prepared by the parent; the two atomics are its answer.
struct Child<'a> {
    program: &'a CStr,
    /// Null-terminated.
    argv: &'a [*const c_char],
    /// Null-terminated.
    envp: &'a [*const c_char],
    stdin: RawFd,
    output: Option<RawFd>,
    cgroup_procs: Option<&'a CStr>,
    oom_score_adj: Option<&'a [u8]>,
    uid: Option<u32>,
    gid: Option<u32>,
    failed: AtomicU8,
    errno: AtomicI32,
}

/// Start `plan`'s program. On success the child has executed it; on failure the child has been
/// reaped and the error names the step that failed.
pub(super) fn spawn(plan: &ExecPlan) -> io::Result<Spawned> {
    let path = resolve(&plan.program, &plan.env)?;
    let program = cstring(path.as_os_str().as_bytes(), "the program path")?;
    let mut args = Vec::with_capacity(plan.args.len() + 1);
    args.push(cstring(
        plan.program.as_os_str().as_bytes(),
        "the program path",
    )?);
    for a in &plan.args {
        args.push(cstring(a.as_bytes(), "an argument")?);
    }
    let mut env = Vec::with_capacity(plan.env.len());
    for (k, v) in &plan.env {
        env.push(cstring(
            format!("{k}={v}").as_bytes(),
            "an environment variable",
        )?);
    }
    let argv = null_terminated(&args);
    let envp = null_terminated(&env);
    let stdin: OwnedFd = rustix::fs::open(
        c"/dev/null",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let pipe = if plan.capture_output {
        Some(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
    } else {
        None
    };
    let cgroup = plan
        .cgroup_procs
        .as_deref()
        .map(|p| cstring(p.as_os_str().as_bytes(), "the cgroup path"))
        .transpose()?;
    let oom = plan.oom_score_adj.map(|v| format!("{v}\n").into_bytes());
    let child = Child {
        program: &program,
        argv: &argv,
        envp: &envp,
        stdin: stdin.as_raw_fd(),
        output: pipe.as_ref().map(|(_, w)| w.as_raw_fd()),
        cgroup_procs: cgroup.as_deref(),
        oom_score_adj: oom.as_deref(),
        uid: plan.uid,
        gid: plan.gid,
        failed: AtomicU8::new(0),
        errno: AtomicI32::new(0),
    };
    // u128 keeps the stack 16-byte aligned, as the x86-64 ABI wants it at a call.
    let mut stack = vec![0u128; STACK_BYTES / std::mem::size_of::<u128>()];
    let top = stack.as_mut_ptr_range().end.cast::<c_void>();
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    // SAFETY: `child_main` only reads `child` (alive until this function returns, and the
    // child has executed or exited before `clone` returns here, CLONE_VFORK) and writes its two
    // atomics; it runs on `stack`, which nothing else uses and which outlives the child's use of
    // it for the same reason. It follows the rules in the module comment.
    let pid = unsafe {
        libc::clone(
            child_main,
            top,
            flags,
            std::ptr::from_ref(&child).cast_mut().cast::<c_void>(),
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(stack);
    if let Some(step) = Step::from_u8(child.failed.load(Ordering::SeqCst)) {
        // The child has exited (127); collect it here, the reaper never hears of it.
        let _ = rustix::process::waitpid(
            rustix::process::Pid::from_raw(pid),
            rustix::process::WaitOptions::empty(),
        );
        let os = io::Error::from_raw_os_error(child.errno.load(Ordering::SeqCst));
        return Err(match step {
            Step::Exec => os,
            _ => io::Error::new(os.kind(), format!("{}: {os}", step.what())),
        });
    }
    Ok(Spawned {
        pid: pid as Pid,
        output: pipe.map(|(read, _write)| File::from(read)),
    })
}

/// The program to execute: `program` itself when it holds a `/`, else the first executable
/// file of that name in the `PATH` of `env`, as `execvp` would look for it.
fn resolve(program: &Path, env: &[(String, String)]) -> io::Result<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Ok(program.to_path_buf());
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    use std::os::unix::fs::PermissionsExt;
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} not found in PATH {path:?}",
                    OsStr::new(program).to_string_lossy()
                ),
            )
        })
}

fn cstring(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} holds a NUL byte"),
        )
    })
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// The child's entry point, on its own stack.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Child` that `spawn` keeps alive until this process executes or
    // exits (CLONE_VFORK holds the parent's thread until then).
    let child = unsafe { &*arg.cast_const().cast::<Child>() };
    let (step, errno) = child.run();
    child.errno.store(errno, Ordering::SeqCst);
    child.failed.store(step as u8, Ordering::SeqCst);
    // SAFETY: `_exit` ends this process at once, running nothing of the parent's (no atexit
    // handlers, no stdio flush on memory shared with it).
    unsafe { libc::_exit(127) }
}

/// The errno of the last failed call of this thread.
fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl Child<'_> {
    /// Set up and execute; returns only on failure, with the step and errno.
    fn run(&self) -> (Step, i32) {
        // SAFETY: setsid takes no arguments.
        if unsafe { libc::setsid() } < 0 {
            return (Step::Session, errno());
        }
        if let Some(path) = self.cgroup_procs {
            if let Err(e) = write_all(path, b"0\n") {
                return (Step::Cgroup, e);
            }
        }
        if let Some(v) = self.oom_score_adj {
            if let Err(e) = write_all(c"/proc/self/oom_score_adj", v) {
                return (Step::OomScore, e);
            }
        }
        // Without a pipe, stdout and stderr stay PID 1's: the console.
        let stdio = [
            Some((self.stdin, 0)),
            self.output.map(|o| (o, 1)),
            self.output.map(|o| (o, 2)),
        ];
        for (from, to) in stdio.into_iter().flatten() {
            // dup2 onto itself would keep FD_CLOEXEC: the descriptors opened by `spawn` are
            // above 2 while PID 1 holds its console on 0-2, but do not rely on it.
            let r = if from == to {
                // SAFETY: clears the flags of a descriptor `spawn` opened and keeps open.
                unsafe { libc::fcntl(from, libc::F_SETFD, 0) }
            } else {
                // SAFETY: `from` is a descriptor `spawn` keeps open; `to` is 0, 1 or 2.
                unsafe { libc::dup2(from, to) }
            };
            if r < 0 {
                return (Step::Stdio, errno());
            }
        }
        // PID 1 ignores SIGPIPE and blocks the signals it waits for; both would be inherited.
        // SAFETY: SIG_DFL runs no code; this process has its own copy of the dispositions
        // (no CLONE_SIGHAND), so PID 1's stay as they are.
        if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) } == libc::SIG_ERR {
            return (Step::Signals, errno());
        }
        let empty: u64 = 0;
        // SAFETY: the kernel reads one 8-byte signal set from `empty`, which lives across the
        // call, and writes no old set (null).
        let masked = unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                std::ptr::from_ref(&empty),
                std::ptr::null_mut::<u64>(),
                std::mem::size_of::<u64>(),
            )
        };
        if masked < 0 {
            return (Step::Signals, errno());
        }
        if self.uid.is_some() || self.gid.is_some() {
            let none: *const libc::gid_t = std::ptr::null();
            // SAFETY: a count of 0 makes the kernel read nothing from the (null) list.
            if unsafe { libc::syscall(libc::SYS_setgroups, 0, none) } < 0 {
                return (Step::Groups, errno());
            }
        }
        if let Some(g) = self.gid {
            // SAFETY: the raw system call, for this process only (see the module comment).
            if unsafe { libc::syscall(libc::SYS_setgid, g) } < 0 {
                return (Step::Gid, errno());
            }
        }
        if let Some(u) = self.uid {
            // SAFETY: as for setgid.
            if unsafe { libc::syscall(libc::SYS_setuid, u) } < 0 {
                return (Step::Uid, errno());
            }
        }
        // SAFETY: the program is a C string and argv and envp null-terminated arrays of C
        // strings, all prepared and kept alive by `spawn`.
        unsafe {
            libc::execve(
                self.program.as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
            );
        }
        (Step::Exec, errno())
    }
}

/// Open `path` for writing, write `data`, close it: raw system calls only.
fn write_all(path: &CStr, data: &[u8]) -> Result<(), i32> {
    // SAFETY: `path` is a valid C string; the descriptor is ours and closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: `data` is valid for `data.len()` bytes.
    let n = unsafe { libc::write(fd, data.as_ptr().cast::<c_void>(), data.len()) };
    let failed =
        (n < 0 || n as usize != data.len()).then(|| if n < 0 { errno() } else { libc::EIO });
    // SAFETY: `fd` was opened above and is closed once.
    unsafe { libc::close(fd) };
    failed.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read;

    fn plan(program: &str, args: &[&str]) -> ExecPlan {
        ExecPlan {
            program: PathBuf::from(program),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            capture_output: true,
            ..Default::default()
        }
    }

    /// Runs `plan` to its end: its output and how it ended.
    fn run(plan: &ExecPlan) -> (String, i32) {
        let sp = spawn(plan).unwrap();
        let mut out = String::new();
        sp.output.unwrap().read_to_string(&mut out).unwrap();
        let status = rustix::process::waitpid(
            rustix::process::Pid::from_raw(sp.pid),
            rustix::process::WaitOptions::empty(),
        )
        .unwrap()
        .unwrap()
        .1;
        (out, status.exit_status().unwrap() as i32)
    }

    #[test]
    fn runs_with_its_arguments_environment_and_output() {
        let mut p = plan(
            "/bin/sh",
            &[
                "-c",
                "echo \"$0 $1 $GREETING\"; echo to-stderr >&2; exit 3",
                "one",
            ],
        );
        p.env.push(("GREETING".into(), "hello".into()));
        let (out, code) = run(&p);
        assert_eq!(out, "one  hello\nto-stderr\n");
        assert_eq!(code, 3);
    }

    #[test]
    fn stdin_is_dev_null_and_no_signal_is_blocked_or_ignored() {
        // Blocked here, in the parent's thread, and SIGPIPE is ignored in this process (the
        // standard runtime does it): the child must inherit neither. No shell in between, it
        // might reset them itself.
        crate::sys::block_signals(&[libc::SIGUSR2]).unwrap();
        // What this process ignores, SIGPIPE aside, was inherited and is passed on (as the
        // standard library's spawn does).
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let ignored = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .unwrap();
        let ignored = u64::from_str_radix(ignored, 16).unwrap();
        assert_ne!(ignored & 1 << (libc::SIGPIPE - 1), 0);
        let (out, code) = run(&plan(
            "/bin/grep",
            &["-E", "^Sig(Blk|Ign):", "/proc/self/status"],
        ));
        assert_eq!(code, 0, "{out}");
        let expected = ignored & !(1 << (libc::SIGPIPE - 1));
        assert_eq!(
            out,
            format!("SigBlk:\t{:016x}\nSigIgn:\t{expected:016x}\n", 0)
        );
        let (out, code) = run(&plan("/bin/readlink", &["/proc/self/fd/0"]));
        assert_eq!((out.as_str(), code), ("/dev/null\n", 0));
    }

    #[test]
    fn oom_score_adj_and_session_are_set_before_exec() {
        let mut p = plan(
            "/bin/sh",
            &[
                "-c",
                "cat /proc/self/oom_score_adj; cut -d' ' -f6 /proc/$$/stat; echo $$",
            ],
        );
        // Raising it needs no privilege.
        p.oom_score_adj = Some(500);
        let (out, code) = run(&p);
        assert_eq!(code, 0, "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "500");
        // setsid made the shell the leader of its own session: its session id is its pid.
        assert_eq!(lines[1], lines[2], "{out}");
    }

    #[test]
    fn user_and_group_are_dropped_before_exec() {
        if rustix::process::geteuid().as_raw() != 0 {
            eprintln!("not root: cannot change users; skipped");
            return;
        }
        let mut p = plan("/bin/sh", &["-c", "id -u; id -g; id -G"]);
        (p.uid, p.gid) = (Some(65534), Some(65533));
        let (out, code) = run(&p);
        assert_eq!((out.as_str(), code), ("65534\n65533\n65533\n", 0));
        // This process, whose memory the child shared, is still root.
        assert_eq!(rustix::process::getuid().as_raw(), 0);
        assert_eq!(rustix::process::getgid().as_raw(), 0);
    }

    #[test]
    fn a_program_found_through_path() {
        let (out, code) = run(&plan("echo", &["found"]));
        assert_eq!((out.as_str(), code), ("found\n", 0));
    }

    #[test]
    fn a_missing_program_is_not_found() {
        let e = spawn(&plan("/nonexistent/program", &[])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let e = spawn(&plan("no-such-program-anywhere", &[])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("no-such-program-anywhere"), "{e}");
    }

    #[test]
    fn a_failing_step_is_named() {
        let mut p = plan("/bin/true", &[]);
        p.cgroup_procs = Some(PathBuf::from("/nonexistent/cgroup.procs"));
        let e = spawn(&p).unwrap_err();
        assert!(e.to_string().starts_with("joining its cgroup: "), "{e}");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }

    #[test]
    fn a_nul_byte_is_refused_before_anything_starts() {
        let e = spawn(&plan("/bin/true", &["a\0b"])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
