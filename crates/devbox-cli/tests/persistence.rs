//! State survives the daemon: a killed daemon's sandboxes keep running and a new daemon
//! finds them; after a (simulated) host reboot they show as stopped with their files, and
//! start again. A full pool fails cleanly.

mod common;

use std::time::{Duration, Instant};

use common::TestEnv;

fn state_of(env: &TestEnv, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", name])).unwrap();
    v["state"].as_str().unwrap().to_string()
}

#[test]
fn sandboxes_outlive_the_daemon_and_a_reboot() {
    require_root!();
    let mut env = TestEnv::new();
    env.ok(&["create", "keep"]);
    env.ok(&["create", "idle"]);
    env.ok(&["stop", "idle"]);
    env.ok(&[
        "exec",
        "keep",
        "echo data > /work/f; sleep 1000 >/dev/null 2>&1 &",
    ]);
    let pid = env.init_pid("keep").unwrap();

    env.kill_daemon();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the sandbox died with the daemon"
    );
    env.start_daemon();
    assert_eq!(state_of(&env, "keep"), "running");
    assert_eq!(state_of(&env, "idle"), "stopped");
    assert_eq!(env.ok(&["exec", "keep", "cat /work/f"]), "data\n");
    assert!(
        env.ok(&["exec", "keep", "ps -e -o args"])
            .contains("sleep 1000"),
        "background process lost"
    );
    assert_eq!(env.init_pid("keep"), Some(pid));

    // Reboot: every sandbox process dies and the pool is unmounted.
    env.kill_daemon();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let pool = env.pool_dir();
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::is_mounted(&pool) {
        let _ = nix::mount::umount2(&pool, nix::mount::MntFlags::empty());
        assert!(Instant::now() < deadline, "the pool stayed busy");
        std::thread::sleep(Duration::from_millis(50));
    }
    env.start_daemon();
    assert_eq!(state_of(&env, "keep"), "stopped");
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "keep"])).unwrap();
    assert!(v["last_error"].as_str().unwrap().contains("daemon"), "{v}");
    assert!(
        env.cgroup_dirs().is_empty(),
        "stale cgroups: {:?}",
        env.cgroup_dirs()
    );
    env.ok(&["start", "keep"]);
    assert_eq!(
        env.ok(&["exec", "keep", "cat /work/f"]),
        "data\n",
        "files survive a reboot"
    );
    env.ok(&["start", "idle"]);
    assert_eq!(env.ok(&["exec", "idle", "echo up"]), "up\n");
}

#[test]
fn init_dying_marks_the_sandbox_stopped() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "fragile"]);
    let pid = env.init_pid("fragile").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(&env, "fragile") != "stopped" {
        assert!(
            Instant::now() < deadline,
            "still running after its init died"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(env.cgroup_dirs().is_empty());
    env.ok(&["start", "fragile"]);
    assert_eq!(env.ok(&["exec", "fragile", "echo back"]), "back\n");
}

#[test]
fn full_pool_fails_cleanly() {
    require_root!();
    let env = TestEnv::with_pool_size("300M");
    env.ok(&["create", "filler"]);
    let out = env.sb(&[
        "exec",
        "filler",
        "dd if=/dev/zero of=/work/big bs=1M count=600 2>&1",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("No space left"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The sandbox keeps running; an import into the full pool says what is wrong.
    assert_eq!(
        env.ok(&["exec", "filler", "echo still here"]),
        "still here\n"
    );
    let dir = env.root.path().join("bigimage");
    std::fs::create_dir_all(&dir).unwrap();
    let junk: Vec<u8> = (0..(64u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("blob"), &junk).unwrap();
    let err = env.fails(&["image", "import", dir.to_str().unwrap(), "--name", "big"]);
    assert!(err.contains("storage pool is full"), "{err}");
    assert_eq!(
        std::fs::read_dir(env.pool_dir().join("staging"))
            .unwrap()
            .count(),
        0
    );
    let names = env.ok(&["image", "ls"]);
    assert!(!names.contains("big"), "{names}");
    // Freeing space makes the pool usable again.
    env.ok(&["exec", "filler", "rm /work/big && sync"]);
    env.ok(&["create", "after"]);
}
