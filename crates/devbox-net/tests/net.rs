//! The data plane against a world of the test's own (see `world/mod.rs`). Needs root.

mod world;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use devbox_net::{BlockedKind, Mode, Policy, PortMap, Rule, Target};
use world::*;

fn name(n: &str) -> Rule {
    Rule {
        target: Target::Name(n.into()),
        port: None,
    }
}

fn net(n: &str, port: Option<u16>) -> Rule {
    Rule {
        target: Target::Net(n.parse().unwrap()),
        port,
    }
}

fn allow(rules: Vec<Rule>) -> Policy {
    Policy {
        mode: Mode::Allow,
        allow: rules,
        deny: vec![],
    }
}

#[test]
fn allowlisted_names_and_only_their_addresses() {
    let mut w = World::new();
    let nets = w.networks();
    let n = nets.clone();
    let att = w
        .daemon(move || n.create("sb1", &allow(vec![name("allowed.test")]), &[]))
        .unwrap();
    let gw = att.dns.unwrap();
    assert!(
        att.resolv_conf()
            .unwrap()
            .contains(&format!("nameserver {gw}"))
    );
    let ns = att.netns.clone();

    // Nothing is reachable before the name is resolved.
    assert!(fetch(&ns, ALLOWED, 80).is_err());
    assert_eq!(resolve(&ns, gw, "allowed.test").unwrap(), vec![ALLOWED]);
    assert_eq!(
        fetch(&ns, ALLOWED, 80).unwrap(),
        format!("hello from {ALLOWED}:80\n")
    );
    // Another name does not resolve; its address and a bare one stay refused.
    assert_eq!(
        resolve(&ns, gw, "other.test").unwrap_err(),
        "Non-Existent Domain"
    );
    assert!(fetch(&ns, OTHER, 80).is_err());
    assert!(fetch(&ns, BARE, 443).is_err());
    // DNS straight to another resolver is refused too.
    assert!(resolve(&ns, UPSTREAM, "allowed.test").is_err());

    let n = nets.clone();
    let blocked = w.daemon(move || n.blocked("sb1")).unwrap();
    let targets: Vec<(BlockedKind, String)> =
        blocked.iter().map(|b| (b.kind, b.target.clone())).collect();
    assert!(
        targets.contains(&(BlockedKind::Dns, "other.test".into())),
        "{targets:?}"
    );
    assert!(
        targets.contains(&(BlockedKind::Connect, format!("{BARE}:443/tcp"))),
        "{targets:?}"
    );
    assert!(
        targets.contains(&(BlockedKind::Connect, format!("{UPSTREAM}:53/udp"))),
        "{targets:?}"
    );
    let n = nets.clone();
    let status = w.daemon(move || n.status("sb1")).unwrap();
    assert_eq!(status.mode, Mode::Allow);
    assert!(status.counters.dns_answered >= 1 && status.counters.dns_refused >= 1);
    assert!(status.counters.conns_blocked >= 3, "{status:?}");
    assert!(status.counters.bytes_in > 0 && status.counters.bytes_out > 0);
    assert!(
        status
            .allowed_now
            .iter()
            .any(|(a, n, _)| *a == IpAddr::V4(ALLOWED) && n == "allowed.test")
    );
    let n = nets.clone();
    let new = w.daemon(move || n.take_new_blocked());
    assert!(
        new.iter()
            .any(|(id, b)| id == "sb1" && b.target == "other.test")
    );

    // Live: the name leaves the list -> its address is refused on the next connection.
    let n = nets.clone();
    w.daemon(move || n.set_policy("sb1", &allow(vec![net("198.18.1.2/32", Some(80))])))
        .unwrap();
    assert!(fetch(&ns, ALLOWED, 80).is_err());
    assert_eq!(
        resolve(&ns, gw, "allowed.test").unwrap_err(),
        "Non-Existent Domain"
    );
    // ... and the CIDR:port rule lets exactly that port through.
    assert_eq!(
        fetch(&ns, OTHER, 80).unwrap(),
        format!("hello from {OTHER}:80\n")
    );
    assert!(fetch(&ns, OTHER, 443).is_err());
    // A CNAME's target counts for an allowed name.
    let n = nets.clone();
    w.daemon(move || {
        n.set_policy(
            "sb1",
            &allow(vec![Rule {
                target: Target::Suffix("allowed.test".into()),
                port: Some(443),
            }]),
        )
    })
    .unwrap();
    assert_eq!(resolve(&ns, gw, "www.allowed.test").unwrap(), vec![ALLOWED]);
    assert!(fetch(&ns, ALLOWED, 443).is_ok());
    assert!(fetch(&ns, ALLOWED, 80).is_err());
    let n = nets.clone();
    w.daemon(move || n.remove("sb1")).unwrap();
    assert!(!ns.exists());
}

#[test]
fn open_mode_with_a_deny_list() {
    let mut w = World::new();
    let nets = w.networks();
    let n = nets.clone();
    let policy = Policy {
        mode: Mode::Open,
        allow: vec![],
        deny: vec![net("198.18.1.2/32", None), name("blocked.test")],
    };
    let att = w.daemon(move || n.create("op", &policy, &[])).unwrap();
    let (ns, gw) = (att.netns.clone(), att.dns.unwrap());
    assert_eq!(
        fetch(&ns, BARE, 5001).unwrap(),
        format!("hello from {BARE}:5001\n")
    );
    assert_eq!(resolve(&ns, gw, "other.test").unwrap(), vec![OTHER]);
    assert!(fetch(&ns, OTHER, 80).is_err());
    assert_eq!(
        resolve(&ns, gw, "blocked.test").unwrap_err(),
        "Non-Existent Domain"
    );
    // The host's own addresses and the metadata range, in every mode.
    assert!(fetch(&ns, DAEMON, 22).is_err());
    assert!(fetch(&ns, gw, 80).is_err());
    assert!(fetch(&ns, Ipv4Addr::new(169, 254, 169, 254), 80).is_err());
}

#[test]
fn published_port_in_none_mode() {
    let mut w = World::new();
    let nets = w.networks();
    let n = nets.clone();
    let port = 20000 + (std::process::id() % 20000) as u16;
    let map = PortMap {
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        host_port: port,
        sandbox_port: 3000,
    };
    let att = w
        .daemon(move || n.create("pp", &Policy::default(), &[map]))
        .unwrap();
    assert!(att.address.is_none() && att.dns.is_none());
    let ns = att.netns.clone();
    // A server inside the sandbox, on its loopback.
    let l = in_ns(&ns, || {
        std::net::TcpListener::bind("127.0.0.1:3000").unwrap()
    });
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = std::io::Write::write_all(&mut s, b"inside\n");
        }
    });
    let got = w
        .daemon(move || fetch_here(Ipv4Addr::LOCALHOST, port))
        .unwrap();
    assert_eq!(got, "inside\n");
    let n = nets.clone();
    w.daemon(move || n.remove("pp")).unwrap();
    assert!(
        w.daemon(move || fetch_here(Ipv4Addr::LOCALHOST, port))
            .is_err()
    );
}

#[test]
fn sandboxes_cannot_reach_each_other() {
    let mut w = World::new();
    let nets = w.networks();
    let n = nets.clone();
    let (a, b) = w.daemon(move || {
        let a = n
            .create(
                "a",
                &Policy {
                    mode: Mode::Open,
                    ..Policy::default()
                },
                &[],
            )
            .unwrap();
        let b = n
            .create(
                "b",
                &Policy {
                    mode: Mode::Open,
                    ..Policy::default()
                },
                &[],
            )
            .unwrap();
        (a, b)
    });
    let l = in_ns(&a.netns, || {
        std::net::TcpListener::bind("0.0.0.0:7000").unwrap()
    });
    std::thread::spawn(move || for _ in l.incoming() {});
    assert!(fetch(&b.netns, a.address.unwrap(), 7000).is_err());
    assert!(fetch(&b.netns, a.gateway.unwrap(), 53).is_err());
    assert!(resolve(&b.netns, a.gateway.unwrap(), "other.test").is_err());
    // b reaches the world, so the refusals above are the rules' doing.
    assert!(fetch(&b.netns, BARE, 80).is_ok());
}

fn peer(n: &str, port: Option<u16>) -> Rule {
    Rule {
        target: Target::Sandbox(n.into()),
        port,
    }
}

/// Listens on `port` in `ns`, greeting each connection with the address it came from.
fn greet_peers(ns: &std::path::Path, port: u16) {
    let l = in_ns(ns, move || {
        std::net::TcpListener::bind(("0.0.0.0", port)).unwrap()
    });
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            use std::io::Write as _;
            let from = c
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let _ = (&c).write_all(format!("from {from}").as_bytes());
        }
    });
}

#[test]
fn a_rule_lets_one_sandbox_reach_another() {
    let mut w = World::new();
    let nets = w.networks();
    let n = nets.clone();
    let (a, b, x) = w.daemon(move || {
        let b = n.create("b", &allow(vec![]), &[]).unwrap();
        let a = n
            .create("a", &allow(vec![peer("b", Some(7000))]), &[])
            .unwrap();
        let x = n.create("x", &allow(vec![]), &[]).unwrap();
        (a, b, x)
    });
    let (a_ip, b_ip) = (a.address.unwrap(), b.address.unwrap());
    for (ns, port) in [(&b.netns, 7000), (&b.netns, 7001), (&a.netns, 7000)] {
        greet_peers(ns, port);
    }
    // The rule's port, from the rule's sandbox, seen with its own address (not masqueraded).
    assert_eq!(fetch(&a.netns, b_ip, 7000).unwrap(), format!("from {a_ip}"));
    assert!(fetch(&a.netns, b_ip, 7001).is_err(), "another port");
    assert!(
        fetch(&b.netns, a_ip, 7000).is_err(),
        "the rule opens one way"
    );
    assert!(
        fetch(&x.netns, b_ip, 7000).is_err(),
        "a sandbox without the rule"
    );
    // Live: every port, then no rule.
    let n = nets.clone();
    w.daemon(move || n.set_policy("a", &allow(vec![peer("b", None)])))
        .unwrap();
    assert_eq!(fetch(&a.netns, b_ip, 7001).unwrap(), format!("from {a_ip}"));
    let n = nets.clone();
    w.daemon(move || n.set_policy("a", &allow(vec![]))).unwrap();
    assert!(fetch(&a.netns, b_ip, 7000).is_err(), "the rule withdrawn");
    let n = nets.clone();
    let blocked = w.daemon(move || n.blocked("a")).unwrap();
    assert!(
        blocked
            .iter()
            .any(|b| b.target.starts_with(&format!("{b_ip}:7000"))),
        "the refusal is logged: {blocked:?}"
    );
}

#[test]
fn a_peer_rule_follows_the_sandbox_not_its_old_address() {
    let mut w = World::new();
    let nets = w.networks();
    let n = nets.clone();
    // The rule is there before its sandbox.
    let (c, d) = w.daemon(move || {
        let c = n.create("c", &allow(vec![peer("d", None)]), &[]).unwrap();
        let d = n.create("d", &allow(vec![]), &[]).unwrap();
        (c, d)
    });
    let d_ip = d.address.unwrap();
    greet_peers(&d.netns, 7000);
    assert!(fetch(&c.netns, d_ip, 7000).is_ok());
    // d goes; e takes its address: c's rule names d, not the address.
    let n = nets.clone();
    let e = w.daemon(move || {
        n.remove("d").unwrap();
        n.create("e", &allow(vec![]), &[]).unwrap()
    });
    assert_eq!(e.address.unwrap(), d_ip, "the address is reused");
    greet_peers(&e.netns, 7000);
    assert!(fetch(&c.netns, d_ip, 7000).is_err());
}

/// Tracked flows between `a` and `b` (either way) in the daemon's namespace.
fn flows(w: &World, a: Ipv4Addr, b: Ipv4Addr) -> usize {
    let out = w.daemon(move || {
        std::process::Command::new("conntrack")
            .args(["-L", "-s", &a.to_string(), "-d", &b.to_string()])
            .output()
            .expect("conntrack")
    });
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Listens on `port` in `ns` and keeps every connection open (flows stay established).
fn hold_peers(ns: &std::path::Path, port: u16) {
    let l = in_ns(ns, move || {
        std::net::TcpListener::bind(("0.0.0.0", port)).unwrap()
    });
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming().flatten() {
            held.push(c);
        }
    });
}

#[test]
fn established_flows_end_with_the_rule_or_the_peer() {
    let mut w = World::new();
    let nets = w.networks();
    let n = nets.clone();
    let (a, b) = w.daemon(move || {
        let b = n.create("b", &allow(vec![]), &[]).unwrap();
        let a = n.create("a", &allow(vec![peer("b", None)]), &[]).unwrap();
        (a, b)
    });
    let (a_ip, b_ip) = (a.address.unwrap(), b.address.unwrap());
    hold_peers(&b.netns, 7000);
    let open = |ns: std::path::PathBuf| {
        in_ns(&ns, move || {
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from((b_ip, 7000)),
                std::time::Duration::from_secs(2),
            )
        })
        .expect("connect")
    };
    let _held = open(a.netns.clone());
    assert!(flows(&w, a_ip, b_ip) >= 1, "the flow is tracked");
    // The rule goes: so does the flow.
    let n = nets.clone();
    w.daemon(move || n.set_policy("a", &allow(vec![]))).unwrap();
    assert_eq!(flows(&w, a_ip, b_ip), 0, "a withdrawn rule leaves a flow");
    // The peer goes (its address is then free for another): its flows go first.
    let n = nets.clone();
    w.daemon(move || n.set_policy("a", &allow(vec![peer("b", None)])))
        .unwrap();
    let _held = open(a.netns.clone());
    assert!(flows(&w, a_ip, b_ip) >= 1);
    let n = nets.clone();
    w.daemon(move || n.remove("b")).unwrap();
    assert_eq!(flows(&w, a_ip, b_ip), 0, "a removed sandbox leaves a flow");
}

#[test]
fn create_and_remove_200_times_leaves_nothing() {
    let mut w = World::new();
    let nets = w.networks();
    let n = nets.clone();
    let state: PathBuf = w.state.path().to_path_buf();
    w.daemon(move || {
        for i in 0..200 {
            let id = format!("c{i}");
            let mode = if i % 2 == 0 { Mode::Allow } else { Mode::None };
            let p = Policy {
                mode,
                allow: vec![name("allowed.test")],
                deny: vec![],
            };
            n.create(&id, &p, &[]).unwrap();
            n.remove(&id).unwrap();
        }
    });
    assert_leftovers(&w, &state, 0);
}

#[test]
fn background_removals_never_hand_out_an_address_still_in_use() {
    let mut w = World::new();
    let nets = w.networks();
    let state: PathBuf = w.state.path().to_path_buf();
    let open = Policy {
        mode: Mode::Open,
        allow: vec![],
        deny: vec![],
    };
    let n = nets.clone();
    let o = open.clone();
    let (a, b) = w.daemon(move || {
        let a = n.create("bg-a", &o, &[]).unwrap();
        n.remove_in_background("bg-a").unwrap();
        // Made while bg-a's removal may still run: never bg-a's address unless it is done.
        let b = n.create("bg-b", &allow(vec![]), &[]).unwrap();
        (a, b)
    });
    let n = nets.clone();
    let a_done = w.daemon(move || {
        n.wait_removed("bg-a");
        true
    });
    assert!(a_done);
    assert!(
        fetch(&b.netns, BARE, 5001).is_err(),
        "bg-b got bg-a's open rules"
    );
    // Many at once, then a burst of creates: every address distinct, each its own rules.
    let n = nets.clone();
    let atts = w.daemon(move || {
        let mut out = Vec::new();
        for i in 0..6 {
            let id = format!("bg{i}");
            n.create(&id, &open, &[]).unwrap();
            n.remove_in_background(&id).unwrap();
            out.push(n.create(&format!("fg{i}"), &allow(vec![]), &[]).unwrap());
        }
        out
    });
    let mut addrs: Vec<_> = atts.iter().map(|a| a.address).collect();
    addrs.push(b.address);
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 7, "{addrs:?}");
    for att in &atts {
        assert!(fetch(&att.netns, BARE, 5001).is_err());
    }
    let n = nets.clone();
    w.daemon(move || {
        for i in 0..6 {
            n.remove_in_background(&format!("fg{i}")).unwrap();
        }
        n.remove("bg-b").unwrap();
        for i in 0..6 {
            n.wait_removed(&format!("bg{i}"));
            n.wait_removed(&format!("fg{i}"));
        }
    });
    assert_leftovers(&w, &state, 0);
    let _ = a;
}

#[test]
fn a_reused_address_never_meets_a_stale_table() {
    let mut w = World::new();
    let nets = w.networks();
    let state: PathBuf = w.state.path().to_path_buf();
    let open = Policy {
        mode: Mode::Open,
        allow: vec![],
        deny: vec![],
    };
    let n = nets.clone();
    let a = w.daemon(move || n.create("st-a", &open, &[])).unwrap();
    assert!(fetch(&a.netns, BARE, 5001).is_ok());
    // Something (an older build, a hand) left st-a's table behind but nothing else.
    let n = nets.clone();
    w.daemon(move || {
        let out = std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
            .unwrap();
        let tables = String::from_utf8_lossy(&out.stdout).into_owned();
        let table = tables
            .lines()
            .find_map(|l| l.strip_prefix("table inet dbx_"))
            .map(|t| format!("dbx_{t}"))
            .unwrap();
        let backup = std::process::Command::new("nft")
            .args(["list", "table", "inet", &table])
            .output()
            .unwrap();
        n.remove("st-a").unwrap();
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), &backup.stdout).unwrap();
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
    });
    // The next sandbox gets the same address, and its own rules only.
    let n = nets.clone();
    let c = w
        .daemon(move || n.create("st-c", &allow(vec![]), &[]))
        .unwrap();
    assert_eq!(c.address, a.address);
    assert!(
        fetch(&c.netns, BARE, 5001).is_err(),
        "the stale open table was used"
    );
    let n = nets.clone();
    w.daemon(move || n.remove("st-c")).unwrap();
    assert_leftovers(&w, &state, 0);
}

#[test]
fn a_daemon_killed_during_background_removals_leaves_nothing() {
    if let Ok(dir) = std::env::var("DBX_NET_RM_CRASH_CHILD") {
        removing_child(PathBuf::from(dir));
        return;
    }
    let mut w = World::new();
    let state = w.state.path().to_path_buf();
    for delay_ms in [0u64, 3, 11, 29] {
        let mut child = std::process::Command::new("nsenter")
            .arg(format!("--net={}", w.daemon.display()))
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_daemon_killed_during_background_removals_leaves_nothing",
                "--nocapture",
            ])
            .env("DBX_NET_RM_CRASH_CHILD", &state)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let read = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            assert!(
                read > 0,
                "the child ended before it was killed (see its error above)"
            );
            if line.starts_with("removing 4") {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
    }
    let nets = w.networks();
    let n = nets.clone();
    w.daemon(move || n.cleanup(&[])).unwrap();
    assert_leftovers(&w, &state, 0);
}

/// Makes networks and removes them in the background, without end, until killed.
fn removing_child(state: PathBuf) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let nets = devbox_net::Networks::new(devbox_net::NetConfig {
        subnet: "10.77.0.0/16".parse().unwrap(),
        upstream_dns: vec![std::net::SocketAddr::from((UPSTREAM, 53))],
        state_dir: state,
    })
    .unwrap();
    let pid = std::process::id();
    for i in 0.. {
        let id = format!("r{pid}x{i}");
        nets.create(&id, &allow(vec![name("allowed.test")]), &[])
            .unwrap();
        nets.remove_in_background(&id).unwrap();
        println!("removing {i}");
    }
}

/// Counts what a daemon's networks left in the daemon namespace and the state dir.
fn assert_leftovers(w: &World, state: &std::path::Path, want: usize) {
    let state = state.to_path_buf();
    let (links, tables) = w.daemon(|| {
        let out = std::process::Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap();
        let links = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(": dbx"))
            .count();
        let out = std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
            .unwrap();
        let tables = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("dbx_"))
            .count();
        (links, tables)
    });
    let netns = std::fs::read_dir(state.join("netns")).unwrap().count();
    let records = std::fs::read_dir(state.join("records")).unwrap().count();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(state.to_str().unwrap()))
        .count();
    assert_eq!(
        (links, tables, netns, records, mounts),
        (want, want, want, want, want)
    );
}

#[test]
fn a_hostile_sandbox_gets_nowhere() {
    let mut w = World::new();
    let nets = w.networks();
    let n = nets.clone();
    let att = w
        .daemon(move || n.create("evil", &allow(vec![name("allowed.test")]), &[]))
        .unwrap();
    let (ns, gw) = (att.netns.clone(), att.dns.unwrap());
    // Spoofed sources (root inside can add addresses here; a real sandbox cannot even do
    // that, it has no CAP_NET_ADMIN in this namespace): dropped, to the world and to the host.
    let status = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["ip", "addr", "add", "198.18.9.9/32", "dev", "eth0"])
        .status()
        .unwrap();
    assert!(status.success());
    let spoofed = in_ns(&ns, move || {
        let s = socket_bound(Ipv4Addr::new(198, 18, 9, 9));
        let to_world = s
            .connect_timeout(
                &std::net::SocketAddr::from((BARE, 80)),
                std::time::Duration::from_secs(1),
            )
            .is_ok();
        let s = socket_bound(Ipv4Addr::new(198, 18, 9, 9));
        let to_dns = s
            .connect_timeout(
                &std::net::SocketAddr::from((gw, 53)),
                std::time::Duration::from_secs(1),
            )
            .is_ok();
        (to_world, to_dns)
    });
    assert_eq!(spoofed, (false, false));
    // A flood of questions: the excess is dropped, the daemon keeps answering afterwards.
    in_ns(&ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05other\x04test\x00\x00\x01\x00\x01";
        for _ in 0..20_000 {
            let _ = s.send_to(q, (gw, 53));
        }
        // Garbage too.
        for i in 0..2_000u32 {
            let _ = s.send_to(&i.to_le_bytes(), (gw, 53));
        }
    });
    assert!(nets.dns_stats().dropped > 0);
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(resolve(&ns, gw, "allowed.test").unwrap(), vec![ALLOWED]);
    assert!(fetch(&ns, ALLOWED, 80).is_ok());
    let n = nets.clone();
    // The log stays bounded however much was refused.
    assert!(w.daemon(move || n.blocked("evil")).unwrap().len() <= 1000);
}

fn socket_bound(src: Ipv4Addr) -> socket2_like::Socket {
    socket2_like::Socket::bound(src)
}

/// A TCP socket bound to a source address before connecting (std cannot do that).
mod socket2_like {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    pub struct Socket(std::os::fd::OwnedFd);

    impl Socket {
        pub fn bound(src: Ipv4Addr) -> Socket {
            use nix::sys::socket::*;
            let fd = socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::empty(),
                None,
            )
            .unwrap();
            setsockopt(&fd, sockopt::IpFreebind, &true).unwrap();
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrIn::from(std::net::SocketAddrV4::new(src, 0)),
            )
            .unwrap();
            Socket(fd)
        }

        pub fn connect_timeout(&self, to: &SocketAddr, t: Duration) -> Result<(), ()> {
            use nix::sys::socket::*;
            let SocketAddr::V4(v4) = to else {
                return Err(());
            };
            let fd = std::os::fd::AsRawFd::as_raw_fd(&self.0);
            setsockopt(
                &self.0,
                sockopt::SendTimeout,
                &nix::sys::time::TimeVal::new(t.as_secs() as i64, 0),
            )
            .unwrap();
            connect(fd, &SockaddrIn::from(*v4)).map_err(|_| ())
        }
    }
}

#[test]
fn a_killed_daemon_leaves_nothing_cleanup_misses() {
    if let Ok(dir) = std::env::var("DBX_NET_CRASH_CHILD") {
        crash_child(PathBuf::from(dir));
        return;
    }
    let mut w = World::new();
    let state = w.state.path().to_path_buf();
    for delay_ms in [0u64, 7, 23] {
        let mut child = std::process::Command::new("nsenter")
            .arg(format!("--net={}", w.daemon.display()))
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_killed_daemon_leaves_nothing_cleanup_misses",
                "--nocapture",
            ])
            .env("DBX_NET_CRASH_CHILD", &state)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let read = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            assert!(
                read > 0,
                "the child ended before it was killed (see its error above)"
            );
            if line.starts_with("made 3") {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
    }
    let nets = w.networks();
    let n = nets.clone();
    let removed = w.daemon(move || n.cleanup(&[])).unwrap();
    assert!(removed.len() >= 4, "{removed:?}");
    assert_leftovers(&w, &state, 0);
}

fn crash_child(state: PathBuf) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let nets = devbox_net::Networks::new(devbox_net::NetConfig {
        subnet: "10.77.0.0/16".parse().unwrap(),
        upstream_dns: vec![std::net::SocketAddr::from((UPSTREAM, 53))],
        state_dir: state,
    })
    .unwrap();
    let pid = std::process::id();
    for i in 0.. {
        let mode = if i % 3 == 0 { Mode::None } else { Mode::Allow };
        let ports = if i % 3 == 0 {
            vec![PortMap {
                bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
                host_port: 30000 + (i % 1000) as u16,
                sandbox_port: 80,
            }]
        } else {
            vec![]
        };
        let p = Policy {
            mode,
            allow: vec![name("allowed.test")],
            deny: vec![],
        };
        nets.create(&format!("k{pid}x{i}"), &p, &ports).unwrap();
        println!("made {i}");
    }
}

/// Measurements for scripts/bench.sh (`--ignored bench_ --nocapture`, release build).
#[test]
#[ignore]
fn bench_network() {
    use std::time::{Duration, Instant};
    let mut w = World::new();
    let nets = w.networks();
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    // netns + veth + table + resolver, created and removed.
    let n = nets.clone();
    let (made, gone) = w.daemon(move || {
        let (mut made, mut gone) = (Vec::new(), Vec::new());
        for i in 0..50 {
            let id = format!("b{i}");
            let t = Instant::now();
            n.create(&id, &allow(vec![name("allowed.test")]), &[])
                .unwrap();
            made.push(t.elapsed());
            let t = Instant::now();
            n.remove(&id).unwrap();
            gone.push(t.elapsed());
        }
        (made, gone)
    });
    println!(
        "bench net create (allow: netns+veth+nft+resolver) median {:?}",
        median(made)
    );
    println!("bench net remove median {:?}", median(gone));
    let n = nets.clone();
    let made = w.daemon(move || {
        let mut made = Vec::new();
        for i in 0..50 {
            let id = format!("n{i}");
            let t = Instant::now();
            n.create(&id, &Policy::default(), &[]).unwrap();
            made.push(t.elapsed());
            n.remove(&id).unwrap();
        }
        made
    });
    println!(
        "bench net create (none: netns only) median {:?}",
        median(made)
    );

    let n = nets.clone();
    let policy = Policy {
        mode: Mode::Open,
        allow: vec![name("allowed.test")],
        deny: vec![],
    };
    let att = w.daemon(move || n.create("bench", &policy, &[])).unwrap();
    let (ns, gw) = (att.netns.clone(), att.dns.unwrap());
    // DNS: a cached allowed name, answered from the daemon's resolver (client round trip).
    resolve(&ns, gw, "allowed.test").unwrap();
    let times = in_ns(&ns, move || {
        let mut v = Vec::new();
        // Under the resolver's rate limit (500/s, bursts of 1,000).
        for _ in 0..800 {
            let t = Instant::now();
            resolve_here(gw, "allowed.test").unwrap();
            v.push(t.elapsed());
        }
        v
    });
    println!(
        "bench dns cached answer median {:?} (800 questions)",
        median(times)
    );

    // TCP throughput into the world: from the sandbox (veth, rules, NAT, veth) vs from the
    // daemon's namespace (veth).
    let sink = in_ns(&w.inet, || {
        std::net::TcpListener::bind((BARE, 5999)).unwrap()
    });
    std::thread::spawn(move || {
        for s in sink.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 1 << 16];
                while std::io::Read::read(&mut s, &mut buf)
                    .map(|n| n > 0)
                    .unwrap_or(false)
                {}
            });
        }
    });
    let send = || {
        let mut s = std::net::TcpStream::connect((BARE, 5999)).unwrap();
        let buf = vec![7u8; 1 << 16];
        let total: u64 = 2 << 30;
        let t = Instant::now();
        let mut sent = 0;
        while sent < total {
            std::io::Write::write_all(&mut s, &buf).unwrap();
            sent += buf.len() as u64;
        }
        sent as f64 / t.elapsed().as_secs_f64() / 1e9 * 8.0
    };
    let from_sandbox = in_ns(&ns, send);
    let from_host = in_ns(&w.daemon, send);
    println!(
        "bench tcp sandbox->world {from_sandbox:.1} Gbit/s, host->world {from_host:.1} Gbit/s, ratio {:.0}%",
        from_sandbox / from_host * 100.0
    );
}
