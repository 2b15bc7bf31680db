//! The OS boundary: the few system calls that no safe wrapper covers.
//!
//! Every `unsafe` block of the runtime lives here, each with the reason it is sound.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::mount::{MoveMountFlags, OpenTreeFlags};

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// Attributes to set on a detached mount tree.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeAttrs {
    /// Read-only.
    pub readonly: bool,
    /// No set-user-id or file capabilities take effect.
    pub nosuid: bool,
    /// Device nodes cannot be opened.
    pub nodev: bool,
}

/// Clones the mount tree at `path` into a detached mount, optionally id-mapped through the
/// user namespace `userns` (files owned by uid 0 on disk appear as the namespace's root).
pub fn detached_tree(
    path: &Path,
    recursive: bool,
    userns: Option<&OwnedFd>,
    attrs: TreeAttrs,
) -> io::Result<OwnedFd> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = rustix::mount::open_tree(rustix::fs::CWD, path, flags)?;
    let mut set = 0;
    if attrs.readonly {
        set |= MOUNT_ATTR_RDONLY;
    }
    if attrs.nosuid {
        set |= MOUNT_ATTR_NOSUID;
    }
    if attrs.nodev {
        set |= MOUNT_ATTR_NODEV;
    }
    let mut attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    if let Some(ns) = userns {
        attr.attr_set |= MOUNT_ATTR_IDMAP;
        attr.userns_fd = ns.as_raw_fd() as u64;
    }
    if attr.attr_set != 0 {
        let empty = c"";
        let at_flags = libc::AT_EMPTY_PATH | if recursive { libc::AT_RECURSIVE } else { 0 };
        // SAFETY: `tree` is a valid open fd, `empty` a NUL-terminated string, and `attr` a
        // properly laid out `struct mount_attr` whose size we pass; the kernel only reads it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                at_flags as libc::c_uint,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(tree)
}

/// Attaches a detached mount tree at `target`.
pub fn attach_tree(tree: &OwnedFd, target: &Path) -> io::Result<()> {
    rustix::mount::move_mount(
        tree,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    Ok(())
}

/// Sets or clears close-on-exec on an fd.
pub fn set_cloexec(fd: &impl std::os::fd::AsFd, on: bool) -> io::Result<()> {
    let flags = if on {
        nix::fcntl::FdFlag::FD_CLOEXEC
    } else {
        nix::fcntl::FdFlag::empty()
    };
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// Opens a pidfd for `pid` (pollable: readable once the process has exited).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` to the process behind `pidfd` (immune to pid reuse).
pub fn pidfd_send_signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: a valid pidfd, a signal number, a null siginfo (allowed) and zero flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Forks the calling process. Returns the child's pid in the parent and 0 in the child.
///
/// The callers are single-threaded (sandbox-init), which makes any code after fork sound.
pub fn fork() -> io::Result<i32> {
    // SAFETY: sandbox-init is single-threaded when it forks, so the child inherits no lock held
    // by another thread; the child only makes system calls and simple allocations before exec or exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid)
}

/// Makes the terminal open on `fd` the controlling terminal of the calling session leader.
pub fn set_controlling_tty(fd: RawFd) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal); fd is an open terminal.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets a terminal's window size.
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a `struct winsize` that lives for the duration of the call.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws as *const libc::winsize) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills `req` (a valid ifreq naming "lo") on a valid socket.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifru_flags is the active member after SIOCGIFFLAGS.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `req`, which stays valid for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Replaces the process image (`execve`) after searching `PATH` from `env` for `argv[0]`.
/// Returns only on failure.
pub fn exec_with_path(argv: &[String], env: &[String]) -> io::Error {
    let to_c = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let args: Result<Vec<CString>, _> = argv.iter().map(|a| to_c(a)).collect();
    let envs: Result<Vec<CString>, _> = env.iter().map(|e| to_c(e)).collect();
    let (args, envs) = match (args, envs) {
        (Ok(a), Ok(e)) if !a.is_empty() => (a, e),
        _ => return io::Error::from(io::ErrorKind::InvalidInput),
    };
    let prog = &argv[0];
    let candidates: Vec<CString> = if prog.contains('/') {
        vec![args[0].clone()]
    } else {
        let path = env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        path.split(':')
            .filter(|d| !d.is_empty())
            .filter_map(|d| CString::new(Path::new(d).join(prog).as_os_str().as_bytes()).ok())
            .collect()
    };
    let mut last = io::Error::from_raw_os_error(libc::ENOENT);
    for cand in candidates {
        match nix::unistd::execve(&cand, &args, &envs) {
            Err(e) => {
                let err = io::Error::from(e);
                // Keep the most telling error: "permission denied" beats "not found".
                if err.raw_os_error() != Some(libc::ENOENT)
                    || last.raw_os_error() == Some(libc::ENOENT)
                {
                    last = err;
                }
            }
            Ok(never) => match never {},
        }
    }
    last
}

/// Closes every fd from `lowest` upwards except those in `keep`.
pub fn close_fds_from(lowest: RawFd, keep: &[RawFd]) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= lowest && !keep.contains(fd))
        .collect();
    for fd in fds {
        // SAFETY: the fd was listed in our own fd table and is not one we keep; closing an fd
        // that the directory iterator itself used (already closed) just returns EBADF.
        unsafe {
            libc::close(fd);
        }
    }
}

/// Takes ownership of an inherited raw fd.
pub fn owned_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass fds inherited from their parent that nothing else in the process owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Ends the calling (forked) process at once: no atexit handlers, no flush of inherited buffers.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit takes an int and never returns; skipping destructors is the point in a
    // forked child whose memory is a copy of the parent's.
    unsafe { libc::_exit(code) }
}

/// Resets the disposition of every signal that can be caught (1 to SIGRTMAX, real-time
/// ones included) to the default; those the C library reserves for itself are left.
pub fn default_all_signals() {
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no handler code; a signal number the C library
        // refuses (its reserved ones) fails with EINVAL and is left as it is.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
}

/// Resets a signal's disposition to the default.
pub fn default_signal(sig: nix::sys::signal::Signal) -> nix::Result<()> {
    // SAFETY: installing SIG_DFL runs no handler code, so no async-signal-safety concern arises.
    unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) }.map(|_| ())
}

/// Reads a terminal's window size.
pub fn get_winsize(fd: RawFd) -> io::Result<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` into `ws`, which outlives the call.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws as *mut libc::winsize) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((ws.ws_row, ws.ws_col))
}

/// How a reaped child ended and what it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// Its pid.
    pub pid: i32,
    /// Exit code, or 128 + signal.
    pub code: i32,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// User + system CPU time, microseconds.
    pub cpu_usec: u64,
    /// Peak resident set, KiB.
    pub max_rss_kib: u64,
}

/// Reaps one exited child without blocking (`wait4`), with its resource use.
pub fn reap_one() -> Option<Reaped> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: rusage is plain data; zeroed is valid and wait4 fills it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 writes into `status` and `ru`, both valid for the call.
        let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut ru) };
        if pid <= 0 {
            return None;
        }
        let (code, signal) = if libc::WIFEXITED(status) {
            (libc::WEXITSTATUS(status), None)
        } else if libc::WIFSIGNALED(status) {
            (128 + libc::WTERMSIG(status), Some(libc::WTERMSIG(status)))
        } else {
            continue; // stopped or continued: not an end
        };
        let usec = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        return Some(Reaped {
            pid,
            code,
            signal,
            cpu_usec: usec(ru.ru_utime) + usec(ru.ru_stime),
            max_rss_kib: ru.ru_maxrss as u64,
        });
    }
}
