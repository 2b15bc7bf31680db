//! Conversions from the types of the crates below the engine (store, storage, runtime, command
//! checks) into the wire model ([`devbox_wire`]) that the engine's callers speak.

use devbox_wire as wire;

use crate::Engine;
use crate::model::rfc3339;

/// A sandbox's lifecycle state.
pub(crate) fn sandbox_state(s: devbox_store::SandboxState) -> wire::SandboxState {
    use devbox_store::SandboxState as S;
    match s {
        S::Creating => wire::SandboxState::Creating,
        S::Running => wire::SandboxState::Running,
        S::Stopped => wire::SandboxState::Stopped,
        S::Destroying => wire::SandboxState::Destroying,
        S::Broken => wire::SandboxState::Broken,
    }
}

/// A sandbox's resource use.
pub(crate) fn usage(u: devbox_backend::Usage) -> wire::Usage {
    wire::Usage {
        memory_bytes: u.memory_bytes,
        pids: u.pids,
        cpu_usec: u.cpu_usec,
        oom_kills: u.oom_kills,
    }
}

/// One changed path of a diff.
pub(crate) fn change(c: devbox_storage::layers::Change) -> wire::Change {
    use devbox_storage::layers::ChangeKind as K;
    wire::Change {
        kind: match c.kind {
            K::Added => wire::ChangeKind::Added,
            K::Modified => wire::ChangeKind::Modified,
            K::Deleted => wire::ChangeKind::Deleted,
        },
        path: c.path,
        size: c.size,
        dir: c.dir,
    }
}

/// Where an approval stands.
pub(crate) fn approval_state(s: devbox_store::ApprovalState) -> wire::ApprovalState {
    use devbox_store::ApprovalState as S;
    match s {
        S::Pending => wire::ApprovalState::Pending,
        S::Approved => wire::ApprovalState::Approved,
        S::Denied => wire::ApprovalState::Denied,
        S::Expired => wire::ApprovalState::Expired,
        S::Used => wire::ApprovalState::Used,
        S::Withdrawn => wire::ApprovalState::Withdrawn,
    }
}

/// An approval, as the API shows it.
pub(crate) fn approval(a: devbox_store::ApprovalRecord) -> wire::ApprovalInfo {
    wire::ApprovalInfo {
        id: a.id,
        sandbox: a.sandbox,
        command: a.command,
        reasons: a.reasons,
        risk: a.risk,
        state: approval_state(a.state),
        requested_by: a.requested_by,
        decided_by: a.decided_by,
        reason: a.reason,
        created_at: rfc3339(a.created_at),
        expires_at: rfc3339(a.expires_at),
    }
}

fn verdict(v: devbox_safety::Verdict) -> wire::Verdict {
    use devbox_safety::Verdict as V;
    match v {
        V::Allow => wire::Verdict::Allow,
        V::RequireApproval => wire::Verdict::RequireApproval,
        V::Deny => wire::Verdict::Deny,
    }
}

fn risk(r: devbox_safety::Risk) -> wire::Risk {
    use devbox_safety::Risk as R;
    match r {
        R::None => wire::Risk::None,
        R::Low => wire::Risk::Low,
        R::Medium => wire::Risk::Medium,
        R::High => wire::Risk::High,
        R::Critical => wire::Risk::Critical,
    }
}

fn invocation(i: devbox_safety::Invocation) -> wire::Invocation {
    wire::Invocation {
        program: i.program,
        path: i.path,
        args: i.args,
        redirects: i
            .redirects
            .into_iter()
            .map(|r| wire::Redirect {
                fd: r.fd,
                op: r.op,
                target: r.target,
            })
            .collect(),
        via: i.via,
        dynamic: i.dynamic,
        background: i.background,
        pipeline: i.pipeline,
        position: i.position,
        pipeline_len: i.pipeline_len,
        code: i.code,
        substitutions: i.substitutions,
        function: i.function,
    }
}

/// What the command checks decided, and why.
pub(crate) fn check(c: devbox_safety::Check) -> wire::Check {
    wire::Check {
        decision: verdict(c.decision),
        risk: risk(c.risk),
        reasons: c.reasons,
        findings: c
            .findings
            .into_iter()
            .map(|f| wire::Finding {
                rule: f.rule,
                risk: risk(f.risk),
                command: f.command,
                reason: f.reason,
            })
            .collect(),
        commands: c.commands.into_iter().map(invocation).collect(),
        policies: c
            .policies
            .into_iter()
            .map(|p| wire::PolicyVerdict {
                policy: p.policy,
                decision: verdict(p.decision),
                reasons: p.reasons,
            })
            .collect(),
    }
}

/// One audit record.
pub(crate) fn audit_record(r: devbox_store::AuditRecord) -> wire::AuditRecord {
    wire::AuditRecord {
        seq: r.seq,
        time: r.time,
        actor: r.actor,
        action: r.action,
        sandbox: r.sandbox,
        detail: r.detail,
        prev_hash: r.prev_hash,
        hash: r.hash,
    }
}

/// What a verification of the audit chain found.
pub(crate) fn audit_verification(v: devbox_store::AuditVerification) -> wire::AuditVerification {
    wire::AuditVerification {
        records: v.records,
        ok: v.ok,
        first_broken: v.first_broken,
        problem: v.problem,
        head: v.head,
        head_seq: v.head_seq,
        pruned_through: v.pruned_through,
        kept_head: v.kept_head,
        kept_head_seq: v.kept_head_seq,
    }
}

impl Engine {
    /// Size and use of the storage pool, as the API shows it.
    pub fn pool_status(&self) -> wire::PoolInfo {
        let p = self.pool_info();
        wire::PoolInfo {
            driver: p.driver,
            path: p.path,
            loop_file: p.loop_file,
            total_bytes: p.total_bytes,
            used_bytes: p.used_bytes,
            free_bytes: p.free_bytes,
        }
    }
}
