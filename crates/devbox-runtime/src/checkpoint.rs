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
//!   they are host files, outside the sandbox's mounts; a restore passes them in open;
//! - each host bind mount marked external by its target, so that a restore binds the same
//!   id-mapped source; device nodes and masked kernel files bound from the host are found by
//!   CRIU itself (`--ext-mount-map auto`).
//!
//! The root filesystem is not in the image: a restore mounts the sandbox's overlay (rolled
//! back to the snapshot's files) and gives it to CRIU as `--root`.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
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

/// A host file a checkpointed process maps (init's executable and libraries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalFile {
    /// CRIU's key for it: `file[<mount id>:<inode>]` (hex).
    pub key: String,
    /// Its host path.
    pub path: PathBuf,
    /// Its size when dumped: a restore refuses a file that changed.
    pub size: u64,
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
}

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
}

/// Dumps the parked sandbox's processes into `req.images` and writes `checkpoint.json`.
pub fn dump(req: &DumpRequest) -> Result<CheckpointMeta, CheckpointError> {
    let pair_ino = parked_socket(req.init_pid)?;
    let files = mapped_host_files(req.init_pid)?;
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

/// Init's executable and every file it maps: host files outside the sandbox's mounts.
fn mapped_host_files(pid: i32) -> Result<Vec<ExternalFile>, CheckpointError> {
    let mut paths = vec![PathBuf::from(format!("/proc/{pid}/exe"))];
    let map_dir = format!("/proc/{pid}/map_files");
    for e in fs::read_dir(&map_dir).map_err(io_err("listing init's mappings"))? {
        paths.push(e.map_err(io_err("listing init's mappings"))?.path());
    }
    let mut files: Vec<ExternalFile> = Vec::new();
    for p in paths {
        let target = fs::read_link(&p).map_err(io_err("reading init's mappings"))?;
        let f = fs::File::open(&p).map_err(io_err("opening a file init maps"))?;
        let meta = f.metadata().map_err(io_err("reading a file init maps"))?;
        let mnt = mount_id(&f)?;
        let key = format!(
            "file[{mnt:x}:{:x}]",
            std::os::unix::fs::MetadataExt::ino(&meta)
        );
        if files.iter().any(|x| x.key == key) {
            continue;
        }
        files.push(ExternalFile {
            key,
            path: target,
            size: meta.len(),
        });
    }
    Ok(files)
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

/// Opens the external files of a checkpoint for a restore, refusing any that changed.
pub fn open_external_files(
    meta: &CheckpointMeta,
) -> Result<Vec<(String, OwnedFd)>, CheckpointError> {
    let mut out = Vec::new();
    for f in &meta.files {
        let file = fs::File::open(&f.path).map_err(|e| {
            CheckpointError::Unsupported(format!(
                "{} (mapped by the checkpointed init) cannot be opened: {e}",
                f.path.display()
            ))
        })?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if size != f.size {
            return Err(CheckpointError::Unsupported(format!(
                "{} changed since the checkpoint (dev-box or the host's libraries were \
                 upgraded): these processes cannot be restored",
                f.path.display()
            )));
        }
        out.push((f.key.clone(), OwnedFd::from(file)));
    }
    Ok(out)
}
