use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::drivers::btrfs::{self, BtrfsDriver};
use crate::drivers::{CopyDriver, VolumeDriver};

/// Errors of pool operations.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The pool has no room left.
    #[error(
        "the storage pool is full ({used} of {total} bytes used): free space with `sandbox destroy` or `sandbox snapshot rm`, or make a larger pool"
    )]
    Full {
        /// Bytes used.
        used: u64,
        /// Pool size in bytes.
        total: u64,
    },
    /// Setting the pool up failed.
    #[error("setting up the storage pool at {path}: {message}")]
    Setup {
        /// The pool path.
        path: PathBuf,
        /// What went wrong and what to do.
        message: String,
    },
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// Where a pool comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolSource {
    /// A sparse file of `size` bytes, formatted as btrfs and loop-mounted on the pool path.
    LoopFile {
        /// The image file.
        image: PathBuf,
        /// Its size in bytes when created.
        size: u64,
    },
    /// An existing directory on a btrfs filesystem.
    Btrfs(PathBuf),
    /// An existing directory on any filesystem (copy driver).
    Directory(PathBuf),
}

/// What `sandbox pool info` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// Driver in use (`btrfs`, `copy`).
    pub driver: String,
    /// Pool directory.
    pub path: String,
    /// Backing loop file, if any.
    pub loop_file: Option<String>,
    /// Filesystem size in bytes.
    pub total_bytes: u64,
    /// Bytes used.
    pub used_bytes: u64,
    /// Bytes available.
    pub free_bytes: u64,
}

/// A storage pool: a directory with its layout, and the driver that makes its volumes.
#[derive(Debug, Clone)]
pub struct Pool {
    root: PathBuf,
    driver: Arc<dyn VolumeDriver>,
    loop_file: Option<PathBuf>,
}

/// Default size of a new loop-file pool: a fifth of the free space of the filesystem that
/// holds it, between 4 GiB and 100 GiB (the file is sparse: it takes only what is written).
pub fn default_loop_size(dir: &Path) -> u64 {
    let free = nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(0);
    (free / 5).clamp(4 << 30, 100 << 30)
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl Pool {
    /// Opens (and on first use creates) a pool. For a loop file, `mountpoint` is where it is
    /// mounted; for directories the directory itself is the pool.
    pub fn open(source: &PoolSource, mountpoint: &Path) -> Result<Self, StorageError> {
        let (root, driver, loop_file): (_, Arc<dyn VolumeDriver>, _) = match source {
            PoolSource::LoopFile { image, size } => {
                btrfs::mount_loop_file(image, *size, mountpoint)?;
                let driver = BtrfsDriver::open(mountpoint)?;
                (mountpoint, Arc::new(driver), Some(image.clone()))
            }
            PoolSource::Btrfs(dir) => {
                fs::create_dir_all(dir).map_err(io_err("create", dir))?;
                (dir.as_path(), Arc::new(BtrfsDriver::open(dir)?), None)
            }
            PoolSource::Directory(dir) => {
                fs::create_dir_all(dir).map_err(io_err("create", dir))?;
                (dir.as_path(), Arc::new(CopyDriver::open(dir)), None)
            }
        };
        let mut pool = Self::with_driver(root, driver)?;
        pool.loop_file = loop_file;
        Ok(pool)
    }

    /// A pool in directory `root` (which exists) whose volumes `driver` makes: sets up the
    /// layout.
    pub fn with_driver(root: &Path, driver: Arc<dyn VolumeDriver>) -> Result<Self, StorageError> {
        let pool = Pool {
            root: root.to_path_buf(),
            driver,
            loop_file: None,
        };
        fs::set_permissions(&pool.root, fs::Permissions::from_mode(0o711))
            .map_err(io_err("chmod", &pool.root))?;
        for d in ["images", "sandboxes", "snapshots", "staging"] {
            let p = pool.root.join(d);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700))
                .map_err(io_err("chmod", &p))?;
        }
        Ok(pool)
    }

    /// Unmounts a loop-file pool (its loop device is released). Used at uninstall and in tests.
    pub fn unmount(&self) -> Result<(), StorageError> {
        if self.loop_file.is_some() {
            btrfs::unmount_loop_file(&self.root)?;
        }
        Ok(())
    }

    /// The pool's driver.
    pub fn driver(&self) -> &dyn VolumeDriver {
        &*self.driver
    }

    /// The pool directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of image volumes.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Directory of sandbox volumes.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// Directory of snapshot volumes.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Scratch space on the pool's filesystem (for imports).
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    fn map_err(&self, op: &'static str, path: &Path, e: io::Error) -> StorageError {
        if self.driver.is_full(&e) {
            return self.full();
        }
        StorageError::Io {
            op,
            path: path.to_path_buf(),
            source: e,
        }
    }

    /// The error for a full pool, with current figures.
    pub fn full(&self) -> StorageError {
        let info = self.info();
        StorageError::Full {
            used: info.used_bytes,
            total: info.total_bytes,
        }
    }

    /// Whether an I/O error means the pool is full.
    pub fn is_full_error(e: &io::Error) -> bool {
        crate::drivers::is_no_space(e)
    }

    /// Makes an empty volume.
    pub fn create_volume(&self, path: &Path) -> Result<(), StorageError> {
        self.driver
            .create_volume(path)
            .map_err(|e| self.map_err("create volume", path, e))
    }

    /// Snapshots volume `src` into a new volume `dst`.
    pub fn snapshot(&self, src: &Path, dst: &Path, readonly: bool) -> Result<(), StorageError> {
        self.driver
            .snapshot_volume(src, dst, readonly)
            .map_err(|e| self.map_err("snapshot", dst, e))
    }

    /// Deletes a volume and everything in it. Deleting a missing volume succeeds.
    pub fn delete_volume(&self, path: &Path) -> Result<(), StorageError> {
        if fs::symlink_metadata(path).is_err() {
            return Ok(());
        }
        self.driver
            .delete_volume(path)
            .map_err(|e| self.map_err("delete volume", path, e))
    }

    /// Marks a volume read-only (where the driver can) so nothing can change it by accident.
    pub fn set_readonly(&self, path: &Path, readonly: bool) -> Result<(), StorageError> {
        self.driver
            .set_read_only(path, readonly)
            .map_err(|e| self.map_err("set read-only", path, e))
    }

    /// Caps the bytes a volume may hold (`None`: lifts the cap); see
    /// [`VolumeDriver::set_volume_limit`].
    pub fn set_volume_limit(&self, path: &Path, bytes: Option<u64>) -> Result<(), StorageError> {
        self.driver
            .set_volume_limit(path, bytes)
            .map_err(|source| StorageError::Io {
                op: "set the volume's quota on",
                path: path.to_path_buf(),
                source,
            })
    }

    /// A volume's quota and what it counts (see [`VolumeDriver::volume_quota`]).
    pub fn volume_quota(&self, path: &Path) -> Option<crate::VolumeQuota> {
        self.driver.volume_quota(path)
    }

    /// Bytes a volume's contents take (see [`VolumeDriver::volume_usage`]).
    pub fn volume_usage(&self, path: &Path) -> u64 {
        self.driver.volume_usage(path)
    }

    /// Size and use of the pool's filesystem.
    pub fn info(&self) -> PoolInfo {
        let (total, free, used) = match nix::sys::statvfs::statvfs(&self.root) {
            Ok(s) => {
                let f = s.fragment_size();
                let total = s.blocks() * f;
                let free = s.blocks_available() * f;
                (total, free, total.saturating_sub(s.blocks_free() * f))
            }
            Err(_) => (0, 0, 0),
        };
        PoolInfo {
            driver: self.driver.name().to_string(),
            path: self.root.display().to_string(),
            loop_file: self.loop_file.as_ref().map(|p| p.display().to_string()),
            total_bytes: total,
            used_bytes: used,
            free_bytes: free,
        }
    }
}

/// Bytes used by the files under `path` (apparent sizes; hard links counted once), never
/// following a link: see [`crate::tree::disk_usage`].
pub fn disk_usage(path: &Path) -> u64 {
    crate::tree::disk_usage(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_driver_volumes_and_snapshots() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = Pool::open(
            &PoolSource::Directory(tmp.path().join("pool")),
            Path::new("/nonexistent"),
        )
        .unwrap();
        assert_eq!(pool.driver().name(), "copy");
        assert_eq!(pool.info().driver, "copy");
        let v = pool.sandboxes_dir().join("a");
        pool.create_volume(&v).unwrap();
        fs::write(v.join("f"), b"hello").unwrap();
        let s = pool.snapshots_dir().join("a1");
        pool.snapshot(&v, &s, true).unwrap();
        fs::write(v.join("f"), b"changed").unwrap();
        assert_eq!(fs::read(s.join("f")).unwrap(), b"hello");
        assert_eq!(disk_usage(&v), 7);
        pool.delete_volume(&s).unwrap();
        pool.delete_volume(&s).unwrap();
        assert!(!s.exists());
        assert!(pool.info().total_bytes > 0);
    }

    #[test]
    fn btrfs_source_refuses_other_filesystems() {
        let tmp = tempfile::tempdir().unwrap();
        if btrfs::ioctl::is_btrfs(tmp.path()) {
            return;
        }
        let e = Pool::open(&PoolSource::Btrfs(tmp.path().to_path_buf()), tmp.path()).unwrap_err();
        assert!(e.to_string().contains("not on a btrfs"), "{e}");
    }

    #[test]
    fn no_space_errors_become_the_full_pool_error() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = Pool::open(
            &PoolSource::Directory(tmp.path().join("pool")),
            Path::new("/nonexistent"),
        )
        .unwrap();
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = pool.map_err("x", tmp.path(), io::Error::from_raw_os_error(errno));
            assert!(
                matches!(e, StorageError::Full { total, .. } if total > 0),
                "{e}"
            );
            assert!(e.to_string().contains("storage pool is full"), "{e}");
            assert!(Pool::is_full_error(&io::Error::from_raw_os_error(errno)));
        }
        let e = pool.map_err("x", tmp.path(), io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(e, StorageError::Io { op: "x", .. }), "{e}");
        assert!(!Pool::is_full_error(&io::Error::from_raw_os_error(
            libc::EIO
        )));
    }

    #[test]
    fn loop_file_pool_is_made_once_and_shows_as_btrfs() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: a btrfs loop file needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let source = PoolSource::LoopFile {
            image: tmp.path().join("state/pool.img"),
            size: 256 << 20,
        };
        let mnt = tmp.path().join("state/pool");
        let pool = match Pool::open(&source, &mnt) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("SKIPPED: no btrfs loop file here: {e}");
                return;
            }
        };
        let info = pool.info();
        assert_eq!(
            (info.driver.as_str(), pool.driver().name()),
            ("btrfs", "btrfs")
        );
        assert_eq!(
            info.loop_file.as_deref(),
            Some(tmp.path().join("state/pool.img").to_str().unwrap())
        );
        assert!(info.total_bytes > 0 && info.free_bytes <= info.total_bytes);
        // Opening again (a daemon restart) finds it mounted and keeps what is there.
        let v = pool.sandboxes_dir().join("a");
        pool.create_volume(&v).unwrap();
        let again = Pool::open(&source, &mnt).unwrap();
        assert!(again.sandboxes_dir().join("a").is_dir());
        pool.unmount().unwrap();
        assert!(!v.exists());
        // And after an unmount (a reboot), mounts the same file again.
        let again = Pool::open(&source, &mnt).unwrap();
        assert!(again.sandboxes_dir().join("a").is_dir());
        again.unmount().unwrap();
    }
}
