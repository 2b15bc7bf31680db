//! A private world for one test: a network namespace playing the internet (a DNS server and
//! TCP servers of the test's own, on 198.18.0.0/15, the benchmarking range), and a "daemon"
//! namespace whose only route leads into it. The code under test runs in the daemon
//! namespace (its tokio runtime's threads join it), so no packet can reach the host's uplink:
//! [`World::new`] refuses to go on if the daemon namespace has any other route.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devbox_net::{NetConfig, Networks};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use nix::sched::CloneFlags;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The world's resolver and its names.
pub const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// allowed.test
pub const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// other.test
pub const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// No name: only reachable by a hard-coded address.
pub const BARE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
/// The daemon namespace's address towards the world.
pub const DAEMON: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn in_ns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
    .join()
    .unwrap()
}

pub fn enter(ns: &Path) {
    let f = std::fs::File::open(ns).unwrap();
    nix::sched::setns(&f, CloneFlags::CLONE_NEWNET).unwrap();
}

/// One test's world.
pub struct World {
    pub name: String,
    pub inet: PathBuf,
    pub daemon: PathBuf,
    pub state: tempfile::TempDir,
    pub rt: Option<tokio::runtime::Runtime>,
    pub nets: Option<Arc<Networks>>,
    /// The world DNS server's names (lowercase, with the trailing dot): tests add their own.
    pub zone: Arc<Mutex<HashMap<String, Vec<RData>>>>,
}

impl World {
    pub fn new() -> World {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("dbxt{}x{n}", std::process::id());
        let inet = format!("{name}i");
        let daemon = format!("{name}d");
        sh(&["ip", "netns", "add", &inet]);
        sh(&["ip", "netns", "add", &daemon]);
        let w = World {
            inet: PathBuf::from(format!("/run/netns/{inet}")),
            daemon: PathBuf::from(format!("/run/netns/{daemon}")),
            name: name.clone(),
            state: tempfile::tempdir().unwrap(),
            rt: None,
            nets: None,
            zone: Arc::new(Mutex::new(zone())),
        };
        let veth = format!("{name}w");
        sh(&["ip", "-n", &inet, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &daemon, "link", "set", "lo", "up"]);
        sh(&[
            "ip", "-n", &inet, "link", "add", &veth, "type", "veth", "peer", "name", "up0",
            "netns", &daemon,
        ]);
        sh(&[
            "ip",
            "-n",
            &inet,
            "addr",
            "add",
            "198.18.0.1/30",
            "dev",
            &veth,
        ]);
        sh(&["ip", "-n", &inet, "link", "set", &veth, "up"]);
        for a in [ALLOWED, OTHER, BARE] {
            sh(&[
                "ip",
                "-n",
                &inet,
                "addr",
                "add",
                &format!("{a}/32"),
                "dev",
                "lo",
            ]);
        }
        sh(&[
            "ip",
            "-n",
            &daemon,
            "addr",
            "add",
            "198.18.0.2/30",
            "dev",
            "up0",
        ]);
        sh(&["ip", "-n", &daemon, "link", "set", "up0", "up"]);
        sh(&[
            "ip",
            "-n",
            &daemon,
            "route",
            "add",
            "default",
            "via",
            "198.18.0.1",
        ]);
        w.check_routes();
        w.start_servers();
        w
    }

    /// Refuses to go on unless every route of the daemon namespace leads into this world
    /// (or to dev-box's own veths, or loopback).
    pub fn check_routes(&self) {
        let out = Command::new("ip")
            .args([
                "-n",
                &format!("{}d", self.name),
                "-4",
                "route",
                "show",
                "table",
                "all",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            let ok = line.contains("dev up0")
                || line.contains("dev lo")
                || line.contains("dev dbx")
                || line.starts_with("local ")
                || line.starts_with("broadcast ");
            assert!(
                ok,
                "the daemon namespace has a route out of the test's world: {line}"
            );
            if line.contains("dev up0") && line.contains(" via ") {
                assert!(
                    line.contains("via 198.18.0.1"),
                    "unexpected gateway: {line}"
                );
            }
        }
    }

    /// Makes the world's DNS server answer `name` with these A records (TTL 60), as a
    /// hostile name's own server would.
    pub fn set_name(&self, name: &str, addrs: &[Ipv4Addr]) {
        let key = format!("{}.", name.trim_end_matches('.').to_ascii_lowercase());
        let data = addrs.iter().map(|a| RData::A(A(*a))).collect();
        self.zone.lock().unwrap().insert(key, data);
    }

    fn start_servers(&self) {
        let inet = self.inet.clone();
        let zone = self.zone.clone();
        // Bound before this returns, so tests never race them.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            enter(&inet);
            let dns = UdpSocket::bind((UPSTREAM, 53)).unwrap();
            let mut tcps = Vec::new();
            for a in [ALLOWED, OTHER, BARE] {
                for port in [80u16, 443, 5001] {
                    tcps.push(TcpListener::bind((a, port)).unwrap());
                }
            }
            tx.send(()).unwrap();
            for l in tcps {
                std::thread::spawn(move || serve_tcp(l));
            }
            serve_dns(dns, zone);
        });
        rx.recv().unwrap();
    }

    /// Opens `Networks` on this world's state dir, inside the daemon namespace.
    pub fn networks(&mut self) -> Arc<Networks> {
        let daemon = self.daemon.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || enter(&daemon))
            .build()
            .unwrap();
        let cfg = NetConfig {
            subnet: "10.77.0.0/16".parse().unwrap(),
            upstream_dns: vec![SocketAddr::from((UPSTREAM, 53))],
            state_dir: self.state.path().to_path_buf(),
        };
        let nets = rt
            .block_on(async { tokio::task::spawn_blocking(move || Networks::new(cfg)).await })
            .unwrap()
            .unwrap();
        self.rt = Some(rt);
        self.nets = Some(nets.clone());
        nets
    }

    /// Runs `f` in the daemon namespace (where `Networks` methods must run).
    pub fn daemon<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_ns(&self.daemon, f)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(n) = self.nets.take() {
            let _ = in_ns(&self.daemon, move || n.cleanup(&[]));
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        // Deleting the namespaces takes their links, tables and servers' sockets with them.
        let _ = Command::new("ip")
            .args(["netns", "del", &format!("{}i", self.name)])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &format!("{}d", self.name)])
            .status();
    }
}

fn serve_tcp(l: TcpListener) {
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let local = s.local_addr().unwrap();
            let _ = s.write_all(format!("hello from {local}\n").as_bytes());
        });
    }
}

fn zone() -> HashMap<String, Vec<RData>> {
    let mut z = HashMap::new();
    z.insert("allowed.test.".to_string(), vec![RData::A(A(ALLOWED))]);
    z.insert("other.test.".to_string(), vec![RData::A(A(OTHER))]);
    z.insert(
        "www.allowed.test.".to_string(),
        vec![RData::CNAME(CNAME(
            Name::from_ascii("allowed.test.").unwrap(),
        ))],
    );
    z
}

fn serve_dns(sock: UdpSocket, zone: Arc<Mutex<HashMap<String, Vec<RData>>>>) {
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Ok(q) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let mut r = Message::new();
        r.set_id(q.id())
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_recursion_available(true);
        let Some(query) = q.queries().first().cloned() else {
            continue;
        };
        r.add_query(query.clone());
        let name = query.name().to_ascii().to_ascii_lowercase();
        let zone = zone.lock().unwrap().clone();
        match zone.get(&name) {
            None => {
                r.set_response_code(ResponseCode::NXDomain);
            }
            Some(data) => {
                for d in data {
                    r.add_answer(Record::from_rdata(query.name().clone(), 60, d.clone()));
                    if let RData::CNAME(c) = d
                        && let Some(t) = zone.get(&c.0.to_ascii())
                    {
                        for d in t {
                            r.add_answer(Record::from_rdata(c.0.clone(), 60, d.clone()));
                        }
                    }
                }
            }
        }
        let _ = sock.send_to(&r.to_vec().unwrap(), from);
    }
}

/// What a process in a sandbox's namespace sees: resolves through `server` and connects.
pub fn resolve(ns: &Path, server: Ipv4Addr, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let name = name.to_string();
    in_ns(ns, move || resolve_here(server, &name))
}

pub fn resolve_here(server: Ipv4Addr, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut m = Message::new();
    m.set_id(4242)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(format!("{name}.")).unwrap(),
            RecordType::A,
        ));
    sock.send_to(&m.to_vec().unwrap(), (server, 53))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    let n = sock.recv(&mut buf).map_err(|e| format!("no answer: {e}"))?;
    let r = Message::from_vec(&buf[..n]).map_err(|e| e.to_string())?;
    if r.response_code() != ResponseCode::NoError {
        return Err(format!("{}", r.response_code()));
    }
    Ok(r.answers()
        .iter()
        .filter_map(|a| match a.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}

/// Connects to `addr:port` from the namespace `ns` and reads the greeting.
pub fn fetch(ns: &Path, addr: Ipv4Addr, port: u16) -> Result<String, String> {
    in_ns(ns, move || fetch_here(addr, port))
}

pub fn fetch_here(addr: Ipv4Addr, port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((addr, port)), Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Sends `GET /` (HTTP/1.0) to `addr:port` from the namespace `ns` and reads the answer.
pub fn fetch_http(ns: &Path, addr: Ipv4Addr, port: u16) -> Result<String, String> {
    in_ns(ns, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((addr, port)), Duration::from_secs(2))
                .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    })
}
