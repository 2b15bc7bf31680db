//! Requests and responses of sandboxes, execs, snapshots, images and the pool.

use std::collections::BTreeMap;

use devbox_spec::{ResolvedLimits, SandboxManifest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::RequestError;

fn default_true() -> bool {
    true
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Being created; not usable yet.
    Creating,
    /// Its processes run.
    Running,
    /// Its files exist; no process runs.
    Stopped,
    /// Being destroyed.
    Destroying,
    /// The daemon could not bring it in line with the host at its start (its `last_error`
    /// says why): nothing is started in it; `destroy` removes it, and the next daemon start
    /// tries again.
    Broken,
}

/// Resource use of one sandbox, as the kernel counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    /// Memory charged to the sandbox, in bytes.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// CPU time consumed, in microseconds.
    pub cpu_usec: u64,
    /// Processes the kernel's OOM killer killed in it (its memory limit was reached).
    #[serde(default)]
    pub oom_kills: u64,
}

/// A sandbox's writable layer as its disk quota counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskUsage {
    /// Bytes the writable layer references (btrfs qgroup; as of the last commit, within
    /// about 30 seconds).
    pub used_bytes: u64,
    /// The quota (`spec.limits.disk`), if one is set.
    pub limit_bytes: Option<u64>,
}

/// Change a sandbox's limits (any subset); a running sandbox gets them at once, without a
/// restart. Quantities as in the spec; `none` lifts the disk quota or the exec timeout.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateLimitsRequest {
    /// Memory: `"2Gi"`. Not below what the sandbox uses now.
    #[serde(default)]
    pub memory: Option<String>,
    /// CPUs: `"2"`, `"500m"`.
    #[serde(default)]
    pub cpu: Option<String>,
    /// Most processes and threads. Not below how many run now.
    #[serde(default)]
    pub pids: Option<u64>,
    /// Disk quota of the writable layer: `"20Gi"`, or `none`. Not below what it holds now.
    #[serde(default)]
    pub disk: Option<String>,
    /// Default exec timeout: `"5m"`, or `none`.
    #[serde(default)]
    pub exec_timeout: Option<String>,
}

impl UpdateLimitsRequest {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.memory.is_none()
            && self.cpu.is_none()
            && self.pids.is_none()
            && self.disk.is_none()
            && self.exec_timeout.is_none()
    }
}

/// How processes run by default in an image (from an OCI config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageConfig {
    /// Environment, `KEY=value`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// User.
    #[serde(default)]
    pub user: Option<String>,
    /// Entrypoint.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Default command.
    #[serde(default)]
    pub cmd: Vec<String>,
}

/// How a path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Present in the new state only.
    Added,
    /// Present in both, with different content or metadata.
    Modified,
    /// Present in the old state only.
    Deleted,
}

impl ChangeKind {
    /// One letter, as `docker diff` prints: A, M, D.
    pub fn letter(self) -> char {
        match self {
            Self::Added => 'A',
            Self::Modified => 'M',
            Self::Deleted => 'D',
        }
    }
}

/// One changed path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Change {
    /// How it changed.
    pub kind: ChangeKind,
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Size in bytes: the new size (added, modified) or the old one (deleted); 0 for directories.
    pub size: u64,
    /// Whether it is a directory.
    pub dir: bool,
}

/// What `sandbox pool info` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolInfo {
    /// Driver in use: `btrfs` or `copy` (the volume driver's name).
    #[schema(example = "btrfs")]
    pub driver: String,
    /// Pool directory.
    pub path: String,
    /// Backing loop file, if any.
    pub loop_file: Option<String>,
    /// Filesystem size in bytes.
    pub total_bytes: u64,
    /// Bytes used.
    pub used_bytes: u64,
    /// Bytes available.
    pub free_bytes: u64,
}

/// Daemon and host facts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VersionInfo {
    /// dev-box version.
    pub version: String,
    /// API version.
    pub api: String,
    /// Cgroup layout of the host.
    pub cgroups: String,
    /// Storage driver.
    pub storage: String,
}

/// Create a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateSandboxRequest {
    /// The sandbox's name; overrides `manifest.metadata.name`.
    #[serde(default)]
    pub name: Option<String>,
    /// The Sandbox document (apiVersion sandbox.io/v1); defaults apply when omitted.
    #[serde(default)]
    #[schema(value_type = Option<crate::spec_schema::SandboxManifest>)]
    pub manifest: Option<SandboxManifest>,
    /// Start it right away (default true).
    #[serde(default = "default_true")]
    pub start: bool,
}

/// Stop a sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct StopRequest {
    /// Seconds between SIGTERM and SIGKILL (default 10; 0 kills at once).
    #[serde(default)]
    pub grace_seconds: Option<f64>,
}

/// A process of a sandbox, seen from the host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessInfo {
    /// Host pid.
    pub pid: i32,
    /// Command line.
    pub command: String,
}

/// Everything about a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxInfo {
    /// Internal id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Lifecycle state.
    pub state: SandboxState,
    /// Image reference as given.
    pub image: String,
    /// Image id.
    pub image_id: String,
    /// The spec.
    #[schema(value_type = crate::spec_schema::SandboxManifest)]
    pub manifest: SandboxManifest,
    /// Limits in force.
    #[schema(value_type = crate::spec_schema::ResolvedLimits)]
    pub limits: ResolvedLimits,
    /// Host uid of the sandbox's root.
    pub uid_base: u32,
    /// Host pid of the sandbox's init while running.
    pub init_pid: Option<i32>,
    /// Processes (inspect only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ProcessInfo>,
    /// Resource use (running sandboxes).
    pub usage: Option<Usage>,
    /// Bytes in the sandbox's writable layer (inspect only).
    pub storage_bytes: Option<u64>,
    /// The writable layer as its disk quota counts it (inspect only, with a quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskUsage>,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Last started.
    pub started_at: Option<String>,
    /// Last stopped.
    pub stopped_at: Option<String>,
    /// Why the last lifecycle step failed, if it did.
    pub last_error: Option<String>,
    /// Alerts that fire now (inspect only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<crate::events::ActiveAlert>,
    /// Health of a running sandbox whose spec has a health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthInfo>,
    /// Idle state of a sandbox whose spec has `idle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleInfo>,
}

/// A health check's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Started, not yet passed a check (or within its start period).
    Starting,
    /// The last check passed.
    Healthy,
    /// `retries` checks in a row failed.
    Unhealthy,
}

impl HealthStatus {
    /// The state's name (`starting`, `healthy`, `unhealthy`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }
}

/// Health of a sandbox (`spec.healthcheck`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthInfo {
    /// The state.
    pub status: HealthStatus,
    /// Failed checks in a row.
    pub failures: u32,
    /// Checks run since the sandbox started.
    pub checks: u64,
    /// When the last check ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<String>,
    /// The last check's exit code (absent: it could not run, or timed out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<i32>,
    /// The start of the last check's output (at most 1 KiB, control characters escaped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_output: Option<String>,
}

/// Idle state of a sandbox (`spec.idle`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IdleInfo {
    /// Frozen because it was idle (the next exec thaws it).
    pub frozen: bool,
    /// Stopped because it was idle (the next exec starts it).
    pub stopped: bool,
    /// Milliseconds since it was last used (running sandboxes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct TtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Run a command in a sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ExecRequest {
    /// Program and arguments. Use `["/bin/sh", "-c", "..."]` for shell text, or set `command`.
    #[serde(default)]
    pub argv: Vec<String>,
    /// Shell text, run through `/bin/sh -c` (instead of `argv`).
    #[serde(default)]
    pub command: Option<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the spec's, the image's, or /work for the host image).
    #[serde(default)]
    pub workdir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    #[serde(default)]
    pub user: Option<String>,
    /// Allocate a terminal of this size.
    #[serde(default)]
    pub tty: Option<TtySize>,
    /// Standard input (non-streaming exec): text fed to the command.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Take a snapshot first, and roll back to it if the command exits non-zero.
    #[serde(default)]
    pub rollback_on_failure: bool,
    /// An approved approval for exactly this command (when the checks require one).
    #[serde(default)]
    pub approval: Option<String>,
    /// Kill the command and everything it started after this long (`"30s"`, `"5m"`,
    /// `"500ms"`); it then ends with exit code 124 and `timed_out`. Default: the spec's
    /// `limits.execTimeout`, else none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

impl ExecRequest {
    /// The argv to run.
    pub fn resolved_argv(&self) -> Result<Vec<String>, RequestError> {
        match (&self.command, self.argv.is_empty()) {
            (Some(_), false) => Err(RequestError(
                "give either `argv` or `command`, not both".into(),
            )),
            (Some(c), true) => Ok(vec!["/bin/sh".into(), "-c".into(), c.clone()]),
            (None, false) => Ok(self.argv.clone()),
            (None, true) => Err(RequestError(
                "no command given: set `argv` or `command`".into(),
            )),
        }
    }
}

/// The outcome of a non-streaming exec.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// Exit code (128 + signal when killed).
    pub exit_code: i32,
    /// Signal that killed the command, if any.
    pub signal: Option<i32>,
    /// Standard output (UTF-8, lossy).
    pub stdout: String,
    /// Standard error (UTF-8, lossy).
    pub stderr: String,
    /// Output was cut at the size limit.
    pub truncated: bool,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// The snapshot the sandbox was rolled back to after the command failed.
    pub rolled_back_to: Option<String>,
    /// The timeout ended it: it and everything it started were killed (exit code 124).
    #[serde(default)]
    pub timed_out: bool,
    /// The kernel's OOM killer killed it: the sandbox reached its memory limit.
    #[serde(default)]
    pub oom_killed: bool,
}

/// Import an image from a path on the daemon's host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImportImageRequest {
    /// Rootfs tarball, rootfs directory, OCI layout (directory or archive) or docker-save archive.
    pub path: String,
    /// Name for the image (default: from the archive or the file name).
    #[serde(default)]
    pub name: Option<String>,
}

/// An image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    /// Content id (sha256 hex; `host` for the host image).
    pub id: String,
    /// Name.
    pub name: String,
    /// Source format.
    pub format: String,
    /// Bytes.
    pub size_bytes: u64,
    /// Imported (RFC 3339).
    pub created_at: String,
    /// What was imported.
    pub source: String,
    /// Run settings.
    pub config: ImageConfig,
    /// Sandboxes using it.
    pub used_by: Vec<String>,
}

/// Take a snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct SnapshotRequest {
    /// Name, unique in the sandbox (default: a time-ordered `s-YYYYMMDD-HHMMSS-mmm`).
    #[serde(default)]
    pub name: Option<String>,
    /// A message.
    #[serde(default)]
    pub message: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Also checkpoint the running processes (CRIU), so that a rollback to this snapshot
    /// restores them running.
    #[serde(default)]
    pub with_processes: bool,
}

/// A snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    /// Internal id.
    pub id: String,
    /// Name.
    pub name: String,
    /// The sandbox.
    pub sandbox: String,
    /// Name of the snapshot it descends from.
    pub parent: Option<String>,
    /// Taken (RFC 3339).
    pub created_at: String,
    /// Message.
    pub message: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Taken automatically before an exec.
    pub auto: bool,
    /// Bytes of files in its writable layer (measured in the background after it is taken).
    pub size_bytes: Option<u64>,
    /// It holds a checkpoint of the sandbox's processes: a rollback to it restores them.
    pub processes: bool,
    /// The sandbox's current state descends from it directly.
    pub head: bool,
    /// Sandboxes cloned from it.
    pub clones: Vec<String>,
}

/// Roll a sandbox back.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RollbackRequest {
    /// Snapshot name or id, or `latest`.
    pub to: String,
    /// Only these absolute paths (and what is under them); everything else stays.
    #[serde(default)]
    pub paths: Vec<String>,
}

/// Clone a sandbox from one of its snapshots.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CloneRequest {
    /// Snapshot name or id, or `latest`.
    pub snapshot: String,
    /// The new sandbox's name.
    pub name: String,
    /// Start it (default true).
    #[serde(default = "default_true")]
    pub start: bool,
}

/// Differences between two states of a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DiffResult {
    /// The older state: a snapshot's name, or `image`.
    pub from: String,
    /// The newer state: a snapshot's name, or `current`.
    pub to: String,
    /// Changed paths, sorted.
    pub changes: Vec<Change>,
}
