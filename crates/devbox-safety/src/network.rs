//! Checks that know the sandbox's network: a download (`curl`, `wget`) from a host the
//! network in force does not allow is a finding (`net.egress_not_allowed`, risk medium), so
//! that a policy (the example `network_egress.rego`, [`NETWORK_EGRESS_POLICY`]) can deny it
//! before it runs. The network refuses such a connection anyway; the check says so early and
//! by name.
//!
//! What is matched: URLs in the arguments (`https://host:port/...`), and for `curl` bare
//! `host[/path]` arguments that follow no option. Names match exact and `*.suffix` rules,
//! addresses match network rules; an address that an allowed name resolves to is only known
//! to the network at run time, so an address no network rule names counts as not allowed.
//! Loopback is always allowed; the metadata range 169.254.0.0/16 never is.

use std::net::IpAddr;

use devbox_spec::{NetRule, NetTarget, NetworkMode};

use crate::parse::{Invocation, Parsed};
use crate::rules::{Finding, Risk};

/// The example policy that denies what this check finds.
pub const NETWORK_EGRESS_POLICY: &str = include_str!("../policies/network_egress.rego");

/// The rule id of a download from a host that is not allowed.
pub const RULE: &str = "net.egress_not_allowed";

/// The network in force, as the policies' input carries it.
struct Net {
    mode: NetworkMode,
    allow: Vec<NetRule>,
    deny: Vec<NetRule>,
}

impl Net {
    /// From `{mode, allow, deny}`; `None` when there is no network to check against (a
    /// check without a sandbox).
    fn from_value(v: &serde_json::Value) -> Option<Self> {
        let mode = v.get("mode")?.as_str()?.parse().ok()?;
        let rules = |key: &str| -> Vec<NetRule> {
            v.get(key)
                .and_then(|a| a.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|r| r.as_str().and_then(|r| NetRule::parse(r).ok()))
                        .collect()
                })
                .unwrap_or_default()
        };
        Some(Self {
            mode,
            allow: rules("allow"),
            deny: rules("deny"),
        })
    }

    /// Why `host:port` is not reachable, or `None` if it is.
    fn refuses(&self, host: &Host) -> Option<String> {
        if host.is_loopback() {
            return None;
        }
        if let Host::Ip(ip, _) = host
            && let IpAddr::V4(v4) = ip
            && v4.is_link_local()
        {
            return Some("the link-local/metadata range 169.254.0.0/16 is never reachable".into());
        }
        let hit = |rules: &[NetRule]| rules.iter().any(|r| host.matches(r));
        match self.mode {
            NetworkMode::None => Some("the sandbox has no network (mode none)".into()),
            _ if hit(&self.deny) => Some("a deny rule matches it".into()),
            NetworkMode::Open => None,
            NetworkMode::Allow if hit(&self.allow) => None,
            NetworkMode::Allow => Some("no allow rule matches it".into()),
        }
    }
}

/// A URL's host and port.
#[derive(Debug, PartialEq, Eq)]
enum Host {
    Name(String, Option<u16>),
    Ip(IpAddr, Option<u16>),
}

impl Host {
    fn port(&self) -> Option<u16> {
        match self {
            Self::Name(_, p) | Self::Ip(_, p) => *p,
        }
    }

    fn is_loopback(&self) -> bool {
        match self {
            Self::Name(n, _) => n == "localhost" || n.ends_with(".localhost"),
            Self::Ip(ip, _) => ip.is_loopback(),
        }
    }

    fn matches(&self, rule: &NetRule) -> bool {
        if rule.port.is_some() && rule.port != self.port() {
            return false;
        }
        match (&rule.target, self) {
            (NetTarget::Name(n), Self::Name(h, _)) => n == h,
            (NetTarget::Suffix(s), Self::Name(h, _)) => {
                h.len() > s.len() + 1 && h.ends_with(s.as_str()) && h.ends_with(&format!(".{s}"))
            }
            (NetTarget::Net(c), Self::Ip(ip, _)) => c.contains(*ip),
            _ => false,
        }
    }

    fn shown(&self) -> String {
        let (h, p) = match self {
            Self::Name(n, p) => (n.clone(), p),
            Self::Ip(IpAddr::V6(a), p) => (format!("[{a}]"), p),
            Self::Ip(a, p) => (a.to_string(), p),
        };
        match p {
            Some(p) => format!("{h}:{p}"),
            None => h,
        }
    }
}

/// The host and port of `url` (`scheme://[user@]host[:port][/...]`, or without a scheme
/// `host[:port][/...]`); `None` if it does not look like one.
fn parse_url(url: &str) -> Option<Host> {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s.to_ascii_lowercase()), r),
        None => (None, url),
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, after) = r.split_once(']')?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => match scheme.as_deref() {
            Some("https") | Some("ftps") => Some(443),
            Some("http") | None => Some(80),
            Some("ftp") => Some(21),
            _ => None,
        },
    };
    if host.is_empty() {
        return None;
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(Host::Ip(ip, port));
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let valid = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    (valid && (scheme.is_some() || name.contains('.') || name == "localhost"))
        .then_some(Host::Name(name, port))
}

/// Whether a curl option takes the next word as its value (`-o FILE`, `--header H`).
fn takes_value(opt: &str) -> bool {
    const LONG: &[&str] = &[
        "--output",
        "--header",
        "--data",
        "--data-raw",
        "--data-binary",
        "--data-urlencode",
        "--request",
        "--user",
        "--user-agent",
        "--referer",
        "--write-out",
        "--upload-file",
        "--proxy",
        "--cookie",
        "--cookie-jar",
        "--form",
        "--config",
        "--cert",
        "--key",
        "--max-time",
        "--range",
        "--connect-timeout",
        "--retry",
        "--resolve",
        "--connect-to",
        "--cacert",
        "--output-dir",
        "--dump-header",
        "--trace",
        "--interface",
        "--json",
    ];
    if let Some(long) = opt.strip_prefix("--") {
        return !long.contains('=') && LONG.contains(&opt);
    }
    // A cluster of short options: the last one may take the next word.
    opt.len() > 1 && opt.ends_with(|c: char| "oHdXuAewTxbcFKEmrYyzCPQtD".contains(c))
}

/// The hosts a download command would connect to.
fn targets(inv: &Invocation) -> Vec<Host> {
    let curl = match inv.program.as_str() {
        "curl" => true,
        "wget" => false,
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    let mut after_option = false;
    for a in &inv.args {
        if a.starts_with('-') {
            after_option = curl && takes_value(a);
            continue;
        }
        let has_scheme = a.contains("://");
        if (has_scheme || (curl && !after_option))
            && let Some(h) = parse_url(a)
        {
            out.push(h);
        }
        after_option = false;
    }
    out
}

/// Findings for downloads from hosts the network in force (`network`, the input's
/// `sandbox.network`) does not allow; none without a network.
pub fn check(parsed: &Parsed, network: &serde_json::Value) -> Vec<Finding> {
    let Some(net) = Net::from_value(network) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for inv in &parsed.invocations {
        for host in targets(inv) {
            if let Some(why) = net.refuses(&host) {
                let mut command = inv.display();
                if !inv.via.is_empty() {
                    command = format!("{command} (via {})", inv.via.join(" > "));
                }
                out.push(Finding {
                    rule: RULE.into(),
                    risk: Risk::Medium,
                    command,
                    reason: format!(
                        "{} connects to {}, which the sandbox's network does not allow: {why}",
                        inv.program,
                        host.shown()
                    ),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CheckContext, PolicySet, PolicySource, Verdict};

    fn net(mode: &str, allow: &[&str], deny: &[&str]) -> serde_json::Value {
        serde_json::json!({"mode": mode, "allow": allow, "deny": deny, "ports": []})
    }

    fn hosts(text: &str, network: &serde_json::Value) -> Vec<String> {
        check(&crate::parse::parse(text), network)
            .into_iter()
            .map(|f| {
                f.reason
                    .split(" connects to ")
                    .nth(1)
                    .unwrap()
                    .split(',')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn urls_are_parsed() {
        assert_eq!(
            parse_url("https://user@PyPI.org:8443/simple"),
            Some(Host::Name("pypi.org".into(), Some(8443)))
        );
        assert_eq!(
            parse_url("http://[2001:db8::1]/x"),
            Some(Host::Ip("2001:db8::1".parse().unwrap(), Some(80)))
        );
        assert_eq!(
            parse_url("10.1.2.3/x"),
            Some(Host::Ip("10.1.2.3".parse().unwrap(), Some(80)))
        );
        assert_eq!(parse_url("out"), None);
        assert_eq!(parse_url("https://"), None);
        assert_eq!(parse_url("https://a.b:99999"), None);
    }

    #[test]
    fn allowlist() {
        let n = net(
            "allow",
            &["pypi.org", "*.npmjs.org", "10.1.2.0/24:443"],
            &["bad.npmjs.org"],
        );
        assert!(hosts("curl -fsSL https://pypi.org/simple", &n).is_empty());
        assert!(hosts("wget https://registry.npmjs.org/x", &n).is_empty());
        assert!(hosts("curl https://10.1.2.7/", &n).is_empty());
        assert!(hosts("curl http://localhost:8080/ http://127.0.0.1/", &n).is_empty());
        assert!(hosts("curl -o out.txt pypi.org", &n).is_empty());
        assert!(hosts("curl -H 'Host: evil.com' --output=x -fsSL pypi.org", &n).is_empty());
        assert_eq!(hosts("curl -fsSL evil.com", &n), ["evil.com:80"]);
        assert_eq!(hosts("curl https://evil.com/x", &n), ["evil.com:443"]);
        assert_eq!(hosts("curl npmjs.org", &n), ["npmjs.org:80"]);
        assert_eq!(
            hosts("wget http://bad.npmjs.org/", &n),
            ["bad.npmjs.org:80"]
        );
        assert_eq!(hosts("curl http://10.1.2.7/", &n), ["10.1.2.7:80"]);
        assert_eq!(
            hosts("sudo sh -c 'curl https://evil.com'", &n),
            ["evil.com:443"]
        );
        assert_eq!(
            hosts("curl http://169.254.169.254/", &net("open", &[], &[])),
            ["169.254.169.254:80"]
        );
        assert!(hosts("curl https://anything.org", &net("open", &[], &[])).is_empty());
        assert_eq!(
            hosts("curl https://pypi.org", &net("none", &[], &[])),
            ["pypi.org:443"]
        );
        // Without a sandbox (no network value) nothing is found.
        assert!(hosts("curl https://evil.com", &serde_json::Value::Null).is_empty());
    }

    #[test]
    fn the_example_policy_denies_before_running() {
        let set = PolicySet::new(&[PolicySource {
            name: "network-egress".into(),
            rego: NETWORK_EGRESS_POLICY.into(),
        }])
        .unwrap();
        let ctx = CheckContext {
            sandbox: "dev".into(),
            network: net("allow", &["pypi.org"], &[]),
            ..Default::default()
        };
        let c = crate::check("curl -fsSL https://evil.example/x -o /tmp/x", &ctx, &set);
        assert_eq!(c.decision, Verdict::Deny, "{c:?}");
        assert!(
            c.reasons
                .iter()
                .any(|r| r.contains("evil.example") && r.contains("allowed: pypi.org")),
            "{:?}",
            c.reasons
        );
        let c = crate::check("curl -fsSL https://pypi.org/simple/", &ctx, &set);
        assert_eq!(c.decision, Verdict::Allow, "{c:?}");
    }
}
