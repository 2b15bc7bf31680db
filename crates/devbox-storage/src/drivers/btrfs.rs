//! The btrfs driver: every volume is a subvolume; a snapshot is a copy-on-write subvolume
//! snapshot, O(1) whatever the size, and whole once it exists. The pool is an existing btrfs
//! directory, or a sparse loop file formatted and mounted on first use
//! ([`mount_loop_file`]). Subvolumes are made through the kernel's ioctls ([`ioctl`]); only
//! formatting a loop file runs btrfs-progs.

pub mod ioctl;

use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;

use super::{Capabilities, VolumeDriver};
use crate::pool::{StorageError, io_err};

/// btrfs subvolumes and snapshots.
#[derive(Debug, Clone)]
pub struct BtrfsDriver(std::sync::Arc<std::sync::Mutex<()>>);

impl BtrfsDriver {
    /// The driver for a pool in directory `dir`, which must be on a btrfs filesystem.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        if !ioctl::is_btrfs(dir) {
            return Err(StorageError::Setup {
                path: dir.to_path_buf(),
                message:
                    "not on a btrfs filesystem; name a btrfs directory, or use the copy driver"
                        .into(),
            });
        }
        Ok(Self(Default::default()))
    }
}

impl VolumeDriver for BtrfsDriver {
    fn name(&self) -> &'static str {
        "btrfs"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            instant_snapshots: true,
            atomic_snapshots: true,
            reflinks: true,
            read_only_volumes: true,
            quotas: true,
        }
    }

    fn create_volume(&self, path: &Path) -> io::Result<()> {
        ioctl::create_subvolume(path)
    }

    fn snapshot_volume(&self, src: &Path, dst: &Path, read_only: bool) -> io::Result<()> {
        ioctl::snapshot(src, dst, read_only)
    }

    fn delete_volume(&self, path: &Path) -> io::Result<()> {
        if ioctl::is_subvolume(path) {
            return match ioctl::delete_subvolume(path) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                r => r,
            };
        }
        // A tree a sandbox (or an archive) shaped: bounded stack and descriptors.
        crate::tree::remove_tree(path)
    }

    fn set_read_only(&self, path: &Path, read_only: bool) -> io::Result<()> {
        ioctl::set_readonly(path, read_only)
    }

    /// A qgroup limit on the bytes the subvolume references (`max_rfer` of qgroup `0/<id>`).
    /// Qgroups are turned on for the whole pool the first time a limit is set (a scan of
    /// what the pool holds then: once). Extents the volume shares with its snapshots count
    /// in full for it (they are what it references); snapshots have qgroups of their own,
    /// without limits, so they do not count against the volume's.
    fn set_volume_limit(&self, path: &Path, bytes: Option<u64>) -> io::Result<()> {
        match ioctl::set_qgroup_limit(path, bytes) {
            Err(e)
                if e.raw_os_error() == Some(libc::ENOTCONN)
                    || e.raw_os_error() == Some(libc::ENOENT) =>
            {
                if bytes.is_none() {
                    // Qgroups off: there is no limit to clear.
                    return Ok(());
                }
                let _one = self.0.lock().unwrap_or_else(|p| p.into_inner());
                ioctl::enable_quota(path)?;
                ioctl::set_qgroup_limit(path, bytes)
            }
            r => r,
        }
    }

    fn volume_quota(&self, path: &Path) -> Option<super::VolumeQuota> {
        let q = ioctl::qgroup_usage(path).ok().flatten()?;
        Some(super::VolumeQuota {
            used_bytes: q.referenced,
            limit_bytes: q.max_referenced,
        })
    }

    fn volume_usage(&self, path: &Path) -> u64 {
        // Apparent sizes: extents shared with snapshots are counted in each.
        crate::tree::disk_usage(path)
    }
}

fn is_mountpoint(path: &Path) -> bool {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    text.lines().any(|l| l.split(' ').nth(4) == Some(&want))
}

fn run(cmd: &mut Command, path: &Path) -> Result<(), StorageError> {
    let out = cmd.output().map_err(|e| StorageError::Setup {
        path: path.to_path_buf(),
        message: format!(
            "cannot run {:?}: {e} (install btrfs-progs and util-linux)",
            cmd.get_program()
        ),
    })?;
    if !out.status.success() {
        return Err(StorageError::Setup {
            path: path.to_path_buf(),
            message: format!(
                "{:?} failed: {}",
                cmd.get_program(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Mounts loop file `image` (formatted as btrfs first, `size` bytes, if it does not exist)
/// on `mountpoint`, unless it is mounted there already.
pub fn mount_loop_file(image: &Path, size: u64, mountpoint: &Path) -> Result<(), StorageError> {
    fs::create_dir_all(mountpoint).map_err(io_err("create", mountpoint))?;
    if !is_mountpoint(mountpoint) {
        if !image.exists() {
            format_loop_file(image, size)?;
        }
        run(
            Command::new("mount")
                .args(["-t", "btrfs", "-o", "loop,nosuid,nodev,noatime"])
                .arg(image)
                .arg(mountpoint),
            mountpoint,
        )?;
    }
    if !ioctl::is_btrfs(mountpoint) {
        return Err(StorageError::Setup {
            path: mountpoint.to_path_buf(),
            message: "something other than the pool's btrfs is mounted here; unmount it".into(),
        });
    }
    Ok(())
}

fn format_loop_file(image: &Path, size: u64) -> Result<(), StorageError> {
    if let Some(dir) = image.parent() {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    let tmp = image.with_extension("img.new");
    let f = fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.set_len(size).map_err(io_err("size", &tmp))?;
    drop(f);
    if let Err(e) = run(
        Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(&tmp),
        image,
    ) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, image).map_err(io_err("rename", image))?;
    Ok(())
}

/// Unmounts a loop-file pool mounted on `mountpoint` (its loop device is released).
pub fn unmount_loop_file(mountpoint: &Path) -> Result<(), StorageError> {
    if is_mountpoint(mountpoint) {
        nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty())
            .map_err(|e| io_err("unmount", mountpoint)(e.into()))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    /// A btrfs loop file mounted in a temporary directory, unmounted when dropped; `None`
    /// (and a note) without root or btrfs-progs.
    pub(crate) struct LoopBtrfs {
        pub(crate) mnt: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl LoopBtrfs {
        pub(crate) fn new() -> Option<Self> {
            if !rustix::process::geteuid().is_root() {
                eprintln!("SKIPPED: a btrfs loop file needs root");
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let mnt = dir.path().join("mnt");
            if let Err(e) = mount_loop_file(&dir.path().join("pool.img"), 256 << 20, &mnt) {
                eprintln!("SKIPPED: no btrfs loop file here: {e}");
                return None;
            }
            Some(Self { mnt, _dir: dir })
        }
    }

    impl Drop for LoopBtrfs {
        fn drop(&mut self) {
            let _ = unmount_loop_file(&self.mnt);
        }
    }

    #[test]
    fn refuses_other_filesystems() {
        let t = tempfile::tempdir().unwrap();
        if ioctl::is_btrfs(t.path()) {
            return;
        }
        let e = BtrfsDriver::open(t.path()).unwrap_err();
        assert!(e.to_string().contains("not on a btrfs"), "{e}");
    }

    #[test]
    fn volumes_are_subvolumes_and_snapshots_are_read_only() {
        let Some(lb) = LoopBtrfs::new() else { return };
        let d = BtrfsDriver::open(&lb.mnt).unwrap();
        assert_eq!(d.name(), "btrfs");
        assert!(d.capabilities().instant_snapshots && d.capabilities().atomic_snapshots);
        let v = lb.mnt.join("v");
        d.create_volume(&v).unwrap();
        assert!(ioctl::is_subvolume(&v));
        assert_eq!(fs::metadata(&v).unwrap().ino(), 256);
        fs::write(v.join("f"), b"hello").unwrap();
        let s = lb.mnt.join("s");
        d.snapshot_volume(&v, &s, true).unwrap();
        assert!(ioctl::is_subvolume(&s));
        let e = fs::write(s.join("f"), b"no").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        // A writable snapshot of the read-only one: a rollback's new volume.
        let w = lb.mnt.join("w");
        d.snapshot_volume(&s, &w, false).unwrap();
        fs::write(w.join("f"), b"rolled").unwrap();
        assert_eq!(fs::read(s.join("f")).unwrap(), b"hello");
        // Read-only flag on and off.
        d.set_read_only(&w, true).unwrap();
        assert!(fs::write(w.join("g"), b"x").is_err());
        d.set_read_only(&w, false).unwrap();
        fs::write(w.join("g"), b"x").unwrap();
        // A read-only subvolume is deleted once made writable (as the engine does).
        d.set_read_only(&s, false).unwrap();
        for p in [&v, &s, &w] {
            d.delete_volume(p).unwrap();
            assert!(fs::symlink_metadata(p).is_err());
        }
        // A plain directory left in the pool (not a subvolume) goes too.
        let plain = lb.mnt.join("plain");
        fs::create_dir_all(plain.join("a/b")).unwrap();
        fs::set_permissions(plain.join("a"), fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!ioctl::is_subvolume(&plain));
        d.delete_volume(&plain).unwrap();
        assert!(!plain.exists());
    }

    #[test]
    fn snapshots_are_instant() {
        let Some(lb) = LoopBtrfs::new() else { return };
        let d = BtrfsDriver::open(&lb.mnt).unwrap();
        let v = lb.mnt.join("v");
        d.create_volume(&v).unwrap();
        fs::write(v.join("big"), vec![7u8; 64 << 20]).unwrap();
        let sync = || rustix::fs::syncfs(fs::File::open(&lb.mnt).unwrap()).unwrap();
        sync();
        let before = nix::sys::statvfs::statvfs(&lb.mnt).unwrap();
        for i in 0..20 {
            d.snapshot_volume(&v, &lb.mnt.join(format!("s{i}")), true)
                .unwrap();
        }
        sync();
        let after = nix::sys::statvfs::statvfs(&lb.mnt).unwrap();
        let used =
            |s: &nix::sys::statvfs::Statvfs| (s.blocks() - s.blocks_free()) * s.fragment_size();
        // 20 copies would take 1.25 GiB, more than the whole 256 MiB pool.
        assert!(
            used(&after) < used(&before) + (16 << 20),
            "{} -> {}",
            used(&before),
            used(&after)
        );
    }

    /// Writes `len` bytes into `path` in 1 MiB steps and syncs; the error that stopped it.
    fn fill(path: &Path, len: usize) -> io::Result<()> {
        use std::io::Write;
        let mut f = fs::File::create(path)?;
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..len.div_ceil(1 << 20) {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    }

    #[test]
    fn quotas_cap_a_volume_and_snapshots_do_not_count() {
        let Some(lb) = LoopBtrfs::new() else { return };
        let d = BtrfsDriver::open(&lb.mnt).unwrap();
        assert!(d.capabilities().quotas);
        let v = lb.mnt.join("v");
        d.create_volume(&v).unwrap();
        // Before any limit: no qgroups, nothing to show, clearing is a no-op.
        assert_eq!(d.volume_quota(&v), None);
        d.set_volume_limit(&v, None).unwrap();
        d.set_volume_limit(&v, Some(32 << 20)).unwrap();
        let q = d.volume_quota(&v).unwrap();
        assert_eq!(q.limit_bytes, Some(32 << 20));
        // Writing past the limit fails with EDQUOT; the pool has room to spare.
        let e = fill(&v.join("big"), 64 << 20).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EDQUOT), "{e}");
        fs::remove_file(v.join("big")).unwrap();
        rustix::fs::syncfs(fs::File::open(&v).unwrap()).unwrap();
        fill(&v.join("a"), 20 << 20).unwrap();
        // Hard links and reflinks of a file reference its extents once: no more room used,
        // and no way around the limit either.
        fs::hard_link(v.join("a"), v.join("a-link")).unwrap();
        for i in 0..4 {
            let src = fs::File::open(v.join("a")).unwrap();
            let dst = fs::File::create(v.join(format!("a-clone{i}"))).unwrap();
            rustix::fs::ioctl_ficlone(&dst, &src).unwrap();
        }
        rustix::fs::syncfs(fs::File::open(&v).unwrap()).unwrap();
        let used = d.volume_quota(&v).unwrap().used_bytes;
        assert!(used < 24 << 20, "{used}");
        let e = fill(&v.join("b"), 20 << 20).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EDQUOT), "{e}");
        let _ = fs::remove_file(v.join("b"));
        // A snapshot has a qgroup of its own; the kernel copies the volume's limit into it
        // (harmless: a read-only snapshot never grows). The data it shares with the volume
        // counts for each, so the snapshot takes nothing from the volume's room: once the
        // volume's files are gone, their extents are the snapshot's alone and the volume
        // has its whole limit again.
        let s = lb.mnt.join("s");
        d.snapshot_volume(&v, &s, true).unwrap();
        assert_eq!(d.volume_quota(&s).unwrap().limit_bytes, Some(32 << 20));
        for f in [
            "a", "a-link", "a-clone0", "a-clone1", "a-clone2", "a-clone3",
        ] {
            fs::remove_file(v.join(f)).unwrap();
        }
        rustix::fs::syncfs(fs::File::open(&v).unwrap()).unwrap();
        fill(&v.join("c"), 24 << 20).unwrap();
        // A writable snapshot (a rollback's new volume) starts with the snapshot's copy of
        // the limit; the engine sets the sandbox's current one before anything runs on it.
        let w = lb.mnt.join("w");
        d.snapshot_volume(&s, &w, false).unwrap();
        assert_eq!(d.volume_quota(&w).unwrap().limit_bytes, Some(32 << 20));
        d.set_volume_limit(&w, Some(64 << 20)).unwrap();
        assert_eq!(d.volume_quota(&w).unwrap().limit_bytes, Some(64 << 20));
        // Lifting the limit lets the volume grow again.
        d.set_volume_limit(&v, None).unwrap();
        assert_eq!(d.volume_quota(&v).unwrap().limit_bytes, None);
        fill(&v.join("d"), 24 << 20).unwrap();
        d.set_read_only(&s, false).unwrap();
        for p in [&v, &s, &w] {
            d.delete_volume(p).unwrap();
        }
    }

    #[test]
    fn copy_driver_refuses_quotas() {
        let t = tempfile::tempdir().unwrap();
        let d = super::super::CopyDriver::open(t.path());
        assert!(!d.capabilities().quotas);
        let e = d.set_volume_limit(t.path(), Some(1 << 30)).unwrap_err();
        assert!(e.to_string().contains("btrfs"), "{e}");
        assert_eq!(d.volume_quota(t.path()), None);
    }
}
