//! Command checks: shell text parsed into typed commands ([`parse`]), built-in rules that
//! find risky commands ([`rules`]), and Rego policies that decide ([`policy`]).
//!
//! This is a guardrail against accidents and obvious abuse, not a security boundary: the
//! sandbox's isolation is the boundary. Anything the parser cannot resolve statically
//! (a variable set at run time, a script file's contents) is invisible to it.

pub mod input;
pub mod parse;
pub mod policy;
pub mod rules;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use parse::{Invocation, Parsed};
pub use policy::{PolicyError, PolicySet, PolicySource, PolicyVerdict, Verdict};
pub use rules::{Finding, Risk};

/// Who and what a check is about (besides the text).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CheckContext {
    /// The sandbox's name.
    pub sandbox: String,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its spec (JSON).
    pub spec: serde_json::Value,
    /// Who asks.
    pub actor: String,
}

/// The outcome of a check.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
    let findings = rules::check(&parsed);
    let risk = findings.iter().map(|f| f.risk).max().unwrap_or(Risk::None);
    let input = input::build(text, &parsed, &findings, risk, ctx);
    let (decision, verdicts) = policies.decide_value(&input);
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
