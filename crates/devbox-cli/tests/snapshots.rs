//! Snapshots, rollback, diffs, clones, export and import, against both storage drivers
//! (every scenario runs on btrfs and on the copy driver).

mod common;

use std::time::{Duration, Instant};

use common::TestEnv;

/// Runs a scenario on the btrfs driver and on the copy driver.
macro_rules! on_both_drivers {
    ($name:ident) => {
        mod $name {
            #[test]
            fn btrfs() {
                crate::require_root!();
                super::$name(crate::common::TestEnv::new());
            }
            #[test]
            fn copy() {
                crate::require_root!();
                super::$name(crate::common::TestEnv::copy_driver());
            }
        }
    };
}

fn lines(s: &str) -> Vec<String> {
    s.lines().map(str::to_string).collect()
}

on_both_drivers!(history_rollback_and_diff);
fn history_rollback_and_diff(env: TestEnv) {
    env.ok(&["create", "dev"]);
    env.ok(&[
        "exec",
        "dev",
        "echo v1 > /work/f && mkdir -p /work/src && echo code > /work/src/a && echo keep > /work/k",
    ]);
    assert_eq!(
        env.ok(&[
            "snapshot",
            "dev",
            "before-install",
            "-m",
            "clean state",
            "-l",
            "stage=1"
        ])
        .trim(),
        "before-install"
    );
    env.ok(&[
        "exec",
        "dev",
        "echo v2 > /work/f && rm -rf /work/src && echo new > /work/g && rm /etc/hosts",
    ]);

    let diff = env.ok(&["diff", "dev", "--from", "before-install"]);
    assert_eq!(
        lines(&diff),
        [
            "D /etc/hosts",
            "M /work/f  (3 B)",
            "A /work/g  (4 B)",
            "D /work/src"
        ],
        "{diff}"
    );
    let json: serde_json::Value = serde_json::from_str(&env.ok(&[
        "diff",
        "dev",
        "--from",
        "before-install",
        "--format",
        "json",
    ]))
    .unwrap();
    assert_eq!(json["changes"].as_array().unwrap().len(), 4);

    let after = env.ok(&["snapshot", "dev"]).trim().to_string();
    assert!(after.starts_with("s-"), "auto name: {after}");
    env.ok(&["rollback", "dev", "--to", "before-install"]);
    assert_eq!(
        env.ok(&[
            "exec",
            "dev",
            "cat /work/f /work/src/a /etc/hosts | head -3"
        ]),
        "v1\ncode\n127.0.0.1\tlocalhost\n"
    );
    let (code, _, _) = env.sh("dev", "test -e /work/g");
    assert_ne!(code, 0, "/work/g came back after the rollback");
    // Between two snapshots, in either direction.
    let between = env.ok(&["diff", "dev", "--from", "before-install", "--to", &after]);
    assert_eq!(lines(&between).len(), 4, "{between}");

    // A new branch from before-install; the old branch is kept.
    env.ok(&["exec", "dev", "echo branch > /work/b"]);
    env.ok(&["snapshot", "dev", "branch-b"]);
    let snaps = env.snapshots("dev");
    let by_name = |n: &str| snaps.iter().find(|s| s["name"] == n).unwrap().clone();
    assert_eq!(by_name(&after)["parent"], "before-install");
    assert_eq!(by_name("branch-b")["parent"], "before-install");
    assert_eq!(by_name("branch-b")["head"], true);
    assert_eq!(by_name("before-install")["message"], "clean state");
    assert_eq!(by_name("before-install")["labels"]["stage"], "1");
    let tree = env.ok(&["snapshots", "dev"]);
    assert!(tree.contains("  * branch-b"), "{tree}");

    // latest is the newest snapshot.
    env.ok(&["exec", "dev", "rm /work/b"]);
    env.ok(&["rollback", "dev", "--to", "latest"]);
    assert_eq!(env.ok(&["exec", "dev", "cat /work/b"]), "branch\n");
    // The old branch is intact.
    env.ok(&["rollback", "dev", "--to", &after]);
    assert_eq!(env.ok(&["exec", "dev", "cat /work/f /work/g"]), "v2\nnew\n");

    // Sizes are measured in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    while env
        .snapshots("dev")
        .iter()
        .any(|s| s["size_bytes"].is_null())
    {
        assert!(Instant::now() < deadline, "sizes were never measured");
        std::thread::sleep(Duration::from_millis(50));
    }

    let err = env.fails(&["rollback", "dev", "--to", "nope"]);
    assert!(err.contains("no snapshot named \"nope\""), "{err}");
    let err = env.fails(&["snapshot", "dev", "before-install"]);
    assert!(err.contains("already exists"), "{err}");
    env.ok(&["destroy", "dev"]);
    assert_eq!(
        std::fs::read_dir(env.pool_dir().join("snapshots"))
            .unwrap()
            .count(),
        0,
        "snapshots left after destroy"
    );
}

on_both_drivers!(selective_rollback);
fn selective_rollback(env: TestEnv) {
    env.ok(&["create", "sel"]);
    env.ok(&[
        "exec",
        "sel",
        "mkdir -p /work/src /work/docs && echo 1 > /work/src/main && echo d1 > /work/docs/readme",
    ]);
    env.ok(&["snapshot", "sel", "good"]);
    env.ok(&["exec", "sel", "echo broken > /work/src/main && echo extra > /work/src/junk && echo d2 > /work/docs/readme"]);
    env.ok(&["rollback", "sel", "--to", "good", "--path", "/work/src"]);
    assert_eq!(
        env.ok(&[
            "exec",
            "sel",
            "cat /work/src/main /work/docs/readme; ls /work/src"
        ]),
        "1\nd2\nmain\n"
    );
    let err = env.fails(&["rollback", "sel", "--to", "good", "--path", "work/src"]);
    assert!(err.contains("absolute"), "{err}");
}

on_both_drivers!(clones_and_deletion);
fn clones_and_deletion(env: TestEnv) {
    env.ok(&["create", "origin"]);
    env.ok(&["exec", "origin", "echo base > /work/f"]);
    env.ok(&["snapshot", "origin", "s1"]);
    env.ok(&["exec", "origin", "echo second > /work/f"]);
    env.ok(&["snapshot", "origin", "s2"]);
    assert_eq!(env.ok(&["clone", "origin", "s1", "copy"]).trim(), "copy");
    assert_eq!(env.ok(&["exec", "copy", "cat /work/f"]), "base\n");
    env.ok(&["exec", "copy", "echo mine > /work/f"]);
    assert_eq!(
        env.ok(&["exec", "origin", "cat /work/f"]),
        "second\n",
        "a clone is independent"
    );
    let clone_info: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", "copy"])).unwrap();
    assert_ne!(
        clone_info["uid_base"],
        serde_json::from_str::<serde_json::Value>(&env.ok(&["inspect", "origin"])).unwrap()["uid_base"]
    );
    assert_eq!(
        env.ok(&["exec", "copy", "stat -c %u /work/f"]),
        "0\n",
        "files belong to the clone's root"
    );

    let err = env.fails(&["snapshot", "rm", "origin", "s1"]);
    assert!(err.contains("origin of sandbox(es) copy"), "{err}");
    // Deleting s1 (forced) re-parents s2 and keeps the clone working.
    env.ok(&["snapshot", "rm", "origin", "s1", "--force"]);
    assert_eq!(env.snapshot_names("origin"), ["s2"]);
    assert!(env.snapshots("origin")[0]["parent"].is_null());
    assert_eq!(env.ok(&["exec", "copy", "cat /work/f"]), "mine\n");
    env.ok(&["snapshot", "rm", "origin", "s2"]);
    assert!(env.snapshot_names("origin").is_empty());
    // Destroying the origin leaves the clone alone.
    env.ok(&["snapshot", "origin", "s3"]);
    env.ok(&["clone", "origin", "s3", "copy2", "--no-start"]);
    env.ok(&["destroy", "origin"]);
    env.ok(&["start", "copy2"]);
    assert_eq!(env.ok(&["exec", "copy2", "cat /work/f"]), "second\n");
}

on_both_drivers!(rollback_on_failure_and_auto_snapshots);
fn rollback_on_failure_and_auto_snapshots(env: TestEnv) {
    env.ok(&["create", "guarded"]);
    env.ok(&["exec", "guarded", "echo good > /work/state"]);
    let out = env.sb(&[
        "exec",
        "guarded",
        "--rollback-on-failure",
        "echo broken > /work/state; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rolled back"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.ok(&["exec", "guarded", "cat /work/state"]), "good\n");
    // The guard snapshot and the rollback are in the audit log, with why.
    let audit: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["audit", "--sandbox", "guarded", "--format", "json"]))
            .unwrap();
    let because = |action: &str| {
        audit
            .iter()
            .filter(|r| r["action"] == action)
            .filter_map(|r| r["detail"]["because"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        because("snapshot.create"),
        ["guard before an exec (--rollback-on-failure)"]
    );
    assert_eq!(
        because("sandbox.rollback"),
        ["the command failed (--rollback-on-failure)"]
    );
    env.ok(&[
        "exec",
        "guarded",
        "--rollback-on-failure",
        "echo better > /work/state",
    ]);
    assert_eq!(env.ok(&["exec", "guarded", "cat /work/state"]), "better\n");

    let spec = env.root.path().join("auto.yaml");
    std::fs::write(
        &spec,
        "apiVersion: sandbox.io/v1\nkind: Sandbox\nspec:\n  rollback:\n    enabled: true\n    autoSnapshot: true\n    keep: 3\n",
    )
    .unwrap();
    env.ok(&["create", "auto", "-f", spec.to_str().unwrap()]);
    for i in 1..=5 {
        env.ok(&["exec", "auto", &format!("echo {i} > /work/n")]);
    }
    let snaps = env.snapshots("auto");
    assert_eq!(snaps.len(), 3, "retention keeps the last 3: {snaps:?}");
    let audit = env.ok(&["audit", "--sandbox", "auto", "--format", "json"]);
    assert_eq!(audit.matches("retention of automatic snapshots").count(), 2);
    assert!(snaps.iter().all(|s| s["auto"] == true));
    // rollback --to latest undoes the last command.
    env.ok(&["rollback", "auto", "--to", "latest"]);
    assert_eq!(env.ok(&["exec", "auto", "cat /work/n"]), "4\n");
    env.ok(&["create", "auto2", "--auto-snapshot"]);
    env.ok(&["exec", "auto2", "true"]);
    assert_eq!(env.snapshots("auto2").len(), 1);

    // Retention by age: automatic snapshots older than maxAge go (the newest stays), named
    // ones stay.
    std::fs::write(
        &spec,
        "apiVersion: sandbox.io/v1\nkind: Sandbox\nspec:\n  rollback:\n    autoSnapshot: true\n    maxAge: 2s\n",
    )
    .unwrap();
    env.ok(&["create", "aged", "-f", spec.to_str().unwrap()]);
    env.ok(&["exec", "aged", "echo 1 > /work/n"]);
    env.ok(&["exec", "aged", "echo 2 > /work/n"]);
    env.ok(&["snapshot", "aged", "mine"]);
    assert_eq!(env.snapshots("aged").len(), 3);
    std::thread::sleep(Duration::from_millis(2500));
    env.ok(&["exec", "aged", "echo 3 > /work/n"]);
    let snaps = env.snapshots("aged");
    let names: Vec<&str> = snaps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(snaps.len(), 2, "{names:?}");
    assert!(names.contains(&"mine"), "{names:?}");
    std::fs::write(
        &spec,
        "apiVersion: sandbox.io/v1\nkind: Sandbox\nspec:\n  rollback:\n    maxAge: 7 weeks\n",
    )
    .unwrap();
    let err = env.fails(&["create", "bad-age", "-f", spec.to_str().unwrap()]);
    assert!(err.contains("spec.rollback.maxAge"), "{err}");
}

on_both_drivers!(running_sandboxes_stay_consistent);
fn running_sandboxes_stay_consistent(env: TestEnv) {
    env.ok(&["create", "live"]);
    // The writer replaces the file atomically: a snapshot at any instant holds a whole number
    // (with `echo $i > file`, the instant between truncate and write holds an empty file).
    env.ok(&["exec", "live", "(i=0; while :; do i=$((i+1)); echo $i > /work/c.tmp; mv /work/c.tmp /work/counter; sleep 0.01; done) >/dev/null 2>&1 &"]);
    std::thread::sleep(Duration::from_millis(200));
    env.ok(&["snapshot", "live", "mid"]);
    // Thawed after the snapshot: the writer goes on.
    let a: u64 = env
        .ok(&["exec", "live", "cat /work/counter"])
        .trim()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let b: u64 = env
        .ok(&["exec", "live", "cat /work/counter"])
        .trim()
        .parse()
        .unwrap();
    assert!(b > a, "the sandbox stayed frozen ({a} then {b})");
    env.ok(&["rollback", "live", "--to", "mid"]);
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "live"])).unwrap();
    assert_eq!(
        info["state"], "running",
        "a rollback restarts a running sandbox"
    );
    let c: u64 = env
        .ok(&["exec", "live", "cat /work/counter"])
        .trim()
        .parse()
        .unwrap();
    assert!(c <= a + 50, "the counter was rolled back ({c})");
}

on_both_drivers!(export_and_import);
fn export_and_import(env: TestEnv) {
    env.ok(&["create", "src"]);
    env.ok(&["exec", "src", "mkdir -p /work/p && echo payload > /work/p/file && rm -rf /var/cache && ln -s file /work/p/link"]);
    env.ok(&["snapshot", "src", "ship", "-m", "to go"]);
    let archive = env.root.path().join("snap.tar.zst");
    env.ok(&[
        "snapshot",
        "export",
        "src",
        "ship",
        "-o",
        archive.to_str().unwrap(),
    ]);
    assert_eq!(
        env.ok(&[
            "snapshot",
            "import",
            archive.to_str().unwrap(),
            "--name",
            "dst",
            "--start"
        ])
        .trim(),
        "dst"
    );
    assert_eq!(
        env.ok(&[
            "exec",
            "dst",
            "cat /work/p/link; test -e /var/cache || echo gone"
        ]),
        "payload\ngone\n"
    );
    assert_eq!(env.snapshot_names("dst"), ["ship"]);
    let err = env.fails(&[
        "snapshot",
        "import",
        archive.to_str().unwrap(),
        "--name",
        "dst",
    ]);
    assert!(err.contains("already exists"), "{err}");

    // A damaged archive is refused and changes nothing.
    let before = env.ok(&["ls", "-q"]);
    let mut data = std::fs::read(&archive).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    let bad = env.root.path().join("bad.tar.zst");
    std::fs::write(&bad, &data).unwrap();
    let err = env.fails(&[
        "snapshot",
        "import",
        bad.to_str().unwrap(),
        "--name",
        "broken",
    ]);
    assert!(err.contains("snapshot archive"), "{err}");
    // A hostile layer (an entry escaping the root) with a correct digest is refused too.
    let hostile = env.root.path().join("hostile.tar.zst");
    write_hostile_archive(&hostile);
    let err = env.fails(&[
        "snapshot",
        "import",
        hostile.to_str().unwrap(),
        "--name",
        "evil",
    ]);
    assert!(err.contains("refusing archive entry"), "{err}");
    assert_eq!(env.ok(&["ls", "-q"]), before);
    assert_eq!(
        std::fs::read_dir(env.pool_dir().join("staging"))
            .unwrap()
            .count(),
        0
    );
}

fn write_hostile_archive(path: &std::path::Path) {
    use sha2::{Digest, Sha256};
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    let name = b"../../escaped";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    layer.append(&h, &b"x"[..]).unwrap();
    let layer = layer.into_inner().unwrap();
    let manifest = serde_json::json!({
        "format": "dev-box.snapshot/v1",
        "snapshot": {"name": "evil", "created_at": "2026-01-01T00:00:00Z", "message": null, "labels": {}},
        "sandbox": {"name": "evil", "manifest": {"apiVersion": "sandbox.io/v1", "kind": "Sandbox"}},
        "image": {"id": "host", "name": "host"},
        "layer": {"digest": format!("sha256:{}", hex::encode(Sha256::digest(&layer))), "size": layer.len()},
    });
    let json = serde_json::to_vec(&manifest).unwrap();
    let mut outer = tar::Builder::new(Vec::new());
    for (n, data) in [("manifest.json", &json), ("layer.tar", &layer)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        outer.append_data(&mut h, n, &data[..]).unwrap();
    }
    let outer = outer.into_inner().unwrap();
    std::fs::write(path, zstd::encode_all(&outer[..], 3).unwrap()).unwrap();
}

#[test]
fn a_thousand_snapshots() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "many"]);
    let sock = env.socket.clone();
    // Through the API directly: a thousand CLI processes would only measure process start-up.
    for i in 0..1000 {
        if i % 100 == 0 {
            env.ok(&["exec", "many", &format!("echo {i} > /work/mark")]);
        }
        let body = format!(r#"{{"name":"n{i:04}"}}"#);
        let (status, text) = http(&sock, "POST", "/v1/sandboxes/many/snapshots", &body);
        assert_eq!(status, 201, "snapshot {i}: {text}");
    }
    assert_eq!(env.snapshots("many").len(), 1000);
    env.ok(&["rollback", "many", "--to", "n0150"]);
    assert_eq!(env.ok(&["exec", "many", "cat /work/mark"]), "100\n");
    env.ok(&["rollback", "many", "--to", "n0999"]);
    assert_eq!(env.ok(&["exec", "many", "cat /work/mark"]), "900\n");
    env.ok(&["destroy", "many"]);
}

/// A minimal HTTP/1.1 request over the daemon's socket.
fn http(sock: &std::path::Path, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, resp)
}

#[test]
fn killing_the_daemon_mid_operation_loses_no_snapshot() {
    require_root!();
    let mut env = TestEnv::new();
    env.ok(&["create", "crash"]);
    env.ok(&["exec", "crash", "echo 0 > /work/n"]);
    env.ok(&["snapshot", "crash", "base"]);
    let mut acknowledged: Vec<String> = vec!["base".into()];
    let mut rnd = common::rng();
    for round in 0..40 {
        let name = format!("r{round}");
        // A deletion may complete even if the kill comes before its answer: its target is no
        // longer promised. "base" is never deleted.
        let victim = acknowledged.iter().rev().find(|s| *s != "base").cloned();
        let args: Vec<String> = match (round % 4, &victim) {
            (1, _) => vec![
                "rollback".into(),
                "crash".into(),
                "--to".into(),
                "base".into(),
            ],
            (2, _) => vec![
                "clone".into(),
                "crash".into(),
                "base".into(),
                format!("c{round}"),
            ],
            (3, Some(v)) => {
                acknowledged.retain(|s| s != v);
                vec!["snapshot".into(), "rm".into(), "crash".into(), v.clone()]
            }
            _ => vec!["snapshot".into(), "crash".into(), name.clone()],
        };
        let child = env
            .cmd()
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rnd(25)));
        env.kill_daemon();
        let out = child.wait_with_output().unwrap();
        if out.status.success() && args[0] == "snapshot" && args[1] != "rm" {
            acknowledged.push(name);
        }
        env.start_daemon();
        // Every acknowledged snapshot is there; the state is consistent and usable.
        let names = env.snapshot_names("crash");
        for s in &acknowledged {
            assert!(
                names.contains(s),
                "round {round}: snapshot {s} was lost ({names:?})\n{}",
                env.daemon_log()
            );
        }
        let info: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "crash"])).unwrap();
        let state = info["state"].as_str().unwrap().to_string();
        assert!(
            state == "running" || state == "stopped",
            "round {round}: {state}"
        );
        if state == "stopped" {
            env.ok(&["start", "crash"]);
        }
        assert!(
            env.ok(&["exec", "crash", "cat /work/n"])
                .trim()
                .parse::<u64>()
                .is_ok()
        );
        // No volume without a record.
        let records: usize = env.ok(&["ls", "-q"]).lines().count();
        let volumes = std::fs::read_dir(env.pool_dir().join("sandboxes"))
            .unwrap()
            .count();
        assert_eq!(
            volumes, records,
            "round {round}: sandbox volumes {volumes} for {records} sandboxes"
        );
    }
}

#[test]
fn a_full_pool_fails_the_snapshot_cleanly() {
    require_root!();
    let env = TestEnv::copy_driver_sized("300M");
    env.ok(&["create", "full"]);
    env.ok(&["exec", "full", "echo precious > /work/p"]);
    env.ok(&["snapshot", "full", "good"]);
    let _ = env.sb(&[
        "exec",
        "full",
        "dd if=/dev/zero of=/work/big bs=1M count=400 2>/dev/null",
    ]);
    let before = env.snapshot_names("full");
    let out = env.sb(&["snapshot", "full", "after-fill"]);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("storage pool is full"), "{err}");
        assert_eq!(
            env.snapshot_names("full"),
            before,
            "a failed snapshot left a record"
        );
    }
    // The sandbox keeps running and its last good state is intact.
    assert_eq!(env.ok(&["exec", "full", "echo alive"]), "alive\n");
    env.ok(&["exec", "full", "rm -f /work/big"]);
    env.ok(&["rollback", "full", "--to", "good"]);
    assert_eq!(env.ok(&["exec", "full", "cat /work/p"]), "precious\n");
}
