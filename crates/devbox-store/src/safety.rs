//! Records of the safety layer: policies, approvals, the audit chain, execs.

use rusqlite::{OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::{Store, StoreError, is_unique_violation, now_ms};

/// A stored policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyRecord {
    /// Name (unique within its scope).
    pub name: String,
    /// `None`: global; else the sandbox it applies to.
    pub sandbox: Option<String>,
    /// Rego text.
    pub rego: String,
    /// Added, ms since epoch.
    pub created_at: i64,
}

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    /// Waiting for someone.
    Pending,
    /// Approved: the command may run once.
    Approved,
    /// Denied by someone.
    Denied,
    /// Nobody decided in time (counts as denied).
    Expired,
    /// Approved, and the command ran.
    Used,
    /// Whoever waited for it left before a decision (an exec stream closed).
    Withdrawn,
}

impl ApprovalState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Used => "used",
            Self::Withdrawn => "withdrawn",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "pending" => Self::Pending,
            "approved" => Self::Approved,
            "denied" => Self::Denied,
            "expired" => Self::Expired,
            "used" => Self::Used,
            "withdrawn" => Self::Withdrawn,
            o => return Err(StoreError::Decode(format!("approval state {o:?}"))),
        })
    }
}

/// A command held for approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApprovalRecord {
    /// Id.
    pub id: String,
    /// The sandbox.
    pub sandbox: String,
    /// The command as text.
    pub command: String,
    /// The exec request (JSON), to run it once approved.
    pub request: String,
    /// Why approval is needed.
    pub reasons: Vec<String>,
    /// Risk level.
    pub risk: String,
    /// Where it stands.
    pub state: ApprovalState,
    /// Who asked.
    pub requested_by: String,
    /// Who approved or denied.
    pub decided_by: Option<String>,
    /// Why it was denied.
    pub reason: Option<String>,
    /// Asked, ms since epoch.
    pub created_at: i64,
    /// Expires, ms since epoch.
    pub expires_at: i64,
    /// Decided, ms since epoch.
    pub decided_at: Option<i64>,
}

/// One audit record; each carries the hash of the one before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditRecord {
    /// Position in the chain.
    pub seq: i64,
    /// When, ms since epoch.
    pub time: i64,
    /// Who.
    pub actor: String,
    /// What (`sandbox.create`, `exec`, `approval.approve`, ...).
    pub action: String,
    /// The sandbox concerned, if any.
    pub sandbox: Option<String>,
    /// Details (JSON).
    pub detail: serde_json::Value,
    /// Hash of the previous record.
    pub prev_hash: String,
    /// sha256 of this record's fields and `prev_hash`.
    pub hash: String,
}

/// The first record of an empty chain follows this hash.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of a record: sha256 over its fields and the previous hash.
pub fn audit_hash(
    seq: i64,
    time: i64,
    actor: &str,
    action: &str,
    sandbox: Option<&str>,
    detail: &serde_json::Value,
    prev: &str,
) -> String {
    let canonical =
        serde_json::json!([seq, time, actor, action, sandbox, detail, prev]).to_string();
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditVerification {
    /// Records checked.
    pub records: u64,
    /// The whole chain holds.
    pub ok: bool,
    /// The first record that does not (its seq), if any.
    pub first_broken: Option<i64>,
    /// What is wrong with it.
    pub problem: Option<String>,
    /// The hash of the newest record: kept elsewhere, it also reveals records cut from the
    /// end of the log, which no chain can show by itself.
    #[serde(default)]
    pub head: Option<String>,
}

/// One exec, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecRecord {
    /// Id (names its log files).
    pub id: String,
    /// The sandbox.
    pub sandbox: String,
    /// The command as text.
    pub command: String,
    /// The decision that let it run (or not).
    pub decision: String,
    /// Who ran it.
    pub actor: String,
    /// Started, ms since epoch.
    pub started_at: i64,
    /// Ended, ms since epoch.
    pub ended_at: Option<i64>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// CPU time used (user + system), microseconds.
    pub cpu_usec: Option<u64>,
    /// Peak resident memory, KiB.
    pub max_rss_kib: Option<u64>,
    /// Bytes of stdout kept.
    pub stdout_bytes: u64,
    /// Bytes of stderr kept.
    pub stderr_bytes: u64,
}

fn approval_row(r: &Row<'_>) -> rusqlite::Result<(ApprovalRecord, String, String)> {
    Ok((
        ApprovalRecord {
            id: r.get(0)?,
            sandbox: r.get(1)?,
            command: r.get(2)?,
            request: r.get(3)?,
            reasons: Vec::new(),
            risk: r.get(5)?,
            state: ApprovalState::Pending,
            requested_by: r.get(7)?,
            decided_by: r.get(8)?,
            reason: r.get(9)?,
            created_at: r.get(10)?,
            expires_at: r.get(11)?,
            decided_at: r.get(12)?,
        },
        r.get(4)?,
        r.get(6)?,
    ))
}

const APPROVAL_COLS: &str = "id, sandbox, command, request, reasons, risk, state, requested_by, decided_by, reason, created_at, expires_at, decided_at";

fn finish_approval(row: (ApprovalRecord, String, String)) -> Result<ApprovalRecord, StoreError> {
    let (mut rec, reasons, state) = row;
    rec.reasons = serde_json::from_str(&reasons).map_err(|e| StoreError::Decode(e.to_string()))?;
    rec.state = ApprovalState::parse(&state)?;
    Ok(rec)
}

fn audit_row(r: &Row<'_>) -> rusqlite::Result<(AuditRecord, String)> {
    Ok((
        AuditRecord {
            seq: r.get(0)?,
            time: r.get(1)?,
            actor: r.get(2)?,
            action: r.get(3)?,
            sandbox: r.get(4)?,
            detail: serde_json::Value::Null,
            prev_hash: r.get(6)?,
            hash: r.get(7)?,
        },
        r.get(5)?,
    ))
}

fn finish_audit(row: (AuditRecord, String)) -> AuditRecord {
    let (mut rec, detail) = row;
    // A record whose detail does not parse keeps it as text: verification then fails on it.
    rec.detail = serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail));
    rec
}

const EXEC_COLS: &str = "id, sandbox, command, decision, actor, started_at, ended_at, exit_code, cpu_usec, max_rss_kib, stdout_bytes, stderr_bytes";

fn exec_row(r: &Row<'_>) -> rusqlite::Result<ExecRecord> {
    Ok(ExecRecord {
        id: r.get(0)?,
        sandbox: r.get(1)?,
        command: r.get(2)?,
        decision: r.get(3)?,
        actor: r.get(4)?,
        started_at: r.get(5)?,
        ended_at: r.get(6)?,
        exit_code: r.get(7)?,
        cpu_usec: r.get::<_, Option<i64>>(8)?.map(|v| v as u64),
        max_rss_kib: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
        stdout_bytes: r.get::<_, i64>(10)? as u64,
        stderr_bytes: r.get::<_, i64>(11)? as u64,
    })
}

impl Store {
    /// Adds or replaces a policy.
    pub fn put_policy(&self, rec: &PolicyRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO policies (name, sandbox, rego, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name, scope) DO UPDATE SET rego = excluded.rego, created_at = excluded.created_at",
                params![rec.name, rec.sandbox, rec.rego, rec.created_at],
            )?;
            Ok(())
        })
    }

    /// Policies: global ones, and those of `sandbox` if given (`None`: all of them).
    pub fn policies(&self, sandbox: Option<&str>) -> Result<Vec<PolicyRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, sandbox, rego, created_at FROM policies ORDER BY sandbox IS NOT NULL, sandbox, name")?;
            let rows: Vec<PolicyRecord> = st
                .query_map([], |r| Ok(PolicyRecord { name: r.get(0)?, sandbox: r.get(1)?, rego: r.get(2)?, created_at: r.get(3)? }))?
                .collect::<Result<_, _>>()?;
            Ok(match sandbox {
                None => rows,
                Some(s) => rows.into_iter().filter(|p| p.sandbox.is_none() || p.sandbox.as_deref() == Some(s)).collect(),
            })
        })
    }

    /// Removes a policy; false if there was none.
    pub fn delete_policy(&self, name: &str, sandbox: Option<&str>) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "DELETE FROM policies WHERE name = ?1 AND scope = ?2",
                params![name, sandbox.unwrap_or("")],
            )?;
            Ok(n > 0)
        })
    }

    /// Records an approval request.
    pub fn insert_approval(&self, rec: &ApprovalRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                &format!("INSERT INTO approvals ({APPROVAL_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
                params![
                    rec.id,
                    rec.sandbox,
                    rec.command,
                    rec.request,
                    serde_json::to_string(&rec.reasons).unwrap_or_default(),
                    rec.risk,
                    rec.state.as_str(),
                    rec.requested_by,
                    rec.decided_by,
                    rec.reason,
                    rec.created_at,
                    rec.expires_at,
                    rec.decided_at
                ],
            )
            .map_err(|e| if is_unique_violation(&e) { StoreError::Conflict(format!("an approval {}", rec.id)) } else { e.into() })?;
            Ok(())
        })
    }

    /// One approval.
    pub fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError> {
        self.with(|c| {
            let r = c
                .query_row(
                    &format!("SELECT {APPROVAL_COLS} FROM approvals WHERE id = ?1"),
                    [id],
                    approval_row,
                )
                .optional()?;
            r.map(finish_approval).transpose()
        })
    }

    /// Approvals, newest first; only pending ones if asked.
    pub fn approvals(&self, pending_only: bool) -> Result<Vec<ApprovalRecord>, StoreError> {
        self.with(|c| {
            let filter = if pending_only {
                "WHERE state = 'pending'"
            } else {
                ""
            };
            let mut st = c.prepare(&format!(
                "SELECT {APPROVAL_COLS} FROM approvals {filter} ORDER BY created_at DESC LIMIT 1000"
            ))?;
            let rows: Vec<_> = st.query_map([], approval_row)?.collect::<Result<_, _>>()?;
            rows.into_iter().map(finish_approval).collect()
        })
    }

    /// Moves an approval from `from` to a new state; false if it was not in state `from`.
    pub fn decide_approval(
        &self,
        id: &str,
        from: ApprovalState,
        to: ApprovalState,
        by: Option<&str>,
        reason: Option<&str>,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE approvals SET state = ?3, decided_by = COALESCE(?4, decided_by), reason = COALESCE(?5, reason), decided_at = COALESCE(decided_at, ?6) WHERE id = ?1 AND state = ?2",
                params![id, from.as_str(), to.as_str(), by, reason, now_ms()],
            )?;
            Ok(n > 0)
        })
    }

    /// Appends an audit record to the chain; returns it.
    pub fn append_audit(
        &self,
        actor: &str,
        action: &str,
        sandbox: Option<&str>,
        detail: &serde_json::Value,
    ) -> Result<AuditRecord, StoreError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let last: Option<(i64, String)> =
                tx.query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
            let (seq, prev) = match last {
                Some((s, h)) => (s + 1, h),
                None => {
                    let anchor: Option<String> =
                        tx.query_row("SELECT value FROM meta WHERE key = 'audit_anchor'", [], |r| r.get(0)).optional()?;
                    (1, anchor.unwrap_or_else(|| GENESIS.to_string()))
                }
            };
            let time = now_ms();
            let hash = audit_hash(seq, time, actor, action, sandbox, detail, &prev);
            tx.execute(
                "INSERT INTO audit (seq, time, actor, action, sandbox, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![seq, time, actor, action, sandbox, detail.to_string(), prev, hash],
            )?;
            tx.commit()?;
            Ok(AuditRecord { seq, time, actor: actor.into(), action: action.into(), sandbox: sandbox.map(str::to_string), detail: detail.clone(), prev_hash: prev, hash })
        })
    }

    /// Audit records, oldest first, filtered by sandbox and time.
    pub fn audit(
        &self,
        sandbox: Option<&str>,
        since_ms: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, time, actor, action, sandbox, detail, prev_hash, hash FROM audit
                 WHERE (?1 IS NULL OR sandbox = ?1) AND (?2 IS NULL OR time >= ?2) ORDER BY seq DESC LIMIT ?3",
            )?;
            let mut rows: Vec<AuditRecord> =
                st.query_map(params![sandbox, since_ms, limit as i64], audit_row)?.map(|r| r.map(finish_audit)).collect::<Result<_, _>>()?;
            rows.reverse();
            Ok(rows)
        })
    }

    /// Checks the whole chain: every hash, every link.
    pub fn verify_audit(&self) -> Result<AuditVerification, StoreError> {
        self.with(|c| {
            let anchor: Option<String> = c.query_row("SELECT value FROM meta WHERE key = 'audit_anchor'", [], |r| r.get(0)).optional()?;
            let mut st = c.prepare("SELECT seq, time, actor, action, sandbox, detail, prev_hash, hash FROM audit ORDER BY seq")?;
            let mut rows = st.query([])?;
            let mut expected_prev = anchor.unwrap_or_else(|| GENESIS.to_string());
            let mut expected_seq: Option<i64> = None;
            let mut n = 0u64;
            while let Some(r) = rows.next()? {
                let rec = finish_audit(audit_row(r)?);
                n += 1;
                let broken = |problem: String| AuditVerification { records: n, ok: false, first_broken: Some(rec.seq), problem: Some(problem), head: None };
                if let Some(s) = expected_seq
                    && rec.seq != s
                {
                    return Ok(broken(format!("record {s} is missing (the next one is {})", rec.seq)));
                }
                if rec.prev_hash != expected_prev {
                    return Ok(broken("its link to the previous record does not match (a record before it was removed or changed)".into()));
                }
                let hash = audit_hash(rec.seq, rec.time, &rec.actor, &rec.action, rec.sandbox.as_deref(), &rec.detail, &rec.prev_hash);
                if hash != rec.hash {
                    return Ok(broken("its content does not match its hash (it was edited)".into()));
                }
                expected_prev = rec.hash.clone();
                expected_seq = Some(rec.seq + 1);
            }
            let head = (n > 0).then_some(expected_prev);
            Ok(AuditVerification { records: n, ok: true, first_broken: None, problem: None, head })
        })
    }

    /// Deletes audit records older than `before_ms`, keeping the chain verifiable: the hash
    /// of the last deleted record becomes the anchor the first kept one links to.
    pub fn prune_audit(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let last: Option<String> =
                tx.query_row("SELECT hash FROM audit WHERE time < ?1 ORDER BY seq DESC LIMIT 1", [before_ms], |r| r.get(0)).optional()?;
            let Some(anchor) = last else { return Ok(0) };
            let n = tx.execute("DELETE FROM audit WHERE time < ?1", [before_ms])?;
            tx.execute("INSERT INTO meta (key, value) VALUES ('audit_anchor', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value", [anchor])?;
            tx.commit()?;
            Ok(n as u64)
        })
    }

    /// Records an exec as it starts.
    pub fn insert_exec(&self, rec: &ExecRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                &format!("INSERT INTO execs ({EXEC_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
                params![
                    rec.id,
                    rec.sandbox,
                    rec.command,
                    rec.decision,
                    rec.actor,
                    rec.started_at,
                    rec.ended_at,
                    rec.exit_code,
                    rec.cpu_usec.map(|v| v as i64),
                    rec.max_rss_kib.map(|v| v as i64),
                    rec.stdout_bytes as i64,
                    rec.stderr_bytes as i64
                ],
            )?;
            Ok(())
        })
    }

    /// Records how an exec ended.
    pub fn finish_exec(&self, rec: &ExecRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE execs SET ended_at = ?2, exit_code = ?3, cpu_usec = ?4, max_rss_kib = ?5, stdout_bytes = ?6, stderr_bytes = ?7 WHERE id = ?1",
                params![
                    rec.id,
                    rec.ended_at,
                    rec.exit_code,
                    rec.cpu_usec.map(|v| v as i64),
                    rec.max_rss_kib.map(|v| v as i64),
                    rec.stdout_bytes as i64,
                    rec.stderr_bytes as i64
                ],
            )?;
            Ok(())
        })
    }

    /// A sandbox's execs, oldest first.
    pub fn execs_of(&self, sandbox: &str) -> Result<Vec<ExecRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {EXEC_COLS} FROM execs WHERE sandbox = ?1 ORDER BY started_at, rowid"
            ))?;
            let rows = st
                .query_map([sandbox], exec_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    /// Deletes exec records that started before `before_ms`; returns their ids.
    pub fn prune_execs(&self, before_ms: i64) -> Result<Vec<(String, String)>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT sandbox, id FROM execs WHERE started_at < ?1")?;
            let ids: Vec<(String, String)> = st
                .query_map([before_ms], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            c.execute("DELETE FROM execs WHERE started_at < ?1", [before_ms])?;
            Ok(ids)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_chain_detects_edits_and_removals() {
        let s = Store::open_in_memory().unwrap();
        for i in 0..5 {
            s.append_audit("root", "exec", Some("dev"), &serde_json::json!({"n": i}))
                .unwrap();
        }
        assert!(s.verify_audit().unwrap().ok);
        s.with(|c| Ok(c.execute("UPDATE audit SET detail = '{\"n\":99}' WHERE seq = 3", [])?))
            .unwrap();
        let v = s.verify_audit().unwrap();
        assert_eq!((v.ok, v.first_broken), (false, Some(3)));
        s.with(|c| Ok(c.execute("UPDATE audit SET detail = '{\"n\":2}' WHERE seq = 3", [])?))
            .unwrap();
        assert!(s.verify_audit().unwrap().ok);
        s.with(|c| Ok(c.execute("DELETE FROM audit WHERE seq = 2", [])?))
            .unwrap();
        let v = s.verify_audit().unwrap();
        assert_eq!((v.ok, v.first_broken), (false, Some(3)));
    }

    #[test]
    fn pruning_keeps_the_chain_verifiable() {
        let s = Store::open_in_memory().unwrap();
        for _ in 0..3 {
            s.append_audit("root", "a", None, &serde_json::json!({}))
                .unwrap();
        }
        assert_eq!(s.prune_audit(now_ms() + 1000).unwrap(), 3);
        s.append_audit("root", "b", None, &serde_json::json!({}))
            .unwrap();
        let v = s.verify_audit().unwrap();
        assert!(v.ok && v.records == 1, "{v:?}");
    }

    #[test]
    fn approvals_move_once() {
        let s = Store::open_in_memory().unwrap();
        let a = ApprovalRecord {
            id: "a1".into(),
            sandbox: "dev".into(),
            command: "reboot".into(),
            request: "{}".into(),
            reasons: vec!["why".into()],
            risk: "high".into(),
            state: ApprovalState::Pending,
            requested_by: "root".into(),
            decided_by: None,
            reason: None,
            created_at: now_ms(),
            expires_at: now_ms() + 1000,
            decided_at: None,
        };
        s.insert_approval(&a).unwrap();
        assert!(
            s.decide_approval(
                "a1",
                ApprovalState::Pending,
                ApprovalState::Approved,
                Some("alice"),
                None
            )
            .unwrap()
        );
        assert!(
            !s.decide_approval(
                "a1",
                ApprovalState::Pending,
                ApprovalState::Denied,
                Some("bob"),
                None
            )
            .unwrap()
        );
        let got = s.approval("a1").unwrap().unwrap();
        assert_eq!(
            (got.state, got.decided_by.as_deref()),
            (ApprovalState::Approved, Some("alice"))
        );
        assert_eq!(s.approvals(true).unwrap().len(), 0);
    }
}
