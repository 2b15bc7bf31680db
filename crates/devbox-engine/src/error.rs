//! Errors of the engine: each says what went wrong and what to do, and has a stable code.

use devbox_spec::SpecError;

/// An engine error.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No such sandbox or image.
    #[error("no {kind} named {name:?}: {hint}")]
    NotFound {
        /// "sandbox" or "image".
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
        /// "sandbox" or "image".
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
    /// Something failed on the host.
    #[error("{0}")]
    Internal(String),
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
            Self::Internal(_) => "internal",
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

    /// An internal error with what was being done.
    pub fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{context}: {e}"))
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
            B::Exec {
                kind: F::Internal,
                message,
            } => Self::Internal(message),
            B::Exec { message, .. } => Self::ExecFailed(message),
            other @ (B::Failed { .. } | B::Other(_) | B::Interrupted) => {
                Self::Internal(other.to_string())
            }
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
