//! Launches real sandboxes from a busybox root (needs root, user namespaces, overlayfs).

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use devbox_runtime::cgroup::{CgroupDriver, Limits};
use devbox_runtime::client::AgentConn;
use devbox_runtime::config::{IdMap, LaunchConfig, RootfsPlan};
use devbox_runtime::launch::Launcher;
use devbox_runtime::protocol::{AttachedStdio, ExecRequest, Reply, Request};

fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root");
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("needs busybox-static (/bin/busybox)");
    }
    None
}

fn busybox_root(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    for app in [
        "sh", "echo", "cat", "id", "ls", "sleep", "hostname", "ps", "mount", "touch", "stat",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(app)).unwrap();
    }
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
}

struct Sandbox {
    _tmp: tempfile::TempDir,
    socket: PathBuf,
    pid: i32,
    cgroup: devbox_runtime::cgroup::SandboxCgroup,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = devbox_runtime::client::shutdown(&self.socket, Duration::from_millis(100));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.cgroup.kill_all();
        let _ = self.cgroup.remove(Duration::from_secs(5));
        // The shared parent goes with the last test that uses it (it is busy before).
        for path in self.cgroup.paths() {
            if let Some(parent) = path.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

fn start(name: &str) -> Sandbox {
    let tmp = tempfile::Builder::new()
        .prefix("devbox-rt-")
        .tempdir()
        .unwrap();
    let image = tmp.path().join("image");
    busybox_root(&image);
    let writable = tmp.path().join("writable");
    for d in ["upper", "work"] {
        std::fs::create_dir_all(writable.join(d)).unwrap();
    }
    nix::unistd::chown(
        &writable.join("upper"),
        Some(nix::unistd::Uid::from_raw(0)),
        Some(nix::unistd::Gid::from_raw(0)),
    )
    .unwrap();
    let runtime = tmp.path().join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    for d in [tmp.path(), runtime.as_path()] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    }
    let driver = CgroupDriver::detect("devbox-runtime-test").unwrap();
    let cgroup = driver
        .create(
            name,
            &Limits {
                memory_bytes: Some(256 << 20),
                pids: Some(128),
                cpu_millis: None,
            },
        )
        .unwrap();
    let cfg = LaunchConfig {
        id: name.into(),
        hostname: name.into(),
        idmap: IdMap {
            host_base: 200_000,
            size: 65536,
        },
        rootfs: RootfsPlan {
            layers: vec![image],
            writable,
            binds: vec![],
        },
        runtime_dir: runtime.clone(),
        agent_socket: runtime.join("agent.sock"),
        cgroups: cgroup.paths(),
        seccomp: true,
        netns: None,
        resolv_conf: None,
    };
    let launcher = Launcher::new(env!("CARGO_BIN_EXE_sandbox-init"));
    let pid = launcher.launch(&cfg).expect("launch");
    Sandbox {
        socket: cfg.agent_socket.clone(),
        _tmp: tmp,
        pid,
        cgroup,
    }
}

fn exec(sb: &Sandbox, argv: &[&str], user: Option<&str>) -> (i32, String, String) {
    let conn = AgentConn::connect(&sb.socket).unwrap();
    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    let (err_r, err_w) = nix::unistd::pipe().unwrap();
    let req = ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: "/".into(),
        user: user.map(str::to_string),
        tty: None,
        stdio: AttachedStdio {
            stdin: false,
            stdout: true,
            stderr: true,
        },
    };
    conn.send(&Request::Exec(req), &[out_w.as_raw_fd(), err_w.as_raw_fd()])
        .unwrap();
    drop(out_w);
    drop(err_w);
    let read_all = |fd: OwnedFd| {
        let mut s = String::new();
        std::fs::File::from(fd).read_to_string(&mut s).unwrap();
        s
    };
    match conn.recv().unwrap().0 {
        Reply::Started { .. } => {}
        Reply::Failed { message, .. } => return (-1, String::new(), message),
        other => panic!("unexpected {other:?}"),
    }
    let out = read_all(out_r);
    let err = read_all(err_r);
    match conn.recv().unwrap().0 {
        Reply::Exited { code, .. } => (code, out, err),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn runs_commands_as_mapped_root() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let name = format!("rt-{}", std::process::id());
    let sb = start(&name);
    let (code, out, err) = exec(
        &sb,
        &[
            "sh",
            "-c",
            "echo hello > /hello && cat /hello && id && hostname",
        ],
        None,
    );
    assert_eq!(code, 0, "stderr: {err}");
    assert!(out.contains("hello"), "{out}");
    assert!(out.contains("uid=0(root)"), "{out}");
    assert!(out.contains(&name), "{out}");
    let (code, out, _) = exec(&sb, &["id", "-u"], Some("user"));
    assert_eq!((code, out.trim()), (0, "1000"));
    let (code, _, err) = exec(&sb, &["no-such-program"], None);
    assert_eq!(code, -1);
    assert!(err.contains("command not found"), "{err}");
    let (code, out, _) = exec(&sb, &["sh", "-c", "exit 7"], None);
    assert_eq!((code, out.as_str()), (7, ""));
}
