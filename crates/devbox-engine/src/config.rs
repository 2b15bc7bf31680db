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
    /// Webhooks, global alert rules and the monitoring loops.
    pub monitoring: MonitoringConfig,
}

/// Webhooks, global alert rules and the monitoring loops: the daemon's configuration file
/// (`sandboxd --config FILE`, see [`MonitoringConfig::from_file`]) and its flags.
#[derive(Debug, Clone)]
pub struct MonitoringConfig {
    /// Where events are posted.
    pub webhooks: Vec<WebhookConfig>,
    /// Alert rules of every sandbox (a sandbox's `spec.alerts` replaces those it gives).
    pub alerts: devbox_spec::alerts::AlertsSpec,
    /// How often the monitor samples running sandboxes for limit events and alerts
    /// (`$DEVBOX_MONITOR_INTERVAL`, default 5s).
    pub interval: Duration,
    /// The periodic loops (the monitor, the blocked-connection poll) run; off
    /// (`$DEVBOX_MONITORING=off`) only to measure what they cost.
    pub loops: bool,
    /// The configuration file's `api` section as given (null if none): the daemon reads
    /// its listeners, TLS files and token limits from it.
    pub api: serde_json::Value,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        Self {
            webhooks: Vec::new(),
            alerts: Default::default(),
            interval: std::env::var("DEVBOX_MONITOR_INTERVAL")
                .ok()
                .and_then(|v| devbox_spec::quantity::parse_duration_ms(&v).ok())
                .filter(|ms| *ms >= 100)
                .map_or(Duration::from_secs(5), Duration::from_millis),
            loops: std::env::var("DEVBOX_MONITORING").ok().as_deref() != Some("off"),
            api: serde_json::Value::Null,
        }
    }
}

/// One webhook.
#[derive(Clone)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL.
    pub url: String,
    /// The HMAC-SHA256 key of the signature header (never logged).
    pub secret: Vec<u8>,
    /// Only events of these kinds (empty: all).
    pub kinds: Vec<String>,
    /// Only events of these sandboxes (empty: all).
    pub sandboxes: Vec<String>,
    /// How long one attempt may take.
    pub timeout: Duration,
    /// Attempts after the first failed one.
    pub retries: u32,
    /// Events waiting at most; beyond, the oldest is dropped.
    pub queue: usize,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &crate::webhooks::shown_url(&self.url))
            .field("kinds", &self.kinds)
            .field("sandboxes", &self.sandboxes)
            .finish_non_exhaustive()
    }
}

/// Default of a webhook's attempt timeout.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of a webhook's retries.
pub const WEBHOOK_RETRIES: u32 = 5;
/// Default of a webhook's queue.
pub const WEBHOOK_QUEUE: usize = 1000;

/// The configuration file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    webhooks: Vec<WebhookEntry>,
    #[serde(default)]
    alerts: devbox_spec::alerts::AlertsSpec,
    /// The API's section (listeners, TLS, token limits): the daemon's to read.
    #[serde(default)]
    api: serde_json::Value,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WebhookEntry {
    url: String,
    secret_file: std::path::PathBuf,
    #[serde(default)]
    kinds: Vec<String>,
    #[serde(default)]
    sandboxes: Vec<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retries: Option<u32>,
    #[serde(default)]
    queue: Option<usize>,
}

impl WebhookConfig {
    /// A webhook to `url` signed with the key in `secret_file`, with the default settings.
    /// The URL must be http or https; the file must hold a key (surrounding whitespace is
    /// not part of it).
    pub fn new(url: &str, secret_file: &std::path::Path) -> Result<Self, String> {
        crate::webhooks::Target::parse(url)?;
        let text = std::fs::read(secret_file).map_err(|e| {
            format!(
                "webhook {}: reading its secret file {}: {e}",
                crate::webhooks::shown_url(url),
                secret_file.display()
            )
        })?;
        let secret = text.trim_ascii().to_vec();
        if secret.is_empty() {
            return Err(format!(
                "webhook {}: the secret file {} is empty: put a key in it",
                crate::webhooks::shown_url(url),
                secret_file.display()
            ));
        }
        Ok(Self {
            url: url.to_string(),
            secret,
            kinds: Vec::new(),
            sandboxes: Vec::new(),
            timeout: WEBHOOK_TIMEOUT,
            retries: WEBHOOK_RETRIES,
            queue: WEBHOOK_QUEUE,
        })
    }
}

impl MonitoringConfig {
    /// Reads the daemon's configuration file (YAML or JSON):
    ///
    /// ```yaml
    /// webhooks:
    ///   - url: https://hooks.example/dev-box
    ///     secretFile: /etc/dev-box/hook.key
    ///     kinds: [alert, limit]      # optional
    ///     sandboxes: [web]           # optional
    ///     timeout: 10s               # optional, per attempt
    ///     retries: 5                 # optional
    ///     queue: 1000                # optional
    /// alerts:
    ///   memory: 90%
    ///   deniedCommands: {count: 5, within: 10m}
    /// api:                           # read by sandboxd (see its --listen)
    ///   listen: 127.0.0.1:7878
    /// ```
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the configuration {}: {e}", path.display()))?;
        let value: serde_json::Value = serde_saphyr::from_str(&text)
            .map_err(|e| format!("{}: not valid YAML or JSON: {e}", path.display()))?;
        let file: ConfigFile = if value.is_null() {
            ConfigFile::default()
        } else {
            serde_json::from_value(value).map_err(|e| format!("{}: {e}", path.display()))?
        };
        file.alerts
            .resolve("alerts")
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut cfg = MonitoringConfig {
            alerts: file.alerts,
            api: file.api,
            ..Default::default()
        };
        for (i, w) in file.webhooks.into_iter().enumerate() {
            let mut hook = WebhookConfig::new(&w.url, &w.secret_file)
                .map_err(|e| format!("{}: webhooks[{i}]: {e}", path.display()))?;
            hook.kinds = w
                .kinds
                .iter()
                .map(|k| k.trim().to_ascii_lowercase())
                .collect();
            hook.sandboxes = w.sandboxes;
            if let Some(t) = &w.timeout {
                let ms = devbox_spec::quantity::parse_duration_ms(t)
                    .map_err(|e| format!("{}: webhooks[{i}].timeout: {e}", path.display()))?;
                if !(100..=300_000).contains(&ms) {
                    return Err(format!(
                        "{}: webhooks[{i}].timeout: give 100ms to 5m",
                        path.display()
                    ));
                }
                hook.timeout = Duration::from_millis(ms);
            }
            if let Some(r) = w.retries {
                if r > 20 {
                    return Err(format!(
                        "{}: webhooks[{i}].retries: give 0 to 20",
                        path.display()
                    ));
                }
                hook.retries = r;
            }
            if let Some(q) = w.queue {
                if !(1..=100_000).contains(&q) {
                    return Err(format!(
                        "{}: webhooks[{i}].queue: give 1 to 100000",
                        path.display()
                    ));
                }
                hook.queue = q;
            }
            cfg.webhooks.push(hook);
        }
        Ok(cfg)
    }
}

impl EngineConfig {
    /// Settings under one state directory and one runtime directory, with a loop-file pool
    /// of `pool_size` bytes (or the pool named by `$DEVBOX_POOL`: a btrfs directory, or
    /// `dir:PATH` for the copy driver).
    pub fn new(state_dir: PathBuf, runtime_dir: PathBuf, pool_size: Option<u64>) -> Self {
        let pool_mountpoint = state_dir.join("pool");
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
            monitoring: MonitoringConfig::default(),
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
