//! A typed client of the dev-box API, over the daemon's Unix socket or over TCP (TLS) with a
//! bearer token: REST calls and the exec WebSocket. It speaks the wire model ([`devbox_wire`]) and nothing else of the daemon.

pub use devbox_wire as wire;

mod transport;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use devbox_wire::stream::{ClientMsg, ServerMsg};
use devbox_wire::{
    ApprovalInfo, AuditRecord, AuditVerification, BlockedAttempt, Check, CloneRequest,
    CreateSandboxRequest, DiffResult, ErrorBody, ExecRequest, ExecResult, ImageInfo,
    ImportImageRequest, NetworkInfo, NetworkRulesRequest, PolicyInfo, PoolInfo, ProcessList,
    RollbackRequest, SandboxInfo, SandboxStats, SnapshotInfo, SnapshotRequest, StopRequest,
    UpdateLimitsRequest, VersionInfo,
};
use devbox_wire::{Event, EventsQuery, WebhookStatus};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Errors seen by a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon cannot be reached.
    #[error("cannot reach the dev-box daemon at {endpoint}")]
    Unreachable {
        /// The socket or address tried.
        endpoint: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The daemon answered with an error.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable error code.
        code: String,
        /// The daemon's message.
        message: String,
    },
    /// The daemon's answer could not be understood.
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The API error code, if the daemon gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A connection to an exec stream, after the command started.
pub type ExecStream = WebSocketStream<transport::Conn>;

/// Called with the bytes moved so far while an upload or download streams.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// The client.
#[derive(Clone)]
pub struct Client {
    endpoint: transport::Endpoint,
    actor: Option<String>,
    token: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint.to_string())
            .field("actor", &self.actor)
            .field("token", &self.token.as_ref().map(|_| "(hidden)"))
            .finish()
    }
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            endpoint: transport::Endpoint::Unix(socket.into()),
            actor: None,
            token: None,
        }
    }

    /// A client of a daemon at `url`: `https://HOST:PORT` (TLS, trusting the web's roots and
    /// the PEM certificates in `ca_file`), `http://HOST:PORT` (plain text: the daemon allows
    /// it on loopback addresses only) or `unix:///path/api.sock`; requests carry `token` as
    /// `Authorization: Bearer`.
    pub fn remote(
        url: &str,
        token: Option<String>,
        ca_file: Option<&Path>,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            endpoint: transport::Endpoint::parse(url, ca_file)?,
            actor: None,
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// Sends `token` as `Authorization: Bearer` with every request.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// Where the daemon is (a socket path or a URL), for messages.
    pub fn endpoint(&self) -> String {
        self.endpoint.to_string()
    }

    /// A request to `path` with the headers every request carries.
    fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.endpoint.host_header());
        if let Some(a) = &self.actor {
            req = req.header("x-devbox-actor", a);
        }
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        req
    }

    /// Says who the requests are made for (`X-Devbox-Actor`, recorded in the audit log).
    pub fn with_actor(mut self, actor: Option<String>) -> Self {
        self.actor = actor.filter(|a| !a.is_empty());
        self
    }

    /// The socket path, if the daemon is reached through one.
    pub fn socket(&self) -> Option<&Path> {
        match &self.endpoint {
            transport::Endpoint::Unix(p) => Some(p),
            _ => None,
        }
    }

    async fn connect(&self) -> Result<transport::Conn, ClientError> {
        self.endpoint.connect().await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = self.request(method, path);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => ClientError::Api {
                    status: status.as_u16(),
                    code: b.error.code,
                    message: b.error.message,
                },
                Err(_) => ClientError::Protocol(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )),
            });
        }
        Ok((status, bytes))
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (_, bytes) = self.call(method, path, body).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("{e}: {}", String::from_utf8_lossy(&bytes))))
    }

    fn body<T: serde::Serialize>(v: &T) -> Option<Vec<u8>> {
        serde_json::to_vec(v).ok()
    }

    /// Daemon version and host facts.
    pub async fn version(&self) -> Result<VersionInfo, ClientError> {
        self.json(Method::GET, "/v1/version", None).await
    }

    /// The OpenAPI document.
    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.json(Method::GET, "/openapi.json", None).await
    }

    /// Every sandbox.
    pub async fn list(&self) -> Result<Vec<SandboxInfo>, ClientError> {
        self.json(Method::GET, "/v1/sandboxes", None).await
    }

    /// Creates a sandbox.
    pub async fn create(&self, req: &CreateSandboxRequest) -> Result<SandboxInfo, ClientError> {
        self.json(Method::POST, "/v1/sandboxes", Self::body(req))
            .await
    }

    /// Inspects a sandbox.
    pub async fn inspect(&self, name: &str) -> Result<SandboxInfo, ClientError> {
        self.json(Method::GET, &format!("/v1/sandboxes/{}", enc(name)), None)
            .await
    }

    /// Changes a sandbox's limits (live, for a running one).
    pub async fn update_limits(
        &self,
        name: &str,
        req: &UpdateLimitsRequest,
    ) -> Result<SandboxInfo, ClientError> {
        self.json(
            Method::PATCH,
            &format!("/v1/sandboxes/{}/limits", enc(name)),
            Self::body(req),
        )
        .await
    }

    /// Starts a sandbox.
    pub async fn start(&self, name: &str) -> Result<SandboxInfo, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/start", enc(name)),
            None,
        )
        .await
    }

    /// Stops a sandbox.
    pub async fn stop(
        &self,
        name: &str,
        grace_seconds: Option<f64>,
    ) -> Result<SandboxInfo, ClientError> {
        let body = Self::body(&StopRequest { grace_seconds });
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/stop", enc(name)),
            body,
        )
        .await
    }

    /// Destroys a sandbox.
    pub async fn destroy(&self, name: &str, force: bool) -> Result<(), ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/sandboxes/{}?force={force}", enc(name)),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Runs a command and collects its output.
    pub async fn exec(&self, name: &str, req: &ExecRequest) -> Result<ExecResult, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/exec", enc(name)),
            Self::body(req),
        )
        .await
    }

    /// Takes a snapshot.
    pub async fn snapshot(
        &self,
        name: &str,
        req: &SnapshotRequest,
    ) -> Result<SnapshotInfo, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/snapshots", enc(name)),
            Self::body(req),
        )
        .await
    }

    /// A sandbox's snapshots.
    pub async fn snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>, ClientError> {
        self.json(
            Method::GET,
            &format!("/v1/sandboxes/{}/snapshots", enc(name)),
            None,
        )
        .await
    }

    /// Deletes a snapshot.
    pub async fn delete_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        force: bool,
    ) -> Result<(), ClientError> {
        let path = format!(
            "/v1/sandboxes/{}/snapshots/{}?force={force}",
            enc(name),
            enc(snapshot)
        );
        self.call(Method::DELETE, &path, None).await.map(|_| ())
    }

    /// Rolls a sandbox back.
    pub async fn rollback(
        &self,
        name: &str,
        req: &RollbackRequest,
    ) -> Result<SandboxInfo, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/rollback", enc(name)),
            Self::body(req),
        )
        .await
    }

    /// Clones a sandbox from a snapshot.
    pub async fn clone_sandbox(
        &self,
        name: &str,
        req: &CloneRequest,
    ) -> Result<SandboxInfo, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/clone", enc(name)),
            Self::body(req),
        )
        .await
    }

    /// What changed between two states.
    pub async fn diff(
        &self,
        name: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<DiffResult, ClientError> {
        let mut path = format!("/v1/sandboxes/{}/diff?", enc(name));
        if let Some(f) = from {
            path.push_str(&format!("from={}&", enc(f)));
        }
        if let Some(t) = to {
            path.push_str(&format!("to={}", enc(t)));
        }
        self.json(Method::GET, &path, None).await
    }

    /// A sandbox's network: mode, rules in force, ports, address, counters.
    pub async fn network(&self, name: &str) -> Result<NetworkInfo, ClientError> {
        self.json(
            Method::GET,
            &format!("/v1/sandboxes/{}/network", enc(name)),
            None,
        )
        .await
    }

    /// Allows (`allow: true`) or denies more egress, live.
    pub async fn network_rules(
        &self,
        name: &str,
        allow: bool,
        rules: &[String],
    ) -> Result<NetworkInfo, ClientError> {
        let which = if allow { "allow" } else { "deny" };
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/network/{which}", enc(name)),
            Self::body(&NetworkRulesRequest {
                rules: rules.to_vec(),
            }),
        )
        .await
    }

    /// Drops the live rule changes: the spec's rules apply again.
    pub async fn network_reset(&self, name: &str) -> Result<NetworkInfo, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{}/network/reset", enc(name)),
            None,
        )
        .await
    }

    /// Blocked attempts, oldest first (the newest `limit`).
    pub async fn network_log(
        &self,
        name: &str,
        limit: Option<usize>,
    ) -> Result<Vec<BlockedAttempt>, ClientError> {
        let mut path = format!("/v1/sandboxes/{}/network/log", enc(name));
        if let Some(l) = limit {
            path.push_str(&format!("?limit={l}"));
        }
        self.json(Method::GET, &path, None).await
    }

    /// Resource use of the named sandboxes (none: all; `running`: only those that run).
    pub async fn stats(
        &self,
        names: &[String],
        running: bool,
    ) -> Result<Vec<SandboxStats>, ClientError> {
        let names: Vec<String> = names.iter().map(|n| enc(n)).collect();
        let mut path = format!("/v1/stats?running={running}");
        if !names.is_empty() {
            path.push_str(&format!("&names={}", names.join(",")));
        }
        self.json(Method::GET, &path, None).await
    }

    /// Resource use of one sandbox.
    pub async fn sandbox_stats(&self, name: &str) -> Result<SandboxStats, ClientError> {
        self.json(
            Method::GET,
            &format!("/v1/sandboxes/{}/stats", enc(name)),
            None,
        )
        .await
    }

    /// The processes inside a running sandbox and the exec each belongs to.
    pub async fn ps(&self, name: &str) -> Result<ProcessList, ClientError> {
        self.json(
            Method::GET,
            &format!("/v1/sandboxes/{}/ps", enc(name)),
            None,
        )
        .await
    }

    /// The daemon's Prometheus metrics (text format 0.0.4).
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let (_, bytes) = self.call(Method::GET, "/metrics", None).await?;
        String::from_utf8(bytes.to_vec()).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Downloads a snapshot archive into `out`.
    pub async fn export_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        out: &Path,
    ) -> Result<u64, ClientError> {
        self.export_snapshot_progress(name, snapshot, out, Arc::new(|_| {}))
            .await
    }

    /// [`Self::export_snapshot`], calling `progress` with the bytes received so far after
    /// each chunk.
    pub async fn export_snapshot_progress(
        &self,
        name: &str,
        snapshot: &str,
        out: &Path,
        progress: Progress,
    ) -> Result<u64, ClientError> {
        let path = format!(
            "/v1/sandboxes/{}/snapshots/{}/export",
            enc(name),
            enc(snapshot)
        );
        self.download(&path, out, progress).await
    }

    /// Streams the body of a GET into `out` (written to a `.partial` file, then renamed).
    async fn download(
        &self,
        path: &str,
        out: &Path,
        progress: Progress,
    ) -> Result<u64, ClientError> {
        use tokio::io::AsyncWriteExt;
        let resp = self
            .send(
                Method::GET,
                path,
                http_body_util::Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .await?;
        let mut body = resp.into_body();
        let tmp = out.with_extension("partial");
        let local =
            |e: std::io::Error| ClientError::Protocol(format!("writing {}: {e}", out.display()));
        let mut file = tokio::fs::File::create(&tmp).await.map_err(local)?;
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Protocol(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                total += data.len() as u64;
                file.write_all(&data).await.map_err(local)?;
                progress(total);
            }
        }
        file.flush().await.map_err(local)?;
        drop(file);
        tokio::fs::rename(&tmp, out).await.map_err(local)?;
        Ok(total)
    }

    /// Uploads a snapshot archive; the daemon makes a sandbox from it.
    pub async fn import_snapshot(
        &self,
        archive: &Path,
        name: Option<&str>,
        start: bool,
    ) -> Result<SandboxInfo, ClientError> {
        self.import_snapshot_progress(archive, name, start, Arc::new(|_| {}))
            .await
    }

    /// [`Self::import_snapshot`], calling `progress` with the bytes sent so far after each
    /// chunk.
    pub async fn import_snapshot_progress(
        &self,
        archive: &Path,
        name: Option<&str>,
        start: bool,
        progress: Progress,
    ) -> Result<SandboxInfo, ClientError> {
        use futures_util::StreamExt;
        let file = tokio::fs::File::open(archive)
            .await
            .map_err(|e| ClientError::Protocol(format!("reading {}: {e}", archive.display())))?;
        let mut sent = 0u64;
        let stream = tokio_util::io::ReaderStream::new(file).map(move |r| {
            r.map(|chunk| {
                sent += chunk.len() as u64;
                progress(sent);
                hyper::body::Frame::data(chunk)
            })
        });
        let body = BodyExt::boxed(http_body_util::StreamBody::new(stream));
        let mut path = format!("/v1/snapshots/import?start={start}");
        if let Some(n) = name {
            path.push_str(&format!("&name={}", enc(n)));
        }
        let resp = self.send(Method::POST, &path, body).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("{e}: {}", String::from_utf8_lossy(&bytes))))
    }

    /// Sends a request with any body; returns the response if it succeeded.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: http_body_util::combinators::BoxBody<Bytes, std::io::Error>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(conn);
        let req = self
            .request(method, path)
            .body(body)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))?
                .to_bytes();
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => ClientError::Api {
                    status: status.as_u16(),
                    code: b.error.code,
                    message: b.error.message,
                },
                Err(_) => ClientError::Protocol(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )),
            });
        }
        Ok(resp)
    }

    /// What the checks decide for a command.
    pub async fn check(&self, sandbox: Option<&str>, command: &str) -> Result<Check, ClientError> {
        self.test_policy(sandbox, command, None).await
    }

    /// What the checks would decide for a command with policy `(name, rego)` installed.
    pub async fn test_policy(
        &self,
        sandbox: Option<&str>,
        command: &str,
        policy: Option<(&str, &str)>,
    ) -> Result<Check, ClientError> {
        let policy = policy.map(|(name, rego)| serde_json::json!({"name": name, "rego": rego}));
        let body = serde_json::json!({"command": command, "sandbox": sandbox, "policy": policy});
        self.json(Method::POST, "/v1/check", Self::body(&body))
            .await
    }

    /// Policies (global, or applying to a sandbox).
    pub async fn policies(&self, sandbox: Option<&str>) -> Result<Vec<PolicyInfo>, ClientError> {
        let q = sandbox
            .map(|s| format!("?sandbox={}", enc(s)))
            .unwrap_or_default();
        self.json(Method::GET, &format!("/v1/policies{q}"), None)
            .await
    }

    /// Adds or replaces a policy.
    pub async fn put_policy(
        &self,
        name: &str,
        sandbox: Option<&str>,
        rego: &str,
    ) -> Result<PolicyInfo, ClientError> {
        let body = serde_json::json!({"rego": rego, "sandbox": sandbox});
        self.json(
            Method::PUT,
            &format!("/v1/policies/{}", enc(name)),
            Self::body(&body),
        )
        .await
    }

    /// Removes a policy.
    pub async fn delete_policy(
        &self,
        name: &str,
        sandbox: Option<&str>,
    ) -> Result<(), ClientError> {
        let q = sandbox
            .map(|s| format!("?sandbox={}", enc(s)))
            .unwrap_or_default();
        self.call(
            Method::DELETE,
            &format!("/v1/policies/{}{q}", enc(name)),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Approvals.
    pub async fn approvals(&self, all: bool) -> Result<Vec<ApprovalInfo>, ClientError> {
        self.json(Method::GET, &format!("/v1/approvals?all={all}"), None)
            .await
    }

    /// Approves or denies.
    pub async fn decide(
        &self,
        id: &str,
        approve: bool,
        reason: Option<&str>,
    ) -> Result<ApprovalInfo, ClientError> {
        let verb = if approve { "approve" } else { "deny" };
        let body = serde_json::json!({"reason": reason});
        self.json(
            Method::POST,
            &format!("/v1/approvals/{}/{verb}", enc(id)),
            Self::body(&body),
        )
        .await
    }

    /// Audit records.
    pub async fn audit(
        &self,
        sandbox: Option<&str>,
        since: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<AuditRecord>, ClientError> {
        let mut q = Vec::new();
        if let Some(s) = sandbox {
            q.push(format!("sandbox={}", enc(s)));
        }
        if let Some(s) = since {
            q.push(format!("since={}", enc(s)));
        }
        if let Some(l) = limit {
            q.push(format!("limit={l}"));
        }
        self.json(Method::GET, &format!("/v1/audit?{}", q.join("&")), None)
            .await
    }

    /// Past events, oldest first (the newest `query.limit`, default 1000).
    pub async fn events(&self, query: &EventsQuery) -> Result<Vec<Event>, ClientError> {
        let q = EventsQuery {
            follow: false,
            ..query.clone()
        };
        self.json(Method::GET, &format!("/v1/events?{}", events_qs(&q)), None)
            .await
    }

    /// Follows events (Server-Sent Events): the past ones the query selects, then new ones.
    /// The follower resumes after the last id it saw if the connection ends.
    pub async fn follow_events(&self, query: &EventsQuery) -> Result<EventFollower, ClientError> {
        let mut f = EventFollower {
            client: self.clone(),
            query: EventsQuery {
                follow: true,
                ..query.clone()
            },
            last_id: None,
            body: None,
            buf: Vec::new(),
        };
        f.connect().await?;
        Ok(f)
    }

    /// The webhooks and their delivery state.
    pub async fn webhooks(&self) -> Result<Vec<WebhookStatus>, ClientError> {
        self.json(Method::GET, "/v1/webhooks", None).await
    }

    /// Makes an API token (its secret is in the answer, and only there).
    pub async fn create_token(
        &self,
        req: &devbox_wire::CreateTokenRequest,
    ) -> Result<devbox_wire::CreatedToken, ClientError> {
        self.json(Method::POST, "/v1/tokens", Self::body(req)).await
    }

    /// The API tokens.
    pub async fn tokens(&self) -> Result<Vec<devbox_wire::TokenInfo>, ClientError> {
        self.json(Method::GET, "/v1/tokens", None).await
    }

    /// Revokes an API token.
    pub async fn revoke_token(&self, name: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/v1/tokens/{}", enc(name)), None)
            .await?;
        Ok(())
    }

    /// Checks the audit chain; with `head`, also that it reaches that kept head hash.
    pub async fn verify_audit(&self, head: Option<&str>) -> Result<AuditVerification, ClientError> {
        let path = match head {
            Some(h) => format!("/v1/audit/verify?head={}", enc(h)),
            None => "/v1/audit/verify".to_string(),
        };
        self.json(Method::GET, &path, None).await
    }

    /// Downloads a sandbox's logs into `out`.
    pub async fn export_logs(&self, name: &str, out: &Path) -> Result<u64, ClientError> {
        self.download(
            &format!("/v1/sandboxes/{}/logs/export", enc(name)),
            out,
            Arc::new(|_| {}),
        )
        .await
    }

    /// Every image.
    pub async fn images(&self) -> Result<Vec<ImageInfo>, ClientError> {
        self.json(Method::GET, "/v1/images", None).await
    }

    /// Imports an image from a path on the daemon's host.
    pub async fn import_image(&self, req: &ImportImageRequest) -> Result<ImageInfo, ClientError> {
        self.json(Method::POST, "/v1/images/import", Self::body(req))
            .await
    }

    /// Removes an image.
    pub async fn remove_image(&self, reference: &str) -> Result<(), ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/images/{}", enc(reference)),
            None,
        )
        .await
        .map(|_| ())
    }

    /// The storage pool.
    pub async fn pool(&self) -> Result<PoolInfo, ClientError> {
        self.json(Method::GET, "/v1/pool", None).await
    }

    /// Opens an exec stream (`path` is `/v1/sandboxes/{name}/exec/stream` or `/v1/run/stream`),
    /// sends `first`, and waits for the command to start.
    pub async fn stream(
        &self,
        path: &str,
        first: &ClientMsg,
        on_approval: impl Fn(&ApprovalInfo),
    ) -> Result<(ExecStream, String, i32), ClientError> {
        use futures_util::{SinkExt, StreamExt};
        let stream = self.connect().await?;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{}{path}", self.endpoint.host_header())
            .into_client_request()
            .map_err(|e| ClientError::Protocol(format!("websocket: {e}")))?;
        if let Some(a) = &self.actor
            && let Ok(v) = a.parse()
        {
            request.headers_mut().insert("x-devbox-actor", v);
        }
        if let Some(t) = &self.token
            && let Ok(v) = format!("Bearer {t}").parse()
        {
            request.headers_mut().insert("authorization", v);
        }
        let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .map_err(refused_upgrade)?;
        let msg = serde_json::to_string(first).map_err(|e| ClientError::Protocol(e.to_string()))?;
        ws.send(Message::Text(msg.into()))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMsg>(&t) {
                    Ok(ServerMsg::Started { sandbox, pid }) => return Ok((ws, sandbox, pid)),
                    Ok(ServerMsg::ApprovalRequired { approval }) => {
                        on_approval(&approval);
                        continue;
                    }
                    Ok(ServerMsg::Error { code, message }) => {
                        let status = match code.as_str() {
                            "not_found" => 404,
                            "denied" => 403,
                            "internal" => 500,
                            _ => 400,
                        };
                        return Err(ClientError::Api {
                            status,
                            code,
                            message,
                        });
                    }
                    _ => return Err(ClientError::Protocol(format!("unexpected message {t}"))),
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected message {other:?}"
                    )));
                }
                Some(Err(e)) => return Err(ClientError::Protocol(e.to_string())),
                None => return Err(ClientError::Protocol("the daemon closed the stream".into())),
            }
        }
    }
}

/// Percent-encodes a path segment (names are validated, but be safe with anything).
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn events_qs(q: &EventsQuery) -> String {
    let mut v = Vec::new();
    if let Some(s) = &q.sandbox {
        v.push(format!("sandbox={}", enc(s)));
    }
    if let Some(s) = &q.since {
        v.push(format!("since={}", enc(s)));
    }
    if let Some(k) = &q.kind {
        v.push(format!("kind={}", enc(k)));
    }
    if let Some(l) = q.limit {
        v.push(format!("limit={l}"));
    }
    if q.follow {
        v.push("follow=true".into());
    }
    v.join("&")
}

/// What a follower reads.
#[derive(Debug, Clone)]
pub enum Followed {
    /// An event.
    Event(Box<Event>),
    /// The daemon's stream fell behind by this many events (they follow).
    Lagged(u64),
}

/// The daemon's refusal of a WebSocket upgrade (401, 403, 429, ...) as its API error.
fn refused_upgrade(e: tokio_tungstenite::tungstenite::Error) -> ClientError {
    if let tokio_tungstenite::tungstenite::Error::Http(resp) = &e
        && let Some(b) = resp
            .body()
            .as_deref()
            .and_then(|b| serde_json::from_slice::<ErrorBody>(b).ok())
    {
        return ClientError::Api {
            status: resp.status().as_u16(),
            code: b.error.code,
            message: b.error.message,
        };
    }
    ClientError::Protocol(format!("websocket: {e}"))
}

/// A stream of events from `GET /v1/events?follow=true` (see [`Client::follow_events`]).
#[derive(Debug)]
pub struct EventFollower {
    client: Client,
    query: EventsQuery,
    last_id: Option<i64>,
    body: Option<hyper::body::Incoming>,
    buf: Vec<u8>,
}

/// Longest Server-Sent Events message accepted.
const MAX_SSE_MESSAGE: usize = 16 << 20;

impl EventFollower {
    async fn connect(&mut self) -> Result<(), ClientError> {
        let stream = self.client.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = self
            .client
            .request(
                Method::GET,
                &format!("/v1/events?{}", events_qs(&self.query)),
            )
            .header("accept", "text/event-stream");
        if let Some(id) = self.last_id {
            req = req.header("last-event-id", id.to_string());
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))?
                .to_bytes();
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => ClientError::Api {
                    status: status.as_u16(),
                    code: b.error.code,
                    message: b.error.message,
                },
                Err(_) => ClientError::Protocol(format!("HTTP {status}")),
            });
        }
        self.body = Some(resp.into_body());
        self.buf.clear();
        Ok(())
    }

    /// The next event; reconnects once (resuming after the last id) if the stream ends.
    pub async fn next(&mut self) -> Result<Followed, ClientError> {
        let mut reconnected = false;
        loop {
            if let Some(msg) = self.take_message()? {
                return Ok(msg);
            }
            let frame = match self.body.as_mut() {
                Some(b) => b.frame().await,
                None => None,
            };
            match frame {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.extend_from_slice(&data);
                        if self.buf.len() > MAX_SSE_MESSAGE {
                            return Err(ClientError::Protocol(
                                "an event stream message is too long".into(),
                            ));
                        }
                    }
                }
                Some(Err(_)) | None => {
                    if reconnected {
                        return Err(ClientError::Protocol(
                            "the daemon ended the event stream".into(),
                        ));
                    }
                    reconnected = true;
                    self.body = None;
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    self.connect().await?;
                }
            }
        }
    }

    /// Parses one complete message from the buffer, skipping comments (keep-alives).
    fn take_message(&mut self) -> Result<Option<Followed>, ClientError> {
        loop {
            let text = String::from_utf8_lossy(&self.buf).into_owned();
            let Some(end) = text.find("\n\n") else {
                return Ok(None);
            };
            let msg = text[..end].to_string();
            self.buf.drain(..end + 2);
            let (mut event, mut data, mut id) = (None, String::new(), None);
            for line in msg.lines() {
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event = Some(value.to_string()),
                    "data" => {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(value);
                    }
                    "id" => id = value.parse::<i64>().ok(),
                    _ => {}
                }
            }
            match event.as_deref() {
                None | Some("message") if !data.is_empty() => {
                    let ev: Event = serde_json::from_str(&data)
                        .map_err(|e| ClientError::Protocol(format!("an event: {e}")))?;
                    self.last_id = id.or(Some(ev.id));
                    return Ok(Some(Followed::Event(Box::new(ev))));
                }
                Some("lagged") => {
                    let v: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
                    return Ok(Some(Followed::Lagged(v["missed"].as_u64().unwrap_or(0))));
                }
                Some("error") => {
                    let v: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
                    return Err(ClientError::Protocol(
                        v["message"]
                            .as_str()
                            .unwrap_or("the event stream failed")
                            .to_string(),
                    ));
                }
                _ => {}
            }
        }
    }
}
