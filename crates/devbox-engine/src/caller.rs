//! Who asks: the caller of the current request, task or engine thread, recorded in audit
//! records and approvals (`root`, or `root for NAME`; `local` when unknown).

use std::cell::RefCell;

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
