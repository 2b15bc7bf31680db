//! The sandbox's pid 1: finishes the setup inside the namespaces, then runs the agent.

use std::os::fd::{AsRawFd, OwnedFd};

use super::{StepError, rootfs, security};
use crate::config::LaunchConfig;
use crate::{agent, sys};

/// Runs pid 1: setup, then the agent loop. Returns the process's exit code.
pub fn run(
    cfg: &LaunchConfig,
    listener: OwnedFd,
    ready: OwnedFd,
    filter: seccompiler::BpfProgram,
) -> i32 {
    match setup(cfg, &listener, &ready, &filter) {
        Ok(()) => {
            let _ = nix::unistd::write(&ready, b"ready");
            drop(ready);
            agent::serve(listener)
        }
        Err(e) => {
            let _ = nix::unistd::write(&ready, e.to_string().as_bytes());
            1
        }
    }
}

fn setup(
    cfg: &LaunchConfig,
    listener: &OwnedFd,
    ready: &OwnedFd,
    filter: &seccompiler::BpfProgram,
) -> Result<(), StepError> {
    use super::Stage;
    crate::trace::mark("init started");
    // Its own session: the launcher's lies outside the pid namespace, which a checkpoint can't hold.
    nix::unistd::setsid().stage("new session")?;
    nix::unistd::sethostname(&cfg.hostname).stage("set hostname")?;
    // A network namespace of the daemon's has its loopback up already (and is not ours to
    // change).
    if cfg.netns.is_none() {
        sys::loopback_up().stage("bring up loopback")?;
    }
    let none = None::<&str>;
    nix::mount::mount(
        none,
        "/",
        none,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        none,
    )
    .stage("make mounts private")?;
    rootfs::mount_root(cfg)?;
    crate::trace::mark("root mounted");
    let staged_sys = cfg
        .netns
        .as_ref()
        .map(|_| cfg.runtime_dir.join(rootfs::STAGED_SYS));
    rootfs::finish_in_init(staged_sys.as_deref())?;
    crate::trace::mark("proc, sys, dev, pivot, masks");
    if let Some(text) = &cfg.resolv_conf {
        write_resolv_conf(text).stage("write /etc/resolv.conf")?;
    }
    sys::close_fds_from(3, &[listener.as_raw_fd(), ready.as_raw_fd()]);
    nix::sys::prctl::set_dumpable(false).stage("make init non-dumpable")?;
    security::drop_capabilities()?;
    security::lock_down(cfg.seccomp.then_some(filter))?;
    crate::trace::mark("capabilities, seccomp");
    redirect_stdio_to_null().stage("detach stdio")?;
    Ok(())
}

/// Points fds 0-2 at the sandbox's /dev/null, releasing the launcher's pipes.
fn redirect_stdio_to_null() -> nix::Result<()> {
    let null = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)?;
    Ok(())
}

/// Writes the sandbox's `/etc/resolv.conf`, from inside (after the pivot, as the sandbox's
/// root, so a link there leads nowhere the sandbox could not write itself); a link (or
/// anything else but a file) is replaced by the file; a directory the sandbox made there is
/// moved aside (`/etc/resolv.conf.moved-by-dev-box-<time>`), not deleted, so that it cannot
/// keep the sandbox from starting.
fn write_resolv_conf(text: &str) -> std::io::Result<()> {
    let path = std::path::Path::new("/etc/resolv.conf");
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let aside = format!("/etc/resolv.conf.moved-by-dev-box-{stamp}");
            std::fs::rename(path, aside)?;
        }
        Ok(m) if !m.is_file() => std::fs::remove_file(path)?,
        _ => {}
    }
    std::fs::write(path, text)
}
