//! The init's own logger: `caisson: <message>` lines on the console (stderr, which the init points
//! at `/dev/console`), and in stage 1 also into the kernel log (`/dev/kmsg`, at debug level so the
//! kernel does not print the line a second time).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::Mutex;

/// The prefix of every line the init itself prints.
pub const PREFIX: &str = "caisson: ";

struct ConsoleLogger {
    level: log::LevelFilter,
}

/// The kernel log, once [`enable_kmsg`] opened it.
static KMSG: Mutex<Option<File>> = Mutex::new(None);

impl log::Log for ConsoleLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = match record.level() {
            log::Level::Error => format!("{PREFIX}error: {}\n", record.args()),
            log::Level::Warn => format!("{PREFIX}warning: {}\n", record.args()),
            _ => format!("{PREFIX}{}\n", record.args()),
        };
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        if let Ok(mut kmsg) = KMSG.lock() {
            if let Some(k) = kmsg.as_mut() {
                let _ = k.write_all(format!("<7>{line}").as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// Also write log lines into the kernel log (stage 1, once /dev is mounted).
pub fn enable_kmsg() {
    if let Ok(mut k) = KMSG.lock() {
        *k = OpenOptions::new().write(true).open("/dev/kmsg").ok();
    }
}

/// Install the logger.
pub fn init(debug: bool) {
    let level = if debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    };
    let logger = ConsoleLogger {
        level: log::LevelFilter::Debug,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}

/// Change the level after the command line has been read.
pub fn set_debug(debug: bool) {
    log::set_max_level(if debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    });
}

/// Point stdin, stdout and stderr at `/dev/console`: the kernel could not do it when the
/// initramfs had no `/dev/console` node. Does nothing when the console cannot be opened.
pub fn attach_console() {
    let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    attach(&console);
}

fn attach(console: &File) {
    let _ = rustix::stdio::dup2_stdin(console.as_fd());
    let _ = rustix::stdio::dup2_stdout(console.as_fd());
    let _ = rustix::stdio::dup2_stderr(console.as_fd());
}

/// [`attach_console`] and [`enable_kmsg`], only when `root` is the real root (not in tests).
pub fn attach_console_under(root: &std::path::Path) {
    if root == std::path::Path::new("/") {
        attach_console();
        enable_kmsg();
    }
}
