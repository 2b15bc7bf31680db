//! The daemon's side of starting a sandbox: run `sandbox-init launch` and read its outcome.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::LaunchConfig;
use crate::container::LaunchOutcome;

/// Errors of [`Launcher::launch`].
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// `sandbox-init` could not be found or run.
    #[error("cannot run {path}: {source} (set DEVBOX_INIT to the sandbox-init binary)")]
    Spawn {
        /// The binary tried.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A step of the launch failed; nothing runs.
    #[error("starting the sandbox failed at {stage}: {message}")]
    Failed {
        /// The step.
        stage: String,
        /// The cause.
        message: String,
    },
    /// `sandbox-init` ended without a readable outcome.
    #[error("sandbox-init ended without reporting an outcome: {0}")]
    NoOutcome(String),
}

/// Runs `sandbox-init`.
#[derive(Debug, Clone)]
pub struct Launcher {
    binary: PathBuf,
}

impl Launcher {
    /// A launcher that runs the given `sandbox-init` binary.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
        }
    }

    /// Finds `sandbox-init`: `$DEVBOX_INIT`, then next to the running executable, then on PATH.
    pub fn locate() -> Self {
        if let Some(p) = std::env::var_os("DEVBOX_INIT") {
            return Self::new(PathBuf::from(p));
        }
        if let Ok(exe) = std::env::current_exe()
            && let Some(dir) = exe.parent()
        {
            for cand in [dir.join("sandbox-init"), dir.join("../sandbox-init")] {
                if cand.is_file() {
                    return Self::new(cand);
                }
            }
        }
        Self::new("sandbox-init")
    }

    /// The binary this launcher runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Starts a sandbox; returns the host pid of its init process once it serves requests.
    pub fn launch(&self, cfg: &LaunchConfig) -> Result<i32, LaunchError> {
        let spawn_err = |source| LaunchError::Spawn {
            path: self.binary.clone(),
            source,
        };
        let mut child = Command::new(&self.binary)
            .arg("launch")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(spawn_err)?;
        let config = serde_json::to_vec(cfg).map_err(|e| LaunchError::NoOutcome(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&config).map_err(spawn_err)?;
        }
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out)
                .read_line(&mut line)
                .map_err(spawn_err)?;
        }
        let status = child.wait().map_err(spawn_err)?;
        match serde_json::from_str::<LaunchOutcome>(line.trim()) {
            Ok(LaunchOutcome::Started { pid }) => Ok(pid),
            Ok(LaunchOutcome::Failed { stage, message }) => {
                Err(LaunchError::Failed { stage, message })
            }
            Err(_) => Err(LaunchError::NoOutcome(format!("{status}; output {line:?}"))),
        }
    }
}
