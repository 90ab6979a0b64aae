//! Rebooting into the new slot: through the init's control socket, after the strategy allows it
//! (a FleetLock server's slot, the fleet agent's etcd semaphore, a maintenance window).

use std::path::{Path, PathBuf};

/// A reboot that could not be asked for or coordinated.
#[derive(Debug, thiserror::Error)]
pub enum RebootError {
    #[error(transparent)]
    Control(#[from] caisson_layout::control::ControlError),
    #[error("writing the reboot request for the fleet agent to {path}: {source}")]
    Marker {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing the boot-settled marker for the fleet agent to {path}: {source}")]
    Settled {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("FleetLock {url}: {why}")]
    FleetLock { url: String, why: String },
}

/// Asks the init (`/run/caisson/init.sock`) to reboot the machine.
pub fn request_reboot(socket: &Path) -> Result<(), RebootError> {
    Ok(caisson_layout::control::request_reboot(socket)?)
}

/// Strategy `etcd-lock`: leaves the reboot to the fleet agent, which takes the fleet's reboot
/// lock first. The marker (in /run, so a reboot clears it) holds the waiting version.
pub fn ask_fleet_for_reboot(marker: &Path, version: &str) -> Result<(), RebootError> {
    write_marker(marker, &format!("{version}\n")).map_err(|source| RebootError::Marker {
        path: marker.to_path_buf(),
        source,
    })
}

/// Tells the fleet agent that this boot has settled ([`caisson_layout::paths::BOOT_SETTLED`]):
/// it gives back the slot of the fleet's reboot lock it took before the reboot. `how` is one
/// line (`blessed 2.0.0`, `rolled-back 3.0.0 2.0.0`). An unchanged marker is not written again.
pub fn tell_fleet_settled(marker: &Path, how: &str) -> Result<(), RebootError> {
    let text = format!("{how}\n");
    if std::fs::read_to_string(marker).is_ok_and(|old| old == text) {
        return Ok(());
    }
    write_marker(marker, &text).map_err(|source| RebootError::Settled {
        path: marker.to_path_buf(),
        source,
    })
}

/// Writes `text` to `marker` whole (a temporary file renamed over it).
fn write_marker(marker: &Path, text: &str) -> Result<(), std::io::Error> {
    if let Some(dir) = marker.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = marker.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, marker)
}

/// A lock that at most N machines of a group hold while they reboot.
pub trait RebootLock {
    /// Tries to take the lock; false when the fleet says "not now".
    fn acquire(&mut self) -> Result<bool, RebootError>;
    /// Gives the lock back once this machine runs its new version healthily.
    fn release(&mut self) -> Result<(), RebootError>;
}

/// No coordination.
pub struct NoLock;
impl RebootLock for NoLock {
    fn acquire(&mut self) -> Result<bool, RebootError> {
        Ok(true)
    }
    fn release(&mut self) -> Result<(), RebootError> {
        Ok(())
    }
}

/// The FleetLock protocol (as Zincati speaks it): POST `/v1/pre-reboot` before rebooting and
/// `/v1/steady-state` once healthy, with the header `fleet-lock-protocol: true`.
pub struct FleetLock {
    pub url: String,
    pub group: String,
    pub id: String,
    client: reqwest::blocking::Client,
}

impl FleetLock {
    pub fn new(url: &str, group: &str, id: &str) -> Result<FleetLock, RebootError> {
        let client = crate::download::client().map_err(|e| RebootError::FleetLock {
            url: url.to_string(),
            why: e.to_string(),
        })?;
        Ok(FleetLock {
            url: url.trim_end_matches('/').to_string(),
            group: group.to_string(),
            id: id.to_string(),
            client,
        })
    }

    fn post(&self, path: &str) -> Result<bool, RebootError> {
        let url = format!("{}{path}", self.url);
        let body = serde_json::json!({"client_params": {"id": self.id, "group": self.group}});
        let resp = self
            .client
            .post(&url)
            .header("fleet-lock-protocol", "true")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .map_err(|e| RebootError::FleetLock {
                url: url.clone(),
                why: e.to_string(),
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(true);
        }
        let text = resp.text().unwrap_or_default();
        log::info!("FleetLock {url}: {status}: {}", text.trim());
        Ok(false)
    }
}

impl RebootLock for FleetLock {
    fn acquire(&mut self) -> Result<bool, RebootError> {
        self.post("/v1/pre-reboot")
    }
    fn release(&mut self) -> Result<(), RebootError> {
        if self.post("/v1/steady-state")? {
            Ok(())
        } else {
            Err(RebootError::FleetLock {
                url: self.url.clone(),
                why: "steady-state was not accepted".into(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    #[test]
    fn fleet_lock_speaks_the_protocol() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (i, stream) in listener.incoming().take(2).enumerate() {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; len];
                std::io::Read::read_exact(&mut reader, &mut body).unwrap();
                seen.push((head, String::from_utf8(body).unwrap()));
                let status = if i == 0 { "409 Conflict" } else { "200 OK" };
                write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
            }
            seen
        });
        let mut lock = FleetLock::new(&format!("http://{addr}"), "workers", "m1").unwrap();
        assert!(!lock.acquire().unwrap());
        lock.release().unwrap();
        let seen = seen.join().unwrap();
        assert!(
            seen[0].0.starts_with("POST /v1/pre-reboot"),
            "{}",
            seen[0].0
        );
        assert!(seen[0]
            .0
            .to_ascii_lowercase()
            .contains("fleet-lock-protocol: true"));
        assert!(seen[0].1.contains("\"group\":\"workers\""), "{}", seen[0].1);
        assert!(seen[1].0.starts_with("POST /v1/steady-state"));
    }
}
