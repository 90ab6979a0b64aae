//! Linux capabilities by name: the kernel's list, the set a unit's container gets by default,
//! and the names a unit file may add.

/// Every capability Linux knows (`linux/capability.h`, up to `CAP_CHECKPOINT_RESTORE`, 40).
pub const ALL: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// What a unit's container gets without asking: the set Docker and containerd give, minus
/// `CAP_NET_RAW` (raw sockets: packet spoofing and sniffing on the host's network).
pub const DEFAULT: [&str; 13] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The kernel's name of a capability given as `NET_ADMIN`, `CAP_NET_ADMIN` or `net_admin`;
/// `None` when Linux has no such capability.
pub fn canonical(name: &str) -> Option<&'static str> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    ALL.iter().copied().find(|c| *c == full)
}

/// The default set plus `added` (kernel names), in the kernel's order, without repeats.
pub fn with(added: &[String]) -> Vec<&'static str> {
    ALL.iter()
        .copied()
        .filter(|c| DEFAULT.contains(c) || added.iter().any(|a| a == c))
        .collect()
}

/// The capabilities in a `/proc/<pid>/status` text's bounding set (`CapBnd`), kernel names;
/// `None` when it has no such line.
pub fn bounding(status: &str) -> Option<Vec<&'static str>> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))?
        .trim();
    let bits = u64::from_str_radix(hex, 16).ok()?;
    Some(
        ALL.iter()
            .enumerate()
            .filter(|(i, _)| bits & (1u64 << i) != 0)
            .map(|(_, c)| *c)
            .collect(),
    )
}

/// Every capability this process may hand on (its bounding set), as containerd gives a
/// privileged container; all of [`ALL`] when `/proc/self/status` cannot be read.
pub fn held() -> Vec<&'static str> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| bounding(&s))
        .unwrap_or_else(|| ALL.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_or_without_the_prefix() {
        assert_eq!(canonical("NET_ADMIN"), Some("CAP_NET_ADMIN"));
        assert_eq!(canonical("cap_sys_ptrace"), Some("CAP_SYS_PTRACE"));
        assert_eq!(canonical("CAP_BPF"), Some("CAP_BPF"));
        assert_eq!(canonical("NET_WIZARD"), None);
        assert_eq!(canonical(""), None);
    }

    #[test]
    fn the_bounding_set_of_a_status() {
        let all = bounding("Name:\tx\nCapBnd:\t000001ffffffffff\n").unwrap();
        assert_eq!(all, ALL);
        // Without CAP_SYS_RESOURCE (24), as in some sandboxes.
        let most = bounding("CapBnd:\t000001fffeffffff\n").unwrap();
        assert_eq!(most.len(), ALL.len() - 1);
        assert!(!most.contains(&"CAP_SYS_RESOURCE"));
        assert_eq!(
            bounding("CapBnd:\t0000000000000001").unwrap(),
            ["CAP_CHOWN"]
        );
        assert_eq!(bounding("Name: x"), None);
        assert!(held().contains(&"CAP_CHOWN") || !held().is_empty());
    }

    #[test]
    fn the_default_set_lacks_net_raw_and_is_known() {
        assert!(!DEFAULT.contains(&"CAP_NET_RAW"));
        assert!(DEFAULT.iter().all(|c| ALL.contains(c)));
        let s = with(&["CAP_NET_RAW".into(), "CAP_CHOWN".into()]);
        assert_eq!(s.len(), DEFAULT.len() + 1);
        assert!(s.contains(&"CAP_NET_RAW"));
    }
}
