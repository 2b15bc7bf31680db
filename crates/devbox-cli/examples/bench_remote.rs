//! Exec round trips through the API, for scripts/bench_remote.sh: `CLIENTS` concurrent
//! clients each run `EXECS` execs of `true` in `SANDBOX` (REST exec, or the exec WebSocket
//! with `--stream`) and the latencies are printed: median, p90, p99, max, errors and the rate.
//! The daemon is found as the CLI finds it: DEVBOX_HOST, DEVBOX_TOKEN and DEVBOX_CA_CERT,
//! else DEVBOX_SOCKET.
//!
//! Usage: bench_remote SANDBOX CLIENTS EXECS [--stream]

use std::time::{Duration, Instant};

use devbox_client::Client;
use devbox_wire::ExecRequest;
use devbox_wire::stream::{ClientMsg, ServerMsg};
use futures_util::StreamExt;

fn client() -> Client {
    match std::env::var("DEVBOX_HOST").ok().filter(|h| !h.is_empty()) {
        Some(h) => Client::remote(
            &h,
            std::env::var("DEVBOX_TOKEN").ok(),
            std::env::var_os("DEVBOX_CA_CERT")
                .map(std::path::PathBuf::from)
                .as_deref(),
        )
        .expect("DEVBOX_HOST"),
        None => Client::new(
            std::env::var("DEVBOX_SOCKET").unwrap_or_else(|_| "/run/dev-box/api.sock".into()),
        ),
    }
}

async fn one(c: &Client, sandbox: &str, stream: bool) -> Result<(), String> {
    let req = ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };
    if !stream {
        let r = c.exec(sandbox, &req).await.map_err(|e| e.to_string())?;
        return if r.exit_code == 0 {
            Ok(())
        } else {
            Err(format!("exit {:?}", r.exit_code))
        };
    }
    let first = ClientMsg::Exec {
        exec: req,
        stdin: false,
        no_wait: true,
    };
    let path = format!("/v1/sandboxes/{sandbox}/exec/stream");
    let (mut ws, _, _) = c
        .stream(&path, &first, |_| {})
        .await
        .map_err(|e| e.to_string())?;
    while let Some(m) = ws.next().await {
        let m = m.map_err(|e| e.to_string())?;
        if let Ok(t) = m.to_text()
            && let Ok(ServerMsg::Exit { code, .. }) = serde_json::from_str::<ServerMsg>(t)
        {
            return if code == 0 {
                Ok(())
            } else {
                Err(format!("exit {code:?}"))
            };
        }
    }
    Err("the stream ended without an exit".into())
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: bench_remote SANDBOX CLIENTS EXECS [--stream]");
        std::process::exit(2);
    }
    let sandbox = args[1].clone();
    let clients: usize = args[2].parse().expect("CLIENTS");
    let execs: usize = args[3].parse().expect("EXECS");
    let stream = args.get(4).is_some_and(|a| a == "--stream");
    let c = client();
    // Warm up (the first exec of a sandbox does one-time work).
    for _ in 0..3 {
        let _ = one(&c, &sandbox, stream).await;
    }
    let begun = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (c, sandbox) = (c.clone(), sandbox.clone());
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::with_capacity(execs);
            let mut errors = Vec::new();
            for _ in 0..execs {
                let t = Instant::now();
                match one(&c, &sandbox, stream).await {
                    Ok(()) => times.push(t.elapsed()),
                    Err(e) => errors.push(e),
                }
            }
            (times, errors)
        }));
    }
    let mut times = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        let (ts, es) = t.await.expect("client task");
        times.extend(ts);
        errors.extend(es);
    }
    let wall = begun.elapsed().as_secs_f64();
    times.sort();
    println!(
        "{} clients x {} execs ({}): median {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} errors, {:.0} execs/s",
        clients,
        execs,
        if stream { "exec stream" } else { "REST exec" },
        pct(&times, 0.5),
        pct(&times, 0.9),
        pct(&times, 0.99),
        pct(&times, 1.0),
        errors.len(),
        times.len() as f64 / wall
    );
    if let Some(e) = errors.first() {
        println!("first error: {e}");
    }
}
