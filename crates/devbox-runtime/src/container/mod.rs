//! Starting a sandbox: the `sandbox-init launch` process.
//!
//! The daemon runs `sandbox-init launch` with a [`LaunchConfig`] on stdin. That launcher:
//!
//! 1. moves into a private mount namespace of its own, so nothing it mounts is ever visible
//!    on the host (and nothing can leak there when a sandbox dies);
//! 2. binds the agent's listening socket on the host path the daemon chose;
//! 3. makes a user namespace with the sandbox's id map (a short-lived child holds it while the
//!    maps are written) and keeps an fd to it;
//! 4. assembles the root filesystem in its private namespace: each image layer and the
//!    writable layer as an id-mapped mount, an overlay over them, host binds on top;
//! 5. joins the sandbox's cgroups, enters the user namespace, unshares the mount, uts, ipc,
//!    net, cgroup and pid namespaces, and forks the sandbox's pid 1;
//! 6. waits for pid 1 to report that it is set up, prints `{"pid": N}` and exits.
//!
//! Pid 1 ([`init`]) mounts /proc, /sys and /dev, pivots into the root, masks kernel paths,
//! drops capabilities, sets no_new_privs and the seccomp filter, and becomes the agent.

pub mod init;
pub mod restore;
pub mod rootfs;
pub mod security;

use std::fs;
use std::io::{BufRead, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, bind, listen, socket, socketpair,
};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::config::LaunchConfig;
use crate::sys;

/// What the launcher prints on stdout when it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaunchOutcome {
    /// The sandbox runs; its pid 1 has this host pid.
    Started {
        /// Host pid of the sandbox's init process.
        pid: i32,
    },
    /// Starting failed at `stage`; nothing runs.
    Failed {
        /// Which step failed.
        stage: String,
        /// The error.
        message: String,
    },
}

/// A failed launch step.
#[derive(Debug)]
pub struct StepError {
    /// Which step failed.
    pub stage: &'static str,
    /// The cause.
    pub error: std::io::Error,
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.stage, self.error)
    }
}

/// Attaches a stage name to an error.
pub(crate) trait Stage<T> {
    fn stage(self, stage: &'static str) -> Result<T, StepError>;
}

impl<T, E: Into<std::io::Error>> Stage<T> for Result<T, E> {
    fn stage(self, stage: &'static str) -> Result<T, StepError> {
        self.map_err(|e| StepError {
            stage,
            error: e.into(),
        })
    }
}

/// What the daemon sends to `sandbox-init launch`, one JSON message per line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LauncherInput {
    /// Get ready ahead of time: join these cgroups (moving a process between cgroups waits
    /// for an RCU grace period, milliseconds) and build the seccomp filter; answer
    /// [`LauncherReport::Armed`], then wait for a [`LauncherInput::Launch`].
    Prepare {
        /// Cgroup directories to join.
        cgroups: Vec<std::path::PathBuf>,
    },
    /// Start this sandbox.
    Launch(Box<LaunchConfig>),
    /// Start this sandbox from a checkpoint of its processes.
    Restore(Box<restore::RestoreConfig>),
}

/// What `sandbox-init launch` reports, one JSON message per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LauncherReport {
    /// Prepared and waiting.
    Armed,
    /// Done.
    Outcome(LaunchOutcome),
}

fn report(r: &LauncherReport) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, r);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

fn failed(stage: &str, message: impl ToString) -> LaunchOutcome {
    LaunchOutcome::Failed {
        stage: stage.into(),
        message: message.to_string(),
    }
}

/// Entry point of `sandbox-init launch`: reads messages from stdin, launches, reports on stdout.
pub fn launch_main() -> i32 {
    let mut lines = std::io::stdin().lock().lines();
    let mut next = || -> Result<Option<LauncherInput>, LaunchOutcome> {
        match lines.next() {
            None => Ok(None),
            Some(Err(e)) => Err(failed("read input", e)),
            Some(Ok(line)) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| failed("parse input", e)),
        }
    };
    let mut prepared = None;
    let outcome = loop {
        match next() {
            Err(o) => break o,
            // The daemon went away before asking for anything: nothing to do.
            Ok(None) => return 0,
            Ok(Some(LauncherInput::Prepare { cgroups })) => match prepare(&cgroups) {
                Ok(p) => {
                    prepared = Some(p);
                    report(&LauncherReport::Armed);
                }
                Err(e) => break failed(e.stage, e.error),
            },
            Ok(Some(LauncherInput::Launch(cfg))) => match launch(&cfg, prepared.take()) {
                Ok(pid) => break LaunchOutcome::Started { pid },
                Err(e) => break failed(e.stage, e.error),
            },
            Ok(Some(LauncherInput::Restore(rc))) => match restore::restore(&rc, prepared.take()) {
                Ok(pid) => break LaunchOutcome::Started { pid },
                Err(e) => break failed(e.stage, e.error),
            },
        }
    };
    let ok = matches!(outcome, LaunchOutcome::Started { .. });
    report(&LauncherReport::Outcome(outcome));
    if ok { 0 } else { 1 }
}

/// What a launcher prepared ahead of a launch.
pub struct Prepared {
    filter: seccompiler::BpfProgram,
}

fn prepare(cgroups: &[std::path::PathBuf]) -> Result<Prepared, StepError> {
    nix::unistd::setsid().stage("new session")?;
    join_cgroups(cgroups)?;
    let filter = security::default_filter()
        .map_err(std::io::Error::other)
        .stage("build seccomp filter")?;
    Ok(Prepared { filter })
}

fn join_cgroups(cgroups: &[std::path::PathBuf]) -> Result<(), StepError> {
    let me = std::process::id().to_string();
    for cg in cgroups {
        fs::write(cg.join("cgroup.procs"), &me).stage("join cgroup")?;
    }
    crate::trace::mark("cgroups joined");
    Ok(())
}

/// Opens the persisted network namespace the sandbox joins, if it has one (before the
/// launcher's mount namespace changes).
pub(crate) fn open_netns(cfg: &LaunchConfig) -> Result<Option<OwnedFd>, StepError> {
    match &cfg.netns {
        None => Ok(None),
        Some(path) => {
            let f = fs::File::open(path).stage("open network namespace")?;
            Ok(Some(OwnedFd::from(f)))
        }
    }
}

/// The steps a launch and a restore share: a private mount namespace, the agent's listener
/// on its host path, the user namespace, and the layers and binds staged as id-mapped mounts
/// in the runtime dir. Returns the listener and the user namespace.
fn stage(cfg: &LaunchConfig) -> Result<(OwnedFd, OwnedFd), StepError> {
    unshare(CloneFlags::CLONE_NEWNS).stage("private mount namespace")?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .stage("make mounts private")?;
    let listener = bind_agent_socket(&cfg.agent_socket)?;
    let userns = make_userns(cfg)?;
    crate::trace::mark("user namespace");
    rootfs::assemble(cfg, &userns)?;
    crate::trace::mark("layers staged");
    Ok((listener, userns))
}

/// Launches the sandbox described by `cfg`; returns the host pid of its init process.
///
/// Without `prepared` (a cold launch) it first joins `cfg.cgroups` and builds the filter.
pub fn launch(cfg: &LaunchConfig, prepared: Option<Prepared>) -> Result<i32, StepError> {
    crate::trace::mark("launch");
    let prepared = match prepared {
        Some(p) => p,
        None => prepare(&cfg.cgroups)?,
    };
    let netns = open_netns(cfg)?;
    let (listener, userns) = stage(cfg)?;

    std::env::set_current_dir(&cfg.runtime_dir).stage("enter runtime dir")?;
    // The persisted network namespace is the host's user namespace's: joined while still
    // host root, so nothing inside has CAP_NET_ADMIN over it.
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWCGROUP
        | CloneFlags::CLONE_NEWPID;
    match netns {
        Some(ns) => setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).stage("join network namespace")?,
        None => flags |= CloneFlags::CLONE_NEWNET,
    }
    setns(userns.as_fd(), CloneFlags::CLONE_NEWUSER).stage("enter user namespace")?;
    drop(userns);
    become_root().stage("become root in the user namespace")?;
    unshare(flags).stage("unshare namespaces")?;
    crate::trace::mark("namespaces");

    let (ready_r, ready_w) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .stage("sync socket")?;
    // If the daemon died while we worked, nobody would own the sandbox: stop here.
    if daemon_gone() {
        return Err(StepError {
            stage: "fork init",
            error: std::io::Error::other("the daemon went away"),
        });
    }
    let pid = sys::fork().stage("fork init")?;
    if pid == 0 {
        drop(ready_r);
        let code = init::run(cfg, listener, ready_w, prepared.filter);
        std::process::exit(code);
    }
    drop(ready_w);
    drop(listener);
    let mut buf = [0u8; 4096];
    let n = nix::unistd::read(&ready_r, &mut buf).unwrap_or(0);
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    crate::trace::mark("init ready");
    if msg == "ready" {
        Ok(pid)
    } else {
        let _ = waitpid(Pid::from_raw(pid), None);
        let msg = if msg.is_empty() {
            "init exited during setup".to_string()
        } else {
            msg
        };
        Err(StepError {
            stage: "set up sandbox",
            error: std::io::Error::other(msg),
        })
    }
}

/// Whether the daemon closed its end of our stdin (it died).
fn daemon_gone() -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let stdin = std::io::stdin();
    let mut fds = [PollFd::new(
        std::os::fd::AsFd::as_fd(&stdin),
        PollFlags::POLLIN,
    )];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

pub(crate) fn bind_agent_socket(path: &Path) -> Result<OwnedFd, StepError> {
    let _ = fs::remove_file(path);
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .stage("agent socket")?;
    let addr = UnixAddr::new(path).stage("agent socket path")?;
    bind(sock.as_raw_fd(), &addr).stage("bind agent socket")?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).stage("agent socket mode")?;
    listen(&sock, nix::sys::socket::Backlog::new(64).stage("listen")?)
        .stage("listen on agent socket")?;
    Ok(sock)
}

/// Makes a user namespace with the sandbox's id map and returns an fd to it.
fn make_userns(cfg: &LaunchConfig) -> Result<OwnedFd, StepError> {
    let (ready_r, ready_w) = nix::unistd::pipe().stage("pipe")?;
    let (release_r, release_w) = nix::unistd::pipe().stage("pipe")?;
    let pid = sys::fork().stage("fork user namespace holder")?;
    if pid == 0 {
        drop(ready_r);
        drop(release_w);
        let code = match unshare(CloneFlags::CLONE_NEWUSER) {
            Ok(()) => {
                let _ = nix::unistd::write(&ready_w, b"1");
                let mut b = [0u8; 1];
                let _ = nix::unistd::read(&release_r, &mut b);
                0
            }
            Err(_) => 1,
        };
        // A forked child leaves with _exit: no atexit handlers, no flush of the parent's buffers.
        sys::exit_now(code);
    }
    drop(ready_w);
    drop(release_r);
    let result = (|| {
        let mut b = [0u8; 1];
        let n = nix::unistd::read(&ready_r, &mut b).stage("wait for user namespace")?;
        if n != 1 {
            return Err(StepError {
                stage: "create user namespace",
                error: std::io::Error::other("unshare(CLONE_NEWUSER) failed"),
            });
        }
        let map = format!("0 {} {}\n", cfg.idmap.host_base, cfg.idmap.size);
        fs::write(format!("/proc/{pid}/uid_map"), &map).stage("write uid_map")?;
        fs::write(format!("/proc/{pid}/gid_map"), &map).stage("write gid_map")?;
        let f = fs::File::open(format!("/proc/{pid}/ns/user")).stage("open user namespace")?;
        Ok(OwnedFd::from(f))
    })();
    drop(release_w);
    let _ = waitpid(Pid::from_raw(pid), None);
    result
}

fn become_root() -> nix::Result<()> {
    let root_g = nix::unistd::Gid::from_raw(0);
    let root_u = nix::unistd::Uid::from_raw(0);
    nix::unistd::setresgid(root_g, root_g, root_g)?;
    nix::unistd::setgroups(&[])?;
    nix::unistd::setresuid(root_u, root_u, root_u)?;
    Ok(())
}

pub use devbox_backend::host::process_start_time;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_is_readable() {
        assert!(process_start_time(std::process::id() as i32).is_some());
        assert!(process_start_time(i32::MAX).is_none());
    }
}
