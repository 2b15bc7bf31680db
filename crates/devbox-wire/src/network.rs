//! A sandbox's network: what `GET /v1/sandboxes/{name}/network` shows, the live changes
//! (`POST .../network/allow`, `.../deny`, `.../reset`) and the blocked attempts
//! (`GET .../network/log`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Rules to add (`allow`, `deny`): each as in the spec (`pypi.org`, `*.npmjs.org`,
/// `10.1.2.0/24:443`, `[2001:db8::/32]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkRulesRequest {
    /// The rules.
    pub rules: Vec<String>,
}

/// Packets and names a sandbox's network handled, counted since it was attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkCounters {
    /// DNS questions answered.
    pub dns_answered: u64,
    /// DNS questions refused (a name no rule allows).
    pub dns_refused: u64,
    /// Connections refused (an address no rule allows, or one a rule denies).
    pub conns_blocked: u64,
    /// Bytes the sandbox sent out.
    pub bytes_out: u64,
    /// Bytes the sandbox received.
    pub bytes_in: u64,
}

/// An address that an allowed name resolved to, reachable for a while.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AllowedAddress {
    /// The address.
    pub address: String,
    /// The name it answered for, or the rule that allows it.
    pub because: String,
    /// Seconds until it is no longer reachable (none: as long as the rule stands).
    pub seconds_left: Option<u64>,
}

/// A sandbox's network now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkInfo {
    /// The sandbox.
    pub sandbox: String,
    /// `none` (loopback only), `allow` (only what `allow` lists) or `open` (all but `deny`).
    pub mode: String,
    /// Allow rules in force.
    pub allow: Vec<String>,
    /// Deny rules in force.
    pub deny: Vec<String>,
    /// Published ports (`[ADDR:]HOST:SANDBOX`).
    pub ports: Vec<String>,
    /// The rules differ from the spec's (live changes; `reset` undoes them).
    pub changed: bool,
    /// The sandbox's address (modes allow and open, while it runs).
    pub address: Option<String>,
    /// Whether the network is attached now (the sandbox runs with it).
    pub attached: bool,
    /// Counters (while attached).
    pub counters: NetworkCounters,
    /// Addresses allowed names resolved to.
    #[serde(default)]
    pub allowed_now: Vec<AllowedAddress>,
}

/// One blocked attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BlockedAttempt {
    /// When (RFC 3339).
    pub time: String,
    /// `dns` (a name was refused) or `connect` (a connection was refused).
    pub kind: String,
    /// The name, or `address:port`, tried.
    pub target: String,
    /// How many times in a row (attempts at the same target are recorded together).
    pub count: u64,
}
