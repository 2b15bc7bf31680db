//! The seam under dev-box's engine: what a kind of sandbox must do.
//!
//! The engine owns records, storage (volumes, snapshots), images, checks and the audit log;
//! a [`Backend`] owns what runs: it starts a sandbox from a prepared root (read-only layers,
//! a writable volume, host binds) and a spec-derived config ([`StartSpec`]), runs commands in
//! it ([`Backend::exec`], a [`Process`]), stops it, freezes it for a snapshot, checkpoints and
//! restores its processes, and finds what a crashed daemon left ([`Backend::orphans`]).
//!
//! Each sandbox record names its backend's [`Backend::kind`] and holds an opaque handle the
//! backend gave it ([`Instance::handle`]), written before anything runs under it, plus the
//! host process that is the sandbox (its pid and start time). Backends say what they can do
//! ([`Capabilities`]); the engine refuses the rest with a clear message before acting.
//!
//! Methods block (the engine calls them off its async threads), except [`ProcessControl`],
//! which the engine drives from its reactor through a readiness fd.
//!
//! Implementations: the native container backend (`devbox-runtime`, `native.rs`) and, with
//! the `fake` feature, an in-memory one for tests ([`fake`]).

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[cfg(feature = "fake")]
pub mod fake;
pub mod host;

/// The kind of the native container backend, and of every sandbox recorded before kinds were.
pub const NATIVE: &str = "native";

/// What a backend can do; the engine refuses the rest before acting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Checkpoint running processes and restore them ([`Backend::checkpoint`], [`Backend::restore`]).
    pub checkpoint: bool,
    /// Run commands on a terminal.
    pub pty: bool,
    /// Snapshot the files of a running sandbox (frozen for the instant of the copy).
    pub live_snapshot: bool,
}

/// Resource use of one sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    /// Memory charged to the sandbox, in bytes.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// CPU time consumed, in microseconds.
    pub cpu_usec: u64,
    /// Processes the kernel's OOM killer killed in it since it started.
    #[serde(default)]
    pub oom_kills: u64,
    /// The most memory charged to it at once, in bytes (0 if the kernel does not tell).
    #[serde(default)]
    pub memory_peak_bytes: u64,
    /// Forks refused because the sandbox was at its pids limit, since it started (the `max`
    /// count of its cgroup's `pids.events`; 0 if the kernel does not tell).
    #[serde(default)]
    pub pids_limit_hits: u64,
}

/// One process of a running sandbox, as read from the host's /proc (see
/// [`Backend::process_table`]). Text fields come from inside the sandbox: hostile, already
/// bounded and with control characters escaped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessSample {
    /// Host pid.
    pub host_pid: i32,
    /// Pid inside the sandbox's pid namespace (none if it could not be read).
    pub pid: Option<i32>,
    /// Host pid of its parent.
    pub host_ppid: i32,
    /// Host pid of its session leader.
    pub host_sid: i32,
    /// Real uid on the host.
    pub host_uid: u32,
    /// CPU time (user + system), microseconds.
    pub cpu_usec: u64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// Command line (or `[comm]` when it has none), escaped and bounded.
    pub command: String,
    /// The cgroup of an exec's own it is in (`exec-...`), if any.
    pub exec_cgroup: Option<String>,
}

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// CPU bandwidth in thousandths of a CPU.
    pub cpu_millis: u64,
}

/// The host process that is a sandbox (its init, or a VM's monitor): pid and start time
/// (clock ticks since boot), which together survive pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostProcess {
    /// Host pid.
    pub pid: i32,
    /// Start time of that pid (none if it ended before it could be read).
    pub start: Option<u64>,
}

/// One sandbox as its backend sees it: what the engine recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The sandbox's id (names its volume and runtime state).
    pub id: String,
    /// Its name, for messages.
    pub name: String,
    /// What the backend recorded through [`Recorder`] (none before a first start).
    pub handle: Option<String>,
    /// Its host process while it runs.
    pub process: Option<HostProcess>,
}

/// What a sandbox is started from: a prepared root and a config derived from its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartSpec {
    /// The sandbox's id and name, as in [`Instance`].
    pub id: String,
    /// Its name.
    pub name: String,
    /// Hostname inside.
    pub hostname: String,
    /// Host uid (and gid) the sandbox's root maps to.
    pub uid_base: u32,
    /// How many ids are mapped from there.
    pub uid_count: u32,
    /// Read-only image layers, topmost first.
    pub layers: Vec<PathBuf>,
    /// The writable volume (holding `upper/` and `work/`).
    pub volume: PathBuf,
    /// Host directories bound read-only at the same path.
    pub binds: Vec<PathBuf>,
    /// Resource limits.
    pub limits: Limits,
    /// A network namespace made for the sandbox (a bind-mounted nsfs file) to join; none: an
    /// empty one of its own (loopback only).
    pub netns: Option<PathBuf>,
    /// What the sandbox's `/etc/resolv.conf` says (its network's resolver), if anything.
    pub resolv_conf: Option<String>,
}

/// Where a checkpoint of a sandbox's processes lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointSpec {
    /// Directory of the checkpoint's images (made and emptied by the backend).
    pub images: PathBuf,
    /// The log of this dump or restore.
    pub log: PathBuf,
    /// Host uid of the sandbox's root (the images' owner).
    pub owner: u32,
    /// Host directories bound into the sandbox (as in [`StartSpec::binds`]).
    pub binds: Vec<PathBuf>,
    /// The tool [`Backend::checkpoint_ready`] found, if the backend uses one (else it
    /// looks for it itself).
    pub tool: Option<PathBuf>,
    /// The persisted network namespace the sandbox joined (as in [`StartSpec::netns`]):
    /// kept out of the checkpoint, joined again by a restore.
    pub netns: Option<PathBuf>,
}

/// A started sandbox: what the engine records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The handle (as last given to the [`Recorder`]).
    pub handle: String,
    /// The host process.
    pub process: HostProcess,
}

/// Writes a handle into the sandbox's record before anything runs under it, so that a
/// restart knows what is whose. An error stops the start (the caller keeps its cause).
pub type Recorder<'a> = &'a mut dyn FnMut(&str) -> std::result::Result<(), Interrupted>;

/// A step of the caller's failed inside a backend operation; the caller has the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted by the caller")]
pub struct Interrupted;

/// Why a command could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecFailure {
    /// Program, user or directory not found.
    NotFound,
    /// Not executable, or access refused.
    PermissionDenied,
    /// A malformed request.
    BadRequest,
    /// Something failed in the sandbox.
    Internal,
}

/// Errors of backends.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend cannot do this.
    #[error("{0}")]
    Unsupported(String),
    /// Processes could not be checkpointed or restored; says why.
    #[error("{0}")]
    Checkpoint(String),
    /// A command could not start.
    #[error("{message}")]
    Exec {
        /// What kind of failure.
        kind: ExecFailure,
        /// For the user.
        message: String,
    },
    /// A step failed on the host.
    #[error("{what}: {message}")]
    Failed {
        /// What was being done.
        what: &'static str,
        /// The cause.
        message: String,
    },
    /// Something else failed; the message says what.
    #[error("{0}")]
    Other(String),
    /// The caller's step failed (see [`Interrupted`]).
    #[error("interrupted by the caller")]
    Interrupted,
}

impl From<Interrupted> for BackendError {
    fn from(_: Interrupted) -> Self {
        Self::Interrupted
    }
}

impl BackendError {
    /// A failed host step with its cause.
    pub fn failed(what: &'static str, e: impl std::fmt::Display) -> Self {
        Self::Failed {
            what,
            message: e.to_string(),
        }
    }
}

/// Result of backend operations.
pub type Result<T> = std::result::Result<T, BackendError>;

/// Where a command's standard stream goes.
#[derive(Debug)]
pub enum Io {
    /// `/dev/null`.
    Null,
    /// A new pipe; the caller gets its end in the [`Process`].
    Pipe,
    /// This file (the command gets it as is).
    File(OwnedFd),
}

/// A command to run in a sandbox.
#[derive(Debug)]
pub struct ExecSpec {
    /// Program and arguments (`argv[0]` searched in the `PATH` of `env`).
    pub argv: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Working directory inside.
    pub cwd: String,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    pub user: Option<String>,
    /// A terminal of this size (rows, columns) instead of the streams below.
    pub tty: Option<(u16, u16)>,
    /// Standard input.
    pub stdin: Io,
    /// Standard output.
    pub stdout: Io,
    /// Standard error.
    pub stderr: Io,
    /// How long to wait for the command to start (none: as long as it takes).
    pub start_timeout: Option<Duration>,
    /// Track every process the command starts, also those that leave its process group or
    /// session, so that [`ProcessControl::kill_tree`] reaches them all (the native backend:
    /// a cgroup of the exec's own, which costs a cgroup move per exec).
    pub track_tree: bool,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessExit {
    /// Exit code (128 + signal when killed by one).
    pub code: i32,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// CPU time (user + system), microseconds.
    pub cpu_usec: u64,
    /// Peak resident memory, KiB.
    pub max_rss_kib: u64,
}

/// A running command, driven from an async reactor: wait for [`ProcessControl::ready_fd`]
/// to turn readable, then call [`ProcessControl::try_wait`]. Dropping it leaves the
/// command running, untied.
pub trait ProcessControl: Send + Sync + std::fmt::Debug {
    /// Readable when [`ProcessControl::try_wait`] may have news; non-blocking.
    fn ready_fd(&self) -> BorrowedFd<'_>;
    /// `Ok(Some(exit))` once it ended; `Ok(None)` if the sandbox went away meanwhile;
    /// `Err(WouldBlock)` while it runs.
    fn try_wait(&self) -> io::Result<Option<ProcessExit>>;
    /// Sends it a signal.
    fn signal(&self, signal: i32) -> io::Result<()>;
    /// Resizes its terminal.
    fn resize(&self, rows: u16, cols: u16) -> io::Result<()>;
    /// Kills the command and every process it started (with [`ExecSpec::track_tree`]: also
    /// those that left its process group or session). The default signals the command only.
    fn kill_tree(&self) -> io::Result<()> {
        self.signal(9)
    }
}

/// A started command: its pid inside the sandbox, the caller's ends of its streams, and its
/// control.
#[derive(Debug)]
pub struct Process {
    /// Pid inside the sandbox.
    pub pid: i32,
    /// Write end of its stdin ([`Io::Pipe`]).
    pub stdin: Option<OwnedFd>,
    /// Read end of its stdout ([`Io::Pipe`]).
    pub stdout: Option<OwnedFd>,
    /// Read end of its stderr ([`Io::Pipe`]).
    pub stderr: Option<OwnedFd>,
    /// Its terminal's master side (with [`ExecSpec::tty`]).
    pub tty: Option<OwnedFd>,
    /// Wait, signal, resize.
    pub control: Arc<dyn ProcessControl>,
}

/// Keeps a stopped sandbox's mounts alive until dropped (see [`Backend::stop`]).
pub type HeldMounts = Box<dyn Send>;

/// One kind of sandbox. See the crate's documentation.
pub trait Backend: Send + Sync {
    /// The kind recorded in sandbox records (`native`, ...).
    fn kind(&self) -> &'static str;

    /// What it can do.
    fn capabilities(&self) -> Capabilities;

    /// The host's cgroup layout as this backend uses it ("v1", "v2", "hybrid"; "none").
    fn cgroup_mode(&self) -> &'static str {
        "none"
    }

    /// Starts a sandbox. `record` is called with the handle before anything runs under it
    /// (and again whenever it changes). On failure nothing of it runs.
    fn start(&self, spec: &StartSpec, record: Recorder<'_>) -> Result<Started>;

    /// Starts a sandbox from a checkpoint of its processes (its volume holds the files of
    /// the same instant): [`Backend::start`] with processes restored instead of a fresh init.
    fn restore(
        &self,
        spec: &StartSpec,
        checkpoint: &CheckpointSpec,
        record: Recorder<'_>,
    ) -> Result<Started>;

    /// Stops it: asks its processes to end within `grace` (none: kill at once), kills them
    /// then, and releases what it held (as [`Backend::remove`]). With `hold_mounts`, returns
    /// a handle that keeps its mounts until dropped, so the caller does not wait for the
    /// kernel to unmount its root.
    fn stop(
        &self,
        inst: &Instance,
        grace: Duration,
        hold_mounts: bool,
    ) -> Result<Option<HeldMounts>>;

    /// Releases everything the backend holds for a sandbox that does not run (what a
    /// crashed start or stop left): processes left over, cgroups, runtime directories.
    fn remove(&self, inst: &Instance);

    /// Whether its host process still runs.
    fn alive(&self, inst: &Instance) -> bool;

    /// Whether it runs and answers within `timeout`.
    fn ping(&self, inst: &Instance, timeout: Duration) -> bool;

    /// An fd that turns readable when its host process ends (none if it is gone already).
    fn watch(&self, inst: &Instance) -> Option<OwnedFd>;

    /// Collects the ended process behind a [`Backend::watch`] fd.
    fn reap(&self, _watch: &OwnedFd) {}

    /// Starts a command in a running sandbox.
    fn exec(&self, inst: &Instance, spec: ExecSpec) -> Result<Process>;

    /// Freezes every process of a running sandbox.
    fn freeze(&self, inst: &Instance) -> Result<()>;

    /// Thaws what [`Backend::freeze`] froze.
    fn thaw(&self, inst: &Instance) -> Result<()>;

    /// Thaws a sandbox a dead daemon left frozen; returns whether it was.
    fn thaw_leftover(&self, _inst: &Instance) -> Result<bool> {
        Ok(false)
    }

    /// Whether checkpoints can be taken now (the tools are there; returns the one it uses,
    /// if any, for [`CheckpointSpec::tool`]); says why not.
    fn checkpoint_ready(&self) -> Result<Option<PathBuf>> {
        Err(BackendError::Unsupported(format!(
            "the {} backend cannot checkpoint processes",
            self.kind()
        )))
    }

    /// Checkpoints a running sandbox's processes into `spec.images`, leaving them running,
    /// and calls `files` in the same frozen instant (to snapshot its volume).
    fn checkpoint(
        &self,
        inst: &Instance,
        spec: &CheckpointSpec,
        files: &mut dyn FnMut() -> std::result::Result<(), Interrupted>,
    ) -> Result<()>;

    /// Whether `images` holds a complete checkpoint.
    fn checkpoint_complete(&self, _images: &Path) -> bool {
        false
    }

    /// Resource use of a running sandbox.
    fn usage(&self, inst: &Instance) -> Usage;

    /// Processes the OOM killer killed in a running sandbox so far (none if the backend
    /// cannot tell). Cheaper than [`Backend::usage`]: read around every exec.
    fn oom_kills(&self, _inst: &Instance) -> Option<u64> {
        None
    }

    /// Changes a running sandbox's limits in place, without a restart: all of them, or none
    /// (a failure puts back what it changed). The default refuses.
    fn update_limits(&self, _inst: &Instance, _old: &Limits, _new: &Limits) -> Result<()> {
        Err(BackendError::Unsupported(format!(
            "the {} backend cannot change a running sandbox's limits: stop it, update, start it",
            self.kind()
        )))
    }

    /// Its processes: host pid and command line.
    fn processes(&self, inst: &Instance) -> Vec<(i32, String)>;

    /// Its processes in detail, for `ps` (the default: none known).
    fn process_table(&self, _inst: &Instance) -> Result<Vec<ProcessSample>> {
        Err(BackendError::Unsupported(format!(
            "the {} backend cannot list a sandbox's processes in detail",
            self.kind()
        )))
    }

    /// What this backend holds on the host that none of `owned` owns (a crashed daemon's
    /// leftovers), each named for [`Backend::remove_orphan`].
    fn orphans(&self, owned: &[Instance]) -> Vec<String>;

    /// Removes one of [`Backend::orphans`] (logs failures).
    fn remove_orphan(&self, orphan: &str);

    /// Whether host process `pid` belongs to one of its sandboxes (or its own helpers).
    fn owns_host_process(&self, _pid: i32) -> bool {
        false
    }

    /// Called once the engine reconciled its records: background preparations may begin.
    fn ready(&self) {}

    /// Called at daemon shutdown: ends what [`Backend::ready`] began.
    fn shutdown(&self) {}
}
