//! No leak: 200 sandboxes created and destroyed, some with their init killed mid-way, some
//! destroyed while a command runs, and the daemon killed once in the middle, leave no mount,
//! cgroup, network namespace, loop device, process or volume behind.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::TestEnv;

fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

fn loop_devices() -> usize {
    std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with("loop")
                && std::fs::read_to_string(e.path().join("size"))
                    .map(|s| s.trim() != "0")
                    .unwrap_or(false)
        })
        .count()
}

fn net_namespaces() -> HashSet<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            std::fs::metadata(e.path().join("ns/net"))
                .ok()
                .map(|m| m.ino())
        })
        .collect()
}

/// Sandbox init processes: sandbox-init running as pid 1 of a pid namespace of its own.
fn init_processes() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let nested = status
                .lines()
                .any(|l| l.starts_with("NSpid:") && l.split_whitespace().count() > 2);
            nested && String::from_utf8_lossy(&cmd).contains("sandbox-init")
        })
        .count()
}

#[test]
fn two_hundred_sandboxes_leave_nothing_behind() {
    require_root!();
    let mut env = TestEnv::new();
    // Baseline after the daemon and its pool are up.
    let mounts = mount_count();
    let loops = loop_devices();
    let netns = net_namespaces().len();
    let inits = init_processes();

    let total = 200;
    let mut i = 0;
    while i < total {
        if i == 100 {
            // Kill the daemon in the middle of a create, then bring it back.
            let mut child = env
                .cmd()
                .args(["create", &format!("mid{i}")])
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(3));
            env.kill_daemon();
            let _ = child.wait();
            env.start_daemon();
        }
        let batch: Vec<usize> = (i..(i + 4).min(total)).collect();
        std::thread::scope(|s| {
            for n in &batch {
                let env = &env;
                let n = *n;
                s.spawn(move || {
                    let name = format!("leak{n}");
                    env.ok(&["create", &name]);
                    match n % 5 {
                        0 => {
                            // Init killed mid-way.
                            if let Some(pid) = env.init_pid(&name) {
                                let _ = nix::sys::signal::kill(
                                    nix::unistd::Pid::from_raw(pid),
                                    nix::sys::signal::Signal::SIGKILL,
                                );
                            }
                            env.ok(&["destroy", &name]);
                        }
                        1 => {
                            // Destroyed while a command runs.
                            let mut running =
                                env.cmd().args(["exec", &name, "sleep 30"]).spawn().unwrap();
                            std::thread::sleep(Duration::from_millis(20));
                            env.ok(&["destroy", "--force", &name]);
                            let _ = running.wait();
                        }
                        2 => {
                            env.ok(&["exec", &name, "echo x > /work/x; sleep 100 &"]);
                            env.ok(&["stop", &name, "--time", "0"]);
                            env.ok(&["destroy", &name]);
                        }
                        _ => {
                            env.ok(&["exec", &name, "true"]);
                            env.ok(&["destroy", &name]);
                        }
                    }
                });
            }
        });
        i += batch.len();
    }
    for name in env.ok(&["ls", "-q"]).lines() {
        env.ok(&["destroy", "--force", name]);
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = (
            mount_count(),
            loop_devices(),
            net_namespaces().len(),
            init_processes(),
        );
        if (now.0 <= mounts && now.1 <= loops && now.2 <= netns && now.3 <= inits)
            || Instant::now() > deadline
        {
            assert!(
                now.0 <= mounts,
                "mounts: {} before, {} after",
                mounts,
                now.0
            );
            assert!(
                now.1 <= loops,
                "loop devices: {} before, {} after",
                loops,
                now.1
            );
            assert!(
                now.2 <= netns,
                "network namespaces: {} before, {} after",
                netns,
                now.2
            );
            assert!(
                now.3 <= inits,
                "sandbox-init processes: {} before, {} after",
                inits,
                now.3
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        env.cgroup_dirs().is_empty(),
        "cgroups left: {:?}",
        env.cgroup_dirs()
    );
    assert_eq!(
        std::fs::read_dir(env.pool_dir().join("sandboxes"))
            .unwrap()
            .count(),
        0,
        "volumes left"
    );
    assert_eq!(
        std::fs::read_dir(env.runtime.join("sandboxes"))
            .unwrap()
            .count(),
        0,
        "runtime dirs left"
    );
}
