//! The client side of the init's control protocol for the other parts (init/CONTROL.md): one JSON
//! request per line on [`crate::paths::CONTROL_SOCKET`], one JSON answer per line. The init owns
//! the full protocol; the updater and the fleet agent only ask for a reboot.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The request line that asks the init to reboot.
pub const REBOOT_REQUEST: &str = r#"{"cmd":"reboot"}"#;

/// How long a caller waits for the init's answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A request the init did not take.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("talking to the init on {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the init refused {request}: {answer}")]
    Refused { request: String, answer: String },
}

/// Sends one request line and returns the init's answer, an error unless it says `"ok":true`.
pub fn request(socket: &Path, line: &str) -> Result<serde_json::Value, ControlError> {
    let sock_err = |source| ControlError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(sock_err)?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(sock_err)?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(sock_err)?;
    let mut answer = String::new();
    BufReader::new(&s)
        .read_line(&mut answer)
        .map_err(sock_err)?;
    let refused = || ControlError::Refused {
        request: line.to_string(),
        answer: answer.trim().to_string(),
    };
    let v: serde_json::Value = serde_json::from_str(answer.trim()).map_err(|_| refused())?;
    if v["ok"] == true {
        Ok(v)
    } else {
        Err(refused())
    }
}

/// Asks the init to reboot the machine (it stops the services first).
pub fn request_reboot(socket: &Path) -> Result<(), ControlError> {
    request(socket, REBOOT_REQUEST).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn init_answering(
        answer: &'static str,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line).unwrap();
            (&conn).write_all(answer.as_bytes()).unwrap();
            line
        });
        (dir, path, h)
    }

    #[test]
    fn a_reboot_is_one_line_and_needs_ok() {
        let (_d, path, h) = init_answering("{\"ok\":true}\n");
        request_reboot(&path).unwrap();
        assert_eq!(h.join().unwrap(), "{\"cmd\":\"reboot\"}\n");

        let (_d, path, h) = init_answering("{\"ok\":false,\"error\":\"shutting down\"}\n");
        let e = request_reboot(&path).unwrap_err();
        assert!(e.to_string().contains("shutting down"), "{e}");
        h.join().unwrap();
    }

    #[test]
    fn no_init_is_a_socket_error_naming_the_path() {
        let e = request_reboot(Path::new("/nonexistent/init.sock")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/init.sock"), "{e}");
    }
}
