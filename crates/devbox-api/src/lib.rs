//! The REST API of dev-box: a front end that translates HTTP and WebSocket to the engine's
//! calls. Requests, responses and the OpenAPI document are the wire model's
//! ([`devbox_wire`]); the typed client is the `devbox-client` crate.
//!
//! - [`server`]: axum routes over the [`devbox_engine::Engine`], served on a Unix socket
//!   (and on TCP, [`remote`]);
//!   errors map to HTTP statuses with a JSON body `{"error": {"code", "message"}}`.
//! - [`auth`]: the caller check: root, or a member of a configured group within its scopes
//!   (read, exec, approve, admin); who calls (and for whom) is the engine's
//!   [`devbox_engine::Caller`].
//! - [`checks`]: command checks, policies and approvals; [`audit`]: the audit log and exec
//!   log export; [`network`]: a sandbox's network, its live changes and blocked attempts.
//! - [`remote`]: the TCP listener (TLS), bearer tokens, their scopes, sandbox patterns,
//!   rate limits and exec caps; `tokens`: making, listing and revoking tokens.
//! - `ws`: streaming exec over WebSocket ([`devbox_wire::stream`] defines its messages).

pub mod audit;
pub mod auth;
pub mod checks;
pub mod monitoring;
pub mod network;
pub mod remote;
pub mod server;
mod tokens;
mod ws;

pub use auth::{Access, GroupAccess, Scope};
pub use remote::{RemoteLimits, RemoteListener, bind_tcp, serve_tcp, tls_config};
pub use server::{router, router_with, serve_unix};
