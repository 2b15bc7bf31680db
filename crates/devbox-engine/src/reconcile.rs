//! Bringing recorded state and the host back in line after a restart (or a crash).
//!
//! One sandbox's state never stops the daemon from starting: whatever fails while one
//! record is brought in line is logged and written to that record (`last_error`; the state
//! `broken` unless it was being created or destroyed, which the next start retries), and
//! the daemon goes on. `destroy` removes such a sandbox; the next start tries it again.
//!
//! A killed daemon can leave behind, besides its sandboxes:
//! - a sandbox frozen for a snapshot: it is thawed (both the v1 freezer and the unified
//!   `cgroup.freeze`) before it is pinged, and kept;
//! - warm launchers, in `warm-*` cgroups no record names: killed, their cgroups removed;
//! - helper processes it started (CRIU, the storage driver's tools, a launcher that had not
//!   joined its cgroup yet). Each carries the daemon's mark in its environment
//!   ([`DAEMON_MARK_ENV`], inherited from the daemon, which sets it on itself at start), so
//!   the next daemon of the same state directory finds them by it and kills them, unless
//!   they run in one of its sandboxes' cgroups.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devbox_backend::host::process_start_time;
use devbox_image::HOST_IMAGE;
use devbox_store::{SandboxRecord, SandboxState, SnapshotRecord, SnapshotState};

use crate::{Engine, EngineError, Result};

/// The environment variable that marks the daemon and, by inheritance, every process it
/// starts: `<pid>:<nonce>:<state dir>`.
pub const DAEMON_MARK_ENV: &str = "DEVBOX_DAEMON_MARK";

/// A new mark for this process as the daemon of `state_dir` (which must exist).
pub fn daemon_mark(state_dir: &Path) -> String {
    let dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    format!(
        "{}:{}:{}",
        std::process::id(),
        crate::sandbox::new_id(),
        dir.display()
    )
}

/// Whether `mark` was made by this very process (so it is set, and inherited from here on).
pub fn is_own_mark(mark: &str) -> bool {
    mark.split(':').next() == Some(std::process::id().to_string().as_str())
}

impl Engine {
    /// Finishes or undoes interrupted operations, marks sandboxes whose processes are gone
    /// as stopped, thaws and re-attaches exit monitors to running ones, reaps what a dead
    /// daemon left running, and removes cgroups, volumes, runtime directories and staging
    /// areas that no record owns. Only a failure to read the database fails it.
    pub(crate) fn reconcile(self: &Arc<Self>) -> Result<()> {
        let records = self.store.sandboxes()?;
        self.reap_dead_daemon_helpers();
        // What the backends hold that no record owns (a dead daemon's warm launchers, say).
        self.sweep_backends(&records);

        // Snapshots first: a snapshot whose copy exists is complete (btrfs snapshots are
        // atomic; a copy is only recorded ready after it finished), one without is dropped.
        for snap in self.store.all_snapshots()? {
            let (id, sandbox) = (snap.id.clone(), snap.sandbox_id.clone());
            if let Err(e) = self.reconcile_snapshot(snap) {
                tracing::error!(snapshot = %id, sandbox = %sandbox, "bringing a snapshot in line (the next start tries again): {e}");
            }
        }
        let mut known = HashSet::new();
        let mut kept = Vec::new();
        for mut rec in records {
            let keep = match self.reconcile_sandbox(&mut rec) {
                Ok(keep) => keep,
                Err(e) => {
                    self.mark_failed(&rec, &e);
                    true
                }
            };
            if keep {
                known.insert(rec.id.clone());
                kept.push(rec);
            }
        }
        self.sweep_backends(&kept);
        self.sweep_unowned(&known);
        self.net_reconcile(&kept);
        Ok(())
    }

    fn reconcile_snapshot(&self, mut snap: SnapshotRecord) -> Result<()> {
        match snap.state {
            SnapshotState::Ready => {}
            SnapshotState::Deleting => self.remove_snapshot(snap)?,
            SnapshotState::Creating => {
                let complete = self.snapshot_path(&snap).join("upper").exists()
                    && self.pool.driver().capabilities().atomic_snapshots;
                if complete {
                    // A checkpoint of processes is complete once its metadata is written,
                    // which happens before the files are taken.
                    let images = self.checkpoint_dir(&snap);
                    snap.processes = self
                        .store
                        .sandboxes()?
                        .iter()
                        .find(|r| r.id == snap.sandbox_id)
                        .and_then(|r| self.backends.of(r).ok())
                        .is_some_and(|b| b.checkpoint_complete(&images));
                    snap.state = SnapshotState::Ready;
                    self.store.update_snapshot(&snap)?;
                } else {
                    let _ = self.pool.delete_volume(&self.snapshot_path(&snap));
                    let _ = std::fs::remove_dir_all(self.checkpoint_dir(&snap));
                    self.store.delete_snapshot(&snap)?;
                }
            }
        }
        Ok(())
    }

    /// Brings one sandbox in line; returns whether its record still exists.
    fn reconcile_sandbox(self: &Arc<Self>, rec: &mut SandboxRecord) -> Result<bool> {
        // A daemon killed mid-snapshot leaves the cgroup frozen: nothing in it answers a
        // ping, and (v1 freezer) nothing in it dies of SIGKILL. Thaw first, whatever comes next.
        let thawed = self.thaw_leftover(rec)?;
        match rec.state {
            SandboxState::Creating => {
                tracing::info!(sandbox = %rec.name, "undoing an interrupted create");
                self.release_runtime(rec);
                self.delete_volume_retrying(&self.sandbox_volume(&rec.id))?;
                self.store.delete_sandbox(&rec.id)?;
                return Ok(false);
            }
            SandboxState::Destroying => {
                tracing::info!(sandbox = %rec.name, "finishing an interrupted destroy");
                self.destroy_locked(rec, Duration::ZERO)?;
                return Ok(false);
            }
            _ if rec.pending.is_some()
                && matches!(rec.state, SandboxState::Running | SandboxState::Stopped) =>
            {
                // The operation swaps the writable volume: nothing may run on the old one.
                // (`halt` kills only a live init, and releases the runtime either way.)
                if rec.state == SandboxState::Running {
                    self.halt(rec, Duration::ZERO)?;
                }
                if let Err(e) = self.finish_pending(rec) {
                    tracing::error!(sandbox = %rec.name, "finishing an interrupted operation: {e}");
                    self.note_error(
                        rec,
                        format!(
                            "an interrupted operation could not be finished at daemon start: {e}"
                        ),
                    );
                }
            }
            SandboxState::Running => {
                if !self.adopt(rec) {
                    let was_alive = self.alive(rec);
                    tracing::info!(sandbox = %rec.name, alive = was_alive, "it does not answer: stopping it");
                    self.halt(rec, Duration::ZERO)?;
                    rec.last_error = Some(if was_alive {
                        "stopped at daemon start: its init did not answer the daemon".into()
                    } else {
                        "stopped while the daemon was not running (host reboot or crash)".into()
                    });
                    self.store.update_sandbox(rec)?;
                    self.check_files(rec)?;
                } else if thawed {
                    tracing::info!(sandbox = %rec.name, "thawed a sandbox a dead daemon left frozen");
                }
            }
            SandboxState::Stopped => {
                self.release_runtime(rec);
                self.check_files(rec)?;
            }
            SandboxState::Broken => {
                // A previous start could not bring it in line: try again.
                let before = rec.last_error.clone().unwrap_or_default();
                if rec.pending.is_none() && self.adopt(rec) {
                    tracing::info!(sandbox = %rec.name, "a broken sandbox answers again: running");
                    rec.state = SandboxState::Running;
                    rec.last_error = Some(format!("running again after: {before}"));
                    self.store.update_sandbox(rec)?;
                } else {
                    self.halt(rec, Duration::ZERO)?;
                    rec.last_error = Some(format!("stopped at daemon start after: {before}"));
                    self.store.update_sandbox(rec)?;
                    if rec.pending.is_some()
                        && let Err(e) = self.finish_pending(rec)
                    {
                        return Err(EngineError::Internal(format!(
                            "an interrupted operation could not be finished: {e}"
                        )));
                    }
                    self.check_files(rec)?;
                    tracing::info!(sandbox = %rec.name, "a broken sandbox is stopped now");
                }
            }
        }
        Ok(true)
    }

    /// Thaws a sandbox if a dead daemon left it frozen; returns whether it was.
    fn thaw_leftover(&self, rec: &SandboxRecord) -> Result<bool> {
        let (backend, inst) = self.backend_of(rec)?;
        Ok(backend.thaw_leftover(&inst)?)
    }

    /// Takes a running sandbox back if its init still runs and answers; watches it then.
    fn adopt(self: &Arc<Self>, rec: &SandboxRecord) -> bool {
        let responsive = self
            .backend_of(rec)
            .is_ok_and(|(b, inst)| b.ping(&inst, Duration::from_secs(2)));
        if responsive {
            self.watch(rec);
        }
        responsive
    }

    /// Checks that a stopped sandbox's files can be started from: its writable volume (else
    /// an error: it is broken) and its image (else a note: importing it again fixes it).
    fn check_files(&self, rec: &mut SandboxRecord) -> Result<()> {
        let vol = self.sandbox_volume(&rec.id);
        if !vol.join("upper").is_dir() {
            return Err(EngineError::Internal(format!(
                "its writable volume {} is missing: its files are gone (destroy it)",
                vol.display()
            )));
        }
        if rec.image_id != HOST_IMAGE && !self.images.exists(&rec.image_id) {
            self.note_error(
                rec,
                format!(
                    "its image {} is missing from the pool: import it again to start it, or destroy it",
                    rec.image_id
                ),
            );
        }
        Ok(())
    }

    /// Records `why` on a sandbox, leaving its state.
    fn note_error(&self, rec: &mut SandboxRecord, why: String) {
        rec.last_error = Some(why);
        if let Err(e) = self.store.update_sandbox(rec) {
            tracing::error!(sandbox = %rec.name, "recording its error: {e}");
        }
    }

    /// Marks a sandbox that could not be brought in line: `broken` (a create or destroy
    /// under way stays so, to be retried), with the error; logs it.
    fn mark_failed(&self, rec: &SandboxRecord, err: &EngineError) {
        tracing::error!(sandbox = %rec.name, state = ?rec.state, "bringing it in line at daemon start failed (it is marked; destroy removes it): {err}");
        // What the failed step left in the store is the truth to build on.
        let mut cur = match self.store.sandbox_by_name(&rec.name) {
            Ok(Some(r)) if r.id == rec.id => r,
            _ => rec.clone(),
        };
        if !matches!(cur.state, SandboxState::Creating | SandboxState::Destroying) {
            cur.state = SandboxState::Broken;
        }
        cur.last_error = Some(format!("at daemon start: {err}"));
        if let Err(e) = self.store.update_sandbox(&cur) {
            tracing::error!(sandbox = %rec.name, "recording its error: {e}");
        }
    }

    /// Removes what the backends hold on the host that none of `owned` owns.
    fn sweep_backends(&self, owned: &[SandboxRecord]) {
        let owned: Vec<_> = owned.iter().map(crate::backends::instance).collect();
        for b in self.backends.all() {
            for orphan in b.orphans(&owned) {
                b.remove_orphan(&orphan);
            }
        }
    }

    /// Kills the processes a dead daemon of this state directory started that still run
    /// outside this daemon's cgroups (found by the mark they inherited), and waits for them.
    fn reap_dead_daemon_helpers(&self) {
        let own = std::env::var(DAEMON_MARK_ENV).ok();
        let Ok(state_dir) = std::fs::canonicalize(&self.cfg.state_dir) else {
            return;
        };
        let me = std::process::id() as i32;
        let mut doomed = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Some(start) = process_start_time(pid) else {
                continue;
            };
            let Some(mark) = read_mark(pid) else { continue };
            if own.as_deref() == Some(mark.as_str()) {
                continue;
            }
            let mut parts = mark.splitn(3, ':');
            let (Some(_), Some(_), Some(dir)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            if Path::new(dir) != state_dir {
                continue;
            }
            // Sandboxes' processes (and warm launchers) are dealt with by their backends.
            if self.backends.all().any(|b| b.owns_host_process(pid)) {
                continue;
            }
            let Ok(pidfd) = rustix::process::pidfd_open(
                rustix::process::Pid::from_raw(pid).unwrap_or(rustix::process::Pid::INIT),
                rustix::process::PidfdFlags::empty(),
            ) else {
                continue;
            };
            // The pidfd is of the process read above only if it started at the same time.
            if process_start_time(pid) != Some(start) {
                continue;
            }
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .trim()
                        .to_string()
                })
                .unwrap_or_default();
            tracing::info!(pid, command = %cmd, "killing a process a dead daemon started");
            let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
            doomed.push(pidfd);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for pidfd in doomed {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [nix::poll::PollFd::new(
                pidfd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = nix::poll::PollTimeout::try_from(left).unwrap_or(nix::poll::PollTimeout::MAX);
            let _ = nix::poll::poll(&mut fds, ms);
        }
    }

    /// Removes cgroups, volumes, runtime directories, snapshot volumes, checkpoints and
    /// image volumes that no record owns (each failure is logged).
    fn sweep_unowned(&self, known: &HashSet<String>) {
        if let Ok(entries) = std::fs::read_dir(self.pool.sandboxes_dir()) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().to_string();
                if known.contains(&id) {
                    continue;
                }
                tracing::info!(path = %e.path().display(), "removing what no sandbox owns");
                if let Err(err) = self.delete_volume_retrying(&e.path()) {
                    tracing::warn!(path = %e.path().display(), "removing a volume no sandbox owns: {err}");
                }
            }
        }
        // Snapshot volumes no record owns (a crash between copying and recording).
        let snapshot_ids: HashSet<String> = match self.store.all_snapshots() {
            Ok(all) => all.into_iter().map(|s| s.id).collect(),
            Err(e) => {
                tracing::error!("reading snapshots: {e}");
                return;
            }
        };
        for dir in read_dirs(&self.pool.snapshots_dir()) {
            for e in read_dirs(&dir) {
                let name = e.file_name().map(|n| n.to_string_lossy().to_string());
                if name.is_some_and(|n| !snapshot_ids.contains(&n)) {
                    tracing::info!(path = %e.display(), "removing a snapshot volume no record owns");
                    let _ = self.pool.set_readonly(&e, false);
                    let _ = self.pool.delete_volume(&e);
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        // Checkpoints of processes no snapshot owns; a sandbox's last CRIU logs stay with it.
        for dir in read_dirs(&self.cfg.state_dir.join("checkpoints")) {
            let name = dir.file_name().map(|n| n.to_string_lossy().to_string());
            if !name.is_some_and(|n| known.contains(&n)) {
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            }
            for e in read_dirs(&dir) {
                let name = e.file_name().map(|n| n.to_string_lossy().to_string());
                if e.is_dir() && name.is_some_and(|n| !snapshot_ids.contains(&n)) {
                    tracing::info!(path = %e.display(), "removing a checkpoint no snapshot owns");
                    let _ = std::fs::remove_dir_all(&e);
                }
            }
        }
        self.images.clear_staging();
        let recorded: HashSet<String> = match self.store.images() {
            Ok(all) => all.into_iter().map(|i| i.id).collect(),
            Err(e) => {
                tracing::error!("reading images: {e}");
                return;
            }
        };
        for id in self.images.stored_ids() {
            if id != HOST_IMAGE && !recorded.contains(&id) {
                tracing::info!(image = %id, "removing an image volume no record owns");
                let _ = self.pool.set_readonly(&self.images.path(&id), false);
                let _ = self.pool.delete_volume(&self.images.path(&id));
            }
        }
        for id in recorded {
            if !self.images.exists(&id) {
                tracing::warn!(image = %id, "forgetting an image whose volume is gone");
                if let Err(e) = self.store.delete_image(&id) {
                    tracing::error!(image = %id, "forgetting an image: {e}");
                }
            }
        }
    }
}

/// The entries of a directory (none if it cannot be read).
fn read_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// The daemon mark in a process's environment, if any.
fn read_mark(pid: i32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let key = format!("{DAEMON_MARK_ENV}=");
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(key.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
