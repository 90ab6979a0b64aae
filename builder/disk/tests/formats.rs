//! The image formats checked with independent tools: GNU cpio and zstd, sfdisk, fsck.fat and
//! mtools, fsck.erofs, dump.erofs and veritysetup, e2fsck and debugfs, qemu-img. Every tool must
//! be installed: `apt-get install -y erofs-utils dosfstools mtools e2fsprogs fdisk cryptsetup-bin
//! cpio qemu-utils zstd util-linux`.

// Test code: a failed step should panic right there.
#![allow(clippy::unwrap_used)]

use caisson_disk::*;
use caisson_layout::partition::{self, Part};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const EPOCH: u64 = 1_700_000_000;
const MIB: u64 = 1024 * 1024;

/// Finds a checking tool on PATH or in the sbin directories.
fn which(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} is not installed (see the top of this file)"))
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(which(program))
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("TZ", "UTC")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs a checking tool that must succeed; returns its stdout.
fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Sets a file's mtime without following anything special.
fn touch(p: &Path, secs: u64) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Data that compresses a little, like a binary.
fn pseudo_binary(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if i % 3 == 0 {
                0
            } else {
                x as u8
            }
        })
        .collect()
}

/// A small root filesystem: files, an executable, a symlink, an empty directory.
fn make_rootfs(dir: &Path, mtime: u64) {
    fs::create_dir_all(dir.join("usr/bin")).unwrap();
    fs::create_dir_all(dir.join("usr/lib/caisson")).unwrap();
    fs::create_dir_all(dir.join("var")).unwrap();
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("usr/bin/hello"), pseudo_binary(300_000, 1)).unwrap();
    fs::set_permissions(dir.join("usr/bin/hello"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(dir.join("etc/os-release"), "ID=caisson\nVERSION_ID=1.0.0\n").unwrap();
    fs::write(dir.join("usr/lib/caisson/big"), pseudo_binary(5_000_000, 2)).unwrap();
    std::os::unix::fs::symlink("usr/bin", dir.join("bin")).unwrap();
    for f in ["usr/bin/hello", "etc/os-release", "usr/lib/caisson/big"] {
        touch(&dir.join(f), mtime);
    }
}

// ---------------------------------------------------------------- cpio

#[test]
fn initramfs_is_read_by_zstd_and_gnu_cpio() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("init-binary");
    fs::write(&host, pseudo_binary(100_000, 3)).unwrap();
    let entries = vec![
        CpioEntry::file_from("/init", &host, 0o755),
        CpioEntry::file("etc/initrd-release", b"ID=caisson\n".to_vec(), 0o644),
        CpioEntry::symlink("sbin", "usr/sbin"),
        CpioEntry::dir("usr/sbin", 0o755),
        CpioEntry::file("usr/lib/modules/6.1.0/kernel/a.ko", b"ko".to_vec(), 0o644),
    ];
    let out = dir.path().join("initrd");
    write_initramfs(&entries, EPOCH, &out).unwrap();

    ok("zstd", &["-t", "-q", s(&out)]);
    let raw = dir.path().join("initrd.cpio");
    ok("zstd", &["-d", "-q", s(&out), "-o", s(&raw)]);
    let mut expected = Vec::new();
    cpio::write_cpio(&entries, EPOCH, &mut expected, &out).unwrap();
    assert_eq!(
        fs::read(&raw).unwrap(),
        expected,
        "zstd -d gives back the archive"
    );

    let listing = ok("cpio", &["-it", "--quiet", "-F", s(&raw)]);
    let names: Vec<&str> = listing.lines().collect();
    assert_eq!(
        names,
        [
            "etc",
            "etc/initrd-release",
            "init",
            "sbin",
            "usr",
            "usr/lib",
            "usr/lib/modules",
            "usr/lib/modules/6.1.0",
            "usr/lib/modules/6.1.0/kernel",
            "usr/lib/modules/6.1.0/kernel/a.ko",
            "usr/sbin",
        ]
    );
    let verbose = ok(
        "cpio",
        &["-itv", "--quiet", "--numeric-uid-gid", "-F", s(&raw)],
    );
    let init = verbose.lines().find(|l| l.ends_with(" init")).unwrap();
    assert!(
        init.starts_with("-rwxr-xr-x   1 0        0          100000 Nov 14  2023 init"),
        "{init}"
    );
    assert!(verbose.contains("sbin -> usr/sbin"), "{verbose}");

    // GNU cpio extracts the same bytes.
    let x = dir.path().join("x");
    fs::create_dir(&x).unwrap();
    let status = Command::new(which("cpio"))
        .args(["-idm", "--quiet", "-F", s(&raw)])
        .current_dir(&x)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(fs::read(x.join("init")).unwrap(), fs::read(&host).unwrap());
    assert_eq!(
        fs::read_link(x.join("sbin")).unwrap(),
        Path::new("usr/sbin")
    );

    // Reproducible, whatever the host file's mtime.
    touch(&host, 12345);
    let again = dir.path().join("initrd2");
    write_initramfs(&entries, EPOCH, &again).unwrap();
    assert_eq!(fs::read(&out).unwrap(), fs::read(&again).unwrap());
}

// ---------------------------------------------------------------- GPT

#[derive(serde::Deserialize)]
struct SfdiskJson {
    partitiontable: Table,
}

#[derive(serde::Deserialize)]
struct Table {
    label: String,
    id: String,
    #[serde(rename = "sectorsize")]
    sector_size: u64,
    partitions: Vec<SfPart>,
}

#[derive(serde::Deserialize)]
struct SfPart {
    start: u64,
    size: u64,
    #[serde(rename = "type")]
    type_guid: String,
    uuid: String,
    name: String,
    attrs: Option<String>,
}

fn small_disk(dir: &Path, root_a: Option<PathBuf>) -> (PathBuf, DiskLayout) {
    let parts = vec![
        PartitionContent {
            part: Part::Esp,
            size: 33 * MIB,
            content: None,
        },
        PartitionContent {
            part: Part::RootA,
            size: 20 * MIB,
            content: root_a,
        },
        PartitionContent {
            part: Part::RootB,
            size: 20 * MIB,
            content: None,
        },
        PartitionContent {
            part: Part::State,
            size: 10 * MIB,
            content: None,
        },
    ];
    let out = dir.join("disk.raw");
    let layout = write_disk(&parts, &out, "host", "1.2.0").unwrap();
    (out, layout)
}

#[test]
fn gpt_is_valid_for_sfdisk_with_derived_guids_and_types() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("payload");
    let mut data = vec![0u8; 3 * MIB as usize];
    data[..4].copy_from_slice(b"data");
    data[2 * MIB as usize] = 1;
    fs::write(&content, &data).unwrap();
    let (disk, layout) = small_disk(dir.path(), Some(content));

    ok("sfdisk", &["-V", s(&disk)]);
    let json: SfdiskJson = serde_json::from_str(&ok("sfdisk", &["--json", s(&disk)])).unwrap();
    let t = json.partitiontable;
    assert_eq!(t.label, "gpt");
    assert_eq!(t.sector_size, 512);
    assert_eq!(
        t.id.to_lowercase(),
        partition::disk_guid("host", "1.2.0").to_string()
    );
    assert_eq!(t.partitions.len(), 4);
    for (sf, part) in t.partitions.iter().zip(Part::ALL) {
        assert_eq!(sf.name, part.label());
        assert_eq!(sf.type_guid.to_lowercase(), part.type_guid().to_string());
        assert_eq!(
            sf.uuid.to_lowercase(),
            partition::partition_guid("host", part).to_string()
        );
        assert_eq!(
            (sf.start * 512) % partition::ALIGN,
            0,
            "{} start aligned",
            sf.name
        );
        assert_eq!(
            (sf.size * 512) % partition::ALIGN,
            0,
            "{} size aligned",
            sf.name
        );
        let expected_attrs = match part {
            Part::RootA | Part::RootB => Some("GUID:60".to_string()),
            _ => None,
        };
        assert_eq!(sf.attrs, expected_attrs, "{}", sf.name);
        let l = layout.get(part).unwrap();
        assert_eq!((l.start, l.size), (sf.start * 512, sf.size * 512));
    }

    assert_eq!(read_layout(&disk).unwrap(), layout);
    let meta = fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), 85 * MIB);
    assert!(
        meta.blocks() * 512 < MIB,
        "sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    let bytes = fs::read(&disk).unwrap();
    let a = layout.get(Part::RootA).unwrap().start as usize;
    assert_eq!(&bytes[a..a + data.len()], &data[..]);
}

#[test]
fn qcow2_holds_the_same_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = small_disk(dir.path(), None);
    let q = dir.path().join("disk.qcow2");
    to_qcow2(&disk, &q).unwrap();
    let info = ok("qemu-img", &["info", "--output=json", s(&q)]);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", s(&disk), s(&q)],
    );
    let err = to_qcow2(&dir.path().join("missing.raw"), &q)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("qemu-img failed") && err.contains("missing.raw"),
        "{err}"
    );
}

// ---------------------------------------------------------------- ESP

fn esp_files(dir: &Path) -> Vec<(String, PathBuf)> {
    let boot = dir.join("systemd-bootx64.efi");
    let conf = dir.join("loader.conf");
    let kernel = dir.join("vmlinuz");
    fs::write(&boot, pseudo_binary(90_000, 4)).unwrap();
    fs::write(&conf, "timeout 0\n").unwrap();
    fs::write(&kernel, pseudo_binary(2_000_000, 5)).unwrap();
    vec![
        ("EFI/BOOT/BOOTX64.EFI".into(), boot),
        ("loader/loader.conf".into(), conf),
        ("caisson/1.0.0-a/vmlinuz".into(), kernel.clone()),
        ("loader/entries/caisson-1.0.0-a.conf".into(), kernel),
    ]
}

#[test]
fn esp_passes_fsck_fat_reads_back_and_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let files = esp_files(dir.path());
    let a = dir.path().join("esp-a.img");
    make_esp(&files, &a, 64 * MIB, EPOCH, "host").unwrap();
    ok("fsck.fat", &["-n", s(&a)]);
    let conf = ok("mtype", &["-i", s(&a), "::/loader/loader.conf"]);
    assert_eq!(conf, "timeout 0\n");
    let listing = ok("mdir", &["-i", s(&a), "::/caisson/1.0.0-a"]);
    assert!(
        listing.contains("vmlinuz") && listing.contains("2023-11-14  22:13"),
        "{listing}"
    );
    assert!(listing.contains("Volume in drive : is ESP"), "{listing}");
    let out = dir.path().join("k");
    ok(
        "mcopy",
        &["-i", s(&a), "::/caisson/1.0.0-a/vmlinuz", s(&out)],
    );
    assert_eq!(fs::read(&out).unwrap(), fs::read(&files[2].1).unwrap());

    // Host file times do not matter; the epoch does (FAT times have a 2 s resolution).
    for (_, f) in &files {
        touch(f, 1_000_000_000);
    }
    let b = dir.path().join("esp-b.img");
    make_esp(&files, &b, 64 * MIB, EPOCH, "host").unwrap();
    assert!(
        fs::read(&a).unwrap() == fs::read(&b).unwrap(),
        "two ESP builds differ"
    );
    make_esp(&files, &b, 64 * MIB, EPOCH + 86_400, "host").unwrap();
    assert!(fs::read(&a).unwrap() != fs::read(&b).unwrap());

    let c = dir.path().join("esp-c.img");
    let small = make_esp(&files, &c, 2 * MIB, EPOCH, "host")
        .unwrap_err()
        .to_string();
    assert!(small.contains("at least 33 MiB"), "{small}");
    let huge = dir.path().join("huge");
    fs::File::create(&huge).unwrap().set_len(34 * MIB).unwrap();
    let full = make_esp(&[("huge".into(), huge)], &c, 33 * MIB, EPOCH, "host").unwrap_err();
    let full = full.to_string();
    assert!(
        full.starts_with("mcopy failed") && full.contains("huge"),
        "{full}"
    );
    assert!(!c.exists(), "no partial ESP left under the output name");
    let hidden: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "temporary files left: {hidden:?}");
}

// ---------------------------------------------------------------- erofs + verity

fn fs_part(payload: &Path, p: &RootPayload, out: &Path) {
    let bytes = fs::read(payload).unwrap();
    fs::write(out, &bytes[..p.verity.hash_offset as usize]).unwrap();
}

fn verity_verify(data: &Path, p: &RootPayload) -> Output {
    let offset = format!("--hash-offset={}", p.verity.hash_offset);
    let root = hex::encode(p.verity.root_hash);
    run("veritysetup", &["verify", s(data), s(data), &root, &offset])
}

#[test]
fn root_payload_passes_fsck_erofs_and_veritysetup_and_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    make_rootfs(&rootfs, 1_600_000_000);
    std::os::unix::fs::chown(rootfs.join("etc/os-release"), Some(1000), Some(1000)).unwrap();
    let a = dir.path().join("a.img");
    let p = make_root_payload(&rootfs, &a, EPOCH, "host").unwrap();

    assert_eq!(fs::metadata(&a).unwrap().len(), p.size);
    assert_eq!(p.verity.hash_offset % 4096, 0);
    let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(fs::read(&a).unwrap()).into();
    assert_eq!(digest, p.sha256);

    let fs_only = dir.path().join("fs.img");
    fs_part(&a, &p, &fs_only);
    ok("fsck.erofs", &[s(&fs_only)]);
    let x = dir.path().join("extract");
    ok(
        "fsck.erofs",
        &[&format!("--extract={}", s(&x)), s(&fs_only)],
    );
    assert_eq!(
        fs::read(x.join("usr/lib/caisson/big")).unwrap(),
        fs::read(rootfs.join("usr/lib/caisson/big")).unwrap()
    );
    let info = ok("dump.erofs", &["--path=/etc/os-release", s(&fs_only)]);
    assert!(info.contains("Uid: 0   Gid: 0"), "{info}");
    assert!(info.contains("Timestamp: 2023-11-14 22:13:20"), "{info}");

    let v = verity_verify(&a, &p);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let dump = ok(
        "veritysetup",
        &[
            "dump",
            s(&a),
            &format!("--hash-offset={}", p.verity.hash_offset),
        ],
    );
    assert!(dump.contains(&hex::encode(p.verity.salt)), "{dump}");
    assert!(dump.contains(&p.verity_uuid.to_string()), "{dump}");
    assert!(
        dump.contains(&format!("Data blocks:     \t{}", p.verity.data_blocks)),
        "{dump}"
    );

    // One flipped bit in the filesystem and veritysetup refuses it.
    let mut bad = fs::read(&a).unwrap();
    bad[4096 * 2 + 100] ^= 1;
    let bad_path = dir.path().join("bad.img");
    fs::write(&bad_path, bad).unwrap();
    assert!(!verity_verify(&bad_path, &p).status.success());

    // Source mtimes do not matter; the epoch does.
    make_rootfs(&dir.path().join("rootfs2"), 1_650_000_000);
    let b = dir.path().join("b.img");
    let p2 = make_root_payload(&dir.path().join("rootfs2"), &b, EPOCH, "host").unwrap();
    assert_eq!(p, p2);
    assert!(
        fs::read(&a).unwrap() == fs::read(&b).unwrap(),
        "two erofs builds differ"
    );
    let p3 = make_root_payload(&rootfs, &b, EPOCH + 1, "host").unwrap();
    assert_ne!(p.verity.root_hash, p3.verity.root_hash);

    let e = make_root_payload(&dir.path().join("nope"), &b, EPOCH, "host").unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

// ---------------------------------------------------------------- ext4

fn state_content(dir: &Path, mtime: u64) -> PathBuf {
    let c = dir.join(format!("state-{mtime}"));
    fs::create_dir_all(c.join("lib/caisson/etc/upper")).unwrap();
    fs::write(c.join("lib/caisson/marker"), "hello\n").unwrap();
    std::os::unix::fs::symlink("marker", c.join("lib/caisson/link")).unwrap();
    touch(&c.join("lib/caisson/marker"), mtime);
    c
}

#[test]
fn state_passes_e2fsck_is_root_owned_and_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let c1 = state_content(dir.path(), 1_600_000_000);
    std::os::unix::fs::chown(c1.join("lib/caisson/marker"), Some(1000), Some(1000)).unwrap();
    let a = dir.path().join("a.img");
    make_state_fs(Some(&c1), &a, 32 * MIB, EPOCH, "host").unwrap();
    assert_eq!(fs::metadata(&a).unwrap().len(), 32 * MIB);
    ok("e2fsck", &["-fn", s(&a)]);
    let header = ok("dumpe2fs", &["-h", s(&a)]);
    assert!(
        header.contains("Filesystem volume name:   state"),
        "{header}"
    );
    let uuid = partition::derive_guid("host", "state ext4").to_string();
    assert!(header.contains(&uuid), "{header}");
    let stat = ok("debugfs", &["-R", "stat /lib/caisson/marker", s(&a)]);
    assert!(stat.contains("User:     0   Group:     0"), "{stat}");
    assert!(stat.contains("mtime: 0x6553f100"), "{stat}");
    let cat = ok("debugfs", &["-R", "cat /lib/caisson/marker", s(&a)]);
    assert_eq!(cat, "hello\n");

    let c2 = state_content(dir.path(), 1_650_000_000);
    let b = dir.path().join("b.img");
    make_state_fs(Some(&c2), &b, 32 * MIB, EPOCH, "host").unwrap();
    assert!(
        fs::read(&a).unwrap() == fs::read(&b).unwrap(),
        "two ext4 builds differ"
    );

    make_state_fs(None, &b, 16 * MIB, EPOCH, "host").unwrap();
    ok("e2fsck", &["-fn", s(&b)]);
    let e = make_state_fs(None, &b, 1000, EPOCH, "host").unwrap_err();
    assert!(e.to_string().contains("4 KiB"), "{e}");
}

// ---------------------------------------------------------------- the whole disk, unprivileged

/// Builds every format into `dir` and returns the disk layout and root payload.
fn build_all(dir: &Path) -> (DiskLayout, RootPayload) {
    check_host_tools(&Tool::ALL).unwrap();
    let rootfs = dir.join("rootfs");
    make_rootfs(&rootfs, 1_600_000_000);
    let payload = dir.join("root.img");
    let root = make_root_payload(&rootfs, &payload, EPOCH, "host").unwrap();
    let initrd = dir.join("initrd");
    let entries = [
        CpioEntry::file_from("init", rootfs.join("usr/bin/hello"), 0o755),
        CpioEntry::file("etc/initrd-release", Vec::new(), 0o644),
    ];
    write_initramfs(&entries, EPOCH, &initrd).unwrap();
    let mut files = esp_files(dir);
    files.push(("caisson/1.0.0-a/initrd".into(), initrd));
    let esp = dir.join("esp.img");
    make_esp(&files, &esp, 40 * MIB, EPOCH, "host").unwrap();
    let state = dir.join("state.img");
    make_state_fs(
        Some(&state_content(dir, 1)),
        &state,
        16 * MIB,
        EPOCH,
        "host",
    )
    .unwrap();
    let parts = [
        PartitionContent {
            part: Part::Esp,
            size: 40 * MIB,
            content: Some(esp),
        },
        PartitionContent {
            part: Part::RootA,
            size: 24 * MIB,
            content: Some(payload),
        },
        PartitionContent {
            part: Part::RootB,
            size: 24 * MIB,
            content: None,
        },
        PartitionContent {
            part: Part::State,
            size: 32 * MIB,
            content: Some(state),
        },
    ];
    let layout = write_disk(&parts, &dir.join("disk.raw"), "host", "1.0.0").unwrap();
    to_qcow2(&dir.join("disk.raw"), &dir.join("disk.qcow2")).unwrap();
    (layout, root)
}

fn extract(disk: &Path, l: &PartitionInfo, out: &Path) {
    let bytes = fs::read(disk).unwrap();
    fs::write(out, &bytes[l.start as usize..(l.start + l.size) as usize]).unwrap();
}

/// Checks a disk built by `build_all` with the independent tools.
fn check_disk(dir: &Path, root: &RootPayload) {
    let disk = dir.join("disk.raw");
    ok("sfdisk", &["-V", s(&disk)]);
    let layout = read_layout(&disk).unwrap();
    let esp = dir.join("p-esp");
    extract(&disk, layout.get(Part::Esp).unwrap(), &esp);
    ok("fsck.fat", &["-n", s(&esp)]);
    let slot = dir.join("p-root-a");
    extract(&disk, layout.get(Part::RootA).unwrap(), &slot);
    let v = verity_verify(&slot, root);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    ok("fsck.erofs", &[s(&slot)]);
    let state = dir.join("p-state");
    extract(&disk, layout.get(Part::State).unwrap(), &state);
    ok("e2fsck", &["-fn", s(&state)]);
}

/// The inner half of `builds_without_root`: run as an unprivileged user in `CAISSON_DISK_TEST_DIR`.
#[test]
#[ignore = "run by builds_without_root as an unprivileged user"]
fn unprivileged_build_inner() {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        !uid_line.split_whitespace().skip(1).any(|u| u == "0"),
        "{uid_line}"
    );
    let dir = PathBuf::from(std::env::var_os("CAISSON_DISK_TEST_DIR").unwrap());
    let (_, root) = build_all(&dir);
    fs::write(dir.join("root-hash"), hex::encode(root.verity.root_hash)).unwrap();
}

#[test]
fn builds_without_root_and_reproducibly() {
    let tmp = tempfile::tempdir().unwrap();
    let as_nobody = tmp.path().join("nobody");
    fs::create_dir(&as_nobody).unwrap();
    fs::set_permissions(&as_nobody, fs::Permissions::from_mode(0o777)).unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = if nix_is_root() {
        let mut c = Command::new(which("setpriv"));
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    let out = cmd
        .args([
            "--exact",
            "unprivileged_build_inner",
            "--ignored",
            "--nocapture",
        ])
        .env("CAISSON_DISK_TEST_DIR", &as_nobody)
        .env("HOME", &as_nobody)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "unprivileged build failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let disk = as_nobody.join("disk.raw");
    if nix_is_root() {
        assert_eq!(fs::metadata(&disk).unwrap().uid(), 65534, "made by nobody");
    }

    // The same build as this user is byte-identical, and passes every checker.
    let here = tmp.path().join("here");
    fs::create_dir(&here).unwrap();
    let (_, root) = build_all(&here);
    assert_eq!(
        fs::read_to_string(as_nobody.join("root-hash")).unwrap(),
        hex::encode(root.verity.root_hash)
    );
    for f in [
        "disk.raw",
        "disk.qcow2",
        "root.img",
        "esp.img",
        "state.img",
        "initrd",
    ] {
        assert!(
            fs::read(here.join(f)).unwrap() == fs::read(as_nobody.join(f)).unwrap(),
            "{f} differs"
        );
    }
    check_disk(&here, &root);
}

fn nix_is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}
