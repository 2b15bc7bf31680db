//! Routes of monitoring: resource use (`/v1/stats`, `/v1/sandboxes/{name}/stats`), the
//! processes inside a sandbox (`/v1/sandboxes/{name}/ps`), Prometheus metrics (`/metrics`),
//! events (`/v1/events`, JSON or Server-Sent Events) and webhooks' state (`/v1/webhooks`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use devbox_engine::{Engine, EngineError, EventFilter, METRICS_CONTENT_TYPE, StreamItem};
use devbox_wire::{EventsQuery, ProcessList, SandboxStats, StatsQuery, WebhookStatus};

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

/// How often an idle event stream sends a keep-alive comment.
const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// `GET /v1/events`: past events as JSON, or Server-Sent Events with `follow=true` or
/// `Accept: text/event-stream` (resumed after `Last-Event-ID`).
pub(crate) async fn events(
    State(e): State<AppState>,
    headers: axum::http::HeaderMap,
    Query(q): Query<EventsQuery>,
) -> ApiResult<axum::response::Response> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    let since = q.since.as_deref().map(crate::audit::since_ms).transpose()?;
    let filter = EventFilter::new(q.sandbox, since, q.kind.as_deref());
    let wants_stream = q.follow
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/event-stream"));
    if !wants_stream {
        // At most 10,000 a call (page with `since`), however many are asked for.
        let limit = q.limit.unwrap_or(1000).min(10_000);
        return Ok(Json(e.events(filter, limit).await?).into_response());
    }
    let after = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    ApiError(EngineError::InvalidRequest(
                        "Last-Event-ID is not an event id: give the id: of the last event received"
                            .into(),
                    ))
                })?,
        ),
    };
    let stream = e.event_stream(filter, after).await?;
    drop(e);
    let body = futures_util::stream::unfold(Some(stream), |state| async move {
        let mut stream = state?;
        let item = match stream.next().await {
            Ok(Some(StreamItem::Event(ev))) => SseEvent::default()
                .id(ev.id.to_string())
                .json_data(&*ev)
                .unwrap_or_else(|_| SseEvent::default().comment("unencodable event")),
            Ok(Some(StreamItem::Lagged(n))) => SseEvent::default().event("lagged").data(
                serde_json::json!({"missed": n, "note": "the missed events follow"}).to_string(),
            ),
            Ok(None) => return None,
            Err(err) => {
                return Some((
                    Ok::<_, std::convert::Infallible>(
                        SseEvent::default()
                            .event("error")
                            .data(serde_json::json!({"message": err.to_string()}).to_string()),
                    ),
                    None,
                ));
            }
        };
        Some((Ok(item), Some(stream)))
    });
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// `GET /v1/webhooks`: the webhooks and their delivery state.
pub(crate) async fn webhooks(State(e): State<AppState>) -> Json<Vec<WebhookStatus>> {
    Json(e.webhooks())
}
