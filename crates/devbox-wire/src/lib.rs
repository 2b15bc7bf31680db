//! The wire model of the dev-box API: what travels between a client and the daemon.
//!
//! - [`model`]: requests and responses of sandboxes, execs, snapshots, images and the pool;
//! - [`network`]: a sandbox's network, its live changes and blocked attempts;
//! - [`checks`]: command checks, policies, approvals and the audit log;
//! - [`events`]: events, webhooks' delivery state, active alerts;
//! - [`tokens`]: API tokens for remote callers, their scopes and sandbox patterns;
//! - [`error`]: the error body every failed request answers with;
//! - [`stream`]: the messages of the exec WebSocket;
//! - [`query`]: the query strings of the routes;
//! - [`openapi`]: the OpenAPI document ([`openapi::ApiDoc`]), built from these types alone.
//!
//! This is the only crate that derives OpenAPI schemas. It depends on nothing of the daemon
//! (no engine, SQLite, Rego or runtime), so clients (the CLI, SDK tests, an MCP server) build
//! on it alone. The Sandbox document itself is [`devbox_spec::SandboxManifest`]; its schema is
//! described here ([`spec_schema`]).

pub mod checks;
pub mod error;
pub mod events;
pub mod model;
pub mod network;
pub mod openapi;
pub mod query;
pub mod spec_schema;
pub mod stats;
pub mod stream;
pub mod tokens;

pub use checks::*;
pub use error::{ErrorBody, ErrorDetail, RequestError};
pub use events::*;
pub use model::*;
pub use network::*;
pub use stats::*;
pub use tokens::*;
