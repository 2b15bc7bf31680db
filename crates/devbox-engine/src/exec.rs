//! Running commands in sandboxes: an [`ExecSession`] streams a process's stdio and exit.

use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use devbox_backend::{ExecSpec, Io, ProcessControl};
use devbox_image::HOST_IMAGE;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::pipe;

use std::sync::atomic::{AtomicU64, Ordering};

use devbox_store::{ExecRecord, SandboxRecord};

use crate::model::ExecRequest;
use crate::sandbox::new_id;
use crate::{Caller, Engine, EngineError, Result};

/// The ends of a started command the session takes: its terminal, or its pipes.
struct StartedIo {
    control: Arc<dyn ProcessControl>,
    tty: Option<OwnedFd>,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecExit {
    /// Exit code (128 + signal when killed by one).
    pub code: i32,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// Its timeout ended it: it and everything it started were killed; `code` is 124.
    #[serde(default)]
    pub timed_out: bool,
    /// The kernel's OOM killer killed it (the sandbox reached its memory limit).
    #[serde(default)]
    pub oom_killed: bool,
}

/// What tells an OOM kill of an exec: the sandbox's OOM kill count when it started.
struct OomProbe {
    backend: Arc<dyn devbox_backend::Backend>,
    inst: devbox_backend::Instance,
    before: u64,
}

/// A terminal's master side, readable and writable asynchronously.
#[derive(Debug)]
pub struct Pty {
    fd: AsyncFd<OwnedFd>,
    /// The command's control, which resizes it.
    control: Arc<dyn ProcessControl>,
}

impl Pty {
    fn new(fd: OwnedFd, control: Arc<dyn ProcessControl>) -> io::Result<Self> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Self {
            fd: crate::os::async_fd(
                fd,
                tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
            )?,
            control,
        })
    }

    /// Resizes the terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        self.control.resize(rows, cols)
    }
}

impl AsyncRead for &Pty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| {
                nix::unistd::read(inner.get_ref(), unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // EIO: the terminal's last user closed it; that is the end of the stream.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for &Pty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard
                .try_io(|inner| nix::unistd::write(inner.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Output of a command, as it is produced (also written to the exec's log).
#[derive(Debug)]
pub struct Output {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
}

impl Output {
    /// The next chunk; `None` at the end.
    pub async fn recv(&mut self) -> Option<bytes::Bytes> {
        self.rx.recv().await
    }
}

/// Most output kept in an exec's log, per stream.
pub const MAX_LOG: u64 = 16 << 20;

/// Reads `src` to its end: every chunk goes to the log file (up to [`MAX_LOG`]) and to the
/// returned channel while someone listens.
fn tee<R>(mut src: R, log: std::path::PathBuf, counter: Arc<AtomicU64>) -> Output
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut file = None;
        let mut buf = vec![0u8; 32 * 1024];
        let mut listening = true;
        loop {
            let n = match src.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = bytes::Bytes::copy_from_slice(&buf[..n]);
            let kept = counter.load(Ordering::Relaxed);
            if kept < MAX_LOG {
                if file.is_none() {
                    if let Some(dir) = log.parent() {
                        let _ = tokio::fs::create_dir_all(dir).await;
                    }
                    file = tokio::fs::File::create(&log).await.ok();
                }
                if let Some(f) = file.as_mut() {
                    let take = n.min((MAX_LOG - kept) as usize);
                    if f.write_all(&chunk[..take]).await.is_ok() {
                        counter.fetch_add(take as u64, Ordering::Relaxed);
                    }
                }
            }
            // A client that went away does not stop the command: its output still goes to the log.
            if listening && tx.send(chunk).await.is_err() {
                listening = false;
            }
        }
        if let Some(mut f) = file {
            let _ = f.flush().await;
        }
    });
    Output { rx }
}

/// Reads a terminal through a shared handle.
struct PtyReader(Arc<Pty>);

impl AsyncRead for PtyReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut r: &Pty = &self.0;
        Pin::new(&mut r).poll_read(cx, buf)
    }
}

/// Exec and audit records written after the client has its answer. Readers of the audit
/// log and of exec logs wait until none is in flight, so what an exec did is there as soon
/// as its client saw it end.
#[derive(Debug, Default)]
pub(crate) struct Bookkeeping {
    in_flight: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One write in flight; dropping it ends it.
pub(crate) struct BookkeepingToken(Arc<Engine>);

impl Drop for BookkeepingToken {
    fn drop(&mut self) {
        let b = &self.0.bookkeeping;
        if b.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            b.idle.notify_waiters();
        }
    }
}

impl Bookkeeping {
    pub(crate) fn begin(&self, engine: &Arc<Engine>) -> BookkeepingToken {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        BookkeepingToken(engine.clone())
    }

    /// Waits until no write is in flight (at most a few seconds: a stuck write does not
    /// stop the readers).
    pub(crate) async fn settled(&self) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}

/// A running command. Read its output, feed its input, then [`ExecSession::wait`].
pub struct ExecSession {
    /// Pid inside the sandbox.
    pub pid: i32,
    /// The command's stdin (when asked for, without a tty).
    pub stdin: Option<pipe::Sender>,
    /// The command's output (with a tty: the terminal's).
    pub stdout: Option<Output>,
    /// The command's stderr (without a tty).
    pub stderr: Option<Output>,
    /// The terminal (with a tty): write to it, resize it.
    pub tty: Option<Arc<Pty>>,
    conn: AsyncFd<crate::os::Ready>,
    sandbox: String,
    /// Snapshot taken before the command, to roll back to if it fails.
    guard: Option<String>,
    engine: Arc<Engine>,
    /// Who started the command: its end and rollback are recorded as theirs.
    caller: Caller,
    record: std::sync::Mutex<ExecRecord>,
    /// The exec record's insertion (in the background); its end is recorded after it.
    inserted: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    started: std::time::Instant,
    out_bytes: Arc<AtomicU64>,
    err_bytes: Arc<AtomicU64>,
    /// When the exec's timeout kills it.
    deadline: Option<tokio::time::Instant>,
    timed_out: std::sync::atomic::AtomicBool,
    oom: Option<OomProbe>,
    /// Known to `ps` while the session lives.
    _live: crate::stats::LiveExec,
}

impl std::fmt::Debug for ExecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSession")
            .field("pid", &self.pid)
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

impl ExecSession {
    /// Waits for the command to end. At its deadline (an exec timeout), the command and
    /// everything it started are killed, and it ends with code 124 and `timed_out`.
    pub async fn wait(&self) -> Result<ExecExit> {
        loop {
            let readable = self.conn.readable();
            let deadline = self
                .deadline
                .filter(|_| !self.timed_out.load(Ordering::SeqCst));
            let ready = match deadline {
                Some(at) => tokio::select! {
                    r = readable => Some(r),
                    () = tokio::time::sleep_until(at) => None,
                },
                None => Some(readable.await),
            };
            let Some(ready) = ready else {
                self.timed_out.store(true, Ordering::SeqCst);
                let control = self.conn.get_ref().0.clone();
                let killed = tokio::task::spawn_blocking(move || control.kill_tree())
                    .await
                    .map_err(|e| EngineError::internal("exec timeout", e))?;
                if let Err(e) = killed {
                    tracing::warn!(sandbox = %self.sandbox, "killing a timed-out exec: {e}");
                }
                continue;
            };
            let mut guard = ready.map_err(|e| EngineError::internal("exec", e))?;
            match guard.try_io(|c| c.get_ref().0.try_wait()) {
                Ok(Ok(Some(ended))) => {
                    let timed_out = self.timed_out.load(Ordering::SeqCst);
                    let oom_killed = !timed_out && self.oom_killed(ended.code, ended.signal).await;
                    let exit = ExecExit {
                        code: if timed_out { 124 } else { ended.code },
                        signal: ended.signal,
                        timed_out,
                        oom_killed,
                    };
                    self.finish(Some(&exit), ended.cpu_usec, ended.max_rss_kib);
                    return Ok(exit);
                }
                Ok(Ok(None)) => {
                    self.finish(None, 0, 0);
                    return Err(EngineError::WrongState(
                        "the sandbox stopped while the command ran".into(),
                    ));
                }
                Ok(Err(e)) => return Err(EngineError::internal("exec", e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// Whether the OOM killer ended a command that ended with `code` and `signal`.
    async fn oom_killed(&self, code: i32, signal: Option<i32>) -> bool {
        let Some(probe) = &self.oom else {
            return false;
        };
        if !crate::limits::oom_killed(code, signal, probe.before, probe.before + 1) {
            return false;
        }
        let (backend, inst) = (probe.backend.clone(), probe.inst.clone());
        let after = tokio::task::spawn_blocking(move || backend.oom_kills(&inst))
            .await
            .ok()
            .flatten()
            .unwrap_or(probe.before);
        crate::limits::oom_killed(code, signal, probe.before, after)
    }

    /// Records how the command ended, in the exec record and the audit log (in the
    /// background: the client does not wait for it).
    fn finish(&self, exit: Option<&ExecExit>, cpu_usec: u64, max_rss_kib: u64) {
        let mut rec = self
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        rec.ended_at = Some(devbox_store::now_ms());
        rec.exit_code = exit.map(|x| x.code);
        rec.cpu_usec = Some(cpu_usec);
        rec.max_rss_kib = Some(max_rss_kib);
        rec.stdout_bytes = self.out_bytes.load(Ordering::Relaxed);
        rec.stderr_bytes = self.err_bytes.load(Ordering::Relaxed);
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let (timed_out, oom_killed) = exit.map_or((false, false), |x| (x.timed_out, x.oom_killed));
        let inserted = self
            .inserted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let caller = self.caller.clone();
        self.engine.later(inserted, move |e| {
            e.store.finish_exec(&rec)?;
            e.audit(
                &caller,
                "exec",
                Some(&rec.sandbox),
                serde_json::json!({
                    "exec": rec.id, "command": rec.command, "decision": rec.decision, "exit_code": rec.exit_code,
                    "duration_ms": duration_ms, "cpu_usec": rec.cpu_usec, "max_rss_kib": rec.max_rss_kib,
                    "timed_out": timed_out, "oom_killed": oom_killed,
                }),
            );
            Ok(())
        });
    }

    /// After the command ended: rolls the sandbox back if it failed under
    /// `rollback_on_failure`, as the exec's caller. Returns the snapshot's name when it did.
    pub async fn settle(&self, engine: &Arc<Engine>, exit: &ExecExit) -> Result<Option<String>> {
        let Some(guard) = self.guard.clone() else {
            return Ok(None);
        };
        if exit.code == 0 {
            return Ok(None);
        }
        let name = self.sandbox.clone();
        let caller = self.caller.clone();
        engine
            .blocking(move |e| {
                let lock = e.locks.get(&name);
                let _g = lock.blocking_lock();
                let mut rec = e.record(&name)?;
                let snap = e
                    .store
                    .snapshot(&guard)?
                    .ok_or_else(|| EngineError::invariant("the guard snapshot is gone"))?;
                let r = e.rollback_locked(&caller, &mut rec, &snap, &[]);
                e.audit_result(
                    &caller,
                    "sandbox.rollback",
                    Some(&name),
                    serde_json::json!({"rollback": {"to": snap.name, "paths": []}, "because": "the command failed (--rollback-on-failure)"}),
                    &r,
                );
                r?;
                Ok(Some(snap.name))
            })
            .await
    }

    /// Sends a signal to the command.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.conn
            .get_ref()
            .0
            .signal(signal)
            .map_err(|e| EngineError::internal("signal", e))
    }
}

impl Engine {
    /// The environment, working directory and user of a process started in a sandbox: the
    /// image's, then the spec's, then the request's (`extra_env`, `workdir`, `user`).
    pub(crate) fn process_context(
        &self,
        rec: &devbox_store::SandboxRecord,
        manifest: &devbox_spec::SandboxManifest,
        extra_env: &std::collections::BTreeMap<String, String>,
        workdir: Option<String>,
        user: Option<String>,
    ) -> Result<(Vec<String>, String, Option<String>)> {
        let image_cfg = if rec.image_id == HOST_IMAGE {
            devbox_image::ImageConfig::default()
        } else {
            self.store
                .images()?
                .into_iter()
                .find(|i| i.id == rec.image_id)
                .and_then(|i| serde_json::from_str(&i.config).ok())
                .unwrap_or_default()
        };
        let mut env: Vec<String> = image_cfg.env.clone();
        let mut set = |k: &str, v: &str| {
            env.retain(|e| e.split_once('=').map(|(key, _)| key) != Some(k));
            env.push(format!("{k}={v}"));
        };
        set(
            "HOSTNAME",
            manifest.spec.hostname.as_deref().unwrap_or(&rec.name),
        );
        for (k, v) in manifest.spec.env.iter().chain(extra_env.iter()) {
            if k.is_empty() || k.contains('=') {
                return Err(EngineError::InvalidRequest(format!(
                    "bad environment variable name {k:?}"
                )));
            }
            set(k, v);
        }
        let default_dir = if rec.image_id == HOST_IMAGE {
            "/work"
        } else {
            "/"
        };
        let cwd = workdir
            .or(manifest.spec.workdir.clone())
            .or(image_cfg.workdir.clone())
            .unwrap_or(default_dir.into());
        if !cwd.starts_with('/') {
            return Err(EngineError::InvalidRequest(format!(
                "workdir {cwd:?} must be an absolute path"
            )));
        }
        let user = user
            .or(manifest.spec.user.clone())
            .or(image_cfg.user.clone());
        Ok((env, cwd, user))
    }

    /// Starts a command in a running sandbox. With `want_stdin`, the session's `stdin` is
    /// connected; otherwise the command reads from /dev/null. Checked, recorded and audited
    /// as `caller`'s.
    pub async fn exec(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        req: &ExecRequest,
        want_stdin: bool,
    ) -> Result<ExecSession> {
        let started = std::time::Instant::now();
        let r = self.exec_unmeasured(caller, name, req, want_stdin).await;
        self.metrics.observe("exec", started, r.is_ok());
        r
    }

    async fn exec_unmeasured(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        req: &ExecRequest,
        want_stdin: bool,
    ) -> Result<ExecSession> {
        let argv = req.resolved_argv()?;
        let lock = self.locks.get(name);
        let _guard = lock.lock().await;
        // The command checks come first: nothing happens for a command that may not run.
        // The record and the check share one trip to the blocking pool.
        let text = req
            .command
            .clone()
            .unwrap_or_else(|| crate::checks::shell_join(&argv));
        let (rec, decision) = self.record_and_check(caller, name, req, &text).await?;
        let manifest = Self::manifest_of(&rec)?;
        let (backend, inst) = self.backend_of(&rec)?;
        if req.tty.is_some() && !backend.capabilities().pty {
            return Err(EngineError::InvalidRequest(format!(
                "sandbox {} runs on the {} backend, which has no terminals: leave out the tty",
                rec.name,
                backend.kind()
            )));
        }
        let backend = backend.clone();
        let guard = self
            .snapshot_before_exec(caller, &rec, &manifest, req)
            .await?;
        let (env, cwd, user) = self.process_context(
            &rec,
            &manifest,
            &req.env,
            req.workdir.clone(),
            req.user.clone(),
        )?;
        let tty = req.tty.map(|t| (t.rows, t.cols));
        let timeout = crate::limits::exec_timeout(req.timeout.as_deref(), &manifest)?;
        let spec = ExecSpec {
            argv,
            env,
            cwd,
            user,
            tty,
            stdin: if want_stdin && tty.is_none() {
                Io::Pipe
            } else {
                Io::Null
            },
            stdout: Io::Pipe,
            stderr: Io::Pipe,
            start_timeout: None,
            track_tree: timeout.is_some(),
        };
        let (started, oom) = tokio::task::spawn_blocking(move || {
            let before = backend.oom_kills(&inst);
            let started = backend.exec(&inst, spec)?;
            let oom = before.map(|before| OomProbe {
                backend,
                inst,
                before,
            });
            Ok::<_, devbox_backend::BackendError>((started, oom))
        })
        .await
        .map_err(|e| EngineError::internal("exec task", e))??;
        let control = started.control.clone();
        let started_io = StartedIo {
            control,
            tty: started.tty,
            stdin: started.stdin,
            stdout: started.stdout,
            stderr: started.stderr,
        };
        let conn = crate::os::async_ready(crate::os::Ready(started.control))
            .map_err(|e| EngineError::internal("exec", e))?;
        let pid = started.pid;
        let exec_id = new_id();
        let record = ExecRecord {
            id: exec_id.clone(),
            sandbox: rec.name.clone(),
            command: text.clone(),
            decision: decision.clone(),
            actor: caller.name().to_string(),
            started_at: devbox_store::now_ms(),
            ended_at: None,
            exit_code: None,
            cpu_usec: None,
            max_rss_kib: None,
            stdout_bytes: 0,
            stderr_bytes: 0,
        };
        let inserted = {
            let r = record.clone();
            self.later(None, move |e| Ok(e.store.insert_exec(&r)?))
        };
        let mut session = ExecSession {
            pid,
            stdin: None,
            stdout: None,
            stderr: None,
            tty: None,
            conn,
            sandbox: rec.name.clone(),
            guard,
            engine: self.clone(),
            caller: caller.clone(),
            record: std::sync::Mutex::new(record),
            inserted: std::sync::Mutex::new(Some(inserted)),
            started: std::time::Instant::now(),
            out_bytes: Arc::new(AtomicU64::new(0)),
            err_bytes: Arc::new(AtomicU64::new(0)),
            deadline: timeout.map(|t| tokio::time::Instant::now() + t),
            timed_out: std::sync::atomic::AtomicBool::new(false),
            oom,
            _live: self.monitor.exec_started(&rec.id, &exec_id, pid),
        };
        self.connect_session_io(&mut session, &rec.name, &exec_id, started_io, tty.is_some())?;
        Ok(session)
    }

    /// The sandbox's record, refused unless it can run a command, and the command checks'
    /// decision, in one trip to the blocking pool.
    async fn record_and_check(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        req: &ExecRequest,
        text: &str,
    ) -> Result<(SandboxRecord, String)> {
        let (name, t, a) = (name.to_string(), text.to_string(), req.approval.clone());
        let request = serde_json::to_string(req).unwrap_or_default();
        let caller = caller.clone();
        self.blocking(move |e| {
            let mut rec = e.record(&name)?;
            // A sandbox the idle handling put to sleep is woken once the command may run.
            let asleep = e.asleep(&rec);
            if !rec.state.can_exec() && !asleep {
                return Err(EngineError::WrongState(format!(
                    "sandbox {} is {}: start it with `sandbox start {}`",
                    rec.name,
                    serde_json::to_string(&rec.state)
                        .unwrap_or_default()
                        .trim_matches('"'),
                    rec.name
                )));
            }
            let decision = e.check_exec(&caller, &rec, &t, &request, a.as_deref())?;
            e.wake_locked(&caller, &mut rec, "exec")?;
            Ok((rec, decision))
        })
        .await
    }

    /// The snapshot taken before a command runs: automatic (the spec's
    /// rollback.autoSnapshot) or the guard of --rollback-on-failure, whose id is returned.
    async fn snapshot_before_exec(
        self: &Arc<Self>,
        caller: &Caller,
        rec: &SandboxRecord,
        manifest: &devbox_spec::SandboxManifest,
        req: &ExecRequest,
    ) -> Result<Option<String>> {
        // Auto-snapshots (the spec's rollback.autoSnapshot) and guards of
        // --rollback-on-failure are taken before the command runs.
        let auto = manifest.spec.rollback.auto_snapshot;
        Ok(if auto || req.rollback_on_failure {
            let keep = manifest
                .spec
                .rollback
                .keep
                .unwrap_or(crate::snapshots::DEFAULT_KEEP);
            let max_age = manifest
                .spec
                .rollback
                .max_age_seconds()
                .map_err(EngineError::InvalidSpec)?;
            let mut r = rec.clone();
            let caller = caller.clone();
            let snap = self
                .blocking(move |e| {
                    let snap =
                        e.snapshot_locked(&mut r, crate::model::SnapshotRequest::default(), true);
                    let why = if auto {
                        "automatic snapshot before an exec (rollback.autoSnapshot)"
                    } else {
                        "guard before an exec (--rollback-on-failure)"
                    };
                    e.audit_result(
                        &caller,
                        "snapshot.create",
                        Some(&r.name),
                        serde_json::json!({"snapshot": {"name": snap.as_ref().ok().map(|s| s.name.clone())}, "because": why}),
                        &snap,
                    );
                    let snap = snap?;
                    if let Err(err) = e.prune_auto(&caller, &r, keep.max(1), max_age) {
                        tracing::warn!(sandbox = %r.name, "pruning automatic snapshots: {err}");
                    }
                    Ok(snap)
                })
                .await?;
            req.rollback_on_failure.then_some(snap.id)
        } else {
            None
        })
    }

    /// Hands the started command's terminal or pipes to the session, each output teed to the
    /// exec's log file.
    fn connect_session_io(
        &self,
        session: &mut ExecSession,
        sandbox: &str,
        exec_id: &str,
        io: StartedIo,
        want_tty: bool,
    ) -> Result<()> {
        let out_log = self.exec_log_path(sandbox, exec_id, "stdout");
        let err_log = self.exec_log_path(sandbox, exec_id, "stderr");
        let io_err = |e: io::Error| EngineError::internal("exec pipes", e);
        if let Some(master) = io.tty {
            let pty = Arc::new(
                Pty::new(master, io.control).map_err(|e| EngineError::internal("terminal", e))?,
            );
            session.stdout = Some(tee(
                PtyReader(pty.clone()),
                out_log,
                session.out_bytes.clone(),
            ));
            session.tty = Some(pty);
        } else if want_tty {
            return Err(EngineError::invariant("the agent sent no terminal"));
        } else {
            if let Some(w) = io.stdin {
                session.stdin = Some(pipe::Sender::from_owned_fd(w).map_err(io_err)?);
            }
            if let Some(r) = io.stdout {
                let rx = pipe::Receiver::from_owned_fd(r).map_err(io_err)?;
                session.stdout = Some(tee(rx, out_log, session.out_bytes.clone()));
            }
            if let Some(r) = io.stderr {
                let rx = pipe::Receiver::from_owned_fd(r).map_err(io_err)?;
                session.stderr = Some(tee(rx, err_log, session.err_bytes.clone()));
            }
        }
        Ok(())
    }
}
