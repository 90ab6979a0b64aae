//! The control protocol's unit tests.

use super::*;
use caisson_layout::control::Client;

#[test]
fn wire_format() {
    let r: Request = serde_json::from_str(r#"{"cmd":"restart","service":"containerd"}"#).unwrap();
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
                degraded: None,
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
    let recv = |c: &mut Client| c.recv(std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(recv(&mut c).line.as_deref(), Some("b"));
    assert_eq!(recv(&mut c).line.as_deref(), Some("c"));
    assert_eq!(recv(&mut c), Response::ok());
    c.send_line("garbage").unwrap();
    assert!(recv(&mut c).error.unwrap().contains("bad request"));
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
        &Channel::Socket,
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
try:
    s.sendall(b'{"cmd":"status"}\n')
except OSError:
    pass  # refused at once: the answer may already wait and the socket be closed for writing
print(s.makefile().readline().strip())"#;
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

/// The answers to `input` served as on the virtio port with `gate`.
fn virtio_answers(input: &str, gate: ExecGate) -> Vec<Response> {
    let mut out = Vec::new();
    let channel = Channel::Virtio(gate);
    serve_stream(
        input.as_bytes(),
        &mut out,
        &echo_dispatch(),
        Path::new("/nonexistent"),
        &channel,
    )
    .unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn exec_on_the_virtio_port_is_refused_unless_debugging_is_on() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("debug.toml");
    let input = "{\"cmd\":\"exec\",\"argv\":[\"/bin/id\"]}\n{\"cmd\":\"status\"}\n";
    let off = ExecGate {
        cmdline_debug: false,
        config: config.clone(),
    };
    let answers = virtio_answers(input, off.clone());
    assert_eq!(answers.len(), 2, "{answers:?}");
    let why = answers[0].error.as_deref().unwrap();
    assert!(!answers[0].ok);
    assert!(
        why.starts_with("exec is refused on the virtio control port"),
        "{why}"
    );
    assert!(why.contains("caisson.debug"), "{why}");
    // Status is still answered on the same connection.
    assert_eq!(answers[1].error.as_deref(), Some("dispatched"));
    // caisson.debug on the command line, or the debug file, lets it through to the dispatcher.
    let on = ExecGate {
        cmdline_debug: true,
        ..off.clone()
    };
    assert_eq!(
        virtio_answers(input, on)[0].error.as_deref(),
        Some("dispatched")
    );
    std::fs::write(&config, "virtio_exec = true\n").unwrap();
    assert_eq!(
        virtio_answers(input, off)[0].error.as_deref(),
        Some("dispatched")
    );
}

#[test]
fn exec_on_the_unix_socket_is_not_gated() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("run/init.sock");
    serve_socket(&sock, echo_dispatch(), tmp.path().to_path_buf()).unwrap();
    let mut c = Client::connect(&sock).unwrap();
    let exec = Request::Exec {
        argv: vec!["/bin/id".into()],
        timeout_s: None,
    };
    assert_eq!(c.call(&exec).unwrap().error.as_deref(), Some("dispatched"));
}
