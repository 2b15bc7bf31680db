//! Streaming exec over WebSocket (see [`devbox_wire::stream`] for the protocol). The flows
//! (waiting for an approval, a one-shot run) are the engine's; this module moves messages.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, State};
use axum::response::Response;
use devbox_engine::{ApprovalInfo, ApprovalWait, Caller, Engine, EngineError, ExecSession};
use devbox_wire::stream::{ClientMsg, STDERR, STDOUT, ServerMsg};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::remote::ExecPermit;

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

pub(crate) async fn exec_stream(
    State(engine): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    permit: Option<Extension<ExecPermit>>,
    UrlPath(name): UrlPath<String>,
    ws: WebSocketUpgrade,
) -> Response {
    ws.on_upgrade(move |mut socket| async move {
        // A remote token's exec slot, held for as long as the exec runs.
        let _permit = permit;
        let Some(ClientMsg::Exec {
            exec,
            stdin,
            no_wait,
        }) = first(&mut socket).await
        else {
            let e = EngineError::InvalidRequest(
                "the first message must be {\"type\":\"exec\",...}".into(),
            );
            let _ = socket.send(error_msg(&e)).await;
            return;
        };
        let mode = if exec.tty.is_some() {
            OnDisconnect::Hangup
        } else {
            OnDisconnect::Keep
        };
        let started = engine
            .exec_approved(
                &caller,
                &name,
                exec,
                stdin,
                &mut WsWait(&mut socket, no_wait),
            )
            .await;
        match started {
            Ok(session) => pump(&engine, socket, &name, session, mode).await,
            Err(e) => {
                let _ = socket.send(error_msg(&e)).await;
            }
        }
    })
}

pub(crate) async fn run_stream(
    State(engine): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    permit: Option<Extension<ExecPermit>>,
    ws: WebSocketUpgrade,
) -> Response {
    ws.on_upgrade(move |mut socket| async move {
        let _permit = permit;
        let Some(ClientMsg::Run {
            sandbox,
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
        let run = match engine.run_create(&caller, *sandbox).await {
            Ok(r) => r,
            Err(e) => {
                let _ = socket.send(error_msg(&e)).await;
                return;
            }
        };
        // Destroy whatever happens to the connection: run in a task of its own. The client
        // hears the exit once the sandbox is gone.
        let _ = tokio::spawn(async move {
            let mut socket = socket;
            let end = match run.exec(exec, stdin, &mut WsWait(&mut socket, false)).await {
                Ok(session) => {
                    pump_until_exit(&engine, socket, run.name(), session, OnDisconnect::Kill).await
                }
                Err(e) => {
                    let _ = socket.send(error_msg(&e)).await;
                    None
                }
            };
            run.destroy().await;
            if let Some(end) = end {
                end.finish().await;
            }
        })
        .await;
    })
}

/// An exec stream waiting for an approval: the client hears of it, and leaving withdraws it
/// (unless it asked not to wait: then the approval stays pending).
struct WsWait<'a>(&'a mut WebSocket, bool);

impl ApprovalWait for WsWait<'_> {
    async fn pending(&mut self, approval: &ApprovalInfo) -> bool {
        let msg = text(&ServerMsg::ApprovalRequired {
            approval: approval.clone(),
        });
        self.0.send(msg).await.is_ok()
    }

    fn leave_pending(&self) -> bool {
        self.1
    }

    async fn gone(&mut self) {
        loop {
            match self.0.recv().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    }
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
                timed_out: x.timed_out,
                oom_killed: x.oom_killed,
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
