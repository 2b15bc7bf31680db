//! Prometheus metrics (prometheus-client), served by the API at `GET /metrics` in the
//! Prometheus text format 0.0.4.
//!
//! Kept in the engine: counts and latencies of operations, observed where each ends
//! (create: the sandbox runs; exec: its command started, so the time is the daemon's,
//! not the command's; snapshot, checkpoint (a snapshot with processes), rollback: done),
//! labelled with `result` ok or error; command denials. Read at each scrape: every
//! sandbox's CPU time, memory and pids (the same cgroup reads as `stats`), approvals
//! pending, the pool's size and use.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::{Engine, EngineError, Result};

/// The `Content-Type` of [`Engine::metrics_text`].
pub const METRICS_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    operation: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    url: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabels {
    sandbox: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The metrics the engine keeps between scrapes.
#[derive(Debug)]
pub(crate) struct Metrics {
    operations: Family<OpLabels, Counter>,
    latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    denials: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            operations: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            denials: Counter::default(),
        }
    }
}

impl Metrics {
    /// Counts one `operation` that began at `started` and ended now.
    pub(crate) fn observe(&self, operation: &'static str, started: Instant, ok: bool) {
        let labels = OpLabels {
            operation,
            result: if ok { "ok" } else { "error" },
        };
        self.operations.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts a command the checks or a policy denied.
    pub(crate) fn denied(&self) {
        self.denials.inc();
    }
}

impl Engine {
    /// Every metric, in the Prometheus text format ([`METRICS_CONTENT_TYPE`]).
    pub async fn metrics_text(self: &Arc<Self>) -> Result<String> {
        self.blocking(|e| e.metrics_blocking()).await
    }

    fn metrics_blocking(&self) -> Result<String> {
        let mut reg = Registry::with_prefix("devbox");
        reg.register(
            "operations",
            "Operations that ended, by operation and result",
            self.metrics.operations.clone(),
        );
        reg.register(
            "operation_duration_seconds",
            "How long operations took (exec: until its command started)",
            self.metrics.latency.clone(),
        );
        reg.register(
            "policy_denials",
            "Commands the command checks or a policy denied",
            self.metrics.denials.clone(),
        );
        let pending: Gauge = Gauge::default();
        pending.set(self.store.approvals(true)?.len() as i64);
        reg.register(
            "approvals_pending",
            "Commands waiting for an approval",
            pending,
        );
        let pool = self.pool.info();
        let used: Gauge = Gauge::default();
        used.set(i64::try_from(pool.used_bytes).unwrap_or(i64::MAX));
        reg.register("pool_used_bytes", "Bytes used in the storage pool", used);
        let size: Gauge = Gauge::default();
        size.set(i64::try_from(pool.total_bytes).unwrap_or(i64::MAX));
        reg.register("pool_size_bytes", "Size of the storage pool", size);

        let cpu: Family<SandboxLabels, Counter<f64, std::sync::atomic::AtomicU64>> =
            Family::default();
        let mem: Family<SandboxLabels, Gauge> = Family::default();
        let pids: Family<SandboxLabels, Gauge> = Family::default();
        let running: Gauge = Gauge::default();
        for rec in self.store.sandboxes()? {
            if rec.state != devbox_store::SandboxState::Running {
                continue;
            }
            let Ok((backend, inst)) = self.backend_of(&rec) else {
                continue;
            };
            running.inc();
            let u = backend.usage(&inst);
            let l = SandboxLabels {
                sandbox: rec.name.clone(),
            };
            cpu.get_or_create(&l).inc_by(u.cpu_usec as f64 / 1e6);
            mem.get_or_create(&l)
                .set(i64::try_from(u.memory_bytes).unwrap_or(i64::MAX));
            pids.get_or_create(&l)
                .set(i64::try_from(u.pids).unwrap_or(i64::MAX));
        }
        reg.register("sandboxes_running", "Sandboxes that run", running);
        reg.register(
            "sandbox_cpu_seconds",
            "CPU time a running sandbox consumed since it started",
            cpu,
        );
        reg.register(
            "sandbox_memory_bytes",
            "Memory charged to a running sandbox",
            mem,
        );
        reg.register(
            "sandbox_pids",
            "Processes and threads of a running sandbox",
            pids,
        );
        let hooks: Family<WebhookLabels, Counter> = Family::default();
        for (url, delivered, failed, dropped) in self.webhook_counts() {
            for (result, n) in [
                ("delivered", delivered),
                ("failed", failed),
                ("dropped", dropped),
            ] {
                hooks
                    .get_or_create(&WebhookLabels {
                        url: url.clone(),
                        result,
                    })
                    .inc_by(n);
            }
        }
        reg.register(
            "webhook_events",
            "Events per webhook: delivered, failed after every retry, dropped from a full queue",
            hooks,
        );
        let firing: Gauge = Gauge::default();
        firing.set(self.alerts_firing() as i64);
        reg.register("alerts_firing", "Alerts that fire now", firing);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg).map_err(|e| {
            EngineError::internal(
                "encoding metrics",
                crate::InternalSource::Invariant(e.to_string().into()),
            )
        })?;
        Ok(out)
    }
}
