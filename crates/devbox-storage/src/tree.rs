//! Operations on trees a sandbox can write, done by the daemon as host root.
//!
//! A sandbox's writable layer, and every snapshot of it, holds whatever the sandbox put
//! there: symbolic links to host paths, whiteouts, hard links, deep or wide trees, and, while
//! the sandbox runs, entries swapped between two system calls. Every daemon-side walk, copy
//! and removal in such a tree goes through this module, which:
//!
//! - resolves paths only relative to a directory it opened itself, with `openat2` and
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`, so
//!   no symbolic link (and no `..`, no `/proc` magic link, no other mount) is ever crossed;
//! - acts on a name through the descriptor of its directory (`*at` calls with
//!   `AT_SYMLINK_NOFOLLOW`, `O_NOFOLLOW`), so a link swapped in after a check is acted on as
//!   a link, or makes the call fail, never followed;
//! - copies in-process (no `cp`), keeping owners, modes, times, extended attributes
//!   (overlay opacity among them), whiteouts, hard links and holes; devices other than
//!   whiteouts are never made.
//!
//! A path longer than `PATH_MAX` below the root cannot be opened this way: such an operation
//! fails with `ENAMETOOLONG` and says so.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, SeekFrom, Stat, Timestamps};

/// How paths below an opened root are resolved: never through a link, never out of it.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

fn err(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// Adds the path to an error, except to those callers tell apart by their code (a full
/// filesystem).
fn with_path(e: io::Error, what: &str, rel: &Path) -> io::Error {
    if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
        return e;
    }
    io::Error::new(e.kind(), format!("{what} /{}: {e}", rel.display()))
}

/// Opens a directory the daemon names itself (a volume, a snapshot's layer). Its last
/// component must not be a symbolic link.
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io::Error::new(err(e).kind(), format!("open {}: {e}", path.display())))
}

/// Opens the directory `rel` below `root` without crossing a link or leaving the tree.
/// An empty `rel` is the root itself.
pub fn open_dir(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    let rel: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    rustix::fs::openat2(
        root,
        rel,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        BENEATH,
    )
    .map_err(err)
}

/// Opens the directory entry `name` of `dir`, refusing a link or anything but a directory.
fn open_child_dir(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(err)
}

/// `lstat` of an entry, through its directory. `None` when it does not exist.
pub fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<Stat>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(s) => Ok(Some(s)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(err(e)),
    }
}

/// The kind of file a `Stat` describes.
pub fn kind(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Whether a `Stat` is an overlay whiteout (a character device 0:0).
pub fn is_whiteout(st: &Stat) -> bool {
    kind(st) == FileType::CharacterDevice && st.st_rdev == 0
}

/// The target of a symbolic link, read through its directory.
pub fn read_link_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<PathBuf> {
    let target = rustix::fs::readlinkat(dir, name, Vec::new()).map_err(err)?;
    Ok(PathBuf::from(OsStr::from_bytes(target.as_bytes())))
}

/// The value of extended attribute `name` of an open file, if it has one.
pub fn get_xattr(fd: BorrowedFd<'_>, name: &str) -> Option<Vec<u8>> {
    let len = rustix::fs::fgetxattr_query(fd, name).ok()?;
    let mut value = vec![0u8; len];
    let n = rustix::fs::fgetxattr(fd, name, &mut value[..]).ok()?;
    value.truncate(n);
    Some(value)
}

/// The names of an open file's extended attributes.
pub fn list_xattrs(fd: BorrowedFd<'_>) -> Vec<CString> {
    let Ok(len) = rustix::fs::flistxattr_query(fd) else {
        return Vec::new();
    };
    let mut names = vec![0u8; len];
    let Ok(n) = rustix::fs::flistxattr(fd, &mut names[..]) else {
        return Vec::new();
    };
    names[..n.min(len)]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .filter_map(|n| CString::new(n).ok())
        .collect()
}

/// One entry met by [`walk`].
pub struct Entry<'a> {
    /// Its path below the root.
    pub rel: &'a Path,
    /// Its `lstat`.
    pub stat: &'a Stat,
    /// The directory holding it.
    pub dir: BorrowedFd<'a>,
    /// Its name in that directory.
    pub name: &'a CStr,
}

/// Walks the tree below `root` depth-first, calling `f` for every entry (never for the root
/// itself); directories are descended into when `f` returns true. A directory is opened
/// again from the root when its turn comes, so at most two descriptors are open at a time,
/// whatever the depth; one replaced by a link in the meantime is skipped.
pub fn walk(root: &Path, mut f: impl FnMut(Entry<'_>) -> io::Result<bool>) -> io::Result<()> {
    let root_fd = open_root(root)?;
    walk_fd(root_fd.as_fd(), &mut f)
}

fn walk_fd(
    root: BorrowedFd<'_>,
    f: &mut impl FnMut(Entry<'_>) -> io::Result<bool>,
) -> io::Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = match open_dir(root, &rel) {
            Ok(d) => d,
            // Gone, or no longer a directory (a live tree changes under the walk).
            Err(e) if !rel.as_os_str().is_empty() && changed_under_us(&e) => continue,
            Err(e) => return Err(with_path(e, "open", &rel)),
        };
        let entries = Dir::read_from(&dir).map_err(err)?;
        for entry in entries {
            let entry = entry.map_err(err)?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let Some(st) = stat_at(dir.as_fd(), name)? else {
                continue;
            };
            let child = rel.join(OsStr::from_bytes(name.to_bytes()));
            let descend = f(Entry {
                rel: &child,
                stat: &st,
                dir: dir.as_fd(),
                name,
            })?;
            if descend && kind(&st) == FileType::Directory {
                stack.push(child);
            }
        }
    }
    Ok(())
}

/// Errors that mean a live tree changed during a walk: the entry is skipped.
fn changed_under_us(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP) | Some(libc::EXDEV)
    )
}

/// Bytes used by the files below `root` (apparent sizes; hard links counted once). Links are
/// never followed, so a sandbox cannot make this measure anything outside its tree.
pub fn disk_usage(root: &Path) -> u64 {
    let mut total = 0;
    let mut seen = std::collections::HashSet::new();
    let _ = walk(root, |e| {
        let k = kind(e.stat);
        if k != FileType::Directory && (e.stat.st_nlink <= 1 || seen.insert(e.stat.st_ino)) {
            total += e.stat.st_size as u64;
        }
        Ok(true)
    });
    total
}

/// Directories [`remove_at`] holds open at once, whatever the depth of the tree.
const MAX_HELD: usize = 64;

/// Removes entry `name` of `dir` and, for a directory, everything below it, without
/// following any link, with a bounded stack and bounded descriptors (a sandbox can make a
/// tree tens of thousands of directories deep). A missing entry is not an error.
pub fn remove_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let Some(st) = stat_at(dir, name)? else {
        return Ok(());
    };
    if kind(&st) != FileType::Directory {
        return match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(err(e)),
        };
    }
    // Empty the directory level by level, holding one path of descriptors; each level is
    // opened from its parent's descriptor, never through a path.
    let top = match open_child_dir(dir, name) {
        Ok(fd) => fd,
        // Replaced by something else since the stat: remove that, as what it is now.
        Err(e) if changed_under_us(&e) => {
            return match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(e) => Err(err(e)),
            };
        }
        Err(e) => return Err(e),
    };
    let mut stack: Vec<(OwnedFd, CString)> = vec![(top, name.to_owned())];
    let mut hoisted = 0u64;
    while let Some((fd, _)) = stack.last() {
        match first_subdir_unlinking_the_rest(fd.as_fd())? {
            // Deeper than the descriptors we hold: the subtree is moved up under the
            // directory being removed (a rename on the same filesystem, O(1)) and met again
            // from there. Neither the stack nor the descriptors grow with the tree's depth.
            Some(n) if stack.len() >= MAX_HELD => loop {
                hoisted += 1;
                let to = CString::new(format!(".devbox-removing-{hoisted}"))
                    .map_err(io::Error::other)?;
                match rustix::fs::renameat_with(
                    fd,
                    &n,
                    &stack[0].0,
                    &to,
                    rustix::fs::RenameFlags::NOREPLACE,
                ) {
                    Ok(()) => break,
                    Err(rustix::io::Errno::EXIST) => continue,
                    Err(e) => return Err(err(e)),
                }
            },
            Some(n) => {
                let child = open_child_dir(fd.as_fd(), &n)?;
                stack.push((child, n));
            }
            None => {
                // This level is empty: remove it from its parent.
                let Some((_, n)) = stack.pop() else { break };
                let parent = stack.last().map(|(p, _)| p.as_fd()).unwrap_or(dir);
                match rustix::fs::unlinkat(parent, &n, AtFlags::REMOVEDIR) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    Err(e) => return Err(err(e)),
                }
            }
        }
    }
    Ok(())
}

/// Removes the tree at `path` (a path the daemon names: a volume, a staging directory) with
/// [`remove_at`]. A missing path is not an error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no entry", path.display()),
        ));
    };
    let name = CString::new(name.as_bytes())?;
    let dir = match open_root(parent) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    remove_at(dir.as_fd(), &name)
}

/// Unlinks the entries of `dir` that are not directories, up to its first subdirectory,
/// whose name it returns (`None` once `dir` holds no subdirectory).
fn first_subdir_unlinking_the_rest(dir: BorrowedFd<'_>) -> io::Result<Option<CString>> {
    for entry in Dir::read_from(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let n = entry.file_name();
        if n == c"." || n == c".." {
            continue;
        }
        match stat_at(dir, n)? {
            Some(s) if kind(&s) == FileType::Directory => return Ok(Some(n.to_owned())),
            Some(_) => match rustix::fs::unlinkat(dir, n, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(err(e)),
            },
            None => {}
        }
    }
    Ok(None)
}

/// Copies of files with several links, by inode of the source: the first copy's path below
/// the destination root, so later ones become hard links to it.
#[derive(Default)]
struct Links(HashMap<(u64, u64), PathBuf>);

/// Copies a whole tree: `src` (an existing directory) into `dst`, which must not exist.
/// Used by the copy storage driver for snapshots, clones and rollbacks.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let src_fd = open_root(src)?;
    let parent = dst
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no parent"))?;
    let name = dst
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no name"))?;
    let name = CString::new(name.as_bytes())?;
    let parent_fd = open_root(parent)?;
    let st = rustix::fs::fstat(&src_fd).map_err(err)?;
    make_dir_like(&src_fd, &st, parent_fd.as_fd(), &name)?;
    let dst_fd = open_child_dir(parent_fd.as_fd(), &name)?;
    let mut links = Links::default();
    let copied = copy_contents(src_fd.as_fd(), dst_fd.as_fd(), &mut links);
    set_times(dst_fd.as_fd(), &st)?;
    copied
}

/// Copies everything below `src_root` into `dst_root` (both open directories), then the
/// directories' times (after their entries, which change them).
fn copy_contents(
    src_root: BorrowedFd<'_>,
    dst_root: BorrowedFd<'_>,
    links: &mut Links,
) -> io::Result<()> {
    let mut dirs: Vec<(PathBuf, Stat)> = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let s = match open_dir(src_root, &rel) {
            Ok(s) => s,
            // A live source changed under the copy: what is there now is not a directory.
            Err(e) if !rel.as_os_str().is_empty() && changed_under_us(&e) => continue,
            Err(e) => return Err(with_path(e, "open", &rel)),
        };
        let d = open_dir(dst_root, &rel).map_err(|e| with_path(e, "open copy of", &rel))?;
        for entry in Dir::read_from(&s).map_err(err)? {
            let entry = entry.map_err(err)?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let Some(st) = stat_at(s.as_fd(), name)? else {
                continue;
            };
            let child = rel.join(OsStr::from_bytes(name.to_bytes()));
            match copy_entry(
                s.as_fd(),
                name,
                &st,
                d.as_fd(),
                name,
                &child,
                dst_root,
                links,
            ) {
                Ok(()) => {}
                // Vanished or replaced since it was listed (a live tree): skipped.
                Err(e) if changed_under_us(&e) => continue,
                Err(e) => return Err(with_path(e, "copy", &child)),
            }
            if kind(&st) == FileType::Directory {
                dirs.push((child.clone(), st));
                stack.push(child);
            }
        }
    }
    for (rel, st) in dirs.iter().rev() {
        let d = open_dir(dst_root, rel)?;
        set_times(d.as_fd(), st)?;
    }
    Ok(())
}

/// Copies one entry (not what is below a directory): the directory itself, a file with its
/// content, a link, a whiteout, a fifo.
#[allow(clippy::too_many_arguments)]
fn copy_entry(
    src_dir: BorrowedFd<'_>,
    src_name: &CStr,
    st: &Stat,
    dst_dir: BorrowedFd<'_>,
    dst_name: &CStr,
    rel: &Path,
    dst_root: BorrowedFd<'_>,
    links: &mut Links,
) -> io::Result<()> {
    let k = kind(st);
    if k != FileType::Directory && st.st_nlink > 1 {
        if let Some(first) = links.0.get(&(st.st_dev, st.st_ino)) {
            let target = rustix::fs::openat2(
                dst_root,
                first,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                BENEATH,
            )
            .map_err(err)?;
            return rustix::fs::linkat(target, c"", dst_dir, dst_name, AtFlags::EMPTY_PATH)
                .map_err(err);
        }
        links.0.insert((st.st_dev, st.st_ino), rel.to_path_buf());
    }
    match k {
        FileType::Directory => {
            let s = open_child_dir(src_dir, src_name)?;
            make_dir_like(&s, st, dst_dir, dst_name)
        }
        FileType::RegularFile => copy_file(src_dir, src_name, st, dst_dir, dst_name),
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(src_dir, src_name, Vec::new()).map_err(err)?;
            rustix::fs::symlinkat(&target, dst_dir, dst_name).map_err(err)?;
            own_and_time_at(dst_dir, dst_name, st)
        }
        FileType::CharacterDevice | FileType::Fifo | FileType::Socket => {
            // Whiteouts and fifos; a device a sandbox could not have made is never copied.
            if k == FileType::CharacterDevice && st.st_rdev != 0 {
                tracing::warn!(path = %rel.display(), "not copying a device node");
                return Ok(());
            }
            rustix::fs::mknodat(
                dst_dir,
                dst_name,
                k,
                Mode::from_raw_mode(st.st_mode & 0o777),
                0,
            )
            .map_err(err)?;
            own_and_time_at(dst_dir, dst_name, st)
        }
        _ => {
            tracing::warn!(path = %rel.display(), "not copying a block device");
            Ok(())
        }
    }
}

/// Gives entry `name` of `dir` (a link or special file, not opened) the owner and times of `st`.
fn own_and_time_at(dir: BorrowedFd<'_>, name: &CStr, st: &Stat) -> io::Result<()> {
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(st.st_uid)),
        Some(rustix::fs::Gid::from_raw(st.st_gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(err)?;
    rustix::fs::utimensat(dir, name, &timestamps(st), AtFlags::SYMLINK_NOFOLLOW).map_err(err)
}

/// Makes directory `name` in `dst_dir` like the open directory `src` (owner, mode, extended
/// attributes such as overlay opacity), empty.
fn make_dir_like(src: &OwnedFd, st: &Stat, dst_dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    rustix::fs::mkdirat(dst_dir, name, Mode::from_raw_mode(0o700)).map_err(err)?;
    let d = open_child_dir(dst_dir, name)?;
    apply_meta(src.as_fd(), st, d.as_fd())
}

/// Owner, then mode (a change of owner clears set-id bits), then extended attributes.
fn apply_meta(src: BorrowedFd<'_>, st: &Stat, dst: BorrowedFd<'_>) -> io::Result<()> {
    rustix::fs::fchown(
        dst,
        Some(rustix::fs::Uid::from_raw(st.st_uid)),
        Some(rustix::fs::Gid::from_raw(st.st_gid)),
    )
    .map_err(err)?;
    rustix::fs::fchmod(dst, Mode::from_raw_mode(st.st_mode & 0o7777)).map_err(err)?;
    for name in list_xattrs(src) {
        if let Some(value) = get_xattr(src, name.to_str().unwrap_or_default())
            && let Err(e) =
                rustix::fs::fsetxattr(dst, &name, &value, rustix::fs::XattrFlags::empty())
        {
            // security.* may be refused by the filesystem; overlay's own must not be lost.
            let n = name.to_string_lossy();
            if crate::layers::is_overlay_xattr(&n) {
                return Err(io::Error::other(format!("setting {n}: {e}")));
            }
        }
    }
    Ok(())
}

fn timestamps(st: &Stat) -> Timestamps {
    Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: st.st_atime as _,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

fn set_times(fd: BorrowedFd<'_>, st: &Stat) -> io::Result<()> {
    rustix::fs::futimens(fd, &timestamps(st)).map_err(err)
}

/// Copies a regular file: a reflink where the filesystem can, otherwise its data ranges
/// only, so holes stay holes.
fn copy_file(
    src_dir: BorrowedFd<'_>,
    src_name: &CStr,
    st: &Stat,
    dst_dir: BorrowedFd<'_>,
    dst_name: &CStr,
) -> io::Result<()> {
    let src = rustix::fs::openat(
        src_dir,
        src_name,
        // NONBLOCK: a fifo swapped in for the file must not hang the daemon in open.
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(err)?;
    let now = rustix::fs::fstat(&src).map_err(err)?;
    if kind(&now) != FileType::RegularFile || now.st_ino != st.st_ino {
        // Replaced since it was listed (a live tree): skipped like an entry that vanished.
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    let dst = rustix::fs::openat(
        dst_dir,
        dst_name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(err)?;
    if rustix::fs::ioctl_ficlone(&dst, &src).is_err() {
        copy_data(&src, &dst, now.st_size as u64)?;
    }
    apply_meta(src.as_fd(), &now, dst.as_fd())?;
    set_times(dst.as_fd(), &now)
}

/// Copies the data ranges of `src` (found with `SEEK_DATA`/`SEEK_HOLE`) and sets the size.
fn copy_data(src: &OwnedFd, dst: &OwnedFd, size: u64) -> io::Result<()> {
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(p) => p,
            Err(rustix::io::Errno::NXIO) => break, // only a hole is left
            Err(e) => return Err(err(e)),
        };
        let end = rustix::fs::seek(src, SeekFrom::Hole(start))
            .map_err(err)?
            .min(size);
        let (mut from, mut to) = (start, start);
        while from < end {
            let len = (end - from).min(1 << 30) as usize;
            let n = rustix::fs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), len)
                .map_err(err)?;
            if n == 0 {
                break; // the file shrank under us
            }
        }
        pos = end.max(start + 1);
    }
    rustix::fs::ftruncate(dst, size).map_err(err)
}

/// The normal components of a relative path, refusing `..`, `.` prefixes and roots.
fn components(rel: &Path) -> io::Result<Vec<CString>> {
    rel.components()
        .map(|c| match c {
            Component::Normal(n) => CString::new(n.as_bytes()).map_err(io::Error::other),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a plain relative path", rel.display()),
            )),
        })
        .collect()
}

/// Makes the paths `rels` (relative, without `..`) of the layer `dst_root` what they are in
/// the layer `src_root`: what `dst_root` has there is removed and what `src_root` has is
/// copied (whiteouts and opaque directories included). A parent that `dst_root` lacks, or
/// has as anything but a directory (a link, a file, a whiteout), is made like the source's
/// directory of that path. Nothing is ever resolved through a link of either layer: a path
/// that passes through a link in `src_root` is refused.
pub fn restore_paths(src_root: &Path, dst_root: &Path, rels: &[PathBuf]) -> io::Result<()> {
    let src_root = open_root(src_root)?;
    let dst_root = open_root(dst_root)?;
    for rel in rels {
        let comps = components(rel)?;
        let Some((last, parents)) = comps.split_last() else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"));
        };
        // The source's parents, opened one by one.
        let mut src_dir = Some(rustix::io::dup(&src_root).map_err(err)?);
        let mut src_dirs = Vec::new();
        for (i, c) in parents.iter().enumerate() {
            let Some(d) = &src_dir else { break };
            src_dir = match stat_at(d.as_fd(), c)? {
                Some(s) if kind(&s) == FileType::Directory => {
                    let child = open_child_dir(d.as_fd(), c)?;
                    src_dirs.push((rustix::io::dup(&child).map_err(err)?, s));
                    Some(child)
                }
                Some(s) if kind(&s) == FileType::Symlink => {
                    let at: PathBuf = comps[..=i]
                        .iter()
                        .map(|c| OsStr::from_bytes(c.to_bytes()))
                        .collect();
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "/{} is a symbolic link in the snapshot: name the path it points to instead",
                            at.display()
                        ),
                    ));
                }
                // Missing, or a whiteout or file: the layer has nothing below it.
                _ => None,
            };
        }
        let src_stat = match &src_dir {
            Some(d) => stat_at(d.as_fd(), last)?,
            None => None,
        };
        // The destination's parents: descended where they are directories, made like the
        // source's where they are not (only when there is something to copy).
        let mut dst_dir = Some(rustix::io::dup(&dst_root).map_err(err)?);
        for (i, c) in parents.iter().enumerate() {
            let Some(d) = dst_dir.take() else { break };
            dst_dir = match stat_at(d.as_fd(), c)? {
                Some(s) if kind(&s) == FileType::Directory => Some(open_child_dir(d.as_fd(), c)?),
                existing => {
                    if src_stat.is_none() {
                        None // nothing below it to remove, nothing to copy
                    } else {
                        if existing.is_some() {
                            remove_at(d.as_fd(), c)?;
                        }
                        let (sfd, sst) = &src_dirs[i];
                        make_dir_like(sfd, sst, d.as_fd(), c)?;
                        set_times(open_child_dir(d.as_fd(), c)?.as_fd(), sst)?;
                        Some(open_child_dir(d.as_fd(), c)?)
                    }
                }
            };
        }
        let Some(dst_dir) = dst_dir else { continue };
        remove_at(dst_dir.as_fd(), last)?;
        if let (Some(sd), Some(st)) = (&src_dir, src_stat) {
            let mut links = Links::default();
            copy_entry(
                sd.as_fd(),
                last,
                &st,
                dst_dir.as_fd(),
                last,
                rel,
                dst_root.as_fd(),
                &mut links,
            )?;
            if kind(&st) == FileType::Directory {
                let s = open_child_dir(sd.as_fd(), last)?;
                let d = open_child_dir(dst_dir.as_fd(), last)?;
                copy_contents(s.as_fd(), d.as_fd(), &mut links)?;
                set_times(d.as_fd(), &st)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    fn root() -> bool {
        if rustix::process::geteuid().is_root() {
            return true;
        }
        eprintln!("SKIPPED: needs root (owners, whiteouts)");
        false
    }

    #[test]
    fn restore_never_writes_through_a_link_in_the_destination() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst, host) = (
            t.path().join("src"),
            t.path().join("dst"),
            t.path().join("host"),
        );
        fs::create_dir_all(src.join("work/src")).unwrap();
        fs::write(src.join("work/src/a"), "from the snapshot").unwrap();
        fs::create_dir_all(&dst).unwrap();
        fs::create_dir_all(host.join("src")).unwrap();
        fs::write(host.join("src/precious"), "host file").unwrap();
        // The sandbox replaced /work by a link to a host directory.
        symlink(&host, dst.join("work")).unwrap();
        restore_paths(&src, &dst, &[PathBuf::from("work/src")]).unwrap();
        assert_eq!(
            fs::read_to_string(host.join("src/precious")).unwrap(),
            "host file"
        );
        assert!(!host.join("src/a").exists());
        assert!(fs::symlink_metadata(dst.join("work")).unwrap().is_dir());
        assert_eq!(
            fs::read_to_string(dst.join("work/src/a")).unwrap(),
            "from the snapshot"
        );
    }

    #[test]
    fn restore_never_reads_through_a_link_in_the_source() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst, host) = (
            t.path().join("src"),
            t.path().join("dst"),
            t.path().join("host"),
        );
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&dst).unwrap();
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("secret"), "host secret").unwrap();
        symlink(&host, src.join("work")).unwrap();
        let e = restore_paths(&src, &dst, &[PathBuf::from("work/secret")]).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!dst.join("work").exists());
        // A link as the restored path itself is copied as a link.
        restore_paths(&src, &dst, &[PathBuf::from("work")]).unwrap();
        assert!(
            fs::symlink_metadata(dst.join("work"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_link(dst.join("work")).unwrap(), host);
    }

    #[test]
    fn removal_does_not_follow_links_inside() {
        let t = tempfile::tempdir().unwrap();
        let (dst, host) = (t.path().join("dst"), t.path().join("host"));
        fs::create_dir_all(dst.join("d/e")).unwrap();
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("keep"), "x").unwrap();
        symlink(&host, dst.join("d/e/link")).unwrap();
        symlink(host.join("keep"), dst.join("d/filelink")).unwrap();
        let fd = open_root(&dst).unwrap();
        remove_at(fd.as_fd(), c"d").unwrap();
        assert!(!dst.join("d").exists());
        assert!(host.join("keep").exists());
    }

    #[test]
    fn copies_keep_metadata_links_and_holes() {
        if !root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/b/f"), "data").unwrap();
        fs::set_permissions(src.join("a/b/f"), fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::lchown(src.join("a/b/f"), Some(1000), Some(1000)).unwrap();
        fs::set_permissions(src.join("a/b/f"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::hard_link(src.join("a/b/f"), src.join("a/hard")).unwrap();
        symlink("/etc/shadow", src.join("a/link")).unwrap();
        nix::sys::stat::mknod(
            &src.join("a/wh"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        rustix::fs::setxattr(
            src.join("a"),
            "user.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let sparse = fs::File::create(src.join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        copy_tree(&src, &dst).unwrap();
        let m = fs::metadata(dst.join("a/b/f")).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (1000, 0o4755));
        assert_eq!(m.ino(), fs::metadata(dst.join("a/hard")).unwrap().ino());
        assert_eq!(
            fs::read_link(dst.join("a/link")).unwrap(),
            Path::new("/etc/shadow")
        );
        let wh = fs::symlink_metadata(dst.join("a/wh")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &wh.file_type()
        ));
        assert!(crate::layers::is_opaque(&dst.join("a")));
        let s = fs::metadata(dst.join("sparse")).unwrap();
        assert_eq!(s.len(), 1 << 30);
        assert!(s.blocks() < 64, "holes stay holes: {} blocks", s.blocks());
        assert_eq!(
            fs::metadata(src.join("a/b")).unwrap().mtime(),
            fs::metadata(dst.join("a/b")).unwrap().mtime()
        );
    }

    #[test]
    fn removal_of_a_tree_deeper_than_path_max_holds_few_descriptors() {
        let t = tempfile::tempdir().unwrap();
        let top = t.path().join("deep");
        fs::create_dir(&top).unwrap();
        let mut fd = open_root(&top).unwrap();
        for _ in 0..6_000 {
            rustix::fs::mkdirat(&fd, c"d", Mode::from_raw_mode(0o755)).unwrap();
            fd = open_child_dir(fd.as_fd(), c"d").unwrap();
        }
        rustix::fs::mkdirat(&fd, c"leaf", Mode::from_raw_mode(0o755)).unwrap();
        drop(fd);
        let before = fs::read_dir("/proc/self/fd").unwrap().count();
        remove_tree(&top).unwrap();
        assert!(!top.exists());
        assert!(fs::read_dir("/proc/self/fd").unwrap().count() <= before + 1);
        remove_tree(&top).unwrap(); // missing: fine
    }

    #[test]
    fn walk_and_usage_stay_inside() {
        let t = tempfile::tempdir().unwrap();
        let (tree, host) = (t.path().join("tree"), t.path().join("host"));
        fs::create_dir_all(tree.join("d")).unwrap();
        fs::write(tree.join("d/f"), "12345").unwrap();
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("big"), vec![0u8; 100_000]).unwrap();
        symlink(&host, tree.join("d/out")).unwrap();
        assert_eq!(disk_usage(&tree), 5 + host.to_string_lossy().len() as u64);
        let mut names = Vec::new();
        walk(&tree, |e| {
            names.push(e.rel.to_path_buf());
            Ok(true)
        })
        .unwrap();
        names.sort();
        assert_eq!(names, [PathBuf::from("d"), "d/f".into(), "d/out".into()]);
    }
}
