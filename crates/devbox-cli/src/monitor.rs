//! `sandbox stats` and `sandbox ps`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use devbox_client::{Client, Followed};
use devbox_wire::{Attribution, Event, EventsQuery, ProcessList, SandboxStats};

use crate::cli::{Command, Format};
use crate::commands::print_json;
use crate::output::{bytes, table};

/// Runs `stats` or `ps`; returns the exit code.
pub async fn command(c: &Client, cmd: &Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Stats {
            names,
            watch,
            interval,
            format,
        } => {
            if !interval.is_finite() || *interval < 0.1 || *interval > 3600.0 {
                anyhow::bail!("--interval must be between 0.1 and 3600 seconds");
            }
            let tty = std::io::stdout().is_terminal();
            loop {
                let rows = c.stats(names, names.is_empty()).await?;
                if *format == Format::Json {
                    if *watch {
                        println!("{}", serde_json::to_string(&rows)?);
                    } else {
                        print_json(&rows)?;
                    }
                } else {
                    if *watch && tty {
                        // Home and clear, like top.
                        print!("\x1b[H\x1b[2J");
                    }
                    stats_table(&rows);
                    if *watch && !tty {
                        println!();
                    }
                }
                std::io::stdout().flush()?;
                if !*watch {
                    return Ok(0);
                }
                tokio::time::sleep(Duration::from_secs_f64(*interval)).await;
            }
        }
        Command::Ps { name, format } => {
            let list = c.ps(name).await?;
            if *format == Format::Json {
                print_json(&list)?;
            } else {
                ps_table(&list);
            }
            Ok(0)
        }
        Command::Events {
            sandbox,
            since,
            kind,
            follow,
            limit,
            format,
        } => {
            let q = EventsQuery {
                sandbox: sandbox.clone(),
                since: since.clone(),
                kind: kind.clone(),
                follow: *follow,
                limit: Some(*limit),
            };
            let json = *format == Format::Json;
            if !json {
                print_event_header();
            }
            if *follow {
                let mut f = c.follow_events(&q).await?;
                loop {
                    match f.next().await? {
                        Followed::Event(e) => print_event(&e, json)?,
                        Followed::Lagged(n) => {
                            eprintln!("sandbox: the stream fell behind by {n} events; they follow")
                        }
                    }
                    std::io::stdout().flush()?;
                }
            }
            for e in c.events(&q).await? {
                print_event(&e, json)?;
            }
            Ok(0)
        }
        Command::Webhooks { format } => {
            let hooks = c.webhooks().await?;
            if *format == Format::Json {
                print_json(&hooks)?;
            } else if hooks.is_empty() {
                println!("no webhooks (configure them with sandboxd --webhook or --config)");
            } else {
                let rows: Vec<Vec<String>> = hooks
                    .iter()
                    .map(|h| {
                        vec![
                            h.url.clone(),
                            h.delivered.to_string(),
                            h.failed.to_string(),
                            h.dropped.to_string(),
                            h.queued.to_string(),
                            h.last_success_at.clone().unwrap_or_else(|| "-".into()),
                            match (&h.last_error, &h.last_error_at) {
                                (Some(e), Some(t)) => format!("{t} {e}"),
                                (Some(e), None) => e.clone(),
                                _ => "-".into(),
                            },
                        ]
                    })
                    .collect();
                table(
                    &[
                        "URL",
                        "DELIVERED",
                        "FAILED",
                        "DROPPED",
                        "QUEUED",
                        "LAST SUCCESS",
                        "LAST ERROR",
                    ],
                    &rows,
                );
            }
            Ok(0)
        }
        _ => unreachable!("monitor::command is called for stats, ps, events and webhooks only"),
    }
}

fn opt_bytes(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), bytes)
}

fn stats_table(rows: &[SandboxStats]) {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|s| {
            let mem_pct = if s.memory_limit_bytes > 0 {
                format!(
                    "{:.1}%",
                    s.memory_bytes as f64 * 100.0 / s.memory_limit_bytes as f64
                )
            } else {
                "-".into()
            };
            let disk = match (s.disk_used_bytes, s.disk_limit_bytes) {
                (Some(u), Some(l)) => format!("{} / {}", bytes(u), bytes(l)),
                (Some(u), None) => bytes(u),
                _ => "-".into(),
            };
            let net = match (s.net_rx_bytes, s.net_tx_bytes) {
                (None, None) => "-".into(),
                (rx, tx) => format!("{} / {}", opt_bytes(rx), opt_bytes(tx)),
            };
            vec![
                s.name.clone(),
                s.cpu_percent
                    .map_or_else(|| "-".into(), |p| format!("{p:.1}%")),
                format!(
                    "{} / {}",
                    bytes(s.memory_bytes),
                    bytes(s.memory_limit_bytes)
                ),
                mem_pct,
                bytes(s.memory_peak_bytes),
                format!("{} / {}", s.pids, s.pids_limit),
                disk,
                net,
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "CPU %",
            "MEM USE / LIMIT",
            "MEM %",
            "MEM PEAK",
            "PIDS",
            "DISK",
            "NET IN / OUT",
        ],
        &cells,
    );
}

fn cpu_time(usec: u64) -> String {
    let cs = usec / 10_000;
    format!("{}:{:02}.{:02}", cs / 6000, (cs / 100) % 60, cs % 100)
}

fn ps_table(list: &ProcessList) {
    let opt = |v: Option<i32>| v.map_or_else(|| "?".into(), |p| p.to_string());
    let cells: Vec<Vec<String>> = list
        .processes
        .iter()
        .map(|p| {
            vec![
                opt(p.pid),
                opt(p.ppid),
                p.uid.map_or_else(|| "?".into(), |u| u.to_string()),
                cpu_time(p.cpu_usec),
                bytes(p.rss_bytes),
                p.exec.clone().unwrap_or_else(|| "-".into()),
                match p.attribution {
                    Attribution::Cgroup => "cgroup",
                    Attribution::Exec => "exec",
                    Attribution::Session => "session",
                    Attribution::Ancestry => "ancestry",
                    Attribution::Init => "init",
                    Attribution::Unknown => "unknown",
                }
                .into(),
                p.command.clone(),
            ]
        })
        .collect();
    table(
        &[
            "PID", "PPID", "USER", "TIME", "RSS", "EXEC", "HOW", "COMMAND",
        ],
        &cells,
    );
}

const EVENT_COLUMNS: [(&str, usize); 6] = [
    ("ID", 7),
    ("TIME", 24),
    ("KIND", 10),
    ("ACTION", 16),
    ("SANDBOX", 16),
    ("CALLER", 12),
];

fn print_event_header() {
    let mut line = String::new();
    for (name, width) in EVENT_COLUMNS {
        line.push_str(&format!("{name:<width$} "));
    }
    println!("{line}DETAILS");
}

/// One event: a table row (columns of fixed width, so rows line up as they stream) or a
/// JSON line.
fn print_event(e: &Event, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(e)?);
        return Ok(());
    }
    let cells = [
        e.id.to_string(),
        e.time.clone(),
        e.kind.clone(),
        e.action.clone(),
        e.sandbox.clone().unwrap_or_else(|| "-".into()),
        e.caller.clone(),
    ];
    let mut line = String::new();
    for ((_, width), cell) in EVENT_COLUMNS.iter().zip(cells) {
        line.push_str(&format!("{cell:<width$} "));
    }
    println!("{line}{}", crate::commands::audit_summary(&e.details));
    Ok(())
}
