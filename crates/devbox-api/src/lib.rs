//! The REST API of dev-box, and its client.
//!
//! - [`server`]: axum routes over the [`devbox_engine::Engine`], served on a Unix socket;
//!   errors map to HTTP statuses with a JSON body `{"error": {"code", "message"}}`.
//! - [`ws`]: streaming exec over WebSocket; [`wire`] defines its messages.
//! - [`openapi`]: the OpenAPI document.
//! - [`client`]: a typed client over the Unix socket, used by the CLI.

pub mod client;
pub mod openapi;
pub mod safety;
pub mod server;
pub mod wire;
mod ws;

pub use server::{router, serve_unix};
