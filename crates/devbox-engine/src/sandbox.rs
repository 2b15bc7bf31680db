//! Sandbox lifecycle: create, start, stop, destroy, list, inspect, and exit monitoring.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devbox_backend::{BackendError, CheckpointSpec, HeldMounts, Interrupted, StartSpec};
use devbox_image::HOST_IMAGE;
use devbox_spec::{Name, SandboxManifest};
use devbox_store::{ID_RANGE, SandboxRecord, SandboxState, StoreError, now_ms};

use crate::model::{CreateSandboxRequest, ProcessInfo, SandboxInfo, rfc3339};
use crate::{Caller, Engine, EngineError, Result};

/// A random id for a new sandbox.
pub(crate) fn new_id() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    hex::encode(b)
}

impl Engine {
    /// Whether a sandbox's host process still runs.
    pub(crate) fn alive(&self, rec: &SandboxRecord) -> bool {
        self.backend_of(rec)
            .map(|(b, inst)| b.alive(&inst))
            .unwrap_or(false)
    }

    /// Runs `op` on the blocking pool with sandbox `name`'s lock held and its record, then
    /// appends `action` with `detail` and the outcome to the audit log, as `caller`'s.
    pub(crate) async fn on_sandbox<T: Send + 'static>(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        action: &str,
        detail: serde_json::Value,
        op: impl FnOnce(&Arc<Engine>, &Caller, &mut SandboxRecord) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let key = name.to_string();
        let who = caller.clone();
        let r = self
            .blocking(move |e| {
                let lock = e.locks.get(&key);
                let _guard = lock.blocking_lock();
                let mut rec = e.record(&key)?;
                op(&e, &who, &mut rec)
            })
            .await;
        self.audit_result(caller, action, Some(name), detail, &r);
        r
    }

    /// Records a new sandbox in state `creating` (the first step of a create, clone or
    /// import); a taken name is `already_exists`.
    pub(crate) fn insert_creating(
        &self,
        name: String,
        manifest: &SandboxManifest,
        image_id: String,
        ephemeral: bool,
        origin: Option<String>,
    ) -> Result<SandboxRecord> {
        let rec = SandboxRecord {
            id: new_id(),
            name: name.clone(),
            manifest: serde_json::to_string(manifest)
                .map_err(|e| EngineError::internal("spec", e))?,
            image_id,
            state: SandboxState::Creating,
            uid_base: 0,
            init_pid: None,
            init_start: None,
            created_at: now_ms(),
            started_at: None,
            stopped_at: None,
            last_error: None,
            ephemeral,
            backend: self.backends.default().kind().to_string(),
            handle: None,
            head: None,
            origin,
            pending: None,
        };
        self.store.insert_sandbox(&rec).map_err(|e| match e {
            StoreError::Conflict(_) => EngineError::AlreadyExists {
                kind: "sandbox",
                name,
            },
            other => other.into(),
        })
    }

    pub(crate) fn manifest_of(rec: &SandboxRecord) -> Result<SandboxManifest> {
        serde_json::from_str(&rec.manifest).map_err(|e| EngineError::internal("stored spec", e))
    }

    pub(crate) fn record(&self, name: &str) -> Result<SandboxRecord> {
        self.store
            .sandbox_by_name(name)?
            .ok_or_else(|| EngineError::sandbox_not_found(name))
    }

    /// Creates a sandbox (and starts it unless asked not to).
    pub async fn create(
        self: &Arc<Self>,
        caller: &Caller,
        req: CreateSandboxRequest,
    ) -> Result<SandboxInfo> {
        self.create_with(caller, req, false).await
    }

    /// Creates a sandbox; `ephemeral` ones are destroyed by their creator after one exec.
    pub async fn create_with(
        self: &Arc<Self>,
        caller: &Caller,
        req: CreateSandboxRequest,
        ephemeral: bool,
    ) -> Result<SandboxInfo> {
        let started = std::time::Instant::now();
        let r = self.create_unmeasured(caller, req, ephemeral).await;
        self.metrics.observe("create", started, r.is_ok());
        r
    }

    async fn create_unmeasured(
        self: &Arc<Self>,
        caller: &Caller,
        req: CreateSandboxRequest,
        ephemeral: bool,
    ) -> Result<SandboxInfo> {
        let name = req
            .name
            .clone()
            .or_else(|| req.manifest.as_ref().and_then(|m| m.metadata.name.clone()));
        let detail = serde_json::json!({"manifest": req.manifest, "start": req.start, "ephemeral": ephemeral});
        let who = caller.clone();
        let r = self
            .blocking(move |e| e.create_blocking(&who, req, ephemeral))
            .await;
        self.audit_result(caller, "sandbox.create", name.as_deref(), detail, &r);
        r
    }

    fn create_blocking(
        self: &Arc<Self>,
        caller: &Caller,
        req: CreateSandboxRequest,
        ephemeral: bool,
    ) -> Result<SandboxInfo> {
        let mut manifest = req
            .manifest
            .unwrap_or_else(|| SandboxManifest::new(None, Default::default()));
        if let Some(n) = req.name {
            manifest.metadata.name = Some(n);
        }
        let name = match &manifest.metadata.name {
            Some(n) => Name::new(n)?,
            None => {
                return Err(EngineError::InvalidRequest(
                    "a sandbox needs a name: give one, or set metadata.name in the spec".into(),
                ));
            }
        };
        manifest.validate()?;
        self.check_disk_limit(&manifest)?;
        let image_ref = manifest.spec.image_ref().to_string();
        let image_id = if image_ref == HOST_IMAGE {
            self.images.ensure_host()?;
            HOST_IMAGE.to_string()
        } else {
            self.store
                .find_image(&image_ref)?
                .ok_or_else(|| EngineError::image_not_found(&image_ref))?
                .id
        };
        let lock = self.locks.get(name.as_str());
        let _guard = lock.blocking_lock();
        let phases = crate::Phases::start("create");
        let mut rec =
            self.insert_creating(name.to_string(), &manifest, image_id, ephemeral, None)?;
        phases.mark("record");
        let made = (|| {
            // A main command the checks would not allow refuses the sandbox outright.
            self.check_main(caller, &rec, &manifest)?;
            self.make_volume(&rec)?;
            phases.mark("volume");
            if req.start {
                self.launch(caller, &mut rec, &manifest)?;
            } else {
                rec.state = SandboxState::Stopped;
                self.store.update_sandbox(&rec)?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            self.discard(&rec);
            return Err(e);
        }
        self.info(&rec, false)
    }

    fn make_volume(&self, rec: &SandboxRecord) -> Result<()> {
        let vol = self.sandbox_volume(&rec.id);
        self.pool.create_volume(&vol)?;
        for (dir, mode) in [("upper", 0o755), ("work", 0o700)] {
            let p = vol.join(dir);
            std::fs::create_dir(&p).map_err(|e| {
                if devbox_storage::Pool::is_full_error(&e) {
                    self.pool.full().into()
                } else {
                    EngineError::internal("make writable layer", e)
                }
            })?;
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .map_err(|e| EngineError::internal("make writable layer", e))?;
        }
        Ok(())
    }

    /// Removes everything of a sandbox that failed to be created, and its record.
    pub(crate) fn discard(&self, rec: &SandboxRecord) {
        self.release_runtime(rec);
        let _ = self.pool.delete_volume(&self.sandbox_volume(&rec.id));
        let _ = self.store.delete_sandbox(&rec.id);
    }

    /// Releases what the sandbox's backend holds for it (processes left over, cgroups,
    /// runtime dir).
    pub(crate) fn release_runtime(&self, rec: &SandboxRecord) {
        let phases = crate::Phases::start("release");
        self.supervisors.end(&rec.id);
        match self.backend_of(rec) {
            Ok((b, inst)) => b.remove(&inst),
            Err(e) => tracing::warn!(sandbox = %rec.name, "releasing its runtime: {e}"),
        }
        self.detach_network(rec);
        phases.mark("runtime released");
    }

    /// The host directories bound (read-only, at the same path) into a sandbox: those of the
    /// host image, none for others.
    pub(crate) fn host_binds(rec: &SandboxRecord) -> Vec<std::path::PathBuf> {
        if rec.image_id == HOST_IMAGE {
            devbox_image::host::host_binds()
        } else {
            Vec::new()
        }
    }

    /// Starts the sandbox's init; on success the record says running. Its main process
    /// starts as `caller`'s.
    pub(crate) fn launch(
        self: &Arc<Self>,
        caller: &Caller,
        rec: &mut SandboxRecord,
        manifest: &SandboxManifest,
    ) -> Result<()> {
        self.launch_from(caller, rec, manifest, None)
    }

    /// [`Self::launch`], or, with `checkpoint` (the directory of a checkpoint of this
    /// sandbox's processes), a restore of the processes it holds.
    pub(crate) fn launch_from(
        self: &Arc<Self>,
        caller: &Caller,
        rec: &mut SandboxRecord,
        manifest: &SandboxManifest,
        checkpoint: Option<&std::path::Path>,
    ) -> Result<()> {
        let phases = crate::Phases::start("launch");
        let limits = manifest.spec.resolved_limits()?;
        self.prepare_disk_limit(rec, &limits)?;
        let backend = self.backends.of(rec)?.clone();
        let image = self.images.path(&rec.image_id);
        if !image.is_dir() {
            return Err(EngineError::invariant(format!(
                "image {} of sandbox {} is missing from the pool",
                rec.image_id, rec.name
            )));
        }
        let (netns, resolv_conf) = self.attach_network(rec)?;
        let spec = StartSpec {
            netns,
            resolv_conf,
            id: rec.id.clone(),
            name: rec.name.clone(),
            hostname: manifest
                .spec
                .hostname
                .clone()
                .unwrap_or_else(|| rec.name.clone()),
            uid_base: rec.uid_base,
            uid_count: ID_RANGE,
            layers: vec![image],
            volume: self.sandbox_volume(&rec.id),
            binds: Self::host_binds(rec),
            limits: devbox_backend::Limits {
                memory_bytes: limits.memory_bytes,
                pids: limits.pids,
                cpu_millis: limits.cpu_millis,
            },
        };
        phases.mark("config");
        // The backend's handle is recorded before anything runs under it, so that a restart
        // knows what is whose.
        let store = &self.store;
        let mut unrecorded = None;
        let started = {
            let mut record = |handle: &str| {
                rec.handle = Some(handle.to_string());
                store.update_sandbox(rec).map_err(|e| {
                    unrecorded = Some(e);
                    Interrupted
                })
            };
            match checkpoint {
                Some(images) => {
                    let ck = CheckpointSpec {
                        images: images.to_path_buf(),
                        log: self.checkpoint_log(&spec.id, "restore"),
                        owner: spec.uid_base,
                        binds: spec.binds.clone(),
                        tool: None,
                        netns: spec.netns.clone(),
                    };
                    backend.restore(&spec, &ck, &mut record)
                }
                None => backend.start(&spec, &mut record),
            }
        };
        let started = match started {
            Ok(s) => s,
            Err(BackendError::Interrupted) if unrecorded.is_some() => {
                self.detach_network(rec);
                return Err(unrecorded
                    .take()
                    .map(EngineError::from)
                    .unwrap_or_else(|| EngineError::invariant("recording the sandbox's handle")));
            }
            Err(e) => {
                self.detach_network(rec);
                return Err(e.into());
            }
        };
        if let Err(e) = self.network_ready(rec) {
            // Never running without its rules.
            let inst = devbox_backend::Instance {
                handle: Some(started.handle.clone()),
                process: Some(started.process),
                ..crate::backends::instance(rec)
            };
            let _ = backend.stop(&inst, Duration::ZERO, false);
            self.detach_network(rec);
            return Err(e);
        }
        if limits.disk_bytes.is_some()
            && let Err(e) = self.apply_disk_limit(rec, &limits)
        {
            // Never running without its quota.
            let inst = devbox_backend::Instance {
                handle: Some(started.handle.clone()),
                process: Some(started.process),
                ..crate::backends::instance(rec)
            };
            let _ = backend.stop(&inst, Duration::ZERO, false);
            return Err(e);
        }
        phases.mark("started");
        rec.handle = Some(started.handle);
        rec.init_pid = Some(started.process.pid);
        rec.init_start = started.process.start;
        rec.state = SandboxState::Running;
        rec.started_at = Some(now_ms());
        rec.last_error = None;
        self.store.update_sandbox(rec)?;
        self.watch(rec);
        phases.mark("recorded");
        // A restore brought the main process back with the rest; otherwise it starts now.
        // Its failure is recorded, not fatal: the sandbox runs and can be fixed.
        if checkpoint.is_none()
            && let Err(e) = self.start_main(caller, rec, manifest)
        {
            tracing::warn!(sandbox = %rec.name, "main process: {e}");
            rec.last_error = Some(format!("the main process did not start: {e}"));
            self.store.update_sandbox(rec)?;
        }
        Ok(())
    }

    /// Watches a running sandbox's init and records its unexpected exit.
    pub(crate) fn watch(self: &Arc<Self>, rec: &SandboxRecord) {
        let Some(pid) = rec.init_pid else { return };
        self.supervise(rec);
        let Ok((backend, inst)) = self.backend_of(rec) else {
            return;
        };
        let Some(fd) = backend.watch(&inst) else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let engine = self.clone();
        let backend = backend.clone();
        let (name, id) = (rec.name.clone(), rec.id.clone());
        handle.spawn(async move {
            let Ok(afd) = crate::os::async_fd(fd, tokio::io::Interest::READABLE) else {
                return;
            };
            if afd.readable().await.is_err() {
                return;
            }
            let fd = afd.into_inner();
            backend.reap(&fd);
            let _ = tokio::task::spawn_blocking(move || engine.on_init_exit(&name, &id, pid)).await;
        });
    }

    fn on_init_exit(&self, name: &str, id: &str, pid: i32) {
        let lock = self.locks.get(name);
        let _guard = lock.blocking_lock();
        let Ok(Some(mut rec)) = self.store.sandbox_by_name(name) else {
            return;
        };
        if rec.id != id || rec.state != SandboxState::Running || rec.init_pid != Some(pid) {
            return; // a stop or destroy handled it
        }
        tracing::warn!(sandbox = %name, "the sandbox's init exited on its own");
        self.release_runtime(&rec);
        rec.state = SandboxState::Stopped;
        rec.init_pid = None;
        rec.init_start = None;
        rec.stopped_at = Some(now_ms());
        rec.last_error = Some("the sandbox's init process exited unexpectedly".into());
        let _ = self.store.update_sandbox(&rec);
    }

    /// Starts a stopped sandbox.
    pub async fn start(self: &Arc<Self>, caller: &Caller, name: &str) -> Result<SandboxInfo> {
        let detail = serde_json::json!({});
        self.on_sandbox(caller, name, "sandbox.start", detail, |e, caller, rec| {
            match rec.state {
                SandboxState::Running => return e.info(rec, false),
                SandboxState::Broken => {
                    return Err(EngineError::WrongState(format!(
                        "sandbox {} is broken ({}): destroy it, or restart the daemon to try to repair it",
                        rec.name,
                        rec.last_error.as_deref().unwrap_or("no error recorded")
                    )));
                }
                s if !s.can_start() => {
                    return Err(EngineError::WrongState(format!(
                        "sandbox {} is {s:?}; try again shortly",
                        rec.name
                    )));
                }
                _ => {}
            }
            let manifest = Self::manifest_of(rec)?;
            e.launch(caller, rec, &manifest)?;
            e.info(rec, false)
        })
        .await
    }

    /// Stops a sandbox: SIGTERM to every process, SIGKILL after `grace` (default from config).
    pub async fn stop(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        grace: Option<Duration>,
    ) -> Result<SandboxInfo> {
        let detail = serde_json::json!({"grace_ms": grace.map(|g| g.as_millis() as u64)});
        self.on_sandbox(caller, name, "sandbox.stop", detail, move |e, _, rec| {
            e.forget_idle(&rec.id);
            if rec.state == SandboxState::Running {
                e.halt(rec, grace.unwrap_or(e.cfg.stop_grace))?;
            }
            e.info(rec, false)
        })
        .await
    }

    /// Stops the init (gracefully, then by force), releases the runtime, records `stopped`.
    pub(crate) fn halt(&self, rec: &mut SandboxRecord, grace: Duration) -> Result<()> {
        self.halt_holding_mounts(rec, grace, false).map(drop)
    }

    /// [`Self::halt`]; with `hold`, also returns a handle on the sandbox's mounts taken
    /// before its processes died. While it is held, the sandbox's mounts outlive its
    /// processes: the halt does not wait for the kernel to unmount its root (which, after
    /// the sandbox touched many files, means evicting their inodes: 0.5 s for 100,000), and
    /// whoever drops the handle pays that instead, off the caller's path.
    pub(crate) fn halt_holding_mounts(
        &self,
        rec: &mut SandboxRecord,
        grace: Duration,
        hold: bool,
    ) -> Result<Option<HeldMounts>> {
        let phases = crate::Phases::start("halt");
        self.thaw_before_stop(rec);
        self.supervisors.end(&rec.id);
        let (backend, inst) = self.backend_of(rec)?;
        let held = backend.stop(&inst, grace, hold)?;
        self.detach_network(rec);
        phases.mark("stopped");
        rec.state = SandboxState::Stopped;
        rec.init_pid = None;
        rec.init_start = None;
        rec.stopped_at = Some(now_ms());
        self.store.update_sandbox(rec)?;
        Ok(held)
    }

    /// Destroys a sandbox: stops it (without grace when `force`), then removes its processes,
    /// cgroups, runtime state, storage and record.
    pub async fn destroy(self: &Arc<Self>, caller: &Caller, name: &str, force: bool) -> Result<()> {
        self.destroy_with(caller, name, force, true).await
    }

    /// [`Self::destroy`]; without `wait_network`, it returns before the kernel has removed
    /// the sandbox's network (a one-shot run: see [`Self::detach_network`]).
    pub(crate) async fn destroy_with(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        force: bool,
        wait_network: bool,
    ) -> Result<()> {
        let detail = serde_json::json!({"force": force});
        self.on_sandbox(caller, name, "sandbox.destroy", detail, move |e, _, rec| {
            let grace = if force {
                Duration::ZERO
            } else {
                e.cfg.stop_grace
            };
            e.destroy_locked(rec, grace)?;
            if wait_network {
                e.network_removed(&rec.id);
            }
            Ok(())
        })
        .await
    }

    pub(crate) fn destroy_locked(&self, rec: &mut SandboxRecord, grace: Duration) -> Result<()> {
        let phases = crate::Phases::start("destroy");
        let was = rec.state;
        rec.state = SandboxState::Destroying;
        self.store.update_sandbox(rec)?;
        if was == SandboxState::Running || self.alive(rec) {
            self.halt(rec, grace)?;
            rec.state = SandboxState::Destroying;
            self.store.update_sandbox(rec)?;
        } else {
            self.release_runtime(rec);
        }
        phases.mark("halted");
        self.delete_volume_retrying(&self.sandbox_volume(&rec.id))?;
        phases.mark("volume");
        for snap in self.store.snapshots_of(&rec.id)? {
            self.remove_snapshot(snap)?;
        }
        let _ = std::fs::remove_dir_all(self.cfg.state_dir.join("checkpoints").join(&rec.id));
        let _ = std::fs::remove_dir(self.pool.snapshots_dir().join(&rec.id));
        phases.mark("snapshots");
        self.store.delete_sandbox(&rec.id)?;
        self.forget_idle(&rec.id);
        phases.mark("record");
        Ok(())
    }

    /// Deletes a volume, retrying while the kernel still releases the sandbox's mounts.
    pub(crate) fn delete_volume_retrying(&self, path: &std::path::Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.pool.delete_volume(path) {
                Ok(()) => return Ok(()),
                Err(devbox_storage::StorageError::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Every sandbox.
    pub async fn list(self: &Arc<Self>) -> Result<Vec<SandboxInfo>> {
        self.blocking(|e| {
            e.store
                .sandboxes()?
                .iter()
                .map(|r| e.info(r, false))
                .collect()
        })
        .await
    }

    /// One sandbox, with processes and storage use.
    pub async fn inspect(self: &Arc<Self>, name: &str) -> Result<SandboxInfo> {
        let name = name.to_string();
        self.blocking(move |e| {
            let rec = e.record(&name)?;
            e.info(&rec, true)
        })
        .await
    }

    pub(crate) fn info(&self, rec: &SandboxRecord, detailed: bool) -> Result<SandboxInfo> {
        let manifest = Self::manifest_of(rec)?;
        // A stored spec this version no longer accepts (limits beyond today's ranges) is
        // shown with its error, not allowed to fail the listing of every sandbox.
        let mut last_error = rec.last_error.clone();
        let limits = manifest.spec.resolved_limits().unwrap_or_else(|e| {
            last_error = Some(format!("{e}: recreate the sandbox with limits in range"));
            devbox_spec::ResolvedLimits {
                memory_bytes: 0,
                cpu_millis: 0,
                pids: 0,
                disk_bytes: None,
                exec_timeout_ms: None,
            }
        });
        let running = rec.state == SandboxState::Running;
        let backend = if running {
            self.backend_of(rec).ok()
        } else {
            None
        };
        let (health, idle) = self.supervision_info(rec, &manifest);
        let processes = match &backend {
            Some((b, inst)) if detailed => b
                .processes(inst)
                .into_iter()
                .map(|(pid, command)| ProcessInfo { pid, command })
                .collect(),
            _ => Vec::new(),
        };
        Ok(SandboxInfo {
            id: rec.id.clone(),
            name: rec.name.clone(),
            state: rec.state,
            image: manifest.spec.image_ref().to_string(),
            image_id: rec.image_id.clone(),
            limits,
            manifest,
            uid_base: rec.uid_base,
            init_pid: rec.init_pid,
            processes,
            usage: backend.as_ref().map(|(b, inst)| b.usage(inst)),
            storage_bytes: if detailed {
                Some(devbox_storage::disk_usage(
                    &self.sandbox_volume(&rec.id).join("upper"),
                ))
            } else {
                None
            },
            disk: if detailed { self.disk_usage(rec) } else { None },
            created_at: rfc3339(rec.created_at),
            started_at: rec.started_at.map(rfc3339),
            stopped_at: rec.stopped_at.map(rfc3339),
            last_error,
            health,
            idle,
            alerts: if detailed {
                self.alerts.active_of(&rec.name)
            } else {
                Vec::new()
            },
        })
    }
}
