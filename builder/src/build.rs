//! `caisson build`: spec → packages → root → erofs + verity → initramfs → ESP → GPT disk →
//! qcow2 and update bundle. Work happens in a temporary directory beside the outputs; outputs
//! are written under temporary names and renamed at the end, so a failed build leaves nothing
//! under an output name.

use crate::binaries;
use crate::kernel::Kernel;
use crate::lockfile::{self, ImageLock};
use crate::rootfs;
use crate::spec::{self, Format, LoadedSpec};
use caisson_debian::{Archive, Cache};
use caisson_disk::{CpioEntry, PartitionContent};
use caisson_layout::cmdline::BootParams;
use caisson_layout::partition::{self, Part};
use caisson_layout::{entry, paths, EntryName, Slot};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Modules stage 1 needs to find, verify and mount the root and state (dependencies are added).
/// Crypto providers come first: libcrc32c (needed by erofs and ext4) asks for a crc32c
/// implementation when it loads, a soft dependency `modules.dep` does not list.
pub const INITRD_MODULES: &[&str] = &[
    "crc32c_generic",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "ahci",
    "dm_verity",
    "erofs",
    "ext4",
    "overlay",
];

/// Modules stage 2 always loads after SOURCE_MODULES: vfat for the ESP (blessing entries,
/// updates), the console channel and networking.
pub const ROOT_MODULES: &[&str] = &[
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859_1",
    "virtio_console",
    "virtio_net",
    "af_packet",
];

/// What the machine-config search needs from the kernel: QEMU's fw_cfg (config drives and the
/// ESP are read in user space, provision/CONFIG.md). Stage 2 loads these before any other
/// module, and on the first boot waits only for them.
pub const SOURCE_MODULES: &[&str] = &["qemu_fw_cfg"];

/// What can go wrong in a build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error(transparent)]
    Lock(#[from] lockfile::LockError),
    #[error(transparent)]
    Debian(#[from] caisson_debian::DebianError),
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    #[error(transparent)]
    Binaries(#[from] binaries::BinariesError),
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    #[error(transparent)]
    Disk(#[from] caisson_disk::DiskError),
    #[error(transparent)]
    Bundle(#[from] caisson_update::bundle::BundleError),
    #[error("keeping slot a's chunk index on the state partition: {0}")]
    ChunkCache(#[from] caisson_update::chunk_cache::CacheError),
    #[error("--version {0:?}: {1}")]
    Version(String, String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the root payload is {payload} bytes but partitions.slot is {slot} bytes in {spec}: \
         raise partitions.slot (leave headroom for later versions)"
    )]
    SlotTooSmall {
        payload: u64,
        slot: u64,
        spec: PathBuf,
    },
    #[error("SOURCE_DATE_EPOCH={0:?} is not a whole number of seconds")]
    Epoch(String),
    #[error("{0} is not in the package {1}")]
    MissingInPackage(String, String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
    let path = path.to_path_buf();
    move |source| BuildError::Io { what, path, source }
}

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub spec: PathBuf,
    pub out_dir: PathBuf,
    /// Overrides the spec's version.
    pub version: Option<String>,
    /// Overrides the spec's and the host's mirror.
    pub mirror: Option<String>,
    /// Refuse to resolve: the lock must exist and match.
    pub locked: bool,
    /// Take prebuilt binaries from here instead of building them.
    pub binaries: Option<PathBuf>,
    /// Timestamp for every file (SOURCE_DATE_EPOCH).
    pub epoch: u64,
    /// Progress bars on a terminal.
    pub progress: bool,
}

/// What a build produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildOutputs {
    pub image: String,
    pub version: String,
    pub raw: Option<PathBuf>,
    pub qcow2: Option<PathBuf>,
    pub bundle: Option<PathBuf>,
    pub manifest: Option<PathBuf>,
    pub root_payload_bytes: u64,
    pub initramfs_bytes: u64,
    pub verity_root_hash: String,
    /// Seconds spent in each phase, in order.
    pub phases: Vec<(String, f64)>,
}

struct Phases {
    list: Vec<(String, f64)>,
    start: Instant,
}

impl Phases {
    fn new() -> Self {
        Phases {
            list: Vec::new(),
            start: Instant::now(),
        }
    }
    fn done(&mut self, name: &str) {
        let secs = self.start.elapsed().as_secs_f64();
        log::info!("{name}: {secs:.2} s");
        self.list.push((name.to_string(), secs));
        self.start = Instant::now();
    }
}

/// The archive a build uses: `--mirror`, else the spec's, else the build host's apt mirror.
pub fn archive(spec: &LoadedSpec, mirror: Option<&str>) -> Result<Archive, BuildError> {
    let mirror = match mirror.or(spec.spec.packages.mirror.as_deref()) {
        Some(m) => m.to_string(),
        None => caisson_debian::host_mirror(
            Path::new(caisson_debian::HOST_APT_DIR),
            &spec.spec.packages.suite,
        )?,
    };
    Ok(Archive {
        mirror,
        suite: spec.spec.packages.suite.clone(),
        components: vec!["main".into()],
        arch: "amd64".into(),
    })
}

/// Builds an image.
pub fn build(opts: &BuildOptions) -> Result<BuildOutputs, BuildError> {
    let mut phases = Phases::new();
    let spec = spec::load(&opts.spec)?;
    let name = spec.spec.image.name.clone();
    let version = match &opts.version {
        Some(v) => {
            spec::check_version(v).map_err(|why| BuildError::Version(v.clone(), why))?;
            v.clone()
        }
        None => spec.spec.image.version.clone(),
    };
    caisson_disk::check_host_tools(&caisson_disk::Tool::ALL)?;
    std::fs::create_dir_all(&opts.out_dir).map_err(io_err("creating", &opts.out_dir))?;
    let work = tempfile::Builder::new()
        .prefix(".caisson-build-")
        .tempdir_in(&opts.out_dir)
        .map_err(io_err("creating a work directory in", &opts.out_dir))?;
    let work = work.path();
    phases.done("spec");

    let archive = archive(&spec, opts.mirror.as_deref())?;
    let cache = Cache::from_env()?;
    let lock = lockfile::ensure(&spec, &archive, &cache, opts.locked, opts.progress)?;
    phases.done("resolve");
    let debs = Debs {
        rootfs: caisson_debian::fetch(&archive, &cache, &lock.rootfs, opts.progress)?,
        kernel: caisson_debian::fetch(&archive, &cache, &lock.kernel, opts.progress)?,
        boot: caisson_debian::fetch(&archive, &cache, &lock.boot, opts.progress)?,
    };
    phases.done("fetch");

    let bins = binaries::wanted(&spec.spec.image.binaries);
    let bin_paths = match &opts.binaries {
        Some(dir) => binaries::locate(dir, &bins)?,
        None => binaries::build(&binaries::find_workspace(&opts.spec)?, &bins)?,
    };
    phases.done("binaries");

    let kernel = Kernel::open(&kernel_tree(&cache, &lock, &debs.kernel)?)?;
    let boot_dir = work.join("boot");
    for deb in &debs.boot {
        caisson_debian::extract(deb, &boot_dir)?;
    }
    let boot_efi = boot_dir.join(lockfile::BOOT_EFI_IN_PACKAGE);
    if !boot_efi.is_file() {
        return Err(BuildError::MissingInPackage(
            lockfile::BOOT_EFI_IN_PACKAGE.into(),
            lockfile::BOOT_PACKAGE.into(),
        ));
    }
    phases.done("kernel");

    let root = work.join("root");
    assemble_root(&spec, &version, &lock, &debs, &bin_paths, &kernel, &root)?;
    phases.done("rootfs");

    let payload_path = work.join("root.img");
    let payload = caisson_disk::make_root_payload(&root, &payload_path, opts.epoch, &name)?;
    if payload.size > spec.sizes.slot {
        return Err(BuildError::SlotTooSmall {
            payload: payload.size,
            slot: spec.sizes.slot,
            spec: spec.path.clone(),
        });
    }
    phases.done("erofs+verity");

    let initrd = work.join("initrd");
    let init_bin = bin_paths
        .iter()
        .find(|p| p.ends_with("caisson-init"))
        .cloned()
        .unwrap_or_default();
    write_initramfs(&kernel, &init_bin, &initrd, opts.epoch)?;
    let initramfs_bytes = file_size(&initrd)?;
    phases.done("initramfs");

    let params = BootParams {
        version: version.clone(),
        slot: Slot::A,
        root: partition::partition_guid(&name, Part::RootA),
        state: partition::partition_guid(&name, Part::State),
        esp: partition::partition_guid(&name, Part::Esp),
        verity: Some(payload.verity),
        debug: false,
    };
    let cmdline_extra = spec.spec.kernel.cmdline.join(" ");
    let esp_dir = work.join("esp");
    let esp_files = esp_content(
        &esp_dir,
        &boot_efi,
        &kernel.vmlinuz,
        &initrd,
        &params,
        &cmdline_extra,
    )?;
    let esp_img = work.join("esp.img");
    caisson_disk::make_esp(&esp_files, &esp_img, spec.sizes.esp, opts.epoch, &name)?;
    phases.done("esp");

    let state_img = work.join("state.img");
    let state_dir = work.join("state");
    if bins.iter().any(|b| b == "caisson-update") {
        seed_chunk_cache(&state_dir, &payload.verity.root_hash, &payload_path)?;
    }
    let state_content = state_dir.is_dir().then_some(state_dir.as_path());
    caisson_disk::make_state_fs(
        state_content,
        &state_img,
        spec.sizes.state,
        opts.epoch,
        &name,
    )?;
    phases.done("state");

    let stem = format!("{name}-{version}");
    let formats = &spec.spec.output.formats;
    let raw_path = opts.out_dir.join(format!("{stem}.raw"));
    // The raw disk is needed for qcow2 too; when only qcow2 is wanted it stays in the work dir.
    let raw_tmp = if formats.contains(&Format::Raw) {
        raw_path.clone()
    } else {
        work.join("disk.raw")
    };
    let parts = [
        PartitionContent {
            part: Part::Esp,
            size: spec.sizes.esp,
            content: Some(esp_img),
        },
        PartitionContent {
            part: Part::RootA,
            size: spec.sizes.slot,
            content: Some(payload_path.clone()),
        },
        PartitionContent {
            part: Part::RootB,
            size: spec.sizes.slot,
            content: None,
        },
        PartitionContent {
            part: Part::State,
            size: spec.sizes.state,
            content: Some(state_img),
        },
    ];
    let mut outputs = BuildOutputs {
        image: name.clone(),
        version: version.clone(),
        raw: None,
        qcow2: None,
        bundle: None,
        manifest: None,
        root_payload_bytes: payload.size,
        initramfs_bytes,
        verity_root_hash: hex::encode(payload.verity.root_hash),
        phases: Vec::new(),
    };
    if formats.contains(&Format::Raw) || formats.contains(&Format::Qcow2) {
        caisson_disk::write_disk(&parts, &raw_tmp, &name, &version)?;
        if formats.contains(&Format::Raw) {
            outputs.raw = Some(raw_path.clone());
        }
        phases.done("disk");
    }
    if formats.contains(&Format::Qcow2) {
        let q = opts.out_dir.join(format!("{stem}.qcow2"));
        caisson_disk::to_qcow2(&raw_tmp, &q)?;
        outputs.qcow2 = Some(q);
        phases.done("qcow2");
    }
    if formats.contains(&Format::Bundle) {
        let bundle_path = opts.out_dir.join(format!("{stem}.bundle"));
        let manifest = caisson_update::bundle::write_bundle(
            &caisson_update::bundle::BundleInput {
                image: &name,
                version: &version,
                build_time: opts.epoch,
                verity: payload.verity,
                cmdline_extra: &cmdline_extra,
                root: &payload_path,
                kernel: &kernel.vmlinuz,
                initrd: &initrd,
            },
            &bundle_path,
        )?;
        let manifest_path = opts.out_dir.join(format!("{stem}.manifest.json"));
        let tmp = opts.out_dir.join(format!(".{stem}.manifest.json.partial"));
        std::fs::write(&tmp, manifest.to_json()).map_err(io_err("writing", &tmp))?;
        std::fs::rename(&tmp, &manifest_path).map_err(io_err("renaming into", &manifest_path))?;
        outputs.bundle = Some(bundle_path);
        outputs.manifest = Some(manifest_path);
        phases.done("bundle");
    }
    outputs.phases = phases.list;
    Ok(outputs)
}

/// The extracted kernel package with its `modules.dep`, kept in the cache under the packages'
/// hashes: extracting and indexing 70 MB of modules is the slowest part of a warm build.
fn kernel_tree(cache: &Cache, lock: &ImageLock, debs: &[PathBuf]) -> Result<PathBuf, BuildError> {
    let key: Vec<&str> = lock
        .kernel
        .packages
        .iter()
        .map(|p| p.sha256.as_str())
        .collect();
    let dir = cache.root().join("kernels").join(key.join("-"));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for deb in debs {
        caisson_debian::extract(deb, &tmp)?;
    }
    // Indexes the modules (depmod) inside the temporary tree before it is published.
    Kernel::open(&tmp)?;
    let marker = tmp.join(".complete");
    std::fs::write(&marker, b"").map_err(io_err("writing", &marker))?;
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        // Another build published the same tree first: use it.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join(".complete").exists() {
            return Err(io_err("renaming into", &dir)(e));
        }
    }
    Ok(dir)
}

struct Debs {
    rootfs: Vec<PathBuf>,
    kernel: Vec<PathBuf>,
    boot: Vec<PathBuf>,
}

fn file_size(p: &Path) -> Result<u64, BuildError> {
    Ok(std::fs::metadata(p).map_err(io_err("reading", p))?.len())
}

fn assemble_root(
    spec: &LoadedSpec,
    version: &str,
    lock: &ImageLock,
    debs: &Debs,
    bins: &[PathBuf],
    kernel: &Kernel,
    root: &Path,
) -> Result<(), BuildError> {
    let name = &spec.spec.image.name;
    rootfs::skeleton(root)?;
    rootfs::install_packages(root, &debs.rootfs)?;
    rootfs::prune(root, &spec.spec.packages.exclude)?;
    rootfs::system_files(root, name, version)?;
    rootfs::install_binaries(root, bins)?;
    rootfs::install_services(root, &spec.path, &spec.spec.services)?;
    rootfs::install_spec_files(
        root,
        &spec.files_dir(),
        &spec.spec.files,
        &spec.spec.directories,
    )?;
    rootfs::install_update(root, spec.dir(), &spec.spec.update)?;
    // Stage 2 loads three lists on a thread, in order: SOURCE_MODULES (the machine-config
    // sources), ROOT_MODULES (the ESP, the control channel, the network), then the spec's
    // modules. Each module goes in the first list whose closure holds it.
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let sources = kernel.closure(&names(SOURCE_MODULES))?;
    let early: Vec<String> = kernel
        .closure(&names(ROOT_MODULES))?
        .into_iter()
        .filter(|m| !sources.contains(m))
        .collect();
    let late: Vec<String> = kernel
        .closure(&spec.spec.kernel.modules)?
        .into_iter()
        .filter(|m| !sources.contains(m) && !early.contains(m))
        .collect();
    rootfs::install_modules(
        root,
        &kernel.root,
        &sources,
        paths::ROOT_MODULES_SOURCES_LIST,
    )?;
    rootfs::install_modules(root, &kernel.root, &early, paths::ROOT_MODULES_LIST)?;
    rootfs::install_modules(root, &kernel.root, &late, paths::ROOT_MODULES_LATE_LIST)?;
    let packages: Vec<rootfs::SbomPackage> = lock
        .rootfs
        .packages
        .iter()
        .chain(&lock.kernel.packages)
        .map(|p| rootfs::SbomPackage {
            name: p.name.clone(),
            version: p.version.clone(),
            sha256: p.sha256.clone(),
        })
        .collect();
    rootfs::write_sbom(root, name, version, &packages)?;
    Ok(())
}

/// The initramfs: the init, its marker, and the modules stage 1 loads, in order.
fn write_initramfs(
    kernel: &Kernel,
    init_bin: &Path,
    out: &Path,
    epoch: u64,
) -> Result<(), BuildError> {
    let wanted: Vec<String> = INITRD_MODULES.iter().map(|s| s.to_string()).collect();
    let modules = kernel.closure(&wanted)?;
    let mut entries = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for d in [
        "proc",
        "sys",
        "dev",
        "run",
        "sysroot",
        "etc/caisson",
        "usr/bin",
    ] {
        dirs.insert(d.to_string());
    }
    for m in &modules {
        let mut p = Path::new(m);
        while let Some(parent) = p.parent() {
            if parent.as_os_str().is_empty() {
                break;
            }
            dirs.insert(parent.to_string_lossy().into_owned());
            p = parent;
        }
    }
    for d in &dirs {
        entries.push(CpioEntry::dir(d, 0o755));
    }
    entries.push(CpioEntry::file_from("init", init_bin.to_path_buf(), 0o755));
    entries.push(CpioEntry::symlink("usr/bin/caisson-init", "../../init"));
    entries.push(CpioEntry::file(
        paths::INITRD_MARKER.trim_start_matches('/'),
        b"NAME=\"Caisson initramfs\"\nID=caisson\n".to_vec(),
        0o644,
    ));
    let list: String = modules.iter().map(|m| format!("/{m}\n")).collect();
    entries.push(CpioEntry::file(
        paths::INITRD_MODULES_LIST.trim_start_matches('/'),
        list.into_bytes(),
        0o644,
    ));
    for m in &modules {
        entries.push(CpioEntry::file_from(m, kernel.root.join(m), 0o644));
    }
    caisson_disk::write_initramfs(&entries, epoch, out)?;
    Ok(())
}

/// Lays out the ESP's files: systemd-boot, loader.conf, slot A's kernel, initramfs and entry.
fn esp_content(
    dir: &Path,
    boot_efi: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    params: &BootParams,
    cmdline_extra: &str,
) -> Result<Vec<(String, PathBuf)>, BuildError> {
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let loader_conf = dir.join("loader.conf");
    std::fs::write(&loader_conf, entry::LOADER_CONF).map_err(io_err("writing", &loader_conf))?;
    let entry_name = EntryName::new_blessed(&params.version, params.slot);
    let entry_path = dir.join(entry_name.to_string());
    std::fs::write(&entry_path, entry::render(params, cmdline_extra))
        .map_err(io_err("writing", &entry_path))?;
    Ok(vec![
        (paths::ESP_BOOT_EFI.to_string(), boot_efi.to_path_buf()),
        (paths::ESP_LOADER_CONF.to_string(), loader_conf),
        (
            format!("{}/{}", paths::ESP_ENTRIES_DIR, entry_name),
            entry_path,
        ),
        (
            paths::esp_kernel(&params.version, params.slot),
            vmlinuz.to_path_buf(),
        ),
        (
            paths::esp_initrd(&params.version, params.slot),
            initrd.to_path_buf(),
        ),
    ])
}

/// `SOURCE_DATE_EPOCH` when set, else the time of the last git commit, else 0: the same
/// sources give the same image.
pub fn source_date_epoch() -> Result<u64, BuildError> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v.trim().parse().map_err(|_| BuildError::Epoch(v.clone()));
    }
    let git = std::process::Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .output();
    Ok(git
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0))
}

/// A human summary of a build.
pub fn print_summary(o: &BuildOutputs) {
    println!("built {} {}", o.image, o.version);
    for (what, p) in [
        ("raw", &o.raw),
        ("qcow2", &o.qcow2),
        ("bundle", &o.bundle),
        ("manifest", &o.manifest),
    ] {
        if let Some(p) = p {
            println!("  {what:<9} {}", p.display());
        }
    }
    println!(
        "  root payload {} KiB, initramfs {} KiB, verity root {}",
        o.root_payload_bytes / 1024,
        o.initramfs_bytes / 1024,
        o.verity_root_hash
    );
    let total: f64 = o.phases.iter().map(|(_, s)| s).sum();
    let phases: Vec<String> = o
        .phases
        .iter()
        .map(|(n, s)| format!("{n} {s:.2}s"))
        .collect();
    println!("  {total:.1} s: {}", phases.join(", "));
}

/// Puts slot a's chunk index into the state partition's content, where `caisson-update` keeps
/// the index of each installed slot: the first update after an install then copies the chunks
/// it can by that index instead of cutting and hashing the whole running slot first (the same
/// as every later update, whose apply keeps the index it fetched).
fn seed_chunk_cache(state_dir: &Path, root: &[u8; 32], payload: &Path) -> Result<(), BuildError> {
    let dir = state_dir.join(caisson_update::chunk_cache::dir_in_state_partition());
    Ok(caisson_update::chunk_cache::store_payload(
        &dir, root, payload,
    )?)
}
