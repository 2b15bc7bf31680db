//! The error body of every failed request.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::checks::ApprovalInfo;

/// The error body of every failed request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What failed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code: not_found, already_exists, invalid_spec, invalid_request, wrong_state,
    /// image_in_use, pool_full, exec_failed, internal.
    pub code: String,
    /// What went wrong and what to do.
    pub message: String,
    /// The approval the command waits for (code `approval_required`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalInfo>,
}

/// A request that does not make sense as given (the server answers `invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);
