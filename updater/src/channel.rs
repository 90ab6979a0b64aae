//! Channels: plain directories of bundles, signed manifests and an `index.json`, served by any
//! static HTTP server. `publish` adds a release; `serve` is a small Range-capable server for
//! tests and air-gapped sites.

use crate::bundle::Manifest;
use crate::sign::{self, SecretKey};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The index file of a channel directory.
pub const INDEX: &str = "index.json";

/// A channel problem.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Parse { path: String, why: String },
    #[error("{0}")]
    Invalid(String),
    #[error("listening on {addr}: {why}")]
    Listen { addr: String, why: String },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ChannelError {
    let path = path.to_path_buf();
    move |source| ChannelError::Io { op, path, source }
}

/// One release in a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub image: String,
    pub version: String,
    /// File names in the channel directory.
    pub manifest: String,
    pub bundle: String,
    pub published_at: u64,
}

/// `index.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub releases: Vec<Release>,
}

impl Index {
    pub fn parse(bytes: &[u8], from: &str) -> Result<Index, ChannelError> {
        serde_json::from_slice(bytes).map_err(|e| ChannelError::Parse {
            path: from.to_string(),
            why: e.to_string(),
        })
    }

    /// The newest release of `image` newer than `installed` and not in `skip`.
    pub fn newest_for(&self, image: &str, installed: &str, skip: &[String]) -> Option<&Release> {
        self.releases
            .iter()
            .filter(|r| r.image == image && crate::version::newer(&r.version, installed))
            .filter(|r| !skip.contains(&r.version))
            .max_by(|a, b| crate::version::compare(&a.version, &b.version))
    }
}

/// What `publish` sets in the manifest.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// Default: the channel directory's name.
    pub channel: Option<String>,
    pub min_version: Option<String>,
    pub rollout_seconds: Option<u64>,
    /// Seconds after publishing that machines stop accepting the manifest.
    pub expires_in: Option<u64>,
    /// Publishing time (default: now).
    pub now: Option<u64>,
}

/// Copies a bundle and its manifest into `channel_dir`, fills in the channel fields, signs the
/// manifest and adds the release to the index (each file written under a temporary name and
/// renamed). Returns the release.
pub fn publish(
    bundle: &Path,
    manifest_path: &Path,
    channel_dir: &Path,
    key: &Path,
    opts: &PublishOptions,
) -> Result<Release, crate::Error> {
    let mut m = Manifest::load(manifest_path)?;
    let sk = SecretKey::load(key)?;
    let now = opts.now.unwrap_or_else(crate::record::now);
    let channel = match &opts.channel {
        Some(c) => c.clone(),
        None => channel_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    m.channel = Some(channel);
    m.min_version = opts.min_version.clone();
    m.rollout_seconds = opts.rollout_seconds;
    m.published_at = Some(now);
    m.expires_at = opts.expires_in.map(|s| now + s);
    let size = std::fs::metadata(bundle)
        .map_err(io_err("reading", bundle))?
        .len();
    let end = m
        .artifacts
        .iter()
        .map(|a| (a.offset + a.size).max(a.index.offset + a.index.size))
        .max()
        .unwrap_or(0);
    if size < end {
        return Err(ChannelError::Invalid(format!(
            "{} is {size} bytes but its manifest {} describes {end}: not the bundle of this manifest",
            bundle.display(),
            manifest_path.display()
        ))
        .into());
    }
    std::fs::create_dir_all(channel_dir).map_err(io_err("creating", channel_dir))?;
    let stem = format!("{}-{}", m.image, m.version);
    let bundle_name = format!("{stem}.bundle");
    let manifest_name = format!("{stem}.manifest.json");
    let dst = channel_dir.join(&bundle_name);
    let tmp = channel_dir.join(format!(".{bundle_name}.tmp"));
    std::fs::copy(bundle, &tmp).map_err(io_err("copying into", &tmp))?;
    std::fs::rename(&tmp, &dst).map_err(io_err("renaming into", &dst))?;
    let json = m.to_json();
    let sig = sk.sign(
        json.as_bytes(),
        &format!("image:{} version:{} published:{now}", m.image, m.version),
    )?;
    let mpath = channel_dir.join(&manifest_name);
    write_atomic(&sign::sig_path(&mpath), sig.as_bytes())?;
    write_atomic(&mpath, json.as_bytes())?;
    let index_path = channel_dir.join(INDEX);
    let mut index = match std::fs::read(&index_path) {
        Ok(b) => Index::parse(&b, &index_path.display().to_string())?,
        Err(_) => Index::default(),
    };
    index
        .releases
        .retain(|r| !(r.image == m.image && r.version == m.version));
    let release = Release {
        image: m.image.clone(),
        version: m.version.clone(),
        manifest: manifest_name,
        bundle: bundle_name,
        published_at: now,
    };
    index.releases.push(release.clone());
    let text = serde_json::to_string_pretty(&index).unwrap_or_default() + "\n";
    write_atomic(&index_path, text.as_bytes())?;
    Ok(release)
}

/// A duration such as `48h`, `30m`, `2d` or `3600` (seconds), in seconds.
pub fn parse_duration(s: &str) -> Result<u64, ChannelError> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        Some((i, 'd')) => (&t[..i], 86400),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            ChannelError::Invalid(format!("{s:?} is not a duration such as 48h, 30m or 2d"))
        })
}

/// The manifest written beside a bundle by `caisson build`: `x.bundle` → `x.manifest.json`.
pub fn manifest_beside(bundle: &Path) -> PathBuf {
    let name = bundle.file_name().unwrap_or_default().to_string_lossy();
    let stem = name.strip_suffix(".bundle").unwrap_or(&name);
    bundle.with_file_name(format!("{stem}.manifest.json"))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ChannelError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(io_err("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("renaming into", path))
}

/// A static file server with single-range support.
pub struct Server {
    server: tiny_http::Server,
    root: PathBuf,
}

impl Server {
    /// Binds `listen` (e.g. `127.0.0.1:8080`; port 0 picks one) to serve `root`.
    pub fn bind(root: &Path, listen: &str) -> Result<Server, ChannelError> {
        let err = |why: String| ChannelError::Listen {
            addr: listen.to_string(),
            why,
        };
        let listener = std::net::TcpListener::bind(listen).map_err(|e| err(e.to_string()))?;
        // Accepted connections inherit TCP_NODELAY from the listener (Linux): without it the
        // tail of a response can wait 40 ms for a delayed ACK (Nagle).
        rustix::net::sockopt::set_tcp_nodelay(&listener, true).map_err(|e| err(e.to_string()))?;
        let server =
            tiny_http::Server::from_listener(listener, None).map_err(|e| err(e.to_string()))?;
        Ok(Server {
            server,
            root: root.to_path_buf(),
        })
    }

    /// The address actually bound.
    pub fn addr(&self) -> String {
        self.server
            .server_addr()
            .to_ip()
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    /// Serves until the process ends.
    pub fn run(self) {
        for req in self.server.incoming_requests() {
            let root = self.root.clone();
            std::thread::spawn(move || {
                if let Err(e) = answer(&root, req) {
                    log::warn!("serving: {e}");
                }
            });
        }
    }

    /// Serves on a background thread; returns the bound address.
    pub fn spawn(self) -> String {
        let addr = self.addr();
        std::thread::spawn(move || self.run());
        addr
    }
}

fn answer(root: &Path, req: tiny_http::Request) -> std::io::Result<()> {
    use tiny_http::{Header, Method, Response, StatusCode};
    let url = req.url().split('?').next().unwrap_or("/").to_string();
    let rel = url.trim_start_matches('/');
    let head = *req.method() == Method::Head;
    if !matches!(req.method(), Method::Get | Method::Head)
        || rel.split('/').any(|c| c == ".." || c.starts_with('.'))
    {
        return req.respond(Response::empty(StatusCode(404)));
    }
    let path = root.join(rel);
    if !path.is_file() {
        return req.respond(Response::empty(StatusCode(404)));
    }
    let Ok(mut file) = std::fs::File::open(&path) else {
        return req.respond(Response::empty(StatusCode(404)));
    };
    let size = file.metadata()?.len();
    let range = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .map(|h| h.value.as_str().to_string());
    let (status, start, len) = match range.as_deref().and_then(|r| parse_range(r, size)) {
        Some((a, b)) => (206, a, b + 1 - a),
        None if range.is_some() => {
            let mut r = Response::empty(StatusCode(416));
            if let Ok(h) = Header::from_bytes("Content-Range", format!("bytes */{size}")) {
                r.add_header(h);
            }
            return req.respond(r);
        }
        None => (200, 0, size),
    };
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(start))?;
    let body: Box<dyn std::io::Read + Send> = if head {
        Box::new(std::io::empty())
    } else {
        Box::new(std::io::Read::take(file, len))
    };
    // With the length known, the body goes out with Content-Length rather than chunked.
    let mut resp = Response::new(
        StatusCode(status),
        Vec::new(),
        body,
        Some(len as usize),
        None,
    )
    .with_chunked_threshold(usize::MAX);
    if let Ok(h) = Header::from_bytes("Accept-Ranges", "bytes") {
        resp.add_header(h);
    }
    if status == 206 {
        if let Ok(h) = Header::from_bytes(
            "Content-Range",
            format!("bytes {start}-{}/{size}", start + len - 1),
        ) {
            resp.add_header(h);
        }
    }
    req.respond(resp)
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against a file of `size` bytes.
fn parse_range(h: &str, size: u64) -> Option<(u64, u64)> {
    let spec = h.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size - 1)
        }
        (a, "") => (a.parse().ok()?, size - 1),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(size - 1)),
    };
    (start <= end && start < size).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::download::{Document, HttpSource, Limits, Source};

    #[test]
    fn durations_and_names() {
        assert_eq!(parse_duration("48h").unwrap(), 48 * 3600);
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("2d").unwrap(), 172_800);
        assert!(parse_duration("soon").is_err());
        assert_eq!(
            manifest_beside(Path::new("out/host-1.1.0.bundle")),
            Path::new("out/host-1.1.0.manifest.json")
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=0-1,3-4", 100), None);
    }

    #[test]
    fn serves_ranges_and_refuses_dotfiles() {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(d.path().join("f.bin"), &data).unwrap();
        std::fs::write(d.path().join(".secret"), b"x").unwrap();
        let addr = Server::bind(d.path(), "127.0.0.1:0").unwrap().spawn();
        let mut src = HttpSource::new(&format!("http://{addr}/f.bin"), Limits::default()).unwrap();
        let mut out = Vec::new();
        src.read_range(5000, 40_000, &mut out).unwrap();
        assert_eq!(out, data[5000..45_000]);
        let c = crate::download::client().unwrap();
        let url = format!("http://{addr}/f.bin");
        let whole = crate::download::get(&c, &url, Document::Manifest, &Limits::default()).unwrap();
        assert_eq!(whole, data);
        let secret = format!("http://{addr}/.secret");
        assert!(crate::download::get(&c, &secret, Document::Manifest, &Limits::default()).is_err());
    }
}
