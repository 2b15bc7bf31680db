//! Where the engine keeps things, and its defaults.

use std::path::PathBuf;
use std::time::Duration;

use devbox_storage::PoolSource;

/// Engine settings. Every path is a parameter so tests run side by side on private roots.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Persistent state: the database, the pool's loop file, exec logs.
    pub state_dir: PathBuf,
    /// Runtime state: per-sandbox mount points and agent sockets.
    pub runtime_dir: PathBuf,
    /// The storage pool.
    pub pool: PoolSource,
    /// Where a loop-file pool is mounted.
    pub pool_mountpoint: PathBuf,
    /// Name of the cgroup under which sandboxes' cgroups are made.
    pub cgroup_parent: String,
    /// The `sandbox-init` binary.
    pub init_binary: PathBuf,
    /// The host-wide registry of uid blocks (`$DEVBOX_UID_REGISTRY`, else under /var/lib/dev-box).
    pub uid_registry: PathBuf,
    /// Grace period of a stop before SIGKILL.
    pub stop_grace: Duration,
    /// Launchers kept ready in their cgroups (`$DEVBOX_WARM_LAUNCHERS`, default 2; 0: none).
    pub warm_launchers: usize,
    /// How long an approval waits before it expires (`$DEVBOX_APPROVAL_TIMEOUT`, seconds; default 600).
    pub approval_timeout: Duration,
    /// Days audit records and exec logs are kept (`$DEVBOX_RETENTION_DAYS`, default 30; 0: forever).
    pub retention_days: Option<u32>,
    /// Sandbox networks (`crate::network::default_config`; none: loopback-only sandboxes).
    pub network: Option<devbox_net::NetConfig>,
}

impl EngineConfig {
    /// Settings under one state directory and one runtime directory, with a loop-file pool
    /// of `pool_size` bytes (or the pool named by `$DEVBOX_POOL`: a btrfs directory, or
    /// `dir:PATH` for the copy driver).
    pub fn new(state_dir: PathBuf, runtime_dir: PathBuf, pool_size: Option<u64>) -> Self {
        let pool_mountpoint = state_dir.join("pool");
        let network = crate::network::default_config(&state_dir);
        let pool = match std::env::var("DEVBOX_POOL").ok().filter(|s| !s.is_empty()) {
            Some(p) if p.starts_with("dir:") => PoolSource::Directory(PathBuf::from(&p[4..])),
            Some(p) => PoolSource::Btrfs(PathBuf::from(p)),
            None => PoolSource::LoopFile {
                image: state_dir.join("pool.img"),
                size: pool_size.unwrap_or_else(|| {
                    devbox_storage::default_loop_size(state_dir.parent().unwrap_or(&state_dir))
                }),
            },
        };
        Self {
            network,
            state_dir,
            runtime_dir,
            pool,
            pool_mountpoint,
            cgroup_parent: "dev-box".into(),
            init_binary: crate::backends::default_init_binary(),
            uid_registry: devbox_store::UidRegistry::default_path(),
            stop_grace: Duration::from_secs(10),
            approval_timeout: Duration::from_secs(
                std::env::var("DEVBOX_APPROVAL_TIMEOUT")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(600),
            ),
            retention_days: match std::env::var("DEVBOX_RETENTION_DAYS")
                .ok()
                .and_then(|v| v.parse::<u32>().ok())
            {
                Some(0) => None,
                Some(d) => Some(d),
                None => Some(30),
            },
            warm_launchers: std::env::var("DEVBOX_WARM_LAUNCHERS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2),
        }
    }

    /// The database file.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("state.db")
    }

    /// Per-sandbox runtime directories.
    pub fn sandboxes_runtime_dir(&self) -> PathBuf {
        self.runtime_dir.join("sandboxes")
    }
}
