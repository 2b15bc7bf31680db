//! Approvals: commands a policy holds for a decision; someone approves or denies them, or
//! they expire (counting as denied).

use std::sync::Arc;
use std::time::Duration;

use devbox_store::{ApprovalState, now_ms};
pub use devbox_wire::ApprovalInfo;

use crate::{Caller, Engine, EngineError, Result};

/// Who expires approvals nobody decided in time.
const EXPIRY: &str = "timeout";

impl Engine {
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
                    Some(EXPIRY),
                    None,
                )?
            {
                self.audit(
                    &Caller::system(EXPIRY),
                    "approval.expire",
                    Some(&a.sandbox),
                    serde_json::json!({"approval": a.id, "command": a.command}),
                );
                self.approval_changed();
            }
        }
        Ok(())
    }

    /// Approves or denies a pending approval; records who did (`caller`).
    pub async fn decide(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        approve: bool,
        reason: Option<String>,
    ) -> Result<ApprovalInfo> {
        let id = id.to_string();
        let caller = caller.clone();
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
            if !e.store.decide_approval(
                &id,
                ApprovalState::Pending,
                to,
                Some(caller.name()),
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
                &caller,
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
    pub async fn withdraw_approval(self: &Arc<Self>, caller: &Caller, id: &str) -> Result<()> {
        let id = id.to_string();
        let caller = caller.clone();
        self.blocking(move |e| {
            if e.store.decide_approval(&id, ApprovalState::Pending, ApprovalState::Withdrawn, None, Some("the requester left"))? {
                let a = e.store.approval(&id)?;
                e.audit(
                    &caller,
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

    pub(crate) fn approval_changed(&self) {
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
}
