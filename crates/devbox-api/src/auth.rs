//! The caller check: only root may call the API (the peer's uid, from `SO_PEERCRED`), and
//! who calls, and for whom (`X-Devbox-Actor`), becomes the engine's [`Caller`].

use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use devbox_engine::{Caller, Engine};
use devbox_wire::{ErrorBody, ErrorDetail};

type AppState = Arc<Engine>;

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

/// Names the caller of every request (the peer's user, and whom it says it acts for in
/// `X-Devbox-Actor`), and refuses peers that are not root. Handlers find the
/// [`Caller`] in the request's extensions and pass it to the engine.
pub async fn caller_layer(
    State(engine): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
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
    let user = match uid {
        Some(u) => user_name(u),
        None => "local".to_string(),
    };
    let caller = Caller::on_behalf(&user, on_behalf.as_deref());
    if let Some(u) = uid
        && u != 0
    {
        let path = req.uri().path().to_string();
        engine
            .audit_auth_failure(&caller, &path, &format!("uid {u} is not root"))
            .await;
        let body = ErrorBody {
            error: ErrorDetail {
                code: "forbidden".into(),
                message: "the dev-box API is for root only: run the command with sudo".into(),
                approval: None,
            },
        };
        return (StatusCode::FORBIDDEN, Json(body)).into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}
