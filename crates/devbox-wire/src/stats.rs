//! Monitoring: resource use of sandboxes (`GET /v1/stats`, `GET /v1/sandboxes/{name}/stats`)
//! and the processes inside one (`GET /v1/sandboxes/{name}/ps`).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::SandboxState;

/// Resource use of one sandbox at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxStats {
    /// Its name.
    pub name: String,
    /// Its id.
    pub id: String,
    /// Its state (use is reported for running sandboxes only; the rest are zeros).
    pub state: SandboxState,
    /// CPU use in percent of one CPU (200 = two full CPUs), averaged over `cpu_window_ms`;
    /// none for a sandbox that does not run.
    pub cpu_percent: Option<f64>,
    /// The window `cpu_percent` is averaged over, in milliseconds.
    pub cpu_window_ms: u64,
    /// CPU time consumed since it started, microseconds.
    pub cpu_usec: u64,
    /// Memory charged to it, bytes.
    pub memory_bytes: u64,
    /// Its memory limit, bytes.
    pub memory_limit_bytes: u64,
    /// The most memory charged at once since it started, bytes (0 if the kernel does not tell).
    pub memory_peak_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// Its pids limit.
    pub pids_limit: u64,
    /// Processes the OOM killer killed in it.
    pub oom_kills: u64,
    /// Bytes its writable layer holds as its disk quota counts them (none without a quota).
    pub disk_used_bytes: Option<u64>,
    /// Its disk quota, bytes (none without one).
    pub disk_limit_bytes: Option<u64>,
    /// Bytes its network link received for it (none without a network link).
    pub net_rx_bytes: Option<u64>,
    /// Bytes its network link carried out of it (none without a network link).
    pub net_tx_bytes: Option<u64>,
}

/// Which sandboxes `GET /v1/stats` reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsQuery {
    /// Comma-separated names (none: every sandbox).
    pub names: Option<String>,
    /// Running sandboxes only.
    #[serde(default)]
    pub running: bool,
}

/// How a process was tied to an exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    /// It is in the exec's own cgroup (an exec with a timeout): certain, whatever it did.
    Cgroup,
    /// It is the exec's command itself.
    Exec,
    /// It is in the session the exec's command leads (each exec starts one).
    Session,
    /// One of its ancestors is the exec's command.
    Ancestry,
    /// The sandbox's pid 1 (its agent), or its main process.
    Init,
    /// None of the above: it left the exec's session and was orphaned, or its exec has
    /// ended or was started by another daemon.
    Unknown,
}

/// One process inside a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProcessRow {
    /// Pid inside the sandbox's pid namespace (none if it could not be read).
    pub pid: Option<i32>,
    /// Pid of its parent inside the sandbox (none if its parent is outside or unknown).
    pub ppid: Option<i32>,
    /// Host pid.
    pub host_pid: i32,
    /// Uid inside the sandbox (none if the host uid is outside the sandbox's range).
    pub uid: Option<u32>,
    /// CPU time (user + system), microseconds.
    pub cpu_usec: u64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// Its command line, control characters escaped (`\n`, `\x1b`), at most 1024 characters
    /// of the first 4096 bytes (cut ones end in `…`); `[name]` for one without.
    pub command: String,
    /// The exec it belongs to (its id, as in its `exec` audit record), when known.
    pub exec: Option<String>,
    /// How it was tied to that exec.
    pub attribution: Attribution,
}

/// The processes inside one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProcessList {
    /// The sandbox's name.
    pub sandbox: String,
    /// Its processes, by pid inside.
    pub processes: Vec<ProcessRow>,
}
