//! Downloading the packages of a lock into the cache, several at once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use indicatif::ProgressBar;

use crate::archive::Archive;
use crate::cache::Cache;
use crate::error::DebianError;
use crate::http::{retry, Http};
use crate::lock::{Lock, LockedPackage};
use crate::progress::Reporter;

/// How many downloads run at once.
pub const PARALLEL: usize = 6;

/// Makes sure every package of `lock` is in `cache`, verified by size and sha256, downloading
/// the missing ones from `archive` (up to [`PARALLEL`] at once). Packages already cached are
/// re-hashed, not downloaded, so a locked build needs no network once the cache is warm.
/// Returns each package's cached `.deb`, in lock order.
pub fn fetch(
    archive: &Archive,
    cache: &Cache,
    lock: &Lock,
    progress: bool,
) -> Result<Vec<PathBuf>, DebianError> {
    let report = Reporter::new(progress);
    let total: u64 = lock.packages.iter().map(|p| p.size).sum();
    let job = Job {
        archive,
        cache,
        packages: &lock.packages,
        http: Http::new()?,
        next: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        results: Mutex::new((0..lock.packages.len()).map(|_| None).collect()),
        bar: report.bytes_bar(total, &format!("{} packages", lock.packages.len())),
        report,
        downloaded: AtomicUsize::new(0),
    };
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(lock.packages.len()) {
            s.spawn(|| job.work());
        }
    });
    job.bar.finish_and_clear();
    let downloaded = job.downloaded.load(Ordering::Relaxed);
    let results = job.results.into_inner().unwrap_or_else(|e| e.into_inner());
    let paths = collect(archive, &lock.packages, results)?;
    report.line(&format!(
        "{} packages ready, {downloaded} downloaded, {} cached",
        paths.len(),
        paths.len() - downloaded
    ));
    Ok(paths)
}

/// The first error in lock order, or every path.
fn collect(
    archive: &Archive,
    packages: &[LockedPackage],
    results: Vec<Option<Result<PathBuf, DebianError>>>,
) -> Result<Vec<PathBuf>, DebianError> {
    let mut paths = Vec::with_capacity(results.len());
    let mut skipped = None;
    for (p, r) in packages.iter().zip(results) {
        match r {
            Some(Ok(path)) => paths.push(path),
            Some(Err(e)) => return Err(e),
            None => skipped = skipped.or(Some(p)),
        }
    }
    match skipped {
        // Workers skip packages only after some package failed, and that error is returned
        // above; this is for completeness.
        Some(p) => Err(DebianError::Http {
            url: archive.url(&p.filename),
            reason: "not downloaded".to_string(),
            transient: false,
        }),
        None => Ok(paths),
    }
}

/// The shared state of the download workers.
struct Job<'a> {
    archive: &'a Archive,
    cache: &'a Cache,
    packages: &'a [LockedPackage],
    http: Http,
    next: AtomicUsize,
    failed: AtomicBool,
    results: Mutex<Vec<Option<Result<PathBuf, DebianError>>>>,
    bar: ProgressBar,
    report: Reporter,
    downloaded: AtomicUsize,
}

impl Job<'_> {
    /// Takes packages off the list until it is empty or some package failed.
    fn work(&self) {
        while !self.failed.load(Ordering::Relaxed) {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(package) = self.packages.get(i) else {
                return;
            };
            let result = self.one(package);
            if result.is_err() {
                self.failed.store(true, Ordering::Relaxed);
            }
            let mut results = self.results.lock().unwrap_or_else(|e| e.into_inner());
            results[i] = Some(result);
        }
    }

    fn one(&self, p: &LockedPackage) -> Result<PathBuf, DebianError> {
        if let Some(path) = self.cache.get(&p.sha256, p.size)? {
            self.bar.inc(p.size);
            return Ok(path);
        }
        let url = self.archive.url(&p.filename);
        self.bar.set_message(format!("{} {}", p.name, p.version));
        let start = self.bar.position();
        let path = retry(&url, || {
            self.cache.store(&p.sha256, p.size, &url, |sink| {
                self.http.download(&url, sink, p.size, &|n| self.bar.inc(n))
            })
        });
        let path = match path {
            Ok(path) => path,
            Err(e) => {
                self.bar.set_position(start);
                return Err(e);
            }
        };
        self.downloaded.fetch_add(1, Ordering::Relaxed);
        self.report.line(&format!(
            "fetched {} {} ({} bytes)",
            p.name, p.version, p.size
        ));
        Ok(path)
    }
}
