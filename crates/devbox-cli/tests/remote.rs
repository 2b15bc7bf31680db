//! The API over TCP: TLS from cert and key files, bearer tokens (made, listed, revoked,
//! expiring), their scopes and sandbox patterns on every route, per-token rates and exec
//! caps (429 with Retry-After), refusals audited with the token's name; the CLI reaching the
//! daemon with --host/--token exactly as it does locally, exec streaming included. Only
//! 127.0.0.1 is used.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::TestEnv;

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM files.
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// A daemon that also listens on 127.0.0.1 (a port of its own), with TLS if `tls`.
fn listening(tls: Option<&(PathBuf, PathBuf)>, extra: &[(&str, &str)]) -> (TestEnv, String) {
    let mut env = TestEnv::new();
    env.stop_daemon();
    env.daemon_env
        .push(("DEVBOX_LISTEN".into(), "127.0.0.1:0".into()));
    if let Some((cert, key)) = tls {
        env.daemon_env
            .push(("DEVBOX_TLS_CERT".into(), cert.display().to_string()));
        env.daemon_env
            .push(("DEVBOX_TLS_KEY".into(), key.display().to_string()));
    }
    for (k, v) in extra {
        env.daemon_env.push((k.to_string(), v.to_string()));
    }
    env.start_daemon();
    let addr = std::fs::read_to_string(env.runtime.join("api.addr")).expect("api.addr");
    let scheme = if tls.is_some() { "https" } else { "http" };
    (env, format!("{scheme}://{}", addr.trim()))
}

/// `sandbox` against the daemon at `host` with `token` (and the test's CA).
fn remote(env: &TestEnv, host: &str, token: &str, ca: Option<&Path>) -> Command {
    let mut c = env.cmd();
    c.env("DEVBOX_HOST", host).env("DEVBOX_TOKEN", token);
    // The socket must not be what answers: point it nowhere.
    c.env("DEVBOX_SOCKET", "/nonexistent/api.sock");
    match ca {
        Some(ca) => c.env("DEVBOX_CA_CERT", ca),
        None => c.env_remove("DEVBOX_CA_CERT"),
    };
    c
}

fn run(mut c: Command, args: &[&str]) -> Output {
    c.args(args).output().expect("run sandbox")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn token(env: &TestEnv, args: &[&str]) -> String {
    let mut a = vec!["token", "create"];
    a.extend_from_slice(args);
    env.ok(&a).trim().to_string()
}

/// Raw HTTP/1.1 over plain TCP: the status line and headers of the answer, and the body.
fn raw_http(addr: &str, request: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.to_string(), body.to_string())
}

#[test]
fn tokens_over_tls_reach_what_their_scopes_and_pattern_allow() {
    require_root!();
    let certs = tempfile::tempdir().unwrap();
    let tls = certificate(certs.path());
    let ca = tls.0.clone();
    let (env, host) = listening(Some(&tls), &[]);
    // Root, on the socket, makes the tokens and a sandbox the pattern does not reach.
    env.ok(&["create", "other"]);
    let ci = token(
        &env,
        &["ci", "--scope", "read,exec,admin", "--sandbox", "ci-*"],
    );
    assert!(ci.starts_with("dbx_"), "{ci}");
    let ro = token(&env, &["ro", "--scope", "read"]);

    // The CLI works over TLS as it does locally: create, exec (REST and streamed with stdin,
    // exit codes), ls shows only the sandboxes the pattern matches.
    let rc = || remote(&env, &host, &ci, Some(&ca));
    let out = run(rc(), &["create", "ci-1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(rc(), &["exec", "ci-1", "echo", "hello over tls"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello over tls\n");
    let out = run(rc(), &["exec", "ci-1", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    let mut child = rc()
        .args(["exec", "-i", "ci-1", "--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"streamed stdin\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "STREAMED STDIN\n");
    let out = run(rc(), &["ls", "-q"]);
    assert_eq!(text(&out.stdout).trim(), "ci-1", "{}", text(&out.stderr));

    // Outside the pattern: refused, nothing changes.
    for args in [
        vec!["create", "prod"],
        vec!["exec", "other", "true"],
        vec!["destroy", "--force", "other"],
        vec!["clone", "ci-1", "latest", "prod-copy"],
        vec!["policy", "ls"],
        vec!["audit"],
        vec!["events"],
        vec!["events", "--sandbox", "other"],
    ] {
        let out = run(rc(), &args);
        assert!(!out.status.success(), "{args:?} was allowed");
        assert!(
            text(&out.stderr).contains("pattern"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(env.ok(&["ls", "-q"]).trim(), "ci-1\nother");
    let out = run(rc(), &["events", "--sandbox", "ci-1", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("\"ci-1\""));

    // A read-only token reads but does not exec.
    let rr = || remote(&env, &host, &ro, Some(&ca));
    let out = run(rr(), &["inspect", "ci-1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(rr(), &["exec", "ci-1", "true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("needs exec"),
        "{}",
        text(&out.stderr)
    );
    let out = run(rr(), &["token", "ls"]);
    assert!(
        text(&out.stderr).contains("needs admin"),
        "{}",
        text(&out.stderr)
    );

    // Without the CA the certificate is not trusted; a wrong or missing token is refused.
    let out = run(remote(&env, &host, &ci, None), &["ls"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("TLS") || text(&out.stderr).contains("certificate"),
        "{}",
        text(&out.stderr)
    );
    let forged = format!(
        "{}{}",
        &ci[..ci.len() - 1],
        if ci.ends_with('0') { '1' } else { '0' }
    );
    for (t, want) in [
        ("", "needs a token"),
        ("nonsense", "not a dev-box token"),
        (forged.as_str(), "not valid"),
    ] {
        let out = run(remote(&env, &host, t, Some(&ca)), &["ls"]);
        assert!(!out.status.success(), "token {t:?} was accepted");
        assert!(
            text(&out.stderr).contains(want),
            "{t:?}: {}",
            text(&out.stderr)
        );
    }

    // Revoked and expired tokens stop working at once.
    env.ok(&["token", "revoke", "ro"]);
    let out = run(rr(), &["ls"]);
    assert!(
        text(&out.stderr).contains("not valid"),
        "{}",
        text(&out.stderr)
    );
    let brief = token(&env, &["brief", "--expires", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let out = run(remote(&env, &host, &brief, Some(&ca)), &["ls"]);
    assert!(
        text(&out.stderr).contains("expired"),
        "{}",
        text(&out.stderr)
    );
    let listed = env.ok(&["token", "ls"]);
    assert!(listed.contains("ci") && listed.contains("expired") && !listed.contains("ro "));
    assert!(!listed.contains(&ci[20..]), "a secret is listed");

    // The audit log names the token: its exec, its refusals, the anonymous ones.
    let audit = env.ok(&["audit", "--format", "json"]);
    let records: Vec<serde_json::Value> = serde_json::from_str(&audit).unwrap();
    let by = |actor: &str, action: &str| {
        records
            .iter()
            .any(|r| r["actor"] == actor && r["action"] == action)
    };
    assert!(by("token:ci", "exec"), "{audit}");
    assert!(by("token:ci", "auth.failure"), "{audit}");
    assert!(by("token:ro", "auth.failure"), "{audit}");
    assert!(by("remote 127.0.0.1", "auth.failure"), "{audit}");
    assert!(
        by("root", "token.create") && by("root", "token.revoke"),
        "{audit}"
    );
    assert!(!audit.contains(&ci[20..]), "a secret is in the audit log");
}

#[test]
fn rates_and_concurrent_execs_are_capped_per_token() {
    require_root!();
    // Plain text on loopback (allowed there only).
    let (env, host) = listening(None, &[]);
    env.ok(&["create", "box"]);
    let slow = token(&env, &["slow", "--scope", "read", "--rate", "1"]);
    let addr = host.trim_start_matches("http://");
    let get = |t: &str| {
        raw_http(
            addr,
            &format!(
                "GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n"
            ),
        )
    };
    // A burst of two, then 429 with Retry-After and the stable code.
    assert!(get(&slow).0.starts_with("HTTP/1.1 200"));
    assert!(get(&slow).0.starts_with("HTTP/1.1 200"));
    let (head, body) = get(&slow);
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert!(body.contains("\"rate_limited\""), "{body}");
    // Another token is not slowed by this one.
    let other = token(&env, &["other", "--scope", "read"]);
    assert!(get(&other).0.starts_with("HTTP/1.1 200"));
    // No token: 401 with the stable code and WWW-Authenticate.
    let (head, body) = raw_http(
        addr,
        "GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer")
    );
    assert!(body.contains("\"unauthorized\""), "{body}");

    // One exec at a time: a second while the first runs gets 429; after, it runs.
    let one = token(&env, &["one", "--scope", "read,exec", "--max-execs", "1"]);
    let mut first = remote(&env, &host, &one, None)
        .args(["exec", "box", "--", "sh", "-c", "echo started; sleep 3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 8];
    first
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    let out = run(remote(&env, &host, &one, None), &["exec", "box", "true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("as many execs"),
        "{}",
        text(&out.stderr)
    );
    assert!(first.wait().unwrap().success());
    let out = run(
        remote(&env, &host, &one, None),
        &["exec", "box", "echo", "free"],
    );
    assert_eq!(text(&out.stdout), "free\n", "{}", text(&out.stderr));
}

#[test]
fn bad_listener_settings_are_refused_before_anything_is_made() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let certs = tempfile::tempdir().unwrap();
    let (cert, _key) = certificate(certs.path());
    for (args, want) in [
        (vec!["--listen", "0.0.0.0:0"], "not a loopback address"),
        (vec!["--listen", "nonsense"], "give an address and port"),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                cert.to_str().unwrap(),
            ],
            "not a PEM private key",
        ),
        (vec!["--token-rate", "0"], "--token-rate"),
    ] {
        let out = Command::new(common::sandbox_bin().with_file_name("sandboxd"))
            .args(&args)
            .env("DEVBOX_STATE_DIR", &state)
            .env("DEVBOX_RUNTIME_DIR", dir.path().join("run"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            text(&out.stderr).contains(want),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(!state.exists(), "{args:?} made the state directory");
    }
}
