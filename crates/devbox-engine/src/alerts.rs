//! The monitor and alerts.
//!
//! One periodic task (every `monitoring.interval`, default 5 s, on the blocking pool) reads
//! each running sandbox's use with the same cgroup reads as `stats` (no process, no
//! sandbox-side work) and
//! - records limit events: `limit.oom` when its OOM kill count rose (detail {count, total}),
//!   `limit.pids` when forks were refused at its pids limit (detail {count, total, limit});
//! - evaluates the resource rules: `memory` (use over a share of the memory limit), `disk`
//!   (use over a share of the quota), `exec_duration` (its longest live exec ran longer).
//!
//! Rules about events are evaluated from the event stream: `denied_commands` (N
//! `exec.denied` records within a window; the newest N times are kept per sandbox) and
//! `unhealthy` (a `health.status` record with status unhealthy fires, healthy resolves: the
//! action name alone, whoever records it).
//!
//! A rule fires once (`alert.firing`, detail {rule, value, threshold}) and stays firing,
//! without records, until it resolves (`alert.resolved`, same detail with the value then),
//! also when the sandbox stops or goes. Firing alerts are the daemon's memory: `inspect`
//! shows them; a restarted daemon evaluates afresh (an alert still true fires again).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use devbox_spec::alerts::AlertRules;
use devbox_store::{SandboxRecord, SandboxState, now_ms};
use devbox_wire::ActiveAlert;
use serde_json::{Value, json};

use crate::events::{EventFilter, StreamItem};
use crate::{Caller, Engine};

/// Who the audit log says recorded monitor events and alerts.
pub(crate) const MONITOR_ACTOR: &str = "monitor";

/// Rules that hold only while a sandbox runs (resolved when it stops).
const RESOURCE_RULES: [&str; 3] = ["memory", "disk", "exec_duration"];

#[derive(Debug, Clone)]
struct Firing {
    value: Value,
    threshold: Value,
    since_ms: i64,
}

/// What the monitor keeps between rounds.
#[derive(Debug, Default)]
pub(crate) struct Alerts {
    /// (sandbox, rule) -> firing.
    active: Mutex<HashMap<(String, &'static str), Firing>>,
    /// Per sandbox: times of its newest denied commands (at most the rule's count).
    denied: Mutex<HashMap<String, VecDeque<i64>>>,
    /// Per sandbox run (id and init pid): OOM kills and pids-limit hits already recorded.
    seen: Mutex<HashMap<String, (u64, u64)>>,
    /// Per sandbox id: its stored spec and the rules and limits read from it.
    rules: Mutex<HashMap<String, (String, AlertRules, u64)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Alerts {
    /// The alerts firing for a sandbox.
    pub(crate) fn active_of(&self, sandbox: &str) -> Vec<ActiveAlert> {
        let mut v: Vec<ActiveAlert> = lock(&self.active)
            .iter()
            .filter(|((s, _), _)| s == sandbox)
            .map(|((_, rule), f)| ActiveAlert {
                rule: rule.to_string(),
                value: f.value.clone(),
                threshold: f.threshold.clone(),
                since: crate::model::rfc3339(f.since_ms),
            })
            .collect();
        v.sort_by(|a, b| a.rule.cmp(&b.rule));
        v
    }
}

impl Engine {
    /// How many alerts fire now, over all sandboxes.
    pub(crate) fn alerts_firing(&self) -> usize {
        lock(&self.alerts.active).len()
    }

    /// A sandbox's rules (the daemon's, with its spec's in place of those it gives) and its
    /// memory limit; a spec that no longer parses gets the daemon's rules.
    fn rules_of(&self, rec: &SandboxRecord) -> (AlertRules, u64) {
        let mut cache = lock(&self.alerts.rules);
        if let Some((manifest, rules, mem)) = cache.get(&rec.id)
            && *manifest == rec.manifest
        {
            return (*rules, *mem);
        }
        let global = self
            .cfg
            .monitoring
            .alerts
            .resolve("alerts")
            .unwrap_or_default();
        let (rules, mem) = match Self::manifest_of(rec) {
            Ok(m) => (
                global.overridden_by(&m.spec.alerts).unwrap_or(global),
                m.spec.resolved_limits().map_or(0, |l| l.memory_bytes),
            ),
            Err(_) => (global, 0),
        };
        cache.insert(rec.id.clone(), (rec.manifest.clone(), rules, mem));
        (rules, mem)
    }

    /// Fires or resolves `rule` of `sandbox` when its state changes; nothing otherwise.
    fn judge(
        &self,
        sandbox: &str,
        rule: &'static str,
        firing: bool,
        value: Value,
        threshold: Value,
        extra: Value,
    ) {
        let key = (sandbox.to_string(), rule);
        let mut active = lock(&self.alerts.active);
        let was = active.contains_key(&key);
        if firing == was {
            return;
        }
        if firing {
            active.insert(
                key,
                Firing {
                    value: value.clone(),
                    threshold: threshold.clone(),
                    since_ms: now_ms(),
                },
            );
        } else {
            active.remove(&key);
        }
        drop(active);
        let mut detail = json!({"rule": rule, "value": value, "threshold": threshold});
        if let (Some(d), Some(x)) = (detail.as_object_mut(), extra.as_object()) {
            for (k, v) in x {
                d.insert(k.clone(), v.clone());
            }
        }
        self.audit(
            &Caller::system(MONITOR_ACTOR),
            if firing {
                "alert.firing"
            } else {
                "alert.resolved"
            },
            Some(sandbox),
            detail,
        );
    }

    /// Resolves `rules` of `sandbox` that fire, saying why.
    fn resolve_all(&self, sandbox: &str, rules: &[&'static str], why: &str) {
        let firing: Vec<(&'static str, Firing)> = lock(&self.alerts.active)
            .iter()
            .filter(|((s, r), _)| s == sandbox && rules.contains(r))
            .map(|((_, r), f)| (*r, f.clone()))
            .collect();
        for (rule, f) in firing {
            self.judge(
                sandbox,
                rule,
                false,
                Value::Null,
                f.threshold,
                json!({"reason": why}),
            );
        }
    }

    /// One round of the monitor (see the module's documentation).
    pub(crate) fn monitor_round(&self, since_ms: i64) {
        let recs = match self.store.sandboxes() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("monitor: reading sandboxes: {e}");
                return;
            }
        };
        let longest = self.monitor.longest_execs();
        let now = now_ms();
        let mut runs = std::collections::HashSet::new();
        for rec in &recs {
            if rec.state != SandboxState::Running {
                self.resolve_all(&rec.name, &RESOURCE_RULES, "the sandbox stopped");
                continue;
            }
            let Ok((backend, inst)) = self.backend_of(rec) else {
                continue;
            };
            let (rules, mem_limit) = self.rules_of(rec);
            let u = backend.usage(&inst);
            let key = crate::stats::cpu_key(rec);
            runs.insert(key.clone());
            self.limit_events(rec, &key, &u, since_ms);
            if let Some(share) = rules.memory_share
                && mem_limit > 0
            {
                let ratio = u.memory_bytes as f64 / mem_limit as f64;
                self.judge(
                    &rec.name,
                    "memory",
                    ratio > share,
                    json!(round3(ratio)),
                    json!(share),
                    json!({"bytes": u.memory_bytes, "limit_bytes": mem_limit}),
                );
            }
            if let Some(share) = rules.disk_share
                && let Some(d) = self.disk_usage(rec)
                && let Some(limit) = d.limit_bytes.filter(|l| *l > 0)
            {
                let ratio = d.used_bytes as f64 / limit as f64;
                self.judge(
                    &rec.name,
                    "disk",
                    ratio > share,
                    json!(round3(ratio)),
                    json!(share),
                    json!({"bytes": d.used_bytes, "limit_bytes": limit}),
                );
            }
            if let Some(ms) = rules.exec_duration_ms {
                let running = longest.get(&rec.id);
                let secs = running.map_or(0.0, |(_, d)| d.as_secs_f64());
                self.judge(
                    &rec.name,
                    "exec_duration",
                    running.is_some_and(|(_, d)| d.as_millis() as u64 > ms),
                    json!(round3(secs)),
                    json!(ms as f64 / 1000.0),
                    json!({"exec": running.map(|(id, _)| id.clone())}),
                );
            }
            if let Some((n, window)) = rules.denied_commands {
                let count = self.denied_within(&rec.name, n, window, now);
                if count < n as usize {
                    self.judge(
                        &rec.name,
                        "denied_commands",
                        false,
                        json!(count),
                        json!(n),
                        json!({"within_seconds": window / 1000}),
                    );
                }
            }
        }
        // Sandboxes that went: their alerts resolve, their counts are forgotten.
        let names: std::collections::HashSet<&str> = recs.iter().map(|r| r.name.as_str()).collect();
        let gone: Vec<String> = lock(&self.alerts.active)
            .keys()
            .filter(|(s, _)| !names.contains(s.as_str()))
            .map(|(s, _)| s.clone())
            .collect();
        for s in gone {
            self.resolve_all(
                &s,
                &[
                    "memory",
                    "disk",
                    "exec_duration",
                    "denied_commands",
                    "unhealthy",
                ],
                "the sandbox was destroyed",
            );
        }
        lock(&self.alerts.denied).retain(|s, _| names.contains(s.as_str()));
        lock(&self.alerts.seen).retain(|k, _| runs.contains(k));
        let ids: std::collections::HashSet<&str> = recs.iter().map(|r| r.id.as_str()).collect();
        lock(&self.alerts.rules).retain(|id, _| ids.contains(id.as_str()));
    }

    /// Records `limit.oom` and `limit.pids` when a running sandbox's counts rose since the
    /// last round. A run first seen counts from zero if it started after `since_ms` (the
    /// monitor's start), else from what it had then.
    fn limit_events(
        &self,
        rec: &SandboxRecord,
        key: &str,
        u: &devbox_backend::Usage,
        since_ms: i64,
    ) {
        let mut seen = lock(&self.alerts.seen);
        let (oom, pids) = *seen.entry(key.to_string()).or_insert_with(|| {
            if rec.started_at.is_some_and(|t| t >= since_ms) {
                (0, 0)
            } else {
                (u.oom_kills, u.pids_limit_hits)
            }
        });
        seen.insert(
            key.to_string(),
            (u.oom_kills.max(oom), u.pids_limit_hits.max(pids)),
        );
        drop(seen);
        let who = Caller::system(MONITOR_ACTOR);
        if u.oom_kills > oom {
            self.audit(
                &who,
                "limit.oom",
                Some(&rec.name),
                json!({"count": u.oom_kills - oom, "total": u.oom_kills}),
            );
        }
        if u.pids_limit_hits > pids {
            let limit = Self::manifest_of(rec)
                .ok()
                .and_then(|m| m.spec.resolved_limits().ok())
                .map(|l| l.pids);
            self.audit(
                &who,
                "limit.pids",
                Some(&rec.name),
                json!({"count": u.pids_limit_hits - pids, "total": u.pids_limit_hits, "limit": limit}),
            );
        }
    }

    /// How many of a sandbox's newest `n` denied commands fell within `window` ms of `now`.
    fn denied_within(&self, sandbox: &str, n: u32, window: u64, now: i64) -> usize {
        let denied = lock(&self.alerts.denied);
        denied.get(sandbox).map_or(0, |q| {
            q.iter()
                .rev()
                .take(n as usize)
                .filter(|t| now - **t <= window as i64)
                .count()
        })
    }

    /// Handles an event the alert rules watch: `exec.denied`, `health.status`.
    fn alert_on_event(&self, e: &devbox_wire::Event) {
        let Some(sandbox) = e.sandbox.as_deref() else {
            return;
        };
        let Ok(rec) = self.record(sandbox) else {
            return;
        };
        let (rules, _) = self.rules_of(&rec);
        match e.action.as_str() {
            "exec.denied" => {
                let Some((n, window)) = rules.denied_commands else {
                    return;
                };
                let now = now_ms();
                {
                    let mut denied = lock(&self.alerts.denied);
                    let q = denied.entry(sandbox.to_string()).or_default();
                    q.push_back(now);
                    while q.len() > n as usize {
                        q.pop_front();
                    }
                }
                let count = self.denied_within(sandbox, n, window, now);
                if count >= n as usize {
                    self.judge(
                        sandbox,
                        "denied_commands",
                        true,
                        json!(count),
                        json!(n),
                        json!({"within_seconds": window / 1000}),
                    );
                }
            }
            "health.status" if rules.unhealthy => match e.details["status"].as_str() {
                Some("unhealthy") => self.judge(
                    sandbox,
                    "unhealthy",
                    true,
                    json!("unhealthy"),
                    json!("healthy"),
                    json!({}),
                ),
                Some("healthy") => self.judge(
                    sandbox,
                    "unhealthy",
                    false,
                    json!("healthy"),
                    json!("healthy"),
                    json!({}),
                ),
                _ => {}
            },
            _ => {}
        }
    }

    /// Starts the alert rules' listener on the event stream and, unless the monitoring
    /// loops are off, the periodic monitor.
    pub(crate) fn start_monitor(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let me = self.clone();
        tokio::spawn(async move {
            let filter = EventFilter {
                kinds: vec!["exec".into(), "health".into()],
                ..Default::default()
            };
            let mut stream = match me.event_stream(filter, None).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("alerts: cannot read events: {e}");
                    return;
                }
            };
            drop(me);
            loop {
                match stream.next().await {
                    Ok(Some(StreamItem::Event(ev))) => {
                        if ev.action != "exec.denied" && ev.action != "health.status" {
                            continue;
                        }
                        let Some(e) = weak.upgrade() else { return };
                        let _ = tokio::task::spawn_blocking(move || e.alert_on_event(&ev)).await;
                    }
                    Ok(Some(StreamItem::Lagged(_))) => {}
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!("alerts: reading events: {e}");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        });
        if !self.cfg.monitoring.loops {
            return;
        }
        let weak = Arc::downgrade(self);
        let interval = self.cfg.monitoring.interval;
        let since = now_ms();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(e) = weak.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || e.monitor_round(since)).await;
            }
        });
    }
}
