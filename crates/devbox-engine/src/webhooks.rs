//! Webhooks: events posted as signed JSON to configured URLs.
//!
//! One dispatcher reads the event stream (an [`crate::events::EventStream`]: no gaps, so a
//! busy moment costs no events) and puts each event a hook wants into that hook's bounded
//! queue; when the queue is full the oldest event is dropped and counted. A worker per hook
//! posts its queue in order: the event as JSON with `X-Devbox-Signature: sha256=<hex of
//! HMAC-SHA256 of the body under the hook's secret>`, `X-Devbox-Event-Id` and
//! `X-Devbox-Timestamp` (Unix seconds of the attempt); a 2xx answer delivers it; anything
//! else (an error status, a refused connection, no answer within the hook's timeout) is
//! retried after 0.5 s, 1 s, 2 s, ... (at most 60 s) up to the hook's retries, then counted
//! as failed. Nothing here runs on a caller's path: an audit record only lands in a
//! broadcast channel. https checks the server's certificate against the Mozilla roots
//! (webpki-roots).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use devbox_wire::{Event, WebhookStatus};
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

use crate::Engine;
use crate::config::WebhookConfig;
use crate::events::{EventFilter, StreamItem};

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The first wait.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Where a webhook posts: a parsed http or https URL.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    https: bool,
    host: String,
    port: u16,
    authority: String,
    path: String,
}

impl Target {
    /// Parses an `http://` or `https://` URL (no user or password in it).
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("webhook URL {}: {why}", shown_url(url));
        let uri: hyper::Uri = url
            .parse()
            .map_err(|_| bad("not a URL: give http://HOST[:PORT]/PATH or https://..."))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("only http:// and https:// URLs can be used")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| bad("it has no host"))?
            .as_str()
            .to_string();
        if authority.contains('@') {
            return Err(bad(
                "a user or password in the URL is not supported: the secret signs the body",
            ));
        }
        let host = uri.host().ok_or_else(|| bad("it has no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(Self {
            https,
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            host,
            authority,
            path: uri
                .path_and_query()
                .map_or("/".to_string(), |p| p.as_str().to_string()),
        })
    }
}

/// A URL as logs and `sandbox webhooks` show it: without its query (which may carry a
/// token).
pub fn shown_url(url: &str) -> String {
    let cut = url.find(['?', '#']).unwrap_or(url.len());
    url[..cut].to_string()
}

/// The signature header's value: `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length; the error cannot happen.
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Debug, Default)]
struct HookState {
    queue: VecDeque<Arc<Event>>,
    delivered: u64,
    failed: u64,
    dropped: u64,
    last_error: Option<String>,
    last_error_at: Option<i64>,
    last_success_at: Option<i64>,
}

#[derive(Debug)]
struct Hook {
    cfg: WebhookConfig,
    target: Target,
    filter: EventFilter,
    state: Mutex<HookState>,
    wake: tokio::sync::Notify,
}

impl Hook {
    fn state(&self) -> std::sync::MutexGuard<'_, HookState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wants(&self, e: &Event) -> bool {
        self.filter.matches(e)
            && (self.cfg.sandboxes.is_empty()
                || e.sandbox
                    .as_ref()
                    .is_some_and(|s| self.cfg.sandboxes.contains(s)))
    }

    fn enqueue(&self, e: Arc<Event>) {
        let mut st = self.state();
        while st.queue.len() >= self.cfg.queue.max(1) {
            st.queue.pop_front();
            st.dropped += 1;
        }
        st.queue.push_back(e);
        drop(st);
        self.wake.notify_one();
    }
}

/// The daemon's webhooks and their delivery state.
#[derive(Debug, Default)]
pub(crate) struct Webhooks {
    hooks: Vec<Arc<Hook>>,
}

impl Webhooks {
    /// The hooks of the configuration (their URLs were checked when it was read).
    pub(crate) fn new(cfgs: &[WebhookConfig]) -> Self {
        Self {
            hooks: cfgs
                .iter()
                .filter_map(|c| match Target::parse(&c.url) {
                    Ok(target) => Some(Arc::new(Hook {
                        filter: EventFilter {
                            kinds: c.kinds.clone(),
                            ..Default::default()
                        },
                        cfg: c.clone(),
                        target,
                        state: Mutex::default(),
                        wake: tokio::sync::Notify::new(),
                    })),
                    Err(e) => {
                        tracing::error!("{e}");
                        None
                    }
                })
                .collect(),
        }
    }

    /// Every hook's state.
    pub(crate) fn status(&self) -> Vec<WebhookStatus> {
        self.hooks
            .iter()
            .map(|h| {
                let st = h.state();
                WebhookStatus {
                    url: shown_url(&h.cfg.url),
                    kinds: h.cfg.kinds.clone(),
                    sandboxes: h.cfg.sandboxes.clone(),
                    delivered: st.delivered,
                    failed: st.failed,
                    dropped: st.dropped,
                    queued: st.queue.len() as u64,
                    last_error: st.last_error.clone(),
                    last_error_at: st.last_error_at.map(crate::model::rfc3339),
                    last_success_at: st.last_success_at.map(crate::model::rfc3339),
                }
            })
            .collect()
    }
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

impl Engine {
    /// Starts the dispatcher and a worker per webhook (none configured: nothing runs).
    pub(crate) fn start_webhooks(self: &Arc<Self>) {
        if self.webhooks.hooks.is_empty() {
            return;
        }
        let tls = tls_config()
            .map_err(|e| tracing::error!("webhooks: no TLS, https URLs will fail: {e}"))
            .ok();
        for hook in &self.webhooks.hooks {
            tokio::spawn(worker(hook.clone(), tls.clone()));
        }
        let hooks = self.webhooks.hooks.clone();
        let me = self.clone();
        tokio::spawn(async move {
            let mut stream = match me.event_stream(EventFilter::default(), None).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("webhooks: cannot read events: {e}");
                    return;
                }
            };
            drop(me);
            loop {
                match stream.next().await {
                    Ok(Some(StreamItem::Event(e))) => {
                        for h in &hooks {
                            if h.wants(&e) {
                                h.enqueue(e.clone());
                            }
                        }
                    }
                    Ok(Some(StreamItem::Lagged(n))) => {
                        tracing::debug!(missed = n, "webhooks: catching up from the store");
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!("webhooks: reading events: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    /// The webhooks and their delivery state.
    pub fn webhooks(&self) -> Vec<WebhookStatus> {
        self.webhooks.status()
    }

    /// (url, delivered, failed, dropped) of every hook, for the metrics.
    pub(crate) fn webhook_counts(&self) -> Vec<(String, u64, u64, u64)> {
        self.webhooks
            .status()
            .into_iter()
            .map(|s| (s.url, s.delivered, s.failed, s.dropped))
            .collect()
    }
}

/// Posts a hook's queue, in order, until the runtime ends.
async fn worker(hook: Arc<Hook>, tls: Option<Arc<rustls::ClientConfig>>) {
    loop {
        let next = hook.state().queue.pop_front();
        let Some(event) = next else {
            hook.wake.notified().await;
            continue;
        };
        let body = Bytes::from(serde_json::to_vec(&*event).unwrap_or_default());
        let sig = signature(&hook.cfg.secret, &body);
        let mut delay = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            let r = tokio::time::timeout(
                hook.cfg.timeout,
                post(&hook.target, &tls, body.clone(), &sig, event.id),
            )
            .await;
            let err = match r {
                Ok(Ok(status)) if (200..300).contains(&status) => None,
                Ok(Ok(status)) => Some(format!("answered HTTP {status}")),
                Ok(Err(e)) => Some(e),
                Err(_) => Some(format!(
                    "no answer within {}",
                    humantime::format_duration(hook.cfg.timeout)
                )),
            };
            let now = devbox_store::now_ms();
            let done = {
                let mut st = hook.state();
                match err {
                    None => {
                        st.delivered += 1;
                        st.last_success_at = Some(now);
                        true
                    }
                    Some(e) => {
                        tracing::debug!(url = %shown_url(&hook.cfg.url), event = event.id, attempt, "webhook: {e}");
                        st.last_error = Some(e);
                        st.last_error_at = Some(now);
                        if attempt >= hook.cfg.retries {
                            st.failed += 1;
                        }
                        attempt >= hook.cfg.retries
                    }
                }
            };
            if done {
                break;
            }
            attempt += 1;
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }
}

/// One attempt: connects, posts, returns the status.
async fn post(
    target: &Target,
    tls: &Option<Arc<rustls::ClientConfig>>,
    body: Bytes,
    sig: &str,
    id: i64,
) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("connecting to {}: {e}", target.authority))?;
    let _ = tcp.set_nodelay(true);
    if target.https {
        let tls = tls
            .as_ref()
            .ok_or("TLS could not be set up in this daemon (see its log)")?;
        let name = rustls::pki_types::ServerName::try_from(target.host.clone())
            .map_err(|e| format!("{}: {e}", target.host))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", target.authority))?;
        send(stream, target, body, sig, id).await
    } else {
        send(tcp, target, body, sig, id).await
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    target: &Target,
    body: Bytes,
    sig: &str,
    id: i64,
) -> Result<u16, String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP with {}: {e}", target.authority))?;
    let conn = tokio::spawn(conn);
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let req = hyper::Request::post(target.path.as_str())
        .header(hyper::header::HOST, target.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "dev-box-webhook")
        .header("x-devbox-signature", sig)
        .header("x-devbox-event-id", id.to_string())
        .header("x-devbox-timestamp", ts.to_string())
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await;
    conn.abort();
    resp.map(|r| r.status().as_u16())
        .map_err(|e| format!("HTTP with {}: {e}", target.authority))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_why_not() {
        let t = Target::parse("http://127.0.0.1:9000/hook?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 9000, "/hook?x=1")
        );
        let t = Target::parse("https://[::1]/").unwrap();
        assert!(t.https && t.port == 443 && t.host == "::1");
        for bad in ["ftp://x/", "not a url", "http://u:p@host/", "/just/a/path"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(shown_url("http://h/p?token=secret"), "http://h/p");
    }

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
