//! What the daemon hands to `sandbox-init` to start one sandbox.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A contiguous range of host ids that a sandbox's ids 0..size map onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    /// The host uid (and gid) that the sandbox's root maps to.
    pub host_base: u32,
    /// How many ids are mapped.
    pub size: u32,
}

/// A host path mounted into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    /// Host path.
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: PathBuf,
    /// Mounted read-only.
    pub readonly: bool,
    /// Ids shifted through the sandbox's user namespace (host root shows as the sandbox's root).
    pub idmap: bool,
}

/// How the sandbox's root filesystem is put together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsPlan {
    /// Read-only image layers, topmost first; each is id-mapped.
    pub layers: Vec<PathBuf>,
    /// A directory holding `upper/` and `work/` on one filesystem: the writable layer.
    pub writable: PathBuf,
    /// Host paths mounted on top of the root.
    pub binds: Vec<BindMount>,
}

/// Resource limits, applied through cgroups by the daemon; carried here for rlimits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchConfig {
    /// The sandbox's id (used in messages).
    pub id: String,
    /// Hostname inside the sandbox.
    pub hostname: String,
    /// User namespace mapping.
    pub idmap: IdMap,
    /// Root filesystem.
    pub rootfs: RootfsPlan,
    /// Per-sandbox runtime directory (on the host) for mount points; must exist, mode 0700.
    pub runtime_dir: PathBuf,
    /// Where the agent listens (a host path, invisible inside the sandbox).
    pub agent_socket: PathBuf,
    /// Cgroup directories (one per mounted hierarchy) the sandbox joins; made by the caller.
    pub cgroups: Vec<PathBuf>,
    /// Apply the default seccomp filter (on unless explicitly turned off).
    pub seccomp: bool,
    /// A persisted network namespace (owned by the host's user namespace, loopback up) that
    /// the sandbox joins before entering its user namespace, instead of unsharing one.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// What init writes to the sandbox's `/etc/resolv.conf` (after pivoting into its root).
    #[serde(default)]
    pub resolv_conf: Option<String>,
}
