//! Service output: each line goes to `/var/log/caisson/<service>.log` (rotated by size, one old
//! file kept as `<service>.log.1`) and to the console as `<service>| line`, rate-limited per
//! service so that a chatty service cannot flood a slow serial console.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Receives a started service's output pipe (the log pump; the supervisor hands it each one).
pub trait OutputSink: Send + Sync {
    fn attach(&self, service: &str, output: File);
}

/// Discards output (tests).
pub struct NoOutput;
impl OutputSink for NoOutput {
    fn attach(&self, _service: &str, _output: File) {}
}

/// The mode of a service log: output may hold what others must not read.
pub const LOG_MODE: u32 = 0o640;

/// A log file that rotates itself when it grows past `max_bytes`.
pub struct LogFile {
    path: PathBuf,
    max_bytes: u64,
    file: Option<File>,
    size: u64,
}

impl LogFile {
    pub fn new(path: PathBuf, max_bytes: u64) -> Self {
        LogFile {
            path,
            max_bytes,
            file: None,
            size: 0,
        }
    }

    fn open(&mut self) -> Option<&mut File> {
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(LOG_MODE)
                .open(&self.path)
                .ok()?;
            // A log made by an older init may be world-readable: close it to others.
            if f.metadata()
                .is_ok_and(|m| m.permissions().mode() & 0o007 != 0)
            {
                let _ = f.set_permissions(std::fs::Permissions::from_mode(LOG_MODE));
            }
            self.size = f.metadata().map(|m| m.len()).unwrap_or(0);
            self.file = Some(f);
        }
        self.file.as_mut()
    }

    /// Append one line (a newline is added).
    pub fn write_line(&mut self, line: &str) {
        if self.size + line.len() as u64 + 1 > self.max_bytes && self.size > 0 {
            self.file = None;
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            let _ = std::fs::rename(&self.path, old);
        }
        let Some(f) = self.open() else {
            return;
        };
        if f.write_all(format!("{line}\n").as_bytes()).is_ok() {
            self.size += line.len() as u64 + 1;
        }
    }
}

/// A token bucket: `burst` lines at once, `per_sec` lines per second after that.
#[derive(Debug)]
pub struct RateLimit {
    burst: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
    /// Lines dropped since the last one shown.
    pub dropped: u64,
}

impl RateLimit {
    pub fn new(burst: u32, per_sec: u32, now: Instant) -> Self {
        RateLimit {
            burst: burst.into(),
            per_sec: per_sec.into(),
            tokens: burst.into(),
            last: now,
            dropped: 0,
        }
    }

    /// True when a line may be shown now.
    pub fn allow(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

/// Where output goes.
#[derive(Debug, Clone)]
pub struct LogPump {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub console_burst: u32,
    pub console_per_sec: u32,
    /// Print to the console (stderr) as well.
    pub console: bool,
}

impl LogPump {
    /// The log file of `service`.
    pub fn path(dir: &Path, service: &str) -> PathBuf {
        dir.join(format!("{service}.log"))
    }

    /// Copy `output` line by line until it closes (runs on its own thread).
    pub fn pump<R: std::io::Read>(&self, service: &str, output: R) {
        let mut file = LogFile::new(Self::path(&self.dir, service), self.max_bytes);
        let mut limit = RateLimit::new(self.console_burst, self.console_per_sec, Instant::now());
        let mut reader = BufReader::new(output);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\n', '\r']);
            file.write_line(line);
            if !self.console {
                continue;
            }
            let dropped = limit.dropped;
            if limit.allow(Instant::now()) {
                let mut text = String::new();
                if dropped > 0 {
                    text.push_str(&format!(
                        "{}{service}: {dropped} lines not shown on the console (see {})\n",
                        crate::console::PREFIX,
                        Self::path(&self.dir, service).display()
                    ));
                    limit.dropped = 0;
                }
                text.push_str(&format!("{service}| {line}\n"));
                let _ = std::io::stderr().lock().write_all(text.as_bytes());
            }
        }
    }
}

impl OutputSink for LogPump {
    fn attach(&self, service: &str, output: File) {
        let pump = self.clone();
        let name = service.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("log-{service}"))
            .stack_size(64 * 1024)
            .spawn(move || pump.pump(&name, output));
        if let Err(e) = spawned {
            log::error!("no log thread for {service}: {e}");
        }
    }
}

/// The last `lines` lines of a service's log.
pub fn tail(dir: &Path, service: &str, lines: usize) -> std::io::Result<Vec<String>> {
    let text = std::fs::read_to_string(LogPump::path(dir, service))?;
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|s| s.to_string())
        .collect())
}

/// Keep reading a log file as it grows, calling `line` for each new line, until `line` returns
/// false. Follows a rotation (the file getting shorter).
pub fn follow(dir: &Path, service: &str, mut line: impl FnMut(&str) -> bool) {
    use std::io::{Seek, SeekFrom};
    let path = LogPump::path(dir, service);
    let mut pos = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut partial = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let Ok(mut f) = File::open(&path) else {
            continue;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < pos {
            pos = 0;
        }
        if len == pos {
            // Probe the peer: an empty heartbeat tells us if it went away.
            if !line("") {
                return;
            }
            continue;
        }
        if f.seek(SeekFrom::Start(pos)).is_err() {
            continue;
        }
        let mut chunk = String::new();
        let _ = std::io::Read::read_to_string(&mut f, &mut chunk);
        pos += chunk.len() as u64;
        partial.push_str(&chunk);
        while let Some(i) = partial.find('\n') {
            let l: String = partial.drain(..=i).collect();
            if !line(l.trim_end_matches('\n')) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("s.log");
        let mut f = LogFile::new(p.clone(), 20);
        for i in 0..5 {
            f.write_line(&format!("line {i}"));
        }
        let cur = std::fs::read_to_string(&p).unwrap();
        let old = std::fs::read_to_string(tmp.path().join("s.log.1")).unwrap();
        assert!(cur.len() <= 20 && old.len() <= 20, "{cur:?} {old:?}");
        assert!(cur.ends_with("line 4\n"));
        assert_eq!(tail(tmp.path(), "s", 1).unwrap(), ["line 4"]);
    }

    #[test]
    fn logs_are_not_world_readable() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("s.log");
        let mut f = LogFile::new(p.clone(), 1 << 20);
        f.write_line("secret output");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o007, 0, "{mode:o}");
        assert_eq!(mode & 0o600, 0o600, "{mode:o}");
        // An old world-readable log is closed to others when reopened.
        let old = tmp.path().join("o.log");
        std::fs::write(&old, "x\n").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        LogFile::new(old.clone(), 1 << 20).write_line("y");
        let mode = std::fs::metadata(&old).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, LOG_MODE, "{mode:o}");
    }

    #[test]
    fn rate_limit_drops_and_recovers() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(3, 10, t0);
        assert!((0..3).all(|_| r.allow(t0)));
        assert!(!r.allow(t0));
        assert_eq!(r.dropped, 1);
        assert!(r.allow(t0 + Duration::from_millis(150)));
    }

    #[test]
    fn pump_writes_every_line_to_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let pump = LogPump {
            dir: tmp.path().to_path_buf(),
            max_bytes: 1 << 20,
            console_burst: 1,
            console_per_sec: 1,
            console: false,
        };
        pump.pump("svc", &b"one\ntwo\r\nthree"[..]);
        assert_eq!(
            tail(tmp.path(), "svc", 10).unwrap(),
            ["one", "two", "three"]
        );
    }
}
