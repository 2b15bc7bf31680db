//! Decisions: Rego policies (regorus) over the parsed commands and their findings.
//!
//! Every policy is a Rego module that defines `decision` (`"allow"`, `"require_approval"`
//! or `"deny"`) and optionally `reasons` (a set of strings). The input is:
//!
//! ```json
//! {"text": "...", "commands": [Invocation...], "findings": [Finding...], "risk": "high",
//!  "parse_errors": [...], "sandbox": {"name", "labels", "spec"}, "actor": {"name"}}
//! ```
//!
//! All policies that apply (the built-in default, global ones, the sandbox's own) are
//! evaluated and the most restrictive decision wins. A global policy named `default`
//! replaces the built-in one. A policy that fails to compile, or does not define
//! `decision`, is refused when added; one that fails at evaluation counts as `deny`.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::rules::{Finding, Risk};

/// The built-in policy: critical findings are denied, high ones need approval, text that
/// cannot be parsed needs approval, the rest is allowed.
pub const DEFAULT_POLICY: &str = r#"package devbox.default

import rego.v1

default decision := "allow"

decision := "deny" if critical

decision := "require_approval" if {
	not critical
	needs_approval
}

critical if {
	some f in input.findings
	f.risk == "critical"
}

needs_approval if {
	some f in input.findings
	f.risk == "high"
}

needs_approval if count(input.parse_errors) > 0

reasons contains msg if {
	some f in input.findings
	f.risk in {"critical", "high"}
	msg := sprintf("%s (%s): %s", [f.rule, f.risk, f.reason])
}

reasons contains msg if {
	count(input.parse_errors) > 0
	msg := sprintf("the command could not be parsed: %s", [input.parse_errors[0]])
}
"#;

/// What a policy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Run it.
    Allow,
    /// Hold it until someone approves.
    RequireApproval,
    /// Refuse it.
    Deny,
}

impl Verdict {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Self::Allow),
            "require_approval" => Some(Self::RequireApproval),
            "deny" => Some(Self::Deny),
            _ => None,
        }
    }
}

/// One policy's part in a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVerdict {
    /// The policy's name.
    pub policy: String,
    /// What it decided.
    pub decision: Verdict,
    /// Its reasons.
    pub reasons: Vec<String>,
}

/// A policy as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySource {
    /// Its name.
    pub name: String,
    /// The Rego text.
    pub rego: String,
}

/// Errors of policies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The policy does not compile or is not usable.
    #[error("policy {name}: {message}")]
    Invalid {
        /// Its name.
        name: String,
        /// The compiler's message, or what is missing.
        message: String,
    },
}

/// Converts JSON into a Rego value directly (much faster than through JSON text); object
/// keys are shared between the objects that repeat them.
pub fn to_rego(v: &serde_json::Value) -> regorus::Value {
    fn walk(
        v: &serde_json::Value,
        keys: &mut std::collections::HashMap<String, regorus::Value>,
    ) -> regorus::Value {
        match v {
            serde_json::Value::Null => regorus::Value::Null,
            serde_json::Value::Bool(b) => regorus::Value::from(*b),
            serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => regorus::Value::from(i),
                (None, Some(u), _) => regorus::Value::from(u),
                (None, None, Some(f)) => regorus::Value::from(f),
                _ => regorus::Value::Null,
            },
            serde_json::Value::String(s) => regorus::Value::from(s.as_str()),
            serde_json::Value::Array(a) => {
                regorus::Value::from(a.iter().map(|x| walk(x, keys)).collect::<Vec<_>>())
            }
            serde_json::Value::Object(o) => {
                let mut map = std::collections::BTreeMap::new();
                for (k, x) in o {
                    let key = match keys.get(k) {
                        Some(key) => key.clone(),
                        None => {
                            let key = regorus::Value::from(k.as_str());
                            keys.insert(k.clone(), key.clone());
                            key
                        }
                    };
                    map.insert(key, walk(x, keys));
                }
                regorus::Value::from(map)
            }
        }
    }
    walk(v, &mut std::collections::HashMap::new())
}

/// Whether a policy may read `input.commands`. Conservative: every use of `input` other than
/// `input.FIELD` with another field name counts (`input[...]`, `input` alone, `walk(input)`).
pub fn may_read_commands(rego: &str) -> bool {
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = rego.as_bytes();
    let mut from = 0;
    while let Some(i) = rego[from..].find("input").map(|i| i + from) {
        from = i + "input".len();
        if (i > 0 && ident(bytes[i - 1])) || bytes.get(from).copied().is_some_and(ident) {
            continue; // part of a longer name
        }
        if bytes.get(from) != Some(&b'.') {
            return true;
        }
        let field: String = rego[from + 1..]
            .bytes()
            .take_while(|&b| ident(b))
            .map(char::from)
            .collect();
        if field == "commands" || field.is_empty() {
            return true;
        }
    }
    false
}

/// A set of compiled policies.
#[derive(Clone)]
pub struct PolicySet {
    engine: regorus::Engine,
    /// (policy name, package path under `data`).
    packages: Vec<(String, String)>,
    /// Some policy may read `input.commands` (otherwise the input leaves them out).
    reads_commands: bool,
    /// The set is the built-in default policy alone, decided natively (see
    /// [`default_decision`]).
    builtin_only: bool,
}

/// What the built-in default policy decides, computed without the Rego engine: the same
/// decision and reasons (a test holds the two together over the corpus). A cold Rego
/// evaluation costs about 0.2 ms inside the daemon; this costs microseconds.
pub fn default_decision(findings: &[Finding], parse_errors: &[String]) -> PolicyVerdict {
    let critical = findings.iter().any(|f| f.risk == Risk::Critical);
    let high = findings.iter().any(|f| f.risk == Risk::High);
    let decision = if critical {
        Verdict::Deny
    } else if high || !parse_errors.is_empty() {
        Verdict::RequireApproval
    } else {
        Verdict::Allow
    };
    let mut reasons: Vec<String> = findings
        .iter()
        .filter(|f| f.risk >= Risk::High)
        .map(|f| {
            let risk = if f.risk == Risk::Critical {
                "critical"
            } else {
                "high"
            };
            format!("{} ({risk}): {}", f.rule, f.reason)
        })
        .collect();
    if let Some(e) = parse_errors.first() {
        reasons.push(format!("the command could not be parsed: {e}"));
    }
    // Rego's `reasons contains` is a set: sorted, without repeats.
    reasons.sort();
    reasons.dedup();
    PolicyVerdict {
        policy: "default".into(),
        decision,
        reasons,
    }
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("packages", &self.packages)
            .finish()
    }
}

fn invalid(name: &str, message: impl ToString) -> PolicyError {
    PolicyError::Invalid {
        name: name.to_string(),
        message: message.to_string(),
    }
}

impl PolicySet {
    /// Compiles policies. Without one named `default`, the built-in default comes first.
    pub fn new(policies: &[PolicySource]) -> Result<Self, PolicyError> {
        let mut engine = regorus::Engine::new();
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: Duration::from_millis(100),
            check_interval: NonZeroU32::MIN,
        });
        let mut all: Vec<PolicySource> = Vec::new();
        if !policies.iter().any(|p| p.name == "default") {
            all.push(PolicySource {
                name: "default".into(),
                rego: DEFAULT_POLICY.into(),
            });
        }
        all.extend(policies.iter().cloned());
        let mut packages = Vec::new();
        for p in &all {
            let pkg = engine
                .add_policy(format!("{}.rego", p.name), p.rego.clone())
                .map_err(|e| invalid(&p.name, e))?;
            if packages.iter().any(|(_, existing)| existing == &pkg) {
                return Err(invalid(
                    &p.name,
                    format!(
                        "package {pkg} is already used by another policy; pick another package name"
                    ),
                ));
            }
            packages.push((p.name.clone(), pkg));
        }
        let reads_commands = all.iter().any(|p| may_read_commands(&p.rego));
        let builtin_only =
            all.len() == 1 && all[0].name == "default" && all[0].rego == DEFAULT_POLICY;
        let mut set = Self {
            engine,
            packages,
            reads_commands,
            builtin_only,
        };
        // Every policy must decide something on a trivial input.
        let probe = serde_json::json!({"text": "true", "commands": [], "findings": [], "risk": "none", "parse_errors": [],
            "sandbox": {"name": "probe", "labels": {}, "spec": {}}, "actor": {"name": "probe"}});
        let probe = to_rego(&probe);
        // Evaluating on the set itself also leaves its engine prepared (analysed, scheduled),
        // so the clones each decision works on start ready instead of preparing again.
        for (name, pkg) in set.packages.clone() {
            set.eval_one(&name, &pkg, &probe)
                .map_err(|m| invalid(&name, m))?;
        }
        Ok(set)
    }

    fn eval_one(
        &mut self,
        name: &str,
        pkg: &str,
        input: &regorus::Value,
    ) -> Result<PolicyVerdict, String> {
        self.engine.set_input(input.clone());
        let decision = self
            .engine
            .eval_rule(format!("{pkg}.decision"))
            .map_err(|e| e.to_string())?;
        let decision = decision
            .as_string()
            .ok()
            .and_then(|s| Verdict::parse(s))
            .ok_or_else(|| format!("`decision` must be \"allow\", \"require_approval\" or \"deny\" (got {decision})"))?;
        let reasons = match self.engine.eval_rule(format!("{pkg}.reasons")) {
            Ok(v) => {
                let json: serde_json::Value =
                    serde_json::from_str(&v.to_json_str().unwrap_or_default()).unwrap_or_default();
                match json {
                    serde_json::Value::Array(a) => a
                        .into_iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect(),
                    _ => Vec::new(),
                }
            }
            Err(_) => Vec::new(),
        };
        Ok(PolicyVerdict {
            policy: name.to_string(),
            decision,
            reasons,
        })
    }

    /// Whether the set is the built-in default policy alone.
    pub fn builtin_only(&self) -> bool {
        self.builtin_only
    }

    /// Whether some policy may read `input.commands`.
    pub fn reads_commands(&self) -> bool {
        self.reads_commands
    }

    /// Evaluates every policy on `input`; the most restrictive decision wins.
    pub fn decide(&self, input: &serde_json::Value) -> (Verdict, Vec<PolicyVerdict>) {
        self.decide_value(&to_rego(input))
    }

    /// [`Self::decide`] on an input already converted (see [`crate::input::build`]).
    pub fn decide_value(&self, input: &regorus::Value) -> (Verdict, Vec<PolicyVerdict>) {
        let mut engine = self.clone();
        let mut verdicts = Vec::new();
        for (name, pkg) in &self.packages {
            let v = engine
                .eval_one(name, pkg, input)
                .unwrap_or_else(|e| PolicyVerdict {
                    policy: name.clone(),
                    decision: Verdict::Deny,
                    reasons: vec![format!("policy {name} failed: {e}")],
                });
            verdicts.push(v);
        }
        let overall = verdicts
            .iter()
            .map(|v| v.decision)
            .max()
            .unwrap_or(Verdict::Allow);
        (overall, verdicts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_policies_read_commands() {
        assert!(!may_read_commands(DEFAULT_POLICY));
        for reads in [
            "x if { some c in input.commands; c.program == \"rm\" }",
            "x if { input[\"commands\"] }",
            "x if { walk(input, [p, v]) }",
            "import input as i",
            "x := input",
            "x if input.\ncommands",
        ] {
            assert!(may_read_commands(reads), "{reads}");
        }
        for not_reads in [
            "x if input.findings[_].risk == \"high\"",
            "x if { input.text; input.sandbox.labels.team == \"ml\"; myinput.commands }",
            "x if input_commands",
        ] {
            assert!(!may_read_commands(not_reads), "{not_reads}");
        }
    }

    fn input(findings: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"text": "x", "commands": [], "findings": findings, "risk": "none", "parse_errors": [],
            "sandbox": {"name": "dev", "labels": {"team": "web"}, "spec": {}}, "actor": {"name": "root"}})
    }

    #[test]
    fn default_policy_maps_risks() {
        let set = PolicySet::new(&[]).unwrap();
        assert_eq!(set.decide(&input(serde_json::json!([]))).0, Verdict::Allow);
        let high =
            serde_json::json!([{"rule": "r", "risk": "high", "command": "c", "reason": "why"}]);
        let (v, parts) = set.decide(&input(high));
        assert_eq!(v, Verdict::RequireApproval);
        assert_eq!(parts[0].reasons, ["r (high): why"]);
        let crit =
            serde_json::json!([{"rule": "r", "risk": "critical", "command": "c", "reason": "why"}]);
        assert_eq!(set.decide(&input(crit)).0, Verdict::Deny);
    }

    #[test]
    fn user_policies_add_and_bad_ones_are_refused() {
        let mine = PolicySource {
            name: "no-publish".into(),
            rego: "package devbox.no_publish\nimport rego.v1\ndefault decision := \"allow\"\ndecision := \"deny\" if { some c in input.commands; c.program == \"npm\"; c.args[0] == \"publish\" }\nreasons contains \"no publishing from sandboxes\" if decision == \"deny\"\n".into(),
        };
        let set = PolicySet::new(std::slice::from_ref(&mine)).unwrap();
        let mut i = input(serde_json::json!([]));
        i["commands"] = serde_json::json!([{"program": "npm", "args": ["publish"]}]);
        let (v, parts) = set.decide(&i);
        assert_eq!(v, Verdict::Deny);
        assert!(
            parts
                .iter()
                .any(|p| p.reasons == ["no publishing from sandboxes"])
        );

        let broken = PolicySource {
            name: "broken".into(),
            rego: "package x\ndecision := ".into(),
        };
        assert!(PolicySet::new(&[broken]).is_err());
        let no_decision = PolicySource {
            name: "nodecision".into(),
            rego: "package y\nfoo := 1\n".into(),
        };
        let e = PolicySet::new(&[no_decision]).unwrap_err().to_string();
        assert!(e.contains("nodecision"), "{e}");
    }
}
