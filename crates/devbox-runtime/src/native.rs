//! The native container backend: [`devbox_backend::Backend`] over `sandbox-init`, cgroups,
//! the agent protocol and CRIU.
//!
//! A sandbox's handle is the name of its cgroup (under the daemon's parent); its runtime
//! directory (mount points, the agent's socket) is `<runtime dir>/sandboxes/<id>`.
//!
//! Warm launchers: moving a process into a cgroup waits for an RCU grace period (5-15 ms on
//! the project's machines), the largest part of a cold start. A few launchers are kept ready
//! in cgroups named `warm-<id>`; a start takes one (recording the cgroup's name), writes its
//! limits and hands the launcher its config. The pool refills in the background. A launcher
//! exits when its stdin closes, so a killed daemon's launchers end by themselves; the next
//! daemon's reconcile removes any still in a `warm-*` cgroup no sandbox took
//! ([`Backend::orphans`]).

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devbox_backend::host::{process_start_time, still_runs};
use devbox_backend::{
    Backend, BackendError, Capabilities, CheckpointSpec, ExecFailure, ExecSpec, HeldMounts,
    HostProcess, Instance, Interrupted, Io, Process, ProcessControl, ProcessExit, Recorder, Result,
    StartSpec, Started, Usage,
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::cgroup::{CgroupDriver, Limits, SandboxCgroup};
use crate::checkpoint::{self, CheckpointError, CheckpointMeta};
use crate::client::{self, AgentConn};
use crate::config::{BindMount, IdMap, LaunchConfig, RootfsPlan};
use crate::container::restore::RestoreConfig;
use crate::launch::{ArmedLauncher, Launcher};
use crate::protocol::{self, AttachedStdio, FailureKind, Reply, Request, WinSize};
use crate::sys;

/// The kind recorded for native sandboxes.
pub const KIND: &str = devbox_backend::NATIVE;

/// Prefix of the cgroups of warm launchers.
pub const WARM_PREFIX: &str = "warm-";

/// How long a frozen sandbox may take to freeze or thaw.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the native backend.
#[derive(Debug, Clone)]
pub struct NativeConfig {
    /// The daemon's runtime directory: sandboxes' runtime dirs go to `sandboxes/` below it.
    pub runtime_dir: PathBuf,
    /// Name of the cgroup under which sandboxes' cgroups are made.
    pub cgroup_parent: String,
    /// The `sandbox-init` binary.
    pub init_binary: PathBuf,
    /// Launchers kept ready (0: none).
    pub warm_launchers: usize,
}

/// The native container backend. Cheap to clone.
#[derive(Clone)]
pub struct NativeBackend {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: NativeConfig,
    cgroups: CgroupDriver,
    launcher: Launcher,
    warm: Mutex<Vec<Warm>>,
    filling: AtomicBool,
}

/// A launcher waiting in its cgroup.
struct Warm {
    cgroup: String,
    launcher: ArmedLauncher,
}

impl std::fmt::Debug for NativeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeBackend")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

/// A random hex id.
fn new_id() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn ensure_dir(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn wait_exit(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(n) if n > 0 => {
                reap(pidfd);
                return true;
            }
            Ok(_) => return false,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Collects an exited init if it became our child (the daemon is a subreaper).
fn reap(pidfd: &OwnedFd) {
    let _ = nix::sys::wait::waitid(
        nix::sys::wait::Id::PIDFd(pidfd.as_fd()),
        nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOHANG,
    );
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

fn exec_failure(kind: FailureKind, message: String) -> BackendError {
    BackendError::Exec {
        kind: match kind {
            FailureKind::NotFound => ExecFailure::NotFound,
            FailureKind::PermissionDenied => ExecFailure::PermissionDenied,
            FailureKind::BadRequest => ExecFailure::BadRequest,
            FailureKind::Internal => ExecFailure::Internal,
        },
        message,
    }
}

impl NativeBackend {
    /// Finds the host's cgroups and checks that `sandbox-init` is there.
    pub fn new(cfg: NativeConfig) -> Result<Self> {
        let cgroups = CgroupDriver::detect(&cfg.cgroup_parent)
            .map_err(|e| BackendError::failed("cgroups", e))?;
        let launcher = Launcher::new(cfg.init_binary.clone());
        if !launcher.binary().is_file() {
            return Err(BackendError::Other(format!(
                "sandbox-init not found at {}: install it next to the sandbox binary or set DEVBOX_INIT",
                launcher.binary().display()
            )));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                cgroups,
                launcher,
                warm: Mutex::new(Vec::new()),
                filling: AtomicBool::new(false),
            }),
        })
    }

    /// Where `sandbox-init` is looked for by default: `$DEVBOX_INIT`, then next to the
    /// running executable, then on PATH.
    pub fn default_init_binary() -> PathBuf {
        Launcher::locate().binary().to_path_buf()
    }

    fn runtime_dir(&self, id: &str) -> PathBuf {
        self.inner.cfg.runtime_dir.join("sandboxes").join(id)
    }

    fn socket(&self, id: &str) -> PathBuf {
        self.runtime_dir(id).join("agent.sock")
    }

    fn cgroup_name(inst: &Instance) -> &str {
        inst.handle.as_deref().unwrap_or(&inst.id)
    }

    fn cgroup(&self, inst: &Instance) -> SandboxCgroup {
        self.inner.cgroups.sandbox(Self::cgroup_name(inst))
    }

    /// Takes a warm launcher, if one is ready, and starts refilling.
    fn take_warm(&self) -> Option<Warm> {
        let w = self
            .inner
            .warm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        self.refill_warm();
        w
    }

    /// Brings the pool back to its target size in the background.
    fn refill_warm(&self) {
        let me = self.clone();
        let target = me.inner.cfg.warm_launchers;
        if target == 0 || me.inner.filling.swap(true, Ordering::SeqCst) {
            return;
        }
        std::thread::spawn(move || {
            loop {
                let have = me
                    .inner
                    .warm
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .len();
                if have >= target {
                    break;
                }
                match me.arm_one() {
                    Ok(w) => me
                        .inner
                        .warm
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(w),
                    Err(e) => {
                        tracing::warn!("preparing a warm launcher: {e}");
                        break;
                    }
                }
            }
            me.inner.filling.store(false, Ordering::SeqCst);
        });
    }

    fn arm_one(&self) -> Result<Warm> {
        let name = format!("{WARM_PREFIX}{}", new_id());
        let cg = self
            .inner
            .cgroups
            .create(&name, &Limits::default())
            .map_err(|e| BackendError::failed("cgroup", e))?;
        match self.inner.launcher.arm(&cg.paths()) {
            Ok(launcher) => Ok(Warm {
                cgroup: name,
                launcher,
            }),
            Err(e) => {
                let _ = cg.kill_all();
                let _ = cg.remove(Duration::from_secs(2));
                Err(BackendError::failed("sandbox-init", e))
            }
        }
    }

    fn discard_warm(&self, w: Warm) {
        let cg = self.inner.cgroups.sandbox(&w.cgroup);
        drop(w.launcher);
        let _ = cg.kill_all();
        let _ = cg.remove(Duration::from_secs(2));
    }

    /// Kills whatever still runs in cgroup `cgroup` and removes it and sandbox `id`'s
    /// runtime dir.
    fn release(&self, id: &str, name: &str, cgroup: &str) {
        let cg = self.inner.cgroups.sandbox(cgroup);
        if cg.exists() {
            if !cg.pids().is_empty() {
                let _ = cg.kill_all();
            }
            if let Err(e) = cg.remove(Duration::from_secs(5)) {
                tracing::warn!(sandbox = %name, "removing cgroup: {e}");
            }
        }
        // The runtime dir holds only empty mount points and a dead socket: remove it off the
        // caller's path (a restart's reconcile removes any a crash left).
        // It is moved aside at once, so a new start of the same sandbox gets a fresh one.
        let rt = self.runtime_dir(id);
        let trash = self.inner.cfg.runtime_dir.join("trash");
        let doomed = trash.join(new_id());
        let moved = std::fs::create_dir_all(&trash).and_then(|_| std::fs::rename(&rt, &doomed));
        match moved {
            Ok(()) => {
                let name = name.to_string();
                std::thread::spawn(move || {
                    if let Err(e) = std::fs::remove_dir_all(&doomed) {
                        tracing::warn!(sandbox = %name, "removing runtime dir: {e}");
                    }
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(sandbox = %name, "moving runtime dir aside: {e}");
                let _ = std::fs::remove_dir_all(&rt);
            }
        }
    }

    fn launch(
        &self,
        spec: &StartSpec,
        restore: Option<&CheckpointSpec>,
        record: Recorder<'_>,
    ) -> Result<Started> {
        let criu = match restore {
            Some(_) => {
                Some(checkpoint::find_criu().map_err(|e| BackendError::Checkpoint(e.to_string()))?)
            }
            None => None,
        };
        let rt = self.runtime_dir(&spec.id);
        ensure_dir(&rt, 0o711)
            .map_err(|e| BackendError::Other(format!("create {}: {e}", rt.display())))?;
        let limits = Limits {
            memory_bytes: Some(spec.limits.memory_bytes),
            pids: Some(spec.limits.pids),
            cpu_millis: Some(spec.limits.cpu_millis),
        };
        // The cgroup's name is recorded before anything runs in it, so that a restart knows
        // whose it is. A restore starts its own launcher: a warm one stays for the next start.
        let warm = match restore {
            None => self.take_warm(),
            Some(_) => None,
        };
        let cgroup = warm
            .as_ref()
            .map(|w| w.cgroup.clone())
            .unwrap_or_else(|| spec.id.clone());
        if let Err(e) = record(&cgroup) {
            if let Some(w) = warm {
                self.discard_warm(w);
            }
            return Err(e.into());
        }
        let (cg, armed) = match warm {
            Some(w) => (self.inner.cgroups.sandbox(&w.cgroup), Some(w.launcher)),
            None => (
                self.inner
                    .cgroups
                    .create(&spec.id, &limits)
                    .map_err(|e| BackendError::failed("cgroup", e))?,
                None,
            ),
        };
        if armed.is_some()
            && let Err(e) = cg.apply(&limits)
        {
            self.release(&spec.id, &spec.name, &cgroup);
            return Err(BackendError::failed("cgroup limits", e));
        }
        let cfg = LaunchConfig {
            id: spec.id.clone(),
            hostname: spec.hostname.clone(),
            idmap: IdMap {
                host_base: spec.uid_base,
                size: spec.uid_count,
            },
            rootfs: RootfsPlan {
                layers: spec.layers.clone(),
                writable: spec.volume.clone(),
                binds: spec
                    .binds
                    .iter()
                    .map(|p| BindMount {
                        source: p.clone(),
                        target: p.clone(),
                        readonly: true,
                        idmap: true,
                    })
                    .collect(),
            },
            runtime_dir: rt.clone(),
            agent_socket: rt.join("agent.sock"),
            cgroups: cg.paths(),
            seccomp: true,
            netns: spec.netns.clone(),
            resolv_conf: spec.resolv_conf.clone(),
        };
        let started = |e| BackendError::Other(format!("starting sandbox {}: {e}", spec.name));
        let launched = match (armed, restore, criu) {
            (_, Some(ck), Some(criu)) => self
                .inner
                .launcher
                .restore(&RestoreConfig {
                    launch: cfg,
                    criu,
                    images: ck.images.clone(),
                    log: ck.log.clone(),
                })
                .map_err(|e| {
                    BackendError::Checkpoint(format!(
                        "restoring the processes of sandbox {}: {e}",
                        spec.name
                    ))
                }),
            (Some(a), _, _) => a.launch(&cfg).map_err(started),
            (None, _, _) => self.inner.launcher.launch(&cfg).map_err(started),
        };
        match launched {
            Ok(pid) => Ok(Started {
                handle: cgroup,
                process: HostProcess {
                    pid,
                    start: process_start_time(pid),
                },
            }),
            Err(e) => {
                self.release(&spec.id, &spec.name, &cgroup);
                Err(e)
            }
        }
    }

    /// Dumps a parked, frozen sandbox's processes, leaving them running. A dump CRIU itself
    /// Moves a held exec child (`inner`, its pid in the sandbox) into a new cgroup of its
    /// own below the sandbox's and lets it run. On failure the child is let go of unstarted
    /// (the agent's end of the hold closes with the connection: it exits) and the cgroup
    /// removed.
    fn track(&self, inst: &Instance, conn: &AgentConn, inner: i32) -> Result<SandboxCgroup> {
        let init = inst
            .process
            .ok_or_else(|| BackendError::Other(format!("sandbox {} does not run", inst.name)))?;
        let host = host_pid_of_child(init.pid, inner).ok_or_else(|| {
            BackendError::Other(format!(
                "the exec's process (pid {inner} in sandbox {}) is gone before it started",
                inst.name
            ))
        })?;
        let cg = self
            .cgroup(inst)
            .create_exec(&format!("exec-{}", new_id()))
            .map_err(|e| BackendError::failed("the exec's cgroup", e))?;
        let released = cg
            .join(host)
            .map_err(|e| BackendError::failed("moving the exec into its cgroup", e))
            .and_then(|()| {
                conn.send(&Request::Release, &[])
                    .map_err(|e| BackendError::failed("releasing the exec", e))?;
                loop {
                    match conn.recv() {
                        Ok((Reply::Ok, _)) => return Ok(()),
                        Ok((Reply::Failed { kind, message }, _)) => {
                            return Err(exec_failure(kind, message));
                        }
                        Ok((Reply::Exited { .. }, _)) => {
                            return Err(BackendError::Other(
                                "the command was killed before it started".into(),
                            ));
                        }
                        Ok(_) => continue,
                        Err(e) => return Err(BackendError::failed("releasing the exec", e)),
                    }
                }
            });
        match released {
            Ok(()) => Ok(cg),
            Err(e) => {
                let _ = cg.kill_all();
                let _ = cg.remove(Duration::from_secs(1));
                Err(e)
            }
        }
    }

    /// gives up on is tried once more after a thaw and a fresh freeze: the cgroup v1 freezer
    /// does not always let go (once, under the parallel test load, CRIU timed out waiting
    /// for a task the thaw had not reached).
    fn dump(
        &self,
        inst: &Instance,
        spec: &CheckpointSpec,
        criu: &Path,
        pid: i32,
        cg: &SandboxCgroup,
    ) -> Result<()> {
        let mut result = self.dump_once(spec, criu, pid, cg);
        if let Err(CheckpointError::Criu { reason, .. }) = &result {
            tracing::warn!(sandbox = %inst.name, "checkpoint failed, trying once more: {reason}");
            let refrozen = cg
                .set_frozen(false, FREEZE_TIMEOUT)
                .and_then(|()| cg.set_frozen(true, FREEZE_TIMEOUT));
            if refrozen.is_ok() {
                result = self.dump_once(spec, criu, pid, cg);
            }
        }
        result.map_err(|e| {
            BackendError::Checkpoint(format!(
                "cannot checkpoint the processes of {}: {e}; nothing was changed",
                inst.name
            ))
        })
    }

    fn dump_once(
        &self,
        spec: &CheckpointSpec,
        criu: &Path,
        pid: i32,
        cg: &SandboxCgroup,
    ) -> std::result::Result<(), CheckpointError> {
        let images = &spec.images;
        let _ = std::fs::remove_dir_all(images);
        // 0711: CRIU opens (possibly missing) images from a task inside the new user
        // namespace before its id map is written; it must get ENOENT, not EACCES. The state
        // dir above is root's alone.
        ensure_dir(images, 0o711).map_err(|e| CheckpointError::Io {
            what: "making the images dir",
            source: io::Error::other(format!("create {}: {e}", images.display())),
        })?;
        checkpoint::dump(&checkpoint::DumpRequest {
            criu: criu.to_path_buf(),
            init_pid: pid,
            images: images.clone(),
            log: spec.log.clone(),
            binds: spec.binds.clone(),
            freezer: cg.freezer_dir(),
            leave_running: true,
            owner: spec.owner,
            init_binary: self.inner.cfg.init_binary.clone(),
            netns: spec.netns.clone(),
        })
        .map(drop)
    }
}

/// A command running in a native sandbox: one agent connection.
#[derive(Debug)]
struct AgentProcess {
    conn: OwnedFd,
    /// A second handle on the terminal's master, for resizing.
    tty: Option<OwnedFd>,
    /// The exec's own cgroup ([`ExecSpec::track_tree`]): everything it started.
    tree: Option<SandboxCgroup>,
}

impl AgentProcess {
    /// Removes the exec's cgroup if nothing runs in it any more (processes it left running
    /// keep it until the sandbox stops, which removes it with the sandbox's).
    fn tidy(&self) {
        if let Some(cg) = &self.tree {
            let _ = cg.remove(Duration::ZERO);
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.tidy();
    }
}

/// The host pid of the sandbox's process `inner` (its pid in the sandbox), a child of its
/// init `init` (host pid): found among init's children by the last entry of their `NSpid`.
fn host_pid_of_child(init: i32, inner: i32) -> Option<i32> {
    let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<i32>().ok())
        .find(|c| {
            std::fs::read_to_string(format!("/proc/{c}/status"))
                .ok()
                .and_then(|st| {
                    st.lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .and_then(|ids| ids.split_whitespace().last())
                        .and_then(|last| last.parse::<i32>().ok())
                })
                == Some(inner)
        })
}

impl ProcessControl for AgentProcess {
    fn ready_fd(&self) -> BorrowedFd<'_> {
        self.conn.as_fd()
    }

    fn try_wait(&self) -> io::Result<Option<ProcessExit>> {
        loop {
            match protocol::recv::<Reply>(self.conn.as_fd())? {
                Some((
                    Reply::Exited {
                        code,
                        signal,
                        cpu_usec,
                        max_rss_kib,
                    },
                    _,
                )) => {
                    return Ok(Some(ProcessExit {
                        code,
                        signal,
                        cpu_usec,
                        max_rss_kib,
                    }));
                }
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }

    fn signal(&self, signal: i32) -> io::Result<()> {
        protocol::send(self.conn.as_fd(), &Request::Signal { signal }, &[])
    }

    fn kill_tree(&self) -> io::Result<()> {
        match &self.tree {
            Some(cg) => cg.kill_all().map_err(io::Error::other),
            None => self.signal(libc::SIGKILL),
        }
    }

    fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        match &self.tty {
            Some(t) => sys::set_winsize(t.as_raw_fd(), rows, cols),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the command has no terminal",
            )),
        }
    }
}

impl Backend for NativeBackend {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            checkpoint: true,
            pty: true,
            live_snapshot: true,
        }
    }

    fn cgroup_mode(&self) -> &'static str {
        self.inner.cgroups.mode()
    }

    fn start(&self, spec: &StartSpec, record: Recorder<'_>) -> Result<Started> {
        self.launch(spec, None, record)
    }

    fn restore(
        &self,
        spec: &StartSpec,
        checkpoint: &CheckpointSpec,
        record: Recorder<'_>,
    ) -> Result<Started> {
        self.launch(spec, Some(checkpoint), record)
    }

    fn stop(
        &self,
        inst: &Instance,
        grace: Duration,
        hold_mounts: bool,
    ) -> Result<Option<HeldMounts>> {
        let mut held = None;
        if let Some(p) = inst.process
            && still_runs(&p)
            && let Ok(pidfd) = sys::pidfd_open(p.pid)
        {
            if hold_mounts {
                held = std::fs::File::open(format!("/proc/{}/ns/mnt", p.pid)).ok();
            }
            let asked =
                grace > Duration::ZERO && client::shutdown(&self.socket(&inst.id), grace).is_ok();
            let exited = asked && wait_exit(&pidfd, grace + Duration::from_secs(2));
            if !exited {
                // Killing the pid namespace's init kills everything in it; the cgroup is only
                // swept afterwards for anything that escaped (release).
                let _ = sys::pidfd_send_signal(&pidfd, libc::SIGKILL);
                if !wait_exit(&pidfd, Duration::from_secs(10)) {
                    return Err(BackendError::Other(format!(
                        "sandbox {} did not stop after SIGKILL",
                        inst.name
                    )));
                }
            }
        }
        self.remove(inst);
        Ok(held.map(|f| Box::new(f) as HeldMounts))
    }

    fn remove(&self, inst: &Instance) {
        self.release(&inst.id, &inst.name, Self::cgroup_name(inst));
    }

    fn alive(&self, inst: &Instance) -> bool {
        inst.process.as_ref().is_some_and(still_runs)
    }

    fn ping(&self, inst: &Instance, timeout: Duration) -> bool {
        self.alive(inst) && client::ping(&self.socket(&inst.id), timeout).is_ok()
    }

    fn watch(&self, inst: &Instance) -> Option<OwnedFd> {
        sys::pidfd_open(inst.process?.pid).ok()
    }

    fn reap(&self, watch: &OwnedFd) {
        reap(watch);
    }

    fn exec(&self, inst: &Instance, spec: ExecSpec) -> Result<Process> {
        let conn = AgentConn::connect(&self.socket(&inst.id))
            .and_then(|c| match spec.start_timeout {
                Some(t) => c.set_timeout(Some(t)).map(|()| c),
                None => Ok(c),
            })
            .map_err(|e| BackendError::failed("connecting to the sandbox's agent", e))?;
        let tty = spec.tty.map(|(rows, cols)| WinSize { rows, cols });
        let mut stdio = AttachedStdio::default();
        // The command's ends go to the agent; ours come back in the same order.
        let mut send: Vec<OwnedFd> = Vec::new();
        let mut ours: [Option<OwnedFd>; 3] = [None, None, None];
        if tty.is_none() {
            let pipe = || {
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                    .map_err(|e| BackendError::failed("pipe", e))
            };
            for (i, io) in [spec.stdin, spec.stdout, spec.stderr]
                .into_iter()
                .enumerate()
            {
                let attached = match io {
                    Io::Null => false,
                    Io::File(f) => {
                        send.push(f);
                        true
                    }
                    Io::Pipe => {
                        let (r, w) = pipe()?;
                        let (theirs, mine) = if i == 0 { (r, w) } else { (w, r) };
                        send.push(theirs);
                        ours[i] = Some(mine);
                        true
                    }
                };
                match i {
                    0 => stdio.stdin = attached,
                    1 => stdio.stdout = attached,
                    _ => stdio.stderr = attached,
                }
            }
        }
        let request = protocol::ExecRequest {
            argv: spec.argv,
            env: spec.env,
            cwd: spec.cwd,
            user: spec.user,
            tty,
            stdio,
            hold: spec.track_tree,
        };
        let raw: Vec<_> = send.iter().map(|f| f.as_raw_fd()).collect();
        conn.send(&Request::Exec(request), &raw)
            .map_err(|e| BackendError::failed("exec request", e))?;
        drop(send);
        let (reply, mut fds) = conn
            .recv()
            .map_err(|e| BackendError::failed("exec reply", e))?;
        let pid = match reply {
            Reply::Started { pid } => pid,
            Reply::Failed { kind, message } => return Err(exec_failure(kind, message)),
            other => {
                return Err(BackendError::Other(format!(
                    "unexpected agent reply {other:?}"
                )));
            }
        };
        let tree = if spec.track_tree {
            Some(self.track(inst, &conn, pid)?)
        } else {
            None
        };
        let conn = conn.into_fd();
        set_nonblocking(&conn).map_err(|e| BackendError::failed("fcntl", e))?;
        let master = if tty.is_some() {
            Some(
                fds.pop()
                    .ok_or_else(|| BackendError::Other("the agent sent no terminal".into()))?,
            )
        } else {
            None
        };
        let resize = match &master {
            Some(m) => Some(
                m.try_clone()
                    .map_err(|e| BackendError::failed("terminal", e))?,
            ),
            None => None,
        };
        let [stdin, stdout, stderr] = ours;
        Ok(Process {
            pid,
            stdin,
            stdout,
            stderr,
            tty: master,
            control: Arc::new(AgentProcess {
                conn,
                tty: resize,
                tree,
            }),
        })
    }

    fn freeze(&self, inst: &Instance) -> Result<()> {
        self.cgroup(inst)
            .set_frozen(true, FREEZE_TIMEOUT)
            .map_err(|e| BackendError::failed("freezing the sandbox", e))
    }

    fn thaw(&self, inst: &Instance) -> Result<()> {
        self.cgroup(inst)
            .set_frozen(false, FREEZE_TIMEOUT)
            .map_err(|e| BackendError::failed("thawing the sandbox", e))
    }

    fn thaw_leftover(&self, inst: &Instance) -> Result<bool> {
        let cg = self.cgroup(inst);
        if !cg.exists() || !cg.is_frozen() {
            return Ok(false);
        }
        cg.thaw_all(FREEZE_TIMEOUT)
            .map_err(|e| BackendError::Other(format!("its cgroup is frozen and did not thaw: {e}")))
    }

    fn checkpoint_ready(&self) -> Result<Option<PathBuf>> {
        checkpoint::find_criu()
            .map(Some)
            .map_err(|e| BackendError::Checkpoint(e.to_string()))
    }

    fn checkpoint(
        &self,
        inst: &Instance,
        spec: &CheckpointSpec,
        files: &mut dyn FnMut() -> std::result::Result<(), Interrupted>,
    ) -> Result<()> {
        let criu = match &spec.tool {
            Some(t) => t.clone(),
            None => checkpoint::find_criu()
                .map_err(|e| BackendError::Checkpoint(format!("{e}; nothing was changed")))?,
        };
        let cg = self.cgroup(inst);
        let socket = self.socket(&inst.id);
        // The agent lets go of everything outside the sandbox before CRIU looks.
        let parked = client::park(&socket).map_err(|e| {
            BackendError::Checkpoint(format!(
                "cannot checkpoint the processes of {}: {e}; nothing was changed",
                inst.name
            ))
        })?;
        let result = (|| {
            cg.set_frozen(true, FREEZE_TIMEOUT)
                .map_err(|e| BackendError::failed("freezing the sandbox", e))?;
            // Processes and files are taken in the same frozen instant.
            let dumped = match inst.process {
                Some(p) => self.dump(inst, spec, &criu, p.pid, &cg),
                None => Ok(()),
            };
            let copied = dumped.and_then(|()| files().map_err(BackendError::from));
            if let Err(e) = cg.set_frozen(false, FREEZE_TIMEOUT) {
                tracing::error!(sandbox = %inst.name, "thawing after a snapshot: {e}");
            }
            copied
        })();
        if let Err(e) = client::resume(&parked, &socket) {
            // Without its listener nobody can reach the sandbox; dropping the pair makes the
            // parked agent stop it, which the watcher then records.
            tracing::error!(sandbox = %inst.name, "resuming the agent after a checkpoint: {e}");
            return Err(BackendError::Checkpoint(format!(
                "the agent of {} did not resume after the checkpoint ({e}); the sandbox stops",
                inst.name
            )));
        }
        result
    }

    fn checkpoint_complete(&self, images: &Path) -> bool {
        images.join(CheckpointMeta::FILE).exists()
    }

    fn usage(&self, inst: &Instance) -> Usage {
        self.cgroup(inst).usage()
    }

    fn oom_kills(&self, inst: &Instance) -> Option<u64> {
        self.cgroup(inst).oom_kills()
    }

    fn update_limits(
        &self,
        inst: &Instance,
        old: &devbox_backend::Limits,
        new: &devbox_backend::Limits,
    ) -> Result<()> {
        let cg = self.cgroup(inst);
        if !cg.exists() {
            return Err(BackendError::Other(format!(
                "sandbox {} has no cgroup: is it running?",
                inst.name
            )));
        }
        let as_cgroup = |l: &devbox_backend::Limits| Limits {
            memory_bytes: Some(l.memory_bytes),
            pids: Some(l.pids),
            cpu_millis: Some(l.cpu_millis),
        };
        cg.update(&as_cgroup(old), &as_cgroup(new))
            .map_err(|e| BackendError::failed("changing the sandbox's cgroup limits", e))
    }

    fn processes(&self, inst: &Instance) -> Vec<(i32, String)> {
        self.cgroup(inst)
            .pids()
            .into_iter()
            .map(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let command = cmd
                    .split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s))
                    .collect::<Vec<_>>()
                    .join(" ");
                (pid, command)
            })
            .collect()
    }

    fn process_table(&self, inst: &Instance) -> Result<Vec<devbox_backend::ProcessSample>> {
        let init = inst
            .process
            .ok_or_else(|| BackendError::Other(format!("sandbox {} is not running", inst.name)))?;
        let depth = crate::procs::ns_depth(init.pid)
            .ok_or_else(|| BackendError::Other(format!("sandbox {}'s init is gone", inst.name)))?;
        Ok(self
            .cgroup(inst)
            .pids_by_cgroup()
            .into_iter()
            .filter_map(|(pid, cg)| crate::procs::sample(pid, depth, cg))
            .collect())
    }

    fn orphans(&self, owned: &[Instance]) -> Vec<String> {
        let ids: HashSet<&str> = owned.iter().map(|i| i.id.as_str()).collect();
        let cgroups: HashSet<&str> = owned
            .iter()
            .flat_map(|i| [i.id.as_str(), Self::cgroup_name(i)])
            .collect();
        let mut out: Vec<String> = self
            .inner
            .cgroups
            .existing()
            .into_iter()
            .filter(|name| !cgroups.contains(name.as_str()))
            .map(|name| format!("cgroup:{name}"))
            .collect();
        let rt = self.inner.cfg.runtime_dir.join("sandboxes");
        for e in std::fs::read_dir(&rt).into_iter().flatten().flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            if !ids.contains(id.as_str()) {
                out.push(format!("rundir:{id}"));
            }
        }
        if self.inner.cfg.runtime_dir.join("trash").exists() {
            out.push("trash".into());
        }
        out
    }

    fn remove_orphan(&self, orphan: &str) {
        if let Some(name) = orphan.strip_prefix("cgroup:") {
            let cg = self.inner.cgroups.sandbox(name);
            let n = cg.pids().len();
            let _ = cg.kill_all();
            let warm = name.starts_with(WARM_PREFIX);
            match cg.remove(Duration::from_secs(5)) {
                Ok(()) if warm => {
                    tracing::info!(cgroup = %name, processes = n, "removed a warm launcher a dead daemon left")
                }
                Ok(()) => tracing::info!(cgroup = %name, "removed a cgroup no sandbox owns"),
                Err(e) => tracing::warn!(cgroup = %name, "removing a cgroup no sandbox owns: {e}"),
            }
        } else if let Some(id) = orphan.strip_prefix("rundir:") {
            let path = self.runtime_dir(id);
            tracing::info!(path = %path.display(), "removing what no sandbox owns");
            let _ = std::fs::remove_dir_all(path);
        } else if orphan == "trash" {
            let _ = std::fs::remove_dir_all(self.inner.cfg.runtime_dir.join("trash"));
        }
    }

    fn owns_host_process(&self, pid: i32) -> bool {
        let prefix = format!("/{}/", self.inner.cfg.cgroup_parent.trim_matches('/'));
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        cgroups.lines().any(|l| {
            l.splitn(3, ':')
                .nth(2)
                .is_some_and(|p| p.starts_with(&prefix))
        })
    }

    fn ready(&self) {
        self.refill_warm();
    }

    fn shutdown(&self) {
        let drained: Vec<Warm> =
            std::mem::take(&mut *self.inner.warm.lock().unwrap_or_else(|p| p.into_inner()));
        for w in drained {
            self.discard_warm(w);
        }
    }
}
