//! API tokens: what a remote caller (TCP, with `Authorization: Bearer`) may do.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a caller may do. Each route needs one scope; root on the Unix socket has all.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read anything: sandboxes, snapshots, stats, files, the audit log, checks of commands.
    Read,
    /// Run commands in existing sandboxes (exec, its stream) and write their files.
    Exec,
    /// Decide approvals (kept apart, so a caller that runs commands cannot approve them).
    Approve,
    /// Everything else: create, start, stop, destroy, snapshots, rollback, policies,
    /// networks, images, tokens, one-shot runs.
    Admin,
}

impl Scope {
    /// Every scope, in order.
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Exec, Scope::Approve, Scope::Admin];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Exec => "exec",
            Scope::Approve => "approve",
            Scope::Admin => "admin",
        }
    }

    /// Parses a comma-separated list (`read,exec`), sorted and without repeats; the error
    /// says what is accepted.
    pub fn parse_list(text: &str) -> Result<Vec<Scope>, String> {
        let mut out = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let s = Scope::ALL
                .into_iter()
                .find(|s| s.as_str() == part)
                .ok_or_else(|| {
                    format!("{part:?} is not a scope: use read, exec, approve and admin, comma-separated")
                })?;
            if !out.contains(&s) {
                out.push(s);
            }
        }
        if out.is_empty() {
            return Err(
                "no scope given: use read, exec, approve and admin, comma-separated".into(),
            );
        }
        out.sort();
        Ok(out)
    }
}

/// `POST /v1/tokens`: a new token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Its name (unique; letters, digits, `-`, `_`, `.`; at most 64): the audit log's actor
    /// for every request made with it (`token:NAME`).
    pub name: String,
    /// What it may do (at least one).
    pub scopes: Vec<Scope>,
    /// Only sandboxes whose names match this pattern (`*` any run of characters, `?` one),
    /// e.g. `ci-*`. A token with a pattern reaches no route that is not about one sandbox,
    /// except listing sandboxes (only the matching ones), creating one (of a matching
    /// name), checking a command, the version and the OpenAPI document.
    #[serde(default)]
    pub sandbox: Option<String>,
    /// Seconds until it expires (none: never).
    #[serde(default)]
    pub expires_in_seconds: Option<u64>,
    /// Most requests a second on average (bursts up to twice that); none: the daemon's
    /// default.
    #[serde(default)]
    pub rate_per_second: Option<f64>,
    /// Most execs running at once; none: the daemon's default.
    #[serde(default)]
    pub max_execs: Option<u32>,
}

/// A token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    /// Its name.
    pub name: String,
    /// Its id (the part of the token before the secret).
    pub id: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// The sandboxes it may reach (a pattern), if limited.
    pub sandbox: Option<String>,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Who created it.
    pub created_by: String,
    /// When it expires (RFC 3339), if it does.
    pub expires_at: Option<String>,
    /// Whether it has expired.
    pub expired: bool,
    /// Last used (RFC 3339), if ever.
    pub last_used_at: Option<String>,
    /// Its own rate (requests a second), if not the daemon's default.
    pub rate_per_second: Option<f64>,
    /// Its own cap on concurrent execs, if not the daemon's default.
    pub max_execs: Option<u32>,
}

/// `POST /v1/tokens`' answer: the token, shown this once (the daemon keeps only a hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// The bearer token: send it as `Authorization: Bearer TOKEN`.
    pub token: String,
    /// What was stored.
    pub info: TokenInfo,
}

/// Whether `name` matches a token's sandbox pattern: `*` matches any run of characters,
/// `?` one character, everything else itself.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative wildcard match with one backtrack point (linear-ish, no recursion).
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        for (p, n, want) in [
            ("ci-*", "ci-1", true),
            ("ci-*", "ci-", true),
            ("ci-*", "dev", false),
            ("ci-*", "xci-1", false),
            ("*", "anything", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*-test-*", "a-test-b", true),
            ("*-test-*", "a-tes-b", false),
            ("exact", "exact", true),
            ("exact", "exact2", false),
            ("a*b*c", "aXbYbZc", true),
        ] {
            assert_eq!(pattern_matches(p, n), want, "{p} {n}");
        }
    }

    #[test]
    fn scope_lists() {
        assert_eq!(
            Scope::parse_list("exec, read,exec").unwrap(),
            [Scope::Read, Scope::Exec]
        );
        assert!(Scope::parse_list("").unwrap_err().contains("no scope"));
        assert!(
            Scope::parse_list("read,root")
                .unwrap_err()
                .contains("\"root\"")
        );
    }
}
