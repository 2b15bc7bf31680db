//! `sandbox daemon`, and starting it on demand.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use devbox_engine::{Engine, EngineConfig};

use crate::cli::Cli;

/// Runs the daemon until SIGINT or SIGTERM. Sandboxes keep running after it exits.
pub fn run(cli: &Cli, pool_size: Option<&str>) -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "the dev-box daemon needs root (it makes namespaces, cgroups and mounts): run it with sudo"
        );
    }
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
    let _lock = lock_state_dir(&cli.state_dir)?;
    // Sandboxes' init processes are orphaned by their launcher; as a subreaper the daemon
    // collects them when they end.
    nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    let mut cfg = EngineConfig::new(cli.state_dir.clone(), cli.runtime_dir.clone(), pool_size);
    if let Ok(parent) = std::env::var("DEVBOX_CGROUP_PARENT") {
        cfg.cgroup_parent = parent;
    }
    let socket = cli.socket_path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let engine = Engine::open(cfg).await?;
        tracing::info!(socket = %socket.display(), pool = ?engine.pool_info().path, cgroups = engine.cgroup_mode(), "dev-box daemon ready");
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            tracing::info!("shutting down (sandboxes keep running)");
        };
        devbox_api::serve_unix(engine, &socket, shutdown).await.context("serving the API")?;
        let _ = std::fs::remove_file(&socket);
        Ok::<_, anyhow::Error>(())
    })?;
    // Exit at once: blocking tasks still in flight must not hold the process.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
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

/// Starts a daemon in the background with this CLI's settings and waits for its socket.
pub fn spawn_and_wait(cli: &Cli) -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("dev-box needs root: run `sudo sandbox ...`");
    }
    std::fs::create_dir_all(&cli.state_dir)
        .with_context(|| format!("creating {}", cli.state_dir.display()))?;
    let log_path = cli.state_dir.join("daemon.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let exe = std::env::current_exe().context("finding the sandbox binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--state-dir")
        .arg(&cli.state_dir)
        .arg("--runtime-dir")
        .arg(&cli.runtime_dir)
        .arg("--socket")
        .arg(cli.socket_path())
        .arg("daemon")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .process_group(0);
    let mut child = cmd.spawn().context("starting the daemon")?;
    let socket = cli.socket_path();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            // Leave the daemon running on its own; it is reaped by init when it exits.
            std::mem::forget(child);
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the dev-box daemon exited ({status}); its log {} ends with:\n{}",
                log_path.display(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!(
        "the dev-box daemon did not open {} within 30 s; see {}",
        socket.display(),
        log_path.display()
    )
}
