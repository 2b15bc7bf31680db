//! The engine's request and response types. Most are the wire model's ([`devbox_wire`]),
//! which front ends speak; the two that hold types of the crates below the engine (the
//! spec's record state, the cgroup's usage, the storage's changes) are the engine's own and
//! convert into the wire model's with `From`.

use std::time::{Duration, UNIX_EPOCH};

use devbox_backend::Usage;
use devbox_spec::{ResolvedLimits, SandboxManifest};
use devbox_store::SandboxState;
use serde::{Deserialize, Serialize};

pub use devbox_wire::{
    CloneRequest, CreateSandboxRequest, ExecRequest, ExecResult, ImageInfo, ImportImageRequest,
    ProcessInfo, RollbackRequest, SnapshotInfo, SnapshotRequest, StopRequest, TtySize,
    UpdateLimitsRequest,
};

/// Formats milliseconds since the epoch as RFC 3339.
pub fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
        .to_string()
}

/// Everything about a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub manifest: SandboxManifest,
    /// Limits in force.
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
    pub disk: Option<devbox_wire::DiskUsage>,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Last started.
    pub started_at: Option<String>,
    /// Last stopped.
    pub stopped_at: Option<String>,
    /// Why the last lifecycle step failed, if it did.
    pub last_error: Option<String>,
    /// Health (a running sandbox with a health check).
    pub health: Option<devbox_wire::HealthInfo>,
    /// Idle state (a sandbox with `spec.idle`).
    pub idle: Option<devbox_wire::IdleInfo>,
    /// Alerts that fire now (inspect only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<devbox_wire::ActiveAlert>,
}

/// Differences between two states of a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiffResult {
    /// The older state: a snapshot's name, or `image`.
    pub from: String,
    /// The newer state: a snapshot's name, or `current`.
    pub to: String,
    /// Changed paths, sorted.
    pub changes: Vec<devbox_storage::layers::Change>,
}

impl From<SandboxInfo> for devbox_wire::SandboxInfo {
    fn from(s: SandboxInfo) -> Self {
        Self {
            id: s.id,
            name: s.name,
            state: crate::to_wire::sandbox_state(s.state),
            image: s.image,
            image_id: s.image_id,
            manifest: s.manifest,
            limits: s.limits,
            uid_base: s.uid_base,
            init_pid: s.init_pid,
            processes: s.processes,
            usage: s.usage.map(crate::to_wire::usage),
            storage_bytes: s.storage_bytes,
            disk: s.disk,
            created_at: s.created_at,
            started_at: s.started_at,
            stopped_at: s.stopped_at,
            last_error: s.last_error,
            health: s.health,
            idle: s.idle,
            alerts: s.alerts,
        }
    }
}

impl From<DiffResult> for devbox_wire::DiffResult {
    fn from(d: DiffResult) -> Self {
        Self {
            from: d.from,
            to: d.to,
            changes: d.changes.into_iter().map(crate::to_wire::change).collect(),
        }
    }
}
