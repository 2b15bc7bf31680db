//! Progress of long operations on a terminal (indicatif): bytes of snapshot exports,
//! imports and log exports as they stream, and a spinner with the elapsed time for the
//! operations whose API reports no progress (image import, rollback, diff). Nothing at all
//! unless stderr is a terminal: piped or redirected output stays free of progress text.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress display; nothing when stderr is not a terminal. Cleared when dropped.
pub struct Progress(Option<ProgressBar>);

fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

impl Progress {
    /// Bytes moved of `total` (a bar) or of an unknown amount (a counter), labelled `what`.
    pub fn bytes(what: &str, total: Option<u64>) -> Self {
        if !on_terminal() {
            return Self(None);
        }
        let (bar, template) = match total {
            Some(t) => (
                ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()),
                "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
            ),
            None => (
                ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
                "{spinner} {msg} {binary_bytes} {binary_bytes_per_sec} {elapsed}",
            ),
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(Some(bar))
    }

    /// A spinner with the elapsed time, labelled `what`.
    pub fn spinner(what: &str) -> Self {
        if !on_terminal() {
            return Self(None);
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            bar.set_style(style);
        }
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(Some(bar))
    }

    /// The client's progress callback, which moves this display.
    pub fn callback(&self) -> devbox_client::Progress {
        match &self.0 {
            Some(bar) => {
                let bar = bar.clone();
                Arc::new(move |n| bar.set_position(n))
            }
            None => Arc::new(|_| {}),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
