//! Breakout attempts: each must fail inside a sandbox.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::time::Duration;

use common::TestEnv;

/// Runs a Python snippet that makes raw system calls through ctypes and prints their errno.
const SYSCALL_PROBE: &str = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def call(name, nr, *args):
    r = libc.syscall(nr, *args)
    print(name, "ok" if r >= 0 else os.strerror(ctypes.get_errno()))
call("ptrace_attach_init", 101, 16, 1, 0, 0)
call("finit_module", 313, 0, b"", 0)
call("init_module", 175, 0, 0, b"")
call("unshare_user", 272, 0x10000000)
call("unshare_mount", 272, 0x00020000)
call("mount", 165, b"none", b"/mnt", b"tmpfs", 0, 0)
call("bpf", 321, 0, 0, 0)
call("keyctl", 250, 0, 0, 0)
call("perf_event_open", 298, 0, 0, -1, -1, 0)
call("kexec_load", 246, 0, 0, 0, 0)
call("clone_newuser", 56, 0x10000000 | 17, 0, 0, 0, 0)
call("reboot", 169, 0xfee1dead, 672274793, 0x4321fedc, 0)
call("setns", 308, 0, 0)
call("io_uring_setup", 425, 1, 0)
call("getpid_ok", 39)
call("sethostname", 170, b"renamed", 7)
"#;

#[test]
fn breakout_attempts_fail() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    env.ok(&["create", "jail"]);

    // Raw system calls: privileged ones are refused (EPERM from seccomp or capabilities).
    let probe = env.ok(&["exec", "jail", "--", "python3", "-c", SYSCALL_PROBE]);
    for line in probe.lines() {
        let (name, result) = line.split_once(' ').unwrap();
        if name.ends_with("_ok") {
            assert_eq!(result, "ok", "{line}");
        } else {
            assert_ne!(result, "ok", "{name} succeeded inside the sandbox");
        }
    }
    assert!(
        probe.contains("ptrace_attach_init Operation not permitted"),
        "{probe}"
    );

    // Privilege state of every process: seccomp filter, no_new_privs, few capabilities.
    let status = env.ok(&["exec", "jail", "cat /proc/self/status"]);
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:\t"))
        .unwrap();
    let caps = u64::from_str_radix(cap_eff.trim(), 16).unwrap();
    for (bit, name) in [
        (21, "CAP_SYS_ADMIN"),
        (16, "CAP_SYS_MODULE"),
        (19, "CAP_SYS_PTRACE"),
        (12, "CAP_NET_ADMIN"),
        (27, "CAP_MKNOD"),
        (17, "CAP_SYS_RAWIO"),
    ] {
        assert_eq!(caps & (1 << bit), 0, "{name} is in the effective set");
    }

    // Host processes are invisible.
    let mut marker = std::process::Command::new("sleep")
        .arg("1000.12345")
        .spawn()
        .unwrap();
    let seen = env.ok(&[
        "exec",
        "jail",
        "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'",
    ]);
    assert!(
        !seen.contains("1000.12345"),
        "a host process is visible: {seen}"
    );
    let count: usize = seen.lines().last().unwrap().trim().parse().unwrap();
    assert!(count < 10, "too many processes visible: {count}");
    let _ = marker.kill();
    let _ = marker.wait();

    // Host files are out of reach: system dirs are read-only, secrets and state invisible.
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let (code, _, _) = env.sh("jail", "touch /usr/bin/evil");
    assert_ne!(code, 0, "/usr is writable");
    env.ok(&[
        "exec",
        "jail",
        "echo 'evil:x:0:0::/:/bin/sh' >> /etc/passwd",
    ]);
    assert_eq!(
        std::fs::read("/etc/passwd").unwrap(),
        passwd,
        "the host's /etc/passwd changed"
    );
    assert_eq!(
        env.ok(&["exec", "jail", "ls -A /root /home | wc -w"])
            .trim(),
        "2",
        "only the two headers: both are empty"
    );
    assert!(env.ok(&["exec", "jail", "ls /etc"]).contains("passwd"));
    let (code, _, _) = env.sh("jail", "cat /etc/shadow");
    assert_ne!(code, 0, "/etc/shadow is readable");
    let state = env.state.display().to_string();
    let (code, _, _) = env.sh("jail", &format!("ls {state}"));
    assert_ne!(code, 0, "the daemon's state is visible");
    let (code, _, _) = env.sh("jail", "echo c > /proc/sysrq-trigger");
    assert_ne!(code, 0);
    let (code, _, _) = env.sh("jail", "echo 1 > /proc/sys/kernel/panic");
    assert_ne!(code, 0);
    let (code, _, _) = env.sh("jail", "mknod /tmp/sda b 8 0");
    assert_ne!(code, 0, "mknod worked");
    let (code, _, _) = env.sh("jail", "cat /proc/kcore | head -c 1 | wc -c | grep -q 1");
    assert_ne!(code, 0, "/proc/kcore is readable");

    // The host network is unreachable: only a loopback of its own.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (code, _, _) = env.sh(
        "jail",
        &format!("timeout 3 bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}'"),
    );
    assert_ne!(code, 0, "reached the host's loopback");
    let mut buf = [0u8; 8];
    if let Ok((mut s, _)) = listener.accept() {
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        assert!(
            s.read(&mut buf).unwrap_or(0) == 0,
            "the host listener got data"
        );
        panic!("the host listener accepted a connection from the sandbox");
    }
    let links = env.ok(&["exec", "jail", "cat /proc/net/dev"]);
    let ifaces: Vec<&str> = links
        .lines()
        .skip(2)
        .map(|l| l.trim().split(':').next().unwrap())
        .collect();
    assert_eq!(ifaces, vec!["lo"], "{links}");

    // Limits cannot be raised.
    let (code, _, _) = env.sh("jail", "ulimit -n 1000000");
    assert_ne!(code, 0, "raised RLIMIT_NOFILE");
    let (code, _, _) = env.sh("jail", "ls /sys/fs/cgroup/memory");
    assert_ne!(code, 0, "host cgroups are visible");

    // Root inside is an unprivileged uid outside.
    let pid = env.init_pid("jail").unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(uid >= 1_000_000, "sandbox root is host uid {uid}");
    assert_eq!(env.ok(&["exec", "jail", "id -u"]), "0\n");
}

#[test]
fn memory_limit_is_enforced() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "small", "--memory", "64Mi"]);
    let out = env.sb(&[
        "exec",
        "small",
        "--",
        "python3",
        "-c",
        "x = bytearray(256 * 1024 * 1024); print('allocated')",
    ]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("allocated"));
    assert_ne!(out.status.code(), Some(0));
    // The sandbox itself survives its command's OOM kill.
    assert_eq!(env.ok(&["exec", "small", "echo alive"]), "alive\n");
}

#[test]
fn sandboxes_do_not_see_each_other() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "a"]);
    env.ok(&["create", "b"]);
    env.ok(&[
        "exec",
        "a",
        "echo secret > /work/a-only; sleep 300 >/dev/null 2>&1 &",
    ]);
    let (code, _, _) = env.sh("b", "cat /work/a-only");
    assert_ne!(code, 0);
    let procs = env.ok(&["exec", "b", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"]);
    assert!(!procs.contains("sleep 300"), "{procs}");
    let ua = env.ok(&["inspect", "a"]);
    let ub = env.ok(&["inspect", "b"]);
    let base = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s).unwrap()["uid_base"]
            .as_u64()
            .unwrap()
    };
    assert_ne!(base(&ua), base(&ub), "two sandboxes share host uids");
}
