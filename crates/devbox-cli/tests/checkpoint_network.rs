//! Snapshots with processes (CRIU) of sandboxes with a network: a server behind a published
//! port and an allowlist is checkpointed, rolled back to (also by a restarted daemon) and
//! comes back with the same pid, reachable through the port again, with the allowlist still
//! holding; a clone of the snapshot gets its own address. Established TCP connections come
//! back closed (the listening sockets live); a sandbox without a network keeps its loopback
//! connections.
//!
//! The daemon runs in a namespace of the test whose only route leads into the test's world
//! namespace (devbox-net's test world), so no packet goes anywhere but there and loopback.

mod common;
#[path = "../../devbox-net/tests/world/mod.rs"]
mod world;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::TestEnv;
use world::World;

/// A dev-box whose daemon runs in `w`'s daemon namespace, resolving through its DNS server.
fn env_in(w: &World) -> TestEnv {
    w.check_routes();
    TestEnv::in_netns(
        &w.daemon,
        &format!("{}:53", world::UPSTREAM),
        "10.78.0.0/16",
        &[],
    )
}

fn net(env: &TestEnv, name: &str) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["network", name, "--format", "json"])).expect("json")
}

/// Connects from inside the sandbox to `host:port`; what the server said.
fn reach(env: &TestEnv, name: &str, host: &str, port: u16) -> Result<String, String> {
    let (code, out, err) = env.sh(
        name,
        &format!("timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/{port}; head -n1 <&3'"),
    );
    if code == 0 {
        Ok(out)
    } else {
        Err(format!("exit {code}: {err}"))
    }
}

/// GET /index.html through the published port, from the daemon's namespace.
fn through_port(w: &World, port: u16) -> Result<String, String> {
    world::in_ns(&w.daemon, move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    })
}

fn wait_port(env: &TestEnv, w: &World, port: u16, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match through_port(w, port) {
            Ok(p) if p.starts_with("HTTP/1.0 200") && p.contains(want) => return,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "published port: {other:?}\n{}",
                    env.daemon_log()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
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

/// Rolls back; on failure shows the end of CRIU's restore log.
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
            .filter(|l| l.contains("Error") || l.contains("Warn"))
            .collect();
        let tail = tail.join("\n");
        panic!("rollback {name} --to {to} failed: {err}\nCRIU's log ends:\n{tail}");
    }
}

/// A process holding one TCP connection over the sandbox's loopback (both ends its own):
/// every 100 ms it sends a byte one way and reads it the other, and writes to
/// /tmp/conn.state `ok N` or, once the connection fails, `closed: <error>`.
const CONN_PROBE: &str = r#"cat > /tmp/probe.py <<'EOF'
import socket, time, os
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 9911)); l.listen(1)
c = socket.create_connection(("127.0.0.1", 9911)); s, _ = l.accept(); l.close()
c.settimeout(2); s.settimeout(2)
n = 0
def put(t):
    open("/tmp/conn.state.new", "w").write(t); os.replace("/tmp/conn.state.new", "/tmp/conn.state")
while True:
    try:
        c.sendall(b"x")
        if s.recv(1) != b"x":
            raise OSError("connection ended")
        n += 1
        put("ok %d" % n)
    except OSError as e:
        put("closed: %s" % e)
        break
    time.sleep(0.1)
time.sleep(3600)
EOF
nohup python3 /tmp/probe.py >/dev/null 2>&1 &"#;

fn conn_state(env: &TestEnv, name: &str) -> String {
    env.sh(name, "cat /tmp/conn.state 2>/dev/null").1
}

fn wait_conn(env: &TestEnv, name: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = conn_state(env, name);
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "connection probe: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ok_count(s: &str) -> Option<u64> {
    s.strip_prefix("ok ")?.trim().parse().ok()
}

#[test]
fn server_behind_a_port_and_an_allowlist_comes_back() {
    require_root!();
    let w = World::new();
    let mut env = env_in(&w);
    let port = 18000 + (std::process::id() % 1000) as u16;
    let publish = format!("127.0.0.1:{port}:8000");
    env.ok(&[
        "create",
        "web",
        "--network",
        "allow",
        "--allow",
        "allowed.test",
        "-p",
        &publish,
    ]);
    env.ok(&[
        "exec",
        "web",
        "mkdir -p /srv && cd /srv && echo first > index.html && nohup python3 -m http.server 8000 >/dev/null 2>&1 &",
    ]);
    wait_port(&env, &w, port, "first");
    env.ok(&["exec", "web", CONN_PROBE]);
    let before = wait_conn(&env, "web", |s| ok_count(s).is_some_and(|n| n > 2));
    let server = pids_of(&env, "web", "http.server");
    assert_eq!(server.len(), 1, "{server:?}");
    let address = net(&env, "web")["address"].as_str().unwrap().to_string();

    env.ok(&["snapshot", "web", "live", "--with-processes"]);
    assert_eq!(env.snapshots("web")[0]["processes"], true);
    // The running sandbox goes on after the checkpoint.
    wait_port(&env, &w, port, "first");

    // Things change: the server goes away, files too.
    env.ok(&[
        "exec",
        "web",
        "pkill -f 'http[.]server'; echo second > /srv/index.html",
    ]);
    assert!(
        through_port(&w, port)
            .map(|p| !p.contains("200"))
            .unwrap_or(true)
    );

    rollback(&env, "web", "live");
    assert_eq!(pids_of(&env, "web", "http.server"), server, "same process");
    wait_port(&env, &w, port, "first");
    let after = net(&env, "web");
    assert_eq!(after["address"].as_str(), Some(address.as_str()));
    // The allowlist holds: the allowed name is reachable, another name and a bare address not.
    assert!(reach(&env, "web", "allowed.test", 80).is_ok());
    assert!(reach(&env, "web", "other.test", 80).is_err());
    assert!(reach(&env, "web", &world::BARE.to_string(), 80).is_err());
    // The loopback connection was restored closed: its next send fails.
    let st = wait_conn(&env, "web", |s| s.starts_with("closed"));
    assert!(ok_count(&before).is_some(), "{before} then {st}");
    // The restored processes have no power over the namespace: no raw sockets, no links.
    let (code, _, err) = env.sh(
        "web",
        "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)'",
    );
    assert_ne!(code, 0, "a raw socket after the restore: {err}");
    let (code, _, _) = env.sh(
        "web",
        "python3 -c 'import socket,fcntl,struct; s=socket.socket(); fcntl.ioctl(s, 0x8914, struct.pack(\"16sh\", b\"lo\", 0))'",
    );
    assert_ne!(code, 0, "taking loopback down after the restore");

    // A daemon restarted in between restores the snapshot again.
    env.kill_daemon();
    env.start_daemon();
    env.ok(&["exec", "web", "pkill -f 'http[.]server'"]);
    rollback(&env, "web", "live");
    assert_eq!(pids_of(&env, "web", "http.server"), server);
    wait_port(&env, &w, port, "first");
    assert!(reach(&env, "web", "allowed.test", 80).is_ok());
    assert!(reach(&env, "web", "other.test", 80).is_err());

    // A clone of it (files only) gets the network and an address of its own.
    env.ok(&["clone", "web", "live", "copy"]);
    let copy = net(&env, "copy");
    assert_ne!(copy["address"].as_str(), Some(address.as_str()));
    assert_eq!(copy["allow"], after["allow"]);
    assert!(reach(&env, "copy", "allowed.test", 80).is_ok());
    assert!(reach(&env, "copy", "other.test", 80).is_err());
    env.ok(&["destroy", "-f", "copy", "web"]);
}
