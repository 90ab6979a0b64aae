//! Where a machine finds its config, first found wins:
//!
//! 1. QEMU fw_cfg `opt/caisson/config` (`-fw_cfg name=opt/caisson/config,file=machine.toml`),
//!    read from sysfs (kernel module `qemu_fw_cfg`);
//! 2. a FAT volume labelled `CAISSON-CFG` holding `/caisson.toml` (`caisson config-drive`);
//! 3. `/caisson/config.toml` on the ESP;
//!
//! FAT volumes are read here, in user space, with the `fatfs` crate, never mounted: the first
//! boot needs no FAT driver in the kernel to look for a config, and a config drive's file
//! system, which anyone with the machine's hardware can hand it, is parsed by memory-safe code,
//! after [`crate::fat::check`] has refused the boot sectors, cluster numbers and chains
//! `fatfs` would miscompute.
//! 4. `caisson.config_url=http://... caisson.config_sha256=<hex>` on the kernel command line
//!    (plain HTTP: the required sha256 is what makes it trustworthy).

use crate::apply::sha256_hex;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// fw_cfg entry name, and where sysfs shows its contents.
pub const FW_CFG_NAME: &str = "opt/caisson/config";
pub const FW_CFG_PATH: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/caisson/config/raw";
/// The config drive's volume label and file.
pub const DRIVE_LABEL: &str = "CAISSON-CFG";
pub const DRIVE_FILE: &str = "caisson.toml";
/// The config file on the ESP.
pub const ESP_FILE: &str = "caisson/config.toml";
/// Kernel command line keys of the URL source.
pub const KEY_URL: &str = "caisson.config_url";
pub const KEY_SHA256: &str = "caisson.config_sha256";
/// A config larger than this is refused.
pub const MAX_SIZE: u64 = 1 << 20;

/// A source that exists but cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is larger than {MAX_SIZE} bytes")]
    TooLarge { what: String },
    #[error("reading /{file} from the FAT volume {dev}: {source}")]
    Fat {
        dev: PathBuf,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the FAT volume {dev} is damaged or hostile, and is not read: {source}")]
    FatRefused {
        dev: PathBuf,
        #[source]
        source: crate::fat::FatError,
    },
    #[error("the config drive {dev} (label {DRIVE_LABEL}) has no /{DRIVE_FILE}")]
    DriveEmpty { dev: PathBuf },
    #[error(
        "{KEY_URL} is given without {KEY_SHA256}=<sha256 hex>: a fetched config must be pinned"
    )]
    NoHash,
    #[error("{KEY_URL}={url}: {why}")]
    Url { url: String, why: String },
    #[error("{what}: sha256 is {actual}, the command line pins {expected}")]
    HashMismatch {
        what: String,
        expected: String,
        actual: String,
    },
}

/// Where a config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    FwCfg,
    Drive(PathBuf),
    Esp(PathBuf),
    Url(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::FwCfg => write!(f, "fw_cfg {FW_CFG_NAME}"),
            Source::Drive(d) => write!(f, "config drive {} /{DRIVE_FILE}", d.display()),
            Source::Esp(d) => write!(f, "ESP {} /{ESP_FILE}", d.display()),
            Source::Url(u) => write!(f, "{u}"),
        }
    }
}

/// A config and where it came from.
#[derive(Clone, PartialEq, Eq)]
pub struct Found {
    pub source: Source,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Found({}, {} bytes)", self.source, self.bytes.len())
    }
}

/// What [`discover`] looks at.
pub struct Env<'a> {
    /// `/` on a machine.
    pub root: &'a Path,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The ESP's device node, when known.
    pub esp: Option<PathBuf>,
}

fn under(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

fn read_limited(path: &Path) -> Result<Option<Vec<u8>>, SourceError> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SourceError::Read {
                path: path.into(),
                source,
            })
        }
    };
    let mut bytes = Vec::new();
    f.take(MAX_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| SourceError::Read {
            path: path.into(),
            source,
        })?;
    if bytes.len() as u64 > MAX_SIZE {
        return Err(SourceError::TooLarge {
            what: path.display().to_string(),
        });
    }
    Ok(Some(bytes))
}

/// The volume label of a FAT boot sector (FAT12/16 or FAT32), if it is one.
pub fn fat_label(sector: &[u8]) -> Option<String> {
    if sector.len() < 512 || sector[510..512] != [0x55, 0xAA] {
        return None;
    }
    let field = if &sector[82..87] == b"FAT32" && sector[66] == 0x29 {
        &sector[71..82]
    } else if &sector[54..58] == b"FAT1" && sector[38] == 0x29 {
        &sector[43..54]
    } else {
        return None;
    };
    Some(String::from_utf8_lossy(field).trim_end().to_string())
}

/// Block devices under `<root>/sys/class/block` whose FAT label is `label`, as `<root>/dev/...`.
pub fn find_labelled(root: &Path, label: &str) -> Vec<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("sys/class/block"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    !["loop", "ram", "zram", "sr", "dm-", "md"]
                        .iter()
                        .any(|p| n.starts_with(p))
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .map(|n| root.join("dev").join(n))
        .filter(|dev| {
            let mut sector = [0u8; 512];
            std::fs::File::open(dev)
                .and_then(|mut f| f.read_exact(&mut sector))
                .is_ok()
                && fat_label(&sector).as_deref() == Some(label)
        })
        .collect()
}

/// The most one lookup may read from a FAT volume, its metadata and the file together: a
/// config of [`MAX_SIZE`] and thousands of directory entries take far less. It is what stops a
/// hostile volume whose directory's cluster chain loops (the `fatfs` crate follows it forever).
pub const FAT_READ_BUDGET: u64 = MAX_SIZE + 8 * (1 << 20);
/// The most reads one lookup may make (each cluster step of a FAT chain is one).
const FAT_READ_CALLS: u64 = 1 << 20;

/// A block device or image read as a FAT volume: reads go through a buffer that a seek inside it
/// keeps (the `fatfs` crate seeks before every read), any write fails, so looking for a config
/// can never change the volume, and past [`FAT_READ_BUDGET`] every read fails.
struct ReadOnly {
    inner: std::io::BufReader<std::fs::File>,
    /// The position the next read starts at.
    pos: u64,
    /// Bytes and reads handed out so far.
    read: u64,
    calls: u64,
}

impl ReadOnly {
    fn new(f: std::fs::File) -> ReadOnly {
        ReadOnly {
            inner: std::io::BufReader::with_capacity(64 * 1024, f),
            pos: 0,
            read: 0,
            calls: 0,
        }
    }
}

impl Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.calls += 1;
        if self.read > FAT_READ_BUDGET || self.calls > FAT_READ_CALLS {
            return Err(std::io::Error::other(format!(
                "more than {FAT_READ_BUDGET} bytes or {FAT_READ_CALLS} reads for one file: \
                 the volume is damaged (a cluster chain that loops?)"
            )));
        }
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for ReadOnly {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        if let std::io::SeekFrom::Start(p) = to {
            if let Ok(delta) = i64::try_from(i128::from(p) - i128::from(self.pos)) {
                self.inner.seek_relative(delta)?;
                self.pos = p;
                return Ok(p);
            }
        }
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }
}

impl Write for ReadOnly {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "the volume is read only here",
        ))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads `file` (a path inside the volume, `/`-separated, matched without regard to case as
/// FAT does) from the FAT volume on `dev`, without mounting it; `None` when it has no such file.
pub fn read_from_volume(dev: &Path, file: &str) -> Result<Option<Vec<u8>>, SourceError> {
    let fat = |source| SourceError::Fat {
        dev: dev.into(),
        file: file.into(),
        source,
    };
    let mut f = std::fs::File::open(dev).map_err(|source| SourceError::Read {
        path: dev.into(),
        source,
    })?;
    // `fatfs` trusts the volume's cluster numbers and sizes: they are checked first.
    crate::fat::check(&mut f).map_err(|source| SourceError::FatRefused {
        dev: dev.into(),
        source,
    })?;
    let volume = ReadOnly::new(f);
    let fs = fatfs::FileSystem::new(volume, fatfs::FsOptions::new()).map_err(fat)?;
    let mut found = match fs.root_dir().open_file(file) {
        Ok(found) => found,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fat(e)),
    };
    let mut bytes = Vec::new();
    (&mut found)
        .take(MAX_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(fat)?;
    if bytes.len() as u64 > MAX_SIZE {
        return Err(SourceError::TooLarge {
            what: format!("/{file} on {}", dev.display()),
        });
    }
    Ok(Some(bytes))
}

fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The URL source of a command line: `(url, sha256)`.
pub fn url_source(cmdline: &str) -> Result<Option<(String, String)>, SourceError> {
    let Some(url) = cmdline_value(cmdline, KEY_URL) else {
        return Ok(None);
    };
    let sha = cmdline_value(cmdline, KEY_SHA256).ok_or(SourceError::NoHash)?;
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SourceError::NoHash);
    }
    Ok(Some((url.to_string(), sha.to_ascii_lowercase())))
}

/// `GET url` over plain HTTP/1.0; the body, at most [`MAX_SIZE`] bytes. `timeout` bounds the
/// whole try, from connecting to the last byte: a server that trickles is cut off.
pub fn http_get(url: &str, timeout: Duration) -> Result<Vec<u8>, SourceError> {
    let bad = |why: String| SourceError::Url {
        url: url.to_string(),
        why,
    };
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        bad("only http:// URLs are supported (the sha256 pins the content)".into())
    })?;
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let host_port = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = host_port
        .to_socket_addrs()
        .map_err(|e| bad(format!("resolving {host_port}: {e}")))?
        .next()
        .ok_or_else(|| bad(format!("{host_port} has no address")))?;
    let until = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| bad(format!("connecting to {addr}: {e}")))?;
    let _ = s.set_write_timeout(Some(timeout));
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: caisson-provision\r\n\r\n"
    );
    s.write_all(request.as_bytes())
        .map_err(|e| bad(format!("sending the request: {e}")))?;
    let mut reply = Vec::new();
    Deadline {
        stream: s,
        until,
        total: timeout,
    }
    .take(MAX_SIZE + 64 * 1024)
    .read_to_end(&mut reply)
    .map_err(|e| bad(format!("reading the reply: {e}")))?;
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("the reply has no end of headers".into()))?;
    let head = String::from_utf8_lossy(&reply[..split]);
    let status = head.lines().next().unwrap_or_default().to_string();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(bad(format!("the server answered {status:?}")));
    }
    let body = reply.split_off(split + 4);
    if body.len() as u64 > MAX_SIZE {
        return Err(SourceError::TooLarge { what: url.into() });
    }
    Ok(body)
}

/// A socket read within a total deadline: each read waits at most what is left of it.
struct Deadline {
    stream: TcpStream,
    until: Instant,
    total: Duration,
}

impl Deadline {
    fn late(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no complete answer within {} s", self.total.as_secs_f64()),
        )
    }
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.late());
        }
        self.stream.set_read_timeout(Some(left))?;
        match self.stream.read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(self.late())
            }
            other => other,
        }
    }
}

fn pinned(what: String, bytes: Vec<u8>, expected: &str) -> Result<Vec<u8>, SourceError> {
    let actual = sha256_hex(&bytes);
    if actual != expected {
        return Err(SourceError::HashMismatch {
            what,
            expected: expected.into(),
            actual,
        });
    }
    Ok(bytes)
}

/// The local sources (fw_cfg, config drive, ESP), first found wins.
pub fn discover_local(env: &Env) -> Result<Option<Found>, SourceError> {
    if let Some(bytes) = read_limited(&under(env.root, FW_CFG_PATH))? {
        return Ok(Some(Found {
            source: Source::FwCfg,
            bytes,
        }));
    }
    if let Some(dev) = find_labelled(env.root, DRIVE_LABEL).into_iter().next() {
        let bytes = read_from_volume(&dev, DRIVE_FILE)?
            .ok_or_else(|| SourceError::DriveEmpty { dev: dev.clone() })?;
        return Ok(Some(Found {
            source: Source::Drive(dev),
            bytes,
        }));
    }
    if let Some(esp) = &env.esp {
        // The ESP is on every machine: a failure to read it must not stop an unprovisioned one.
        match read_from_volume(esp, ESP_FILE) {
            Ok(Some(bytes)) => {
                return Ok(Some(Found {
                    source: Source::Esp(esp.clone()),
                    bytes,
                }))
            }
            Ok(None) => {}
            Err(e) => log::warn!("provisioning: looking on the ESP: {e}"),
        }
    }
    Ok(None)
}

/// Every source in order; the URL one is fetched only when no local one exists.
pub fn discover(env: &Env, timeout: Duration) -> Result<Option<Found>, SourceError> {
    if let Some(found) = discover_local(env)? {
        return Ok(Some(found));
    }
    fetch_url(env.cmdline, timeout)
}

/// The URL source of the kernel command line, fetched and checked against its sha256; `None`
/// when the command line names no URL. The caller brings the network up first.
pub fn fetch_url(cmdline: &str, timeout: Duration) -> Result<Option<Found>, SourceError> {
    match url_source(cmdline)? {
        Some((url, sha)) => {
            let bytes = pinned(url.clone(), http_get(&url, timeout)?, &sha)?;
            Ok(Some(Found {
                source: Source::Url(url),
                bytes,
            }))
        }
        None => Ok(None),
    }
}
