//! Commands run for the control channel's `exec` request (init/CONTROL.md): one process started
//! by the supervisor's thread through the reaper, like a service, so its exit status reaches us
//! through the one `waitpid`. A thread per command collects its stdout and stderr (one pipe) and
//! answers once the process has exited. A command past its timeout, or still running at
//! shutdown, has its process group killed.

use crate::reaper::{ChildId, Reaper};
use crate::sys::{ExecPlan, Exit, Sig, Syscall};
use caisson_layout::control::{ExecResult, Response};
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// Output kept per command; the rest is read and dropped, and the answer says so.
pub const OUTPUT_MAX: usize = 1 << 20;
/// How long output is still read after the command exited (a background child may hold the pipe).
const LINGER: Duration = Duration::from_secs(1);

/// Where the answer goes once the command is done.
pub type Reply = Box<dyn FnOnce(Response) + Send>;

/// How a command ended, sent to its collecting thread.
#[derive(Debug, Clone, Copy)]
struct Ended {
    exit: Exit,
    timed_out: bool,
}

#[derive(Debug)]
struct Running {
    deadline: Instant,
    killed: bool,
    ended: Sender<Ended>,
}

/// The commands running now.
#[derive(Debug, Default)]
pub struct Commands {
    running: HashMap<ChildId, Running>,
}

impl Commands {
    /// Starts `plan`; `reply` gets the answer once it has exited. An error means nothing runs
    /// and `reply` was not called.
    pub fn start(
        &mut self,
        sys: &dyn Syscall,
        reaper: &Reaper,
        plan: &ExecPlan,
        timeout: Duration,
        now: Instant,
        reply: Reply,
    ) -> Result<ChildId, String> {
        let (child, spawned) = reaper
            .start(sys, plan)
            .map_err(|e| format!("starting {} failed: {e}", plan.program.display()))?;
        let pid = child.pid;
        let (tx, rx) = channel();
        let output = spawned.output;
        let collector = std::thread::Builder::new()
            .name("exec".into())
            .stack_size(128 * 1024)
            .spawn(move || reply(collect(output, &rx)));
        let killed = match collector {
            Ok(_) => false,
            Err(e) => {
                log::warn!("no thread to collect the output of pid {pid} ({e}); killing it");
                kill_group(sys, reaper, child);
                true
            }
        };
        log::info!("exec: pid {pid} runs {}", plan.program.display());
        self.running.insert(
            child,
            Running {
                deadline: now + timeout,
                killed,
                ended: tx,
            },
        );
        Ok(child)
    }

    /// Hands the exit of `child` to its command; false when `child` is not a command.
    pub fn claim(&mut self, child: ChildId, exit: Exit) -> bool {
        let Some(r) = self.running.remove(&child) else {
            return false;
        };
        let _ = r.ended.send(Ended {
            exit,
            timed_out: r.killed,
        });
        true
    }

    /// Kills the process group of every command past its deadline.
    pub fn expire(&mut self, sys: &dyn Syscall, reaper: &Reaper, now: Instant) {
        for (child, r) in &mut self.running {
            if !r.killed && now >= r.deadline {
                log::warn!("exec: {child} ran past its timeout; killing it");
                kill_group(sys, reaper, *child);
                r.killed = true;
            }
        }
    }

    /// Kills every running command (shutdown).
    pub fn kill_all(&mut self, sys: &dyn Syscall, reaper: &Reaper) {
        for (child, r) in &mut self.running {
            if !r.killed {
                kill_group(sys, reaper, *child);
                r.killed = true;
            }
        }
    }

    /// How many commands are running.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

/// The command's process group (it is a session leader, see `sys::spawn`), or the process alone;
/// nothing once it has been collected (its pid may belong to someone else by then).
fn kill_group(sys: &dyn Syscall, reaper: &Reaper, child: ChildId) {
    if reaper.signal(sys, child, Sig::Kill, true).is_err() {
        let _ = reaper.signal(sys, child, Sig::Kill, false);
    }
}

/// Reads the output until the command has exited and the pipe is closed (or [`LINGER`] after
/// the exit), and builds the answer.
fn collect(output: Option<File>, ended: &Receiver<Ended>) -> Response {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut reader = output.map(Pipe::new);
    let mut end: Option<(Ended, Instant)> = None;
    loop {
        if end.is_none() {
            // With no pipe left to read, just wait for the exit.
            let wait = if reader.is_some() {
                Duration::ZERO
            } else {
                Duration::from_secs(3600)
            };
            match ended.recv_timeout(wait) {
                Ok(e) => end = Some((e, Instant::now())),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Response::error("the command's exit status was lost")
                }
            }
        }
        match (&mut reader, &end) {
            (None, Some(_)) => break,
            (Some(_), Some((_, at))) if at.elapsed() >= LINGER => break,
            _ => {}
        }
        if let Some(r) = &mut reader {
            match r.read_some() {
                Ok(Some(bytes)) => {
                    let room = OUTPUT_MAX.saturating_sub(kept.len());
                    if bytes.len() > room {
                        truncated = true;
                    }
                    kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
                }
                Ok(None) => {}
                Err(_) => reader = None,
            }
        }
    }
    let Some((e, _)) = end else {
        return Response::error("the command's exit status was lost");
    };
    let (code, signal) = match e.exit {
        Exit::Code(c) => (Some(c), None),
        Exit::Signal(s) => (None, Some(s)),
    };
    Response {
        ok: true,
        exec: Some(ExecResult {
            code,
            signal,
            output: String::from_utf8_lossy(&kept).into_owned(),
            truncated,
            timed_out: e.timed_out,
        }),
        ..Default::default()
    }
}

/// The read end of a command's output pipe, read with a short poll so the collector also
/// notices the exit.
struct Pipe {
    file: File,
    buf: Vec<u8>,
}

impl Pipe {
    fn new(file: File) -> Pipe {
        Pipe {
            file,
            buf: vec![0; 64 * 1024],
        }
    }

    /// Some bytes; `Ok(None)` when nothing came within the poll; an error at end of file.
    fn read_some(&mut self) -> std::io::Result<Option<&[u8]>> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&self.file, PollFlags::IN)];
        let timeout = Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        if poll(&mut fds, Some(&timeout))? == 0 {
            return Ok(None);
        }
        match self.file.read(&mut self.buf)? {
            0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => Ok(Some(&self.buf[..n])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, Recording};
    use std::path::Path;

    fn plan() -> ExecPlan {
        ExecPlan {
            program: "/bin/true".into(),
            capture_output: true,
            ..Default::default()
        }
    }

    fn start(
        c: &mut Commands,
        sys: &Recording,
        reaper: &Reaper,
        timeout: Duration,
        now: Instant,
    ) -> (ChildId, Receiver<Response>) {
        let (tx, rx) = channel();
        let pid = c
            .start(
                sys,
                reaper,
                &plan(),
                timeout,
                now,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
            .unwrap();
        (pid, rx)
    }

    #[test]
    fn the_exit_is_answered_and_only_its_pid_is_claimed() {
        let sys = Recording::new(Path::new("/"));
        let reaper = Reaper::default();
        let mut c = Commands::default();
        let (pid, rx) = start(
            &mut c,
            &sys,
            &reaper,
            Duration::from_secs(5),
            Instant::now(),
        );
        let (other, _) = reaper.start(&sys, &plan()).unwrap();
        assert!(!c.claim(other, Exit::Code(0)));
        assert_eq!(c.len(), 1);
        assert!(c.claim(pid, Exit::Code(3)));
        assert!(c.is_empty());
        let r = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let e = r.exec.unwrap();
        assert_eq!((e.code, e.signal, e.timed_out), (Some(3), None, false));
    }

    #[test]
    fn past_the_deadline_its_group_is_killed_once_and_the_answer_says_so() {
        let sys = Recording::new(Path::new("/"));
        let reaper = Reaper::default();
        let mut c = Commands::default();
        let t0 = Instant::now();
        let (child, rx) = start(&mut c, &sys, &reaper, Duration::from_secs(5), t0);
        let pid = child.pid;
        c.expire(&sys, &reaper, t0 + Duration::from_secs(4));
        assert!(!sys.calls().contains(&Call::Kill(-pid, Sig::Kill)));
        c.expire(&sys, &reaper, t0 + Duration::from_secs(5));
        c.expire(&sys, &reaper, t0 + Duration::from_secs(6));
        let kills = sys
            .calls()
            .iter()
            .filter(|k| **k == Call::Kill(-pid, Sig::Kill))
            .count();
        assert_eq!(kills, 1);
        assert!(c.claim(child, Exit::Signal(9)));
        let e = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .exec
            .unwrap();
        assert_eq!((e.signal, e.timed_out), (Some(9), true));
    }

    #[test]
    fn shutdown_kills_every_command() {
        let sys = Recording::new(Path::new("/"));
        let reaper = Reaper::default();
        let mut c = Commands::default();
        let now = Instant::now();
        let (a, _ra) = start(&mut c, &sys, &reaper, Duration::from_secs(60), now);
        let (b, _rb) = start(&mut c, &sys, &reaper, Duration::from_secs(60), now);
        c.kill_all(&sys, &reaper);
        let calls = sys.calls();
        assert!(calls.contains(&Call::Kill(-a.pid, Sig::Kill)));
        assert!(calls.contains(&Call::Kill(-b.pid, Sig::Kill)));
    }

    #[test]
    fn output_is_collected_and_capped() {
        let (read, write) = rustix::pipe::pipe().unwrap();
        let (tx, rx) = channel();
        let writer = std::thread::spawn(move || {
            let mut w = File::from(write);
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..(OUTPUT_MAX / chunk.len() + 2) {
                std::io::Write::write_all(&mut w, &chunk).unwrap();
            }
            tx.send(Ended {
                exit: Exit::Code(0),
                timed_out: false,
            })
            .unwrap();
        });
        let r = collect(Some(File::from(read)), &rx);
        writer.join().unwrap();
        let e = r.exec.unwrap();
        assert_eq!(e.output.len(), OUTPUT_MAX);
        assert!(e.truncated);
        assert_eq!(e.code, Some(0));
    }

    #[test]
    fn a_lost_exit_is_an_error_not_a_hang() {
        let (tx, rx) = channel::<Ended>();
        drop(tx);
        let r = collect(None, &rx);
        assert!(!r.ok);
        assert!(r.error.unwrap().contains("lost"));
    }
}
