//! Remote callers: the daemon's TCP listener (TLS from PEM cert and key files with rustls,
//! or plain text on a loopback address), bearer tokens with their scopes and sandbox
//! patterns, and per-token limits: a request rate (a token bucket) and a cap on concurrent
//! execs, both answered with 429 and `Retry-After`. Every refusal is audited, the token's
//! name as the actor (`token:NAME`); refusals of callers without a valid token are audited
//! at most [`AUDIT_BUDGET`] a minute per address, so a flood cannot fill the audit log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use devbox_engine::{Caller, Engine, TokenGrant};
use devbox_wire::{CloneRequest, CreateSandboxRequest, pattern_matches};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::rustls;

use crate::auth::{Guard, Peer, on_behalf, refusal, required_scope};

/// Refusals of callers without a valid token audited per address and minute.
pub const AUDIT_BUDGET: u32 = 20;
/// TLS handshakes under way at once; more connections wait.
const MAX_HANDSHAKES: usize = 256;
/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest body of a request whose body names a sandbox (create, clone) that a token with
/// a sandbox pattern may send.
const MAX_NAMING_BODY: usize = 4 << 20;

/// Tokens' limits unless a token has its own.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteLimits {
    /// Requests a second on average; bursts up to twice that.
    pub rate_per_second: f64,
    /// Execs (and exec streams) running at once.
    pub max_execs: u32,
}

impl Default for RemoteLimits {
    fn default() -> Self {
        Self {
            rate_per_second: 100.0,
            max_execs: 32,
        }
    }
}

struct Bucket {
    level: f64,
    at: Instant,
    execs: Arc<Semaphore>,
}

/// Per-token rate and exec counts.
pub(crate) struct Limiter {
    defaults: RemoteLimits,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// A running exec's share of its token's cap; released when the exec ends.
#[derive(Clone)]
pub(crate) struct ExecPermit(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

impl Limiter {
    pub(crate) fn new(defaults: RemoteLimits) -> Self {
        Self {
            defaults,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn with_bucket<T>(&self, g: &TokenGrant, f: impl FnOnce(&mut Bucket, f64) -> T) -> T {
        let rate = g.rate_per_second.unwrap_or(self.defaults.rate_per_second);
        let cap = g.max_execs.unwrap_or(self.defaults.max_execs).max(1) as usize;
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = map.entry(g.id.clone()).or_insert_with(|| Bucket {
            level: burst(rate),
            at: Instant::now(),
            execs: Arc::new(Semaphore::new(cap)),
        });
        f(b, rate)
    }

    /// Takes one request from the token's bucket, or says how long to wait.
    pub(crate) fn admit(&self, g: &TokenGrant) -> Result<(), Duration> {
        self.with_bucket(g, |b, rate| {
            let now = Instant::now();
            let elapsed = now.duration_since(b.at).as_secs_f64();
            b.level = (b.level + elapsed * rate).min(burst(rate));
            b.at = now;
            if b.level >= 1.0 {
                b.level -= 1.0;
                Ok(())
            } else {
                Err(Duration::from_secs_f64((1.0 - b.level) / rate))
            }
        })
    }

    /// One of the token's exec slots, if one is free.
    pub(crate) fn exec(&self, g: &TokenGrant) -> Option<ExecPermit> {
        let sem = self.with_bucket(g, |b, _| b.execs.clone());
        sem.try_acquire_owned()
            .ok()
            .map(|p| ExecPermit(Arc::new(p)))
    }
}

fn burst(rate: f64) -> f64 {
    (rate * 2.0).max(1.0)
}

/// How many refusals of one key (an address, a token) are audited a minute.
#[derive(Default)]
pub(crate) struct AuditBudget {
    keys: Mutex<HashMap<String, (Instant, u32, u64)>>,
}

impl AuditBudget {
    /// Whether a refusal of `key` is audited now; if so, how many were left out since the
    /// last one that was.
    pub(crate) fn take(&self, key: &str) -> Option<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if keys.len() > 10_000 {
            keys.retain(|_, (start, _, left_out)| {
                now.duration_since(*start) < Duration::from_secs(60) || *left_out > 0
            });
        }
        let e = keys.entry(key.to_string()).or_insert((now, 0, 0));
        if now.duration_since(e.0) >= Duration::from_secs(60) {
            e.0 = now;
            e.1 = 0;
        }
        if e.1 < AUDIT_BUDGET {
            e.1 += 1;
            Some(std::mem::take(&mut e.2))
        } else {
            e.2 += 1;
            None
        }
    }
}

async fn audit_refusal(guard: &Guard, key: &str, caller: &Caller, path: &str, why: &str) {
    if let Some(left_out) = guard.budget.take(key) {
        let why = if left_out > 0 {
            format!("{why} ({left_out} more refusals of this caller not recorded)")
        } else {
            why.to_string()
        };
        guard.engine.audit_auth_failure(caller, path, &why).await;
    }
}

fn too_many(wait: Duration, message: String) -> Response {
    let mut r = refusal(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn unauthorized(message: String) -> Response {
    let mut r = refusal(StatusCode::UNAUTHORIZED, "unauthorized", message);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"dev-box\""),
    );
    r
}

/// Whether a request starts an exec (and takes one of its token's exec slots).
fn is_exec(method: &Method, path: &str) -> bool {
    path == "/v1/run/stream"
        || sandbox_route(path).is_some_and(|(_, tail)| {
            tail == "exec/stream" || (tail == "exec" && *method == Method::POST)
        })
}

/// The sandbox a path is about (`/v1/sandboxes/NAME[/TAIL]`), and the rest of it.
fn sandbox_route(path: &str) -> Option<(String, &str)> {
    let rest = path.strip_prefix("/v1/sandboxes/")?;
    let (name, tail) = rest.split_once('/').unwrap_or((rest, ""));
    (!name.is_empty()).then(|| (percent_decode(name), tail))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex_digit(b[i + 1]), hex_digit(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_digit(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// What a token limited to sandboxes matching `pattern` may do with this request: go on
/// (the request, its body read back in if it was read), or why not.
async fn within_pattern(
    engine: &Arc<Engine>,
    pattern: &str,
    req: Request,
) -> Result<Request, String> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let outside =
        |name: &str| format!("sandbox {name:?} does not match this token's pattern {pattern:?}");
    if let Some((name, tail)) = sandbox_route(&path) {
        if !pattern_matches(pattern, &name) {
            return Err(outside(&name));
        }
        if tail == "clone" && method == Method::POST {
            let (req, clone) = read_body::<CloneRequest>(req).await?;
            if !pattern_matches(pattern, &clone.name) {
                return Err(outside(&clone.name));
            }
            return Ok(req);
        }
        return Ok(req);
    }
    match (method.clone(), path.as_str()) {
        (Method::GET, "/v1/version" | "/openapi.json" | "/v1/sandboxes" | "/v1/images")
        | (Method::POST, "/v1/check") => Ok(req),
        (Method::POST, "/v1/sandboxes") => {
            let (req, create) = read_body::<CreateSandboxRequest>(req).await?;
            let name = create.name.clone().or_else(|| {
                create
                    .manifest
                    .as_ref()
                    .and_then(|m| m.metadata.name.clone())
            });
            match name {
                Some(n) if pattern_matches(pattern, &n) => Ok(req),
                Some(n) => Err(outside(&n)),
                None => Err(format!(
                    "name the sandbox: this token's pattern {pattern:?} allows creating only sandboxes it matches"
                )),
            }
        }
        (Method::GET, "/v1/events") => {
            // Read as the handler reads it, so no spelling of the query names another.
            let q = axum::extract::Query::<devbox_wire::EventsQuery>::try_from_uri(req.uri())
                .map_err(|e| format!("invalid query: {e}"))?;
            match q.0.sandbox {
                Some(n) if pattern_matches(pattern, &n) => Ok(req),
                Some(n) => Err(outside(&n)),
                None => Err(format!(
                    "name the sandbox (?sandbox=NAME): this token's pattern {pattern:?} allows only the events of sandboxes it matches"
                )),
            }
        }
        (_, p) if p.starts_with("/v1/approvals/") => {
            let id = p["/v1/approvals/".len()..]
                .split('/')
                .next()
                .unwrap_or_default();
            let approval = engine
                .approval(&percent_decode(id))
                .await
                .map_err(|e| e.to_string())?;
            if pattern_matches(pattern, &approval.sandbox) {
                Ok(req)
            } else {
                Err(outside(&approval.sandbox))
            }
        }
        _ => Err(format!(
            "this token's sandbox pattern {pattern:?} allows only routes about one matching sandbox, and {method} {path} is not one"
        )),
    }
}

async fn read_body<T: serde::de::DeserializeOwned>(req: Request) -> Result<(Request, T), String> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_NAMING_BODY)
        .await
        .map_err(|e| format!("unreadable request body: {e}"))?;
    let value: T =
        serde_json::from_slice(&bytes).map_err(|e| format!("invalid request body: {e}"))?;
    Ok((
        Request::from_parts(parts, axum::body::Body::from(bytes)),
        value,
    ))
}

/// Keeps only the sandboxes matching `pattern` in a list of sandboxes.
async fn filter_list(resp: Response, pattern: &str) -> Response {
    if !resp.status().is_success() {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "reading the list of sandboxes".into(),
        );
    };
    let Ok(mut list) = serde_json::from_slice::<Vec<serde_json::Value>>(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    list.retain(|s| {
        s.get("name")
            .and_then(|n| n.as_str())
            .is_some_and(|n| pattern_matches(pattern, n))
    });
    let mut parts = parts;
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(
        parts,
        axum::body::Body::from(serde_json::to_vec(&list).unwrap_or_default()),
    )
}

/// The caller check of a request over TCP: a valid bearer token, within its rate, scopes,
/// sandbox pattern and exec cap. The [`Caller`] is `token:NAME` (and whom it acts for).
pub(crate) async fn token_layer(
    guard: Arc<Guard>,
    addr: SocketAddr,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    let actor = on_behalf(&req);
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string());
    let anonymous = Caller::new(format!("remote {}", addr.ip()));
    let ip_key = addr.ip().to_string();
    let Some(bearer) = bearer else {
        audit_refusal(&guard, &ip_key, &anonymous, &path, "no bearer token").await;
        return unauthorized(
            "this API needs a token over TCP: send `Authorization: Bearer TOKEN` (sandbox --token, DEVBOX_TOKEN); an administrator makes one with `sandbox token create`".into(),
        );
    };
    let grant = match guard.engine.authenticate(&bearer).await {
        Ok(Ok(g)) => g,
        Ok(Err(why)) => {
            audit_refusal(&guard, &ip_key, &anonymous, &path, &why.to_string()).await;
            return unauthorized(why.to_string());
        }
        Err(e) => return crate::server::ApiError(e).into_response(),
    };
    let caller = Caller::on_behalf(&format!("token:{}", grant.name), actor.as_deref());
    let token_key = format!("token {}", grant.id);
    if let Err(wait) = guard.limiter.admit(&grant) {
        audit_refusal(&guard, &token_key, &caller, &path, "rate limit").await;
        return too_many(
            wait,
            format!(
                "token {:?} is over its rate of requests: retry after the time in Retry-After",
                grant.name
            ),
        );
    }
    let need = required_scope(req.method(), &path);
    if !grant.scopes.contains(&need) {
        let have: Vec<&str> = grant.scopes.iter().map(|s| s.as_str()).collect();
        let why = format!(
            "scope {} not granted to token {}",
            need.as_str(),
            grant.name
        );
        guard.engine.audit_auth_failure(&caller, &path, &why).await;
        return refusal(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {:?} has the scopes {} and this needs {}: ask for a token with it (sandbox token create --scope)",
                grant.name,
                have.join(", "),
                need.as_str()
            ),
        );
    }
    if let Some(pattern) = &grant.sandbox {
        req = match within_pattern(&guard.engine, pattern, req).await {
            Ok(r) => r,
            Err(why) => {
                guard.engine.audit_auth_failure(&caller, &path, &why).await;
                return refusal(StatusCode::FORBIDDEN, "forbidden", why);
            }
        };
    }
    if is_exec(req.method(), &path) {
        match guard.limiter.exec(&grant) {
            Some(permit) => {
                req.extensions_mut().insert(permit);
            }
            None => {
                audit_refusal(&guard, &token_key, &caller, &path, "concurrent execs").await;
                return too_many(
                    Duration::from_secs(1),
                    format!(
                        "token {:?} runs as many execs as it may at once: retry when one ends",
                        grant.name
                    ),
                );
            }
        }
    }
    let list = grant.sandbox.is_some() && req.method() == Method::GET && path == "/v1/sandboxes";
    req.extensions_mut().insert(caller);
    let resp = next.run(req).await;
    match (&grant.sandbox, list) {
        (Some(p), true) => filter_list(resp, p).await,
        _ => resp,
    }
}

/// A connection over TCP, with or without TLS.
pub enum RemoteIo {
    /// Plain text (loopback addresses only).
    Plain(TcpStream),
    /// TLS.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for RemoteIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            RemoteIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            RemoteIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RemoteIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            RemoteIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            RemoteIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            RemoteIo::Plain(s) => Pin::new(s).poll_flush(cx),
            RemoteIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            RemoteIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            RemoteIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            RemoteIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            RemoteIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            RemoteIo::Plain(s) => s.is_write_vectored(),
            RemoteIo::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The TCP listener: accepts connections and does their TLS handshakes in tasks of their
/// own (a slow client holds up no other), handing over the finished ones.
pub struct RemoteListener {
    ready: mpsc::Receiver<(RemoteIo, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for RemoteListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl RemoteListener {
    /// Listens on `listener`, with TLS if `tls` is given.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, addr) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accepting a TCP connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let tx = tx.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let io = match acceptor {
                        None => RemoteIo::Plain(tcp),
                        Some(a) => {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, a.accept(tcp)).await {
                                Ok(Ok(s)) => RemoteIo::Tls(Box::new(s)),
                                Ok(Err(e)) => {
                                    tracing::debug!("TLS handshake with {addr}: {e}");
                                    return;
                                }
                                Err(_) => return,
                            }
                        }
                    };
                    drop(permit);
                    let _ = tx.send((io, addr)).await;
                });
            }
        });
        Ok(Self {
            ready,
            local,
            acceptor: task,
        })
    }
}

impl axum::serve::Listener for RemoteListener {
    type Io = RemoteIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor ended (it never does while the listener lives): wait for the
            // shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, RemoteListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, RemoteListener>) -> Self {
        Peer {
            uid: None,
            gid: None,
            remote: Some(*stream.remote_addr()),
        }
    }
}

/// A TLS server configuration from PEM files: the certificate chain and its private key.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let cert_pem = read(cert)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in it (a PEM file with -----BEGIN CERTIFICATE-----)",
            cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)
    .map_err(|e| {
        format!(
            "{} and {} do not make a usable TLS identity: {e}",
            cert.display(),
            key.display()
        )
    })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The address a listener is bound to.
pub fn local_addr(l: &RemoteListener) -> std::io::Result<SocketAddr> {
    Ok(l.local)
}

/// Binds the API's TCP listener at `addr` (port 0 picks one): with TLS if `tls` is given;
/// without, only on a loopback address.
pub async fn bind_tcp(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<RemoteListener> {
    if tls.is_none() && !addr.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{addr} is not a loopback address: tokens must not cross a network in clear text; give --tls-cert and --tls-key"
            ),
        ));
    }
    RemoteListener::new(TcpListener::bind(addr).await?, tls)
}

/// Serves the API on a bound TCP listener until `shutdown` resolves. Callers need a token.
pub async fn serve_tcp(
    engine: Arc<Engine>,
    listener: RemoteListener,
    access: crate::auth::Access,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app =
        crate::server::router_with(engine, access).into_make_service_with_connect_info::<Peer>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(rate: f64, execs: u32) -> TokenGrant {
        TokenGrant {
            id: "t1".into(),
            name: "t".into(),
            scopes: vec![],
            sandbox: None,
            rate_per_second: Some(rate),
            max_execs: Some(execs),
        }
    }

    #[test]
    fn bucket_allows_a_burst_then_asks_to_wait() {
        let l = Limiter::new(RemoteLimits::default());
        let g = grant(5.0, 2);
        for _ in 0..10 {
            l.admit(&g).unwrap();
        }
        let wait = l.admit(&g).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(200));
    }

    #[test]
    fn exec_slots_are_capped_and_given_back() {
        let l = Limiter::new(RemoteLimits::default());
        let g = grant(5.0, 2);
        let a = l.exec(&g).unwrap();
        let _b = l.exec(&g).unwrap();
        assert!(l.exec(&g).is_none());
        drop(a);
        assert!(l.exec(&g).is_some());
    }

    #[test]
    fn audit_budget_counts_what_it_leaves_out() {
        let b = AuditBudget::default();
        for _ in 0..AUDIT_BUDGET {
            assert_eq!(b.take("1.2.3.4"), Some(0));
        }
        assert_eq!(b.take("1.2.3.4"), None);
        assert_eq!(b.take("1.2.3.4"), None);
        assert_eq!(b.take("other"), Some(0));
    }

    #[test]
    fn routes_name_their_sandbox_and_execs() {
        assert_eq!(
            sandbox_route("/v1/sandboxes/ci-1/exec"),
            Some(("ci-1".to_string(), "exec"))
        );
        assert_eq!(
            sandbox_route("/v1/sandboxes/a%2Db"),
            Some(("a-b".to_string(), ""))
        );
        assert_eq!(sandbox_route("/v1/sandboxes"), None);
        assert!(is_exec(&Method::POST, "/v1/sandboxes/x/exec"));
        assert!(is_exec(&Method::GET, "/v1/sandboxes/x/exec/stream"));
        assert!(is_exec(&Method::GET, "/v1/run/stream"));
        assert!(!is_exec(&Method::GET, "/v1/sandboxes/exec"));
        assert!(!is_exec(&Method::POST, "/v1/sandboxes/x/stop"));
    }
}
