//! The OS side: persisted network namespaces, veth pairs and tables (netlink, in-process),
//! sysctls, the host's routes, nftables scripts for rule sets (libnftables in process).

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::NetError;
use crate::{libnft, netlink};

/// Loopback's link index, in every network namespace.
const LOOPBACK: u32 = 1;

/// `statfs` magic of nsfs: a bind-mounted namespace file.
const NSFS_MAGIC: i64 = 0x6e73_6673;

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Os { what, source }
}

fn nix_os(what: impl Into<String>) -> impl FnOnce(nix::Error) -> NetError {
    let what = what.into();
    move |e| NetError::Os {
        what,
        source: std::io::Error::from(e),
    }
}

/// Runs `f` on a fresh thread (whose namespaces it may change) and returns its result.
pub(crate) fn on_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NetError> + Send + 'static,
) -> Result<T, NetError> {
    std::thread::Builder::new()
        .name("devbox-net-ns".into())
        .spawn(f)
        .map_err(os("spawning a namespace thread"))?
        .join()
        .map_err(|_| NetError::Internal("a namespace thread panicked".into()))?
}

/// Moves the calling thread into the network namespace bind-mounted at `path`.
pub(crate) fn enter_netns(path: &Path) -> Result<(), NetError> {
    let f = fs::File::open(path).map_err(os(format!("opening {}", path.display())))?;
    nix::sched::setns(&f, CloneFlags::CLONE_NEWNET).map_err(nix_os(format!(
        "entering the network namespace {}",
        path.display()
    )))
}

/// Whether `path` is a mounted namespace file.
pub(crate) fn is_ns_mount(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == NSFS_MAGIC)
        .unwrap_or(false)
}

/// Makes a new network namespace persisted at `path` (a bind mount of its nsfs file), with
/// loopback up and unprivileged ports from 0 (the sandbox's root does not own the namespace,
/// so it has no `CAP_NET_BIND_SERVICE` in it). An existing one is kept.
pub(crate) fn make_netns(path: &Path) -> Result<(), NetError> {
    if is_ns_mount(path) {
        return Ok(());
    }
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o444)
        .open(path)
        .map_err(os(format!("creating {}", path.display())))?;
    let target = path.to_path_buf();
    let made = on_thread(move || {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET)
            .map_err(nix_os("making a network namespace"))?;
        fs::write("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0").map_err(os(
            "setting ip_unprivileged_port_start in the sandbox's namespace",
        ))?;
        netlink::Rtnl::open()?.up(LOOPBACK)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(nix_os(format!(
            "bind-mounting the namespace at {}",
            target.display()
        )))
    });
    if made.is_err() {
        let _ = fs::remove_file(path);
    }
    made
}

/// Unmounts and removes a persisted namespace file; nothing when it is gone.
pub(crate) fn remove_netns(path: &Path) -> Result<(), NetError> {
    while is_ns_mount(path) {
        nix::mount::umount2(path, MntFlags::MNT_DETACH)
            .map_err(nix_os(format!("unmounting {}", path.display())))?;
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(os(format!("removing {}", path.display()))(e)),
    }
}

/// Mount points of namespace files under `dir` in this mount namespace.
pub(crate) fn ns_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 {
            let p = PathBuf::from(unescape_mount(f[4]));
            if p.parent() == Some(dir) && line.contains(" - nsfs ") {
                out.push(p);
            }
        }
    }
    out
}

fn unescape_mount(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|t| u8::from_str_radix(t, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn run_with_input(mut cmd: Command, input: &str, what: &str) -> Result<String, NetError> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            NetError::Missing(format!(
                "{what}: {e} (install iproute2 and nftables: scripts/deps.sh)"
            ))
        } else {
            os(what.to_string())(e)
        }
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(os(what.to_string()))?;
    }
    let out = child.wait_with_output().map_err(os(what.to_string()))?;
    if !out.status.success() {
        return Err(NetError::Command {
            what: what.to_string(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The sandbox's end of its veth pair, addressed but still down: nothing leaves the sandbox
/// until [`Inside::bring_up`] (once its table is in place).
pub(crate) struct Inside {
    rtnl: netlink::Rtnl,
    index: u32,
    gateway: Ipv4Addr,
}

impl Inside {
    /// Sets `eth0` up with its default route.
    pub(crate) fn bring_up(mut self) -> Result<(), NetError> {
        self.rtnl.up_with_route(self.index, self.gateway)
    }
}

/// Makes the veth pair of a sandbox: `veth` in the calling thread's namespace with
/// `gateway/30`, up; `eth0` in the namespace persisted at `netns` with `address/30`, down
/// (see [`Inside`]); IPv6 off on both. An existing pair is configured again (what exists is
/// kept). Returns whether the pair was made now.
pub(crate) fn make_veth(
    netns: &Path,
    veth: &str,
    gateway: Ipv4Addr,
    address: Ipv4Addr,
) -> Result<(bool, Inside), NetError> {
    let mut host = netlink::Rtnl::open()?;
    let made = match netlink::link_index(veth)? {
        Some(_) => false,
        None => {
            let ns = fs::File::open(netns).map_err(os(format!("opening {}", netns.display())))?;
            host.add_veth(veth, "eth0", ns.as_raw_fd())?;
            true
        }
    };
    sysctl(&format!("net/ipv6/conf/{veth}/disable_ipv6"), "1")?;
    let index = netlink::link_index(veth)?
        .ok_or_else(|| NetError::Internal(format!("the veth {veth} vanished while being made")))?;
    host.address(index, gateway, 30, true)?;
    let ns = netns.to_path_buf();
    let inside = on_thread(move || {
        enter_netns(&ns)?;
        sysctl("net/ipv6/conf/eth0/disable_ipv6", "1")?;
        let index = netlink::link_index("eth0")?.ok_or_else(|| {
            NetError::Internal(format!("no eth0 in the namespace {}", ns.display()))
        })?;
        let mut rtnl = netlink::Rtnl::open()?;
        rtnl.address(index, address, 30, false)?;
        Ok(Inside {
            rtnl,
            index,
            gateway,
        })
    })?;
    Ok((made, inside))
}

/// Deletes a veth pair by its name in the calling thread's namespace; nothing when gone.
pub(crate) fn delete_link(name: &str) -> Result<(), NetError> {
    netlink::Rtnl::open()?.delete_link(name)
}

/// Whether the table `inet <table>` exists in the calling thread's namespace.
pub(crate) fn has_table(table: &str) -> Result<bool, NetError> {
    netlink::Nft::open()?.has_table(table)
}

/// Deletes the table `inet <table>` (one transaction, no `nft` process); nothing when gone.
pub(crate) fn delete_table(table: &str) -> Result<(), NetError> {
    netlink::Nft::open()?.delete_table(table)
}

/// Runs `script` (one transaction): in process by libnftables ([`libnft`]), else as
/// `nft -f -`.
pub(crate) fn nft(script: &str) -> Result<(), NetError> {
    if let Some(done) = libnft::run(script, false) {
        return done.map(|_| ()).map_err(|detail| NetError::Command {
            what: "nft".into(),
            detail,
        });
    }
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"]);
    run_with_input(cmd, script, "nft").map(|_| ())
}

/// Runs the nft command `args` with JSON output (in process, else `nft -j <args>`).
pub(crate) fn nft_json(args: &[&str]) -> Result<serde_json::Value, NetError> {
    let text = match libnft::run(&args.join(" "), true) {
        Some(done) => done.map_err(|detail| NetError::Command {
            what: "nft -j".into(),
            detail,
        })?,
        None => {
            let mut cmd = Command::new("nft");
            cmd.arg("-j").args(args);
            run_with_input(cmd, "", "nft -j")?
        }
    };
    serde_json::from_str(&text).map_err(|e| NetError::Command {
        what: "nft -j".into(),
        detail: format!("unreadable output: {e}"),
    })
}

/// Deletes the connection-tracking entries that match `filter` (`-s ADDR`, `-d ADDR`) in
/// this namespace. `conntrack` exits 1 when there was nothing to delete: not an error.
fn conntrack_delete(filter: &[String]) -> Result<(), NetError> {
    let out = Command::new("conntrack")
        .arg("-D")
        .args(filter)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                NetError::Missing(format!(
                    "conntrack: {e} (install conntrack: scripts/deps.sh)"
                ))
            } else {
                os("conntrack")(e)
            }
        })?;
    match out.status.code() {
        Some(0) | Some(1) => Ok(()),
        _ => Err(NetError::Command {
            what: "conntrack -D".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

/// Forgets the tracked flows of `a` (to and from anything), or only those between `a` and
/// `b`, both ways. A flow the rules let through once stays "established" until it ends:
/// an address handed to another sandbox, or two sandboxes whose rule went, must not keep one.
pub(crate) fn forget_flows(a: Ipv4Addr, b: Option<Ipv4Addr>) -> Result<(), NetError> {
    let (a, b) = (a.to_string(), b.map(|b| b.to_string()));
    match b {
        Some(b) => {
            conntrack_delete(&["-s".into(), a.clone(), "-d".into(), b.clone()])?;
            conntrack_delete(&["-s".into(), b, "-d".into(), a])
        }
        None => {
            conntrack_delete(&["-s".into(), a.clone()])?;
            conntrack_delete(&["-d".into(), a])
        }
    }
}

/// Names of this namespace's nftables tables of family inet.
pub(crate) fn inet_tables() -> Result<Vec<String>, NetError> {
    let v = nft_json(&["list", "tables", "inet"])?;
    let mut out = Vec::new();
    if let Some(items) = v.get("nftables").and_then(|x| x.as_array()) {
        for item in items {
            if let Some(name) = item
                .get("table")
                .and_then(|t| t.get("name"))
                .and_then(|n| n.as_str())
            {
                out.push(name.to_string());
            }
        }
    }
    Ok(out)
}

/// Names of the network interfaces in the calling thread's namespace (/sys/class/net shows
/// those of whoever mounted /sys).
pub(crate) fn links() -> Vec<String> {
    fs::read_to_string("/proc/thread-self/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_string())
        .collect()
}

/// Writes a sysctl under /proc/sys (for the calling thread's network namespace).
pub(crate) fn sysctl(path: &str, value: &str) -> Result<(), NetError> {
    fs::write(format!("/proc/sys/{path}"), value).map_err(os(format!("setting {path}")))
}

/// IPv4 routes of the main table (destination, interface) of the calling thread's namespace.
pub(crate) fn routes() -> Vec<(Ipv4Net, String)> {
    let Ok(text) = fs::read_to_string("/proc/thread-self/net/route") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(dst), Ok(mask)) = (u32::from_str_radix(f[1], 16), u32::from_str_radix(f[7], 16))
        else {
            continue;
        };
        // /proc/net/route prints the address's bytes (network order) read as a native u32.
        let dst = Ipv4Addr::from(dst.to_ne_bytes());
        let prefix = mask.count_ones() as u8;
        if let Ok(net) = Ipv4Net::new(dst, prefix) {
            out.push((net.trunc(), f[0].to_string()));
        }
    }
    out
}

/// Whether two IPv4 networks share an address.
pub(crate) fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}
