//! The engine's one OS boundary: registering owned fds with tokio's reactor.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Registers an owned, non-blocking fd with the reactor.
pub(crate) fn async_fd(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open fd that it alone closes, and its as_raw_fd() returns
    // that same fd for as long as it lives, which is the whole life of the AsyncFd.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}
