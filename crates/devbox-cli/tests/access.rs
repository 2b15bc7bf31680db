//! Who may use the daemon's socket: root; members of the group the daemon names
//! (`--group`), within its scopes (`--group-scopes`), checked on every request and audited
//! when refused; nobody else. The group here is `nogroup` (gid 65534, on every Debian) and
//! the user `nobody`, so the test changes nothing of the host's users.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Output;

use common::TestEnv;

const GROUP: &str = "nogroup";
const GID: u32 = 65534;
const NOBODY: u32 = 65534;

fn as_user(env: &TestEnv, gid: u32, args: &[&str]) -> Output {
    env.cmd()
        .args(args)
        .uid(NOBODY)
        .gid(gid)
        .output()
        .expect("run sandbox as nobody")
}

fn err(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_group_uses_the_socket_within_its_scopes() {
    require_root!();
    let mut env = TestEnv::new();
    env.stop_daemon();
    env.daemon_env.push(("DEVBOX_GROUP".into(), GROUP.into()));
    env.daemon_env
        .push(("DEVBOX_GROUP_SCOPES".into(), "read,exec".into()));
    env.start_daemon();
    env.ok(&["create", "dev"]);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&env.socket).unwrap();
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.gid()),
        (0o660, GID),
        "the socket is root's and the group's"
    );

    // Read and exec: allowed, and recorded as the user.
    let out = as_user(&env, GID, &["ls", "-q"]);
    assert!(out.status.success(), "{}", err(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "dev");
    let out = as_user(&env, GID, &["exec", "dev", "echo", "hi from nobody"]);
    assert!(out.status.success(), "{}", err(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi from nobody\n");
    // Beyond the scopes: refused with what to do, nothing changes.
    for args in [
        vec!["create", "other"],
        vec!["destroy", "--force", "dev"],
        vec!["snapshot", "create", "dev"],
    ] {
        let out = as_user(&env, GID, &args);
        assert!(!out.status.success(), "{args:?} went through");
        let e = err(&out);
        assert!(e.contains("admin") && e.contains(GROUP), "{args:?}: {e}");
    }
    assert_eq!(env.ok(&["ls", "-q"]).trim(), "dev");
    let snaps: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshots", "dev", "--format", "json"])).unwrap();
    assert_eq!(snaps.as_array().map(Vec::len), Some(0), "{snaps}");
    // Not in the group: refused.
    let out = as_user(&env, 4242, &["ls"]);
    assert!(!out.status.success());
    assert!(err(&out).contains("permission denied"), "{}", err(&out));

    // The audit log names the user, for what ran and what was refused.
    let audit: serde_json::Value =
        serde_json::from_str(&env.ok(&["audit", "--format", "json"])).unwrap();
    let records = audit.as_array().unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["action"] == "exec" && r["actor"] == "nobody"),
        "{records:?}"
    );
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["action"] == "auth.failure")
        .collect();
    assert!(
        refused.iter().any(|r| r["actor"] == "nobody"
            && r["detail"]["reason"]
                .as_str()
                .is_some_and(|w| w.contains("scope admin"))),
        "{refused:?}"
    );
}

#[test]
fn a_bad_group_or_scope_stops_the_daemon_before_it_starts() {
    require_root!();
    let env = TestEnv::new();
    for (var, value, says) in [
        ("DEVBOX_GROUP", "no-such-group-dbx", "not in /etc/group"),
        ("DEVBOX_GROUP_SCOPES", "read,root", "is not a scope"),
    ] {
        let out = std::process::Command::new(common::sandbox_bin())
            .arg("daemon")
            .env("DEVBOX_STATE_DIR", env.root.path().join("other-state"))
            .env("DEVBOX_RUNTIME_DIR", env.root.path().join("other-run"))
            .env("DEVBOX_GROUP", GROUP)
            .env(var, value)
            .output()
            .expect("sandboxd");
        assert!(!out.status.success(), "{var}={value} was taken");
        assert!(err(&out).contains(says), "{var}={value}: {}", err(&out));
        assert!(
            !env.root.path().join("other-state").exists(),
            "nothing is made"
        );
    }
}
