//! `sandbox exec`: streaming, stdin, exit codes, environment, working directory, users, tty.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::TestEnv;

#[test]
fn output_streams_while_the_command_runs() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "s"]);
    let mut child = env
        .cmd()
        .args(["exec", "s", "echo first; echo err-first >&2; while [ ! -e /tmp/go ]; do sleep 0.02; done; echo second"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "first\n", "stdout arrives before the command ends");
    line.clear();
    err.read_line(&mut line).unwrap();
    assert_eq!(
        line, "err-first\n",
        "stderr arrives before the command ends"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the command is still running"
    );
    env.ok(&["exec", "s", "touch /tmp/go"]);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "second\n");
    assert!(child.wait().unwrap().success());
}

#[test]
fn stdin_exit_codes_env_workdir_user() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "x"]);
    let mut child = env
        .cmd()
        .args(["exec", "-i", "x", "--", "sh", "-c", "wc -c; exit 5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&vec![b'z'; 100_000])
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100000");
    assert_eq!(
        out.status.code(),
        Some(5),
        "the command's exit code is the CLI's"
    );

    assert_eq!(
        env.ok(&["exec", "-e", "A=1", "-e", "B=two words", "x", "echo $A $B"]),
        "1 two words\n"
    );
    assert_eq!(
        env.ok(&["exec", "x", "pwd"]),
        "/work\n",
        "the host image works in /work"
    );
    assert_eq!(env.ok(&["exec", "-w", "/tmp", "x", "pwd"]), "/tmp\n");
    let err = env.fails(&["exec", "-w", "/nonexistent", "x", "pwd"]);
    assert!(err.contains("/nonexistent"), "{err}");
    assert_eq!(env.ok(&["exec", "-u", "1000", "x", "id -u"]), "1000\n");
    assert_eq!(env.ok(&["exec", "-u", "nobody", "x", "id -un"]), "nobody\n");
    let err = env.fails(&["exec", "-u", "mallory", "x", "id"]);
    assert!(err.contains("mallory"), "{err}");
    let out = env.sb(&["exec", "x", "--", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    // A killed command reports 128 + signal.
    let out = env.sb(&["exec", "x", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137));
    // Background children do not hold the exec open.
    let begun = Instant::now();
    env.ok(&["exec", "x", "sleep 30 & echo started"]);
    assert!(begun.elapsed() < Duration::from_secs(10));
}

#[test]
fn interrupt_reaches_the_command() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "i"]);
    let mut child = env
        .cmd()
        .args([
            "exec",
            "i",
            "trap 'echo got-int; exit 3' INT; echo ready; while :; do sleep 0.05; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "got-int\n");
    assert_eq!(child.wait().unwrap().code(), Some(3));
}

#[test]
fn tty_exec_behaves_like_a_terminal() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "t"]);
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut cmd = env.cmd();
    let dup = || Stdio::from(std::fs::File::from(pty.slave.try_clone().unwrap()));
    cmd.args(["exec", "-it", "t", "sh"])
        .stdin(dup())
        .stdout(dup())
        .stderr(dup());
    let mut child = cmd.spawn().unwrap();
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    std::thread::sleep(Duration::from_millis(500));
    master
        .write_all(b"tty; stty size; echo done-$((6*7)); exit 9\n")
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&seen).contains("done-42") {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&seen).to_string();
    assert!(text.contains("/dev/pts/"), "tty inside: {text}");
    assert!(text.contains("done-42"), "{text}");
    assert_eq!(child.wait().unwrap().code(), Some(9));
}

#[test]
fn stdin_is_read_only_with_dash_i() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "x"]);
    // A loop feeding lines to the CLI keeps its input: exec without -i reads none of it.
    let script = format!(
        "printf 'a\\nb\\nc\\n' | while read l; do {} exec x echo \"got $l\"; done",
        common::sandbox_bin().display()
    );
    // The environment `sandbox` runs with in this test, for the shell that runs it.
    let base = env.cmd();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .envs(base.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .output()
        .expect("shell");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "got a\ngot b\ngot c\n"
    );
    // Without -i the command's stdin is empty.
    let mut child = env
        .cmd()
        .args(["exec", "x", "--", "sh", "-c", "wc -c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"12345").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
}

#[test]
fn commands_start_with_every_signal_at_its_default() {
    require_root!();
    let mut env = TestEnv::new();
    env.stop_daemon();
    // A daemon started with SIGINT, SIGQUIT and SIGHUP ignored, as a background job of a
    // shell or a command under nohup is: its sandboxes' commands must not inherit that.
    let base = env.cmd();
    let mut daemon = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' INT QUIT HUP; exec {} daemon",
            common::sandbox_bin().display()
        ))
        .envs(base.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&env.socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    env.ok(&["create", "sig"]);
    let ignored = env.ok(&["exec", "sig", "grep SigIgn /proc/self/status"]);
    env.ok(&["destroy", "--force", "sig"]);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
    // Signals 1-31 and the real-time ones from 34 (32 and 33 are the C library's own).
    let mask = u64::from_str_radix(ignored.trim().trim_start_matches("SigIgn:").trim(), 16)
        .expect("a hex mask");
    assert_eq!(mask & !0x1_8000_0000, 0, "ignored: {ignored}");
}

/// Several execs and terminals in one sandbox at once, over the exec WebSocket: each gets
/// its own stdin, output, terminal size, resizes and signals; ending one leaves the others.
#[test]
fn concurrent_execs_and_terminals_are_independent() {
    require_root!();
    use devbox_wire::stream::{ClientMsg, ServerMsg};
    use devbox_wire::{ExecRequest, TtySize};
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let env = TestEnv::new();
    env.ok(&["create", "multi"]);
    let client = devbox_client::Client::new(&env.socket);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let open = |command: &str, tty: Option<(u16, u16)>| {
            let first = ClientMsg::Exec {
                exec: ExecRequest {
                    command: Some(command.to_string()),
                    tty: tty.map(|(rows, cols)| TtySize { rows, cols }),
                    ..Default::default()
                },
                stdin: true,
                no_wait: true,
            };
            let client = client.clone();
            async move {
                client
                    .stream("/v1/sandboxes/multi/exec/stream", &first, |_| {})
                    .await
                    .expect("exec stream")
                    .0
            }
        };
        // Reads until the exit: the output (both channels) and the exit message.
        async fn finish(ws: &mut devbox_client::ExecStream) -> (String, ServerMsg) {
            let mut out = Vec::new();
            while let Some(m) = ws.next().await {
                match m.expect("frame") {
                    Message::Binary(b) if !b.is_empty() => out.extend_from_slice(&b[1..]),
                    Message::Text(t) => {
                        if let Ok(msg @ ServerMsg::Exit { .. }) = serde_json::from_str(&t) {
                            return (String::from_utf8_lossy(&out).into_owned(), msg);
                        }
                    }
                    _ => {}
                }
            }
            panic!("no exit; output so far: {}", String::from_utf8_lossy(&out));
        }
        let text = |m: &ClientMsg| Message::Text(serde_json::to_string(m).unwrap().into());
        let script = "stty size; read x; stty size; echo got:$x";
        let mut t1 = open(script, Some((10, 40))).await;
        let mut t2 = open(script, Some((30, 100))).await;
        let mut c1 = open("cat", None).await;
        let mut c2 = open("cat", None).await;

        // A resize of one terminal only; different input to each.
        t1.send(text(&ClientMsg::Resize {
            rows: 50,
            cols: 120,
        }))
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        t1.send(Message::Binary(b"one\n".to_vec().into()))
            .await
            .unwrap();
        t2.send(Message::Binary(b"two\n".to_vec().into()))
            .await
            .unwrap();
        c1.send(Message::Binary(b"first cat\n".to_vec().into()))
            .await
            .unwrap();
        c2.send(Message::Binary(b"second cat\n".to_vec().into()))
            .await
            .unwrap();
        let (o1, _) = finish(&mut t1).await;
        let (o2, _) = finish(&mut t2).await;
        assert!(
            o1.contains("10 40") && o1.contains("50 120") && o1.contains("got:one"),
            "{o1:?}"
        );
        assert!(
            o2.contains("30 100") && !o2.contains("50 120") && o2.contains("got:two"),
            "{o2:?}"
        );
        assert!(!o1.contains("two") && !o2.contains("one"), "{o1:?} {o2:?}");

        // A signal to one cat ends it alone; the other still echoes, then ends at EOF.
        c1.send(text(&ClientMsg::Signal { signal: 15 }))
            .await
            .unwrap();
        let (out1, exit1) = finish(&mut c1).await;
        assert_eq!(out1, "first cat\n");
        assert!(
            matches!(
                exit1,
                ServerMsg::Exit {
                    signal: Some(15),
                    ..
                }
            ),
            "{exit1:?}"
        );
        c2.send(Message::Binary(b"still here\n".to_vec().into()))
            .await
            .unwrap();
        c2.send(text(&ClientMsg::StdinEof)).await.unwrap();
        let (out2, exit2) = finish(&mut c2).await;
        assert_eq!(out2, "second cat\nstill here\n");
        assert!(
            matches!(exit2, ServerMsg::Exit { code: 0, .. }),
            "{exit2:?}"
        );
    });
}
