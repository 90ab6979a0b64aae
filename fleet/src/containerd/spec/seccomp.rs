//! The seccomp profile of a unit's container, in the spirit of Docker's and containerd's
//! default: every system call fails with `EPERM` unless it is on the allowlist below.
//!
//! The allowlist is what ordinary programs use (files, memory, processes, signals, time,
//! sockets, System V and POSIX IPC). Left out, because each has been a way out of a container
//! or into the kernel's soft parts: namespaces (`unshare`, `setns`, `clone` with `CLONE_NEW*`
//! flags), mounts, the kernel keyring, BPF and perf events, kernel modules, `kexec`, `ptrace`
//! and reading other processes' memory, file handles (`open_by_handle_at`), the clock,
//! `io_uring` and `userfaultfd`. Most come back when the unit adds the capability that the
//! kernel checks for them anyway (`SYS_ADMIN` for mounts and namespaces, `SYS_PTRACE` for
//! `ptrace`, ...); a privileged unit has no filter at all.
//!
//! `clone3` fails with `ENOSYS`: its flags are in memory a filter cannot read, and glibc falls
//! back to `clone`, whose flags the filter checks.

use serde_json::{json, Value};

/// `EPERM`: what a call off the allowlist returns.
const EPERM: u32 = 1;
/// `ENOSYS`: what `clone3` returns, so that libcs fall back to `clone`.
const ENOSYS: u32 = 38;

/// The `CLONE_NEW*` flags: `NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET`.
pub const CLONE_NAMESPACES: u64 =
    0x0002_0000 | 0x0200_0000 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000;

/// Calls every container may make.
#[rustfmt::skip]
const ALLOWED: &[&str] = &[
    // Files and descriptors.
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
    "pwritev2", "open", "openat", "openat2", "creat", "close", "close_range", "lseek", "_llseek",
    "stat", "fstat", "lstat", "newfstatat", "stat64", "fstat64", "lstat64", "fstatat64", "statx",
    "statfs", "fstatfs", "statfs64", "fstatfs64", "access", "faccessat", "faccessat2", "readlink",
    "readlinkat", "getdents", "getdents64", "dup", "dup2", "dup3", "pipe", "pipe2", "fcntl",
    "fcntl64", "ioctl", "flock", "fsync", "fdatasync", "sync", "syncfs", "sync_file_range",
    "truncate", "ftruncate", "truncate64", "ftruncate64", "fallocate", "fadvise64",
    "fadvise64_64", "readahead", "sendfile", "sendfile64", "splice", "tee", "vmsplice",
    "copy_file_range", "mkdir", "mkdirat", "rmdir", "rename", "renameat", "renameat2", "link",
    "linkat", "symlink", "symlinkat", "unlink", "unlinkat", "chmod", "fchmod", "fchmodat",
    "fchmodat2", "chown", "fchown", "lchown", "fchownat", "chown32", "fchown32", "lchown32",
    "utime", "utimes", "futimesat", "utimensat", "utimensat_time64", "umask", "mknod", "mknodat",
    "chdir", "fchdir", "getcwd", "memfd_create", "getxattr", "lgetxattr", "fgetxattr",
    "setxattr", "lsetxattr", "fsetxattr", "listxattr", "llistxattr", "flistxattr", "removexattr",
    "lremovexattr", "fremovexattr", "inotify_init", "inotify_init1", "inotify_add_watch",
    "inotify_rm_watch", "fanotify_mark", "io_setup", "io_destroy", "io_getevents",
    "io_pgetevents", "io_pgetevents_time64", "io_submit", "io_cancel",
    // Memory.
    "brk", "mmap", "mmap2", "munmap", "mremap", "mprotect", "madvise", "msync", "mincore",
    "mlock", "mlock2", "munlock", "mlockall", "munlockall", "membarrier", "pkey_alloc",
    "pkey_free", "pkey_mprotect", "remap_file_pages",
    // Processes and threads (`clone` is below, with its flags checked).
    "fork", "vfork", "execve", "execveat", "exit", "exit_group", "wait4", "waitid", "waitpid",
    "kill", "tkill", "tgkill", "getpid", "getppid", "gettid", "getpgid", "setpgid", "getpgrp",
    "getsid", "setsid", "getuid", "geteuid", "getgid", "getegid", "getuid32", "geteuid32",
    "getgid32", "getegid32", "setuid", "setgid", "setreuid", "setregid", "setresuid",
    "setresgid", "getresuid", "getresgid", "setfsuid", "setfsgid", "setuid32", "setgid32",
    "setreuid32", "setregid32", "setresuid32", "setresgid32", "getresuid32", "getresgid32",
    "setfsuid32", "setfsgid32", "setgroups", "getgroups", "setgroups32", "getgroups32",
    "capget", "capset", "prctl", "arch_prctl", "set_tid_address", "set_robust_list",
    "get_robust_list", "rseq", "futex", "futex_time64", "futex_waitv", "sched_yield",
    "sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_setparam",
    "sched_getscheduler", "sched_setscheduler", "sched_get_priority_max",
    "sched_get_priority_min", "sched_rr_get_interval", "sched_rr_get_interval_time64",
    "sched_getattr", "sched_setattr", "getpriority", "setpriority", "ioprio_get", "ioprio_set",
    "getrlimit", "setrlimit", "ugetrlimit", "prlimit64", "getrusage", "times", "uname",
    "sysinfo", "getcpu", "restart_syscall", "pidfd_open", "pidfd_send_signal", "seccomp",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    "get_thread_area", "set_thread_area", "getrandom",
    // Signals.
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend",
    "rt_sigtimedwait", "rt_sigtimedwait_time64", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
    "sigaction", "sigprocmask", "sigreturn", "sigaltstack", "signal", "signalfd", "signalfd4",
    "sigpending", "sigsuspend", "pause", "alarm",
    // Time (reading it, sleeping, timers).
    "time", "gettimeofday", "clock_gettime", "clock_gettime64", "clock_getres",
    "clock_getres_time64", "clock_nanosleep", "clock_nanosleep_time64", "nanosleep",
    "timer_create", "timer_delete", "timer_settime", "timer_settime64", "timer_gettime",
    "timer_gettime64", "timer_getoverrun", "timerfd_create", "timerfd_settime",
    "timerfd_settime64", "timerfd_gettime", "timerfd_gettime64", "getitimer", "setitimer",
    // Waiting for events.
    "select", "_newselect", "pselect6", "pselect6_time64", "poll", "ppoll", "ppoll_time64",
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_ctl_old", "epoll_wait",
    "epoll_wait_old", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2",
    // Sockets (raw ones need CAP_NET_RAW, which the default set lacks).
    "socket", "socketpair", "socketcall", "bind", "listen", "accept", "accept4", "connect",
    "getsockname", "getpeername", "getsockopt", "setsockopt", "sendto", "recvfrom", "send",
    "recv", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg", "recvmmsg_time64", "shutdown",
    // System V and POSIX IPC (the container has its own IPC namespace).
    "ipc", "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop",
    "semtimedop_time64", "semctl", "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open",
    "mq_unlink", "mq_timedsend", "mq_timedsend_time64", "mq_timedreceive",
    "mq_timedreceive_time64", "mq_notify", "mq_getsetattr",
];

/// Calls allowed only when the container holds the capability the kernel checks for them.
#[rustfmt::skip]
const BY_CAPABILITY: &[(&str, &[&str])] = &[
    (
        "CAP_SYS_ADMIN",
        &[
            "mount", "umount", "umount2", "unshare", "setns", "pivot_root", "fsopen", "fsconfig",
            "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr", "keyctl", "add_key",
            "request_key", "bpf", "perf_event_open", "fanotify_init", "lookup_dcookie",
            "name_to_handle_at", "quotactl", "quotactl_fd", "sethostname", "setdomainname",
            "syslog",
        ],
    ),
    (
        "CAP_SYS_PTRACE",
        &[
            "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
            "userfaultfd",
        ],
    ),
    ("CAP_SYS_MODULE", &["init_module", "finit_module", "delete_module"]),
    ("CAP_SYS_BOOT", &["reboot", "kexec_load", "kexec_file_load"]),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    (
        "CAP_SYS_TIME",
        &[
            "settimeofday", "stime", "clock_settime", "clock_settime64", "adjtimex",
            "clock_adjtime", "clock_adjtime64",
        ],
    ),
    ("CAP_SYS_PACCT", &["acct"]),
    (
        "CAP_SYS_NICE",
        &["get_mempolicy", "set_mempolicy", "mbind", "move_pages", "migrate_pages"],
    ),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at", "name_to_handle_at"]),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
];

/// `personality` values ordinary programs use: Linux, 32-bit Linux, `UNAME26` and the query.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

fn allow(names: &[&str]) -> Value {
    json!({"names": names, "action": "SCMP_ACT_ALLOW"})
}

/// The OCI `linux.seccomp` of a container holding `capabilities` (kernel names).
pub fn profile(capabilities: &[&str]) -> Value {
    let has = |c: &str| capabilities.contains(&c);
    let mut rules = vec![allow(ALLOWED)];
    let mut granted: Vec<&str> = Vec::new();
    for (cap, names) in BY_CAPABILITY {
        if has(cap) {
            for n in names.iter() {
                if !granted.contains(n) {
                    granted.push(n);
                }
            }
        }
    }
    if !granted.is_empty() {
        rules.push(allow(&granted));
    }
    for p in PERSONALITIES {
        rules.push(json!({
            "names": ["personality"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": p, "op": "SCMP_CMP_EQ"}],
        }));
    }
    if has("CAP_SYS_ADMIN") {
        // It may make namespaces anyway (unshare, setns): clone and clone3 as they are.
        rules.push(allow(&["clone", "clone3"]));
    } else {
        rules.push(json!({
            "names": ["clone"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": CLONE_NAMESPACES, "valueTwo": 0,
                      "op": "SCMP_CMP_MASKED_EQ"}],
        }));
        rules.push(json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}));
    }
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": rules,
    })
}

/// Every call the profile allows for `capabilities` without looking at arguments.
#[cfg(test)]
pub fn allowed(profile: &Value) -> Vec<String> {
    profile["syscalls"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["action"] == "SCMP_ACT_ALLOW" && r.get("args").is_none())
        .flat_map(|r| r["names"].as_array().cloned().unwrap_or_default())
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::DEFAULT;

    #[rustfmt::skip]
    const BLOCKED: [&str; 20] = [
        "unshare", "setns", "mount", "umount2", "pivot_root", "keyctl", "add_key",
        "request_key", "bpf", "perf_event_open", "kexec_load", "kexec_file_load", "init_module",
        "finit_module", "delete_module", "open_by_handle_at", "ptrace", "clone", "clone3",
        "io_uring_setup",
    ];

    #[test]
    fn by_default_escapes_are_not_allowed() {
        let p = profile(&DEFAULT);
        assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(p["defaultErrnoRet"], 1);
        let allowed = allowed(&p);
        for b in BLOCKED {
            assert!(!allowed.iter().any(|a| a == b), "{b} is allowed");
        }
        for needed in ["read", "execve", "futex", "socket", "wait4", "rt_sigreturn"] {
            assert!(
                allowed.iter().any(|a| a == needed),
                "{needed} is not allowed"
            );
        }
        let rules = p["syscalls"].as_array().unwrap();
        let clone = rules
            .iter()
            .find(|r| r["names"] == json!(["clone"]))
            .unwrap();
        assert_eq!(clone["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        assert_eq!(clone["args"][0]["value"], 0x7E02_0000_u64);
        let clone3 = rules
            .iter()
            .find(|r| r["names"] == json!(["clone3"]))
            .unwrap();
        assert_eq!(
            (&clone3["action"], &clone3["errnoRet"]),
            (&json!("SCMP_ACT_ERRNO"), &json!(38))
        );
    }

    #[test]
    fn capabilities_bring_their_calls_back() {
        let mut caps = DEFAULT.to_vec();
        caps.push("CAP_SYS_PTRACE");
        let calls = allowed(&profile(&caps));
        assert!(calls.iter().any(|a| a == "ptrace"));
        assert!(!calls.iter().any(|a| a == "mount"));
        caps.push("CAP_SYS_ADMIN");
        let calls = allowed(&profile(&caps));
        for c in ["mount", "unshare", "setns", "keyctl", "clone", "clone3"] {
            assert!(calls.iter().any(|a| a == c), "{c}");
        }
        assert!(!calls.iter().any(|a| a == "init_module"));
        let mut seen = std::collections::BTreeSet::new();
        assert!(calls.iter().all(|a| seen.insert(a)), "listed twice");
    }
}
