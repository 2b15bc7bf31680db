//! Health checks (`spec.healthcheck`: healthy, turning unhealthy when the file it checks is
//! removed, the restart and rollback actions, the states in `ls` and `inspect`, audit records
//! only on change) and idle handling (`spec.idle`: frozen after idling, an exec thaws it and
//! runs; stopped after idling, an exec starts it; a snapshot of a frozen sandbox).

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::TestEnv;

fn audit(env: &TestEnv, name: &str, action: &str) -> Vec<serde_json::Value> {
    let out = env.ok(&["audit", "--format", "json", "--sandbox", name]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("audit json");
    v.as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r["action"] == action)
        .collect()
}

fn inspect(env: &TestEnv, name: &str) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["inspect", name])).expect("inspect json")
}

/// Creates sandbox `name` from a spec whose `spec` section is `body` (YAML, indented 2).
fn create(env: &TestEnv, name: &str, body: &str) {
    let file = env.root.path().join(format!("{name}.yaml"));
    std::fs::write(
        &file,
        format!(
            "apiVersion: sandbox.io/v1\nkind: Sandbox\nmetadata: {{name: {name}}}\nspec:\n{body}"
        ),
    )
    .unwrap();
    env.ok(&["create", "-f", file.to_str().unwrap()]);
}

/// Waits (up to 20 s) until `f` holds for the sandbox's inspect.
fn wait_for(env: &TestEnv, name: &str, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = inspect(env, name);
        if f(&info) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never became {what}: {info:#}\ndaemon log:\n{}",
            env.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn health(info: &serde_json::Value) -> &str {
    info["health"]["status"].as_str().unwrap_or("")
}

const CHECK: &str = "  healthcheck:\n    command: ['test -f /work/ok && echo fine']\n    interval: 200ms\n    timeout: 2s\n    retries: 2\n";

#[test]
fn healthy_then_unhealthy_and_states_shown() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    create(&env, "hc", CHECK);
    let info = inspect(&env, "hc");
    assert_eq!(health(&info), "starting", "{info:#}");
    env.ok(&["exec", "hc", "touch /work/ok"]);
    wait_for(&env, "hc", "healthy", |i| health(i) == "healthy");
    let info = inspect(&env, "hc");
    assert_eq!(info["health"]["last_exit"], 0, "{info:#}");
    assert_eq!(info["health"]["last_output"], "fine\n", "{info:#}");
    assert!(env.ok(&["ls"]).contains("running (healthy)"));

    // A while of passing checks records nothing more.
    std::thread::sleep(Duration::from_millis(600));
    let changes = audit(&env, "hc", "health.status");
    assert_eq!(changes.len(), 1, "{changes:#?}");
    assert_eq!(changes[0]["detail"]["status"], "healthy");
    assert_eq!(changes[0]["detail"]["previous"], "starting");
    assert_eq!(changes[0]["actor"], "health");
    // Checks are not exec records.
    let execs = audit(&env, "hc", "exec");
    assert_eq!(execs.len(), 1, "only the touch: {execs:#?}");

    env.ok(&["exec", "hc", "rm /work/ok"]);
    wait_for(&env, "hc", "unhealthy", |i| health(i) == "unhealthy");
    let info = inspect(&env, "hc");
    assert!(
        info["health"]["failures"].as_u64().unwrap() >= 2,
        "{info:#}"
    );
    assert_eq!(info["state"], "running", "onUnhealthy none leaves it");
    assert!(env.ok(&["ls"]).contains("running (unhealthy)"));
    let changes = audit(&env, "hc", "health.status");
    let last = changes.last().unwrap();
    assert_eq!(last["detail"]["status"], "unhealthy");
    assert_eq!(last["detail"]["previous"], "healthy");
    assert_eq!(last["detail"]["exit"], 1);
    assert!(audit(&env, "hc", "health.action").is_empty());

    // Stopped: no health shown, and the supervisor is gone (no more records).
    env.ok(&["stop", "hc", "-t", "0"]);
    assert!(inspect(&env, "hc")["health"].is_null());
    let n = audit(&env, "hc", "health.status").len();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(audit(&env, "hc", "health.status").len(), n);
    env.ok(&["destroy", "-f", "hc"]);
}

/// A running sandbox adopted by a restarted daemon (killed, not stopped) is checked again:
/// its supervisor starts with the adoption, and ends when the sandbox is destroyed.
#[test]
fn checks_resume_after_a_daemon_restart() {
    require_root!();
    let mut env = TestEnv::new();
    env.allow_everything();
    create(&env, "again", CHECK);
    env.ok(&["exec", "again", "touch /work/ok"]);
    wait_for(&env, "again", "healthy", |i| health(i) == "healthy");
    let pid = inspect(&env, "again")["init_pid"].clone();
    env.kill_daemon();
    env.start_daemon();
    let info = inspect(&env, "again");
    assert_eq!(info["init_pid"], pid, "adopted, not restarted: {info:#}");
    wait_for(&env, "again", "healthy after the restart", |i| {
        health(i) == "healthy" && i["health"]["checks"].as_u64() > Some(0)
    });
    env.ok(&["exec", "again", "rm /work/ok"]);
    wait_for(&env, "again", "unhealthy", |i| health(i) == "unhealthy");
    env.ok(&["destroy", "-f", "again"]);
}

#[test]
fn hostile_output_is_bounded_and_a_hung_check_times_out() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    create(
        &env,
        "noisy",
        "  healthcheck:\n    command: ['printf \"\\033[2J\"; head -c 1000000 /dev/zero | tr \"\\0\" x; sleep 30']\n    interval: 200ms\n    timeout: 300ms\n    retries: 1\n",
    );
    wait_for(&env, "noisy", "unhealthy", |i| health(i) == "unhealthy");
    let info = inspect(&env, "noisy");
    let out = info["health"]["last_output"].as_str().unwrap();
    assert!(out.len() < 1200, "bounded: {} bytes", out.len());
    assert!(out.starts_with("\\u{1b}[2J"), "escaped: {out:.40}");
    assert!(out.ends_with("(killed at its timeout of 300ms)"), "{out}");
    assert!(info["health"]["last_exit"].is_null(), "{info:#}");
    // Killed checks leave nothing running: at most the check running now is there.
    std::thread::sleep(Duration::from_millis(1000));
    let ps = env.ok(&["ps", "noisy"]);
    let sleeps = ps
        .lines()
        .filter(|l| l.trim_end().ends_with(" sleep 30") && !l.contains("/bin/sh"))
        .count();
    let shells = ps
        .lines()
        .filter(|l| l.contains("/bin/sh -c printf"))
        .count();
    assert!(sleeps <= 1 && shells <= 1, "{ps}");
    env.ok(&["destroy", "-f", "noisy"]);
}

#[test]
fn unhealthy_restarts() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    // The main process makes the file the check looks for, and a mark of each start.
    create(
        &env,
        "rs",
        "  command: ['touch /work/ok /work/started-$(date +%s%N); sleep 1000']\n  healthcheck:\n    command: ['test -f /work/ok']\n    interval: 200ms\n    retries: 1\n    onUnhealthy: restart\n",
    );
    wait_for(&env, "rs", "healthy", |i| health(i) == "healthy");
    let first_pid = inspect(&env, "rs")["init_pid"].clone();
    env.ok(&["exec", "rs", "rm /work/ok"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while audit(&env, "rs", "health.action").is_empty() {
        assert!(Instant::now() < deadline, "{}", env.daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let action = &audit(&env, "rs", "health.action")[0];
    assert_eq!(action["detail"]["action"], "restart");
    assert_eq!(action["detail"]["outcome"], "ok", "{action:#}");
    let info = inspect(&env, "rs");
    assert_eq!(info["state"], "running");
    assert_ne!(info["init_pid"], first_pid, "a new init");
    assert!(
        ["starting", "healthy"].contains(&health(&info)),
        "checks start again: {info:#}"
    );
    wait_for(&env, "rs", "healthy again", |i| health(i) == "healthy");
    let (_, starts, _) = env.sh("rs", "ls /work | grep -c started-");
    assert_eq!(starts.trim(), "2", "the main process ran again");
    env.ok(&["destroy", "-f", "rs"]);
}

#[test]
fn unhealthy_rolls_back_to_the_healthy_snapshot() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    let file = env.root.path().join("rb.yaml");
    std::fs::write(
        &file,
        "apiVersion: sandbox.io/v1\nkind: Sandbox\nmetadata: {name: rb}\nspec:\n  command: ['touch /work/ok; sleep 1000']\n  healthcheck:\n    command: ['test -f /work/ok']\n    interval: 200ms\n    retries: 2\n    onUnhealthy: rollback\n",
    )
    .unwrap();
    env.ok(&["create", "--no-start", "-f", file.to_str().unwrap()]);
    // Taken while stopped: not a healthy one.
    env.ok(&["snapshot", "rb", "early"]);
    env.ok(&["start", "rb"]);
    wait_for(&env, "rb", "healthy", |i| health(i) == "healthy");
    env.ok(&["exec", "rb", "echo v1 > /work/data"]);
    env.ok(&["snapshot", "rb", "good"]);
    let snaps = env.snapshots("rb");
    let label = |n: &str| {
        snaps.iter().find(|s| s["name"] == n).unwrap()["labels"]["devbox.io/health"].clone()
    };
    assert_eq!(label("good"), "healthy", "{snaps:#?}");
    assert!(label("early").is_null(), "{snaps:#?}");

    // Break it: the file goes and the data changes.
    env.ok(&["exec", "rb", "rm /work/ok; echo v2 > /work/data"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while audit(&env, "rb", "health.action").is_empty() {
        assert!(Instant::now() < deadline, "{}", env.daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let action = &audit(&env, "rb", "health.action")[0];
    assert_eq!(action["detail"]["action"], "rollback");
    assert_eq!(action["detail"]["snapshot"], "good");
    assert_eq!(action["detail"]["outcome"], "ok", "{action:#}");
    assert_eq!(env.ok(&["exec", "rb", "cat /work/data"]), "v1\n");
    wait_for(&env, "rb", "healthy again", |i| health(i) == "healthy");
    env.ok(&["destroy", "-f", "rb"]);
}

#[test]
fn idle_freeze_then_exec_thaws() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    create(&env, "fz", "  idle: {after: 300ms, action: freeze}\n");
    wait_for(&env, "fz", "frozen", |i| i["idle"]["frozen"] == true);
    assert!(env.ok(&["ls"]).contains("running (frozen)"));
    let freezes = audit(&env, "fz", "idle.freeze");
    assert_eq!(freezes.len(), 1, "{freezes:#?}");
    assert_eq!(freezes[0]["detail"]["after_ms"], 300);
    assert_eq!(freezes[0]["actor"], "idle");

    // A snapshot of a frozen sandbox works and leaves it frozen.
    env.ok(&["snapshot", "fz", "cold"]);
    assert_eq!(inspect(&env, "fz")["idle"]["frozen"], true);

    assert_eq!(env.ok(&["exec", "fz", "echo awake"]), "awake\n");
    let wakes = audit(&env, "fz", "idle.wake");
    assert_eq!(wakes.len(), 1, "{wakes:#?}");
    assert_eq!(wakes[0]["detail"]["woken_by"], "exec");
    assert!(wakes[0]["detail"]["took_us"].as_u64().is_some());
    assert_eq!(inspect(&env, "fz")["idle"]["frozen"], false);

    // A long exec keeps it awake past `after`.
    env.ok(&["exec", "fz", "sleep 1"]);
    assert_eq!(audit(&env, "fz", "idle.freeze").len(), 1);
    // Then it freezes again, and a stop works on the frozen sandbox.
    wait_for(&env, "fz", "frozen again", |i| i["idle"]["frozen"] == true);
    env.ok(&["stop", "fz", "-t", "0"]);
    let info = inspect(&env, "fz");
    assert_eq!(info["state"], "stopped");
    assert_eq!(
        info["idle"]["stopped"], false,
        "a stop by hand is not an idle stop"
    );
    env.fails(&["exec", "fz", "true"]);
    env.ok(&["destroy", "-f", "fz"]);
}

#[test]
fn idle_stop_then_exec_starts() {
    require_root!();
    let mut env = TestEnv::new();
    env.allow_everything();
    create(&env, "st", "  idle: {after: 300ms, action: stop}\n");
    env.ok(&["exec", "st", "echo kept > /work/f"]);
    wait_for(&env, "st", "stopped", |i| i["state"] == "stopped");
    let info = inspect(&env, "st");
    assert_eq!(info["idle"]["stopped"], true, "{info:#}");
    assert!(env.ok(&["ls"]).contains("stopped (idle)"));
    assert_eq!(audit(&env, "st", "idle.stop").len(), 1);

    // Also after a daemon restart.
    env.stop_daemon();
    env.start_daemon();
    assert_eq!(env.ok(&["exec", "st", "cat /work/f"]), "kept\n");
    assert_eq!(inspect(&env, "st")["state"], "running");
    let wakes = audit(&env, "st", "idle.wake");
    assert_eq!(wakes.len(), 1, "{wakes:#?}");
    assert_eq!(wakes[0]["detail"]["woken_by"], "exec");
    env.ok(&["destroy", "-f", "st"]);
}

#[path = "../../devbox-net/tests/world/mod.rs"]
mod world;

/// A connection to a published port wakes a frozen sandbox and is served. The daemon runs
/// in a namespace of the test's own world: no packet leaves it.
#[test]
fn published_port_connection_wakes_a_frozen_sandbox() {
    require_root!();
    let w = world::World::new();
    w.check_routes();
    let env = TestEnv::in_netns(
        &w.daemon,
        &format!("{}:53", world::UPSTREAM),
        "10.81.0.0/16",
        &[],
    );
    create(
        &env,
        "web",
        "  network: {mode: none, ports: ['127.0.0.1:18230:7000']}\n  command: ['cd /tmp && echo page-of-web > index.html && exec python3 -m http.server 7000 --bind 127.0.0.1']\n  idle: {after: 500ms, action: freeze}\n",
    );
    let fetch = || world::fetch_http(&w.daemon, Ipv4Addr::LOCALHOST, 18230);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match fetch() {
            Ok(p) if p.contains("page-of-web") => break,
            other => {
                assert!(Instant::now() < deadline, "published port: {other:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    wait_for(&env, "web", "frozen", |i| i["idle"]["frozen"] == true);
    let before = audit(&env, "web", "idle.wake").len();
    let page = fetch().expect("served after waking");
    assert!(page.contains("page-of-web"), "{page}");
    let wakes = audit(&env, "web", "idle.wake");
    assert_eq!(wakes.len(), before + 1, "{wakes:#?}");
    assert_eq!(wakes.last().unwrap()["detail"]["woken_by"], "port");
    env.ok(&["destroy", "-f", "web"]);
}

/// Health and alerts together: turning unhealthy is a `health` event and fires the sandbox's
/// `unhealthy` alert rule (an `alert` event, shown by inspect); turning healthy again
/// resolves it.
#[test]
fn unhealthy_fires_the_alert_and_both_are_events() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    create(
        &env,
        "ha",
        &format!("{CHECK}  alerts: {{unhealthy: true}}\n"),
    );
    env.ok(&["exec", "ha", "touch /work/ok"]);
    wait_for(&env, "ha", "healthy", |i| health(i) == "healthy");
    env.ok(&["exec", "ha", "rm /work/ok"]);
    wait_for(&env, "ha", "unhealthy with its alert firing", |i| {
        health(i) == "unhealthy" && i["alerts"].to_string().contains("unhealthy")
    });
    env.ok(&["exec", "ha", "touch /work/ok"]);
    wait_for(&env, "ha", "healthy without alerts", |i| {
        health(i) == "healthy" && i["alerts"].as_array().is_none_or(Vec::is_empty)
    });
    let events = |kind: &str| -> Vec<serde_json::Value> {
        env.ok(&[
            "events",
            "--sandbox",
            "ha",
            "--kind",
            kind,
            "--format",
            "json",
        ])
        .lines()
        .map(|l| serde_json::from_str(l).expect("event json"))
        .collect()
    };
    let actions = |evs: &[serde_json::Value]| -> Vec<String> {
        evs.iter()
            .map(|e| e["action"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let alerts = events("alert");
    assert_eq!(
        actions(&alerts),
        ["alert.firing", "alert.resolved"],
        "{alerts:#?}"
    );
    assert!(alerts.iter().all(|e| e["kind"] == "alert"));
    let health_events = events("health");
    assert!(
        health_events
            .iter()
            .any(|e| e["action"] == "health.status" && e["details"]["status"] == "unhealthy"),
        "{health_events:#?}"
    );
    env.ok(&["destroy", "-f", "ha"]);
}

/// A check the sandbox makes pass and fail in turn changes the state at every probe; the
/// audit log (and the events and webhooks behind it) gets at most 20 of those a minute.
#[test]
fn a_flapping_check_cannot_flood_the_audit_log() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    create(
        &env,
        "flap",
        "  healthcheck:\n    command: ['if [ -e /work/t ]; then rm /work/t; exit 1; else touch /work/t; fi']\n    interval: 100ms\n    timeout: 2s\n    retries: 1\n",
    );
    wait_for(&env, "flap", "checked 60 times", |i| {
        i["health"]["checks"].as_u64().unwrap_or(0) >= 60
    });
    let records = audit(&env, "flap", "health.status");
    assert!(
        (5..=20).contains(&records.len()),
        "{} health.status records for 60 changes",
        records.len()
    );
    env.ok(&["destroy", "-f", "flap"]);
}
