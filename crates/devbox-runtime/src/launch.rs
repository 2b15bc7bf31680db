//! The daemon's side of starting a sandbox: run `sandbox-init launch` and read its outcome.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout};
use std::process::{Command, Stdio};

use crate::config::LaunchConfig;
use crate::container::restore::RestoreConfig;
use crate::container::{LaunchOutcome, LauncherInput, LauncherReport};

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

    fn spawn(&self) -> Result<Running, LaunchError> {
        let spawn_err = |source| LaunchError::Spawn {
            path: self.binary.clone(),
            source,
        };
        let mut child = Command::new(&self.binary)
            .arg("launch")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if crate::trace::enabled() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .map_err(spawn_err)?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(BufReader::new);
        match (stdin, stdout) {
            (Some(stdin), Some(stdout)) => Ok(Running {
                child,
                stdin,
                stdout,
            }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(LaunchError::NoOutcome("sandbox-init has no stdio".into()))
            }
        }
    }

    /// Starts a sandbox; returns the host pid of its init process once it serves requests.
    pub fn launch(&self, cfg: &LaunchConfig) -> Result<i32, LaunchError> {
        self.spawn()?.launch(cfg)
    }

    /// Starts a sandbox from a checkpoint of its processes; returns the restored init's host pid.
    pub fn restore(&self, rc: &RestoreConfig) -> Result<i32, LaunchError> {
        let mut running = self.spawn()?;
        running.send(&LauncherInput::Restore(Box::new(rc.clone())))?;
        match running.report() {
            Ok(LauncherReport::Outcome(o)) => running.finish(o),
            Ok(LauncherReport::Armed) => Err(LaunchError::NoOutcome("unexpected report".into())),
            Err(e) => {
                let _ = running.child.kill();
                let _ = running.child.wait();
                Err(e)
            }
        }
    }

    /// Starts a launcher that joins `cgroups` and waits: the slow part of a start, done ahead.
    pub fn arm(&self, cgroups: &[PathBuf]) -> Result<ArmedLauncher, LaunchError> {
        let mut running = self.spawn()?;
        running.send(&LauncherInput::Prepare {
            cgroups: cgroups.to_vec(),
        })?;
        match running.report()? {
            LauncherReport::Armed => Ok(ArmedLauncher {
                running: Some(running),
            }),
            LauncherReport::Outcome(o) => Err(running.finish(o).err().unwrap_or(
                LaunchError::NoOutcome("armed launcher started nothing".into()),
            )),
        }
    }
}

/// A `sandbox-init launch` process in flight.
struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Running {
    fn send(&mut self, input: &LauncherInput) -> Result<(), LaunchError> {
        let mut line =
            serde_json::to_vec(input).map_err(|e| LaunchError::NoOutcome(e.to_string()))?;
        line.push(b'\n');
        self.stdin
            .write_all(&line)
            .and_then(|_| self.stdin.flush())
            .map_err(|e| LaunchError::NoOutcome(format!("sandbox-init: {e}")))
    }

    fn report(&mut self) -> Result<LauncherReport, LaunchError> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| LaunchError::NoOutcome(e.to_string()))?;
        serde_json::from_str(line.trim()).map_err(|_| {
            let status = self.child.try_wait().ok().flatten();
            LaunchError::NoOutcome(format!("{status:?}; output {line:?}"))
        })
    }

    fn finish(mut self, outcome: LaunchOutcome) -> Result<i32, LaunchError> {
        let _ = self.child.wait();
        match outcome {
            LaunchOutcome::Started { pid } => Ok(pid),
            LaunchOutcome::Failed { stage, message } => Err(LaunchError::Failed { stage, message }),
        }
    }

    fn launch(mut self, cfg: &LaunchConfig) -> Result<i32, LaunchError> {
        self.send(&LauncherInput::Launch(Box::new(cfg.clone())))?;
        match self.report() {
            Ok(LauncherReport::Outcome(o)) => self.finish(o),
            Ok(LauncherReport::Armed) => Err(LaunchError::NoOutcome("unexpected report".into())),
            Err(e) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(e)
            }
        }
    }
}

/// A launcher already in its cgroups, waiting for a sandbox to start (see [`Launcher::arm`]).
pub struct ArmedLauncher {
    running: Option<Running>,
}

impl std::fmt::Debug for ArmedLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArmedLauncher")
            .field("pid", &self.pid())
            .finish()
    }
}

impl ArmedLauncher {
    /// Its host pid.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.child.id())
    }

    /// Starts the sandbox (`cfg.cgroups` is not joined again).
    pub fn launch(mut self, cfg: &LaunchConfig) -> Result<i32, LaunchError> {
        match self.running.take() {
            Some(r) => r.launch(cfg),
            None => Err(LaunchError::NoOutcome("launcher already used".into())),
        }
    }
}

impl Drop for ArmedLauncher {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.take() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}
