//! The CLI's side of an exec stream: forwards stdin, terminal size and signals; writes output
//! as it arrives; returns the command's exit code.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;

use devbox_client::{Client, ClientError};
use devbox_wire::stream::{ClientMsg, STDERR, STDOUT, ServerMsg};
use futures_util::{SinkExt, StreamExt};
use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Puts the terminal on stdin in raw mode until dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// The size of the terminal on stdout (or stdin).
pub fn terminal_size() -> Option<(u16, u16)> {
    rustix::termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin()))
        .ok()
        .map(|w| (w.ws_row, w.ws_col))
        .filter(|(r, c)| *r > 0 && *c > 0)
}

/// Whether stdin should be passed to the command: when asked, or when it is a pipe or a file
/// (not a terminal, and not /dev/null, which has nothing to give).
pub fn want_stdin(interactive: bool, tty: bool) -> bool {
    interactive || tty || (!std::io::stdin().is_terminal() && !stdin_is_dev_null())
}

fn stdin_is_dev_null() -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(a), Ok(b)) = (
        std::fs::metadata("/proc/self/fd/0"),
        std::fs::metadata("/dev/null"),
    ) else {
        return false;
    };
    a.rdev() == b.rdev() && a.ino() == b.ino()
}

fn text(m: &ClientMsg) -> Message {
    Message::Text(serde_json::to_string(m).unwrap_or_default().into())
}

/// Signals forwarded to the command, registered before it starts so none is missed.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    winch: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            winch: signal(SignalKind::window_change())?,
        })
    }
}

/// Runs a stream to its end; returns the exit code to exit with.
pub async fn run(
    client: &Client,
    path: &str,
    first: ClientMsg,
    tty: bool,
    stdin: bool,
) -> Result<i32, ClientError> {
    let signals =
        Signals::register().map_err(|e| ClientError::Protocol(format!("signals: {e}")))?;
    let mut signals = signals;
    let started = client.stream(path, &first, |a| {
        eprintln!(
            "sandbox: waiting for approval {} ({}): {}\nsandbox: approve with `sandbox approve {}`, or deny with `sandbox deny {}`",
            a.id,
            a.risk,
            a.reasons.join("; "),
            a.id,
            a.id
        );
    });
    // Until the command starts (it may wait for an approval), an interrupt just leaves.
    let (ws, _sandbox, _pid) = tokio::select! {
        r = started => r?,
        _ = signals.int.recv() => return Ok(130),
        _ = signals.term.recv() => return Ok(143),
        _ = signals.hup.recv() => return Ok(129),
    };
    let raw = if tty && std::io::stdin().is_terminal() {
        RawMode::enter()
    } else {
        None
    };
    let result = pump(ws, tty, stdin, signals).await;
    drop(raw);
    result
}

async fn pump(
    ws: devbox_client::ExecStream,
    tty: bool,
    stdin: bool,
    signals: Signals,
) -> Result<i32, ClientError> {
    let protocol = |e: String| ClientError::Protocol(e);
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(32);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut tasks = Vec::new();
    if stdin {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(text(&ClientMsg::StdinEof)).await;
                        break;
                    }
                    Ok(n) => {
                        if tx
                            .send(Message::Binary(buf[..n].to_vec().into()))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        }));
    }
    {
        let tx = tx.clone();
        let Signals {
            mut int,
            mut term,
            mut hup,
            mut winch,
        } = signals;
        tasks.push(tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = int.recv() => ClientMsg::Signal { signal: libc::SIGINT },
                    _ = term.recv() => ClientMsg::Signal { signal: libc::SIGTERM },
                    _ = hup.recv() => ClientMsg::Signal { signal: libc::SIGHUP },
                    _ = winch.recv() => match terminal_size() {
                        Some((rows, cols)) if tty => ClientMsg::Resize { rows, cols },
                        _ => continue,
                    },
                };
                if tx.send(text(&msg)).await.is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    let code = loop {
        match stream.next().await {
            Some(Ok(Message::Binary(data))) if !data.is_empty() => {
                let payload = &data[1..];
                match data[0] {
                    STDOUT => {
                        // A closed stdout (`| head`) ends our interest in the output, not the command.
                        let _ = out.write_all(payload).and_then(|_| out.flush());
                    }
                    STDERR => {
                        let _ = err.write_all(payload);
                    }
                    _ => {}
                }
            }
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMsg>(&t) {
                Ok(ServerMsg::Exit {
                    code,
                    rolled_back_to,
                    timed_out,
                    oom_killed,
                    ..
                }) => {
                    if timed_out {
                        let _ = writeln!(
                            err,
                            "sandbox: the command timed out: it and every process it started were killed (exit 124)"
                        );
                    }
                    if oom_killed {
                        let _ = writeln!(
                            err,
                            "sandbox: the command was killed by the kernel's out-of-memory killer: the sandbox reached its memory limit (raise it with `sandbox update NAME --memory SIZE`)"
                        );
                    }
                    if let Some(snap) = rolled_back_to {
                        let _ = writeln!(
                            err,
                            "sandbox: the command failed (exit {code}); the sandbox was rolled back to snapshot {snap}"
                        );
                    }
                    break code;
                }
                Ok(ServerMsg::Error { code, message }) => {
                    return Err(ClientError::Api {
                        status: 0,
                        code,
                        message,
                    });
                }
                _ => {}
            },
            Some(Ok(Message::Close(_))) | None => {
                return Err(protocol(
                    "the daemon closed the stream before the command ended".into(),
                ));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(protocol(format!("stream: {e}"))),
        }
    };
    for t in tasks {
        t.abort();
    }
    writer.abort();
    Ok(code)
}
