//! The guest channel: a virtio-serial port whose host end is a unix socket.
//!
//! The init listens on the port named [`caisson_layout::paths::VIRTIO_CONTROL_PORT`] and speaks
//! JSON lines; this module only moves lines, the init defines the messages.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::QemuError;

/// How long [`Control::request`] waits for an answer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A unix stream read and written one line at a time, with deadlines.
#[derive(Debug)]
pub(crate) struct LineConn {
    stream: UnixStream,
    pending: Vec<u8>,
}

/// What a line read ends with.
pub(crate) enum Line {
    Text(String),
    Eof,
    TimedOut,
}

impl LineConn {
    pub(crate) fn new(stream: UnixStream) -> LineConn {
        LineConn {
            stream,
            pending: Vec::new(),
        }
    }

    pub(crate) fn write_line(&mut self, line: &str) -> io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.trim_end_matches('\n').as_bytes());
        buf.push(b'\n');
        self.stream.write_all(&buf)?;
        self.stream.flush()
    }

    /// Reads one line (without its newline) before `deadline`.
    pub(crate) fn read_line(&mut self, deadline: Instant) -> io::Result<Line> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let rest = self.pending.split_off(i + 1);
                let mut line = std::mem::replace(&mut self.pending, rest);
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Line::Text(String::from_utf8_lossy(&line).into_owned()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Line::TimedOut);
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(Line::Eof),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(Line::TimedOut)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A connection to the guest's control port.
#[derive(Debug)]
pub struct Control {
    path: PathBuf,
    conn: LineConn,
    timeout: Duration,
}

impl Control {
    /// Connects to the host end of the virtio-serial port.
    pub fn connect(path: &Path) -> Result<Control, QemuError> {
        let stream = UnixStream::connect(path).map_err(QemuError::io("connect to", path))?;
        Ok(Control {
            path: path.to_path_buf(),
            conn: LineConn::new(stream),
            timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// Changes how long [`Control::request`] waits for an answer.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends one line and returns the next line the guest sends back.
    pub fn request(&mut self, line: &str) -> Result<String, QemuError> {
        self.request_timeout(line, self.timeout)
    }

    /// [`Control::request`] with its own timeout.
    pub fn request_timeout(&mut self, line: &str, timeout: Duration) -> Result<String, QemuError> {
        self.send(line)?;
        self.read_line(timeout)
    }

    /// Sends one line without waiting for an answer.
    pub fn send(&mut self, line: &str) -> Result<(), QemuError> {
        self.conn
            .write_line(line)
            .map_err(QemuError::io("write to", &self.path))
    }

    /// Reads the next line the guest sends.
    pub fn read_line(&mut self, timeout: Duration) -> Result<String, QemuError> {
        let deadline = Instant::now() + timeout;
        match self
            .conn
            .read_line(deadline)
            .map_err(QemuError::io("read from", &self.path))?
        {
            Line::Text(t) => Ok(t),
            Line::Eof => Err(QemuError::ChannelClosed {
                path: self.path.clone(),
            }),
            Line::TimedOut => Err(QemuError::ChannelTimeout {
                path: self.path.clone(),
                timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_answers_times_out_and_sees_a_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"{\"op\":\"status\"}\n");
            s.write_all(b"{\"ok\":").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            s.write_all(b"true}\r\nsecond\n").unwrap();
            // wait for the timeout request, then close
            let _ = s.read(&mut buf).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        let mut c = Control::connect(&path).unwrap();
        assert_eq!(c.request("{\"op\":\"status\"}").unwrap(), "{\"ok\":true}");
        assert_eq!(c.read_line(Duration::from_secs(1)).unwrap(), "second");
        let err = c
            .request_timeout("x", Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(err, QemuError::ChannelTimeout { .. }), "{err}");
        server.join().unwrap();
        let err = c.read_line(Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, QemuError::ChannelClosed { .. }), "{err}");
    }
}
