//! Limits that hold: exec timeouts that kill a whole process tree (daemonized, re-sessioned
//! or not), live limit changes read back from the cgroup, disk quotas (ENOSPC-like EDQUOT
//! inside, neighbours and host unaffected, snapshots, hard links and reflinks), OOM kills
//! reported as such, and a memory bomb, a fork bomb, a disk filler and a CPU spinner that
//! stay inside while a second sandbox keeps working.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestEnv;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A raw HTTP/1.1 request over the daemon's socket; returns (status, JSON body).
fn http(env: &TestEnv, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = std::os::unix::net::UnixStream::connect(&env.socket).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status: u16 = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let payload = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (
        status,
        serde_json::from_str(payload).unwrap_or(serde_json::Value::Null),
    )
}

/// A sandbox's audit records with `action`.
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

/// Command lines of the sandbox's processes, seen from the host.
fn processes(env: &TestEnv, name: &str) -> Vec<String> {
    inspect(env, name)["processes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| p["command"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The sandbox's cgroup directory in v1 hierarchy `controller` (or the unified one for
/// `""`), from its init's /proc/PID/cgroup.
fn cgroup_dir(env: &TestEnv, name: &str, controller: &str) -> PathBuf {
    let pid = env.init_pid(name).expect("running");
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next().unwrap_or(""), parts.next());
        let path = path.unwrap_or("").trim_start_matches('/');
        if ctrls.split(',').any(|c| c == controller) {
            return PathBuf::from(format!("/sys/fs/cgroup/{controller}")).join(path);
        }
        if controller.is_empty() && ctrls.is_empty() {
            let unified = if std::path::Path::new("/sys/fs/cgroup/unified").is_dir() {
                "/sys/fs/cgroup/unified"
            } else {
                "/sys/fs/cgroup"
            };
            return PathBuf::from(unified).join(path);
        }
    }
    panic!("no {controller} cgroup for {name}: {text}");
}

/// The value of a limit file, whichever cgroup version holds it.
fn limit_file(env: &TestEnv, name: &str, v1: (&str, &str), v2: &str) -> String {
    let dir = cgroup_dir(env, name, v1.0);
    let (dir, file) = if dir.join(v1.1).exists() {
        (dir, v1.1)
    } else {
        (cgroup_dir(env, name, ""), v2)
    };
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
        .trim()
        .to_string()
}

fn memory_limit(env: &TestEnv, name: &str) -> String {
    limit_file(env, name, ("memory", "memory.limit_in_bytes"), "memory.max")
}

fn pids_limit(env: &TestEnv, name: &str) -> String {
    limit_file(env, name, ("pids", "pids.max"), "pids.max")
}

fn cpu_limit(env: &TestEnv, name: &str) -> String {
    let quota = limit_file(env, name, ("cpu", "cpu.cfs_quota_us"), "cpu.max");
    quota
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The second sandbox and the host keep working: it runs a command and writes a file.
fn neighbour_works(env: &TestEnv, name: &str) {
    let (code, out, err) = env.sh(
        name,
        "dd if=/dev/zero of=/tmp/neighbour bs=1M count=8 2>/dev/null && echo fine",
    );
    assert_eq!((code, out.trim()), (0, "fine"), "{err}");
    let host = tempfile::NamedTempFile::new().expect("host tempfile");
    std::fs::write(host.path(), vec![1u8; 1 << 20]).expect("the host writes");
}

#[test]
fn exec_timeout_kills_the_whole_tree() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    env.ok(&["create", "dev"]);
    // A tree that tries every way out: a child in the background, a grandchild in a new
    // session (setsid), a double-forked daemon that closed its stdio, one that tries to
    // move itself into another cgroup, and the command itself waiting forever.
    let tree = r#"
sleep 611 &
setsid sh -c 'exec sleep 612' </dev/null >/dev/null 2>&1 &
python3 -c '
import os, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for fd in range(3): os.close(fd)
        os.execvp("sleep", ["sleep", "613"])
    os._exit(0)
os.wait()
'
sh -c 'for f in /sys/fs/cgroup/cgroup.procs /sys/fs/cgroup/unified/cgroup.procs /sys/fs/cgroup/pids/cgroup.procs; do echo $$ > $f 2>/dev/null; done; mkdir -p /tmp/cg; mount -t cgroup2 none /tmp/cg 2>/dev/null && echo $$ > /tmp/cg/cgroup.procs; exec sleep 614' </dev/null >/dev/null 2>&1 &
echo started
sleep 615
"#;
    let begun = Instant::now();
    let out = env.sb(&["exec", "--timeout", "2s", "dev", tree]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("started"));
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        text(&out.stderr)
    );
    assert!(begun.elapsed() < Duration::from_secs(60));
    // Nothing of the tree is left, wherever it went.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = processes(&env, "dev")
            .into_iter()
            .filter(|c| c.contains("sleep 61"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left running: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The sandbox itself runs on, and an exec without a timeout is untouched by all this.
    assert_eq!(env.sh("dev", "echo alive").1.trim(), "alive");
    // A process an exec without a timeout leaves in the background keeps running.
    env.ok(&[
        "exec",
        "dev",
        "setsid sleep 616 </dev/null >/dev/null 2>&1 &",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        processes(&env, "dev")
            .iter()
            .any(|c| c.contains("sleep 616"))
    );

    // REST: the result says timed_out, with exit code 124.
    let (status, v) = http(
        &env,
        "POST",
        "/v1/sandboxes/dev/exec",
        r#"{"command":"echo partial; sleep 100","timeout":"500ms"}"#,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["exit_code"], 124, "{v}");
    assert_eq!(v["timed_out"], true, "{v}");
    assert_eq!(v["oom_killed"], false, "{v}");
    assert_eq!(v["stdout"].as_str().unwrap_or_default().trim(), "partial");
    // A command that ends in time is not marked.
    let (_, v) = http(
        &env,
        "POST",
        "/v1/sandboxes/dev/exec",
        r#"{"command":"exit 3","timeout":"30s"}"#,
    );
    assert_eq!(
        (v["exit_code"].clone(), v["timed_out"].clone()),
        (3.into(), false.into())
    );
    // Bad timeouts are refused before anything runs.
    let err = env.fails(&["exec", "--timeout", "soon", "dev", "true"]);
    assert!(err.contains("invalid duration"), "{err}");
    let (status, v) = http(
        &env,
        "POST",
        "/v1/sandboxes/dev/exec",
        r#"{"command":"true","timeout":"-1s"}"#,
    );
    assert_eq!(status, 400, "{v}");

    // The audit record of the exec says it timed out.
    let execs = audit(&env, "dev", "exec");
    assert!(
        execs.iter().any(|r| r["detail"]["timed_out"] == true),
        "{execs:?}"
    );

    // A sandbox-wide default from the spec; an exec's own timeout wins over it.
    env.ok(&["create", "short", "--exec-timeout", "1s"]);
    let out = env.sb(&["exec", "short", "sleep 100"]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert_eq!(
        env.sb(&["exec", "--timeout", "30s", "short", "sleep 1.5; exit 5"])
            .status
            .code(),
        Some(5)
    );
    let v = inspect(&env, "short");
    assert_eq!(v["manifest"]["spec"]["limits"]["execTimeout"], "1s", "{v}");
    // Its exec cgroups are gone once their processes are.
    for dir in env.cgroup_dirs() {
        let left: Vec<_> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("exec-"))
            .filter(|e| {
                std::fs::read_to_string(e.path().join("cgroup.procs"))
                    .is_ok_and(|p| p.trim().is_empty())
            })
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "empty exec cgroups left: {left:?}");
    }
}

#[test]
fn update_applies_live_and_bad_updates_change_nothing() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&[
        "create", "dev", "--memory", "256Mi", "--pids", "100", "--cpus", "1",
    ]);
    let init = env.init_pid("dev");
    assert_eq!(memory_limit(&env, "dev"), (256u64 << 20).to_string());
    assert_eq!(pids_limit(&env, "dev"), "100");
    assert_eq!(cpu_limit(&env, "dev"), "100000");

    let out = env.ok(&[
        "update", "dev", "--memory", "512Mi", "--cpus", "2", "--pids", "2048",
    ]);
    assert!(out.contains("memory 512.0 MiB, cpu 2, pids 2048"), "{out}");
    // Applied to the running sandbox's cgroup, without a restart.
    assert_eq!(env.init_pid("dev"), init, "restarted");
    assert_eq!(memory_limit(&env, "dev"), (512u64 << 20).to_string());
    assert_eq!(pids_limit(&env, "dev"), "2048");
    assert_eq!(cpu_limit(&env, "dev"), "200000");
    // Persisted in the spec and audited with old and new values.
    let v = inspect(&env, "dev");
    assert_eq!(v["manifest"]["spec"]["limits"]["memory"], "512Mi");
    assert_eq!(v["limits"]["pids"], 2048);
    let updates = audit(&env, "dev", "sandbox.update");
    let rec = updates.first().expect("a sandbox.update record");
    let limits = &rec["detail"]["limits"];
    assert_eq!(limits["old"]["memory_bytes"], 256u64 << 20, "{rec}");
    assert_eq!(limits["new"]["memory_bytes"], 512u64 << 20, "{rec}");
    assert_eq!(limits["new"]["cpu_millis"], 2000, "{rec}");

    // Lowering works live too.
    env.ok(&["update", "dev", "--memory", "200Mi", "--pids", "50"]);
    assert_eq!(memory_limit(&env, "dev"), (200u64 << 20).to_string());
    assert_eq!(pids_limit(&env, "dev"), "50");

    // Bad values change nothing: invalid strings, out of range, below current use.
    let snapshot = || {
        (
            memory_limit(&env, "dev"),
            pids_limit(&env, "dev"),
            cpu_limit(&env, "dev"),
            inspect(&env, "dev")["manifest"]["spec"]["limits"].clone(),
        )
    };
    let before = snapshot();
    let err = env.fails(&["update", "dev", "--memory", "lots", "--pids", "64"]);
    assert!(
        err.contains("spec.limits.memory") && err.contains("invalid quantity"),
        "{err}"
    );
    let err = env.fails(&["update", "dev", "--cpus", "0.001", "--memory", "300Mi"]);
    assert!(err.contains("spec.limits.cpu"), "{err}");
    let err = env.fails(&["update", "dev", "--pids", "1"]);
    assert!(err.contains("spec.limits.pids"), "{err}");
    let err = env.fails(&["update", "dev", "--exec-timeout", "forever"]);
    assert!(err.contains("execTimeout"), "{err}");
    let err = env.fails(&["update", "dev"]);
    assert!(err.contains("nothing to change"), "{err}");
    assert_eq!(snapshot(), before);
    // Memory below what the sandbox uses now: refused, nothing changed.
    let mut hog = env
        .cmd()
        .args([
            "exec",
            "dev",
            "python3 -c 'import time; a = bytearray(96 << 20); a[::4096] = b\"x\" * len(a[::4096]); print(\"ready\", flush=True); time.sleep(60)'",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn hog");
    let mut ready = [0u8; 5];
    hog.stdout
        .as_mut()
        .expect("stdout")
        .read_exact(&mut ready)
        .expect("hog ready");
    let err = env.fails(&["update", "dev", "--memory", "32Mi", "--cpus", "3"]);
    assert!(err.contains("below what sandbox dev uses now"), "{err}");
    // Pids below the processes it runs now.
    let err = env.fails(&["update", "dev", "--pids", "2"]);
    assert!(err.contains("processes and threads"), "{err}");
    assert_eq!(snapshot(), before);
    let _ = hog.kill();
    let _ = hog.wait();
    // REST, PATCH and POST; unknown fields refused.
    let (status, v) = http(&env, "PATCH", "/v1/sandboxes/dev/limits", r#"{"pids":300}"#);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["limits"]["pids"], 300);
    assert_eq!(pids_limit(&env, "dev"), "300");
    let (status, v) = http(
        &env,
        "POST",
        "/v1/sandboxes/dev/limits",
        r#"{"cpu":"500m"}"#,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(cpu_limit(&env, "dev"), "50000");
    let (status, v) = http(
        &env,
        "PATCH",
        "/v1/sandboxes/dev/limits",
        r#"{"memroy":"1Gi"}"#,
    );
    assert_eq!(status, 400, "{v}");
    let (status, _) = http(
        &env,
        "PATCH",
        "/v1/sandboxes/nope/limits",
        r#"{"pids":300}"#,
    );
    assert_eq!(status, 404);

    // A stopped sandbox: the spec changes; the next start applies it.
    env.ok(&["stop", "dev", "-t", "0"]);
    env.ok(&["update", "dev", "--memory", "128Mi"]);
    env.ok(&["start", "dev"]);
    assert_eq!(memory_limit(&env, "dev"), (128u64 << 20).to_string());
    assert_eq!(pids_limit(&env, "dev"), "300");
}

/// Fills `path` in the sandbox with `mib` MiB; returns (exit code, dd's messages).
fn fill(env: &TestEnv, name: &str, path: &str, mib: u32) -> (i32, String) {
    let (code, out, err) = env.sh(
        name,
        &format!("dd if=/dev/urandom of={path} bs=1M count={mib} conv=fsync 2>&1"),
    );
    (code, out + &err)
}

fn disk(env: &TestEnv, name: &str) -> (u64, Option<u64>) {
    let v = inspect(env, name);
    (
        v["disk"]["used_bytes"].as_u64().unwrap_or(0),
        v["disk"]["limit_bytes"].as_u64(),
    )
}

#[test]
fn disk_quota_holds_against_fillers_links_and_snapshots() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    env.ok(&["create", "full", "--disk", "64Mi"]);
    env.ok(&["create", "free"]);
    assert_eq!(disk(&env, "full").1, Some(64 << 20));
    assert_eq!(inspect(&env, "free")["disk"], serde_json::Value::Null);

    // A disk filler stops at the quota: the write fails inside.
    let (code, _, err) = env.sh(
        "full",
        "dd if=/dev/zero of=/big bs=1M count=200 conv=fsync; echo rc=$?",
    );
    assert_eq!(code, 0);
    assert!(err.contains("Disk quota exceeded"), "{err}");
    let (used, limit) = disk(&env, "full");
    assert_eq!(limit, Some(64 << 20));
    assert!(used > 32 << 20 && used <= 70 << 20, "{used}");
    // Deleting frees room at once; preallocating past the quota fails too; a sparse file
    // takes no room.
    let (_, out, err) = env.sh(
        "full",
        "rm /big && sync && fallocate -l 200M /prealloc; echo rc=$?; truncate -s 100G /sparse && echo sparse-ok",
    );
    assert!(err.contains("Disk quota exceeded"), "{out} {err}");
    assert!(out.contains("sparse-ok"), "{out} {err}");
    env.sh("full", "rm -f /prealloc /sparse");
    // The neighbour and the host are not affected.
    neighbour_works(&env, "free");
    assert_eq!(
        fill(&env, "free", "/big", 100).0,
        0,
        "the neighbour fills past 64Mi"
    );

    // Hard links and reflinks reference the same extents: no way past the quota.
    env.sh("full", "rm -f /big; sync");
    assert_eq!(fill(&env, "full", "/data", 40).0, 0);
    let (code, out, err) = env.sh(
        "full",
        "for i in 1 2 3 4 5 6 7 8; do ln /data /link$i && cp --reflink=auto /data /copy$i || echo failed $i; done; sync; echo done",
    );
    assert_eq!(code, 0, "{err}");
    // Reflinks through the overlay share extents, so all copies fit; if the overlay copies
    // instead, the quota stops them. Either way the writable layer stays within 64Mi.
    assert!(out.contains("done"), "{out}");
    let (used, _) = disk(&env, "full");
    assert!(used <= 70 << 20, "links took {used} bytes");
    let (code, err) = fill(&env, "full", "/more", 40);
    assert_ne!(code, 0, "wrote past the quota");
    assert!(err.contains("Disk quota exceeded"), "{err}");

    // A subvolume or snapshot made from inside would have a qgroup of its own, without a
    // limit: the btrfs ioctls do not reach through the overlay.
    let (_, out, err) = env.sh(
        "full",
        "btrfs subvolume create /work/sub; echo rc=$?; btrfs subvolume snapshot /work /work/snap; echo rc=$?",
    );
    assert_eq!(out.matches("rc=1").count(), 2, "{out} {err}");
    assert!(err.contains("ERROR: not a btrfs filesystem"), "{err}");
    // Snapshots do not count against the quota: with the files deleted (they live on in
    // the snapshot), the sandbox has its room again.
    env.ok(&["snapshot", "full", "s1"]);
    env.sh("full", "rm -f /data /link* /copy* /more; sync");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fill(&env, "full", "/again", 40).0, 0, "snapshots counted");
    // A rollback brings a new volume; the quota holds on it too.
    env.ok(&["rollback", "full", "--to", "s1"]);
    assert_eq!(disk(&env, "full").1, Some(64 << 20));
    let (code, err) = fill(&env, "full", "/after-rollback", 60);
    assert_ne!(code, 0, "wrote past the quota after a rollback");
    assert!(err.contains("Disk quota exceeded"), "{err}");
    // A clone gets the spec, and the quota with it.
    env.ok(&["clone", "full", "s1", "twin"]);
    assert_eq!(disk(&env, "twin").1, Some(64 << 20));

    // Live: more room at once; lowering below the current use is refused.
    env.sh("full", "rm -f /after-rollback; sync");
    env.ok(&["update", "full", "--disk", "256Mi"]);
    assert_eq!(disk(&env, "full").1, Some(256 << 20));
    assert_eq!(fill(&env, "full", "/grown", 100).0, 0);
    let err = env.fails(&["update", "full", "--disk", "16Mi"]);
    assert!(
        err.contains("below what sandbox full's writable layer holds"),
        "{err}"
    );
    assert_eq!(disk(&env, "full").1, Some(256 << 20));
    env.ok(&["update", "full", "--disk", "none"]);
    assert_eq!(inspect(&env, "full")["disk"], serde_json::Value::Null);
    assert_eq!(
        inspect(&env, "full")["manifest"]["spec"]["limits"]["disk"],
        serde_json::Value::Null
    );
}

#[test]
fn copy_driver_refuses_disk_quotas() {
    require_root!();
    let env = TestEnv::copy_driver();
    let err = env.fails(&["create", "dev", "--disk", "1Gi"]);
    assert!(
        err.contains("copy driver") && err.contains("btrfs") && err.contains("limits.disk"),
        "{err}"
    );
    assert!(env.ok(&["ls", "-q"]).trim().is_empty());
    env.ok(&["create", "dev"]);
    let err = env.fails(&["update", "dev", "--disk", "1Gi"]);
    assert!(err.contains("copy driver"), "{err}");
    assert_eq!(
        inspect(&env, "dev")["manifest"]["spec"]["limits"]["disk"],
        serde_json::Value::Null
    );
}

#[test]
fn bombs_and_spinners_stay_inside_their_limits() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    env.ok(&[
        "create", "bomb", "--memory", "64Mi", "--pids", "48", "--cpus", "0.5", "--disk", "32Mi",
    ]);
    env.ok(&["create", "neighbour"]);

    // A memory bomb: OOM-killed, and reported as such (not a bare 137).
    let bomb = "python3 -c 'a = []\nwhile True: a.append(bytearray(8 << 20))'";
    let out = env.sb(&["exec", "bomb", bomb]);
    assert_eq!(out.status.code(), Some(137));
    let err = text(&out.stderr);
    assert!(err.contains("out-of-memory"), "{err}");
    let (status, v) = http(
        &env,
        "POST",
        "/v1/sandboxes/bomb/exec",
        &serde_json::json!({"command": bomb}).to_string(),
    );
    assert_eq!(status, 200);
    assert_eq!(v["oom_killed"], true, "{v}");
    assert_eq!(v["timed_out"], false, "{v}");
    let kills = inspect(&env, "bomb")["usage"]["oom_kills"]
        .as_u64()
        .unwrap_or(0);
    assert!(kills >= 2, "inspect shows {kills} OOM kills");
    // A plain SIGKILL is not an OOM kill.
    let (_, v) = http(
        &env,
        "POST",
        "/v1/sandboxes/bomb/exec",
        r#"{"command":"kill -9 $$"}"#,
    );
    assert_eq!(
        (v["exit_code"].clone(), v["oom_killed"].clone()),
        (137.into(), false.into())
    );
    neighbour_works(&env, "neighbour");

    // A fork bomb: forks fail inside (EAGAIN) at the pids limit.
    let forks = r#"python3 -c '
import os, time
n = 0
try:
    while n < 500:
        if os.fork() == 0:
            time.sleep(3)
            os._exit(0)
        n += 1
except OSError as e:
    print("fork failed after", n, os.strerror(e.errno), flush=True)
while True:
    try: os.wait()
    except ChildProcessError: break
'"#;
    let (_, out, err) = env.sh("bomb", forks);
    assert!(out.contains("fork failed after"), "{out} {err}");
    assert!(out.contains("Resource temporarily unavailable"), "{out}");
    let n: u32 = out
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or(999);
    assert!(n < 48, "{n} forks under a limit of 48");
    neighbour_works(&env, "neighbour");

    // A CPU spinner (on both CPUs, for longer than the test needs): the neighbour runs
    // and writes meanwhile.
    let mut spinner = env
        .cmd()
        .args([
            "exec",
            "--timeout",
            "60s",
            "bomb",
            "for i in 1 2 3 4; do (while :; do :; done) & done; wait",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn spinner");
    std::thread::sleep(Duration::from_millis(500));
    neighbour_works(&env, "neighbour");
    // Its CPU time is capped by the cgroup: the quota is half a CPU.
    assert_eq!(cpu_limit(&env, "bomb"), "50000");
    // A disk filler at the same time.
    let (code, err) = fill(&env, "bomb", "/filler", 64);
    assert_ne!(code, 0);
    assert!(err.contains("Disk quota exceeded"), "{err}");
    neighbour_works(&env, "neighbour");
    let _ = spinner.kill();
    let _ = spinner.wait();
    env.ok(&["stop", "bomb", "-t", "0"]);
    neighbour_works(&env, "neighbour");
    // Everything above is the host's too: it can still run processes.
    assert!(Command::new("true").status().expect("host runs").success());
}

#[test]
fn exec_timeout_holds_for_a_terminal_exec() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    env.ok(&["create", "tty"]);
    // With a terminal the command is a session leader with a controlling tty: its tree
    // leaves the session and the terminal (setsid, nohup, a double fork), and is still
    // killed when the time is up.
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut cmd = env.cmd();
    let dup = || Stdio::from(std::fs::File::from(pty.slave.try_clone().unwrap()));
    cmd.args([
        "exec",
        "-t",
        "--timeout",
        "2s",
        "tty",
        "setsid sleep 621 </dev/null >/dev/null 2>&1 & nohup sleep 622 >/dev/null 2>&1 & (setsid sh -c 'sleep 623 &' &) ; echo started; sleep 624",
    ])
    .stdin(dup())
    .stdout(dup())
    .stderr(dup());
    let mut child = cmd.spawn().unwrap();
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    // Drain the terminal so the command never blocks on it.
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(master.read(&mut buf), Ok(n) if n > 0) {}
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the timed exec did not end");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(124));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = processes(&env, "tty")
            .into_iter()
            .filter(|c| c.contains("sleep 62"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left running: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(env.sh("tty", "echo alive").1.trim(), "alive");
}
