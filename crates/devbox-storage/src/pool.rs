use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::btrfs;

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

/// Which driver a pool uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// btrfs subvolumes and snapshots.
    Btrfs,
    /// Plain directories and copies.
    Copy,
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
    /// Driver in use.
    pub driver: Driver,
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

/// A storage pool.
#[derive(Debug, Clone)]
pub struct Pool {
    root: PathBuf,
    driver: Driver,
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

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        op,
        path: path.to_path_buf(),
        source,
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

impl Pool {
    /// Opens (and on first use creates) a pool. For a loop file, `mountpoint` is where it is
    /// mounted; for directories the directory itself is the pool.
    pub fn open(source: &PoolSource, mountpoint: &Path) -> Result<Self, StorageError> {
        let pool = match source {
            PoolSource::LoopFile { image, size } => {
                fs::create_dir_all(mountpoint).map_err(io_err("create", mountpoint))?;
                if !is_mountpoint(mountpoint) {
                    if !image.exists() {
                        Self::format_loop_file(image, *size)?;
                    }
                    run(
                        Command::new("mount")
                            .args(["-t", "btrfs", "-o", "loop,nosuid,nodev,noatime"])
                            .arg(image)
                            .arg(mountpoint),
                        mountpoint,
                    )?;
                }
                if !btrfs::is_btrfs(mountpoint) {
                    return Err(StorageError::Setup {
                        path: mountpoint.to_path_buf(),
                        message:
                            "something other than the pool's btrfs is mounted here; unmount it"
                                .into(),
                    });
                }
                Pool {
                    root: mountpoint.to_path_buf(),
                    driver: Driver::Btrfs,
                    loop_file: Some(image.clone()),
                }
            }
            PoolSource::Btrfs(dir) => {
                fs::create_dir_all(dir).map_err(io_err("create", dir))?;
                if !btrfs::is_btrfs(dir) {
                    return Err(StorageError::Setup {
                        path: dir.clone(),
                        message: "not on a btrfs filesystem; name a btrfs directory, or use the copy driver".into(),
                    });
                }
                Pool {
                    root: dir.clone(),
                    driver: Driver::Btrfs,
                    loop_file: None,
                }
            }
            PoolSource::Directory(dir) => {
                fs::create_dir_all(dir).map_err(io_err("create", dir))?;
                Pool {
                    root: dir.clone(),
                    driver: Driver::Copy,
                    loop_file: None,
                }
            }
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

    /// Unmounts a loop-file pool (its loop device is released). Used at uninstall and in tests.
    pub fn unmount(&self) -> Result<(), StorageError> {
        if self.loop_file.is_some() && is_mountpoint(&self.root) {
            nix::mount::umount2(&self.root, nix::mount::MntFlags::empty())
                .map_err(|e| io_err("unmount", &self.root)(e.into()))?;
        }
        Ok(())
    }

    /// The pool's driver.
    pub fn driver(&self) -> Driver {
        self.driver
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
        if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
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
        matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
    }

    /// Makes an empty volume.
    pub fn create_volume(&self, path: &Path) -> Result<(), StorageError> {
        let r = match self.driver {
            Driver::Btrfs => btrfs::create_subvolume(path),
            Driver::Copy => fs::create_dir(path),
        };
        r.map_err(|e| self.map_err("create volume", path, e))
    }

    /// Snapshots volume `src` into a new volume `dst`.
    pub fn snapshot(&self, src: &Path, dst: &Path, readonly: bool) -> Result<(), StorageError> {
        match self.driver {
            Driver::Btrfs => {
                btrfs::snapshot(src, dst, readonly).map_err(|e| self.map_err("snapshot", dst, e))
            }
            Driver::Copy => {
                // In-process and link-safe: the source is a tree a sandbox wrote.
                if let Err(e) = crate::tree::copy_tree(src, dst) {
                    let _ = self.delete_volume(dst);
                    return Err(self.map_err("copy", dst, e));
                }
                Ok(())
            }
        }
    }

    /// Deletes a volume and everything in it. Deleting a missing volume succeeds.
    pub fn delete_volume(&self, path: &Path) -> Result<(), StorageError> {
        if fs::symlink_metadata(path).is_err() {
            return Ok(());
        }
        if self.driver == Driver::Btrfs && btrfs::is_subvolume(path) {
            match btrfs::delete_subvolume(path) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(e) => return Err(self.map_err("delete volume", path, e)),
            }
        }
        fs::remove_dir_all(path).map_err(|e| self.map_err("delete", path, e))
    }

    /// Marks a volume read-only (btrfs) so nothing can change it by accident.
    pub fn set_readonly(&self, path: &Path, readonly: bool) -> Result<(), StorageError> {
        if self.driver == Driver::Btrfs {
            btrfs::set_readonly(path, readonly)
                .map_err(|e| self.map_err("set read-only", path, e))?;
        }
        Ok(())
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
            driver: self.driver,
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
        assert_eq!(pool.driver(), Driver::Copy);
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
        if btrfs::is_btrfs(tmp.path()) {
            return;
        }
        let e = Pool::open(&PoolSource::Btrfs(tmp.path().to_path_buf()), tmp.path()).unwrap_err();
        assert!(e.to_string().contains("not on a btrfs"), "{e}");
    }
}
