//! The daemon's own robustness and records, attacked: a daemon killed while a sandbox is
//! frozen (v1 freezer, unified cgroup.freeze, both), sandboxes whose state is broken in
//! several ways, what a killed daemon leaves running (warm launchers, helpers), audit
//! logs cut at the start or the end with the anchor moved, and host uid ranges of two
//! daemons on one host.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestEnv;

fn inspect(env: &TestEnv, name: &str) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["inspect", name])).expect("inspect json")
}

fn state(env: &TestEnv, name: &str) -> String {
    inspect(env, name)["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn last_error(env: &TestEnv, name: &str) -> String {
    inspect(env, name)["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The mount points of the unified (cgroup2) hierarchy and of the v1 freezer, if any.
fn freezers() -> (Option<PathBuf>, Option<PathBuf>) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let (mut unified, mut v1) = (None, None);
    for l in info.lines() {
        let Some((pre, post)) = l.split_once(" - ") else {
            continue;
        };
        let mount = PathBuf::from(pre.split(' ').nth(4).unwrap_or_default());
        let post: Vec<&str> = post.split(' ').collect();
        match post.first() {
            Some(&"cgroup2") => unified = Some(mount),
            Some(&"cgroup")
                if post
                    .get(2)
                    .is_some_and(|o| o.split(',').any(|x| x == "freezer")) =>
            {
                v1 = Some(mount)
            }
            _ => {}
        }
    }
    (unified, v1)
}

/// The name of the cgroup (under the environment's parent) a process is in.
fn cgroup_name_of(env: &TestEnv, pid: i32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let prefix = format!("/{}/", env.cgroup_parent);
    text.lines()
        .find_map(|l| l.splitn(3, ':').nth(2)?.strip_prefix(&prefix))
        .map(|s| s.split('/').next().unwrap_or_default().to_string())
        .expect("the process is in a sandbox cgroup")
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn freeze_v1(dir: &Path) {
    std::fs::write(dir.join("freezer.state"), "FROZEN").unwrap();
    wait_for("the v1 freezer", || {
        std::fs::read_to_string(dir.join("freezer.state"))
            .unwrap()
            .trim()
            == "FROZEN"
    });
}

fn freeze_unified(dir: &Path) {
    std::fs::write(dir.join("cgroup.freeze"), "1").unwrap();
    wait_for("cgroup.freeze", || {
        std::fs::read_to_string(dir.join("cgroup.events"))
            .unwrap()
            .lines()
            .any(|l| l == "frozen 1")
    });
}

/// Whether a process is gone (or a zombie nobody reaped yet: it runs no more).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn a_frozen_sandbox_is_thawed_and_kept_when_the_daemon_dies() {
    require_root!();
    let (unified, v1) = freezers();
    let mut kinds = Vec::new();
    if v1.is_some() {
        kinds.push("v1");
    }
    if unified.is_some() {
        kinds.push("unified");
    }
    if v1.is_some() && unified.is_some() {
        kinds.push("both");
    }
    assert!(!kinds.is_empty(), "no freezer on this host");
    let mut env = TestEnv::new();
    for k in &kinds {
        let name = format!("frz-{k}");
        env.ok(&["create", &name]);
        env.ok(&[
            "exec",
            &name,
            &format!("echo {k} > /work/f; sleep 1000 >/dev/null 2>&1 &"),
        ]);
    }
    let pids: Vec<i32> = kinds
        .iter()
        .map(|k| env.init_pid(&format!("frz-{k}")).unwrap())
        .collect();
    // Twice: the second time the sandboxes were already thawed once by a daemon.
    for round in 0..2 {
        for (k, pid) in kinds.iter().zip(&pids) {
            let cg = cgroup_name_of(&env, *pid);
            let v1_dir = v1.as_ref().map(|m| m.join(&env.cgroup_parent).join(&cg));
            let u_dir = unified
                .as_ref()
                .map(|m| m.join(&env.cgroup_parent).join(&cg));
            // (cgroup.freeze first: a task the v1 freezer holds cannot enter the v2 trap.)
            if matches!(*k, "unified" | "both") {
                freeze_unified(u_dir.as_ref().unwrap());
            }
            if matches!(*k, "v1" | "both") {
                freeze_v1(v1_dir.as_ref().unwrap());
            }
        }
        env.kill_daemon();
        env.start_daemon();
        for (k, pid) in kinds.iter().zip(&pids) {
            let name = format!("frz-{k}");
            assert_eq!(state(&env, &name), "running", "round {round}, {k}");
            assert_eq!(
                env.init_pid(&name),
                Some(*pid),
                "round {round}, {k}: a new init"
            );
            assert_eq!(env.ok(&["exec", &name, "cat /work/f"]), format!("{k}\n"));
            assert!(
                env.ok(&["exec", &name, "ps -e -o args"])
                    .contains("sleep 1000"),
                "round {round}, {k}: its processes are gone"
            );
            let cg = cgroup_name_of(&env, *pid);
            if let Some(m) = &v1 {
                let s = std::fs::read_to_string(
                    m.join(&env.cgroup_parent).join(&cg).join("freezer.state"),
                );
                assert_eq!(s.unwrap().trim(), "THAWED", "{k}");
            }
            if let Some(m) = &unified {
                let s = std::fs::read_to_string(
                    m.join(&env.cgroup_parent).join(&cg).join("cgroup.freeze"),
                );
                assert_eq!(s.unwrap().trim(), "0", "{k}");
            }
        }
        assert!(
            env.daemon_log().contains("thawed a sandbox"),
            "{}",
            env.daemon_log()
        );
    }
    // The daemon works as usual with them: a snapshot (which freezes and thaws) and a stop.
    env.ok(&["snapshot", "frz-v1", "s1"]);
    env.ok(&["exec", "frz-v1", "true"]);
    env.ok(&["stop", "frz-v1"]);
}

#[test]
fn broken_sandboxes_do_not_stop_the_daemon() {
    require_root!();
    let (unified, v1) = freezers();
    let mut env = TestEnv::new();
    for n in [
        "ok",
        "novol",
        "nocg",
        "garbage",
        "noimg",
        "nosock",
        "frozendead",
    ] {
        env.ok(&["create", n]);
    }
    env.ok(&["exec", "ok", "sleep 1000 >/dev/null 2>&1 &"]);
    env.ok(&["stop", "novol"]);
    env.ok(&["stop", "garbage"]);
    env.ok(&["stop", "noimg"]);
    let id = |n: &str| inspect(&env, n)["id"].as_str().unwrap().to_string();
    let (novol, nosock) = (id("novol"), id("nosock"));
    let nocg_pid = env.init_pid("nocg").unwrap();
    let nocg_cg = cgroup_name_of(&env, nocg_pid);
    let fd_pid = env.init_pid("frozendead").unwrap();
    let fd_cg = cgroup_name_of(&env, fd_pid);
    let ok_pid = env.init_pid("ok").unwrap();

    env.kill_daemon();
    // A sandbox frozen and then killed: the kill waits for the thaw (v1) or works at once.
    match (&v1, &unified) {
        (Some(m), _) => freeze_v1(&m.join(&env.cgroup_parent).join(&fd_cg)),
        (None, Some(m)) => freeze_unified(&m.join(&env.cgroup_parent).join(&fd_cg)),
        _ => {}
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fd_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    // Its writable volume deleted.
    let vol = env.pool_dir().join("sandboxes").join(&novol);
    let st = Command::new("btrfs")
        .args(["subvolume", "delete"])
        .arg(&vol)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success() && !vol.exists());
    // Its init killed and its cgroup removed by hand.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(nocg_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the init to die", || gone(nocg_pid));
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let d = h.path().join(&env.cgroup_parent).join(&nocg_cg);
        if d.exists() {
            wait_for("the cgroup to be removable", || {
                std::fs::remove_dir(&d).is_ok()
            });
        }
    }
    // A state no daemon knows, and an image that is not there.
    common::sqlite(
        &env.state.join("state.db"),
        &[
            (
                "UPDATE sandboxes SET state = 'exploded' WHERE name = 'garbage'",
                serde_json::json!([]),
            ),
            (
                "UPDATE sandboxes SET image_id = ?1 WHERE name = 'noimg'",
                serde_json::json!([
                    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                ]),
            ),
        ],
    );
    // Its agent's socket removed: it runs, but nothing can reach it.
    std::fs::remove_file(
        env.runtime
            .join("sandboxes")
            .join(&nosock)
            .join("agent.sock"),
    )
    .unwrap();

    for round in 0..2 {
        env.start_daemon();
        assert_eq!(state(&env, "ok"), "running", "round {round}");
        assert_eq!(env.init_pid("ok"), Some(ok_pid));
        assert!(
            env.ok(&["exec", "ok", "ps -e -o args"])
                .contains("sleep 1000")
        );
        assert_eq!(state(&env, "novol"), "broken", "round {round}");
        assert!(
            last_error(&env, "novol").contains("volume"),
            "{}",
            last_error(&env, "novol")
        );
        let err = env.fails(&["start", "novol"]);
        assert!(err.contains("broken") || err.contains("Broken"), "{err}");
        let listed = env.ok(&["ls"]);
        for n in [
            "ok",
            "novol",
            "nocg",
            "garbage",
            "noimg",
            "nosock",
            "frozendead",
        ] {
            assert!(listed.contains(n), "{n} missing from\n{listed}");
        }
        assert_eq!(state(&env, "garbage"), "stopped", "round {round}");
        assert!(
            last_error(&env, "garbage").contains("exploded"),
            "{}",
            last_error(&env, "garbage")
        );
        assert_eq!(state(&env, "noimg"), "stopped");
        assert!(
            last_error(&env, "noimg").contains("image"),
            "{}",
            last_error(&env, "noimg")
        );
        if round == 0 {
            assert_eq!(state(&env, "nocg"), "stopped");
            assert!(
                last_error(&env, "nocg").contains("daemon"),
                "{}",
                last_error(&env, "nocg")
            );
            assert_eq!(state(&env, "nosock"), "stopped");
            assert!(
                last_error(&env, "nosock").contains("did not answer"),
                "{}",
                last_error(&env, "nosock")
            );
            assert_eq!(state(&env, "frozendead"), "stopped");
            assert!(gone(fd_pid));
            for n in ["nocg", "nosock", "frozendead"] {
                env.ok(&["start", n]);
                assert_eq!(env.ok(&["exec", n, "echo up"]), "up\n", "{n}");
            }
        }
        env.kill_daemon();
    }
    env.start_daemon();
    // What cannot be repaired can be removed.
    for n in ["novol", "garbage", "noimg"] {
        env.ok(&["destroy", n]);
    }
    let listed = env.ok(&["ls", "-q"]);
    assert_eq!(
        {
            let mut l: Vec<&str> = listed.lines().collect();
            l.sort();
            l
        },
        ["frozendead", "nocg", "nosock", "ok"]
    );
}

/// The daemon mark in a process's environment.
fn mark_of(pid: u32) -> String {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"DEVBOX_DAEMON_MARK="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .expect("the daemon carries its mark")
}

fn sleeper(mark: Option<&str>) -> Child {
    let mut cmd = Command::new("sleep");
    cmd.arg("1000").stdin(Stdio::null()).stdout(Stdio::null());
    if let Some(m) = mark {
        cmd.env("DEVBOX_DAEMON_MARK", m);
    }
    cmd.spawn().unwrap()
}

fn exited(child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn what_a_killed_daemon_left_running_is_reaped() {
    require_root!();
    let mut env = TestEnv::new();
    env.ok(&["create", "dev"]);
    let parent = env.cgroup_parent.clone();
    let warm_names = || -> Vec<String> {
        let mut out = Vec::new();
        for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            for e in std::fs::read_dir(h.path().join(&parent))
                .into_iter()
                .flatten()
                .flatten()
            {
                let n = e.file_name().to_string_lossy().to_string();
                if n.starts_with("warm-") && e.path().is_dir() && !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        out
    };
    let dev_cg = cgroup_name_of(&env, env.init_pid("dev").unwrap());
    wait_for("warm launchers", || {
        warm_names().iter().filter(|n| **n != dev_cg).count() >= 2
    });
    let old_warm: Vec<String> = warm_names().into_iter().filter(|n| *n != dev_cg).collect();
    let mut launcher_pids: Vec<i32> = Vec::new();
    for n in &old_warm {
        for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let procs = std::fs::read_to_string(
                h.path()
                    .join(&env.cgroup_parent)
                    .join(n)
                    .join("cgroup.procs"),
            )
            .unwrap_or_default();
            launcher_pids.extend(procs.lines().filter_map(|l| l.parse::<i32>().ok()));
        }
    }
    assert!(!launcher_pids.is_empty(), "no warm launcher process found");
    let daemon = env.daemon_pid().unwrap();
    let mark = mark_of(daemon);
    assert!(mark.starts_with(&format!("{daemon}:")), "{mark}");

    // A launcher stuck in its cgroup (as if it never saw the daemon go).
    let stuck_cg = "warm-0123456789abcdef";
    let mut stuck = sleeper(None);
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let parent = h.path().join(&env.cgroup_parent);
        if parent.is_dir() {
            let d = parent.join(stuck_cg);
            std::fs::create_dir(&d).unwrap();
            if std::fs::read_to_string(d.join("cpuset.cpus")).is_ok_and(|s| s.trim().is_empty()) {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(parent.join(f)).unwrap();
                    std::fs::write(d.join(f), v.trim()).unwrap();
                }
            }
            std::fs::write(d.join("cgroup.procs"), stuck.id().to_string()).unwrap();
        }
    }
    // A helper the daemon started (it inherited the daemon's mark), outside any cgroup of ours.
    let mut helper = sleeper(Some(&mark));
    // Not ours: another state dir's helper, and a process with no mark.
    let mut foreign = sleeper(Some("1:0000:/nonexistent/state"));
    let mut plain = sleeper(None);
    // A sandbox's process that claims the mark: it is the sandbox's, not the daemon's.
    env.ok(&[
        "exec",
        "dev",
        &format!("DEVBOX_DAEMON_MARK='{mark}' sleep 1000 >/dev/null 2>&1 &"),
    ]);

    env.kill_daemon();
    env.start_daemon();

    assert!(exited(&mut helper), "the dead daemon's helper still runs");
    assert!(exited(&mut stuck), "the stuck warm launcher still runs");
    for pid in &launcher_pids {
        assert!(gone(*pid), "warm launcher {pid} still runs");
    }
    let now = warm_names();
    for n in old_warm.iter().chain([&stuck_cg.to_string()]) {
        assert!(!now.contains(n), "cgroup {n} is left: {now:?}");
    }
    assert!(
        matches!(foreign.try_wait(), Ok(None)),
        "another daemon's helper was killed"
    );
    assert!(
        matches!(plain.try_wait(), Ok(None)),
        "an unrelated process was killed"
    );
    assert!(
        env.ok(&["exec", "dev", "ps -e -o args"])
            .contains("sleep 1000"),
        "the sandbox's own process was killed"
    );
    assert_eq!(state(&env, "dev"), "running");
    // The new daemon has a mark of its own, and new warm launchers.
    let new_mark = mark_of(env.daemon_pid().unwrap());
    assert_ne!(new_mark, mark);
    for mut c in [foreign, plain] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

// ---- the audit chain ----

fn verify(env: &TestEnv, args: &[&str]) -> (i32, serde_json::Value) {
    let mut all = vec!["audit", "verify", "--format", "json"];
    all.extend_from_slice(args);
    let out = env.sb(&all);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), v)
}

/// Every audit row, as stored.
type Row = (
    i64,
    i64,
    String,
    String,
    Option<String>,
    String,
    String,
    String,
);

fn rows(db: &Path) -> (Vec<Row>, Option<String>) {
    let out = common::sqlite(
        db,
        &[
            (
                "SELECT seq, time, actor, action, sandbox, detail, prev_hash, hash FROM audit ORDER BY seq",
                serde_json::json!([]),
            ),
            (
                "SELECT value FROM meta WHERE key = 'audit_anchor'",
                serde_json::json!([]),
            ),
        ],
    );
    let s = |v: &serde_json::Value| v.as_str().expect("text").to_string();
    let rows = out[0]
        .rows
        .iter()
        .map(|r| {
            (
                r[0].as_i64().expect("seq"),
                r[1].as_i64().expect("time"),
                s(&r[2]),
                s(&r[3]),
                r[4].as_str().map(str::to_string),
                s(&r[5]),
                s(&r[6]),
                s(&r[7]),
            )
        })
        .collect();
    let anchor = out[1].rows.first().map(|r| s(&r[0]));
    (rows, anchor)
}

fn put_rows(db: &Path, rows: &[Row], anchor: Option<&str>) {
    let mut statements = vec![("DELETE FROM audit", serde_json::json!([]))];
    for r in rows {
        statements.push((
            "INSERT INTO audit (seq, time, actor, action, sandbox, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            serde_json::json!([r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7]),
        ));
    }
    statements.push((
        "DELETE FROM meta WHERE key = 'audit_anchor'",
        serde_json::json!([]),
    ));
    if let Some(a) = anchor {
        statements.push((
            "INSERT INTO meta (key, value) VALUES ('audit_anchor', ?1)",
            serde_json::json!([a]),
        ));
    }
    common::sqlite(db, &statements);
}

/// Deletes the records up to `cut` and points the anchor at the last one deleted, the way
/// the old retention did.
fn cut_and_reanchor(db: &Path, all: &[Row], cut: i64) {
    let hash = &all.iter().find(|r| r.0 == cut).unwrap().7;
    common::sqlite(
        db,
        &[
            (
                "DELETE FROM audit WHERE seq <= ?1",
                serde_json::json!([cut]),
            ),
            (
                "INSERT INTO meta (key, value) VALUES ('audit_anchor', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                serde_json::json!([hash]),
            ),
        ],
    );
}

fn http(env: &TestEnv, path: &str) -> (u16, serde_json::Value) {
    let mut s = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn an_audit_log_cut_at_its_start_does_not_verify() {
    require_root!();
    let mut env = TestEnv::new();
    env.ok(&["create", "dev"]);
    for i in 0..40 {
        env.ok(&["exec", "dev", &format!("echo {i}")]);
    }
    let (code, v) = verify(&env, &[]);
    assert_eq!((code, &v["ok"]), (0, &serde_json::json!(true)), "{v}");
    env.stop_daemon();
    let db = env.state.join("state.db");
    let (all, anchor) = rows(&db);
    let n = all.last().unwrap().0;
    assert!(n >= 40);
    for cut in [1, 2, 10, n / 2, n - 1] {
        cut_and_reanchor(&db, &all, cut);
        env.start_daemon();
        let (code, v) = verify(&env, &[]);
        assert_eq!(code, 1, "cut {cut}: {v}");
        assert_eq!(v["first_broken"], cut + 1, "cut {cut}: {v}");
        assert!(v["problem"].as_str().unwrap().contains("missing"), "{v}");
        let text = env.sb(&["audit", "verify"]);
        assert!(
            String::from_utf8_lossy(&text.stdout)
                .contains(&format!("BROKEN at record {}", cut + 1))
        );
        env.stop_daemon();
        put_rows(&db, &all, anchor.as_deref());
    }

    // A real retention: the records up to K age out; the chain says so and verifies.
    let k = 20i64;
    let kept_head = all.iter().find(|r| r.0 == k).unwrap().7.clone();
    common::sqlite(
        &db,
        &[(
            "UPDATE audit SET time = time - ?1 WHERE seq <= ?2",
            serde_json::json!([40 * 86_400_000i64, k]),
        )],
    );
    env.restart_with_env("DEVBOX_RETENTION_DAYS", "30");
    wait_for("retention", || {
        let records: serde_json::Value =
            serde_json::from_str(&env.ok(&["audit", "--format", "json", "--limit", "100000"]))
                .unwrap();
        records
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["seq"].as_i64().unwrap() > k)
    });
    let records: serde_json::Value =
        serde_json::from_str(&env.ok(&["audit", "--format", "json", "--limit", "100000"])).unwrap();
    let prune: Vec<&serde_json::Value> = records
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "audit.prune")
        .collect();
    assert_eq!(prune.len(), 1, "{records}");
    assert_eq!(prune[0]["actor"], "retention");
    assert_eq!(prune[0]["detail"]["pruned"], k);
    assert_eq!(prune[0]["detail"]["first_seq"], 1);
    assert_eq!(prune[0]["detail"]["last_seq"], k);
    assert_eq!(prune[0]["detail"]["last_hash"], kept_head.as_str());
    let (code, v) = verify(&env, &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["pruned_through"], k);
    // A head kept from before the retention is vouched for by the retention record.
    let (code, v) = verify(&env, &["--head", &kept_head]);
    assert_eq!(
        (code, &v["kept_head_seq"]),
        (0, &serde_json::json!(k)),
        "{v}"
    );

    // Cuts beyond what retention pruned, at several points, and of the record itself.
    env.ok(&["exec", "dev", "echo after"]);
    assert_eq!(verify(&env, &[]).0, 0);
    env.stop_daemon();
    let (all, anchor) = rows(&db);
    let prune_seq = all.iter().find(|r| r.3 == "audit.prune").unwrap().0;
    for cut in [k + 1, k + 2, k + 15, prune_seq - 1] {
        cut_and_reanchor(&db, &all, cut);
        env.start_daemon();
        let (code, v) = verify(&env, &[]);
        assert_eq!(code, 1, "cut {cut}: {v}");
        assert_eq!(v["first_broken"], cut + 1, "cut {cut}: {v}");
        env.stop_daemon();
        put_rows(&db, &all, anchor.as_deref());
    }
    for cut in [prune_seq, prune_seq + 1] {
        cut_and_reanchor(&db, &all, cut);
        env.start_daemon();
        let (code, v) = verify(&env, &[]);
        assert_eq!(code, 1, "cut {cut} (the retention record): {v}");
        env.stop_daemon();
        put_rows(&db, &all, anchor.as_deref());
    }
    env.start_daemon();
    assert_eq!(verify(&env, &[]).0, 0);
}

#[test]
fn a_kept_head_shows_a_rewritten_or_cut_log() {
    require_root!();
    let mut env = TestEnv::new();
    env.ok(&["create", "dev"]);
    env.ok(&["exec", "dev", "echo one"]);
    let (code, v) = verify(&env, &[]);
    assert_eq!(code, 0, "{v}");
    let head = v["head"].as_str().unwrap().to_string();
    let head_seq = v["head_seq"].as_i64().unwrap();
    let text = env.ok(&["audit", "verify"]);
    assert!(
        text.contains(&format!("head: {head} (record {head_seq})")),
        "{text}"
    );
    env.ok(&["exec", "dev", "echo two"]);
    env.ok(&["stop", "dev"]);

    // The right head: the chain reaches it; records after it are counted.
    let (code, v) = verify(&env, &["--head", &head]);
    assert_eq!(
        (code, &v["ok"], &v["kept_head_seq"]),
        (0, &serde_json::json!(true), &serde_json::json!(head_seq)),
        "{v}"
    );
    let text = env.ok(&["audit", "verify", "--head", &head.to_uppercase()]);
    assert!(text.contains(&format!("is record {head_seq}")), "{text}");
    // Over REST.
    let (status, v) = http(&env, &format!("/v1/audit/verify?head={head}"));
    assert_eq!((status, &v["ok"]), (200, &serde_json::json!(true)), "{v}");
    // A wrong head (one digit changed) and malformed ones.
    let mut wrong = head.clone().into_bytes();
    wrong[10] = if wrong[10] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    let (code, v) = verify(&env, &["--head", &wrong]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["ok"], false);
    assert!(
        v["problem"].as_str().unwrap().contains("not in the chain"),
        "{v}"
    );
    let (status, v) = http(&env, &format!("/v1/audit/verify?head={wrong}"));
    assert_eq!((status, &v["ok"]), (200, &serde_json::json!(false)), "{v}");
    for bad in ["xyz", "", &head[..63], &format!("{head}0")] {
        let out = env.sb(&["audit", "verify", "--head", bad]);
        assert_ne!(out.status.code(), Some(0), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--head"),
            "{bad:?}"
        );
    }
    let (status, _) = http(&env, "/v1/audit/verify?head=nothex");
    assert_eq!(status, 400);

    // Records cut from the end (the kept head among them): the chain alone still holds,
    // the kept head shows the cut.
    env.stop_daemon();
    let db = env.state.join("state.db");
    common::sqlite(
        &db,
        &[(
            "DELETE FROM audit WHERE seq >= ?1",
            serde_json::json!([head_seq]),
        )],
    );
    env.start_daemon();
    assert_eq!(
        verify(&env, &[]).0,
        0,
        "a cut at the end is invisible without a head"
    );
    let (code, v) = verify(&env, &["--head", &head]);
    assert_eq!(code, 1, "{v}");

    // The whole chain rewritten consistently (hashes recomputed): only the head shows it.
    env.stop_daemon();
    {
        let (recs, _) = rows(&db);
        let mut prev = "0".repeat(64);
        let mut statements = Vec::new();
        for (seq, time, actor, action, sandbox, detail, _, _) in recs {
            let detail = detail.replace("echo one", "echo 1ne");
            let d: serde_json::Value = serde_json::from_str(&detail).unwrap();
            let canonical =
                serde_json::json!([seq, time, actor, action, sandbox, d, prev]).to_string();
            use sha2::Digest;
            let hash = hex::encode(sha2::Sha256::digest(canonical.as_bytes()));
            statements.push((
                "UPDATE audit SET detail = ?2, prev_hash = ?3, hash = ?4 WHERE seq = ?1",
                serde_json::json!([seq, d.to_string(), prev, hash]),
            ));
            prev = hash;
        }
        common::sqlite(&db, &statements);
    }
    env.start_daemon();
    assert_eq!(
        verify(&env, &[]).0,
        0,
        "a consistent rewrite verifies without a head"
    );
    let (code, v) = verify(&env, &["--head", &head]);
    assert_eq!(code, 1, "{v}");
}

// ---- host uid ranges ----

/// (first host uid, count) of a sandbox's user namespace, from its init's uid_map.
fn uid_range(env: &TestEnv, name: &str) -> (u64, u64) {
    let pid = env.init_pid(name).unwrap();
    let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    let f: Vec<u64> = map.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(f.len(), 3, "one line: {map}");
    (f[1], f[2])
}

fn disjoint(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0
}

#[test]
fn two_daemons_never_share_host_uids() {
    require_root!();
    let a = TestEnv::new();
    let mut b = TestEnv::new();
    a.ok(&["create", "x1"]);
    b.ok(&["create", "y1"]);
    a.ok(&["create", "x2"]);
    let mut ranges_a = vec![uid_range(&a, "x1"), uid_range(&a, "x2")];
    let mut ranges_b = vec![uid_range(&b, "y1")];
    for ra in &ranges_a {
        for rb in &ranges_b {
            assert!(disjoint(*ra, *rb), "{ra:?} and {rb:?} overlap");
        }
    }
    assert!(disjoint(ranges_a[0], ranges_a[1]));
    // The registry names each daemon's state directory as the owner of its blocks.
    let reg_path = std::env::var("DEVBOX_UID_REGISTRY")
        .unwrap_or_else(|_| "/var/lib/dev-box/uid-ranges.json".into());
    let reg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&reg_path).unwrap()).unwrap();
    let owner_of = |uid: u64| {
        let slots = reg["block_slots"].as_u64().unwrap();
        let block = (uid - 1_000_000) / 65_536 / slots;
        reg["blocks"][block.to_string()]["owner"]
            .as_str()
            .map(PathBuf::from)
    };
    assert_eq!(
        owner_of(ranges_a[0].0),
        Some(std::fs::canonicalize(&a.state).unwrap())
    );
    assert_eq!(
        owner_of(ranges_b[0].0),
        Some(std::fs::canonicalize(&b.state).unwrap())
    );

    // b is killed and comes back: its sandbox keeps its range, a new one is still apart.
    let y1 = ranges_b[0];
    b.kill_daemon();
    b.start_daemon();
    assert_eq!(uid_range(&b, "y1"), y1);
    b.ok(&["create", "y2"]);
    ranges_b.push(uid_range(&b, "y2"));
    a.ok(&["create", "x3"]);
    ranges_a.push(uid_range(&a, "x3"));
    for ra in &ranges_a {
        for rb in &ranges_b {
            assert!(disjoint(*ra, *rb), "{ra:?} and {rb:?} overlap");
        }
    }
}
