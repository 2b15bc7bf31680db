//! Monitoring: `sandbox stats` (CPU of a busy sandbox, memory within its limit, several at
//! once, the JSON shape, REST, --watch on a pipe), `sandbox ps` (an exec's processes tied to
//! its id; hostile command lines shown escaped and bounded) and the Prometheus metrics
//! (parsed with a real parser; the counts move after operations).

mod common;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::TestEnv;

/// A raw HTTP/1.1 GET over the daemon's socket; returns (status, body).
fn get(env: &TestEnv, path: &str) -> (u16, String) {
    let mut s = std::os::unix::net::UnixStream::connect(&env.socket).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status: u16 = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

fn stats(env: &TestEnv, names: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["stats", "--format", "json"];
    args.extend_from_slice(names);
    let v: serde_json::Value = serde_json::from_str(&env.ok(&args)).expect("stats json");
    v.as_array().cloned().expect("an array")
}

fn ps(env: &TestEnv, name: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["ps", name, "--format", "json"])).expect("ps json");
    assert_eq!(v["sandbox"], name);
    v["processes"].as_array().cloned().expect("processes")
}

#[test]
fn stats_of_busy_idle_several_and_stopped_sandboxes() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    env.ok(&["create", "busy", "--memory", "256Mi", "--pids", "100"]);
    env.ok(&["create", "idle"]);
    env.ok(&["create", "off"]);
    env.ok(&["stop", "off"]);
    // A spinner and 32 MiB held, left running in the background.
    env.ok(&[
        "exec",
        "busy",
        "setsid sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 & \
         setsid python3 -c 'import time; b = bytearray(32 << 20); time.sleep(600)' \
         </dev/null >/dev/null 2>&1 &",
    ]);
    std::thread::sleep(Duration::from_millis(500));

    let one = stats(&env, &["busy"]);
    assert_eq!(one.len(), 1);
    let s = &one[0];
    assert_eq!(s["name"], "busy");
    assert_eq!(s["state"], "running");
    let cpu = s["cpu_percent"].as_f64().expect("cpu_percent");
    assert!(cpu > 10.0, "a spinner should show: {s}");
    assert!(s["cpu_window_ms"].as_u64().unwrap() >= 100, "{s}");
    let mem = s["memory_bytes"].as_u64().unwrap();
    let limit = s["memory_limit_bytes"].as_u64().unwrap();
    assert_eq!(limit, 256 << 20);
    assert!(mem >= 32 << 20 && mem <= limit, "{s}");
    assert!(s["memory_peak_bytes"].as_u64().unwrap() >= mem, "{s}");
    assert!(s["pids"].as_u64().unwrap() >= 3, "{s}");
    assert_eq!(s["pids_limit"], 100);
    assert!(s["cpu_usec"].as_u64().unwrap() > 0);
    // The JSON shape: every field, with its type (null where there is nothing).
    for key in [
        "name",
        "id",
        "state",
        "cpu_percent",
        "cpu_window_ms",
        "cpu_usec",
        "memory_bytes",
        "memory_limit_bytes",
        "memory_peak_bytes",
        "pids",
        "pids_limit",
        "oom_kills",
        "disk_used_bytes",
        "disk_limit_bytes",
        "net_rx_bytes",
        "net_tx_bytes",
    ] {
        assert!(s.get(key).is_some(), "{key} missing in {s}");
    }
    // No network link (mode none): no bytes.
    assert!(s["net_rx_bytes"].is_null() && s["net_tx_bytes"].is_null());

    // Several, in the order asked for; a stopped one has no use.
    let several = stats(&env, &["idle", "busy", "off"]);
    let names: Vec<&str> = several
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["idle", "busy", "off"]);
    assert!(
        several[0]["cpu_percent"].as_f64().unwrap() < several[1]["cpu_percent"].as_f64().unwrap()
    );
    assert!(several[2]["cpu_percent"].is_null());
    assert_eq!(several[2]["state"], "stopped");
    assert_eq!(several[2]["memory_bytes"], 0);
    // Without names: the running ones.
    let all = stats(&env, &[]);
    let mut names: Vec<&str> = all.iter().map(|s| s["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["busy", "idle"]);
    // Unknown: an error, nothing else shown.
    let err = env.fails(&["stats", "busy", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");

    // The table.
    let table = env.ok(&["stats", "busy", "idle"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("busy") && table.contains("256.0 MiB"),
        "{table}"
    );

    // REST.
    let (code, body) = get(&env, "/v1/sandboxes/busy/stats");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["name"], "busy");
    let (code, body) = get(&env, "/v1/stats?names=busy,idle");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(get(&env, "/v1/sandboxes/nosuch/stats").0, 404);

    // --watch on a pipe: plain tables again and again, no terminal codes.
    let mut child = env
        .cmd()
        .args(["stats", "--watch", "--interval", "0.2", "busy"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().expect("kill");
    let out = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.matches("NAME").count() >= 2, "{text}");
    assert!(!text.contains('\x1b'), "{text:?}");
    assert!(
        env.fails(&["stats", "--watch", "--interval", "0"])
            .contains("interval")
    );

    env.ok(&["destroy", "--force", "busy"]);
    env.ok(&["destroy", "--force", "idle"]);
    env.ok(&["destroy", "--force", "off"]);
}

#[test]
fn ps_ties_processes_to_execs_and_escapes_hostile_text() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    env.ok(&["create", "p"]);
    // An exec without a timeout: its command, a child in its session, a grandchild.
    let mut plain = env
        .cmd()
        .args(["exec", "p", "sleep 301 & sh -c 'sleep 302; :' & wait"])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    // An exec with a timeout (a cgroup of its own): a child that leaves the session.
    let mut timed = env
        .cmd()
        .args([
            "exec",
            "--timeout",
            "8s",
            "p",
            "setsid sleep 303 </dev/null >/dev/null 2>&1 & sleep 304",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    // Hostile text: newlines, terminal escapes and a 100 KB argument.
    let mut hostile = env
        .cmd()
        .args([
            "exec",
            "p",
            r#"A=$(head -c 100000 /dev/zero | tr '\0' A); exec python3 -c 'import time; time.sleep(305)' "$(printf 'l1\nl2\033]0;pwned\007\033[2J')" "$A""#,
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");

    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = ps(&env, "p");
        let has = |s: &str| {
            rows.iter()
                .any(|r| r["command"].as_str().unwrap().contains(s))
        };
        if [
            "sleep 301",
            "sleep 302",
            "sleep 303",
            "sleep 304",
            "time.sleep(305)",
        ]
        .iter()
        .all(|s| has(s))
        {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "processes never showed: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The process whose command is `s` (or, for the hostile one, contains it).
    let row = |s: &str| {
        rows.iter()
            .find(|r| r["command"] == s)
            .or_else(|| {
                rows.iter()
                    .find(|r| r["command"].as_str().unwrap().contains(s) && s.contains("305"))
            })
            .unwrap_or_else(|| panic!("{s} missing in {rows:?}"))
            .clone()
    };
    // pid 1 is the sandbox's init.
    let init = rows.iter().find(|r| r["pid"] == 1).expect("pid 1");
    assert_eq!(init["attribution"], "init");
    assert_eq!(init["uid"], 0);
    // The plain exec: both sleeps carry one exec id (session or ancestry).
    let s301 = row("sleep 301");
    let s302 = row("sleep 302");
    let plain_id = s301["exec"]
        .as_str()
        .expect("sleep 301 has an exec")
        .to_string();
    assert_eq!(s302["exec"], plain_id.as_str());
    assert!(
        ["session", "ancestry"].contains(&s301["attribution"].as_str().unwrap()),
        "{rows:#?}"
    );
    assert!(s301["pid"].as_i64().unwrap() > 1 && s301["host_pid"] != s301["pid"]);
    assert!(s301["rss_bytes"].as_u64().unwrap() > 0);
    // The timed exec: the setsid'd sleep left its session, its cgroup still ties it.
    let s303 = row("sleep 303");
    let s304 = row("sleep 304");
    let timed_id = s304["exec"]
        .as_str()
        .expect("sleep 304 has an exec")
        .to_string();
    assert_ne!(timed_id, plain_id);
    assert_eq!(s303["exec"], timed_id.as_str());
    assert_eq!(s303["attribution"], "cgroup");
    // The hostile one: escaped, bounded, on one line.
    let h = row("time.sleep(305)");
    let cmd = h["command"].as_str().unwrap();
    assert!(
        !cmd.contains('\n') && !cmd.contains('\x1b') && !cmd.contains('\x07'),
        "{cmd:?}"
    );
    assert!(cmd.contains("l1\\nl2\\x1b]0;pwned\\x07"), "{cmd:?}");
    assert!(
        cmd.chars().count() <= 1025 && cmd.ends_with('…'),
        "{}",
        cmd.len()
    );
    assert_eq!(h["attribution"], "exec");
    // The table: the same, one line per process, no terminal codes.
    let table = env.ok(&["ps", "p"]);
    assert!(table.starts_with("PID"), "{table}");
    assert!(!table.contains('\x1b') && !table.contains('\x07'));
    assert_eq!(table.lines().count(), rows.len() + 1, "{table}");
    assert!(table.contains(&plain_id) && table.contains(&timed_id));

    // The ids are those of the execs' records.
    let _ = timed.wait();
    let _ = plain.kill();
    let _ = hostile.kill();
    let _ = plain.wait();
    let _ = hostile.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let audit = env.ok(&["audit", "--format", "json", "--sandbox", "p"]);
        if audit.contains(&timed_id) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no exec record {timed_id}: {audit}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Not running: refused.
    env.ok(&["stop", "p"]);
    assert!(env.fails(&["ps", "p"]).contains("not running"));
    assert!(env.fails(&["ps", "nosuch"]).contains("nosuch"));
    env.ok(&["destroy", "--force", "p"]);
}

fn scrape(env: &TestEnv) -> prometheus_parse::Scrape {
    let (code, body) = get(env, "/metrics");
    assert_eq!(code, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parse")
}

fn value(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(b) => b.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

#[test]
fn metrics_scrape_parses_and_moves_after_operations() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    let before = scrape(&env);
    let ops = |s: &prometheus_parse::Scrape, op: &str| {
        value(
            s,
            "devbox_operations_total",
            &[("operation", op), ("result", "ok")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(value(&before, "devbox_sandboxes_running", &[]), Some(0.0));
    assert!(value(&before, "devbox_pool_size_bytes", &[]).unwrap() > 0.0);

    env.ok(&["create", "m"]);
    env.sh("m", "true");
    env.sh(
        "m",
        "setsid sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 &",
    );
    env.ok(&["snapshot", "m", "first"]);
    env.ok(&["rollback", "m", "--to", "first"]);
    env.sh(
        "m",
        "setsid sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 &",
    );
    std::thread::sleep(Duration::from_millis(300));
    let after = scrape(&env);
    for (op, n) in [
        ("create", 1.0),
        ("exec", 3.0),
        ("snapshot", 1.0),
        ("rollback", 1.0),
    ] {
        assert_eq!(ops(&after, op) - ops(&before, op), n, "{op}");
    }
    // The latency histogram counted the same operations.
    let hist = value(
        &after,
        "devbox_operation_duration_seconds",
        &[("operation", "create"), ("result", "ok")],
    );
    assert_eq!(hist, Some(1.0));
    assert_eq!(value(&after, "devbox_sandboxes_running", &[]), Some(1.0));
    let sb = [("sandbox", "m")];
    assert!(value(&after, "devbox_sandbox_memory_bytes", &sb).unwrap() > 0.0);
    assert!(value(&after, "devbox_sandbox_pids", &sb).unwrap() >= 2.0);
    let cpu1 = value(&after, "devbox_sandbox_cpu_seconds_total", &sb).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let cpu2 = value(&scrape(&env), "devbox_sandbox_cpu_seconds_total", &sb).unwrap();
    assert!(cpu2 > cpu1, "{cpu1} -> {cpu2}");

    // A denied command counts; a failed operation counts as an error.
    let denials = value(&after, "devbox_policy_denials_total", &[]).unwrap_or(0.0);
    let file = env.root.path().join("deny-all.rego");
    std::fs::write(
        &file,
        "package devbox.deny_all\nimport rego.v1\ndefault decision := \"deny\"\nreasons := [\"no\"]\n",
    )
    .unwrap();
    env.ok(&[
        "policy",
        "add",
        "deny-all",
        "--sandbox",
        "m",
        "-f",
        file.to_str().unwrap(),
    ]);
    let _ = env.sb(&["exec", "m", "echo hi"]);
    let _ = env.sb(&["snapshot", "nosuch"]);
    let last = scrape(&env);
    assert_eq!(
        value(&last, "devbox_policy_denials_total", &[]).unwrap_or(0.0),
        denials + 1.0
    );
    assert!(value(&last, "devbox_approvals_pending", &[]).is_some());
    env.ok(&["destroy", "--force", "m"]);
}

#[path = "../../devbox-net/tests/world/mod.rs"]
mod world;

/// Network bytes: a sandbox with a link shows its veth's counts, and they grow with
/// traffic. The daemon runs in a namespace of the test's world (devbox-net's test world):
/// no packet leaves it.
#[test]
fn stats_count_network_bytes_of_a_linked_sandbox() {
    require_root!();
    let w = world::World::new();
    w.check_routes();
    let env = TestEnv::in_netns(
        &w.daemon,
        &format!("{}:53", world::UPSTREAM),
        "10.78.0.0/16",
        &[],
    );
    env.ok(&[
        "create",
        "n",
        "--network",
        "allow",
        "--allow",
        "allowed.test",
    ]);
    env.ok(&["create", "quiet"]);
    let bytes = |name: &str| {
        let s = &stats(&env, &[name])[0];
        (s["net_rx_bytes"].as_u64(), s["net_tx_bytes"].as_u64())
    };
    let (rx0, tx0) = bytes("n");
    let (rx0, tx0) = (rx0.expect("rx bytes"), tx0.expect("tx bytes"));
    let (code, _, err) = env.sh(
        "n",
        "timeout 5 bash -c 'exec 3<>/dev/tcp/allowed.test/80; head -n1 <&3'",
    );
    assert_eq!(code, 0, "{err}");
    let (rx1, tx1) = bytes("n");
    assert!(
        rx1.unwrap() > rx0 && tx1.unwrap() > tx0,
        "{rx0}/{tx0} -> {rx1:?}/{tx1:?}"
    );
    // Mode none: no link, no counts.
    assert_eq!(bytes("quiet"), (None, None));
    env.ok(&["destroy", "--force", "n"]);
    env.ok(&["destroy", "--force", "quiet"]);
}
