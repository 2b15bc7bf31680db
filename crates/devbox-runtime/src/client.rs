//! The daemon's side of the agent protocol (blocking; wrap the fd for async use).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};

use crate::protocol::{self, Reply, Request};

/// One connection to a sandbox's agent.
#[derive(Debug)]
pub struct AgentConn {
    fd: OwnedFd,
}

impl AgentConn {
    /// Connects to the agent listening at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = UnixAddr::new(path)?;
        connect(fd.as_raw_fd(), &addr)?;
        Ok(Self { fd })
    }

    /// Sends a request with fds.
    pub fn send(&self, req: &Request, fds: &[RawFd]) -> io::Result<()> {
        protocol::send(self.fd.as_fd(), req, fds)
    }

    /// Waits for the next reply; an error if the agent closed the connection.
    pub fn recv(&self) -> io::Result<(Reply, Vec<OwnedFd>)> {
        protocol::recv(self.fd.as_fd())?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "agent closed the connection")
        })
    }

    /// Bounds how long [`AgentConn::recv`] blocks.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = timeout
            .map(|t| nix::sys::time::TimeVal::new(t.as_secs() as i64, t.subsec_micros() as i64));
        let tv = tv.unwrap_or(nix::sys::time::TimeVal::new(0, 0));
        nix::sys::socket::setsockopt(&self.fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)?;
        Ok(())
    }

    /// The socket, for use with an async reactor.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

/// Asks the agent how many processes run besides itself.
pub fn ping(path: &Path, timeout: Duration) -> io::Result<u32> {
    let conn = AgentConn::connect(path)?;
    conn.set_timeout(Some(timeout))?;
    conn.send(&Request::Ping, &[])?;
    match conn.recv()?.0 {
        Reply::Pong { processes } => Ok(processes),
        other => Err(io::Error::other(format!("unexpected reply {other:?}"))),
    }
}

/// Asks the agent to stop every process (SIGTERM, SIGKILL after `grace`) and exit.
pub fn shutdown(path: &Path, grace: Duration) -> io::Result<()> {
    let conn = AgentConn::connect(path)?;
    conn.set_timeout(Some(Duration::from_secs(5)))?;
    conn.send(
        &Request::Shutdown {
            grace_ms: grace.as_millis() as u64,
        },
        &[],
    )?;
    match conn.recv()?.0 {
        Reply::Ok => Ok(()),
        other => Err(io::Error::other(format!("unexpected reply {other:?}"))),
    }
}

/// Parks the agent for a checkpoint ([`Request::Park`]); returns the daemon's end of the
/// parked pair. The agent then serves nothing until [`resume`].
pub fn park(path: &Path) -> io::Result<OwnedFd> {
    let conn = AgentConn::connect(path)?;
    conn.set_timeout(Some(Duration::from_secs(5)))?;
    conn.send(&Request::Park, &[])?;
    let pair = match conn.recv()? {
        (Reply::Parked, mut fds) if fds.len() == 1 => fds.remove(0),
        (Reply::Failed { message, .. }, _) => return Err(io::Error::other(message)),
        (other, _) => return Err(io::Error::other(format!("unexpected reply {other:?}"))),
    };
    // The agent confirms on the pair once its listener and connections are closed.
    let tv = nix::sys::time::TimeVal::new(5, 0);
    nix::sys::socket::setsockopt(&pair, nix::sys::socket::sockopt::ReceiveTimeout, &tv)?;
    match protocol::recv::<Reply>(pair.as_fd())? {
        Some((Reply::Parked, _)) => Ok(pair),
        other => Err(io::Error::other(format!(
            "the agent did not park: {other:?}"
        ))),
    }
}

/// Gives a parked agent a new listener bound at `path` and waits until it serves again.
pub fn resume(pair: &OwnedFd, path: &Path) -> io::Result<()> {
    let listener = crate::container::bind_agent_socket(path).map_err(|e| e.error)?;
    crate::container::restore::resume(pair, &listener)
}
