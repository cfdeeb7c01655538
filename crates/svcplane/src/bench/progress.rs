//! Progress bars for the bench's long steps, on stderr and only when stderr is a terminal
//! (piped output and CI logs stay plain: the results are on stdout).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often a bar is redrawn at most.
const REDRAW: Duration = Duration::from_millis(100);
const WIDTH: usize = 30;

pub(crate) struct Progress {
    label: String,
    /// 0: unknown length (a spinner with the elapsed time).
    total: u64,
    done: u64,
    tty: bool,
    started: Instant,
    drawn: Option<Instant>,
}

impl Progress {
    pub(crate) fn new(label: impl Into<String>, total: u64) -> Progress {
        Progress {
            label: label.into(),
            total,
            done: 0,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            drawn: None,
        }
    }

    /// A step of unknown length (e.g. waiting for the first sync).
    pub(crate) fn spinner(label: impl Into<String>) -> Progress {
        Progress::new(label, 0)
    }

    pub(crate) fn inc(&mut self) {
        self.done += 1;
        self.draw();
    }

    /// Redraw if due (for a spinner: call it while waiting).
    pub(crate) fn draw(&mut self) {
        if !self.tty || self.drawn.is_some_and(|t| t.elapsed() < REDRAW) {
            return;
        }
        self.drawn = Some(Instant::now());
        let line = render(
            self.label.as_str(),
            self.done,
            self.total,
            self.started.elapsed(),
        );
        let mut err = std::io::stderr().lock();
        // \r and clear-to-end-of-line: the bar rewrites itself.
        let _ = write!(err, "\r{line}\x1b[K");
        let _ = err.flush();
    }
}

impl Drop for Progress {
    /// Erase the bar: what follows on stdout starts on a clean line.
    fn drop(&mut self) {
        if self.tty && self.drawn.is_some() {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
        }
    }
}

fn render(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    if total == 0 {
        const SPIN: [char; 4] = ['|', '/', '-', '\\'];
        let spin = SPIN[(elapsed.as_millis() / 250) as usize % SPIN.len()];
        return format!("{spin} {label} {secs:.0} s");
    }
    let done = done.min(total);
    let filled = (done as usize * WIDTH) / total as usize;
    format!(
        "[{}{}] {done}/{total} {label} {secs:.0} s",
        "=".repeat(filled),
        " ".repeat(WIDTH - filled),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_fill_in_proportion() {
        let s = Duration::from_secs(3);
        assert_eq!(
            render("requests", 15, 30, s),
            format!("[{}{}] 15/30 requests 3 s", "=".repeat(15), " ".repeat(15))
        );
        assert!(render("x", 40, 30, s).starts_with(&format!("[{}]", "=".repeat(30))));
        assert!(render("first sync", 0, 0, s).ends_with("first sync 3 s"));
    }
}
