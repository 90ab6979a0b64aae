//! What the updater remembers on the state partition (`/var/lib/caisson/update/`): the last
//! result, the update waiting for its first healthy boot, the versions never to offer again, and
//! the progress of a running apply.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The directory on a machine.
pub const STATE_DIR: &str = "/var/lib/caisson/update";
/// The same directory inside the state partition, which the machine mounts at `/var` (where an
/// image builder puts what a new machine's updater should find).
pub const STATE_DIR_IN_PARTITION: &str = "lib/caisson/update";
const RECORD_FILE: &str = "state.json";
/// The flock that serializes changes (see [`Records::lock`]).
pub const LOCK_FILE: &str = "update.lock";
const PROGRESS_FILE: &str = "progress.json";

/// A record that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why} (remove it to start over)")]
    Parse { path: PathBuf, why: String },
    #[error(
        "another caisson-update is changing this machine ({holder}; it holds {path}); waited \
         {waited_s} s: try again once it is done (`caisson-update status` shows its progress; \
         a network apply gives up by itself when its server stalls)"
    )]
    Busy {
        path: PathBuf,
        holder: String,
        waited_s: u64,
    },
}

/// The outcome of the last update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "result")]
pub enum Outcome {
    /// Written into the inactive slot; boots next.
    Applied { version: String, at: u64 },
    /// Booted and blessed.
    Succeeded { version: String, at: u64 },
    /// The boot loader fell back from this version.
    RolledBack { from: String, to: String, at: u64 },
    /// Refused or failed before anything was switched.
    Failed {
        version: Option<String>,
        error: String,
        at: u64,
    },
}

/// Everything in `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(default)]
    pub last: Option<Outcome>,
    /// Applied, not yet booted and blessed.
    #[serde(default)]
    pub pending: Option<String>,
    /// Versions that failed on this machine: never offered again.
    #[serde(default)]
    pub rejected: Vec<String>,
}

/// How far a running apply is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRecord {
    pub version: String,
    pub step: String,
    pub done: u64,
    pub total: u64,
    pub at: u64,
}

/// How long a change waits for another one's lock by default: a rollback or an `apply --file`
/// does not wait forever behind an apply.
pub const LOCK_WAIT: Duration = Duration::from_secs(60);

/// The records directory.
#[derive(Debug, Clone)]
pub struct Records {
    dir: PathBuf,
    lock_wait: Duration,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RecordError {
    let path = path.to_path_buf();
    move |source| RecordError::Io { op, path, source }
}

/// Held while one process changes the slots, the ESP or the records (flock on `LOCK_FILE`, so it
/// is released when the process dies).
#[derive(Debug)]
pub struct ChangeLock {
    _file: std::fs::File,
}

impl Records {
    pub fn new(dir: &Path) -> Records {
        Records {
            dir: dir.to_path_buf(),
            lock_wait: LOCK_WAIT,
        }
    }

    /// The same records, whose [`Records::lock`] waits at most `wait` for another holder.
    pub fn with_lock_wait(self, wait: Duration) -> Records {
        Records {
            lock_wait: wait,
            ..self
        }
    }

    /// Where the chunk indexes of installed slots are kept ([`crate::chunk_cache`]).
    pub fn chunk_cache_dir(&self) -> PathBuf {
        self.dir.join(crate::chunk_cache::DIR)
    }

    /// Takes the machine's update lock, waiting while another `caisson-update` (the agent, an
    /// `apply` from the shell) holds it, at most the lock wait ([`LOCK_WAIT`]): two processes
    /// never write the ESP or a slot at once. `what` (e.g. `applying 2.0.0 from <url>`) is
    /// written into the lock file, so that a waiter can say who holds it.
    pub fn lock(&self, what: &str) -> Result<ChangeLock, RecordError> {
        std::fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        let path = self.dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        let started = Instant::now();
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err("locking", &path)(e)),
            }
            if started.elapsed() >= self.lock_wait {
                return Err(RecordError::Busy {
                    holder: holder(&path),
                    path,
                    waited_s: started.elapsed().as_secs(),
                });
            }
            if !told {
                told = true;
                log::info!(
                    "another caisson-update is changing this machine ({}); waiting up to {} s",
                    holder(&path),
                    self.lock_wait.as_secs()
                );
            }
            std::thread::sleep(LOCK_POLL);
        }
        // Advisory: a failure here only leaves a waiter without a name for the holder.
        let line = format!("pid {}: {what}\n{}\n", std::process::id(), now());
        let written = file
            .set_len(0)
            .and_then(|()| std::os::unix::fs::FileExt::write_all_at(&file, line.as_bytes(), 0));
        if let Err(e) = written {
            log::warn!("writing the holder into {}: {e}", path.display());
        }
        Ok(ChangeLock { _file: file })
    }

    pub fn load(&self) -> Result<Record, RecordError> {
        let p = self.dir.join(RECORD_FILE);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| RecordError::Parse {
                path: p,
                why: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
            Err(e) => Err(io_err("reading", &p)(e)),
        }
    }

    pub fn save(&self, r: &Record) -> Result<(), RecordError> {
        self.write(
            RECORD_FILE,
            &serde_json::to_vec_pretty(r).unwrap_or_default(),
            Durable::Yes,
        )
    }

    pub fn progress(&self) -> Option<ProgressRecord> {
        let b = std::fs::read(self.dir.join(PROGRESS_FILE)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    pub fn set_progress(&self, p: Option<&ProgressRecord>) -> Result<(), RecordError> {
        match p {
            // Written on every percent of an apply: a record for `status`, not worth a flush
            // of the state partition each time (the apply resumes from the slot, not from it).
            Some(p) => self.write(
                PROGRESS_FILE,
                &serde_json::to_vec(p).unwrap_or_default(),
                Durable::No,
            ),
            None => match std::fs::remove_file(self.dir.join(PROGRESS_FILE)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(io_err("removing", &self.dir.join(PROGRESS_FILE))(e))
                }
                _ => Ok(()),
            },
        }
    }

    /// Replaces `name` whole (a temporary file renamed over it), flushed to disk first when
    /// `durable`.
    fn write(&self, name: &str, bytes: &[u8], durable: Durable) -> Result<(), RecordError> {
        std::fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        let p = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).map_err(io_err("writing", &tmp))?;
        if durable == Durable::Yes {
            if let Ok(f) = std::fs::File::open(&tmp) {
                let _ = f.sync_all();
            }
        }
        std::fs::rename(&tmp, &p).map_err(io_err("renaming into", &p))
    }
}

/// How often a waiting change tries the lock again.
const LOCK_POLL: Duration = Duration::from_millis(100);

/// Who holds the lock at `path`, as its holder wrote it: `pid 123: applying 2.0.0 from <url>,
/// for 42 s`.
fn holder(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines = text.lines();
    let Some(who) = lines.next().filter(|l| !l.trim().is_empty()) else {
        return "a process that did not say what it does".into();
    };
    match lines.next().and_then(|l| l.trim().parse::<u64>().ok()) {
        Some(since) => format!("{who}, for {} s", now().saturating_sub(since)),
        None => who.to_string(),
    }
}

/// Whether a record is flushed to disk before it replaces the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durable {
    Yes,
    No,
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_dir_is_the_partition_dir_under_var() {
        assert_eq!(STATE_DIR, format!("/var/{STATE_DIR_IN_PARTITION}"));
    }

    #[test]
    fn a_second_change_waits_for_the_first() {
        let d = tempfile::tempdir().unwrap();
        let r = Records::new(&d.path().join("u"));
        let held = r.lock("applying 2.0.0").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let r2 = r.clone();
        let waiter = std::thread::spawn(move || {
            let second = r2.lock("rolling back").unwrap();
            tx.send(()).unwrap();
            drop(second);
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the second lock was granted while the first was held"
        );
        drop(held);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the second lock is granted once the first is dropped");
        waiter.join().unwrap();
        // Released when dropped: taken again at once.
        drop(r.lock("checking").unwrap());
    }

    #[test]
    fn a_change_waits_for_another_only_so_long_and_names_it() {
        let d = tempfile::tempdir().unwrap();
        let r = Records::new(&d.path().join("u"));
        let _held = r
            .lock("applying 2.0.0 from http://updates/host-2.0.0.bundle")
            .unwrap();
        let waiting = r.clone().with_lock_wait(Duration::from_millis(300));
        let t0 = Instant::now();
        let err = waiting.lock("rolling back").unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let msg = err.to_string();
        let who = format!(
            "pid {}: applying 2.0.0 from http://updates/host-2.0.0.bundle, for ",
            std::process::id()
        );
        assert!(matches!(err, RecordError::Busy { .. }), "{msg}");
        assert!(msg.contains(&who) && msg.contains("update.lock"), "{msg}");
    }

    #[test]
    fn round_trip_and_missing_is_empty() {
        let d = tempfile::tempdir().unwrap();
        let r = Records::new(&d.path().join("u"));
        assert_eq!(r.load().unwrap(), Record::default());
        let rec = Record {
            last: Some(Outcome::RolledBack {
                from: "3".into(),
                to: "2".into(),
                at: 5,
            }),
            pending: None,
            rejected: vec!["3".into()],
        };
        r.save(&rec).unwrap();
        assert_eq!(r.load().unwrap(), rec);
        let text = std::fs::read_to_string(d.path().join("u/state.json")).unwrap();
        assert!(text.contains("rolled-back"), "{text}");
    }
}
