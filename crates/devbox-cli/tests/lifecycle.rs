//! The sandbox lifecycle through the real `sandbox` binary and daemon.

mod common;

use std::os::unix::process::CommandExt;

use common::TestEnv;

#[test]
fn quick_start_flow() {
    require_root!();
    let env = TestEnv::new();
    assert_eq!(env.ok(&["create", "dev"]).trim(), "dev");
    assert_eq!(
        env.ok(&["exec", "dev", "echo hello > /work/a && cat /work/a"]),
        "hello\n"
    );
    let ls = env.ok(&["exec", "dev", "--", "ls", "-la", "/work"]);
    assert!(ls.contains(" a\n"), "{ls}");

    let table = env.ok(&["ls"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("dev") && table.contains("running"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["ls", "--format", "json"])).unwrap();
    assert_eq!(json[0]["name"], "dev");

    let info: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "dev"])).unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(info["manifest"]["apiVersion"], "sandbox.io/v1");
    assert!(info["init_pid"].as_i64().unwrap() > 1);
    assert!(!info["processes"].as_array().unwrap().is_empty());
    assert!(info["created_at"].as_str().unwrap().starts_with("20"));
    assert!(info["started_at"].is_string());
    assert!(info["storage_bytes"].as_u64().unwrap() >= 6);

    env.ok(&["stop", "dev"]);
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "dev"])).unwrap();
    assert_eq!(info["state"], "stopped");
    assert!(info["init_pid"].is_null());
    let err = env.fails(&["exec", "dev", "true"]);
    assert!(err.contains("sandbox start dev"), "{err}");
    env.ok(&["start", "dev"]);
    assert_eq!(
        env.ok(&["exec", "dev", "cat /work/a"]),
        "hello\n",
        "files survive stop/start"
    );

    env.ok(&["destroy", "dev"]);
    assert!(env.ok(&["ls", "-q"]).trim().is_empty());
    assert!(
        env.cgroup_dirs().is_empty(),
        "cgroups left: {:?}",
        env.cgroup_dirs()
    );
    let volumes: Vec<_> = std::fs::read_dir(env.pool_dir().join("sandboxes"))
        .unwrap()
        .collect();
    assert!(volumes.is_empty(), "volumes left");
}

#[test]
fn run_rm_is_one_shot() {
    require_root!();
    let env = TestEnv::new();
    let out = env.ok(&["run", "--rm", "--", "uname", "-a"]);
    assert!(out.starts_with("Linux "), "{out}");
    let out = env.sb(&["run", "--rm", "--", "sh", "-c", "exit 42"]);
    assert_eq!(
        out.status.code(),
        Some(42),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        env.ok(&["ls", "-q"]).trim().is_empty(),
        "run --rm left a sandbox"
    );
    assert!(env.cgroup_dirs().is_empty());
}

#[test]
fn graceful_stop_sends_sigterm_first() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "g"]);
    // A process that records SIGTERM to a file before exiting.
    let started = env
        .cmd()
        .args([
            "exec",
            "g",
            "trap 'echo term > /work/got; exit 0' TERM; while :; do sleep 0.05; done",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    env.ok(&["stop", "g", "--time", "5"]);
    env.ok(&["start", "g"]);
    assert_eq!(env.ok(&["exec", "g", "cat /work/got"]), "term\n");
    let mut started = started;
    let _ = started.wait();
    // A process that ignores SIGTERM is killed after the grace period.
    let mut ignorer = env
        .cmd()
        .args(["exec", "g", "trap '' TERM; while :; do sleep 0.05; done"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let begun = std::time::Instant::now();
    env.ok(&["stop", "g", "--time", "0.5"]);
    assert!(begun.elapsed() < std::time::Duration::from_secs(8));
    let _ = ignorer.wait();
    env.ok(&["destroy", "--force", "g"]);
}

#[test]
fn spec_file_in_the_seed_format() {
    require_root!();
    let env = TestEnv::new();
    let spec = env.root.path().join("sandbox.yaml");
    std::fs::write(
        &spec,
        "apiVersion: sandbox.io/v1\nkind: Sandbox\nmetadata:\n  name: dev-environment\n  labels: {team: ci}\nspec:\n  isolation: container\n  limits:\n    cpu: \"2\"\n    memory: \"256Mi\"\n    pids: 64\n  env: {GREETING: hi}\n  rollback:\n    enabled: true\n    autoSnapshot: true\n",
    )
    .unwrap();
    env.ok(&["create", "ci", "-f", spec.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "ci"])).unwrap();
    assert_eq!(info["name"], "ci");
    assert_eq!(info["limits"]["memory_bytes"], 256u64 << 20);
    assert_eq!(info["limits"]["cpu_millis"], 2000);
    assert_eq!(info["manifest"]["metadata"]["labels"]["team"], "ci");
    assert_eq!(env.ok(&["exec", "ci", "echo $GREETING"]), "hi\n");
    // The limits are in force: more than 64 processes cannot be made.
    let (code, _, _) = env.sh("ci", "for i in $(seq 1 80); do sleep 5 & done; wait");
    assert_ne!(code, 0, "the pids limit did not hold");

    std::fs::write(
        &spec,
        "apiVersion: sandbox.io/v1\nkind: Sandbox\nspec:\n  limits:\n    memory: 4XB\n",
    )
    .unwrap();
    let err = env.fails(&["create", "bad", "-f", spec.to_str().unwrap()]);
    assert!(err.contains("spec.limits.memory"), "{err}");
    std::fs::write(
        &spec,
        "apiVersion: sandbox.io/v1\nkind: Sandbox\nspec:\n  limts: {}\n",
    )
    .unwrap();
    let err = env.fails(&["create", "bad", "-f", spec.to_str().unwrap()]);
    assert!(err.contains("limts"), "{err}");
    assert_eq!(
        env.ok(&["ls", "-q"]).trim(),
        "ci",
        "a bad spec created nothing"
    );
}

#[test]
fn errors_are_clear_and_change_nothing() {
    require_root!();
    let env = TestEnv::new();
    let err = env.fails(&["exec", "ghost", "true"]);
    assert!(
        err.contains("no sandbox named \"ghost\"") && err.contains("sandbox ls"),
        "{err}"
    );
    env.ok(&["create", "taken"]);
    let err = env.fails(&["create", "taken"]);
    assert!(err.contains("already exists"), "{err}");
    let err = env.fails(&["create", "a/b"]);
    assert!(err.contains("not a valid name"), "{err}");
    let long = "a".repeat(300);
    let err = env.fails(&["create", &long]);
    assert!(err.contains("at most 63"), "{err}");
    let err = env.fails(&["create", "x", "--memory", "lots"]);
    assert!(err.contains("spec.limits.memory"), "{err}");
    let err = env.fails(&["create", "x", "--image", "nope"]);
    assert!(err.contains("no image named \"nope\""), "{err}");
    let err = env.fails(&["destroy", "ghost"]);
    assert!(err.contains("no sandbox"), "{err}");
    assert_eq!(env.ok(&["ls", "-q"]).trim(), "taken");
    assert_eq!(env.cgroup_dirs().len(), env.cgroup_dirs().len());
    let volumes = std::fs::read_dir(env.pool_dir().join("sandboxes"))
        .unwrap()
        .count();
    assert_eq!(volumes, 1);

    // The daemon is down and auto-start is off: the CLI says how to start it.
    let mut env = env;
    env.stop_daemon();
    let err = env.fails(&["ls"]);
    assert!(err.contains("sandbox daemon"), "{err}");
    env.start_daemon();
}

#[test]
fn concurrent_operations() {
    require_root!();
    let env = TestEnv::new();
    // Different sandboxes in parallel.
    std::thread::scope(|s| {
        for i in 0..6 {
            let env = &env;
            s.spawn(move || env.ok(&["create", &format!("p{i}")]));
        }
    });
    assert_eq!(env.ok(&["ls", "-q"]).lines().count(), 6);
    // One sandbox, many operations at once: each either succeeds or says why, and the
    // sandbox ends in a consistent state.
    std::thread::scope(|s| {
        for i in 0..6 {
            let env = &env;
            s.spawn(move || {
                let args: &[&str] = match i % 3 {
                    0 => &["stop", "p0", "--time", "1"],
                    1 => &["start", "p0"],
                    _ => &["exec", "p0", "true"],
                };
                let _ = env.sb(args);
            });
        }
    });
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "p0"])).unwrap();
    let state = info["state"].as_str().unwrap().to_string();
    assert!(state == "running" || state == "stopped", "{state}");
    if state == "stopped" {
        env.ok(&["start", "p0"]);
    }
    assert_eq!(env.ok(&["exec", "p0", "echo ok"]), "ok\n");
}

#[test]
fn openapi_and_version() {
    require_root!();
    let env = TestEnv::new();
    let doc: serde_json::Value = serde_json::from_str(&env.ok(&["api", "openapi"])).unwrap();
    assert!(doc["paths"]["/v1/sandboxes"].is_object());
    assert!(doc["paths"]["/v1/sandboxes/{name}/exec/stream"].is_object());
    assert!(doc["components"]["schemas"]["SandboxManifest"].is_object());
    let help = env.ok(&["--help"]);
    for cmd in [
        "create", "exec", "run", "ls", "inspect", "start", "stop", "destroy", "image", "pool",
        "api", "daemon",
    ] {
        assert!(help.contains(cmd), "--help lacks {cmd}");
    }
    for cmd in ["create", "exec", "run", "ls", "inspect", "destroy"] {
        assert!(env.ok(&[cmd, "--help"]).contains("Usage"));
    }
}

#[test]
fn cli_starts_the_daemon_and_refuses_non_root() {
    require_root!();
    let mut env = TestEnv::new();
    env.stop_daemon();
    // With auto-start allowed, the first command brings a daemon up.
    let out = env
        .cmd()
        .env_remove("DEVBOX_NO_AUTOSTART")
        .args(["ls", "-q"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(env.socket.exists());
    assert_eq!(env.ok(&["run", "--rm", "--", "echo", "up"]), "up\n");
    // Someone who is not root is told what to do.
    let out = env
        .cmd()
        .env_remove("DEVBOX_NO_AUTOSTART")
        .args(["ls"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("root"), "{err}");
    // The daemon started by the CLI is stopped by the environment's cleanup through its lock file.
    let pid: i32 = std::fs::read_to_string(env.state.join("daemon.lock"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for name in env.ok(&["ls", "-q"]).lines() {
        env.ok(&["destroy", "--force", name]);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
