//! Routes of the audit log (records, verification of the chain) and of exec log export.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path as UrlPath, Query, State};
use axum::response::{IntoResponse, Response};
use devbox_engine::{Caller, Engine, EngineError};
use devbox_wire::query::{AuditQuery, VerifyQuery};
use devbox_wire::{AuditRecord, AuditVerification};

use crate::server::ApiError;

type AppState = Arc<Engine>;
type ApiResult<T> = Result<T, ApiError>;

/// Parses `since`: an RFC 3339 time or a duration ago.
pub fn since_ms(since: &str) -> Result<i64, ApiError> {
    if let Ok(t) = humantime::parse_rfc3339_weak(since) {
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0));
    }
    let ago = humantime::parse_duration(since).map_err(|_| {
        ApiError(EngineError::InvalidRequest(format!(
            "--since {since:?}: give a time (2026-11-28T10:00:00Z) or a duration (1h, 30m)"
        )))
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Ok(now - ago.as_millis() as i64)
}

pub(crate) async fn audit(
    State(e): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Vec<AuditRecord>>> {
    let since = q.since.as_deref().map(since_ms).transpose()?;
    Ok(Json(
        e.audit_log(q.sandbox, since, q.limit.unwrap_or(1000))
            .await?,
    ))
}

pub(crate) async fn verify(
    State(e): State<AppState>,
    Query(q): Query<VerifyQuery>,
) -> ApiResult<Json<AuditVerification>> {
    Ok(Json(e.verify_audit(q.head).await?))
}

pub(crate) async fn export_logs(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    let path = e.export_logs(&caller, &name).await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|err| ApiError(EngineError::internal("export", err)));
    let _ = tokio::fs::remove_file(&path).await;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file?));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/gzip")],
        body,
    )
        .into_response())
}
