//! Stage 1, in the initramfs: early mounts, modules, the kernel command line, dm-verity on the
//! slot, the erofs root at /sysroot, `state` at /sysroot/var, the /etc overlay, the machine id,
//! and the switch to the real root.
//!
//! Every path is under `root` (`/` on a machine, a temporary directory in tests).

use crate::sys::{MountFlags, Syscall};
use crate::{blockdev, expedite, modules, prefetch};
use caisson_layout::cmdline::{BootParams, CmdlineError};
use caisson_layout::paths;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why stage 1 cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    #[error("mounting {what} at {target} failed: {source}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{action} {path} failed: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error(transparent)]
    Block(#[from] blockdev::BlockError),
    #[error("setting up dm-verity on {device} failed: {source}")]
    Verity {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the verity device {0} did not appear")]
    NoVerityNode(PathBuf),
    #[error("switching to the root failed at {step}: {source}")]
    SwitchRoot {
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Stage1Error + 'a {
    move |source| Stage1Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Stage 1 settings.
#[derive(Debug, Clone)]
pub struct Stage1 {
    pub root: PathBuf,
    /// How long to wait for the root and state partitions.
    pub partition_timeout: Duration,
    /// How often to look for them.
    pub poll: Duration,
}

impl Default for Stage1 {
    fn default() -> Self {
        Stage1 {
            root: PathBuf::from("/"),
            partition_timeout: Duration::from_secs(60),
            poll: Duration::from_millis(50),
        }
    }
}

/// The filesystems the init mounts before anything else (both stages): source, target, type,
/// flags, options.
pub const EARLY_MOUNTS: [(&str, &str, &str, MountFlags, &str); 4] = [
    (
        "proc",
        "/proc",
        "proc",
        MountFlags::NOSUID
            .union(MountFlags::NODEV)
            .union(MountFlags::NOEXEC),
        "",
    ),
    (
        "sysfs",
        "/sys",
        "sysfs",
        MountFlags::NOSUID
            .union(MountFlags::NODEV)
            .union(MountFlags::NOEXEC),
        "",
    ),
    (
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MountFlags::NOSUID,
        "mode=0755",
    ),
    (
        "tmpfs",
        "/run",
        "tmpfs",
        MountFlags::NOSUID.union(MountFlags::NODEV),
        "mode=0755",
    ),
];

impl Stage1 {
    fn p(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    fn mount(
        &self,
        sys: &dyn Syscall,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> Result<(), Stage1Error> {
        std::fs::create_dir_all(target).map_err(io_err("creating", target))?;
        sys.mount(source, target, fstype, flags, data)
            .map_err(|source_err| Stage1Error::Mount {
                what: format!("{fstype} ({source})"),
                target: target.to_path_buf(),
                source: source_err,
            })
    }

    /// /proc, /sys, /dev, /run.
    pub fn early_mounts(&self, sys: &dyn Syscall) -> Result<(), Stage1Error> {
        for (source, target, fstype, flags, data) in EARLY_MOUNTS {
            self.mount(sys, source, &self.p(target), fstype, flags, data)?;
        }
        Ok(())
    }

    /// Reads and checks the command line: no verity and no `caisson.insecure` is an error.
    pub fn boot_params(&self) -> Result<BootParams, Stage1Error> {
        let path = self.p("/proc/cmdline");
        let text = std::fs::read_to_string(&path).map_err(io_err("reading", &path))?;
        Ok(BootParams::parse(&text)?)
    }

    /// Everything up to, not including, the switch: returns the parameters it booted with.
    pub fn prepare(&self, sys: &dyn Syscall) -> Result<BootParams, Stage1Error> {
        self.early_mounts(sys)?;
        expedite::set(&self.root, true);
        crate::console::attach_console_under(&self.root);
        log::info!("stage 1: {}", crate::VERSION_LINE);
        let params = self.boot_params()?;
        crate::console::set_debug(params.debug);
        modules::load_list(sys, &self.root, paths::INITRD_MODULES_LIST);
        let root_dev = blockdev::wait_for_partuuid(
            &self.root,
            params.root,
            &format!("root ({})", params.slot.partition_label()),
            self.partition_timeout,
            self.poll,
        )?;
        log::info!(
            "root partition of slot {}: {}",
            params.slot,
            root_dev.display()
        );
        let sysroot = self.p(paths::SYSROOT);
        let root_source = match &params.verity {
            Some(v) => {
                let minor = sys
                    .verity_setup(paths::VERITY_DM_NAME, &root_dev, v)
                    .map_err(|source| Stage1Error::Verity {
                        device: root_dev.clone(),
                        source,
                    })?;
                let node = self.p(&format!("/dev/dm-{minor}"));
                self.wait_node(&node)?;
                log::info!("dm-verity on {}: {}", root_dev.display(), node.display());
                node
            }
            None => {
                log::warn!("caisson.insecure: mounting the root WITHOUT verification");
                root_dev
            }
        };
        self.mount(
            sys,
            &root_source.to_string_lossy(),
            &sysroot,
            "erofs",
            MountFlags::RDONLY,
            "",
        )?;
        // Stage 2's binary, read while the steps below run (see `prefetch`).
        let stage2 = sysroot.join("sbin/init");
        if let Err(e) = prefetch::file(&stage2, None) {
            log::debug!("prefetching {}: {e}", stage2.display());
        }
        let state_dev = blockdev::wait_for_partuuid(
            &self.root,
            params.state,
            "state",
            self.partition_timeout,
            self.poll,
        )?;
        let var = sysroot.join("var");
        self.mount(
            sys,
            &state_dev.to_string_lossy(),
            &var,
            "ext4",
            MountFlags::NOSUID | MountFlags::NODEV,
            "",
        )?;
        self.grow_state(&state_dev, params.state, &var);
        self.etc_overlay(sys, &sysroot)?;
        prefetch::services(&sysroot);
        self.machine_id(&sysroot)?;
        Ok(params)
    }

    /// First boot: grow `state` to the end of the disk. A failure is logged, never fatal (the
    /// marker stays absent, so the next boot tries again).
    fn grow_state(&self, dev: &Path, uuid: uuid::Uuid, var: &Path) {
        let marker = var.join(paths::STATE_GROWN_MARKER);
        if marker.exists() {
            return;
        }
        match crate::grow::grow_state(&self.root, dev, uuid, var, &marker) {
            Ok(Some(bytes)) => log::info!("first boot: state grown to {} MiB", bytes >> 20),
            Ok(None) => log::info!("first boot: state already fills the disk"),
            Err(e) => log::warn!("growing state failed: {e}; keeping its size"),
        }
    }

    fn wait_node(&self, node: &Path) -> Result<(), Stage1Error> {
        let start = std::time::Instant::now();
        while !node.exists() {
            if start.elapsed() > Duration::from_secs(10) {
                return Err(Stage1Error::NoVerityNode(node.to_path_buf()));
            }
            std::thread::sleep(self.poll);
        }
        Ok(())
    }

    fn etc_overlay(&self, sys: &dyn Syscall, sysroot: &Path) -> Result<(), Stage1Error> {
        let var = sysroot.join("var");
        let upper = var.join(paths::STATE_ETC_UPPER);
        let work = var.join(paths::STATE_ETC_WORK);
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(io_err("creating", d))?;
        }
        let etc = sysroot.join("etc");
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            etc.display(),
            upper.display(),
            work.display()
        );
        self.mount(sys, "overlay", &etc, "overlay", MountFlags::empty(), &data)
    }

    /// The machine id lives on `state`; /etc/machine-id (in the overlay) gets a copy.
    fn machine_id(&self, sysroot: &Path) -> Result<(), Stage1Error> {
        let kept = sysroot.join("var").join(paths::STATE_MACHINE_ID);
        let id = match std::fs::read_to_string(&kept) {
            Ok(t) if valid_machine_id(t.trim()) => t.trim().to_string(),
            _ => {
                let id = new_machine_id().map_err(io_err("generating", &kept))?;
                if let Some(dir) = kept.parent() {
                    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
                }
                std::fs::write(&kept, format!("{id}\n")).map_err(io_err("writing", &kept))?;
                log::info!("first boot: machine id {id}");
                id
            }
        };
        let etc_id = sysroot.join("etc/machine-id");
        let current = std::fs::read_to_string(&etc_id).unwrap_or_default();
        if current.trim() != id {
            let _ = std::fs::remove_file(&etc_id);
            std::fs::write(&etc_id, format!("{id}\n")).map_err(io_err("writing", &etc_id))?;
        }
        Ok(())
    }

    /// Move the API filesystems into /sysroot, free the initramfs, make /sysroot the root.
    /// Returns only on failure (after `exec` of /sbin/init failed, or a step before it).
    pub fn switch_root(&self, sys: &dyn Syscall) -> Stage1Error {
        match self.switch_root_steps(sys) {
            Ok(()) => Stage1Error::SwitchRoot {
                step: "exec /sbin/init",
                source: sys.exec(Path::new("/sbin/init")),
            },
            Err(e) => e,
        }
    }

    fn switch_root_steps(&self, sys: &dyn Syscall) -> Result<(), Stage1Error> {
        let sysroot = self.p(paths::SYSROOT);
        let step = |step: &'static str| move |source| Stage1Error::SwitchRoot { step, source };
        for (_, target, ..) in EARLY_MOUNTS {
            let to = sysroot.join(target.trim_start_matches('/'));
            sys.move_mount(&self.p(target), &to)
                .map_err(step("moving the API filesystems"))?;
        }
        sys.chdir(&sysroot).map_err(step("chdir /sysroot"))?;
        delete_initramfs(&self.root, paths::SYSROOT.trim_start_matches('/'));
        sys.move_mount(&sysroot, &self.root)
            .map_err(step("moving /sysroot to /"))?;
        sys.chroot(Path::new(".")).map_err(step("chroot"))?;
        sys.chdir(Path::new("/")).map_err(step("chdir /"))?;
        Ok(())
    }
}

/// Delete the initramfs's files to free its memory: everything under `root` on the same
/// filesystem, except `keep` (the new root's mount point). Errors are ignored.
pub fn delete_initramfs(root: &Path, keep: &str) {
    let Ok(meta) = std::fs::symlink_metadata(root) else {
        return;
    };
    let dev = meta.dev();
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        if e.file_name() == keep {
            continue;
        }
        delete_same_dev(&e.path(), dev);
    }
}

fn delete_same_dev(path: &Path, dev: u64) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.dev() != dev {
        return;
    }
    if meta.is_dir() {
        if let Ok(rd) = std::fs::read_dir(path) {
            for e in rd.filter_map(|e| e.ok()) {
                delete_same_dev(&e.path(), dev);
            }
        }
        let _ = std::fs::remove_dir(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

fn valid_machine_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

/// 128 random bits as 32 lower-case hex digits, marked as a v4 UUID as systemd does.
fn new_machine_id() -> io::Result<String> {
    let mut b = [0u8; 16];
    let mut filled = 0;
    while filled < b.len() {
        filled += rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, Recording};
    use caisson_layout::verity::VerityParams;
    use caisson_layout::Slot;
    use uuid::Uuid;

    fn params(verity: bool) -> BootParams {
        BootParams {
            version: "1.0.0".into(),
            slot: Slot::A,
            root: Uuid::from_u128(0xa),
            state: Uuid::from_u128(0x5),
            esp: Uuid::from_u128(0xe),
            verity: verity.then_some(VerityParams {
                root_hash: [1; 32],
                salt: [2; 32],
                data_blocks: 8,
                hash_offset: 32768,
            }),
            debug: false,
        }
    }

    fn initramfs(cmdline: &str) -> (tempfile::TempDir, Stage1) {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        caisson_layout::blockdev::testing::fake_disk(
            r,
            &[
                Uuid::from_u128(0xe),
                Uuid::from_u128(0xa),
                Uuid::from_u128(0x5),
            ],
        );
        std::fs::create_dir_all(r.join("proc")).unwrap();
        std::fs::write(r.join("proc/cmdline"), cmdline).unwrap();
        std::fs::write(r.join("dev/dm-0"), "").unwrap();
        std::fs::create_dir_all(r.join("etc/caisson")).unwrap();
        std::fs::write(
            r.join("etc/caisson/initrd-modules"),
            "lib/modules/6.1/dm-mod.ko\n\nlib/modules/6.1/dm-verity.ko.xz\n",
        )
        .unwrap();
        std::fs::create_dir_all(r.join("sysroot/etc")).unwrap();
        let s = Stage1 {
            root: r.to_path_buf(),
            partition_timeout: Duration::from_millis(100),
            poll: Duration::from_millis(5),
        };
        (tmp, s)
    }

    fn position(calls: &[Call], f: impl Fn(&Call) -> bool) -> usize {
        calls.iter().position(f).unwrap()
    }

    #[test]
    fn order_mounts_modules_verity_root_state_etc() {
        let (tmp, s) = initramfs(&format!("console=ttyS0 {}", params(true).render()));
        let sys = Recording::new(tmp.path());
        let p = s.prepare(&sys).unwrap();
        assert_eq!(p, params(true));
        let calls = sys.calls();
        let mount_at = |t: &'static str| move |c: &Call| matches!(c, Call::Mount { target, .. } if target == t);
        let proc_ = position(&calls, mount_at("/proc"));
        let run = position(&calls, mount_at("/run"));
        let module = position(&calls, |c| matches!(c, Call::LoadModule(_)));
        let verity = position(&calls, |c| matches!(c, Call::Verity { .. }));
        let sysroot = position(&calls, mount_at("/sysroot"));
        let var = position(&calls, mount_at("/sysroot/var"));
        let etc = position(&calls, mount_at("/sysroot/etc"));
        assert!(proc_ < run && run < module && module < verity);
        assert!(verity < sysroot && sysroot < var && var < etc);
        assert_eq!(
            calls[verity],
            Call::Verity {
                name: "caisson-root".into(),
                device: "/dev/vda2".into()
            }
        );
        assert_eq!(
            calls[sysroot],
            Call::Mount {
                source: "/dev/dm-0".into(),
                target: "/sysroot".into(),
                fstype: "erofs".into(),
                ro: true,
                data: String::new()
            }
        );
        assert!(matches!(&calls[var], Call::Mount { source, fstype, .. }
            if source == "/dev/vda3" && fstype == "ext4"));
        assert!(matches!(&calls[etc], Call::Mount { data, .. }
            if data == "lowerdir=/sysroot/etc,upperdir=/sysroot/var/lib/caisson/etc/upper,\
                        workdir=/sysroot/var/lib/caisson/etc/work"));
        let modules: Vec<&Call> = calls
            .iter()
            .filter(|c| matches!(c, Call::LoadModule(_)))
            .collect();
        assert_eq!(modules.len(), 2);
        // The machine id is made once and kept.
        let kept = tmp.path().join("sysroot/var/lib/caisson/machine-id");
        let id = std::fs::read_to_string(&kept).unwrap();
        assert!(valid_machine_id(id.trim()));
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("sysroot/etc/machine-id")).unwrap(),
            id
        );
        s.prepare(&sys).unwrap();
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), id);
    }

    #[test]
    fn refuses_an_unverified_root_without_the_flag() {
        let line = params(false).render().replace("caisson.insecure", "");
        let (tmp, s) = initramfs(&line);
        let sys = Recording::new(tmp.path());
        let err = s.prepare(&sys).unwrap_err();
        assert!(matches!(
            err,
            Stage1Error::Cmdline(CmdlineError::Unverified)
        ));
        assert!(err.to_string().contains("refusing"), "{err}");
        assert!(!sys
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Mount { target, .. } if target == "/sysroot")));
    }

    #[test]
    fn insecure_mounts_the_partition_directly() {
        let (tmp, s) = initramfs(&params(false).render());
        let sys = Recording::new(tmp.path());
        s.prepare(&sys).unwrap();
        let calls = sys.calls();
        assert!(!calls.iter().any(|c| matches!(c, Call::Verity { .. })));
        assert!(calls
            .iter()
            .any(|c| matches!(c, Call::Mount { source, target, .. }
            if source == "/dev/vda2" && target == "/sysroot")));
    }

    #[test]
    fn missing_root_partition_times_out_with_the_devices_seen() {
        let mut p = params(true);
        p.root = Uuid::from_u128(0xdead);
        let (tmp, s) = initramfs(&p.render());
        let err = s
            .prepare(&Recording::new(tmp.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("vda"), "{err}");
        assert!(err.contains("root-a"), "{err}");
    }

    #[test]
    fn switch_root_moves_frees_and_execs() {
        let (tmp, s) = initramfs("");
        std::fs::write(tmp.path().join("init"), "binary").unwrap();
        std::fs::write(tmp.path().join("sysroot/keep"), "").unwrap();
        let sys = Recording::new(tmp.path());
        let err = s.switch_root(&sys);
        assert!(matches!(
            err,
            Stage1Error::SwitchRoot {
                step: "exec /sbin/init",
                ..
            }
        ));
        let calls = sys.calls();
        let expected = [
            Call::Move {
                from: "/proc".into(),
                to: "/sysroot/proc".into(),
            },
            Call::Move {
                from: "/sys".into(),
                to: "/sysroot/sys".into(),
            },
            Call::Move {
                from: "/dev".into(),
                to: "/sysroot/dev".into(),
            },
            Call::Move {
                from: "/run".into(),
                to: "/sysroot/run".into(),
            },
            Call::Chdir("/sysroot".into()),
            Call::Move {
                from: "/sysroot".into(),
                to: "/".into(),
            },
            Call::Chroot("/.".into()),
            Call::Chdir("/".into()),
            Call::Exec("/sbin/init".into()),
        ];
        assert_eq!(calls, expected);
        assert!(!tmp.path().join("init").exists());
        assert!(!tmp.path().join("etc").exists());
        assert!(tmp.path().join("sysroot/keep").exists());
    }
}
