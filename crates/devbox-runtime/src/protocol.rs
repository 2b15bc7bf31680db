//! The agent protocol: how the daemon talks to a sandbox's init process.
//!
//! Transport: a `SOCK_SEQPACKET` Unix socket bound on the host (invisible inside the sandbox).
//! Each packet is one JSON message; file descriptors ride along with a packet as
//! `SCM_RIGHTS`. One connection carries one exec: the client sends [`Request::Exec`] with its
//! stdio fds, the agent answers [`Reply::Started`] (with the terminal's master fd for a tty
//! exec) and later [`Reply::Exited`]. Closing the connection does not stop the process.
//!
//! The agent lives inside the sandbox, so the daemon treats its replies as untrusted input:
//! sizes are capped and every message is parsed, never trusted blindly.

use std::io;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

/// Largest packet either side accepts.
pub const MAX_PACKET: usize = 256 * 1024;
/// Most fds attached to one packet.
pub const MAX_FDS: usize = 4;

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Which standard streams are attached to an exec request, in order, as fds.
/// A stream that is not attached reads from or writes to `/dev/null`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedStdio {
    /// An fd for stdin is attached.
    pub stdin: bool,
    /// An fd for stdout is attached.
    pub stdout: bool,
    /// An fd for stderr is attached.
    pub stderr: bool,
}

/// Run a process inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is searched in the `PATH` of `env`.
    pub argv: Vec<String>,
    /// Environment, `KEY=value` entries (HOME is added from the user's passwd entry if absent).
    pub env: Vec<String>,
    /// Working directory inside the sandbox.
    pub cwd: String,
    /// `user`, `uid`, `user:group` or `uid:gid`, resolved against the sandbox's /etc files.
    pub user: Option<String>,
    /// Allocate a terminal of this size instead of using attached stdio.
    pub tty: Option<WinSize>,
    /// Which stdio fds are attached (ignored with a tty).
    pub stdio: AttachedStdio,
    /// Hold the new process before it runs anything until [`Request::Release`] (the daemon
    /// moves it into a cgroup of its own meanwhile); [`Reply::Started`] then comes before
    /// the program is executed, and the answer to the release says whether it was.
    #[serde(default)]
    pub hold: bool,
}

/// A message from the daemon to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Start a process (see [`ExecRequest`]).
    Exec(ExecRequest),
    /// Send a signal to this connection's process.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// Resize this connection's terminal.
    Resize(WinSize),
    /// Let this connection's held process ([`ExecRequest::hold`]) go on and run its
    /// program; answered with [`Reply::Ok`] once it does, or [`Reply::Failed`].
    Release,
    /// Liveness check.
    Ping,
    /// Get ready for a checkpoint of the sandbox's processes (CRIU): the agent answers
    /// [`Reply::Parked`] with one end of a fresh socket pair, closes its listener and every
    /// connection (none may have a running exec), lets itself be dumped, and waits on the other
    /// end of the pair for [`Request::Resume`]. Nothing it holds then reaches outside the sandbox.
    Park,
    /// Sent on the parked pair (by the daemon after a checkpoint, or to a restored agent):
    /// serve again on the attached listening socket.
    Resume,
    /// Stop every process: SIGTERM, then SIGKILL after `grace_ms`; then the agent exits.
    Shutdown {
        /// Grace period in milliseconds.
        grace_ms: u64,
    },
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The program, user or directory does not exist in the sandbox.
    NotFound,
    /// The program is not executable or access was refused.
    PermissionDenied,
    /// The request was malformed.
    BadRequest,
    /// Something failed inside the agent.
    Internal,
}

/// A message from the agent to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Reply {
    /// The process runs; `pid` is its pid inside the sandbox. A tty exec attaches the master fd.
    Started {
        /// Pid inside the sandbox's pid namespace.
        pid: i32,
    },
    /// The process ended.
    Exited {
        /// Exit code, or 128 + signal number when killed by a signal.
        code: i32,
        /// The signal that killed it, if any.
        signal: Option<i32>,
        /// CPU time it used (user + system), microseconds.
        #[serde(default)]
        cpu_usec: u64,
        /// Its peak resident memory, KiB.
        #[serde(default)]
        max_rss_kib: u64,
    },
    /// The request failed; nothing runs.
    Failed {
        /// What kind of failure.
        kind: FailureKind,
        /// A message for the user.
        message: String,
    },
    /// Answer to [`Request::Ping`].
    Pong {
        /// Processes in the sandbox besides the agent.
        processes: u32,
    },
    /// A request was accepted (signal, resize, shutdown).
    Ok,
    /// Answer to [`Request::Park`]; the daemon's end of the parked pair is attached.
    Parked,
}

/// Sends one message with optional fds.
pub fn send<T: Serialize>(sock: BorrowedFd<'_>, msg: &T, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if body.len() > MAX_PACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "message too large",
        ));
    }
    let iov = [io::IoSlice::new(&body)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message and the fds that came with it. `Ok(None)` means the peer closed.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd<'_>,
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // The kernel just installed these fds in our table: we own them.
                        fds.extend(raw.into_iter().map(crate::sys::owned_fd));
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                break (msg.bytes, fds, truncated);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    if truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message or fds truncated",
        ));
    }
    let msg = serde_json::from_slice(&buf[..len])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((msg, fds)))
}
