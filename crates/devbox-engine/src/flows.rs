//! Flows that front ends share, so that each (REST and WebSocket today; an SDK or MCP server
//! later) only translates its transport: who calls ([`Caller`]), an exec that waits for its
//! approval ([`Engine::exec_approved`]), and a one-shot run ([`Engine::run_create`], then
//! [`OneShot::exec`] and [`OneShot::destroy`]: `sandbox run --rm`).
//!
//! The caller is an explicit argument here, as everywhere in the engine.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use devbox_wire::ApprovalState;

use crate::checks::ApprovalInfo;
use crate::model::{CreateSandboxRequest, ExecRequest, SandboxInfo};
use crate::{Caller, Engine, EngineError, ExecSession, Result};

/// How long an exec waits for its approval at most, in one wait (the approval's own expiry
/// ends it sooner).
const APPROVAL_WAIT: Duration = Duration::from_secs(3600);

/// What a front end does while an exec waits for someone's approval.
pub trait ApprovalWait: Send {
    /// Tells the client that the command waits for `approval`; false when the client is gone.
    fn pending(&mut self, approval: &ApprovalInfo) -> impl Future<Output = bool> + Send;

    /// Resolves once the client has gone away (the approval is then withdrawn).
    fn gone(&mut self) -> impl Future<Output = ()> + Send;

    /// Whether the client only wants to hear of the approval, which stays pending (the
    /// exec then ends with [`EngineError::ApprovalRequired`]; exec again with its id).
    fn leave_pending(&self) -> bool {
        false
    }
}

impl Engine {
    /// Starts a command as [`Engine::exec`] does; when the checks require an approval, tells
    /// the client (`wait`) and waits for the decision (or the approval's expiry, or the client
    /// leaving, which withdraws it), then runs the command if it was approved.
    pub async fn exec_approved(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        mut exec: ExecRequest,
        stdin: bool,
        wait: &mut impl ApprovalWait,
    ) -> Result<ExecSession> {
        let approval = match self.exec(caller, name, &exec, stdin).await {
            Err(EngineError::ApprovalRequired(a)) => a,
            other => return other,
        };
        let id = approval.id.clone();
        if !wait.pending(&approval).await {
            return Err(EngineError::InvalidRequest("the client went away".into()));
        }
        if wait.leave_pending() {
            return Err(EngineError::ApprovalRequired(approval));
        }
        let decided = loop {
            let decided = tokio::select! {
                d = self.wait_approval(&id, APPROVAL_WAIT) => d?,
                () = wait.gone() => {
                    let _ = self.withdraw_approval(caller, &id).await;
                    return Err(EngineError::InvalidRequest("the client went away".into()));
                }
            };
            if decided.state != ApprovalState::Pending {
                break decided;
            }
        };
        if decided.state != ApprovalState::Approved {
            return Err(EngineError::Denied {
                reasons: refusal_reasons(&id, &decided),
            });
        }
        exec.approval = Some(id);
        self.exec(caller, name, &exec, stdin).await
    }

    /// The first step of a one-shot run: creates the sandbox (named `run-` and eight hex
    /// digits unless the request names it) and starts it. Then run the command with
    /// [`OneShot::exec`] and destroy the sandbox with [`OneShot::destroy`].
    pub async fn run_create(
        self: &Arc<Self>,
        caller: &Caller,
        mut sandbox: CreateSandboxRequest,
    ) -> Result<OneShot> {
        let named = sandbox.name.is_some()
            || sandbox
                .manifest
                .as_ref()
                .is_some_and(|m| m.metadata.name.is_some());
        if !named {
            sandbox.name = Some(format!("run-{}", random_suffix()));
        }
        sandbox.start = true;
        let info = self.create_with(caller, sandbox, true).await?;
        Ok(OneShot {
            engine: self.clone(),
            caller: caller.clone(),
            info,
            destroyed: false,
        })
    }
}

/// Why an approval that is not approved refuses its command.
fn refusal_reasons(id: &str, decided: &ApprovalInfo) -> Vec<String> {
    if decided.state == ApprovalState::Expired {
        return vec![format!(
            "approval {id} expired: nobody decided before {}",
            decided.expires_at
        )];
    }
    let state = serde_json::to_string(&decided.state).unwrap_or_default();
    let mut first = format!("approval {id} was {}", state.trim_matches('"'));
    if let Some(by) = &decided.decided_by {
        first.push_str(&format!(" by {by}"));
    }
    let mut reasons = vec![first];
    reasons.extend(decided.reason.clone());
    reasons
}

fn random_suffix() -> String {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A sandbox made for one command (`sandbox run --rm`). Destroy it with
/// [`OneShot::destroy`] once the command ended; one dropped before that is destroyed in the
/// background.
#[derive(Debug)]
pub struct OneShot {
    engine: Arc<Engine>,
    caller: Caller,
    info: SandboxInfo,
    destroyed: bool,
}

impl OneShot {
    /// The sandbox's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The sandbox as created.
    pub fn info(&self) -> &SandboxInfo {
        &self.info
    }

    /// Starts the command ([`Engine::exec_approved`]).
    pub async fn exec(
        &self,
        exec: ExecRequest,
        stdin: bool,
        wait: &mut impl ApprovalWait,
    ) -> Result<ExecSession> {
        self.engine
            .exec_approved(&self.caller, &self.info.name, exec, stdin, wait)
            .await
    }

    /// Destroys the sandbox (at once: the command is over, or abandoned).
    pub async fn destroy(mut self) {
        self.destroyed = true;
        destroy(&self.engine, &self.caller, &self.info.name).await;
    }
}

impl Drop for OneShot {
    fn drop(&mut self) {
        if self.destroyed {
            return;
        }
        let (engine, caller, name) = (
            self.engine.clone(),
            self.caller.clone(),
            self.info.name.clone(),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { destroy(&engine, &caller, &name).await });
        }
    }
}

async fn destroy(engine: &Arc<Engine>, caller: &Caller, name: &str) {
    // The network's kernel objects go in the background: the command is over and the
    // sandbox's record is gone; reconcile removes what a killed daemon left of them.
    if let Err(e) = engine.destroy_with(caller, name, true, false).await {
        tracing::warn!(sandbox = %name, "destroying a run sandbox: {e}");
    }
}
