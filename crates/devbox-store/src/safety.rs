//! Records of the safety layer: policies, approvals, the audit chain, execs.

use rusqlite::{OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Store, StoreError, is_unique_violation, now_ms};

/// A stored policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// The action of the record retention appends when it prunes the oldest records. Its detail
/// names what went: `pruned` (how many), `first_seq` and `last_seq`, and `last_hash`, the
/// hash of the last pruned record, which the oldest kept record links to.
pub const PRUNE_ACTION: &str = "audit.prune";

/// The actor of retention's records.
pub const RETENTION_ACTOR: &str = "retention";

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerification {
    /// Records checked.
    pub records: u64,
    /// The whole chain holds (and reaches the kept head, if one was given).
    pub ok: bool,
    /// The first record that does not (its seq), if any.
    pub first_broken: Option<i64>,
    /// What is wrong with it.
    pub problem: Option<String>,
    /// The hash of the newest record: kept elsewhere and given to a later `verify --head`,
    /// it reveals any rewrite of the records up to it, and records cut from the end of the
    /// log, which no chain can show by itself.
    #[serde(default)]
    pub head: Option<String>,
    /// The seq of the newest record.
    #[serde(default)]
    pub head_seq: Option<i64>,
    /// Records up to this seq were pruned by retention, as the chain's own retention record
    /// says (none: the chain starts at record 1).
    #[serde(default)]
    pub pruned_through: Option<i64>,
    /// The head given to check (`--head`), if any.
    #[serde(default)]
    pub kept_head: Option<String>,
    /// Where that head is: the seq of the record with that hash (or of the last record a
    /// retention record names, if retention pruned it since).
    #[serde(default)]
    pub kept_head_seq: Option<i64>,
}

/// One exec, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

pub(crate) fn audit_row(r: &Row<'_>) -> rusqlite::Result<(AuditRecord, String)> {
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

/// Appends a record inside a transaction: the next seq after the newest record, linked to
/// its hash. In an empty table: after `pruned` (the last record just pruned), else record 1
/// after the anchor an old retention left, else after [`GENESIS`].
fn append_in(
    tx: &rusqlite::Transaction<'_>,
    actor: &str,
    action: &str,
    sandbox: Option<&str>,
    detail: &serde_json::Value,
    pruned: Option<(i64, &str)>,
) -> Result<AuditRecord, StoreError> {
    let last: Option<(i64, String)> = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (seq, prev) = match (last, pruned) {
        (Some((s, h)), _) => (s + 1, h),
        (None, Some((s, h))) => (s + 1, h.to_string()),
        (None, None) => {
            let anchor: Option<String> = tx
                .query_row(
                    "SELECT value FROM meta WHERE key = 'audit_anchor'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            (1, anchor.unwrap_or_else(|| GENESIS.to_string()))
        }
    };
    let time = now_ms();
    let hash = audit_hash(seq, time, actor, action, sandbox, detail, &prev);
    tx.execute(
        "INSERT INTO audit (seq, time, actor, action, sandbox, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![seq, time, actor, action, sandbox, detail.to_string(), prev, hash],
    )?;
    Ok(AuditRecord {
        seq,
        time,
        actor: actor.into(),
        action: action.into(),
        sandbox: sandbox.map(str::to_string),
        detail: detail.clone(),
        prev_hash: prev,
        hash,
    })
}

/// What a retention record says it pruned: (first seq, last seq, hash of the last record).
fn prune_range(d: &serde_json::Value) -> Option<(i64, i64, String)> {
    let last_hash = d["last_hash"].as_str()?;
    if last_hash.len() != 64 || !last_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((
        d["first_seq"].as_i64()?,
        d["last_seq"].as_i64()?,
        last_hash.to_string(),
    ))
}

pub(crate) fn finish_audit(row: (AuditRecord, String)) -> AuditRecord {
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
            let rec = append_in(&tx, actor, action, sandbox, detail, None)?;
            tx.commit()?;
            Ok(rec)
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

    /// A page of audit records by sequence number: those after `after` (if given) and before
    /// `before` (if given), of `sandbox` and since `since_ms` (if given); `limit` of them
    /// from the oldest (`newest_first` false) or the newest, returned in that order.
    pub fn audit_page(
        &self,
        sandbox: Option<&str>,
        since_ms: Option<i64>,
        after: Option<i64>,
        before: Option<i64>,
        newest_first: bool,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let order = if newest_first { "DESC" } else { "ASC" };
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT seq, time, actor, action, sandbox, detail, prev_hash, hash FROM audit
                 WHERE (?1 IS NULL OR sandbox = ?1) AND (?2 IS NULL OR time >= ?2)
                   AND (?3 IS NULL OR seq > ?3) AND (?4 IS NULL OR seq < ?4)
                 ORDER BY seq {order} LIMIT ?5"
            ))?;
            let rows = st
                .query_map(
                    params![
                        sandbox,
                        since_ms,
                        after,
                        before,
                        limit.min(i64::MAX as usize) as i64
                    ],
                    audit_row,
                )?
                .map(|r| r.map(finish_audit))
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    /// Checks the whole chain: every hash, every link, and where it starts: at record 1 after
    /// [`GENESIS`], or right after the records the newest retention record says it pruned,
    /// linked to the last of them. With `kept_head` (a head hash kept elsewhere), also that
    /// the chain reaches it: that record is still there, unchanged, with everything before it.
    ///
    /// Nothing here is secret: whoever can write the database can rewrite the whole chain
    /// consistently. Only a head kept out of their reach shows such a rewrite (up to that
    /// head).
    pub fn verify_audit(&self, kept_head: Option<&str>) -> Result<AuditVerification, StoreError> {
        self.with(|c| {
            let mut v = AuditVerification {
                records: 0,
                ok: true,
                first_broken: None,
                problem: None,
                head: None,
                head_seq: None,
                pruned_through: None,
                kept_head: kept_head.map(str::to_string),
                kept_head_seq: None,
            };
            // Where the chain must start: after what the newest retention record pruned.
            let prune: Option<(i64, String)> = c
                .query_row(
                    "SELECT seq, detail FROM audit WHERE action = ?1 AND actor = ?2 ORDER BY seq DESC LIMIT 1",
                    [PRUNE_ACTION, RETENTION_ACTOR],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let (first_seq, first_prev) = match &prune {
                None => (1, GENESIS.to_string()),
                Some((seq, detail)) => match serde_json::from_str(detail).ok().as_ref().and_then(prune_range) {
                    Some((_, last_seq, last_hash)) => {
                        v.pruned_through = Some(last_seq);
                        (last_seq + 1, last_hash)
                    }
                    None => {
                        v.ok = false;
                        v.first_broken = Some(*seq);
                        v.problem = Some("this retention record does not say what it pruned (it was edited)".into());
                        return Ok(v);
                    }
                },
            };
            let mut st = c.prepare("SELECT seq, time, actor, action, sandbox, detail, prev_hash, hash FROM audit ORDER BY seq")?;
            let mut rows = st.query([])?;
            let mut expected_prev = first_prev;
            let mut expected_seq = first_seq;
            while let Some(r) = rows.next()? {
                let rec = finish_audit(audit_row(r)?);
                v.records += 1;
                let problem = if rec.seq != expected_seq {
                    Some(if v.records == 1 && rec.seq > expected_seq {
                        if prune.is_some() {
                            format!("records {expected_seq} to {} are missing: the newest retention record pruned only up to {}", rec.seq - 1, expected_seq - 1)
                        } else {
                            format!("records {expected_seq} to {} are missing and no retention record accounts for them", rec.seq - 1)
                        }
                    } else if rec.seq > expected_seq {
                        format!("record {expected_seq} is missing (the next one is {})", rec.seq)
                    } else {
                        format!("record {} should not be there: retention pruned up to {}", rec.seq, expected_seq - 1)
                    })
                } else if rec.prev_hash != expected_prev {
                    Some(if v.records == 1 {
                        "its link does not match the last record retention pruned (the oldest records were replaced)".into()
                    } else {
                        "its link to the previous record does not match (a record before it was removed or changed)".into()
                    })
                } else if audit_hash(rec.seq, rec.time, &rec.actor, &rec.action, rec.sandbox.as_deref(), &rec.detail, &rec.prev_hash) != rec.hash {
                    Some("its content does not match its hash (it was edited)".into())
                } else {
                    None
                };
                if let Some(p) = problem {
                    v.ok = false;
                    v.first_broken = Some(rec.seq);
                    v.problem = Some(p);
                    return Ok(v);
                }
                if kept_head == Some(rec.hash.as_str()) {
                    v.kept_head_seq = Some(rec.seq);
                }
                // A retention record in the (verified) chain vouches for the last record it pruned.
                if v.kept_head_seq.is_none()
                    && rec.action == PRUNE_ACTION
                    && rec.actor == RETENTION_ACTOR
                    && let Some((_, last_seq, last_hash)) = prune_range(&rec.detail)
                    && kept_head == Some(last_hash.as_str())
                {
                    v.kept_head_seq = Some(last_seq);
                }
                expected_prev = rec.hash.clone();
                expected_seq = rec.seq + 1;
            }
            if v.records == 0 && prune.is_none() {
                let anchor: Option<String> = c.query_row("SELECT value FROM meta WHERE key = 'audit_anchor'", [], |r| r.get(0)).optional()?;
                if anchor.is_some() {
                    v.ok = false;
                    v.problem = Some("the log is empty, yet retention pruned it before: its records were removed".into());
                    return Ok(v);
                }
            }
            if v.records > 0 {
                v.head = Some(expected_prev);
                v.head_seq = Some(expected_seq - 1);
            }
            if let Some(h) = kept_head
                && v.kept_head_seq.is_none()
            {
                v.ok = false;
                v.problem = Some(format!(
                    "the kept head {h} is not in the chain: records up to it were removed or rewritten, the log was cut after it, or retention pruned it (after a retention, keep the new head)"
                ));
            }
            Ok(v)
        })
    }

    /// Deletes the oldest audit records, every one up to the newest older than `before_ms`
    /// (a prefix of the chain, whatever the clock did), and appends a retention record saying
    /// what went, in one transaction. The oldest kept record links to the last pruned one,
    /// whose hash the retention record names, so the rest still verifies and a cut that
    /// retention did not make does not.
    pub fn prune_audit(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let last: Option<(i64, String)> = tx
                .query_row("SELECT seq, hash FROM audit WHERE time < ?1 ORDER BY seq DESC LIMIT 1", [before_ms], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((last_seq, last_hash)) = last else { return Ok(0) };
            let first_seq: i64 = tx.query_row("SELECT MIN(seq) FROM audit", [], |r| r.get(0))?;
            let n = tx.execute("DELETE FROM audit WHERE seq <= ?1", [last_seq])?;
            tx.execute("INSERT INTO meta (key, value) VALUES ('audit_anchor', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value", [&last_hash])?;
            let detail = serde_json::json!({
                "pruned": n,
                "first_seq": first_seq,
                "last_seq": last_seq,
                "last_hash": last_hash,
                "older_than": before_ms,
            });
            append_in(&tx, RETENTION_ACTOR, PRUNE_ACTION, None, &detail, Some((last_seq, &last_hash)))?;
            tx.commit()?;
            Ok(n as u64)
        })
    }

    /// A database from before retention recorded itself: if records were pruned (an anchor
    /// exists and the chain does not start at 1), a retention record naming the anchor is
    /// appended once, at the upgrade, so the chain verifies from then on. (It vouches for
    /// whatever cut existed at that moment.)
    pub(crate) fn record_legacy_prune(&self) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let anchor: Option<String> = tx
                .query_row(
                    "SELECT value FROM meta WHERE key = 'audit_anchor'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(anchor) = anchor else { return Ok(()) };
            let recorded: Option<i64> = tx
                .query_row(
                    "SELECT seq FROM audit WHERE action = ?1 LIMIT 1",
                    [PRUNE_ACTION],
                    |r| r.get(0),
                )
                .optional()?;
            if recorded.is_some() {
                return Ok(());
            }
            let first: Option<i64> =
                tx.query_row("SELECT MIN(seq) FROM audit", [], |r| r.get(0))?;
            // (Before, an append to an emptied table started again at seq 1.)
            let last_seq = first.map_or(0, |f| f - 1);
            let detail = serde_json::json!({
                "pruned": serde_json::Value::Null,
                "first_seq": 1,
                "last_seq": last_seq,
                "last_hash": anchor,
                "legacy": true,
            });
            append_in(&tx, RETENTION_ACTOR, PRUNE_ACTION, None, &detail, None)?;
            tx.commit()?;
            Ok(())
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
    fn audit_pages_by_sequence() {
        let s = Store::open_in_memory().unwrap();
        for i in 0..10 {
            let sb = if i % 2 == 0 { "a" } else { "b" };
            s.append_audit("root", "exec", Some(sb), &serde_json::json!({"n": i}))
                .unwrap();
        }
        let seqs = |v: Vec<AuditRecord>| v.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(s.audit_page(None, None, Some(3), None, false, 3).unwrap()),
            [4, 5, 6]
        );
        assert_eq!(
            seqs(s.audit_page(None, None, None, Some(9), true, 2).unwrap()),
            [8, 7]
        );
        assert_eq!(
            seqs(
                s.audit_page(Some("a"), None, Some(4), Some(10), false, 9)
                    .unwrap()
            ),
            [5, 7, 9]
        );
    }

    #[test]
    fn audit_chain_detects_edits_and_removals() {
        let s = Store::open_in_memory().unwrap();
        for i in 0..5 {
            s.append_audit("root", "exec", Some("dev"), &serde_json::json!({"n": i}))
                .unwrap();
        }
        assert!(s.verify_audit(None).unwrap().ok);
        s.with(|c| Ok(c.execute("UPDATE audit SET detail = '{\"n\":99}' WHERE seq = 3", [])?))
            .unwrap();
        let v = s.verify_audit(None).unwrap();
        assert_eq!((v.ok, v.first_broken), (false, Some(3)));
        s.with(|c| Ok(c.execute("UPDATE audit SET detail = '{\"n\":2}' WHERE seq = 3", [])?))
            .unwrap();
        assert!(s.verify_audit(None).unwrap().ok);
        s.with(|c| Ok(c.execute("DELETE FROM audit WHERE seq = 2", [])?))
            .unwrap();
        let v = s.verify_audit(None).unwrap();
        assert_eq!((v.ok, v.first_broken), (false, Some(3)));
    }

    #[test]
    fn pruning_keeps_the_chain_verifiable() {
        let s = Store::open_in_memory().unwrap();
        for _ in 0..3 {
            s.append_audit("root", "a", None, &serde_json::json!({}))
                .unwrap();
        }
        let third = s.audit(None, None, 10).unwrap()[2].hash.clone();
        assert_eq!(s.prune_audit(now_ms() + 1000).unwrap(), 3);
        s.append_audit("root", "b", None, &serde_json::json!({}))
            .unwrap();
        let v = s.verify_audit(None).unwrap();
        assert!(v.ok && v.records == 2, "{v:?}");
        assert_eq!((v.pruned_through, v.head_seq), (Some(3), Some(5)));
        let kept = s.audit(None, None, 10).unwrap();
        assert_eq!(kept[0].action, PRUNE_ACTION);
        assert_eq!(kept[0].detail["pruned"], 3);
        assert_eq!(kept[0].detail["last_hash"], third.as_str());
        // A head kept before the retention is still vouched for by its record.
        let v = s.verify_audit(Some(&third)).unwrap();
        assert_eq!((v.ok, v.kept_head_seq), (true, Some(3)), "{v:?}");
    }

    fn chain(n: usize) -> (Store, Vec<AuditRecord>) {
        let s = Store::open_in_memory().unwrap();
        for i in 0..n {
            s.append_audit("root", "exec", Some("dev"), &serde_json::json!({"n": i}))
                .unwrap();
        }
        let recs = s.audit(None, None, 100_000).unwrap();
        (s, recs)
    }

    fn sql(s: &Store, q: &str, p: impl rusqlite::Params) {
        s.with(|c| Ok(c.execute(q, p)?)).unwrap();
    }

    #[test]
    fn cutting_the_oldest_records_and_moving_the_anchor_is_found() {
        for cut in [1usize, 5, 70, 99] {
            let (s, recs) = chain(100);
            sql(&s, "DELETE FROM audit WHERE seq <= ?1", [cut as i64]);
            sql(
                &s,
                "INSERT INTO meta (key, value) VALUES ('audit_anchor', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [&recs[cut - 1].hash],
            );
            let v = s.verify_audit(None).unwrap();
            assert!(!v.ok, "cut {cut}: {v:?}");
            assert_eq!(v.first_broken, Some(cut as i64 + 1));
        }
        // After a real retention, a further cut is found as well.
        let (s, _) = chain(100);
        sql(&s, "UPDATE audit SET time = 0 WHERE seq <= 30", []);
        assert_eq!(s.prune_audit(1).unwrap(), 30);
        assert!(s.verify_audit(None).unwrap().ok);
        let recs = s.audit(None, None, 1000).unwrap();
        for cut in [31i64, 40, 99] {
            let s2 = Store::open_in_memory().unwrap();
            s2.with(|c| {
                c.execute("DELETE FROM audit", [])?;
                for r in &recs {
                    c.execute(
                        "INSERT INTO audit (seq, time, actor, action, sandbox, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        params![r.seq, r.time, r.actor, r.action, r.sandbox, r.detail.to_string(), r.prev_hash, r.hash],
                    )?;
                }
                Ok(())
            })
            .unwrap();
            assert!(s2.verify_audit(None).unwrap().ok);
            let anchor = recs.iter().find(|r| r.seq == cut).unwrap().hash.clone();
            sql(&s2, "DELETE FROM audit WHERE seq <= ?1", [cut]);
            sql(
                &s2,
                "INSERT INTO meta (key, value) VALUES ('audit_anchor', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [&anchor],
            );
            let v = s2.verify_audit(None).unwrap();
            assert!(!v.ok, "cut {cut}: {v:?}");
        }
        // Removing the retention record itself (at the end of the chain) is found too.
        let (s3, _) = chain(3);
        sql(&s3, "UPDATE audit SET time = 0 WHERE seq <= 2", []);
        s3.prune_audit(1).unwrap();
        assert!(s3.verify_audit(None).unwrap().ok);
        sql(&s3, "DELETE FROM audit WHERE action = 'audit.prune'", []);
        assert!(!s3.verify_audit(None).unwrap().ok);
    }

    #[test]
    fn a_kept_head_shows_rewrites_and_cuts_at_the_end() {
        let (s, recs) = chain(10);
        let v = s.verify_audit(None).unwrap();
        let head = v.head.clone().unwrap();
        assert_eq!((v.ok, v.head_seq), (true, Some(10)));
        s.append_audit("root", "exec", None, &serde_json::json!({}))
            .unwrap();
        let v = s.verify_audit(Some(&head)).unwrap();
        assert_eq!((v.ok, v.kept_head_seq), (true, Some(10)), "{v:?}");
        // A wrong head fails.
        let wrong = recs[3].hash.replace(&recs[3].hash[..4], "0000");
        let v = s.verify_audit(Some(&wrong)).unwrap();
        assert!(!v.ok && v.problem.unwrap().contains("not in the chain"));
        // Cut the end (the head's record and after): the chain alone holds, the head does not.
        sql(&s, "DELETE FROM audit WHERE seq >= 10", []);
        assert!(s.verify_audit(None).unwrap().ok);
        assert!(!s.verify_audit(Some(&head)).unwrap().ok);
        // A consistent rewrite of the whole chain: only the kept head shows it.
        let (s, _) = chain(10);
        let head = s.verify_audit(None).unwrap().head.unwrap();
        let forged = Store::open_in_memory().unwrap();
        for i in 0..10 {
            forged
                .append_audit(
                    "root",
                    "exec",
                    Some("dev"),
                    &serde_json::json!({"n": i, "x": 1}),
                )
                .unwrap();
        }
        assert!(forged.verify_audit(None).unwrap().ok);
        assert!(!forged.verify_audit(Some(&head)).unwrap().ok);
    }

    #[test]
    fn an_upgraded_database_with_an_anchor_gets_one_retention_record() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state.db");
        let anchor;
        {
            let s = Store::open(&path).unwrap();
            for _ in 0..5 {
                s.append_audit("root", "a", None, &serde_json::json!({}))
                    .unwrap();
            }
            anchor = s.audit(None, None, 10).unwrap()[1].hash.clone();
            // As the old retention left it: records 1-2 gone, the anchor on record 2.
            sql(&s, "DELETE FROM audit WHERE seq <= 2", []);
            sql(
                &s,
                "INSERT INTO meta (key, value) VALUES ('audit_anchor', ?1)",
                [&anchor],
            );
            assert!(!s.verify_audit(None).unwrap().ok);
            // The schema of version 4: without migrations 5 and 6.
            s.with(|c| {
                Ok(c.execute_batch(
                    "DROP INDEX audit_by_action;
                     ALTER TABLE sandboxes DROP COLUMN backend;
                     ALTER TABLE sandboxes RENAME COLUMN handle TO cgroup;
                     PRAGMA user_version = 4;",
                )?)
            })
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let v = s.verify_audit(None).unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.pruned_through, Some(2));
        // Only once: a later cut is not blessed by reopening.
        drop(s);
        let s = Store::open(&path).unwrap();
        sql(&s, "DELETE FROM audit WHERE seq <= 3", []);
        drop(s);
        let s = Store::open(&path).unwrap();
        assert!(!s.verify_audit(None).unwrap().ok);
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
