//! Command checks: every exec is checked before it runs ([`Engine::check_exec`]) against
//! the policies of its scope (global and per sandbox, compiled once per set and cached):
//! `deny` refuses it, `require_approval` holds it as an approval (see `approvals.rs`),
//! `allow` runs it. Also the policies themselves: list, add, remove.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use devbox_safety::{Check, CheckContext, PolicySet, PolicySource, Verdict};
use devbox_store::{ApprovalRecord, ApprovalState, PolicyRecord, SandboxRecord, now_ms};
pub use devbox_wire::{ApprovalInfo, PolicyInfo};

use crate::model::rfc3339;
use crate::sandbox::new_id;
use crate::{Caller, Engine, EngineError, Result};

/// Compiled policy sets by scope, rebuilt when policies change.
#[derive(Default)]
pub(crate) struct PolicyCache {
    version: AtomicU64,
    sets: Mutex<HashMap<Option<String>, (u64, PolicySet)>>,
}

pub use devbox_spec::shell_join;

/// What an approval is for, as kept and compared: the exec request (user, environment,
/// working directory, timeout, ...) without what may differ between asking and running (the
/// approval's id, the terminal's size), and the sandbox's id.
fn approval_request(request: &str, sandbox_id: &str) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(request).unwrap_or_else(|_| serde_json::Value::String(request.into()));
    if let Some(m) = v.as_object_mut() {
        m.remove("approval");
        m.remove("tty");
        m.insert("sandbox_id".into(), sandbox_id.into());
    }
    v.to_string()
}

impl Engine {
    /// Checks a command without running it (`sandbox check`); with `candidate`, as if that
    /// policy were installed (`sandbox policy test`). Policies see who asks (`caller`).
    pub async fn check_command(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox: Option<String>,
        text: String,
        candidate: Option<devbox_wire::CandidatePolicy>,
    ) -> Result<devbox_wire::Check> {
        let candidate = candidate.map(|p| PolicySource {
            name: p.name,
            rego: p.rego,
        });
        let caller = caller.clone();
        self.blocking(move |e| {
            let rec = match &sandbox {
                Some(n) => Some(e.record(n)?),
                None => None,
            };
            e.check_for(&caller, rec.as_ref(), &text, candidate.as_ref())
                .map(crate::to_wire::check)
        })
        .await
    }

    /// Decides whether an exec may run now. `approval` is an approved approval's id for
    /// exactly this command. Errors: [`EngineError::Denied`], [`EngineError::ApprovalRequired`].
    pub(crate) fn check_exec(
        &self,
        caller: &Caller,
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
            // Exactly what was approved: the same sandbox (not another of its name), the
            // same command text and the same user, environment, working directory and
            // options.
            if a.sandbox != rec.name
                || a.command != text
                || a.request != approval_request(request, &rec.id)
            {
                return Err(EngineError::InvalidRequest(format!(
                    "approval {id} is for another command (or the same one with other options, \
                     or another sandbox of that name): run exactly the approved command"
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
        let check = self.check_for(caller, Some(rec), text, None)?;
        match check.decision {
            Verdict::Allow => Ok("allow".into()),
            Verdict::Deny => {
                self.metrics.denied();
                self.audit(caller, "exec.denied", Some(&rec.name), serde_json::json!({"command": text, "risk": check.risk, "reasons": check.reasons}));
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
                    request: approval_request(request, &rec.id),
                    reasons: check.reasons.clone(),
                    risk: serde_json::to_string(&check.risk)
                        .unwrap_or_default()
                        .trim_matches('"')
                        .to_string(),
                    state: ApprovalState::Pending,
                    requested_by: caller.name().to_string(),
                    decided_by: None,
                    reason: None,
                    created_at: now_ms(),
                    expires_at: now_ms() + timeout.as_millis() as i64,
                    decided_at: None,
                };
                self.store.insert_approval(&a)?;
                self.audit(
                    caller,
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

    pub(crate) fn check_for(
        &self,
        caller: &Caller,
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
                    network: self.network_input(r),
                    actor: caller.name().to_string(),
                };
                (ctx, Some(r.name.as_str()))
            }
            None => (
                CheckContext {
                    actor: caller.name().to_string(),
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

    /// The policies that apply in a scope; `candidate` is added (replacing one of its name in
    /// that scope) as if it were installed.
    pub(crate) fn policy_sources(
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

    pub(crate) fn policy_set(&self, sandbox: Option<&str>) -> Result<PolicySet> {
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
        caller: &Caller,
        name: String,
        sandbox: Option<String>,
        rego: String,
    ) -> Result<PolicyInfo> {
        let caller = caller.clone();
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
            e.audit(&caller, "policy.add", sandbox.as_deref(), serde_json::json!({"policy": name, "rego": rec.rego}));
            Ok(PolicyInfo { name, sandbox, rego: rec.rego, created_at: rfc3339(rec.created_at), builtin: false })
        })
        .await
    }

    /// Removes a policy.
    pub async fn remove_policy(
        self: &Arc<Self>,
        caller: &Caller,
        name: String,
        sandbox: Option<String>,
    ) -> Result<()> {
        let caller = caller.clone();
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
                &caller,
                "policy.remove",
                sandbox.as_deref(),
                serde_json::json!({"policy": name}),
            );
            Ok(())
        })
        .await
    }
}
