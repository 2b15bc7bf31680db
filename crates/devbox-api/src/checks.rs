//! Routes of the command checks: checking a command, policies, approvals.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use devbox_engine::{Caller, Engine, EngineError};
use devbox_wire::query::{ApprovalsQuery, ScopeQuery, WaitQuery};
use devbox_wire::{ApprovalInfo, Check, CheckRequest, DenyRequest, PolicyInfo, PolicyRequest};

use crate::server::{ApiError, Body};

type AppState = Arc<Engine>;
type ApiResult<T> = Result<T, ApiError>;

pub(crate) async fn check(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    Body(req): Body<CheckRequest>,
) -> ApiResult<Json<Check>> {
    Ok(Json(
        e.check_command(&caller, req.sandbox, req.command, req.policy)
            .await?,
    ))
}

pub(crate) async fn list_policies(
    State(e): State<AppState>,
    Query(q): Query<ScopeQuery>,
) -> ApiResult<Json<Vec<PolicyInfo>>> {
    Ok(Json(e.list_policies(q.sandbox).await?))
}

pub(crate) async fn put_policy(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    Body(req): Body<PolicyRequest>,
) -> ApiResult<Json<PolicyInfo>> {
    Ok(Json(
        e.add_policy(&caller, name, req.sandbox, req.rego).await?,
    ))
}

pub(crate) async fn delete_policy(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<ScopeQuery>,
) -> ApiResult<StatusCode> {
    e.remove_policy(&caller, name, q.sandbox).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn list_approvals(
    State(e): State<AppState>,
    Query(q): Query<ApprovalsQuery>,
) -> ApiResult<Json<Vec<ApprovalInfo>>> {
    Ok(Json(e.approvals(q.all).await?))
}

pub(crate) async fn get_approval(
    State(e): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<Json<ApprovalInfo>> {
    Ok(Json(match q.wait {
        Some(s) => {
            e.wait_approval(&id, Duration::from_secs(s.min(3600)))
                .await?
        }
        None => e.approval(&id).await?,
    }))
}

pub(crate) async fn approve(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<ApprovalInfo>> {
    Ok(Json(e.decide(&caller, &id, true, None).await?))
}

pub(crate) async fn deny(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
    body: bytes::Bytes,
) -> ApiResult<Json<ApprovalInfo>> {
    let req: DenyRequest = if body.iter().all(u8::is_ascii_whitespace) {
        DenyRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|err| {
            ApiError(EngineError::InvalidRequest(format!(
                "invalid request body: {err}"
            )))
        })?
    };
    Ok(Json(e.decide(&caller, &id, false, req.reason).await?))
}
