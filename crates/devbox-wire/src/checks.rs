//! Command checks, policies, approvals and the audit log, as the API shows them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a policy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Run it.
    Allow,
    /// Hold it until someone approves.
    RequireApproval,
    /// Refuse it.
    Deny,
}

/// How risky a finding is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    /// Nothing found.
    None,
    /// Worth knowing.
    Low,
    /// Could do harm.
    Medium,
    /// Likely harmful.
    High,
    /// Destroys or exposes the system.
    Critical,
}

/// One rule's verdict on one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Finding {
    /// Rule id, e.g. `fs.recursive_delete_root`.
    pub rule: String,
    /// Risk level.
    pub risk: Risk,
    /// The command that matched.
    pub command: String,
    /// Why it is risky.
    pub reason: String,
}

/// A redirection of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Redirect {
    /// The file descriptor (none: the operator's default).
    pub fd: Option<u32>,
    /// The operator: `<`, `>`, `>>`, `<>`, `>|`, `<&`, `>&`, `&>`, `&>>`, `<<`, `<<<`.
    pub op: String,
    /// Target file (expanded), or the here-document / here-string text.
    pub target: String,
}

/// One command that would run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Invocation {
    /// The program's name (the last component of its path): `rm`.
    pub program: String,
    /// The program as written, expanded: `/usr/bin/rm`.
    pub path: String,
    /// Its arguments, expanded.
    pub args: Vec<String>,
    /// Its redirections.
    pub redirects: Vec<Redirect>,
    /// The wrappers it was found inside, outermost first: `["sudo", "sh -c"]`.
    pub via: Vec<String>,
    /// Part of the command could not be known statically (an unset variable, a substitution).
    pub dynamic: bool,
    /// Runs in the background (`&`).
    pub background: bool,
    /// Pipeline it belongs to (an index shared by the commands of one pipeline).
    pub pipeline: usize,
    /// Position in its pipeline (0: first).
    pub position: usize,
    /// Commands in its pipeline.
    pub pipeline_len: usize,
    /// Code handed to an interpreter (`python -c CODE`), kept opaque.
    pub code: Option<String>,
    /// Invocations (indexes) from substitutions in its words.
    pub substitutions: Vec<usize>,
    /// Defined inside a function of this name.
    pub function: Option<String>,
}

impl Invocation {
    /// The command as text.
    pub fn display(&self) -> String {
        let mut s = self.path.clone();
        for a in &self.args {
            s.push(' ');
            if a.is_empty() || a.contains(char::is_whitespace) {
                s.push_str(&format!("{a:?}"));
            } else {
                s.push_str(a);
            }
        }
        for r in &self.redirects {
            if r.op != "<<" && r.op != "<<<" {
                s.push_str(&format!(
                    " {}{} {}",
                    r.fd.map(|f| f.to_string()).unwrap_or_default(),
                    r.op,
                    r.target
                ));
            }
        }
        s
    }
}

/// One policy's part in a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyVerdict {
    /// The policy's name.
    pub policy: String,
    /// What it decided.
    pub decision: Verdict,
    /// Its reasons.
    pub reasons: Vec<String>,
}

/// The outcome of a check.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Check {
    /// What to do.
    pub decision: Verdict,
    /// The highest risk found.
    pub risk: Risk,
    /// Why: the policies' reasons.
    pub reasons: Vec<String>,
    /// Every rule that matched.
    pub findings: Vec<Finding>,
    /// The commands found in the text.
    pub commands: Vec<Invocation>,
    /// Each policy's decision.
    pub policies: Vec<PolicyVerdict>,
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

/// An approval, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApprovalInfo {
    /// Id: approve with `sandbox approve ID`.
    pub id: String,
    /// The sandbox.
    pub sandbox: String,
    /// The command.
    pub command: String,
    /// Why approval is needed.
    pub reasons: Vec<String>,
    /// Risk level.
    pub risk: String,
    /// Where it stands.
    pub state: ApprovalState,
    /// Who asked.
    pub requested_by: String,
    /// Who decided.
    pub decided_by: Option<String>,
    /// Why it was denied.
    pub reason: Option<String>,
    /// Asked (RFC 3339).
    pub created_at: String,
    /// Expires (RFC 3339).
    pub expires_at: String,
}

/// A policy, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyInfo {
    /// Name.
    pub name: String,
    /// The sandbox it applies to (none: all).
    pub sandbox: Option<String>,
    /// Rego text.
    pub rego: String,
    /// Added (RFC 3339); empty for the built-in default.
    pub created_at: String,
    /// The built-in default policy.
    pub builtin: bool,
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

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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

/// Check a command.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CheckRequest {
    /// Shell text.
    pub command: String,
    /// The sandbox whose spec, labels and policies apply (none: global policies only).
    #[serde(default)]
    pub sandbox: Option<String>,
    /// A policy to evaluate as if it were installed (for that sandbox, or globally); nothing
    /// is stored. A policy of the same name in that scope is replaced for this check.
    #[serde(default)]
    pub policy: Option<CandidatePolicy>,
}

/// A policy under test.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CandidatePolicy {
    /// Its name.
    pub name: String,
    /// The Rego text.
    pub rego: String,
}

/// Add a policy.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyRequest {
    /// The Rego text; it must define `decision`.
    pub rego: String,
    /// Only for this sandbox (none: global).
    #[serde(default)]
    pub sandbox: Option<String>,
}

/// Deny an approval.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct DenyRequest {
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
}
