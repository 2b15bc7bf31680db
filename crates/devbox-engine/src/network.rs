//! A sandbox's network, as the engine sees it: the rules in force (the spec's, or the live
//! ones `sandbox network allow|deny` set, kept in the store apart from the spec so that a
//! reset goes back to the spec's), their changes (audited as `network.allow`,
//! `network.deny`, `network.reset`), what the policies' input says about the network, and
//! the blocked attempts (audited as `network.blocked`, read back by `sandbox network log`).
//!
//! The data plane is `devbox-net` ([`Networks`]): a sandbox with a network (mode allow or
//! open, or published ports) gets a namespace of its own made before it starts
//! ([`Engine::attach_network`]) and removed when it stops; rule changes reach it live;
//! reconcile re-attaches running sandboxes and removes what no running sandbox owns.

use std::sync::Arc;

use devbox_net::Networks;
use devbox_spec::{NetRule, NetTarget, NetworkMode, NetworkSpec};
use devbox_store::SandboxRecord;
use devbox_wire::{BlockedAttempt, NetworkCounters, NetworkInfo};
use serde::{Deserialize, Serialize};

use crate::model::rfc3339;
use crate::{Caller, Engine, EngineError, Result};

/// The audit action of blocked attempts.
pub(crate) const BLOCKED_ACTION: &str = "network.blocked";
/// Most rules a sandbox may have (allow and deny together), live changes included.
pub(crate) const MAX_RULES: usize = devbox_spec::network::MAX_RULES;
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

/// The daemon's networks, or why there are none (the error a sandbox with a network gets).
pub(crate) type NetHandle = std::result::Result<Arc<Networks>, String>;

/// Audit records of blocked attempts a sandbox may still write: a burst of
/// [`BLOCKED_BURST`], then one per [`BLOCKED_REFILL`]; what is over is summed into one
/// record written when the budget allows. Bounds the log a hostile sandbox can make in total
/// (at most 8,640 records a day after the burst), not only per round.
#[derive(Default)]
pub(crate) struct BlockedBudgets(std::sync::Mutex<std::collections::HashMap<String, Budget>>);

/// Records a sandbox may write at once.
pub(crate) const BLOCKED_BURST: f64 = 200.0;
/// One more record per this long.
pub(crate) const BLOCKED_REFILL: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) struct Budget {
    tokens: f64,
    at: std::time::Instant,
    /// Targets and attempts not recorded one by one yet.
    held_targets: u64,
    held_attempts: u64,
}

impl Budget {
    fn new(now: std::time::Instant) -> Self {
        Self {
            tokens: BLOCKED_BURST,
            at: now,
            held_targets: 0,
            held_attempts: 0,
        }
    }

    /// Takes one record's worth, if there is one.
    fn take(&mut self, now: std::time::Instant) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() / BLOCKED_REFILL.as_secs_f64();
        self.tokens = (self.tokens + refill).min(BLOCKED_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Opens the networks of the daemon (native backend only): `$DEVBOX_NET_SUBNET` (default:
/// the first of devbox-net's candidates no route uses), `$DEVBOX_NET_DNS` (comma-separated
/// `addr:port`; default: the host's resolvers), state under `<state dir>/net`.
pub(crate) fn open_networks(cfg: &crate::EngineConfig, native: bool) -> NetHandle {
    if !native {
        return Err("this daemon's backend has no networks".into());
    }
    let subnet = match std::env::var("DEVBOX_NET_SUBNET")
        .ok()
        .filter(|s| !s.is_empty())
    {
        Some(s) => s.parse().map_err(|_| {
            format!("DEVBOX_NET_SUBNET={s:?} is not an IPv4 network such as 10.213.0.0/16")
        })?,
        None => devbox_net::default_subnet().map_err(|e| e.to_string())?,
    };
    let upstream_dns = match std::env::var("DEVBOX_NET_DNS")
        .ok()
        .filter(|s| !s.is_empty())
    {
        Some(list) => list
            .split(',')
            .map(|a| {
                let a = a.trim();
                a.parse()
                    .or_else(|_| a.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                    .map_err(|_| {
                        format!("DEVBOX_NET_DNS: {a:?} is not an address such as 10.0.0.2:53")
                    })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        None => devbox_net::system_resolvers(),
    };
    Networks::new(devbox_net::NetConfig {
        subnet,
        upstream_dns,
        state_dir: cfg.state_dir.join("net"),
    })
    .map_err(|e| e.to_string())
}

/// Whether a sandbox gets a network namespace of the daemon's (else an empty one of its own).
pub(crate) fn has_network(net: &NetworkSpec) -> bool {
    net.mode != NetworkMode::None || !net.ports.is_empty()
}

fn net_rule(r: &NetRule) -> Option<devbox_net::Rule> {
    let target = match &r.target {
        NetTarget::Name(n) => devbox_net::Target::Name(n.clone()),
        NetTarget::Suffix(s) => devbox_net::Target::Suffix(s.clone()),
        NetTarget::Net(c) => devbox_net::Target::Net(ipnet::IpNet::new(c.addr, c.prefix).ok()?),
        NetTarget::Sandbox(n) => devbox_net::Target::Sandbox(n.as_str().to_string()),
    };
    Some(devbox_net::Rule {
        target,
        port: r.port,
    })
}

/// The data plane's policy for the network in force.
pub(crate) fn net_policy(net: &NetworkSpec) -> devbox_net::Policy {
    devbox_net::Policy {
        mode: match net.mode {
            NetworkMode::None => devbox_net::Mode::None,
            NetworkMode::Allow => devbox_net::Mode::Allow,
            NetworkMode::Open => devbox_net::Mode::Open,
        },
        allow: net.allow.iter().filter_map(net_rule).collect(),
        deny: net.deny.iter().filter_map(net_rule).collect(),
    }
}

fn net_ports(net: &NetworkSpec) -> Vec<devbox_net::PortMap> {
    net.ports
        .iter()
        .map(|p| devbox_net::PortMap {
            bind: p.bind,
            host_port: p.host_port,
            sandbox_port: p.sandbox_port,
        })
        .collect()
}

fn net_error(name: &str, e: devbox_net::NetError) -> EngineError {
    match e {
        devbox_net::NetError::Invalid(m) => EngineError::InvalidRequest(m),
        devbox_net::NetError::Port { .. } => {
            EngineError::WrongState(format!("sandbox {name}: {e}: pick another host port"))
        }
        other => EngineError::internal(format!("the network of sandbox {name}"), other),
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
        (_, Change::Deny) if rules.iter().any(NetRule::is_sandbox) => {
            return Err(EngineError::InvalidRequest(format!(
                "{}: sandboxes never reach each other unless an allow rule names them, so \
                 denying a sandbox changes nothing; to withdraw an allowed sandbox, use \
                 `sandbox network reset {name}` or allow rules without it",
                text()
            )));
        }
        (NetworkMode::Open, Change::Allow)
            if !rules
                .iter()
                .all(|r| r.is_sandbox() || spec.deny.contains(r)) =>
        {
            return Err(EngineError::InvalidRequest(format!(
                "sandbox {name} has network mode open, which allows everything not denied: \
                 allowing {} only undoes deny rules, and these are not all denied \
                 (see `sandbox network {name}`)",
                text()
            )));
        }
        (_, Change::Allow) if rules.iter().any(NetRule::is_ipv6) => {
            return Err(EngineError::InvalidRequest(format!(
                "{}: {}",
                text(),
                devbox_spec::NO_IPV6
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
    // In open mode an allow only undoes a deny (everything else is allowed already), or
    // names another sandbox.
    for r in rules {
        let joins = !(spec.mode == NetworkMode::Open && change == Change::Allow) || r.is_sandbox();
        if joins && !add.contains(r) {
            add.push(r.clone());
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

trait WithStatus {
    fn with_status(self, st: Option<devbox_net::NetStatus>) -> Self;
}

impl WithStatus for NetworkInfo {
    fn with_status(mut self, st: Option<devbox_net::NetStatus>) -> Self {
        let Some(st) = st else { return self };
        self.attached = true;
        self.address = st.address.map(|a| a.to_string());
        self.counters = NetworkCounters {
            dns_answered: st.counters.dns_answered,
            dns_refused: st.counters.dns_refused,
            conns_blocked: st.counters.conns_blocked,
            bytes_out: st.counters.bytes_out,
            bytes_in: st.counters.bytes_in,
        };
        self.allowed_now = st
            .allowed_now
            .into_iter()
            .map(|(a, because, left)| devbox_wire::AllowedAddress {
                address: a.to_string(),
                because,
                seconds_left: left,
            })
            .collect();
        self
    }
}

/// Longest target text recorded (a DNS name has at most 253 characters).
const MAX_TARGET: usize = 300;

/// A target as the sandbox sent it, made safe to store and print: control characters
/// escaped, cut to [`MAX_TARGET`] characters.
fn printable(target: &str) -> String {
    let escaped: String = target
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if escaped.chars().count() <= MAX_TARGET {
        return escaped;
    }
    let mut out: String = escaped.chars().take(MAX_TARGET).collect();
    out.push('…');
    out
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
        }
        .with_status(self.network_now(rec)))
    }

    /// What the data plane says of a running sandbox's network.
    fn network_now(&self, rec: &SandboxRecord) -> Option<devbox_net::NetStatus> {
        if rec.state != devbox_store::SandboxState::Running {
            return None;
        }
        self.net.as_ref().ok()?.status(&rec.id).ok()
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
        caller: &Caller,
        name: &str,
        rules: Vec<String>,
    ) -> Result<NetworkInfo> {
        self.network_change(caller, name, Change::Allow, rules)
            .await
    }

    /// Denies egress, live; kept in the sandbox's record.
    pub async fn network_deny(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        rules: Vec<String>,
    ) -> Result<NetworkInfo> {
        self.network_change(caller, name, Change::Deny, rules).await
    }

    async fn network_change(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        change: Change,
        rules: Vec<String>,
    ) -> Result<NetworkInfo> {
        // The caller's text, bounded: each rule cut as a blocked target is, and no more rules
        // than a sandbox may have (the rest counted), so a huge request stays a small record.
        let shown: Vec<String> = rules
            .iter()
            .take(MAX_RULES + 1)
            .map(|r| printable(r))
            .collect();
        let detail = if rules.len() > shown.len() {
            serde_json::json!({"rules": shown, "rules_not_shown": rules.len() - shown.len()})
        } else {
            serde_json::json!({"rules": shown})
        };
        self.on_sandbox(caller, name, change.action(), detail, move |e, _, rec| {
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
    pub async fn network_reset(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
    ) -> Result<NetworkInfo> {
        self.on_sandbox(
            caller,
            name,
            "network.reset",
            serde_json::json!({}),
            |e, _, rec| {
                e.store.set_network_rules(&rec.id, None)?;
                e.apply_network_rules(rec)?;
                e.network_info(rec)
            },
        )
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
    /// record; beyond [`MAX_BLOCKED_RECORDS`] targets per sandbox in one round, or beyond its
    /// [`BlockedBudgets`], the rest are summed into one later record, so that a sandbox
    /// trying many names cannot flood the log.
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
        for mut a in attempts {
            a.target = printable(&a.target);
            match grouped.iter_mut().find(|(g, _)| {
                g.sandbox_id == a.sandbox_id && g.kind == a.kind && g.target == a.target
            }) {
                Some((_, n)) => *n += 1,
                None => grouped.push((a, 1)),
            }
        }
        let now = std::time::Instant::now();
        let mut budgets = self
            .blocked_budgets
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        budgets.retain(|id, _| names.contains_key(id));
        let mut per_round: std::collections::HashMap<&str, usize> = Default::default();
        for (a, count) in &grouped {
            let Some(name) = names.get(&a.sandbox_id) else {
                continue; // destroyed meanwhile
            };
            let seen = per_round.entry(&a.sandbox_id).or_default();
            *seen += 1;
            let budget = budgets
                .entry(a.sandbox_id.clone())
                .or_insert_with(|| Budget::new(now));
            if *seen > MAX_BLOCKED_RECORDS || !budget.take(now) {
                budget.held_targets += 1;
                budget.held_attempts += count;
                continue;
            }
            self.audit(
                &Caller::system(BLOCKED_ACTOR),
                BLOCKED_ACTION,
                Some(name),
                serde_json::json!({"kind": a.kind, "target": a.target, "count": count}),
            );
        }
        // What was held back, in one record per sandbox, when its budget allows.
        for (id, budget) in budgets.iter_mut() {
            if budget.held_targets == 0 || !budget.take(now) {
                continue;
            }
            let Some(name) = names.get(id) else { continue };
            self.audit(
                &Caller::system(BLOCKED_ACTOR),
                BLOCKED_ACTION,
                Some(name),
                serde_json::json!({
                    "kind": "more",
                    "target": format!("{} more targets", budget.held_targets),
                    "count": budget.held_attempts,
                }),
            );
            budget.held_targets = 0;
            budget.held_attempts = 0;
        }
    }

    /// The daemon's networks, or why a sandbox cannot have one here.
    fn networks(&self, name: &str) -> Result<&Arc<Networks>> {
        self.net.as_ref().map_err(|why| {
            EngineError::WrongState(format!(
                "sandbox {name} needs a network, and this daemon has none: {why}"
            ))
        })
    }

    /// Makes a starting sandbox's network (if it has one): its namespace, and for modes
    /// allow and open its link, rules and resolver; its published ports. Returns the
    /// namespace to join and the resolv.conf to write.
    pub(crate) fn attach_network(
        &self,
        rec: &SandboxRecord,
    ) -> Result<(Option<std::path::PathBuf>, Option<String>)> {
        let net = self.network_in_force(rec)?;
        if !has_network(&net) {
            return Ok((None, None));
        }
        let att = self
            .networks(&rec.name)?
            .start_create(&rec.id, &net_policy(&net), &net_ports(&net))
            .map_err(|e| net_error(&rec.name, e))?;
        Ok((Some(att.netns.clone()), att.resolv_conf()))
    }

    /// Lets `sandbox:NAME` rules name sandboxes: the data plane asks for the id of the
    /// sandbox of that name each time it refills the peer sets.
    pub(crate) fn resolve_peers_by_name(self: &Arc<Self>) {
        let Ok(n) = &self.net else { return };
        let weak = Arc::downgrade(self);
        n.set_peer_lookup(Box::new(move |name| {
            let e = weak.upgrade()?;
            e.store.sandbox_by_name(name).ok().flatten().map(|r| r.id)
        }));
    }

    /// Waits until the network [`Self::attach_network`] began is whole (its rules loaded
    /// while the sandbox started; until then the sandbox's link is down). Called before the
    /// sandbox counts as running and before its main process starts.
    pub(crate) fn network_ready(&self, rec: &SandboxRecord) -> Result<()> {
        match &self.net {
            Ok(n) => match n.finish_create(&rec.id) {
                Ok(()) | Err(devbox_net::NetError::NotFound(_)) => Ok(()),
                Err(e) => Err(net_error(&rec.name, e)),
            },
            Err(_) => Ok(()),
        }
    }

    /// Removes a sandbox's network (stopped, failed to start, destroyed); idempotent. Of a
    /// sandbox being destroyed, the proxies and resolver stop at once and the kernel's part
    /// (table, veth, namespace: tens of ms of RCU grace periods) goes on in the background
    /// ([`Networks::remove_in_background`]) while the rest of the sandbox is removed;
    /// `destroy` waits for it at its end ([`Engine::network_removed`]), a one-shot run does
    /// not. A daemon killed before it is done leaves the network's record, which reconcile
    /// removes.
    pub(crate) fn detach_network(&self, rec: &SandboxRecord) {
        let Ok(n) = &self.net else { return };
        let removed = if rec.state == devbox_store::SandboxState::Destroying {
            n.remove_in_background(&rec.id)
        } else {
            n.remove(&rec.id)
        };
        if let Err(e) = removed {
            tracing::warn!(sandbox = %rec.name, "removing its network (reconcile retries): {e}");
        }
    }

    /// Waits until a background removal of the sandbox's network (if any) is done.
    pub(crate) fn network_removed(&self, id: &str) {
        if let Ok(n) = &self.net {
            n.wait_removed(id);
        }
    }

    /// At start-up: re-attaches the networks of running sandboxes (resolver, port proxies)
    /// and removes every other network of this state dir.
    pub(crate) fn reconcile_networks(&self, kept: &[SandboxRecord]) {
        let Ok(n) = &self.net else { return };
        let mut keep = Vec::new();
        for rec in kept {
            if rec.state != devbox_store::SandboxState::Running {
                continue;
            }
            let net = match self.network_in_force(rec) {
                Ok(net) if has_network(&net) => net,
                _ => continue,
            };
            match n.create(&rec.id, &net_policy(&net), &net_ports(&net)) {
                Ok(_) => keep.push(rec.id.clone()),
                Err(e) => {
                    tracing::error!(sandbox = %rec.name, "re-attaching its network: {e}")
                }
            }
        }
        match n.cleanup(&keep) {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(
                    count = removed.len(),
                    "removed networks no running sandbox owns"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::error!("removing networks no sandbox owns: {e}"),
        }
    }

    /// Moves blocked attempts from the data plane into the audit log, every second, while
    /// the engine lives.
    pub(crate) fn pump_blocked(self: &Arc<Self>) {
        let Ok(n) = &self.net else { return };
        let n = n.clone();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let Some(e) = weak.upgrade() else { return };
                let n = n.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let attempts = n
                        .take_new_blocked()
                        .into_iter()
                        .map(|(id, b)| Blocked {
                            sandbox_id: id,
                            kind: match b.kind {
                                devbox_net::BlockedKind::Dns => "dns",
                                devbox_net::BlockedKind::Connect => "connect",
                            },
                            target: b.target,
                        })
                        .collect();
                    e.record_blocked(attempts);
                })
                .await;
            }
        });
    }

    /// The persisted network namespace a running sandbox joined, if it has one: a
    /// checkpoint of its processes keeps it out of the images (it belongs to the host's
    /// user namespace and holds the daemon's plumbing), and a restore joins the sandbox's
    /// namespace of that moment again.
    pub(crate) fn netns_in_use(&self, rec: &SandboxRecord) -> Option<std::path::PathBuf> {
        let n = self.net.as_ref().ok()?;
        n.netns_of(&rec.id).ok().filter(|p| p.exists())
    }

    /// Applies the rules in force to a running sandbox's network (the data plane).
    fn apply_network_rules(&self, rec: &SandboxRecord) -> Result<()> {
        if rec.state != devbox_store::SandboxState::Running {
            return Ok(()); // applied at the next start
        }
        let net = self.network_in_force(rec)?;
        if !has_network(&net) {
            return Ok(());
        }
        self.networks(&rec.name)?
            .set_policy(&rec.id, &net_policy(&net))
            .map_err(|e| net_error(&rec.name, e))
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
    fn hostile_targets_are_made_printable() {
        assert_eq!(printable("evil.test"), "evil.test");
        assert_eq!(printable("a\x1b[2Jb\n"), "a\\u{1b}[2Jb\\n");
        let long = printable(&"x".repeat(10_000));
        assert_eq!(long.chars().count(), MAX_TARGET + 1);
        assert_eq!(printable(&"y".repeat(MAX_TARGET)), "y".repeat(MAX_TARGET));
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
