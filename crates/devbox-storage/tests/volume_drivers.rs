//! The driver-agnostic suite: what the engine relies on from every volume driver, run through
//! the pool against each driver this host can make (btrfs needs root and btrfs-progs for its
//! loop file). A new driver adds a test at the bottom.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use devbox_storage::{Pool, PoolSource, StorageError};

/// What a tree holds, by relative path: kind, mode, size, link target, and which inode group
/// (hard links) each file belongs to.
fn listing(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, usize> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(root.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        entries.sort();
        for name in entries {
            let rel = rel.join(name);
            let m = fs::symlink_metadata(root.join(&rel)).unwrap();
            let desc = if m.file_type().is_symlink() {
                format!("link {}", fs::read_link(root.join(&rel)).unwrap().display())
            } else if m.is_dir() {
                stack.push(rel.clone());
                format!("dir {:o}", m.mode() & 0o7777)
            } else {
                let n = inodes.len();
                let group = *inodes.entry(m.ino()).or_insert(n);
                format!(
                    "file {:o} {} {} #{group}",
                    m.mode() & 0o7777,
                    m.len(),
                    String::from_utf8_lossy(&fs::read(root.join(&rel)).unwrap())
                )
            };
            out.insert(rel, desc);
        }
    }
    out
}

fn is_read_only_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EPERM))
}

/// Everything the engine asks of a driver, through the pool.
fn suite(pool: &Pool, host: &Path) {
    let d = pool.driver();
    let caps = d.capabilities();
    assert_eq!(pool.info().driver, d.name());
    assert!(d.is_full(&io::Error::from_raw_os_error(libc::ENOSPC)));
    assert!(!d.is_full(&io::Error::from_raw_os_error(libc::EIO)));

    // A host directory a sandbox's links point at: nothing may read or change it.
    fs::create_dir_all(host).unwrap();
    fs::write(host.join("precious"), "host").unwrap();

    // An empty, writable volume; making it twice fails without touching it.
    let v = pool.sandboxes_dir().join("a");
    pool.create_volume(&v).unwrap();
    assert!(fs::symlink_metadata(&v).unwrap().is_dir());
    assert_eq!(fs::read_dir(&v).unwrap().count(), 0);
    fs::create_dir_all(v.join("upper/work/src")).unwrap();
    fs::create_dir(v.join("work")).unwrap();
    fs::write(v.join("upper/work/src/main.rs"), "fn main() {}").unwrap();
    fs::set_permissions(
        v.join("upper/work/src/main.rs"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    fs::hard_link(v.join("upper/work/src/main.rs"), v.join("upper/hard")).unwrap();
    symlink(host, v.join("upper/out")).unwrap();
    symlink(host.join("precious"), v.join("upper/precious")).unwrap();
    let e = pool.create_volume(&v).unwrap_err();
    assert!(matches!(e, StorageError::Io { .. }), "{e}");
    assert!(v.join("upper/hard").exists());

    // A read-only snapshot has the same tree, links as links, and keeps it when the volume
    // changes.
    let snaps = pool.snapshots_dir().join("a");
    fs::create_dir(&snaps).unwrap();
    let s1 = snaps.join("s1");
    let before = listing(&v);
    pool.snapshot(&v, &s1, true).unwrap();
    assert_eq!(listing(&s1), before);
    fs::write(v.join("upper/work/src/main.rs"), "changed").unwrap();
    fs::remove_file(v.join("upper/out")).unwrap();
    fs::write(v.join("upper/new"), "new").unwrap();
    assert_eq!(listing(&s1), before);
    if caps.read_only_volumes {
        let e = fs::write(s1.join("upper/x"), "x").unwrap_err();
        assert!(is_read_only_error(&e), "{e}");
    }

    // A writable snapshot of the read-only one (a rollback or a clone): independent of both.
    let r = pool.sandboxes_dir().join("a.new");
    pool.snapshot(&s1, &r, false).unwrap();
    assert_eq!(listing(&r), before);
    fs::write(r.join("upper/work/src/main.rs"), "rolled back").unwrap();
    fs::remove_file(r.join("upper/hard")).unwrap();
    assert_eq!(listing(&s1), before);
    assert_eq!(
        fs::read_to_string(v.join("upper/work/src/main.rs")).unwrap(),
        "changed"
    );

    // Snapshots never replace what exists, and a failed one leaves nothing.
    assert!(pool.snapshot(&v, &s1, true).is_err());
    assert_eq!(listing(&s1), before);
    let missing = pool.sandboxes_dir().join("missing");
    let s2 = snaps.join("s2");
    assert!(pool.snapshot(&missing, &s2, true).is_err());
    assert!(fs::symlink_metadata(&s2).is_err());

    // Read-only on and off (a no-op where the driver cannot enforce it).
    pool.set_readonly(&r, true).unwrap();
    if caps.read_only_volumes {
        let e = fs::write(r.join("upper/y"), "y").unwrap_err();
        assert!(is_read_only_error(&e), "{e}");
    }
    pool.set_readonly(&r, false).unwrap();
    fs::write(r.join("upper/y"), "y").unwrap();

    // Usage counts the volume's own bytes: apparent sizes, hard links once, links by their
    // target's length, never what they point at.
    let u = pool.images_dir().join("u");
    pool.create_volume(&u).unwrap();
    fs::write(u.join("a"), vec![1u8; 1000]).unwrap();
    fs::create_dir(u.join("d")).unwrap();
    fs::write(u.join("d/b"), vec![2u8; 24]).unwrap();
    fs::hard_link(u.join("a"), u.join("d/a")).unwrap();
    symlink(host, u.join("out")).unwrap();
    let host_len = host.as_os_str().len() as u64;
    assert_eq!(pool.volume_usage(&u), 1024 + host_len);
    let us = snaps.join("u");
    pool.snapshot(&u, &us, true).unwrap();
    assert_eq!(pool.volume_usage(&us), 1024 + host_len);

    // Deleting: read-only volumes once made writable (as the engine does), volumes holding
    // links to the host (never followed), missing volumes (no error), directories left in
    // the pool by an interrupted operation.
    for p in [&s1, &us] {
        pool.set_readonly(p, false).unwrap();
    }
    let stray = pool.staging_dir().join("stray");
    fs::create_dir_all(stray.join("rootfs/etc")).unwrap();
    for p in [&v, &r, &s1, &u, &us, &stray] {
        pool.delete_volume(p).unwrap();
        assert!(fs::symlink_metadata(p).is_err(), "{}", p.display());
        pool.delete_volume(p).unwrap();
    }
    assert_eq!(fs::read_to_string(host.join("precious")).unwrap(), "host");
    assert_eq!(fs::read_dir(host).unwrap().count(), 1);
    fs::remove_dir(&snaps).unwrap();

    // The layout is left as it was.
    for dir in [
        pool.images_dir(),
        pool.sandboxes_dir(),
        pool.snapshots_dir(),
        pool.staging_dir(),
    ] {
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "{}", dir.display());
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }
}

/// A btrfs loop-file pool in a temporary directory, unmounted when dropped.
struct LoopPool {
    pool: Pool,
    dir: tempfile::TempDir,
}

impl LoopPool {
    fn new() -> Option<Self> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: a btrfs loop file needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let source = PoolSource::LoopFile {
            image: dir.path().join("pool.img"),
            size: 256 << 20,
        };
        match Pool::open(&source, &dir.path().join("pool")) {
            Ok(pool) => Some(Self { pool, dir }),
            Err(e) => {
                eprintln!("SKIPPED: no btrfs loop file here: {e}");
                None
            }
        }
    }
}

impl Drop for LoopPool {
    fn drop(&mut self) {
        let _ = self.pool.unmount();
    }
}

#[test]
fn copy_driver() {
    let t = tempfile::tempdir().unwrap();
    let pool = Pool::open(
        &PoolSource::Directory(t.path().join("pool")),
        Path::new("/nonexistent"),
    )
    .unwrap();
    assert_eq!(pool.driver().name(), "copy");
    assert!(!pool.driver().capabilities().instant_snapshots);
    suite(&pool, &t.path().join("host"));
}

#[test]
fn btrfs_driver() {
    let Some(lp) = LoopPool::new() else { return };
    assert_eq!(lp.pool.driver().name(), "btrfs");
    suite(&lp.pool, &lp.dir.path().join("host"));
}

#[test]
fn btrfs_driver_on_a_btrfs_directory() {
    let Some(lp) = LoopPool::new() else { return };
    let pool = Pool::open(
        &PoolSource::Btrfs(lp.pool.root().join("nested")),
        Path::new("/nonexistent"),
    )
    .unwrap();
    assert_eq!(pool.info().loop_file, None);
    suite(&pool, &lp.dir.path().join("host"));
}

/// The copy driver on a filesystem with reflinks: copies share extents.
#[test]
fn copy_driver_with_reflinks() {
    let Some(lp) = LoopPool::new() else { return };
    let pool = Pool::open(
        &PoolSource::Directory(lp.pool.root().join("copy")),
        Path::new("/nonexistent"),
    )
    .unwrap();
    assert!(pool.driver().capabilities().reflinks);
    suite(&pool, &lp.dir.path().join("host"));

    let v = pool.sandboxes_dir().join("big");
    pool.create_volume(&v).unwrap();
    fs::write(v.join("f"), vec![9u8; 32 << 20]).unwrap();
    let root = fs::File::open(pool.root()).unwrap();
    let used = || {
        rustix::fs::syncfs(&root).unwrap();
        let s = rustix::fs::fstatvfs(&root).unwrap();
        (s.f_blocks - s.f_bfree) * s.f_frsize
    };
    let before = used();
    let s = pool.snapshots_dir().join("big");
    pool.snapshot(&v, &s, true).unwrap();
    assert!(
        used() < before + (8 << 20),
        "the copy shares the file's extents"
    );
    assert_eq!(fs::read(s.join("f")).unwrap().len(), 32 << 20);
}
