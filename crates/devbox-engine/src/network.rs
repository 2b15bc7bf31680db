//! A sandbox's network, as the engine sees it: the rules in force (the spec's, or the live
//! ones `sandbox network allow|deny` set, kept in the store apart from the spec so that a
//! reset goes back to the spec's), their changes (audited as `network.allow`,
//! `network.deny`, `network.reset`), what the policies' input says about the network, and
//! the blocked attempts (audited as `network.blocked`, read back by `sandbox network log`).

use std::sync::Arc;

use devbox_spec::{NetRule, NetworkMode, NetworkSpec};
use devbox_store::SandboxRecord;
use devbox_wire::{BlockedAttempt, NetworkCounters, NetworkInfo};
use serde::{Deserialize, Serialize};

use crate::model::rfc3339;
use crate::{Engine, EngineError, Result};

/// The audit action of blocked attempts.
pub(crate) const BLOCKED_ACTION: &str = "network.blocked";
/// Most rules a sandbox may have (allow and deny together): beyond this, the rule set is a
/// list of addresses that belongs in a CIDR.
pub(crate) const MAX_RULES: usize = 1024;
/// Most blocked-attempt records per sandbox and round of bookkeeping; the rest are counted
/// in one summary record.
pub(crate) const MAX_BLOCKED_RECORDS: usize = 20;

/// Who the audit log says recorded a blocked attempt.
pub(crate) const BLOCKED_ACTOR: &str = "network";

/// One blocked attempt, as the data plane reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Blocked {
    /// The sandbox's id.
    pub sandbox_id: String,
    /// `dns` or `connect`.
    pub kind: &'static str,
    /// The name, or `address:port`, tried.
    pub target: String,
}

/// Live rules (the store's `network_rules` row, JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LiveRules {
    pub allow: Vec<NetRule>,
    pub deny: Vec<NetRule>,
}

/// Which list a live change adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Allow,
    Deny,
}

impl Change {
    fn action(self) -> &'static str {
        match self {
            Self::Allow => "network.allow",
            Self::Deny => "network.deny",
        }
    }
}

/// Parses rules given on a request; the first bad one is the error.
fn parse_rules(rules: &[String]) -> Result<Vec<NetRule>> {
    if rules.is_empty() {
        return Err(EngineError::InvalidRequest(
            "no rule given: name at least one, such as pypi.org or 10.1.2.0/24:443".into(),
        ));
    }
    rules
        .iter()
        .map(|r| NetRule::parse(r).map_err(EngineError::InvalidRequest))
        .collect()
}

/// `spec` with `change` applied: the rules join their list (once) and leave the other one.
/// Errors (nothing changes) when the mode has no use for them.
pub(crate) fn apply_change(
    name: &str,
    spec: &NetworkSpec,
    change: Change,
    rules: &[NetRule],
) -> Result<LiveRules> {
    let text = || {
        rules
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    match (spec.mode, change) {
        (NetworkMode::None, _) => {
            return Err(EngineError::WrongState(format!(
                "sandbox {name} has network mode none (loopback only): there is no egress to \
                 change; make a sandbox with --network allow (or --network open) for rules"
            )));
        }
        (NetworkMode::Open, Change::Allow) if !rules.iter().all(|r| spec.deny.contains(r)) => {
            return Err(EngineError::InvalidRequest(format!(
                "sandbox {name} has network mode open, which allows everything not denied: \
                 allowing {} only undoes deny rules, and these are not all denied \
                 (see `sandbox network {name}`)",
                text()
            )));
        }
        _ => {}
    }
    let mut live = LiveRules {
        allow: spec.allow.clone(),
        deny: spec.deny.clone(),
    };
    let (add, remove) = match change {
        Change::Allow => (&mut live.allow, &mut live.deny),
        Change::Deny => (&mut live.deny, &mut live.allow),
    };
    remove.retain(|r| !rules.contains(r));
    // In open mode an allow only undoes a deny; everything else is allowed already.
    if !(spec.mode == NetworkMode::Open && change == Change::Allow) {
        for r in rules {
            if !add.contains(r) {
                add.push(r.clone());
            }
        }
    }
    if live.allow.len() + live.deny.len() > MAX_RULES {
        return Err(EngineError::InvalidRequest(format!(
            "a sandbox has at most {MAX_RULES} rules: join addresses into networks \
             (10.1.2.0/24) or names under a wildcard (*.example.com)"
        )));
    }
    Ok(live)
}

fn strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

impl Engine {
    /// The network in force for a sandbox: its spec's, with the live rules if any.
    pub(crate) fn network_in_force(&self, rec: &SandboxRecord) -> Result<NetworkSpec> {
        let mut net = Self::manifest_of(rec)?.spec.network;
        if let Some(json) = self.store.network_rules(&rec.id)? {
            let live: LiveRules = serde_json::from_str(&json)
                .map_err(|e| EngineError::internal("stored network rules", e))?;
            net.allow = live.allow;
            net.deny = live.deny;
        }
        Ok(net)
    }

    /// The network as the policies' input shows it (`input.sandbox.network`): mode, rules
    /// in force and published ports, as text.
    pub(crate) fn network_input(&self, rec: &SandboxRecord) -> serde_json::Value {
        match self.network_in_force(rec) {
            Ok(n) => serde_json::json!({
                "mode": n.mode.as_str(),
                "allow": strings(&n.allow),
                "deny": strings(&n.deny),
                "ports": strings(&n.ports),
            }),
            // Unknown rules check as the strictest network: nothing allowed.
            Err(_) => serde_json::json!({"mode": "none", "allow": [], "deny": [], "ports": []}),
        }
    }

    /// Gives a new sandbox (a clone) the live rules of the one it comes from.
    pub(crate) fn copy_network_rules(&self, from_id: &str, to_id: &str) -> Result<()> {
        if let Some(json) = self.store.network_rules(from_id)? {
            self.store.set_network_rules(to_id, Some(&json))?;
        }
        Ok(())
    }

    fn network_info(&self, rec: &SandboxRecord) -> Result<NetworkInfo> {
        let spec = Self::manifest_of(rec)?.spec.network;
        let net = self.network_in_force(rec)?;
        Ok(NetworkInfo {
            sandbox: rec.name.clone(),
            mode: net.mode.as_str().into(),
            allow: strings(&net.allow),
            deny: strings(&net.deny),
            ports: strings(&net.ports),
            changed: net.allow != spec.allow || net.deny != spec.deny,
            address: None,
            attached: false,
            counters: NetworkCounters::default(),
            allowed_now: Vec::new(),
        })
    }

    /// A sandbox's network: mode, rules in force, ports, address and counters.
    pub async fn network_status(self: &Arc<Self>, name: &str) -> Result<NetworkInfo> {
        let name = name.to_string();
        self.blocking(move |e| {
            let rec = e.record(&name)?;
            e.network_info(&rec)
        })
        .await
    }

    /// Allows more egress, live; kept in the sandbox's record.
    pub async fn network_allow(
        self: &Arc<Self>,
        name: &str,
        rules: Vec<String>,
    ) -> Result<NetworkInfo> {
        self.network_change(name, Change::Allow, rules).await
    }

    /// Denies egress, live; kept in the sandbox's record.
    pub async fn network_deny(
        self: &Arc<Self>,
        name: &str,
        rules: Vec<String>,
    ) -> Result<NetworkInfo> {
        self.network_change(name, Change::Deny, rules).await
    }

    async fn network_change(
        self: &Arc<Self>,
        name: &str,
        change: Change,
        rules: Vec<String>,
    ) -> Result<NetworkInfo> {
        let detail = serde_json::json!({"rules": rules});
        self.on_sandbox(name, change.action(), detail, move |e, rec| {
            let parsed = parse_rules(&rules)?;
            let net = e.network_in_force(rec)?;
            let live = apply_change(&rec.name, &net, change, &parsed)?;
            let json =
                serde_json::to_string(&live).map_err(|e| EngineError::internal("rules", e))?;
            e.store.set_network_rules(&rec.id, Some(&json))?;
            if let Err(err) = e.apply_network_rules(rec) {
                // The rules stay recorded and apply at the next start; say so.
                tracing::warn!(sandbox = %rec.name, "applying network rules: {err}");
                return Err(err);
            }
            e.network_info(rec)
        })
        .await
    }

    /// Drops the live rules: the spec's apply again.
    pub async fn network_reset(self: &Arc<Self>, name: &str) -> Result<NetworkInfo> {
        self.on_sandbox(name, "network.reset", serde_json::json!({}), |e, rec| {
            e.store.set_network_rules(&rec.id, None)?;
            e.apply_network_rules(rec)?;
            e.network_info(rec)
        })
        .await
    }

    /// Blocked attempts of a sandbox, oldest first (the newest `limit`).
    pub async fn network_log(
        self: &Arc<Self>,
        name: &str,
        limit: Option<usize>,
    ) -> Result<Vec<BlockedAttempt>> {
        let name = name.to_string();
        let limit = limit.unwrap_or(100).clamp(1, 10_000);
        self.blocking(move |e| {
            let rec = e.record(&name)?;
            let records =
                e.store
                    .audit_of_action(&rec.name, BLOCKED_ACTION, rec.created_at, limit)?;
            Ok(records
                .into_iter()
                .map(|r| BlockedAttempt {
                    time: rfc3339(r.time),
                    kind: r.detail["kind"].as_str().unwrap_or("unknown").to_string(),
                    target: r.detail["target"].as_str().unwrap_or_default().to_string(),
                    count: r.detail["count"].as_u64().unwrap_or(1),
                })
                .collect())
        })
        .await
    }

    /// Records blocked attempts (from the data plane) in the audit log as `network.blocked`
    /// with the name or address tried: attempts at the same target are counted in one
    /// record, and beyond [`MAX_BLOCKED_RECORDS`] targets per sandbox in one round, the rest
    /// in one summary, so that a sandbox trying many names cannot flood the log.
    pub(crate) fn record_blocked(&self, attempts: Vec<Blocked>) {
        if attempts.is_empty() {
            return;
        }
        let names: std::collections::HashMap<String, String> = match self.store.sandboxes() {
            Ok(recs) => recs.into_iter().map(|r| (r.id, r.name)).collect(),
            Err(e) => {
                tracing::warn!("recording blocked attempts: {e}");
                return;
            }
        };
        // (sandbox id, kind, target) -> count, in the order first seen.
        let mut grouped: Vec<(Blocked, u64)> = Vec::new();
        for a in attempts {
            match grouped.iter_mut().find(|(g, _)| {
                g.sandbox_id == a.sandbox_id && g.kind == a.kind && g.target == a.target
            }) {
                Some((_, n)) => *n += 1,
                None => grouped.push((a, 1)),
            }
        }
        let mut per_sandbox: std::collections::HashMap<&str, (usize, u64)> = Default::default();
        let mut overflow: Vec<(&str, usize, u64)> = Vec::new();
        for (a, count) in &grouped {
            let Some(name) = names.get(&a.sandbox_id) else {
                continue; // destroyed meanwhile
            };
            let seen = per_sandbox.entry(&a.sandbox_id).or_default();
            seen.0 += 1;
            if seen.0 > MAX_BLOCKED_RECORDS {
                seen.1 += count;
                continue;
            }
            crate::caller::with_actor(BLOCKED_ACTOR.into(), || {
                self.audit(
                    BLOCKED_ACTION,
                    Some(name),
                    serde_json::json!({"kind": a.kind, "target": a.target, "count": count}),
                )
            });
        }
        for (id, (targets, count)) in &per_sandbox {
            if *targets > MAX_BLOCKED_RECORDS {
                overflow.push((id, targets - MAX_BLOCKED_RECORDS, *count));
            }
        }
        for (id, targets, count) in overflow {
            let Some(name) = names.get(id) else { continue };
            crate::caller::with_actor(BLOCKED_ACTOR.into(), || {
                self.audit(
                    BLOCKED_ACTION,
                    Some(name),
                    serde_json::json!({"kind": "more", "target": format!("{targets} more targets"), "count": count}),
                )
            });
        }
    }

    /// Applies the rules in force to a running sandbox's network (the data plane).
    fn apply_network_rules(&self, _rec: &SandboxRecord) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(t: &[&str]) -> Vec<NetRule> {
        t.iter().map(|r| NetRule::parse(r).unwrap()).collect()
    }

    fn spec(mode: NetworkMode, allow: &[&str], deny: &[&str]) -> NetworkSpec {
        NetworkSpec {
            mode,
            allow: rules(allow),
            deny: rules(deny),
            ports: Vec::new(),
        }
    }

    #[test]
    fn changes_move_rules_between_lists() {
        let s = spec(NetworkMode::Allow, &["pypi.org"], &["bad.org"]);
        let l = apply_change("d", &s, Change::Allow, &rules(&["bad.org", "x.org"])).unwrap();
        assert_eq!(l.allow, rules(&["pypi.org", "bad.org", "x.org"]));
        assert!(l.deny.is_empty());
        let l = apply_change("d", &s, Change::Deny, &rules(&["pypi.org"])).unwrap();
        assert!(l.allow.is_empty());
        assert_eq!(l.deny, rules(&["bad.org", "pypi.org"]));
        // Twice is once.
        let l = apply_change("d", &s, Change::Allow, &rules(&["pypi.org"])).unwrap();
        assert_eq!(l.allow, rules(&["pypi.org"]));
    }

    #[test]
    fn modes_refuse_what_they_cannot_use() {
        let none = spec(NetworkMode::None, &[], &[]);
        let e = apply_change("d", &none, Change::Allow, &rules(&["a.b"])).unwrap_err();
        assert!(e.to_string().contains("--network allow"), "{e}");
        assert!(apply_change("d", &none, Change::Deny, &rules(&["a.b"])).is_err());
        let open = spec(NetworkMode::Open, &[], &["a.b"]);
        let e = apply_change("d", &open, Change::Allow, &rules(&["c.d"])).unwrap_err();
        assert!(e.to_string().contains("mode open"), "{e}");
        let l = apply_change("d", &open, Change::Allow, &rules(&["a.b"])).unwrap();
        assert_eq!(l, LiveRules::default());
        let l = apply_change("d", &open, Change::Deny, &rules(&["10.0.0.0/8"])).unwrap();
        assert_eq!(l.deny, rules(&["a.b", "10.0.0.0/8"]));
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(parse_rules(&[]).is_err());
        let e = parse_rules(&["a.b".into(), "10.0.0.1/8".into()]).unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
        let many: Vec<NetRule> = (0..=MAX_RULES)
            .map(|i| NetRule::parse(&format!("h{i}.example.com")).unwrap())
            .collect();
        let s = spec(NetworkMode::Allow, &[], &[]);
        assert!(apply_change("d", &s, Change::Allow, &many).is_err());
    }
}
