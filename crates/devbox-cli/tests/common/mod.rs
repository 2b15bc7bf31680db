//! A private dev-box for each test: its own state and runtime directories, btrfs pool (a
//! loop file), cgroup parent and daemon, all removed when the test ends, also on failure.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Why this test cannot run here, if it cannot.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (namespaces, cgroups, mounts)".into());
    }
    for tool in ["mkfs.btrfs", "mount"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        if !found {
            return Some(format!("needs {tool} (run scripts/deps.sh)"));
        }
    }
    None
}

/// Skips the test (returning early) when the machine cannot run it.
#[macro_export]
macro_rules! require_root {
    () => {
        if let Some(why) = $crate::common::skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// A private dev-box.
pub struct TestEnv {
    pub root: tempfile::TempDir,
    pub state: PathBuf,
    pub runtime: PathBuf,
    pub socket: PathBuf,
    pub cgroup_parent: String,
    pub pool_size: String,
    /// `DEVBOX_POOL` for the daemon: `None` for the default btrfs loop file.
    pub pool_spec: Option<String>,
    /// Extra environment of the daemon.
    pub daemon_env: Vec<(String, String)>,
    /// A network namespace (a file, such as /run/netns/NAME) the daemon runs in (through
    /// `nsenter --net`, nothing else of it changes); none: the test's own.
    pub daemon_netns: Option<PathBuf>,
    daemon: Option<Child>,
}

pub fn sandbox_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sandbox"))
}

impl TestEnv {
    /// A new environment with its daemon running.
    pub fn new() -> Self {
        Self::with_pool_size("1G")
    }

    /// A new environment whose pool uses the copy driver (plain directories).
    pub fn copy_driver() -> Self {
        Self::build("1G", true)
    }

    /// The copy driver on a filesystem of its own of `size` (an ext4 loop mount), to fill it.
    pub fn copy_driver_sized(size: &str) -> Self {
        let mut env = Self::build("1G", true);
        env.stop_daemon();
        let image = env.root.path().join("copy-pool.img");
        let dir = env.pool_dir();
        let run = |cmd: &mut Command| assert!(cmd.status().expect("run").success(), "{cmd:?}");
        run(Command::new("truncate").arg("-s").arg(size).arg(&image));
        run(Command::new("mkfs.ext4").arg("-q").arg(&image));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("mount")
            .arg("-o")
            .arg("loop")
            .arg(&image)
            .arg(&dir));
        env.start_daemon();
        env
    }

    /// A new environment whose pool is a loop file of `size`.
    pub fn with_pool_size(size: &str) -> Self {
        Self::build(size, false)
    }

    fn build(size: &str, copy: bool) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let root = tempfile::Builder::new()
            .prefix("devbox-test-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        let state = root.path().join("state");
        let runtime = root.path().join("run");
        let socket = runtime.join("api.sock");
        let mut env = TestEnv {
            cgroup_parent: format!("devbox-test-{}-{n}", std::process::id()),
            root,
            state,
            runtime,
            socket,
            pool_size: size.to_string(),
            pool_spec: None,
            // A command that unexpectedly needs approval fails in a minute, not ten.
            daemon_env: vec![("DEVBOX_APPROVAL_TIMEOUT".into(), "60".into())],
            daemon_netns: None,
            daemon: None,
        };
        if copy {
            env.pool_spec = Some(format!(
                "dir:{}",
                env.root.path().join("copy-pool").display()
            ));
        }
        env.start_daemon();
        env
    }

    fn envs(&self, cmd: &mut Command) {
        cmd.env("DEVBOX_STATE_DIR", &self.state)
            .env("DEVBOX_RUNTIME_DIR", &self.runtime)
            .env("DEVBOX_SOCKET", &self.socket)
            .env("DEVBOX_CGROUP_PARENT", &self.cgroup_parent)
            .env("DEVBOX_POOL_SIZE", &self.pool_size)
            .env("DEVBOX_NO_AUTOSTART", "1");
        match &self.pool_spec {
            Some(p) => cmd.env("DEVBOX_POOL", p),
            None => cmd.env_remove("DEVBOX_POOL"),
        };
    }

    /// Starts the daemon and waits for its socket.
    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("daemon.log"))
            .expect("log");
        let mut cmd = match &self.daemon_netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(sandbox_bin());
                c
            }
            None => Command::new(sandbox_bin()),
        };
        self.envs(&mut cmd);
        cmd.envs(self.daemon_env.iter().map(|(k, v)| (k, v)));
        cmd.arg("daemon")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = cmd.spawn().expect("spawn daemon");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("daemon exited: {st}\n{}", self.daemon_log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.daemon = Some(child);
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }

    /// SIGKILLs the daemon (sandboxes keep running).
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts the daemon with `key=value` added to its environment.
    pub fn restart_with_env(&mut self, key: &str, value: &str) {
        self.stop_daemon();
        self.daemon_env.push((key.to_string(), value.to_string()));
        self.start_daemon();
    }

    /// Stops the daemon with SIGTERM.
    pub fn stop_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A dev-box whose daemon runs in the network namespace `netns` (a test world's, whose
    /// only route leads into the world), resolving through `dns`, with sandbox addresses
    /// from `subnet` and `extra` in its environment. The built-in default policy is replaced
    /// by one that allows everything: it would hold `/dev/tcp` redirections and raw sockets
    /// for approval, and these tests are about the network, not the guardrail.
    pub fn in_netns(netns: &Path, dns: &str, subnet: &str, extra: &[(&str, &str)]) -> TestEnv {
        let mut env = TestEnv::new();
        env.stop_daemon();
        env.daemon_netns = Some(netns.to_path_buf());
        env.daemon_env.push(("DEVBOX_NET_DNS".into(), dns.into()));
        env.daemon_env
            .push(("DEVBOX_NET_SUBNET".into(), subnet.into()));
        for (k, v) in extra {
            env.daemon_env.push((k.to_string(), v.to_string()));
        }
        env.start_daemon();
        env.allow_everything();
        env
    }

    /// Replaces the built-in default policy with one that allows everything, for tests that
    /// run dangerous commands on purpose to show the isolation holds without the guardrail.
    pub fn allow_everything(&self) {
        let file = self.root.path().join("allow-all.rego");
        std::fs::write(
            &file,
            "package devbox.allow_all\nimport rego.v1\ndefault decision := \"allow\"\nreasons := []\n",
        )
        .unwrap();
        self.ok(&["policy", "add", "default", "-f", file.to_str().unwrap()]);
    }

    /// A `sandbox` command with this environment.
    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(sandbox_bin());
        self.envs(&mut cmd);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `sandbox ARGS`.
    pub fn sb(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run sandbox")
    }

    /// Runs `sandbox ARGS`, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.sb(args);
        assert!(
            out.status.success(),
            "sandbox {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `sandbox ARGS`, asserts failure, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.sb(args);
        assert!(
            !out.status.success(),
            "sandbox {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Runs shell text in a sandbox; returns (exit code, stdout, stderr).
    pub fn sh(&self, sandbox: &str, text: &str) -> (i32, String, String) {
        let out = self.sb(&["exec", sandbox, text]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn pool_dir(&self) -> PathBuf {
        match &self.pool_spec {
            Some(p) => PathBuf::from(p.trim_start_matches("dir:")),
            None => self.state.join("pool"),
        }
    }

    /// A sandbox's snapshots as JSON values.
    pub fn snapshots(&self, name: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["snapshots", name, "--format", "json"])).expect("json");
        v.as_array().cloned().unwrap_or_default()
    }

    /// The `name`s of a sandbox's snapshots.
    pub fn snapshot_names(&self, name: &str) -> Vec<String> {
        self.snapshots(name)
            .iter()
            .map(|s| s["name"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Host pid of a sandbox's init.
    pub fn init_pid(&self, name: &str) -> Option<i32> {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["inspect", name])).ok()?;
        v["init_pid"].as_i64().map(|p| p as i32)
    }

    /// Sandbox cgroup directories under this environment's parent, in every hierarchy (the
    /// daemon's warm launchers, `warm-*`, are not sandboxes and are left out).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = h.path().join(&self.cgroup_parent);
            if let Ok(entries) = std::fs::read_dir(&p) {
                for e in entries.flatten() {
                    let warm = e.file_name().to_string_lossy().starts_with("warm-");
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) && !warm {
                        out.push(e.path());
                    }
                }
            }
        }
        out
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.daemon.is_some()
            && let Ok(out) = self.cmd().args(["ls", "-q"]).output()
        {
            for name in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.cmd().args(["destroy", "--force", name]).output();
            }
        }
        self.stop_daemon();
        // Anything left in this environment's cgroups is killed and removed.
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let parent = h.path().join(&self.cgroup_parent);
            if !parent.exists() {
                continue;
            }
            for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                let procs =
                    std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let parent = h.path().join(&self.cgroup_parent);
            for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(e.path());
            }
            let _ = std::fs::remove_dir(&parent);
        }
        let pool = self.pool_dir();
        for _ in 0..50 {
            if !is_mounted(&pool) {
                break;
            }
            if nix::mount::umount2(&pool, nix::mount::MntFlags::empty()).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // What a failed test left mounted below this environment (network namespace files,
        // say) goes too, deepest first, so nothing outlives the test.
        let root = format!("{}/", self.root.path().display());
        let mut left: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
            .map(str::to_string)
            .collect();
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in left {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Whether `path` is a mount point.
pub fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// A unique sandbox name for this process.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A tiny busybox root filesystem.
pub fn busybox_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    for app in ["sh", "cat", "echo", "ls", "id", "touch", "wc"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(app)).unwrap();
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/motd"), "from the image\n").unwrap();
}

pub fn tar_dir(dir: &Path, out: &Path) {
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-czf")
        .arg(out)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
}

/// A small pseudo-random source seeded by the pid (`rnd(n)` is in 0..n): each run kills
/// at different points, and a failure's pid in the log says which sequence it was.
pub fn rng() -> impl FnMut(u64) -> u64 {
    let mut seed = std::process::id() as u64;
    move |n| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    }
}

/// What one SQL statement did: rows changed, and the rows it returned.
pub struct SqlResult {
    pub changed: i64,
    pub rows: Vec<Vec<serde_json::Value>>,
}

/// Runs `statements` (SQL text and its `?N` parameters) in one transaction on the SQLite
/// database `db`, through Python's sqlite3: the tests tamper with the daemon's stopped
/// database, and the CLI crate does not link SQLite, not even in its tests.
pub fn sqlite(db: &Path, statements: &[(&str, serde_json::Value)]) -> Vec<SqlResult> {
    const SCRIPT: &str = r#"
import json, sqlite3, sys
job = json.load(sys.stdin)
conn = sqlite3.connect(job["db"])
out = []
for sql, params in job["statements"]:
    cur = conn.execute(sql, params)
    rows = cur.fetchall()
    out.append({"changed": cur.rowcount, "rows": [list(r) for r in rows]})
conn.commit()
json.dump(out, sys.stdout)
"#;
    let job = serde_json::json!({
        "db": db.to_str().expect("utf-8 path"),
        "statements": statements.iter().map(|(s, p)| serde_json::json!([s, p])).collect::<Vec<_>>(),
    });
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/deps.sh installs it)");
    serde_json::to_writer(child.stdin.take().expect("stdin"), &job).expect("write job");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "sqlite statements failed: {statements:?}"
    );
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    v.into_iter()
        .map(|r| SqlResult {
            changed: r["changed"].as_i64().unwrap_or(-1),
            rows: r["rows"]
                .as_array()
                .map(|rows| {
                    rows.iter()
                        .map(|row| row.as_array().cloned().unwrap_or_default())
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}
