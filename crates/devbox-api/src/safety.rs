//! Routes of the safety layer: checks, policies, approvals, the audit log, log export; and
//! the middleware that names the actor of each request.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{ConnectInfo, Path as UrlPath, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use devbox_engine::{ApprovalInfo, Engine, EngineError, PolicyInfo};
use devbox_safety::Check;
use devbox_store::{AuditRecord, AuditVerification};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::server::{ApiError, Body, ErrorBody};

type AppState = Arc<Engine>;
type ApiResult<T> = Result<T, ApiError>;

/// The peer of a Unix-socket connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Its uid, from SO_PEERCRED.
    pub uid: Option<u32>,
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, tokio::net::UnixListener>,
    > for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        Peer {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

fn user_name(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
            })
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// Names the actor of every request (the peer's user, and what it says it acts for in
/// `X-Devbox-Actor`), and refuses peers that are not root.
pub async fn actor_layer(State(engine): State<AppState>, req: Request, next: Next) -> Response {
    let uid = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .and_then(|c| c.0.uid);
    let on_behalf = req
        .headers()
        .get("x-devbox-actor")
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.chars()
                .filter(|c| !c.is_control())
                .take(128)
                .collect::<String>()
        });
    let base = match uid {
        Some(u) => user_name(u),
        None => "local".to_string(),
    };
    let actor = match on_behalf {
        Some(who) if !who.is_empty() => format!("{base} for {who}"),
        _ => base,
    };
    if let Some(u) = uid
        && u != 0
    {
        let path = req.uri().path().to_string();
        let e = engine.clone();
        let _ = devbox_engine::ACTOR
            .scope(actor.clone(), async move {
                e.audit_auth_failure(&path, &format!("uid {u} is not root"))
                    .await
            })
            .await;
        let body = ErrorBody {
            error: crate::server::ErrorDetail {
                code: "forbidden".into(),
                message: "the dev-box API is for root only: run the command with sudo".into(),
                approval: None,
            },
        };
        return (StatusCode::FORBIDDEN, Json(body)).into_response();
    }
    devbox_engine::ACTOR.scope(actor, next.run(req)).await
}

/// Check a command.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CheckRequest {
    /// Shell text.
    pub command: String,
    /// The sandbox whose spec, labels and policies apply (none: global policies only).
    #[serde(default)]
    pub sandbox: Option<String>,
    /// A policy to evaluate as if it were installed (for that sandbox, or globally); nothing
    /// is stored. A policy of the same name in that scope is replaced for this check.
    #[serde(default)]
    pub policy: Option<CandidatePolicy>,
}

/// A policy under test.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CandidatePolicy {
    /// Its name.
    pub name: String,
    /// The Rego text.
    pub rego: String,
}

#[utoipa::path(post, path = "/v1/check", request_body = CheckRequest,
    description = "What the checks decide for a command, and why; nothing runs.",
    responses((status = 200, body = Check), (status = 404, body = ErrorBody)))]
pub(crate) async fn check(
    State(e): State<AppState>,
    Body(req): Body<CheckRequest>,
) -> ApiResult<Json<Check>> {
    let candidate = req.policy.map(|p| devbox_safety::PolicySource {
        name: p.name,
        rego: p.rego,
    });
    Ok(Json(
        e.check_command(req.sandbox, req.command, candidate).await?,
    ))
}

/// Query of policy routes.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ScopeQuery {
    /// A sandbox's policies (none: global policies).
    pub sandbox: Option<String>,
}

#[utoipa::path(get, path = "/v1/policies", params(ScopeQuery), responses((status = 200, body = Vec<PolicyInfo>)))]
pub(crate) async fn list_policies(
    State(e): State<AppState>,
    Query(q): Query<ScopeQuery>,
) -> ApiResult<Json<Vec<PolicyInfo>>> {
    Ok(Json(e.list_policies(q.sandbox).await?))
}

/// Add a policy.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyRequest {
    /// The Rego text; it must define `decision`.
    pub rego: String,
    /// Only for this sandbox (none: global).
    #[serde(default)]
    pub sandbox: Option<String>,
}

#[utoipa::path(put, path = "/v1/policies/{name}", params(("name" = String, Path)), request_body = PolicyRequest,
    description = "Adds or replaces a policy. A global policy named `default` replaces the built-in one.",
    responses((status = 200, body = PolicyInfo), (status = 400, body = ErrorBody)))]
pub(crate) async fn put_policy(
    State(e): State<AppState>,
    UrlPath(name): UrlPath<String>,
    Body(req): Body<PolicyRequest>,
) -> ApiResult<Json<PolicyInfo>> {
    Ok(Json(e.add_policy(name, req.sandbox, req.rego).await?))
}

#[utoipa::path(delete, path = "/v1/policies/{name}", params(("name" = String, Path), ScopeQuery),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_policy(
    State(e): State<AppState>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<ScopeQuery>,
) -> ApiResult<StatusCode> {
    e.remove_policy(name, q.sandbox).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query of GET /v1/approvals.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ApprovalsQuery {
    /// Decided ones too.
    #[serde(default)]
    pub all: bool,
}

#[utoipa::path(get, path = "/v1/approvals", params(ApprovalsQuery), responses((status = 200, body = Vec<ApprovalInfo>)))]
pub(crate) async fn list_approvals(
    State(e): State<AppState>,
    Query(q): Query<ApprovalsQuery>,
) -> ApiResult<Json<Vec<ApprovalInfo>>> {
    Ok(Json(e.approvals(q.all).await?))
}

/// Query of GET /v1/approvals/{id}.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct WaitQuery {
    /// Wait up to this many seconds for a pending approval to be decided.
    #[serde(default)]
    pub wait: Option<u64>,
}

#[utoipa::path(get, path = "/v1/approvals/{id}", params(("id" = String, Path), WaitQuery),
    description = "An approval; with ?wait=N, answers once it is decided or after N seconds.",
    responses((status = 200, body = ApprovalInfo), (status = 404, body = ErrorBody)))]
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

/// Deny an approval.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct DenyRequest {
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
}

#[utoipa::path(post, path = "/v1/approvals/{id}/approve", params(("id" = String, Path)),
    description = "Approves a pending command: it may then run once (a waiting exec stream runs it at once; a REST client re-sends the exec with `approval`).",
    responses((status = 200, body = ApprovalInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn approve(
    State(e): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<ApprovalInfo>> {
    Ok(Json(e.decide(&id, true, None).await?))
}

#[utoipa::path(post, path = "/v1/approvals/{id}/deny", params(("id" = String, Path)), request_body = DenyRequest,
    responses((status = 200, body = ApprovalInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn deny(
    State(e): State<AppState>,
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
    Ok(Json(e.decide(&id, false, req.reason).await?))
}

/// Query of GET /v1/audit.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AuditQuery {
    /// Only this sandbox's records.
    pub sandbox: Option<String>,
    /// Only records since this time (RFC 3339) or this long ago (`1h`, `30m`).
    pub since: Option<String>,
    /// Most records (default 1000), the newest.
    pub limit: Option<usize>,
}

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
    Ok(devbox_store::now_ms() - ago.as_millis() as i64)
}

#[utoipa::path(get, path = "/v1/audit", params(AuditQuery), responses((status = 200, body = Vec<AuditRecord>)))]
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

/// Query of GET /v1/audit/verify.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct VerifyQuery {
    /// A head hash an earlier verify reported, kept elsewhere: the chain must still reach it.
    pub head: Option<String>,
}

#[utoipa::path(get, path = "/v1/audit/verify", params(VerifyQuery),
    description = "Checks every record's hash and link, and that the chain starts where retention's own record says it pruned to; reports the first broken record and the head (the newest record's hash). With `head`, also checks that the chain reaches that head.",
    responses((status = 200, body = AuditVerification), (status = 400, body = ErrorBody)))]
pub(crate) async fn verify(
    State(e): State<AppState>,
    Query(q): Query<VerifyQuery>,
) -> ApiResult<Json<AuditVerification>> {
    Ok(Json(e.verify_audit(q.head).await?))
}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/logs/export", params(("name" = String, Path)),
    description = "A .tar.gz of the sandbox's exec outputs, exec records and audit records.",
    responses((status = 200, content_type = "application/gzip"), (status = 404, body = ErrorBody)))]
pub(crate) async fn export_logs(
    State(e): State<AppState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    let path = e.export_logs(&name).await?;
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
