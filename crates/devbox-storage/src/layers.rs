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
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How a path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
    fn of(path: &Path, m: &fs::Metadata) -> Self {
        Seen {
            kind: m.mode() & libc::S_IFMT,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: if m.is_dir() { 0 } else { m.len() },
            mtime: (m.mtime(), m.mtime_nsec()),
            target: if m.file_type().is_symlink() {
                fs::read_link(path).ok()
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

fn walk(root: &Path, out: &mut BTreeSet<PathBuf>) -> io::Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            let child = rel.join(e.file_name());
            if e.file_type()?.is_dir() {
                stack.push(child.clone());
            }
            out.insert(child);
        }
    }
    Ok(())
}

/// One upper-layer entry, as read once by [`scan`].
#[derive(Debug, Clone)]
struct Entry {
    seen: Option<Seen>,
    opaque: bool,
}

/// Reads every entry of an upper layer: one `lstat` per entry (and an xattr read per
/// directory, for opacity).
fn scan(root: &Path) -> io::Result<std::collections::HashMap<PathBuf, Entry>> {
    let mut out = std::collections::HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let entries = match fs::read_dir(root.join(&rel)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            let child = rel.join(e.file_name());
            let full = root.join(&child);
            let m = fs::symlink_metadata(&full)?;
            let (seen, opaque) = if is_whiteout(&m) {
                (None, false)
            } else {
                let dir = m.is_dir();
                if dir {
                    stack.push(child.clone());
                }
                (Some(Seen::of(&full, &m)), dir && is_opaque(&full))
            };
            out.insert(child, Entry { seen, opaque });
        }
    }
    Ok(out)
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
    // Image lookups, with directories known to be absent remembered: their children are too.
    let absent = std::cell::RefCell::new(std::collections::HashSet::<PathBuf>::new());
    let image_look = |rel: &Path| -> Option<Seen> {
        if rel.parent().is_some_and(|p| absent.borrow().contains(p)) {
            absent.borrow_mut().insert(rel.to_path_buf());
            return None;
        }
        let full = image.join(rel);
        match fs::symlink_metadata(&full) {
            Ok(m) => Some(Seen::of(&full, &m)),
            Err(_) => {
                absent.borrow_mut().insert(rel.to_path_buf());
                None
            }
        }
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
            && let Ok(entries) = fs::read_dir(image.join(rel))
        {
            extra.extend(entries.flatten().map(|e| rel.join(e.file_name())));
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
    use std::collections::HashMap;
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut paths = BTreeSet::new();
    walk(upper, &mut paths)?;
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    for rel in paths {
        let full = upper.join(&rel);
        let m = fs::symlink_metadata(&full)?;
        // Overlay attributes travel in a PAX header before the entry.
        let mut pax = Vec::new();
        let mut names = vec![0u8; 4096];
        let n = rustix::fs::llistxattr(&full, &mut names).unwrap_or(0);
        for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            if !is_overlay_xattr(name) {
                continue;
            }
            let mut value = vec![0u8; 4096];
            if let Ok(len) = rustix::fs::lgetxattr(&full, name, &mut value) {
                let record_body = format!("SCHILY.xattr.{name}=");
                let mut rec = record_body.into_bytes();
                rec.extend_from_slice(&value[..len]);
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
        h.set_metadata_in_mode(&m, tar::HeaderMode::Complete);
        let ft = m.file_type();
        if m.nlink() > 1 && !m.is_dir() {
            if let Some(first) = links.get(&(m.dev(), m.ino())) {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                builder.append_link(&mut h, &rel, first)?;
                continue;
            }
            links.insert((m.dev(), m.ino()), rel.clone());
        }
        if ft.is_file() {
            builder.append_data(&mut h, &rel, fs::File::open(&full)?)?;
        } else if ft.is_symlink() {
            h.set_size(0);
            builder.append_link(&mut h, &rel, fs::read_link(&full)?)?;
        } else if ft.is_dir() || ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            h.set_size(0);
            if ft.is_char_device() || ft.is_block_device() {
                h.set_device_major(((m.rdev() >> 8) & 0xfff) as u32)?;
                h.set_device_minor(((m.rdev() & 0xff) | ((m.rdev() >> 12) & 0xfff00)) as u32)?;
            }
            builder.append_data(&mut h, &rel, io::empty())?;
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
