//! The engine's one OS boundary: registering owned fds with tokio's reactor.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Registers an owned, non-blocking fd with the reactor.
pub(crate) fn async_fd(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open fd that it alone closes, and its as_raw_fd() returns
    // that same fd for as long as it lives, which is the whole life of the AsyncFd.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// A command's readiness fd (see [`devbox_backend::ProcessControl::ready_fd`]), owned by
/// its control.
#[derive(Debug)]
pub(crate) struct Ready(pub(crate) std::sync::Arc<dyn devbox_backend::ProcessControl>);

impl AsRawFd for Ready {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.ready_fd().as_raw_fd()
    }
}

/// Registers a command's readiness fd with the reactor.
pub(crate) fn async_ready(ready: Ready) -> io::Result<AsyncFd<Ready>> {
    // SAFETY: the control owns its ready fd for its whole life and returns the same open fd
    // each time; the AsyncFd holds the control (through `Ready`), so the fd outlives it.
    unsafe { AsyncFd::register_with_interest(ready, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}
