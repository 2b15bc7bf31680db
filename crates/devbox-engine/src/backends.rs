//! The backends the engine runs sandboxes on: the one place that builds them (and so the
//! one engine file that names `devbox-runtime`). Everything else talks to
//! [`devbox_backend::Backend`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use devbox_backend::{Backend, Instance};
use devbox_store::SandboxRecord;

use crate::{EngineConfig, EngineError, Result};

/// Where `sandbox-init` is looked for by default.
pub(crate) fn default_init_binary() -> PathBuf {
    devbox_runtime::native::NativeBackend::default_init_binary()
}

/// The engine's backends by kind; new sandboxes go to the default one.
pub(crate) struct Backends {
    by_kind: HashMap<&'static str, Arc<dyn Backend>>,
    default: Arc<dyn Backend>,
}

impl Backends {
    /// The backends of a daemon: the native container backend.
    pub(crate) fn native(cfg: &EngineConfig) -> Result<Self> {
        let native =
            devbox_runtime::native::NativeBackend::new(devbox_runtime::native::NativeConfig {
                runtime_dir: cfg.runtime_dir.clone(),
                cgroup_parent: cfg.cgroup_parent.clone(),
                init_binary: cfg.init_binary.clone(),
                warm_launchers: cfg.warm_launchers,
            })?;
        Ok(Self::with(Arc::new(native), Vec::new()))
    }

    /// `default` and `others`, each under its kind.
    pub(crate) fn with(default: Arc<dyn Backend>, others: Vec<Arc<dyn Backend>>) -> Self {
        let mut by_kind = HashMap::new();
        for b in others.into_iter().chain([default.clone()]) {
            by_kind.insert(b.kind(), b);
        }
        Self { by_kind, default }
    }

    /// The backend new sandboxes get.
    pub(crate) fn default(&self) -> &Arc<dyn Backend> {
        &self.default
    }

    /// Every backend.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Arc<dyn Backend>> {
        self.by_kind.values()
    }

    /// The backend of a sandbox.
    pub(crate) fn of(&self, rec: &SandboxRecord) -> Result<&Arc<dyn Backend>> {
        self.by_kind.get(rec.backend.as_str()).ok_or_else(|| {
            EngineError::invariant(format!(
                "sandbox {} runs on the {:?} backend, which this daemon does not have",
                rec.name, rec.backend
            ))
        })
    }
}

/// A sandbox as its backend sees it.
pub(crate) fn instance(rec: &SandboxRecord) -> Instance {
    Instance {
        id: rec.id.clone(),
        name: rec.name.clone(),
        handle: rec.handle.clone(),
        process: rec.init_pid.map(|pid| devbox_backend::HostProcess {
            pid,
            start: rec.init_start,
        }),
    }
}
