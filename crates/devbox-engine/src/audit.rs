//! The audit trail: every operation appends a record to the hash-chained audit log
//! ([`Engine::audit`]); verification, retention, exec logs and their export.

use std::sync::Arc;

use devbox_store::now_ms;

use crate::{Caller, Engine, EngineError, Result};

impl Engine {
    /// Appends an audit record of `caller` (failures are logged, not raised: an operation is
    /// not undone because its record could not be written).
    pub(crate) fn audit(
        &self,
        caller: &Caller,
        action: &str,
        sandbox: Option<&str>,
        detail: serde_json::Value,
    ) {
        match self
            .store
            .append_audit(caller.name(), action, sandbox, &detail)
        {
            Ok(rec) => self.events.publish(&rec),
            Err(e) => tracing::error!(action, "writing the audit log: {e}"),
        }
    }

    /// Audits an operation with its outcome (`ok` or the error's code and message).
    pub(crate) fn audit_result<T>(
        &self,
        caller: &Caller,
        action: &str,
        sandbox: Option<&str>,
        mut detail: serde_json::Value,
        r: &Result<T>,
    ) {
        if !detail.is_object() {
            detail = serde_json::json!({});
        }
        match r {
            Ok(_) => detail["outcome"] = "ok".into(),
            Err(e) => {
                detail["outcome"] = e.code().into();
                detail["error"] = e.to_string().into();
            }
        }
        self.audit(caller, action, sandbox, detail);
    }

    /// Records a refused request (not root, bad token).
    pub async fn audit_auth_failure(self: &Arc<Self>, caller: &Caller, path: &str, why: &str) {
        let (path, why) = (path.to_string(), why.to_string());
        let caller = caller.clone();
        let _ = self
            .blocking(move |e| {
                e.audit(
                    &caller,
                    "auth.failure",
                    None,
                    serde_json::json!({"path": path, "reason": why}),
                );
                Ok(())
            })
            .await;
    }

    /// Audit records, oldest first.
    pub async fn audit_log(
        self: &Arc<Self>,
        sandbox: Option<String>,
        since_ms: Option<i64>,
        limit: usize,
    ) -> Result<Vec<devbox_wire::AuditRecord>> {
        self.bookkeeping.settled().await;
        self.blocking(move |e| {
            let records = e.store.audit(sandbox.as_deref(), since_ms, limit)?;
            Ok(records
                .into_iter()
                .map(crate::to_wire::audit_record)
                .collect())
        })
        .await
    }

    /// Checks the audit chain; with `head` (a head hash from an earlier verify, kept
    /// elsewhere), also that the chain still reaches it.
    pub async fn verify_audit(
        self: &Arc<Self>,
        head: Option<String>,
    ) -> Result<devbox_wire::AuditVerification> {
        let head = match head {
            None => None,
            Some(h) => {
                let h = h.trim().to_ascii_lowercase();
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(EngineError::InvalidRequest(format!(
                        "the head {h:?} (--head) is not a hash: give the 64 hex digits of a head that `sandbox audit verify` printed"
                    )));
                }
                Some(h)
            }
        };
        self.bookkeeping.settled().await;
        self.blocking(move |e| {
            let found = e.store.verify_audit(head.as_deref())?;
            Ok(crate::to_wire::audit_verification(found))
        })
        .await
    }

    /// Deletes audit records, exec records and exec logs older than the retention period.
    /// The audit chain gets a record of what was pruned (`audit.prune`, by `retention`),
    /// which `audit verify` checks the oldest kept record against.
    pub(crate) fn apply_retention(&self) -> Result<()> {
        let Some(days) = self.cfg.retention_days else {
            return Ok(());
        };
        let before = now_ms() - days as i64 * 86_400_000;
        let pruned = self.store.prune_audit(before)?;
        for (sandbox, id) in self.store.prune_execs(before)? {
            for ext in ["stdout", "stderr"] {
                let _ = std::fs::remove_file(self.exec_log_path(&sandbox, &id, ext));
            }
        }
        if pruned > 0 {
            tracing::info!(
                records = pruned,
                days,
                "retention: pruned old audit records"
            );
        }
        Ok(())
    }

    /// Where an exec's output is kept.
    pub(crate) fn exec_log_path(&self, sandbox: &str, exec: &str, ext: &str) -> std::path::PathBuf {
        self.cfg
            .state_dir
            .join("logs")
            .join(sandbox)
            .join(format!("{exec}.{ext}"))
    }

    /// Packs a sandbox's exec logs, exec records and audit records into a `.tar.gz` in the
    /// pool's scratch area; returns its path (the caller streams and removes it).
    pub async fn export_logs(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
    ) -> Result<std::path::PathBuf> {
        self.bookkeeping.settled().await;
        let name = name.to_string();
        let caller = caller.clone();
        self.blocking(move |e| {
            let rec = e.store.sandbox_by_name(&name)?;
            let execs: Vec<_> = e
                .store
                .execs_of(&name)?
                .into_iter()
                .filter(|x| rec.as_ref().is_none_or(|r| x.started_at >= r.created_at))
                .collect();
            let audit = e.store.audit(
                Some(&name),
                rec.as_ref().map(|r| r.created_at),
                usize::MAX >> 1,
            )?;
            if rec.is_none() && execs.is_empty() && audit.is_empty() {
                return Err(EngineError::sandbox_not_found(&name));
            }
            let path = e.scratch_path("logs");
            let written = (|| -> std::io::Result<()> {
                let file = std::fs::File::create(&path)?;
                let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
                let mut tar = tar::Builder::new(gz);
                let add =
                    |tar: &mut tar::Builder<_>, n: &str, data: &[u8]| -> std::io::Result<()> {
                        let mut h = tar::Header::new_gnu();
                        h.set_size(data.len() as u64);
                        h.set_mode(0o644);
                        h.set_mtime((now_ms() / 1000) as u64);
                        tar.append_data(&mut h, format!("{name}-logs/{n}"), data)
                    };
                if let Some(r) = &rec {
                    let info = e.info(r, false).ok();
                    add(
                        &mut tar,
                        "sandbox.json",
                        &serde_json::to_vec_pretty(&info).unwrap_or_default(),
                    )?;
                }
                let lines = |items: Vec<serde_json::Value>| {
                    items.iter().map(|v| format!("{v}\n")).collect::<String>()
                };
                add(
                    &mut tar,
                    "audit.jsonl",
                    lines(
                        audit
                            .iter()
                            .map(|a| serde_json::to_value(a).unwrap_or_default())
                            .collect(),
                    )
                    .as_bytes(),
                )?;
                add(
                    &mut tar,
                    "execs.jsonl",
                    lines(
                        execs
                            .iter()
                            .map(|x| serde_json::to_value(x).unwrap_or_default())
                            .collect(),
                    )
                    .as_bytes(),
                )?;
                for x in &execs {
                    for ext in ["stdout", "stderr"] {
                        let p = e.exec_log_path(&name, &x.id, ext);
                        if let Ok(data) = std::fs::read(&p) {
                            add(&mut tar, &format!("execs/{}.{ext}", x.id), &data)?;
                        }
                    }
                }
                tar.into_inner()?.finish()?.sync_all()
            })();
            if let Err(err) = written {
                let _ = std::fs::remove_file(&path);
                return Err(EngineError::internal("packing logs", err));
            }
            e.audit(
                &caller,
                "logs.export",
                Some(&name),
                serde_json::json!({"execs": execs.len()}),
            );
            Ok(path)
        })
        .await
    }
}
