//! Sandbox lifecycle: create, start, stop, destroy, list, inspect, and exit monitoring.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devbox_image::HOST_IMAGE;
use devbox_runtime::cgroup::{Limits, SandboxCgroup};
use devbox_runtime::config::{BindMount, IdMap, LaunchConfig, RootfsPlan};
use devbox_runtime::container::process_start_time;
use devbox_runtime::sys;
use devbox_spec::{Name, SandboxManifest};
use devbox_store::{ID_RANGE, SandboxRecord, SandboxState, StoreError, now_ms};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::model::{CreateSandboxRequest, ProcessInfo, SandboxInfo, rfc3339};
use crate::{Engine, EngineError, Result};

/// A random id for a new sandbox.
pub(crate) fn new_id() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    hex::encode(b)
}

/// Whether the process `pid` that started at `start` (clock ticks) still runs.
pub(crate) fn alive(pid: Option<i32>, start: Option<u64>) -> bool {
    match (pid, start) {
        (Some(pid), Some(start)) => process_start_time(pid) == Some(start),
        _ => false,
    }
}

fn wait_exit(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(n) if n > 0 => {
                reap(pidfd);
                return true;
            }
            Ok(_) => return false,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Collects an exited init if it became our child (the daemon is a subreaper).
pub(crate) fn reap(pidfd: &OwnedFd) {
    let _ = nix::sys::wait::waitid(
        nix::sys::wait::Id::PIDFd(pidfd.as_fd()),
        nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOHANG,
    );
}

impl Engine {
    /// Runs `op` on the blocking pool with sandbox `name`'s lock held and its record, then
    /// appends `action` with `detail` and the outcome to the audit log.
    pub(crate) async fn on_sandbox<T: Send + 'static>(
        self: &Arc<Self>,
        name: &str,
        action: &str,
        detail: serde_json::Value,
        op: impl FnOnce(&Arc<Engine>, &mut SandboxRecord) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let key = name.to_string();
        let r = self
            .blocking(move |e| {
                let lock = e.locks.get(&key);
                let _guard = lock.blocking_lock();
                let mut rec = e.record(&key)?;
                op(&e, &mut rec)
            })
            .await;
        self.audit_result(action, Some(name), detail, &r);
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
            cgroup: None,
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

    pub(crate) fn cgroup_of(&self, rec: &SandboxRecord) -> SandboxCgroup {
        self.cgroups
            .sandbox(rec.cgroup.as_deref().unwrap_or(&rec.id))
    }

    /// Creates a sandbox (and starts it unless asked not to).
    pub async fn create(self: &Arc<Self>, req: CreateSandboxRequest) -> Result<SandboxInfo> {
        self.create_with(req, false).await
    }

    /// Creates a sandbox; `ephemeral` ones are destroyed by their creator after one exec.
    pub async fn create_with(
        self: &Arc<Self>,
        req: CreateSandboxRequest,
        ephemeral: bool,
    ) -> Result<SandboxInfo> {
        let name = req
            .name
            .clone()
            .or_else(|| req.manifest.as_ref().and_then(|m| m.metadata.name.clone()));
        let detail = serde_json::json!({"manifest": req.manifest, "start": req.start, "ephemeral": ephemeral});
        let r = self
            .blocking(move |e| e.create_blocking(req, ephemeral))
            .await;
        self.audit_result("sandbox.create", name.as_deref(), detail, &r);
        r
    }

    fn create_blocking(
        self: &Arc<Self>,
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
            self.check_main(&rec, &manifest)?;
            self.make_volume(&rec)?;
            phases.mark("volume");
            if req.start {
                self.launch(&mut rec, &manifest)?;
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

    /// Kills whatever still runs in the sandbox's cgroup and removes it and the runtime dir.
    pub(crate) fn release_runtime(&self, rec: &SandboxRecord) {
        let phases = crate::Phases::start("release");
        let cg = self.cgroup_of(rec);
        if cg.exists() {
            if !cg.pids().is_empty() {
                let _ = cg.kill_all();
                phases.mark("killed stragglers");
            }
            if let Err(e) = cg.remove(Duration::from_secs(5)) {
                tracing::warn!(sandbox = %rec.name, "removing cgroup: {e}");
            }
            phases.mark("cgroup removed");
        }
        // The runtime dir holds only empty mount points and a dead socket: remove it off the
        // caller's path (a restart's reconcile removes any a crash left).
        // It is moved aside at once, so a new start of the same sandbox gets a fresh one.
        let rt = self.sandbox_runtime_dir(&rec.id);
        let trash = self.cfg.runtime_dir.join("trash");
        let doomed = trash.join(new_id());
        let moved = std::fs::create_dir_all(&trash).and_then(|_| std::fs::rename(&rt, &doomed));
        match moved {
            Ok(()) => {
                let name = rec.name.clone();
                std::thread::spawn(move || {
                    if let Err(e) = std::fs::remove_dir_all(&doomed) {
                        tracing::warn!(sandbox = %name, "removing runtime dir: {e}");
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(sandbox = %rec.name, "moving runtime dir aside: {e}");
                let _ = std::fs::remove_dir_all(&rt);
            }
        }
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

    /// Starts the sandbox's init; on success the record says running.
    pub(crate) fn launch(
        self: &Arc<Self>,
        rec: &mut SandboxRecord,
        manifest: &SandboxManifest,
    ) -> Result<()> {
        self.launch_from(rec, manifest, None)
    }

    /// [`Self::launch`], or, with `checkpoint` (CRIU images of this sandbox), a restore of the
    /// processes they hold.
    pub(crate) fn launch_from(
        self: &Arc<Self>,
        rec: &mut SandboxRecord,
        manifest: &SandboxManifest,
        checkpoint: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<()> {
        let phases = crate::Phases::start("launch");
        let limits = manifest.spec.resolved_limits()?;
        let rt = self.sandbox_runtime_dir(&rec.id);
        crate::ensure_dir(&rt, 0o711)?;
        let cg_limits = Limits {
            memory_bytes: Some(limits.memory_bytes),
            pids: Some(limits.pids),
            cpu_millis: Some(limits.cpu_millis),
        };
        // The cgroup's name is recorded before anything runs in it, so that a restart knows
        // whose it is.
        // A restore starts its own launcher: a warm one stays for the next start.
        let warm = match checkpoint {
            None => self.take_warm(),
            Some(_) => None,
        };
        rec.cgroup = Some(
            warm.as_ref()
                .map(|w| w.cgroup.clone())
                .unwrap_or_else(|| rec.id.clone()),
        );
        if let Err(e) = self.store.update_sandbox(rec) {
            if let Some(w) = warm {
                self.discard_warm(w);
            }
            return Err(e.into());
        }
        let (cg, armed) = match warm {
            Some(w) => (self.cgroups.sandbox(&w.cgroup), Some(w.launcher)),
            None => (
                self.cgroups
                    .create(&rec.id, &cg_limits)
                    .map_err(|e| EngineError::internal("cgroup", e))?,
                None,
            ),
        };
        if armed.is_some()
            && let Err(e) = cg.apply(&cg_limits)
        {
            self.release_runtime(rec);
            return Err(EngineError::internal("cgroup limits", e));
        }
        phases.mark("cgroups");
        let image = self.images.path(&rec.image_id);
        if !image.is_dir() {
            self.release_runtime(rec);
            return Err(EngineError::Internal(format!(
                "image {} of sandbox {} is missing from the pool",
                rec.image_id, rec.name
            )));
        }
        let binds = Self::host_binds(rec)
            .into_iter()
            .map(|p| BindMount {
                source: p.clone(),
                target: p,
                readonly: true,
                idmap: true,
            })
            .collect();
        let cfg = LaunchConfig {
            id: rec.id.clone(),
            hostname: manifest
                .spec
                .hostname
                .clone()
                .unwrap_or_else(|| rec.name.clone()),
            idmap: IdMap {
                host_base: rec.uid_base,
                size: ID_RANGE,
            },
            rootfs: RootfsPlan {
                layers: vec![image],
                writable: self.sandbox_volume(&rec.id),
                binds,
            },
            runtime_dir: rt.clone(),
            agent_socket: rt.join("agent.sock"),
            cgroups: cg.paths(),
            seccomp: true,
        };
        phases.mark("config");
        let launched = match (armed, checkpoint) {
            (_, Some((criu, images))) => self
                .launcher
                .restore(&devbox_runtime::container::restore::RestoreConfig {
                    launch: cfg,
                    criu: criu.to_path_buf(),
                    images: images.to_path_buf(),
                    log: self.checkpoint_log(&rec.id, "restore"),
                })
                .map_err(|e| {
                    EngineError::Checkpoint(format!(
                        "restoring the processes of sandbox {}: {e}",
                        rec.name
                    ))
                }),
            (Some(a), None) => a
                .launch(&cfg)
                .map_err(|e| EngineError::Internal(format!("starting sandbox {}: {e}", rec.name))),
            (None, None) => self
                .launcher
                .launch(&cfg)
                .map_err(|e| EngineError::Internal(format!("starting sandbox {}: {e}", rec.name))),
        };
        let pid = match launched {
            Ok(pid) => pid,
            Err(e) => {
                self.release_runtime(rec);
                return Err(e);
            }
        };
        phases.mark("sandbox-init");
        rec.init_pid = Some(pid);
        rec.init_start = process_start_time(pid);
        rec.state = SandboxState::Running;
        rec.started_at = Some(now_ms());
        rec.last_error = None;
        self.store.update_sandbox(rec)?;
        self.watch(rec);
        phases.mark("recorded");
        // A restore brought the main process back with the rest; otherwise it starts now.
        // Its failure is recorded, not fatal: the sandbox runs and can be fixed.
        if checkpoint.is_none()
            && let Err(e) = self.start_main(rec, manifest)
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
        let Ok(pidfd) = sys::pidfd_open(pid) else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let engine = self.clone();
        let (name, id) = (rec.name.clone(), rec.id.clone());
        handle.spawn(async move {
            let Ok(afd) = crate::os::async_fd(pidfd, tokio::io::Interest::READABLE) else {
                return;
            };
            if afd.readable().await.is_err() {
                return;
            }
            let pidfd = afd.into_inner();
            reap(&pidfd);
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
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<SandboxInfo> {
        self.on_sandbox(name, "sandbox.start", serde_json::json!({}), |e, rec| {
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
            e.launch(rec, &manifest)?;
            e.info(rec, false)
        })
        .await
    }

    /// Stops a sandbox: SIGTERM to every process, SIGKILL after `grace` (default from config).
    pub async fn stop(
        self: &Arc<Self>,
        name: &str,
        grace: Option<Duration>,
    ) -> Result<SandboxInfo> {
        let detail = serde_json::json!({"grace_ms": grace.map(|g| g.as_millis() as u64)});
        self.on_sandbox(name, "sandbox.stop", detail, move |e, rec| {
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

    /// [`Self::halt`]; with `hold`, also returns a handle on the sandbox's mount namespace
    /// taken before its processes died. While it is open, the sandbox's mounts outlive its
    /// processes: the halt does not wait for the kernel to unmount its root (which, after
    /// the sandbox touched many files, means evicting their inodes: 0.5 s for 100,000), and
    /// whoever drops the handle pays that instead, off the caller's path.
    pub(crate) fn halt_holding_mounts(
        &self,
        rec: &mut SandboxRecord,
        grace: Duration,
        hold: bool,
    ) -> Result<Option<std::fs::File>> {
        let phases = crate::Phases::start("halt");
        let mut held = None;
        if alive(rec.init_pid, rec.init_start)
            && let Some(pid) = rec.init_pid
            && let Ok(pidfd) = sys::pidfd_open(pid)
        {
            if hold {
                held = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).ok();
            }
            let socket = self.sandbox_runtime_dir(&rec.id).join("agent.sock");
            let asked =
                grace > Duration::ZERO && devbox_runtime::client::shutdown(&socket, grace).is_ok();
            let exited = asked && wait_exit(&pidfd, grace + Duration::from_secs(2));
            if !exited {
                // Killing the pid namespace's init kills everything in it; the cgroup is only
                // swept afterwards for anything that escaped (release_runtime).
                let _ = sys::pidfd_send_signal(&pidfd, libc::SIGKILL);
                phases.mark("killed");
                if !wait_exit(&pidfd, Duration::from_secs(10)) {
                    return Err(EngineError::Internal(format!(
                        "sandbox {} did not stop after SIGKILL",
                        rec.name
                    )));
                }
            }
        }
        phases.mark("processes");
        self.release_runtime(rec);
        phases.mark("runtime released");
        rec.state = SandboxState::Stopped;
        rec.init_pid = None;
        rec.init_start = None;
        rec.stopped_at = Some(now_ms());
        self.store.update_sandbox(rec)?;
        Ok(held)
    }

    /// Destroys a sandbox: stops it (without grace when `force`), then removes its processes,
    /// cgroups, runtime state, storage and record.
    pub async fn destroy(self: &Arc<Self>, name: &str, force: bool) -> Result<()> {
        let detail = serde_json::json!({"force": force});
        self.on_sandbox(name, "sandbox.destroy", detail, move |e, rec| {
            let grace = if force {
                Duration::ZERO
            } else {
                e.cfg.stop_grace
            };
            e.destroy_locked(rec, grace)
        })
        .await
    }

    pub(crate) fn destroy_locked(&self, rec: &mut SandboxRecord, grace: Duration) -> Result<()> {
        let phases = crate::Phases::start("destroy");
        let was = rec.state;
        rec.state = SandboxState::Destroying;
        self.store.update_sandbox(rec)?;
        if was == SandboxState::Running || alive(rec.init_pid, rec.init_start) {
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
            }
        });
        let running = rec.state == SandboxState::Running;
        let cg = self.cgroup_of(rec);
        let processes = if detailed && running {
            cg.pids()
                .into_iter()
                .map(|pid| {
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    let command = cmd
                        .split(|b| *b == 0)
                        .filter(|s| !s.is_empty())
                        .map(|s| String::from_utf8_lossy(s))
                        .collect::<Vec<_>>()
                        .join(" ");
                    ProcessInfo { pid, command }
                })
                .collect()
        } else {
            Vec::new()
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
            usage: if running { Some(cg.usage()) } else { None },
            storage_bytes: if detailed {
                Some(devbox_storage::disk_usage(
                    &self.sandbox_volume(&rec.id).join("upper"),
                ))
            } else {
                None
            },
            created_at: rfc3339(rec.created_at),
            started_at: rec.started_at.map(rfc3339),
            stopped_at: rec.stopped_at.map(rfc3339),
            last_error,
        })
    }
}
