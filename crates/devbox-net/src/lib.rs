//! Host-side network plumbing for dev-box sandboxes.
//!
//! Every sandbox gets a network namespace of its own, persisted as a bind mount under
//! `<state_dir>/netns/<id>` (loopback up, unprivileged ports from 0), which its processes join
//! instead of unsharing one. Sandboxes in `allow` or `open` mode also get:
//!
//! - a veth pair (`dbx<tag><index>` on the host, `eth0` inside) and a /30 of
//!   [`NetConfig::subnet`]: the host side is the gateway and resolver, the sandbox has the
//!   other address and a default route via it; the allocation is recorded in
//!   `<state_dir>/records/<id>.json` before anything is made, so a restarted daemon (and
//!   [`Networks::cleanup`]) finds it;
//! - one nftables table `inet dbx_<tag>_<index>` ([`rules`]): anti-spoofing, the deny list
//!   first, the host's own addresses, 169.254.0.0/16, multicast and the other sandboxes
//!   refused, then the policy (allow: the addresses the resolver let through, for their TTL,
//!   and CIDR(:port) rules; open: everything), masquerade out; refused attempts are
//!   counted per destination in a dynamic set with counters;
//! - the DNS resolver ([`dns`]) listening on the gateway address.
//!
//! Published ports ([`proxy`]) are userspace TCP proxies: a listener in the daemon's
//! namespace, the connection into the sandbox made with a socket of its namespace (so they
//! work in `none` mode too), bounded per sandbox and per daemon.
//!
//! `<tag>` is derived from the state dir, so daemons with different state dirs in one
//! network namespace never touch each other's links or tables.

mod dns;
mod libnft;
mod netlink;
mod plumb;
mod proxy;
pub use proxy::ConnHook;
mod rules;

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use dns::DnsStats;

/// Configuration of a daemon's sandbox networks.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Pool of sandbox addresses: a /30 per sandbox with a network. Must not overlap a route
    /// of the daemon's network namespace (see [`default_subnet`]).
    pub subnet: Ipv4Net,
    /// Where allowed names are resolved (see [`system_resolvers`]).
    pub upstream_dns: Vec<SocketAddr>,
    /// Persisted namespace files and allocation records.
    pub state_dir: PathBuf,
}

/// What a sandbox may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Loopback only.
    #[default]
    None,
    /// Only listed names, CIDRs and ports.
    Allow,
    /// Everything but the deny list (NAT through the host).
    Open,
}

/// What a rule names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// An exact domain name (`pypi.org`).
    Name(String),
    /// Every name below a suffix (`*.example.com` is `Suffix("example.com")`; the suffix
    /// itself is not included).
    Suffix(String),
    /// A network (IPv4 rules apply; sandboxes have no IPv6).
    Net(ipnet::IpNet),
    /// Another sandbox, by the name [`Networks::set_peer_lookup`] resolves (by default the
    /// id given to [`Networks::create`]): its address while its link is up. Sandboxes
    /// reach each other only through such an allow rule; it opens the way from this
    /// sandbox to that one (and the replies), not the other way.
    Sandbox(String),
}

/// One allow or deny rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// What it names.
    pub target: Target,
    /// Only this port (TCP and UDP); none: every port. A name denied with a port is denied
    /// whole (it does not resolve).
    pub port: Option<u16>,
}

/// A sandbox's network policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Policy {
    /// The mode.
    pub mode: Mode,
    /// Allowed names and networks (allow mode).
    pub allow: Vec<Rule>,
    /// Denied names and networks (every mode; applied first).
    pub deny: Vec<Rule>,
}

/// A published port: `bind:host_port` on the host forwards to `sandbox_port` inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMap {
    /// Host address to listen on.
    pub bind: IpAddr,
    /// Host port.
    pub host_port: u16,
    /// Port inside the sandbox (reached on its loopback).
    pub sandbox_port: u16,
}

/// What a sandbox's processes join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The persisted network namespace (join it with setns).
    pub netns: PathBuf,
    /// The sandbox's address (allow and open modes).
    pub address: Option<Ipv4Addr>,
    /// Its gateway, the host side of the veth.
    pub gateway: Option<Ipv4Addr>,
    /// The resolver to put in its resolv.conf.
    pub dns: Option<Ipv4Addr>,
}

impl Attachment {
    /// The `/etc/resolv.conf` a sandbox with a network should see (none without one).
    pub fn resolv_conf(&self) -> Option<String> {
        self.dns
            .map(|d| format!("# written by dev-box: the sandbox's resolver\nnameserver {d}\noptions edns0 timeout:2 attempts:2\n"))
    }
}

/// Counters of one sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Names answered.
    pub dns_answered: u64,
    /// Names refused (not allowed, denied, malformed).
    pub dns_refused: u64,
    /// Packets of refused connection attempts.
    pub conns_blocked: u64,
    /// Bytes leaving the sandbox.
    pub bytes_out: u64,
    /// Bytes coming back to it.
    pub bytes_in: u64,
}

/// What was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockedKind {
    /// A name the resolver refused.
    Dns,
    /// A connection attempt the rules refused.
    Connect,
}

/// One refused attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    /// When it was seen (ms since the epoch; for connections: when first read from the rules).
    pub time_unix_ms: u64,
    /// What kind.
    pub kind: BlockedKind,
    /// The name, or `addr:port/proto`.
    pub target: String,
}

/// A sandbox's network as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStatus {
    /// The mode.
    pub mode: Mode,
    /// Its address, if it has a link.
    pub address: Option<Ipv4Addr>,
    /// Counters.
    pub counters: Counters,
    /// Addresses reachable by name now: (address, name, seconds left).
    pub allowed_now: Vec<(IpAddr, String, Option<u64>)>,
}

/// Errors of the network layer. Bad input changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Bad input (an id, a port, a subnet).
    #[error("invalid: {0}")]
    Invalid(String),
    /// No network of that sandbox.
    #[error("no network for sandbox {0}")]
    NotFound(String),
    /// The pool has no free /30 left.
    #[error("the sandbox subnet {0} is full: configure a larger one")]
    PoolFull(Ipv4Net),
    /// The pool collides with a route of the daemon's network namespace.
    #[error(
        "the sandbox subnet {subnet} overlaps the route {route} (dev {dev}) of this host: choose another subnet (for example {suggest})"
    )]
    SubnetCollides {
        /// Configured subnet.
        subnet: Ipv4Net,
        /// The route it overlaps.
        route: Ipv4Net,
        /// Its interface.
        dev: String,
        /// A subnet that does not collide.
        suggest: String,
    },
    /// A host port is taken.
    #[error("cannot publish {bind}:{port}: {source}")]
    Port {
        /// Address.
        bind: IpAddr,
        /// Port.
        port: u16,
        /// Cause.
        source: std::io::Error,
    },
    /// A tool is missing.
    #[error("{0}")]
    Missing(String),
    /// A command failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// Which.
        what: String,
        /// Its error output.
        detail: String,
    },
    /// An OS call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Something that should not happen.
    #[error("internal: {0}")]
    Internal(String),
}

/// Candidate pools, first that does not collide with a route wins.
const CANDIDATES: &[&str] = &[
    "10.213.0.0/16",
    "172.29.0.0/16",
    "100.77.0.0/16",
    "10.147.0.0/16",
    "192.168.213.0/24",
];

/// The first of dev-box's candidate pools that overlaps no route of the calling thread's
/// network namespace.
pub fn default_subnet() -> Result<Ipv4Net, NetError> {
    let routes = plumb::routes();
    CANDIDATES
        .iter()
        .filter_map(|c| c.parse::<Ipv4Net>().ok())
        .find(|c| {
            !routes.iter().any(|(r, dev)| {
                r.prefix_len() > 0 && !dev.starts_with("dbx") && plumb::overlaps(r, c)
            })
        })
        .ok_or_else(|| {
            NetError::Invalid(
                "every candidate sandbox subnet collides with a route: configure one".into(),
            )
        })
}

/// The nameservers of /etc/resolv.conf (port 53).
pub fn system_resolvers() -> Vec<SocketAddr> {
    fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// What is on disk for one sandbox, written before anything is made.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    /// The /30's index in the pool (allow and open modes).
    index: Option<u32>,
}

/// An address the resolver let through: (name, until, ports; empty = any).
pub(crate) type AllowedEntry = (String, Instant, Vec<u16>);

/// Per-sandbox state shared with the resolver.
pub(crate) struct Shared {
    pub id: String,
    pub table: Option<String>,
    pub policy: RwLock<Policy>,
    /// Addresses the resolver let through: address -> (name, until, ports; empty = any).
    pub allowed: Mutex<HashMap<Ipv4Addr, AllowedEntry>>,
    pub dns_answered: AtomicU64,
    pub dns_refused: AtomicU64,
    pub log: Mutex<VecDeque<Blocked>>,
    /// Packets already reported per blocked destination.
    pub seen: Mutex<HashMap<String, u64>>,
}

/// A link's rules being loaded (then the sandbox's end set up).
type Pending = std::thread::JoinHandle<Result<(), NetError>>;

fn join(p: Pending) -> Result<(), NetError> {
    p.join()
        .map_err(|_| NetError::Internal("the thread loading a sandbox's rules panicked".into()))?
}

struct Sandbox {
    index: Option<u32>,
    /// Set until [`Networks::finish_create`].
    pending: Option<Pending>,
    netns: PathBuf,
    shared: Arc<Shared>,
    ports: Vec<PortMap>,
    proxies: Vec<tokio::task::AbortHandle>,
    resolver: Vec<tokio::task::AbortHandle>,
}

impl Sandbox {
    /// Stops the proxies and the resolver, and waits for rules still being loaded.
    fn stop_tasks(&mut self) {
        for t in self.proxies.drain(..).chain(self.resolver.drain(..)) {
            t.abort();
        }
        if let Some(p) = self.pending.take() {
            let _ = join(p);
        }
    }
}

/// How many refused attempts a sandbox's log keeps.
const LOG_CAP: usize = 1000;
/// How many new ones wait for [`Networks::take_new_blocked`].
const NEW_CAP: usize = 10_000;

/// One daemon's sandbox networks. `Send + Sync`, used behind `Arc`.
pub struct Networks {
    cfg: NetConfig,
    tag: String,
    rt: tokio::runtime::Handle,
    resolver: Arc<dns::Resolver>,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
    new_blocked: Arc<Mutex<VecDeque<(String, Blocked)>>>,
    forwarding: Mutex<bool>,
    /// Ids whose table, veth, namespace and record a background thread is removing.
    removing: Mutex<std::collections::HashSet<String>>,
    removed: Condvar,
    /// Resolves the names of [`Target::Sandbox`] rules to ids.
    peer_lookup: RwLock<Option<PeerLookup>>,
    /// Tables whose peer sets were last filled with something (emptied when no longer).
    peer_tables: Mutex<std::collections::BTreeSet<String>>,
    /// (sender, receiver) addresses the peer sets let through (their flows are forgotten
    /// when the pair goes).
    peer_pairs: Mutex<std::collections::BTreeSet<(Ipv4Addr, Ipv4Addr)>>,
    /// Called for each connection to a published port (see [`ConnHook`]).
    conn_hook: std::sync::RwLock<Option<proxy::ConnHook>>,
}

/// Resolves the name a [`Target::Sandbox`] rule gives to the id of the sandbox it means
/// now (none: no such sandbox).
pub type PeerLookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn push_blocked(
    shared: &Shared,
    new: &Mutex<VecDeque<(String, Blocked)>>,
    kind: BlockedKind,
    target: String,
) {
    let b = Blocked {
        time_unix_ms: now_ms(),
        kind,
        target,
    };
    if let Ok(mut log) = shared.log.lock() {
        if log.len() >= LOG_CAP {
            log.pop_front();
        }
        log.push_back(b.clone());
    }
    if let Ok(mut q) = new.lock() {
        if q.len() >= NEW_CAP {
            q.pop_front();
        }
        q.push_back((shared.id.clone(), b));
    }
}

fn valid_id(id: &str) -> Result<(), NetError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(NetError::Invalid(format!(
            "sandbox id {id:?}: 1-64 characters of [A-Za-z0-9_-]"
        )));
    }
    Ok(())
}

fn valid_policy(p: &Policy) -> Result<(), NetError> {
    for r in p.allow.iter().chain(&p.deny) {
        match &r.target {
            Target::Name(n) | Target::Suffix(n) => {
                let n = n.trim_end_matches('.');
                if n.is_empty()
                    || n.len() > 253
                    || !n
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
                    || n.split('.').any(|l| l.is_empty() || l.len() > 63)
                {
                    return Err(NetError::Invalid(format!("domain name {n:?}")));
                }
            }
            Target::Net(_) => {}
            Target::Sandbox(n) => valid_id(n)?,
        }
        if r.port == Some(0) {
            return Err(NetError::Invalid("port 0".into()));
        }
    }
    Ok(())
}

fn valid_ports(ports: &[PortMap]) -> Result<(), NetError> {
    let mut seen = std::collections::HashSet::new();
    for p in ports {
        if p.host_port == 0 || p.sandbox_port == 0 {
            return Err(NetError::Invalid("published port 0".into()));
        }
        if !seen.insert((p.bind, p.host_port)) {
            return Err(NetError::Invalid(format!(
                "{}:{} is published twice",
                p.bind, p.host_port
            )));
        }
    }
    Ok(())
}

impl Networks {
    /// Opens the networks of `cfg.state_dir`. Needs a tokio runtime (the resolver and port
    /// proxies run on it). Checks that the pool overlaps no route of this namespace but
    /// dev-box's own.
    pub fn new(cfg: NetConfig) -> Result<Arc<Self>, NetError> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| NetError::Internal("Networks::new needs a tokio runtime".into()))?;
        if cfg.subnet.prefix_len() > 30 {
            return Err(NetError::Invalid(format!(
                "sandbox subnet {} is smaller than a /30",
                cfg.subnet
            )));
        }
        for d in ["netns", "records"] {
            fs::create_dir_all(cfg.state_dir.join(d)).map_err(|source| NetError::Os {
                what: format!("creating {}", cfg.state_dir.join(d).display()),
                source,
            })?;
        }
        let canon = fs::canonicalize(&cfg.state_dir).unwrap_or_else(|_| cfg.state_dir.clone());
        let tag = tag_of(&canon);
        let ours = format!("dbx{tag}");
        for (route, dev) in plumb::routes() {
            if route.prefix_len() > 0
                && !dev.starts_with(&ours)
                && plumb::overlaps(&route, &cfg.subnet)
            {
                return Err(NetError::SubnetCollides {
                    subnet: cfg.subnet,
                    route,
                    dev,
                    suggest: default_subnet()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|_| "a private range no route uses".into()),
                });
            }
        }
        let new_blocked = Arc::new(Mutex::new(VecDeque::new()));
        let resolver = Arc::new(dns::Resolver::new(
            cfg.upstream_dns.clone(),
            new_blocked.clone(),
        ));
        Ok(Arc::new(Networks {
            cfg,
            tag,
            rt,
            resolver,
            sandboxes: Mutex::new(HashMap::new()),
            new_blocked,
            forwarding: Mutex::new(false),
            removing: Mutex::new(std::collections::HashSet::new()),
            removed: Condvar::new(),
            peer_lookup: RwLock::new(None),
            peer_tables: Mutex::new(std::collections::BTreeSet::new()),
            peer_pairs: Mutex::new(std::collections::BTreeSet::new()),
            conn_hook: std::sync::RwLock::new(None),
        }))
    }

    fn netns_path(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("netns").join(id)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("records")
            .join(format!("{id}.json"))
    }

    fn veth(&self, index: u32) -> String {
        format!("dbx{}{index:x}", self.tag)
    }

    fn table(&self, index: u32) -> String {
        format!("dbx_{}_{index}", self.tag)
    }

    fn link(&self, index: u32) -> rules::Link {
        let base = u32::from(self.cfg.subnet.network()) + index * 4;
        rules::Link {
            table: self.table(index),
            veth: self.veth(index),
            gateway: Ipv4Addr::from(base + 1),
            address: Ipv4Addr::from(base + 2),
            pool: self.cfg.subnet,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Sandbox>> {
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_records(&self) -> Vec<Record> {
        let dir = self.cfg.state_dir.join("records");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if let Ok(text) = fs::read(e.path())
                && let Ok(r) = serde_json::from_slice::<Record>(&text)
            {
                out.push(r);
            }
        }
        out
    }

    fn write_record(&self, r: &Record) -> Result<(), NetError> {
        let path = self.record_path(&r.id);
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec(r).map_err(|e| NetError::Internal(e.to_string()))?;
        fs::write(&tmp, text)
            .and_then(|_| fs::rename(&tmp, &path))
            .map_err(|source| NetError::Os {
                what: format!("writing {}", path.display()),
                source,
            })
    }

    fn allocate(&self, id: &str) -> Result<u32, NetError> {
        let used: std::collections::HashSet<u32> = self
            .read_records()
            .into_iter()
            .filter(|r| r.id != id)
            .filter_map(|r| r.index)
            .collect();
        let count = 1u64 << (32 - self.cfg.subnet.prefix_len() as u64 - 2);
        (0..count.min(u32::MAX as u64) as u32)
            .find(|i| !used.contains(i))
            .ok_or(NetError::PoolFull(self.cfg.subnet))
    }

    fn ensure_forwarding(&self) -> Result<(), NetError> {
        let mut on = self.forwarding.lock().unwrap_or_else(|p| p.into_inner());
        if !*on {
            plumb::sysctl("net/ipv4/ip_forward", "1")?;
            *on = true;
        }
        Ok(())
    }

    /// Makes the veth, addresses, routes and table of `index` (idempotent: an existing link
    /// is reused after a restart, its table's policy rewritten). Links, addresses and routes
    /// by netlink; the table in one `nft -f` transaction (a table left under that name by
    /// anything before, say a crash, is replaced in the same transaction, so a reused address
    /// never meets stale rules). The sandbox's end of the link comes up only after its table
    /// is in place: for a new link, both happen on a thread of their own, returned, so the
    /// `nft` process runs while the sandbox starts ([`Networks::finish_create`] waits).
    fn make_link(
        &self,
        netns: &Path,
        index: u32,
        policy: &Policy,
    ) -> Result<Option<Pending>, NetError> {
        let l = self.link(index);
        self.ensure_forwarding()?;
        let (made, inside) = plumb::make_veth(netns, &l.veth, l.gateway, l.address)?;
        let exists = plumb::has_table(&l.table)?;
        if !made && exists {
            // Peers as the table had them (before a restart) go: refresh_peers refills them
            // from the rules and sandboxes of now.
            let mut script = rules::policy_update(&l.table, policy);
            script.push_str(&rules::peer_update(&l.table, &rules::PeerSets::default()));
            plumb::nft(&script)?;
            return inside.bring_up().map(|()| None);
        }
        // Deleting a table in the transaction costs the kernel a few RCU grace periods (10 ms
        // and more): only a table that is there (left by something before) is replaced.
        let script = if exists {
            rules::fresh_table(&l, policy)
        } else {
            rules::table(&l, policy)
        };
        let rules_then_up = move || {
            let t = Instant::now();
            plumb::nft(&script)?;
            let loaded = t.elapsed();
            inside.bring_up()?;
            tracing::debug!(
                nft_us = loaded.as_micros() as u64,
                up_us = (t.elapsed() - loaded).as_micros() as u64,
                "a sandbox's rules loaded"
            );
            Ok(())
        };
        // The thread starts in the caller's network namespace, where the table belongs.
        match std::thread::Builder::new()
            .name("devbox-net-mk".into())
            .spawn(rules_then_up)
        {
            Ok(h) => Ok(Some(h)),
            Err(source) => Err(NetError::Os {
                what: "starting a thread for the sandbox's rules".into(),
                source,
            }),
        }
    }

    /// Deletes the table and the veth pair of `index` (netlink, no processes).
    fn remove_link(&self, index: u32) -> Result<(), NetError> {
        let l = self.link(index);
        plumb::delete_table(&l.table)?;
        plumb::delete_link(&l.veth)
    }

    /// Makes the sandbox's persisted netns (loopback up), and for allow/open its veth,
    /// address, routes, table and resolver; starts its port proxies. Idempotent for an
    /// existing id (re-attaches after a daemon restart, applying `policy` and `ports`).
    pub fn create(
        &self,
        id: &str,
        policy: &Policy,
        ports: &[PortMap],
    ) -> Result<Attachment, NetError> {
        let att = self.start_create(id, policy, ports)?;
        if let Err(e) = self.finish_create(id) {
            let _ = self.remove(id);
            return Err(e);
        }
        Ok(att)
    }

    /// [`Networks::create`], returning before a new link's rules are loaded: the namespace
    /// exists (join it), but the sandbox's end of its link stays down until they are. Call
    /// [`Networks::finish_create`] before anything the sandbox runs may need the network.
    pub fn start_create(
        &self,
        id: &str,
        policy: &Policy,
        ports: &[PortMap],
    ) -> Result<Attachment, NetError> {
        valid_id(id)?;
        valid_policy(policy)?;
        valid_ports(ports)?;
        self.wait_removed(id);
        let mut map = self.lock();
        if let Some(mut sb) = map.remove(id) {
            // Re-attach: stop what runs, then build again over what exists.
            sb.stop_tasks();
        }
        let existing = fs::read(self.record_path(id))
            .ok()
            .and_then(|t| serde_json::from_slice::<Record>(&t).ok());
        let want_link = policy.mode != Mode::None;
        let index = match (want_link, existing.as_ref().and_then(|r| r.index)) {
            (true, Some(i)) => Some(i),
            (true, None) => Some(self.allocate(id)?),
            (false, _) => None,
        };
        // Recorded before anything is made: a crash from here on leaves a record cleanup finds.
        let old_index = existing.as_ref().and_then(|r| r.index);
        self.write_record(&Record {
            id: id.to_string(),
            index: index.or(old_index),
        })?;
        let result = self.build(id, index, policy, ports);
        match result {
            Ok((att, sb)) => {
                if let (Some(old), None) = (old_index, index) {
                    // The mode went from allow/open to none: the link goes.
                    self.remove_link(old)?;
                    self.write_record(&Record {
                        id: id.to_string(),
                        index: None,
                    })?;
                }
                map.insert(id.to_string(), sb);
                Ok(att)
            }
            Err(e) => {
                if existing.is_none() {
                    drop(map);
                    let _ = self.remove_parts(id, index);
                }
                Err(e)
            }
        }
    }

    fn build(
        &self,
        id: &str,
        index: Option<u32>,
        policy: &Policy,
        ports: &[PortMap],
    ) -> Result<(Attachment, Sandbox), NetError> {
        let netns = self.netns_path(id);
        let t = Instant::now();
        plumb::make_netns(&netns)?;
        let ns_made = t.elapsed();
        let link = index.map(|i| self.link(i));
        let pending = match index {
            Some(i) => self.make_link(&netns, i, policy)?,
            None => None,
        };
        tracing::debug!(
            netns_us = ns_made.as_micros() as u64,
            link_us = (t.elapsed() - ns_made).as_micros() as u64,
            "a sandbox's namespace and link made"
        );
        let shared = Arc::new(Shared {
            id: id.to_string(),
            table: link.as_ref().map(|l| l.table.clone()),
            policy: RwLock::new(policy.clone()),
            allowed: Mutex::new(HashMap::new()),
            dns_answered: AtomicU64::new(0),
            dns_refused: AtomicU64::new(0),
            log: Mutex::new(VecDeque::new()),
            seen: Mutex::new(HashMap::new()),
        });
        let mut sb = Sandbox {
            index,
            pending,
            netns: netns.clone(),
            shared: shared.clone(),
            ports: Vec::new(),
            proxies: Vec::new(),
            resolver: Vec::new(),
        };
        if let Some(l) = &link {
            sb.resolver = self
                .resolver
                .serve(&self.rt, l.gateway, shared.clone())
                .inspect_err(|_| sb.stop_tasks())?;
        }
        match proxy::start_all(&self.rt, &netns, ports, id, self.conn_hook()) {
            Ok(p) => sb.proxies = p,
            Err(e) => {
                sb.stop_tasks();
                return Err(e);
            }
        }
        sb.ports = ports.to_vec();
        Ok((
            Attachment {
                netns,
                address: link.as_ref().map(|l| l.address),
                gateway: link.as_ref().map(|l| l.gateway),
                dns: link.as_ref().map(|l| l.gateway),
            },
            sb,
        ))
    }

    /// Waits until the network [`Networks::start_create`] began is whole: rules loaded, the
    /// sandbox's link up. Its error leaves the network in place (remove it).
    pub fn finish_create(&self, id: &str) -> Result<(), NetError> {
        valid_id(id)?;
        let pending = self
            .lock()
            .get_mut(id)
            .ok_or_else(|| NetError::NotFound(id.into()))?
            .pending
            .take();
        pending.map(join).unwrap_or(Ok(()))?;
        self.refresh_peers()
    }

    /// Sets how the names of [`Target::Sandbox`] rules are resolved (the daemon: sandbox
    /// name to id); until then a name is taken as an id.
    pub fn set_peer_lookup(&self, lookup: PeerLookup) {
        *self.peer_lookup.write().unwrap_or_else(|p| p.into_inner()) = Some(lookup);
    }

    /// Fills the peer sets of every table from the [`Target::Sandbox`] rules in force:
    /// in the sender's table the receiver's address (and port), in the receiver's the
    /// sender's veth and address (and port), so a connection passes the sender's egress and
    /// the receiver's inbound chain. Sandboxes whose link is still being made are left for
    /// their own [`Networks::finish_create`]. One `nft` transaction; nothing to do (and no
    /// process) when no rule names a sandbox and no set holds anything.
    fn refresh_peers(&self) -> Result<(), NetError> {
        let map = self.lock();
        let mut tables = self.peer_tables.lock().unwrap_or_else(|p| p.into_inner());
        let lookup = self.peer_lookup.read().unwrap_or_else(|p| p.into_inner());
        let ready = |id: &str| {
            map.get(id)
                .filter(|sb| sb.pending.is_none())
                .and_then(|sb| sb.index)
                .map(|i| self.link(i))
        };
        let mut want: std::collections::BTreeMap<String, rules::PeerSets> = Default::default();
        let mut pairs = std::collections::BTreeSet::new();
        for (id, sb) in map.iter() {
            let Some(from) = ready(id) else { continue };
            let policy = sb.shared.policy.read().unwrap_or_else(|p| p.into_inner());
            for r in &policy.allow {
                let Target::Sandbox(name) = &r.target else {
                    continue;
                };
                let peer = match lookup.as_ref() {
                    Some(f) => f(name),
                    None => Some(name.clone()),
                };
                let Some(to) = peer.filter(|p| p != id).and_then(|p| ready(&p)) else {
                    continue;
                };
                pairs.insert((from.address, to.address));
                want.entry(from.table.clone())
                    .or_default()
                    .to
                    .insert((to.address, r.port));
                want.entry(to.table.clone()).or_default().from.insert((
                    from.veth.clone(),
                    from.address,
                    r.port,
                ));
            }
        }
        if want.is_empty() && tables.is_empty() {
            return Ok(());
        }
        // Tables filled last time that are still there are emptied (or refilled).
        let live: std::collections::HashSet<String> = map
            .values()
            .filter(|sb| sb.pending.is_none())
            .filter_map(|sb| sb.index.map(|i| self.table(i)))
            .collect();
        let mut script = String::new();
        for t in tables
            .iter()
            .filter(|t| live.contains(*t) && !want.contains_key(*t))
        {
            script.push_str(&rules::peer_update(t, &rules::PeerSets::default()));
        }
        for (t, sets) in &want {
            script.push_str(&rules::peer_update(t, sets));
        }
        if !script.is_empty() {
            plumb::nft(&script)?;
        }
        *tables = want.into_keys().collect();
        // Flows of pairs no rule allows any more end here, not when they close.
        let mut old = self.peer_pairs.lock().unwrap_or_else(|p| p.into_inner());
        for (a, b) in old.difference(&pairs) {
            if let Err(e) = plumb::forget_flows(*a, Some(*b)) {
                tracing::warn!(%a, %b, "forgetting the flows of a withdrawn peer rule: {e}");
            }
        }
        *old = pairs;
        Ok(())
    }

    /// Changes a sandbox's policy live: the next connection (and name) is judged by it.
    /// Addresses let through for names no longer allowed are withdrawn at once.
    pub fn set_policy(&self, id: &str, policy: &Policy) -> Result<(), NetError> {
        valid_id(id)?;
        valid_policy(policy)?;
        let (mode_changes, ports) = {
            let map = self.lock();
            let sb = map.get(id).ok_or_else(|| NetError::NotFound(id.into()))?;
            let old = sb
                .shared
                .policy
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .mode;
            (
                (old == Mode::None) != (policy.mode == Mode::None),
                sb.ports.clone(),
            )
        };
        if mode_changes {
            // A link appears or goes: rebuild around the same namespace.
            return self.create(id, policy, &ports).map(|_| ());
        }
        let map = self.lock();
        let sb = map.get(id).ok_or_else(|| NetError::NotFound(id.into()))?;
        if let Some(table) = &sb.shared.table {
            let mut script = rules::policy_update(table, policy);
            script.push_str(&dns::refill_script(&sb.shared, table, policy));
            plumb::nft(&script)?;
        }
        *sb.shared.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.clone();
        drop(map);
        self.refresh_peers()
    }

    /// Sets what runs for each connection to a published port, before it is joined to the
    /// sandbox (the daemon wakes a sandbox its idle handling froze); ports published from
    /// now on use it.
    pub fn set_conn_hook(&self, hook: ConnHook) {
        *self.conn_hook.write().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    fn conn_hook(&self) -> Option<ConnHook> {
        self.conn_hook
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces a sandbox's published ports (a port that stays keeps its listener).
    pub fn set_ports(&self, id: &str, ports: &[PortMap]) -> Result<(), NetError> {
        valid_id(id)?;
        valid_ports(ports)?;
        let mut map = self.lock();
        let sb = map
            .get_mut(id)
            .ok_or_else(|| NetError::NotFound(id.into()))?;
        // Simple and all-or-nothing: start the new set first, then stop the old.
        let keep: Vec<PortMap> = Vec::new();
        let old: Vec<tokio::task::AbortHandle> = std::mem::take(&mut sb.proxies);
        for t in &old {
            t.abort();
        }
        let _ = keep;
        match proxy::start_all(&self.rt, &sb.netns, ports, id, self.conn_hook()) {
            Ok(p) => {
                sb.proxies = p;
                sb.ports = ports.to_vec();
                Ok(())
            }
            Err(e) => {
                // Put the old ones back (their ports were just freed).
                if let Ok(p) =
                    proxy::start_all(&self.rt, &sb.netns, &sb.ports, id, self.conn_hook())
                {
                    sb.proxies = p;
                }
                Err(e)
            }
        }
    }

    /// Reads the refused connection attempts of a sandbox from its table; new ones are
    /// logged (and queued for [`Networks::take_new_blocked`]). Returns (total packets).
    fn poll_blocked(&self, shared: &Shared) -> u64 {
        let Some(table) = &shared.table else {
            return 0;
        };
        let Ok(v) = plumb::nft_json(&["list", "set", "inet", table, "blocked"]) else {
            return 0;
        };
        self.note_blocked(shared, rules::parse_blocked(&v))
    }

    /// Records the destinations of `entries` (one sandbox's `blocked` set) whose counts grew
    /// since the last look; returns the packets blocked in all.
    fn note_blocked(&self, shared: &Shared, entries: Vec<rules::BlockedEntry>) -> u64 {
        let mut total = 0;
        let mut fresh = Vec::new();
        {
            let mut seen = shared.seen.lock().unwrap_or_else(|p| p.into_inner());
            for (addr, proto, port, packets) in entries {
                total += packets;
                let key = format!("{addr}:{port}/{proto}");
                let before = seen.insert(key.clone(), packets).unwrap_or(0);
                if packets > before || (before == 0 && packets == 0) {
                    fresh.push(key);
                }
            }
        }
        for key in fresh {
            push_blocked(shared, &self.new_blocked, BlockedKind::Connect, key);
        }
        total
    }

    /// Bytes each sandbox's link carried as the host side of its veth counts them (every
    /// packet, DNS to the gateway and blocked attempts too): sandbox id → (into the sandbox,
    /// out of it). One read of `/proc/self/net/dev` (the daemon's own network namespace,
    /// where the host sides live), no process; sandboxes without a veth are left out.
    pub fn link_bytes(&self) -> HashMap<String, (u64, u64)> {
        let by_veth: HashMap<String, String> = self
            .lock()
            .iter()
            .filter_map(|(id, sb)| Some((self.veth(sb.index?), id.clone())))
            .collect();
        if by_veth.is_empty() {
            return HashMap::new();
        }
        let text = std::fs::read_to_string("/proc/self/net/dev").unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (name, rest) = l.split_once(':')?;
                let id = by_veth.get(name.trim())?;
                let f: Vec<u64> = rest
                    .split_whitespace()
                    .map(|v| v.parse().unwrap_or(0))
                    .collect();
                // Receive: bytes first; transmit: bytes ninth. The host side sends what
                // the sandbox receives.
                Some((id.clone(), (*f.get(8)?, *f.first()?)))
            })
            .collect()
    }

    /// Mode, address, counters and the addresses reachable by name now.
    pub fn status(&self, id: &str) -> Result<NetStatus, NetError> {
        valid_id(id)?;
        let (shared, index) = {
            let map = self.lock();
            let sb = map.get(id).ok_or_else(|| NetError::NotFound(id.into()))?;
            (sb.shared.clone(), sb.index)
        };
        self.poll_blocked(&shared);
        let mut counters = Counters {
            dns_answered: shared.dns_answered.load(Ordering::Relaxed),
            dns_refused: shared.dns_refused.load(Ordering::Relaxed),
            ..Counters::default()
        };
        if let Some(table) = &shared.table {
            let get = |name: &str| {
                plumb::nft_json(&["list", "counter", "inet", table, name])
                    .map(|v| rules::parse_counter(&v))
                    .unwrap_or((0, 0))
            };
            counters.conns_blocked = get("blocked_total").0;
            counters.bytes_out = get("bytes_out").1;
            counters.bytes_in = get("bytes_in").1;
        }
        let now = Instant::now();
        let allowed_now = shared
            .allowed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, (_, until, _))| *until > now)
            .map(|(a, (name, until, _))| {
                (
                    IpAddr::V4(*a),
                    name.clone(),
                    Some(until.duration_since(now).as_secs()),
                )
            })
            .collect();
        let mode = shared.policy.read().unwrap_or_else(|p| p.into_inner()).mode;
        Ok(NetStatus {
            mode,
            address: index.map(|i| self.link(i).address),
            counters,
            allowed_now,
        })
    }

    /// The sandbox's refused attempts, most recent last (the last 1,000).
    pub fn blocked(&self, id: &str) -> Result<Vec<Blocked>, NetError> {
        valid_id(id)?;
        let shared = {
            let map = self.lock();
            map.get(id)
                .ok_or_else(|| NetError::NotFound(id.into()))?
                .shared
                .clone()
        };
        self.poll_blocked(&shared);
        let log = shared.log.lock().unwrap_or_else(|p| p.into_inner());
        Ok(log.iter().cloned().collect())
    }

    /// Refused attempts of every sandbox not taken yet (for the audit log); reads the
    /// tables of sandboxes with a link first.
    pub fn take_new_blocked(&self) -> Vec<(String, Blocked)> {
        // Every sandbox's set in one `nft` run (not one per sandbox, every round).
        let by_table: HashMap<String, Arc<Shared>> = self
            .lock()
            .values()
            .filter_map(|s| Some((s.shared.table.clone()?, s.shared.clone())))
            .collect();
        if !by_table.is_empty()
            && let Ok(v) = plumb::nft_json(&["list", "sets", "inet"])
        {
            for (table, entries) in rules::parse_blocked_by_table(&v) {
                if let Some(shared) = by_table.get(&table) {
                    self.note_blocked(shared, entries);
                }
            }
        }
        let mut q = self.new_blocked.lock().unwrap_or_else(|p| p.into_inner());
        q.drain(..).collect()
    }

    /// Statistics of the resolver (for benchmarks and status).
    pub fn dns_stats(&self) -> DnsStats {
        self.resolver.stats()
    }

    fn remove_parts(&self, id: &str, index: Option<u32>) -> Result<(), NetError> {
        if let Some(i) = index {
            self.remove_link(i)?;
            // Before the record goes (and the address with it): no flow of this sandbox
            // may stay established for the next one to get the address.
            let address = self.link(i).address;
            if let Err(e) = plumb::forget_flows(address, None) {
                tracing::warn!(%address, "forgetting the flows of a removed sandbox: {e}");
            }
        }
        plumb::remove_netns(&self.netns_path(id))?;
        match fs::remove_file(self.record_path(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NetError::Os {
                what: format!("removing {}", self.record_path(id).display()),
                source,
            }),
        }
    }

    /// Removes everything of a sandbox's network: proxies, resolver, table, veth, namespace,
    /// record. Idempotent.
    pub fn remove(&self, id: &str) -> Result<(), NetError> {
        valid_id(id)?;
        self.wait_removed(id);
        let index = self.detach(id);
        self.refresh_peers_or_log();
        self.remove_parts(id, index)
    }

    /// [`Self::refresh_peers`] where a failure must not stop what goes on (a removal):
    /// logged; the next change refills the sets.
    fn refresh_peers_or_log(&self) {
        if let Err(e) = self.refresh_peers() {
            tracing::warn!("refilling the sets of sandboxes' peers: {e}");
        }
    }

    /// Stops a sandbox's proxies and resolver (its host ports and resolver address are free
    /// once this returns) and forgets it; returns the index of its link, if any.
    fn detach(&self, id: &str) -> Option<u32> {
        let index = self.lock().remove(id).and_then(|mut sb| {
            sb.stop_tasks();
            sb.index
        });
        let recorded = fs::read(self.record_path(id))
            .ok()
            .and_then(|t| serde_json::from_slice::<Record>(&t).ok())
            .and_then(|r| r.index);
        index.or(recorded)
    }

    /// [`Networks::remove`] with the kernel's part off the caller's path: the proxies and
    /// resolver stop before this returns; the table, veth pair, namespace and record go on
    /// a thread of their own (the kernel waits for RCU grace periods to delete a table and a
    /// veth: 10-40 ms). The record goes last, so until then its address is not given to
    /// another sandbox, and after a crash in between [`Networks::cleanup`] finds and removes
    /// the rest. [`Networks::create`] of the same id waits for it; so does
    /// [`Networks::wait_removed`]. A failure is logged, and the record stays for cleanup.
    pub fn remove_in_background(self: &Arc<Self>, id: &str) -> Result<(), NetError> {
        valid_id(id)?;
        self.wait_removed(id);
        let index = self.detach(id);
        self.refresh_peers_or_log();
        self.removing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
        let (me, owned) = (self.clone(), id.to_string());
        // The thread starts in the caller's network namespace, where the links and tables are.
        let spawned = std::thread::Builder::new()
            .name("devbox-net-rm".into())
            .spawn(move || {
                if let Err(e) = me.remove_parts(&owned, index) {
                    tracing::warn!(sandbox = %owned, "removing its network (cleanup retries): {e}");
                }
                me.done_removing(&owned);
            });
        if spawned.is_err() {
            let done = self.remove_parts(id, index);
            self.done_removing(id);
            return done;
        }
        Ok(())
    }

    fn done_removing(&self, id: &str) {
        self.removing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.removed.notify_all();
    }

    /// Waits (at most `limit`) until every background removal has finished; returns
    /// whether they all did. For a daemon that is shutting down: what it leaves is
    /// removed by the next one's [`Networks::cleanup`], but better not left at all.
    pub fn wait_all_removed(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut set = self.removing.lock().unwrap_or_else(|p| p.into_inner());
        while !set.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            set = self
                .removed
                .wait_timeout(set, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Waits until a background removal of `id` (if any) has finished.
    pub fn wait_removed(&self, id: &str) {
        let mut set = self.removing.lock().unwrap_or_else(|p| p.into_inner());
        while set.contains(id) {
            set = self.removed.wait(set).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Removes the networks of every id not in `keep`: records, namespaces, links and
    /// tables of this state dir's tag, also those a killed daemon left half made. Returns
    /// the ids removed.
    pub fn cleanup(&self, keep: &[String]) -> Result<Vec<String>, NetError> {
        let mut removed = Vec::new();
        let keep_set: std::collections::HashSet<&str> = keep.iter().map(|s| s.as_str()).collect();
        let records = self.read_records();
        let mut kept_index = std::collections::HashSet::new();
        for r in &records {
            if keep_set.contains(r.id.as_str()) {
                if let Some(i) = r.index {
                    kept_index.insert(i);
                }
                continue;
            }
            self.remove(&r.id)?;
            removed.push(r.id.clone());
        }
        // Records a crash left half written (`<id>.tmp`, never renamed).
        for e in fs::read_dir(self.cfg.state_dir.join("records"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = e.path();
            if let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".tmp"))
                && !keep_set.contains(id)
            {
                let _ = fs::remove_file(&path);
            }
        }
        // Namespace files without a record (a crash between the two).
        let dir = self.cfg.state_dir.join("netns");
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.extend(plumb::ns_mounts_under(&dir));
        for f in files {
            let Some(id) = f.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if keep_set.contains(id.as_str()) {
                continue;
            }
            if let Some(mut s) = self.lock().remove(&id) {
                s.stop_tasks();
            }
            plumb::remove_netns(&f)?;
            if !removed.contains(&id) {
                removed.push(id);
            }
        }
        // Links and tables of our tag that no kept record owns.
        let prefix = format!("dbx{}", self.tag);
        for link in plumb::links() {
            if let Some(rest) = link.strip_prefix(&prefix)
                && let Ok(i) = u32::from_str_radix(rest, 16)
                && !kept_index.contains(&i)
            {
                plumb::delete_link(&link)?;
            }
        }
        let tprefix = format!("dbx_{}_", self.tag);
        if let Ok(tables) = plumb::inet_tables() {
            for t in tables {
                if let Some(rest) = t.strip_prefix(&tprefix)
                    && let Ok(i) = rest.parse::<u32>()
                    && !kept_index.contains(&i)
                {
                    plumb::delete_table(&t)?;
                }
            }
        }
        Ok(removed)
    }

    /// The persisted namespace of a sandbox (whether or not this daemon attached it yet).
    pub fn netns_of(&self, id: &str) -> Result<PathBuf, NetError> {
        valid_id(id)?;
        Ok(self.netns_path(id))
    }
}

/// Six hex digits naming a state dir (FNV-1a of its canonical path).
fn tag_of(path: &Path) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in path.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{:06x}", h & 0xff_ffff)
}

/// How long the resolver waits for an upstream server.
pub(crate) const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_are_checked() {
        assert!(valid_id("abc-1_2").is_ok());
        assert!(valid_id("../x").is_err());
        assert!(valid_id("").is_err());
        let bad = Policy {
            mode: Mode::Allow,
            allow: vec![Rule {
                target: Target::Name("a b.com".into()),
                port: None,
            }],
            deny: vec![],
        };
        assert!(valid_policy(&bad).is_err());
    }

    #[test]
    fn tags_are_short_and_stable() {
        let t = tag_of(Path::new("/var/lib/dev-box"));
        assert_eq!(t.len(), 6);
        assert_eq!(t, tag_of(Path::new("/var/lib/dev-box")));
        // veth names fit IFNAMSIZ with a 5-hex-digit index.
        assert!(format!("dbx{t}{:x}", 0xfffffu32).len() <= 15);
    }
}
