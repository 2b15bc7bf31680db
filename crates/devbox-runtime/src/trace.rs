//! Step timings of `sandbox-init`, written to stderr when `DEVBOX_INIT_TRACE` is set (the
//! daemon then lets sandbox-init's stderr through). For finding where start-up time goes.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Option<Instant>> = OnceLock::new();

/// Notes that `step` is done.
pub fn mark(step: &str) {
    let start = START.get_or_init(|| std::env::var_os("DEVBOX_INIT_TRACE").map(|_| Instant::now()));
    if let Some(t) = start {
        eprintln!(
            "sandbox-init[{}] {:>7} us  {step}",
            std::process::id(),
            t.elapsed().as_micros()
        );
    }
}

/// Whether tracing is on.
pub fn enabled() -> bool {
    std::env::var_os("DEVBOX_INIT_TRACE").is_some()
}
