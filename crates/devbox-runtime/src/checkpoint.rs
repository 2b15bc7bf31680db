//! Checkpointing a running sandbox's processes with CRIU, and what a restore needs to know.
//!
//! The daemon parks the agent first ([`crate::protocol::Request::Park`]): it closes its
//! listener and connections, which live in the host's network namespace and could not be
//! dumped, and waits on one end of a socket pair whose other end the daemon holds. CRIU then
//! dumps the whole pid namespace (`criu dump -t <init>`) with:
//!
//! - the pair's in-sandbox end marked external (`--external unix[ino]`); a restore hands the
//!   restored agent a fresh pair in its place (`--inherit-fd`), over which it gets a new
//!   listener;
//! - init's executable and the libraries it maps marked external (`--external file[..]`):
//!   they are host files, outside the sandbox's mounts; a restore passes them in open. Which
//!   host files those may be, the daemon knows by itself ([`trusted_host_files`]: the
//!   sandbox-init binary it runs and the libraries the host's dynamic loader gives it, by
//!   device and inode); a dump refuses an init mapping any other host file, and a restore
//!   opens only files of that set as it derives it again, never a path just because
//!   `checkpoint.json` names it;
//! - each host bind mount marked external by its target, so that a restore binds the same
//!   id-mapped source; device nodes and masked kernel files bound from the host are found by
//!   CRIU itself (`--ext-mount-map auto`).
//!
//! The root filesystem is not in the image: a restore mounts the sandbox's overlay (rolled
//! back to the snapshot's files) and gives it to CRIU as `--root`.
//!
//! No process of the sandbox can ptrace init, parked (dumpable) or not: init holds
//! [`crate::container::security::GUARD_CAP`] in its permitted set, which none of them can.
//! A dump checks that it does and that nothing traces it.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The oldest CRIU that works on current kernels (3.x fails on the vDSO of kernels ≥ 6.13).
pub const MIN_CRIU: (u32, u32) = (4, 1);

/// What went wrong with a checkpoint or restore.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// No usable CRIU.
    #[error("{0}")]
    NoCriu(String),
    /// The sandbox cannot be checkpointed as it is.
    #[error("{0}")]
    Unsupported(String),
    /// CRIU ran and failed; `log` names its log file.
    #[error("CRIU failed: {reason} (log: {log})")]
    Criu {
        /// The error lines CRIU wrote.
        reason: String,
        /// Its full log.
        log: String,
    },
    /// An OS error around CRIU.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> CheckpointError {
    move |source| CheckpointError::Io { what, source }
}

/// A host file a checkpointed init maps (its executable and libraries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalFile {
    /// CRIU's key for it: `file[<mount id>:<inode>]` (hex).
    pub key: String,
    /// Its host path, as [`trusted_host_files`] names it (never read from the sandbox).
    pub path: PathBuf,
    /// Its device (`st_dev`).
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// Its size when dumped: a restore refuses a file that changed.
    pub size: u64,
}

/// A host file that the sandbox's init may map: the sandbox-init binary, or a library the
/// host's dynamic loader loads for it. Derived by the daemon (or the restoring launcher)
/// from the binary it runs, never from anything a sandbox controls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedFile {
    /// Its canonical host path.
    pub path: PathBuf,
    /// Its device (`st_dev`).
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
}

/// What a restore needs besides CRIU's images; stored beside them as `checkpoint.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Inode of the parked agent's end of its socket pair.
    pub pair_ino: u64,
    /// Host files mapped by init.
    pub files: Vec<ExternalFile>,
    /// Targets of the host bind mounts, in the order of the sandbox's bind list.
    pub binds: Vec<PathBuf>,
    /// The sandbox's network namespace was a persisted one, left out of the images
    /// (`--external net[ino]:netns`): a restore joins the sandbox's namespace again.
    #[serde(default)]
    pub netns: bool,
}

/// CRIU's key for the external network namespace.
pub const NETNS_KEY: &str = "netns";

/// CRIU's key for the /sys of a sandbox in a persisted network namespace (the host's, bound).
pub const SYS_KEY: &str = "sys";

impl CheckpointMeta {
    /// Name of the metadata file in an images directory.
    pub const FILE: &'static str = "checkpoint.json";

    /// Reads the metadata of the images in `dir`.
    pub fn load(dir: &Path) -> Result<Self, CheckpointError> {
        let text = fs::read(dir.join(Self::FILE)).map_err(io_err("reading checkpoint.json"))?;
        serde_json::from_slice(&text).map_err(|e| CheckpointError::Io {
            what: "parsing checkpoint.json",
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })
    }
}

/// Finds a CRIU ≥ 4.1: `$DEVBOX_CRIU`, else `criu` in /usr/local/sbin, /usr/sbin, or PATH.
pub fn find_criu() -> Result<PathBuf, CheckpointError> {
    let candidates: Vec<PathBuf> = match std::env::var_os("DEVBOX_CRIU") {
        Some(p) => vec![PathBuf::from(p)],
        None => {
            let mut c = vec![
                PathBuf::from("/usr/local/sbin/criu"),
                PathBuf::from("/usr/sbin/criu"),
            ];
            if let Some(path) = std::env::var_os("PATH") {
                c.extend(std::env::split_paths(&path).map(|d| d.join("criu")));
            }
            c
        }
    };
    let mut seen = Vec::new();
    for c in candidates {
        if !c.is_file() {
            continue;
        }
        match criu_version(&c) {
            Some(v) if v >= MIN_CRIU => return Ok(c),
            Some((a, b)) => seen.push(format!("{} is {a}.{b}", c.display())),
            None => seen.push(format!("{} does not run", c.display())),
        }
    }
    let found = if seen.is_empty() {
        "no criu was found".to_string()
    } else {
        seen.join(", ")
    };
    Err(CheckpointError::NoCriu(format!(
        "checkpointing processes needs CRIU {}.{} or newer and {found}; scripts/deps.sh \
         builds it into /usr/local/sbin, or set DEVBOX_CRIU to one",
        MIN_CRIU.0, MIN_CRIU.1
    )))
}

/// `criu --version` → (major, minor).
fn criu_version(criu: &Path) -> Option<(u32, u32)> {
    let out = Command::new(criu).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))?
        .trim();
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A dump to make.
#[derive(Debug, Clone)]
pub struct DumpRequest {
    /// The CRIU binary.
    pub criu: PathBuf,
    /// Host pid of the sandbox's init, parked.
    pub init_pid: i32,
    /// Empty directory for the images.
    pub images: PathBuf,
    /// CRIU's log (absolute path, outside the images: kept when the dump fails).
    pub log: PathBuf,
    /// Targets of the sandbox's host binds, in order.
    pub binds: Vec<PathBuf>,
    /// The sandbox's freezer cgroup directory, already frozen by the caller.
    pub freezer: Option<PathBuf>,
    /// Keep the processes running after the dump (a snapshot); otherwise CRIU kills them.
    pub leave_running: bool,
    /// The host uid (and gid) of the sandbox's root, who gets the images: a restore reads
    /// them from inside the sandbox's user namespace.
    pub owner: u32,
    /// The sandbox-init binary the daemon runs: it and its libraries are the only host files
    /// init may map ([`trusted_host_files`]).
    pub init_binary: PathBuf,
    /// The persisted network namespace the sandbox joined, if any: left out of the dump.
    pub netns: Option<PathBuf>,
}

/// Dumps the parked sandbox's processes into `req.images` and writes `checkpoint.json`.
///
/// Refused, before CRIU runs, when init is traced, lacks its guard capability, or maps a
/// host file that is not sandbox-init or one of its libraries.
pub fn dump(req: &DumpRequest) -> Result<CheckpointMeta, CheckpointError> {
    check_init_guarded(req.init_pid)?;
    let pair_ino = parked_socket(req.init_pid)?;
    let trusted = trusted_host_files(&req.init_binary)?;
    let files = mapped_host_files(req.init_pid, &trusted)?;
    let netns_ino = match &req.netns {
        None => None,
        Some(path) => {
            use std::os::unix::fs::MetadataExt;
            let want = fs::metadata(path)
                .map_err(io_err("reading the sandbox's network namespace"))?
                .ino();
            let has = fs::metadata(format!("/proc/{}/ns/net", req.init_pid))
                .map_err(io_err("reading init's network namespace"))?
                .ino();
            if want != has {
                return Err(CheckpointError::Unsupported(format!(
                    "init is not in the sandbox's network namespace {}",
                    path.display()
                )));
            }
            Some(want)
        }
    };
    let mut cmd = Command::new(&req.criu);
    if let Some(path) = criu_tool_path() {
        cmd.env("PATH", path);
    }
    // Honoured by the CRIU scripts/criu/build.sh makes (plain-netns.patch): nobody in the
    // sandbox can configure its loopback (no CAP_NET_ADMIN), so its addresses, routes and
    // rules are the kernel's defaults, it has no netfilter rules and nothing in conntrack;
    // CRIU skips dumping them (the ip and iptables tools, a walk of the host's whole
    // conntrack table: ~40 ms of a dump, ~25 ms of a restore).
    cmd.env("DEVBOX_CRIU_PLAIN_NETNS", "1");
    cmd.arg("dump")
        .arg("-t")
        .arg(req.init_pid.to_string())
        .arg("-D")
        .arg(&req.images)
        .arg("-v4")
        .arg("-o")
        .arg(&req.log)
        .args(EXTERNAL_MOUNT_FLAGS)
        .arg("--external")
        .arg(format!("unix[{pair_ino}]"))
        // The sandbox's network is its own loopback, frozen with it: nothing to lock out.
        .args(["--network-lock", "skip"]);
    for f in &files {
        cmd.arg("--external").arg(&f.key);
    }
    if let Some(ino) = netns_ino {
        cmd.arg("--external").arg(format!("net[{ino}]:{NETNS_KEY}"));
        // Such a sandbox's /sys is the host's, bound (it cannot mount a sysfs there).
        cmd.arg("--external").arg(format!("mnt[/sys]:{SYS_KEY}"));
        // Its established TCP connections cannot come back: restoring one takes TCP_REPAIR,
        // i.e. CAP_NET_ADMIN over the namespace, which the restored tasks (in the sandbox's
        // user namespace) lack by design. They are dumped without their state and restored
        // closed; listening sockets come back as they were.
        cmd.arg("--tcp-close");
    }
    for (i, target) in req.binds.iter().enumerate() {
        cmd.arg("--external")
            .arg(format!("mnt[{}]:bind{i}", target.display()));
    }
    if let Some(dir) = &req.freezer {
        cmd.arg("--freeze-cgroup").arg(dir);
    }
    if req.leave_running {
        cmd.arg("--leave-running");
    }
    run_criu(cmd, &req.log)?;
    let meta = CheckpointMeta {
        pair_ino,
        files,
        binds: req.binds.clone(),
        netns: netns_ino.is_some(),
    };
    let text = serde_json::to_vec_pretty(&meta).map_err(|e| CheckpointError::Io {
        what: "writing checkpoint.json",
        source: io::Error::other(e),
    })?;
    fs::write(req.images.join(CheckpointMeta::FILE), text)
        .map_err(io_err("writing checkpoint.json"))?;
    let mut paths = vec![req.images.clone()];
    for e in fs::read_dir(&req.images).map_err(io_err("listing the images"))? {
        paths.push(e.map_err(io_err("listing the images"))?.path());
    }
    for path in paths {
        std::os::unix::fs::lchown(&path, Some(req.owner), Some(req.owner))
            .map_err(io_err("handing the images to the sandbox's root"))?;
    }
    Ok(meta)
}

/// Where CRIU (as built by scripts/criu/build.sh) caches what it learned about the kernel; it
/// keeps the cache only on a tmpfs.
pub const CRIU_CACHE_DIR: &str = "/dev/shm/dev-box-criu";

/// Makes [`CRIU_CACHE_DIR`] (root's, mode 0711: CRIU's helpers inside a sandbox's user
/// namespace run the tools in it). Whether it is usable: when someone else made that path
/// first, it is not, and CRIU runs without its cache (it cannot write there).
pub fn ensure_cache_dir() -> bool {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = Path::new(CRIU_CACHE_DIR);
    let _ = fs::DirBuilder::new().mode(0o711).create(dir);
    matches!(fs::symlink_metadata(dir),
        Ok(m) if m.is_dir() && m.uid() == 0 && m.permissions().mode() & 0o022 == 0)
}

/// The tools CRIU runs for a sandbox: `ip` (addresses, routes and rules of its network
/// namespace) and `tar`/`gzip` (its tmpfs mounts).
const CRIU_TOOLS: &[&str] = &["ip", "tar", "gzip"];

/// A directory holding only [`CRIU_TOOLS`], for CRIU's PATH. Without iptables on its PATH a
/// restore does not probe for legacy iptables (~5 ms; the dump skips iptables altogether
/// with `DEVBOX_CRIU_PLAIN_NETNS`), whose rules a sandbox cannot have: it lacks
/// CAP_NET_ADMIN. `ip` serves a CRIU without that patch (`DEVBOX_CRIU`). `None` (use the usual PATH) when a
/// tool is missing or the directory is not root's own.
pub fn criu_tool_path() -> Option<PathBuf> {
    if !ensure_cache_dir() {
        return None;
    }
    let dir = Path::new(CRIU_CACHE_DIR).join("bin");
    {
        use std::os::unix::fs::DirBuilderExt;
        let _ = fs::DirBuilder::new().mode(0o755).create(&dir);
    }
    for tool in CRIU_TOOLS {
        let link = dir.join(tool);
        if link.is_file() {
            continue;
        }
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.is_file())?;
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(found, &link).ok()?;
    }
    Some(dir)
}

/// Flags for the mounts CRIU finds outside the sandbox on its own (device nodes and masked
/// kernel files bound from the host): given to both dump and restore.
pub const EXTERNAL_MOUNT_FLAGS: &[&str] = &[
    "--ext-mount-map",
    "auto",
    "--enable-external-sharing",
    "--enable-external-masters",
];

/// Runs CRIU; on failure, its error lines from `log`.
pub fn run_criu(mut cmd: Command, log: &Path) -> Result<(), CheckpointError> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(io_err("running criu"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error (") && !l.contains("RLIMIT_NOFILE"))
        .map(|l| l.split_once("): ").map(|(_, m)| m).unwrap_or(l))
        .collect();
    let mut reason = errors
        .iter()
        .rev()
        .take(3)
        .rev()
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if reason.is_empty() {
        reason = String::from_utf8_lossy(&out.stderr).trim().to_string();
    }
    if reason.is_empty() {
        reason = format!("exit status {}", out.status);
    }
    Err(CheckpointError::Criu {
        reason,
        log: log.display().to_string(),
    })
}

/// The inode of the one socket a parked agent holds (its end of the pair).
fn parked_socket(pid: i32) -> Result<u64, CheckpointError> {
    let dir = format!("/proc/{pid}/fd");
    let mut found = Vec::new();
    for e in fs::read_dir(&dir).map_err(io_err("listing init's fds"))? {
        let Ok(e) = e else { continue };
        let Ok(link) = fs::read_link(e.path()) else {
            continue;
        };
        let link = link.to_string_lossy().to_string();
        if let Some(ino) = link
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push(ino);
        }
    }
    match found.as_slice() {
        [ino] => Ok(*ino),
        _ => Err(CheckpointError::Unsupported(format!(
            "the sandbox's init holds {} sockets, not the one of a parked agent",
            found.len()
        ))),
    }
}

/// Init's executable and the files it maps that lie outside the sandbox's mounts (files of
/// its own mounts CRIU dumps by their path in the sandbox). Each must be one of `trusted`,
/// by device and inode; it is recorded under the trusted path, not the one its mapping shows.
fn mapped_host_files(
    pid: i32,
    trusted: &[TrustedFile],
) -> Result<Vec<ExternalFile>, CheckpointError> {
    let inside = mount_ids(
        &fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .map_err(io_err("reading the sandbox's mounts"))?,
    );
    let mut paths = vec![PathBuf::from(format!("/proc/{pid}/exe"))];
    let map_dir = format!("/proc/{pid}/map_files");
    for e in fs::read_dir(&map_dir).map_err(io_err("listing init's mappings"))? {
        paths.push(e.map_err(io_err("listing init's mappings"))?.path());
    }
    let mut files: Vec<ExternalFile> = Vec::new();
    for p in paths {
        // O_PATH: what it is, without opening it (a device's open could act).
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(&p)
            .map_err(io_err("opening a file init maps"))?;
        let meta = f.metadata().map_err(io_err("reading a file init maps"))?;
        let mnt = mount_id(&f)?;
        if inside.contains(&mnt) {
            continue;
        }
        let Some(t) = trusted
            .iter()
            .find(|t| t.dev == meta.dev() && t.ino == meta.ino())
        else {
            let shown = fs::read_link(&p)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into());
            return Err(CheckpointError::Unsupported(format!(
                "the sandbox's init maps the host file {shown:?} (device {}, inode {}), \
                 which is neither sandbox-init nor one of its libraries: refusing to \
                 checkpoint it (restart the sandbox to get a clean init)",
                meta.dev(),
                meta.ino()
            )));
        };
        let key = format!("file[{mnt:x}:{:x}]", meta.ino());
        if files.iter().any(|x| x.key == key) {
            continue;
        }
        files.push(ExternalFile {
            key,
            path: t.path.clone(),
            dev: t.dev,
            ino: t.ino,
            size: meta.len(),
        });
    }
    Ok(files)
}

/// The mount ids of a `/proc/PID/mountinfo`.
fn mount_ids(mountinfo: &str) -> HashSet<u64> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

/// What `/proc/PID/status` says of a process's tracer and capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Guarded {
    tracer: i64,
    permitted: u64,
    bounding: u64,
}

fn parse_status(status: &str) -> Option<Guarded> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    Some(Guarded {
        tracer: field("TracerPid")?.parse().ok()?,
        permitted: u64::from_str_radix(field("CapPrm")?, 16).ok()?,
        bounding: u64::from_str_radix(field("CapBnd")?, 16).ok()?,
    })
}

/// Why a process is not a guarded init (see [`crate::container::security::GUARD_CAP`]), if
/// it is not: traced, or its guard capability missing or attainable by what it starts.
fn guard_problem(g: &Guarded) -> Option<String> {
    let bit = 1u64 << crate::container::security::GUARD_CAP.index();
    if g.tracer != 0 {
        return Some(format!(
            "the sandbox's init is being traced (by host pid {}): refusing to checkpoint it",
            g.tracer
        ));
    }
    if g.permitted & bit == 0 || g.bounding & bit != 0 {
        return Some(
            "the sandbox's init lacks the capability that keeps its own processes from \
             tracing it (it was started by an older dev-box): restart the sandbox to \
             checkpoint its processes"
                .into(),
        );
    }
    None
}

/// Checks that `pid` (a sandbox's init) is not traced and holds its guard capability.
pub fn check_init_guarded(pid: i32) -> Result<(), CheckpointError> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(io_err("reading the status of the sandbox's init"))?;
    let g = parse_status(&text).ok_or_else(|| CheckpointError::Io {
        what: "reading the status of the sandbox's init",
        source: io::Error::other("no TracerPid, CapPrm or CapBnd"),
    })?;
    match guard_problem(&g) {
        Some(why) => Err(CheckpointError::Unsupported(why)),
        None => Ok(()),
    }
}

/// The host files the sandbox's init may map: the sandbox-init `binary` and the libraries
/// the host's dynamic loader loads for it (the loader run in its trace mode,
/// `LD_TRACE_LOADED_OBJECTS=1`, which lists them and runs nothing of the binary), each by
/// canonical path, device and inode. The loader is the one the binary names (`PT_INTERP`);
/// a static binary has none and maps no library.
pub fn trusted_host_files(binary: &Path) -> Result<Vec<TrustedFile>, CheckpointError> {
    let refuse = |what: &str, e: &dyn std::fmt::Display| {
        CheckpointError::Unsupported(format!(
            "cannot tell which host files sandbox-init ({}) maps: {what}: {e}",
            binary.display()
        ))
    };
    let mut head = Vec::new();
    fs::File::open(binary)
        .and_then(|f| f.take(ELF_HEAD).read_to_end(&mut head))
        .map_err(|e| refuse("reading it", &e))?;
    let interp = elf_interpreter(&head).map_err(|e| refuse("reading its ELF header", &e))?;
    let mut paths = vec![binary.to_path_buf()];
    if let Some(interp) = interp {
        let out = Command::new(&interp)
            .arg(binary)
            .env("LD_TRACE_LOADED_OBJECTS", "1")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .map_err(|e| refuse("running its dynamic loader", &e))?;
        if !out.status.success() {
            return Err(refuse(
                "its dynamic loader failed",
                &format!("{} ({})", out.status, interp.display()),
            ));
        }
        let libs = parse_loader_trace(&String::from_utf8_lossy(&out.stdout))
            .map_err(|e| refuse("its libraries", &e))?;
        paths.push(interp);
        paths.extend(libs);
    }
    let mut out: Vec<TrustedFile> = Vec::new();
    for p in paths {
        let path = fs::canonicalize(&p).map_err(|e| refuse(&p.display().to_string(), &e))?;
        let meta = fs::metadata(&path).map_err(|e| refuse(&path.display().to_string(), &e))?;
        if !meta.is_file() {
            return Err(refuse(&path.display().to_string(), &"not a regular file"));
        }
        if out
            .iter()
            .any(|t| t.dev == meta.dev() && t.ino == meta.ino())
        {
            continue;
        }
        out.push(TrustedFile {
            path,
            dev: meta.dev(),
            ino: meta.ino(),
        });
    }
    Ok(out)
}

/// How much of an executable [`elf_interpreter`] reads: its header, program headers and
/// interpreter path lie at its start.
const ELF_HEAD: u64 = 64 * 1024;

/// The interpreter (`PT_INTERP`) a 64-bit little-endian ELF executable names, from the first
/// bytes of the file; `None` for a static one.
fn elf_interpreter(head: &[u8]) -> Result<Option<PathBuf>, String> {
    let bytes = |off: usize, len: usize| -> Result<&[u8], String> {
        off.checked_add(len)
            .and_then(|end| head.get(off..end))
            .ok_or_else(|| format!("truncated at {off}"))
    };
    let u16_at = |off| bytes(off, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |off| bytes(off, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    if bytes(0, 4)? != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    // 64-bit, little-endian.
    if bytes(4, 2)? != [2, 1] {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    const PT_INTERP: u32 = 3;
    let phoff = usize::try_from(u64_at(0x20)?).map_err(|e| e.to_string())?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    if phentsize < 0x38 {
        return Err(format!("program header size {phentsize}"));
    }
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i.checked_mul(phentsize).ok_or("overflow")?)
            .ok_or("overflow")?;
        let p_type = bytes(ph, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))?;
        if p_type != PT_INTERP {
            continue;
        }
        let off = usize::try_from(u64_at(ph + 8)?).map_err(|e| e.to_string())?;
        let len = usize::try_from(u64_at(ph + 32)?).map_err(|e| e.to_string())?;
        let raw = bytes(off, len)?;
        let raw = raw.split(|b| *b == 0).next().unwrap_or_default();
        let text = std::str::from_utf8(raw).map_err(|e| e.to_string())?;
        if !text.starts_with('/') {
            return Err(format!("interpreter {text:?} is not an absolute path"));
        }
        return Ok(Some(PathBuf::from(text)));
    }
    Ok(None)
}

/// The library paths in the dynamic loader's trace (`LD_TRACE_LOADED_OBJECTS=1`):
/// `\tlibc.so.6 => /lib/.../libc.so.6 (0x...)` and `\t/lib64/ld-linux-x86-64.so.2 (0x...)`;
/// the vDSO (no path) is left out; a library not found is an error.
fn parse_loader_trace(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let target = match line.split_once(" => ") {
            Some((name, rest)) => {
                if rest.trim() == "not found" {
                    return Err(format!("{name} not found"));
                }
                rest
            }
            None => line,
        };
        let path = match target.rfind(" (0x") {
            Some(i) => &target[..i],
            None => target,
        }
        .trim();
        if path.starts_with('/') {
            out.push(PathBuf::from(path));
        } else if line.contains(" => ") {
            return Err(format!("unexpected line {line:?}"));
        }
    }
    Ok(out)
}

/// The mount id of an open file (from /proc/self/fdinfo).
fn mount_id(f: &impl AsRawFd) -> Result<u64, CheckpointError> {
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", f.as_raw_fd()))
        .map_err(io_err("reading fdinfo"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:")?.trim().parse().ok())
        .ok_or_else(|| CheckpointError::Io {
            what: "reading fdinfo",
            source: io::Error::other("no mnt_id"),
        })
}

/// Opens the external files of a checkpoint for a restore. Each must be one of `trusted`
/// (as [`trusted_host_files`] derives it now) by path, device and inode, and have kept its
/// size; its key must be CRIU's for that inode. Nothing is opened for an entry that is not.
pub fn open_external_files(
    meta: &CheckpointMeta,
    trusted: &[TrustedFile],
) -> Result<Vec<(String, OwnedFd)>, CheckpointError> {
    let mut out = Vec::new();
    for f in &meta.files {
        if key_inode(&f.key) != Some(f.ino) {
            return Err(CheckpointError::Unsupported(format!(
                "checkpoint.json holds a malformed key {:?}: these processes cannot be restored",
                f.key
            )));
        }
        let Some(t) = trusted
            .iter()
            .find(|t| t.path == f.path && t.dev == f.dev && t.ino == f.ino)
        else {
            return Err(CheckpointError::Unsupported(format!(
                "{} (device {}, inode {}), which checkpoint.json names, is not sandbox-init \
                 or one of its libraries as they are now (dev-box or the host's libraries \
                 were upgraded since the checkpoint, or it was altered): these processes \
                 cannot be restored",
                f.path.display(),
                f.dev,
                f.ino
            )));
        };
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&t.path)
            .map_err(|e| {
                CheckpointError::Unsupported(format!(
                    "{} (mapped by the checkpointed init) cannot be opened: {e}",
                    t.path.display()
                ))
            })?;
        let now = file.metadata().map_err(io_err("reading a host file"))?;
        if now.dev() != t.dev || now.ino() != t.ino || now.len() != f.size {
            return Err(CheckpointError::Unsupported(format!(
                "{} changed since the checkpoint (dev-box or the host's libraries were \
                 upgraded): these processes cannot be restored",
                t.path.display()
            )));
        }
        out.push((f.key.clone(), OwnedFd::from(file)));
    }
    Ok(out)
}

/// The inode in CRIU's key for an external file, `file[<mount id>:<inode>]` (hex).
fn key_inode(key: &str) -> Option<u64> {
    let (mnt, ino) = key
        .strip_prefix("file[")?
        .strip_suffix(']')?
        .split_once(':')?;
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(mnt) || !hex(ino) {
        return None;
    }
    u64::from_str_radix(mnt, 16).ok()?;
    u64::from_str_radix(ino, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreter_of_a_dynamic_executable() {
        let exe = std::env::current_exe().unwrap();
        let mut head = Vec::new();
        fs::File::open(&exe)
            .unwrap()
            .take(ELF_HEAD)
            .read_to_end(&mut head)
            .unwrap();
        let interp = elf_interpreter(&head).unwrap().expect("dynamically linked");
        assert!(interp.is_absolute() && interp.exists(), "{interp:?}");
    }

    /// A minimal ELF64 header with `phnum` program headers of type `ptype` at offset 64.
    fn elf(ptype: u32, phnum: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64 + 56 * usize::from(phnum)];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        h[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        h[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
        for i in 0..usize::from(phnum) {
            let ph = 64 + 56 * i;
            h[ph..ph + 4].copy_from_slice(&ptype.to_le_bytes());
        }
        h
    }

    #[test]
    fn hostile_or_static_elf_headers() {
        assert_eq!(elf_interpreter(&elf(1, 3)), Ok(None), "static");
        assert!(elf_interpreter(b"#!/bin/sh\n").is_err());
        assert!(elf_interpreter(&[]).is_err());
        // PT_INTERP pointing past the end, or a huge count: errors, not panics.
        let mut h = elf(3, 1);
        h[64 + 8..64 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(elf_interpreter(&h).is_err());
        let mut h = elf(3, 1);
        h[64 + 32..64 + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(elf_interpreter(&h).is_err());
        let mut h = elf(1, 1);
        h[0x38..0x3a].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(elf_interpreter(&h).is_err());
        let mut h = elf(1, 1);
        h[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(elf_interpreter(&h).is_err());
        // A relative interpreter is refused.
        let mut h = elf(3, 1);
        h.extend(b"ld.so\0");
        let off = (h.len() - 6) as u64;
        h[64 + 8..64 + 16].copy_from_slice(&off.to_le_bytes());
        h[64 + 32..64 + 40].copy_from_slice(&6u64.to_le_bytes());
        assert!(elf_interpreter(&h).is_err());
        h.truncate(h.len() - 6);
        h.extend(b"/lib/ld\0");
        h[64 + 32..64 + 40].copy_from_slice(&8u64.to_le_bytes());
        assert_eq!(elf_interpreter(&h), Ok(Some(PathBuf::from("/lib/ld"))));
    }

    #[test]
    fn loader_trace_lines() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f01)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f03)\n";
        assert_eq!(
            parse_loader_trace(text).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_loader_trace("\tlibx.so => not found\n").is_err());
        assert!(parse_loader_trace("\tlibx.so => ???\n").is_err());
        assert_eq!(parse_loader_trace(""), Ok(vec![]));
    }

    #[test]
    fn trusted_files_of_this_executable() {
        let exe = fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
        let trusted = trusted_host_files(&exe).unwrap();
        assert_eq!(trusted[0].path, exe);
        // Everything this process maps from a file is the executable or a library of it.
        let maps = fs::read_to_string("/proc/self/maps").unwrap();
        for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
            if !path.starts_with('/') {
                continue;
            }
            let m = fs::metadata(path).unwrap();
            assert!(
                trusted.iter().any(|t| t.dev == m.dev() && t.ino == m.ino()),
                "{path} missing from {trusted:?}"
            );
        }
        assert!(trusted.iter().all(|t| t.path.is_absolute()));
        assert!(trusted_host_files(Path::new("/nonexistent/sandbox-init")).is_err());
        assert!(trusted_host_files(Path::new("/etc/passwd")).is_err());
    }

    #[test]
    fn status_guard() {
        let status = |tracer: i64, prm: u64, bnd: u64| {
            format!(
                "Name:\tsandbox-init\nTracerPid:\t{tracer}\nCapInh:\t0000000000000000\n\
                 CapPrm:\t{prm:016x}\nCapEff:\t00000000a80425fb\nCapBnd:\t{bnd:016x}\n"
            )
        };
        let bit = 1u64 << crate::container::security::GUARD_CAP.index();
        let bnd = 0xa804_25fb_u64;
        let ok = parse_status(&status(0, bnd | bit, bnd)).unwrap();
        assert_eq!(guard_problem(&ok), None);
        let traced = parse_status(&status(77, bnd | bit, bnd)).unwrap();
        assert!(guard_problem(&traced).unwrap().contains("traced"));
        let old = parse_status(&status(0, bnd, bnd)).unwrap();
        assert!(guard_problem(&old).unwrap().contains("older dev-box"));
        let leaky = parse_status(&status(0, bnd | bit, bnd | bit)).unwrap();
        assert!(guard_problem(&leaky).is_some());
        assert_eq!(parse_status("Name:\tx\n"), None);
        // This test process: full capabilities as root, bounding set included.
        assert!(check_init_guarded(std::process::id() as i32).is_err());
    }

    #[test]
    fn keys_and_mount_ids() {
        assert_eq!(key_inode("file[1f:2a]"), Some(0x2a));
        for bad in [
            "file[1f]",
            "file[:2a]",
            "file[1f:]",
            "file[1f:2a",
            "x[1:2]",
            "file[1:-2]",
        ] {
            assert_eq!(key_inode(bad), None, "{bad}");
        }
        let ids =
            mount_ids("21 1 0:19 / / rw - ext4 /dev/x rw\n35 21 0:5 / /dev rw - tmpfs t rw\n");
        assert_eq!(ids, HashSet::from([21, 35]));
    }

    #[test]
    fn restore_opens_only_trusted_files() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libtrusted.so");
        let secret = dir.path().join("secret");
        fs::write(&lib, b"trusted").unwrap();
        fs::write(&secret, b"host only").unwrap();
        let entry = |p: &Path| {
            let m = fs::metadata(p).unwrap();
            ExternalFile {
                key: format!("file[1:{:x}]", m.ino()),
                path: p.to_path_buf(),
                dev: m.dev(),
                ino: m.ino(),
                size: m.len(),
            }
        };
        let t = entry(&lib);
        let trusted = vec![TrustedFile {
            path: lib.clone(),
            dev: t.dev,
            ino: t.ino,
        }];
        let meta = |files| CheckpointMeta {
            pair_ino: 1,
            files,
            binds: vec![],
            netns: false,
        };
        assert_eq!(
            open_external_files(&meta(vec![t.clone()]), &trusted)
                .unwrap()
                .len(),
            1
        );
        // A host file the daemon does not trust, even with its true device and inode.
        let err = open_external_files(&meta(vec![entry(&secret)]), &trusted).unwrap_err();
        assert!(err.to_string().contains("not sandbox-init"), "{err}");
        // A trusted file's identity under another path.
        let mut renamed = t.clone();
        renamed.path = secret.clone();
        assert!(open_external_files(&meta(vec![renamed]), &trusted).is_err());
        // Another inode under the trusted path.
        let mut other = t.clone();
        other.ino += 1;
        other.key = format!("file[1:{:x}]", other.ino);
        assert!(open_external_files(&meta(vec![other]), &trusted).is_err());
        // A changed size, a malformed key.
        let mut grown = t.clone();
        grown.size += 1;
        assert!(open_external_files(&meta(vec![grown]), &trusted).is_err());
        let mut badkey = t.clone();
        badkey.key = "file[1:0]".into();
        assert!(open_external_files(&meta(vec![badkey]), &trusted).is_err());
        // checkpoint.json without devices and inodes (an older dev-box's) does not parse.
        fs::write(
            dir.path().join(CheckpointMeta::FILE),
            r#"{"pair_ino":1,"files":[{"key":"file[1:2]","path":"/etc/shadow","size":1}],"binds":[]}"#,
        )
        .unwrap();
        assert!(CheckpointMeta::load(dir.path()).is_err());
    }
}
