//! Safe extraction of tar archives into a directory.
//!
//! Archives are untrusted. Every path is resolved with `openat2(RESOLVE_BENEATH)` from the
//! target root, so nothing is ever written outside it: an entry with an absolute path or a
//! `..` component, or one that would be written through a symlink pointing out of the root,
//! is refused with an error naming it. Device nodes are refused, except under `dev/`, where
//! they are skipped (dev-box provides /dev itself). Ownership and modes are kept (ids are
//! stored unshifted: uid 0 is the sandbox's root).
//!
//! Sizes are bounded before anything is written ([`Budget`]): each entry's size, as its
//! header declares it, is charged against a cap on the import's apparent size
//! (`DEVBOX_IMPORT_MAX_BYTES`) and against the pool's free space less a reserve, and an entry
//! over either is refused before a byte of it is written. File contents are written with
//! their runs of zeros left as holes (GNU sparse entries included), so sparse files stay
//! sparse. The tar stream itself is checked as it is read ([`guarded`]): extension headers
//! (long names, PAX records) larger than 1 MiB are refused before the tar reader buffers them.
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

/// The environment variable that caps the apparent size of one import.
pub const MAX_BYTES_VAR: &str = "DEVBOX_IMPORT_MAX_BYTES";
/// The cap's default: 64 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 30;
/// What every entry costs the pool beyond its data (inode, directory entry, block rounding).
const ENTRY_OVERHEAD: u64 = 4096;
/// Largest extension header (GNU long name or link, PAX records) accepted.
const MAX_EXTENSION: u64 = 1 << 20;
/// Zeros this long, aligned in the file, are left as holes.
const HOLE_BLOCK: usize = 4096;

/// Bytes as a person reads them (`1.5 GiB`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Parses a size: bytes, or a number with K, M, G or T (powers of 1024; `Ki`, `KiB` and `KB`
/// are read the same way).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split].parse().ok()?;
    let shift = match t[split..].trim() {
        "" | "B" => 0,
        "K" | "Ki" | "KiB" | "KB" | "k" => 10,
        "M" | "Mi" | "MiB" | "MB" => 20,
        "G" | "Gi" | "GiB" | "GB" => 30,
        "T" | "Ti" | "TiB" | "TB" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// The cap on one import's apparent size: `DEVBOX_IMPORT_MAX_BYTES`, or 64 GiB.
pub fn max_bytes_from_env() -> Result<u64, ImageError> {
    match std::env::var(MAX_BYTES_VAR) {
        Err(_) => Ok(DEFAULT_MAX_BYTES),
        Ok(v) if v.trim().is_empty() => Ok(DEFAULT_MAX_BYTES),
        Ok(v) => match parse_size(&v) {
            Some(n) if n > 0 => Ok(n),
            _ => Err(ImageError::Format(format!(
                "{MAX_BYTES_VAR}={v:?} is not a size: give bytes, or a number with K, M, G or T (such as 64G)"
            ))),
        },
    }
}

/// What an import may still write, checked before each entry is written.
///
/// Two bounds on the sum of the entries' sizes as their headers declare them (the apparent
/// sizes, sparse or not): the cap (`DEVBOX_IMPORT_MAX_BYTES`), and the pool's free space
/// less a reserve (a twentieth of the pool, at least 32 MiB), each entry also costing 4 KiB
/// there, so an import never fills the pool that running sandboxes write to. Holes are not
/// counted on: a sparse file is written sparse, but it must fit as if it were not (the
/// sandbox may fill it in later), and an archive cannot tell the import it is sparse until
/// its data has been read.
#[derive(Debug, Clone)]
pub struct Budget {
    max_bytes: u64,
    max_alloc: u64,
    apparent: u64,
    alloc: u64,
    /// The pool whose free space bounds `max_alloc`: running out of it is the pool's full
    /// error, as for any other write that does not fit.
    pool: Option<devbox_storage::Pool>,
}

impl Budget {
    /// A budget of `max_bytes` apparent bytes and `max_alloc` bytes of the pool.
    pub fn new(max_bytes: u64, max_alloc: u64) -> Self {
        Self {
            max_bytes,
            max_alloc,
            apparent: 0,
            alloc: 0,
            pool: None,
        }
    }

    /// No bounds (tests, fuzzing).
    pub fn unlimited() -> Self {
        Self::new(u64::MAX, u64::MAX)
    }

    /// The budget of an import into `pool`: the configured cap, and the pool's free space
    /// now less a reserve.
    pub fn for_pool(pool: &devbox_storage::Pool) -> Result<Self, ImageError> {
        let max = max_bytes_from_env()?;
        let info = pool.info();
        let reserve = (info.total_bytes / 20).max(32 << 20);
        let mut budget = Self::new(max, info.free_bytes.saturating_sub(reserve));
        budget.pool = Some(pool.clone());
        Ok(budget)
    }

    /// The cap on apparent bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Charges an entry of `apparent` bytes, or refuses it.
    pub fn charge(&mut self, entry: &str, apparent: u64) -> Result<(), ImageError> {
        let apparent_total = self.apparent.saturating_add(apparent);
        if apparent_total > self.max_bytes {
            return Err(hostile(
                entry,
                format!(
                    "its {} would bring the import to {}, over the limit of {} ({MAX_BYTES_VAR})",
                    human(apparent),
                    human(apparent_total),
                    human(self.max_bytes)
                ),
            ));
        }
        let alloc_total = self
            .alloc
            .saturating_add(apparent)
            .saturating_add(ENTRY_OVERHEAD);
        if alloc_total > self.max_alloc {
            return Err(hostile(
                entry,
                format!(
                    "the import would need up to {} of the pool, which has {} to spare (its free space less a reserve){}",
                    human(alloc_total),
                    human(self.max_alloc),
                    // Said as for any other write that does not fit.
                    self.pool
                        .as_ref()
                        .map(|p| format!(": {}", p.full()))
                        .unwrap_or_default()
                ),
            ));
        }
        self.apparent = apparent_total;
        self.alloc = alloc_total;
        Ok(())
    }
}

fn all_zero(b: &[u8]) -> bool {
    // A fold without an early exit: the compiler vectorises it.
    b.chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, x| acc | x) == 0)
}

/// Writes `data` at `offset` of `file`, leaving 4 KiB blocks of zeros (aligned in the file
/// when `offset` is) unwritten: holes. The caller sets the file's length at the end.
pub fn write_holey(file: &std::fs::File, offset: u64, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut i = 0;
    while i < data.len() {
        let start = i;
        while i < data.len() && !all_zero(&data[i..(i + HOLE_BLOCK).min(data.len())]) {
            i = (i + HOLE_BLOCK).min(data.len());
        }
        if i > start {
            file.write_all_at(&data[start..i], offset + start as u64)?;
        }
        while i < data.len() && all_zero(&data[i..(i + HOLE_BLOCK).min(data.len())]) {
            i = (i + HOLE_BLOCK).min(data.len());
        }
    }
    Ok(())
}

/// Copies `src` into the empty `file`, runs of zeros left as holes; returns the length.
pub fn copy_sparse(src: &mut impl Read, file: &std::fs::File) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut pos = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match src.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        write_holey(file, pos, &buf[..n])?;
        pos += n as u64;
        if n < buf.len() {
            break;
        }
    }
    file.set_len(pos)?;
    Ok(pos)
}

/// A tar stream checked as it is read: an extension header (GNU long name or long link,
/// PAX records) over 1 MiB is refused before the tar reader, which buffers them whole, sees
/// it. Wrap every untrusted tar stream in it before handing it to [`tar::Archive`].
pub fn guarded<R: Read>(inner: R) -> TarGuard<R> {
    TarGuard {
        inner,
        block: Vec::with_capacity(512),
        state: GuardState::Header,
        pax: None,
        pax_size: None,
        done: false,
    }
}

#[derive(Debug)]
enum GuardState {
    /// Reading a 512-byte header.
    Header,
    /// Reading GNU sparse extension blocks; the entry's data (`padded` bytes with padding,
    /// `size` without) follows them.
    SparseExt { padded: u64, size: u64 },
    /// Passing `left` bytes of an entry's data and padding; `data` of them are data.
    Data { left: u64, data: u64 },
}

/// See [`guarded`].
#[derive(Debug)]
pub struct TarGuard<R> {
    inner: R,
    block: Vec<u8>,
    state: GuardState,
    /// Records of the PAX header being read.
    pax: Option<Vec<u8>>,
    /// A `size` from the last PAX header, for the entry it describes.
    pax_size: Option<u64>,
    done: bool,
}

fn tar_number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        if field[0] == 0xff {
            return None;
        }
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(v);
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| *b != 0 && *b != b' ')
        .collect();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&text).ok()?, 8).ok()
}

fn pax_size_of(records: &[u8]) -> Option<u64> {
    let mut rest = records;
    let mut found = None;
    while !rest.is_empty() {
        let Some(sp) = rest.iter().position(|b| *b == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|t| t.parse::<usize>().ok())
        else {
            break;
        };
        if len <= sp || len > rest.len() {
            break;
        }
        let rec = &rest[sp + 1..len];
        if let Some(v) = rec.strip_prefix(b"size=") {
            let v = v.strip_suffix(b"\n").unwrap_or(v);
            found = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
        }
        rest = &rest[len..];
    }
    found
}

impl<R: Read> TarGuard<R> {
    fn refuse(why: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    fn header(&mut self) -> io::Result<()> {
        let h = std::mem::take(&mut self.block);
        if all_zero(&h) {
            // End of the archive: what follows is padding the tar reader never parses.
            self.done = true;
            return Ok(());
        }
        let kind = h[156];
        let declared = tar_number(&h[124..136])
            .ok_or_else(|| Self::refuse("a tar header with an unreadable size".into()))?;
        let extension = matches!(kind, b'x' | b'L' | b'K');
        // A PAX `size` applies to every header up to the entry it describes, as the tar
        // reader applies it.
        let size = self.pax_size.unwrap_or(declared);
        if !extension {
            self.pax_size = None;
        }
        if extension && size > MAX_EXTENSION {
            return Err(Self::refuse(format!(
                "a tar extension header of {} (more than {})",
                human(size),
                human(MAX_EXTENSION)
            )));
        }
        if kind == b'x' {
            self.pax = Some(Vec::with_capacity(size as usize));
        }
        let padded = size
            .checked_add(511)
            .ok_or_else(|| Self::refuse("a tar entry size overflows".into()))?
            & !511;
        self.state = if kind == b'S' && h[482] != 0 {
            GuardState::SparseExt { padded, size }
        } else {
            self.data_state(padded, size)
        };
        Ok(())
    }

    fn data_state(&mut self, padded: u64, size: u64) -> GuardState {
        if padded == 0 {
            self.finish_data();
            GuardState::Header
        } else {
            GuardState::Data {
                left: padded,
                data: size,
            }
        }
    }

    fn finish_data(&mut self) {
        if let Some(records) = self.pax.take() {
            self.pax_size = pax_size_of(&records);
        }
    }

    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() && !self.done {
            match self.state {
                GuardState::Header | GuardState::SparseExt { .. } => {
                    let take = (512 - self.block.len()).min(bytes.len());
                    self.block.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.block.len() < 512 {
                        continue;
                    }
                    if let GuardState::SparseExt { padded, size } = self.state {
                        let ext = std::mem::take(&mut self.block);
                        if ext[504] == 0 {
                            self.state = self.data_state(padded, size);
                        }
                    } else {
                        self.header()?;
                    }
                }
                GuardState::Data { left, data } => {
                    let take = left.min(bytes.len() as u64);
                    let data_here = data.min(take) as usize;
                    if let Some(p) = self.pax.as_mut() {
                        p.extend_from_slice(&bytes[..data_here]);
                    }
                    bytes = &bytes[take as usize..];
                    if left == take {
                        self.finish_data();
                        self.state = GuardState::Header;
                    } else {
                        self.state = GuardState::Data {
                            left: left - take,
                            data: data - data_here as u64,
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
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

struct Target<'b> {
    root: OwnedFd,
    budget: &'b mut Budget,
    whiteouts: bool,
    overlay_layer: bool,
    /// Paths written by the current archive (opaque markers keep these).
    written: HashSet<PathBuf>,
    stats: ExtractStats,
}

impl Target<'_> {
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

        // Bounded before anything of the entry is written.
        let kind = e.header().entry_type();
        let file_like =
            kind.is_file() || kind == tar::EntryType::Continuous || kind.is_gnu_sparse();
        let apparent = if file_like { e.size() } else { 0 };
        self.budget.charge(&shown, apparent)?;

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
        } else if file_like {
            self.remove_existing(&dir, &name, false, &shown)?;
            let fd = rustix::fs::openat(
                &dir,
                &name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(io("create"))?;
            let file = std::fs::File::from(fd);
            let n =
                copy_sparse(&mut e, &file).map_err(|err| ImageError::io("write", &shown, err))?;
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

/// Extracts a (decompressed) tar stream into the existing directory `root`, within `budget`.
pub fn extract<R: Read>(
    reader: R,
    root: &Path,
    opts: ExtractOptions,
    budget: &mut Budget,
) -> Result<ExtractStats, ImageError> {
    let root_fd = rustix::fs::open(root, DIR_FLAGS, Mode::empty())
        .map_err(|e| ImageError::io("open", &root.display().to_string(), e.into()))?;
    let mut target = Target {
        root: root_fd,
        budget,
        whiteouts: opts.whiteouts,
        overlay_layer: opts.overlay_layer,
        written: HashSet::new(),
        stats: ExtractStats::default(),
    };
    let mut archive = tar::Archive::new(guarded(reader));
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
pub fn decompressed<'a, R: Read + 'a>(mut reader: R) -> Result<Box<dyn Read + 'a>, ImageError> {
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
        let st = extract(
            &data[..],
            tmp.path(),
            ExtractOptions::default(),
            &mut Budget::unlimited(),
        )
        .unwrap();
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
            let err = extract(
                &data[..],
                root.path(),
                ExtractOptions::default(),
                &mut Budget::unlimited(),
            )
            .unwrap_err();
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
            &mut Budget::unlimited(),
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
            &mut Budget::unlimited(),
        )
        .unwrap();
        assert!(tmp.path().join("a/keep").exists());
        assert!(!tmp.path().join("a/gone").exists());
        assert!(!tmp.path().join("o/old").exists());
        assert!(tmp.path().join("o/new").exists());
    }

    /// A base-256 number field.
    fn num(field: &mut [u8], v: u64) {
        field.fill(0);
        field[0] = 0x80;
        let n = field.len();
        field[n - 8..].copy_from_slice(&v.to_be_bytes());
    }

    /// A GNU sparse entry of `apparent` bytes whose only data, `data`, ends the file.
    pub(crate) fn sparse(b: &mut tar::Builder<Vec<u8>>, path: &str, apparent: u64, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_size(data.len() as u64);
        let g = h.as_gnu_mut().unwrap();
        num(&mut g.realsize, apparent);
        num(&mut g.sparse[0].offset, apparent - data.len() as u64);
        num(&mut g.sparse[0].numbytes, data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn blocks(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    fn is_empty_dir(path: &Path) -> bool {
        std::fs::read_dir(path).unwrap().next().is_none()
    }

    #[test]
    fn sparse_files_stay_sparse() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dense = vec![0u8; 8 << 20];
        dense[..4].copy_from_slice(b"head");
        let n = dense.len();
        dense[n - 4..].copy_from_slice(b"tail");
        let data = tar_with(|b| {
            file(b, "zeros", &dense);
            sparse(b, "huge", 256 << 20, b"end\n");
        });
        extract(
            &data[..],
            tmp.path(),
            ExtractOptions::default(),
            &mut Budget::new(2 << 30, 1 << 30),
        )
        .unwrap();
        assert_eq!(std::fs::read(tmp.path().join("zeros")).unwrap(), dense);
        assert!(blocks(&tmp.path().join("zeros")) < 1 << 20, "holes kept");
        let huge = tmp.path().join("huge");
        assert_eq!(std::fs::metadata(&huge).unwrap().len(), 256 << 20);
        assert!(blocks(&huge) < 1 << 20, "holes kept");
        let mut f = std::fs::File::open(&huge).unwrap();
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::End(-4)).unwrap();
        let mut tail = String::new();
        f.read_to_string(&mut tail).unwrap();
        assert_eq!(tail, "end\n");
    }

    #[test]
    fn sizes_are_bounded_before_writing() {
        // Over the cap: a 10 GiB sparse file in a tiny archive.
        let bomb = tar_with(|b| sparse(b, "bomb", 10 << 30, b"x"));
        assert!(bomb.len() < 4096);
        let tmp = tempfile::tempdir().unwrap();
        let err = extract(
            &bomb[..],
            tmp.path(),
            ExtractOptions::default(),
            &mut Budget::new(1 << 30, u64::MAX),
        )
        .unwrap_err();
        assert!(err.to_string().contains(MAX_BYTES_VAR), "{err}");
        assert!(is_empty_dir(tmp.path()), "nothing written");
        // Over the pool's free space: a dense entry that could not be stored.
        let big = tar_with(|b| {
            file(b, "a", b"small");
            file(b, "b", &vec![1u8; 2 << 20]);
        });
        let tmp = tempfile::tempdir().unwrap();
        let err = extract(
            &big[..],
            tmp.path(),
            ExtractOptions::default(),
            &mut Budget::new(u64::MAX, 1 << 20),
        )
        .unwrap_err();
        assert!(err.to_string().contains("pool"), "{err}");
        assert!(!tmp.path().join("b").exists(), "refused before writing");
        // The budget spans extractions (layers of one image).
        let mut budget = Budget::new(3 << 20, u64::MAX);
        let two = tar_with(|b| file(b, "two", &vec![1u8; 2 << 20]));
        let tmp = tempfile::tempdir().unwrap();
        extract(&two[..], tmp.path(), ExtractOptions::default(), &mut budget).unwrap();
        let err = extract(&two[..], tmp.path(), ExtractOptions::default(), &mut budget);
        assert!(err.is_err());
        // A sparse file must fit the pool as if it were not: holes are not counted on.
        let tmp = tempfile::tempdir().unwrap();
        let holey = tar_with(|b| sparse(b, "bomb", 256 << 20, b"x"));
        let err = extract(
            &holey[..],
            tmp.path(),
            ExtractOptions::default(),
            &mut Budget::new(u64::MAX, 128 << 20),
        )
        .unwrap_err();
        assert!(err.to_string().contains("pool"), "{err}");
        assert!(is_empty_dir(tmp.path()), "nothing written");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("64G"), Some(64 << 30));
        assert_eq!(parse_size("512Mi"), Some(512 << 20));
        assert_eq!(parse_size("2TiB"), Some(2 << 40));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("99999999999999T"), None);
        assert_eq!(human(10 << 30), "10.0 GiB");
    }

    /// An extension entry (`x` PAX records, `L` long name) of `size` bytes, raw.
    fn extension(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_path("././@LongLink").unwrap();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    #[test]
    fn oversized_extension_headers_are_refused() {
        for kind in [
            tar::EntryType::XHeader,
            tar::EntryType::GNULongName,
            tar::EntryType::GNULongLink,
        ] {
            let data = tar_with(|b| {
                extension(b, kind, &vec![b'a'; 2 << 20]);
                file(b, "x", b"x");
            });
            let tmp = tempfile::tempdir().unwrap();
            let err = extract(
                &data[..],
                tmp.path(),
                ExtractOptions::default(),
                &mut Budget::unlimited(),
            )
            .unwrap_err();
            assert!(
                err.to_string().contains("extension header"),
                "{kind:?}: {err}"
            );
        }
        // Long names of ordinary length still work.
        let long = format!("{}/{}/file", "d".repeat(200), "e".repeat(200));
        let data = tar_with(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_size(2);
            h.set_mode(0o644);
            b.append_data(&mut h, &long, &b"ok"[..]).unwrap();
        });
        let tmp = tempfile::tempdir().unwrap();
        extract(
            &data[..],
            tmp.path(),
            ExtractOptions::default(),
            &mut Budget::unlimited(),
        )
        .unwrap();
        assert_eq!(std::fs::read(tmp.path().join(&long)).unwrap(), b"ok");
    }

    #[test]
    fn the_guard_follows_pax_sizes() {
        // The file's data looks like a long-name header of 2 MiB; the entry's size comes from
        // a PAX record (its header says 0). A guard that lost its place would refuse it.
        let mut fake = tar::Header::new_gnu();
        fake.set_path("././@LongLink").unwrap();
        fake.set_entry_type(tar::EntryType::GNULongName);
        fake.set_size(2 << 20);
        fake.set_cksum();
        let mut content = fake.as_bytes().to_vec();
        content.extend_from_slice(&[7u8; 512]);
        let record = format!("size={}\n", content.len());
        let rec = format!("{} {record}", record.len() + 3);
        assert_eq!(rec.len(), record.len() + 3);
        let data = tar_with(|b| {
            extension(b, tar::EntryType::XHeader, rec.as_bytes());
            let mut h = tar::Header::new_gnu();
            h.set_path("payload").unwrap();
            h.set_size(0);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, &content[..]).unwrap();
            file(b, "after", b"fine");
        });
        let tmp = tempfile::tempdir().unwrap();
        extract(
            &data[..],
            tmp.path(),
            ExtractOptions::default(),
            &mut Budget::unlimited(),
        )
        .unwrap();
        assert_eq!(std::fs::read(tmp.path().join("payload")).unwrap(), content);
        assert_eq!(std::fs::read(tmp.path().join("after")).unwrap(), b"fine");
    }
}
