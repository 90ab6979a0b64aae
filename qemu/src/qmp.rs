//! QMP, QEMU's JSON machine protocol, over the VM's unix socket.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::channel::{Line, LineConn};
use crate::QemuError;

/// How long one QMP command may take to answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A QMP session that has done the capabilities handshake.
#[derive(Debug)]
pub(crate) struct Qmp {
    path: PathBuf,
    conn: LineConn,
    /// Asynchronous events (SHUTDOWN, RESET, ...) seen while waiting for answers.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub(crate) fn connect(path: &Path) -> Result<Qmp, QemuError> {
        let stream = UnixStream::connect(path).map_err(QemuError::io("connect to", path))?;
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            conn: LineConn::new(stream),
            events: Vec::new(),
        };
        let greeting = qmp.read_message("greeting", Instant::now() + COMMAND_TIMEOUT)?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol("greeting", format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value.
    pub(crate) fn execute(
        &mut self,
        command: &str,
        args: Option<Value>,
    ) -> Result<Value, QemuError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        self.conn.write_line(&msg.to_string()).map_err(|e| {
            self.protocol(command, format!("write to {}: {e}", self.path.display()))
        })?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let reply = self.read_message(command, deadline)?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QemuError::QmpError {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            if reply.get("event").is_some() {
                self.events.push(reply);
            }
        }
    }

    /// The events received so far, oldest first; the list is emptied.
    pub(crate) fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    fn read_message(&mut self, command: &str, deadline: Instant) -> Result<Value, QemuError> {
        let line = self.conn.read_line(deadline).map_err(|e| {
            self.protocol(command, format!("read from {}: {e}", self.path.display()))
        })?;
        match line {
            Line::Text(t) => serde_json::from_str(&t)
                .map_err(|e| self.protocol(command, format!("bad JSON {t:?}: {e}"))),
            Line::Eof => Err(self.protocol(command, "QEMU closed the QMP socket".to_string())),
            Line::TimedOut => {
                Err(self.protocol(command, format!("no answer within {COMMAND_TIMEOUT:?}")))
            }
        }
    }

    fn protocol(&self, command: &str, message: String) -> QemuError {
        QemuError::Qmp {
            command: command.to_string(),
            message,
        }
    }
}
