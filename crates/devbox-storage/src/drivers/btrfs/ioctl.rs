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

/// `struct btrfs_ioctl_quota_ctl_args`.
#[repr(C)]
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}

/// `struct btrfs_qgroup_limit`.
#[repr(C)]
#[derive(Default)]
struct QgroupLimit {
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

/// `struct btrfs_ioctl_qgroup_limit_args`.
#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    lim: QgroupLimit,
}

/// `struct btrfs_ioctl_ino_lookup_args`.
#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

/// `struct btrfs_ioctl_search_key`.
#[repr(C)]
#[derive(Default)]
struct SearchKey {
    tree_id: u64,
    min_objectid: u64,
    max_objectid: u64,
    min_offset: u64,
    max_offset: u64,
    min_transid: u64,
    max_transid: u64,
    min_type: u32,
    max_type: u32,
    nr_items: u32,
    unused: u32,
    unused1: u64,
    unused2: u64,
    unused3: u64,
    unused4: u64,
}

const SEARCH_BUF: usize = 4096 - std::mem::size_of::<SearchKey>();

/// `struct btrfs_ioctl_search_args`.
#[repr(C)]
struct SearchArgs {
    key: SearchKey,
    buf: [u8; SEARCH_BUF],
}

const BTRFS_QUOTA_CTL_ENABLE: u64 = 1;
const BTRFS_QGROUP_LIMIT_MAX_RFER: u64 = 1;
/// The value that clears a qgroup limit.
const BTRFS_QGROUP_CLEAR: u64 = u64::MAX;
const BTRFS_QUOTA_TREE_OBJECTID: u64 = 8;
const BTRFS_QGROUP_INFO_KEY: u32 = 242;
const BTRFS_QGROUP_LIMIT_KEY: u32 = 244;
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;

#[allow(missing_docs)]
mod ioc {
    use super::{
        BTRFS_IOCTL_MAGIC, InoLookupArgs, QgroupLimitArgs, QuotaCtlArgs, SearchArgs, VolArgs,
        VolArgsV2,
    };
    nix::ioctl_readwrite!(tree_search, BTRFS_IOCTL_MAGIC, 17, SearchArgs);
    nix::ioctl_readwrite!(ino_lookup, BTRFS_IOCTL_MAGIC, 18, InoLookupArgs);
    nix::ioctl_readwrite!(quota_ctl, BTRFS_IOCTL_MAGIC, 40, QuotaCtlArgs);
    // The kernel's header declares QGROUP_LIMIT as _IOR although the kernel reads the args.
    nix::ioctl_read!(qgroup_limit, BTRFS_IOCTL_MAGIC, 43, QgroupLimitArgs);
    nix::ioctl_none!(quota_rescan_wait, BTRFS_IOCTL_MAGIC, 46);
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

/// Turns qgroups on for the filesystem holding `path` and waits for the first scan of what
/// is already there (a no-op when they are on).
pub fn enable_quota(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    let mut args = QuotaCtlArgs {
        cmd: BTRFS_QUOTA_CTL_ENABLE,
        status: 0,
    };
    // SAFETY: `f` is an open file on the filesystem and `args` a correctly laid out
    // btrfs_ioctl_quota_ctl_args, which the kernel reads and writes during the call only.
    unsafe { ioc::quota_ctl(f.as_raw_fd(), &mut args) }?;
    // SAFETY: RESCAN_WAIT takes no argument.
    match unsafe { ioc::quota_rescan_wait(f.as_raw_fd()) } {
        Ok(_) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The id of the subvolume whose root is `path` (its tree id).
pub fn subvolume_id(path: &Path) -> io::Result<u64> {
    let f = File::open(path)?;
    let mut args = InoLookupArgs {
        treeid: 0,
        objectid: BTRFS_FIRST_FREE_OBJECTID,
        name: [0; 4080],
    };
    // SAFETY: `f` is an open file and `args` a correctly laid out btrfs_ioctl_ino_lookup_args;
    // the kernel fills `treeid` (and `name`) during the call only.
    unsafe { ioc::ino_lookup(f.as_raw_fd(), &mut args) }?;
    Ok(args.treeid)
}

/// Limits the bytes subvolume `path` references (its qgroup `0/<id>`), or clears the limit
/// (`None`). Fails with `ENOTCONN` while qgroups are off ([`enable_quota`]).
pub fn set_qgroup_limit(path: &Path, max_referenced: Option<u64>) -> io::Result<()> {
    let f = File::open(path)?;
    let mut args = QgroupLimitArgs {
        // 0: the qgroup of the subvolume `f` is on.
        qgroupid: 0,
        lim: QgroupLimit {
            flags: BTRFS_QGROUP_LIMIT_MAX_RFER,
            max_rfer: max_referenced.unwrap_or(BTRFS_QGROUP_CLEAR),
            ..Default::default()
        },
    };
    // SAFETY: `f` is an open file in the subvolume and `args` a correctly laid out
    // btrfs_ioctl_qgroup_limit_args; the kernel reads it during the call only.
    unsafe { ioc::qgroup_limit(f.as_raw_fd(), &mut args) }?;
    Ok(())
}

/// What a subvolume's qgroup counts: bytes referenced, and the limit on them if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QgroupUsage {
    /// Bytes of extents the subvolume references (shared ones included).
    pub referenced: u64,
    /// Bytes only it references.
    pub exclusive: u64,
    /// The limit on `referenced`.
    pub max_referenced: Option<u64>,
}

/// Reads subvolume `path`'s qgroup from the quota tree (`None` if qgroups are off or it has
/// none yet). Counts are as of the last committed transaction.
pub fn qgroup_usage(path: &Path) -> io::Result<Option<QgroupUsage>> {
    let id = subvolume_id(path)?;
    let f = File::open(path)?;
    let mut out = QgroupUsage {
        referenced: 0,
        exclusive: 0,
        max_referenced: None,
    };
    let mut found = false;
    for key_type in [BTRFS_QGROUP_INFO_KEY, BTRFS_QGROUP_LIMIT_KEY] {
        let mut args = SearchArgs {
            key: SearchKey {
                tree_id: BTRFS_QUOTA_TREE_OBJECTID,
                min_objectid: 0,
                max_objectid: 0,
                // Level-0 qgroup ids are the subvolume ids.
                min_offset: id,
                max_offset: id,
                min_transid: 0,
                max_transid: u64::MAX,
                min_type: key_type,
                max_type: key_type,
                nr_items: 1,
                ..Default::default()
            },
            buf: [0; SEARCH_BUF],
        };
        // SAFETY: `f` is an open file and `args` a correctly laid out
        // btrfs_ioctl_search_args; the kernel writes at most `buf`'s size into it.
        match unsafe { ioc::tree_search(f.as_raw_fd(), &mut args) } {
            Ok(_) => {}
            Err(nix::errno::Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        if args.key.nr_items == 0 {
            continue;
        }
        // A search header: transid, objectid, offset (u64 each), type, len (u32 each).
        let le = |b: &[u8], at: usize| {
            b.get(at..at + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0)
        };
        let len = args
            .buf
            .get(28..32)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
            .unwrap_or(0) as usize;
        let item = args.buf.get(32..32 + len).unwrap_or_default();
        if key_type == BTRFS_QGROUP_INFO_KEY {
            // generation, rfer, rfer_cmpr, excl, excl_cmpr
            found = true;
            out.referenced = le(item, 8);
            out.exclusive = le(item, 24);
        } else {
            // flags, max_rfer, max_excl, rsv_rfer, rsv_excl
            let flags = le(item, 0);
            if flags & BTRFS_QGROUP_LIMIT_MAX_RFER != 0 {
                out.max_referenced = Some(le(item, 8));
            }
        }
    }
    Ok(found.then_some(out))
}
