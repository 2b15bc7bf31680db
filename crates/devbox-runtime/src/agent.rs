//! The agent: the sandbox's pid 1 after setup. It starts processes on request, reports their
//! exit, reaps orphans, and stops everything on shutdown. Single-threaded, one `poll` loop.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{SockFlag, accept4};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::protocol::{self, ExecRequest, FailureKind, Reply, Request};
use crate::sys;
use crate::users;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

struct Conn {
    fd: OwnedFd,
    /// The process this connection started and that still runs.
    child: Option<i32>,
    /// Terminal master kept for resizing.
    master: Option<OwnedFd>,
    /// The started process, held before it runs its program ([`ExecRequest::hold`]).
    held: Option<Held>,
    /// What it was asked to run (for the messages of a held start that fails).
    exec: Option<ExecRequest>,
}

/// A forked exec child that has not run its program yet: its report pipe (see
/// [`confirm`]), and, while held, the pipe whose byte (or end) lets it go on.
struct Held {
    report: OwnedFd,
    release: Option<OwnedFd>,
}

/// Runs the agent loop until shutdown; returns the exit code of pid 1.
pub fn serve(mut listener: OwnedFd) -> i32 {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    if sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).is_err() {
        return 1;
    }
    let Ok(sigfd) = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
    else {
        return 1;
    };
    let nonblocking =
        nix::fcntl::fcntl(&listener, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
    if nonblocking.is_err() {
        return 1;
    }
    let mut conns: Vec<Conn> = Vec::new();
    let mut shutdown: Option<(Instant, bool)> = None;
    loop {
        let timeout = match shutdown {
            Some((deadline, false)) => {
                PollTimeout::try_from(deadline.saturating_duration_since(Instant::now()))
                    .unwrap_or(PollTimeout::MAX)
            }
            Some((_, true)) => PollTimeout::from(100u16),
            None => PollTimeout::NONE,
        };
        let (listen_ev, sig_ev, conn_ev) = {
            let mut fds = Vec::with_capacity(conns.len() + 2);
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            fds.push(PollFd::new(sigfd.as_fd(), PollFlags::POLLIN));
            for c in &conns {
                fds.push(PollFd::new(c.fd.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => return 1,
            }
            let ev: Vec<PollFlags> = fds
                .iter()
                .map(|f| f.revents().unwrap_or(PollFlags::empty()))
                .collect();
            (ev[0], ev[1], ev[2..].to_vec())
        };

        if !sig_ev.is_empty() {
            while let Ok(Some(_)) = sigfd.read_signal() {}
            reap(&mut conns);
        }
        // Handle connections before accepting new ones so indexes stay valid.
        let mut closed = Vec::new();
        let mut parked = false;
        for (i, ev) in conn_ev.iter().enumerate() {
            if ev.is_empty() {
                continue;
            }
            match protocol::recv::<Request>(conns[i].fd.as_fd()) {
                Ok(Some((req, fds))) => {
                    if matches!(req, Request::Park) {
                        match offer_park(&conns, i) {
                            Ok(pair) => {
                                // Nothing that reaches the host may stay open while parked.
                                conns.clear();
                                drop(listener);
                                // Tell the daemon, on the pair, that nothing else is open.
                                let _ = protocol::send(pair.as_fd(), &Reply::Parked, &[]);
                                listener = wait_for_resume(pair, &sigfd);
                                parked = true;
                                break;
                            }
                            Err(reply) => {
                                let _ = protocol::send(conns[i].fd.as_fd(), &reply, &[]);
                                continue;
                            }
                        }
                    }
                    if let Request::Shutdown { grace_ms } = req {
                        let _ = protocol::send(conns[i].fd.as_fd(), &Reply::Ok, &[]);
                        let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
                        shutdown.get_or_insert((
                            Instant::now() + Duration::from_millis(grace_ms),
                            false,
                        ));
                    } else {
                        handle(&mut conns[i], req, fds);
                    }
                }
                Ok(None) | Err(_) => closed.push(i),
            }
        }
        if parked {
            continue;
        }
        for i in closed.into_iter().rev() {
            conns.swap_remove(i);
        }
        if listen_ev.contains(PollFlags::POLLIN) {
            while let Ok(fd) = accept4(&listener, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK)
            {
                conns.push(Conn {
                    fd,
                    child: None,
                    master: None,
                    held: None,
                    exec: None,
                });
            }
        }
        if let Some((deadline, killed)) = shutdown {
            reap(&mut conns);
            if count_processes() == 0 {
                return 0;
            }
            if !killed && Instant::now() >= deadline {
                let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
                shutdown = Some((deadline, true));
            }
        }
    }
}

/// Answers a [`Request::Park`] from `conns[asking]`: [`Reply::Parked`] with one end of a new
/// socket pair, whose other end is returned; an error reply (nothing changed) when it cannot.
fn offer_park(conns: &[Conn], asking: usize) -> Result<OwnedFd, Reply> {
    let busy = conns.iter().filter(|c| c.child.is_some()).count();
    if busy > 0 {
        return Err(Reply::Failed {
            kind: FailureKind::BadRequest,
            message: format!(
                "{busy} exec session(s) still running: a checkpoint with processes needs every \
                 exec to have ended (processes left running in the background are fine)"
            ),
        });
    }
    let internal = |e: nix::Error| Reply::Failed {
        kind: FailureKind::Internal,
        message: e.to_string(),
    };
    let (mine, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(internal)?;
    // CRIU reads our namespaces from inside the sandbox's user namespace, which a
    // non-dumpable process forbids: dumpable only while parked.
    nix::sys::prctl::set_dumpable(true).map_err(internal)?;
    if protocol::send(
        conns[asking].fd.as_fd(),
        &Reply::Parked,
        &[theirs.as_raw_fd()],
    )
    .is_err()
    {
        let _ = nix::sys::prctl::set_dumpable(false);
        return Err(Reply::Failed {
            kind: FailureKind::Internal,
            message: "the daemon went away".into(),
        });
    }
    Ok(mine)
}

/// Waits, parked, for a [`Request::Resume`] with a listener on `pair`; reaps children meanwhile.
fn wait_for_resume(pair: OwnedFd, sigfd: &SignalFd) -> OwnedFd {
    loop {
        let mut fds = [
            PollFd::new(pair.as_fd(), PollFlags::POLLIN),
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => sys::exit_now(1),
        }
        let pair_ev = fds[0].revents().unwrap_or(PollFlags::empty());
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            while let Ok(Some(_)) = sigfd.read_signal() {}
            while sys::reap_one().is_some() {}
        }
        if pair_ev.is_empty() {
            continue;
        }
        match protocol::recv::<Request>(pair.as_fd()) {
            Ok(Some((Request::Resume, mut fds))) if fds.len() == 1 => {
                let listener = fds.remove(0);
                let _ =
                    nix::fcntl::fcntl(&listener, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
                let _ = nix::sys::prctl::set_dumpable(false);
                let _ = protocol::send(pair.as_fd(), &Reply::Ok, &[]);
                return listener;
            }
            Ok(Some(_)) => {
                let _ = protocol::send(
                    pair.as_fd(),
                    &Reply::Failed {
                        kind: FailureKind::BadRequest,
                        message: "parked: only resume with a listener".into(),
                    },
                    &[],
                );
            }
            // The daemon went away before resuming us: nobody can reach this sandbox any
            // more. Stop it rather than leave it running unreachable.
            Ok(None) | Err(_) => {
                let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
                sys::exit_now(1);
            }
        }
    }
}

fn handle(conn: &mut Conn, req: Request, fds: Vec<OwnedFd>) {
    let reply = match req {
        Request::Exec(exec) if conn.child.is_none() => {
            let started = start(&exec, fds).and_then(|(pid, master, held)| {
                if exec.hold {
                    return Ok((pid, master, Some(held)));
                }
                confirm(&exec, pid, held.report).map(|()| (pid, master, None))
            });
            match started {
                Ok((pid, master, held)) => {
                    conn.child = Some(pid);
                    conn.held = held;
                    let raw: Vec<RawFd> = master.iter().map(|m| m.as_raw_fd()).collect();
                    let _ = protocol::send(conn.fd.as_fd(), &Reply::Started { pid }, &raw);
                    conn.master = master;
                    conn.exec = Some(exec);
                    return;
                }
                Err((kind, message)) => Reply::Failed { kind, message },
            }
        }
        Request::Release => match (conn.held.take(), conn.child, conn.exec.take()) {
            (Some(mut held), Some(pid), Some(exec)) => {
                if let Some(release) = held.release.take() {
                    let _ = nix::unistd::write(&release, &[1]);
                }
                match confirm(&exec, pid, held.report) {
                    Ok(()) => Reply::Ok,
                    Err((kind, message)) => {
                        conn.child = None;
                        conn.master = None;
                        Reply::Failed { kind, message }
                    }
                }
            }
            _ => Reply::Failed {
                kind: FailureKind::BadRequest,
                message: "no held process".into(),
            },
        },
        Request::Exec(_) => Reply::Failed {
            kind: FailureKind::BadRequest,
            message: "one exec per connection".into(),
        },
        Request::Signal { signal } => match (conn.child, Signal::try_from(signal)) {
            (Some(pid), Ok(sig)) => match kill(Pid::from_raw(pid), sig) {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Failed {
                    kind: FailureKind::Internal,
                    message: e.to_string(),
                },
            },
            (None, _) => Reply::Failed {
                kind: FailureKind::BadRequest,
                message: "no running process".into(),
            },
            (_, Err(_)) => Reply::Failed {
                kind: FailureKind::BadRequest,
                message: format!("bad signal {signal}"),
            },
        },
        Request::Resize(ws) => match &conn.master {
            Some(m) => match sys::set_winsize(m.as_raw_fd(), ws.rows, ws.cols) {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Failed {
                    kind: FailureKind::Internal,
                    message: e.to_string(),
                },
            },
            None => Reply::Failed {
                kind: FailureKind::BadRequest,
                message: "no terminal".into(),
            },
        },
        Request::Ping => Reply::Pong {
            processes: count_processes(),
        },
        Request::Shutdown { .. } => Reply::Ok,
        Request::Park | Request::Resume => Reply::Failed {
            kind: FailureKind::BadRequest,
            message: "not parked".into(),
        },
    };
    let _ = protocol::send(conn.fd.as_fd(), &reply, &[]);
}

/// Processes in this pid namespace other than the agent.
fn count_processes() -> u32 {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    let n = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .count() as u32;
    n.saturating_sub(1)
}

fn reap(conns: &mut [Conn]) {
    while let Some(r) = sys::reap_one() {
        if let Some(c) = conns.iter_mut().find(|c| c.child == Some(r.pid)) {
            c.child = None;
            c.master = None;
            c.held = None;
            c.exec = None;
            let reply = Reply::Exited {
                code: r.code,
                signal: r.signal,
                cpu_usec: r.cpu_usec,
                max_rss_kib: r.max_rss_kib,
            };
            let _ = protocol::send(c.fd.as_fd(), &reply, &[]);
        }
    }
}

/// Child-side failure report: which step failed and its errno.
#[derive(Clone, Copy)]
enum ChildStep {
    Stdio = 1,
    Credentials = 2,
    Workdir = 3,
    Exec = 4,
}

/// Forks the child of exec request `req` (held before anything if asked); [`confirm`]
/// then says whether it runs its program.
fn start(
    req: &ExecRequest,
    fds: Vec<OwnedFd>,
) -> Result<(i32, Option<OwnedFd>, Held), (FailureKind, String)> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err((FailureKind::BadRequest, "empty command".into()));
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    let creds = users::resolve(req.user.as_deref(), &passwd, &group)
        .map_err(|m| (FailureKind::NotFound, m))?;
    let mut env = req.env.clone();
    let has = |env: &[String], key: &str| {
        env.iter()
            .any(|e| e.split_once('=').map(|(k, _)| k) == Some(key))
    };
    if !has(&env, "PATH") {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has(&env, "HOME") {
        env.push(format!("HOME={}", creds.home));
    }
    if req.tty.is_some() && !has(&env, "TERM") {
        env.push("TERM=xterm".into());
    }

    let mut master = None;
    let mut slave_path = None;
    if let Some(ws) = req.tty {
        let m = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
            .map_err(|e| (FailureKind::Internal, format!("open terminal: {e}")))?;
        nix::pty::grantpt(&m)
            .and_then(|_| nix::pty::unlockpt(&m))
            .map_err(|e| (FailureKind::Internal, format!("unlock terminal: {e}")))?;
        slave_path = Some(
            nix::pty::ptsname_r(&m)
                .map_err(|e| (FailureKind::Internal, format!("terminal name: {e}")))?,
        );
        let _ = sys::set_winsize(m.as_raw_fd(), ws.rows, ws.cols);
        master = Some(OwnedFd::from(m));
    }
    let expected = [req.stdio.stdin, req.stdio.stdout, req.stdio.stderr]
        .iter()
        .filter(|b| **b)
        .count();
    if req.tty.is_none() && fds.len() != expected {
        return Err((
            FailureKind::BadRequest,
            format!("expected {expected} stdio fds, got {}", fds.len()),
        ));
    }

    let (err_r, err_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| (FailureKind::Internal, e.to_string()))?;
    let (release_r, release_w) = if req.hold {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| (FailureKind::Internal, e.to_string()))?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    let pid = sys::fork().map_err(|e| (FailureKind::Internal, format!("fork: {e}")))?;
    if pid == 0 {
        drop(err_r);
        drop(release_w);
        if let Some(r) = release_r {
            // Held: nothing runs until the daemon has moved us into our cgroup and says so.
            // Its end closing instead (it gave up) ends us here.
            let mut go = [0u8; 1];
            if read_full(r.as_fd(), &mut go) != 1 {
                sys::exit_now(125);
            }
        }
        let (step, err) = child(req, &env, &creds, fds, slave_path.as_deref());
        let mut report = [0u8; 8];
        report[..4].copy_from_slice(&(step as u32).to_le_bytes());
        report[4..].copy_from_slice(&err.raw_os_error().unwrap_or(libc::EIO).to_le_bytes());
        let _ = nix::unistd::write(&err_w, &report);
        sys::exit_now(
            if matches!(step, ChildStep::Exec) && err.raw_os_error() == Some(libc::ENOENT) {
                127
            } else {
                126
            },
        );
    }
    drop(err_w);
    drop(release_r);
    drop(fds);
    Ok((
        pid,
        master,
        Held {
            report: err_r,
            release: release_w,
        },
    ))
}

/// Waits until forked child `pid` has executed its program (its report pipe closes) or
/// failed to (it reports the step and errno, and is reaped).
fn confirm(req: &ExecRequest, pid: i32, err_r: OwnedFd) -> Result<(), (FailureKind, String)> {
    let mut report = [0u8; 8];
    let n = read_full(err_r.as_fd(), &mut report);
    if n < 8 {
        return Ok(());
    }
    let _ = waitpid(Pid::from_raw(pid), None);
    let step = u32::from_le_bytes(report[..4].try_into().unwrap_or_default());
    let errno = i32::from_le_bytes(report[4..].try_into().unwrap_or_default());
    let err = std::io::Error::from_raw_os_error(errno);
    let kind = match errno {
        libc::ENOENT | libc::ENOTDIR => FailureKind::NotFound,
        libc::EACCES | libc::EPERM => FailureKind::PermissionDenied,
        _ => FailureKind::Internal,
    };
    let message = match step {
        1 => format!("setting up stdio: {err}"),
        2 => format!(
            "switching to user {}: {err}",
            req.user.as_deref().unwrap_or("root")
        ),
        3 => format!("working directory {}: {err}", req.cwd),
        _ if errno == libc::ENOENT => format!("{}: command not found", req.argv[0]),
        _ => format!("{}: {err}", req.argv[0]),
    };
    Err((kind, message))
}

fn read_full(fd: BorrowedFd<'_>, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match nix::unistd::read(fd, &mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    n
}

/// In the forked child: set up and exec. Returns only on failure.
fn child(
    req: &ExecRequest,
    env: &[String],
    creds: &users::Credentials,
    fds: Vec<OwnedFd>,
    slave: Option<&str>,
) -> (ChildStep, std::io::Error) {
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    // Every signal back to its default: Rust ignores SIGPIPE at start-up, and whatever
    // started the daemon may have had SIGINT, SIGQUIT or SIGHUP ignored (a background job
    // of a shell, nohup), which would otherwise reach every command (a shell's `trap ...
    // INT` is then silently ineffective, and Ctrl-C through `sandbox exec` does nothing).
    sys::default_all_signals();
    let _ = nix::unistd::setsid();
    let stdio = (|| -> std::io::Result<()> {
        if let Some(path) = slave {
            let s = nix::fcntl::open(path, OFlag::O_RDWR, nix::sys::stat::Mode::empty())?;
            sys::set_controlling_tty(s.as_raw_fd())?;
            nix::unistd::dup2_stdin(&s)?;
            nix::unistd::dup2_stdout(&s)?;
            nix::unistd::dup2_stderr(&s)?;
            return Ok(());
        }
        let mut it = fds.into_iter();
        let wanted = [req.stdio.stdin, req.stdio.stdout, req.stdio.stderr];
        for (target, attached) in wanted.into_iter().enumerate() {
            let fd = match attached {
                true => it.next().ok_or(std::io::ErrorKind::InvalidInput)?,
                false => {
                    let flags = if target == 0 {
                        OFlag::O_RDONLY
                    } else {
                        OFlag::O_WRONLY
                    };
                    nix::fcntl::open(
                        "/dev/null",
                        flags | OFlag::O_CLOEXEC,
                        nix::sys::stat::Mode::empty(),
                    )?
                }
            };
            match target {
                0 => nix::unistd::dup2_stdin(&fd)?,
                1 => nix::unistd::dup2_stdout(&fd)?,
                _ => nix::unistd::dup2_stderr(&fd)?,
            }
        }
        Ok(())
    })();
    if let Err(e) = stdio {
        return (ChildStep::Stdio, e);
    }
    let ids = (|| -> nix::Result<()> {
        let groups: Vec<nix::unistd::Gid> = creds
            .groups
            .iter()
            .map(|g| nix::unistd::Gid::from_raw(*g))
            .collect();
        nix::unistd::setgroups(&groups)?;
        let gid = nix::unistd::Gid::from_raw(creds.gid);
        nix::unistd::setresgid(gid, gid, gid)?;
        let uid = nix::unistd::Uid::from_raw(creds.uid);
        nix::unistd::setresuid(uid, uid, uid)?;
        Ok(())
    })();
    if let Err(e) = ids {
        return (ChildStep::Credentials, e.into());
    }
    if let Err(e) = std::env::set_current_dir(&req.cwd) {
        return (ChildStep::Workdir, e);
    }
    (ChildStep::Exec, sys::exec_with_path(&req.argv, env))
}
