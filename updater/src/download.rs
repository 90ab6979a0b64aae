//! Where bundle bytes come from: a local file (`apply --file`) or a channel over HTTP, with Range
//! requests, resume after a cut connection, and retries with backoff.
//!
//! Every network read is bounded in size and in time ([`Limits`]): a channel document (index,
//! manifest, signature) may be at most its kind's cap and must arrive whole within a fixed
//! deadline per attempt; a Range request of the bundle must deliver exactly the bytes asked for
//! (its `Content-Range` and length are checked) within a deadline that grows with its length (a
//! minimum throughput), resumes included. A server that trickles, stalls or answers something
//! else than was asked makes the fetch fail in bounded time, with the URL in the message.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    #[error(
        "GET {url}: the answer is larger than {cap} bytes, the most a {what} may be: refused \
         (is this URL a Caisson channel?)"
    )]
    TooLarge {
        url: String,
        what: &'static str,
        cap: u64,
    },
    #[error("GET {url} bytes {from}-{to}: the server answered {got}: not the range asked for")]
    WrongRange {
        url: String,
        from: u64,
        to: u64,
        got: String,
    },
    #[error(
        "GET {url} bytes {from}-{to}: {got} of {want} bytes arrived in {secs} s, slower than the \
         least accepted ({rate} bytes/s after the first {base} s): the server stalled or trickles"
    )]
    TooSlow {
        url: String,
        from: u64,
        to: u64,
        got: u64,
        want: u64,
        secs: u64,
        rate: u64,
        base: u64,
    },
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

/// A channel document, for its size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Document {
    Index,
    Manifest,
    Signature,
}

impl Document {
    fn name(self) -> &'static str {
        match self {
            Document::Index => "channel index",
            Document::Manifest => "manifest",
            Document::Signature => "manifest signature",
        }
    }
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// How much a network read may bring and how long it may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most `index.json` may be (about 200 bytes a release).
    pub index_max: u64,
    /// The most a manifest may be (a few KiB: the chunk indexes are in the bundle).
    pub manifest_max: u64,
    /// The most a manifest's signature may be (a minisign signature is about 300 bytes).
    pub signature_max: u64,
    /// One attempt at a document, from connecting to its last byte.
    pub document_deadline: Duration,
    /// A Range request of `n` bytes, its resumes included, must be complete within
    /// `range_base + n / min_rate`.
    pub range_base: Duration,
    /// Bytes per second.
    pub min_rate: u64,
    pub connect_timeout: Duration,
    pub retry: Retry,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            index_max: MIB,
            manifest_max: 4 * MIB,
            signature_max: 16 * KIB,
            document_deadline: Duration::from_secs(30),
            range_base: Duration::from_secs(30),
            // 128 kbit/s: a link slower than this would take hours over one root payload.
            min_rate: 16 * KIB,
            connect_timeout: Duration::from_secs(15),
            retry: Retry::default(),
        }
    }
}

impl Limits {
    /// The size cap of `doc`.
    pub fn cap(&self, doc: Document) -> u64 {
        match doc {
            Document::Index => self.index_max,
            Document::Manifest => self.manifest_max,
            Document::Signature => self.signature_max,
        }
    }

    /// How long a Range request of `len` bytes may take, resumes included.
    pub fn range_deadline(&self, len: u64) -> Duration {
        self.range_base + Duration::from_secs_f64(len as f64 / self.min_rate.max(1) as f64)
    }
}

/// An HTTP client with the update agent's settings. Each request of this module sets its own
/// total deadline ([`Limits`]); the client's own timeout bounds the others (FleetLock).
pub fn client() -> Result<reqwest::blocking::Client, DownloadError> {
    client_with(Duration::from_secs(15))
}

fn client_with(connect: Duration) -> Result<reqwest::blocking::Client, DownloadError> {
    reqwest::blocking::Client::builder()
        .connect_timeout(connect)
        .timeout(Duration::from_secs(300))
        .user_agent(concat!("caisson-update/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| DownloadError::Http {
            url: String::new(),
            why: e.to_string(),
            attempts: 0,
        })
}

/// Why one attempt failed: for good, or worth another try.
enum Failure {
    Fatal(DownloadError),
    Transient(String),
}

/// A whole channel document over HTTP (index, manifest, signature), with retries: each attempt
/// must bring the whole document, at most its cap, within the document deadline.
pub fn get(
    client: &reqwest::blocking::Client,
    url: &str,
    doc: Document,
    limits: &Limits,
) -> Result<Vec<u8>, DownloadError> {
    let retry = limits.retry;
    let mut backoff = retry.first_backoff;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let why = match get_once(client, url, doc, limits) {
            Ok(body) => return Ok(body),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Transient(why)) => why,
        };
        if attempt >= retry.attempts {
            return Err(DownloadError::Http {
                url: url.to_string(),
                why,
                attempts: attempt,
            });
        }
        log::warn!("GET {url}: {why}; retrying in {backoff:?}");
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(retry.max_backoff);
    }
}

/// One attempt at a document.
fn get_once(
    client: &reqwest::blocking::Client,
    url: &str,
    doc: Document,
    limits: &Limits,
) -> Result<Vec<u8>, Failure> {
    let deadline = limits.document_deadline;
    let started = Instant::now();
    // A timeout says which deadline it was: reqwest's own words do not.
    let late = |why: String| {
        if started.elapsed() >= deadline {
            Failure::Transient(format!(
                "no complete answer within {} s",
                deadline.as_secs_f64()
            ))
        } else {
            Failure::Transient(why)
        }
    };
    let resp = client
        .get(url)
        .timeout(deadline)
        .send()
        .map_err(|e| late(e.to_string()))?;
    let status = resp.status();
    if status.is_client_error() {
        return Err(Failure::Fatal(DownloadError::Status {
            url: url.to_string(),
            status: status.as_u16(),
        }));
    }
    if !status.is_success() {
        return Err(Failure::Transient(format!("the server answered {status}")));
    }
    let cap = limits.cap(doc);
    let too_large = || {
        Failure::Fatal(DownloadError::TooLarge {
            url: url.to_string(),
            what: doc.name(),
            cap,
        })
    };
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    resp.take(cap + 1)
        .read_to_end(&mut body)
        .map_err(|e| late(format!("reading the answer: {e}")))?;
    if body.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(body)
}

/// A bundle on an HTTP server, read with Range requests.
pub struct HttpSource {
    client: reqwest::blocking::Client,
    url: String,
    limits: Limits,
    downloaded: u64,
}

/// `bytes a-b/total` (or `/*`): `(a, b)`.
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let (range, _total) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

impl HttpSource {
    pub fn new(url: &str, limits: Limits) -> Result<HttpSource, DownloadError> {
        Ok(HttpSource {
            client: client_with(limits.connect_timeout)?,
            url: url.to_string(),
            limits,
            downloaded: 0,
        })
    }

    fn wrong_range(&self, from: u64, to: u64, got: String) -> Failure {
        Failure::Fatal(DownloadError::WrongRange {
            url: self.url.clone(),
            from,
            to,
            got,
        })
    }

    /// Fails unless the answer is a 206 for exactly `from..=to_incl`: its `Content-Range`, and
    /// its `Content-Length` when it has one.
    fn check_range(
        &self,
        resp: &reqwest::blocking::Response,
        from: u64,
        to_incl: u64,
    ) -> Result<(), Failure> {
        let status = resp.status().as_u16();
        match status {
            206 => {}
            200 | 416 => {
                return Err(Failure::Fatal(DownloadError::NoRange {
                    url: self.url.clone(),
                    status,
                }))
            }
            400..=499 => {
                return Err(Failure::Fatal(DownloadError::Status {
                    url: self.url.clone(),
                    status,
                }))
            }
            _ => return Err(Failure::Transient(format!("status {status}"))),
        }
        let header = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        match header.as_deref().map(parse_content_range) {
            Some(Some((a, b))) if (a, b) == (from, to_incl) => {}
            Some(_) => {
                let got = format!("Content-Range {:?}", header.unwrap_or_default());
                return Err(self.wrong_range(from, to_incl, got));
            }
            None => {
                let got = "206 without Content-Range".to_string();
                return Err(self.wrong_range(from, to_incl, got));
            }
        }
        let want = to_incl + 1 - from;
        match resp.content_length() {
            Some(n) if n != want => {
                Err(self.wrong_range(from, to_incl, format!("a body of {n} bytes")))
            }
            _ => Ok(()),
        }
    }

    /// One attempt, within `left`: appends what arrives to `out`, even when the connection is
    /// cut midway.
    fn attempt(
        &mut self,
        from: u64,
        to_incl: u64,
        out: &mut Vec<u8>,
        left: Duration,
    ) -> Result<(), Failure> {
        let resp = self
            .client
            .get(&self.url)
            .header(reqwest::header::RANGE, format!("bytes={from}-{to_incl}"))
            .timeout(left)
            .send()
            .map_err(|e| Failure::Transient(e.to_string()))?;
        self.check_range(&resp, from, to_incl)?;
        let want = to_incl + 1 - from;
        out.reserve_exact(want as usize);
        let before = out.len();
        // Straight into `out`; what arrived before an error stays there.
        let result = resp.take(want).read_to_end(out);
        self.downloaded += (out.len() - before) as u64;
        result
            .map(|_| ())
            .map_err(|e| Failure::Transient(e.to_string()))
    }

    fn too_slow(&self, from: u64, to: u64, got: usize, started: Instant) -> DownloadError {
        DownloadError::TooSlow {
            url: self.url.clone(),
            from,
            to,
            got: got as u64,
            want: to + 1 - from,
            secs: started.elapsed().as_secs(),
            rate: self.limits.min_rate,
            base: self.limits.range_base.as_secs(),
        }
    }
}

impl Source for HttpSource {
    /// Resumes after a cut connection and retries failures without progress, all within the
    /// range's deadline ([`Limits::range_deadline`]).
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
        let started = Instant::now();
        let allowed = self.limits.range_deadline(len);
        let retry = self.limits.retry;
        let mut backoff = retry.first_backoff;
        let mut failures = 0;
        while (out.len() as u64) < len {
            let left = allowed.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(self.too_slow(offset, end, out.len(), started));
            }
            let before = out.len();
            let from = offset + before as u64;
            let result = self.attempt(from, end, out, left);
            if out.len() as u64 >= len {
                break;
            }
            let why = match result {
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(why)) => why,
                Ok(()) => "the body ended early".into(),
            };
            if out.len() > before {
                // Progress: the connection was cut; resume where it stopped.
                failures = 0;
                backoff = retry.first_backoff;
                log::warn!(
                    "{}: connection cut at byte {} ({why}); resuming",
                    self.url,
                    offset + out.len() as u64
                );
                continue;
            }
            failures += 1;
            if failures >= retry.attempts {
                return Err(DownloadError::Http {
                    url: self.url.clone(),
                    why,
                    attempts: failures,
                });
            }
            log::warn!("{}: {why}; retrying in {backoff:?}", self.url);
            std::thread::sleep(backoff.min(allowed.saturating_sub(started.elapsed())));
            backoff = (backoff * 2).min(retry.max_backoff);
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
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Reads a request's head; returns its Range, if any.
    fn request_range(stream: &TcpStream) -> Option<(usize, usize)> {
        let mut reader = BufReader::new(stream.try_clone().ok()?);
        let mut range = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" {
                return range;
            }
            if let Some(r) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                let (a, b) = r.trim().split_once('-')?;
                range = Some((a.parse().ok()?, b.parse().ok()?));
            }
        }
    }

    /// A server on 127.0.0.1 that answers every connection, each on its own thread, with
    /// `answer(range asked, stream)`; returns the URL of `/name`.
    fn server(
        name: &str,
        answer: impl Fn(Option<(usize, usize)>, &mut TcpStream) + Send + Sync + 'static,
    ) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(answer);
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let answer = answer.clone();
                std::thread::spawn(move || {
                    let range = request_range(&stream);
                    answer(range, &mut stream);
                });
            }
        });
        format!("http://{addr}/{name}")
    }

    /// Sends the head, then one byte every 100 ms until the client goes away.
    fn trickle(stream: &mut TcpStream, head: &str) {
        if stream.write_all(head.as_bytes()).is_err() {
            return;
        }
        while stream.write_all(b"{").is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Small limits, so that every refusal comes in well under a second or two.
    fn small() -> Limits {
        Limits {
            document_deadline: Duration::from_millis(500),
            range_base: Duration::from_millis(500),
            min_rate: 1024 * 1024,
            connect_timeout: Duration::from_secs(2),
            retry: Retry {
                attempts: 2,
                first_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(20),
            },
            ..Limits::default()
        }
    }

    /// Runs `f`, and fails the test when it takes longer than `secs`.
    fn timed<T>(secs: u64, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = f();
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "took {:?}",
            t0.elapsed()
        );
        out
    }

    /// An HTTP server that honours Range but cuts every connection after `cut` body bytes.
    fn flaky_server(data: Vec<u8>, cut: usize) -> (String, Arc<AtomicUsize>) {
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let url = server("b.bundle", move |range, stream| {
            count.fetch_add(1, Ordering::SeqCst);
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
        });
        (url, requests)
    }

    #[test]
    fn resumes_after_a_cut_connection() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (url, requests) = flaky_server(data.clone(), 70_000);
        let mut src = HttpSource::new(&url, small()).unwrap();
        let mut out = Vec::new();
        src.read_range(1000, 250_000, &mut out).unwrap();
        assert_eq!(out, data[1000..251_000]);
        assert_eq!(requests.load(Ordering::SeqCst), 4);
        assert_eq!(src.downloaded(), 250_000);
    }

    #[test]
    fn gives_up_with_the_url() {
        let mut src = HttpSource::new("http://127.0.0.1:9/none", small()).unwrap();
        let err = src
            .read_range(0, 10, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("127.0.0.1:9/none"), "{err}");
    }

    #[test]
    fn a_trickled_document_fails_within_its_deadline() {
        let url = server("index.json", |_, s| {
            trickle(s, "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        });
        let c = client().unwrap();
        let err = timed(5, || get(&c, &url, Document::Index, &small())).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&url) && msg.contains("within 0.5 s"), "{msg}");
        // Without a length either.
        let url = server("m.json", |_, s| trickle(s, "HTTP/1.0 200 OK\r\n\r\n"));
        let err = timed(5, || get(&c, &url, Document::Manifest, &small())).unwrap_err();
        assert!(err.to_string().contains(&url), "{err}");
    }

    #[test]
    fn a_huge_document_is_refused_by_its_cap() {
        let c = client().unwrap();
        // Said up front: refused before the body.
        let url = server("index.json", |_, s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n");
            let _ = s.write_all(&[b' '; 4096]);
        });
        let err = timed(5, || get(&c, &url, Document::Index, &small())).unwrap_err();
        assert!(
            matches!(err, DownloadError::TooLarge { cap, .. } if cap == MIB),
            "{err}"
        );
        assert!(err.to_string().contains(&url), "{err}");
        // Not said: refused once the cap is passed, whatever keeps coming.
        let url = server("index.json", |_, s| {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
            while s.write_all(&[b' '; 65536]).is_ok() {}
        });
        let err = timed(5, || get(&c, &url, Document::Index, &small())).unwrap_err();
        assert!(matches!(err, DownloadError::TooLarge { .. }), "{err}");
        // A signature's cap is much smaller.
        let url = server("m.minisig", |_, s| {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
            let _ = s.write_all(&[b'a'; 20_000]);
        });
        let err = timed(5, || get(&c, &url, Document::Signature, &small())).unwrap_err();
        assert!(matches!(err, DownloadError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn a_wrong_content_range_is_refused() {
        let url = server("b.bundle", |_, s| {
            let _ = s.write_all(
                b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/100000\r\nContent-Length: 10\r\n\r\n0123456789",
            );
        });
        let mut src = HttpSource::new(&url, small()).unwrap();
        let err = timed(5, || src.read_range(1000, 1000, &mut Vec::new())).unwrap_err();
        assert!(matches!(err, DownloadError::WrongRange { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&url) && msg.contains("bytes 0-9/100000"),
            "{msg}"
        );
    }

    /// The head of a 206 answer claiming bytes `a..=b` of `total`, with `len` as its length.
    fn partial_head(a: usize, b: usize, total: usize, len: usize) -> String {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{total}\r\nContent-Length: {len}\r\n\r\n"
        )
    }

    #[test]
    fn a_one_byte_body_is_refused() {
        let url = server("b.bundle", |range, s| {
            let (a, b) = range.unwrap_or((0, 0));
            let head = partial_head(a, b, 100_000, 1) + "x";
            let _ = s.write_all(head.as_bytes());
        });
        let mut src = HttpSource::new(&url, small()).unwrap();
        let err = timed(5, || src.read_range(1000, 1000, &mut Vec::new())).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, DownloadError::WrongRange { .. }) && msg.contains(&url),
            "{msg}"
        );
    }

    #[test]
    fn one_byte_per_range_request_fails_by_the_minimum_rate() {
        // Each answer says it is the whole range, then brings one byte and hangs up: every
        // attempt makes progress, so only the range's deadline stops the resumes.
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let url = server("b.bundle", move |range, s| {
            count.fetch_add(1, Ordering::SeqCst);
            let (a, b) = range.unwrap_or((0, 0));
            let head = partial_head(a, b, 10_000_000, b + 1 - a) + "x";
            let _ = s.write_all(head.as_bytes());
        });
        let mut src = HttpSource::new(&url, small()).unwrap();
        let err = timed(5, || src.read_range(0, 1_000_000, &mut Vec::new())).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, DownloadError::TooSlow { .. }) && msg.contains(&url),
            "{msg}"
        );
        assert!(requests.load(Ordering::SeqCst) > 2, "{msg}");
    }

    #[test]
    fn a_trickled_range_fails_by_the_minimum_rate() {
        let url = server("b.bundle", |range, s| {
            let (a, b) = range.unwrap_or((0, 0));
            let head = partial_head(a, b, 10_000_000, b + 1 - a);
            trickle(s, &head);
        });
        let mut src = HttpSource::new(&url, small()).unwrap();
        let err = timed(5, || src.read_range(0, 1_000_000, &mut Vec::new())).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, DownloadError::TooSlow { .. }) && msg.contains(&url),
            "{msg}"
        );
    }

    #[test]
    fn range_deadlines_grow_with_the_length() {
        let l = Limits::default();
        assert_eq!(l.range_deadline(0), Duration::from_secs(30));
        assert_eq!(l.range_deadline(4 * MIB), Duration::from_secs(30 + 256));
        assert_eq!(parse_content_range("bytes 5-9/100"), Some((5, 9)));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9)));
        assert_eq!(parse_content_range("bytes */100"), None);
    }
}
