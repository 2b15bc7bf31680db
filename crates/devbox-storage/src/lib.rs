//! Storage pools: where sandboxes' writable layers, images and snapshots live.
//!
//! A [`Pool`] is a directory tree on one filesystem with the layout `images/<id>`,
//! `sandboxes/<id>`, `snapshots/<sandbox>/<snapshot>`, `staging/`; its volumes are made by a
//! [`VolumeDriver`] (see [`drivers`]):
//!
//! - **btrfs** (default): every volume is a subvolume; a snapshot is a copy-on-write
//!   subvolume snapshot, O(1) whatever the size. The pool is an existing btrfs directory, or
//!   a sparse loop file formatted and mounted on first use (see [`PoolSource`]).
//! - **copy**: plain directories on any filesystem; a snapshot is a full copy (with reflinks
//!   where the filesystem has them), O(size). For hosts without btrfs.

pub mod drivers;
pub mod layers;
mod pool;
pub mod tree;

pub use drivers::{Capabilities, VolumeDriver, VolumeQuota};
pub use pool::{Pool, PoolInfo, PoolSource, StorageError, default_loop_size, disk_usage};
