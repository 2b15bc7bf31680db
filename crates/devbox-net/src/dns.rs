//! The resolver the daemon runs for sandboxes: one UDP and one TCP listener on each
//! sandbox's gateway address. A name the policy allows is resolved upstream (answers cached
//! for their TTL, clamped to 10 s..1 h), and in allow mode only the A addresses reached from
//! the asked name (itself or its CNAME chain) are added to the sandbox's set for that TTL
//! before the answer leaves. Other names get NXDOMAIN and a Blocked record. AAAA questions
//! get an empty answer: sandboxes have no IPv6.
//!
//! Against a hostile sandbox: a token bucket per sandbox (500 queries/s, bursts of 1,000)
//! drops the excess, at most 64 questions per sandbox and 256 in all wait for upstream at
//! once, TCP connections are limited (8 per sandbox) and time out, upstream answers are
//! taken only from the server asked (a connected socket) with the id and question asked.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::{Blocked, BlockedKind, Mode, NetError, Policy, Shared, Target, push_blocked};

/// Resolver statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Answers served from the cache.
    pub cache_hits: u64,
    /// Questions sent upstream.
    pub upstream_queries: u64,
    /// Questions dropped by the rate limit or the in-flight bounds.
    pub dropped: u64,
}

const MIN_TTL: u32 = 10;
const MAX_TTL: u32 = 3600;
const NEGATIVE_TTL: u32 = 10;
const CACHE_CAP: usize = 10_000;
const PER_SANDBOX_INFLIGHT: usize = 64;
const GLOBAL_UPSTREAM: usize = 256;
const TCP_CONNS: usize = 8;
const RATE: f64 = 500.0;
const BURST: f64 = 1000.0;

#[derive(Clone)]
struct Cached {
    rcode: ResponseCode,
    records: Vec<Record>,
    until: Instant,
}

pub(crate) struct Resolver {
    upstream: Vec<SocketAddr>,
    new_blocked: Arc<Mutex<VecDeque<(String, Blocked)>>>,
    cache: Mutex<HashMap<(String, RecordType), Cached>>,
    upstream_slots: Arc<Semaphore>,
    cache_hits: AtomicU64,
    upstream_queries: AtomicU64,
    dropped: AtomicU64,
    next_id: AtomicU64,
}

/// What the policy says of a name: refused, or allowed on these ports (empty: any).
pub(crate) fn name_decision(policy: &Policy, name: &str) -> Option<Vec<u16>> {
    let matches = |t: &Target| match t {
        Target::Name(n) => n.trim_end_matches('.').eq_ignore_ascii_case(name),
        Target::Suffix(s) => {
            let s = s.trim_end_matches('.').to_ascii_lowercase();
            name.len() > s.len() + 1
                && name.ends_with(&s)
                && name.as_bytes()[name.len() - s.len() - 1] == b'.'
        }
        Target::Net(_) | Target::Sandbox(_) => false,
    };
    if policy.deny.iter().any(|r| matches(&r.target)) {
        return None;
    }
    match policy.mode {
        Mode::None => None,
        Mode::Open => Some(Vec::new()),
        Mode::Allow => {
            let hits: Vec<Option<u16>> = policy
                .allow
                .iter()
                .filter(|r| matches(&r.target))
                .map(|r| r.port)
                .collect();
            if hits.is_empty() {
                None
            } else if hits.iter().any(|p| p.is_none()) {
                Some(Vec::new())
            } else {
                let mut ports: Vec<u16> = hits.into_iter().flatten().collect();
                ports.sort_unstable();
                ports.dedup();
                Some(ports)
            }
        }
    }
}

fn element_lines(table: &str, addr: Ipv4Addr, ports: &[u16], secs: u64) -> String {
    let mut s = String::new();
    if ports.is_empty() {
        let e = format!("inet {table} dns4 {{ {addr} timeout {secs}s }}");
        // add (no-op if present), delete, add: the element ends with this timeout.
        s.push_str(&format!(
            "add element {e}\ndelete element inet {table} dns4 {{ {addr} }}\nadd element {e}\n"
        ));
    } else {
        for p in ports {
            let e = format!("inet {table} dnsport4 {{ {addr} . {p} timeout {secs}s }}");
            s.push_str(&format!(
                "add element {e}\ndelete element inet {table} dnsport4 {{ {addr} . {p} }}\nadd element {e}\n"
            ));
        }
    }
    s
}

/// After a policy change: empties the name-derived sets and puts back the addresses of
/// names still allowed (with the time they have left). Returns the nft script.
pub(crate) fn refill_script(shared: &Shared, table: &str, policy: &Policy) -> String {
    let mut s = format!("flush set inet {table} dns4\nflush set inet {table} dnsport4\n");
    let now = Instant::now();
    let mut allowed = shared.allowed.lock().unwrap_or_else(|p| p.into_inner());
    allowed.retain(|addr, (name, until, ports)| {
        if *until <= now || policy.mode != Mode::Allow {
            return false;
        }
        match name_decision(policy, name) {
            Some(p) => {
                *ports = p;
                let secs = until.duration_since(now).as_secs().max(1);
                s.push_str(&element_lines(table, *addr, ports, secs));
                true
            }
            None => false,
        }
    });
    s
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * RATE).min(BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn refuse(shared: &Shared, new: &Mutex<VecDeque<(String, Blocked)>>, name: String) {
    shared.dns_refused.fetch_add(1, Ordering::Relaxed);
    push_blocked(shared, new, BlockedKind::Dns, name);
}

impl Resolver {
    pub(crate) fn new(
        upstream: Vec<SocketAddr>,
        new_blocked: Arc<Mutex<VecDeque<(String, Blocked)>>>,
    ) -> Self {
        Resolver {
            upstream,
            new_blocked,
            cache: Mutex::new(HashMap::new()),
            upstream_slots: Arc::new(Semaphore::new(GLOBAL_UPSTREAM)),
            cache_hits: AtomicU64::new(0),
            upstream_queries: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            next_id: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos() as u64)
                    .unwrap_or(7),
            ),
        }
    }

    pub(crate) fn stats(&self) -> DnsStats {
        DnsStats {
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            upstream_queries: self.upstream_queries.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    /// Listens on `addr:53` (UDP and TCP) for the sandbox `shared`.
    pub(crate) fn serve(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
        addr: Ipv4Addr,
        shared: Arc<Shared>,
    ) -> Result<Vec<tokio::task::AbortHandle>, NetError> {
        let at = SocketAddr::new(IpAddr::V4(addr), 53);
        let bind_err = |source| NetError::Port {
            bind: at.ip(),
            port: 53,
            source,
        };
        let udp = std::net::UdpSocket::bind(at).map_err(bind_err)?;
        udp.set_nonblocking(true).map_err(bind_err)?;
        let tcp = std::net::TcpListener::bind(at).map_err(bind_err)?;
        tcp.set_nonblocking(true).map_err(bind_err)?;
        let _guard = rt.enter();
        let udp = Arc::new(tokio::net::UdpSocket::from_std(udp).map_err(bind_err)?);
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(bind_err)?;
        let me = self.clone();
        let sh = shared.clone();
        let u = rt.spawn(async move { me.udp_loop(udp, sh).await });
        let me = self.clone();
        let t = rt.spawn(async move { me.tcp_loop(tcp, shared).await });
        Ok(vec![u.abort_handle(), t.abort_handle()])
    }

    async fn udp_loop(self: Arc<Self>, sock: Arc<tokio::net::UdpSocket>, shared: Arc<Shared>) {
        let inflight = Arc::new(Semaphore::new(PER_SANDBOX_INFLIGHT));
        let mut bucket = Bucket {
            tokens: BURST,
            last: Instant::now(),
        };
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if !bucket.take() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Ok(permit) = inflight.clone().try_acquire_owned() else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let q = buf[..n].to_vec();
            let me = self.clone();
            let sh = shared.clone();
            let sock = sock.clone();
            tokio::spawn(async move {
                if let Some(resp) = me.answer(&sh, &q, true).await {
                    let _ = sock.send_to(&resp, from).await;
                }
                drop(permit);
            });
        }
    }

    async fn tcp_loop(self: Arc<Self>, listener: tokio::net::TcpListener, shared: Arc<Shared>) {
        let conns = Arc::new(Semaphore::new(TCP_CONNS));
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let me = self.clone();
            let sh = shared.clone();
            tokio::spawn(async move {
                let _permit = permit;
                for _ in 0..100 {
                    let mut len = [0u8; 2];
                    let read = tokio::time::timeout(Duration::from_secs(5), async {
                        stream.read_exact(&mut len).await?;
                        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                        stream.read_exact(&mut q).await?;
                        Ok::<_, std::io::Error>(q)
                    })
                    .await;
                    let Ok(Ok(q)) = read else { return };
                    let Some(resp) = me.answer(&sh, &q, false).await else {
                        return;
                    };
                    let Ok(n) = u16::try_from(resp.len()) else {
                        return;
                    };
                    let mut out = n.to_be_bytes().to_vec();
                    out.extend_from_slice(&resp);
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    /// The answer to one question from a sandbox (none: drop it).
    async fn answer(&self, shared: &Shared, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
        let Ok(req) = Message::from_vec(bytes) else {
            shared.dns_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if req.message_type() != MessageType::Query {
            return None;
        }
        let mut resp = Message::new();
        resp.set_id(req.id())
            .set_message_type(MessageType::Response)
            .set_op_code(req.op_code())
            .set_recursion_desired(req.recursion_desired())
            .set_recursion_available(true);
        if req.op_code() != OpCode::Query
            || req.queries().len() != 1
            || req.queries()[0].query_class() != DNSClass::IN
        {
            shared.dns_refused.fetch_add(1, Ordering::Relaxed);
            resp.set_response_code(ResponseCode::Refused);
            return resp.to_vec().ok();
        }
        let q = req.queries()[0].clone();
        resp.add_query(q.clone());
        let name = q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let policy = shared
            .policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(ports) = name_decision(&policy, &name) else {
            refuse(shared, &self.new_blocked, name);
            resp.set_response_code(ResponseCode::NXDomain);
            return resp.to_vec().ok();
        };
        if q.query_type() == RecordType::AAAA {
            shared.dns_answered.fetch_add(1, Ordering::Relaxed);
            return resp.to_vec().ok();
        }
        let Some(found) = self.lookup(q.name(), q.query_type()).await else {
            resp.set_response_code(ResponseCode::ServFail);
            return resp.to_vec().ok();
        };
        let now = Instant::now();
        let left = found.until.saturating_duration_since(now).as_secs().max(1);
        let mut records = found.records;
        for r in &mut records {
            r.set_ttl(left as u32);
        }
        if policy.mode == Mode::Allow
            && let Some(table) = &shared.table
        {
            let addrs = chain_addresses(q.name(), &records);
            let mut script = String::new();
            {
                let mut allowed = shared.allowed.lock().unwrap_or_else(|p| p.into_inner());
                for a in addrs {
                    let fresh = matches!(allowed.get(&a),
                        Some((_, until, p)) if *until >= found.until && *p == ports);
                    if !fresh {
                        script.push_str(&element_lines(table, a, &ports, left));
                        allowed.insert(a, (name.clone(), found.until, ports.clone()));
                    }
                }
            }
            if !script.is_empty() && nft_async(&script).await.is_err() {
                resp.set_response_code(ResponseCode::ServFail);
                return resp.to_vec().ok();
            }
        }
        shared.dns_answered.fetch_add(1, Ordering::Relaxed);
        resp.set_response_code(found.rcode);
        resp.add_answers(records);
        let max = if udp {
            req.extensions()
                .as_ref()
                .map(|e| e.max_payload() as usize)
                .unwrap_or(512)
                .clamp(512, 4096)
        } else {
            65535
        };
        let out = resp.to_vec().ok()?;
        if out.len() > max {
            resp.take_answers();
            resp.set_truncated(true);
            return resp.to_vec().ok();
        }
        Some(out)
    }

    async fn lookup(&self, name: &Name, qtype: RecordType) -> Option<Cached> {
        let key = (name.to_ascii().to_ascii_lowercase(), qtype);
        let now = Instant::now();
        if let Some(c) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            && c.until > now
        {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Some(c.clone());
        }
        let _slot = self.upstream_slots.clone().try_acquire_owned().ok()?;
        self.upstream_queries.fetch_add(1, Ordering::Relaxed);
        for server in &self.upstream {
            if let Some((rcode, records)) = self.ask(*server, name, qtype).await {
                let ttl = if records.is_empty() {
                    NEGATIVE_TTL
                } else {
                    records
                        .iter()
                        .map(|r| r.ttl())
                        .min()
                        .unwrap_or(MIN_TTL)
                        .clamp(MIN_TTL, MAX_TTL)
                };
                let c = Cached {
                    rcode,
                    records,
                    until: Instant::now() + Duration::from_secs(ttl as u64),
                };
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= CACHE_CAP {
                    let now = Instant::now();
                    cache.retain(|_, v| v.until > now);
                }
                if cache.len() < CACHE_CAP {
                    cache.insert(key, c.clone());
                }
                return Some(c);
            }
        }
        None
    }

    async fn ask(
        &self,
        server: SocketAddr,
        name: &Name,
        qtype: RecordType,
    ) -> Option<(ResponseCode, Vec<Record>)> {
        let local: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let sock = tokio::net::UdpSocket::bind(local).await.ok()?;
        sock.connect(server).await.ok()?;
        let id = self.next_id.fetch_add(0x9e37, Ordering::Relaxed) as u16;
        let mut m = Message::new();
        m.set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(name.clone(), qtype));
        sock.send(&m.to_vec().ok()?).await.ok()?;
        let mut buf = vec![0u8; 4096];
        let deadline = Instant::now() + crate::UPSTREAM_TIMEOUT;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let n = tokio::time::timeout(left, sock.recv(&mut buf))
                .await
                .ok()?
                .ok()?;
            let Ok(r) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if r.id() != id
                || r.message_type() != MessageType::Response
                || r.queries().len() != 1
                || r.queries()[0].name() != name
                || r.queries()[0].query_type() != qtype
            {
                continue;
            }
            let rcode = r.response_code();
            if rcode != ResponseCode::NoError && rcode != ResponseCode::NXDomain {
                return None;
            }
            return Some((rcode, r.answers().to_vec()));
        }
    }
}

/// The A addresses of `name` itself or of the CNAME chain starting at it.
fn chain_addresses(name: &Name, records: &[Record]) -> Vec<Ipv4Addr> {
    let mut names = vec![name.to_ascii().to_ascii_lowercase()];
    // A chain is at most a few links; bounded anyway.
    for _ in 0..8 {
        let mut grew = false;
        for r in records {
            if let RData::CNAME(c) = r.data() {
                let owner = r.name().to_ascii().to_ascii_lowercase();
                let target = c.0.to_ascii().to_ascii_lowercase();
                if names.contains(&owner) && !names.contains(&target) {
                    names.push(target);
                    grew = true;
                }
            }
        }
        if !grew {
            break;
        }
    }
    records
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) if names.contains(&r.name().to_ascii().to_ascii_lowercase()) => Some(a.0),
            _ => None,
        })
        .collect()
}

async fn nft_async(script: &str) -> Result<(), NetError> {
    let script = script.to_string();
    tokio::task::spawn_blocking(move || crate::plumb::nft(&script))
        .await
        .map_err(|e| NetError::Internal(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rule;

    fn rule(t: Target, port: Option<u16>) -> Rule {
        Rule { target: t, port }
    }

    #[test]
    fn names_follow_the_policy() {
        let p = Policy {
            mode: Mode::Allow,
            allow: vec![
                rule(Target::Name("pypi.org".into()), None),
                rule(Target::Suffix("example.com".into()), Some(443)),
            ],
            deny: vec![rule(Target::Name("bad.example.com".into()), None)],
        };
        assert_eq!(name_decision(&p, "pypi.org"), Some(vec![]));
        assert_eq!(name_decision(&p, "a.example.com"), Some(vec![443]));
        assert_eq!(name_decision(&p, "example.com"), None);
        assert_eq!(name_decision(&p, "xexample.com"), None);
        assert_eq!(name_decision(&p, "bad.example.com"), None);
        assert_eq!(name_decision(&p, "other.org"), None);
        let open = Policy {
            mode: Mode::Open,
            ..p.clone()
        };
        assert_eq!(name_decision(&open, "other.org"), Some(vec![]));
        assert_eq!(name_decision(&open, "bad.example.com"), None);
    }

    #[test]
    fn only_the_chain_counts() {
        use hickory_proto::rr::rdata::{A, CNAME};
        let n = |s: &str| Name::from_ascii(s).unwrap();
        let recs = vec![
            Record::from_rdata(n("a.org."), 60, RData::CNAME(CNAME(n("b.org.")))),
            Record::from_rdata(n("b.org."), 60, RData::A(A::new(192, 0, 2, 1))),
            Record::from_rdata(n("evil.org."), 60, RData::A(A::new(192, 0, 2, 66))),
        ];
        assert_eq!(
            chain_addresses(&n("a.org."), &recs),
            vec![Ipv4Addr::new(192, 0, 2, 1)]
        );
    }
}
