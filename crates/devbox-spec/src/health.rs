//! `spec.healthcheck` and `spec.idle`: a command the daemon runs now and then to tell whether
//! the sandbox is healthy (and what to do when it is not), and what happens to a sandbox
//! nobody uses.
//!
//! ```yaml
//! spec:
//!   healthcheck: {command: [test, -f, /srv/ready], interval: 10s, timeout: 5s, retries: 3,
//!                 startPeriod: 0s, onUnhealthy: restart}
//!   idle: {after: 15m, action: freeze}
//! ```

use serde::{Deserialize, Serialize};

use crate::SpecError;
use crate::quantity::parse_duration_ms;

/// Least interval between two health checks: 100 ms.
pub const MIN_HEALTH_INTERVAL_MS: u64 = 100;
/// Most interval, timeout, start period and idle time: 30 days.
pub const MAX_HEALTH_DURATION_MS: u64 = 30 * 86_400_000;
/// Least time before an idle sandbox is frozen or stopped: 100 ms.
pub const MIN_IDLE_AFTER_MS: u64 = 100;
/// Most consecutive failures a check may ask for.
pub const MAX_HEALTH_RETRIES: u32 = 1000;

/// What the daemon does when a sandbox turns unhealthy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnhealthy {
    /// Nothing but recording it.
    #[default]
    None,
    /// Stop the sandbox and start it again.
    Restart,
    /// Roll back to the newest snapshot taken while it was healthy.
    Rollback,
}

/// `spec.healthcheck`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthcheckSpec {
    /// The check: one element is shell text run by `/bin/sh -c`, several are a program and
    /// its arguments. Exit code 0 is a success.
    pub command: Vec<String>,
    /// Time between two checks (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// A check running longer is killed and fails (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Consecutive failures that make the sandbox unhealthy (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Time after a start during which failures do not count (default 0s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period: Option<String>,
    /// What to do when the sandbox turns unhealthy (default none).
    #[serde(default)]
    pub on_unhealthy: OnUnhealthy,
}

/// A health check in numbers, after parsing and defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedHealthcheck {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// The command's text (as checked and shown).
    pub text: String,
    /// Milliseconds between checks.
    pub interval_ms: u64,
    /// Milliseconds a check may run.
    pub timeout_ms: u64,
    /// Consecutive failures that make the sandbox unhealthy.
    pub retries: u32,
    /// Milliseconds after a start during which failures do not count.
    pub start_period_ms: u64,
    /// What to do when the sandbox turns unhealthy.
    pub on_unhealthy: OnUnhealthy,
}

fn duration(field: &str, text: Option<&str>, default: u64, min: u64) -> Result<u64, SpecError> {
    let Some(text) = text else {
        return Ok(default);
    };
    let ms = parse_duration_ms(text).map_err(|e| SpecError::field(field, e))?;
    if !(min..=MAX_HEALTH_DURATION_MS).contains(&ms) {
        return Err(SpecError::field(
            field,
            format!(
                "{text} is out of range: give {} to 30d",
                crate::quantity::format_duration_ms(min)
            ),
        ));
    }
    Ok(ms)
}

impl HealthcheckSpec {
    /// Checks the values and applies the defaults.
    pub fn resolve(&self) -> Result<ResolvedHealthcheck, SpecError> {
        const F: &str = "spec.healthcheck";
        let (argv, text) = match self.command.as_slice() {
            [] => {
                return Err(SpecError::field(
                    "spec.healthcheck.command",
                    "give the check: shell text, or a program and its arguments",
                ));
            }
            [text] => (
                vec!["/bin/sh".to_string(), "-c".to_string(), text.clone()],
                text.clone(),
            ),
            argv => (argv.to_vec(), crate::shell_join(argv)),
        };
        if self.command[0].trim().is_empty() {
            return Err(SpecError::field(
                "spec.healthcheck.command",
                "the first element is empty: give shell text, or a program and its arguments",
            ));
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(SpecError::field(
                "spec.healthcheck.command",
                "contains a NUL byte",
            ));
        }
        let interval_ms = duration(
            &format!("{F}.interval"),
            self.interval.as_deref(),
            10_000,
            MIN_HEALTH_INTERVAL_MS,
        )?;
        let timeout_ms = duration(&format!("{F}.timeout"), self.timeout.as_deref(), 5_000, 1)?;
        let start_period_ms = duration(
            &format!("{F}.startPeriod"),
            self.start_period.as_deref(),
            0,
            0,
        )?;
        let retries = self.retries.unwrap_or(3);
        if !(1..=MAX_HEALTH_RETRIES).contains(&retries) {
            return Err(SpecError::field(
                &format!("{F}.retries"),
                format!("{retries} is out of range: give 1 to {MAX_HEALTH_RETRIES}"),
            ));
        }
        Ok(ResolvedHealthcheck {
            argv,
            text,
            interval_ms,
            timeout_ms,
            retries,
            start_period_ms,
            on_unhealthy: self.on_unhealthy,
        })
    }
}

/// What happens to an idle sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdleAction {
    /// Freeze its processes (the cgroup freezer); the next exec thaws it.
    #[default]
    Freeze,
    /// Stop it; the next exec starts it.
    Stop,
}

/// `spec.idle`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IdleSpec {
    /// Time without an exec, an attached session or a published-port connection after which
    /// the sandbox is idle: `15m`, `500ms`.
    pub after: String,
    /// What happens then (default freeze).
    #[serde(default)]
    pub action: IdleAction,
}

impl IdleSpec {
    /// `after` in milliseconds, in range.
    pub fn after_ms(&self) -> Result<u64, SpecError> {
        duration("spec.idle.after", Some(&self.after), 0, MIN_IDLE_AFTER_MS)
    }
}

#[cfg(test)]
mod tests {
    use crate::SandboxManifest;

    use super::*;

    fn spec(body: &str) -> Result<SandboxManifest, SpecError> {
        SandboxManifest::parse(&format!(
            "apiVersion: sandbox.io/v1\nkind: Sandbox\nspec:\n{body}"
        ))
    }

    #[test]
    fn healthcheck_defaults_and_fields() {
        let m = spec("  healthcheck: {command: ['test -f /ok']}\n").unwrap();
        let h = m.spec.healthcheck.unwrap().resolve().unwrap();
        assert_eq!(h.argv, ["/bin/sh", "-c", "test -f /ok"]);
        assert_eq!(
            (h.interval_ms, h.timeout_ms, h.retries, h.start_period_ms),
            (10_000, 5_000, 3, 0)
        );
        assert_eq!(h.on_unhealthy, OnUnhealthy::None);
        let m = spec(
            "  healthcheck: {command: [test, -f, /a b], interval: 500ms, timeout: 1s, retries: 1, startPeriod: 2s, onUnhealthy: rollback}\n",
        )
        .unwrap();
        let h = m.spec.healthcheck.unwrap().resolve().unwrap();
        assert_eq!(h.text, "test -f '/a b'");
        assert_eq!(
            (h.interval_ms, h.timeout_ms, h.retries, h.start_period_ms),
            (500, 1000, 1, 2000)
        );
        assert_eq!(h.on_unhealthy, OnUnhealthy::Rollback);
    }

    #[test]
    fn bad_healthchecks_are_named() {
        for (body, field) in [
            ("{command: []}", "spec.healthcheck.command"),
            ("{command: ['  ']}", "spec.healthcheck.command"),
            (
                "{command: [a], interval: 10ms}",
                "spec.healthcheck.interval",
            ),
            ("{command: [a], timeout: 1x}", "spec.healthcheck.timeout"),
            ("{command: [a], retries: 0}", "spec.healthcheck.retries"),
            (
                "{command: [a], startPeriod: 31d}",
                "spec.healthcheck.startPeriod",
            ),
            (
                "{command: [a], onUnhealthy: reboot}",
                "spec.healthcheck.onUnhealthy",
            ),
            ("{command: [a], retrys: 2}", "spec.healthcheck"),
        ] {
            let e = spec(&format!("  healthcheck: {body}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(field), "{body}: {e}");
        }
    }

    #[test]
    fn idle() {
        let m = spec("  idle: {after: 500ms}\n").unwrap();
        let idle = m.spec.idle.unwrap();
        assert_eq!(idle.after_ms().unwrap(), 500);
        assert_eq!(idle.action, IdleAction::Freeze);
        let m = spec("  idle: {after: 15m, action: stop}\n").unwrap();
        assert_eq!(m.spec.idle.unwrap().action, IdleAction::Stop);
        for body in [
            "{after: 1ms}",
            "{after: soon}",
            "{action: stop}",
            "{after: 1s, action: nap}",
        ] {
            let e = spec(&format!("  idle: {body}\n")).unwrap_err().to_string();
            assert!(e.starts_with("spec.idle"), "{body}: {e}");
        }
    }

    #[test]
    fn old_specs_have_neither() {
        let m = spec("  limits: {memory: 64Mi}\n").unwrap();
        assert!(m.spec.healthcheck.is_none() && m.spec.idle.is_none());
        let text = serde_json::to_string(&m).unwrap();
        assert!(
            !text.contains("healthcheck") && !text.contains("idle"),
            "{text}"
        );
    }
}
