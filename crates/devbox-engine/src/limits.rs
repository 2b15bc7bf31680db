//! Limits that hold while a sandbox runs: the disk quota of its writable layer (set on its
//! volume before every start, since a rollback or clone brings a new volume), live changes
//! of every limit ([`Engine::update_limits`]), and the exec timeout and OOM verdicts an
//! exec's result carries.
//!
//! A live change is checked whole before anything changes: each value parses and is in the
//! spec's range; memory, pids and disk are not set below what the sandbox uses now (the
//! kernel would OOM-kill, refuse forks or refuse every write at once: the caller frees
//! first, then lowers). Then the cgroup (through the backend, which puts back what it
//! changed on a failure), then the quota (the cgroup is put back if it fails), then the
//! stored spec, then the `sandbox.update` audit record with old and new values.

use std::sync::Arc;

use devbox_spec::quantity::format_bytes;
use devbox_spec::{ResolvedLimits, SandboxManifest};
use devbox_store::{SandboxRecord, SandboxState};
use devbox_wire::{DiskUsage, UpdateLimitsRequest};

use crate::model::SandboxInfo;
use crate::{Caller, Engine, EngineError, Result};

/// The word that lifts an optional limit in an update.
const NONE: &str = "none";

impl Engine {
    /// Refuses a spec with a disk quota on a pool whose driver cannot enforce one.
    pub(crate) fn check_disk_limit(&self, manifest: &SandboxManifest) -> Result<()> {
        if manifest.spec.limits.disk.is_some() && !self.pool.driver().capabilities().quotas {
            return Err(EngineError::InvalidRequest(format!(
                "spec.limits.disk: this daemon's storage pool uses the {} driver, which cannot \
                 limit a sandbox's disk use; run the daemon on a btrfs pool (the default loop \
                 file, or DEVBOX_POOL=/path on btrfs), or leave limits.disk out",
                self.pool.driver().name()
            )));
        }
        Ok(())
    }

    /// Sets the sandbox's disk quota (or lifts a stale one) on its volume: before every
    /// start, because a rollback or a clone gives it a new volume, which carries the limit
    /// of the snapshot it came from.
    pub(crate) fn apply_disk_limit(
        &self,
        rec: &SandboxRecord,
        limits: &ResolvedLimits,
    ) -> Result<()> {
        if !self.pool.driver().capabilities().quotas {
            return match limits.disk_bytes {
                Some(_) => Err(self
                    .check_disk_limit(&Self::manifest_of(rec)?)
                    .err()
                    .unwrap_or_else(|| {
                        EngineError::InvalidRequest("this pool cannot limit disk use".into())
                    })),
                None => Ok(()),
            };
        }
        self.pool
            .set_volume_limit(&self.sandbox_volume(&rec.id), limits.disk_bytes)
            .map_err(|e| EngineError::internal("setting the disk quota", e))
    }

    /// Room a start gives a volume beyond what it holds: the overlay recreates its work
    /// directory at every mount, which fails (and the root turns read-only) on a volume at
    /// its quota.
    const START_ROOM: u64 = 8 << 20;

    /// Before a start: the disk limit, or what the volume holds plus [`Self::START_ROOM`] if
    /// that is more, so that the overlay mounts writable even on a full volume. The exact
    /// limit follows once the sandbox runs ([`Self::apply_disk_limit`]); until then only
    /// its init runs (or, for a restore, its restored processes: they may write up to
    /// [`Self::START_ROOM`] past the quota in that instant).
    pub(crate) fn prepare_disk_limit(
        &self,
        rec: &SandboxRecord,
        limits: &ResolvedLimits,
    ) -> Result<()> {
        let Some(limit) = limits.disk_bytes else {
            return self.apply_disk_limit(rec, limits);
        };
        if !self.pool.driver().capabilities().quotas {
            return self.apply_disk_limit(rec, limits);
        }
        let used = self
            .pool
            .volume_quota(&self.sandbox_volume(&rec.id))
            .map_or(0, |q| q.used_bytes);
        let roomy = ResolvedLimits {
            disk_bytes: Some(limit.max(used.saturating_add(Self::START_ROOM))),
            ..*limits
        };
        self.apply_disk_limit(rec, &roomy)
    }

    /// The writable layer as its quota counts it (none without a quota on a quota pool).
    pub(crate) fn disk_usage(&self, rec: &SandboxRecord) -> Option<DiskUsage> {
        let q = self.pool.volume_quota(&self.sandbox_volume(&rec.id))?;
        q.limit_bytes.map(|limit| DiskUsage {
            used_bytes: q.used_bytes,
            limit_bytes: Some(limit),
        })
    }

    /// Changes a sandbox's limits; a running one gets them at once, without a restart.
    /// Nothing changes unless all of them can (see the module's documentation).
    pub async fn update_limits(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        req: UpdateLimitsRequest,
    ) -> Result<SandboxInfo> {
        let name = name.to_string();
        let lock = self.locks.get(&name);
        let _guard = lock.lock().await;
        let audit_name = name.clone();
        let asked = serde_json::to_value(&req).unwrap_or_default();
        let r = self
            .blocking(move |e| e.update_limits_blocking(&name, &req))
            .await;
        match &r {
            Ok((_, old, new)) => self.audit(
                caller,
                "sandbox.update",
                Some(&audit_name),
                serde_json::json!({"limits": {"old": old, "new": new}}),
            ),
            Err(_) => self.audit_result(
                caller,
                "sandbox.update",
                Some(&audit_name),
                serde_json::json!({"limits": {"asked": asked}}),
                &r,
            ),
        }
        r.map(|(info, _, _)| info)
    }

    fn update_limits_blocking(
        &self,
        name: &str,
        req: &UpdateLimitsRequest,
    ) -> Result<(SandboxInfo, ResolvedLimits, ResolvedLimits)> {
        if req.is_empty() {
            return Err(EngineError::InvalidRequest(
                "nothing to change: give --memory, --cpus, --pids, --disk or --exec-timeout".into(),
            ));
        }
        let mut rec = self.record(name)?;
        if !matches!(rec.state, SandboxState::Running | SandboxState::Stopped) {
            return Err(EngineError::WrongState(format!(
                "sandbox {} is {}: limits change on running or stopped sandboxes",
                rec.name,
                serde_json::to_string(&rec.state)
                    .unwrap_or_default()
                    .trim_matches('"')
            )));
        }
        let mut manifest = Self::manifest_of(&rec)?;
        let old = manifest.spec.resolved_limits()?;
        let limits = &mut manifest.spec.limits;
        if let Some(m) = &req.memory {
            limits.memory = Some(m.trim().to_string());
        }
        if let Some(c) = &req.cpu {
            limits.cpu = Some(c.trim().to_string());
        }
        if let Some(p) = req.pids {
            limits.pids = Some(p);
        }
        let lift = |v: &str| v.trim().eq_ignore_ascii_case(NONE);
        if let Some(d) = &req.disk {
            limits.disk = (!lift(d)).then(|| d.trim().to_string());
        }
        if let Some(t) = &req.exec_timeout {
            limits.exec_timeout = (!lift(t)).then(|| t.trim().to_string());
        }
        let new = manifest.spec.resolved_limits()?;
        if req.disk.is_some() {
            self.check_disk_limit(&manifest)?;
        }
        let running = rec.state == SandboxState::Running && self.alive(&rec);
        let backend = self.backend_of(&rec)?;
        // Not below what is in use now: the kernel would kill or refuse at once.
        if running {
            let usage = backend.0.usage(&backend.1);
            if new.memory_bytes < old.memory_bytes && new.memory_bytes < usage.memory_bytes {
                return Err(EngineError::InvalidRequest(format!(
                    "memory {} is below what sandbox {} uses now ({}): the kernel would kill its \
                     processes; free memory first, or give at least that",
                    format_bytes(new.memory_bytes),
                    rec.name,
                    format_bytes(usage.memory_bytes)
                )));
            }
            if new.pids < old.pids && new.pids < usage.pids {
                return Err(EngineError::InvalidRequest(format!(
                    "pids {} is below the {} processes and threads sandbox {} runs now: end \
                     some first, or give at least that",
                    new.pids, usage.pids, rec.name
                )));
            }
        }
        // What the layer holds: as its qgroup counts it, or (qgroups not on yet) the
        // apparent sizes of its files.
        let held = || {
            let vol = self.sandbox_volume(&rec.id);
            self.pool
                .volume_quota(&vol)
                .map_or_else(|| self.pool.volume_usage(&vol), |q| q.used_bytes)
        };
        if let Some(disk) = new.disk_bytes
            && new.disk_bytes != old.disk_bytes
            && disk < held()
        {
            return Err(EngineError::InvalidRequest(format!(
                "disk {} is below what sandbox {}'s writable layer holds now ({}): every \
                 write would fail; delete files first, or give at least that",
                format_bytes(disk),
                rec.name,
                format_bytes(held())
            )));
        }
        let as_backend = |l: &ResolvedLimits| devbox_backend::Limits {
            memory_bytes: l.memory_bytes,
            pids: l.pids,
            cpu_millis: l.cpu_millis,
        };
        let cgroup_changes = (old.memory_bytes, old.pids, old.cpu_millis)
            != (new.memory_bytes, new.pids, new.cpu_millis);
        if running && cgroup_changes {
            backend
                .0
                .update_limits(&backend.1, &as_backend(&old), &as_backend(&new))?;
        }
        let undo_cgroup = || {
            if running && cgroup_changes {
                let _ = backend
                    .0
                    .update_limits(&backend.1, &as_backend(&new), &as_backend(&old));
            }
        };
        if new.disk_bytes != old.disk_bytes
            && let Err(e) = self.apply_disk_limit(&rec, &new)
        {
            undo_cgroup();
            return Err(e);
        }
        rec.manifest = serde_json::to_string(&manifest)
            .map_err(|e| EngineError::internal("storing the spec", e))?;
        if let Err(e) = self.store.update_sandbox(&rec) {
            undo_cgroup();
            if new.disk_bytes != old.disk_bytes {
                let _ = self.apply_disk_limit(&rec, &old);
            }
            return Err(e.into());
        }
        Ok((self.info(&rec, false)?, old, new))
    }
}

/// The timeout of one exec: the request's, else the spec's `limits.execTimeout`.
pub(crate) fn exec_timeout(
    requested: Option<&str>,
    manifest: &SandboxManifest,
) -> Result<Option<std::time::Duration>> {
    let ms = match requested {
        Some(t) => Some(
            devbox_spec::parse_exec_timeout(t)
                .map_err(|e| EngineError::InvalidRequest(format!("timeout: {e}")))?,
        ),
        None => manifest.spec.resolved_limits()?.exec_timeout_ms,
    };
    Ok(ms.map(std::time::Duration::from_millis))
}

/// Whether a command that ended so was the OOM killer's doing: it died of SIGKILL (or, a
/// shell's child having died so, exited 137) while the sandbox's OOM kill count rose.
pub(crate) fn oom_killed(code: i32, signal: Option<i32>, before: u64, after: u64) -> bool {
    (signal == Some(libc::SIGKILL) || code == 128 + libc::SIGKILL) && after > before
}
