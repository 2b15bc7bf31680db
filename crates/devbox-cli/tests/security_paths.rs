//! Daemon-side operations on trees a sandbox wrote, attacked from inside the sandbox with
//! symbolic links to host paths: rollback by path, clones, diffs, sizes, exports, on both
//! storage drivers. The daemon acts as host root; none of these may read or write a host
//! file through a link the sandbox made, at any level of a path, nor when the link is
//! swapped in while the operation runs.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::TestEnv;

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

/// A host directory the sandbox will point links at, holding files only the host has.
struct HostDir {
    path: PathBuf,
}

impl HostDir {
    fn new(env: &TestEnv, name: &str) -> Self {
        let path = env.root.path().join(name);
        std::fs::create_dir_all(path.join("src")).unwrap();
        std::fs::write(path.join("secret"), "HOST-SECRET-7f3a\n").unwrap();
        std::fs::set_permissions(path.join("secret"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::fs::write(path.join("src/precious"), "host file\n").unwrap();
        HostDir { path }
    }

    /// Every entry below the directory, with size and mode: what must not change.
    fn listing(&self) -> Vec<(PathBuf, u64, u32, u32)> {
        let mut out = Vec::new();
        let mut stack = vec![self.path.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let m = std::fs::symlink_metadata(e.path()).unwrap();
                if m.is_dir() {
                    stack.push(e.path());
                }
                out.push((e.path(), m.len(), m.mode(), m.uid()));
            }
        }
        out.sort();
        out
    }
}

/// Files in /work/src, a setuid copy of a shell among them; then a snapshot `good`.
fn prepare(env: &TestEnv, name: &str) {
    env.allow_everything();
    env.ok(&["create", name]);
    env.ok(&[
        "exec",
        name,
        "mkdir -p /work/src/deep && echo code > /work/src/main && echo d > /work/src/deep/f \
         && cp /bin/sh /work/src/rootsh && chmod 4755 /work/src/rootsh",
    ]);
    env.ok(&["snapshot", name, "good"]);
}

// The issue's attack, with the link at each level of the path and in several forms.
on_both_drivers!(rollback_by_path_never_writes_through_links);
fn rollback_by_path_never_writes_through_links(env: TestEnv) {
    let host = HostDir::new(&env, "host-w");
    let before = host.listing();
    let h = host.path.display().to_string();
    prepare(&env, "w");
    // (link made inside, path restored)
    let shapes: Vec<(String, &str)> = vec![
        (format!("rm -rf /work && ln -s {h} /work"), "/work/src"),
        (
            format!("rm -rf /work/src && ln -s {h}/src /work/src"),
            "/work/src",
        ),
        (
            format!("rm -rf /work/src && ln -s {h} /work/src"),
            "/work/src/deep",
        ),
        (
            format!("rm -rf /work/src/deep && ln -s {h}/src /work/src/deep"),
            "/work/src/deep/f",
        ),
        // relative links climbing out, and a link as the path's last component
        (
            format!("rm -rf /work && ln -s ../../../../../../../../..{h} /work"),
            "/work/src/main",
        ),
        (
            format!("rm -f /work/src/main && ln -s {h}/secret /work/src/main"),
            "/work/src/main",
        ),
        // a parent that is now a file, and one that is a whiteout (deleted)
        (
            "rm -rf /work/src && echo x > /work/src".to_string(),
            "/work/src/deep",
        ),
        ("rm -rf /work".to_string(), "/work/src"),
    ];
    for (attack, path) in &shapes {
        env.ok(&["exec", "w", attack]);
        env.ok(&["rollback", "w", "--to", "good", "--path", path]);
        assert_eq!(
            host.listing(),
            before,
            "host changed after {attack:?} / {path}"
        );
        // The sandbox sees its snapshot's files at the path, never the host's.
        let (code, out, _) = env.sh("w", &format!("cat {path} 2>/dev/null || ls {path}"));
        assert_eq!(code, 0, "{attack:?}: {path} not restored: {out}");
        assert!(!out.contains("HOST-SECRET"), "{attack:?}: {out}");
        assert!(!out.contains("host file"), "{attack:?}: {out}");
        // Reset for the next shape.
        env.ok(&["rollback", "w", "--to", "good"]);
    }
    // The setuid shell was never put where a host user could run it.
    let found = find_named(&host.path, "rootsh");
    assert!(found.is_empty(), "{found:?}");
}

// The other direction: a snapshot whose tree has links to host paths. A path through such
// a link is refused and nothing changes; a link as the restored path is restored as a link.
on_both_drivers!(rollback_by_path_never_reads_through_links);
fn rollback_by_path_never_reads_through_links(env: TestEnv) {
    env.allow_everything();
    let host = HostDir::new(&env, "host-r");
    let h = host.path.display().to_string();
    env.ok(&["create", "r"]);
    env.ok(&[
        "exec",
        "r",
        &format!("rm -rf /work && ln -s {h} /work && mkdir -p /tmp/a && ln -s {h}/secret /tmp/a/link && ln -s {h} /tmp/dirlink"),
    ]);
    env.ok(&["snapshot", "r", "links"]);
    env.ok(&[
        "exec",
        "-w",
        "/",
        "r",
        "rm -rf /work /tmp/a /tmp/dirlink && mkdir /work && echo mine > /work/mine",
    ]);
    for path in ["/work/secret", "/work/src/precious", "/tmp/dirlink/secret"] {
        let err = env.fails(&["rollback", "r", "--to", "links", "--path", path]);
        assert!(err.contains("symbolic link"), "{path}: {err}");
        assert_eq!(
            env.ok(&["exec", "r", "cat /work/mine"]),
            "mine\n",
            "{path} changed things"
        );
    }
    env.ok(&[
        "rollback",
        "r",
        "--to",
        "links",
        "--path",
        "/tmp/a/link",
        "--path",
        "/work",
    ]);
    let out = env.ok(&[
        "exec",
        "-w",
        "/",
        "r",
        "readlink /tmp/a/link; cat /tmp/a/link /work/secret 2>&1; test -L /work && echo is-link; true",
    ]);
    assert!(out.contains(&format!("{h}/secret")), "{out}");
    assert!(out.contains("is-link"), "{out}");
    assert!(!out.contains("HOST-SECRET"), "{out}");
    // No regular file in the sandbox's layer holds the host's secret.
    let pool = env.pool_dir();
    assert!(
        grep_tree(&pool, b"HOST-SECRET").is_empty(),
        "secret copied into the pool"
    );
}

// Clones and exports of snapshots with links to host paths copy the links, not what
// they point at.
on_both_drivers!(clones_and_exports_copy_links_as_links);
fn clones_and_exports_copy_links_as_links(env: TestEnv) {
    env.allow_everything();
    let host = HostDir::new(&env, "host-c");
    let before = host.listing();
    let h = host.path.display().to_string();
    env.ok(&["create", "c"]);
    env.ok(&[
        "exec",
        "c",
        &format!("ln -s {h} /work/dir && ln -s {h}/secret /work/file && ln /work/file /work/hard"),
    ]);
    env.ok(&["snapshot", "c", "s"]);
    env.ok(&["clone", "c", "s", "c2"]);
    let (_, out, _) = env.sh("c2", "ls -la /work; cat /work/file 2>&1");
    assert!(!out.contains("HOST-SECRET"), "{out}");
    let archive = env.root.path().join("c.tar.zst");
    env.ok(&[
        "snapshot",
        "export",
        "c",
        "s",
        "-o",
        archive.to_str().unwrap(),
    ]);
    let raw = std::process::Command::new("zstd")
        .args(["-dc"])
        .arg(&archive)
        .output();
    if let Ok(raw) = raw {
        assert!(
            !raw.stdout.windows(11).any(|w| w == b"HOST-SECRET"),
            "the export holds the host's file"
        );
    }
    env.ok(&["destroy", "-f", "c2"]);
    env.ok(&["destroy", "-f", "c"]);
    assert_eq!(host.listing(), before);
    assert!(grep_tree(&env.pool_dir(), b"HOST-SECRET").is_empty());
}

// A running sandbox swaps a directory for a link to a host directory as fast as it can
// while the daemon walks its live layer (diff, sizes in inspect) and snapshots it: nothing
// of the host's tree ever shows up in what the daemon reports or copies.
on_both_drivers!(swapped_links_during_walks);
fn swapped_links_during_walks(env: TestEnv) {
    env.allow_everything();
    let host = HostDir::new(&env, "host-s");
    for i in 0..50 {
        std::fs::write(host.path.join(format!("HOSTMARK-{i}")), vec![b'x'; 4096]).unwrap();
    }
    let before = host.listing();
    let h = host.path.display().to_string();
    env.ok(&["create", "s"]);
    env.ok(&[
        "exec",
        "s",
        "mkdir -p /work/d/sub && for i in $(seq 50); do echo $i > /work/d/sub/f$i; done",
    ]);
    // The swapper: /work/d alternates between a directory and a link to the host's.
    env.ok(&[
        "exec",
        "s",
        &format!(
            "(while :; do mv /work/d /work/real; ln -s {h} /work/d; rm /work/d; mv /work/real /work/d; done) > /dev/null 2>&1 &"
        ),
    ]);
    for i in 0..40 {
        let diff = env.ok(&["diff", "s", "--from", "image"]);
        assert!(!diff.contains("HOSTMARK"), "diff listed host files: {diff}");
        let info = env.ok(&["inspect", "s"]);
        assert!(!info.contains("HOSTMARK"));
        if i % 10 == 0 {
            env.ok(&["snapshot", "s", &format!("live-{i}")]);
        }
    }
    let diff = env.ok(&["diff", "s", "--from", "live-0", "--to", "live-30"]);
    assert!(!diff.contains("HOSTMARK"), "{diff}");
    env.ok(&["stop", "-t", "0", "s"]);
    assert_eq!(host.listing(), before);
    assert!(grep_tree(&env.pool_dir(), b"HOST-SECRET").is_empty());
}

/// Paths below `dir` whose name is `name`.
fn find_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            }
            if e.file_name() == name {
                out.push(e.path());
            }
        }
    }
    out
}

/// Regular files below `dir` (links not followed) whose content holds `needle`.
fn grep_tree(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file()
                && e.metadata().is_ok_and(|m| m.len() < 1 << 20)
                && std::fs::read(e.path())
                    .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
            {
                out.push(e.path());
            }
        }
    }
    out
}

// A tree twelve thousand directories deep (deeper than PATH_MAX): destroying the
// sandbox, diffing it and snapshotting it must not crash or wedge the daemon (a recursive
// removal overflowed its stack, and every later start with it).
on_both_drivers!(deep_trees_do_not_crash_the_daemon);
fn deep_trees_do_not_crash_the_daemon(env: TestEnv) {
    env.allow_everything();
    env.ok(&["create", "deep"]);
    env.ok(&[
        "exec",
        "deep",
        "python3 -c \"import os\nos.chdir('/work')\nfor i in range(12000):\n    os.mkdir('d')\n    os.chdir('d')\nopen('leaf', 'w').write('x')\"",
    ]);
    // These may fail on such a tree (paths beyond PATH_MAX), but the daemon stays up.
    let _ = env.sb(&["diff", "deep"]);
    let _ = env.sb(&["snapshot", "deep", "s"]);
    let _ = env.sb(&["rollback", "deep", "--to", "s", "--path", "/work/d"]);
    env.ok(&["ls"]);
    env.ok(&["destroy", "-f", "deep"]);
    assert!(env.ok(&["ls", "-q"]).trim().is_empty());
    let left = std::fs::read_dir(env.pool_dir().join("sandboxes"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "the volume was removed");
}

// Files swapped for fifos (renameat2 RENAME_EXCHANGE in a loop) while the daemon copies the
// live layer for a rollback by path: opening a fifo must never hang the daemon.
on_both_drivers!(fifos_swapped_in_do_not_hang_copies);
fn fifos_swapped_in_do_not_hang_copies(env: TestEnv) {
    env.allow_everything();
    env.ok(&["create", "ff"]);
    env.ok(&[
        "exec",
        "ff",
        "mkdir -p /work/src && echo keep > /work/src/a",
    ]);
    env.ok(&["snapshot", "ff", "good"]);
    let swapper = "python3 -c \"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs('/work/x', exist_ok=True)
for i in range(64):
    open('/work/x/f%d' % i, 'w').write('data')
    os.mkfifo('/work/x/p%d' % i)
while True:
    for i in range(64):
        libc.renameat2(-100, b'/work/x/f%d' % i, -100, b'/work/x/p%d' % i, 2)
\" > /dev/null 2>&1 &";
    for _ in 0..8 {
        env.ok(&["exec", "ff", swapper]);
        std::thread::sleep(std::time::Duration::from_millis(100));
        // A rollback by path copies the live layer first; diff and inspect walk it.
        env.ok(&["diff", "ff", "--from", "good"]);
        env.ok(&["inspect", "ff"]);
        env.ok(&["rollback", "ff", "--to", "good", "--path", "/work/src"]);
    }
    env.ok(&["snapshot", "ff", "after"]);
    env.ok(&["exec", "ff", "cat /work/src/a"]);
}

// An image's own links (`var/run -> /run`, as Debian images have, or one to /root) are
// never followed when a diff looks things up in the image.
on_both_drivers!(image_links_are_not_followed_by_diffs);
fn image_links_are_not_followed_by_diffs(env: TestEnv) {
    env.allow_everything();
    let host = HostDir::new(&env, "host-i");
    let rootfs = env.root.path().join("img");
    common::busybox_rootfs(&rootfs);
    std::fs::create_dir_all(rootfs.join("var")).unwrap();
    std::fs::create_dir_all(rootfs.join("work")).unwrap();
    std::os::unix::fs::symlink(&host.path, rootfs.join("var/run")).unwrap();
    std::os::unix::fs::symlink(&host.path, rootfs.join("hostroot")).unwrap();
    let tarball = env.root.path().join("img.tar.gz");
    common::tar_dir(&rootfs, &tarball);
    env.ok(&[
        "image",
        "import",
        tarball.to_str().unwrap(),
        "--name",
        "linky",
    ]);
    env.ok(&["create", "d1", "--image", "linky"]);
    env.ok(&[
        "exec",
        "-w",
        "/",
        "d1",
        "rm /var/run && mkdir /var/run && echo x > /var/run/secret",
    ]);
    for args in [vec!["diff", "d1"], vec!["diff", "d1", "--format", "json"]] {
        let out = env.sb(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("/var/run/secret"), "{text}");
        // Only the host's directory has src/ and precious: the diff never looks there.
        assert!(!text.contains("/var/run/src"), "{text}");
        assert!(!text.contains("precious"), "{text}");
    }
}
