//! btrfs subvolume operations through the kernel's ioctls (no btrfs-progs at run time).
#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `BTRFS_SUPER_MAGIC` from statfs.
pub const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
const BTRFS_IOCTL_MAGIC: u8 = 0x94;
const BTRFS_SUBVOL_NAME_MAX: usize = 4039;
const BTRFS_PATH_NAME_MAX: usize = 4087;
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; BTRFS_PATH_NAME_MAX + 1],
}

#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; BTRFS_SUBVOL_NAME_MAX + 1],
}

#[allow(missing_docs)]
mod ioc {
    use super::{BTRFS_IOCTL_MAGIC, VolArgs, VolArgsV2};
    nix::ioctl_write_ptr!(subvol_create, BTRFS_IOCTL_MAGIC, 14, VolArgs);
    nix::ioctl_write_ptr!(snap_destroy, BTRFS_IOCTL_MAGIC, 15, VolArgs);
    nix::ioctl_write_ptr!(snap_create_v2, BTRFS_IOCTL_MAGIC, 23, VolArgsV2);
    nix::ioctl_read!(subvol_getflags, BTRFS_IOCTL_MAGIC, 25, u64);
    nix::ioctl_write_ptr!(subvol_setflags, BTRFS_IOCTL_MAGIC, 26, u64);
}

fn split(path: &Path) -> io::Result<(File, &OsStr)> {
    let parent = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no name"))?;
    if name.len() > BTRFS_SUBVOL_NAME_MAX {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    Ok((File::open(parent)?, name))
}

fn copy_name(dst: &mut [u8], name: &OsStr) {
    dst[..name.len()].copy_from_slice(name.as_bytes());
}

/// Whether `path` lies on a btrfs filesystem.
pub fn is_btrfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BTRFS_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Creates an empty subvolume at `path`.
pub fn create_subvolume(path: &Path) -> io::Result<()> {
    let (dir, name) = split(path)?;
    let mut args = VolArgs {
        fd: 0,
        name: [0; BTRFS_PATH_NAME_MAX + 1],
    };
    copy_name(&mut args.name, name);
    // SAFETY: `dir` is an open directory and `args` a correctly laid out btrfs_ioctl_vol_args
    // with a NUL-terminated name; the kernel reads it during the call only.
    unsafe { ioc::subvol_create(dir.as_raw_fd(), &args) }?;
    Ok(())
}

/// Snapshots subvolume `src` to `dst` (read-only if asked). O(1): only metadata is written.
pub fn snapshot(src: &Path, dst: &Path, readonly: bool) -> io::Result<()> {
    let source = File::open(src)?;
    let (dir, name) = split(dst)?;
    let mut args = VolArgsV2 {
        fd: source.as_raw_fd() as i64,
        transid: 0,
        flags: if readonly { BTRFS_SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; BTRFS_SUBVOL_NAME_MAX + 1],
    };
    copy_name(&mut args.name, name);
    // SAFETY: `dir` is an open directory, `args` a correctly laid out btrfs_ioctl_vol_args_v2
    // naming an open source subvolume fd; the kernel reads it during the call only.
    unsafe { ioc::snap_create_v2(dir.as_raw_fd(), &args) }?;
    Ok(())
}

/// Deletes subvolume `path` (it must hold no other subvolume).
pub fn delete_subvolume(path: &Path) -> io::Result<()> {
    let (dir, name) = split(path)?;
    let mut args = VolArgs {
        fd: 0,
        name: [0; BTRFS_PATH_NAME_MAX + 1],
    };
    copy_name(&mut args.name, name);
    // SAFETY: as in create_subvolume.
    unsafe { ioc::snap_destroy(dir.as_raw_fd(), &args) }?;
    Ok(())
}

/// Sets or clears the read-only flag of subvolume `path`.
pub fn set_readonly(path: &Path, readonly: bool) -> io::Result<()> {
    let f = File::open(path)?;
    let mut flags: u64 = 0;
    // SAFETY: GETFLAGS writes one u64 into `flags`, which outlives the call.
    unsafe { ioc::subvol_getflags(f.as_raw_fd(), &mut flags) }?;
    flags = if readonly {
        flags | BTRFS_SUBVOL_RDONLY
    } else {
        flags & !BTRFS_SUBVOL_RDONLY
    };
    // SAFETY: SETFLAGS reads one u64 from `flags`.
    unsafe { ioc::subvol_setflags(f.as_raw_fd(), &flags) }?;
    Ok(())
}

/// Whether `path` is the root of a subvolume (btrfs gives subvolume roots inode 256).
pub fn is_subvolume(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    is_btrfs(path)
        && std::fs::symlink_metadata(path)
            .map(|m| m.ino() == 256 && m.is_dir())
            .unwrap_or(false)
}
