//! Warm launchers: `sandbox-init` processes that have already joined a cgroup of their own.
//!
//! Moving a process into a cgroup waits for an RCU grace period (5-15 ms on the project's
//! machines), the largest part of a cold start. A few launchers are kept ready in cgroups
//! named `warm-<id>`; starting a sandbox takes one (the sandbox records the cgroup's name),
//! writes its limits, and hands the launcher its config. The pool refills in the background.
//!
//! A launcher exits when its stdin closes, so a killed daemon's launchers end by themselves;
//! the next daemon's reconcile kills any still in a `warm-*` cgroup no sandbox took (and any
//! that had not joined one yet, by the daemon's mark), and removes those cgroups.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devbox_runtime::cgroup::Limits;
use devbox_runtime::launch::ArmedLauncher;

use crate::Engine;

/// Prefix of the cgroups of warm launchers.
pub(crate) const WARM_PREFIX: &str = "warm-";

/// A launcher waiting in its cgroup.
pub(crate) struct Warm {
    pub(crate) cgroup: String,
    pub(crate) launcher: ArmedLauncher,
}

/// The ready launchers.
#[derive(Default)]
pub(crate) struct WarmPool {
    ready: Mutex<Vec<Warm>>,
    filling: AtomicBool,
    pub(crate) target: usize,
}

impl WarmPool {
    pub(crate) fn new(target: usize) -> Self {
        Self {
            target,
            ..Default::default()
        }
    }
}

impl Engine {
    /// Takes a warm launcher, if one is ready, and starts refilling.
    pub(crate) fn take_warm(self: &Arc<Self>) -> Option<Warm> {
        let w = self
            .warm
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        self.refill_warm();
        w
    }

    /// Brings the pool back to its target size in the background.
    pub(crate) fn refill_warm(self: &Arc<Self>) {
        if self.warm.target == 0 || self.warm.filling.swap(true, Ordering::SeqCst) {
            return;
        }
        let engine = self.clone();
        std::thread::spawn(move || {
            loop {
                let have = engine
                    .warm
                    .ready
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .len();
                if have >= engine.warm.target {
                    break;
                }
                match engine.arm_one() {
                    Ok(w) => engine
                        .warm
                        .ready
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(w),
                    Err(e) => {
                        tracing::warn!("preparing a warm launcher: {e}");
                        break;
                    }
                }
            }
            engine.warm.filling.store(false, Ordering::SeqCst);
        });
    }

    fn arm_one(&self) -> crate::Result<Warm> {
        let name = format!("{WARM_PREFIX}{}", crate::sandbox::new_id());
        let cg = self
            .cgroups
            .create(&name, &Limits::default())
            .map_err(|e| crate::EngineError::internal("cgroup", e))?;
        match self.launcher.arm(&cg.paths()) {
            Ok(launcher) => Ok(Warm {
                cgroup: name,
                launcher,
            }),
            Err(e) => {
                let _ = cg.kill_all();
                let _ = cg.remove(Duration::from_secs(2));
                Err(crate::EngineError::internal("sandbox-init", e))
            }
        }
    }

    pub(crate) fn discard_warm(&self, w: Warm) {
        let cg = self.cgroups.sandbox(&w.cgroup);
        drop(w.launcher);
        let _ = cg.kill_all();
        let _ = cg.remove(Duration::from_secs(2));
    }

    /// Stops the warm launchers and removes their cgroups (at daemon shutdown).
    pub fn shutdown(&self) {
        let drained: Vec<Warm> =
            std::mem::take(&mut *self.warm.ready.lock().unwrap_or_else(|p| p.into_inner()));
        for w in drained {
            self.discard_warm(w);
        }
    }
}
