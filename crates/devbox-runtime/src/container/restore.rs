//! Restoring a sandbox's checkpointed processes: `sandbox-init launch` given a
//! [`RestoreConfig`] instead of a plain launch.
//!
//! The steps mirror a launch up to the root filesystem: private mount namespace, the agent's
//! listener bound on its host path, a user namespace with the sandbox's id map, the layers
//! and binds staged as id-mapped mounts. The overlay root is mounted by a child inside that
//! user namespace (so copy-ups keep being made by the sandbox's root) and handed back as a
//! detached mount. CRIU then recreates the namespaces and processes over that root
//! (`--root`), with the external pieces recorded at dump time (see [`crate::checkpoint`]).
//! Last, the restored agent, parked, gets the new listener over a fresh socket pair.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;

use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use serde::{Deserialize, Serialize};

use super::{Prepared, Stage, StepError, rootfs};
use crate::checkpoint::{self, CheckpointMeta};
use crate::config::LaunchConfig;
use crate::protocol::{self, Reply, Request};
use crate::sys;

/// What the daemon sends to restore a sandbox from a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreConfig {
    /// The sandbox, as for a launch (its writable layer already holds the snapshot's files).
    pub launch: LaunchConfig,
    /// The CRIU binary.
    pub criu: PathBuf,
    /// The checkpoint's images (with `checkpoint.json`).
    pub images: PathBuf,
    /// CRIU's log (absolute path).
    pub log: PathBuf,
}

fn step(stage: &'static str, e: impl std::fmt::Display) -> StepError {
    StepError {
        stage,
        error: std::io::Error::other(e.to_string()),
    }
}

/// Restores the checkpoint; returns the host pid of the restored init.
pub fn restore(rc: &RestoreConfig, prepared: Option<Prepared>) -> Result<i32, StepError> {
    let cfg = &rc.launch;
    let meta = CheckpointMeta::load(&rc.images).map_err(|e| step("read checkpoint", e))?;
    if meta.binds.len() != cfg.rootfs.binds.len()
        || meta
            .binds
            .iter()
            .zip(&cfg.rootfs.binds)
            .any(|(a, b)| *a != b.target)
    {
        return Err(step(
            "read checkpoint",
            "the sandbox's bind mounts changed since the checkpoint",
        ));
    }
    // The host files init may map are derived here, from this very binary (the sandbox-init
    // the daemon runs), still in the host's mount namespace: never taken from checkpoint.json.
    let trusted = std::env::current_exe()
        .map_err(|e| step("open host files", e))
        .and_then(|exe| {
            checkpoint::trusted_host_files(&exe).map_err(|e| step("open host files", e))
        })?;
    let files =
        checkpoint::open_external_files(&meta, &trusted).map_err(|e| step("open host files", e))?;
    // A checkpoint of a sandbox in a persisted network namespace restores into that
    // namespace again; one that had its own (older) namespace cannot join one now.
    let netns = match (meta.netns, super::open_netns(cfg)?) {
        (true, Some(ns)) => Some(ns),
        (false, None) => None,
        (true, None) => {
            return Err(step(
                "read checkpoint",
                "the checkpoint expects the sandbox's network namespace, and none was given",
            ));
        }
        (false, Some(_)) => {
            return Err(step(
                "read checkpoint",
                "the checkpoint predates the sandbox's network namespace",
            ));
        }
    };
    if prepared.is_none() {
        // CRIU forks the processes from here: they start in the sandbox's cgroups.
        nix::unistd::setsid().stage("new session")?;
        super::join_cgroups(&cfg.cgroups)?;
    }
    let (listener, userns) = super::stage(cfg)?;
    std::env::set_current_dir(&cfg.runtime_dir).stage("enter runtime dir")?;
    let root = overlay_from_userns(cfg, &userns)?;
    drop(userns);
    sys::attach_tree(&root, &cfg.runtime_dir.join("rootfs")).stage("mount restored root")?;
    drop(root);

    let (theirs, ours) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::empty(),
    )
    .stage("socket pair")?;
    sys::set_cloexec(&ours, true).stage("socket pair")?;
    let mut cmd = Command::new(&rc.criu);
    if let Some(path) = checkpoint::criu_tool_path() {
        cmd.env("PATH", path);
    }
    cmd.arg("restore")
        .arg("-D")
        .arg(&rc.images)
        .arg("--root")
        .arg(cfg.runtime_dir.join("rootfs"))
        .arg("--restore-detached")
        .arg("--pidfile")
        .arg(cfg.runtime_dir.join("restore.pid"))
        .args(["--manage-cgroups=ignore", "-v4", "-o"])
        .arg(&rc.log)
        .args(checkpoint::EXTERNAL_MOUNT_FLAGS)
        .arg("--inherit-fd")
        .arg(format!(
            "fd[{}]:socket:[{}]",
            theirs.as_raw_fd(),
            meta.pair_ino
        ));
    for (i, _) in meta.binds.iter().enumerate() {
        cmd.arg("--external").arg(format!(
            "mnt[bind{i}]:{}",
            cfg.runtime_dir.join("binds").join(i.to_string()).display()
        ));
    }
    for (key, fd) in &files {
        sys::set_cloexec(fd, false).stage("pass host files")?;
        cmd.arg("--inherit-fd")
            .arg(format!("fd[{}]:{key}", fd.as_raw_fd()));
    }
    if let Some(ns) = &netns {
        // The namespace belongs to the host's user namespace: the restored tasks, in the
        // sandbox's new user namespace, could not setns() into it. CRIU runs inside it
        // instead (joined here, as host root), so every task it forks is in it already
        // (scripts/criu/external-netns.patch skips the then pointless setns).
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).stage("join network namespace")?;
        sys::set_cloexec(ns, false).stage("pass the network namespace")?;
        cmd.arg("--inherit-fd")
            .arg(format!("fd[{}]:{}", ns.as_raw_fd(), checkpoint::NETNS_KEY));
        cmd.arg("--external").arg(format!(
            "mnt[{}]:{}",
            checkpoint::SYS_KEY,
            cfg.runtime_dir.join(rootfs::STAGED_SYS).display()
        ));
        // Dumped with --tcp-close (see checkpoint::dump): connections come back closed.
        cmd.arg("--tcp-close");
    }
    checkpoint::run_criu(cmd, &rc.log).map_err(|e| step("restore processes", e))?;
    drop(theirs);
    drop(files);
    drop(netns);
    let pid: i32 = std::fs::read_to_string(cfg.runtime_dir.join("restore.pid"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| step("restore processes", "CRIU wrote no pid"))?;
    let _ = std::fs::remove_file(cfg.runtime_dir.join("restore.pid"));
    // CRIU restored init's credentials from the images: it must hold its guard capability
    // (so that no process of the sandbox can trace it) and be untraced, or it is not resumed.
    if let Err(e) = checkpoint::check_init_guarded(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        return Err(step("check the restored init", e));
    }
    resume(&ours, &listener).map_err(|e| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        step("resume the restored agent", e)
    })?;
    Ok(pid)
}

/// Hands a parked agent its listener over `pair` and waits for its answer.
pub fn resume(pair: &OwnedFd, listener: &OwnedFd) -> std::io::Result<()> {
    let tv = nix::sys::time::TimeVal::new(5, 0);
    nix::sys::socket::setsockopt(pair, nix::sys::socket::sockopt::ReceiveTimeout, &tv)?;
    protocol::send(pair.as_fd(), &Request::Resume, &[listener.as_raw_fd()])?;
    match protocol::recv::<Reply>(pair.as_fd())? {
        Some((Reply::Ok, _)) => Ok(()),
        other => Err(std::io::Error::other(format!(
            "the agent did not resume: {other:?}"
        ))),
    }
}

/// Mounts the overlay root from a child inside the sandbox's user namespace and returns it
/// as a detached mount. The working directory is the runtime dir with the layers staged.
fn overlay_from_userns(cfg: &LaunchConfig, userns: &OwnedFd) -> Result<OwnedFd, StepError> {
    let (parent, child) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .stage("socket pair")?;
    let pid = sys::fork().stage("fork root mounter")?;
    if pid == 0 {
        drop(parent);
        let result = (|| -> Result<OwnedFd, StepError> {
            setns(userns.as_fd(), CloneFlags::CLONE_NEWUSER).stage("enter user namespace")?;
            super::become_root().stage("become root in the user namespace")?;
            unshare(CloneFlags::CLONE_NEWNS).stage("mount namespace")?;
            rootfs::mount_overlay(cfg)?;
            sys::detached_tree(
                std::path::Path::new("rootfs"),
                false,
                None,
                sys::TreeAttrs::default(),
            )
            .stage("detach root")
        })();
        let code = match result {
            Ok(tree) => {
                let _ = protocol::send(child.as_fd(), &"root", &[tree.as_raw_fd()]);
                0
            }
            Err(e) => {
                let _ = protocol::send(child.as_fd(), &e.to_string(), &[]);
                1
            }
        };
        sys::exit_now(code);
    }
    drop(child);
    let got = protocol::recv::<String>(parent.as_fd());
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    match got {
        Ok(Some((_, mut fds))) if fds.len() == 1 => Ok(fds.remove(0)),
        Ok(Some((msg, _))) => Err(step("mount root", msg)),
        Ok(None) => Err(step("mount root", "the root mounter died")),
        Err(e) => Err(step("mount root", e)),
    }
}
