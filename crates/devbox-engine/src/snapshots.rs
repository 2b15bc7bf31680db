//! The checkpoint tree: snapshots, rollback (whole or by path), clones, diffs, deletion.
//!
//! A snapshot is a read-only copy of a sandbox's writable volume (`upper/`, `work/`) at
//! `snapshots/<sandbox id>/<snapshot id>`: a btrfs snapshot (O(1)) or a copy (copy driver).
//! A running sandbox is frozen (cgroup freezer) for the instant of the copy. Every snapshot
//! records its parent, the sandbox's *head* (the snapshot its current state descends from),
//! so the history is a tree: rolling back and changing things starts a branch.
//!
//! A rollback builds the new writable volume next to the current one
//! (`<id>.rollback-new`), stops the sandbox, swaps the two by renames (the old one becomes
//! `<id>.pre-rollback`), and starts it again. The intent is recorded in the sandbox's
//! `pending` field first, so [`Engine::finish_pending`] can complete or undo it after a crash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use devbox_backend::{BackendError, CheckpointSpec, HeldMounts, Interrupted};
use devbox_spec::{Name, SandboxManifest};
use devbox_store::{
    SandboxRecord, SandboxState, SnapshotRecord, SnapshotState, StoreError, now_ms,
};
use serde::{Deserialize, Serialize};

use crate::model::{
    CloneRequest, DiffResult, RollbackRequest, SandboxInfo, SnapshotInfo, SnapshotRequest, rfc3339,
};
use crate::sandbox::new_id;
use crate::{Caller, Engine, EngineError, InternalSource, Result};

/// An operation under way on a sandbox, recorded before it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Pending {
    /// Replacing the writable volume with `new` (built from snapshot `to`, or selectively).
    Rollback {
        /// The snapshot rolled back to.
        to: String,
        /// Only some paths: the head does not move.
        selective: bool,
        /// Start the sandbox again afterwards.
        resume: bool,
    },
}

/// Default number of automatic snapshots kept per sandbox.
pub const DEFAULT_KEEP: u32 = 20;

fn auto_name() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let t = humantime::format_rfc3339_millis(UNIX_EPOCH + now).to_string();
    // 2026-11-28T04:35:12.123Z -> s-20261128-043512-123
    let digits: String = t.chars().filter(|c| c.is_ascii_digit()).collect();
    format!("s-{}-{}-{}", &digits[..8], &digits[8..14], &digits[14..17])
}

impl Engine {
    pub(crate) fn snapshot_path(&self, snap: &SnapshotRecord) -> PathBuf {
        self.pool
            .snapshots_dir()
            .join(&snap.sandbox_id)
            .join(&snap.id)
    }

    fn aside_path(&self, rec: &SandboxRecord) -> PathBuf {
        self.pool
            .sandboxes_dir()
            .join(format!("{}.pre-rollback", rec.id))
    }

    fn new_path(&self, rec: &SandboxRecord) -> PathBuf {
        self.pool
            .sandboxes_dir()
            .join(format!("{}.rollback-new", rec.id))
    }

    /// Finds a snapshot of `rec` by name, id, or `latest`.
    pub(crate) fn find_snapshot(
        &self,
        rec: &SandboxRecord,
        reference: &str,
    ) -> Result<SnapshotRecord> {
        let all: Vec<SnapshotRecord> = self
            .store
            .snapshots_of(&rec.id)?
            .into_iter()
            .filter(|s| s.state == SnapshotState::Ready)
            .collect();
        let found = if reference == "latest" {
            all.iter().max_by_key(|s| s.created_at).cloned()
        } else {
            all.iter()
                .find(|s| s.name == reference || s.id == reference)
                .cloned()
        };
        found.ok_or_else(|| EngineError::NotFound {
            kind: "snapshot",
            name: reference.to_string(),
            hint: "see `sandbox snapshots NAME` for the snapshots of a sandbox",
        })
    }

    /// Takes a snapshot of a sandbox.
    pub async fn snapshot(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        req: SnapshotRequest,
    ) -> Result<SnapshotInfo> {
        let started = std::time::Instant::now();
        let op = if req.with_processes {
            "checkpoint"
        } else {
            "snapshot"
        };
        let detail =
            serde_json::json!({"snapshot": serde_json::to_value(&req).unwrap_or_default()});
        let r = self
            .on_sandbox(caller, name, "snapshot.create", detail, |e, _, rec| {
                let snap = e.snapshot_locked(rec, req, false)?;
                e.snapshot_info(rec, &snap, &e.store.snapshots_of(&rec.id)?)
            })
            .await;
        self.metrics.observe(op, started, r.is_ok());
        r
    }

    pub(crate) fn snapshot_locked(
        &self,
        rec: &mut SandboxRecord,
        req: SnapshotRequest,
        auto: bool,
    ) -> Result<SnapshotRecord> {
        if !matches!(rec.state, SandboxState::Running | SandboxState::Stopped) {
            return Err(EngineError::WrongState(format!(
                "sandbox {} is busy; try again shortly",
                rec.name
            )));
        }
        let running = rec.state == SandboxState::Running;
        let (backend, inst) = self.backend_of(rec)?;
        let caps = backend.capabilities();
        if running && !caps.live_snapshot {
            return Err(EngineError::WrongState(format!(
                "sandbox {} runs on the {} backend, which cannot snapshot a running sandbox: stop it first",
                rec.name,
                backend.kind()
            )));
        }
        let tool = if req.with_processes {
            // The checkpoint talks to the sandbox's agent: a sandbox frozen by the idle
            // handling is thawed first.
            if running {
                self.wake_frozen(rec, "checkpoint")?;
            }
            if !running {
                return Err(EngineError::InvalidRequest(format!(
                    "sandbox {} is stopped: --with-processes needs running processes (start it, or leave the flag out)",
                    rec.name
                )));
            }
            if !caps.checkpoint {
                return Err(EngineError::InvalidRequest(format!(
                    "sandbox {} runs on the {} backend, which cannot checkpoint processes: leave out --with-processes",
                    rec.name,
                    backend.kind()
                )));
            }
            Some(backend.checkpoint_ready().map_err(|e| match e {
                BackendError::Checkpoint(m) => {
                    EngineError::Checkpoint(format!("{m}; nothing was changed"))
                }
                other => other.into(),
            })?)
        } else {
            None
        };
        let name = match req.name {
            Some(n) => Name::new(&n)
                .map_err(|_| EngineError::InvalidRequest(format!("{n:?} is not a valid snapshot name: use 1-63 lowercase letters, digits, '-', '_', '.'")))?
                .to_string(),
            None => auto_name(),
        };
        // The health label is the daemon's: it says only what the health checks saw.
        let mut labels = req.labels;
        labels.remove(crate::HEALTHY_LABEL);
        if running && self.supervisors.healthy(&rec.id) {
            labels.insert(crate::HEALTHY_LABEL.to_string(), "healthy".to_string());
        }
        let labels =
            serde_json::to_string(&labels).map_err(|e| EngineError::internal("labels", e))?;
        let mut snap = SnapshotRecord {
            id: new_id(),
            sandbox_id: rec.id.clone(),
            name: name.clone(),
            parent_id: rec.head.clone(),
            state: SnapshotState::Creating,
            created_at: now_ms(),
            message: req.message,
            labels,
            auto,
            size_bytes: None,
            processes: false,
        };
        self.store.insert_snapshot(&snap).map_err(|e| match e {
            StoreError::Conflict(_) => EngineError::AlreadyExists {
                kind: "snapshot",
                name,
            },
            other => other.into(),
        })?;
        let dest = self.snapshot_path(&snap);
        let images = self.checkpoint_dir(&snap);
        self.measurer.busy();
        let taken = (|| {
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| EngineError::internal("snapshot dir", e))?;
            }
            let volume = self.sandbox_volume(&rec.id);
            let copy = || {
                self.pool
                    .snapshot(&volume, &dest, true)
                    .map_err(EngineError::from)
            };
            match tool {
                // Processes and files are taken in the same frozen instant.
                Some(tool) => {
                    let ck = CheckpointSpec {
                        images: images.clone(),
                        log: self.checkpoint_log(&rec.id, "dump"),
                        owner: rec.uid_base,
                        binds: Self::host_binds(rec),
                        tool,
                        netns: self.netns_in_use(rec),
                    };
                    let mut copied = None;
                    let r = backend.checkpoint(&inst, &ck, &mut || {
                        copy().map_err(|e| {
                            copied = Some(e);
                            Interrupted
                        })
                    });
                    match (r, copied) {
                        (Err(BackendError::Interrupted), Some(e)) => Err(e),
                        (r, _) => r.map_err(EngineError::from),
                    }
                }
                // Frozen by the idle handling already: taken as it is, and left frozen.
                None if running && self.supervisors.frozen(&rec.id) => copy(),
                None if running => {
                    backend.freeze(&inst)?;
                    let copied = copy();
                    if let Err(e) = backend.thaw(&inst) {
                        tracing::error!(sandbox = %rec.name, "thawing after a snapshot: {e}");
                    }
                    copied
                }
                None => copy(),
            }
        })();
        if let Err(e) = taken {
            let _ = self.pool.delete_volume(&dest);
            let _ = std::fs::remove_dir_all(&images);
            let _ = self.store.delete_snapshot(&snap);
            return Err(e);
        }
        snap.processes = req.with_processes;
        snap.state = SnapshotState::Ready;
        self.store.update_snapshot(&snap)?;
        rec.head = Some(snap.id.clone());
        self.store.update_sandbox(rec)?;
        self.measure_later(snap.clone());
        Ok(snap)
    }

    /// Where the CRIU images of a snapshot with processes live (outside the pool: memory
    /// images need not share the sandboxes' space).
    pub(crate) fn checkpoint_dir(&self, snap: &SnapshotRecord) -> PathBuf {
        self.cfg
            .state_dir
            .join("checkpoints")
            .join(&snap.sandbox_id)
            .join(&snap.id)
    }

    /// CRIU's log of the last dump or restore (`what`) of a sandbox's processes.
    pub(crate) fn checkpoint_log(&self, sandbox_id: &str, what: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("checkpoints")
            .join(sandbox_id)
            .join(format!("last-{what}.log"))
    }

    /// Measures a snapshot's size in the background.
    fn measure_later(&self, snap: SnapshotRecord) {
        self.measurer
            .measure(&snap.id, self.snapshot_path(&snap).join("upper"));
    }

    fn snapshot_info(
        &self,
        rec: &SandboxRecord,
        snap: &SnapshotRecord,
        all: &[SnapshotRecord],
    ) -> Result<SnapshotInfo> {
        Ok(SnapshotInfo {
            id: snap.id.clone(),
            name: snap.name.clone(),
            sandbox: rec.name.clone(),
            parent: snap
                .parent_id
                .as_ref()
                .and_then(|p| all.iter().find(|s| &s.id == p))
                .map(|s| s.name.clone()),
            created_at: rfc3339(snap.created_at),
            message: snap.message.clone(),
            labels: serde_json::from_str::<BTreeMap<String, String>>(&snap.labels)
                .unwrap_or_default(),
            auto: snap.auto,
            size_bytes: snap.size_bytes,
            processes: snap.processes,
            head: rec.head.as_deref() == Some(&snap.id),
            clones: self.store.clones_of(&snap.id)?,
        })
    }

    /// A sandbox's snapshots, oldest first.
    pub async fn snapshots(self: &Arc<Self>, name: &str) -> Result<Vec<SnapshotInfo>> {
        let name = name.to_string();
        self.blocking(move |e| {
            let rec = e.record(&name)?;
            let all: Vec<SnapshotRecord> = e
                .store
                .snapshots_of(&rec.id)?
                .into_iter()
                .filter(|s| s.state == SnapshotState::Ready)
                .collect();
            all.iter().map(|s| e.snapshot_info(&rec, s, &all)).collect()
        })
        .await
    }

    /// Rolls a sandbox back to a snapshot, in place (or only some of its paths).
    pub async fn rollback(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        req: RollbackRequest,
    ) -> Result<SandboxInfo> {
        let started = std::time::Instant::now();
        let detail =
            serde_json::json!({"rollback": serde_json::to_value(&req).unwrap_or_default()});
        let r = self
            .on_sandbox(
                caller,
                name,
                "sandbox.rollback",
                detail,
                move |e, caller, rec| {
                    let target = e.find_snapshot(rec, &req.to)?;
                    e.rollback_locked(caller, rec, &target, &req.paths)?;
                    e.info(rec, false)
                },
            )
            .await;
        self.metrics.observe("rollback", started, r.is_ok());
        r
    }

    pub(crate) fn rollback_locked(
        self: &Arc<Self>,
        caller: &Caller,
        rec: &mut SandboxRecord,
        target: &SnapshotRecord,
        paths: &[String],
    ) -> Result<()> {
        if !matches!(rec.state, SandboxState::Running | SandboxState::Stopped) {
            return Err(EngineError::WrongState(format!(
                "sandbox {} is busy; try again shortly",
                rec.name
            )));
        }
        let mut rels = Vec::new();
        for p in paths {
            let rel = Path::new(p);
            if !rel.is_absolute()
                || rel
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
                || p == "/"
            {
                return Err(EngineError::InvalidRequest(format!(
                    "--path {p:?} must be an absolute path below / without '..'"
                )));
            }
            rels.push(rel.strip_prefix("/").unwrap_or(rel).to_path_buf());
        }
        let volume = self.sandbox_volume(&rec.id);
        let new = self.new_path(rec);
        let _ = self.pool.delete_volume(&new);
        // Build the new state first: nothing is touched if this fails (a full pool, say).
        if rels.is_empty() {
            self.pool
                .snapshot(&self.snapshot_path(target), &new, false)?;
        } else {
            self.pool.snapshot(&volume, &new, false)?;
            // Both layers are the sandbox's writing: fd-relative, never through a link.
            if let Err(e) = devbox_storage::tree::restore_paths(
                &self.snapshot_path(target).join("upper"),
                &new.join("upper"),
                &rels,
            ) {
                let _ = self.pool.delete_volume(&new);
                return Err(match e.kind() {
                    std::io::ErrorKind::InvalidInput => EngineError::InvalidRequest(format!(
                        "cannot restore from snapshot {}: {e}; nothing was changed",
                        target.name
                    )),
                    _ if devbox_storage::Pool::is_full_error(&e) => self.pool.full().into(),
                    _ => EngineError::internal("restoring paths", e),
                });
            }
        }
        let resume = rec.state == SandboxState::Running;
        let pending = Pending::Rollback {
            to: target.id.clone(),
            selective: !rels.is_empty(),
            resume,
        };
        rec.pending =
            Some(serde_json::to_string(&pending).map_err(|e| EngineError::internal("pending", e))?);
        self.store.update_sandbox(rec)?;
        let held = if resume {
            self.halt_holding_mounts(rec, Duration::ZERO, true)?
        } else {
            None
        };
        let checkpoint = (target.processes && rels.is_empty()).then(|| self.checkpoint_dir(target));
        self.finish_rollback(caller, rec, &pending, held, checkpoint)
    }

    /// Swaps in the rollback's new volume and records the outcome; starts the sandbox again
    /// if it ran (as `caller`). Safe to run again after a crash at any point.
    /// `held`: the old mount namespace (see [`Self::halt_holding_mounts`]), released before
    /// the old volume is deleted. `checkpoint`: the target's processes, restored running.
    fn finish_rollback(
        self: &Arc<Self>,
        caller: &Caller,
        rec: &mut SandboxRecord,
        pending: &Pending,
        held: Option<HeldMounts>,
        checkpoint: Option<PathBuf>,
    ) -> Result<()> {
        let Pending::Rollback {
            to,
            selective,
            resume,
        } = pending;
        let volume = self.sandbox_volume(&rec.id);
        let aside = self.aside_path(rec);
        let new = self.new_path(rec);
        let rename = |a: &Path, b: &Path| {
            std::fs::rename(a, b).map_err(|e| EngineError::internal("swapping volumes", e))
        };
        match (volume.exists(), aside.exists(), new.exists()) {
            (true, false, true) => {
                rename(&volume, &aside)?;
                rename(&new, &volume)?;
            }
            (false, true, true) => rename(&new, &volume)?,
            (true, true, _) => {}
            // The new volume never got built: the rollback did not happen.
            _ => {
                rec.pending = None;
                self.store.update_sandbox(rec)?;
                return Err(EngineError::internal(
                    "",
                    InternalSource::Incomplete(format!(
                        "the rollback of {} did not complete; nothing changed",
                        rec.name
                    )),
                ));
            }
        }
        if !selective && self.store.snapshot(to)?.is_some() {
            rec.head = Some(to.clone());
        }
        rec.pending = None;
        self.store.update_sandbox(rec)?;
        // The old volume goes off the caller's path: moved to a unique name (which a restart
        // removes, owning no record) and deleted in the background.
        let doomed = self
            .pool
            .sandboxes_dir()
            .join(format!("trash-{}", new_id()));
        match std::fs::rename(&aside, &doomed) {
            Ok(()) => {
                let pool = self.pool.clone();
                std::thread::spawn(move || {
                    // The old root is unmounted here, then its volume can go.
                    drop(held);
                    for _ in 0..100 {
                        match pool.delete_volume(&doomed) {
                            Err(devbox_storage::StorageError::Io { source, .. })
                                if source.raw_os_error() == Some(libc::EBUSY) =>
                            {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            _ => break,
                        }
                    }
                });
            }
            Err(_) => {
                drop(held);
                self.delete_volume_retrying(&aside)?
            }
        }
        if let Some(images) = checkpoint {
            let manifest = Self::manifest_of(rec)?;
            let restored = self.launch_from(caller, rec, &manifest, Some(&images));
            if let Err(e) = restored {
                // The files are rolled back; a fresh start keeps the sandbox usable.
                let fresh = match self.launch(caller, rec, &manifest) {
                    Ok(()) => "it was started afresh".to_string(),
                    Err(e) => format!("starting it afresh failed too: {e}"),
                };
                return Err(EngineError::Checkpoint(format!(
                    "the files of {} were rolled back, but its processes could not be restored ({e}); {fresh}",
                    rec.name
                )));
            }
        } else if *resume && rec.state != SandboxState::Running {
            let manifest = Self::manifest_of(rec)?;
            self.launch(caller, rec, &manifest)?;
        }
        Ok(())
    }

    /// Completes (or undoes) an operation a crash interrupted. Called at start-up, by
    /// `caller`.
    pub(crate) fn finish_pending(
        self: &Arc<Self>,
        caller: &Caller,
        rec: &mut SandboxRecord,
    ) -> Result<()> {
        let Some(text) = rec.pending.clone() else {
            return Ok(());
        };
        let pending: Pending = match serde_json::from_str(&text) {
            Ok(p) => p,
            Err(_) => {
                rec.pending = None;
                return Ok(self.store.update_sandbox(rec)?);
            }
        };
        tracing::info!(sandbox = %rec.name, "finishing an interrupted {text}");
        match self.finish_rollback(caller, rec, &pending, None, None) {
            Ok(()) => Ok(()),
            Err(EngineError::Internal {
                source: InternalSource::Incomplete(_),
                ..
            }) => {
                let _ = self.pool.delete_volume(&self.new_path(rec));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Makes a new sandbox from a snapshot of another.
    pub async fn clone_sandbox(
        self: &Arc<Self>,
        caller: &Caller,
        source: &str,
        req: CloneRequest,
    ) -> Result<SandboxInfo> {
        let source = source.to_string();
        let audit_name = source.to_string();
        let audit_req = serde_json::to_value(&req).unwrap_or_default();
        let who = caller.clone();
        let r = self
            .blocking(move |e| {
                let new_name = Name::new(&req.name)?;
                let (src, snap, mut manifest) = {
                    let lock = e.locks.get(&source);
                    let _guard = lock.blocking_lock();
                    let src = e.record(&source)?;
                    let snap = e.find_snapshot(&src, &req.snapshot)?;
                    let manifest: SandboxManifest = Self::manifest_of(&src)?;
                    (src, snap, manifest)
                };
                manifest.metadata.name = Some(new_name.to_string());
                // The clone keeps the network's mode and rules (live ones too, below) and
                // gets an address of its own; the host ports stay the source's.
                manifest.spec.network.ports.clear();
                let lock = e.locks.get(new_name.as_str());
                let _guard = lock.blocking_lock();
                let mut rec = e.insert_creating(
                    new_name.to_string(),
                    &manifest,
                    src.image_id.clone(),
                    false,
                    Some(snap.id.clone()),
                )?;
                let made = (|| {
                    e.copy_network_rules(&src.id, &rec.id)?;
                    e.pool
                        .snapshot(&e.snapshot_path(&snap), &e.sandbox_volume(&rec.id), false)?;
                    if req.start {
                        e.launch(&who, &mut rec, &manifest)
                    } else {
                        rec.state = SandboxState::Stopped;
                        Ok(e.store.update_sandbox(&rec)?)
                    }
                })();
                if let Err(err) = made {
                    e.discard(&rec);
                    return Err(err);
                }
                e.info(&rec, false)
            })
            .await;
        self.audit_result(
            caller,
            "sandbox.clone",
            Some(&audit_name),
            serde_json::json!({"clone": audit_req}),
            &r,
        );
        r
    }

    /// Deletes a snapshot; refused while a sandbox cloned from it exists, unless `force`.
    pub async fn delete_snapshot(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        snapshot: &str,
        force: bool,
    ) -> Result<()> {
        let snapshot = snapshot.to_string();
        let detail = serde_json::json!({"snapshot": snapshot, "force": force});
        self.on_sandbox(caller, name, "snapshot.delete", detail, move |e, _, rec| {
            let snap = e.find_snapshot(rec, &snapshot)?;
            let clones = e.store.clones_of(&snap.id)?;
            if !clones.is_empty() && !force {
                return Err(EngineError::WrongState(format!(
                    "snapshot {} is the origin of sandbox(es) {}: destroy them first, or use --force to delete it anyway",
                    snap.name,
                    clones.join(", ")
                )));
            }
            e.remove_snapshot(snap)
        })
        .await
    }

    pub(crate) fn remove_snapshot(&self, mut snap: SnapshotRecord) -> Result<()> {
        self.store.clear_origin(&snap.id)?;
        snap.state = SnapshotState::Deleting;
        self.store.update_snapshot(&snap)?;
        let path = self.snapshot_path(&snap);
        let _ = self.pool.set_readonly(&path, false);
        self.pool.delete_volume(&path)?;
        let _ = std::fs::remove_dir_all(self.checkpoint_dir(&snap));
        self.store.delete_snapshot(&snap)?;
        Ok(())
    }

    /// Deletes automatic snapshots beyond the spec's retention: more than `rollback.keep`
    /// (default 20), or older than `rollback.maxAge`. The newest one always stays.
    pub(crate) fn prune_auto(
        &self,
        caller: &Caller,
        rec: &SandboxRecord,
        keep: u32,
        max_age_seconds: Option<u64>,
    ) -> Result<()> {
        let mut autos: Vec<SnapshotRecord> = self
            .store
            .snapshots_of(&rec.id)?
            .into_iter()
            .filter(|s| s.auto && s.state == SnapshotState::Ready)
            .collect();
        autos.sort_by_key(|s| s.created_at);
        let excess = autos.len().saturating_sub(keep as usize);
        let cutoff = max_age_seconds.map(|age| {
            now_ms().saturating_sub(i64::try_from(age.saturating_mul(1000)).unwrap_or(i64::MAX))
        });
        let newest = autos.len().saturating_sub(1);
        for (i, snap) in autos.into_iter().enumerate() {
            let too_many = i < excess;
            let too_old = i < newest && cutoff.is_some_and(|c| snap.created_at < c);
            if (too_many || too_old) && self.store.clones_of(&snap.id)?.is_empty() {
                let name = snap.name.clone();
                self.remove_snapshot(snap)?;
                self.audit(
                    caller,
                    "snapshot.delete",
                    Some(&rec.name),
                    serde_json::json!({"snapshot": name, "because": "retention of automatic snapshots"}),
                );
            }
        }
        Ok(())
    }

    /// What changed between two states: snapshots by name (`from` defaults to the head, or the
    /// image when there is none), `to` defaults to the current state.
    pub async fn diff(
        self: &Arc<Self>,
        name: &str,
        from: Option<String>,
        to: Option<String>,
    ) -> Result<DiffResult> {
        let name = name.to_string();
        self.blocking(move |e| {
            let rec = e.record(&name)?;
            let image = e.images.path(&rec.image_id);
            let empty = tempdir_in(&e.cfg.runtime_dir)?;
            let from_snap = match from.as_deref() {
                Some("image") => None,
                Some(r) => Some(e.find_snapshot(&rec, r)?),
                None => match &rec.head {
                    Some(h) => e.store.snapshot(h)?,
                    None => None,
                },
            };
            let to_snap = match to.as_deref() {
                Some("current") | None => None,
                Some(r) => Some(e.find_snapshot(&rec, r)?),
            };
            let from_upper = from_snap
                .as_ref()
                .map(|s| e.snapshot_path(s).join("upper"))
                .unwrap_or_else(|| empty.clone());
            let to_upper = to_snap
                .as_ref()
                .map(|s| e.snapshot_path(s).join("upper"))
                .unwrap_or_else(|| e.sandbox_volume(&rec.id).join("upper"));
            let changes = devbox_storage::layers::diff(&image, &from_upper, &to_upper);
            let _ = std::fs::remove_dir(&empty);
            Ok(DiffResult {
                from: from_snap.map(|s| s.name).unwrap_or_else(|| "image".into()),
                to: to_snap.map(|s| s.name).unwrap_or_else(|| "current".into()),
                changes: changes.map_err(|err| EngineError::internal("diff", err))?,
            })
        })
        .await
    }
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let p = dir.join(format!("empty-{}", new_id()));
    std::fs::create_dir_all(&p).map_err(|e| EngineError::internal("scratch dir", e))?;
    Ok(p)
}
