//! Errors of the engine: each says what went wrong and what to do, and has a stable code.

use std::borrow::Cow;

use devbox_spec::SpecError;

/// An engine error.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No such sandbox or image.
    #[error("no {kind} named {name:?}: {hint}")]
    NotFound {
        /// "sandbox", "image" or "token".
        kind: &'static str,
        /// What was asked for.
        name: String,
        /// What to do.
        hint: &'static str,
    },
    /// The name is taken.
    #[error(
        "a {kind} named {name:?} already exists: pick another name, or remove the existing one first"
    )]
    AlreadyExists {
        /// "sandbox", "image" or "token".
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// The spec or request is invalid.
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] SpecError),
    /// The request is invalid.
    #[error("{0}")]
    InvalidRequest(String),
    /// The sandbox is not in a state that allows the operation.
    #[error("{0}")]
    WrongState(String),
    /// The image is used by sandboxes.
    #[error("image {image:?} is used by sandbox(es) {}: destroy them first", sandboxes.join(", "))]
    ImageInUse {
        /// The image.
        image: String,
        /// Who uses it.
        sandboxes: Vec<String>,
    },
    /// The storage pool is full.
    #[error("{0}")]
    PoolFull(String),
    /// The command could not start in the sandbox (not found, not permitted, bad user).
    #[error("{0}")]
    ExecFailed(String),
    /// The command checks refused the command.
    #[error("the command was denied: {}", reasons.join("; "))]
    Denied {
        /// Why.
        reasons: Vec<String>,
    },
    /// The command needs someone's approval before it runs.
    #[error("the command needs approval {}: {} (approve it with `sandbox approve {}`)", .0.id, .0.reasons.join("; "), .0.id)]
    ApprovalRequired(Box<crate::checks::ApprovalInfo>),
    /// Processes could not be checkpointed or restored (CRIU); says why.
    #[error("{0}")]
    Checkpoint(String),
    /// Something failed on the host: what was being done, and the real error.
    #[error("{}", internal_message(.context, .source))]
    Internal {
        /// What was being done (empty when the cause says it all).
        context: Cow<'static, str>,
        /// What failed.
        #[source]
        source: InternalSource,
    },
}

/// The cause of an [`EngineError::Internal`], typed.
#[derive(Debug, thiserror::Error)]
pub enum InternalSource {
    /// A file or system call failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The state database failed.
    #[error("{0}")]
    Store(#[from] devbox_store::StoreError),
    /// The backend failed.
    #[error("{0}")]
    Backend(#[from] devbox_backend::BackendError),
    /// The storage pool failed.
    #[error("{0}")]
    Storage(#[from] devbox_storage::StorageError),
    /// The image store failed.
    #[error("{0}")]
    Image(#[from] devbox_image::ImageError),
    /// Stored or written JSON could not be read or made.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// The host's network plumbing for sandboxes failed.
    #[error("{0}")]
    Network(#[from] devbox_net::NetError),
    /// A task of the engine panicked or was cancelled.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
    /// A step of the engine failed (finishing an interrupted operation, say).
    #[error("{0}")]
    Engine(#[from] Box<EngineError>),
    /// An operation a crash interrupted had not got far enough to be finished: nothing of
    /// it was done (reconcile drops what it left).
    #[error("{0}")]
    Incomplete(String),
    /// Something the engine keeps true was not (a missing file, an answer missing a part).
    #[error("{0}")]
    Invariant(Cow<'static, str>),
}

fn internal_message(context: &str, source: &InternalSource) -> String {
    if context.is_empty() {
        source.to_string()
    } else {
        format!("{context}: {source}")
    }
}

impl EngineError {
    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::AlreadyExists { .. } => "already_exists",
            Self::InvalidSpec(_) => "invalid_spec",
            Self::InvalidRequest(_) => "invalid_request",
            Self::WrongState(_) => "wrong_state",
            Self::ImageInUse { .. } => "image_in_use",
            Self::PoolFull(_) => "pool_full",
            Self::ExecFailed(_) => "exec_failed",
            Self::Denied { .. } => "denied",
            Self::ApprovalRequired(_) => "approval_required",
            Self::Checkpoint(_) => "checkpoint_failed",
            Self::Internal { .. } => "internal",
        }
    }

    pub(crate) fn sandbox_not_found(name: &str) -> Self {
        Self::NotFound {
            kind: "sandbox",
            name: name.to_string(),
            hint: "see `sandbox ls` for the sandboxes that exist",
        }
    }

    pub(crate) fn image_not_found(name: &str) -> Self {
        Self::NotFound {
            kind: "image",
            name: name.to_string(),
            hint: "see `sandbox image ls`, or import one with `sandbox image import`",
        }
    }

    /// An internal error: what was being done, and the error that stopped it.
    pub fn internal(
        context: impl Into<Cow<'static, str>>,
        source: impl Into<InternalSource>,
    ) -> Self {
        Self::Internal {
            context: context.into(),
            source: source.into(),
        }
    }

    /// A broken invariant: something the engine keeps true was not (says what).
    pub fn invariant(what: impl Into<Cow<'static, str>>) -> Self {
        Self::internal("", InternalSource::Invariant(what.into()))
    }
}

impl From<devbox_store::StoreError> for EngineError {
    fn from(e: devbox_store::StoreError) -> Self {
        Self::internal("state database", e)
    }
}

impl From<devbox_backend::BackendError> for EngineError {
    fn from(e: devbox_backend::BackendError) -> Self {
        use devbox_backend::{BackendError as B, ExecFailure as F};
        match e {
            B::Unsupported(m) => Self::InvalidRequest(m),
            B::Checkpoint(m) => Self::Checkpoint(m),
            B::Exec {
                kind: F::BadRequest,
                message,
            } => Self::InvalidRequest(message),
            e @ B::Exec {
                kind: F::Internal, ..
            } => Self::internal("", e),
            B::Exec { message, .. } => Self::ExecFailed(message),
            other @ (B::Failed { .. } | B::Other(_) | B::Interrupted) => Self::internal("", other),
        }
    }
}

impl From<devbox_storage::StorageError> for EngineError {
    fn from(e: devbox_storage::StorageError) -> Self {
        match e {
            devbox_storage::StorageError::Full { .. } => Self::PoolFull(e.to_string()),
            other => Self::internal("storage", other),
        }
    }
}

impl From<devbox_image::ImageError> for EngineError {
    fn from(e: devbox_image::ImageError) -> Self {
        use devbox_image::ImageError as E;
        match e {
            E::Storage(s) => s.into(),
            e if e.is_full() => Self::PoolFull(e.to_string()),
            e @ (E::Hostile { .. } | E::Corrupt(_) | E::Format(_)) => {
                Self::InvalidRequest(e.to_string())
            }
            other => Self::internal("image", other),
        }
    }
}

impl From<devbox_wire::RequestError> for EngineError {
    fn from(e: devbox_wire::RequestError) -> Self {
        Self::InvalidRequest(e.0)
    }
}
