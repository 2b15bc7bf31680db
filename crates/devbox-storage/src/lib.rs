//! Storage pools: where sandboxes' writable layers, images and snapshots live.
//!
//! A [`Pool`] is a directory tree on one filesystem, driven by a [`Driver`]:
//!
//! - **btrfs** (default): every volume is a subvolume; a snapshot is a copy-on-write
//!   subvolume snapshot, O(1) whatever the size. The pool is an existing btrfs directory, or
//!   a sparse loop file formatted and mounted on first use (see [`PoolSource`]).
//! - **copy**: plain directories on any filesystem; a snapshot is a full copy (with reflinks
//!   where the filesystem has them), O(size). For hosts without btrfs.
//!
//! Layout: `images/<id>`, `sandboxes/<id>`, `snapshots/<sandbox>/<snapshot>`, `staging/`.

pub mod btrfs;
pub mod layers;
mod pool;
pub mod tree;

pub use pool::{Driver, Pool, PoolInfo, PoolSource, StorageError, default_loop_size, disk_usage};
