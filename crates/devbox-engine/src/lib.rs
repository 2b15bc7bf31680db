//! The engine: dev-box's one internal command API.
//!
//! [`Engine`] owns the state ([`devbox_store::Store`]), the storage pool, the image store
//! and the backends that run sandboxes ([`devbox_backend::Backend`], built in `backends.rs`:
//! the native container backend). Its methods are the
//! operations every front end offers (the REST API, hence the CLI): sandboxes
//! ([`Engine::create`], [`Engine::start`], [`Engine::stop`], [`Engine::destroy`],
//! [`Engine::list`], [`Engine::inspect`]), commands ([`Engine::exec`], an [`ExecSession`]),
//! images and the pool. Flows that front ends share (an exec that waits for its approval, a
//! one-shot run) are in `flows.rs`; every method that records something takes who calls (a
//! [`Caller`]); requests and responses are the wire model's ([`devbox_wire`], re-exported in
//! [`model`]), so front ends only translate.
//!
//! Operations on one sandbox are serialised by a per-name lock; operations on different
//! sandboxes run in parallel. Each lifecycle step is recorded before it acts, and
//! [`Engine::open`] reconciles records with the host (processes, cgroups, volumes, runtime
//! directories), so a daemon killed at any point leaves nothing a restart cannot repair.

mod alerts;
mod approvals;
mod audit;
mod backends;
mod caller;
mod checks;
mod config;
mod error;
mod events;
mod exec;
mod flows;
mod images;
mod limits;
mod locks;
mod main_process;
mod measure;
mod metrics;
pub mod model;
mod network;
mod os;
mod reconcile;
mod sandbox;
mod snapshots;
mod stats;
mod supervise;
#[cfg(test)]
mod tests;
mod to_wire;
mod tokens;
mod transfer;
mod webhooks;

use std::path::PathBuf;
use std::sync::Arc;

use devbox_image::ImageStore;
use devbox_storage::{Pool, PoolInfo};
use devbox_store::Store;

pub use caller::Caller;
pub use checks::{ApprovalInfo, PolicyInfo, shell_join};
pub use config::{EngineConfig, MonitoringConfig, WebhookConfig};
pub use error::{EngineError, InternalSource};
pub use events::{BUS_CAPACITY, EventFilter, EventStream, StreamItem, kind_of};
pub use exec::{ExecExit, ExecSession, Output, Pty};
pub use flows::{ApprovalWait, OneShot};
pub use metrics::METRICS_CONTENT_TYPE;
pub use reconcile::{DAEMON_MARK_ENV, daemon_mark, is_own_mark};
pub use supervise::HEALTHY_LABEL;
pub use tokens::{TokenGrant, TokenRefusal};
pub use webhooks::{shown_url, signature};

/// Result of engine operations.
pub type Result<T> = std::result::Result<T, EngineError>;

/// The engine. Cheap to share: use it behind an `Arc`.
pub struct Engine {
    cfg: EngineConfig,
    store: Store,
    pool: Pool,
    images: ImageStore,
    backends: backends::Backends,
    locks: locks::LockTable,
    measurer: measure::Measurer,
    policies: checks::PolicyCache,
    approval_events: tokio::sync::watch::Sender<u64>,
    bookkeeping: exec::Bookkeeping,
    net: network::NetHandle,
    blocked_budgets: network::BlockedBudgets,
    monitor: stats::Monitor,
    metrics: metrics::Metrics,
    supervisors: supervise::Supervisors,
    events: events::EventBus,
    alerts: alerts::Alerts,
    webhooks: webhooks::Webhooks,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("state_dir", &self.cfg.state_dir)
            .finish_non_exhaustive()
    }
}

fn ensure_dir(path: &std::path::Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)
        .map_err(|e| EngineError::internal(format!("create {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| EngineError::internal(format!("chmod {}", path.display()), e))
}

impl Engine {
    /// Opens the engine: sets up the state directory, the database and the pool (creating
    /// them on first use), then reconciles recorded state with the host. Must run inside a
    /// tokio runtime (running sandboxes get exit monitors).
    pub async fn open(cfg: EngineConfig) -> Result<Arc<Engine>> {
        Self::open_with(cfg, backends::Backends::native).await
    }

    /// [`Engine::open`] with the backends `make` builds (tests: a fake one).
    pub(crate) async fn open_with(
        cfg: EngineConfig,
        make: impl FnOnce(&EngineConfig) -> Result<backends::Backends> + Send + 'static,
    ) -> Result<Arc<Engine>> {
        let engine = tokio::task::spawn_blocking(move || Self::open_blocking(cfg, make))
            .await
            .map_err(|e| EngineError::internal("opening the engine", e))??;
        engine.resolve_peers_by_name();
        if let Ok(net) = &engine.net {
            net.set_conn_hook(engine.connection_hook());
        }
        let e2 = engine.clone();
        tokio::task::spawn_blocking(move || e2.reconcile())
            .await
            .map_err(|e| EngineError::internal("reconcile", e))??;
        for b in engine.backends.all() {
            b.ready();
        }
        if engine.cfg.monitoring.loops {
            engine.pump_blocked();
        }
        engine.start_webhooks();
        engine.start_monitor();
        // Retention and approval expiry, now and then every minute.
        let weak = Arc::downgrade(&engine);
        tokio::spawn(async move {
            loop {
                let Some(e) = weak.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = e.expire_approvals();
                    e.apply_retention()
                })
                .await;
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            }
        });
        Ok(engine)
    }

    fn open_blocking(
        cfg: EngineConfig,
        make: impl FnOnce(&EngineConfig) -> Result<backends::Backends>,
    ) -> Result<Arc<Engine>> {
        ensure_dir(&cfg.state_dir, 0o700)?;
        ensure_dir(&cfg.runtime_dir, 0o711)?;
        ensure_dir(&cfg.sandboxes_runtime_dir(), 0o711)?;
        let store = Store::open(&cfg.db_path())?;
        // Host uid ranges are claimed host-wide, so daemons of other state dirs never share them.
        let registry = devbox_store::UidRegistry::new(cfg.uid_registry.clone(), &cfg.state_dir)?;
        for warning in store.use_uid_registry(registry)? {
            tracing::warn!("{warning}");
        }
        let pool = Pool::open(&cfg.pool, &cfg.pool_mountpoint)?;
        let images = ImageStore::new(pool.clone());
        images.ensure_host()?;
        let backends = make(&cfg)?;
        let net = network::open_networks(&cfg, backends.default().kind() == "native");
        if let Err(why) = &net {
            tracing::warn!("sandboxes cannot have networks: {why}");
        }
        let measurer = measure::Measurer::start(cfg.db_path());
        let cfg_hooks = cfg.monitoring.webhooks.clone();
        Ok(Arc::new(Engine {
            cfg,
            store,
            pool,
            images,
            backends,
            locks: locks::LockTable::default(),
            measurer,
            policies: checks::PolicyCache::default(),
            approval_events: tokio::sync::watch::channel(0).0,
            bookkeeping: exec::Bookkeeping::default(),
            net,
            blocked_budgets: Default::default(),
            monitor: stats::Monitor::default(),
            metrics: metrics::Metrics::default(),
            supervisors: supervise::Supervisors::default(),
            events: events::EventBus::default(),
            alerts: alerts::Alerts::default(),
            webhooks: webhooks::Webhooks::new(&cfg_hooks),
        }))
    }

    /// The configuration in use.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Size and use of the storage pool.
    pub fn pool_info(&self) -> PoolInfo {
        self.pool.info()
    }

    /// Cgroup mode of the host ("v1", "v2" or "hybrid").
    pub fn cgroup_mode(&self) -> &'static str {
        self.backends.default().cgroup_mode()
    }

    /// Stops what the backends keep ready (warm launchers) at daemon shutdown, and waits
    /// for networks being removed.
    pub fn shutdown(&self) {
        for b in self.backends.all() {
            b.shutdown();
        }
        // Networks of one-shot runs still being removed (tens of ms each) are finished,
        // not left for the next daemon's reconcile.
        if let Ok(n) = &self.net
            && !n.wait_all_removed(std::time::Duration::from_secs(10))
        {
            tracing::warn!("networks still being removed at shutdown: the next start removes them");
        }
    }

    /// A sandbox's backend, and the sandbox as it sees it.
    fn backend_of(
        &self,
        rec: &devbox_store::SandboxRecord,
    ) -> Result<(&Arc<dyn devbox_backend::Backend>, devbox_backend::Instance)> {
        Ok((self.backends.of(rec)?, backends::instance(rec)))
    }

    fn sandbox_volume(&self, id: &str) -> PathBuf {
        self.pool.sandboxes_dir().join(id)
    }

    /// Runs `f` on the blocking pool later (after `after` ended, if given), off the caller's
    /// path; the audit log's and exec logs' readers wait for it (see
    /// [`exec::Bookkeeping`]).
    fn later(
        self: &Arc<Self>,
        after: Option<tokio::task::JoinHandle<()>>,
        f: impl FnOnce(Arc<Engine>) -> Result<()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let token = self.bookkeeping.begin(self);
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(h) = after {
                let _ = h.await;
            }
            if let Err(e) = me.blocking(f).await {
                tracing::warn!("recording an exec: {e}");
            }
            drop(token);
        })
    }

    /// Runs blocking engine work off the async threads.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(Arc<Engine>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(me))
            .await
            .map_err(|e| EngineError::internal("engine task", e))?
    }
}

/// Logs (at debug level) how long the steps of an operation take.
pub(crate) struct Phases {
    op: &'static str,
    start: std::time::Instant,
    last: std::cell::Cell<std::time::Instant>,
}

impl Phases {
    pub(crate) fn start(op: &'static str) -> Self {
        let now = std::time::Instant::now();
        Self {
            op,
            start: now,
            last: std::cell::Cell::new(now),
        }
    }

    pub(crate) fn mark(&self, step: &'static str) {
        let now = std::time::Instant::now();
        tracing::debug!(
            op = self.op,
            step,
            step_us = now.duration_since(self.last.get()).as_micros() as u64,
            total_us = now.duration_since(self.start).as_micros() as u64,
            "phase"
        );
        self.last.set(now);
    }
}
