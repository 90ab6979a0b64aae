//! Where bundle bytes come from: a local file (`apply --file`) or a channel over HTTP, with Range
//! requests, resume after a cut connection, and retries with backoff.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A fetch that failed for good.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("GET {url}: {why} (after {attempts} attempts)")]
    Http {
        url: String,
        why: String,
        attempts: u32,
    },
    #[error("GET {url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error(
        "GET {url}: the server ignored the Range request (answered {status} without Content-Range)"
    )]
    NoRange { url: String, status: u16 },
}

/// Something that serves byte ranges of a bundle.
pub trait Source {
    /// Reads `len` bytes at `offset` of the bundle into `out` (cleared first).
    fn read_range(&mut self, offset: u64, len: u64, out: &mut Vec<u8>)
        -> Result<(), DownloadError>;
    /// Bytes taken from the network so far.
    fn downloaded(&self) -> u64;
    /// For messages: where the bytes come from.
    fn describe(&self) -> String;
}

/// A bundle file on a local disk.
pub struct FileSource {
    path: PathBuf,
    file: std::fs::File,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<FileSource, DownloadError> {
        let file = std::fs::File::open(path).map_err(|source| DownloadError::Io {
            op: "opening",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(FileSource {
            path: path.to_path_buf(),
            file,
        })
    }
}

impl Source for FileSource {
    fn read_range(
        &mut self,
        offset: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), DownloadError> {
        out.clear();
        out.resize(len as usize, 0);
        self.file
            .read_exact_at(out, offset)
            .map_err(|source| DownloadError::Io {
                op: "reading",
                path: self.path.clone(),
                source,
            })
    }
    fn downloaded(&self) -> u64 {
        0
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Retry policy for HTTP.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts without progress before giving up.
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 8,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// An HTTP client with the update agent's settings.
pub fn client() -> Result<reqwest::blocking::Client, DownloadError> {
    reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(300))
        .user_agent(concat!("caisson-update/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| DownloadError::Http {
            url: String::new(),
            why: e.to_string(),
            attempts: 0,
        })
}

/// A whole small file over HTTP (index, manifest, signature), with retries.
pub fn get(
    client: &reqwest::blocking::Client,
    url: &str,
    retry: Retry,
) -> Result<Vec<u8>, DownloadError> {
    let mut backoff = retry.first_backoff;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = client.get(url).send().and_then(|r| {
            let status = r.status();
            r.bytes().map(|b| (status, b))
        });
        match result {
            Ok((status, body)) if status.is_success() => return Ok(body.to_vec()),
            Ok((status, _)) if status.is_client_error() => {
                return Err(DownloadError::Status {
                    url: url.to_string(),
                    status: status.as_u16(),
                })
            }
            Ok((status, _)) if attempt >= retry.attempts => {
                return Err(DownloadError::Status {
                    url: url.to_string(),
                    status: status.as_u16(),
                })
            }
            Err(e) if attempt >= retry.attempts => {
                return Err(DownloadError::Http {
                    url: url.to_string(),
                    why: e.to_string(),
                    attempts: attempt,
                })
            }
            _ => {}
        }
        log::warn!("GET {url}: attempt {attempt} failed; retrying in {backoff:?}");
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(retry.max_backoff);
    }
}

/// A bundle on an HTTP server, read with Range requests.
pub struct HttpSource {
    client: reqwest::blocking::Client,
    url: String,
    retry: Retry,
    downloaded: u64,
}

impl HttpSource {
    pub fn new(url: &str, retry: Retry) -> Result<HttpSource, DownloadError> {
        Ok(HttpSource {
            client: client()?,
            url: url.to_string(),
            retry,
            downloaded: 0,
        })
    }

    /// One attempt: appends what arrives to `out`, even when the connection is cut midway.
    fn attempt(&mut self, from: u64, to_incl: u64, out: &mut Vec<u8>) -> Result<(), String> {
        let resp = self
            .client
            .get(&self.url)
            .header(reqwest::header::RANGE, format!("bytes={from}-{to_incl}"))
            .send()
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        if status != 206 {
            return Err(format!("status {status}"));
        }
        let want = to_incl + 1 - from;
        out.reserve_exact(want as usize);
        let before = out.len();
        // Straight into `out`; what arrived before an error stays there.
        let result = resp.take(want).read_to_end(out);
        self.downloaded += (out.len() - before) as u64;
        result.map(|_| ()).map_err(|e| e.to_string())
    }
}

impl Source for HttpSource {
    fn read_range(
        &mut self,
        offset: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), DownloadError> {
        out.clear();
        if len == 0 {
            return Ok(());
        }
        let end = offset + len - 1;
        let mut backoff = self.retry.first_backoff;
        let mut failures = 0;
        while (out.len() as u64) < len {
            let before = out.len();
            let from = offset + before as u64;
            let result = self.attempt(from, end, out);
            if out.len() as u64 >= len {
                break;
            }
            if out.len() > before {
                // Progress: the connection was cut; resume where it stopped.
                failures = 0;
                backoff = self.retry.first_backoff;
                log::warn!(
                    "{}: connection cut at byte {}; resuming",
                    self.url,
                    offset + out.len() as u64
                );
                continue;
            }
            failures += 1;
            let why = result
                .err()
                .unwrap_or_else(|| "the body ended early".into());
            if why.starts_with("status 200") || why.starts_with("status 416") {
                return Err(DownloadError::NoRange {
                    url: self.url.clone(),
                    status: why[7..].trim().parse().unwrap_or(0),
                });
            }
            if failures >= self.retry.attempts {
                return Err(DownloadError::Http {
                    url: self.url.clone(),
                    why,
                    attempts: failures,
                });
            }
            log::warn!("{}: {why}; retrying in {backoff:?}", self.url);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(self.retry.max_backoff);
        }
        Ok(())
    }
    fn downloaded(&self) -> u64 {
        self.downloaded
    }
    fn describe(&self) -> String {
        self.url.clone()
    }
}

/// Joins a channel URL and a file name.
pub fn join_url(base: &str, name: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// An HTTP server that honours Range but cuts every connection after `cut` body bytes.
    fn flaky_server(data: Vec<u8>, cut: usize) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut range = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(r) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (a, b) = r.trim().split_once('-').unwrap();
                        range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                    }
                }
                let (a, b) = range.unwrap();
                let body = &data[a..=b];
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{}\r\nConnection: close\r\n\r\n",
                    body.len(),
                    data.len()
                );
                stream.write_all(head.as_bytes()).unwrap();
                let _ = stream.write_all(&body[..body.len().min(cut)]);
                // Dropping the stream cuts the connection mid-body.
            }
        });
        (format!("http://{addr}/b.bundle"), requests)
    }

    #[test]
    fn resumes_after_a_cut_connection() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (url, requests) = flaky_server(data.clone(), 70_000);
        let mut src = HttpSource::new(
            &url,
            Retry {
                attempts: 3,
                first_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(20),
            },
        )
        .unwrap();
        let mut out = Vec::new();
        src.read_range(1000, 250_000, &mut out).unwrap();
        assert_eq!(out, data[1000..251_000]);
        assert_eq!(requests.load(Ordering::SeqCst), 4);
        assert_eq!(src.downloaded(), 250_000);
    }

    #[test]
    fn gives_up_with_the_url() {
        let mut src = HttpSource::new(
            "http://127.0.0.1:9/none",
            Retry {
                attempts: 2,
                first_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(1),
            },
        )
        .unwrap();
        let err = src
            .read_range(0, 10, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("127.0.0.1:9/none"), "{err}");
    }
}
