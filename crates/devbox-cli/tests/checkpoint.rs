//! Snapshots with processes (CRIU): a rollback brings back the running processes where
//! they were (a counter loop continues from its count, a listening server keeps its port),
//! and what cannot be checkpointed or restored is refused with the reason, changing nothing.
//! CRIU ≥ 4.1 is built by scripts/deps.sh, which the test command runs.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{TestEnv, busybox_rootfs, tar_dir};

/// A counter loop that rewrites /tmp/count atomically every 50 ms, in the background.
const COUNTER: &str = "sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new && mv /tmp/count.new /tmp/count; sleep 0.05; done' >/dev/null 2>&1 &";

fn count(env: &TestEnv, name: &str) -> u64 {
    let (code, out, err) = env.sh(name, "cat /tmp/count");
    assert_eq!(code, 0, "{err}");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("count {out:?}"))
}

/// Waits until the counter passed `n`.
fn wait_count_above(env: &TestEnv, name: &str, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let (0, out, _) = env.sh(name, "cat /tmp/count 2>/dev/null")
            && let Ok(c) = out.trim().parse::<u64>()
            && c > n
        {
            return c;
        }
        assert!(Instant::now() < deadline, "the counter stalled at {n}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Rolls back, and on failure shows the end of CRIU's restore log before failing.
fn rollback(env: &TestEnv, name: &str, to: &str) {
    let out = env.sb(&["rollback", name, "--to", to]);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let log = err
            .split("(log: ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        panic!(
            "rollback {name} --to {to} failed: {err}\nCRIU's log ends:\n{}",
            tail.join("\n")
        );
    }
}

/// The sandbox's pids of processes whose command line contains `pattern`.
fn pids_of(env: &TestEnv, name: &str, pattern: &str) -> Vec<String> {
    let out = env.ok(&["exec", name, "--", "ps", "-eo", "pid=,args="]);
    out.lines()
        .filter(|l| l.contains(pattern) && !l.contains("ps -eo"))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

const GET: &str = "python3 -c \"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8765/', timeout=5).status)\"";

#[test]
fn rollback_restores_running_processes() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "dev"]);
    env.ok(&["exec", "dev", COUNTER]);
    env.ok(&[
        "exec",
        "dev",
        "cd /tmp && nohup python3 -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1 &",
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.sh("dev", GET).1.trim() != "200" {
        assert!(Instant::now() < deadline, "the server did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let server = pids_of(&env, "dev", "http.server");
    assert_eq!(server.len(), 1, "{server:?}");
    let before = wait_count_above(&env, "dev", 5);

    env.ok(&["snapshot", "dev", "live", "--with-processes"]);
    let snaps = env.snapshots("dev");
    assert_eq!(snaps[0]["processes"], true, "{snaps:?}");
    assert!(env.ok(&["snapshots", "dev"]).contains("+processes"));

    // Time passes, things change: the counter runs on, the server and files go away.
    let later = wait_count_above(&env, "dev", before + 30);
    env.ok(&["exec", "dev", "pkill -f 'http[.]server'; touch /work/after"]);
    assert_ne!(env.sh("dev", GET).0, 0, "the server is gone");

    rollback(&env, "dev", "live");
    let restored = count(&env, "dev");
    assert!(
        restored >= before && restored < later,
        "the counter resumes from the snapshot's count ({before}..{later}), not {restored}"
    );
    let on = wait_count_above(&env, "dev", restored + 3);
    assert!(
        on < later + 100,
        "the counter continued from {restored}: {on}"
    );
    assert_eq!(
        env.sh("dev", GET).1.trim(),
        "200",
        "the server listens again"
    );
    assert_eq!(pids_of(&env, "dev", "http.server"), server, "same process");
    assert_ne!(
        env.sh("dev", "test -e /work/after").0,
        0,
        "files rolled back"
    );

    // The snapshot can be restored again, and deleting it removes its checkpoint.
    env.ok(&["rollback", "dev", "--to", "live"]);
    assert_eq!(env.sh("dev", GET).1.trim(), "200");
    let id = serde_json::from_str::<serde_json::Value>(&env.ok(&["inspect", "dev"])).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let checkpoints = env.state.join("checkpoints").join(&id);
    let dirs = |p: &std::path::Path| {
        std::fs::read_dir(p)
            .map(|d| d.flatten().filter(|e| e.path().is_dir()).count())
            .unwrap_or(0)
    };
    assert_eq!(dirs(&checkpoints), 1);
    env.ok(&["snapshot", "rm", "dev", "live"]);
    assert_eq!(dirs(&checkpoints), 0);
    env.ok(&["destroy", "-f", "dev"]);
    assert!(!checkpoints.exists());
}

#[test]
fn busybox_sandbox_processes_come_back() {
    require_root!();
    let env = TestEnv::new();
    let work = env.root.path().join("work");
    busybox_rootfs(&work.join("rootfs"));
    for app in ["sleep", "mv"] {
        std::os::unix::fs::symlink("busybox", work.join("rootfs/bin").join(app)).unwrap();
    }
    let tarball = work.join("busybox.tar.gz");
    tar_dir(&work.join("rootfs"), &tarball);
    env.ok(&["image", "import", tarball.to_str().unwrap(), "--name", "bb"]);
    env.ok(&["create", "small", "--image", "bb"]);
    env.ok(&["exec", "small", COUNTER]);
    let before = wait_count_above(&env, "small", 3);
    env.ok(&["snapshot", "small", "s", "--with-processes"]);
    let later = wait_count_above(&env, "small", before + 20);
    rollback(&env, "small", "s");
    let restored = count(&env, "small");
    assert!(
        restored >= before && restored < later,
        "{before} {restored} {later}"
    );
    wait_count_above(&env, "small", restored + 3);
}

#[test]
fn what_cannot_be_checkpointed_changes_nothing() {
    require_root!();
    let mut env = TestEnv::new();
    env.ok(&["create", "dev"]);
    env.ok(&["exec", "dev", "echo one > /work/f"]);

    // An exec still running: refused, the sandbox and its exec go on.
    let running = env
        .cmd()
        .args(["exec", "dev", "sleep 3; echo done"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids_of(&env, "dev", "sleep 3").is_empty() {
        assert!(Instant::now() < deadline, "the exec did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = env.fails(&["snapshot", "dev", "busy", "--with-processes"]);
    assert!(err.contains("still running"), "{err}");
    assert!(env.snapshot_names("dev").is_empty());
    let out = running.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
    assert_eq!(env.ok(&["exec", "dev", "cat /work/f"]), "one\n");

    // A stopped sandbox has no processes to checkpoint.
    env.ok(&["stop", "dev", "-t", "0"]);
    let err = env.fails(&["snapshot", "dev", "--with-processes"]);
    assert!(err.contains("stopped"), "{err}");
    env.ok(&["start", "dev"]);

    // A checkpoint with processes, then CRIU goes missing: the rollback still restores the
    // files, starts the sandbox afresh, and says why the processes did not come back.
    env.ok(&["exec", "dev", COUNTER]);
    wait_count_above(&env, "dev", 1);
    env.ok(&["snapshot", "dev", "live", "--with-processes"]);
    env.ok(&["exec", "dev", "echo two > /work/f"]);
    env.restart_with_env("DEVBOX_CRIU", "/nonexistent/criu");
    let err = env.fails(&["rollback", "dev", "--to", "live"]);
    assert!(
        err.contains("could not be restored") && err.contains("CRIU 4.1"),
        "{err}"
    );
    assert_eq!(env.ok(&["exec", "dev", "cat /work/f"]), "one\n");
    assert!(pids_of(&env, "dev", "while :").is_empty(), "started afresh");

    // Without CRIU, a snapshot with processes is refused and none is taken.
    let err = env.fails(&["snapshot", "dev", "again", "--with-processes"]);
    assert!(
        err.contains("CRIU 4.1") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(env.snapshot_names("dev"), vec!["live".to_string()]);
}

/// The spec's main process starts with the sandbox, again after a stop and start, and again
/// after a rollback to a snapshot of files only; one the checks deny refuses the sandbox.
#[test]
fn main_process_starts_and_restarts_after_rollback() {
    require_root!();
    let env = TestEnv::new();
    let spec = env.root.path().join("web.yaml");
    std::fs::write(
        &spec,
        "apiVersion: sandbox.io/v1\nkind: Sandbox\nmetadata: {name: web}\nspec:\n  command: [\"python3\", \"-m\", \"http.server\", \"8765\", \"--bind\", \"127.0.0.1\", \"--directory\", \"/work\"]\n",
    )
    .unwrap();
    env.ok(&["create", "-f", spec.to_str().unwrap()]);
    let serving = |env: &TestEnv| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while env.sh("web", GET).1.trim() != "200" {
            assert!(
                Instant::now() < deadline,
                "the main process does not serve: {}",
                env.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pids_of(env, "web", "http.server")
    };
    let first = serving(&env);
    assert_eq!(first.len(), 1);

    env.ok(&["snapshot", "web", "files"]);
    env.ok(&["exec", "web", "pkill -f 'http[.]server'; echo x > /work/x"]);
    assert_ne!(env.sh("web", GET).0, 0);
    env.ok(&["rollback", "web", "--to", "files"]);
    assert_eq!(serving(&env).len(), 1, "restarted after the rollback");
    assert_ne!(env.sh("web", "test -e /work/x").0, 0);

    env.ok(&["stop", "web"]);
    env.ok(&["start", "web"]);
    assert_eq!(serving(&env).len(), 1, "started again with the sandbox");
    let log = env.state.join("logs/web/main.log");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("GET / HTTP"),
        "the server's output is logged: {text}"
    );
    let audit = env.ok(&["audit", "--sandbox", "web"]);
    assert!(audit.matches("sandbox.main").count() >= 3, "{audit}");

    // A main command the checks deny: no sandbox is made.
    let err = env.fails(&["create", "bad", "--main", "rm -rf /"]);
    assert!(err.contains("spec.command"), "{err}");
    assert!(!env.ok(&["ls", "-q"]).contains("bad"));
}

/// Killing the daemon at random points of checkpoints and restores loses no acknowledged
/// snapshot, leaves no checkpoint without its snapshot, and a restart leaves the sandbox
/// usable (running, or stopped and startable: a parked agent whose daemon died stops its
/// sandbox, as nobody could reach it).
#[test]
fn killing_the_daemon_mid_checkpoint_leaves_a_repairable_state() {
    require_root!();
    let mut env = TestEnv::new();
    env.ok(&["create", "crash"]);
    env.ok(&["exec", "crash", COUNTER]);
    wait_count_above(&env, "crash", 1);
    env.ok(&["snapshot", "crash", "base", "--with-processes"]);
    let id =
        serde_json::from_str::<serde_json::Value>(&env.ok(&["inspect", "crash"])).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
    let mut acknowledged = vec!["base".to_string()];
    let mut rnd = common::rng();
    for round in 0..12 {
        let name = format!("p{round}");
        let args: Vec<String> = if round % 2 == 0 {
            vec![
                "snapshot".into(),
                "crash".into(),
                name.clone(),
                "--with-processes".into(),
            ]
        } else {
            vec![
                "rollback".into(),
                "crash".into(),
                "--to".into(),
                "base".into(),
            ]
        };
        let child = env
            .cmd()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rnd(150)));
        env.kill_daemon();
        let out = child.wait_with_output().unwrap();
        if out.status.success() && args[0] == "snapshot" {
            acknowledged.push(name);
        }
        // A CRIU the dead daemon started may still be finishing.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::process::Command::new("pgrep")
            .args(["-f", &format!("checkpoints/{id}")])
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(Instant::now() < deadline, "CRIU did not end");
            std::thread::sleep(Duration::from_millis(50));
        }
        env.start_daemon();
        let snaps = env.snapshots("crash");
        for s in &acknowledged {
            assert!(
                snaps.iter().any(|x| x["name"] == s.as_str()),
                "round {round}: snapshot {s} was lost\n{}",
                env.daemon_log()
            );
        }
        let with_processes = snaps.iter().filter(|s| s["processes"] == true).count();
        let dirs = std::fs::read_dir(env.state.join("checkpoints").join(&id))
            .map(|d| d.flatten().filter(|e| e.path().is_dir()).count())
            .unwrap_or(0);
        assert_eq!(
            dirs, with_processes,
            "round {round}: checkpoints without snapshots"
        );
        let info: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "crash"])).unwrap();
        let state = info["state"].as_str().unwrap().to_string();
        assert!(
            state == "running" || state == "stopped",
            "round {round}: {state}"
        );
        if state == "stopped" {
            env.ok(&["start", "crash"]);
        }
        assert_eq!(env.ok(&["exec", "crash", "echo alive"]), "alive\n");
        if pids_of(&env, "crash", "while :").is_empty() {
            env.ok(&["exec", "crash", COUNTER]);
        }
    }
}
