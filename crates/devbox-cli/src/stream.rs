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

/// Whether stdin should be passed to the command: only when asked (`-i`), as docker and
/// podman do; /dev/null has nothing to give even then.
pub fn want_stdin(interactive: bool) -> bool {
    interactive && !stdin_is_dev_null()
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

/// What the CLI does while an exec waits for an approval.
#[derive(Debug, Default)]
pub struct ApprovalWaiting {
    /// Give up (withdrawing it) after this long; none: wait until it is decided.
    pub wait: Option<std::time::Duration>,
    /// How to run the command once approved: the text before the approval's id and after
    /// it (the command quoted as shell words, so the line is safe to paste).
    pub resume: (String, String),
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
    approval: ApprovalWaiting,
) -> Result<i32, ClientError> {
    let signals =
        Signals::register().map_err(|e| ClientError::Protocol(format!("signals: {e}")))?;
    let mut signals = signals;
    let no_wait = matches!(first, ClientMsg::Exec { no_wait: true, .. });
    let pending = std::sync::Mutex::new(None::<String>);
    let started = client.stream(path, &first, |a| {
        if let Ok(mut p) = pending.lock() {
            *p = Some(a.id.clone());
        }
        // On stderr whatever stdout is: a script's log shows why the command has not run.
        eprintln!(
            "sandbox: {} approval {} ({}): {}\nsandbox: approve with `sandbox approve {}`, or deny with `sandbox deny {}`",
            if no_wait { "the command needs" } else { "waiting for" },
            a.id,
            a.risk,
            a.reasons.join("; "),
            a.id,
            a.id
        );
        if no_wait {
            eprintln!(
                "sandbox: once approved, run it with `{}{}{}`",
                approval.resume.0, a.id, approval.resume.1
            );
        }
    });
    let waited = async {
        match approval.wait {
            Some(d) => {
                // The clock runs from the approval request on.
                loop {
                    if pending.lock().map(|p| p.is_some()).unwrap_or(false) {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                tokio::time::sleep(d).await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    // Until the command starts (it may wait for an approval), an interrupt just leaves.
    let (ws, _sandbox, _pid) = tokio::select! {
        r = started => match r {
            Err(ClientError::Api { code, .. }) if no_wait && code == "approval_required" => {
                return Ok(2);
            }
            other => other?,
        },
        () = waited => {
            let id = pending.lock().ok().and_then(|p| p.clone()).unwrap_or_default();
            eprintln!(
                "sandbox: gave up waiting for approval {id} after {}; it is withdrawn",
                approval.wait.map(|d| format!("{d:?}")).unwrap_or_default()
            );
            return Ok(2);
        }
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
