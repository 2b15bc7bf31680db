//! Who asks: the [`Caller`] every engine method that records something takes. Its name is
//! what audit records, approvals and exec records carry (`root`, or `root for NAME`); the
//! engine's own work runs as a named system caller ([`Caller::system`]).

/// Who calls the engine: the name its audit records, approvals and exec records carry
/// (`root`, `root for alice`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    name: String,
}

impl Caller {
    /// A caller of this name.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    /// The caller of a local user (`user`), acting for someone it names (`root for alice`).
    pub fn on_behalf(user: &str, of: Option<&str>) -> Self {
        match of {
            Some(who) if !who.is_empty() => Self::new(format!("{user} for {who}")),
            _ => Self::new(user),
        }
    }

    /// The engine itself, doing background work named `what` (`timeout`: approvals that
    /// expired; `local`: start-up reconciliation).
    pub fn system(what: &'static str) -> Self {
        Self::new(what)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}
