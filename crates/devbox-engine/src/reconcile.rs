//! Bringing recorded state and the host back in line after a restart (or a crash).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use devbox_image::HOST_IMAGE;
use devbox_storage::Driver;
use devbox_store::{SandboxState, SnapshotState};

use crate::sandbox::alive;
use crate::{Engine, Result};

impl Engine {
    /// Finishes or undoes interrupted operations, marks sandboxes whose processes are gone
    /// as stopped, re-attaches exit monitors to running ones, and removes cgroups, volumes,
    /// runtime directories and staging areas that no record owns.
    pub(crate) fn reconcile(self: &Arc<Self>) -> Result<()> {
        // Snapshots first: a snapshot whose copy exists is complete (btrfs snapshots are
        // atomic; a copy is only recorded ready after it finished), one without is dropped.
        for mut snap in self.store.all_snapshots()? {
            match snap.state {
                SnapshotState::Ready => {}
                SnapshotState::Deleting => self.remove_snapshot(snap)?,
                SnapshotState::Creating => {
                    let complete = self.snapshot_path(&snap).join("upper").exists()
                        && self.pool.driver() == Driver::Btrfs;
                    if complete {
                        // A checkpoint of processes is complete once its metadata is written,
                        // which happens before the files are taken.
                        snap.processes = self
                            .checkpoint_dir(&snap)
                            .join(devbox_runtime::checkpoint::CheckpointMeta::FILE)
                            .exists();
                        snap.state = SnapshotState::Ready;
                        self.store.update_snapshot(&snap)?;
                    } else {
                        let _ = self.pool.delete_volume(&self.snapshot_path(&snap));
                        let _ = std::fs::remove_dir_all(self.checkpoint_dir(&snap));
                        self.store.delete_snapshot(&snap)?;
                    }
                }
            }
        }
        let records = self.store.sandboxes()?;
        let mut known = HashSet::new();
        for mut rec in records {
            match rec.state {
                SandboxState::Creating => {
                    tracing::info!(sandbox = %rec.name, "undoing an interrupted create");
                    self.release_runtime(&rec);
                    self.delete_volume_retrying(&self.sandbox_volume(&rec.id))?;
                    self.store.delete_sandbox(&rec.id)?;
                    continue;
                }
                SandboxState::Destroying => {
                    tracing::info!(sandbox = %rec.name, "finishing an interrupted destroy");
                    self.destroy_locked(&mut rec, Duration::ZERO)?;
                    continue;
                }
                _ if rec.pending.is_some()
                    && matches!(rec.state, SandboxState::Running | SandboxState::Stopped) =>
                {
                    // The operation swaps the writable volume: nothing may run on the old one.
                    // (`halt` kills only a live init, and releases the runtime either way.)
                    if rec.state == SandboxState::Running {
                        self.halt(&mut rec, Duration::ZERO)?;
                    }
                    if let Err(e) = self.finish_pending(&mut rec) {
                        tracing::error!(sandbox = %rec.name, "finishing an interrupted operation: {e}");
                    }
                }
                SandboxState::Running => {
                    let socket = self.sandbox_runtime_dir(&rec.id).join("agent.sock");
                    let responsive = alive(rec.init_pid, rec.init_start)
                        && devbox_runtime::client::ping(&socket, Duration::from_secs(2)).is_ok();
                    if responsive {
                        // The daemon may have died with the sandbox frozen for a snapshot.
                        let _ = self
                            .cgroup_of(&rec)
                            .set_frozen(false, Duration::from_secs(5));
                        self.watch(&rec);
                    } else {
                        tracing::info!(sandbox = %rec.name, "its processes are gone: marking it stopped");
                        self.halt(&mut rec, Duration::ZERO)?;
                        rec.last_error = Some(
                            "stopped while the daemon was not running (host reboot or crash)"
                                .into(),
                        );
                        self.store.update_sandbox(&rec)?;
                    }
                }
                SandboxState::Stopped => self.release_runtime(&rec),
            }
            known.insert(rec.id.clone());
            if let Some(cg) = &rec.cgroup {
                known.insert(cg.clone());
            }
        }
        for id in self.cgroups.existing() {
            if !known.contains(&id) {
                tracing::info!(cgroup = %id, "removing a cgroup no sandbox owns");
                let cg = self.cgroups.sandbox(&id);
                let _ = cg.kill_all();
                let _ = cg.remove(Duration::from_secs(5));
            }
        }
        for dir in [self.pool.sandboxes_dir(), self.cfg.sandboxes_runtime_dir()] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().to_string();
                if known.contains(&id) {
                    continue;
                }
                tracing::info!(path = %e.path().display(), "removing what no sandbox owns");
                if dir == self.pool.sandboxes_dir() {
                    self.delete_volume_retrying(&e.path())?;
                } else {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        // Snapshot volumes no record owns (a crash between copying and recording).
        let snapshot_ids: HashSet<String> = self
            .store
            .all_snapshots()?
            .into_iter()
            .map(|s| s.id)
            .collect();
        for dir in std::fs::read_dir(self.pool.snapshots_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            for e in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if !snapshot_ids.contains(&e.file_name().to_string_lossy().to_string()) {
                    tracing::info!(path = %e.path().display(), "removing a snapshot volume no record owns");
                    let _ = self.pool.set_readonly(&e.path(), false);
                    let _ = self.pool.delete_volume(&e.path());
                }
            }
            let _ = std::fs::remove_dir(dir.path());
        }
        // Checkpoints of processes no snapshot owns; a sandbox's last CRIU logs stay with it.
        for dir in std::fs::read_dir(self.cfg.state_dir.join("checkpoints"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if !known.contains(&dir.file_name().to_string_lossy().to_string()) {
                let _ = std::fs::remove_dir_all(dir.path());
                continue;
            }
            for e in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = e.file_name().to_string_lossy().to_string();
                if e.path().is_dir() && !snapshot_ids.contains(&name) {
                    tracing::info!(path = %e.path().display(), "removing a checkpoint no snapshot owns");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(self.cfg.runtime_dir.join("trash"));
        self.images.clear_staging();
        let recorded: HashSet<String> = self.store.images()?.into_iter().map(|i| i.id).collect();
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
                self.store.delete_image(&id)?;
            }
        }
        Ok(())
    }
}
