//! The control protocol (documented in `init/CONTROL.md`): JSON lines over the unix socket
//! `/run/caisson/init.sock` and over the virtio-serial port `org.caisson.ctl`. One request per
//! line; each answer is one line, except `logs`, which sends one `{"line": ...}` per log line and
//! then `{"ok": true}` (never, with `follow`, until the client goes away).

mod gate;

pub use gate::{Channel, DebugConfig, DebugConfigError, ExecGate, DEBUG_CONFIG_PATH};
// The protocol's messages live with its client in `caisson_layout::control`; stage 2's
// dispatcher reaches the ones it answers with through here.
pub use caisson_layout::control::{
    Request, Response, Status, EXEC_TIMEOUT_DEFAULT_S, EXEC_TIMEOUT_MAX_S,
};

use crate::logs;
use caisson_layout::control::MAX_REQUEST_LINE;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Answers the requests that need the supervisor (everything but `logs`).
pub type Dispatch = Arc<dyn Fn(Request) -> Response + Send + Sync>;

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

/// Serve one connection (a socket client, or the virtio port) until it closes. A request that
/// `channel` does not admit (`exec` on the virtio port, unless debugging is on) gets an error.
pub fn serve_stream<R: std::io::Read, W: Write>(
    reader: R,
    mut writer: W,
    dispatch: &Dispatch,
    log_dir: &Path,
    channel: &Channel,
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
        if let Err(why) = channel.admit(&req) {
            log::warn!("control: refused a request: {why}");
            send(&mut writer, &Response::error(why))?;
            continue;
        }
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
        send(w, &Response::line(l))?;
    }
    if follow {
        let mut failed = None;
        logs::follow(dir, service, |l| {
            // Heartbeats (empty lines) are not sent: a write error is how we notice a closed peer,
            // so write a bare newline, which clients skip.
            let r = if l.is_empty() {
                w.write_all(b"\n").and_then(|_| w.flush())
            } else {
                send(w, &Response::line(l))
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
        let _ = serve_stream(reader, conn, dispatch, log_dir, &Channel::Socket);
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

/// Serve the protocol on the virtio port for as long as the machine runs; `exec` only as `gate`
/// allows.
///
/// The port stays open between host connections: the guest kernel throws away whatever arrives
/// on a closed port, so closing it when one host client leaves would lose the first request of
/// the next client if it came quickly. A read returns EOF while no host is connected; we poll
/// gently and read again on the same descriptor. Only a real error reopens the port.
pub fn serve_virtio(
    port: PathBuf,
    dispatch: Dispatch,
    log_dir: PathBuf,
    gate: ExecGate,
) -> std::io::Result<()> {
    let channel = Channel::Virtio(gate);
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
                    if let Err(e) = serve_stream(f, f, &dispatch, &log_dir, &channel) {
                        log::debug!("virtio port {}: {e}", port.display());
                        open = None;
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests;
