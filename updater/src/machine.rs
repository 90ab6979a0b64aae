//! The operations of `caisson-update` on one machine: status, check, apply, rollback, and the
//! bookkeeping after a boot (success, rollback). Everything is reached through [`Machine`], which
//! a real machine fills from `/proc/cmdline`, its GPT and its mounts, and a test from files.

use crate::apply::{self, ApplyStats, Progress, StopAfter, Target};
use crate::bundle::Manifest;
use crate::channel::{Index, Release};
use crate::download::{self, Document, FileSource, HttpSource, Limits, Source};
use crate::record::{self, Outcome, ProgressRecord, Record, Records};
use crate::sign::{self, Installed, Keyring};
use crate::slots::{Disk, Health, SlotState};
use crate::{waves, Error};
use caisson_layout::cmdline::BootParams;
use caisson_layout::osrelease::OsRelease;
use caisson_layout::{paths, Slot};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Where the updater mounts the ESP on a machine, in a directory of its own per process
/// (`esp/<pid>`): the agent keeps it mounted while an `apply` from the shell mounts it too, and
/// one mount point cannot take the same device twice. The init mounts it at /efi only to bless.
pub const ESP_MOUNT: &str = "/run/caisson/update/esp";

/// Everything the updater needs to know about the machine it runs on.
pub struct Machine {
    pub disk: Disk,
    /// Where the ESP is mounted.
    pub esp: PathBuf,
    pub booted: BootParams,
    pub image: String,
    pub keys_dir: PathBuf,
    pub records: Records,
    pub machine_id: String,
    /// Caps and deadlines of every network read.
    pub net: Limits,
    /// The init's record of a root that failed verification in this boot
    /// ([`paths::VERITY_FAILED`]): no chunk is copied from the slot it names.
    pub verity_failed: PathBuf,
    /// Keeps the ESP mounted while the machine is in use.
    _esp_mount: Option<EspMount>,
}

/// The ESP mounted for the updater; unmounted (after a sync) when dropped.
pub struct EspMount {
    target: PathBuf,
}

impl Drop for EspMount {
    fn drop(&mut self) {
        rustix::fs::sync();
        match rustix::mount::unmount(&self.target, rustix::mount::UnmountFlags::empty()) {
            Ok(()) => {
                let _ = std::fs::remove_dir(&self.target);
            }
            Err(e) => log::warn!("unmounting {}: {e}", self.target.display()),
        }
    }
}

fn mount_esp(dev: &Path, target: &Path) -> Result<EspMount, Error> {
    use rustix::mount::{mount, MountFlags};
    std::fs::create_dir_all(target).map_err(|source| Error::Io {
        op: "creating",
        path: target.to_path_buf(),
        source,
    })?;
    mount(
        dev,
        target,
        "vfat",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        Some(c"umask=0077"),
    )
    .map_err(|e| Error::Io {
        op: "mounting the ESP at",
        path: target.to_path_buf(),
        source: std::io::Error::other(format!("{} ({e})", dev.display())),
    })?;
    Ok(EspMount {
        target: target.to_path_buf(),
    })
}

impl Machine {
    /// The machine this process runs on.
    pub fn detect() -> Result<Machine, Error> {
        let read = |p: &str| {
            std::fs::read_to_string(p).map_err(|source| Error::Io {
                op: "reading",
                path: p.into(),
                source,
            })
        };
        let booted = BootParams::parse(&read("/proc/cmdline")?)
            .map_err(|e| Error::NotCaisson(e.to_string()))?;
        let os = OsRelease::parse(&read(caisson_layout::osrelease::PATH)?)
            .map_err(|e| Error::NotCaisson(e.to_string()))?;
        let disk_node = crate::slots::find_disk(Path::new("/"), booted.root)?;
        let disk = Disk::open(&disk_node)?;
        let disk_name = disk_node
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let esp_node = caisson_layout::blockdev::partition_node(
            Path::new("/"),
            &disk_name,
            disk.extent(caisson_layout::partition::Part::Esp).number,
        );
        let target = Path::new(ESP_MOUNT).join(std::process::id().to_string());
        let mount = mount_esp(&esp_node, &target)?;
        Ok(Machine {
            disk,
            esp: target,
            booted,
            image: os.image_id,
            keys_dir: PathBuf::from(paths::UPDATE_KEYS_DIR),
            records: Records::new(Path::new(record::STATE_DIR)),
            machine_id: std::fs::read_to_string("/etc/machine-id").unwrap_or_default(),
            net: Limits::default(),
            verity_failed: PathBuf::from(paths::VERITY_FAILED),
            _esp_mount: Some(mount),
        })
    }

    /// A machine made of files (tests, and offline inspection of a disk image).
    pub fn from_parts(
        disk: Disk,
        esp: &Path,
        booted: BootParams,
        image: &str,
        keys_dir: &Path,
        state_dir: &Path,
        machine_id: &str,
    ) -> Machine {
        Machine {
            disk,
            esp: esp.to_path_buf(),
            booted,
            image: image.to_string(),
            keys_dir: keys_dir.to_path_buf(),
            records: Records::new(state_dir),
            machine_id: machine_id.to_string(),
            net: Limits::default(),
            verity_failed: PathBuf::from(paths::VERITY_FAILED),
            _esp_mount: None,
        }
    }

    pub fn installed(&self) -> Installed {
        Installed {
            image: self.image.clone(),
            version: self.booted.version.clone(),
            arch: std::env::consts::ARCH.to_string(),
        }
    }

    pub fn slots(&self) -> Result<SlotState, Error> {
        Ok(SlotState::load_booted(&self.esp, &self.booted)?)
    }

    /// Records what the last boot tells: a pending update that booted and was blessed succeeded
    /// (its predecessor's unused files are removed); a version the boot loader fell back from is
    /// rejected for good. Returns the new outcome, if any.
    pub fn reconcile(&self) -> Result<Option<Outcome>, Error> {
        let _lock = self.records.lock("recording the last boot's result")?;
        let slots = self.slots()?;
        let mut rec = self.records.load()?;
        let now = record::now();
        let mut outcome = None;
        if let Some(from) = slots.rolled_back_from() {
            if !rec.rejected.contains(&from) {
                rec.rejected.push(from.clone());
                rec.pending = None;
                let o = Outcome::RolledBack {
                    from: from.clone(),
                    to: self.booted.version.clone(),
                    at: now,
                };
                log::warn!(
                    "rolled back from {from}: it never became healthy; running {} again, {from} will not be offered again",
                    self.booted.version
                );
                rec.last = Some(o.clone());
                outcome = Some(o);
            }
        } else if rec.pending.as_deref() == Some(self.booted.version.as_str())
            && slots.booted_is_blessed()
        {
            rec.pending = None;
            let o = Outcome::Succeeded {
                version: self.booted.version.clone(),
                at: now,
            };
            log::info!("update to {} succeeded", self.booted.version);
            rec.last = Some(o.clone());
            outcome = Some(o);
            slots.remove_unused_payloads()?;
        }
        if outcome.is_some() {
            self.records.save(&rec)?;
        }
        Ok(outcome)
    }

    /// True when `version` was applied and its entry in the other slot still waits to be tried:
    /// writing it again would only undo the work (and race the reboot that runs it).
    pub fn is_pending(&self, version: &str) -> Result<bool, Error> {
        let rec = self.records.load()?;
        if rec.pending.as_deref() != Some(version) {
            return Ok(false);
        }
        let slots = self.slots()?;
        let other = self.booted.slot.other();
        Ok(slots.health(other) == Health::Trying
            && slots.entry(other).is_some_and(|e| e.version == version))
    }

    /// The machine's state for `status`.
    pub fn status(&self) -> Result<Status, Error> {
        let slots = self.slots()?;
        let rec = self.records.load()?;
        let slot_status = |s: Slot| SlotStatus {
            slot: s.to_string(),
            entry: slots.entry(s).map(|e| e.to_string()),
            version: slots.entry(s).map(|e| e.version.clone()),
            health: slots.health(s),
            booted: s == self.booted.slot,
        };
        Ok(Status {
            image: self.image.clone(),
            version: self.booted.version.clone(),
            slot: self.booted.slot.to_string(),
            booted_entry: slots.booted_entry().map(|e| e.to_string()),
            blessed: slots.booted_is_blessed(),
            next_boot: slots.next_boot().map(|e| e.to_string()),
            rolled_back_from: slots.rolled_back_from(),
            slots: vec![slot_status(Slot::A), slot_status(Slot::B)],
            record: rec,
            progress: self.records.progress(),
            wave_seed: waves::seed(&self.machine_id),
        })
    }

    /// Looks for an update in the channel at `url`: the newest release newer than what runs and
    /// not rejected, its verified manifest, and when this machine's wave starts.
    pub fn check(&self, url: &str) -> Result<Option<Offer>, Error> {
        let client = download::client()?;
        let get = |url: &str, doc| download::get(&client, url, doc, &self.net);
        let index_url = download::join_url(url, crate::channel::INDEX);
        let index = Index::parse(&get(&index_url, Document::Index)?, &index_url)?;
        let rec = self.records.load()?;
        let Some(release) = index.newest_for(&self.image, &self.booted.version, &rec.rejected)
        else {
            return Ok(None);
        };
        let murl = download::join_url(url, &release.manifest);
        let bytes = get(&murl, Document::Manifest)?;
        let sig_url = format!("{murl}.{}", sign::SIG_EXT);
        let sig = get(&sig_url, Document::Signature)?;
        let keys = Keyring::load(&self.keys_dir)?;
        let (manifest, keyid) = sign::verify_bytes(
            &bytes,
            &String::from_utf8_lossy(&sig),
            Path::new(&murl),
            &keys,
        )?;
        sign::check(&manifest, &self.installed(), record::now())?;
        let wave_start = match (manifest.published_at, manifest.rollout_seconds) {
            (Some(p), Some(r)) => waves::start_time(waves::seed(&self.machine_id), p, r),
            (Some(p), None) => p,
            _ => 0,
        };
        Ok(Some(Offer {
            release: release.clone(),
            bundle_url: download::join_url(url, &release.bundle),
            manifest,
            keyid,
            wave_start,
        }))
    }

    /// Verifies a local manifest (signature beside it) for `apply --file`.
    pub fn local_manifest(&self, manifest: &Path) -> Result<Manifest, Error> {
        let keys = Keyring::load(&self.keys_dir)?;
        let (m, _) = sign::load_verified(manifest, &keys)?;
        sign::check(&m, &self.installed(), record::now())?;
        Ok(m)
    }

    /// Writes a verified manifest's update from `src` into the inactive slot and records it.
    pub fn apply(
        &self,
        m: &Manifest,
        src: &mut (dyn Source + Send),
        progress: &mut dyn Progress,
        stop: StopAfter,
    ) -> Result<ApplyStats, Error> {
        let what = format!("applying {} from {}", m.version, src.describe());
        let _lock = self.records.lock(&what)?;
        let rec = self.records.load()?;
        if rec.rejected.contains(&m.version) {
            return Err(Error::Rejected(m.version.clone()));
        }
        let chunk_cache = self.records.chunk_cache_dir();
        let target = Target {
            disk: &self.disk,
            esp: &self.esp,
            booted: &self.booted,
            chunk_cache: Some(&chunk_cache),
            running_slot_failed: crate::failed_slot::failed(&self.verity_failed, self.booted.slot),
        };
        let mut recorder = Recorder {
            inner: progress,
            records: &self.records,
            version: m.version.clone(),
            step: String::new(),
            last_pct: u64::MAX,
        };
        let result = apply::apply(&target, m, src, &mut recorder, stop);
        let _ = self.records.set_progress(None);
        let mut rec = self.records.load()?;
        match result {
            Ok((name, stats)) => {
                if stop == StopAfter::Never {
                    rec.pending = Some(m.version.clone());
                    rec.last = Some(Outcome::Applied {
                        version: m.version.clone(),
                        at: record::now(),
                    });
                    self.records.save(&rec)?;
                    log::info!(
                        "{} written to slot {} ({} chunks kept, {} copied locally, {} fetched in {} requests, {} bytes downloaded); next boot: {name}",
                        m.version,
                        self.booted.slot.other(),
                        stats.kept,
                        stats.copied,
                        stats.fetched,
                        stats.fetch_runs,
                        stats.downloaded_bytes
                    );
                }
                Ok(stats)
            }
            Err(e) => {
                rec.last = Some(Outcome::Failed {
                    version: Some(m.version.clone()),
                    error: e.to_string(),
                    at: record::now(),
                });
                self.records.save(&rec)?;
                Err(e.into())
            }
        }
    }

    /// Applies an offer fetched by [`Machine::check`].
    pub fn apply_offer(
        &self,
        offer: &Offer,
        progress: &mut dyn Progress,
    ) -> Result<ApplyStats, Error> {
        let mut src = HttpSource::new(&offer.bundle_url, self.net)?;
        self.apply(&offer.manifest, &mut src, progress, StopAfter::Never)
    }

    /// Applies a bundle file and its manifest (signature beside the manifest).
    pub fn apply_file(
        &self,
        bundle: &Path,
        manifest: &Path,
        progress: &mut dyn Progress,
    ) -> Result<ApplyStats, Error> {
        let m = self.local_manifest(manifest)?;
        // A local file can be checked whole before anything changes: a corrupted bundle is
        // refused with the machine exactly as it was.
        for a in &m.artifacts {
            crate::bundle::verify_artifact(bundle, a)?;
        }
        let mut src = FileSource::open(bundle)?;
        self.apply(&m, &mut src, progress, StopAfter::Never)
    }

    /// Makes the other slot boot next by giving up the running entry. Refused when the other slot
    /// has nothing bootable.
    pub fn rollback(&self) -> Result<String, Error> {
        let _lock = self.records.lock("rolling back")?;
        let mut slots = self.slots()?;
        let other = self.booted.slot.other();
        match slots.health(other) {
            Health::Good | Health::Trying => {}
            _ => {
                return Err(Error::NothingToRollBackTo {
                    slot: other,
                    why: match slots.entry(other) {
                        None => "it has no boot entry".into(),
                        Some(e) => format!("its entry {e} has no tries left"),
                    },
                })
            }
        }
        let to = slots
            .entry(other)
            .map(|e| e.version.clone())
            .unwrap_or_default();
        slots.give_up_booted();
        slots.write()?;
        rustix::fs::sync();
        Ok(to)
    }
}

/// An update this machine may take.
#[derive(Debug, Clone)]
pub struct Offer {
    pub release: Release,
    pub bundle_url: String,
    pub manifest: Manifest,
    pub keyid: String,
    /// When this machine's wave may start (seconds since the epoch).
    pub wave_start: u64,
}

/// Progress into the records (for `status`) and on to the caller's sink.
struct Recorder<'a> {
    inner: &'a mut dyn Progress,
    records: &'a Records,
    version: String,
    step: String,
    last_pct: u64,
}

impl Progress for Recorder<'_> {
    fn root(&mut self, done: u64, total: u64) {
        self.inner.root(done, total);
        let pct = done * 100 / total.max(1);
        if pct != self.last_pct {
            self.last_pct = pct;
            let _ = self.records.set_progress(Some(&ProgressRecord {
                version: self.version.clone(),
                step: self.step.clone(),
                done,
                total,
                at: record::now(),
            }));
        }
    }
    fn step(&mut self, what: &str) {
        self.step = what.to_string();
        self.inner.step(what);
    }
}

/// One slot in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    pub slot: String,
    pub entry: Option<String>,
    pub version: Option<String>,
    pub health: Health,
    pub booted: bool,
}

/// `caisson-update status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub image: String,
    pub version: String,
    pub slot: String,
    pub booted_entry: Option<String>,
    pub blessed: bool,
    pub next_boot: Option<String>,
    pub rolled_back_from: Option<String>,
    pub slots: Vec<SlotStatus>,
    pub record: Record,
    pub progress: Option<ProgressRecord>,
    pub wave_seed: u64,
}

impl Status {
    /// The human text.
    pub fn text(&self) -> String {
        let mut s = format!(
            "{} {} from slot {} ({})\n",
            self.image,
            self.version,
            self.slot,
            if self.blessed {
                "blessed"
            } else {
                "not yet blessed"
            }
        );
        if let Some(from) = &self.rolled_back_from {
            s += &format!("rolled back from {from}\n");
        }
        for sl in &self.slots {
            s += &format!(
                "  slot {}{}: {} {}\n",
                sl.slot,
                if sl.booted { " (booted)" } else { "" },
                sl.version.as_deref().unwrap_or("-"),
                serde_json::to_value(sl.health)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            );
        }
        if let Some(n) = &self.next_boot {
            s += &format!("next boot: {n}\n");
        }
        if let Some(p) = &self.progress {
            s += &format!(
                "applying {}: {} ({} of {} bytes)\n",
                p.version, p.step, p.done, p.total
            );
        }
        match &self.record.last {
            Some(Outcome::Applied { version, .. }) => {
                s += &format!("last: {version} applied, waiting for its boot\n")
            }
            Some(Outcome::Succeeded { version, .. }) => {
                s += &format!("last: update to {version} succeeded\n")
            }
            Some(Outcome::RolledBack { from, to, .. }) => {
                s += &format!("last: rolled back from {from} to {to}\n")
            }
            Some(Outcome::Failed { version, error, .. }) => {
                s += &format!(
                    "last: {} failed: {error}\n",
                    version.as_deref().unwrap_or("update")
                )
            }
            None => {}
        }
        if !self.record.rejected.is_empty() {
            s += &format!("never offered again: {}\n", self.record.rejected.join(", "));
        }
        s
    }
}
