//! Routes of a sandbox's network: its state, live changes and blocked attempts.

use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State};
use axum::{Extension, Json};
use devbox_engine::{Caller, Engine};
use devbox_wire::query::NetworkLogQuery;
use devbox_wire::{BlockedAttempt, NetworkInfo, NetworkRulesRequest};

use crate::server::{ApiError, Body};

type AppState = Arc<Engine>;
type ApiResult<T> = Result<T, ApiError>;

pub(crate) async fn status(
    State(e): State<AppState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<NetworkInfo>> {
    Ok(Json(e.network_status(&name).await?))
}

pub(crate) async fn allow(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    Body(req): Body<NetworkRulesRequest>,
) -> ApiResult<Json<NetworkInfo>> {
    Ok(Json(e.network_allow(&caller, &name, req.rules).await?))
}

pub(crate) async fn deny(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    Body(req): Body<NetworkRulesRequest>,
) -> ApiResult<Json<NetworkInfo>> {
    Ok(Json(e.network_deny(&caller, &name, req.rules).await?))
}

pub(crate) async fn reset(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<NetworkInfo>> {
    Ok(Json(e.network_reset(&caller, &name).await?))
}

pub(crate) async fn log(
    State(e): State<AppState>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<NetworkLogQuery>,
) -> ApiResult<Json<Vec<BlockedAttempt>>> {
    Ok(Json(e.network_log(&name, q.limit).await?))
}
