//! Health checks and idle handling of running sandboxes (`spec.healthcheck`, `spec.idle`).
//!
//! Each running sandbox whose spec has either gets one supervisor: a tokio task started
//! with its exit watch (at launch, and when a restarted daemon adopts it) and ended when the
//! sandbox stops, is destroyed or starts again (its entry in [`Supervisors`] goes away, which
//! closes the task's channel), so no task outlives its sandbox.
//!
//! Health: the task runs the check every interval as the system caller `health`, through the
//! command checks (it must be allowed outright, like the main process) and the backend's
//! exec, killed (with everything it started) at its timeout. Checks are not exec records
//! and not `exec` audit records (one every few seconds per sandbox would bury the log);
//! they are counted in the sandbox's health (`checks`, `failures`, the last exit and output),
//! and a change of state is recorded as `health.status`. Output is the sandbox's: at most
//! [`OUTPUT_KEEP`] bytes are kept (the rest is read and dropped), control characters escaped.
//! Snapshots taken while the sandbox is healthy get the label [`HEALTHY_LABEL`]; the
//! `rollback` action goes back to the newest of them.
//!
//! Idle: a sandbox with no exec open and none started for `idle.after` is frozen (cgroup
//! freezer) or stopped. An exec wakes it before it runs (thaw, or start), recorded as
//! `idle.wake` with what woke it and how long that took; a snapshot wakes a frozen one too,
//! and a stop thaws it first. Health checks neither count as use nor run while it is frozen.
//! A stop by idleness leaves a marker (`idle-stopped/<id>` in the state directory) so that
//! the next exec starts the sandbox, also after a daemon restart.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devbox_backend::{ExecSpec, Io};
use devbox_safety::Verdict;
use devbox_spec::{IdleAction, OnUnhealthy, ResolvedHealthcheck, SandboxManifest};
use devbox_store::{SandboxRecord, SandboxState, SnapshotState, now_ms};
use devbox_wire::{HealthInfo, HealthStatus, IdleInfo};
use tokio::io::AsyncReadExt;

use crate::{Caller, Engine, EngineError, Result};

/// Bytes of a check's output kept (shown in inspect and in `health.status`).
pub(crate) const OUTPUT_KEEP: usize = 1024;
/// The label of snapshots taken while their sandbox was healthy.
pub const HEALTHY_LABEL: &str = "devbox.io/health";

/// What one sandbox's supervisor knows.
#[derive(Debug)]
struct Entry {
    /// Dropped (with the entry) to end the task.
    _stop: tokio::sync::watch::Sender<()>,
    name: String,
    health: Option<Health>,
    idle: Option<Idle>,
}

#[derive(Debug, Clone)]
struct Health {
    status: HealthStatus,
    failures: u32,
    checks: u64,
    last_check: Option<i64>,
    last_exit: Option<i32>,
    last_output: Option<String>,
    /// Status records written in the current minute, and changes not recorded in it.
    records: (Instant, u32, u32),
}

/// Most `health.status` records a sandbox gets a minute: a check the sandbox makes pass and
/// fail in turn must not flood the audit log (and the events and webhooks behind it).
const HEALTH_RECORDS_A_MINUTE: u32 = 20;

#[derive(Debug, Clone, Copy)]
struct Idle {
    last_active: Instant,
    frozen: bool,
    /// Connections to its published ports open now.
    conns: u32,
}

/// The supervisors of running sandboxes, by sandbox id.
#[derive(Debug, Default)]
pub(crate) struct Supervisors {
    map: Mutex<HashMap<String, Entry>>,
}

impl Supervisors {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the sandbox's supervisor (if any).
    pub(crate) fn end(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Notes a use of the sandbox (an exec started).
    pub(crate) fn touch(&self, id: &str) {
        if let Some(Entry {
            idle: Some(idle), ..
        }) = self.lock().get_mut(id)
        {
            idle.last_active = Instant::now();
        }
    }

    /// Whether the idle handling froze the sandbox.
    pub(crate) fn frozen(&self, id: &str) -> bool {
        matches!(
            self.lock().get(id),
            Some(Entry {
                idle: Some(Idle { frozen: true, .. }),
                ..
            })
        )
    }

    /// Whether something uses the sandbox now: a connection to a published port.
    fn connected(&self, id: &str) -> bool {
        matches!(self.lock().get(id), Some(Entry { idle: Some(i), .. }) if i.conns > 0)
    }

    fn name_of(&self, id: &str) -> Option<String> {
        self.lock().get(id).map(|e| e.name.clone())
    }

    /// Counts a connection (and a use) until the guard is dropped.
    fn connection(&self, engine: &Arc<Engine>, id: &str) -> ConnGuard {
        if let Some(Entry {
            idle: Some(idle), ..
        }) = self.lock().get_mut(id)
        {
            idle.conns += 1;
            idle.last_active = Instant::now();
            return ConnGuard(Some((Arc::downgrade(engine), id.to_string())));
        }
        ConnGuard(None)
    }

    fn set_frozen(&self, id: &str, frozen: bool) {
        if let Some(Entry {
            idle: Some(idle), ..
        }) = self.lock().get_mut(id)
        {
            idle.frozen = frozen;
            idle.last_active = Instant::now();
        }
    }

    /// Whether the sandbox is healthy now (its snapshots get [`HEALTHY_LABEL`]).
    pub(crate) fn healthy(&self, id: &str) -> bool {
        matches!(
            self.lock().get(id),
            Some(Entry {
                health: Some(Health {
                    status: HealthStatus::Healthy,
                    ..
                }),
                ..
            })
        )
    }

    fn health_info(&self, id: &str) -> Option<HealthInfo> {
        let map = self.lock();
        let h = map.get(id)?.health.as_ref()?;
        Some(HealthInfo {
            status: h.status,
            failures: h.failures,
            checks: h.checks,
            last_check: h.last_check.map(crate::model::rfc3339),
            last_exit: h.last_exit,
            last_output: h.last_output.clone(),
        })
    }

    fn idle_since(&self, id: &str) -> Option<(Instant, bool)> {
        let map = self.lock();
        let i = map.get(id)?.idle?;
        Some((i.last_active, i.frozen))
    }
}

/// A connection to a published port, counted while it lasts.
struct ConnGuard(Option<(std::sync::Weak<Engine>, String)>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let Some((engine, id)) = self.0.take() else {
            return;
        };
        let Some(engine) = engine.upgrade() else {
            return;
        };
        if let Some(Entry {
            idle: Some(idle), ..
        }) = engine.supervisors.lock().get_mut(&id)
        {
            idle.conns = idle.conns.saturating_sub(1);
            idle.last_active = Instant::now();
        }
    }
}

/// How one check ended.
struct Probe {
    /// Exit code; none when it could not run or timed out.
    exit: Option<i32>,
    output: String,
}

impl Probe {
    fn passed(&self) -> bool {
        self.exit == Some(0)
    }

    fn failed(why: impl std::fmt::Display) -> Self {
        Self {
            exit: None,
            output: escape(why.to_string().as_bytes()),
        }
    }
}

/// At most [`OUTPUT_KEEP`] bytes of `bytes` as text: invalid UTF-8 replaced, control
/// characters (but newline and tab) escaped, so nothing a sandbox prints can forge lines or
/// terminal sequences where it is shown.
pub(crate) fn escape(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_KEEP)]);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn health_spec(manifest: &SandboxManifest) -> Option<ResolvedHealthcheck> {
    manifest.spec.healthcheck.as_ref()?.resolve().ok()
}

fn idle_spec(manifest: &SandboxManifest) -> Option<(Duration, IdleAction)> {
    let idle = manifest.spec.idle.as_ref()?;
    Some((Duration::from_millis(idle.after_ms().ok()?), idle.action))
}

impl Engine {
    /// Starts the supervisor of a sandbox that just started running (replacing an earlier
    /// one), if its spec has a health check or idle handling.
    pub(crate) fn supervise(self: &Arc<Self>, rec: &SandboxRecord) {
        let _ = std::fs::remove_file(self.idle_marker(&rec.id));
        let Ok(manifest) = Self::manifest_of(rec) else {
            return;
        };
        let health = health_spec(&manifest);
        let idle = idle_spec(&manifest);
        if health.is_none() && idle.is_none() {
            self.supervisors.end(&rec.id);
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (tx, rx) = tokio::sync::watch::channel(());
        let entry = Entry {
            _stop: tx,
            health: health.as_ref().map(|_| Health {
                status: HealthStatus::Starting,
                failures: 0,
                checks: 0,
                last_check: None,
                last_exit: None,
                last_output: None,
                records: (Instant::now(), 0, 0),
            }),
            name: rec.name.clone(),
            idle: idle.map(|_| Idle {
                last_active: Instant::now(),
                frozen: false,
                conns: 0,
            }),
        };
        self.supervisors.lock().insert(rec.id.clone(), entry);
        let weak = Arc::downgrade(self);
        let (id, name) = (rec.id.clone(), rec.name.clone());
        rt.spawn(supervise_loop(weak, id, name, health, idle, rx));
    }

    /// What the published ports' proxies run for each connection: it counts as a use, and
    /// a sandbox the idle handling froze is thawed before the connection reaches it
    /// (`idle.wake` by `port`).
    pub(crate) fn connection_hook(self: &Arc<Self>) -> devbox_net::ConnHook {
        let weak = Arc::downgrade(self);
        Arc::new(move |id: String| {
            let weak = weak.clone();
            Box::pin(async move {
                let Some(e) = weak.upgrade() else {
                    return Box::new(()) as Box<dyn Send>;
                };
                let guard = e.supervisors.connection(&e, &id);
                if e.supervisors.frozen(&id)
                    && let Some(name) = e.supervisors.name_of(&id)
                {
                    // The sandbox's lock is awaited, not blocked on: however many connections
                    // come at once, they hold no blocking thread while it is held; the first
                    // wakes the sandbox and the others find it awake.
                    let lock = e.locks.get(&name);
                    let _g = lock.lock().await;
                    if e.supervisors.frozen(&id) {
                        let e2 = e.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            if let Ok(Some(rec)) = e2.store.sandbox_by_name(&name)
                                && rec.id == id
                            {
                                let _ = e2.wake_frozen(&rec, "port");
                            }
                        })
                        .await;
                    }
                }
                Box::new(guard) as Box<dyn Send>
            })
        })
    }

    /// The health and idle state shown by `ls` and `inspect`.
    pub(crate) fn supervision_info(
        &self,
        rec: &SandboxRecord,
        manifest: &SandboxManifest,
    ) -> (Option<HealthInfo>, Option<IdleInfo>) {
        let running = rec.state == SandboxState::Running;
        let health = if running {
            self.supervisors.health_info(&rec.id)
        } else {
            None
        };
        let idle = manifest.spec.idle.as_ref().map(|_| {
            let since = if running {
                self.supervisors.idle_since(&rec.id)
            } else {
                None
            };
            IdleInfo {
                frozen: since.is_some_and(|(_, frozen)| frozen),
                stopped: rec.state == SandboxState::Stopped && self.idle_marker(&rec.id).exists(),
                idle_ms: since.map(|(at, _)| at.elapsed().as_millis() as u64),
            }
        });
        (health, idle)
    }

    /// Forgets that the idle handling stopped the sandbox (it was destroyed, or stopped by
    /// someone: the next exec does not start it then).
    pub(crate) fn forget_idle(&self, id: &str) {
        let _ = std::fs::remove_file(self.idle_marker(id));
    }

    fn idle_marker(&self, id: &str) -> std::path::PathBuf {
        self.cfg.state_dir.join("idle-stopped").join(id)
    }

    /// Whether the idle handling put the sandbox to sleep (frozen, or stopped).
    pub(crate) fn asleep(&self, rec: &SandboxRecord) -> bool {
        match rec.state {
            SandboxState::Running => self.supervisors.frozen(&rec.id),
            SandboxState::Stopped => self.idle_marker(&rec.id).exists(),
            _ => false,
        }
    }

    /// Wakes a sandbox the idle handling put to sleep (thaws or starts it), recorded as
    /// `idle.wake` with `woken_by`; notes a use either way. The caller holds its lock.
    pub(crate) fn wake_locked(
        self: &Arc<Self>,
        caller: &Caller,
        rec: &mut SandboxRecord,
        woken_by: &str,
    ) -> Result<()> {
        if !self.asleep(rec) {
            self.supervisors.touch(&rec.id);
            return Ok(());
        }
        let started = Instant::now();
        let r = if rec.state == SandboxState::Running {
            self.thaw_idle(rec)
        } else {
            let manifest = Self::manifest_of(rec)?;
            let r = self.launch(caller, rec, &manifest);
            if r.is_ok() {
                let _ = std::fs::remove_file(self.idle_marker(&rec.id));
            }
            r
        };
        let took_us = started.elapsed().as_micros() as u64;
        self.audit_result(
            caller,
            "idle.wake",
            Some(&rec.name),
            serde_json::json!({"woken_by": woken_by, "took_us": took_us}),
            &r,
        );
        r
    }

    /// Thaws a sandbox the idle handling froze (recorded as `idle.wake` by `woken_by`).
    pub(crate) fn wake_frozen(&self, rec: &SandboxRecord, woken_by: &str) -> Result<()> {
        if rec.state != SandboxState::Running || !self.supervisors.frozen(&rec.id) {
            return Ok(());
        }
        let started = Instant::now();
        let r = self.thaw_idle(rec);
        self.audit_result(
            &Caller::system("idle"),
            "idle.wake",
            Some(&rec.name),
            serde_json::json!({"woken_by": woken_by, "took_us": started.elapsed().as_micros() as u64}),
            &r,
        );
        r
    }

    /// Thaws a sandbox the idle handling froze.
    fn thaw_idle(&self, rec: &SandboxRecord) -> Result<()> {
        let (backend, inst) = self.backend_of(rec)?;
        backend.thaw(&inst)?;
        self.supervisors.set_frozen(&rec.id, false);
        Ok(())
    }

    /// Before a stop: thaws a sandbox the idle handling froze (a v1-frozen process does not
    /// die of SIGKILL).
    pub(crate) fn thaw_before_stop(&self, rec: &SandboxRecord) {
        if rec.state == SandboxState::Running
            && self.supervisors.frozen(&rec.id)
            && let Err(e) = self.thaw_idle(rec)
        {
            tracing::warn!(sandbox = %rec.name, "thawing an idle sandbox before it stops: {e}");
        }
    }

    /// Runs one health check; `None` when the sandbox is not this running one any more.
    async fn probe(
        self: &Arc<Self>,
        id: &str,
        name: &str,
        hc: &ResolvedHealthcheck,
    ) -> Option<Probe> {
        let (id, name, hc2) = (id.to_string(), name.to_string(), hc.clone());
        let started = self
            .blocking(move |e| {
                let Some(rec) = e.store.sandbox_by_name(&name)? else {
                    return Ok(None);
                };
                if rec.id != id || rec.state != SandboxState::Running {
                    return Ok(None);
                }
                Ok(Some(e.start_probe(&rec, &hc2)))
            })
            .await
            .ok()??;
        let (control, out) = match started {
            Ok(s) => s,
            Err(e) => return Some(Probe::failed(e)),
        };
        Some(run_probe(control, out, Duration::from_millis(hc.timeout_ms)).await)
    }

    /// Starts a check: checked like the main process (allowed outright, or it fails), with
    /// stdout and stderr on one pipe whose read end is returned.
    fn start_probe(
        &self,
        rec: &SandboxRecord,
        hc: &ResolvedHealthcheck,
    ) -> Result<(Arc<dyn devbox_backend::ProcessControl>, OwnedFd)> {
        let caller = Caller::system("health");
        let check = self.check_for(&caller, Some(rec), &hc.text, None)?;
        if check.decision != Verdict::Allow {
            return Err(EngineError::Denied {
                reasons: std::iter::once(format!(
                    "spec.healthcheck.command {:?} is not allowed outright: a health check cannot wait for an approval",
                    hc.text
                ))
                .chain(check.reasons)
                .collect(),
            });
        }
        let manifest = Self::manifest_of(rec)?;
        let (env, cwd, user) = self.process_context(
            rec,
            &manifest,
            &std::collections::BTreeMap::new(),
            None,
            None,
        )?;
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| EngineError::internal("health check pipe", std::io::Error::from(e)))?;
        let w2 = w
            .try_clone()
            .map_err(|e| EngineError::internal("health check pipe", e))?;
        let flags = nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| EngineError::internal("health check pipe", std::io::Error::from(e)))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| EngineError::internal("health check pipe", std::io::Error::from(e)))?;
        let (backend, inst) = self.backend_of(rec)?;
        let spec = ExecSpec {
            argv: hc.argv.clone(),
            env,
            cwd,
            user,
            tty: None,
            stdin: Io::Null,
            stdout: Io::File(w),
            stderr: Io::File(w2),
            start_timeout: Some(Duration::from_millis(hc.timeout_ms).max(Duration::from_secs(1))),
            track_tree: true,
        };
        let p = backend.exec(&inst, spec)?;
        Ok((p.control, r))
    }

    /// Records a check's outcome; returns the new state when it changed.
    fn note_probe(
        &self,
        id: &str,
        name: &str,
        hc: &ResolvedHealthcheck,
        probe: &Probe,
        counting: bool,
    ) -> Option<HealthStatus> {
        let (previous, now, unrecorded) = {
            let mut map = self.supervisors.lock();
            let h = map.get_mut(id)?.health.as_mut()?;
            h.checks += 1;
            h.last_check = Some(now_ms());
            h.last_exit = probe.exit;
            h.last_output = Some(probe.output.clone());
            let previous = h.status;
            if probe.passed() {
                h.failures = 0;
                h.status = HealthStatus::Healthy;
            } else if counting {
                h.failures = h.failures.saturating_add(1);
                if h.failures >= hc.retries {
                    h.status = HealthStatus::Unhealthy;
                }
            }
            if previous == h.status {
                return None;
            }
            // Within the budget of the minute, or a change left out (counted, and said on
            // the next record).
            let (since, written, left_out) = &mut h.records;
            if since.elapsed() >= Duration::from_secs(60) {
                *since = Instant::now();
                *written = 0;
            }
            if *written >= HEALTH_RECORDS_A_MINUTE {
                *left_out += 1;
                return Some(h.status);
            }
            *written += 1;
            (previous, h.status, std::mem::take(left_out))
        };
        let mut detail = serde_json::json!({
            "status": now.as_str(), "previous": previous.as_str(),
            "exit": probe.exit, "output": probe.output,
        });
        if unrecorded > 0 {
            detail["changes_not_recorded"] = unrecorded.into();
        }
        self.audit(
            &Caller::system("health"),
            "health.status",
            Some(name),
            detail,
        );
        Some(now)
    }

    /// The `onUnhealthy` action, as the system caller `health`.
    fn act_unhealthy(self: &Arc<Self>, id: &str, name: &str, action: OnUnhealthy) {
        let caller = Caller::system("health");
        let lock = self.locks.get(name);
        let _guard = lock.blocking_lock();
        let mut rec = match self.store.sandbox_by_name(name) {
            Ok(Some(r)) if r.id == id && r.state == SandboxState::Running => r,
            _ => return,
        };
        let mut detail = serde_json::json!({});
        let r = match action {
            OnUnhealthy::None => return,
            OnUnhealthy::Restart => {
                detail["action"] = "restart".into();
                Self::manifest_of(&rec).and_then(|manifest| {
                    self.halt(&mut rec, self.cfg.stop_grace)?;
                    self.launch(&caller, &mut rec, &manifest)
                })
            }
            OnUnhealthy::Rollback => {
                detail["action"] = "rollback".into();
                self.healthy_snapshot(&rec).and_then(|snap| {
                    detail["snapshot"] = snap.name.clone().into();
                    self.rollback_locked(&caller, &mut rec, &snap, &[])
                })
            }
        };
        self.audit_result(&caller, "health.action", Some(name), detail, &r);
    }

    /// The newest ready snapshot taken while the sandbox was healthy.
    fn healthy_snapshot(&self, rec: &SandboxRecord) -> Result<devbox_store::SnapshotRecord> {
        self.store
            .snapshots_of(&rec.id)?
            .into_iter()
            .filter(|s| s.state == SnapshotState::Ready && is_healthy_snapshot(&s.labels))
            .max_by_key(|s| s.created_at)
            .ok_or_else(|| {
                EngineError::WrongState(format!(
                    "sandbox {} has no snapshot taken while it was healthy to roll back to",
                    rec.name
                ))
            })
    }

    /// Freezes or stops the sandbox if it is still idle; returns whether the supervisor
    /// goes on (false: it stopped the sandbox).
    fn act_idle(
        self: &Arc<Self>,
        id: &str,
        name: &str,
        after: Duration,
        action: IdleAction,
    ) -> bool {
        let caller = Caller::system("idle");
        let lock = self.locks.get(name);
        let _guard = lock.blocking_lock();
        let mut rec = match self.store.sandbox_by_name(name) {
            Ok(Some(r)) if r.id == id && r.state == SandboxState::Running => r,
            _ => return false,
        };
        match self.supervisors.idle_since(id) {
            Some((at, false))
                if at.elapsed() >= after
                    && !self.monitor.has_execs(id)
                    && !self.supervisors.connected(id) => {}
            Some(_) => return true,
            None => return false,
        }
        let detail = serde_json::json!({"after_ms": after.as_millis() as u64});
        match action {
            IdleAction::Freeze => {
                let r = self.backend_of(&rec).and_then(|(backend, inst)| {
                    backend.freeze(&inst)?;
                    self.supervisors.set_frozen(id, true);
                    Ok(())
                });
                self.audit_result(&caller, "idle.freeze", Some(name), detail, &r);
                true
            }
            IdleAction::Stop => {
                let r = self.halt(&mut rec, self.cfg.stop_grace).and_then(|()| {
                    let marker = self.idle_marker(id);
                    if let Some(dir) = marker.parent() {
                        std::fs::create_dir_all(dir)
                            .map_err(|e| EngineError::internal("idle marker", e))?;
                    }
                    std::fs::write(&marker, b"")
                        .map_err(|e| EngineError::internal("idle marker", e))
                });
                self.audit_result(&caller, "idle.stop", Some(name), detail, &r);
                false
            }
        }
    }
}

/// Whether a snapshot's labels (a JSON object) mark it as taken while healthy.
fn is_healthy_snapshot(labels: &str) -> bool {
    serde_json::from_str::<std::collections::BTreeMap<String, String>>(labels)
        .is_ok_and(|l| l.get(HEALTHY_LABEL).is_some_and(|v| v == "healthy"))
}

/// Waits for a started check to end (killing it at `timeout`), reading its output.
async fn run_probe(
    control: Arc<dyn devbox_backend::ProcessControl>,
    out: OwnedFd,
    timeout: Duration,
) -> Probe {
    let conn = match crate::os::async_ready(crate::os::Ready(control.clone())) {
        Ok(c) => c,
        Err(e) => return Probe::failed(format!("watching the check: {e}")),
    };
    let mut reader = match tokio::net::unix::pipe::Receiver::from_owned_fd(out) {
        Ok(r) => Some(r),
        Err(e) => return Probe::failed(format!("reading the check's output: {e}")),
    };
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    let mut timed_out = false;
    let exit = loop {
        tokio::select! {
            ready = conn.readable() => {
                let Ok(mut guard) = ready else { break None };
                match guard.try_io(|c| c.get_ref().0.try_wait()) {
                    Ok(Ok(Some(ended))) => break Some(ended.code),
                    Ok(Ok(None)) | Ok(Err(_)) => break None,
                    Err(_would_block) => continue,
                }
            }
            n = async {
                match reader.as_mut() {
                    Some(r) => r.read(&mut buf).await,
                    None => std::future::pending().await,
                }
            }, if reader.is_some() => {
                match n {
                    Ok(n) if n > 0 => {
                        let take = n.min(OUTPUT_KEEP.saturating_sub(kept.len()));
                        kept.extend_from_slice(&buf[..take]);
                    }
                    _ => reader = None,
                }
            }
            () = tokio::time::sleep_until(deadline), if !timed_out => {
                timed_out = true;
                let c = control.clone();
                let _ = tokio::task::spawn_blocking(move || c.kill_tree()).await;
            }
        }
    };
    // What it wrote just before it ended (a process it left behind may hold the pipe open:
    // wait briefly, not for the end of the stream).
    if let Some(mut r) = reader {
        let until = tokio::time::Instant::now() + Duration::from_millis(20);
        while kept.len() < OUTPUT_KEEP {
            match tokio::time::timeout_at(until, r.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    let take = n.min(OUTPUT_KEEP - kept.len());
                    kept.extend_from_slice(&buf[..take]);
                }
                _ => break,
            }
        }
    }
    let mut output = escape(&kept);
    if timed_out {
        if !output.is_empty() && !output.ends_with('\n') {
            output.push('\n');
        }
        output.push_str(&format!(
            "(killed at its timeout of {})",
            devbox_spec::quantity::format_duration_ms(timeout.as_millis() as u64)
        ));
        return Probe { exit: None, output };
    }
    Probe { exit, output }
}

/// One sandbox's supervisor: checks its health and watches for idleness until its
/// channel closes (the sandbox stopped or started again) or the engine is gone.
async fn supervise_loop(
    engine: std::sync::Weak<Engine>,
    id: String,
    name: String,
    health: Option<ResolvedHealthcheck>,
    idle: Option<(Duration, IdleAction)>,
    mut stop: tokio::sync::watch::Receiver<()>,
) {
    let started = tokio::time::Instant::now();
    let mut next_check = health
        .as_ref()
        .map(|hc| started + Duration::from_millis(hc.interval_ms));
    let idle_tick =
        idle.map(|(after, _)| (after / 4).clamp(Duration::from_millis(25), Duration::from_secs(5)));
    let mut next_idle = idle_tick.map(|t| started + t);
    loop {
        let wake = [next_check, next_idle].into_iter().flatten().min();
        let Some(wake) = wake else { return };
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep_until(wake) => {}
        }
        let Some(e) = engine.upgrade() else { return };
        let now = tokio::time::Instant::now();
        if let (Some(hc), Some(at)) = (&health, next_check)
            && at <= now
        {
            next_check = Some(now + Duration::from_millis(hc.interval_ms));
            // A frozen sandbox cannot answer; it is checked again once it is thawed.
            if !e.supervisors.frozen(&id) {
                let probe = tokio::select! {
                    _ = stop.changed() => return,
                    p = e.probe(&id, &name, hc) => p,
                };
                let Some(probe) = probe else { return };
                if stop.has_changed().is_err() {
                    return;
                }
                // Frozen while it ran: the check could not finish; it does not count.
                if e.supervisors.frozen(&id) {
                    continue;
                }
                let counting = started.elapsed() >= Duration::from_millis(hc.start_period_ms);
                let (e2, id2, name2, hc2) = (e.clone(), id.clone(), name.clone(), hc.clone());
                let changed = tokio::task::spawn_blocking(move || {
                    e2.note_probe(&id2, &name2, &hc2, &probe, counting)
                })
                .await
                .ok()
                .flatten();
                if changed == Some(HealthStatus::Unhealthy) && hc.on_unhealthy != OnUnhealthy::None
                {
                    let (e2, id2, name2, act) =
                        (e.clone(), id.clone(), name.clone(), hc.on_unhealthy);
                    let _ =
                        tokio::task::spawn_blocking(move || e2.act_unhealthy(&id2, &name2, act))
                            .await;
                    // A restart or rollback that happened started a new supervisor.
                    if stop.has_changed().is_err() {
                        return;
                    }
                }
            }
        }
        if let (Some((after, action)), Some(at), Some(tick)) = (idle, next_idle, idle_tick)
            && at <= tokio::time::Instant::now()
        {
            next_idle = Some(tokio::time::Instant::now() + tick);
            if e.monitor.has_execs(&id) || e.supervisors.connected(&id) {
                e.supervisors.touch(&id);
            } else {
                let due = e
                    .supervisors
                    .idle_since(&id)
                    .is_some_and(|(at, frozen)| !frozen && at.elapsed() >= after);
                if due {
                    let (e2, id2, name2) = (e.clone(), id.clone(), name.clone());
                    let goes_on = tokio::task::spawn_blocking(move || {
                        e2.act_idle(&id2, &name2, after, action)
                    })
                    .await
                    .unwrap_or(false);
                    if !goes_on {
                        return;
                    }
                }
            }
        }
        drop(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_bounded_and_escaped() {
        assert_eq!(escape(b"ok\n"), "ok\n");
        assert_eq!(escape(b"a\x1b[2Jb\rc"), "a\\u{1b}[2Jb\\rc");
        assert_eq!(escape(&[0xff, b'x']), "\u{fffd}x");
        assert_eq!(escape(&vec![b'a'; 10_000]).len(), OUTPUT_KEEP);
    }

    #[test]
    fn healthy_labels() {
        assert!(is_healthy_snapshot(r#"{"devbox.io/health":"healthy"}"#));
        assert!(!is_healthy_snapshot(r#"{"other":"healthy"}"#));
        assert!(!is_healthy_snapshot("not json"));
    }
}
