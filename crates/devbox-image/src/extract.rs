//! Safe extraction of tar archives into a directory.
//!
//! Archives are untrusted. Every path is resolved one component at a time with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`
//! from the target root, so nothing is ever written outside it or through a link: an entry
//! with an absolute path or a `..` component, or one whose parent path passes through a
//! symlink (the archive's own or an earlier layer's), is refused with an error naming it.
//! Refused rather than the link replaced: an archive made from a filesystem never has an
//! entry below a symlink, and replacing the link would change what the archive's own link
//! means. A later layer may still replace a symlink by a directory (the entry's own name is
//! never resolved through the link). Device nodes are refused, except under `dev/`, where
//! they are skipped (dev-box provides /dev itself). Ownership and modes are kept (ids are
//! stored unshifted: uid 0 is the sandbox's root).
//!
//! Sizes are bounded before anything is written ([`Budget`]): each entry's size, as its
//! header declares it, is charged against a cap on the import's apparent size
//! (`DEVBOX_IMPORT_MAX_BYTES`) and against the pool's free space less a reserve, and an entry
//! over either is refused before a byte of it is written. File contents are written with
//! their runs of zeros left as holes (GNU sparse entries included), so sparse files stay
//! sparse. The tar stream itself is checked as it is read ([`guarded`]): extension headers
//! (long names, PAX records) larger than 1 MiB are refused before the tar reader buffers them,
//! and more than 10 KiB after the end-of-archive marker is refused. Everything the stream
//! inflates to counts against the cap: skipped data, headers and padding too. Names and
//! link targets longer than 4096 bytes, more than 4 million entries or 256 MiB of names in
//! one import are refused.
//!
//! With `whiteouts` on (OCI and docker layers), `.wh.NAME` deletes NAME and `.wh..wh..opq`
//! empties a directory of what earlier layers put there.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
/// Longest name or link target of an entry (PATH_MAX).
pub const MAX_NAME: usize = 4096;
/// Most entries in one import.
pub const MAX_ENTRIES: u64 = 4_000_000;
/// Most bytes of names and link targets in one import.
pub const MAX_NAME_BYTES: u64 = 256 << 20;
/// Most bytes after the end-of-archive marker: GNU tar and Python's tarfile pad an archive
/// to a record of 10240 bytes, so the second zero block and that padding may follow the
/// first zero block; Docker and the tar crate write only the second zero block.
pub const MAX_TRAILER: u64 = 10240;
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
///
/// The cap bounds everything an import decompresses, not only what it writes: every entry's
/// declared data is charged whether it is written or skipped (a directory or link that
/// declares data, a device under dev/), and a [`guarded_within`] stream charges, as they
/// pass, the bytes that belong to no entry (headers, extension records, padding, what
/// follows the end-of-archive marker, itself refused beyond 10 KiB). So a small archive
/// that inflates to terabytes is refused once it has inflated past the cap, whatever the
/// bytes are.
///
/// Names are bounded too, as the import holds some of them in memory: a name or link target
/// longer than 4096 bytes (PATH_MAX) is refused, as is an import of more than 4 million
/// entries or of more than 256 MiB of names and link targets in all.
#[derive(Debug)]
pub struct Budget {
    max_bytes: u64,
    max_alloc: u64,
    alloc: u64,
    /// Apparent bytes charged plus the stream bytes guards charged; shared with the guards
    /// of [`guarded_within`].
    used: Arc<AtomicU64>,
    entries: u64,
    max_entries: u64,
    name_bytes: u64,
    max_name_bytes: u64,
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
            alloc: 0,
            used: Arc::new(AtomicU64::new(0)),
            entries: 0,
            max_entries: MAX_ENTRIES,
            name_bytes: 0,
            max_name_bytes: MAX_NAME_BYTES,
            pool: None,
        }
    }

    /// No bounds on sizes (tests, fuzzing); names and entries are still bounded.
    pub fn unlimited() -> Self {
        Self::new(u64::MAX, u64::MAX)
    }

    /// The same budget with other bounds on the number of entries and on the bytes of
    /// their names (the defaults are 4 million and 256 MiB).
    pub fn with_entry_limits(mut self, max_entries: u64, max_name_bytes: u64) -> Self {
        self.max_entries = max_entries;
        self.max_name_bytes = max_name_bytes;
        self
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

    /// Bytes charged against the cap so far (apparent sizes and stream overhead).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Charges an entry of `apparent` bytes, or refuses it.
    pub fn charge(&mut self, entry: &str, apparent: u64) -> Result<(), ImageError> {
        self.charge_data(entry, apparent, apparent)
    }

    /// Charges `data` bytes against the cap and `stored` bytes (plus an entry's overhead)
    /// against the pool, or refuses them.
    fn charge_data(&mut self, entry: &str, data: u64, stored: u64) -> Result<(), ImageError> {
        let used = self.used.load(Ordering::Relaxed);
        let apparent_total = used.saturating_add(data);
        if apparent_total > self.max_bytes {
            return Err(hostile(
                entry,
                format!(
                    "its {} would bring the import to {}, over the limit of {} ({MAX_BYTES_VAR})",
                    human(data),
                    human(apparent_total),
                    human(self.max_bytes)
                ),
            ));
        }
        let alloc_total = self
            .alloc
            .saturating_add(stored)
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
        self.used.store(apparent_total, Ordering::Relaxed);
        self.alloc = alloc_total;
        Ok(())
    }

    /// Checks and charges one archive entry before anything of it is done: its name and
    /// link target (raw bytes) against PATH_MAX and the import's bounds on entries and name
    /// bytes, its declared data (written or skipped) against the cap, and, when it is a
    /// file the import writes, that data against the pool.
    pub fn charge_entry(
        &mut self,
        shown: &str,
        name: &[u8],
        link: Option<&[u8]>,
        data: u64,
        writes_data: bool,
    ) -> Result<(), ImageError> {
        if name.len() > MAX_NAME {
            return Err(hostile(
                shown,
                format!(
                    "its name is {} bytes long, more than a path may be ({MAX_NAME} bytes)",
                    name.len()
                ),
            ));
        }
        let link_len = link.map_or(0, <[u8]>::len);
        if link_len > MAX_NAME {
            return Err(hostile(
                shown,
                format!(
                    "its link target is {link_len} bytes long, more than a path may be ({MAX_NAME} bytes)"
                ),
            ));
        }
        self.entries += 1;
        if self.entries > self.max_entries {
            return Err(hostile(
                shown,
                format!(
                    "the import has more than {} entries, the most dev-box takes in one import",
                    self.max_entries
                ),
            ));
        }
        self.name_bytes += (name.len() + link_len) as u64;
        if self.name_bytes > self.max_name_bytes {
            return Err(hostile(
                shown,
                format!(
                    "the import's names and link targets add up to more than {}, the most dev-box takes in one import",
                    human(self.max_name_bytes)
                ),
            ));
        }
        self.charge_data(shown, data, if writes_data { data } else { 0 })
    }

    fn meter(&self) -> Meter {
        Meter {
            used: Arc::clone(&self.used),
            max: self.max_bytes,
        }
    }
}

/// A guard's share of a [`Budget`]: the bytes of a stream that belong to no entry.
#[derive(Debug)]
struct Meter {
    used: Arc<AtomicU64>,
    max: u64,
}

impl Meter {
    fn charge(&self, n: u64) -> io::Result<()> {
        let total = self.used.fetch_add(n, Ordering::Relaxed).saturating_add(n);
        if total > self.max {
            return Err(refuse(format!(
                "the archive inflates to more than the limit of {} ({MAX_BYTES_VAR}) counting its headers and padding",
                human(self.max)
            )));
        }
        Ok(())
    }
}

/// An error of a [`TarGuard`]: the stream is refused.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refuse(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, Refused(why))
}

/// The reason a guard refused the stream, if `e` is that.
pub fn refused_by_guard(e: &io::Error) -> Option<String> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Refused>())
        .map(|r| r.0.clone())
}

/// An entry's name as errors show it: at most 200 characters.
pub fn shown_name(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    if text.chars().count() <= 200 {
        text.into_owned()
    } else {
        let head: String = text.chars().take(200).collect();
        format!("{head}… ({} bytes)", raw.len())
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
/// it, and so is more than 10 KiB of data after the end-of-archive marker. Wrap every
/// untrusted tar stream in it before handing it to [`tar::Archive`].
pub fn guarded<R: Read>(inner: R) -> TarGuard<R> {
    TarGuard {
        inner,
        block: Vec::with_capacity(512),
        state: GuardState::Header,
        pax: None,
        pax_size: None,
        done: false,
        trailer: 0,
        meter: None,
    }
}

/// [`guarded`], and the bytes of the stream that belong to no entry's data (headers,
/// extension records, padding, the trailer) are charged against `budget`'s cap as they
/// pass. The consumer charges each entry's data ([`Budget::charge_entry`]).
pub fn guarded_within<R: Read>(inner: R, budget: &Budget) -> TarGuard<R> {
    let mut g = guarded(inner);
    g.meter = Some(budget.meter());
    g
}

#[derive(Debug)]
enum GuardState {
    /// Reading a 512-byte header.
    Header,
    /// Reading GNU sparse extension blocks; the entry's data (`padded` bytes with padding,
    /// `size` without) follows them.
    SparseExt { padded: u64, size: u64 },
    /// Passing `left` bytes of an entry's data and padding; `data` of them are data, which
    /// belong to an entry (its consumer charges them) unless `extension`.
    Data {
        left: u64,
        data: u64,
        extension: bool,
    },
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
    /// The end-of-archive marker was read.
    done: bool,
    /// Bytes read after the marker.
    trailer: u64,
    meter: Option<Meter>,
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
    /// Reads what is left of the stream after the end-of-archive marker (at most
    /// [`MAX_TRAILER`] bytes, or the read fails), so a digest of the stream covers it all.
    pub fn drain(&mut self) -> io::Result<u64> {
        io::copy(self, &mut io::sink())
    }

    fn charge(&self, n: u64) -> io::Result<()> {
        match &self.meter {
            Some(m) if n > 0 => m.charge(n),
            _ => Ok(()),
        }
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
            .ok_or_else(|| refuse("a tar header with an unreadable size".into()))?;
        let extension = matches!(kind, b'x' | b'L' | b'K');
        // A PAX `size` applies to every header up to the entry it describes, as the tar
        // reader applies it.
        let size = self.pax_size.unwrap_or(declared);
        if !extension {
            self.pax_size = None;
        }
        if extension && size > MAX_EXTENSION {
            return Err(refuse(format!(
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
            .ok_or_else(|| refuse("a tar entry size overflows".into()))?
            & !511;
        self.state = if kind == b'S' && h[482] != 0 {
            GuardState::SparseExt { padded, size }
        } else {
            self.data_state(padded, size, extension)
        };
        Ok(())
    }

    fn data_state(&mut self, padded: u64, size: u64, extension: bool) -> GuardState {
        if padded == 0 {
            self.finish_data();
            GuardState::Header
        } else {
            GuardState::Data {
                left: padded,
                data: size,
                extension,
            }
        }
    }

    fn finish_data(&mut self) {
        if let Some(records) = self.pax.take() {
            self.pax_size = pax_size_of(&records);
        }
    }

    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.done {
                let n = bytes.len() as u64;
                self.trailer = self.trailer.saturating_add(n);
                self.charge(n)?;
                if self.trailer > MAX_TRAILER {
                    return Err(refuse(format!(
                        "more than {} of data follows the end of the tar archive (tar writers pad to at most {MAX_TRAILER} bytes)",
                        human(MAX_TRAILER)
                    )));
                }
                return Ok(());
            }
            match self.state {
                GuardState::Header | GuardState::SparseExt { .. } => {
                    let take = (512 - self.block.len()).min(bytes.len());
                    self.block.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    self.charge(take as u64)?;
                    if self.block.len() < 512 {
                        continue;
                    }
                    if let GuardState::SparseExt { padded, size } = self.state {
                        let ext = std::mem::take(&mut self.block);
                        if ext[504] == 0 {
                            self.state = self.data_state(padded, size, false);
                        }
                    } else {
                        self.header()?;
                    }
                }
                GuardState::Data {
                    left,
                    data,
                    extension,
                } => {
                    let take = left.min(bytes.len() as u64);
                    let data_here = data.min(take) as usize;
                    if let Some(p) = self.pax.as_mut() {
                        p.extend_from_slice(&bytes[..data_here]);
                    }
                    // An entry's data is charged by its consumer; extension records and
                    // padding here.
                    let overhead = if extension {
                        take
                    } else {
                        take - data_here as u64
                    };
                    self.charge(overhead)?;
                    bytes = &bytes[take as usize..];
                    if left == take {
                        self.finish_data();
                        self.state = GuardState::Header;
                    } else {
                        self.state = GuardState::Data {
                            left: left - take,
                            data: data - data_here as u64,
                            extension,
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

/// How the extractor resolves a path below the root: never above it, never through a
/// symlink (the archive's own or an earlier layer's), never through a magic link or onto
/// another filesystem.
fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_MAGICLINKS
        | ResolveFlags::NO_XDEV
}

/// A path as the `written` set keeps it: 16 bytes of its sha256, whatever its length.
fn path_key(p: &Path) -> [u8; 16] {
    use sha2::Digest;
    let d = sha2::Sha256::digest(p.as_os_str().as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&d[..16]);
    k
}

struct Target<'b> {
    root: OwnedFd,
    budget: &'b mut Budget,
    whiteouts: bool,
    overlay_layer: bool,
    /// Paths written by the current archive (opaque markers keep these), as [`path_key`]s.
    written: HashSet<[u8; 16]>,
    stats: ExtractStats,
}

impl Target<'_> {
    /// Opens (creating as needed) directory `rel` beneath the root, one component at a
    /// time from its parent's descriptor; a component that is a symlink is refused.
    fn dir(&self, rel: &Path, entry: &str) -> Result<OwnedFd, ImageError> {
        let mut fd = rustix::fs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())
            .map_err(|e| ImageError::io("open", entry, e.into()))?;
        if rel.as_os_str().is_empty() {
            return Ok(fd);
        }
        match rustix::fs::openat2(&self.root, rel, DIR_FLAGS, Mode::empty(), beneath()) {
            Ok(fd) => return Ok(fd),
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(self.resolve_error(e, entry)),
        }
        for comp in rel.components() {
            let comp = comp.as_os_str();
            let next = match rustix::fs::openat2(&fd, comp, DIR_FLAGS, Mode::empty(), beneath()) {
                Err(rustix::io::Errno::NOENT) => {
                    match rustix::fs::mkdirat(&fd, comp, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(ImageError::io("mkdir", entry, e.into())),
                    }
                    rustix::fs::openat2(&fd, comp, DIR_FLAGS, Mode::empty(), beneath())
                }
                other => other,
            };
            fd = next.map_err(|e| self.resolve_error(e, entry))?;
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
            rustix::io::Errno::LOOP => hostile(
                entry,
                "a parent of it is a symlink: dev-box never writes through a link (an archive made from a filesystem has no entry below a symlink)",
            ),
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
        // Bounded before anything of the entry is written or kept: its name, its link
        // target, its data (written or skipped).
        let kind = e.header().entry_type();
        let file_like =
            kind.is_file() || kind == tar::EntryType::Continuous || kind.is_gnu_sparse();
        let shown = charge_entry(&mut e, self.budget, file_like)?;
        let path = clean_path(&e.path().map_err(|err| {
            ImageError::Format(format!("{shown}: unreadable entry name: {err}"))
        })?)?;
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
            self.written.insert(path_key(&path));
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
        self.written.insert(path_key(&path));
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
            let name = OsStr::from_bytes(n).to_os_string();
            if !self.written.contains(&path_key(&rel.join(&name))) {
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

/// Removes directory `name` under `dir` and everything in it, never following symlinks;
/// iterative, with descriptors bounded by [`devbox_storage::tree::remove_at`].
pub fn remove_tree_at(dir: &impl AsFd, name: &OsStr) -> io::Result<()> {
    let name = std::ffi::CString::new(name.as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    devbox_storage::tree::remove_at(dir.as_fd(), &name)
}

/// Checks and charges entry `e` against `budget` ([`Budget::charge_entry`]); returns its
/// name as errors show it.
pub(crate) fn charge_entry<R: Read>(
    e: &mut tar::Entry<'_, R>,
    budget: &mut Budget,
    writes_data: bool,
) -> Result<String, ImageError> {
    let name = e.path_bytes();
    let shown = shown_name(&name);
    let link = e.link_name_bytes();
    // The data that follows the header in the stream: a sparse file's stored chunks (its
    // header's size) or, for every other entry, its size.
    let data = e.size().max(e.header().entry_size().unwrap_or(0));
    budget.charge_entry(&shown, &name, link.as_deref(), data, writes_data)?;
    Ok(shown)
}

/// An error of the tar reader as an import reports it: the guard's refusals name the entry
/// last read (`after`).
fn stream_error(e: io::Error, after: Option<&str>) -> ImageError {
    match refused_by_guard(&e) {
        Some(why) => ImageError::Hostile {
            entry: after.map_or_else(|| "(the first header)".to_string(), str::to_string),
            reason: why,
        },
        None => ImageError::Format(format!("corrupt tar archive: {e}")),
    }
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
    let mut archive = tar::Archive::new(guarded_within(reader, target.budget));
    let mut last: Option<String> = None;
    let entries = archive
        .entries()
        .map_err(|e| ImageError::Format(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| stream_error(e, last.as_deref()))?;
        last = Some(shown_name(&entry.path_bytes()));
        target.entry(entry).map_err(|err| match err {
            ImageError::Io { source, .. } if refused_by_guard(&source).is_some() => {
                stream_error(source, last.as_deref())
            }
            other => other,
        })?;
    }
    // What follows the end marker, bounded, so a digest over the stream covers it all.
    archive
        .into_inner()
        .drain()
        .map_err(|e| stream_error(e, last.as_deref()))?;
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
            std::fs::read_link(tmp.path().join("bin")).unwrap(),
            Path::new("usr/bin")
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

    fn extract_plain(data: &[u8], root: &Path) -> Result<ExtractStats, ImageError> {
        extract(
            data,
            root,
            ExtractOptions::default(),
            &mut Budget::unlimited(),
        )
    }

    fn layer_opts() -> ExtractOptions {
        ExtractOptions {
            whiteouts: true,
            ..Default::default()
        }
    }

    fn hard(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        h.set_path(path).unwrap();
        h.set_link_name(target).unwrap();
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }

    #[test]
    fn links_are_never_written_through() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "a file below an in-tree symlink",
                tar_with(|b| {
                    symlink(b, "bin", "usr/bin");
                    file(b, "usr/bin/tool", b"x");
                    file(b, "bin/via-link", b"x");
                }),
            ),
            (
                "a symlink to the root",
                tar_with(|b| {
                    symlink(b, "self", ".");
                    file(b, "self/self/self/x", b"x");
                }),
            ),
            (
                // Each link doubles the path the kernel would walk: quadratic, then worse.
                "a chain of links",
                tar_with(|b| {
                    symlink(b, "l0", ".");
                    for i in 1..200 {
                        symlink(b, &format!("l{i}"), &format!("l{0}/l{0}", i - 1));
                    }
                    file(b, "l199/x", b"x");
                }),
            ),
            (
                "a hard link reached through a symlink",
                tar_with(|b| {
                    file(b, "usr/f", b"x");
                    symlink(b, "d", "usr");
                    hard(b, "h", "d/f");
                }),
            ),
            (
                "a whiteout below a symlink",
                tar_with(|b| {
                    symlink(b, "d", "usr");
                    file(b, "usr/f", b"x");
                    file(b, "d/.wh.f", b"");
                }),
            ),
        ];
        for (what, data) in cases {
            let root = tempfile::tempdir().unwrap();
            let err = extract(
                &data[..],
                root.path(),
                layer_opts(),
                &mut Budget::unlimited(),
            )
            .unwrap_err();
            assert!(
                matches!(err, ImageError::Hostile { .. }) && err.to_string().contains("symlink"),
                "{what}: {err}"
            );
        }
        // A later layer may replace a symlink by a directory, and fill it.
        let tmp = tempfile::tempdir().unwrap();
        let lower = tar_with(|b| {
            file(b, "usr/lib/a", b"a");
            symlink(b, "lib", "usr/lib");
        });
        extract(
            &lower[..],
            tmp.path(),
            layer_opts(),
            &mut Budget::unlimited(),
        )
        .unwrap();
        let upper = tar_with(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_path("lib").unwrap();
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
            file(b, "lib/b", b"b");
        });
        extract(
            &upper[..],
            tmp.path(),
            layer_opts(),
            &mut Budget::unlimited(),
        )
        .unwrap();
        assert!(tmp.path().join("lib").symlink_metadata().unwrap().is_dir());
        assert_eq!(std::fs::read(tmp.path().join("lib/b")).unwrap(), b"b");
        assert!(!tmp.path().join("usr/lib/b").exists());
        assert!(tmp.path().join("usr/lib/a").exists());
    }

    #[test]
    fn names_and_entries_are_bounded() {
        let long = "n".repeat(MAX_NAME + 1);
        let long_path = format!("d/{}", "e/".repeat(MAX_NAME / 2));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "a long name (GNU)",
                tar_with(|b| {
                    let mut h = tar::Header::new_gnu();
                    h.set_size(1);
                    h.set_mode(0o644);
                    b.append_data(&mut h, &long_path, &b"x"[..]).unwrap();
                }),
            ),
            (
                "a long link target (GNU)",
                tar_with(|b| {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, "l", &long).unwrap();
                }),
            ),
            (
                "a long name (PAX)",
                tar_with(|b| {
                    b.append_pax_extensions([("path", long_path.as_bytes())])
                        .unwrap();
                    file(b, "short", b"x");
                }),
            ),
            (
                "a long link target (PAX)",
                tar_with(|b| {
                    b.append_pax_extensions([("linkpath", long.as_bytes())])
                        .unwrap();
                    symlink(b, "l", "short");
                }),
            ),
        ];
        for (what, data) in cases {
            let root = tempfile::tempdir().unwrap();
            let err = extract_plain(&data, root.path()).unwrap_err();
            assert!(
                matches!(err, ImageError::Hostile { .. }) && err.to_string().contains("4096"),
                "{what}: {err}"
            );
            assert!(err.to_string().len() < 1000, "{what}: the error is short");
            assert!(is_empty_dir(root.path()), "{what}: nothing written");
        }
        // A name of exactly PATH_MAX bytes is fine as far as the bound goes.
        let mut budget = Budget::unlimited();
        budget
            .charge_entry(
                "x",
                &vec![b'a'; MAX_NAME],
                Some(&vec![b'b'; MAX_NAME]),
                0,
                false,
            )
            .unwrap();
        // The number of entries, and the bytes of all names, per import (across layers).
        let ten = tar_with(|b| {
            for i in 0..10 {
                file(b, &format!("f{i}"), b"x");
            }
        });
        let mut budget = Budget::unlimited().with_entry_limits(15, u64::MAX);
        let root = tempfile::tempdir().unwrap();
        extract(&ten[..], root.path(), layer_opts(), &mut budget).unwrap();
        let err = extract(&ten[..], root.path(), layer_opts(), &mut budget).unwrap_err();
        assert!(err.to_string().contains("more than 15 entries"), "{err}");
        let mut budget = Budget::unlimited().with_entry_limits(u64::MAX, 15);
        let root = tempfile::tempdir().unwrap();
        let err = extract(&ten[..], root.path(), layer_opts(), &mut budget).unwrap_err();
        assert!(
            err.to_string().contains("names and link targets add up"),
            "{err}"
        );
    }

    #[test]
    fn everything_inflated_is_bounded() {
        // A tar writer's padding after the end marker is fine (GNU tar and Python pad to a
        // 10240-byte record); more is refused, whatever it is.
        let small = tar_with(|b| file(b, "a", b"x"));
        let first_zero = small.len() - 1024;
        let with_trailer = |n: usize| {
            let mut v = small[..first_zero + 512].to_vec();
            v.extend(std::iter::repeat_n(0u8, n));
            v
        };
        let root = tempfile::tempdir().unwrap();
        extract_plain(&with_trailer(MAX_TRAILER as usize), root.path()).unwrap();
        for n in [MAX_TRAILER as usize + 1, 16 << 20] {
            let root = tempfile::tempdir().unwrap();
            let err = extract_plain(&with_trailer(n), root.path()).unwrap_err();
            assert!(
                err.to_string()
                    .contains("follows the end of the tar archive"),
                "{n}: {err}"
            );
        }
        // Data an entry declares but the import skips (a directory, a link, a device under
        // dev/) counts against the cap like written data.
        for kind in [
            tar::EntryType::Directory,
            tar::EntryType::Symlink,
            tar::EntryType::Fifo,
            tar::EntryType::XGlobalHeader,
        ] {
            let data = tar_with(|b| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(kind);
                h.set_path("dev/thing").unwrap();
                h.set_link_name("x").unwrap();
                h.set_size(2 << 20);
                h.set_mode(0o755);
                h.set_cksum();
                b.append(&h, &vec![0u8; 2 << 20][..]).unwrap();
            });
            let root = tempfile::tempdir().unwrap();
            let err = extract(
                &data[..],
                root.path(),
                ExtractOptions::default(),
                &mut Budget::new(1 << 20, u64::MAX),
            )
            .unwrap_err();
            assert!(err.to_string().contains(MAX_BYTES_VAR), "{kind:?}: {err}");
        }
        // Headers count too: many empty entries inflate as well.
        let many = tar_with(|b| {
            for i in 0..100 {
                file(b, &format!("e{i}"), b"");
            }
        });
        let root = tempfile::tempdir().unwrap();
        let err = extract(
            &many[..],
            root.path(),
            ExtractOptions::default(),
            &mut Budget::new(16 << 10, u64::MAX),
        )
        .unwrap_err();
        assert!(err.to_string().contains(MAX_BYTES_VAR), "{err}");
    }

    #[test]
    fn deep_trees_are_removed_without_recursion() {
        let tmp = tempfile::tempdir().unwrap();
        let mut p = tmp.path().join("top");
        std::fs::create_dir(&p).unwrap();
        let root = rustix::fs::open(tmp.path(), DIR_FLAGS, Mode::empty()).unwrap();
        // Deeper than PATH_MAX: made one level at a time from the parent's descriptor.
        let mut fd = rustix::fs::open(&p, DIR_FLAGS, Mode::empty()).unwrap();
        for _ in 0..3000 {
            rustix::fs::mkdirat(&fd, "dd", Mode::from_raw_mode(0o755)).unwrap();
            rustix::fs::symlinkat("/", &fd, "s").unwrap();
            fd = rustix::fs::openat(&fd, "dd", DIR_FLAGS, Mode::empty()).unwrap();
        }
        drop(fd);
        remove_tree_at(&root, OsStr::new("top")).unwrap();
        p.pop();
        assert!(is_empty_dir(&p));
        // Through a whiteout of a layer.
        let lower = tar_with(|b| file(b, "a/b/c/d/e", b"x"));
        let upper = tar_with(|b| file(b, ".wh.a", b""));
        extract(
            &lower[..],
            tmp.path(),
            layer_opts(),
            &mut Budget::unlimited(),
        )
        .unwrap();
        extract(
            &upper[..],
            tmp.path(),
            layer_opts(),
            &mut Budget::unlimited(),
        )
        .unwrap();
        assert!(is_empty_dir(tmp.path()));
    }
}
