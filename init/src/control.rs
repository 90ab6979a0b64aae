//! The control protocol (documented in `init/CONTROL.md`): JSON lines over the unix socket
//! `/run/caisson/init.sock` and over the virtio-serial port `org.caisson.ctl`. One request per
//! line; each answer is one line, except `logs`, which sends one `{"line": ...}` per log line and
//! then `{"ok": true}` (never, with `follow`, until the client goes away).

use crate::logs;
use crate::supervisor::ServiceStatus;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Start {
        service: String,
    },
    Stop {
        service: String,
    },
    Restart {
        service: String,
    },
    Logs {
        service: String,
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        lines: Option<usize>,
    },
    Reboot,
    Poweroff,
    /// Run one command as root and answer with its exit and output (see [`ExecResult`]).
    Exec {
        argv: Vec<String>,
        /// Seconds before its process group is killed; [`EXEC_TIMEOUT_DEFAULT_S`] when absent.
        #[serde(default)]
        timeout_s: Option<u64>,
    },
}

/// An `exec` without `timeout_s` is killed after this many seconds.
pub const EXEC_TIMEOUT_DEFAULT_S: u64 = 60;
/// The longest `timeout_s` an `exec` may ask for.
pub const EXEC_TIMEOUT_MAX_S: u64 = 3600;

/// How an `exec` ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Its exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// stdout and stderr as they came (one pipe), lossily UTF-8, at most 1 MiB.
    pub output: String,
    /// The output was longer than what `output` holds.
    pub truncated: bool,
    /// It ran past `timeout_s` and was killed.
    pub timed_out: bool,
}

impl Request {
    /// How long a client may have to wait for this request's answer.
    pub fn answer_within(&self) -> std::time::Duration {
        let s = match self {
            Request::Exec { timeout_s, .. } => {
                timeout_s
                    .unwrap_or(EXEC_TIMEOUT_DEFAULT_S)
                    .min(EXEC_TIMEOUT_MAX_S)
                    + 30
            }
            _ => 30,
        };
        std::time::Duration::from_secs(s)
    }
}

/// The machine as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub slot: String,
    pub ready: bool,
    pub shutting_down: bool,
    pub services: Vec<ServiceStatus>,
    /// The network (interface, address, state); absent from older inits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::network::NetStatus>,
    /// The init's resident memory (VmRSS) in KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_rss_kib: Option<u64>,
    /// The kernel's host name (provisioned or `caisson`); absent from older inits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// One log line (`logs` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    /// How the command ended (`exec` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecResult>,
}

impl Response {
    pub fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }

    pub fn error(e: impl ToString) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
}

/// Answers the requests that need the supervisor (everything but `logs`).
pub type Dispatch = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// The longest request line the init reads. A longer one is refused and skipped without being
/// kept in memory (an `exec` with its arguments fits many times over).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// One request line read from a connection.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Text(String),
    TooLong,
    NotUtf8,
    End,
}

/// Reads the next line of at most [`MAX_REQUEST_LINE`] bytes. A longer line is consumed up to
/// its newline in buffer-sized pieces, never held whole.
fn next_line<R: BufRead>(r: &mut R) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let limit = MAX_REQUEST_LINE as u64 + 1;
    if std::io::Read::take(&mut *r, limit).read_until(b'\n', &mut buf)? == 0 {
        return Ok(Line::End);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_REQUEST_LINE {
        skip_line(r)?;
        return Ok(Line::TooLong);
    }
    Ok(String::from_utf8(buf).map_or(Line::NotUtf8, Line::Text))
}

/// Consumes input up to and including the next newline (or to the end).
fn skip_line<R: BufRead>(r: &mut R) -> std::io::Result<()> {
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            return Ok(());
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => {
                r.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = chunk.len();
                r.consume(n);
            }
        }
    }
}

/// Serve one connection (a socket client, or the virtio port) until it closes.
pub fn serve_stream<R: std::io::Read, W: Write>(
    reader: R,
    mut writer: W,
    dispatch: &Dispatch,
    log_dir: &Path,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(reader);
    loop {
        let line = match next_line(&mut reader)? {
            Line::End => return Ok(()),
            Line::Text(l) => l,
            Line::TooLong => {
                let why = format!("request line longer than {MAX_REQUEST_LINE} bytes refused");
                send(&mut writer, &Response::error(why))?;
                continue;
            }
            Line::NotUtf8 => {
                send(&mut writer, &Response::error("bad request: not UTF-8"))?;
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                send(&mut writer, &Response::error(format!("bad request: {e}")))?;
                continue;
            }
        };
        match req {
            Request::Logs {
                service,
                follow,
                lines,
            } => serve_logs(&mut writer, log_dir, &service, follow, lines)?,
            other => send(&mut writer, &dispatch(other))?,
        }
    }
}

fn send<W: Write>(w: &mut W, r: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(r).map_err(std::io::Error::other)?;
    text.push('\n');
    w.write_all(text.as_bytes())?;
    w.flush()
}

fn serve_logs<W: Write>(
    w: &mut W,
    dir: &Path,
    service: &str,
    follow: bool,
    lines: Option<usize>,
) -> std::io::Result<()> {
    if !crate::service::valid_name(service) {
        return send(
            w,
            &Response::error(format!("{service:?} is not a service name")),
        );
    }
    let tail = match logs::tail(dir, service, lines.unwrap_or(usize::MAX)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && follow => Vec::new(),
        Err(e) => return send(w, &Response::error(format!("no log for {service}: {e}"))),
    };
    for l in tail {
        send(w, &line(l))?;
    }
    if follow {
        let mut failed = None;
        logs::follow(dir, service, |l| {
            // Heartbeats (empty lines) are not sent: a write error is how we notice a closed peer,
            // so write a bare newline, which clients skip.
            let r = if l.is_empty() {
                w.write_all(b"\n").and_then(|_| w.flush())
            } else {
                send(w, &line(l.to_string()))
            };
            match r {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        });
        return failed.map_or(Ok(()), Err);
    }
    send(w, &Response::ok())
}

fn line(l: String) -> Response {
    Response {
        ok: true,
        line: Some(l),
        ..Default::default()
    }
}

/// Accept connections on `path` forever, one thread per connection. The socket is root's alone:
/// it appears under its name already mode 0600 (bound under a temporary name, then renamed), and
/// a peer whose credentials (`SO_PEERCRED`) are not root's is answered with an error and closed.
pub fn serve_socket(path: &Path, dispatch: Dispatch, log_dir: PathBuf) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut fresh = path.as_os_str().to_owned();
    fresh.push(".new");
    let fresh = PathBuf::from(fresh);
    let _ = std::fs::remove_file(&fresh);
    let listener = UnixListener::bind(&fresh)?;
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&fresh, path)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            // A panic here would close the socket for good: it is caught and the loop goes on
            // (a connection's own thread that panics just ends, see crate::guard).
            crate::guard::restarting(
                "the control socket",
                std::time::Duration::from_secs(1),
                || {
                    for conn in listener.incoming() {
                        let Ok(conn) = conn else { continue };
                        let dispatch = dispatch.clone();
                        let log_dir = log_dir.clone();
                        let _ = std::thread::Builder::new()
                            .name("control-conn".into())
                            .stack_size(128 * 1024)
                            .spawn(move || serve_connection(conn, &dispatch, &log_dir));
                    }
                },
            )
        })?;
    Ok(())
}

/// Serves one socket client if it is root.
fn serve_connection(mut conn: UnixStream, dispatch: &Dispatch, log_dir: &Path) {
    match rustix::net::sockopt::socket_peercred(&conn) {
        Ok(cred) if cred.uid.is_root() => {}
        Ok(cred) => {
            let why = format!(
                "uid {} may not use the init's control socket",
                cred.uid.as_raw()
            );
            log::warn!("control socket: refused a peer: {why}");
            let _ = send(&mut conn, &Response::error(why));
            return;
        }
        Err(e) => {
            log::warn!("control socket: cannot read a peer's credentials: {e}");
            return;
        }
    }
    if let Ok(reader) = conn.try_clone() {
        let _ = serve_stream(reader, conn, dispatch, log_dir);
    }
}

/// The virtio-serial port called `name`, found through `/sys/class/virtio-ports/*/name`.
pub fn find_virtio_port(root: &Path, name: &str) -> Option<PathBuf> {
    let rd = std::fs::read_dir(root.join("sys/class/virtio-ports")).ok()?;
    rd.filter_map(|e| e.ok()).find_map(|e| {
        let n = std::fs::read_to_string(e.path().join("name")).ok()?;
        (n.trim() == name).then(|| root.join("dev").join(e.file_name()))
    })
}

/// [`find_virtio_port`], asked again until `within` has passed: the port is announced by the
/// device some time after `virtio_console` is loaded, later than that on a busy host. Polls at
/// 50 ms, doubling to 1 s.
pub fn wait_for_virtio_port(
    root: &Path,
    name: &str,
    within: std::time::Duration,
) -> Option<PathBuf> {
    let deadline = std::time::Instant::now() + within;
    let mut pause = std::time::Duration::from_millis(50);
    loop {
        if let Some(port) = find_virtio_port(root, name) {
            return Some(port);
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(std::time::Duration::from_secs(1));
    }
}

/// Serve the protocol on the virtio port for as long as the machine runs.
///
/// The port stays open between host connections: the guest kernel throws away whatever arrives
/// on a closed port, so closing it when one host client leaves would lose the first request of
/// the next client if it came quickly. A read returns EOF while no host is connected; we poll
/// gently and read again on the same descriptor. Only a real error reopens the port.
pub fn serve_virtio(port: PathBuf, dispatch: Dispatch, log_dir: PathBuf) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("control-virtio".into())
        .spawn(move || {
            let mut open: Option<std::fs::File> = None;
            loop {
                if open.is_none() {
                    match std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&port)
                    {
                        Ok(f) => open = Some(f),
                        Err(e) => log::debug!("virtio port {}: {e}", port.display()),
                    }
                }
                if let Some(f) = &open {
                    if let Err(e) = serve_stream(f, f, &dispatch, &log_dir) {
                        log::debug!("virtio port {}: {e}", port.display());
                        open = None;
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        })?;
    Ok(())
}

/// A client of the control socket (used by `caisson-ctl`).
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// A control client failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "connecting to {path} failed (is this a Caisson machine, and are you root?): {source}"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the init failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the init sent something that is not a response: {0}")]
    Protocol(#[from] serde_json::Error),
    #[error("the init closed the connection")]
    Closed,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Client {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Send a request.
    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        let mut text = serde_json::to_string(req)?;
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        Ok(())
    }

    /// Read the next response (skipping heartbeats).
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(ClientError::Closed);
            }
            if !line.trim().is_empty() {
                return Ok(serde_json::from_str(&line)?);
            }
        }
    }

    /// Send a request and read its one response.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.send(req)?;
        self.recv()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"restart","service":"containerd"}"#).unwrap();
        assert_eq!(
            r,
            Request::Restart {
                service: "containerd".into()
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"logs","service":"x"}"#).unwrap();
        assert_eq!(
            r,
            Request::Logs {
                service: "x".into(),
                follow: false,
                lines: None
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Poweroff).unwrap(),
            r#"{"cmd":"poweroff"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::ok()).unwrap(),
            r#"{"ok":true}"#
        );
    }

    #[test]
    fn socket_round_trip_with_logs() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("svc.log"), "a\nb\nc\n").unwrap();
        let sock = tmp.path().join("run/init.sock");
        let dispatch: Dispatch = Arc::new(|req| match req {
            Request::Status => Response {
                ok: true,
                status: Some(Status {
                    version: "1.0.0".into(),
                    slot: "a".into(),
                    ready: true,
                    shutting_down: false,
                    services: vec![],
                    network: None,
                    init_rss_kib: None,
                    hostname: Some("web-1".into()),
                }),
                ..Default::default()
            },
            _ => Response::error("nope"),
        });
        serve_socket(&sock, dispatch, tmp.path().to_path_buf()).unwrap();
        let mut c = Client::connect(&sock).unwrap();
        let st = c.call(&Request::Status).unwrap();
        assert_eq!(st.status.unwrap().version, "1.0.0");
        assert_eq!(
            c.call(&Request::Reboot).unwrap().error.as_deref(),
            Some("nope")
        );
        c.send(&Request::Logs {
            service: "svc".into(),
            follow: false,
            lines: Some(2),
        })
        .unwrap();
        assert_eq!(c.recv().unwrap().line.as_deref(), Some("b"));
        assert_eq!(c.recv().unwrap().line.as_deref(), Some("c"));
        assert_eq!(c.recv().unwrap(), Response::ok());
        c.writer.write_all(b"garbage\n").unwrap();
        assert!(c.recv().unwrap().error.unwrap().contains("bad request"));
    }

    fn echo_dispatch() -> Dispatch {
        Arc::new(|_| Response::error("dispatched"))
    }

    #[test]
    fn an_overlong_request_is_refused_and_the_next_one_served() {
        let mut input = vec![b'x'; MAX_REQUEST_LINE * 3];
        input.extend_from_slice(b"\n{\"cmd\":\"status\"}\n\xff\xfe\n");
        let mut out = Vec::new();
        serve_stream(
            &input[..],
            &mut out,
            &echo_dispatch(),
            Path::new("/nonexistent"),
        )
        .unwrap();
        let answers: Vec<Response> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(answers.len(), 3, "{answers:?}");
        assert!(answers[0]
            .error
            .as_deref()
            .unwrap()
            .contains("longer than 65536"));
        assert_eq!(answers[1].error.as_deref(), Some("dispatched"));
        assert!(answers[2].error.as_deref().unwrap().contains("not UTF-8"));
    }

    #[test]
    fn a_line_at_the_limit_is_read_and_one_past_it_is_not_kept() {
        let mut at = vec![b'a'; MAX_REQUEST_LINE];
        at.push(b'\n');
        assert_eq!(
            next_line(&mut &at[..]).unwrap(),
            Line::Text("a".repeat(MAX_REQUEST_LINE))
        );
        // An endless line without a newline: refused, the reader drained, nothing kept.
        let past = vec![b'a'; MAX_REQUEST_LINE * 4];
        let mut r = BufReader::with_capacity(4096, &past[..]);
        assert_eq!(next_line(&mut r).unwrap(), Line::TooLong);
        assert_eq!(next_line(&mut r).unwrap(), Line::End);
    }

    #[test]
    fn the_socket_is_roots_alone() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("run/init.sock");
        serve_socket(&sock, echo_dispatch(), tmp.path().to_path_buf()).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        if !rustix::process::geteuid().is_root() {
            eprintln!("not root: the peer check needs a second user, skipped");
            return;
        }
        // Opened to everyone, the socket still serves only root: a client as nobody is refused.
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            tmp.path().join("run"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let client = r#"import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b'{"cmd":"status"}\n'); print(s.makefile().readline().strip())"#;
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(["/usr/bin/python3", "-c", client])
            .arg(&sock)
            .output()
            .unwrap();
        let answer = String::from_utf8_lossy(&out.stdout);
        assert!(answer.contains("uid 65534 may not use"), "{answer} {out:?}");
        let mut c = Client::connect(&sock).unwrap();
        assert_eq!(
            c.call(&Request::Status).unwrap().error.as_deref(),
            Some("dispatched")
        );
    }

    #[test]
    fn finds_the_virtio_port_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        for (dev, name) in [("vport0p1", "other"), ("vport0p2", "org.caisson.ctl")] {
            let d = tmp.path().join("sys/class/virtio-ports").join(dev);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find_virtio_port(tmp.path(), caisson_layout::paths::VIRTIO_CONTROL_PORT),
            Some(tmp.path().join("dev/vport0p2"))
        );
    }

    #[test]
    fn waits_for_a_port_announced_late_and_gives_up_on_none() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let name = caisson_layout::paths::VIRTIO_CONTROL_PORT;
        let none = wait_for_virtio_port(&root, name, std::time::Duration::from_millis(120));
        assert_eq!(none, None);
        let late = std::thread::spawn({
            let root = root.clone();
            move || {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let d = root.join("sys/class/virtio-ports/vport2p1");
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
            }
        });
        // Nothing there at the first look: found only by looking again.
        assert_eq!(find_virtio_port(&root, name), None);
        let found = wait_for_virtio_port(&root, name, std::time::Duration::from_secs(30));
        late.join().unwrap();
        assert_eq!(found, Some(root.join("dev/vport2p1")));
    }
}
