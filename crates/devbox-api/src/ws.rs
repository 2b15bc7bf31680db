//! Streaming exec over WebSocket (see [`crate::wire`] for the protocol).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, State};
use axum::response::Response;
use devbox_engine::{Engine, EngineError, ExecSession};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::wire::{ClientMsg, STDERR, STDOUT, ServerMsg};

fn text(msg: &ServerMsg) -> Message {
    Message::Text(serde_json::to_string(msg).unwrap_or_default().into())
}

fn error_msg(e: &EngineError) -> Message {
    text(&ServerMsg::Error {
        code: e.code().into(),
        message: e.to_string(),
    })
}

/// Reads the opening message.
async fn first(socket: &mut WebSocket) -> Option<ClientMsg> {
    loop {
        match socket.recv().await? {
            Ok(Message::Text(t)) => return serde_json::from_str(&t).ok(),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            _ => return None,
        }
    }
}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/exec/stream", params(("name" = String, Path)),
    description = "WebSocket: send {\"type\":\"exec\",\"exec\":ExecRequest,\"stdin\":bool}; receive started, output frames (first byte 1 stdout, 2 stderr), exit.",
    responses((status = 101, description = "switching to the WebSocket protocol")))]
pub(crate) async fn exec_stream(
    State(engine): State<Arc<Engine>>,
    UrlPath(name): UrlPath<String>,
    ws: WebSocketUpgrade,
) -> Response {
    // The upgraded connection runs in a task of its own: carry the caller's identity there.
    let actor = devbox_engine::current_actor();
    ws.on_upgrade(move |mut socket| {
        devbox_engine::ACTOR.scope(actor, async move {
            let Some(ClientMsg::Exec { exec, stdin }) = first(&mut socket).await else {
                let e = EngineError::InvalidRequest(
                    "the first message must be {\"type\":\"exec\",...}".into(),
                );
                let _ = socket.send(error_msg(&e)).await;
                return;
            };
            match exec_with_approval(&engine, &mut socket, &name, exec.clone(), stdin).await {
                Ok(session) => {
                    let mode = if exec.tty.is_some() {
                        OnDisconnect::Hangup
                    } else {
                        OnDisconnect::Keep
                    };
                    pump(&engine, socket, &name, session, mode).await
                }
                Err(e) => {
                    let _ = socket.send(error_msg(&e)).await;
                }
            }
        })
    })
}

#[utoipa::path(get, path = "/v1/run/stream",
    description = "WebSocket: send {\"type\":\"run\",\"sandbox\":CreateSandboxRequest,\"exec\":ExecRequest,\"stdin\":bool}; the sandbox is created, runs the command as on exec/stream, and is destroyed when the command ends or the client leaves.",
    responses((status = 101, description = "switching to the WebSocket protocol")))]
pub(crate) async fn run_stream(
    State(engine): State<Arc<Engine>>,
    ws: WebSocketUpgrade,
) -> Response {
    // The upgraded connection runs in a task of its own: carry the caller's identity there.
    let actor = devbox_engine::current_actor();
    ws.on_upgrade(move |mut socket| {
        devbox_engine::ACTOR.scope(actor, async move {
            let Some(ClientMsg::Run {
                mut sandbox,
                exec,
                stdin,
            }) = first(&mut socket).await
            else {
                let e = EngineError::InvalidRequest(
                    "the first message must be {\"type\":\"run\",...}".into(),
                );
                let _ = socket.send(error_msg(&e)).await;
                return;
            };
            let named = sandbox.name.is_some()
                || sandbox
                    .manifest
                    .as_ref()
                    .is_some_and(|m| m.metadata.name.is_some());
            if !named {
                sandbox.name = Some(format!("run-{}", random_suffix()));
            }
            sandbox.start = true;
            let info = match engine.create_with(*sandbox, true).await {
                Ok(i) => i,
                Err(e) => {
                    let _ = socket.send(error_msg(&e)).await;
                    return;
                }
            };
            // Destroy whatever happens to the connection: run in a task of its own.
            let e2 = engine.clone();
            let name = info.name.clone();
            // The client hears the exit once the sandbox is gone.
            let actor = devbox_engine::current_actor();
            let _ = tokio::spawn(devbox_engine::ACTOR.scope(actor, async move {
                let mut socket = socket;
                let end = match exec_with_approval(&e2, &mut socket, &name, exec, stdin).await {
                    Ok(session) => {
                        pump_until_exit(&e2, socket, &name, session, OnDisconnect::Kill).await
                    }
                    Err(e) => {
                        let _ = socket.send(error_msg(&e)).await;
                        None
                    }
                };
                if let Err(e) = e2.destroy(&name, true).await {
                    tracing::warn!(sandbox = %name, "destroying a run sandbox: {e}");
                }
                if let Some(end) = end {
                    end.finish().await;
                }
            }))
            .await;
        })
    })
}

/// Starts the exec; when the checks require approval, tells the client and waits for the
/// decision (or the approval's expiry, or the client leaving), then runs it if approved.
async fn exec_with_approval(
    engine: &Arc<Engine>,
    socket: &mut WebSocket,
    name: &str,
    mut exec: devbox_engine::model::ExecRequest,
    stdin: bool,
) -> Result<ExecSession, EngineError> {
    match engine.exec(name, &exec, stdin).await {
        Err(EngineError::ApprovalRequired(a)) => {
            let id = a.id.clone();
            if socket
                .send(text(&ServerMsg::ApprovalRequired { approval: *a }))
                .await
                .is_err()
            {
                return Err(EngineError::InvalidRequest("the client went away".into()));
            }
            loop {
                let decided = tokio::select! {
                    d = engine.wait_approval(&id, std::time::Duration::from_secs(3600)) => d?,
                    m = socket.recv() => match m {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {
                            let _ = engine.withdraw_approval(&id).await;
                            return Err(EngineError::InvalidRequest("the client went away".into()));
                        }
                        Some(Ok(_)) => continue,
                    },
                };
                if decided.state == devbox_store::ApprovalState::Pending {
                    continue;
                }
                if decided.state != devbox_store::ApprovalState::Approved {
                    let reasons = if decided.state == devbox_store::ApprovalState::Expired {
                        vec![format!(
                            "approval {id} expired: nobody decided before {}",
                            decided.expires_at
                        )]
                    } else {
                        let state = serde_json::to_string(&decided.state).unwrap_or_default();
                        let mut reasons =
                            vec![format!("approval {id} was {}", state.trim_matches('"'))];
                        if let Some(by) = &decided.decided_by {
                            reasons[0].push_str(&format!(" by {by}"));
                        }
                        reasons.extend(decided.reason.clone());
                        reasons
                    };
                    return Err(EngineError::Denied { reasons });
                }
                exec.approval = Some(id.clone());
                return engine.exec(name, &exec, stdin).await;
            }
        }
        other => other,
    }
}

fn random_suffix() -> String {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What to do to the command when the client goes away before it ends.
#[derive(Clone, Copy)]
enum OnDisconnect {
    /// Leave it running (background work survives the client).
    Keep,
    /// SIGHUP it, as a closing terminal does.
    Hangup,
    /// SIGKILL it (one-shot runs).
    Kill,
}

/// Moves bytes between the WebSocket and the session until the command ends.
async fn pump(
    engine: &Arc<Engine>,
    socket: WebSocket,
    name: &str,
    session: ExecSession,
    on_disconnect: OnDisconnect,
) {
    if let Some(end) = pump_until_exit(engine, socket, name, session, on_disconnect).await {
        end.finish().await;
    }
}

/// The end of a stream: the final message, sent when the caller is done.
struct StreamEnd {
    last: Message,
    tx: mpsc::Sender<Message>,
    writer: tokio::task::JoinHandle<()>,
    input: tokio::task::JoinHandle<()>,
}

impl StreamEnd {
    async fn finish(self) {
        let _ = self.tx.send(self.last).await;
        let _ = self.tx.send(Message::Close(None)).await;
        drop(self.tx);
        let _ = self.writer.await;
        self.input.abort();
    }
}

/// Streams until the command exits; returns what is left to send.
async fn pump_until_exit(
    engine: &Arc<Engine>,
    socket: WebSocket,
    name: &str,
    session: ExecSession,
    on_disconnect: OnDisconnect,
) -> Option<StreamEnd> {
    let mut session = session;
    let (mut sink, mut stream) = socket.split();
    if sink
        .send(text(&ServerMsg::Started {
            sandbox: name.to_string(),
            pid: session.pid,
        }))
        .await
        .is_err()
    {
        return None;
    }
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let closing = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || closing {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let mut outputs = Vec::new();
    if let Some(r) = session.stdout.take() {
        outputs.push(tokio::spawn(drain(r, STDOUT, tx.clone())));
    }
    if let Some(r) = session.stderr.take() {
        outputs.push(tokio::spawn(drain(r, STDERR, tx.clone())));
    }
    let tty = session.tty.take();
    let mut stdin = session.stdin.take();
    let session = Arc::new(session);

    let (s2, tty2) = (session.clone(), tty.clone());
    let input = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(data) => {
                    if let Some(w) = stdin.as_mut() {
                        if w.write_all(&data).await.is_err() {
                            stdin = None;
                        }
                    } else if let Some(p) = &tty2 {
                        let mut w: &devbox_engine::Pty = p;
                        let _ = w.write_all(&data).await;
                    }
                }
                Message::Text(t) => match serde_json::from_str::<ClientMsg>(&t) {
                    Ok(ClientMsg::StdinEof) => stdin = None,
                    Ok(ClientMsg::Resize { rows, cols }) => {
                        if let Some(p) = &tty2 {
                            let _ = p.resize(rows, cols);
                        }
                    }
                    Ok(ClientMsg::Signal { signal }) => {
                        let _ = s2.signal(signal);
                    }
                    _ => {}
                },
                Message::Close(_) => break,
                _ => {}
            }
        }
        match on_disconnect {
            OnDisconnect::Keep => {}
            OnDisconnect::Hangup => {
                let _ = s2.signal(1);
            }
            OnDisconnect::Kill => {
                let _ = s2.signal(9);
            }
        }
    });

    let exit = session.wait().await;
    // Output ends with the command, unless its background children keep the pipes open:
    // wait only briefly for the rest.
    for o in outputs {
        let abort = o.abort_handle();
        if tokio::time::timeout(Duration::from_millis(200), o)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    let last = match exit {
        Ok(x) => match session.settle(engine, &x).await {
            Ok(rolled_back_to) => text(&ServerMsg::Exit {
                code: x.code,
                signal: x.signal,
                rolled_back_to,
            }),
            Err(e) => error_msg(&e),
        },
        Err(e) => error_msg(&e),
    };
    Some(StreamEnd {
        last,
        tx,
        writer,
        input,
    })
}

async fn drain(mut r: devbox_engine::Output, channel: u8, tx: mpsc::Sender<Message>) {
    while let Some(chunk) = r.recv().await {
        let mut frame = Vec::with_capacity(chunk.len() + 1);
        frame.push(channel);
        frame.extend_from_slice(&chunk);
        if tx.send(Message::Binary(frame.into())).await.is_err() {
            break;
        }
    }
}
