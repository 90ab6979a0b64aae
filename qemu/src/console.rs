//! The serial console, captured to a file by QEMU and read back incrementally.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use regex::Regex;

use crate::QemuError;

/// What `Vm::wait_for` looks for in a console line: a plain substring or a regular expression.
///
/// Lines are matched after ANSI escape sequences and carriage returns are removed, so firmware
/// colour codes never get in the way.
#[derive(Debug, Clone)]
pub enum Pattern {
    Text(String),
    Regex(Regex),
}

impl Pattern {
    /// Compiles a regular expression pattern.
    pub fn regex(re: &str) -> Result<Pattern, QemuError> {
        Ok(Pattern::Regex(Regex::new(re)?))
    }

    /// Whether a cleaned console line matches.
    pub fn is_match(&self, line: &str) -> bool {
        match self {
            Pattern::Text(t) => line.contains(t.as_str()),
            Pattern::Regex(r) => r.is_match(line),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Text(t) => f.write_str(t),
            Pattern::Regex(r) => write!(f, "/{}/", r.as_str()),
        }
    }
}

impl From<&str> for Pattern {
    fn from(s: &str) -> Self {
        Pattern::Text(s.to_string())
    }
}

impl From<String> for Pattern {
    fn from(s: String) -> Self {
        Pattern::Text(s)
    }
}

impl From<Regex> for Pattern {
    fn from(r: Regex) -> Self {
        Pattern::Regex(r)
    }
}

impl From<&Regex> for Pattern {
    fn from(r: &Regex) -> Self {
        Pattern::Regex(r.clone())
    }
}

/// Removes ANSI escape sequences (CSI, OSC and two-byte escapes) and carriage returns.
pub fn clean_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => skip_escape(&mut chars),
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

fn skip_escape(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    match chars.next() {
        // CSI: parameters and intermediates, then one final byte in @..~
        Some('[') => {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
        // OSC: up to BEL or ESC \
        Some(']') => {
            while let Some(c) = chars.next() {
                if c == '\u{7}' {
                    break;
                }
                if c == '\u{1b}' {
                    chars.next();
                    break;
                }
            }
        }
        _ => {}
    }
}

/// A console log file that QEMU appends to, with a cursor for `find`.
#[derive(Debug)]
pub(crate) struct Console {
    path: PathBuf,
    raw: Vec<u8>,
    /// Offset in `raw` where the next search starts.
    cursor: usize,
    /// An unfinished last line that matched: where it starts, how long `raw` was, and since
    /// when it has not grown.
    unfinished: Option<(usize, usize, Instant)>,
}

/// How long an unfinished last line (a prompt) must stay as it is before it counts as a match:
/// a line QEMU is still writing (a ready line cut in two by a busy host) must not.
const SETTLED: Duration = Duration::from_millis(500);

impl Console {
    pub(crate) fn new(path: &Path) -> Console {
        Console {
            path: path.to_path_buf(),
            raw: Vec::new(),
            cursor: 0,
            unfinished: None,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Reads whatever QEMU appended since the last call.
    pub(crate) fn refresh(&mut self) -> Result<(), QemuError> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(QemuError::io("open console log", &self.path)(e)),
        };
        file.seek(SeekFrom::Start(self.raw.len() as u64))
            .map_err(QemuError::io("seek console log", &self.path))?;
        file.read_to_end(&mut self.raw)
            .map_err(QemuError::io("read console log", &self.path))?;
        Ok(())
    }

    /// The whole console so far, cleaned of escape sequences.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw)
            .split('\n')
            .map(clean_line)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Finds the first line after the cursor that matches, and moves the cursor past it. An
    /// unfinished last line (a prompt) matches only once it has not grown for [`SETTLED`], so
    /// that half of a line QEMU is still writing is never taken for the whole.
    pub(crate) fn find(&mut self, pattern: &Pattern) -> Option<String> {
        let mut start = self.cursor;
        while start < self.raw.len() {
            let rest = &self.raw[start..];
            let (line, next, finished) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], start + i + 1, true),
                None => (rest, self.raw.len(), false),
            };
            let line = clean_line(&String::from_utf8_lossy(line));
            if pattern.is_match(&line) {
                if !finished && !self.settled(start) {
                    return None;
                }
                self.cursor = next;
                self.unfinished = None;
                return Some(line);
            }
            start = next;
        }
        None
    }

    /// Whether the unfinished line at `start` has stayed as it is for [`SETTLED`].
    fn settled(&mut self, start: usize) -> bool {
        let now = Instant::now();
        match self.unfinished {
            Some((s, len, since)) if s == start && len == self.raw.len() => {
                now.duration_since(since) >= SETTLED
            }
            _ => {
                self.unfinished = Some((start, self.raw.len(), now));
                false
            }
        }
    }

    /// The last `n` non-empty cleaned lines, for error messages.
    pub(crate) fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let from = lines.len().saturating_sub(n);
        if lines.is_empty() {
            return "(the console is empty)".to_string();
        }
        lines[from..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_firmware_escape_sequences() {
        let raw =
            "\u{1b}[08;01H\u{1b}[1m\u{1b}[33m\u{1b}[40mShell> \u{1b}[0m\u{1b}[37m\u{1b}[40m\r";
        assert_eq!(clean_line(raw), "Shell> ");
        assert_eq!(clean_line("\u{1b}]0;title\u{7}ok"), "ok");
    }

    #[test]
    fn find_moves_the_cursor_and_sees_a_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "boot\r\nready\r\nready again\nShell> ").unwrap();
        let mut c = Console::new(&path);
        c.refresh().unwrap();
        assert_eq!(c.find(&"ready".into()).as_deref(), Some("ready"));
        assert_eq!(c.find(&"ready".into()).as_deref(), Some("ready again"));
        assert_eq!(c.find(&"ready".into()), None);
        // The prompt is an unfinished line: it counts once it has stayed as it is.
        assert_eq!(c.find(&"Shell>".into()), None);
        std::thread::sleep(SETTLED);
        assert_eq!(c.find(&"Shell>".into()).as_deref(), Some("Shell> "));
        let re = Pattern::regex("^bo+t$").unwrap();
        assert_eq!(c.find(&re), None, "the cursor is past it");
        assert!(c.tail(2).starts_with("ready again\n"), "{}", c.tail(2));
    }

    #[test]
    fn half_a_line_is_not_the_line() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut f = File::create(&path).unwrap();
        f.write_all(b"caisson: ready ").unwrap();
        let mut c = Console::new(&path);
        c.refresh().unwrap();
        assert_eq!(c.find(&"caisson: ready ".into()), None);
        f.write_all(b"version=2.0.0 slot=a\n").unwrap();
        c.refresh().unwrap();
        assert_eq!(
            c.find(&"caisson: ready ".into()).as_deref(),
            Some("caisson: ready version=2.0.0 slot=a")
        );
    }

    #[test]
    fn refresh_reads_only_what_was_appended() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut c = Console::new(&path);
        c.refresh().unwrap();
        assert_eq!(c.tail(3), "(the console is empty)");
        let mut f = File::create(&path).unwrap();
        f.write_all(b"one\n").unwrap();
        c.refresh().unwrap();
        f.write_all(b"two\n").unwrap();
        c.refresh().unwrap();
        assert_eq!(c.text(), "one\ntwo\n");
    }
}
