//! Overlay writable layers: what a sandbox's state looks like through its image, and how two
//! states differ.
//!
//! A state is an image (read-only lower) plus a writable layer (overlayfs upper). In the
//! upper, a character device 0:0 is a *whiteout* (the path is deleted), and a directory with
//! the `user.overlay.opaque` (or `trusted.overlay.opaque`) xattr set to `y` hides the image's
//! directory of the same path. [`diff`] compares the merged views of two states over the same
//! image by walking only their upper layers, so its cost follows the number of changed files,
//! not the size of the image.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tree;

/// How a path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Present in the new state only.
    Added,
    /// Present in both, with different content or metadata.
    Modified,
    /// Present in the old state only.
    Deleted,
}

impl ChangeKind {
    /// One letter, as `docker diff` prints: A, M, D.
    pub fn letter(self) -> char {
        match self {
            Self::Added => 'A',
            Self::Modified => 'M',
            Self::Deleted => 'D',
        }
    }
}

/// One changed path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// How it changed.
    pub kind: ChangeKind,
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Size in bytes: the new size (added, modified) or the old one (deleted); 0 for directories.
    pub size: u64,
    /// Whether it is a directory.
    pub dir: bool,
}

/// Whether an upper-layer entry is a whiteout.
pub fn is_whiteout(m: &fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

/// Whether an upper-layer directory hides the image's directory beneath it.
pub fn is_opaque(path: &Path) -> bool {
    for name in ["user.overlay.opaque", "trusted.overlay.opaque"] {
        let mut buf = [0u8; 4];
        if let Ok(n) = rustix::fs::lgetxattr(path, name, &mut buf)
            && n >= 1
            && buf[0] == b'y'
        {
            return true;
        }
    }
    false
}

/// What a path is in a merged view.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    kind: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    target: Option<PathBuf>,
}

impl Seen {
    /// From an entry of a walk of a layer a sandbox wrote (a link's target read through its
    /// directory, never followed).
    fn of_entry(e: &tree::Entry<'_>) -> Self {
        Self::of_stat(e.dir, e.name, e.stat)
    }

    /// From the `lstat` of entry `name` of directory `dir`.
    fn of_stat(
        dir: std::os::fd::BorrowedFd<'_>,
        name: &std::ffi::CStr,
        st: &rustix::fs::Stat,
    ) -> Self {
        let is_dir = tree::kind(st) == rustix::fs::FileType::Directory;
        Seen {
            kind: st.st_mode & libc::S_IFMT,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: if is_dir { 0 } else { st.st_size as u64 },
            mtime: (st.st_mtime, st.st_mtime_nsec as i64),
            target: if tree::kind(st) == rustix::fs::FileType::Symlink {
                tree::read_link_at(dir, name).ok()
            } else {
                None
            },
        }
    }

    fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// Same content and metadata (a directory's times change with its entries: ignored).
    fn same(&self, other: &Seen) -> bool {
        if self.is_dir() && other.is_dir() {
            return (self.mode, self.uid, self.gid) == (other.mode, other.uid, other.gid);
        }
        self == other
    }
}

/// One upper-layer entry, as read once by [`scan`].
#[derive(Debug, Clone)]
struct Entry {
    seen: Option<Seen>,
    opaque: bool,
}

/// Reads every entry of an upper layer: one `lstat` per entry (and an xattr read per
/// directory, for opacity), through [`tree::walk`]: no link is followed, even one swapped in
/// while the sandbox runs.
fn scan(root: &Path) -> io::Result<std::collections::HashMap<PathBuf, Entry>> {
    let mut out = std::collections::HashMap::new();
    match tree::walk(root, |e| {
        let (seen, opaque) = if tree::is_whiteout(e.stat) {
            (None, false)
        } else {
            let dir = tree::kind(e.stat) == rustix::fs::FileType::Directory;
            (Some(Seen::of_entry(&e)), dir && opaque_at(e.dir, e.name))
        };
        out.insert(e.rel.to_path_buf(), Entry { seen, opaque });
        Ok(true)
    }) {
        Ok(()) => Ok(out),
        // A layer that does not exist (yet) has no entries.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(out),
        Err(e) => Err(e),
    }
}

/// Whether directory `name` of `dir` is opaque (read through a descriptor, never a link).
fn opaque_at(dir: std::os::fd::BorrowedFd<'_>, name: &std::ffi::CStr) -> bool {
    let Ok(fd) = rustix::fs::openat(
        dir,
        name,
        rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) else {
        return false;
    };
    ["user.overlay.opaque", "trusted.overlay.opaque"]
        .iter()
        .any(|n| {
            tree::get_xattr(std::os::fd::AsFd::as_fd(&fd), n)
                .is_some_and(|v| v.first() == Some(&b'y'))
        })
}

/// Compares the state `from_upper` over `image` with `to_upper` over the same image.
///
/// Each upper layer is read once (the two in parallel); the image is consulted only for
/// paths one side does not have in its layer.
pub fn diff(image: &Path, from_upper: &Path, to_upper: &Path) -> io::Result<Vec<Change>> {
    let (from, to) = std::thread::scope(|s| {
        let a = s.spawn(|| scan(from_upper));
        let b = scan(to_upper);
        (
            a.join()
                .unwrap_or_else(|_| Err(io::Error::other("scan panicked"))),
            b,
        )
    });
    let (from, to) = (from?, to?);
    let image_root = tree::open_root(image).ok();
    // Image lookups, with directories known to be absent remembered: their children are too.
    let absent = std::cell::RefCell::new(std::collections::HashSet::<PathBuf>::new());
    let last_parent = std::cell::RefCell::new(None::<(PathBuf, std::os::fd::OwnedFd)>);
    let image_look = |rel: &Path| -> Option<Seen> {
        if rel.parent().is_some_and(|p| absent.borrow().contains(p)) {
            absent.borrow_mut().insert(rel.to_path_buf());
            return None;
        }
        // An image comes from an archive: its links (`var/run -> /run`) are never followed.
        // A path below a link is not an entry of the image's tree.
        // Paths come sorted, so siblings follow each other: the last parent stays open.
        let seen = image_root.as_ref().and_then(|root| {
            let name = std::ffi::CString::new(rel.file_name()?.as_bytes()).ok()?;
            let parent = rel.parent().unwrap_or(Path::new(""));
            let mut last = last_parent.borrow_mut();
            if last.as_ref().is_none_or(|(p, _)| p != parent) {
                let dir = tree::open_dir(std::os::fd::AsFd::as_fd(root), parent).ok();
                *last = dir.map(|d| (parent.to_path_buf(), d));
            }
            let (_, dir) = last.as_ref()?;
            let dir = std::os::fd::AsFd::as_fd(dir);
            let st = tree::stat_at(dir, &name).ok()??;
            Some(Seen::of_stat(dir, &name, &st))
        });
        if seen.is_none() {
            absent.borrow_mut().insert(rel.to_path_buf());
        }
        seen
    };
    // What a merged view shows at `rel`, from the scanned layer and the image.
    let look = |layer: &std::collections::HashMap<PathBuf, Entry>, rel: &Path| -> Option<Seen> {
        if let Some(e) = layer.get(rel) {
            return e.seen.clone();
        }
        let mut prefix = PathBuf::new();
        for comp in rel.parent().into_iter().flat_map(|p| p.components()) {
            prefix.push(comp);
            if let Some(e) = layer.get(&prefix) {
                match &e.seen {
                    None => return None,
                    Some(s) if !s.is_dir() || e.opaque => return None,
                    _ => {}
                }
            }
        }
        image_look(rel)
    };
    let mut paths: BTreeSet<PathBuf> = from.keys().chain(to.keys()).cloned().collect();
    // A directory made opaque on one side hides the image's entries there: compare them too.
    let mut extra = Vec::new();
    for rel in &paths {
        let opaque =
            |l: &std::collections::HashMap<PathBuf, Entry>| l.get(rel).is_some_and(|e| e.opaque);
        if opaque(&from) != opaque(&to)
            && let Some(root) = &image_root
            && let Ok(dir) = tree::open_dir(std::os::fd::AsFd::as_fd(root), rel)
            && let Ok(entries) = rustix::fs::Dir::read_from(&dir)
        {
            extra.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_name() != c"." && e.file_name() != c"..")
                    .map(|e| rel.join(std::ffi::OsStr::from_bytes(e.file_name().to_bytes()))),
            );
        }
    }
    paths.extend(extra);

    let mut changes = Vec::new();
    let mut gone_dirs: Vec<PathBuf> = Vec::new();
    for rel in &paths {
        // Inside a directory reported deleted as a whole, nothing more is said.
        if gone_dirs
            .last()
            .is_some_and(|d| rel.starts_with(d) && rel != d)
        {
            continue;
        }
        let (a, b) = match (from.get(rel), to.get(rel)) {
            // Both layers have it: compare what they hold, no further lookups.
            (Some(x), Some(y)) => (x.seen.clone(), y.seen.clone()),
            _ => (look(&from, rel), look(&to, rel)),
        };
        let change = match (a, b) {
            (None, None) => None,
            (None, Some(b)) => Some((ChangeKind::Added, b)),
            (Some(a), None) => {
                if a.is_dir() {
                    gone_dirs.push(rel.clone());
                }
                Some((ChangeKind::Deleted, a))
            }
            (Some(a), Some(b)) if a.same(&b) => None,
            (Some(a), Some(b)) => {
                if a.is_dir() && !b.is_dir() {
                    gone_dirs.push(rel.clone());
                }
                Some((ChangeKind::Modified, b))
            }
        };
        if let Some((kind, seen)) = change {
            changes.push(Change {
                kind,
                path: format!("/{}", rel.display()),
                size: seen.size,
                dir: seen.is_dir(),
            });
        }
    }
    Ok(changes)
}

/// Extended attributes that carry overlay semantics in a writable layer.
pub fn is_overlay_xattr(name: &str) -> bool {
    name.starts_with("user.overlay.") || name.starts_with("trusted.overlay.")
}

/// Writes the writable layer `upper` as a tar stream: files, directories, symlinks, hard
/// links, whiteouts (character devices 0:0) and overlay xattrs (as PAX `SCHILY.xattr.*`).
/// Entries are sorted, so the same layer gives the same stream.
pub fn archive<W: io::Write>(upper: &Path, out: W) -> io::Result<W> {
    use rustix::fs::FileType;
    use std::collections::HashMap;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut paths = BTreeSet::new();
    tree::walk(upper, |e| {
        paths.insert(e.rel.to_path_buf());
        Ok(true)
    })?;
    let root = tree::open_root(upper)?;
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    for rel in paths {
        // Each entry is reached through its directory's descriptor, never through a link.
        let parent = rel.parent().unwrap_or(Path::new(""));
        let Some(name) = rel.file_name() else {
            continue;
        };
        let name = std::ffi::CString::new(name.as_bytes())?;
        let dir = tree::open_dir(std::os::fd::AsFd::as_fd(&root), parent)?;
        let Some(st) = tree::stat_at(std::os::fd::AsFd::as_fd(&dir), &name)? else {
            continue;
        };
        let kind = tree::kind(&st);
        let opened = match kind {
            FileType::RegularFile | FileType::Directory => Some(
                rustix::fs::openat(
                    &dir,
                    &name,
                    // NONBLOCK: a fifo swapped in must not hang the daemon in open.
                    rustix::fs::OFlags::RDONLY
                        | rustix::fs::OFlags::NOFOLLOW
                        | rustix::fs::OFlags::CLOEXEC
                        | rustix::fs::OFlags::NOCTTY
                        | rustix::fs::OFlags::NONBLOCK,
                    rustix::fs::Mode::empty(),
                )
                .map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))?,
            ),
            _ => None,
        };
        // Overlay attributes travel in a PAX header before the entry.
        let mut pax = Vec::new();
        if let Some(fd) = &opened {
            let fd = std::os::fd::AsFd::as_fd(fd);
            for xname in tree::list_xattrs(fd) {
                let Ok(xname) = xname.to_str() else { continue };
                if !is_overlay_xattr(xname) {
                    continue;
                }
                if let Some(value) = tree::get_xattr(fd, xname) {
                    let mut rec = format!("SCHILY.xattr.{xname}=").into_bytes();
                    rec.extend_from_slice(&value);
                    rec.push(b'\n');
                    // The length field counts itself.
                    let mut total = rec.len() + 2;
                    while format!("{total} ").len() + rec.len() != total {
                        total += 1;
                    }
                    pax.extend_from_slice(format!("{total} ").as_bytes());
                    pax.extend_from_slice(&rec);
                }
            }
        }
        if !pax.is_empty() {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_size(pax.len() as u64);
            h.set_path("././@PaxHeader")?;
            h.set_mode(0o644);
            h.set_cksum();
            builder.append(&h, &pax[..])?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(st.st_mode & 0o7777);
        h.set_uid(st.st_uid.into());
        h.set_gid(st.st_gid.into());
        h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
        if kind != FileType::Directory && st.st_nlink > 1 {
            if let Some(first) = links.get(&(st.st_dev, st.st_ino)) {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                builder.append_link(&mut h, &rel, first)?;
                continue;
            }
            links.insert((st.st_dev, st.st_ino), rel.clone());
        }
        match (kind, opened) {
            (FileType::RegularFile, Some(fd)) => {
                let file = std::fs::File::from(fd);
                let m = file.metadata()?;
                if !m.is_file() || m.ino() != st.st_ino {
                    return Err(io::Error::other(format!(
                        "/{} changed while being archived",
                        rel.display()
                    )));
                }
                let size = m.len();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(size);
                builder.append_data(&mut h, &rel, io::Read::take(file, size))?;
            }
            (FileType::Symlink, _) => {
                let target = rustix::fs::readlinkat(&dir, &name, Vec::new())
                    .map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))?;
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                builder.append_link(&mut h, &rel, OsStr::from_bytes(target.as_bytes()))?;
            }
            (FileType::Directory, _)
            | (FileType::CharacterDevice, _)
            | (FileType::BlockDevice, _)
            | (FileType::Fifo, _) => {
                h.set_size(0);
                h.set_entry_type(match kind {
                    FileType::Directory => tar::EntryType::Directory,
                    FileType::CharacterDevice => tar::EntryType::Char,
                    FileType::BlockDevice => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                if matches!(kind, FileType::CharacterDevice | FileType::BlockDevice) {
                    h.set_device_major(rustix::fs::major(st.st_rdev))?;
                    h.set_device_minor(rustix::fs::minor(st.st_rdev))?;
                }
                builder.append_data(&mut h, &rel, io::empty())?;
            }
            _ => {}
        }
    }
    builder.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whiteout(path: &Path) {
        nix::sys::stat::mknod(
            path,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
    }

    #[test]
    fn merged_views_are_compared() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: making whiteouts needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (img, a, b) = (t.path().join("img"), t.path().join("a"), t.path().join("b"));
        for d in [&img, &a, &b] {
            fs::create_dir_all(d.join("etc")).unwrap();
        }
        fs::write(img.join("etc/keep"), "1").unwrap();
        fs::write(img.join("etc/gone"), "2").unwrap();
        fs::create_dir_all(img.join("opt/tree")).unwrap();
        fs::write(img.join("opt/tree/old"), "3").unwrap();
        // a: one edit.
        fs::write(a.join("etc/keep"), "1 edited").unwrap();
        // b: that edit undone (the image shows through), a deletion, an addition, a new tree.
        whiteout(&b.join("etc/gone"));
        fs::create_dir_all(b.join("work/src")).unwrap();
        fs::write(b.join("work/src/new.rs"), "fn main() {}").unwrap();
        fs::create_dir_all(b.join("opt")).unwrap();
        whiteout(&b.join("opt/tree"));
        let changes = diff(&img, &a, &b).unwrap();
        let shown: Vec<String> = changes
            .iter()
            .map(|c| format!("{} {}", c.kind.letter(), c.path))
            .collect();
        assert_eq!(
            shown,
            vec![
                "D /etc/gone",
                "M /etc/keep",
                "D /opt/tree",
                "A /work",
                "A /work/src",
                "A /work/src/new.rs"
            ]
        );
        assert_eq!(changes[1].size, 1, "modified back to the image's one byte");
        assert!(diff(&img, &b, &b).unwrap().is_empty());
    }
}
