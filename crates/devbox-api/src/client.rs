//! A typed client of the API over the daemon's Unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use devbox_engine::model::{
    CreateSandboxRequest, ExecRequest, ExecResult, ImageInfo, ImportImageRequest, SandboxInfo,
    StopRequest,
};
use devbox_storage::PoolInfo;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::server::{ErrorBody, VersionInfo};
use crate::wire::{ClientMsg, ServerMsg};

/// Errors seen by a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon's socket cannot be reached.
    #[error("cannot reach the dev-box daemon at {socket}")]
    Unreachable {
        /// The socket tried.
        socket: PathBuf,
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
pub type ExecStream = WebSocketStream<UnixStream>;

/// The client.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            })
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
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
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
    ) -> Result<(ExecStream, String, i32), ClientError> {
        use futures_util::{SinkExt, StreamExt};
        let stream = self.connect().await?;
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://localhost{path}"), stream)
            .await
            .map_err(|e| ClientError::Protocol(format!("websocket: {e}")))?;
        let msg = serde_json::to_string(first).map_err(|e| ClientError::Protocol(e.to_string()))?;
        ws.send(Message::Text(msg.into()))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMsg>(&t) {
                    Ok(ServerMsg::Started { sandbox, pid }) => return Ok((ws, sandbox, pid)),
                    Ok(ServerMsg::Error { code, message }) => {
                        let status = match code.as_str() {
                            "not_found" => 404,
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
