//! Command checks: shell text parsed into typed commands ([`parse`]), built-in rules that
//! find risky commands ([`rules`]), and Rego policies that decide ([`policy`]).
//!
//! This is a guardrail against accidents and obvious abuse, not a security boundary: the
//! sandbox's isolation is the boundary. Anything the parser cannot resolve statically
//! (a variable set at run time, a script file's contents) is invisible to it.

pub mod input;
pub mod network;
pub mod parse;
pub mod policy;
pub mod rules;

use serde::{Deserialize, Serialize};

pub use parse::{Invocation, Parsed};
pub use policy::{PolicyError, PolicySet, PolicySource, PolicyVerdict, Verdict};
pub use rules::{Finding, Risk};

/// Who and what a check is about (besides the text).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckContext {
    /// The sandbox's name.
    pub sandbox: String,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its spec (JSON).
    pub spec: serde_json::Value,
    /// Its network in force (JSON): `mode` (`none`, `allow`, `open`), `allow` and `deny`
    /// (the rules with live changes, as text: `pypi.org`, `*.npmjs.org`, `10.0.0.0/8:443`),
    /// `ports`.
    #[serde(default)]
    pub network: serde_json::Value,
    /// Who asks.
    pub actor: String,
}

/// The outcome of a check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    /// What to do.
    pub decision: Verdict,
    /// The highest risk found.
    pub risk: Risk,
    /// Why: the policies' reasons.
    pub reasons: Vec<String>,
    /// Every rule that matched.
    pub findings: Vec<Finding>,
    /// The commands found in the text.
    pub commands: Vec<Invocation>,
    /// Each policy's decision.
    pub policies: Vec<PolicyVerdict>,
}

/// Parses `text`, runs the rules and the policies.
pub fn check(text: &str, ctx: &CheckContext, policies: &PolicySet) -> Check {
    let parsed = parse::parse(text);
    let mut findings = rules::check(&parsed);
    findings.extend(network::check(&parsed, &ctx.network));
    let risk = findings.iter().map(|f| f.risk).max().unwrap_or(Risk::None);
    let (decision, verdicts) = if policies.builtin_only() {
        let v = policy::default_decision(&findings, &parsed.errors);
        (v.decision, vec![v])
    } else {
        let input = input::build(
            text,
            &parsed,
            &findings,
            risk,
            ctx,
            policies.reads_commands(),
        );
        policies.decide_value(&input)
    };
    let mut reasons: Vec<String> = verdicts
        .iter()
        .filter(|v| v.decision == decision)
        .flat_map(|v| v.reasons.clone())
        .collect();
    reasons.dedup();
    Check {
        decision,
        risk,
        reasons,
        findings,
        commands: parsed.invocations,
        policies: verdicts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default policy does not read the commands, so they are left out of its input;
    /// a policy that reads them gets them.
    #[test]
    fn policies_that_read_commands_see_them() {
        let ctx = CheckContext::default();
        let default = PolicySet::new(&[]).unwrap();
        assert!(!default.reads_commands());
        assert_eq!(
            check("npm publish", &ctx, &default).decision,
            Verdict::Allow
        );
        let no_publish = PolicySet::new(&[PolicySource {
            name: "no_publish".into(),
            rego: "package devbox.no_publish\nimport rego.v1\ndefault decision := \"allow\"\n\
                   decision := \"deny\" if { some c in input.commands; c.program == \"npm\"; c.args[0] == \"publish\" }\n"
                .into(),
        }])
        .unwrap();
        assert!(no_publish.reads_commands());
        let c = check("cd /work && sudo npm publish", &ctx, &no_publish);
        assert_eq!(c.decision, Verdict::Deny);
        assert_eq!(c.commands.len(), 2);
    }
}
