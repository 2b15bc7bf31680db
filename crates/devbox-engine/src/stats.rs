//! Live resource use of sandboxes (`stats`) and the processes inside one (`ps`).
//!
//! CPU %: the backend reports cumulative CPU time; a percentage needs two samples. The
//! daemon keeps the last two samples of each sandbox (a new one replaces the older when the
//! newer is at least [`KEEP_EVERY`] old) and averages over the newest kept sample that is
//! between [`MIN_WINDOW`] and [`MAX_WINDOW`] old. A sandbox without one (the first call, or
//! none for [`MAX_WINDOW`]) is sampled again after [`MIN_WINDOW`]: one shared wait for all
//! of them, so a first call costs [`MIN_WINDOW`] more and repeated calls (`--watch`, a
//! scraper) none. Everything else is read from cgroup files, a btrfs qgroup ioctl and the
//! host veths' counters (one read of /proc/self/net/dev): no process per sandbox.
//!
//! `ps`: the backend lists the sandbox's processes (host /proc, hostile text escaped); the
//! engine ties each to a live exec it knows: its command, the exec's own cgroup, the
//! session the command leads, or ancestry; what fits none is reported as unknown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devbox_store::{SandboxRecord, SandboxState};
use devbox_wire::{Attribution, ProcessList, ProcessRow, SandboxStats};

use crate::{Engine, EngineError, Result};

/// The shortest window a CPU % is averaged over.
pub const MIN_WINDOW: Duration = Duration::from_millis(100);
/// The longest: an older sample is not used (the sandbox is sampled anew).
pub const MAX_WINDOW: Duration = Duration::from_secs(10);
/// How often a kept sample is replaced.
const KEEP_EVERY: Duration = Duration::from_millis(500);

/// Per sandbox id: (exec id, pid inside, when it started) of its execs whose session is open.
type LiveExecs = Arc<Mutex<HashMap<String, Vec<(String, i32, Instant)>>>>;

#[derive(Debug, Clone, Copy)]
struct CpuSample {
    at: Instant,
    cpu_usec: u64,
}

/// The monitor's state: CPU samples and the live execs of each sandbox.
#[derive(Debug, Default)]
pub(crate) struct Monitor {
    /// Per sandbox id and init pid: the newest and the previous kept sample.
    samples: Mutex<HashMap<String, (CpuSample, Option<CpuSample>)>>,
    /// Per sandbox id: (exec id, pid inside) of its execs whose session is open.
    execs: LiveExecs,
}

/// Registers a live exec for `ps` until dropped (with its [`crate::ExecSession`]).
#[derive(Debug)]
pub(crate) struct LiveExec {
    execs: LiveExecs,
    sandbox_id: String,
    exec_id: String,
}

impl Drop for LiveExec {
    fn drop(&mut self) {
        let mut map = self.execs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = map.get_mut(&self.sandbox_id) {
            v.retain(|(id, _, _)| id != &self.exec_id);
            if v.is_empty() {
                map.remove(&self.sandbox_id);
            }
        }
    }
}

impl Monitor {
    /// Whether the sandbox has an exec whose session is open.
    pub(crate) fn has_execs(&self, sandbox_id: &str) -> bool {
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sandbox_id)
            .is_some_and(|v| !v.is_empty())
    }

    pub(crate) fn exec_started(&self, sandbox_id: &str, exec_id: &str, pid: i32) -> LiveExec {
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(sandbox_id.to_string())
            .or_default()
            .push((exec_id.to_string(), pid, Instant::now()));
        LiveExec {
            execs: self.execs.clone(),
            sandbox_id: sandbox_id.to_string(),
            exec_id: exec_id.to_string(),
        }
    }

    /// The longest-running live exec of each sandbox (by id): (exec id, how long it runs).
    pub(crate) fn longest_execs(&self) -> HashMap<String, (String, Duration)> {
        let map = self.execs.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter_map(|(sb, v)| {
                v.iter()
                    .min_by_key(|(_, _, at)| *at)
                    .map(|(id, _, at)| (sb.clone(), (id.clone(), at.elapsed())))
            })
            .collect()
    }

    /// The base to average from, and keeps `now` as a sample when due.
    fn base(&self, key: &str, now: CpuSample) -> Option<CpuSample> {
        let mut map = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let usable = |s: &CpuSample| {
            let age = now.at.saturating_duration_since(s.at);
            age >= MIN_WINDOW && age <= MAX_WINDOW && s.cpu_usec <= now.cpu_usec
        };
        let base = map.get(key).and_then(|(last, prev)| {
            if usable(last) {
                Some(*last)
            } else {
                prev.filter(usable)
            }
        });
        match map.get_mut(key) {
            Some((last, prev)) => {
                if now.at.saturating_duration_since(last.at) >= KEEP_EVERY
                    || last.cpu_usec > now.cpu_usec
                {
                    *prev = Some(*last);
                    *last = now;
                }
            }
            None => {
                map.insert(key.to_string(), (now, None));
            }
        }
        base
    }

    fn forget_stale(&self) {
        let mut map = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (last, _)| last.at.elapsed() < MAX_WINDOW * 6);
    }
}

fn percent(base: CpuSample, now: CpuSample) -> (f64, u64) {
    let window = now.at.saturating_duration_since(base.at);
    let us = window.as_micros().max(1) as f64;
    let pct = (now.cpu_usec.saturating_sub(base.cpu_usec)) as f64 * 100.0 / us;
    ((pct * 10.0).round() / 10.0, window.as_millis() as u64)
}

impl Engine {
    /// Resource use of the named sandboxes (none named: all of them; `running_only`: those
    /// that run), by name. See the module's documentation for how CPU % is measured.
    pub async fn stats(
        self: &Arc<Self>,
        names: Vec<String>,
        running_only: bool,
    ) -> Result<Vec<SandboxStats>> {
        self.blocking(move |e| e.stats_blocking(&names, running_only))
            .await
    }

    /// Resource use of one sandbox.
    pub async fn sandbox_stats(self: &Arc<Self>, name: &str) -> Result<SandboxStats> {
        let names = vec![name.to_string()];
        let mut v = self
            .blocking(move |e| e.stats_blocking(&names, false))
            .await?;
        v.pop().ok_or_else(|| {
            EngineError::internal(
                "stats",
                crate::InternalSource::Invariant("no sandbox measured".into()),
            )
        })
    }

    fn stats_blocking(&self, names: &[String], running_only: bool) -> Result<Vec<SandboxStats>> {
        let mut recs = if names.is_empty() {
            self.store.sandboxes()?
        } else {
            let mut seen = std::collections::HashSet::new();
            names
                .iter()
                .filter(|n| seen.insert(n.as_str()))
                .map(|n| self.record(n))
                .collect::<Result<Vec<_>>>()?
        };
        if running_only {
            recs.retain(|r| r.state == SandboxState::Running);
        }
        let links = match &self.net {
            Ok(net) => net.link_bytes(),
            Err(_) => HashMap::new(),
        };
        let mut rows = Vec::with_capacity(recs.len());
        let mut again = Vec::new();
        for rec in &recs {
            let (row, sample) = self.measure(rec, &links);
            if let Some(now) = sample {
                match self.monitor.base(&cpu_key(rec), now) {
                    Some(base) => {
                        let (pct, ms) = percent(base, now);
                        rows.push(SandboxStats {
                            cpu_percent: Some(pct),
                            cpu_window_ms: ms,
                            ..row
                        });
                    }
                    None => {
                        again.push((rows.len(), now));
                        rows.push(row);
                    }
                }
            } else {
                rows.push(row);
            }
        }
        if !again.is_empty() {
            std::thread::sleep(MIN_WINDOW);
            for (i, first) in again {
                let rec = &recs[i];
                let (row, sample) = self.measure(rec, &links);
                if let Some(now) = sample {
                    self.monitor.base(&cpu_key(rec), now);
                    let (pct, ms) = percent(first, now);
                    rows[i] = SandboxStats {
                        cpu_percent: Some(pct),
                        cpu_window_ms: ms,
                        ..row
                    };
                } else {
                    rows[i] = row;
                }
            }
        }
        if names.is_empty() {
            self.monitor.forget_stale();
        }
        Ok(rows)
    }

    /// One sandbox's use now (no CPU % yet), and its CPU sample if it runs.
    fn measure(
        &self,
        rec: &SandboxRecord,
        links: &HashMap<String, (u64, u64)>,
    ) -> (SandboxStats, Option<CpuSample>) {
        let limits = Self::manifest_of(rec)
            .ok()
            .and_then(|m| m.spec.resolved_limits().ok());
        let mut row = SandboxStats {
            name: rec.name.clone(),
            id: rec.id.clone(),
            state: crate::to_wire::sandbox_state(rec.state),
            cpu_percent: None,
            cpu_window_ms: 0,
            cpu_usec: 0,
            memory_bytes: 0,
            memory_limit_bytes: limits.as_ref().map_or(0, |l| l.memory_bytes),
            memory_peak_bytes: 0,
            pids: 0,
            pids_limit: limits.as_ref().map_or(0, |l| l.pids),
            oom_kills: 0,
            disk_used_bytes: None,
            disk_limit_bytes: None,
            net_rx_bytes: None,
            net_tx_bytes: None,
        };
        if let Some(d) = self.disk_usage(rec) {
            row.disk_used_bytes = Some(d.used_bytes);
            row.disk_limit_bytes = d.limit_bytes;
        }
        if rec.state != SandboxState::Running {
            return (row, None);
        }
        let Ok((backend, inst)) = self.backend_of(rec) else {
            return (row, None);
        };
        let at = Instant::now();
        let u = backend.usage(&inst);
        row.cpu_usec = u.cpu_usec;
        row.memory_bytes = u.memory_bytes;
        row.memory_peak_bytes = u.memory_peak_bytes;
        row.pids = u.pids;
        row.oom_kills = u.oom_kills;
        if let Some((rx, tx)) = links.get(&rec.id).copied() {
            row.net_rx_bytes = Some(rx);
            row.net_tx_bytes = Some(tx);
        }
        (
            row,
            Some(CpuSample {
                at,
                cpu_usec: u.cpu_usec,
            }),
        )
    }

    /// The processes inside a running sandbox and the exec each belongs to.
    pub async fn processes(self: &Arc<Self>, name: &str) -> Result<ProcessList> {
        let name = name.to_string();
        self.blocking(move |e| e.processes_blocking(&name)).await
    }

    fn processes_blocking(&self, name: &str) -> Result<ProcessList> {
        let rec = self.record(name)?;
        if rec.state != SandboxState::Running {
            return Err(EngineError::WrongState(format!(
                "sandbox {name} is not running: it has no processes"
            )));
        }
        let (backend, inst) = self.backend_of(&rec)?;
        let samples = backend.process_table(&inst)?;
        let execs: Vec<(String, i32)> = self
            .monitor
            .execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&rec.id)
            .map(|v| v.iter().map(|(id, pid, _)| (id.clone(), *pid)).collect())
            .unwrap_or_default();
        let inside: HashMap<i32, i32> = samples
            .iter()
            .filter_map(|s| Some((s.host_pid, s.pid?)))
            .collect();
        let by_host: HashMap<i32, &devbox_backend::ProcessSample> =
            samples.iter().map(|s| (s.host_pid, s)).collect();
        let exec_of_pid: HashMap<i32, &str> =
            execs.iter().map(|(id, pid)| (*pid, id.as_str())).collect();
        // An exec's own cgroup, known from its command's process while that lives.
        let mut exec_of_cgroup: HashMap<&str, &str> = HashMap::new();
        for s in &samples {
            if let (Some(cg), Some(pid)) = (&s.exec_cgroup, s.pid)
                && let Some(id) = exec_of_pid.get(&pid)
            {
                exec_of_cgroup.insert(cg.as_str(), id);
            }
        }
        let init = inst.process.map(|p| p.pid);
        let base = rec.uid_base;
        let mut rows: Vec<ProcessRow> = samples
            .iter()
            .map(|s| {
                let (exec, attribution) =
                    attribute(s, init, &inside, &by_host, &exec_of_pid, &exec_of_cgroup);
                ProcessRow {
                    pid: s.pid,
                    ppid: inside.get(&s.host_ppid).copied(),
                    host_pid: s.host_pid,
                    uid: s
                        .host_uid
                        .checked_sub(base)
                        .filter(|u| *u < devbox_store::ID_RANGE),
                    cpu_usec: s.cpu_usec,
                    rss_bytes: s.rss_bytes,
                    command: s.command.clone(),
                    exec: exec.map(str::to_string),
                    attribution,
                }
            })
            .collect();
        rows.sort_by_key(|r| (r.pid.unwrap_or(i32::MAX), r.host_pid));
        Ok(ProcessList {
            sandbox: rec.name,
            processes: rows,
        })
    }
}

pub(crate) fn cpu_key(rec: &SandboxRecord) -> String {
    format!("{}:{}", rec.id, rec.init_pid.unwrap_or(0))
}

fn attribute<'a>(
    s: &devbox_backend::ProcessSample,
    init: Option<i32>,
    inside: &HashMap<i32, i32>,
    by_host: &HashMap<i32, &devbox_backend::ProcessSample>,
    exec_of_pid: &HashMap<i32, &'a str>,
    exec_of_cgroup: &HashMap<&str, &'a str>,
) -> (Option<&'a str>, Attribution) {
    if Some(s.host_pid) == init {
        return (None, Attribution::Init);
    }
    if let Some(id) = s.pid.and_then(|p| exec_of_pid.get(&p)) {
        return (Some(id), Attribution::Exec);
    }
    if let Some(id) = s
        .exec_cgroup
        .as_deref()
        .and_then(|cg| exec_of_cgroup.get(cg))
    {
        return (Some(id), Attribution::Cgroup);
    }
    if let Some(id) = inside.get(&s.host_sid).and_then(|sid| exec_of_pid.get(sid)) {
        return (Some(id), Attribution::Session);
    }
    // Up the parents (bounded: pids could form no cycle, but the table is a snapshot).
    let mut cur = s.host_ppid;
    for _ in 0..by_host.len() {
        let Some(p) = by_host.get(&cur) else { break };
        if let Some(id) = p.pid.and_then(|pid| exec_of_pid.get(&pid)) {
            return (Some(id), Attribution::Ancestry);
        }
        cur = p.host_ppid;
    }
    (None, Attribution::Unknown)
}
