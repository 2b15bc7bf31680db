//! The HTTP server: routes, handlers and error mapping. Handlers are thin: they parse, call
//! the engine, and shape the answer.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{Extension, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use devbox_engine::{Caller, Engine, EngineError};
use devbox_wire::query::{DeleteSnapshotQuery, DestroyQuery, DiffQuery, ImportSnapshotQuery};
use devbox_wire::{
    CloneRequest, CreateSandboxRequest, DiffResult, ErrorBody, ErrorDetail, ExecRequest,
    ExecResult, ImageInfo, ImportImageRequest, PoolInfo, RollbackRequest, SandboxInfo,
    SnapshotInfo, SnapshotRequest, StopRequest, UpdateLimitsRequest, VersionInfo,
};

use crate::ws;

/// An engine error as an HTTP response.
#[derive(Debug)]
pub struct ApiError(pub EngineError);

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        Self(e)
    }
}

/// The HTTP status of an engine error.
pub fn status_of(e: &EngineError) -> StatusCode {
    match e {
        EngineError::NotFound { .. } => StatusCode::NOT_FOUND,
        EngineError::AlreadyExists { .. }
        | EngineError::WrongState(_)
        | EngineError::ImageInUse { .. } => StatusCode::CONFLICT,
        EngineError::InvalidSpec(_) | EngineError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
        EngineError::Denied { .. } => StatusCode::FORBIDDEN,
        EngineError::ApprovalRequired(_) => StatusCode::ACCEPTED,
        EngineError::ExecFailed(_) => StatusCode::UNPROCESSABLE_ENTITY,
        EngineError::Checkpoint(_) => StatusCode::UNPROCESSABLE_ENTITY,
        EngineError::PoolFull(_) => StatusCode::INSUFFICIENT_STORAGE,
        EngineError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(&self.0);
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("{}", self.0);
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.0.code().into(),
                message: self.0.to_string(),
                approval: match &self.0 {
                    EngineError::ApprovalRequired(a) => Some((**a).clone()),
                    _ => None,
                },
            },
        };
        (status, Json(body)).into_response()
    }
}

/// A JSON body that reports bad JSON in the API's error shape.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = bytes::Bytes::from_request(req, state).await.map_err(|e| {
            ApiError(EngineError::InvalidRequest(format!(
                "unreadable request body: {e}"
            )))
        })?;
        let value: T = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError(EngineError::InvalidRequest(format!(
                "invalid request body: {e}"
            )))
        })?;
        Ok(Body(value))
    }
}

type AppState = Arc<Engine>;
type ApiResult<T> = Result<T, ApiError>;

/// The API's routes over an engine, for root callers only.
pub fn router(engine: Arc<Engine>) -> Router {
    router_with(engine, crate::auth::Access::default())
}

/// The API's routes over an engine, for root and whom `access` admits.
pub fn router_with(engine: Arc<Engine>, access: crate::auth::Access) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/version", get(version))
        .route("/v1/sandboxes", get(list_sandboxes).post(create_sandbox))
        .route(
            "/v1/sandboxes/{name}",
            get(inspect_sandbox).delete(destroy_sandbox),
        )
        .route("/v1/sandboxes/{name}/start", post(start_sandbox))
        .route("/v1/sandboxes/{name}/stop", post(stop_sandbox))
        .route(
            "/v1/sandboxes/{name}/limits",
            axum::routing::patch(update_limits).post(update_limits),
        )
        .route("/v1/sandboxes/{name}/exec", post(exec))
        .route("/v1/sandboxes/{name}/exec/stream", get(ws::exec_stream))
        .route("/v1/run/stream", get(ws::run_stream))
        .route(
            "/v1/sandboxes/{name}/snapshots",
            get(list_snapshots).post(take_snapshot),
        )
        .route(
            "/v1/sandboxes/{name}/snapshots/{snapshot}",
            axum::routing::delete(delete_snapshot),
        )
        .route(
            "/v1/sandboxes/{name}/snapshots/{snapshot}/export",
            get(export_snapshot),
        )
        .route("/v1/snapshots/import", post(import_snapshot))
        .route("/v1/sandboxes/{name}/rollback", post(rollback))
        .route("/v1/sandboxes/{name}/clone", post(clone_sandbox))
        .route("/v1/sandboxes/{name}/diff", get(diff))
        .route("/v1/stats", get(crate::monitoring::stats))
        .route(
            "/v1/sandboxes/{name}/stats",
            get(crate::monitoring::sandbox_stats),
        )
        .route("/v1/sandboxes/{name}/ps", get(crate::monitoring::ps))
        .route("/metrics", get(crate::monitoring::metrics))
        .route("/v1/events", get(crate::monitoring::events))
        .route("/v1/webhooks", get(crate::monitoring::webhooks))
        .route("/v1/sandboxes/{name}/network", get(crate::network::status))
        .route(
            "/v1/sandboxes/{name}/network/allow",
            post(crate::network::allow),
        )
        .route(
            "/v1/sandboxes/{name}/network/deny",
            post(crate::network::deny),
        )
        .route(
            "/v1/sandboxes/{name}/network/reset",
            post(crate::network::reset),
        )
        .route("/v1/sandboxes/{name}/network/log", get(crate::network::log))
        .route("/v1/images", get(list_images))
        .route("/v1/images/import", post(import_image))
        .route(
            "/v1/images/{reference}",
            axum::routing::delete(remove_image),
        )
        .route("/v1/pool", get(pool_info))
        .route("/v1/check", post(crate::checks::check))
        .route("/v1/policies", get(crate::checks::list_policies))
        .route(
            "/v1/policies/{name}",
            axum::routing::put(crate::checks::put_policy).delete(crate::checks::delete_policy),
        )
        .route("/v1/approvals", get(crate::checks::list_approvals))
        .route("/v1/approvals/{id}", get(crate::checks::get_approval))
        .route("/v1/approvals/{id}/approve", post(crate::checks::approve))
        .route("/v1/approvals/{id}/deny", post(crate::checks::deny))
        .route("/v1/audit", get(crate::audit::audit))
        .route("/v1/audit/verify", get(crate::audit::verify))
        .route(
            "/v1/sandboxes/{name}/logs/export",
            get(crate::audit::export_logs),
        )
        .route(
            "/v1/tokens",
            get(crate::tokens::list).post(crate::tokens::create),
        )
        .route(
            "/v1/tokens/{name}",
            axum::routing::delete(crate::tokens::revoke),
        )
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(crate::auth::Guard::new(engine.clone(), access)),
            crate::auth::caller_layer,
        ))
        .with_state(engine)
}

async fn openapi() -> Json<devbox_wire::openapi::Document> {
    Json(devbox_wire::openapi::document())
}

async fn version(State(e): State<AppState>) -> Json<VersionInfo> {
    Json(VersionInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        api: "v1".into(),
        cgroups: e.cgroup_mode().into(),
        storage: serde_json::to_string(&e.pool_status().driver)
            .unwrap_or_default()
            .trim_matches('"')
            .into(),
    })
}

async fn list_sandboxes(State(e): State<AppState>) -> ApiResult<Json<Vec<SandboxInfo>>> {
    Ok(Json(e.list().await?.into_iter().map(Into::into).collect()))
}

async fn create_sandbox(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    Body(req): Body<CreateSandboxRequest>,
) -> ApiResult<(StatusCode, Json<SandboxInfo>)> {
    Ok((
        StatusCode::CREATED,
        Json(e.create(&caller, req).await?.into()),
    ))
}

async fn inspect_sandbox(
    State(e): State<AppState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<SandboxInfo>> {
    Ok(Json(e.inspect(&name).await?.into()))
}

async fn destroy_sandbox(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<DestroyQuery>,
) -> ApiResult<StatusCode> {
    e.destroy(&caller, &name, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start_sandbox(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<SandboxInfo>> {
    Ok(Json(e.start(&caller, &name).await?.into()))
}

async fn stop_sandbox(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    body: bytes::Bytes,
) -> ApiResult<Json<SandboxInfo>> {
    let req: StopRequest = if body.iter().all(u8::is_ascii_whitespace) {
        StopRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError(EngineError::InvalidRequest(format!(
                "invalid request body: {e}"
            )))
        })?
    };
    let grace = req.grace_seconds;
    let grace = match grace {
        Some(g) if !(0.0..=3600.0).contains(&g) => {
            return Err(EngineError::InvalidRequest(
                "grace_seconds must be between 0 and 3600".into(),
            )
            .into());
        }
        Some(g) => Some(Duration::from_secs_f64(g)),
        None => None,
    };
    Ok(Json(e.stop(&caller, &name, grace).await?.into()))
}

async fn update_limits(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    Body(req): Body<UpdateLimitsRequest>,
) -> ApiResult<Json<SandboxInfo>> {
    Ok(Json(e.update_limits(&caller, &name, req).await?.into()))
}

/// Most output a non-streaming exec keeps per stream.
pub const MAX_CAPTURE: usize = 16 << 20;

async fn exec(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    Body(req): Body<ExecRequest>,
) -> ApiResult<Json<ExecResult>> {
    if req.tty.is_some() {
        return Err(EngineError::InvalidRequest(
            "a tty needs the streaming endpoint (exec/stream)".into(),
        )
        .into());
    }
    let begun = Instant::now();
    let mut session = e.exec(&caller, &name, &req, req.stdin.is_some()).await?;
    if let (Some(mut w), Some(input)) = (session.stdin.take(), req.stdin.clone()) {
        tokio::spawn(async move {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut w, input.as_bytes()).await;
        });
    }
    let out = capture(session.stdout.take());
    let err = capture(session.stderr.take());
    let exit = session.wait().await?;
    // Output normally ends with the command; background children may keep it open, so wait
    // only briefly after the exit.
    let grace = Duration::from_millis(200);
    let (out, err) = tokio::join!(finish(out, grace), finish(err, grace));
    let rolled_back_to = session.settle(&e, &exit).await?;
    Ok(Json(ExecResult {
        exit_code: exit.code,
        signal: exit.signal,
        stdout: String::from_utf8_lossy(&out.0).into(),
        stderr: String::from_utf8_lossy(&err.0).into(),
        truncated: out.1 || err.1,
        duration_ms: begun.elapsed().as_millis() as u64,
        rolled_back_to,
        timed_out: exit.timed_out,
        oom_killed: exit.oom_killed,
    }))
}

type Capture = tokio::task::JoinHandle<(Vec<u8>, bool)>;

fn capture(r: Option<devbox_engine::Output>) -> Option<Capture> {
    let mut r = r?;
    Some(tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = r.recv().await {
            let room = MAX_CAPTURE.saturating_sub(buf.len());
            truncated |= chunk.len() > room;
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        (buf, truncated)
    }))
}

async fn finish(c: Option<Capture>, grace: Duration) -> (Vec<u8>, bool) {
    let Some(mut c) = c else {
        return (Vec::new(), false);
    };
    match tokio::time::timeout(grace, &mut c).await {
        Ok(Ok(v)) => v,
        _ => {
            c.abort();
            (Vec::new(), true)
        }
    }
}

async fn list_snapshots(
    State(e): State<AppState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<Vec<SnapshotInfo>>> {
    Ok(Json(e.snapshots(&name).await?))
}

async fn take_snapshot(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    body: bytes::Bytes,
) -> ApiResult<(StatusCode, Json<SnapshotInfo>)> {
    let req: SnapshotRequest = optional_body(&body)?;
    Ok((
        StatusCode::CREATED,
        Json(e.snapshot(&caller, &name, req).await?),
    ))
}

async fn delete_snapshot(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath((name, snapshot)): UrlPath<(String, String)>,
    Query(q): Query<DeleteSnapshotQuery>,
) -> ApiResult<StatusCode> {
    e.delete_snapshot(&caller, &name, &snapshot, q.force)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rollback(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    Body(req): Body<RollbackRequest>,
) -> ApiResult<Json<SandboxInfo>> {
    Ok(Json(e.rollback(&caller, &name, req).await?.into()))
}

async fn clone_sandbox(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    Body(req): Body<CloneRequest>,
) -> ApiResult<(StatusCode, Json<SandboxInfo>)> {
    Ok((
        StatusCode::CREATED,
        Json(e.clone_sandbox(&caller, &name, req).await?.into()),
    ))
}

async fn diff(
    State(e): State<AppState>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<DiffQuery>,
) -> ApiResult<Json<DiffResult>> {
    Ok(Json(e.diff(&name, q.from, q.to).await?.into()))
}

async fn export_snapshot(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath((name, snapshot)): UrlPath<(String, String)>,
) -> ApiResult<Response> {
    let path = e.export_snapshot(&caller, &name, &snapshot).await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|err| ApiError(EngineError::internal("export", err)));
    // The open file keeps the data readable; the name goes at once.
    let _ = tokio::fs::remove_file(&path).await;
    let file = file?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/zstd")],
        body,
    )
        .into_response())
}

async fn import_snapshot(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ImportSnapshotQuery>,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<SandboxInfo>)> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let path = e.scratch_path("import");
    let received = async {
        let mut file = tokio::fs::File::create(&path).await?;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk.map_err(std::io::Error::other)?)
                .await?;
        }
        file.flush().await
    }
    .await;
    let result = match received {
        Ok(()) => {
            e.import_snapshot(&caller, path.clone(), q.name, q.start)
                .await
        }
        Err(err) if err.raw_os_error() == Some(28) => Err(EngineError::PoolFull(format!(
            "receiving the archive: {err}"
        ))),
        Err(err) => Err(EngineError::internal("receiving the archive", err)),
    };
    let _ = tokio::fs::remove_file(&path).await;
    Ok((StatusCode::CREATED, Json(result?.into())))
}

fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError(EngineError::InvalidRequest(format!(
            "invalid request body: {e}"
        )))
    })
}

async fn list_images(State(e): State<AppState>) -> ApiResult<Json<Vec<ImageInfo>>> {
    Ok(Json(e.list_images().await?))
}

async fn import_image(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    Body(req): Body<ImportImageRequest>,
) -> ApiResult<(StatusCode, Json<ImageInfo>)> {
    Ok((
        StatusCode::CREATED,
        Json(e.import_image(&caller, req).await?),
    ))
}

async fn remove_image(
    State(e): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(reference): UrlPath<String>,
) -> ApiResult<StatusCode> {
    e.remove_image(&caller, &reference).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pool_info(State(e): State<AppState>) -> Json<PoolInfo> {
    Json(e.pool_status())
}

/// Serves the API on a Unix socket (mode 0600, in a 0700 directory) until `shutdown` resolves.
pub async fn serve_unix(
    engine: Arc<Engine>,
    socket: &Path,
    access: crate::auth::Access,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    // Root's alone, or root's and the group's (each request is still checked).
    match &access.group {
        Some(g) => {
            std::os::unix::fs::chown(socket, Some(0), Some(g.gid))?;
            std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))?;
        }
        None => std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?,
    }
    let app =
        router_with(engine, access).into_make_service_with_connect_info::<crate::auth::Peer>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
