//! The network through the CLI: spec and flag errors change nothing; an allowlist with live
//! allow/deny/reset shown by `sandbox network` and taking effect; audit records of changes
//! and of blocked attempts (`sandbox network log`); a policy that denies curl to a host not
//! on the list before it runs; rules kept across a daemon restart, by snapshots and clones
//! (a clone gets its own address); a published port reachable.
//!
//! Every test with a network runs its daemon in a namespace of its own whose only route
//! leads into a world namespace of the test (devbox-net's test world: a DNS server and TCP
//! servers on 198.18.0.0/15), so no packet goes anywhere but there and loopback.

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
        "10.77.0.0/16",
        &[],
    )
}

fn net(env: &TestEnv, name: &str) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["network", name, "--format", "json"])).expect("json")
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Connects from inside the sandbox to `host:port` and returns what the server said.
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

fn resolves(env: &TestEnv, name: &str, host: &str) -> bool {
    env.sh(name, &format!("getent hosts {host}")).0 == 0
}

fn audit(env: &TestEnv, sandbox: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["audit", "--sandbox", sandbox, "--format", "json"]))
            .expect("audit json");
    v.as_array().cloned().unwrap_or_default()
}

/// Nothing of dev-box's networks is left in the daemon's namespace or state dir.
fn assert_no_networks(env: &TestEnv, w: &World) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", w.daemon.display()))
            .arg("--")
            .args(args)
            .output()
            .expect("nsenter");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let links = run(&["ip", "-o", "link"]);
    let ours: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .filter(|name| name.starts_with("dbx"))
        .collect();
    assert!(ours.is_empty(), "links left: {ours:?}");
    let tables = run(&["nft", "list", "tables"]);
    assert!(!tables.contains("dbx_"), "tables left: {tables}");
    let netns = env.state.join("net").join("netns");
    let left: Vec<_> = std::fs::read_dir(&netns)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

#[test]
fn bad_network_settings_change_nothing() {
    require_root!();
    let env = TestEnv::new();
    // Flags: the rule's error says what to write; nothing reaches the daemon.
    let out = env.sb(&[
        "create",
        "a",
        "--network",
        "allow",
        "--allow",
        "10.1.2.3/24",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("write 10.1.2.0/24"), "{err}");
    let err = env.fails(&["create", "a", "--allow", "pypi.org"]);
    assert!(err.contains("--network allow"), "{err}");
    let err = env.fails(&["create", "a", "--network", "open", "--allow", "pypi.org"]);
    assert!(err.contains("--network allow"), "{err}");
    let err = env.fails(&["create", "a", "-p", "8080"]);
    assert!(err.contains("HOST:SANDBOX"), "{err}");
    let err = env.fails(&[
        "create",
        "a",
        "--network",
        "allow",
        "--allow",
        "2001:db8::1",
    ]);
    assert!(err.contains("brackets"), "{err}");
    let err = env.fails(&[
        "create",
        "a",
        "--network",
        "allow",
        "--allow",
        "[2001:db8::1]",
    ]);
    assert!(err.contains("no IPv6 yet"), "{err}");
    // A spec file: the field's path.
    let spec = env.root.path().join("bad.yaml");
    std::fs::write(
        &spec,
        "apiVersion: sandbox.io/v1\nkind: Sandbox\nspec:\n  network: {mode: allow, allow: [ok.test, 'x:99999']}\n",
    )
    .unwrap();
    let err = env.fails(&["create", "a", "-f", spec.to_str().unwrap()]);
    assert!(err.contains("spec.network.allow[1]"), "{err}");
    // Straight to the API: refused with the same message.
    let mut s = std::os::unix::net::UnixStream::connect(&env.socket).expect("connect");
    let body = r#"{"name":"a","manifest":{"apiVersion":"sandbox.io/v1","kind":"Sandbox","spec":{"network":{"mode":"none","allow":["pypi.org"]}}}}"#;
    write!(
        s,
        "POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("--network allow"), "{resp}");
    assert_eq!(env.ok(&["ls", "-q"]).trim(), "");
    // The older spec form still works, and a sandbox without a network has nothing to change.
    let old = env.root.path().join("old.yaml");
    std::fs::write(
        &old,
        "apiVersion: sandbox.io/v1\nkind: Sandbox\nspec:\n  network: none\n",
    )
    .unwrap();
    env.ok(&["create", "plain", "-f", old.to_str().unwrap()]);
    let err = env.fails(&["network", "allow", "plain", "pypi.org"]);
    assert!(err.contains("--network allow"), "{err}");
    let n = net(&env, "plain");
    assert_eq!(n["mode"], "none");
    assert!(
        strings(&n["allow"]).is_empty() && n["changed"] == false,
        "{n}"
    );
    assert!(env.ok(&["network", "plain"]).contains("mode:     none"));
    env.ok(&["destroy", "plain"]);
}

#[test]
fn allowlist_live_changes_audit_log_and_policy() {
    require_root!();
    let w = World::new();
    let mut env = env_in(&w);
    env.ok(&[
        "create",
        "dev",
        "--network",
        "allow",
        "--allow",
        "allowed.test",
    ]);
    let n = net(&env, "dev");
    assert_eq!(n["mode"], "allow");
    assert_eq!(strings(&n["allow"]), ["allowed.test"]);
    assert!(
        n["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("10.77.")),
        "{n}"
    );

    // The allowed name resolves and answers; another name does not resolve; an address no
    // allowed name resolved to is refused.
    assert!(resolves(&env, "dev", "allowed.test"));
    let hello = reach(&env, "dev", "allowed.test", 80).expect("allowed.test reachable");
    assert!(hello.contains("hello from 198.18.1.1:80"), "{hello}");
    assert!(!resolves(&env, "dev", "other.test"));
    assert!(reach(&env, "dev", &world::OTHER.to_string(), 80).is_err());

    // Live allow: visible, and in effect for the next connection.
    env.ok(&["network", "allow", "dev", "other.test"]);
    let n = net(&env, "dev");
    assert_eq!(strings(&n["allow"]), ["allowed.test", "other.test"]);
    assert_eq!(n["changed"], true);
    let hello = reach(&env, "dev", "other.test", 80).expect("other.test reachable now");
    assert!(hello.contains("198.18.1.2:80"), "{hello}");
    // Live deny of the spec's name.
    env.ok(&["network", "deny", "dev", "allowed.test"]);
    let n = net(&env, "dev");
    assert_eq!(strings(&n["deny"]), ["allowed.test"]);
    assert!(!resolves(&env, "dev", "allowed.test"));
    assert!(reach(&env, "dev", &world::ALLOWED.to_string(), 80).is_err());
    // A bad rule changes nothing.
    let err = env.fails(&["network", "allow", "dev", "ok.test", "10.0.0.1/8"]);
    assert!(err.contains("10.0.0.0/8"), "{err}");
    assert_eq!(net(&env, "dev")["allow"], n["allow"]);
    let err = env.fails(&["network", "allow", "dev", "ok.test", "[2001:db8::/32]"]);
    assert!(err.contains("no IPv6 yet"), "{err}");
    assert_eq!(net(&env, "dev")["allow"], n["allow"]);

    // Audited with the rules.
    let records = audit(&env, "dev");
    let find = |action: &str| {
        records
            .iter()
            .find(|r| r["action"] == action && r["detail"]["outcome"] == "ok")
            .cloned()
            .unwrap_or_else(|| panic!("no {action} in {records:?}"))
    };
    assert_eq!(
        strings(&find("network.allow")["detail"]["rules"]),
        ["other.test"]
    );
    assert_eq!(
        strings(&find("network.deny")["detail"]["rules"]),
        ["allowed.test"]
    );

    // Blocked attempts: the name and the address tried, in the log and the audit.
    let _ = resolves(&env, "dev", "blocked.test");
    let _ = reach(&env, "dev", &world::BARE.to_string(), 5001);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log: serde_json::Value =
            serde_json::from_str(&env.ok(&["network", "log", "dev", "--format", "json"])).unwrap();
        let targets: Vec<String> = log
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                format!(
                    "{} {}",
                    b["kind"].as_str().unwrap(),
                    b["target"].as_str().unwrap()
                )
            })
            .collect();
        let dns = targets.iter().any(|t| t.starts_with("dns blocked.test"));
        let conn = targets
            .iter()
            .any(|t| t.starts_with("connect") && t.contains("198.18.1.3:5001"));
        if dns && conn {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blocked attempts not logged: {targets:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(audit(&env, "dev").iter().any(|r| {
        r["action"] == "network.blocked"
            && r["actor"] == "network"
            && r["detail"]["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("blocked.test"))
    }));
    let table = env.ok(&["network", "log", "dev"]);
    assert!(table.contains("blocked.test"), "{table}");
    // And they are events of kind network.
    let events = env.ok(&[
        "events",
        "--sandbox",
        "dev",
        "--kind",
        "network",
        "--format",
        "json",
    ]);
    assert!(
        events.lines().any(|l| {
            let e: serde_json::Value = serde_json::from_str(l).expect("event json");
            e["kind"] == "network"
                && e["action"] == "network.blocked"
                && e["details"]["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("blocked.test"))
        }),
        "{events}"
    );

    // A policy denies curl to a host that is not on the list, before it runs.
    let policy = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../devbox-safety/policies/network_egress.rego"
    );
    env.ok(&[
        "policy",
        "add",
        "network-egress",
        "-f",
        policy,
        "--sandbox",
        "dev",
    ]);
    let out = env.sb(&[
        "exec",
        "dev",
        "curl -s -o /tmp/x http://bare.test/ && touch /tmp/ran",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bare.test") && err.contains("allowed: "),
        "{err}"
    );
    assert_ne!(
        env.sh("dev", "test -e /tmp/ran").0,
        0,
        "the denied command ran"
    );
    // A host on the list passes the check (and the network).
    let (code, out, err) = env.sh(
        "dev",
        "curl -s --http0.9 --max-time 5 http://other.test:5001/",
    );
    // (The world's server says hello and closes without reading: curl may report a reset.)
    assert!(out.contains("198.18.1.2:5001"), "exit {code}: {out} {err}");
    let out = env.sb(&[
        "check",
        "dev",
        "wget http://allowed.test/",
        "--format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let check: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        check["decision"], "deny",
        "denied live, so the check says so: {check}"
    );

    // Kept across a daemon restart, in effect after it.
    env.stop_daemon();
    env.start_daemon();
    let n = net(&env, "dev");
    assert_eq!(strings(&n["allow"]), ["other.test"]);
    assert!(reach(&env, "dev", "other.test", 80).is_ok());
    // Reset: the spec's rules again.
    env.ok(&["network", "reset", "dev"]);
    let n = net(&env, "dev");
    assert_eq!(
        (strings(&n["allow"]), n["changed"].clone()),
        (vec!["allowed.test".to_string()], serde_json::json!(false))
    );
    assert!(reach(&env, "dev", "allowed.test", 80).is_ok());
    assert!(!resolves(&env, "dev", "other.test"));
    assert!(
        audit(&env, "dev")
            .iter()
            .any(|r| r["action"] == "network.reset")
    );

    env.ok(&["destroy", "dev"]);
    assert_no_networks(&env, &w);
}

#[test]
fn clones_keep_the_network_and_ports_are_published() {
    require_root!();
    let w = World::new();
    let env = env_in(&w);
    env.ok(&[
        "create",
        "src",
        "--network",
        "allow",
        "--allow",
        "allowed.test",
        "-p",
        "127.0.0.1:18080:8000",
        "--main",
        "cd /tmp && echo published > index.html && exec python3 -m http.server 8000 --bind 127.0.0.1",
    ]);
    env.ok(&["network", "allow", "src", "other.test"]);
    // The published port answers from the daemon's side (its namespace's loopback).
    let deadline = Instant::now() + Duration::from_secs(20);
    let page = loop {
        let got = world::in_ns(&w.daemon, || {
            let mut s =
                std::net::TcpStream::connect(("127.0.0.1", 18080)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
                .map_err(|e| e.to_string())?;
            let mut out = String::new();
            s.read_to_string(&mut out).map_err(|e| e.to_string())?;
            Ok::<_, String>(out)
        });
        match got {
            Ok(p) if p.contains("published") => break p,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "published port: {other:?}\n{}",
                    env.daemon_log()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert!(page.starts_with("HTTP/1.0 200"), "{page}");
    let src = net(&env, "src");
    assert_eq!(strings(&src["ports"]), ["127.0.0.1:18080:8000"]);

    // A snapshot and rollback keep the network; a clone gets mode and rules, its own address.
    env.ok(&["snapshot", "src", "s1"]);
    env.ok(&["rollback", "src", "--to", "s1"]);
    let after = net(&env, "src");
    assert_eq!(after["allow"], src["allow"]);
    assert!(reach(&env, "src", "other.test", 80).is_ok());
    env.ok(&["clone", "src", "s1", "copy"]);
    let copy = net(&env, "copy");
    assert_eq!(
        (copy["mode"].clone(), copy["allow"].clone()),
        (src["mode"].clone(), src["allow"].clone())
    );
    assert!(strings(&copy["ports"]).is_empty(), "{copy}");
    let (a, b) = (
        after["address"].as_str().unwrap(),
        copy["address"].as_str().unwrap(),
    );
    assert_ne!(a, b, "a clone has its own address");
    assert!(reach(&env, "copy", "other.test", 80).is_ok());
    assert!(reach(&env, "copy", &world::BARE.to_string(), 80).is_err());
    // Checkpoints of processes with a network: tests/checkpoint_network.rs.

    // Stopped, a sandbox has no network; started, it has one again.
    env.ok(&["stop", "copy"]);
    assert_eq!(net(&env, "copy")["attached"], false);
    env.ok(&["start", "copy"]);
    assert!(reach(&env, "copy", "other.test", 80).is_ok());

    env.ok(&["destroy", "copy", "src"]);
    assert_no_networks(&env, &w);
}

#[test]
fn the_nft_command_fallback_loads_the_same_rules() {
    require_root!();
    let w = World::new();
    w.check_routes();
    let env = TestEnv::in_netns(
        &w.daemon,
        &format!("{}:53", world::UPSTREAM),
        "10.77.0.0/16",
        &[("DEVBOX_NET_NFT", "command")],
    );
    env.ok(&[
        "create",
        "dev",
        "--network",
        "allow",
        "--allow",
        "allowed.test",
    ]);
    let hello = reach(&env, "dev", "allowed.test", 80).expect("allowed.test reachable");
    assert!(hello.contains("hello from 198.18.1.1:80"), "{hello}");
    assert!(reach(&env, "dev", &world::OTHER.to_string(), 80).is_err());
    env.ok(&["network", "allow", "dev", "other.test"]);
    assert!(reach(&env, "dev", "other.test", 80).is_ok());
    // Refused attempts are read back through `nft -j` too.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = env.ok(&["network", "log", "dev"]);
        if log.contains(&world::OTHER.to_string()) || log.contains("198.18.1.2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no blocked attempt logged: {log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        env.daemon_log()
            .contains("rules go through the nft command"),
        "the daemon did not take the command path"
    );
    env.ok(&["destroy", "dev"]);
    assert_no_networks(&env, &w);
}

#[test]
fn a_daemon_stopped_right_after_one_shot_runs_leaves_no_network() {
    require_root!();
    let w = World::new();
    let mut env = env_in(&w);
    // `run --rm` returns before its network's kernel part is gone (that goes on in the
    // background); a daemon told to stop right then finishes it first.
    for _ in 0..3 {
        env.ok(&[
            "run",
            "--rm",
            "--network",
            "allow",
            "--allow",
            "allowed.test",
            "--",
            "true",
        ]);
    }
    env.stop_daemon();
    assert_no_networks(&env, &w);
}
