//! The labelled corpus: precision and recall of the checks with the default policy.

use devbox_safety::{CheckContext, PolicySet, Verdict, check};

#[test]
fn corpus_precision_and_recall() {
    let text = include_str!("corpus.tsv");
    let policies = PolicySet::new(&[]).unwrap();
    let ctx = CheckContext {
        sandbox: "corpus".into(),
        actor: "test".into(),
        ..Default::default()
    };
    let (mut tp, mut fp, mut tn, mut fn_) = (0usize, 0usize, 0usize, 0usize);
    let mut misses = Vec::new();
    let mut false_alarms = Vec::new();
    let mut denied_benign = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (label, command) = line.split_once('\t').expect("label<TAB>command");
        let command = command.replace("\\n", "\n");
        let result = check(&command, &ctx, &policies);
        let flagged = result.decision != Verdict::Allow;
        match (label, flagged) {
            ("D", true) => tp += 1,
            ("D", false) => {
                fn_ += 1;
                misses.push(command.clone());
            }
            ("B", true) => {
                fp += 1;
                false_alarms.push(format!("{command}  <- {:?}", result.reasons));
                if result.decision == Verdict::Deny {
                    denied_benign.push(command.clone());
                }
            }
            ("B", false) => tn += 1,
            other => panic!("bad label {other:?}"),
        }
    }
    let total = tp + fp + tn + fn_;
    let precision = tp as f64 / (tp + fp).max(1) as f64;
    let recall = tp as f64 / (tp + fn_).max(1) as f64;
    println!(
        "corpus: {total} commands ({} dangerous, {} benign)",
        tp + fn_,
        tn + fp
    );
    println!("precision {precision:.3}  recall {recall:.3}  (tp {tp}, fp {fp}, tn {tn}, fn {fn_})");
    for m in &misses {
        println!("missed: {m}");
    }
    for f in &false_alarms {
        println!("false alarm: {f}");
    }
    assert!(
        total >= 300,
        "the corpus has {total} commands; it needs at least 300"
    );
    assert!(
        denied_benign.is_empty(),
        "benign commands denied: {denied_benign:?}"
    );
    assert!(recall >= 0.97, "recall {recall:.3}; missed: {misses:?}");
    assert!(
        precision >= 0.97,
        "precision {precision:.3}; false alarms: {false_alarms:?}"
    );
}

/// The built-in default policy is decided natively when it is the only policy; over the
/// whole corpus (and texts that do not parse), that decision and its reasons are the Rego
/// policy's.
#[test]
fn native_default_matches_the_rego_policy() {
    use devbox_safety::{Risk, input, parse, policy, rules};
    let policies = PolicySet::new(&[]).unwrap();
    assert!(policies.builtin_only());
    let ctx = CheckContext::default();
    let mut texts: Vec<String> = include_str!("corpus.tsv")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_once('\t').unwrap().1.replace("\\n", "\n"))
        .collect();
    texts.extend(
        [
            "if then fi ((",
            "echo $(( ",
            "rm -rf / ; cat ~/.ssh/id_rsa",
            "'unterminated",
        ]
        .map(String::from),
    );
    let (mut denied, mut approval) = (0, 0);
    for text in &texts {
        let parsed = parse::parse(text);
        let findings = rules::check(&parsed);
        let risk = findings.iter().map(|f| f.risk).max().unwrap_or(Risk::None);
        let native = policy::default_decision(&findings, &parsed.errors);
        let (decision, verdicts) =
            policies.decide_value(&input::build(text, &parsed, &findings, risk, &ctx, false));
        assert_eq!(native.decision, decision, "{text}");
        assert_eq!(vec![native.clone()], verdicts, "{text}");
        denied += usize::from(decision == Verdict::Deny);
        approval += usize::from(decision == Verdict::RequireApproval);
    }
    assert!(
        denied > 50 && approval > 20,
        "{denied} denied, {approval} approvals"
    );
}
