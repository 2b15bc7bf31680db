//! `sandboxd`: the dev-box daemon. Owns all state and serves the API on a root-only Unix
//! socket; the `sandbox` CLI starts it on demand. Sandboxes keep running when it stops.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use devbox_engine::{Engine, EngineConfig, MonitoringConfig, WebhookConfig};

/// The daemon's allocator: command checks (the shell parser allocates heavily) run about a
/// quarter faster with mimalloc than with glibc's malloc. (Not in the `sandbox` CLI: there,
/// its start-up costs ~1.8 ms of every command; `sandbox daemon` runs this binary.)
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The dev-box daemon.
#[derive(Debug, Parser)]
#[command(name = "sandboxd", version)]
struct Args {
    /// Persistent state: database, storage pool, logs.
    #[arg(
        long,
        env = "DEVBOX_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/dev-box"
    )]
    state_dir: PathBuf,
    /// Runtime state: socket, mount points.
    #[arg(
        long,
        env = "DEVBOX_RUNTIME_DIR",
        value_name = "DIR",
        default_value = "/run/dev-box"
    )]
    runtime_dir: PathBuf,
    /// The API socket (default: RUNTIME_DIR/api.sock).
    #[arg(long, env = "DEVBOX_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Size of a new loop-file storage pool (default: a fifth of the free disk, 4-100 GiB).
    #[arg(long, value_name = "SIZE", env = "DEVBOX_POOL_SIZE")]
    pool_size: Option<String>,
    /// Let members of this group use the socket without root, within --group-scopes.
    #[arg(long, value_name = "GROUP", env = "DEVBOX_GROUP")]
    group: Option<String>,
    /// What members of --group may do: read, exec, approve, admin (comma-separated).
    #[arg(
        long,
        value_name = "SCOPES",
        env = "DEVBOX_GROUP_SCOPES",
        default_value = "read,exec"
    )]
    group_scopes: String,
    /// Configuration file (YAML or JSON): webhooks and global alert rules (see README).
    #[arg(long, env = "DEVBOX_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Post every event to this http:// or https:// URL (repeatable; with
    /// --webhook-secret-file).
    #[arg(long, value_name = "URL")]
    webhook: Vec<String>,
    /// The file holding the key that signs --webhook posts (HMAC-SHA256).
    #[arg(long, env = "DEVBOX_WEBHOOK_SECRET_FILE", value_name = "FILE")]
    webhook_secret_file: Option<PathBuf>,
    /// Also serve the API on TCP at this address (e.g. 127.0.0.1:7878; port 0 picks one,
    /// written to RUNTIME_DIR/api.addr). Callers need a token (`sandbox token create`).
    /// Without --tls-cert, only a loopback address is accepted.
    #[arg(long, env = "DEVBOX_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// TLS certificate chain (PEM) for --listen.
    #[arg(
        long,
        env = "DEVBOX_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --listen.
    #[arg(
        long,
        env = "DEVBOX_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Requests a second a token may make on average (bursts up to twice that), unless
    /// the token has its own rate [default: 100].
    #[arg(long, value_name = "N")]
    token_rate: Option<f64>,
    /// Execs a token may run at once, unless the token has its own cap [default: 32].
    #[arg(long, value_name = "N")]
    token_max_execs: Option<u32>,
}

/// The configuration file's `api` section; flags override it.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ApiSection {
    listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    token_rate: Option<f64>,
    token_max_execs: Option<u32>,
}

/// Where and how the API listens on TCP.
struct Listener {
    addr: std::net::SocketAddr,
    tls: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// The TCP listener and token limits, from the configuration file's `api` section and the
/// flags (which win); checked before anything is made.
fn remote_config(
    cli: &Args,
    api: &serde_json::Value,
) -> anyhow::Result<(Option<Listener>, devbox_api::RemoteLimits)> {
    let file: ApiSection = if api.is_null() {
        ApiSection::default()
    } else {
        serde_json::from_value(api.clone()).map_err(|e| anyhow::anyhow!("--config: api: {e}"))?
    };
    let mut limits = devbox_api::RemoteLimits::default();
    if let Some(r) = cli.token_rate.or(file.token_rate) {
        if !(r.is_finite() && r > 0.0 && r <= 100_000.0) {
            bail!("--token-rate: give a rate above 0 and at most 100000 requests a second");
        }
        limits.rate_per_second = r;
    }
    if let Some(m) = cli.token_max_execs.or(file.token_max_execs) {
        if !(1..=100_000).contains(&m) {
            bail!("--token-max-execs: give 1 to 100000");
        }
        limits.max_execs = m;
    }
    let Some(listen) = cli.listen.clone().or(file.listen) else {
        if cli.tls_cert.is_some() {
            bail!("--tls-cert and --tls-key need --listen ADDR");
        }
        return Ok((None, limits));
    };
    let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
        anyhow::anyhow!("--listen {listen:?}: give an address and port, e.g. 127.0.0.1:7878")
    })?;
    let (cert, key) = match (&cli.tls_cert, &cli.tls_key) {
        (Some(c), Some(k)) => (Some(c.clone()), Some(k.clone())),
        _ => (file.tls_cert, file.tls_key),
    };
    let tls = match (cert, key) {
        (Some(c), Some(k)) => Some(devbox_api::tls_config(&c, &k).map_err(anyhow::Error::msg)?),
        (None, None) => None,
        _ => bail!("--config: api: tlsCert and tlsKey go together"),
    };
    if tls.is_none() && !addr.ip().is_loopback() {
        bail!(
            "--listen {addr}: not a loopback address, and tokens must not cross a network in clear text: give --tls-cert and --tls-key"
        );
    }
    Ok((Some(Listener { addr, tls }), limits))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandboxd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM. Sandboxes keep running after it exits.
fn run(cli: &Args) -> anyhow::Result<()> {
    let pool_size = cli.pool_size.as_deref();
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "the dev-box daemon needs root (it makes namespaces, cgroups and mounts): run it with sudo"
        );
    }
    // Checked before anything is made.
    let mut access = devbox_api::Access::default();
    if let Some(g) = cli.group.as_deref().filter(|g| !g.is_empty()) {
        let scopes = devbox_api::Scope::parse_list(&cli.group_scopes)
            .map_err(|e| anyhow::anyhow!("--group-scopes: {e}"))?;
        access.group = Some(
            devbox_api::GroupAccess::new(g, scopes).map_err(|e| anyhow::anyhow!("--group: {e}"))?,
        );
    }
    let monitoring = monitoring_config(cli)?;
    let (listener, limits) = remote_config(cli, &monitoring.api)?;
    access.remote = limits;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVBOX_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let pool_size = pool_size
        .map(devbox_spec::quantity::parse_bytes)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&cli.state_dir)
        .with_context(|| format!("creating {}", cli.state_dir.display()))?;
    mark_self(&cli.state_dir)?;
    let _lock = lock_state_dir(&cli.state_dir)?;
    // Sandboxes' init processes are orphaned by their launcher; as a subreaper the daemon
    // collects them when they end.
    nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    let mut cfg = EngineConfig::new(cli.state_dir.clone(), cli.runtime_dir.clone(), pool_size);
    cfg.monitoring = monitoring;
    if let Ok(parent) = std::env::var("DEVBOX_CGROUP_PARENT") {
        cfg.cgroup_parent = parent;
    }
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| cli.runtime_dir.join("api.sock"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let engine = Engine::open(cfg).await?;
        tracing::info!(socket = %socket.display(), pool = ?engine.pool_info().path, cgroups = engine.cgroup_mode(), webhooks = engine.webhooks().len(), "dev-box daemon ready");
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            tracing::info!("shutting down (sandboxes keep running)");
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let shutdown = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        let tcp = match listener {
            Some(l) => {
                let tls = l.tls.is_some();
                let bound = devbox_api::bind_tcp(l.addr, l.tls)
                    .await
                    .with_context(|| format!("--listen {}", l.addr))?;
                let addr = devbox_api::remote::local_addr(&bound)?;
                tracing::info!(%addr, tls, "API listening on TCP");
                std::fs::write(cli.runtime_dir.join("api.addr"), addr.to_string())
                    .context("writing RUNTIME_DIR/api.addr")?;
                let (engine, access) = (engine.clone(), access.clone());
                let mut stop = stop_rx.clone();
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                Some(tokio::spawn(devbox_api::serve_tcp(engine, bound, access, stopped)))
            }
            None => None,
        };
        let served = devbox_api::serve_unix(engine.clone(), &socket, access, shutdown).await;
        if let Some(t) = tcp {
            match t.await {
                Ok(Err(e)) => tracing::error!("serving the API on TCP: {e}"),
                Err(e) => tracing::error!("the TCP listener: {e}"),
                Ok(Ok(())) => {}
            }
        }
        let e2 = engine.clone();
        let _ = tokio::task::spawn_blocking(move || e2.shutdown()).await;
        served.context("serving the API")?;
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(cli.runtime_dir.join("api.addr"));
        Ok::<_, anyhow::Error>(())
    })?;
    // Exit at once: blocking tasks still in flight must not hold the process.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Webhooks and alert rules: the configuration file's, then the `--webhook` flags'.
fn monitoring_config(cli: &Args) -> anyhow::Result<MonitoringConfig> {
    let mut cfg = match &cli.config {
        Some(path) => MonitoringConfig::from_file(path).map_err(anyhow::Error::msg)?,
        None => MonitoringConfig::default(),
    };
    if !cli.webhook.is_empty() {
        let Some(secret) = &cli.webhook_secret_file else {
            bail!("--webhook needs --webhook-secret-file FILE: the key that signs what is posted");
        };
        for url in &cli.webhook {
            cfg.webhooks
                .push(WebhookConfig::new(url, secret).map_err(anyhow::Error::msg)?);
        }
    }
    Ok(cfg)
}

/// Makes sure this process carries its own daemon mark in its environment, which every
/// process it starts inherits, so that the next daemon of this state directory can find (and
/// kill) what this one left running if it dies. The environment of a running process cannot
/// be changed safely once threads may exist, so the daemon executes itself again with the
/// mark set (same pid, same arguments); the second run finds its mark and goes on.
fn mark_self(state_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let mark = std::env::var(devbox_engine::DAEMON_MARK_ENV).unwrap_or_default();
    if devbox_engine::is_own_mark(&mark) {
        return Ok(());
    }
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "sandboxd".into());
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .env(
            devbox_engine::DAEMON_MARK_ENV,
            devbox_engine::daemon_mark(state_dir),
        )
        .exec();
    Err(anyhow::Error::new(err).context("executing the daemon again with its mark"))
}

/// Takes an exclusive lock on the state directory, held while the returned guard lives.
fn lock_state_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::Write;
    let path = dir.join("daemon.lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(locked) => {
            locked.set_len(0)?;
            (&*locked).write_all(std::process::id().to_string().as_bytes())?;
            Ok(locked)
        }
        Err(_) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "another dev-box daemon (pid {}) already uses {}",
                pid.trim(),
                dir.display()
            )
        }
    }
}
