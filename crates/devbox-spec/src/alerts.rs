//! Alert rules (`spec.alerts`, and the daemon's global rules in the same shape): when a
//! sandbox's memory or disk use passes a share of its limit, an exec runs longer than a
//! time, too many commands are denied within a window, or its health check says unhealthy.
//!
//! ```yaml
//! alerts:
//!   memory: 90%            # of limits.memory
//!   disk: 80%              # of limits.disk (sandboxes with a quota)
//!   execDuration: 10m      # an exec still running after this long
//!   deniedCommands: {count: 5, within: 10m}
//!   unhealthy: true        # the health check reports unhealthy
//! ```

use serde::{Deserialize, Serialize};

use crate::SpecError;

/// Denied commands: `count` within `within`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeniedCommandsRule {
    /// How many denied commands fire the alert (at least 1).
    pub count: u32,
    /// Within how long: `30s`, `10m`, `1h` (at most 1 day).
    pub within: String,
}

/// `alerts`: each rule is off unless given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AlertsSpec {
    /// Memory use above this share of the memory limit: `90%` (or `0.9`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Disk use above this share of the disk quota: `80%` (or `0.8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// An exec running longer than this: `30s`, `10m`, `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_duration: Option<String>,
    /// Too many denied commands within a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied_commands: Option<DeniedCommandsRule>,
    /// Fires while the health check reports unhealthy (`false` turns a global rule off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<bool>,
}

/// Alert rules in numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AlertRules {
    /// Share of the memory limit (0 < x <= 1).
    pub memory_share: Option<f64>,
    /// Share of the disk quota (0 < x <= 1).
    pub disk_share: Option<f64>,
    /// Milliseconds an exec may run.
    pub exec_duration_ms: Option<u64>,
    /// (count, window in milliseconds).
    pub denied_commands: Option<(u32, u64)>,
    /// Unhealthy fires.
    pub unhealthy: bool,
}

impl AlertRules {
    /// Whether no rule is on.
    pub fn is_empty(&self) -> bool {
        *self == AlertRules::default()
    }

    /// These rules with `over`'s rules in place of those it gives (a sandbox's over the
    /// daemon's).
    pub fn overridden_by(&self, over: &AlertsSpec) -> Result<AlertRules, SpecError> {
        let o = over.resolve("spec.alerts")?;
        Ok(AlertRules {
            memory_share: if over.memory.is_some() {
                o.memory_share
            } else {
                self.memory_share
            },
            disk_share: if over.disk.is_some() {
                o.disk_share
            } else {
                self.disk_share
            },
            exec_duration_ms: if over.exec_duration.is_some() {
                o.exec_duration_ms
            } else {
                self.exec_duration_ms
            },
            denied_commands: if over.denied_commands.is_some() {
                o.denied_commands
            } else {
                self.denied_commands
            },
            unhealthy: over.unhealthy.unwrap_or(self.unhealthy),
        })
    }
}

/// The longest window of `deniedCommands`.
pub const MAX_DENIED_WINDOW_MS: u64 = 86_400_000;

fn share(field: &str, text: &str) -> Result<f64, SpecError> {
    let t = text.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| SpecError::field(field, format!("{text:?} is not a share: give 90% or 0.9")))?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(SpecError::field(
            field,
            format!("{text:?} is out of range: give more than 0% and at most 100%"),
        ));
    }
    Ok(v)
}

impl AlertsSpec {
    /// Whether no rule is given.
    pub fn is_default(&self) -> bool {
        *self == AlertsSpec::default()
    }

    /// Parses every rule; `at` names the section in errors (`spec.alerts`, `alerts`).
    pub fn resolve(&self, at: &str) -> Result<AlertRules, SpecError> {
        let memory_share = self
            .memory
            .as_deref()
            .map(|t| share(&format!("{at}.memory"), t))
            .transpose()?;
        let disk_share = self
            .disk
            .as_deref()
            .map(|t| share(&format!("{at}.disk"), t))
            .transpose()?;
        let exec_duration_ms = self
            .exec_duration
            .as_deref()
            .map(|t| {
                crate::parse_exec_timeout(t)
                    .map_err(|e| SpecError::field(&format!("{at}.execDuration"), e))
            })
            .transpose()?;
        let denied_commands = match &self.denied_commands {
            None => None,
            Some(r) => {
                let field = format!("{at}.deniedCommands");
                if r.count == 0 {
                    return Err(SpecError::field(
                        &format!("{field}.count"),
                        "give at least 1",
                    ));
                }
                let ms = crate::quantity::parse_duration_ms(&r.within)
                    .map_err(|e| SpecError::field(&format!("{field}.within"), e))?;
                if ms == 0 || ms > MAX_DENIED_WINDOW_MS {
                    return Err(SpecError::field(
                        &format!("{field}.within"),
                        format!("{:?} is out of range: give 1s to 1d", r.within),
                    ));
                }
                Some((r.count, ms))
            }
        };
        Ok(AlertRules {
            memory_share,
            disk_share,
            exec_duration_ms,
            denied_commands,
            unhealthy: self.unhealthy.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_override() {
        let global = AlertsSpec {
            memory: Some("90%".into()),
            exec_duration: Some("10m".into()),
            unhealthy: Some(true),
            ..Default::default()
        }
        .resolve("alerts")
        .unwrap();
        assert_eq!(global.memory_share, Some(0.9));
        assert_eq!(global.exec_duration_ms, Some(600_000));
        let own = AlertsSpec {
            memory: Some("0.5".into()),
            denied_commands: Some(DeniedCommandsRule {
                count: 3,
                within: "1m".into(),
            }),
            unhealthy: Some(false),
            ..Default::default()
        };
        let r = global.overridden_by(&own).unwrap();
        assert_eq!(r.memory_share, Some(0.5));
        assert_eq!(r.exec_duration_ms, Some(600_000));
        assert_eq!(r.denied_commands, Some((3, 60_000)));
        assert!(!r.unhealthy);
        assert!(AlertsSpec::default().resolve("x").unwrap().is_empty());
    }

    #[test]
    fn bad_rules_are_refused_with_their_field() {
        for (spec, field) in [
            (
                AlertsSpec {
                    memory: Some("150%".into()),
                    ..Default::default()
                },
                "spec.alerts.memory",
            ),
            (
                AlertsSpec {
                    disk: Some("lots".into()),
                    ..Default::default()
                },
                "spec.alerts.disk",
            ),
            (
                AlertsSpec {
                    exec_duration: Some("0s".into()),
                    ..Default::default()
                },
                "spec.alerts.execDuration",
            ),
            (
                AlertsSpec {
                    denied_commands: Some(DeniedCommandsRule {
                        count: 0,
                        within: "1m".into(),
                    }),
                    ..Default::default()
                },
                "spec.alerts.deniedCommands.count",
            ),
            (
                AlertsSpec {
                    denied_commands: Some(DeniedCommandsRule {
                        count: 1,
                        within: "2d".into(),
                    }),
                    ..Default::default()
                },
                "spec.alerts.deniedCommands.within",
            ),
        ] {
            let e = spec.resolve("spec.alerts").unwrap_err().to_string();
            assert!(e.starts_with(field), "{e}");
        }
    }
}
