//! Messages of the exec WebSocket protocol, shared by server and client.
//!
//! After the upgrade, the client sends one text message: [`ClientMsg::Exec`] (on
//! `/v1/sandboxes/{name}/exec/stream`) or [`ClientMsg::Run`] (on `/v1/run/stream`). The server
//! answers [`ServerMsg::Started`] or [`ServerMsg::Error`]. Then:
//!
//! - binary frames from the client are stdin bytes; from the server they start with a
//!   channel byte, [`STDOUT`] or [`STDERR`], followed by output bytes (a tty exec uses
//!   [`STDOUT`] only);
//! - text frames carry [`ClientMsg::StdinEof`], [`ClientMsg::Resize`], [`ClientMsg::Signal`]
//!   from the client, and finally [`ServerMsg::Exit`] from the server, which then closes.

use crate::checks::ApprovalInfo;
use crate::model::{CreateSandboxRequest, ExecRequest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Channel byte of stdout frames.
pub const STDOUT: u8 = 1;
/// Channel byte of stderr frames.
pub const STDERR: u8 = 2;

/// A text message from the client.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// Start a command in an existing sandbox.
    Exec {
        /// The command.
        exec: ExecRequest,
        /// Whether the client will send stdin.
        #[serde(default)]
        stdin: bool,
        /// When the command needs an approval: answer with it (`approval_required`) and
        /// leave it pending instead of waiting; once approved, exec again with its id in
        /// `exec.approval`.
        #[serde(default)]
        no_wait: bool,
    },
    /// Create a sandbox, run one command in it, destroy it.
    Run {
        /// The sandbox (its name may be omitted).
        sandbox: Box<CreateSandboxRequest>,
        /// The command.
        exec: ExecRequest,
        /// Whether the client will send stdin.
        #[serde(default)]
        stdin: bool,
    },
    /// No more stdin.
    StdinEof,
    /// The terminal was resized.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Send a signal to the command.
    Signal {
        /// Signal number.
        signal: i32,
    },
}

/// A text message from the server.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// The command runs.
    Started {
        /// Sandbox name.
        sandbox: String,
        /// Pid inside the sandbox.
        pid: i32,
    },
    /// The command ended.
    Exit {
        /// Exit code.
        code: i32,
        /// Killing signal, if any.
        signal: Option<i32>,
        /// The snapshot the sandbox was rolled back to because the command failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rolled_back_to: Option<String>,
        /// The timeout ended it (exit code 124).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        timed_out: bool,
        /// The OOM killer killed it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        oom_killed: bool,
    },
    /// The command waits for someone's approval (`sandbox approve ID`); the stream goes on
    /// once it is decided.
    ApprovalRequired {
        /// The approval.
        approval: ApprovalInfo,
    },
    /// The request failed.
    Error {
        /// Stable error code.
        code: String,
        /// What went wrong and what to do.
        message: String,
    },
}
