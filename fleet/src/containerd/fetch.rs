//! Images fetched over HTTP: downloaded once into the cache (`<sha256>.oci.tar`), checked
//! against their sha256.
//!
//! Every download has a total deadline and a size cap ([`FetchLimits`], from the agent's
//! `image_timeout_s` and `image_max_bytes`), and its `.part` file is removed on every failure
//! (deadline, cap, connection or HTTP error, sha256 mismatch). The agent's reconciliation
//! asks for the image first ([`Containerd::prepare_image`]): that starts the download as a
//! background task and answers at once, so a server that stalls or never ends holds up no
//! other unit; a later tick finds the archive in the cache and starts the container. A failed
//! download is reported, and tried again after [`FETCH_RETRY`].

use super::{io, nanos, Containerd, ContainerdError};
use crate::unit::{Image, UnitSpec};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

/// The limits of one image download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchLimits {
    /// From the request to the last byte (`image_timeout_s`, default 30 minutes).
    pub deadline: Duration,
    /// The most bytes an archive may have (`image_max_bytes`, default 4 GiB).
    pub max_bytes: u64,
}

/// The default total deadline of an image download.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// The default size cap of an image download.
pub const DEFAULT_MAX_BYTES: u64 = 4 << 30;
/// How long after a failed download a unit's image is fetched again.
pub const FETCH_RETRY: Duration = Duration::from_secs(60);

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            deadline: DEFAULT_DEADLINE,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// A background download, by sha256 and URL.
#[derive(Debug)]
enum Download {
    Running(JoinHandle<Result<PathBuf, ContainerdError>>),
    Failed { error: String, at: Instant },
}

/// The background downloads of a [`Containerd`] (shared by its clones).
#[derive(Debug, Clone, Default)]
pub struct Downloads(Arc<Mutex<HashMap<String, Download>>>);

impl Downloads {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Download>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What became of a background download, looked at under the lock.
enum Seen {
    Busy,
    Failed(String),
    Done(JoinHandle<Result<PathBuf, ContainerdError>>),
    Start,
}

impl Containerd {
    /// The archive of a unit's image on this machine (downloading it first for a URL, within
    /// the deadline).
    pub(super) async fn archive_of(
        &self,
        spec: &UnitSpec,
    ) -> Result<(PathBuf, Option<String>), ContainerdError> {
        match &spec.image {
            Image::Path { path, name } => Ok((PathBuf::from(path), name.clone())),
            Image::Url { url, sha256, name } => Ok((self.fetch(url, sha256).await?, name.clone())),
            Image::Ref { reference, .. } => Err(ContainerdError::Pull {
                reference: reference.clone(),
                message: "a registry image has no archive".into(),
            }),
        }
    }

    /// Makes sure a unit's image is on this machine without waiting for a download: `Ok` when
    /// it is (a path, or a URL already in the cache); otherwise starts its download in the
    /// background (once) and returns [`ContainerdError::Downloading`], or the error of the last
    /// attempt for [`FETCH_RETRY`] after it failed.
    pub async fn prepare_image(&self, spec: &UnitSpec) -> Result<(), ContainerdError> {
        let (url, sha256) = match &spec.image {
            Image::Url { url, sha256, .. } => (url, sha256),
            Image::Ref {
                reference,
                resolved,
            } => return self.prepare_ref(reference, resolved.as_deref()).await,
            Image::Path { .. } => return Ok(()),
        };
        if self.cache_path(url, sha256)?.exists() {
            return Ok(());
        }
        let fail = |message: String| ContainerdError::Fetch {
            url: url.clone(),
            message,
        };
        // By URL and sha256: another server may well have the same archive.
        let key = format!("{sha256} {url}");
        match self.look(&key) {
            Seen::Busy => Err(ContainerdError::Downloading { url: url.clone() }),
            Seen::Failed(error) => Err(fail(error)),
            Seen::Done(task) => {
                let done = task.await.map_err(|e| fail(e.to_string())).and_then(|r| r);
                if let Err(e) = &done {
                    let error = match e {
                        ContainerdError::Fetch { message, .. } => message.clone(),
                        other => other.to_string(),
                    };
                    let at = Instant::now();
                    self.downloads
                        .map()
                        .insert(key, Download::Failed { error, at });
                }
                done.map(|_| ())
            }
            Seen::Start => {
                let this = self.clone();
                let (u, s) = (url.clone(), sha256.clone());
                let task = tokio::spawn(async move { this.fetch(&u, &s).await });
                self.downloads.map().insert(key, Download::Running(task));
                log::info!("downloading image {url} in the background");
                Err(ContainerdError::Downloading { url: url.clone() })
            }
        }
    }

    fn look(&self, key: &str) -> Seen {
        let mut map = self.downloads.map();
        match map.get(key) {
            Some(Download::Running(t)) if !t.is_finished() => return Seen::Busy,
            Some(Download::Failed { error, at }) if at.elapsed() < FETCH_RETRY => {
                return Seen::Failed(error.clone())
            }
            _ => {}
        }
        match map.remove(key) {
            Some(Download::Running(t)) => Seen::Done(t),
            _ => Seen::Start,
        }
    }

    /// Where the archive of `sha256` is cached; refuses anything but 64 hex digits, which
    /// would make another path.
    pub(super) fn cache_path(&self, url: &str, sha256: &str) -> Result<PathBuf, ContainerdError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ContainerdError::Fetch {
                url: url.to_string(),
                message: format!("sha256 {sha256:?} is not 64 hex digits"),
            });
        }
        Ok(self
            .cache_dir
            .join(format!("{}.oci.tar", sha256.to_ascii_lowercase())))
    }

    /// Downloads an archive into the cache (once), checking its sha256 on the way, within
    /// [`Containerd::fetch_limits`]; leaves no `.part` file behind when it fails.
    pub async fn fetch(&self, url: &str, sha256: &str) -> Result<PathBuf, ContainerdError> {
        let dest = self.cache_path(url, sha256)?;
        if dest.exists() {
            return Ok(dest);
        }
        tokio::fs::create_dir_all(&self.cache_dir)
            .await
            .map_err(io(&self.cache_dir))?;
        let part = self.cache_dir.join(format!(
            "{}.part-{}-{}",
            sha256.to_ascii_lowercase(),
            std::process::id(),
            nanos()
        ));
        let limits = self.fetch_limits;
        let fetched = tokio::time::timeout(limits.deadline, download(url, &part, limits.max_bytes))
            .await
            .unwrap_or_else(|_| {
                Err(fetch_error(url)(format!(
                    "not complete after {:?} (the agent's image_timeout_s)",
                    limits.deadline
                )))
            });
        let kept = fetched.and_then(|got| {
            if got.eq_ignore_ascii_case(sha256) {
                std::fs::rename(&part, &dest).map_err(io(&dest))
            } else {
                Err(fetch_error(url)(format!(
                    "sha256 is {got}, the unit says {sha256}"
                )))
            }
        });
        if kept.is_err() {
            remove_part(&part);
        }
        kept.map(|()| dest)
    }
}

fn fetch_error(url: &str) -> impl Fn(String) -> ContainerdError + '_ {
    move |message| ContainerdError::Fetch {
        url: url.to_string(),
        message,
    }
}

fn remove_part(part: &Path) {
    match std::fs::remove_file(part) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("removing {}: {e}", part.display()),
    }
}

/// Streams `url` into `part`, at most `max_bytes` of it; the sha256 of what it wrote.
async fn download(url: &str, part: &Path, max_bytes: u64) -> Result<String, ContainerdError> {
    let fail = fetch_error(url);
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut resp = client
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| fail(e.to_string()))?;
    let too_big = |n: u64| {
        fail(format!(
            "{n} bytes or more: the cap is {max_bytes} bytes (the agent's image_max_bytes)"
        ))
    };
    if let Some(n) = resp.content_length().filter(|n| *n > max_bytes) {
        return Err(too_big(n));
    }
    let mut file = tokio::fs::File::create(part).await.map_err(io(part))?;
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
        total += chunk.len() as u64;
        if total > max_bytes {
            return Err(too_big(total));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(io(part))?;
    }
    file.flush().await.map_err(io(part))?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// An HTTP server on 127.0.0.1 that answers every request with `head`, then `chunk`
    /// every `every`, `count` times (forever with `None`).
    async fn serve(head: String, chunk: Vec<u8>, every: Duration, count: Option<usize>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (head, chunk) = (head.clone(), chunk.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    s.write_all(head.as_bytes()).await?;
                    let mut sent = 0;
                    while count.is_none_or(|n| sent < n) {
                        s.write_all(&chunk).await?;
                        sent += 1;
                        tokio::time::sleep(every).await;
                    }
                    Ok::<(), std::io::Error>(())
                });
            }
        });
        format!("http://127.0.0.1:{port}/image.oci.tar")
    }

    fn head(length: Option<u64>) -> String {
        match length {
            Some(n) => format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n"),
            None => "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".into(),
        }
    }

    /// A trickle: one byte every 50 ms of a million announced.
    async fn trickle() -> String {
        serve(
            head(Some(1_000_000)),
            b"x".to_vec(),
            Duration::from_millis(50),
            None,
        )
        .await
    }

    fn runtime(dir: &Path, deadline: Duration, max_bytes: u64) -> Containerd {
        let mut c = Containerd::new("/nonexistent/containerd.sock", "caisson");
        c.cache_dir = dir.join("cache");
        c.fetch_limits = FetchLimits {
            deadline,
            max_bytes,
        };
        c
    }

    /// The files in the cache (none when it does not exist).
    fn cached(c: &Containerd) -> Vec<String> {
        std::fs::read_dir(&c.cache_dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    const SHA: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"; // "abc"

    #[tokio::test]
    async fn a_stalling_server_fails_at_the_deadline_and_leaves_no_part() {
        let dir = tempfile::tempdir().unwrap();
        let c = runtime(dir.path(), Duration::from_secs(1), 1 << 30);
        let url = trickle().await;
        let t = Instant::now();
        let e = c.fetch(&url, SHA).await.unwrap_err().to_string();
        assert!(
            e.contains("not complete after 1s") && e.contains(&url),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(cached(&c).is_empty(), "{:?}", cached(&c));
    }

    #[tokio::test]
    async fn an_endless_body_fails_at_the_cap_and_leaves_no_part() {
        let dir = tempfile::tempdir().unwrap();
        let c = runtime(dir.path(), Duration::from_secs(60), 1 << 20);
        let url = serve(head(None), vec![7; 64 << 10], Duration::ZERO, None).await;
        let t = Instant::now();
        let e = c.fetch(&url, SHA).await.unwrap_err().to_string();
        assert!(e.contains("the cap is 1048576 bytes"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert!(cached(&c).is_empty(), "{:?}", cached(&c));
        // Announced too large: refused before a byte is written.
        let url = serve(head(Some(2 << 20)), vec![7], Duration::ZERO, Some(1)).await;
        let e = c.fetch(&url, SHA).await.unwrap_err().to_string();
        assert!(e.contains("2097152 bytes or more"), "{e}");
        assert!(cached(&c).is_empty(), "{:?}", cached(&c));
    }

    #[tokio::test]
    async fn connection_errors_and_digest_mismatches_leave_no_part() {
        let dir = tempfile::tempdir().unwrap();
        let c = runtime(dir.path(), Duration::from_secs(10), 1 << 20);
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{closed}/x.tar");
        assert!(c.fetch(&url, SHA).await.is_err());
        // The body ends early (3 of 10 bytes announced).
        let url = serve(head(Some(10)), b"abc".to_vec(), Duration::ZERO, Some(1)).await;
        assert!(c.fetch(&url, SHA).await.is_err());
        assert!(cached(&c).is_empty(), "{:?}", cached(&c));
        let url = serve(head(Some(3)), b"abd".to_vec(), Duration::ZERO, Some(1)).await;
        let e = c.fetch(&url, SHA).await.unwrap_err().to_string();
        assert!(e.contains("sha256 is"), "{e}");
        assert!(cached(&c).is_empty(), "{:?}", cached(&c));
        let e = c
            .fetch(&url, "../../etc/passwd")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("not 64 hex digits"), "{e}");
        // And the right bytes are kept.
        let url = serve(head(Some(3)), b"abc".to_vec(), Duration::ZERO, Some(1)).await;
        let path = c.fetch(&url, SHA).await.unwrap();
        assert_eq!(cached(&c), [format!("{SHA}.oci.tar")]);
        assert_eq!(std::fs::read(path).unwrap(), b"abc");
    }

    fn url_unit(url: &str, sha256: &str) -> UnitSpec {
        UnitSpec::parse(
            "u",
            &format!("[image]\nurl = \"{url}\"\nsha256 = \"{sha256}\""),
        )
        .unwrap()
    }

    /// `prepare_image` never waits for a download: it starts it in the background and says
    /// so; a later call finds it done, or failed (then the failure is reported until
    /// [`FETCH_RETRY`] has passed, without a new download).
    #[tokio::test]
    async fn prepare_downloads_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let c = runtime(dir.path(), Duration::from_secs(1), 1 << 20);
        let slow = url_unit(&trickle().await, SHA);
        let t = Instant::now();
        for _ in 0..3 {
            let e = c.prepare_image(&slow).await.unwrap_err();
            assert!(matches!(e, ContainerdError::Downloading { .. }), "{e}");
        }
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for _ in 0..2 {
            let e = c.prepare_image(&slow).await.unwrap_err().to_string();
            assert!(e.contains("not complete after 1s"), "{e}");
            assert_eq!(e.matches("fetching image").count(), 1, "{e}");
        }
        assert!(cached(&c).is_empty(), "{:?}", cached(&c));
        let good = url_unit(
            &serve(head(Some(3)), b"abc".to_vec(), Duration::ZERO, Some(1)).await,
            SHA,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = c.prepare_image(&good).await {
            assert!(matches!(e, ContainerdError::Downloading { .. }), "{e}");
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(cached(&c), [format!("{SHA}.oci.tar")]);
    }
}
