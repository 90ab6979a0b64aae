//! Page-cache hints for what stage 2 runs first.
//!
//! Every page of the verified root is read and checked against the verity tree on its first
//! use. Left to page faults, stage 2's own binary comes in a few dozen kilobytes at a time, each
//! fault waiting for its read and its hashes in turn, and the same for each service's
//! executable at its `exec`. Stage 1 asks for those files up front instead (`POSIX_FADV_WILLNEED`
//! queues the reads and returns), so they are read in large requests and checked while stage 1
//! finishes. Only a hint: a file that is missing or cannot be read is skipped.
//!
//! A dynamically linked executable also names its ELF interpreter (`ld.so`), which the kernel
//! looks up and reads inside `exec`, while the spawning thread of PID 1 still waits: its
//! directories, inode and code are asked for too. Finding it takes one program header of type
//! `PT_INTERP` in the first page; that small read is done here rather than with an ELF crate,
//! which would bring far more code into PID 1 than the twenty lines it replaces.

use crate::service;
use caisson_layout::paths;
use std::fs::File;
use std::num::NonZeroU64;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// How much of each service's executable is asked for: its headers and the code that runs first.
pub const EXEC_BYTES: u64 = 2 << 20;

/// The kernel reads at most its read-ahead window (128 KiB unless the device says more) per
/// `WILLNEED`, so a longer range is asked for in windows of this size.
const WINDOW: u64 = 128 << 10;

/// Asks the kernel to start reading the first `max` bytes of `path` (all of it for `None`).
pub fn file(path: &Path, max: Option<u64>) -> std::io::Result<()> {
    hint(&File::open(path)?, max)
}

/// Asks the kernel to start reading the first `max` bytes of `f` (all of it for `None`).
fn hint(f: &File, max: Option<u64>) -> std::io::Result<()> {
    let size = f.metadata()?.len();
    let end = max.map_or(size, |m| m.min(size));
    let mut at = 0;
    while at < end {
        let len = WINDOW.min(end - at);
        rustix::fs::fadvise(f, at, NonZeroU64::new(len), rustix::fs::Advice::WillNeed)?;
        at += len;
    }
    Ok(())
}

/// Opens `path` as the mounted root `root` sees it: an absolute symbolic link inside it (Debian's
/// `/usr/lib64/ld-linux-x86-64.so.2` is one) resolves under `root`, not in the initramfs.
fn open_in(root: &File, path: &Path) -> std::io::Result<File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let inside = path.strip_prefix("/").unwrap_or(path);
    let fd = rustix::fs::openat2(
        root,
        inside,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT,
    )?;
    Ok(File::from(fd))
}

/// The services' executables, as paths inside the root mounted at `sysroot`, from the image's
/// and /etc's service files, each once, in name order.
pub fn service_executables(sysroot: &Path) -> Vec<PathBuf> {
    let image = sysroot.join(paths::IMAGE_SERVICES_DIR.trim_start_matches('/'));
    let etc = sysroot.join(paths::ETC_SERVICES_DIR.trim_start_matches('/'));
    let mut out: Vec<PathBuf> = Vec::new();
    for spec in service::load_dirs(&[&image, &etc]).specs {
        if !out.contains(&spec.exec) {
            out.push(spec.exec);
        }
    }
    out
}

/// Asks for the services' executables under `sysroot`, and for each interpreter they name;
/// returns how many hints were taken.
pub fn services(sysroot: &Path) -> usize {
    let root = match File::open(sysroot) {
        Ok(r) => r,
        Err(e) => {
            log::debug!("prefetching under {}: {e}", sysroot.display());
            return 0;
        }
    };
    let mut interpreters: Vec<PathBuf> = Vec::new();
    let mut taken = 0;
    for exe in service_executables(sysroot) {
        let f = match open_in(&root, &exe).and_then(|f| hint(&f, Some(EXEC_BYTES)).map(|()| f)) {
            Ok(f) => f,
            Err(e) => {
                log::debug!("prefetching {}: {e}", exe.display());
                continue;
            }
        };
        taken += 1;
        if let Some(interp) = interpreter(&f) {
            if !interpreters.contains(&interp) {
                interpreters.push(interp);
            }
        }
    }
    for interp in interpreters {
        match open_in(&root, &interp).and_then(|f| hint(&f, None)) {
            Ok(()) => taken += 1,
            Err(e) => log::debug!("prefetching {}: {e}", interp.display()),
        }
    }
    taken
}

/// The ELF interpreter the executable `f` names (its `PT_INTERP`), when it is a 64-bit
/// little-endian ELF file with one in its first page; `None` for a static executable, a
/// script, anything else.
pub fn interpreter(f: &File) -> Option<PathBuf> {
    use std::os::unix::fs::FileExt;
    let mut head = vec![0u8; 4096];
    let n = f.read_at(&mut head, 0).ok()?;
    head.truncate(n);
    elf_interp(&head).map(|b| PathBuf::from(std::ffi::OsStr::from_bytes(b)))
}

/// `PT_INTERP`'s path in the ELF header and program headers at the start of a file.
fn elf_interp(head: &[u8]) -> Option<&[u8]> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| Some(u16::from_le_bytes(head.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(head.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| {
        let v = u64::from_le_bytes(head.get(at..at + 8)?.try_into().ok()?);
        usize::try_from(v).ok()
    };
    // Magic, ELFCLASS64, ELFDATA2LSB.
    if head.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let (phoff, phentsize, phnum) = (u64_at(0x20)?, usize::from(u16_at(0x36)?), u16_at(0x38)?);
    (0..usize::from(phnum)).find_map(|i| {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? != PT_INTERP {
            return None;
        }
        let (off, len) = (u64_at(ph.checked_add(8)?)?, u64_at(ph.checked_add(32)?)?);
        let path = head.get(off..off.checked_add(len)?)?;
        // The path ends with its NUL.
        let path = path.strip_suffix(b"\0").unwrap_or(path);
        (!path.is_empty()).then_some(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_come_from_both_service_dirs_once_each() {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("usr/lib/caisson/services");
        let etc = tmp.path().join("etc/caisson/services");
        std::fs::create_dir_all(&image).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(image.join("a.toml"), "exec = \"/usr/bin/a\"\n").unwrap();
        std::fs::write(image.join("b.toml"), "exec = \"/usr/bin/shared\"\n").unwrap();
        std::fs::write(etc.join("c.toml"), "exec = \"/usr/bin/shared\"\n").unwrap();
        // /etc's file replaces the image's file of the same name.
        std::fs::write(etc.join("a.toml"), "exec = \"/opt/a2\"\n").unwrap();
        std::fs::write(etc.join("broken.toml"), "exec = 3\n").unwrap();
        assert_eq!(
            service_executables(tmp.path()),
            [Path::new("/opt/a2"), Path::new("/usr/bin/shared")]
        );
    }

    #[test]
    fn the_interpreter_of_a_dynamic_executable_is_found() {
        // Debian's /bin/sh is dynamically linked; x86-64's ABI fixes the loader's path.
        assert_eq!(
            interpreter(&File::open("/bin/sh").unwrap()).unwrap(),
            Path::new("/lib64/ld-linux-x86-64.so.2")
        );
    }

    #[test]
    fn the_interpreter_is_asked_for_under_the_sysroot_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("usr/lib/caisson/services");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(tmp.path().join("usr/bin")).unwrap();
        std::fs::create_dir_all(tmp.path().join("lib64")).unwrap();
        for name in ["one", "two"] {
            std::fs::copy("/bin/sh", tmp.path().join("usr/bin").join(name)).unwrap();
            std::fs::write(
                dir.join(format!("{name}.toml")),
                format!("exec = \"/usr/bin/{name}\"\n"),
            )
            .unwrap();
        }
        // As in Debian, the loader's path is an absolute link. Its target is missing under the
        // sysroot (the build host has its own): only the two executables are asked for.
        let target = "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
        std::os::unix::fs::symlink(target, tmp.path().join("lib64/ld-linux-x86-64.so.2")).unwrap();
        assert_eq!(services(tmp.path()), 2);
        let inside = tmp.path().join(target.trim_start_matches('/'));
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::write(&inside, b"loader").unwrap();
        assert_eq!(services(tmp.path()), 3);
    }

    #[test]
    fn no_interpreter_for_static_files_scripts_or_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let script = tmp.path().join("s");
        std::fs::write(&script, "#!/bin/sh\necho\n").unwrap();
        assert_eq!(interpreter(&File::open(&script).unwrap()), None);
        // A real header cut short before its program headers, and one whose PT_INTERP
        // points past the page.
        let sh = std::fs::read("/bin/sh").unwrap();
        assert_eq!(elf_interp(&sh[..0x40]), None);
        let mut bad = sh[..4096].to_vec();
        let phoff = u64::from_le_bytes(bad[0x20..0x28].try_into().unwrap()) as usize;
        let phentsize = u16::from_le_bytes(bad[0x36..0x38].try_into().unwrap()) as usize;
        for i in 0..usize::from(u16::from_le_bytes(bad[0x38..0x3a].try_into().unwrap())) {
            let ph = phoff + i * phentsize;
            if bad[ph..ph + 4] == 3u32.to_le_bytes() {
                bad[ph + 8..ph + 16].copy_from_slice(&u64::MAX.to_le_bytes());
            }
        }
        assert_eq!(elf_interp(&bad), None);
        // A 32-bit header is not read as a 64-bit one.
        let mut elf32 = sh[..4096].to_vec();
        elf32[4] = 1;
        assert_eq!(elf_interp(&elf32), None);
    }

    #[test]
    fn hints_are_taken_for_files_that_exist_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("usr/lib/caisson/services");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(tmp.path().join("usr/bin")).unwrap();
        std::fs::write(tmp.path().join("usr/bin/there"), vec![7u8; 8192]).unwrap();
        std::fs::write(dir.join("there.toml"), "exec = \"/usr/bin/there\"\n").unwrap();
        std::fs::write(dir.join("gone.toml"), "exec = \"/usr/bin/gone\"\n").unwrap();
        assert_eq!(services(tmp.path()), 1);
        let err = file(&tmp.path().join("usr/bin/gone"), None).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        file(&tmp.path().join("usr/bin/there"), Some(4096)).unwrap();
    }
}
