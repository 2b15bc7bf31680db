//! Routes of monitoring: resource use (`/v1/stats`, `/v1/sandboxes/{name}/stats`), the
//! processes inside a sandbox (`/v1/sandboxes/{name}/ps`) and Prometheus metrics (`/metrics`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use devbox_engine::{Engine, METRICS_CONTENT_TYPE};
use devbox_wire::{ProcessList, SandboxStats, StatsQuery};

use crate::server::ApiError;

type AppState = Arc<Engine>;
type ApiResult<T> = Result<T, ApiError>;

pub(crate) async fn stats(
    State(e): State<AppState>,
    Query(q): Query<StatsQuery>,
) -> ApiResult<Json<Vec<SandboxStats>>> {
    let names: Vec<String> = q
        .names
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    Ok(Json(e.stats(names, q.running).await?))
}

pub(crate) async fn sandbox_stats(
    State(e): State<AppState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<SandboxStats>> {
    Ok(Json(e.sandbox_stats(&name).await?))
}

pub(crate) async fn ps(
    State(e): State<AppState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<ProcessList>> {
    Ok(Json(e.processes(&name).await?))
}

pub(crate) async fn metrics(State(e): State<AppState>) -> ApiResult<impl IntoResponse> {
    let text = e.metrics_text().await?;
    Ok(([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text))
}
