//! Events (the audit log as a stream), webhooks' delivery state and alerts, as the API
//! shows them.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// One event: an audit record with its kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// The audit record's sequence number: increasing, no two alike (SSE `id:`).
    pub id: i64,
    /// When (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// The sandbox concerned, if any.
    pub sandbox: Option<String>,
    /// What kind of event: lifecycle, exec, snapshot, rollback, limit, network, approval,
    /// policy, health, alert, idle, image, auth, audit, or the action's first word.
    pub kind: String,
    /// The audit action (`sandbox.create`, `exec`, `limit.oom`, `alert.firing`, ...).
    pub action: String,
    /// Who caused it (`root`, `root for NAME`, `monitor`, ...).
    pub caller: String,
    /// The audit record's details.
    pub details: serde_json::Value,
}

/// Query of GET /v1/events.
#[derive(Debug, Default, Clone, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only this sandbox's events.
    #[param(nullable)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Only events since this time (RFC 3339) or this long ago (`10m`, `1h`).
    #[param(nullable)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Only events of these kinds (comma-separated: `alert,limit`).
    #[param(nullable)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Keep the response open and stream new events (Server-Sent Events).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow: bool,
    /// Most past events (default 1000), the newest; a stream sends them all.
    #[param(nullable)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// A webhook's delivery state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WebhookStatus {
    /// Where events go (userinfo, query and fragment left out).
    pub url: String,
    /// Only events of these kinds (empty: all).
    pub kinds: Vec<String>,
    /// Only events of these sandboxes (empty: all).
    pub sandboxes: Vec<String>,
    /// Events delivered (answered 2xx).
    pub delivered: u64,
    /// Events given up on after every retry.
    pub failed: u64,
    /// Events dropped unsent because the queue was full (the oldest go first).
    pub dropped: u64,
    /// Events waiting in the queue now.
    pub queued: u64,
    /// The last failed attempt's error.
    pub last_error: Option<String>,
    /// When that was (RFC 3339).
    pub last_error_at: Option<String>,
    /// The last delivery (RFC 3339).
    pub last_success_at: Option<String>,
}

/// An alert that fires now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActiveAlert {
    /// The rule: memory, disk, exec_duration, denied_commands, unhealthy.
    pub rule: String,
    /// The value that made it fire.
    pub value: serde_json::Value,
    /// The rule's threshold.
    pub threshold: serde_json::Value,
    /// Since when (RFC 3339).
    pub since: String,
}
