//! Sandbox networks end to end, through the real daemon and CLI, and attacked as a hostile
//! sandbox would: open mode reaches the test's world but not the host (its own addresses,
//! 169.254.0.0/16) nor what is denied; two sandboxes cannot reach each other, also not
//! through a published port; an allowed name's address is reachable only while allowed;
//! hard-coded addresses are refused and logged; DNS answers pointing an allowed name at the
//! host, the gateway, another sandbox or the metadata address open nothing; a sandbox cannot
//! change its address or routes nor open raw or packet sockets; `/etc/resolv.conf` as a link
//! is replaced, never written through; a published port's connections are bounded however
//! long the sandbox holds them; blocked attempts cannot flood the audit log; live rules are
//! bounded; 200 networked sandboxes and a daemon SIGKILLed mid-way leave nothing behind.
//!
//! As in network_cli.rs, every daemon runs in a namespace of its own whose only route leads
//! into a world namespace of the test (devbox-net's test world), so no packet goes anywhere
//! but there and loopback.

mod common;
#[path = "../../devbox-net/tests/world/mod.rs"]
mod world;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::TestEnv;
use world::World;

/// A port the daemon namespace serves on every address: a service of "the host".
const HOST_SERVICE: u16 = 7070;

/// A dev-box whose daemon runs in `w`'s daemon namespace, resolving through its DNS server.
fn env_in(w: &World) -> TestEnv {
    w.check_routes();
    TestEnv::in_netns(
        &w.daemon,
        &format!("{}:53", world::UPSTREAM),
        "10.77.0.0/16",
        &[],
    )
}

/// Serves a greeting on `0.0.0.0:port` of the namespace `ns` (bound before this returns).
fn serve_in(ns: &Path, port: u16) {
    let l = world::in_ns(ns, move || TcpListener::bind(("0.0.0.0", port)).unwrap());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.write_all(b"hello from the host\n");
        }
    });
}

fn net(env: &TestEnv, name: &str) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["network", name, "--format", "json"])).expect("json")
}

fn address(env: &TestEnv, name: &str) -> Ipv4Addr {
    net(env, name)["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{name} has no address"))
}

/// The host side of a sandbox's /30.
fn gateway(addr: Ipv4Addr) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(addr) - 1)
}

/// Connects from inside the sandbox to `host:port` and returns what the server said.
fn reach(env: &TestEnv, name: &str, host: &str, port: u16) -> Result<String, String> {
    let (code, out, err) = env.sh(
        name,
        &format!("timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/{port}; head -n1 <&3'"),
    );
    if code == 0 {
        Ok(out)
    } else {
        Err(format!("exit {code}: {err}"))
    }
}

/// Whether a TCP connection from inside the sandbox to `host:port` is made (whatever the
/// server says, or does not say, then).
fn connects(env: &TestEnv, name: &str, host: &str, port: u16) -> bool {
    env.sh(
        name,
        &format!("timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/{port}'"),
    )
    .0 == 0
}

fn resolves(env: &TestEnv, name: &str, host: &str) -> bool {
    env.sh(name, &format!("getent hosts {host}")).0 == 0
}

fn audit(env: &TestEnv, sandbox: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&env.ok(&[
        "audit",
        "--sandbox",
        sandbox,
        "--limit",
        "100000",
        "--format",
        "json",
    ]))
    .expect("audit json");
    v.as_array().cloned().unwrap_or_default()
}

/// Waits until `network log` of `name` holds a target for which `want` is true.
fn wait_logged(env: &TestEnv, name: &str, want: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log: serde_json::Value =
            serde_json::from_str(&env.ok(&["network", "log", name, "--format", "json"])).unwrap();
        let targets: Vec<String> = log
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["target"].as_str().unwrap_or_default().to_string())
            .collect();
        if targets.iter().any(|t| want(t)) {
            return;
        }
        assert!(Instant::now() < deadline, "not logged: {targets:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `args` in the daemon's network namespace; returns stdout.
fn in_daemon_ns(w: &World, args: &[&str]) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", w.daemon.display()))
        .arg("--")
        .args(args)
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What dev-box's networks hold now: host-side links, nft tables, namespace files and
/// mounts, allocation records.
#[derive(Debug, PartialEq, Eq)]
struct Plumbing {
    links: Vec<String>,
    tables: Vec<String>,
    netns: Vec<String>,
    mounts: Vec<String>,
    records: Vec<String>,
}

fn plumbing(env: &TestEnv, w: &World) -> Plumbing {
    let links = in_daemon_ns(w, &["ip", "-o", "link"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("dbx"))
        .collect();
    let tables = in_daemon_ns(w, &["nft", "list", "tables"])
        .lines()
        .filter(|l| l.contains("dbx_"))
        .map(str::to_string)
        .collect();
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let net_dir = env.state.join("net");
    let under = net_dir.to_string_lossy().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&under))
        .map(str::to_string)
        .collect();
    Plumbing {
        links,
        tables,
        netns: names(&net_dir.join("netns")),
        mounts,
        records: names(&net_dir.join("records")),
    }
}

fn assert_no_networks(env: &TestEnv, w: &World) {
    let p = plumbing(env, w);
    assert_eq!(
        p,
        Plumbing {
            links: vec![],
            tables: vec![],
            netns: vec![],
            mounts: vec![],
            records: vec![],
        },
        "network plumbing left behind\n{}",
        env.daemon_log()
    );
}

/// Open descriptors of the daemon.
fn daemon_fds(env: &TestEnv) -> usize {
    let pid = env.daemon_pid().expect("daemon");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn open_mode_reaches_the_world_but_not_the_host_and_cannot_be_reconfigured() {
    require_root!();
    let w = World::new();
    let env = env_in(&w);
    serve_in(&w.daemon, HOST_SERVICE);
    env.ok(&[
        "create",
        "o",
        "--network",
        "open",
        "--deny",
        "other.test",
        "--deny",
        "198.18.1.3:5001",
    ]);
    let me = address(&env, "o");
    let gw = gateway(me);

    // The world: by name and by hard-coded address, any port but the denied one.
    let hello = reach(&env, "o", "allowed.test", 80).expect("allowed.test in open mode");
    assert!(hello.contains("198.18.1.1:80"), "{hello}");
    assert!(reach(&env, "o", "198.18.1.3", 80).is_ok());
    assert!(reach(&env, "o", "198.18.1.3", 443).is_ok());
    // The deny list: the name does not resolve, the address:port is refused.
    assert!(!resolves(&env, "o", "other.test"));
    assert!(!connects(&env, "o", "198.18.1.3", 5001));
    // The host's own addresses (its service listens on all of them) and the metadata range.
    for host in [gw, world::DAEMON] {
        assert!(
            !connects(&env, "o", &host.to_string(), HOST_SERVICE),
            "{host}:{HOST_SERVICE} of the host reached"
        );
    }
    assert!(!connects(&env, "o", "169.254.169.254", 80));
    // ... and the host's service is really there (reached from the daemon's side).
    assert!(world::fetch(&w.daemon, world::DAEMON, HOST_SERVICE).is_ok());
    for t in [
        format!("{gw}:{HOST_SERVICE}/tcp"),
        format!("{}:{HOST_SERVICE}/tcp", world::DAEMON),
        "169.254.169.254:80/tcp".to_string(),
        "198.18.1.3:5001/tcp".to_string(),
    ] {
        wait_logged(&env, "o", |x| x == t);
    }

    // A sandbox cannot change its address, routes or link (no CAP_NET_ADMIN over a
    // namespace of the host's user namespace), nor open raw or packet sockets.
    for cmd in [
        "ip addr add 10.77.200.2/30 dev eth0",
        "ip addr del {me}/30 dev eth0",
        "ip route replace default via 10.77.0.1 dev eth0",
        "ip route add 198.18.0.0/15 dev eth0",
        "ip link set eth0 down",
        "ip link set eth0 address 02:00:00:00:00:01",
        "ip link add x0 type dummy",
        "sysctl -w net.ipv4.ip_forward=0",
        "echo 0 > /proc/sys/net/ipv4/conf/eth0/rp_filter",
    ] {
        let cmd = cmd.replace("{me}", &me.to_string());
        let (code, out, err) = env.sh("o", &cmd);
        assert_ne!(code, 0, "{cmd} worked: {out} {err}");
    }
    let (_, addrs, _) = env.sh("o", "ip -4 -o addr show dev eth0; ip route");
    assert!(
        addrs.contains(&format!("{me}/30")) && addrs.contains(&format!("default via {gw}")),
        "{addrs}"
    );
    let sockets = r#"
import socket, sys
bad = []
for fam, kind, proto in [(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
                         (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                         (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP),
                         (socket.AF_PACKET, socket.SOCK_RAW, 0x0300),
                         (socket.AF_PACKET, socket.SOCK_DGRAM, 0x0300)]:
    try:
        socket.socket(fam, kind, proto)
        bad.append((fam, kind, proto))
    except OSError:
        pass
print(bad)
sys.exit(1 if bad else 0)
"#;
    let (code, out, err) = env.sh("o", &format!("python3 -c '{sockets}'"));
    assert_eq!(code, 0, "raw or packet sockets opened: {out} {err}");
    // Still working as before.
    assert!(reach(&env, "o", "198.18.1.1", 443).is_ok());
    env.ok(&["destroy", "o"]);
    assert_no_networks(&env, &w);
}

#[test]
fn sandboxes_cannot_reach_each_other_nor_their_published_ports() {
    require_root!();
    let w = World::new();
    let env = env_in(&w);
    // A serves on every address inside and publishes it on every address of the host.
    env.ok(&[
        "create",
        "a",
        "--network",
        "open",
        "-p",
        "18081:7000",
        "--main",
        "cd /tmp && echo page-of-a > index.html && exec python3 -m http.server 7000 --bind 0.0.0.0",
    ]);
    let a = address(&env, "a");
    env.ok(&["create", "b", "--network", "open"]);
    let b = address(&env, "b");
    // C names A's address in an allow rule: the pool is refused before any rule.
    env.ok(&[
        "create",
        "c",
        "--network",
        "allow",
        "--allow",
        &format!("{a}:7000"),
    ]);
    let c = address(&env, "c");
    // The host reaches A's published port (it is A's service).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match world::fetch_http(&w.daemon, world::DAEMON, 18081) {
            Ok(p) if p.contains("page-of-a") => break,
            other => {
                assert!(Instant::now() < deadline, "published port: {other:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    assert!(connects(&env, "a", "127.0.0.1", 7000));
    for (from, gw) in [("b", gateway(b)), ("c", gateway(c))] {
        let targets = [
            (a.to_string(), 7000),
            (gateway(a).to_string(), 18081),
            (gw.to_string(), 18081),
            (world::DAEMON.to_string(), 18081),
            ("127.0.0.1".to_string(), 18081),
        ];
        for (host, port) in targets {
            assert!(
                !connects(&env, from, &host, port),
                "{from} reached {host}:{port}"
            );
        }
    }
    // Nor does A reach B (nothing listens there, but the rules refuse before that).
    assert!(!connects(&env, "a", &b.to_string(), 7000));
    wait_logged(&env, "a", |t| t == format!("{b}:7000/tcp"));
    wait_logged(&env, "c", |t| t == format!("{a}:7000/tcp"));
    env.ok(&["destroy", "a", "b", "c"]);
    assert_no_networks(&env, &w);
}

#[test]
fn a_sandbox_rule_lets_one_sandbox_reach_another_by_name() {
    require_root!();
    let w = World::new();
    let env = env_in(&w);
    let serve =
        "cd /tmp && echo page > index.html && exec python3 -m http.server 7000 --bind 0.0.0.0";
    env.ok(&["create", "srv", "--network", "allow", "--main", serve]);
    let srv = address(&env, "srv");
    env.ok(&[
        "create",
        "cli",
        "--network",
        "allow",
        "--allow",
        "sandbox:srv:7000",
    ]);
    let cli = address(&env, "cli");
    // Open mode takes sandbox rules too (everything else it allows already).
    env.ok(&["create", "other", "--network", "open"]);
    let wait_serving = |from: &str, srv: Ipv4Addr| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !connects(&env, from, &srv.to_string(), 7000) {
            assert!(Instant::now() < deadline, "{from} never reached {srv}:7000");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_serving("cli", srv);
    assert!(
        !connects(&env, "cli", &srv.to_string(), 7001),
        "another port"
    );
    assert!(
        !connects(&env, "srv", &cli.to_string(), 7000),
        "one way only"
    );
    assert!(!connects(&env, "other", &srv.to_string(), 7000), "no rule");
    assert!(
        net(&env, "cli")["allow"]
            .to_string()
            .contains("sandbox:srv:7000")
    );
    // Live, audited; an open-mode sandbox takes it too.
    env.ok(&["network", "allow", "other", "sandbox:srv"]);
    wait_serving("other", srv);
    assert!(
        audit(&env, "other")
            .iter()
            .any(|r| r["action"] == "network.allow")
    );
    // Denying a sandbox means nothing (they are apart unless allowed): refused, nothing changes.
    let err = env.fails(&["network", "deny", "cli", "sandbox:srv"]);
    assert!(err.contains("never reach each other"), "{err}");
    assert!(connects(&env, "cli", &srv.to_string(), 7000));
    let err = env.fails(&[
        "create",
        "bad",
        "--network",
        "allow",
        "--allow",
        "sandbox:Not_A_Name",
    ]);
    assert!(err.contains("sandbox:NAME"), "{err}");
    // The rule names the sandbox: a new srv (another address maybe) is reached, and its old
    // address is not remembered.
    env.ok(&["destroy", "srv"]);
    env.ok(&["create", "srv", "--network", "allow", "--main", serve]);
    let srv2 = address(&env, "srv");
    wait_serving("cli", srv2);
    env.ok(&["network", "reset", "other"]);
    assert!(
        !connects(&env, "other", &srv2.to_string(), 7000),
        "reset withdraws it"
    );
    env.ok(&["destroy", "srv", "cli", "other"]);
    assert_no_networks(&env, &w);
}

#[test]
fn hostile_dns_answers_live_changes_and_bounded_rules() {
    require_root!();
    let w = World::new();
    let env = env_in(&w);
    serve_in(&w.daemon, HOST_SERVICE);
    env.ok(&[
        "create",
        "peer",
        "--network",
        "open",
        "--main",
        "cd /tmp && echo peer > index.html && exec python3 -m http.server 7000 --bind 0.0.0.0",
    ]);
    let peer = address(&env, "peer");
    env.ok(&[
        "create",
        "s",
        "--network",
        "allow",
        "--allow",
        "allowed.test",
        "--allow",
        "evil.test",
        "--allow",
        "*.evil.test",
    ]);
    let me = address(&env, "s");
    // The allowed names' own server answers with the host's addresses, loopback, the
    // sandbox's gateway, another sandbox's address and gateway, the metadata address (and
    // one address of the world, which then is reachable: that is what an allowlist of names
    // means).
    let hostile = [
        Ipv4Addr::LOCALHOST,
        Ipv4Addr::new(169, 254, 169, 254),
        world::DAEMON,
        gateway(me),
        peer,
        gateway(peer),
        Ipv4Addr::new(10, 77, 255, 254),
    ];
    let mut answer = hostile.to_vec();
    answer.push(world::BARE);
    w.set_name("evil.test", &answer);
    for (i, a) in hostile.iter().enumerate() {
        w.set_name(&format!("h{i}.evil.test"), &[*a]);
    }
    let (code, out, err) = env.sh(
        "s",
        "python3 -c 'import socket; print(sorted(socket.gethostbyname_ex(\"evil.test\")[2]))'",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("198.18.1.3"), "{out}");
    for (i, a) in hostile.iter().enumerate() {
        let name = format!("h{i}.evil.test");
        for port in [HOST_SERVICE, 7000, 80, 53] {
            // The resolver's own port 53 on the gateway is the one thing the sandbox may
            // reach on the host: it is where names come from.
            if *a == gateway(me) && port == 53 {
                continue;
            }
            assert!(
                !connects(&env, "s", &name, port),
                "{name} ({a}) port {port} reached"
            );
            assert!(
                !connects(&env, "s", &a.to_string(), port),
                "{a}:{port} reached"
            );
        }
    }
    assert!(reach(&env, "s", "198.18.1.3", 80).is_ok());
    wait_logged(&env, "s", |t| t == format!("{peer}:7000/tcp"));
    wait_logged(&env, "s", |t| t == "169.254.169.254:80/tcp");

    // An allowed name's address is reachable only while the name is allowed.
    assert!(reach(&env, "s", "allowed.test", 80).is_ok());
    assert!(reach(&env, "s", "198.18.1.1", 443).is_ok());
    env.ok(&["network", "deny", "s", "allowed.test"]);
    assert!(!connects(&env, "s", "198.18.1.1", 443));
    assert!(!resolves(&env, "s", "allowed.test"));
    env.ok(&["network", "allow", "s", "allowed.test"]);
    assert!(
        !connects(&env, "s", "198.18.1.1", 443),
        "reachable again before the name was resolved again"
    );
    assert!(reach(&env, "s", "allowed.test", 443).is_ok());
    // A hard-coded address of nothing allowed: refused, in the log and the audit log.
    assert!(!connects(&env, "s", "198.18.1.2", 5001));
    wait_logged(&env, "s", |t| t == "198.18.1.2:5001/tcp");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !audit(&env, "s").iter().any(|r| {
        r["action"] == "network.blocked"
            && r["actor"] == "network"
            && r["detail"]["target"] == "198.18.1.2:5001/tcp"
    }) {
        assert!(Instant::now() < deadline, "not in the audit log");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Live rules are bounded: 1024 in all, names of at most 253 characters. Refused changes
    // change nothing, and their audit records stay small.
    let before = net(&env, "s");
    let many: Vec<String> = (0..1030).map(|i| format!("n{i}.test")).collect();
    let mut args = vec!["network", "allow", "s"];
    args.extend(many.iter().map(String::as_str));
    let err = env.fails(&args);
    assert!(err.contains("1024"), "{err}");
    let long_label = format!("{}.test", "a".repeat(64));
    let long_name = format!("{}test", "abcdefghi.".repeat(26));
    let huge = "x".repeat(100_000);
    for rule in [long_label.as_str(), long_name.as_str(), huge.as_str()] {
        env.fails(&["network", "allow", "s", rule]);
    }
    let after = net(&env, "s");
    assert_eq!(
        (&after["allow"], &after["deny"]),
        (&before["allow"], &before["deny"])
    );
    let largest = audit(&env, "s")
        .iter()
        .map(|r| r.to_string().len())
        .max()
        .unwrap_or(0);
    assert!(largest < 64 * 1024, "an audit record of {largest} bytes");
    // Up to the limit works, and the sandbox still resolves and connects.
    let fill: Vec<String> = (0..1000)
        .map(|i| format!("10.{}.{}.0/24", 100 + i / 250, i % 250))
        .collect();
    let mut args = vec!["network", "allow", "s"];
    args.extend(fill.iter().map(String::as_str));
    env.ok(&args);
    assert!(reach(&env, "s", "allowed.test", 80).is_ok());
    env.ok(&["network", "reset", "s"]);
    env.ok(&["destroy", "s", "peer"]);
    assert_no_networks(&env, &w);
}

#[test]
fn resolv_conf_as_a_link_is_replaced_not_followed() {
    require_root!();
    let w = World::new();
    let env = env_in(&w);
    env.ok(&[
        "create",
        "r",
        "--network",
        "allow",
        "--allow",
        "allowed.test",
    ]);
    let gw = gateway(address(&env, "r"));
    let (code, _, err) = env.sh(
        "r",
        "echo original > /tmp/victim && rm -f /etc/resolv.conf && ln -s /tmp/victim /etc/resolv.conf",
    );
    assert_eq!(code, 0, "{err}");
    env.ok(&["stop", "r"]);
    env.ok(&["start", "r"]);
    let (_, out, _) = env.sh(
        "r",
        "cat /tmp/victim; test -L /etc/resolv.conf && echo LINK; cat /etc/resolv.conf",
    );
    assert!(out.starts_with("original\n"), "{out}");
    assert!(!out.contains("LINK"), "{out}");
    assert!(out.contains(&format!("nameserver {gw}")), "{out}");
    assert!(resolves(&env, "r", "allowed.test"));
    // A directory in its place does not keep the sandbox from starting.
    let (code, _, err) = env.sh("r", "rm -f /etc/resolv.conf && mkdir -p /etc/resolv.conf/x");
    assert_eq!(code, 0, "{err}");
    env.ok(&["stop", "r"]);
    env.ok(&["start", "r"]);
    assert!(resolves(&env, "r", "allowed.test"));
    let (code, out, _) = env.sh("r", "ls -d /etc/resolv.conf.moved-by-dev-box-*/x");
    assert_eq!(code, 0, "the directory was not kept aside: {out}");
    env.ok(&["destroy", "r"]);
    assert_no_networks(&env, &w);
}

#[test]
fn published_port_connections_are_bounded_however_long_the_sandbox_holds_them() {
    require_root!();
    let w = World::new();
    let env = env_in(&w);
    // A service that accepts every connection and never answers or closes one.
    let holder = "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind((\"127.0.0.1\", 7000))\ns.listen(4096)\nkeep = []\nwhile True:\n    keep.append(s.accept()[0])\n";
    let main = format!("exec python3 -c '{holder}'");
    env.ok(&[
        "create",
        "h",
        "-p",
        "127.0.0.1:18100:7000",
        "-p",
        "127.0.0.1:18101:7000",
        "--main",
        &main,
    ]);
    // Raise this process's own limit of open files for the clients.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    // Wait for the service.
    let deadline = Instant::now() + Duration::from_secs(20);
    while env
        .sh("h", "timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/7000'")
        .0
        != 0
    {
        assert!(Instant::now() < deadline, "service did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    let base = daemon_fds(&env);
    // 1,400 clients over the two ports, each held open by the sandbox.
    let clients: Vec<TcpStream> = world::in_ns(&w.daemon, || {
        let mut v = Vec::new();
        for i in 0..1400u32 {
            let port = 18100 + (i % 2) as u16;
            if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                v.push(s);
            }
        }
        v
    });
    assert!(clients.len() >= 1300, "{} clients connected", clients.len());
    // Let the proxy settle: its descriptor count stops rising.
    let mut last = 0;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = daemon_fds(&env);
        if now == last {
            break;
        }
        last = now;
    }
    let held = daemon_fds(&env) - base.min(daemon_fds(&env));
    assert!(
        held <= 2 * 1024 + 64,
        "the daemon holds {held} more descriptors for one sandbox's published ports"
    );
    // The daemon goes on serving, and the clients beyond the bound were closed, not kept.
    env.ok(&["ls"]);
    let mut closed = 0;
    for mut c in clients {
        c.set_nonblocking(true).ok();
        let mut b = [0u8; 1];
        if matches!(c.read(&mut b), Ok(0)) {
            closed += 1;
        }
    }
    assert!(closed >= 1300 - 1024, "{closed} clients closed");
    // The clients are gone (closed by this loop): the descriptors are given back once the
    // sandbox has been silent for 10 s after that, although it still holds its ends.
    let deadline = Instant::now() + Duration::from_secs(40);
    while daemon_fds(&env) > base + 16 {
        assert!(
            Instant::now() < deadline,
            "descriptors kept for clients that left: {} (base {base})",
            daemon_fds(&env)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A service that never accepts (its queue full): clients wait on the proxy's connect
    // into the sandbox, which holds no thread of the daemon meanwhile.
    let stuck = "import socket, time\ns = socket.socket()\ns.bind((\"127.0.0.1\", 7001))\ns.listen(0)\ntime.sleep(1e6)\n";
    env.ok(&[
        "create",
        "stuck",
        "-p",
        "127.0.0.1:18102:7001",
        "--main",
        &format!("exec python3 -c '{stuck}'"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while env
        .sh(
            "stuck",
            "timeout 1 bash -c 'exec 3<>/dev/tcp/127.0.0.1/7001'",
        )
        .0
        != 0
    {
        assert!(Instant::now() < deadline, "service did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    let threads = || {
        let pid = env.daemon_pid().expect("daemon");
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or(0)
    };
    let base_threads = threads();
    let waiting: Vec<TcpStream> = world::in_ns(&w.daemon, || {
        (0..300)
            .filter_map(|_| TcpStream::connect(("127.0.0.1", 18102)).ok())
            .collect()
    });
    assert!(waiting.len() >= 290, "{} clients", waiting.len());
    let mut most = 0;
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        most = most.max(threads());
    }
    assert!(
        most <= base_threads + 64,
        "{most} daemon threads with 300 clients waiting ({base_threads} before)"
    );
    env.ok(&["ls"]);
    drop(waiting);
    env.ok(&["destroy", "stuck"]);
    // Destroyed, the sandbox gives every descriptor back.
    env.ok(&["destroy", "h"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon_fds(&env) > base + 16 {
        assert!(
            Instant::now() < deadline,
            "descriptors not given back: {} (base {base})",
            daemon_fds(&env)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_no_networks(&env, &w);
}

#[test]
fn blocked_attempts_cannot_flood_the_audit_log() {
    require_root!();
    let w = World::new();
    let env = env_in(&w);
    env.ok(&[
        "create",
        "f",
        "--network",
        "allow",
        "--allow",
        "allowed.test",
    ]);
    let gw = gateway(address(&env, "f"));
    // Thousands of distinct refused names and hundreds of distinct refused destinations.
    let flood = format!(
        r#"
import socket, struct, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setblocking(False)
def q(i, name):
    hdr = struct.pack(">HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 0)
    body = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return hdr + body + struct.pack(">HH", 1, 1)
end = time.time() + 3
i = 0
while time.time() < end:
    for _ in range(50):
        try: u.sendto(q(i, "n%d.flood.test" % i), ("{gw}", 53))
        except OSError: pass
        i += 1
    if i % 500 == 0:
        for p in range(1000 + i // 50, 1010 + i // 50):
            c = socket.socket(); c.settimeout(0.05)
            try: c.connect(("198.18.1.3", p))
            except OSError: pass
            c.close()
    time.sleep(0.01)
print(i)
"#
    );
    let start = Instant::now();
    let (code, out, err) = env.sh("f", &format!("python3 -c '{flood}'"));
    assert_eq!(code, 0, "{err}");
    let sent: u64 = out.trim().parse().unwrap_or(0);
    assert!(sent > 2000, "{out}");
    // Every round of bookkeeping (one a second) has had its turn.
    std::thread::sleep(Duration::from_secs(3));
    let rounds = start.elapsed().as_secs() + 2;
    let records: Vec<serde_json::Value> = audit(&env, "f")
        .into_iter()
        .filter(|r| r["action"] == "network.blocked")
        .collect();
    assert!(
        records.len() as u64 <= 21 * rounds,
        "{} network.blocked records in {rounds} rounds",
        records.len()
    );
    // What was summed up is said: "N more targets".
    assert!(
        records.iter().any(|r| r["detail"]["kind"] == "more"),
        "{records:?}"
    );
    // The sandbox and the log still work.
    assert!(reach(&env, "f", "allowed.test", 80).is_ok());
    env.ok(&["network", "log", "f"]);
    env.ok(&["destroy", "f"]);
    assert_no_networks(&env, &w);
}

#[test]
fn two_hundred_networked_sandboxes_leave_nothing() {
    require_root!();
    let w = World::new();
    let env = std::sync::Arc::new(env_in(&w));
    let base_fds = daemon_fds(&env);
    let workers: Vec<_> = (0..2)
        .map(|t| {
            let env = env.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    let name = format!("n{t}-{i}");
                    let port = format!("127.0.0.1:{}:80", 19000 + t * 100 + i);
                    let mut args = vec![
                        "create",
                        name.as_str(),
                        "--network",
                        "allow",
                        "--allow",
                        "allowed.test",
                    ];
                    if i % 20 == 0 {
                        args.extend(["-p", port.as_str()]);
                    }
                    env.ok(&args);
                    env.ok(&["destroy", &name]);
                }
            })
        })
        .collect();
    for t in workers {
        t.join().expect("worker");
    }
    assert_eq!(env.ok(&["ls", "-q"]).trim(), "");
    assert_no_networks(&env, &w);
    assert!(env.cgroup_dirs().is_empty(), "{:?}", env.cgroup_dirs());
    let fds = daemon_fds(&env);
    assert!(
        fds <= base_fds + 8,
        "the daemon holds {fds} descriptors, {base_fds} before"
    );
}

#[test]
fn a_daemon_killed_mid_way_leaves_nothing_reconcile_does_not_remove() {
    require_root!();
    let w = World::new();
    let mut env = env_in(&w);
    env.ok(&[
        "create",
        "keep",
        "--network",
        "allow",
        "--allow",
        "allowed.test",
        "-p",
        "127.0.0.1:18200:8000",
        "--main",
        "cd /tmp && echo kept > index.html && exec python3 -m http.server 8000 --bind 127.0.0.1",
    ]);
    let keep_addr = address(&env, "keep");
    let mut rnd = common::rng();
    for round in 0..3 {
        // Networked sandboxes created and destroyed while the daemon is killed.
        let envs: Vec<(String, String)> = vec![
            ("DEVBOX_STATE_DIR".into(), env.state.display().to_string()),
            (
                "DEVBOX_RUNTIME_DIR".into(),
                env.runtime.display().to_string(),
            ),
            ("DEVBOX_SOCKET".into(), env.socket.display().to_string()),
            ("DEVBOX_CGROUP_PARENT".into(), env.cgroup_parent.clone()),
            ("DEVBOX_NO_AUTOSTART".into(), "1".into()),
        ];
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let churn = std::thread::spawn(move || {
            let run = |args: &[&str]| {
                std::process::Command::new(common::sandbox_bin())
                    .envs(envs.iter().map(|(k, v)| (k, v)))
                    .stdin(std::process::Stdio::null())
                    .args(args)
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            };
            let mut i = 0;
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                let name = format!("c{round}-{i}");
                let port = format!("127.0.0.1:{}:80", 18300 + i);
                if !run(&[
                    "create",
                    &name,
                    "--network",
                    "allow",
                    "--allow",
                    "other.test",
                    "-p",
                    &port,
                ]) {
                    break;
                }
                if i % 3 != 0 && !run(&["destroy", &name]) {
                    break;
                }
                i += 1;
            }
        });
        std::thread::sleep(Duration::from_millis(300 + rnd(2500)));
        env.kill_daemon();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        churn.join().unwrap();
        env.start_daemon();

        // Every network left belongs to a running sandbox, and those keep working.
        let running: Vec<String> = env.ok(&["ls", "-q"]).lines().map(str::to_string).collect();
        let p = plumbing(&env, &w);
        let mut with_net = 0;
        for name in &running {
            let n = net(&env, name);
            if n["attached"] == true {
                with_net += 1;
            }
        }
        assert_eq!(
            (
                p.links.len(),
                p.tables.len(),
                p.netns.len(),
                p.records.len()
            ),
            (with_net, with_net, with_net, with_net),
            "{p:?} for {running:?}\n{}",
            env.daemon_log()
        );
        assert_eq!(address(&env, "keep"), keep_addr);
        assert!(reach(&env, "keep", "allowed.test", 80).is_ok());
        assert!(!resolves(&env, "keep", "other.test"));
        let page = world::fetch_http(&w.daemon, Ipv4Addr::LOCALHOST, 18200);
        assert!(
            page.as_ref().is_ok_and(|p| p.contains("kept")),
            "published port after the restart: {page:?}"
        );
        for name in running.iter().filter(|n| *n != "keep") {
            if env.sb(&["exec", name, "true"]).status.success() {
                assert!(
                    reach(&env, name, "other.test", 80).is_ok(),
                    "{name} after the restart"
                );
            }
            env.ok(&["destroy", "--force", name]);
        }
    }
    env.ok(&["destroy", "keep"]);
    assert_no_networks(&env, &w);
    assert!(env.cgroup_dirs().is_empty(), "{:?}", env.cgroup_dirs());
}
