//! Cgroups for sandboxes, on cgroup v2 (unified), v1, and hybrid hosts.
//!
//! A [`CgroupDriver`] knows the host's hierarchies (read from mountinfo) and makes one cgroup
//! per sandbox in each, under a common parent (`dev-box` by default). On hybrid hosts the
//! controller-less cgroup2 tree is joined too: it gives `cgroup.freeze`, `cgroup.kill` and a
//! reliable emptiness check. Limits go where the controllers are.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory limit in bytes (swap is not allowed beyond it).
    pub memory_bytes: Option<u64>,
    /// Maximum number of processes and threads.
    pub pids: Option<u64>,
    /// CPU bandwidth in thousandths of a CPU (1000 = one full CPU).
    pub cpu_millis: Option<u64>,
}

/// Resource use of one sandbox, as the kernel counts it (the backend seam's type).
pub use devbox_backend::Usage;

/// Errors of cgroup operations.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No usable cgroup hierarchy is mounted.
    #[error("no cgroup hierarchy is mounted (looked in /proc/self/mountinfo)")]
    NoHierarchy,
    /// A cgroup file operation failed.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Freezing did not complete in time.
    #[error("cgroup {0} did not freeze in time")]
    FreezeTimeout(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One mounted hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Mount point.
    pub mount: PathBuf,
    /// cgroup v2.
    pub v2: bool,
    /// Controllers (v1: from the mount options; v2: from cgroup.controllers).
    pub controllers: Vec<String>,
}

impl Hierarchy {
    fn has(&self, c: &str) -> bool {
        self.controllers.iter().any(|x| x == c)
    }
}

/// The cgroup v1 controllers the kernel knows.
const V1_CONTROLLERS: &[&str] = &[
    "blkio",
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "freezer",
    "hugetlb",
    "memory",
    "misc",
    "net_cls",
    "net_prio",
    "perf_event",
    "pids",
    "rdma",
];

/// Finds cgroup hierarchies in a mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<Hierarchy> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let mount = PathBuf::from(pre[4]);
        match post[0] {
            "cgroup2" => out.push(Hierarchy {
                mount,
                v2: true,
                controllers: Vec::new(),
            }),
            "cgroup" => {
                let controllers = post[2]
                    .split(',')
                    .filter(|o| o.starts_with("name=") || V1_CONTROLLERS.contains(o))
                    .map(str::to_string)
                    .collect();
                out.push(Hierarchy {
                    mount,
                    v2: false,
                    controllers,
                });
            }
            _ => {}
        }
    }
    out
}

/// Creates and manages sandbox cgroups on this host.
#[derive(Debug, Clone)]
pub struct CgroupDriver {
    hierarchies: Vec<Hierarchy>,
    parent: String,
}

/// The cgroup directories of one sandbox, one per hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxCgroup {
    /// (hierarchy, directory) pairs.
    dirs: Vec<(Hierarchy, PathBuf)>,
}

impl CgroupDriver {
    /// Detects the host's hierarchies; sandbox cgroups go under `parent` in each.
    pub fn detect(parent: &str) -> Result<Self, CgroupError> {
        let text = fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_err(Path::new("/proc/self/mountinfo")))?;
        Self::from_hierarchies(parse_mountinfo(&text), parent)
    }

    /// Uses the given hierarchies (v2 controllers are read from disk).
    pub fn from_hierarchies(
        mut hierarchies: Vec<Hierarchy>,
        parent: &str,
    ) -> Result<Self, CgroupError> {
        for h in hierarchies.iter_mut().filter(|h| h.v2) {
            h.controllers = fs::read_to_string(h.mount.join("cgroup.controllers"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect();
        }
        // Keep one mount per hierarchy (bind mounts of the same tree would double-count).
        let mut seen = Vec::new();
        hierarchies.retain(|h| {
            let key = (h.v2, h.controllers.clone());
            if seen.contains(&key) {
                return false;
            }
            seen.push(key);
            true
        });
        if hierarchies.is_empty() {
            return Err(CgroupError::NoHierarchy);
        }
        Ok(Self {
            hierarchies,
            parent: parent.to_string(),
        })
    }

    /// The hierarchies in use.
    pub fn hierarchies(&self) -> &[Hierarchy] {
        &self.hierarchies
    }

    /// A short description: "v2", "v1", or "hybrid".
    pub fn mode(&self) -> &'static str {
        let v2 = self.hierarchies.iter().any(|h| h.v2);
        let v1 = self.hierarchies.iter().any(|h| !h.v2);
        match (v1, v2) {
            (true, true) => "hybrid",
            (true, false) => "v1",
            _ => "v2",
        }
    }

    /// The cgroup of sandbox `name` (not created).
    pub fn sandbox(&self, name: &str) -> SandboxCgroup {
        SandboxCgroup {
            dirs: self
                .hierarchies
                .iter()
                .map(|h| (h.clone(), h.mount.join(&self.parent).join(name)))
                .collect(),
        }
    }

    /// Names of the sandbox cgroups that exist under the parent (in any hierarchy).
    pub fn existing(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for h in &self.hierarchies {
            let Ok(dir) = fs::read_dir(h.mount.join(&self.parent)) else {
                continue;
            };
            for e in dir.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false)
                    && let Some(n) = e.file_name().to_str()
                    && !names.iter().any(|x| x == n)
                {
                    names.push(n.to_string());
                }
            }
        }
        names
    }

    /// Makes sandbox `name`'s cgroup in every hierarchy and applies `limits`.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<SandboxCgroup, CgroupError> {
        let cg = self.sandbox(name);
        for (h, dir) in &cg.dirs {
            let parent = dir.parent().unwrap_or(&h.mount);
            if h.v2 && !h.controllers.is_empty() {
                enable_v2_controllers(&h.mount, parent, &h.controllers)?;
            }
            ensure_dir(parent)?;
            if h.has("cpuset") {
                inherit_cpuset(&h.mount, parent)?;
            }
            ensure_dir(dir)?;
            if h.has("cpuset") {
                inherit_cpuset(&h.mount, dir)?;
            }
        }
        if let Err(e) = cg.apply(limits) {
            let _ = cg.remove(Duration::from_millis(100));
            return Err(e);
        }
        Ok(cg)
    }
}

fn ensure_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_err(dir)(e)),
        _ => Ok(()),
    }
}

/// The cgroup directories directly below `dir` (execs' own cgroups).
fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

fn enable_v2_controllers(
    root: &Path,
    parent: &Path,
    controllers: &[String],
) -> Result<(), CgroupError> {
    let wanted: Vec<&str> = ["cpu", "memory", "pids"]
        .into_iter()
        .filter(|c| controllers.iter().any(|x| x == c))
        .collect();
    let mut dir = root.to_path_buf();
    let mut chain = vec![dir.clone()];
    if let Ok(rel) = parent.strip_prefix(root) {
        for comp in rel.components() {
            dir = dir.join(comp);
            chain.push(dir.clone());
        }
    }
    for d in chain {
        ensure_dir(&d)?;
        let have = fs::read_to_string(d.join("cgroup.subtree_control")).unwrap_or_default();
        for c in &wanted {
            if !have.split_whitespace().any(|x| x == *c) {
                write(&d.join("cgroup.subtree_control"), &format!("+{c}"))?;
            }
        }
    }
    Ok(())
}

fn inherit_cpuset(root: &Path, dir: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = fs::read_to_string(dir.join(file)).unwrap_or_default();
        if !own.trim().is_empty() {
            continue;
        }
        let mut from = dir.parent();
        while let Some(p) = from {
            let v = fs::read_to_string(p.join(file)).unwrap_or_default();
            if !v.trim().is_empty() {
                write(&dir.join(file), v.trim())?;
                break;
            }
            if p == root {
                break;
            }
            from = p.parent();
        }
    }
    Ok(())
}

/// Device numbers a sandbox may open (v1 devices controller): null, zero, full, random,
/// urandom, tty, ptmx and pseudo-terminals.
const DEVICE_ALLOW: &[&str] = &[
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
];

impl SandboxCgroup {
    /// The directories to join, one per hierarchy.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.clone()).collect()
    }

    /// Whether any of the directories exists.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|(_, d)| d.exists())
    }

    fn find(&self, controller: &str) -> Option<(&Hierarchy, &PathBuf)> {
        self.dirs
            .iter()
            .find(|(h, _)| h.has(controller))
            .map(|(h, d)| (h, d))
    }

    fn unified(&self) -> Option<&PathBuf> {
        self.dirs.iter().find(|(h, _)| h.v2).map(|(_, d)| d)
    }

    /// Applies limits (unset ones are left at the kernel default: unlimited).
    pub fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        if let Some((h, dir)) = self.find("memory")
            && let Some(mem) = limits.memory_bytes
        {
            if h.v2 {
                write(&dir.join("memory.max"), &mem.to_string())?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
            } else {
                write(&dir.join("memory.limit_in_bytes"), &mem.to_string())?;
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &mem.to_string())?;
                }
            }
        }
        if let Some((_, dir)) = self.find("pids")
            && let Some(p) = limits.pids
        {
            write(&dir.join("pids.max"), &p.to_string())?;
        }
        if let Some((h, dir)) = self.find("cpu")
            && let Some(m) = limits.cpu_millis
        {
            let period = 100_000u64;
            let quota = (m * period / 1000).max(1000);
            if h.v2 {
                write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
            } else {
                write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
        if let Some((h, dir)) = self.find("devices")
            && !h.v2
        {
            write(&dir.join("devices.deny"), "a")?;
            for rule in DEVICE_ALLOW {
                write(&dir.join("devices.allow"), rule)?;
            }
        }
        Ok(())
    }

    /// Host pids of every process in the sandbox.
    pub fn pids(&self) -> Vec<i32> {
        let dir = self
            .unified()
            .or_else(|| self.find("pids").map(|(_, d)| d))
            .or_else(|| self.dirs.first().map(|(_, d)| d));
        let Some(dir) = dir else { return Vec::new() };
        let mut out: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        // Execs' own cgroups below (one level: nothing inside can make more).
        for sub in child_dirs(dir) {
            out.extend(
                fs::read_to_string(sub.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok()),
            );
        }
        out
    }

    /// Host pids of the sandbox's processes with the name of the exec cgroup each is in
    /// (none: the sandbox's own cgroup), from the same hierarchy as [`Self::pids`].
    pub fn pids_by_cgroup(&self) -> Vec<(i32, Option<String>)> {
        let dir = self
            .unified()
            .or_else(|| self.find("pids").map(|(_, d)| d))
            .or_else(|| self.dirs.first().map(|(_, d)| d));
        let Some(dir) = dir else { return Vec::new() };
        let read = |d: &Path| -> Vec<i32> {
            fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        };
        let mut out: Vec<(i32, Option<String>)> =
            read(dir).into_iter().map(|p| (p, None)).collect();
        for sub in child_dirs(dir) {
            let name = sub
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| n.starts_with("exec-"));
            out.extend(read(&sub).into_iter().map(|p| (p, name.clone())));
        }
        out
    }

    /// Processes the OOM killer killed in the sandbox: `oom_kill` of v2's `memory.events`
    /// (counted for the whole subtree) or of v1's `memory.oom_control`. None without a
    /// memory controller.
    pub fn oom_kills(&self) -> Option<u64> {
        let (h, dir) = self.find("memory")?;
        let file = dir.join(if h.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        });
        let text = fs::read_to_string(file).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .or(Some(0))
    }

    /// Changes memory, pids and CPU limits of a sandbox that runs, from `old` to `new`;
    /// on a failure what was changed is put back (best effort) and the error returned.
    pub fn update(&self, old: &Limits, new: &Limits) -> Result<(), CgroupError> {
        let r = self.write_limits(old, new);
        if r.is_err() {
            // Back to the old values, in the order that works from wherever it stopped.
            let _ = self.write_limits(new, old);
            let _ = self.write_limits(old, old);
        }
        r
    }

    fn write_limits(&self, old: &Limits, new: &Limits) -> Result<(), CgroupError> {
        if let Some((h, dir)) = self.find("memory")
            && let Some(mem) = new.memory_bytes
        {
            if h.v2 {
                write(&dir.join("memory.max"), &mem.to_string())?;
            } else {
                // v1 wants memory+swap >= memory at every step: raise memsw first, lower it
                // last.
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                let raising = old.memory_bytes.is_none_or(|o| mem >= o);
                if raising && memsw.exists() {
                    write(&memsw, &mem.to_string())?;
                }
                write(&dir.join("memory.limit_in_bytes"), &mem.to_string())?;
                if !raising && memsw.exists() {
                    write(&memsw, &mem.to_string())?;
                }
            }
        }
        if let Some((_, dir)) = self.find("pids")
            && let Some(p) = new.pids
        {
            write(&dir.join("pids.max"), &p.to_string())?;
        }
        if let Some((h, dir)) = self.find("cpu")
            && let Some(m) = new.cpu_millis
        {
            let period = 100_000u64;
            let quota = (m * period / 1000).max(1000);
            if h.v2 {
                write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
            } else {
                write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
        Ok(())
    }

    /// The hierarchy that tracks an exec's processes: the unified (v2) one, where
    /// `cgroup.kill` ends them all at once, else the v1 freezer (freeze, kill, thaw), else
    /// v1 pids.
    fn tracking(&self) -> Option<&(Hierarchy, PathBuf)> {
        self.dirs
            .iter()
            .find(|(h, _)| h.v2)
            .or_else(|| self.dirs.iter().find(|(h, _)| h.has("freezer")))
            .or_else(|| self.dirs.iter().find(|(h, _)| h.has("pids")))
    }

    /// Makes a cgroup for one exec below the sandbox's, in the tracking hierarchy only
    /// (limits stay the sandbox's: no controller is enabled below it). Everything the exec
    /// starts is born in it, and nothing in the sandbox can move out of it: the cgroup
    /// files belong to the host's root, which is no one inside.
    pub fn create_exec(&self, name: &str) -> Result<SandboxCgroup, CgroupError> {
        let (h, dir) = self.tracking().ok_or(CgroupError::NoHierarchy)?;
        let child = dir.join(name);
        ensure_dir(&child)?;
        Ok(SandboxCgroup {
            dirs: vec![(h.clone(), child)],
        })
    }

    /// Moves host process `pid` into this cgroup (every hierarchy it has).
    pub fn join(&self, pid: i32) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Current resource use.
    pub fn usage(&self) -> Usage {
        let read_u64 = |p: PathBuf| {
            fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let mut u = Usage::default();
        if let Some((h, dir)) = self.find("memory") {
            u.memory_bytes = read_u64(dir.join(if h.v2 {
                "memory.current"
            } else {
                "memory.usage_in_bytes"
            }));
            u.memory_peak_bytes = read_u64(dir.join(if h.v2 {
                "memory.peak"
            } else {
                "memory.max_usage_in_bytes"
            }));
        }
        if let Some((_, dir)) = self.find("pids") {
            u.pids = read_u64(dir.join("pids.current"));
            u.pids_limit_hits = fs::read_to_string(dir.join("pids.events"))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("max ")?.trim().parse().ok())
                })
                .unwrap_or(0);
        }
        u.oom_kills = self.oom_kills().unwrap_or(0);
        if let Some((h, dir)) = self.find(if self.find("cpuacct").is_some() {
            "cpuacct"
        } else {
            "cpu"
        }) {
            if h.v2 {
                let stat = fs::read_to_string(dir.join("cpu.stat")).unwrap_or_default();
                u.cpu_usec = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
                    .unwrap_or(0);
            } else {
                u.cpu_usec = read_u64(dir.join("cpuacct.usage")) / 1000;
            }
        }
        u
    }

    /// The directory whose freezer stops the sandbox: the unified (v2) one, or the v1 freezer's.
    pub fn freezer_dir(&self) -> Option<PathBuf> {
        self.unified()
            .cloned()
            .or_else(|| self.find("freezer").map(|(_, d)| d.clone()))
    }

    /// Freezes (`true`) or thaws (`false`) every process, waiting until the kernel confirms.
    pub fn set_frozen(&self, frozen: bool, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        if let Some(dir) = self.unified() {
            write(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
            let want = if frozen { "frozen 1" } else { "frozen 0" };
            loop {
                let events = fs::read_to_string(dir.join("cgroup.events")).map_err(io_err(dir))?;
                if events.lines().any(|l| l == want) {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(CgroupError::FreezeTimeout(dir.clone()));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let Some((_, dir)) = self.find("freezer") else {
            return Ok(());
        };
        write(
            &dir.join("freezer.state"),
            if frozen { "FROZEN" } else { "THAWED" },
        )?;
        let want = if frozen { "FROZEN" } else { "THAWED" };
        loop {
            let state = fs::read_to_string(dir.join("freezer.state")).map_err(io_err(dir))?;
            if state.trim() == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::FreezeTimeout(dir.clone()));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Whether any freezer holds the sandbox: `cgroup.freeze` of the unified (v2) directory,
    /// or the v1 freezer's state (on hybrid hosts either can be set, and each stops the tasks
    /// on its own).
    pub fn is_frozen(&self) -> bool {
        self.dirs.iter().any(|(h, dir)| {
            if h.v2 {
                fs::read_to_string(dir.join("cgroup.freeze")).is_ok_and(|s| s.trim() == "1")
            } else if h.has("freezer") {
                fs::read_to_string(dir.join("freezer.state")).is_ok_and(|s| s.trim() != "THAWED")
            } else {
                false
            }
        })
    }

    /// Thaws the sandbox in every freezer that holds it (the unified `cgroup.freeze` and the
    /// v1 freezer), waiting until the kernel confirms; returns whether any was frozen. Unlike
    /// [`Self::set_frozen`], which drives the one freezer the daemon uses, this also undoes a
    /// freeze someone else (a killed daemon, CRIU, a person) left in the other one.
    pub fn thaw_all(&self, timeout: Duration) -> Result<bool, CgroupError> {
        let deadline = Instant::now() + timeout;
        let mut was = false;
        for (h, dir) in &self.dirs {
            // (the file to write, its thawed value, the file that says when it is done)
            let (file, thawed, status) = if h.v2 {
                ("cgroup.freeze", "0", "cgroup.events")
            } else if h.has("freezer") {
                ("freezer.state", "THAWED", "freezer.state")
            } else {
                continue;
            };
            let path = dir.join(file);
            let now = match fs::read_to_string(&path) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            if now.trim() == thawed {
                continue;
            }
            was = true;
            write(&path, thawed)?;
            let status = dir.join(status);
            loop {
                let text = fs::read_to_string(&status).map_err(io_err(&status))?;
                let done = if h.v2 {
                    text.lines().any(|l| l == "frozen 0")
                } else {
                    text.trim() == thawed
                };
                if done {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(CgroupError::Io {
                        path: dir.clone(),
                        source: io::Error::other(format!(
                            "did not thaw within {timeout:?} ({})",
                            text.split_whitespace().collect::<Vec<_>>().join(" ")
                        )),
                    });
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(was)
    }

    /// SIGKILLs every process in the sandbox (thawing it first: a task the v1 freezer holds
    /// does not die of a SIGKILL until it is thawed).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if let Some(dir) = self.unified() {
            let kill = dir.join("cgroup.kill");
            if kill.exists() {
                write(&kill, "1")?;
                // cgroup.kill wakes tasks frozen by cgroup.freeze, not those of the v1 freezer.
                if self.is_frozen() {
                    self.thaw_all(Duration::from_secs(2))?;
                }
                return Ok(());
            }
        }
        // No cgroup.kill: freeze so nothing forks while we signal, then kill and thaw.
        let frozen = self.set_frozen(true, Duration::from_secs(2)).is_ok();
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if frozen || self.is_frozen() {
            let _ = self.thaw_all(Duration::from_secs(2));
        }
        Ok(())
    }

    /// Removes the directories once empty, retrying while the kernel still tears processes down.
    pub fn remove(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        let nested = self.dirs.iter().flat_map(|(_, d)| child_dirs(d));
        let all: Vec<PathBuf> = nested
            .chain(self.dirs.iter().map(|(_, d)| d.clone()))
            .collect();
        for dir in &all {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => return Err(io_err(dir)(e)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
35 27 0:30 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
37 35 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 35 0:33 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
39 35 0:34 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
40 35 0:35 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,nosuid,cpu,cpuacct
";

    #[test]
    fn mountinfo_hierarchies() {
        let h = parse_mountinfo(HYBRID);
        assert_eq!(h.len(), 5);
        assert_eq!(h[0].controllers, vec!["cpu"]);
        assert_eq!(h[2].controllers, vec!["name=systemd"]);
        assert!(h[3].v2);
        assert_eq!(h[4].controllers, vec!["cpu", "cpuacct"]);
    }

    #[test]
    fn limits_written_on_v1_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let mk = |name: &str, c: &[&str]| {
            let mount = tmp.path().join(name);
            fs::create_dir_all(&mount).unwrap();
            Hierarchy {
                mount,
                v2: false,
                controllers: c.iter().map(|s| s.to_string()).collect(),
            }
        };
        let driver = CgroupDriver::from_hierarchies(
            vec![
                mk("memory", &["memory"]),
                mk("pids", &["pids"]),
                mk("cpu", &["cpu"]),
            ],
            "dev-box",
        )
        .unwrap();
        let limits = Limits {
            memory_bytes: Some(1 << 20),
            pids: Some(64),
            cpu_millis: Some(500),
        };
        let cg = driver.create("sb1", &limits).unwrap();
        let read = |p: &str| fs::read_to_string(tmp.path().join(p)).unwrap();
        assert_eq!(read("memory/dev-box/sb1/memory.limit_in_bytes"), "1048576");
        assert_eq!(read("pids/dev-box/sb1/pids.max"), "64");
        assert_eq!(read("cpu/dev-box/sb1/cpu.cfs_quota_us"), "50000");
        assert_eq!(driver.existing(), vec!["sb1".to_string()]);
        assert_eq!(cg.paths().len(), 3);
    }

    #[test]
    fn thaw_all_thaws_both_freezers() {
        let tmp = tempfile::tempdir().unwrap();
        let freezer = tmp.path().join("freezer");
        let unified = tmp.path().join("unified");
        let driver = CgroupDriver::from_hierarchies(
            vec![
                Hierarchy {
                    mount: freezer.clone(),
                    v2: false,
                    controllers: vec!["freezer".into()],
                },
                Hierarchy {
                    mount: unified.clone(),
                    v2: true,
                    controllers: Vec::new(),
                },
            ],
            "dev-box",
        )
        .unwrap();
        let cg = driver.sandbox("sb1");
        let (v1, v2) = (freezer.join("dev-box/sb1"), unified.join("dev-box/sb1"));
        fs::create_dir_all(&v1).unwrap();
        fs::create_dir_all(&v2).unwrap();
        fs::write(v1.join("freezer.state"), "THAWED\n").unwrap();
        fs::write(v2.join("cgroup.freeze"), "0\n").unwrap();
        fs::write(v2.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert!(!cg.is_frozen());
        assert!(!cg.thaw_all(Duration::from_millis(10)).unwrap());
        fs::write(v1.join("freezer.state"), "FROZEN\n").unwrap();
        fs::write(v2.join("cgroup.freeze"), "1\n").unwrap();
        assert!(cg.is_frozen());
        assert!(cg.thaw_all(Duration::from_millis(10)).unwrap());
        assert_eq!(
            fs::read_to_string(v1.join("freezer.state")).unwrap(),
            "THAWED"
        );
        assert_eq!(fs::read_to_string(v2.join("cgroup.freeze")).unwrap(), "0");
        assert!(!cg.is_frozen());
        // A freezer that does not confirm in time is an error, not a hang.
        fs::write(v2.join("cgroup.freeze"), "1\n").unwrap();
        fs::write(v2.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        assert!(cg.thaw_all(Duration::from_millis(10)).is_err());
    }

    #[test]
    fn live_updates_oom_counts_and_exec_cgroups_on_a_v1_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let mk = |name: &str, c: &[&str]| {
            let mount = tmp.path().join(name);
            fs::create_dir_all(&mount).unwrap();
            Hierarchy {
                mount,
                v2: false,
                controllers: c.iter().map(|s| s.to_string()).collect(),
            }
        };
        let driver = CgroupDriver::from_hierarchies(
            vec![
                mk("memory", &["memory"]),
                mk("pids", &["pids"]),
                mk("cpu", &["cpu"]),
                mk("freezer", &["freezer"]),
            ],
            "dev-box",
        )
        .unwrap();
        let old = Limits {
            memory_bytes: Some(256 << 20),
            pids: Some(64),
            cpu_millis: Some(1000),
        };
        let cg = driver.create("sb1", &old).unwrap();
        let read = |p: &str| fs::read_to_string(tmp.path().join(p)).unwrap();
        let new = Limits {
            memory_bytes: Some(1 << 30),
            pids: Some(2048),
            cpu_millis: Some(2000),
        };
        cg.update(&old, &new).unwrap();
        assert_eq!(
            read("memory/dev-box/sb1/memory.limit_in_bytes"),
            "1073741824"
        );
        assert_eq!(read("pids/dev-box/sb1/pids.max"), "2048");
        assert_eq!(read("cpu/dev-box/sb1/cpu.cfs_quota_us"), "200000");
        // A write that fails puts back what was written before it.
        let pids = tmp.path().join("pids/dev-box/sb1/pids.max");
        fs::remove_file(&pids).unwrap();
        fs::create_dir(&pids).unwrap();
        let newer = Limits {
            memory_bytes: Some(512 << 20),
            ..new
        };
        assert!(cg.update(&new, &newer).is_err());
        assert_eq!(
            read("memory/dev-box/sb1/memory.limit_in_bytes"),
            "1073741824"
        );
        // OOM kills from v1's memory.oom_control.
        fs::write(
            tmp.path().join("memory/dev-box/sb1/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills(), Some(3));
        assert_eq!(cg.usage().oom_kills, 3);
        // Forks refused at the pids limit from pids.events.
        fs::write(tmp.path().join("pids/dev-box/sb1/pids.events"), "max 7\n").unwrap();
        assert_eq!(cg.usage().pids_limit_hits, 7);
        // An exec's cgroup: in the freezer hierarchy only (the tracking one on v1).
        let exec = cg.create_exec("exec-1").unwrap();
        assert_eq!(
            exec.paths(),
            vec![tmp.path().join("freezer/dev-box/sb1/exec-1")]
        );
        fs::write(tmp.path().join("freezer/dev-box/sb1/cgroup.procs"), "10\n").unwrap();
        fs::write(
            tmp.path().join("freezer/dev-box/sb1/exec-1/cgroup.procs"),
            "11\n12\n",
        )
        .unwrap();
        assert_eq!(exec.pids(), vec![11, 12]);
    }

    #[test]
    fn live_updates_and_exec_cgroups_on_a_v2_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let mount = tmp.path().join("unified");
        fs::create_dir_all(&mount).unwrap();
        fs::write(mount.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let driver = CgroupDriver::from_hierarchies(
            vec![Hierarchy {
                mount: mount.clone(),
                v2: true,
                controllers: Vec::new(),
            }],
            "dev-box",
        )
        .unwrap();
        let old = Limits {
            memory_bytes: Some(256 << 20),
            pids: Some(64),
            cpu_millis: Some(1000),
        };
        let cg = driver.create("sb1", &old).unwrap();
        let dir = mount.join("dev-box/sb1");
        let new = Limits {
            memory_bytes: Some(2 << 30),
            pids: Some(2048),
            cpu_millis: Some(500),
        };
        cg.update(&old, &new).unwrap();
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), "2147483648");
        assert_eq!(read("pids.max"), "2048");
        assert_eq!(read("cpu.max"), "50000 100000");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills(), Some(2));
        // An exec's cgroup sits below the sandbox's in the unified tree.
        let exec = cg.create_exec("exec-1").unwrap();
        assert_eq!(exec.paths(), vec![dir.join("exec-1")]);
    }
}
