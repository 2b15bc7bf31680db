//! Events: the audit log as a stream. Every audit record is an event (its sequence number
//! is the event's id), with a kind derived from its action ([`kind_of`]); there is no second
//! store. [`Engine::audit`] hands each record it appended to a broadcast channel
//! ([`EventBus`]): sending never blocks, and a subscriber that falls more than
//! [`BUS_CAPACITY`] events behind is told how many it missed.
//!
//! [`EventStream`] is what a follower reads: the past events from the store, then live ones,
//! without gaps or duplicates. It keeps a cursor (the highest id handled); a live event right
//! after the cursor is passed on, one further ahead (records are committed in id order but
//! may be broadcast out of it) first makes it read the ids between from the store, and one
//! at or below the cursor is a duplicate. After a lag it reports the count, then reads what
//! it missed from the store.

use std::collections::VecDeque;
use std::sync::Arc;

use devbox_wire::Event;
use tokio::sync::broadcast;

use crate::{Engine, EngineError, Result};

/// Events a subscriber may fall behind before it lags.
pub const BUS_CAPACITY: usize = 4096;

/// Records read from the store at once.
const PAGE: usize = 500;

/// The live side of the event stream.
#[derive(Debug)]
pub(crate) struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BUS_CAPACITY).0,
        }
    }
}

impl EventBus {
    /// Passes an appended record on to whoever listens (never blocks; no one listening is
    /// fine).
    pub(crate) fn publish(&self, rec: &devbox_store::AuditRecord) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(event_of(rec.clone())));
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}

/// The kind of an event, from its audit action: the agreed words for the known families,
/// else the action's first word (letters, digits, `_` and `-` only), else `other`.
pub fn kind_of(action: &str) -> String {
    let first = action.split('.').next().unwrap_or("");
    let known = match action {
        "sandbox.rollback" | "snapshot.rollback" => Some("rollback"),
        "network.blocked" => Some("network"),
        _ => match first {
            "sandbox" => Some("lifecycle"),
            "exec" => Some("exec"),
            "snapshot" => Some("snapshot"),
            "limit" => Some("limit"),
            "network" => Some("network"),
            "approval" => Some("approval"),
            "policy" => Some("policy"),
            "health" => Some("health"),
            "alert" => Some("alert"),
            "idle" => Some("idle"),
            "image" => Some("image"),
            "auth" => Some("auth"),
            "audit" | "logs" => Some("audit"),
            _ => None,
        },
    };
    match known {
        Some(k) => k.to_string(),
        None if !first.is_empty()
            && first.len() <= 32
            && first
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            first.to_ascii_lowercase()
        }
        None => "other".to_string(),
    }
}

/// The event of an audit record.
pub(crate) fn event_of(rec: devbox_store::AuditRecord) -> Event {
    Event {
        id: rec.seq,
        time: crate::model::rfc3339(rec.time),
        kind: kind_of(&rec.action),
        sandbox: rec.sandbox,
        action: rec.action,
        caller: rec.actor,
        details: rec.detail,
    }
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this sandbox's.
    pub sandbox: Option<String>,
    /// Only those at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Only these kinds (empty: all).
    pub kinds: Vec<String>,
}

impl EventFilter {
    /// A filter from the query's words; `kinds` is comma-separated.
    pub fn new(sandbox: Option<String>, since_ms: Option<i64>, kinds: Option<&str>) -> Self {
        Self {
            sandbox,
            since_ms,
            kinds: kinds
                .unwrap_or("")
                .split(',')
                .map(|k| k.trim().to_ascii_lowercase())
                .filter(|k| !k.is_empty())
                .collect(),
        }
    }

    /// Whether `e` passes.
    pub fn matches(&self, e: &Event) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&e.kind))
            && self
                .sandbox
                .as_deref()
                .is_none_or(|s| e.sandbox.as_deref() == Some(s))
            && self.since_ms.is_none_or(|since| {
                humantime::parse_rfc3339_weak(&e.time)
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .is_none_or(|d| d.as_millis() as i64 >= since)
            })
    }
}

/// What a follower reads next.
#[derive(Debug, Clone)]
pub enum StreamItem {
    /// An event.
    Event(Arc<Event>),
    /// The stream fell behind by this many events; they follow from the store.
    Lagged(u64),
}

/// Past events, then live ones, in id order, without gaps or duplicates (see the module's
/// documentation).
#[derive(Debug)]
pub struct EventStream {
    engine: std::sync::Weak<Engine>,
    rx: broadcast::Receiver<Arc<Event>>,
    filter: EventFilter,
    /// The highest id handled.
    cursor: i64,
    /// Read from the store up to this id (inclusive) before taking live events.
    catch_up_to: Option<i64>,
    pending: VecDeque<Arc<Event>>,
}

impl EventStream {
    /// The next event (or lag notice); `None` once the engine is gone.
    pub async fn next(&mut self) -> Result<Option<StreamItem>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(Some(StreamItem::Event(e)));
            }
            if let Some(to) = self.catch_up_to {
                if !self.read_store(to).await? {
                    return Ok(None);
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(e) if e.id <= self.cursor => {}
                Ok(e) if e.id == self.cursor + 1 => {
                    self.cursor = e.id;
                    if self.filter.matches(&e) {
                        return Ok(Some(StreamItem::Event(e)));
                    }
                }
                Ok(e) => {
                    // Ids between were committed first but not seen yet: from the store.
                    self.catch_up_to = Some(e.id);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let Some(engine) = self.engine.upgrade() else {
                        return Ok(None);
                    };
                    self.catch_up_to = Some(engine.newest_seq().await?);
                    return Ok(Some(StreamItem::Lagged(n)));
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }

    /// Reads one page of events after the cursor, up to `to`, into `pending`; false once
    /// the engine is gone.
    async fn read_store(&mut self, to: i64) -> Result<bool> {
        let Some(engine) = self.engine.upgrade() else {
            return Ok(false);
        };
        let (after, sandbox, since) = (
            self.cursor,
            self.filter.sandbox.clone(),
            self.filter.since_ms,
        );
        let page = engine
            .blocking(move |e| {
                Ok(e.store.audit_page(
                    sandbox.as_deref(),
                    since,
                    Some(after),
                    Some(to.saturating_add(1)),
                    false,
                    PAGE,
                )?)
            })
            .await?;
        let full = page.len() == PAGE;
        match page.last() {
            Some(last) if full => self.cursor = last.seq,
            _ => {
                self.cursor = self.cursor.max(to);
                self.catch_up_to = None;
            }
        }
        self.pending.extend(
            page.into_iter()
                .map(|r| Arc::new(event_of(r)))
                .filter(|e| self.filter.matches(e)),
        );
        Ok(true)
    }
}

impl Engine {
    /// A live subscription to every event from now on.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// The id of the newest event (0 if none).
    pub(crate) async fn newest_seq(self: &Arc<Self>) -> Result<i64> {
        self.blocking(|e| {
            Ok(e.store
                .audit_page(None, None, None, None, true, 1)?
                .first()
                .map_or(0, |r| r.seq))
        })
        .await
    }

    /// Past events that pass `filter`, the newest `limit` of them, oldest first.
    pub async fn events(self: &Arc<Self>, filter: EventFilter, limit: usize) -> Result<Vec<Event>> {
        self.bookkeeping.settled().await;
        self.blocking(move |e| {
            let mut out = Vec::new();
            let mut before = None;
            while out.len() < limit {
                let page = e.store.audit_page(
                    filter.sandbox.as_deref(),
                    filter.since_ms,
                    None,
                    before,
                    true,
                    PAGE,
                )?;
                let Some(last) = page.last() else { break };
                before = Some(last.seq);
                let n = page.len();
                out.extend(
                    page.into_iter()
                        .map(event_of)
                        .filter(|ev| filter.matches(ev))
                        .take(limit - out.len()),
                );
                if n < PAGE {
                    break;
                }
            }
            out.reverse();
            Ok(out)
        })
        .await
    }

    /// A stream of events that pass `filter`: those after id `after` (a client's
    /// `Last-Event-ID`), else those since the filter's time, else only new ones; then live
    /// ones as they are recorded.
    pub async fn event_stream(
        self: &Arc<Self>,
        filter: EventFilter,
        after: Option<i64>,
    ) -> Result<EventStream> {
        if after.is_some_and(|a| a < 0) {
            return Err(EngineError::InvalidRequest(
                "Last-Event-ID must be an event id (0 or more)".into(),
            ));
        }
        // Subscribe first: whatever is recorded from here on is either in the store's
        // read or in the channel (or both: duplicates are skipped by id).
        let rx = self.subscribe_events();
        let newest = self.newest_seq().await?;
        let (cursor, catch_up_to) = match (after, filter.since_ms) {
            (Some(a), _) => (a, Some(newest)),
            (None, Some(_)) => (0, Some(newest)),
            (None, None) => (newest, None),
        };
        Ok(EventStream {
            engine: Arc::downgrade(self),
            rx,
            filter,
            cursor,
            catch_up_to,
            pending: VecDeque::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_actions() {
        for (action, kind) in [
            ("sandbox.create", "lifecycle"),
            ("sandbox.rollback", "rollback"),
            ("snapshot.create", "snapshot"),
            ("exec", "exec"),
            ("exec.denied", "exec"),
            ("limit.oom", "limit"),
            ("limit.pids", "limit"),
            ("network.blocked", "network"),
            ("network.allow", "network"),
            ("approval.request", "approval"),
            ("health.status", "health"),
            ("alert.firing", "alert"),
            ("idle.freeze", "idle"),
            ("audit.prune", "audit"),
            ("auth.failure", "auth"),
            ("frobnicate.now", "frobnicate"),
            ("", "other"),
            ("weird name!", "other"),
        ] {
            assert_eq!(kind_of(action), kind, "{action}");
        }
    }

    #[test]
    fn filters_by_kind_sandbox_and_time() {
        let ev = Event {
            id: 1,
            time: crate::model::rfc3339(10_000),
            sandbox: Some("a".into()),
            kind: "alert".into(),
            action: "alert.firing".into(),
            caller: "monitor".into(),
            details: serde_json::json!({}),
        };
        assert!(EventFilter::new(None, None, None).matches(&ev));
        assert!(
            EventFilter::new(Some("a".into()), Some(10_000), Some("limit, alert")).matches(&ev)
        );
        assert!(!EventFilter::new(Some("b".into()), None, None).matches(&ev));
        assert!(!EventFilter::new(None, Some(10_001), None).matches(&ev));
        assert!(!EventFilter::new(None, None, Some("exec")).matches(&ev));
    }
}
