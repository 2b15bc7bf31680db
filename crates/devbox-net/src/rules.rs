//! The nftables table of one sandbox (`inet dbx_<tag>_<index>`): its text, the policy chain
//! rewritten live, the sets a resolver fills, and reading what was blocked.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};

use crate::{Mode, Policy, Target};

/// Addresses of one sandbox's link.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    /// Table name (family inet).
    pub table: String,
    /// Host-side veth.
    pub veth: String,
    /// The sandbox's address.
    pub address: Ipv4Addr,
    /// The host side's address (gateway and resolver).
    pub gateway: Ipv4Addr,
    /// The whole pool: sandboxes reach each other only by `Target::Sandbox` rules (the peer
    /// sets), and are not masqueraded to each other.
    pub pool: Ipv4Net,
}

/// Ranges nobody's sandbox reaches, in every mode: the metadata range, multicast, this host
/// (loopback and unspecified: the host's own addresses are refused in the input hook).
const ALWAYS_DENIED: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The table as created: sets, the fixed chains, and the policy chain for `policy`.
///
/// What enters the sandbox is filtered by a chain of a later priority than what leaves it,
/// so a packet from one sandbox to another meets the sender's egress rules first (refused,
/// counted and logged as the sender's blocked attempt) before the receiver's drop.
pub(crate) fn table(link: &Link, policy: &Policy) -> String {
    let Link {
        table,
        veth,
        address,
        gateway,
        pool,
    } = link;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"table inet {table} {{
  set dns4 {{ type ipv4_addr; flags timeout; }}
  set dnsport4 {{ type ipv4_addr . inet_service; flags timeout; }}
  set net4 {{ type ipv4_addr; flags interval; }}
  set netport4 {{ type ipv4_addr . inet_service; flags interval; }}
  set deny4 {{ type ipv4_addr; flags interval; }}
  set denyport4 {{ type ipv4_addr . inet_service; flags interval; }}
  set peer4 {{ type ipv4_addr; }}
  set peerport4 {{ type ipv4_addr . inet_service; }}
  set from4 {{ type ifname . ipv4_addr; }}
  set fromport4 {{ type ifname . ipv4_addr . inet_service; }}
  set blocked {{ type ipv4_addr . inet_proto . inet_service; size 4096; flags dynamic,timeout; timeout 1d; counter; }}
  counter blocked_total {{ }}
  counter bytes_out {{ }}
  counter bytes_in {{ }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname "{veth}" jump to_host
  }}
  chain to_host {{
    meta nfproto ipv6 drop
    ip saddr != {address} drop
    ct state established,related accept
    ip daddr {gateway} udp dport 53 accept
    ip daddr {gateway} tcp dport 53 accept
    goto refuse
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname "{veth}" counter name bytes_out jump egress
  }}
  chain forward_in {{
    type filter hook forward priority filter - 5; policy accept;
    oifname "{veth}" ct state established,related counter name bytes_in accept
    oifname "{veth}" iifname . ip saddr @from4 counter name bytes_in accept
    oifname "{veth}" meta l4proto {{ tcp, udp }} iifname . ip saddr . th dport @fromport4 counter name bytes_in accept
    oifname "{veth}" drop
  }}
  chain egress {{
    meta nfproto ipv6 drop
    ip saddr != {address} drop
    ct state established,related accept
    ip daddr @deny4 goto refuse
    meta l4proto {{ tcp, udp }} ip daddr . th dport @denyport4 goto refuse
    ip daddr @peer4 accept
    meta l4proto {{ tcp, udp }} ip daddr . th dport @peerport4 accept
    ip daddr {pool} goto refuse
    ip daddr {{ {denied} }} goto refuse
    jump allowed
    goto refuse
  }}
  chain allowed {{
  }}
  chain refuse {{
    meta l4proto {{ tcp, udp }} update @blocked {{ ip daddr . meta l4proto . th dport }}
    counter name blocked_total
    meta l4proto tcp reject with tcp reset
    reject with icmpx admin-prohibited
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {address} ip daddr != {pool} oifname != "{veth}" masquerade
  }}
}}
"#,
        denied = ALWAYS_DENIED.join(", "),
    );
    s.push_str(&policy_update(table, policy));
    s
}

/// [`table`], replacing a table of that name if one exists (in the same transaction: no
/// moment without rules, nothing of the old one kept).
pub(crate) fn fresh_table(link: &Link, policy: &Policy) -> String {
    let t = &link.table;
    format!(
        "add table inet {t}\ndelete table inet {t}\n{}",
        table(link, policy)
    )
}

/// Rewrites the policy chain and the CIDR sets (one transaction with the rest of a script).
pub(crate) fn policy_update(table: &str, policy: &Policy) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "flush chain inet {table} allowed");
    for set in ["net4", "netport4", "deny4", "denyport4"] {
        let _ = writeln!(s, "flush set inet {table} {set}");
    }
    match policy.mode {
        Mode::Open => {
            let _ = writeln!(s, "add rule inet {table} allowed accept");
        }
        Mode::Allow | Mode::None => {
            let _ = writeln!(s, "add rule inet {table} allowed ip daddr @dns4 accept");
            let _ = writeln!(
                s,
                "add rule inet {table} allowed meta l4proto {{ tcp, udp }} ip daddr . th dport @dnsport4 accept"
            );
            let _ = writeln!(s, "add rule inet {table} allowed ip daddr @net4 accept");
            let _ = writeln!(
                s,
                "add rule inet {table} allowed meta l4proto {{ tcp, udp }} ip daddr . th dport @netport4 accept"
            );
        }
    }
    if policy.mode == Mode::Allow {
        let (any, ported) = nets(&policy.allow);
        add_elements(&mut s, table, "net4", &any, &ported, "netport4");
    }
    let (any, ported) = nets(&policy.deny);
    add_elements(&mut s, table, "deny4", &any, &ported, "denyport4");
    s
}

fn add_elements(
    s: &mut String,
    table: &str,
    set: &str,
    any: &[Ipv4Net],
    ported: &BTreeMap<u16, Vec<Ipv4Net>>,
    port_set: &str,
) {
    if !any.is_empty() {
        let items: Vec<String> = any.iter().map(|n| n.to_string()).collect();
        let _ = writeln!(
            s,
            "add element inet {table} {set} {{ {} }}",
            items.join(", ")
        );
    }
    let mut items = Vec::new();
    for (port, nets) in ported {
        for n in nets {
            // Covered by an any-port entry: the interval would overlap nothing it adds.
            if any.iter().any(|a| a.contains(n)) {
                continue;
            }
            items.push(format!("{n} . {port}"));
        }
    }
    if !items.is_empty() {
        let _ = writeln!(
            s,
            "add element inet {table} {port_set} {{ {} }}",
            items.join(", ")
        );
    }
}

/// The IPv4 networks of `rules`: those for any port, and those per port, each aggregated so
/// no two intervals of a set overlap.
fn nets(rules: &[crate::Rule]) -> (Vec<Ipv4Net>, BTreeMap<u16, Vec<Ipv4Net>>) {
    let mut any = Vec::new();
    let mut ported: BTreeMap<u16, Vec<Ipv4Net>> = BTreeMap::new();
    for r in rules {
        if let Target::Net(IpNet::V4(n)) = &r.target {
            match r.port {
                None => any.push(n.trunc()),
                Some(p) => ported.entry(p).or_default().push(n.trunc()),
            }
        }
    }
    let any = Ipv4Net::aggregate(&any);
    for v in ported.values_mut() {
        *v = Ipv4Net::aggregate(v);
    }
    (any, ported)
}

/// What one table's peer sets hold ([`Target::Sandbox`] rules, resolved).
#[derive(Debug, Default)]
pub(crate) struct PeerSets {
    /// Sandboxes this one may reach: (address, port; none: every port).
    pub to: std::collections::BTreeSet<(Ipv4Addr, Option<u16>)>,
    /// Sandboxes that may reach this one: (their host-side veth, address, port here).
    pub from: std::collections::BTreeSet<(String, Ipv4Addr, Option<u16>)>,
}

/// Empties and refills the peer sets of `table` (one transaction with the rest of a script).
pub(crate) fn peer_update(table: &str, sets: &PeerSets) -> String {
    let mut s = String::new();
    // Made if missing (a table of a version before peer rules, re-attached after an
    // upgrade), then emptied.
    for (set, kind) in [
        ("peer4", "ipv4_addr"),
        ("peerport4", "ipv4_addr . inet_service"),
        ("from4", "ifname . ipv4_addr"),
        ("fromport4", "ifname . ipv4_addr . inet_service"),
    ] {
        let _ = writeln!(s, "add set inet {table} {set} {{ type {kind}; }}");
        let _ = writeln!(s, "flush set inet {table} {set}");
    }
    let mut add = |set: &str, items: Vec<String>| {
        if !items.is_empty() {
            let _ = writeln!(
                s,
                "add element inet {table} {set} {{ {} }}",
                items.join(", ")
            );
        }
    };
    add(
        "peer4",
        sets.to
            .iter()
            .filter(|(_, p)| p.is_none())
            .map(|(a, _)| a.to_string())
            .collect(),
    );
    add(
        "peerport4",
        sets.to
            .iter()
            .filter_map(|(a, p)| p.map(|p| format!("{a} . {p}")))
            .collect(),
    );
    add(
        "from4",
        sets.from
            .iter()
            .filter(|(_, _, p)| p.is_none())
            .map(|(v, a, _)| format!("\"{v}\" . {a}"))
            .collect(),
    );
    add(
        "fromport4",
        sets.from
            .iter()
            .filter_map(|(v, a, p)| p.map(|p| format!("\"{v}\" . {a} . {p}")))
            .collect(),
    );
    s
}

/// One blocked destination read from the table's `blocked` set: (address, protocol, port,
/// packets).
pub(crate) type BlockedEntry = (Ipv4Addr, String, u16, u64);

/// Parses `nft -j list set inet T blocked`.
pub(crate) fn parse_blocked(v: &serde_json::Value) -> Vec<BlockedEntry> {
    parse_blocked_by_table(v)
        .into_iter()
        .flat_map(|(_, entries)| entries)
        .collect()
}

/// Parses the `blocked` sets of `nft -j list sets inet` (or of one `list set`): table name →
/// its entries.
pub(crate) fn parse_blocked_by_table(v: &serde_json::Value) -> Vec<(String, Vec<BlockedEntry>)> {
    let mut out = Vec::new();
    let items = v.get("nftables").and_then(|x| x.as_array());
    for item in items.into_iter().flatten() {
        let Some(set) = item.get("set") else {
            continue;
        };
        if set.get("name").and_then(|n| n.as_str()) != Some("blocked") {
            continue;
        }
        let Some(table) = set.get("table").and_then(|t| t.as_str()) else {
            continue;
        };
        let elems = set.get("elem").and_then(|e| e.as_array());
        let mut entries = Vec::new();
        for e in elems.into_iter().flatten() {
            let e = e.get("elem").unwrap_or(e);
            let Some(parts) = e
                .get("val")
                .and_then(|v| v.get("concat"))
                .and_then(|c| c.as_array())
            else {
                continue;
            };
            let (Some(addr), Some(proto), Some(port)) = (
                parts
                    .first()
                    .and_then(|a| a.as_str())
                    .and_then(|a| a.parse().ok()),
                parts.get(1).and_then(|p| p.as_str()),
                parts
                    .get(2)
                    .and_then(|p| p.as_u64())
                    .and_then(|p| u16::try_from(p).ok()),
            ) else {
                continue;
            };
            let packets = e
                .get("counter")
                .and_then(|c| c.get("packets"))
                .and_then(|p| p.as_u64())
                .unwrap_or(0);
            entries.push((addr, proto.to_string(), port, packets));
        }
        out.push((table.to_string(), entries));
    }
    out
}

/// Reads a named counter's (packets, bytes) from `nft -j list counter`.
pub(crate) fn parse_counter(v: &serde_json::Value) -> (u64, u64) {
    let items = v.get("nftables").and_then(|x| x.as_array());
    for item in items.into_iter().flatten() {
        if let Some(c) = item.get("counter") {
            let get = |k: &str| c.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
            return (get("packets"), get("bytes"));
        }
    }
    (0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rule;

    #[test]
    fn blocked_sets_of_all_tables_in_one_listing() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"set": {"family": "inet", "name": "dns4", "table": "dbx_a_1", "elem": ["10.0.0.1"]}},
            {"set": {"family": "inet", "name": "blocked", "table": "dbx_a_1", "elem": [
              {"elem": {"val": {"concat": ["1.2.3.4", "tcp", 80]}, "counter": {"packets": 3, "bytes": 180}}}]}},
            {"set": {"family": "inet", "name": "blocked", "table": "dbx_a_2"}}]}"#,
        )
        .unwrap();
        let got = parse_blocked_by_table(&v);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "dbx_a_1");
        assert_eq!(
            got[0].1,
            vec![("1.2.3.4".parse().unwrap(), "tcp".to_string(), 80, 3)]
        );
        assert!(got[1].1.is_empty());
        assert_eq!(parse_blocked(&v).len(), 1);
    }

    #[test]
    fn overlapping_nets_are_merged() {
        let rules = vec![
            Rule {
                target: Target::Net("10.0.0.0/8".parse().unwrap()),
                port: None,
            },
            Rule {
                target: Target::Net("10.1.0.0/16".parse().unwrap()),
                port: None,
            },
            Rule {
                target: Target::Net("192.0.2.7/24".parse().unwrap()),
                port: Some(443),
            },
            Rule {
                target: Target::Net("2001:db8::/32".parse().unwrap()),
                port: None,
            },
        ];
        let (any, ported) = nets(&rules);
        assert_eq!(any, vec!["10.0.0.0/8".parse::<Ipv4Net>().unwrap()]);
        assert_eq!(
            ported.get(&443).unwrap(),
            &vec!["192.0.2.0/24".parse::<Ipv4Net>().unwrap()]
        );
    }
}
