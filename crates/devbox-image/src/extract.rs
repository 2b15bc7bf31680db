//! Safe extraction of tar archives into a directory.
//!
//! Archives are untrusted. Every path is resolved with `openat2(RESOLVE_BENEATH)` from the
//! target root, so nothing is ever written outside it: an entry with an absolute path or a
//! `..` component, or one that would be written through a symlink pointing out of the root,
//! is refused with an error naming it. Device nodes are refused, except under `dev/`, where
//! they are skipped (dev-box provides /dev itself). Ownership and modes are kept (ids are
//! stored unshifted: uid 0 is the sandbox's root).
//!
//! With `whiteouts` on (OCI and docker layers), `.wh.NAME` deletes NAME and `.wh..wh..opq`
//! empties a directory of what earlier layers put there.

use std::collections::HashSet;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timestamps};

use crate::ImageError;

/// What an extraction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractStats {
    /// Entries written.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Device nodes under dev/ that were skipped.
    pub skipped_devices: u64,
}

/// Options of [`extract`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtractOptions {
    /// Interpret OCI whiteout files.
    pub whiteouts: bool,
    /// The archive is an overlay writable layer (a dev-box snapshot): keep its whiteouts
    /// (character devices 0:0) and overlay xattrs; still refuse any other device.
    pub overlay_layer: bool,
}

fn hostile(entry: &str, why: impl std::fmt::Display) -> ImageError {
    ImageError::Hostile {
        entry: entry.to_string(),
        reason: why.to_string(),
    }
}

/// Normalises an archive path: drops `.` components; refuses absolute paths and `..`.
pub fn clean_path(raw: &Path) -> Result<PathBuf, ImageError> {
    let shown = raw.display().to_string();
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(hostile(&shown, "it has an absolute path"));
            }
            Component::ParentDir => return Err(hostile(&shown, "it has a '..' component")),
        }
    }
    Ok(out)
}

const DIR_FLAGS: OFlags = OFlags::PATH.union(OFlags::DIRECTORY).union(OFlags::CLOEXEC);

fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV
}

struct Target {
    root: OwnedFd,
    whiteouts: bool,
    overlay_layer: bool,
    /// Paths written by the current archive (opaque markers keep these).
    written: HashSet<PathBuf>,
    stats: ExtractStats,
}

impl Target {
    /// Opens (creating as needed) directory `rel` beneath the root.
    fn dir(&self, rel: &Path, entry: &str) -> Result<OwnedFd, ImageError> {
        if rel.as_os_str().is_empty() {
            return rustix::fs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())
                .map_err(|e| ImageError::io("open", entry, e.into()));
        }
        match rustix::fs::openat2(&self.root, rel, DIR_FLAGS, Mode::empty(), beneath()) {
            Ok(fd) => return Ok(fd),
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(self.resolve_error(e, entry)),
        }
        let mut cur = PathBuf::new();
        let mut fd = rustix::fs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())
            .map_err(|e| ImageError::io("open", entry, e.into()))?;
        for comp in rel.components() {
            cur.push(comp);
            match rustix::fs::openat2(&self.root, &cur, DIR_FLAGS, Mode::empty(), beneath()) {
                Ok(next) => fd = next,
                Err(rustix::io::Errno::NOENT) => {
                    rustix::fs::mkdirat(&fd, comp.as_os_str(), Mode::from_raw_mode(0o755))
                        .map_err(|e| ImageError::io("mkdir", entry, e.into()))?;
                    fd = rustix::fs::openat2(&self.root, &cur, DIR_FLAGS, Mode::empty(), beneath())
                        .map_err(|e| self.resolve_error(e, entry))?;
                }
                Err(e) => return Err(self.resolve_error(e, entry)),
            }
        }
        Ok(fd)
    }

    fn resolve_error(&self, e: rustix::io::Errno, entry: &str) -> ImageError {
        match e {
            rustix::io::Errno::XDEV => hostile(
                entry,
                "it would be written through a symlink that points outside the image",
            ),
            rustix::io::Errno::NOTDIR => hostile(entry, "a parent of it is not a directory"),
            rustix::io::Errno::LOOP => hostile(entry, "a parent of it is a symlink loop"),
            other => ImageError::io("resolve", entry, other.into()),
        }
    }

    fn remove_existing(
        &self,
        dir: &OwnedFd,
        name: &std::ffi::OsStr,
        keep_dir: bool,
        entry: &str,
    ) -> Result<(), ImageError> {
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(ImageError::io("stat", entry, e.into())),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                if keep_dir {
                    Ok(())
                } else {
                    remove_tree_at(dir, name).map_err(|e| ImageError::io("remove", entry, e))
                }
            }
            Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty())
                .map_err(|e| ImageError::io("remove", entry, e.into())),
        }
    }

    fn entry<R: Read>(&mut self, mut e: tar::Entry<'_, R>) -> Result<(), ImageError> {
        let raw = e
            .path()
            .map_err(|err| ImageError::Format(format!("unreadable entry name: {err}")))?
            .into_owned();
        let shown = raw.display().to_string();
        let path = clean_path(&raw)?;
        let Some(name) = path.file_name().map(|n| n.to_os_string()) else {
            return Ok(()); // the archive's root directory itself
        };
        let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let name_str = name.to_string_lossy().to_string();

        if self.whiteouts && name_str.starts_with(".wh.") {
            let dir = self.dir(&parent, &shown)?;
            if name_str == ".wh..wh..opq" {
                self.make_opaque(&dir, &parent)
                    .map_err(|err| ImageError::io("opaque", &shown, err))?;
            } else {
                let victim = &name_str[4..];
                self.remove_existing(&dir, std::ffi::OsStr::new(victim), false, &shown)?;
            }
            return Ok(());
        }

        // Overlay attributes (opaque directories) of a snapshot layer.
        let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
        if self.overlay_layer
            && let Ok(Some(exts)) = e.pax_extensions()
        {
            for ext in exts.flatten() {
                if let Ok(key) = ext.key()
                    && let Some(name) = key.strip_prefix("SCHILY.xattr.")
                    && devbox_storage::layers::is_overlay_xattr(name)
                {
                    xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
        let header = e.header();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let uid = header.uid().unwrap_or(0);
        let gid = header.gid().unwrap_or(0);
        let mtime = header.mtime().unwrap_or(0);
        if uid > u32::MAX as u64 || gid > u32::MAX as u64 {
            return Err(hostile(&shown, "its owner id is out of range"));
        }
        let owner = (
            Some(rustix::fs::Uid::from_raw(uid as u32)),
            Some(rustix::fs::Gid::from_raw(gid as u32)),
        );

        let whiteout = kind.is_character_special()
            && header.device_major().ok().flatten() == Some(0)
            && header.device_minor().ok().flatten() == Some(0);
        if self.overlay_layer && whiteout {
            let dir = self.dir(&parent, &shown)?;
            self.remove_existing(&dir, &name, false, &shown)?;
            rustix::fs::mknodat(
                &dir,
                &name,
                FileType::CharacterDevice,
                Mode::from_raw_mode(0),
                0,
            )
            .map_err(|err| ImageError::io("whiteout", &shown, err.into()))?;
            rustix::fs::chownat(&dir, &name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|err| ImageError::io("chown", &shown, err.into()))?;
            self.written.insert(path);
            self.stats.entries += 1;
            return Ok(());
        }
        if kind.is_character_special() || kind.is_block_special() {
            if path.starts_with("dev") {
                self.stats.skipped_devices += 1;
                return Ok(());
            }
            return Err(hostile(
                &shown,
                "it is a device node (only dev/ may hold device nodes, and they are skipped)",
            ));
        }

        let dir = self.dir(&parent, &shown)?;
        let shown_ref = shown.as_str();
        let io = |op: &'static str| {
            move |err: rustix::io::Errno| ImageError::io(op, shown_ref, err.into())
        };
        if kind.is_dir() {
            self.remove_existing(&dir, &name, true, &shown)?;
            match rustix::fs::mkdirat(&dir, &name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(err) => return Err(io("mkdir")(err)),
            }
            let fd = rustix::fs::openat2(
                &dir,
                &name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                beneath(),
            )
            .map_err(|err| self.resolve_error(err, &shown))?;
            rustix::fs::fchown(&fd, owner.0, owner.1).map_err(io("chown"))?;
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(io("chmod"))?;
            for (k, v) in &xattrs {
                rustix::fs::fsetxattr(&fd, k.as_str(), v, rustix::fs::XattrFlags::empty())
                    .map_err(io("setxattr"))?;
            }
        } else if kind.is_file() || kind == tar::EntryType::Continuous || kind.is_gnu_sparse() {
            self.remove_existing(&dir, &name, false, &shown)?;
            let fd = rustix::fs::openat(
                &dir,
                &name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(io("create"))?;
            let mut file = std::fs::File::from(fd);
            let n =
                io::copy(&mut e, &mut file).map_err(|err| ImageError::io("write", &shown, err))?;
            self.stats.bytes += n;
            rustix::fs::fchown(&file, owner.0, owner.1).map_err(io("chown"))?;
            rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).map_err(io("chmod"))?;
            let ts = rustix::fs::Timespec {
                tv_sec: mtime as i64,
                tv_nsec: 0,
            };
            let _ = rustix::fs::futimens(
                &file,
                &Timestamps {
                    last_access: ts,
                    last_modification: ts,
                },
            );
        } else if kind.is_symlink() {
            let target = e
                .link_name()
                .map_err(|err| {
                    ImageError::Format(format!("{shown}: unreadable link target: {err}"))
                })?
                .ok_or_else(|| hostile(&shown, "a symlink without a target"))?
                .into_owned();
            self.remove_existing(&dir, &name, false, &shown)?;
            rustix::fs::symlinkat(&target, &dir, &name).map_err(io("symlink"))?;
            rustix::fs::chownat(&dir, &name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io("chown"))?;
        } else if kind.is_hard_link() {
            let target = e
                .link_name()
                .map_err(|err| {
                    ImageError::Format(format!("{shown}: unreadable link target: {err}"))
                })?
                .ok_or_else(|| hostile(&shown, "a hard link without a target"))?
                .into_owned();
            let target = clean_path(&target)?;
            let tname = target
                .file_name()
                .ok_or_else(|| hostile(&shown, "a hard link to the root"))?
                .to_os_string();
            let tdir = self.dir(target.parent().unwrap_or(Path::new("")), &shown)?;
            self.remove_existing(&dir, &name, false, &shown)?;
            rustix::fs::linkat(&tdir, &tname, &dir, &name, AtFlags::empty()).map_err(io("link"))?;
        } else if kind.is_fifo() {
            self.remove_existing(&dir, &name, false, &shown)?;
            rustix::fs::mknodat(&dir, &name, FileType::Fifo, Mode::from_raw_mode(mode), 0)
                .map_err(io("mkfifo"))?;
            rustix::fs::chownat(&dir, &name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io("chown"))?;
        } else {
            // PAX and GNU long-name headers are consumed by the reader; anything else is unusual.
            tracing::debug!(entry = %shown, ?kind, "skipping archive entry of unsupported type");
            return Ok(());
        }
        self.written.insert(path);
        self.stats.entries += 1;
        Ok(())
    }

    fn make_opaque(&self, dir: &OwnedFd, rel: &Path) -> io::Result<()> {
        let rd = rustix::fs::openat(
            dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut names = Vec::new();
        for ent in rustix::fs::Dir::read_from(&rd)? {
            let ent = ent?;
            let n = ent.file_name().to_bytes();
            if n == b"." || n == b".." {
                continue;
            }
            let name =
                std::ffi::OsStr::new(std::str::from_utf8(n).unwrap_or_default()).to_os_string();
            if !self.written.contains(&rel.join(&name)) {
                names.push(name);
            }
        }
        for n in names {
            match rustix::fs::statat(dir, &n, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                    remove_tree_at(dir, &n)?
                }
                Ok(_) => rustix::fs::unlinkat(dir, &n, AtFlags::empty())?,
                Err(_) => {}
            }
        }
        Ok(())
    }
}

/// Removes directory `name` under `dir` and everything in it, never following symlinks.
pub fn remove_tree_at(dir: &impl AsFd, name: &std::ffi::OsStr) -> io::Result<()> {
    let sub = rustix::fs::openat2(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH,
    )?;
    let mut children = Vec::new();
    for ent in rustix::fs::Dir::read_from(&sub)? {
        let ent = ent?;
        let n = ent.file_name().to_bytes().to_vec();
        if n == b"." || n == b".." {
            continue;
        }
        children.push((
            std::ffi::OsString::from(String::from_utf8_lossy(&n).to_string()),
            ent.file_type(),
        ));
    }
    for (n, t) in children {
        if t == FileType::Directory {
            remove_tree_at(&sub, &n)?;
        } else {
            rustix::fs::unlinkat(&sub, &n, AtFlags::empty())?;
        }
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    Ok(())
}

/// Extracts a (decompressed) tar stream into the existing directory `root`.
pub fn extract<R: Read>(
    reader: R,
    root: &Path,
    opts: ExtractOptions,
) -> Result<ExtractStats, ImageError> {
    let root_fd = rustix::fs::open(root, DIR_FLAGS, Mode::empty())
        .map_err(|e| ImageError::io("open", &root.display().to_string(), e.into()))?;
    let mut target = Target {
        root: root_fd,
        whiteouts: opts.whiteouts,
        overlay_layer: opts.overlay_layer,
        written: HashSet::new(),
        stats: ExtractStats::default(),
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| ImageError::Format(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::Format(format!("corrupt tar archive: {e}")))?;
        target.entry(entry)?;
    }
    Ok(target.stats)
}

/// Wraps a reader of possibly compressed data (gzip or zstd, detected by magic bytes).
pub fn decompressed<R: Read + 'static>(mut reader: R) -> Result<Box<dyn Read>, ImageError> {
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < 4 {
        match reader.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ImageError::io("read", "archive", e)),
        }
    }
    let head = io::Cursor::new(magic[..n].to_vec()).chain(reader);
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(head)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
            zstd::stream::read::Decoder::new(head)
                .map_err(|e| ImageError::io("zstd", "archive", e))?,
        ),
        _ => Box::new(head),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // set_path refuses '..' and absolute paths, so write the raw name for hostile cases.
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_path(path).unwrap();
        h.set_link_name(target).unwrap();
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }

    fn device(b: &mut tar::Builder<Vec<u8>>, path: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Char);
        h.set_size(0);
        h.set_path(path).unwrap();
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }

    #[test]
    fn plain_extraction() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tar_with(|b| {
            file(b, "./etc/hostname", b"box\n");
            symlink(b, "bin", "usr/bin");
            file(b, "usr/bin/tool", b"#!/bin/sh\n");
            file(b, "bin/via-link", b"x");
            device(b, "dev/null");
        });
        let st = extract(&data[..], tmp.path(), ExtractOptions::default()).unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("etc/hostname")).unwrap(),
            b"box\n"
        );
        assert_eq!(
            std::fs::read(tmp.path().join("usr/bin/via-link")).unwrap(),
            b"x"
        );
        assert_eq!(st.skipped_devices, 1);
    }

    #[test]
    fn hostile_entries_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("absolute", tar_with(|b| file(b, "/tmp/x-devbox-abs", b"x"))),
            (
                "dotdot",
                tar_with(|b| file(b, "a/../../x-devbox-dotdot", b"x")),
            ),
            (
                "symlink escape",
                tar_with(|b| {
                    symlink(b, "evil", outside.path().to_str().unwrap());
                    file(b, "evil/pwned", b"x");
                }),
            ),
            (
                "relative symlink escape",
                tar_with(|b| {
                    symlink(b, "up", "../../../../../../../..");
                    file(b, "up/tmp/pwned", b"x");
                }),
            ),
            ("device", tar_with(|b| device(b, "etc/sda"))),
        ];
        for (what, data) in cases {
            let root = tempfile::tempdir().unwrap();
            let err = extract(&data[..], root.path(), ExtractOptions::default()).unwrap_err();
            assert!(matches!(err, ImageError::Hostile { .. }), "{what}: {err}");
        }
        assert!(!outside.path().join("pwned").exists());
        assert!(!Path::new("/tmp/pwned").exists());
    }

    #[test]
    fn whiteouts_apply_to_lower_layers() {
        let tmp = tempfile::tempdir().unwrap();
        let lower = tar_with(|b| {
            file(b, "a/keep", b"1");
            file(b, "a/gone", b"2");
            file(b, "o/old", b"3");
        });
        extract(
            &lower[..],
            tmp.path(),
            ExtractOptions {
                whiteouts: true,
                ..Default::default()
            },
        )
        .unwrap();
        let upper = tar_with(|b| {
            file(b, "a/.wh.gone", b"");
            file(b, "o/new", b"4");
            file(b, "o/.wh..wh..opq", b"");
        });
        extract(
            &upper[..],
            tmp.path(),
            ExtractOptions {
                whiteouts: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(tmp.path().join("a/keep").exists());
        assert!(!tmp.path().join("a/gone").exists());
        assert!(!tmp.path().join("o/old").exists());
        assert!(tmp.path().join("o/new").exists());
    }
}
