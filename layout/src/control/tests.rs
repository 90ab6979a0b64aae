//! The control protocol's wire format and its client.

use super::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// Every request as it went on the wire before the types moved here (what `caisson-ctl`, the
/// QEMU tests and init/CONTROL.md send): the bytes must not change.
fn requests() -> Vec<(Request, &'static str)> {
    let svc = || "containerd".to_string();
    vec![
        (Request::Status, r#"{"cmd":"status"}"#),
        (
            Request::Start { service: svc() },
            r#"{"cmd":"start","service":"containerd"}"#,
        ),
        (
            Request::Stop { service: svc() },
            r#"{"cmd":"stop","service":"containerd"}"#,
        ),
        (
            Request::Restart { service: svc() },
            r#"{"cmd":"restart","service":"containerd"}"#,
        ),
        (
            Request::Logs {
                service: svc(),
                follow: false,
                lines: Some(100),
            },
            r#"{"cmd":"logs","service":"containerd","follow":false,"lines":100}"#,
        ),
        (
            Request::Logs {
                service: "x".into(),
                follow: true,
                lines: None,
            },
            r#"{"cmd":"logs","service":"x","follow":true,"lines":null}"#,
        ),
        (Request::Reboot, REBOOT_REQUEST),
        (Request::Poweroff, r#"{"cmd":"poweroff"}"#),
        (
            Request::Exec {
                argv: vec!["/bin/busybox".into(), "ps".into()],
                timeout_s: Some(60),
            },
            r#"{"cmd":"exec","argv":["/bin/busybox","ps"],"timeout_s":60}"#,
        ),
        (
            Request::Exec {
                argv: vec!["/bin/id".into()],
                timeout_s: None,
            },
            r#"{"cmd":"exec","argv":["/bin/id"],"timeout_s":null}"#,
        ),
    ]
}

#[test]
fn requests_keep_their_bytes_on_the_wire() {
    assert_eq!(REBOOT_REQUEST, r#"{"cmd":"reboot"}"#);
    for (req, wire) in requests() {
        assert_eq!(serde_json::to_string(&req).unwrap(), wire, "{req:?}");
        assert_eq!(
            serde_json::from_str::<Request>(wire).unwrap(),
            req,
            "{wire}"
        );
    }
}

#[test]
fn hand_written_requests_still_parse() {
    // init/CONTROL.md's examples and older clients' lines: other key orders, optional keys left out.
    for (wire, req) in [
        (
            r#"{"cmd":"logs","service":"containerd","lines":100,"follow":false}"#,
            Request::Logs {
                service: "containerd".into(),
                follow: false,
                lines: Some(100),
            },
        ),
        (
            r#"{"cmd":"logs","service":"x"}"#,
            Request::Logs {
                service: "x".into(),
                follow: false,
                lines: None,
            },
        ),
        (
            r#"{"cmd":"exec","argv":["/bin/id"]}"#,
            Request::Exec {
                argv: vec!["/bin/id".into()],
                timeout_s: None,
            },
        ),
    ] {
        assert_eq!(
            serde_json::from_str::<Request>(wire).unwrap(),
            req,
            "{wire}"
        );
    }
    assert!(serde_json::from_str::<Request>(r#"{"cmd":"format-disk"}"#).is_err());
}

fn status() -> Status {
    Status {
        version: "1.0.0".into(),
        slot: "a".into(),
        ready: true,
        shutting_down: false,
        services: vec![ServiceStatus {
            name: "containerd".into(),
            state: "running".into(),
            pid: Some(312),
            ready: true,
            required: true,
            restarts: 0,
            last_exit: None,
            error: None,
        }],
        network: Some(NetStatus {
            state: "up".into(),
            interface: Some("eth0".into()),
            mode: Some(NetworkMode::Dhcp),
            address: Some("10.0.2.15/24".into()),
            gateway: Some("10.0.2.2".into()),
            dns: vec!["10.0.2.3".into()],
            error: None,
            links: Vec::new(),
        }),
        init_rss_kib: Some(2100),
        hostname: Some("web-1".into()),
        degraded: None,
    }
}

#[test]
fn responses_keep_their_bytes_on_the_wire() {
    let bare = Status {
        services: vec![],
        network: None,
        init_rss_kib: None,
        hostname: None,
        ..status()
    };
    let exec = ExecResult {
        code: Some(3),
        signal: None,
        output: "caisson\nto-stderr\n".into(),
        truncated: false,
        timed_out: false,
    };
    let cases = [
        (Response::ok(), r#"{"ok":true}"#.to_string()),
        (
            Response::error("no service named \"nope\""),
            r#"{"ok":false,"error":"no service named \"nope\""}"#.into(),
        ),
        (
            Response {
                ok: true,
                status: Some(status()),
                ..Default::default()
            },
            concat!(
                r#"{"ok":true,"status":{"version":"1.0.0","slot":"a","ready":true,"#,
                r#""shutting_down":false,"services":[{"name":"containerd","state":"running","#,
                r#""pid":312,"ready":true,"required":true,"restarts":0,"last_exit":null,"#,
                r#""error":null}],"network":{"state":"up","interface":"eth0","mode":"dhcp","#,
                r#""address":"10.0.2.15/24","gateway":"10.0.2.2","dns":["10.0.2.3"],"#,
                r#""error":null},"init_rss_kib":2100,"hostname":"web-1"}}"#
            )
            .into(),
        ),
        (
            Response {
                ok: true,
                status: Some(bare),
                ..Default::default()
            },
            concat!(
                r#"{"ok":true,"status":{"version":"1.0.0","slot":"a","ready":true,"#,
                r#""shutting_down":false,"services":[]}}"#
            )
            .into(),
        ),
        (
            Response::line("a log line"),
            r#"{"ok":true,"line":"a log line"}"#.into(),
        ),
        (
            Response {
                ok: true,
                exec: Some(exec),
                ..Default::default()
            },
            concat!(
                r#"{"ok":true,"exec":{"code":3,"signal":null,"#,
                r#""output":"caisson\nto-stderr\n","truncated":false,"timed_out":false}}"#
            )
            .into(),
        ),
    ];
    for (resp, wire) in cases {
        assert_eq!(serde_json::to_string(&resp).unwrap(), wire);
        assert_eq!(serde_json::from_str::<Response>(&wire).unwrap(), resp);
    }
}

#[test]
fn a_status_with_fields_this_client_does_not_know_still_parses() {
    let newer = r#"{"ok":true,"status":{"version":"2.0.0","slot":"b","ready":false,
        "shutting_down":false,"services":[],"degraded":"root slot a failed verification"}}"#;
    let r: Response = serde_json::from_str(newer).unwrap();
    assert_eq!(r.status.unwrap().slot, "b");
}

#[test]
fn exec_answers_are_awaited_as_long_as_the_command_may_run() {
    assert_eq!(Request::Status.answer_within(), ANSWER_TIMEOUT);
    let exec = |timeout_s| Request::Exec {
        argv: vec![],
        timeout_s,
    };
    assert_eq!(exec(None).answer_within(), Duration::from_secs(90));
    assert_eq!(
        exec(Some(1_000_000)).answer_within(),
        Duration::from_secs(3630)
    );
}

/// An init on a fresh socket that reads one line, writes `answer` and returns the line.
fn init_answering(
    answer: &'static [u8],
) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("init.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let h = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        (&conn).write_all(answer).unwrap();
        // Hold the connection open a moment so the client sees the answer, not a close.
        std::thread::sleep(Duration::from_millis(300));
        line
    });
    (dir, path, h)
}

#[test]
fn a_reboot_is_one_line_and_needs_ok() {
    let (_d, path, h) = init_answering(b"{\"ok\":true}\n");
    request_reboot(&path).unwrap();
    assert_eq!(h.join().unwrap(), "{\"cmd\":\"reboot\"}\n");

    let (_d, path, h) = init_answering(b"{\"ok\":false,\"error\":\"shutting down\"}\n");
    let e = request_reboot(&path).unwrap_err();
    assert!(matches!(e, ControlError::Refused { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        r#"the init refused {"cmd":"reboot"}: shutting down"#
    );
    h.join().unwrap();
}

#[test]
fn no_init_is_a_socket_error_naming_the_path() {
    let e = request_reboot(Path::new("/nonexistent/init.sock")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/init.sock"), "{e}");
    assert!(
        matches!(e, ControlError::Client(ClientError::Connect { .. })),
        "{e:?}"
    );
}

#[test]
fn an_answer_that_is_not_json_is_a_protocol_error() {
    let (_d, path, h) = init_answering(b"ready\n");
    let e = request(&path, &Request::Status).unwrap_err();
    assert!(
        matches!(e, ControlError::Client(ClientError::Protocol { ref line, .. }) if line == "ready"),
        "{e:?}"
    );
    h.join().unwrap();
}

/// A client over one end of a socket pair, and the other end.
fn pair() -> (Client, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (Client::over(a, "test"), b)
}

#[test]
fn heartbeats_are_skipped_and_answers_may_come_in_pieces() {
    let (mut c, mut init) = pair();
    init.write_all(b"\n\r\n{\"ok\":tr").unwrap();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        init.write_all(b"ue,\"line\":\"x\"}\r\n{\"ok\":true}\n")
            .unwrap();
        init
    });
    let r = c.recv(Duration::from_secs(5)).unwrap();
    assert_eq!(r, Response::line("x"));
    assert_eq!(c.recv(Duration::from_secs(5)).unwrap(), Response::ok());
    drop(writer.join().unwrap());
    let e = c.recv(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, ClientError::Closed { .. }), "{e:?}");
}

#[test]
fn a_silent_init_times_out() {
    let (mut c, _init) = pair();
    let e = c.recv(Duration::from_millis(100)).unwrap_err();
    assert!(matches!(e, ClientError::TimedOut { .. }), "{e:?}");
    assert!(e.to_string().contains("did not answer within"), "{e}");
}

#[test]
fn an_answer_longer_than_the_limit_is_refused_without_keeping_it() {
    let (mut c, mut init) = pair();
    c.set_max_line(1000);
    let writer = std::thread::spawn(move || {
        // Endless garbage without a newline: the client stops reading at the limit.
        let _ = init.write_all(&[b'x'; 4000]);
        init
    });
    let e = c.recv(Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(e, ClientError::TooLong { limit: 1000, .. }),
        "{e:?}"
    );
    drop(writer.join().unwrap());

    // A line exactly at the limit is read.
    let (mut c, mut init) = pair();
    c.set_max_line(11);
    init.write_all(b"{\"ok\":true}\n").unwrap();
    assert_eq!(c.recv(Duration::from_secs(5)).unwrap(), Response::ok());
}

/// Reads come from one buffer, writes go to another.
struct Duplex {
    input: std::io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl std::io::Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn any_read_write_stream_carries_the_protocol() {
    let answers = b"\n{\"ok\":true,\"line\":\"a\"}\n{\"ok\":true}\n";
    let stream = Duplex {
        input: std::io::Cursor::new(answers.to_vec()),
        output: Vec::new(),
    };
    let mut c = Client::over(Unbounded(stream), "a buffer");
    c.send(&Request::Poweroff).unwrap();
    assert_eq!(c.recv(ANSWER_TIMEOUT).unwrap(), Response::line("a"));
    assert_eq!(c.read_line(ANSWER_TIMEOUT).unwrap(), r#"{"ok":true}"#);
    let e = c.read_line(ANSWER_TIMEOUT).unwrap_err();
    assert!(matches!(e, ClientError::Closed { .. }), "{e:?}");
    assert_eq!(c.get_ref().0.output, b"{\"cmd\":\"poweroff\"}\n");
}
