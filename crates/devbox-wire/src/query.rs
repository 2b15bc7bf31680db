//! Query strings of the API's routes. Optional parameters are documented as nullable, as the
//! document has always shown them.

use serde::Deserialize;
use utoipa::IntoParams;

/// Query of DELETE /v1/sandboxes/{name}.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DestroyQuery {
    /// Kill at once instead of a graceful stop.
    #[serde(default)]
    pub force: bool,
}

/// Query of DELETE .../snapshots/{snapshot}.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteSnapshotQuery {
    /// Delete even if sandboxes were cloned from it.
    #[serde(default)]
    pub force: bool,
}

/// Query of GET .../diff.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DiffQuery {
    /// The older state: a snapshot, `latest`, or `image` (default: the head snapshot).
    #[param(nullable)]
    pub from: Option<String>,
    /// The newer state: a snapshot, `latest`, or `current` (default).
    #[param(nullable)]
    pub to: Option<String>,
}

/// Query of POST /v1/snapshots/import.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImportSnapshotQuery {
    /// Name of the new sandbox (default: the name in the archive).
    #[param(nullable)]
    pub name: Option<String>,
    /// Start it.
    #[serde(default)]
    pub start: bool,
}

/// Query of policy routes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ScopeQuery {
    /// A sandbox's policies (none: global policies).
    #[param(nullable)]
    pub sandbox: Option<String>,
}

/// Query of GET /v1/approvals.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ApprovalsQuery {
    /// Decided ones too.
    #[serde(default)]
    pub all: bool,
}

/// Query of GET /v1/approvals/{id}.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Wait up to this many seconds for a pending approval to be decided.
    #[serde(default)]
    #[param(nullable)]
    pub wait: Option<u64>,
}

/// Query of GET /v1/audit.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only this sandbox's records.
    #[param(nullable)]
    pub sandbox: Option<String>,
    /// Only records since this time (RFC 3339) or this long ago (`1h`, `30m`).
    #[param(nullable)]
    pub since: Option<String>,
    /// Most records (default 1000), the newest.
    #[param(nullable)]
    pub limit: Option<usize>,
}

/// Query of GET /v1/sandboxes/{name}/network/log.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NetworkLogQuery {
    /// Most entries (default 100), the newest.
    #[param(nullable)]
    pub limit: Option<usize>,
}

/// Query of GET /v1/audit/verify.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VerifyQuery {
    /// A head hash an earlier verify reported, kept elsewhere: the chain must still reach it.
    #[param(nullable)]
    pub head: Option<String>,
}
