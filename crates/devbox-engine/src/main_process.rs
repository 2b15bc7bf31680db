//! A sandbox's main process (`spec.command`): started each time the sandbox starts, restarts
//! or is rolled back to files only (a rollback to a snapshot with processes brings back the
//! one that ran). It is checked like an exec but must be allowed outright (no approval can
//! wait at start-up), audited as `sandbox.main`, and writes to `logs/<sandbox>/main.log`. It
//! is not tied to any client: like a process an exec left in the background, it runs until
//! it ends or the sandbox stops.

use std::collections::BTreeMap;
use std::time::Duration;

use devbox_backend::{ExecSpec, Io};
use devbox_safety::Verdict;
use devbox_spec::SandboxManifest;
use devbox_store::SandboxRecord;

use crate::{Caller, Engine, EngineError, Result};

/// The main process's argv and its text as checked and audited, if the spec has one.
fn main_command(manifest: &SandboxManifest) -> Option<(Vec<String>, String)> {
    match manifest.spec.command.as_slice() {
        [] => None,
        [text] => Some((
            vec!["/bin/sh".into(), "-c".into(), text.clone()],
            text.clone(),
        )),
        argv => Some((argv.to_vec(), crate::checks::shell_join(argv))),
    }
}

impl Engine {
    /// Where a sandbox's main process writes its output (appended across starts).
    pub(crate) fn main_log_path(&self, sandbox: &str) -> std::path::PathBuf {
        self.cfg
            .state_dir
            .join("logs")
            .join(sandbox)
            .join("main.log")
    }

    /// Refuses a main command that the checks would not allow outright.
    pub(crate) fn check_main(
        &self,
        caller: &Caller,
        rec: &SandboxRecord,
        manifest: &SandboxManifest,
    ) -> Result<()> {
        let Some((_, text)) = main_command(manifest) else {
            return Ok(());
        };
        let check = self.check_for(caller, Some(rec), &text, None)?;
        match check.decision {
            Verdict::Allow => Ok(()),
            verdict => Err(EngineError::Denied {
                reasons: std::iter::once(format!(
                    "spec.command {text:?} is not allowed outright ({}): a main process cannot wait for an approval",
                    serde_json::to_string(&verdict).unwrap_or_default().trim_matches('"')
                ))
                .chain(check.reasons)
                .collect(),
            }),
        }
    }

    /// Starts the spec's main process in the running sandbox; returns its pid in the sandbox.
    pub(crate) fn start_main(
        &self,
        caller: &Caller,
        rec: &SandboxRecord,
        manifest: &SandboxManifest,
    ) -> Result<Option<i32>> {
        let Some((argv, text)) = main_command(manifest) else {
            return Ok(None);
        };
        let started = (|| {
            self.check_main(caller, rec, manifest)?;
            let (env, cwd, user) =
                self.process_context(rec, manifest, &BTreeMap::new(), None, None)?;
            let log_path = self.main_log_path(&rec.name);
            if let Some(dir) = log_path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| EngineError::internal("log dir", e))?;
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| EngineError::internal("main log", e))?;
            let err_log = log
                .try_clone()
                .map_err(|e| EngineError::internal("main log", e))?;
            let (backend, inst) = self.backend_of(rec)?;
            let spec = ExecSpec {
                argv,
                env,
                cwd,
                user,
                tty: None,
                stdin: Io::Null,
                stdout: Io::File(log.into()),
                stderr: Io::File(err_log.into()),
                start_timeout: Some(Duration::from_secs(10)),
                track_tree: false,
            };
            // Dropping the process's control leaves it running, untied.
            Ok(backend.exec(&inst, spec)?.pid)
        })();
        let detail = serde_json::json!({"command": text, "pid": started.as_ref().ok()});
        self.audit_result(caller, "sandbox.main", Some(&rec.name), detail, &started);
        started.map(Some)
    }
}
