//! The guest channel: a virtio-serial port whose host end is a unix socket.
//!
//! The init listens on the port named [`caisson_layout::paths::VIRTIO_CONTROL_PORT`] and speaks
//! its control protocol, JSON lines whose messages and client are `caisson_layout::control`'s.
//! `LineConn` moves lines for QMP.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::QemuError;
use caisson_layout::control::{Client, ClientError, Request, Response};

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

/// A connection to the guest's control port: the init's control protocol
/// ([`caisson_layout::control`]) through its one client.
#[derive(Debug)]
pub struct Control {
    path: PathBuf,
    client: Client,
    timeout: Duration,
}

impl Control {
    /// Connects to the host end of the virtio-serial port.
    pub fn connect(path: &Path) -> Result<Control, QemuError> {
        let stream = UnixStream::connect(path).map_err(QemuError::io("connect to", path))?;
        Ok(Control {
            path: path.to_path_buf(),
            client: Client::over(stream, path.display().to_string()),
            timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// Changes how long [`Control::request`] waits for an answer.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends `req` and returns the init's answer, waiting as long as the request may take
    /// ([`Request::answer_within`]).
    pub fn call(&mut self, req: &Request) -> Result<Response, QemuError> {
        self.call_within(req, req.answer_within())
    }

    /// [`Control::call`] with its own timeout.
    pub fn call_within(&mut self, req: &Request, timeout: Duration) -> Result<Response, QemuError> {
        self.send_request(req)?;
        self.recv(timeout)
    }

    /// Sends `req` without waiting for an answer (`logs`: read its lines with [`Control::recv`]).
    pub fn send_request(&mut self, req: &Request) -> Result<(), QemuError> {
        self.client.send(req).map_err(|e| self.error(e))
    }

    /// Reads the init's next answer (heartbeats skipped), waiting at most `timeout` for it.
    pub fn recv(&mut self, timeout: Duration) -> Result<Response, QemuError> {
        self.client.recv(timeout).map_err(|e| self.error(e))
    }

    /// Sends one line as it is and returns the next line the guest sends back. For probes that
    /// are not requests; requests go through [`Control::call`].
    pub fn request(&mut self, line: &str) -> Result<String, QemuError> {
        self.request_timeout(line, self.timeout)
    }

    /// [`Control::request`] with its own timeout.
    pub fn request_timeout(&mut self, line: &str, timeout: Duration) -> Result<String, QemuError> {
        self.send(line)?;
        self.read_line(timeout)
    }

    /// Sends one line as it is, without waiting for an answer.
    pub fn send(&mut self, line: &str) -> Result<(), QemuError> {
        self.client.send_line(line).map_err(|e| self.error(e))
    }

    /// Reads the next line the guest sends, as it is.
    pub fn read_line(&mut self, timeout: Duration) -> Result<String, QemuError> {
        self.client.read_line(timeout).map_err(|e| self.error(e))
    }

    /// The harness's error for a client error: a timeout or a close names the channel.
    fn error(&self, e: ClientError) -> QemuError {
        match e {
            ClientError::TimedOut { timeout, .. } => QemuError::ChannelTimeout {
                path: self.path.clone(),
                timeout,
            },
            ClientError::Closed { .. } => QemuError::ChannelClosed {
                path: self.path.clone(),
            },
            other => QemuError::Control(other),
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

    #[test]
    fn call_sends_a_typed_request_and_reads_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(&s));
            let first = lines.next().unwrap().unwrap();
            (&s).write_all(b"\n{\"ok\":false,\"error\":\"no\"}\n")
                .unwrap();
            let second = lines.next().unwrap().unwrap();
            (&s).write_all(b"not json\n").unwrap();
            // Wait for the client to go.
            let _ = lines.next();
            (first, second)
        });
        let mut c = Control::connect(&path).unwrap();
        let r = c.call(&Request::Poweroff).unwrap();
        assert_eq!(r, Response::error("no"));
        let err = c
            .call_within(
                &Request::Start {
                    service: "x".into(),
                },
                Duration::from_secs(5),
            )
            .unwrap_err();
        assert!(matches!(err, QemuError::Control(_)), "{err}");
        assert!(err.to_string().contains("not json"), "{err}");
        drop(c);
        let (first, second) = server.join().unwrap();
        assert_eq!(first, r#"{"cmd":"poweroff"}"#);
        assert_eq!(second, r#"{"cmd":"start","service":"x"}"#);
    }
}
