//! Tables and human-friendly figures.

use std::time::{Duration, SystemTime};

/// Prints rows as left-aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// "3 minutes ago" for an RFC 3339 time.
pub fn ago(rfc3339: &str) -> String {
    let Ok(t) = humantime::parse_rfc3339_weak(rfc3339) else {
        return rfc3339.to_string();
    };
    let d = SystemTime::now()
        .duration_since(t)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    match d {
        0..=59 => format!("{d} seconds ago"),
        60..=3599 => format!("{} minutes ago", d / 60),
        3600..=86399 => format!("{} hours ago", d / 3600),
        _ => format!("{} days ago", d / 86400),
    }
}

/// Bytes for people.
pub fn bytes(n: u64) -> String {
    devbox_spec::quantity::format_bytes(n)
}

/// A time in ms since the epoch, as RFC 3339 (seconds, UTC).
pub fn time_ms(ms: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A sandbox's limits on one line: `memory 2.0 GiB, cpu 2, pids 2048, disk 20.0 GiB, exec
/// timeout 5m` (disk and exec timeout only when set).
pub fn limits(l: &devbox_spec::ResolvedLimits) -> String {
    let mut s = format!(
        "memory {}, cpu {}, pids {}",
        bytes(l.memory_bytes),
        l.cpu_millis as f64 / 1000.0,
        l.pids
    );
    if let Some(d) = l.disk_bytes {
        s.push_str(&format!(", disk {}", bytes(d)));
    }
    if let Some(t) = l.exec_timeout_ms {
        s.push_str(&format!(
            ", exec timeout {}",
            devbox_spec::quantity::format_duration_ms(t)
        ));
    }
    s
}

/// A sandbox's state as `ls` shows it: the lifecycle state, then its health and whether the
/// idle handling froze or stopped it (`running (healthy)`, `running (frozen)`,
/// `stopped (idle)`).
pub fn state(s: &devbox_wire::SandboxInfo) -> String {
    let mut text = serde_json::to_string(&s.state)
        .unwrap_or_default()
        .trim_matches('"')
        .to_string();
    let mut notes = Vec::new();
    if let Some(h) = &s.health {
        notes.push(h.status.as_str());
    }
    if let Some(i) = &s.idle {
        if i.frozen {
            notes.push("frozen");
        } else if i.stopped {
            notes.push("idle");
        }
    }
    if !notes.is_empty() {
        text.push_str(&format!(" ({})", notes.join(", ")));
    }
    text
}
