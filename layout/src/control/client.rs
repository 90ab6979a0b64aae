//! The one client of the control protocol: `caisson-ctl`, the agents that ask for a reboot and
//! the QEMU harness all talk to the init through [`Client`].

use super::wire::{Request, Response, MAX_RESPONSE_LINE};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A connection a [`Client`] can bound its reads on.
pub trait Stream: Read + Write {
    /// Makes a read that waits longer than `timeout` fail with `WouldBlock` or `TimedOut`
    /// (`None`: wait for ever).
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Stream for UnixStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl Stream for TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

/// Any `Read + Write` (a pipe, a serial port, a test buffer) as a [`Stream`] that cannot bound
/// a read: a deadline is checked between reads only, so a read that blocks is not cut short.
#[derive(Debug)]
pub struct Unbounded<T>(pub T);

impl<T: Read> Read for Unbounded<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<T: Write> Write for Unbounded<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<T: Read + Write> Stream for Unbounded<T> {
    fn set_read_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// A failure to talk to the init.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error(
        "connecting to {path} failed (is this a Caisson machine, and are you root?): {source}"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("talking to the init on {peer} failed: {source}")]
    Io {
        peer: String,
        #[source]
        source: io::Error,
    },
    /// No (complete) answer line came in time.
    #[error("the init on {peer} did not answer within {timeout:?}")]
    TimedOut { peer: String, timeout: Duration },
    /// The init closed the connection before a complete line.
    #[error("the init on {peer} closed the connection")]
    Closed { peer: String },
    /// An answer line longer than the limit; the connection is out of step and must be dropped.
    #[error("the init on {peer} sent a line longer than {limit} bytes")]
    TooLong { peer: String, limit: usize },
    /// An answer line that is not a [`Response`].
    #[error("the init on {peer} sent something that is not a response ({source}): {line}")]
    Protocol {
        peer: String,
        /// The line, cut to a few hundred bytes.
        line: String,
        #[source]
        source: serde_json::Error,
    },
    /// A request that could not be written as JSON.
    #[error("encoding a request failed: {0}")]
    Encode(#[source] serde_json::Error),
}

/// The most of a bad answer line an error shows.
const SHOWN: usize = 200;

/// A connection to the init's control socket or virtio port: JSON lines (init/CONTROL.md).
#[derive(Debug)]
pub struct Client<S = UnixStream> {
    stream: S,
    peer: String,
    /// Bytes read past the last line returned.
    pending: Vec<u8>,
    max_line: usize,
}

impl Client<UnixStream> {
    /// Connects to the init's unix socket (`caisson_layout::paths::CONTROL_SOCKET`).
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Client::over(stream, path.display().to_string()))
    }
}

impl<S: Stream> Client<S> {
    /// Talks over `stream`; `peer` names it in errors (a socket path, a port).
    pub fn over(stream: S, peer: impl Into<String>) -> Self {
        Client {
            stream,
            peer: peer.into(),
            pending: Vec::new(),
            max_line: MAX_RESPONSE_LINE,
        }
    }

    /// The stream it talks over.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Changes the longest line read ([`MAX_RESPONSE_LINE`] by default).
    pub fn set_max_line(&mut self, max: usize) {
        self.max_line = max;
    }

    /// Sends `req` and reads its one answer, waiting at most [`Request::answer_within`].
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.send(req)?;
        self.recv(req.answer_within())
    }

    /// Sends one request (for `logs`, whose answer is many lines: read them with
    /// [`Client::recv`]).
    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        let line = serde_json::to_string(req).map_err(ClientError::Encode)?;
        self.send_line(&line)
    }

    /// Sends one line as it is (a newline is added). For probes and for testing the init's
    /// handling of bad input; requests go through [`Client::send`].
    pub fn send_line(&mut self, line: &str) -> Result<(), ClientError> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.trim_end_matches('\n').as_bytes());
        buf.push(b'\n');
        let peer = &self.peer;
        let io = |source| ClientError::Io {
            peer: peer.clone(),
            source,
        };
        self.stream.write_all(&buf).map_err(io)?;
        self.stream.flush().map_err(io)
    }

    /// Reads the next response, skipping blank lines (heartbeats). `silence` bounds the wait for
    /// each line, so a heartbeat counts as a sign of life (`logs` with `follow`).
    pub fn recv(&mut self, silence: Duration) -> Result<Response, ClientError> {
        loop {
            let line = self.read_raw(silence)?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&line).map_err(|source| ClientError::Protocol {
                peer: self.peer.clone(),
                line: shown(&line),
                source,
            });
        }
    }

    /// Reads the next line as it is, blank or not, without its line end (lossily UTF-8).
    pub fn read_line(&mut self, timeout: Duration) -> Result<String, ClientError> {
        let line = self.read_raw(timeout)?;
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    /// Reads one line of at most `max_line` bytes before `timeout` has passed.
    fn read_raw(&mut self, timeout: Duration) -> Result<Vec<u8>, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut searched = 0;
        loop {
            if let Some(i) = self.pending[searched..].iter().position(|&b| b == b'\n') {
                let end = searched + i;
                if end > self.max_line {
                    return Err(self.too_long());
                }
                let rest = self.pending.split_off(end + 1);
                let mut line = std::mem::replace(&mut self.pending, rest);
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            searched = self.pending.len();
            if searched > self.max_line {
                return Err(self.too_long());
            }
            self.fill(deadline, timeout)?;
        }
    }

    /// Reads what the stream has into `pending`, waiting until `deadline` at most.
    fn fill(&mut self, deadline: Instant, timeout: Duration) -> Result<(), ClientError> {
        let timed_out = || ClientError::TimedOut {
            peer: self.peer.clone(),
            timeout,
        };
        let io = |source| ClientError::Io {
            peer: self.peer.clone(),
            source,
        };
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            self.stream.set_read_timeout(Some(left)).map_err(io)?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(ClientError::Closed {
                        peer: self.peer.clone(),
                    })
                }
                Ok(n) => {
                    self.pending.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(timed_out())
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
    }

    fn too_long(&mut self) -> ClientError {
        self.pending = Vec::new();
        ClientError::TooLong {
            peer: self.peer.clone(),
            limit: self.max_line,
        }
    }
}

/// The start of a bad line, for an error message.
fn shown(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(&line[..line.len().min(SHOWN)]).into_owned();
    if line.len() > SHOWN {
        format!("{text}...")
    } else {
        text
    }
}
