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
