//! The safety layer in the engine: who asks (the actor), command checks against policies,
//! approvals, and the audit trail.
//!
//! Every exec is checked before it runs ([`Engine::check_exec`]): `deny` refuses it,
//! `require_approval` holds it as an approval that someone approves or denies (or that
//! expires, counting as denied), `allow` runs it. Every operation appends a record to the
//! hash-chained audit log ([`Engine::audit`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use devbox_safety::{Check, CheckContext, PolicySet, PolicySource, Verdict};
use devbox_store::{ApprovalRecord, ApprovalState, PolicyRecord, SandboxRecord, now_ms};
pub use devbox_wire::{ApprovalInfo, PolicyInfo};

use crate::model::rfc3339;
use crate::sandbox::new_id;
use crate::{Engine, EngineError, Result};

tokio::task_local! {
    /// Who the current request comes from (set by the API per request).
    pub static ACTOR: String;
}

thread_local! {
    static THREAD_ACTOR: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The actor of the current request, task or engine thread (`local` when unknown).
pub fn current_actor() -> String {
    ACTOR
        .try_with(|a| a.clone())
        .ok()
        .or_else(|| THREAD_ACTOR.with(|t| t.borrow().clone()))
        .unwrap_or_else(|| "local".into())
}

/// Runs `f` with `actor` as the current actor of this thread.
pub(crate) fn with_actor<T>(actor: String, f: impl FnOnce() -> T) -> T {
    THREAD_ACTOR.with(|t| *t.borrow_mut() = Some(actor));
    let out = f();
    THREAD_ACTOR.with(|t| *t.borrow_mut() = None);
    out
}

/// Compiled policy sets by scope, rebuilt when policies change.
#[derive(Default)]
pub(crate) struct PolicyCache {
    version: AtomicU64,
    sets: Mutex<HashMap<Option<String>, (u64, PolicySet)>>,
}

/// Quotes argv into shell text that parses back to the same words.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Engine {
    /// Appends an audit record (failures are logged, not raised: an operation is not undone
    /// because its record could not be written).
    pub(crate) fn audit(&self, action: &str, sandbox: Option<&str>, detail: serde_json::Value) {
        if let Err(e) = self
            .store
            .append_audit(&current_actor(), action, sandbox, &detail)
        {
            tracing::error!(action, "writing the audit log: {e}");
        }
    }

    /// The policies that apply in a scope; `candidate` is added (replacing one of its name in
    /// that scope) as if it were installed.
    fn policy_sources(
        &self,
        sandbox: Option<&str>,
        candidate: Option<&PolicySource>,
    ) -> Result<Vec<PolicySource>> {
        let mut sources: Vec<PolicySource> = self
            .store
            .policies(sandbox)?
            .into_iter()
            .filter(|p| sandbox.is_some() || p.sandbox.is_none())
            .filter(|p| {
                candidate.is_none_or(|c| !(p.name == c.name && p.sandbox.as_deref() == sandbox))
            })
            .map(|p| PolicySource {
                name: p.name,
                rego: p.rego,
            })
            .collect();
        if let Some(c) = candidate {
            sources.push(c.clone());
        }
        Ok(sources)
    }

    fn policy_set(&self, sandbox: Option<&str>) -> Result<PolicySet> {
        let version = self.policies.version.load(Ordering::SeqCst);
        let key = sandbox.map(str::to_string);
        if let Some((v, set)) = self
            .policies
            .sets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            && *v == version
        {
            return Ok(set.clone());
        }
        let sources = self.policy_sources(sandbox, None)?;
        let set =
            PolicySet::new(&sources).map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        self.policies
            .sets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (version, set.clone()));
        Ok(set)
    }

    pub(crate) fn check_for(
        &self,
        rec: Option<&SandboxRecord>,
        text: &str,
        candidate: Option<&PolicySource>,
    ) -> Result<Check> {
        let (ctx, scope) = match rec {
            Some(r) => {
                let m = Self::manifest_of(r)?;
                let ctx = CheckContext {
                    sandbox: r.name.clone(),
                    labels: m.metadata.labels.clone(),
                    spec: serde_json::to_value(&m.spec).unwrap_or_default(),
                    actor: current_actor(),
                };
                (ctx, Some(r.name.as_str()))
            }
            None => (
                CheckContext {
                    actor: current_actor(),
                    ..Default::default()
                },
                None,
            ),
        };
        let set = match candidate {
            None => self.policy_set(scope)?,
            Some(c) => PolicySet::new(&self.policy_sources(scope, Some(c))?).map_err(|err| {
                EngineError::InvalidRequest(format!("the policy is refused: {err}"))
            })?,
        };
        Ok(devbox_safety::check(text, &ctx, &set))
    }

    /// Checks a command without running it (`sandbox check`); with `candidate`, as if that
    /// policy were installed (`sandbox policy test`).
    pub async fn check_command(
        self: &Arc<Self>,
        sandbox: Option<String>,
        text: String,
        candidate: Option<devbox_wire::CandidatePolicy>,
    ) -> Result<devbox_wire::Check> {
        let candidate = candidate.map(|p| PolicySource {
            name: p.name,
            rego: p.rego,
        });
        self.blocking(move |e| {
            let rec = match &sandbox {
                Some(n) => Some(e.record(n)?),
                None => None,
            };
            e.check_for(rec.as_ref(), &text, candidate.as_ref())
                .map(crate::to_wire::check)
        })
        .await
    }

    /// Decides whether an exec may run now. `approval` is an approved approval's id for
    /// exactly this command. Errors: [`EngineError::Denied`], [`EngineError::ApprovalRequired`].
    pub(crate) fn check_exec(
        &self,
        rec: &SandboxRecord,
        text: &str,
        request: &str,
        approval: Option<&str>,
    ) -> Result<String> {
        if let Some(id) = approval {
            let a = self
                .store
                .approval(id)?
                .ok_or_else(|| EngineError::NotFound {
                    kind: "approval",
                    name: id.to_string(),
                    hint: "see `sandbox approvals`",
                })?;
            if a.sandbox != rec.name || a.command != text {
                return Err(EngineError::InvalidRequest(format!(
                    "approval {id} is for another command"
                )));
            }
            if !self.store.decide_approval(
                id,
                ApprovalState::Approved,
                ApprovalState::Used,
                None,
                None,
            )? {
                return Err(EngineError::Denied {
                    reasons: vec![format!(
                        "approval {id} is {}",
                        serde_json::to_string(&a.state)
                            .unwrap_or_default()
                            .trim_matches('"')
                    )],
                });
            }
            return Ok(format!("approved ({id})"));
        }
        let check = self.check_for(Some(rec), text, None)?;
        match check.decision {
            Verdict::Allow => Ok("allow".into()),
            Verdict::Deny => {
                self.audit("exec.denied", Some(&rec.name), serde_json::json!({"command": text, "risk": check.risk, "reasons": check.reasons}));
                Err(EngineError::Denied {
                    reasons: check.reasons,
                })
            }
            Verdict::RequireApproval => {
                let timeout = self.cfg.approval_timeout;
                let a = ApprovalRecord {
                    id: format!("a-{}", &new_id()[..10]),
                    sandbox: rec.name.clone(),
                    command: text.to_string(),
                    request: request.to_string(),
                    reasons: check.reasons.clone(),
                    risk: serde_json::to_string(&check.risk)
                        .unwrap_or_default()
                        .trim_matches('"')
                        .to_string(),
                    state: ApprovalState::Pending,
                    requested_by: current_actor(),
                    decided_by: None,
                    reason: None,
                    created_at: now_ms(),
                    expires_at: now_ms() + timeout.as_millis() as i64,
                    decided_at: None,
                };
                self.store.insert_approval(&a)?;
                self.audit(
                    "approval.request",
                    Some(&rec.name),
                    serde_json::json!({"approval": a.id, "command": text, "risk": a.risk, "reasons": a.reasons}),
                );
                Err(EngineError::ApprovalRequired(Box::new(
                    crate::to_wire::approval(a),
                )))
            }
        }
    }

    /// Approvals (pending ones only, unless `all`).
    pub async fn approvals(self: &Arc<Self>, all: bool) -> Result<Vec<ApprovalInfo>> {
        self.blocking(move |e| {
            e.expire_approvals()?;
            Ok(e.store
                .approvals(!all)?
                .into_iter()
                .map(crate::to_wire::approval)
                .collect())
        })
        .await
    }

    /// One approval.
    pub async fn approval(self: &Arc<Self>, id: &str) -> Result<ApprovalInfo> {
        let id = id.to_string();
        self.blocking(move |e| {
            e.expire_approvals()?;
            e.store
                .approval(&id)?
                .map(crate::to_wire::approval)
                .ok_or_else(|| EngineError::NotFound {
                    kind: "approval",
                    name: id.clone(),
                    hint: "see `sandbox approvals`",
                })
        })
        .await
    }

    /// Marks pending approvals past their time as expired.
    pub(crate) fn expire_approvals(&self) -> Result<()> {
        let now = now_ms();
        for a in self.store.approvals(true)? {
            if a.expires_at <= now
                && self.store.decide_approval(
                    &a.id,
                    ApprovalState::Pending,
                    ApprovalState::Expired,
                    Some("timeout"),
                    None,
                )?
            {
                with_actor("timeout".into(), || {
                    self.audit(
                        "approval.expire",
                        Some(&a.sandbox),
                        serde_json::json!({"approval": a.id, "command": a.command}),
                    )
                });
                self.approval_changed();
            }
        }
        Ok(())
    }

    /// Approves or denies a pending approval; records who did.
    pub async fn decide(
        self: &Arc<Self>,
        id: &str,
        approve: bool,
        reason: Option<String>,
    ) -> Result<ApprovalInfo> {
        let id = id.to_string();
        self.blocking(move |e| {
            e.expire_approvals()?;
            let a = e
                .store
                .approval(&id)?
                .ok_or_else(|| EngineError::NotFound {
                    kind: "approval",
                    name: id.clone(),
                    hint: "see `sandbox approvals`",
                })?;
            let to = if approve {
                ApprovalState::Approved
            } else {
                ApprovalState::Denied
            };
            let who = current_actor();
            if !e.store.decide_approval(
                &id,
                ApprovalState::Pending,
                to,
                Some(&who),
                reason.as_deref(),
            )? {
                return Err(EngineError::WrongState(format!(
                    "approval {id} is already {}",
                    serde_json::to_string(&a.state)
                        .unwrap_or_default()
                        .trim_matches('"')
                )));
            }
            e.audit(
                if approve {
                    "approval.approve"
                } else {
                    "approval.deny"
                },
                Some(&a.sandbox),
                serde_json::json!({"approval": id, "command": a.command, "reason": reason}),
            );
            e.approval_changed();
            Ok(e.store
                .approval(&id)?
                .map(crate::to_wire::approval)
                .unwrap_or_else(|| crate::to_wire::approval(a)))
        })
        .await
    }

    /// Withdraws a pending approval whose requester left (an exec stream that closed): it can
    /// no longer be approved into running something nobody waits for.
    pub async fn withdraw_approval(self: &Arc<Self>, id: &str) -> Result<()> {
        let id = id.to_string();
        self.blocking(move |e| {
            if e.store.decide_approval(&id, ApprovalState::Pending, ApprovalState::Withdrawn, None, Some("the requester left"))? {
                let a = e.store.approval(&id)?;
                e.audit(
                    "approval.withdraw",
                    a.as_ref().map(|a| a.sandbox.as_str()),
                    serde_json::json!({"approval": id, "command": a.as_ref().map(|a| a.command.as_str())}),
                );
                e.approval_changed();
            }
            Ok(())
        })
        .await
    }

    fn approval_changed(&self) {
        self.approval_events.send_modify(|n| *n += 1);
    }

    /// Waits until an approval is decided (or `timeout` passes); returns it.
    pub async fn wait_approval(
        self: &Arc<Self>,
        id: &str,
        timeout: Duration,
    ) -> Result<ApprovalInfo> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.approval_events.subscribe();
        loop {
            let a = self.approval(id).await?;
            if a.state != devbox_wire::ApprovalState::Pending
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(a);
            }
            // Wake on any decision, and at least every second to notice expiry.
            let _ = tokio::time::timeout(
                Duration::from_secs(1).min(deadline - tokio::time::Instant::now()),
                events.changed(),
            )
            .await;
        }
    }

    /// Policies: global ones and every sandbox's (or only those applying to `sandbox`).
    pub async fn list_policies(
        self: &Arc<Self>,
        sandbox: Option<String>,
    ) -> Result<Vec<PolicyInfo>> {
        self.blocking(move |e| {
            let stored = e.store.policies(sandbox.as_deref())?;
            let mut out = Vec::new();
            if !stored
                .iter()
                .any(|p| p.name == "default" && p.sandbox.is_none())
            {
                out.push(PolicyInfo {
                    name: "default".into(),
                    sandbox: None,
                    rego: devbox_safety::policy::DEFAULT_POLICY.into(),
                    created_at: String::new(),
                    builtin: true,
                });
            }
            out.extend(stored.into_iter().map(|p| PolicyInfo {
                name: p.name,
                sandbox: p.sandbox,
                rego: p.rego,
                created_at: rfc3339(p.created_at),
                builtin: false,
            }));
            Ok(out)
        })
        .await
    }

    /// Adds (or replaces) a policy, global or for one sandbox; refused if it does not compile
    /// together with the policies it joins.
    pub async fn add_policy(
        self: &Arc<Self>,
        name: String,
        sandbox: Option<String>,
        rego: String,
    ) -> Result<PolicyInfo> {
        self.blocking(move |e| {
            devbox_spec::Name::new(&name).map_err(|_| {
                EngineError::InvalidRequest(format!("{name:?} is not a valid policy name: use lowercase letters, digits, '-', '_', '.'"))
            })?;
            if let Some(s) = &sandbox {
                e.record(s)?;
            }
            // Compile with everything it will be evaluated with.
            let candidate = PolicySource { name: name.clone(), rego: rego.clone() };
            PolicySet::new(&e.policy_sources(sandbox.as_deref(), Some(&candidate))?)
                .map_err(|err| EngineError::InvalidRequest(format!("the policy is refused: {err}")))?;
            let rec = PolicyRecord { name: name.clone(), sandbox: sandbox.clone(), rego, created_at: now_ms() };
            e.store.put_policy(&rec)?;
            e.policies.version.fetch_add(1, Ordering::SeqCst);
            e.audit("policy.add", sandbox.as_deref(), serde_json::json!({"policy": name, "rego": rec.rego}));
            Ok(PolicyInfo { name, sandbox, rego: rec.rego, created_at: rfc3339(rec.created_at), builtin: false })
        })
        .await
    }

    /// Removes a policy.
    pub async fn remove_policy(
        self: &Arc<Self>,
        name: String,
        sandbox: Option<String>,
    ) -> Result<()> {
        self.blocking(move |e| {
            if !e.store.delete_policy(&name, sandbox.as_deref())? {
                return Err(EngineError::NotFound {
                    kind: "policy",
                    name,
                    hint: "see `sandbox policy ls`",
                });
            }
            e.policies.version.fetch_add(1, Ordering::SeqCst);
            e.audit(
                "policy.remove",
                sandbox.as_deref(),
                serde_json::json!({"policy": name}),
            );
            Ok(())
        })
        .await
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
}

impl Engine {
    /// Packs a sandbox's exec logs, exec records and audit records into a `.tar.gz` in the
    /// pool's scratch area; returns its path (the caller streams and removes it).
    pub async fn export_logs(self: &Arc<Self>, name: &str) -> Result<std::path::PathBuf> {
        self.bookkeeping.settled().await;
        let name = name.to_string();
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
                "logs.export",
                Some(&name),
                serde_json::json!({"execs": execs.len()}),
            );
            Ok(path)
        })
        .await
    }
}

impl Engine {
    /// Audits an operation with its outcome (`ok` or the error's code and message).
    pub(crate) fn audit_result<T>(
        &self,
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
        self.audit(action, sandbox, detail);
    }
}

impl Engine {
    /// Records a refused request (not root, bad token).
    pub async fn audit_auth_failure(self: &Arc<Self>, path: &str, why: &str) {
        let (path, why) = (path.to_string(), why.to_string());
        let _ = self
            .blocking(move |e| {
                e.audit(
                    "auth.failure",
                    None,
                    serde_json::json!({"path": path, "reason": why}),
                );
                Ok(())
            })
            .await;
    }
}
