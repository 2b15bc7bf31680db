//! The copy driver: volumes are plain directories on any filesystem; a snapshot is a full
//! copy (O(size)), with reflinks where the filesystem has them (XFS, btrfs), so copies share
//! extents until written. For hosts without btrfs.

use std::fs;
use std::io;
use std::path::Path;

use rustix::fs::{Mode, OFlags};

use super::{Capabilities, VolumeDriver};

/// Plain directories and copies.
#[derive(Debug, Clone)]
pub struct CopyDriver {
    reflinks: bool,
}

impl CopyDriver {
    /// The driver for a pool in directory `root` (which exists): finds out whether its
    /// filesystem clones files by reference.
    pub fn open(root: &Path) -> Self {
        Self {
            reflinks: probe_reflinks(root),
        }
    }
}

/// Whether files in `dir` can be cloned with `FICLONE`: clones one byte between two unnamed
/// temporary files (`O_TMPFILE`), so nothing is left behind.
fn probe_reflinks(dir: &Path) -> bool {
    let tmp = || {
        rustix::fs::open(
            dir,
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
    };
    let (Ok(src), Ok(dst)) = (tmp(), tmp()) else {
        return false;
    };
    rustix::io::write(&src, b"x").is_ok() && rustix::fs::ioctl_ficlone(&dst, &src).is_ok()
}

impl VolumeDriver for CopyDriver {
    fn name(&self) -> &'static str {
        "copy"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            instant_snapshots: false,
            atomic_snapshots: false,
            reflinks: self.reflinks,
            read_only_volumes: false,
            quotas: false,
        }
    }

    fn create_volume(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)
    }

    fn snapshot_volume(&self, src: &Path, dst: &Path, _read_only: bool) -> io::Result<()> {
        if fs::symlink_metadata(dst).is_ok() {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        // In-process and link-safe: the source is a tree a sandbox wrote.
        crate::tree::copy_tree(src, dst).inspect_err(|_| {
            if fs::symlink_metadata(dst).is_ok() {
                let _ = self.delete_volume(dst);
            }
        })
    }

    fn delete_volume(&self, path: &Path) -> io::Result<()> {
        // A tree a sandbox (or an archive) shaped: bounded stack and descriptors.
        crate::tree::remove_tree(path)
    }

    fn set_read_only(&self, _path: &Path, _read_only: bool) -> io::Result<()> {
        // Read-only by convention: nothing writes to image and snapshot volumes.
        Ok(())
    }

    fn volume_usage(&self, path: &Path) -> u64 {
        crate::tree::disk_usage(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn volumes_are_directories_and_snapshots_copies() {
        let t = tempfile::tempdir().unwrap();
        let d = CopyDriver::open(t.path());
        assert_eq!(d.name(), "copy");
        assert!(!d.capabilities().instant_snapshots);
        assert!(!d.capabilities().atomic_snapshots);
        let v = t.path().join("v");
        d.create_volume(&v).unwrap();
        assert!(fs::symlink_metadata(&v).unwrap().is_dir());
        assert!(d.create_volume(&v).is_err(), "an existing volume is kept");
        fs::create_dir(v.join("d")).unwrap();
        fs::write(v.join("d/f"), b"hello").unwrap();
        let s = t.path().join("s");
        d.snapshot_volume(&v, &s, true).unwrap();
        fs::write(v.join("d/f"), b"changed").unwrap();
        assert_eq!(fs::read(s.join("d/f")).unwrap(), b"hello");
        assert_eq!(d.volume_usage(&v), 7);
        // Read-only is a convention here: the flag changes nothing.
        d.set_read_only(&s, true).unwrap();
        fs::write(s.join("new"), b"x").unwrap();
        d.set_read_only(&s, false).unwrap();
        d.delete_volume(&s).unwrap();
        assert!(!s.exists());
    }

    #[test]
    fn a_failed_snapshot_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let d = CopyDriver::open(t.path());
        let (missing, dst) = (t.path().join("missing"), t.path().join("dst"));
        assert!(d.snapshot_volume(&missing, &dst, false).is_err());
        assert!(fs::symlink_metadata(&dst).is_err());
        // A source that is a link to a directory is refused, not followed.
        let real = t.path().join("real");
        fs::create_dir(&real).unwrap();
        symlink(&real, t.path().join("link")).unwrap();
        assert!(
            d.snapshot_volume(&t.path().join("link"), &dst, false)
                .is_err()
        );
        assert!(fs::symlink_metadata(&dst).is_err());
    }

    #[test]
    fn reflink_probe_matches_the_filesystem() {
        let t = tempfile::tempdir().unwrap();
        let d = CopyDriver::open(t.path());
        // The probe leaves nothing behind, whatever it found.
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0);
        let on_btrfs = super::super::btrfs::ioctl::is_btrfs(t.path());
        if on_btrfs {
            assert!(d.capabilities().reflinks);
        }
        // tmpfs and ext4 have no reflinks.
        let fs_type = nix::sys::statfs::statfs(t.path())
            .unwrap()
            .filesystem_type();
        if fs_type == nix::sys::statfs::TMPFS_MAGIC || fs_type == nix::sys::statfs::EXT4_SUPER_MAGIC
        {
            assert!(!d.capabilities().reflinks);
        }
    }
}
