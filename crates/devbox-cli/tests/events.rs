//! Events, webhooks and alerts through the real CLI and daemon: the event stream (JSON,
//! `--follow`, Server-Sent Events resumed with Last-Event-ID), limit events (an OOM kill, a
//! fork refused at the pids limit), webhooks (signed posts checked with the secret, retries
//! after 500s, a dead and a hanging receiver that slow nothing down) and alerts (memory,
//! long exec, denied commands: each firing and resolving, shown by inspect).
//!
//! Every receiver listens on 127.0.0.1 in the test itself.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestEnv;
use hmac::{Hmac, KeyInit, Mac};

fn events(env: &TestEnv, args: &[&str]) -> Vec<serde_json::Value> {
    let mut a = vec!["events", "--format", "json"];
    a.extend_from_slice(args);
    env.ok(&a)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// Waits until `events` (with `args`) holds one that `pred` accepts; returns it.
fn wait_event(
    env: &TestEnv,
    args: &[&str],
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(e) = events(env, args).into_iter().find(|e| pred(e)) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} event: {:?}\n{}",
            events(env, &[]),
            env.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An environment whose daemon samples often and reads `config` (YAML).
fn env_with(config: &str) -> TestEnv {
    let mut env = TestEnv::new();
    let file = env.root.path().join("sandboxd.yaml");
    std::fs::write(&file, config).unwrap();
    env.stop_daemon();
    env.daemon_env
        .push(("DEVBOX_MONITOR_INTERVAL".into(), "300ms".into()));
    env.daemon_env
        .push(("DEVBOX_CONFIG".into(), file.display().to_string()));
    env.start_daemon();
    env
}

/// Sends a raw request over the daemon's socket and returns the stream.
fn request(env: &TestEnv, path: &str, headers: &str) -> std::os::unix::net::UnixStream {
    let mut s = std::os::unix::net::UnixStream::connect(&env.socket).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"
    )
    .expect("send");
    s
}

/// Reads Server-Sent Events until `n` events came; returns their (id, event).
fn read_sse(s: std::os::unix::net::UnixStream, n: usize) -> Vec<(i64, serde_json::Value)> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    let mut id = None;
    let mut line = String::new();
    while out.len() < n {
        line.clear();
        if r.read_line(&mut line).expect("read the stream") == 0 {
            break;
        }
        let l = line.trim_end();
        if let Some(v) = l.strip_prefix("id:") {
            id = v.trim().parse().ok();
        } else if let Some(d) = l.strip_prefix("data:") {
            // Chunked encoding: data lines are whole; size lines are skipped.
            let v: serde_json::Value = serde_json::from_str(d.trim()).expect("event json");
            out.push((id.take().expect("id before data"), v));
        }
    }
    out
}

#[test]
fn events_list_follow_and_resume_without_gaps() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "ev"]);
    env.ok(&["exec", "ev", "true"]);
    let all = events(&env, &["--sandbox", "ev"]);
    let kinds: Vec<(&str, &str)> = all
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["action"].as_str().unwrap()))
        .collect();
    assert!(
        kinds.contains(&("lifecycle", "sandbox.create")),
        "{kinds:?}"
    );
    assert!(kinds.contains(&("exec", "exec")), "{kinds:?}");
    for e in &all {
        assert!(e["id"].as_i64().unwrap() > 0 && e["time"].is_string() && e["caller"] == "root");
        assert_eq!(e["sandbox"], "ev");
    }
    // Filters: kind, since.
    assert!(
        events(&env, &["--kind", "exec"])
            .iter()
            .all(|e| e["kind"] == "exec")
    );
    assert!(events(&env, &["--since", "2099-01-01T00:00:00Z"]).is_empty());
    assert!(!events(&env, &["--since", "10m"]).is_empty());
    let table = env.ok(&["events", "--sandbox", "ev"]);
    assert!(
        table.starts_with("ID") && table.contains("sandbox.create"),
        "{table}"
    );
    let bad = env.fails(&["events", "--since", "yesterday-ish"]);
    assert!(bad.contains("--since"), "{bad}");

    // --follow: only new events, as they happen.
    let mut child = env
        .cmd()
        .args(["events", "--follow", "--format", "json", "--sandbox", "ev"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    std::thread::sleep(Duration::from_millis(300));
    env.ok(&["snapshot", "ev"]);
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["action"], "snapshot.create", "{first}");
    assert_eq!(first["kind"], "snapshot");
    let _ = child.kill();
    let _ = child.wait();

    // Server-Sent Events: resumed after Last-Event-ID, every later id once, in order,
    // the stored ones and then live ones.
    let newest = events(&env, &[]).last().unwrap()["id"].as_i64().unwrap();
    let from = newest - 3;
    let s = request(
        &env,
        "/v1/events?follow=true",
        &format!("Last-Event-ID: {from}\r\n"),
    );
    // One more event, recorded while (or before) the stream subscribes: either way once.
    env.ok(&["exec", "ev", "true"]);
    let got = read_sse(s, 4);
    let ids: Vec<i64> = got.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (from + 1..=from + 4).collect::<Vec<_>>(), "{got:?}");
    for (id, e) in &got {
        assert_eq!(e["id"].as_i64(), Some(*id));
    }
    // A bad Last-Event-ID is refused.
    let mut s = request(&env, "/v1/events?follow=true", "Last-Event-ID: nope\r\n");
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    env.ok(&["destroy", "ev"]);
}

#[test]
fn oom_kills_and_pids_limit_hits_are_events() {
    require_root!();
    let env = env_with("{}\n");
    env.allow_everything();
    env.ok(&["create", "lim", "--memory", "32Mi", "--pids", "16"]);
    // Holds more than the limit: the OOM killer ends it.
    let _ = env.sb(&["exec", "lim", "python3 -c 'b = b\"x\" * (96 << 20)'"]);
    let oom = wait_event(
        &env,
        &["--sandbox", "lim", "--kind", "limit"],
        "limit.oom",
        |e| e["action"] == "limit.oom",
    );
    assert!(oom["details"]["count"].as_u64().unwrap() >= 1, "{oom}");
    assert_eq!(oom["caller"], "monitor");
    // More processes than the limit: forks are refused.
    let _ = env.sb(&[
        "exec",
        "lim",
        "for i in $(seq 40); do sleep 2 & done 2>/dev/null; wait",
    ]);
    let pids = wait_event(
        &env,
        &["--sandbox", "lim", "--kind", "limit"],
        "limit.pids",
        |e| e["action"] == "limit.pids",
    );
    assert!(pids["details"]["count"].as_u64().unwrap() >= 1, "{pids}");
    assert_eq!(pids["details"]["limit"], 16);
    env.ok(&["destroy", "lim"]);
}

/// A receiver on 127.0.0.1: answers each request with the next status of `statuses` (then
/// 200), or holds it unanswered (`hang`); keeps every request's headers and body.
/// Requests a receiver got: (head, body).
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

struct Receiver {
    port: u16,
    got: Received,
}

fn receiver(statuses: Vec<u16>, hang: bool) -> Receiver {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got: Received = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        let mut statuses = statuses.into_iter();
        let mut held = Vec::new();
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            g.lock().unwrap().push((head, body));
            if hang {
                held.push(c);
                continue;
            }
            let status = statuses.next().unwrap_or(200);
            let _ = write!(
                c,
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    Receiver { port, got }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn webhooks(env: &TestEnv) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&env.ok(&["webhooks", "--format", "json"]))
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn webhooks_are_signed_retried_and_counted() {
    require_root!();
    let good = receiver(vec![500, 500], false);
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("hook.key");
    std::fs::write(&secret, "s3cret-key\n").unwrap();
    let env = env_with(&format!(
        "webhooks:\n  - url: http://127.0.0.1:{}/hook?token=abc\n    secretFile: {}\n    kinds: [lifecycle]\n    sandboxes: [wh]\n    timeout: 2s\n",
        good.port,
        secret.display()
    ));
    env.ok(&["create", "wh"]);
    env.ok(&["create", "other"]);
    // sandbox.create of wh: answered 500 twice, then delivered on the third attempt.
    wait_for("three attempts", || good.got.lock().unwrap().len() >= 3);
    wait_for("the delivery to count", || {
        webhooks(&env)[0]["delivered"] == 1
    });
    let got = good.got.lock().unwrap().clone();
    let (head, body) = &got[0];
    assert!(head.starts_with("POST /hook?token=abc HTTP/1.1"), "{head}");
    let event: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(event["action"], "sandbox.create");
    assert_eq!(event["sandbox"], "wh");
    assert_eq!(
        header(head, "x-devbox-event-id"),
        Some(event["id"].to_string().as_str())
    );
    assert!(header(head, "x-devbox-timestamp").is_some());
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret-key").unwrap();
    mac.update(body);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(header(head, "x-devbox-signature"), Some(want.as_str()));
    // Every retry carries the same event; the other sandbox's events were not sent.
    for (_, b) in &got {
        assert_eq!(b, body);
    }
    let hooks = webhooks(&env);
    assert_eq!(hooks.len(), 1);
    let h = &hooks[0];
    assert_eq!(h["url"], format!("http://127.0.0.1:{}/hook", good.port));
    assert_eq!(h["failed"], 0);
    assert!(h["last_error"].as_str().unwrap().contains("500"), "{h}");
    assert!(h["last_success_at"].is_string());
    let table = env.ok(&["webhooks"]);
    assert!(
        table.contains("DELIVERED") && !table.contains("token=abc"),
        "{table}"
    );
    let mut s = request(&env, "/metrics", "");
    let mut metrics = String::new();
    s.read_to_string(&mut metrics).unwrap();
    assert!(
        metrics.contains("devbox_webhook_events_total{")
            && metrics.contains("result=\"delivered\"} 1"),
        "{metrics}"
    );
    // The secret is in no log.
    assert!(!env.daemon_log().contains("s3cret"));
    env.ok(&["destroy", "wh"]);
    env.ok(&["destroy", "other"]);
}

#[test]
fn dead_and_hanging_receivers_slow_nothing_and_are_counted() {
    require_root!();
    let dead_port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let hanging = receiver(vec![], true);
    // An https hook whose server answers in plain HTTP: the TLS handshake fails.
    let plain = TcpListener::bind("127.0.0.1:0").unwrap();
    let plain_port = plain.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in plain.incoming() {
            let Ok(mut c) = c else { return };
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("hook.key");
    std::fs::write(&secret, "k").unwrap();
    let env = env_with(&format!(
        "webhooks:\n  - url: http://127.0.0.1:{dead_port}/\n    secretFile: {s}\n    retries: 1\n    kinds: [exec]\n  - url: http://127.0.0.1:{hp}/\n    secretFile: {s}\n    retries: 0\n    timeout: 500ms\n    kinds: [exec]\n  - url: https://127.0.0.1:{plain_port}/\n    secretFile: {s}\n    retries: 0\n    kinds: [exec]\n",
        s = secret.display(),
        hp = hanging.port
    ));
    env.ok(&["create", "slow"]);
    for _ in 0..5 {
        assert_eq!(env.ok(&["exec", "slow", "echo hi"]).trim(), "hi");
    }
    wait_for("failures to count", || {
        let h = webhooks(&env);
        h.iter()
            .all(|h| h["failed"].as_u64().unwrap() + h["dropped"].as_u64().unwrap() == 5)
    });
    let h = webhooks(&env);
    assert_eq!(h[0]["delivered"], 0);
    assert!(
        h[0]["last_error"].as_str().unwrap().contains("connecting"),
        "{h:?}"
    );
    assert!(
        h[1]["last_error"]
            .as_str()
            .unwrap()
            .contains("no answer within 500ms"),
        "{h:?}"
    );
    assert!(!hanging.got.lock().unwrap().is_empty());
    env.ok(&["destroy", "slow"]);
}

fn inspect_alerts(env: &TestEnv, name: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", name])).unwrap();
    v["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| x["rule"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn alert(env: &TestEnv, name: &str, action: &str, rule: &str) -> serde_json::Value {
    wait_event(
        env,
        &["--sandbox", name, "--kind", "alert"],
        &format!("{action} {rule}"),
        |e| e["action"] == action && e["details"]["rule"] == rule,
    )
}

#[test]
fn alerts_fire_and_resolve() {
    require_root!();
    // A global rule the sandbox's spec replaces (memory), and its own ones.
    let env = env_with("alerts:\n  memory: 95%\n");
    let spec = env.root.path().join("al.yaml");
    std::fs::write(
        &spec,
        "apiVersion: sandbox.io/v1\nkind: Sandbox\nspec:\n  limits:\n    memory: 128Mi\n  alerts:\n    memory: 50%\n    execDuration: 1s\n    deniedCommands: {count: 2, within: 3s}\n",
    )
    .unwrap();
    env.ok(&["create", "al", "-f", spec.to_str().unwrap()]);

    // Memory: a process holding 96 MiB of 128 MiB fires; ending it resolves.
    env.ok(&[
        "exec",
        "al",
        "setsid python3 -c 'import time; b = b\"x\" * (96 << 20); time.sleep(600)' </dev/null >/dev/null 2>&1 & echo $! > /tmp/hog",
    ]);
    let fired = alert(&env, "al", "alert.firing", "memory");
    assert_eq!(fired["details"]["threshold"], 0.5);
    assert!(fired["details"]["value"].as_f64().unwrap() > 0.5, "{fired}");
    assert!(inspect_alerts(&env, "al").contains(&"memory".to_string()));
    env.ok(&["exec", "al", "kill $(cat /tmp/hog)"]);
    let resolved = alert(&env, "al", "alert.resolved", "memory");
    assert!(
        resolved["details"]["value"].as_f64().unwrap() <= 0.5,
        "{resolved}"
    );

    // An exec running longer than 1 s fires while it runs, resolves when it ends.
    env.ok(&["exec", "al", "sleep 2.5"]);
    let fired = alert(&env, "al", "alert.firing", "exec_duration");
    assert_eq!(fired["details"]["threshold"], 1.0);
    alert(&env, "al", "alert.resolved", "exec_duration");

    // Two denied commands within 3 s fire; resolved once the window passed.
    for _ in 0..2 {
        env.fails(&["exec", "al", "rm -rf --no-preserve-root /"]);
    }
    let fired = alert(&env, "al", "alert.firing", "denied_commands");
    assert_eq!(fired["details"]["value"], 2);
    assert_eq!(fired["details"]["threshold"], 2);
    alert(&env, "al", "alert.resolved", "denied_commands");

    // No re-firing while firing: each rule fired exactly once.
    let firings: Vec<_> = events(&env, &["--sandbox", "al", "--kind", "alert"])
        .into_iter()
        .filter(|e| e["action"] == "alert.firing")
        .map(|e| e["details"]["rule"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(firings, ["memory", "exec_duration", "denied_commands"]);
    assert!(inspect_alerts(&env, "al").is_empty());
    env.ok(&["destroy", "al"]);
}

#[test]
fn a_bad_config_or_webhook_flag_stops_the_daemon_with_a_reason() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("c.yaml");
    std::fs::write(&file, "alerts:\n  memory: 150%\n").unwrap();
    let out = std::process::Command::new(common::sandbox_bin().with_file_name("sandboxd"))
        .arg("--config")
        .arg(&file)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("alerts.memory"), "{err}");
    let out = std::process::Command::new(common::sandbox_bin().with_file_name("sandboxd"))
        .args(["--webhook", "ftp://x/"])
        .arg("--webhook-secret-file")
        .arg(&file)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only http:// and https://"), "{err}");
}
