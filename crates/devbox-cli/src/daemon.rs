//! Starting the daemon (`sandboxd`) on demand.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cli::Cli;

/// The daemon binary: `$DEVBOX_DAEMON`, or `sandboxd` next to this executable, or on PATH.
pub fn daemon_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("DEVBOX_DAEMON") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("sandboxd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("sandboxd"))
}

/// The daemon's command line for this CLI's settings.
pub fn daemon_command(cli: &Cli, pool_size: Option<&str>) -> Command {
    let mut cmd = Command::new(daemon_binary());
    cmd.arg("--state-dir")
        .arg(&cli.state_dir)
        .arg("--runtime-dir")
        .arg(&cli.runtime_dir)
        .arg("--socket")
        .arg(cli.socket_path());
    if let Some(size) = pool_size {
        cmd.arg("--pool-size").arg(size);
    }
    cmd
}

/// `sandbox daemon`: becomes the daemon.
pub fn exec_daemon(cli: &Cli, pool_size: Option<&str>) -> anyhow::Error {
    let mut cmd = daemon_command(cli, pool_size);
    let err = cmd.exec();
    anyhow::Error::new(err).context(format!("running {}", daemon_binary().display()))
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
    let mut cmd = daemon_command(cli, None);
    cmd.stdin(Stdio::null())
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
