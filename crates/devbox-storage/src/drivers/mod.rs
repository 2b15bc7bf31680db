//! Volume drivers: how a pool makes, snapshots and deletes its volumes.
//!
//! A [`Pool`](crate::Pool) owns the layout (`images/`, `sandboxes/`, `snapshots/`,
//! `staging/`) and the pool-wide concerns (its size, the full-pool error); a
//! [`VolumeDriver`] owns what a volume is on disk and how it is copied. A volume is named by
//! its path in the pool; what the driver puts there is its own business (a btrfs subvolume, a
//! plain directory, later an image file).
//!
//! One family of files per driver: [`btrfs`] (subvolumes and snapshot ioctls, the loop-file
//! pool), [`copy`] (plain directories, copies with reflinks where the filesystem has them).
//!
//! To add a driver: a module here with a type implementing [`VolumeDriver`], a way to pick it
//! in [`Pool::open`](crate::Pool::open) (a [`PoolSource`](crate::PoolSource) variant), its unit
//! tests, and a line in `tests/volume_drivers.rs` so the driver-agnostic suite runs against it.

pub mod btrfs;
pub mod copy;

use std::fmt;
use std::io;
use std::path::Path;

pub use btrfs::BtrfsDriver;
pub use copy::CopyDriver;

/// What a driver can do, for callers that choose a strategy or refuse what it cannot do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// A snapshot costs O(1), whatever the volume's size (otherwise O(size): a copy).
    pub instant_snapshots: bool,
    /// A snapshot is taken in one step: once its volume exists it is whole. Without this, a
    /// snapshot interrupted by a crash can leave a partial volume behind.
    pub atomic_snapshots: bool,
    /// Files can be cloned by reference (`FICLONE`): copies share extents until written.
    pub reflinks: bool,
    /// [`VolumeDriver::set_read_only`] is enforced by the filesystem (otherwise it is a no-op
    /// and read-only volumes are read-only by convention only).
    pub read_only_volumes: bool,
    /// [`VolumeDriver::set_volume_limit`] caps what a volume may hold, enforced by the
    /// filesystem (writes beyond it fail with `EDQUOT`).
    pub quotas: bool,
}

/// A volume's space as its quota counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeQuota {
    /// Bytes the volume holds, as the quota counts them.
    pub used_bytes: u64,
    /// The limit, if one is set.
    pub limit_bytes: Option<u64>,
}

/// A way of storing volumes in a pool.
///
/// Paths given to a driver are inside the pool's directory, and their parent exists. The
/// trees inside volumes are written by sandboxes: a driver that walks them must do it with
/// [`crate::tree`] (fd-relative, never following links).
pub trait VolumeDriver: fmt::Debug + Send + Sync {
    /// The name `sandbox pool info` and `/v1/version` show (`btrfs`, `copy`).
    fn name(&self) -> &'static str;

    /// What this driver can do.
    fn capabilities(&self) -> Capabilities;

    /// Makes an empty, writable volume at `path`, which must not exist.
    fn create_volume(&self, path: &Path) -> io::Result<()>;

    /// Makes volume `dst` (which must not exist) with the contents of volume `src`,
    /// read-only if asked. On failure nothing is left at `dst`.
    fn snapshot_volume(&self, src: &Path, dst: &Path, read_only: bool) -> io::Result<()>;

    /// Deletes the volume at `path` (which exists) and everything in it, without following
    /// links inside. A directory at `path` that is not one of the driver's volumes (left by
    /// an interrupted operation) is deleted too.
    fn delete_volume(&self, path: &Path) -> io::Result<()>;

    /// Marks a volume read-only or writable again (see [`Capabilities::read_only_volumes`]).
    fn set_read_only(&self, path: &Path, read_only: bool) -> io::Result<()>;

    /// Bytes the volume's contents take (apparent sizes, hard links counted once, links never
    /// followed); 0 if it cannot be read.
    fn volume_usage(&self, path: &Path) -> u64;

    /// Caps the bytes volume `path` may hold (`None`: no cap but the pool's size). Only for
    /// drivers with [`Capabilities::quotas`]; the default refuses.
    fn set_volume_limit(&self, _path: &Path, _bytes: Option<u64>) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "the {} storage driver cannot limit a volume's size: use a btrfs pool",
                self.name()
            ),
        ))
    }

    /// What volume `path`'s quota counts (`None` without quotas).
    fn volume_quota(&self, _path: &Path) -> Option<VolumeQuota> {
        None
    }

    /// Whether an error of this driver means the pool has no room left.
    fn is_full(&self, e: &io::Error) -> bool {
        is_no_space(e)
    }
}

/// Whether an I/O error says the filesystem or a quota has no room left.
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}
