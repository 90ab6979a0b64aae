//! Progress reporting: bars on a terminal, plain lines otherwise, nothing when not asked.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reporter {
    Silent,
    Lines,
    Bars,
}

impl Reporter {
    /// Bars when `progress` and stderr is a terminal, lines when only `progress`.
    pub fn new(progress: bool) -> Reporter {
        match (progress, std::io::stderr().is_terminal()) {
            (false, _) => Reporter::Silent,
            (true, false) => Reporter::Lines,
            (true, true) => Reporter::Bars,
        }
    }

    /// A byte-counting bar (hidden unless showing bars).
    pub fn bytes_bar(self, total: u64, message: &str) -> ProgressBar {
        if self != Reporter::Bars {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(total);
        let template = "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}";
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(message.to_string());
        bar
    }

    /// A plain line on stderr (only in line mode; bars carry their own messages).
    pub fn line(self, message: &str) {
        if self == Reporter::Lines {
            eprintln!("{message}");
        }
    }
}
