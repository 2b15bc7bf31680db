//! `spec.network`: the mode, egress rules and published ports of a sandbox.
//!
//! ```yaml
//! network:
//!   mode: allow                    # none (default) | allow | open
//!   allow: [pypi.org, "*.npmjs.org", 10.1.2.0/24:443]
//!   deny: [evil.npmjs.org]
//!   ports: ["8080:3000", "127.0.0.1:9000:9000"]
//! ```
//!
//! The older form, a bare mode (`network: none`), still parses, and a network without rules
//! or ports is written that way. Rules and ports are typed values ([`NetRule`], [`PortMap`])
//! that read and write as the text above; [`NetRule::parse`] and [`PortMap::parse`] say what
//! is wrong with a bad one and what to write instead.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Name, SpecError};

/// How a rule names another sandbox: `sandbox:NAME[:PORT]`.
pub const SANDBOX_PREFIX: &str = "sandbox:";

/// Network access of a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Loopback only: the network is closed (published ports still reach it).
    #[default]
    None,
    /// Egress only to the allowed names, networks and ports.
    Allow,
    /// Egress anywhere but the denied names and networks.
    Open,
}

impl NetworkMode {
    /// The mode as written: `none`, `allow` or `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Allow => "allow",
            Self::Open => "open",
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NetworkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "allow" => Ok(Self::Allow),
            "open" => Ok(Self::Open),
            other => Err(format!(
                "{other:?} is not a network mode: use none, allow or open"
            )),
        }
    }
}

/// A network prefix: an address and how many leading bits of it count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network's first address (no host bits set).
    pub addr: IpAddr,
    /// Prefix length: 0 to 32 (IPv4) or 0 to 128 (IPv6).
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => mask_v4(u32::from(a), self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => mask_v6(u128::from(a), self.prefix) == u128::from(n),
            _ => false,
        }
    }

    fn parse(text: &str, whole: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{whole:?}: {addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(format!(
                        "{whole:?}: the prefix length must be 0 to {max}, such as /24"
                    ));
                }
            },
        };
        let masked = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(mask_v4(u32::from(a), prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(mask_v6(u128::from(a), prefix))),
        };
        if masked != addr {
            let fixed = Cidr {
                addr: masked,
                prefix,
            };
            return Err(format!(
                "{whole:?}: {addr} has bits set beyond the /{prefix} prefix; write {}",
                fixed.bracketed()
            ));
        }
        Ok(Self { addr, prefix })
    }

    /// The text form with IPv6 in brackets (`10.0.0.0/8`, `[2001:db8::/32]`).
    fn bracketed(&self) -> String {
        match self.addr {
            IpAddr::V4(_) => self.to_string(),
            IpAddr::V6(_) => format!("[{self}]"),
        }
    }
}

fn mask_v4(a: u32, prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(prefix)))
    }
}

fn mask_v6(a: u128, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(prefix)))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == max {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

/// What an egress rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NetTarget {
    /// Exactly this DNS name (lowercase, without a trailing dot).
    Name(String),
    /// Every name below this suffix (`*.npmjs.org` holds `npmjs.org`), not the suffix itself.
    Suffix(String),
    /// Addresses in a network (a single address is a /32 or /128).
    Net(Cidr),
    /// Another sandbox, by name (`sandbox:web`): its address while it has a link; sandboxes
    /// reach each other only through such a rule.
    Sandbox(Name),
}

/// One egress rule: a name, a `*.suffix` or a network, and optionally one TCP/UDP port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetRule {
    /// What it matches.
    pub target: NetTarget,
    /// Only this destination port (every port when left out).
    pub port: Option<u16>,
}

const RULE_FORMS: &str = "write a name (pypi.org), a wildcard (*.npmjs.org), an address or \
network (10.1.2.0/24, [2001:db8::/32]) or another sandbox (sandbox:web), optionally with a port \
(example.com:443, 10.1.2.0/24:443, sandbox:web:8000)";

fn parse_port(text: &str, whole: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!(
            "{whole:?}: {text:?} is not a port: use a number from 1 to 65535"
        )),
    }
}

fn check_name(name: &str, whole: &str) -> Result<String, String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let bad = |why: &str| format!("{whole:?} is not a valid rule: {why}; {RULE_FORMS}");
    if name.is_empty() {
        return Err(bad("the name is empty"));
    }
    if name.len() > 253 {
        return Err(bad("a DNS name has at most 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(bad("the name has an empty label (two dots in a row)"));
        }
        if label.len() > 63 {
            return Err(bad("a label of a DNS name has at most 63 characters"));
        }
        if label.contains('*') {
            return Err(bad(
                "`*` may only stand alone as the first label, as in *.example.com",
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad("use only letters, digits, '-' and '_' in names"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label may not start or end with '-'"));
        }
    }
    Ok(name)
}

/// Why an IPv6 rule cannot allow anything (sandboxes have IPv4 links only).
pub const NO_IPV6: &str = "sandboxes have no IPv6 yet (their links carry IPv4 only), so an \
IPv6 rule would allow nothing: allow an IPv4 address or network, or a name";

impl NetRule {
    /// The rule names IPv6 addresses.
    pub fn is_ipv6(&self) -> bool {
        matches!(&self.target, NetTarget::Net(c) if c.addr.is_ipv6())
    }

    /// Parses a rule; the error says what is wrong and what to write instead.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err(format!("the rule is empty: {RULE_FORMS}"));
        }
        // Longer than any rule can be (a name has at most 253 characters): refused before
        // anything below quotes it, so no error (nor its audit record) grows with it.
        if t.len() > MAX_RULE_LEN {
            let head: String = t.chars().take(40).collect();
            return Err(format!(
                "the rule {head:?}... has {} characters: a rule has at most {MAX_RULE_LEN} \
                 (a domain name at most 253)",
                t.len()
            ));
        }
        if t.contains(char::is_whitespace) || t.contains('\0') {
            return Err(format!(
                "{text:?} contains spaces: give one rule per --allow or --deny ({RULE_FORMS})"
            ));
        }
        // Another sandbox: sandbox:NAME or sandbox:NAME:PORT.
        if let Some(rest) = t.strip_prefix(SANDBOX_PREFIX) {
            let (name, port) = match rest.split_once(':') {
                Some((n, p)) => (n, Some(parse_port(p, text)?)),
                None => (rest, None),
            };
            let name = Name::new(name).map_err(|e| {
                let why = match e {
                    SpecError::Field { message, .. } => message,
                    other => other.to_string(),
                };
                format!(
                    "{text:?} is not a valid rule: {why}; write sandbox:NAME or sandbox:NAME:PORT"
                )
            })?;
            return Ok(Self {
                target: NetTarget::Sandbox(name),
                port,
            });
        }
        // IPv6, in brackets: [2001:db8::/32] or [2001:db8::1]:443.
        if let Some(rest) = t.strip_prefix('[') {
            let Some((inner, after)) = rest.split_once(']') else {
                return Err(format!("{text:?}: the '[' is not closed; {RULE_FORMS}"));
            };
            let cidr = Cidr::parse(inner, text)?;
            if !cidr.addr.is_ipv6() {
                return Err(format!(
                    "{text:?}: brackets are for IPv6 addresses; write {cidr} without them"
                ));
            }
            let port = match after {
                "" => None,
                p => match p.strip_prefix(':') {
                    Some(p) => Some(parse_port(p, text)?),
                    None => {
                        return Err(format!(
                            "{text:?}: after ']' comes nothing or :PORT; put the prefix inside the brackets, as in [2001:db8::/32]:443"
                        ));
                    }
                },
            };
            return Ok(Self {
                target: NetTarget::Net(cidr),
                port,
            });
        }
        if t.matches(':').count() > 1 {
            return Err(format!(
                "{text:?}: write IPv6 addresses and networks in brackets, as in [2001:db8::/32] or [2001:db8::1]:443"
            ));
        }
        let (host, port) = match t.split_once(':') {
            Some((h, p)) => (h, Some(parse_port(p, text)?)),
            None => (t, None),
        };
        let looks_numeric = host
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/');
        let target = if host.contains('/') || (looks_numeric && host.contains('.')) {
            NetTarget::Net(Cidr::parse(host, text)?)
        } else if let Some(suffix) = host.strip_prefix("*.") {
            NetTarget::Suffix(check_name(suffix, text)?)
        } else {
            NetTarget::Name(check_name(host, text)?)
        };
        Ok(Self { target, port })
    }

    /// Whether this rule names a network or address (not a DNS name).
    pub fn is_net(&self) -> bool {
        matches!(self.target, NetTarget::Net(_))
    }

    /// Whether this rule names another sandbox.
    pub fn is_sandbox(&self) -> bool {
        matches!(self.target, NetTarget::Sandbox(_))
    }
}

impl fmt::Display for NetRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.target {
            NetTarget::Name(n) => n.clone(),
            NetTarget::Suffix(s) => format!("*.{s}"),
            NetTarget::Net(c) => c.bracketed(),
            NetTarget::Sandbox(n) => format!("{SANDBOX_PREFIX}{}", n.as_str()),
        };
        match self.port {
            Some(p) => write!(f, "{host}:{p}"),
            None => f.write_str(&host),
        }
    }
}

impl FromStr for NetRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl Serialize for NetRule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NetRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A published port: TCP connections to `bind:host_port` on the host are forwarded to
/// `sandbox_port` inside the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMap {
    /// Host address to listen on (default `0.0.0.0`, every IPv4 address).
    pub bind: IpAddr,
    /// Host port.
    pub host_port: u16,
    /// Port inside the sandbox.
    pub sandbox_port: u16,
}

const PORT_FORMS: &str =
    "write HOST:SANDBOX (8080:3000) or ADDR:HOST:SANDBOX (127.0.0.1:8080:3000, [::1]:8080:3000)";

impl PortMap {
    /// Parses `[ADDR:]HOST:SANDBOX`; the error says what is wrong and what to write instead.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let t = t.strip_suffix("/tcp").unwrap_or(t);
        if t.ends_with("/udp") {
            return Err(format!(
                "{text:?}: only TCP ports can be published; {PORT_FORMS}"
            ));
        }
        let (bind, rest) = if let Some(r) = t.strip_prefix('[') {
            let Some((addr, after)) = r.split_once("]:") else {
                return Err(format!("{text:?}: {PORT_FORMS}"));
            };
            let ip: Ipv6Addr = addr
                .parse()
                .map_err(|_| format!("{text:?}: {addr:?} is not an IPv6 address"))?;
            (IpAddr::V6(ip), after)
        } else {
            let parts: Vec<&str> = t.split(':').collect();
            match parts.len() {
                2 => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), t),
                3 => {
                    let ip: IpAddr = parts[0].parse().map_err(|_| {
                        format!(
                            "{text:?}: {:?} is not an IP address; {PORT_FORMS}",
                            parts[0]
                        )
                    })?;
                    (ip, &t[parts[0].len() + 1..])
                }
                _ => return Err(format!("{text:?}: {PORT_FORMS}")),
            }
        };
        let Some((h, s)) = rest.split_once(':') else {
            return Err(format!("{text:?}: {PORT_FORMS}"));
        };
        Ok(Self {
            bind,
            host_port: parse_port(h, text)?,
            sandbox_port: parse_port(s, text)?,
        })
    }
}

impl fmt::Display for PortMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bind {
            IpAddr::V4(a) if a.is_unspecified() => {
                write!(f, "{}:{}", self.host_port, self.sandbox_port)
            }
            IpAddr::V4(a) => write!(f, "{a}:{}:{}", self.host_port, self.sandbox_port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}:{}", self.host_port, self.sandbox_port),
        }
    }
}

impl FromStr for PortMap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl Serialize for PortMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Most rules (allow and deny together) a sandbox may have: beyond this, a rule set is a
/// list of addresses that belongs in a network (10.1.2.0/24) or a wildcard (*.example.com).
pub const MAX_RULES: usize = 1024;
/// Most characters of one rule's text (a name of 253 characters, `*.` and `:65535` fit).
pub const MAX_RULE_LEN: usize = 300;
/// Most published ports of a sandbox.
pub const MAX_PORTS: usize = 256;

/// `spec.network`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(remote = "Self")]
pub struct NetworkSpec {
    /// none (loopback only), allow (only what `allow` lists) or open (all but `deny`).
    #[serde(default)]
    pub mode: NetworkMode,
    /// Egress allowed in mode `allow`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<NetRule>,
    /// Egress refused (in modes `allow` and `open`), also where an allow rule matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<NetRule>,
    /// Published TCP ports (any mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMap>,
}

impl Serialize for NetworkSpec {
    /// A network with neither rules nor ports is written as its bare mode (`none`), as
    /// older versions wrote it, so that they can still read it.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.allow.is_empty() && self.deny.is_empty() && self.ports.is_empty() {
            self.mode.serialize(s)
        } else {
            NetworkSpec::serialize(self, s)
        }
    }
}

impl<'de> Deserialize<'de> for NetworkSpec {
    /// A bare mode (`network: none`, the older form) or the whole object.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = NetworkSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mode (none, allow, open) or {mode, allow, deny, ports}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NetworkSpec, E> {
                Ok(NetworkSpec {
                    mode: v.parse().map_err(E::custom)?,
                    ..Default::default()
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<NetworkSpec, A::Error> {
                NetworkSpec::deserialize(serde::de::value::MapAccessDeserializer::new(m))
            }
        }
        d.deserialize_any(V)
    }
}

impl NetworkSpec {
    /// Checks the rules against the mode; errors name the field and say what to write.
    pub fn validate(&self) -> Result<(), SpecError> {
        match self.mode {
            NetworkMode::None if !self.allow.is_empty() => {
                return Err(SpecError::field(
                    "spec.network.allow",
                    "allow rules need a network: use --network allow (spec.network.mode: allow)",
                ));
            }
            NetworkMode::None if !self.deny.is_empty() => {
                return Err(SpecError::field(
                    "spec.network.deny",
                    "mode none has no egress to deny: use --network allow or --network open \
                     (spec.network.mode), or leave the deny rules out",
                ));
            }
            NetworkMode::Open if !self.allow.iter().all(NetRule::is_sandbox) => {
                return Err(SpecError::field(
                    "spec.network.allow",
                    "mode open allows everything that is not denied (other sandboxes only by \
                     sandbox:NAME rules): use --network allow to allow only the listed rules, \
                     or leave them out",
                ));
            }
            _ => {}
        }
        if let Some(i) = self.deny.iter().position(NetRule::is_sandbox) {
            return Err(SpecError::field(
                &format!("spec.network.deny[{i}]"),
                format!(
                    "{}: sandboxes never reach each other unless an allow rule names them; \
                     leave the deny rule out",
                    self.deny[i]
                ),
            ));
        }
        if let Some(i) = self.allow.iter().position(NetRule::is_ipv6) {
            return Err(SpecError::field(
                &format!("spec.network.allow[{i}]"),
                format!("{}: {NO_IPV6}", self.allow[i]),
            ));
        }
        if self.allow.len() + self.deny.len() > MAX_RULES {
            return Err(SpecError::field(
                "spec.network",
                format!(
                    "{} rules are more than a sandbox may have ({MAX_RULES}): join addresses \
                     into networks (10.1.2.0/24) and names under wildcards (*.example.com)",
                    self.allow.len() + self.deny.len()
                ),
            ));
        }
        if self.ports.len() > MAX_PORTS {
            return Err(SpecError::field(
                "spec.network.ports",
                format!("a sandbox publishes at most {MAX_PORTS} ports"),
            ));
        }
        for (i, p) in self.ports.iter().enumerate() {
            if let Some(j) = self.ports[..i].iter().position(|q| {
                q.host_port == p.host_port
                    && (q.bind == p.bind || q.bind.is_unspecified() || p.bind.is_unspecified())
                    && q.bind.is_ipv4() == p.bind.is_ipv4()
            }) {
                return Err(SpecError::field(
                    &format!("spec.network.ports[{i}]"),
                    format!(
                        "host port {} is published twice ({} and {p}): give each a host port of its own",
                        p.host_port, self.ports[j]
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_rules_are_refused_with_a_short_error() {
        let huge = format!("{}.test", "a".repeat(100_000));
        let err = NetRule::parse(&huge).unwrap_err();
        assert!(err.len() < 200 && err.contains("at most 300"), "{err}");
        let longest = format!("*.{}:65535", "a".repeat(253));
        assert!(longest.len() <= MAX_RULE_LEN);
    }

    #[test]
    fn good_rules() {
        for (text, shown) in [
            ("pypi.org", "pypi.org"),
            ("PyPI.org.", "pypi.org"),
            ("*.npmjs.org", "*.npmjs.org"),
            ("10.1.2.0/24", "10.1.2.0/24"),
            ("10.1.2.0/24:443", "10.1.2.0/24:443"),
            ("10.1.2.3", "10.1.2.3"),
            ("10.1.2.3/32:22", "10.1.2.3:22"),
            ("example.com:443", "example.com:443"),
            ("[2001:db8::/32]", "[2001:db8::/32]"),
            ("[2001:db8::1]:443", "[2001:db8::1]:443"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("localhost", "localhost"),
            ("sandbox:web", "sandbox:web"),
            ("sandbox:web-2:8000", "sandbox:web-2:8000"),
            ("sandbox:80", "sandbox:80"),
        ] {
            let r = NetRule::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(r.to_string(), shown, "{text}");
            assert_eq!(NetRule::parse(shown).unwrap(), r, "{shown} round trip");
        }
        let r = NetRule::parse("*.npmjs.org").unwrap();
        assert_eq!(r.target, NetTarget::Suffix("npmjs.org".into()));
        let r = NetRule::parse("10.1.2.0/24:443").unwrap();
        assert_eq!(r.port, Some(443));
        let NetTarget::Net(c) = r.target else {
            panic!("not a network")
        };
        assert!(c.contains("10.1.2.77".parse().unwrap()));
        assert!(!c.contains("10.1.3.1".parse().unwrap()));
    }

    #[test]
    fn bad_rules_say_what_to_write() {
        for (text, says) in [
            ("", "empty"),
            ("a b", "one rule per"),
            ("10.1.2.3/24", "write 10.1.2.0/24"),
            ("10.1.2.0/33", "0 to 32"),
            ("300.1.2.3", "not an IP address"),
            ("2001:db8::1", "brackets"),
            ("[2001:db8::1", "not closed"),
            ("[10.0.0.1]", "without them"),
            ("[2001:db8::]/32", "inside the brackets"),
            ("example.com:0", "1 to 65535"),
            ("example.com:99999", "1 to 65535"),
            ("example.com:https", "not a port"),
            ("ex*mple.com", "first label"),
            ("a.*.com", "first label"),
            ("a..com", "empty label"),
            ("-a.com", "start or end"),
            ("exa$mple.com", "letters, digits"),
            ("*.", "empty"),
            ("sandbox:", "sandbox:NAME"),
            ("sandbox:Web", "lowercase"),
            ("sandbox:web:0", "1 to 65535"),
            ("sandbox:web:8000:1", "not a port"),
        ] {
            let e = NetRule::parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn ports() {
        for (text, shown) in [
            ("8080:3000", "8080:3000"),
            ("127.0.0.1:8080:3000", "127.0.0.1:8080:3000"),
            ("[::1]:8080:3000", "[::1]:8080:3000"),
            ("8080:3000/tcp", "8080:3000"),
        ] {
            let p = PortMap::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(p.to_string(), shown);
            assert_eq!(PortMap::parse(shown).unwrap(), p);
        }
        let p = PortMap::parse("127.0.0.1:8080:3000").unwrap();
        assert_eq!(
            (p.bind, p.host_port, p.sandbox_port),
            ("127.0.0.1".parse().unwrap(), 8080, 3000)
        );
        for (text, says) in [
            ("8080", "HOST:SANDBOX"),
            ("8080:0", "1 to 65535"),
            ("x:8080:3000", "not an IP address"),
            ("8080:3000/udp", "only TCP"),
            ("1:2:3:4", "HOST:SANDBOX"),
            ("[::1:8080:3000", "HOST:SANDBOX"),
        ] {
            let e = PortMap::parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    fn spec(network: &str) -> Result<crate::SandboxManifest, SpecError> {
        crate::SandboxManifest::parse(&format!(
            "apiVersion: sandbox.io/v1\nkind: Sandbox\nspec:\n  network: {network}\n"
        ))
    }

    #[test]
    fn old_and_new_forms() {
        let m = spec("none").unwrap();
        assert_eq!(m.spec.network, NetworkSpec::default());
        // Without rules it is written as before.
        let json = serde_json::to_value(&m.spec).unwrap();
        assert_eq!(json["network"], "none");
        let m = spec("{mode: allow, allow: [pypi.org, '*.npmjs.org', '10.1.2.0/24:443'], deny: [bad.npmjs.org], ports: ['8080:3000']}").unwrap();
        let n = &m.spec.network;
        assert_eq!(n.mode, NetworkMode::Allow);
        assert_eq!(n.allow.len(), 3);
        assert_eq!(n.deny[0].to_string(), "bad.npmjs.org");
        assert_eq!(n.ports[0].host_port, 8080);
        let json = serde_json::to_value(&m.spec).unwrap();
        assert_eq!(json["network"]["allow"][1], "*.npmjs.org");
        let back = crate::SandboxManifest::from_value(serde_json::to_value(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        assert_eq!(spec("open").unwrap().spec.network.mode, NetworkMode::Open);
        assert_eq!(
            spec("{ports: ['80:80']}").unwrap().spec.network.mode,
            NetworkMode::None
        );
    }

    #[test]
    fn bad_specs_name_the_field() {
        for (network, field, says) in [
            ("closed", "spec.network", "none, allow or open"),
            (
                "{mode: allow, allow: ['10.0.0.1/8']}",
                "spec.network.allow[0]",
                "write 10.0.0.0/8",
            ),
            (
                "{mode: allow, allow: [a.com, 'b c']}",
                "spec.network.allow[1]",
                "one rule per",
            ),
            (
                "{mode: open, deny: ['x:y']}",
                "spec.network.deny[0]",
                "not a port",
            ),
            ("{ports: ['80']}", "spec.network.ports[0]", "HOST:SANDBOX"),
            (
                "{mode: allow, allow: [a.com, '[2001:db8::/32]']}",
                "spec.network.allow[1]",
                "no IPv6 yet",
            ),
            (
                "{mode: none, allow: [pypi.org]}",
                "spec.network.allow",
                "--network allow",
            ),
            (
                "{allow: [pypi.org]}",
                "spec.network.allow",
                "--network allow",
            ),
            ("{deny: [pypi.org]}", "spec.network.deny", "--network"),
            (
                "{mode: open, allow: [pypi.org]}",
                "spec.network.allow",
                "--network allow",
            ),
            (
                "{mode: allow, allowed: [pypi.org]}",
                "spec.network",
                "allowed",
            ),
            (
                "{ports: ['80:80', '127.0.0.1:80:81']}",
                "spec.network.ports[1]",
                "twice",
            ),
        ] {
            let e = spec(network).unwrap_err().to_string();
            assert!(e.starts_with(field) && e.contains(says), "{network}: {e}");
        }
        spec("{ports: ['127.0.0.1:80:80', '127.0.0.2:80:81', '[::1]:80:80']}").unwrap();
        let many: Vec<String> = (0..=MAX_RULES).map(|i| format!("h{i}.test")).collect();
        let e = spec(&format!("{{mode: allow, allow: [{}]}}", many.join(", ")))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("spec.network:") && e.contains("1024"), "{e}");
    }
}
