//! The Sandbox spec: one format for the CLI (`sandbox create -f`), the REST API and the
//! Kubernetes operator.
//!
//! ```yaml
//! apiVersion: sandbox.io/v1
//! kind: Sandbox
//! metadata:
//!   name: dev
//!   labels: {team: web}
//! spec:
//!   isolation: container
//!   image: host
//!   limits: {cpu: "2", memory: 4Gi, pids: 1024}
//!   rollback: {enabled: true, autoSnapshot: true}
//!   network: {mode: allow, allow: [pypi.org, "*.npmjs.org"], ports: ["8080:3000"]}
//!   healthcheck: {command: ["test -f /srv/ready"], interval: 10s, onUnhealthy: restart}
//!   idle: {after: 15m, action: freeze}
//! ```
//!
//! [`SandboxManifest::parse`] reads YAML or JSON and reports the offending field of a bad spec
//! (`spec.limits.memory: invalid quantity "4XB" ...`). [`Name`] validates sandbox names;
//! [`quantity`] parses sizes and CPU amounts.

pub mod alerts;
pub mod health;
pub mod network;
pub mod quantity;

pub use health::{HealthcheckSpec, IdleAction, IdleSpec, OnUnhealthy, ResolvedHealthcheck};
pub use network::{Cidr, NO_IPV6, NetRule, NetTarget, NetworkMode, NetworkSpec, PortMap};

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The only apiVersion understood.
pub const API_VERSION: &str = "sandbox.io/v1";
/// The only kind understood.
pub const KIND: &str = "Sandbox";

/// Errors of parsing and validating a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The text is not valid YAML or JSON.
    #[error("the spec is not valid YAML or JSON: {0}")]
    Syntax(String),
    /// A field has a bad value or is unknown.
    #[error("{field}: {message}")]
    Field {
        /// Dotted path of the field (`spec.limits.memory`).
        field: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

impl SpecError {
    pub(crate) fn field(field: &str, message: impl Into<String>) -> Self {
        Self::Field {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Quotes argv into shell text that parses back to the same words (how a command given as
/// a program and its arguments is shown and checked).
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A sandbox name: 1 to 63 characters of `a-z 0-9 . _ -`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// Longest accepted name.
    pub const MAX_LEN: usize = 63;

    /// Validates a name.
    pub fn new(s: &str) -> Result<Self, SpecError> {
        let bad = |msg: &str| SpecError::field("name", format!("{s:?} is not a valid name: {msg}"));
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if s.len() > Self::MAX_LEN {
            return Err(SpecError::field(
                "name",
                format!(
                    "a name has at most {} characters (this one has {})",
                    Self::MAX_LEN,
                    s.len()
                ),
            ));
        }
        if !s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        }) {
            return Err(bad("use only lowercase letters, digits, '-', '_' and '.'"));
        }
        if !s.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(bad("it must start with a letter or digit"));
        }
        Ok(Self(s.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Self, SpecError> {
        Self::new(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a sandbox is isolated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Namespaces, cgroups, seccomp (the native backend).
    #[default]
    Container,
    /// A virtual machine.
    Vm,
}

/// Resource limits (strings as in Kubernetes: `cpu: "1.5"` or `"500m"`, `memory: 2Gi`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// CPUs: `"2"`, `"0.5"`, `"500m"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory: `"512Mi"`, `"4Gi"`, `"1G"`, or bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Most processes and threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Most bytes the sandbox's writable layer may hold: `"10Gi"` (a btrfs qgroup limit;
    /// only on btrfs pools). Unset: no limit but the pool's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Default timeout of every exec: `"30s"`, `"5m"`, `"1h"` (an exec's own `--timeout`
    /// wins). Unset: execs run as long as they like.
    #[serde(
        default,
        rename = "execTimeout",
        skip_serializing_if = "Option::is_none"
    )]
    pub exec_timeout: Option<String>,
}

/// Snapshot behaviour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RollbackSpec {
    /// Snapshots are enabled (they always are; kept for the seed's format).
    #[serde(default)]
    pub enabled: bool,
    /// Take a snapshot before every exec.
    #[serde(default)]
    pub auto_snapshot: bool,
    /// Keep at most this many automatic snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
    /// Delete automatic snapshots older than this: `90s`, `30m`, `12h`, `7d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
}

impl RollbackSpec {
    /// `max_age` in seconds.
    pub fn max_age_seconds(&self) -> Result<Option<u64>, SpecError> {
        let Some(text) = &self.max_age else {
            return Ok(None);
        };
        let bad = || {
            SpecError::field(
                "spec.rollback.maxAge",
                format!(
                    "invalid duration {text:?}: use a number with s, m, h or d, such as 30m or 7d"
                ),
            )
        };
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let n: u64 = t[..split].parse().map_err(|_| bad())?;
        let unit = match &t[split..] {
            "s" | "" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(bad()),
        };
        match n.checked_mul(unit) {
            Some(0) | None => Err(bad()),
            Some(secs) => Ok(Some(secs)),
        }
    }
}

/// The `spec` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SandboxSpec {
    /// Isolation backend.
    #[serde(default)]
    pub isolation: Isolation,
    /// Image name or id; `host` (the default) uses the host's system directories read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Resource limits.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Snapshot behaviour.
    #[serde(default)]
    pub rollback: RollbackSpec,
    /// Network access: a mode (`none`, `allow`, `open`), egress rules and published ports
    /// (see [`network`]).
    #[serde(default)]
    pub network: NetworkSpec,
    /// Environment for every exec.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Default working directory of execs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Default user of execs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Hostname (defaults to the sandbox's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The sandbox's main process, started (checked like an exec) each time the sandbox
    /// starts, restarts or is rolled back: one element is shell text run by `/bin/sh -c`,
    /// several are a program and its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// A command the daemon runs now and then to tell whether the sandbox is healthy, and
    /// what it does when it is not (see [`health`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthcheckSpec>,
    /// What happens to the sandbox when nobody has used it for a while (see [`health`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleSpec>,
    /// Alert rules of this sandbox (see [`alerts`]); each given rule replaces the daemon's.
    #[serde(default, skip_serializing_if = "alerts::AlertsSpec::is_default")]
    pub alerts: alerts::AlertsSpec,
}

/// `metadata`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Sandbox name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A whole Sandbox document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SandboxManifest {
    /// Must be `sandbox.io/v1`.
    pub api_version: String,
    /// Must be `Sandbox`.
    pub kind: String,
    /// Name and labels.
    #[serde(default)]
    pub metadata: Metadata,
    /// The spec.
    #[serde(default)]
    pub spec: SandboxSpec,
}

/// Defaults applied to limits a spec leaves out.
pub const DEFAULT_MEMORY: u64 = 1 << 30;
/// Default CPU bandwidth: one CPU.
pub const DEFAULT_CPU_MILLIS: u64 = 1000;
/// Default process limit.
pub const DEFAULT_PIDS: u64 = 1024;
/// Least memory a sandbox may have: 4Mi.
pub const MIN_MEMORY: u64 = 4 << 20;
/// Most memory a sandbox may have: 1Ti (create and snapshot import refuse more).
pub const MAX_MEMORY: u64 = 1 << 40;
/// Least CPU bandwidth: 10m.
pub const MIN_CPU_MILLIS: u64 = 10;
/// Most CPU bandwidth: 1024 CPUs.
pub const MAX_CPU_MILLIS: u64 = 1024 * 1000;
/// Least processes: the init and one command.
pub const MIN_PIDS: u64 = 2;
/// Most processes: the kernel's own ceiling on pids (`PID_MAX_LIMIT`, 4194304).
pub const MAX_PIDS: u64 = 4 << 20;
/// Least disk quota: 16Mi (a smaller writable layer cannot even hold the overlay's metadata
/// and a shell's history reliably).
pub const MIN_DISK: u64 = 16 << 20;
/// Most disk quota: 1Pi.
pub const MAX_DISK: u64 = 1 << 50;
/// Least exec timeout: 1 ms.
pub const MIN_EXEC_TIMEOUT_MS: u64 = 1;
/// Most exec timeout: 30 days.
pub const MAX_EXEC_TIMEOUT_MS: u64 = 30 * 86_400_000;

/// Limits in numbers, after parsing and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedLimits {
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// CPU in thousandths.
    pub cpu_millis: u64,
    /// Process limit.
    pub pids: u64,
    /// Bytes the writable layer may hold (none: no quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// Default exec timeout in milliseconds (none: no timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_timeout_ms: Option<u64>,
}

impl SandboxManifest {
    /// Parses a YAML or JSON document and validates it.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let value: serde_json::Value = serde_saphyr::from_str(text)
            .map_err(|e| SpecError::Syntax(first_line(&e.to_string())))?;
        Self::from_value(value)
    }

    /// Validates an already-parsed JSON value.
    pub fn from_value(value: serde_json::Value) -> Result<Self, SpecError> {
        let m: SandboxManifest = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            SpecError::field(
                if path == "." { "spec" } else { &path },
                e.into_inner().to_string(),
            )
        })?;
        m.validate()?;
        Ok(m)
    }

    /// A manifest around a spec.
    pub fn new(name: Option<String>, spec: SandboxSpec) -> Self {
        Self {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: Metadata {
                name,
                labels: BTreeMap::new(),
            },
            spec,
        }
    }

    /// Checks every field's value.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.api_version != API_VERSION {
            return Err(SpecError::field(
                "apiVersion",
                format!(
                    "{:?} is not supported; use {API_VERSION:?}",
                    self.api_version
                ),
            ));
        }
        if self.kind != KIND {
            return Err(SpecError::field(
                "kind",
                format!("{:?} is not supported; use {KIND:?}", self.kind),
            ));
        }
        if let Some(n) = &self.metadata.name {
            Name::new(n).map_err(|e| match e {
                SpecError::Field { message, .. } => SpecError::field("metadata.name", message),
                other => other,
            })?;
        }
        for key in self.metadata.labels.keys() {
            if key.is_empty() || key.len() > 63 || key.contains(char::is_whitespace) {
                return Err(SpecError::field(
                    "metadata.labels",
                    format!("bad label key {key:?}"),
                ));
            }
        }
        self.spec.validate()
    }
}

impl SandboxSpec {
    /// Checks every field's value.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.isolation == Isolation::Vm {
            return Err(SpecError::field(
                "spec.isolation",
                "\"vm\" is not available in this build; use \"container\"",
            ));
        }
        self.resolved_limits()?;
        self.rollback.max_age_seconds()?;
        self.network.validate()?;
        if let Some(h) = &self.healthcheck {
            h.resolve()?;
        }
        if let Some(i) = &self.idle {
            i.after_ms()?;
        }
        self.alerts.resolve("spec.alerts")?;
        if !self.command.is_empty() && self.command[0].trim().is_empty() {
            return Err(SpecError::field(
                "spec.command",
                "the first element is empty: give shell text, or a program and its arguments",
            ));
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(SpecError::field("spec.command", "contains a NUL byte"));
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(SpecError::field(
                    "spec.env",
                    format!("bad variable name {key:?}"),
                ));
            }
        }
        if let Some(w) = &self.workdir
            && !w.starts_with('/')
        {
            return Err(SpecError::field(
                "spec.workdir",
                format!("{w:?} must be an absolute path"),
            ));
        }
        if let Some(h) = &self.hostname
            && (h.is_empty()
                || h.len() > 63
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
        {
            return Err(SpecError::field(
                "spec.hostname",
                format!("{h:?} is not a valid hostname"),
            ));
        }
        if let Some(img) = &self.image
            && img.trim().is_empty()
        {
            return Err(SpecError::field("spec.image", "empty image name"));
        }
        Ok(())
    }

    /// Limits in numbers, with defaults for what is left out.
    pub fn resolved_limits(&self) -> Result<ResolvedLimits, SpecError> {
        let memory_bytes = match &self.limits.memory {
            Some(m) => {
                quantity::parse_bytes(m).map_err(|e| SpecError::field("spec.limits.memory", e))?
            }
            None => DEFAULT_MEMORY,
        };
        if memory_bytes < MIN_MEMORY {
            return Err(SpecError::field(
                "spec.limits.memory",
                "at least 4Mi is needed to run anything",
            ));
        }
        if memory_bytes > MAX_MEMORY {
            return Err(SpecError::field(
                "spec.limits.memory",
                format!(
                    "{} is more than a sandbox may have: give 4Mi to 1Ti",
                    self.limits.memory.as_deref().unwrap_or_default()
                ),
            ));
        }
        let cpu_millis = match &self.limits.cpu {
            Some(c) => {
                quantity::parse_cpu_millis(c).map_err(|e| SpecError::field("spec.limits.cpu", e))?
            }
            None => DEFAULT_CPU_MILLIS,
        };
        if cpu_millis < MIN_CPU_MILLIS {
            return Err(SpecError::field(
                "spec.limits.cpu",
                "at least 10m (a hundredth of a CPU) is needed",
            ));
        }
        if cpu_millis > MAX_CPU_MILLIS {
            return Err(SpecError::field(
                "spec.limits.cpu",
                format!(
                    "{} is more than a sandbox may have: give 10m to 1024",
                    self.limits.cpu.as_deref().unwrap_or_default()
                ),
            ));
        }
        let pids = self.limits.pids.unwrap_or(DEFAULT_PIDS);
        if pids < MIN_PIDS {
            return Err(SpecError::field(
                "spec.limits.pids",
                "at least 2 processes are needed (the init and one command)",
            ));
        }
        if pids > MAX_PIDS {
            return Err(SpecError::field(
                "spec.limits.pids",
                format!("{pids} is more than a sandbox may have: give 2 to {MAX_PIDS}"),
            ));
        }
        let disk_bytes = match &self.limits.disk {
            Some(d) => Some(parse_disk(d).map_err(|e| SpecError::field("spec.limits.disk", e))?),
            None => None,
        };
        let exec_timeout_ms = match &self.limits.exec_timeout {
            Some(t) => Some(
                parse_exec_timeout(t)
                    .map_err(|e| SpecError::field("spec.limits.execTimeout", e))?,
            ),
            None => None,
        };
        Ok(ResolvedLimits {
            memory_bytes,
            cpu_millis,
            pids,
            disk_bytes,
            exec_timeout_ms,
        })
    }

    /// The image to use.
    pub fn image_ref(&self) -> &str {
        self.image.as_deref().unwrap_or("host")
    }
}

/// A disk quota in bytes, in range ([`MIN_DISK`] to [`MAX_DISK`]).
pub fn parse_disk(text: &str) -> Result<u64, String> {
    let bytes = quantity::parse_bytes(text)?;
    if !(MIN_DISK..=MAX_DISK).contains(&bytes) {
        return Err(format!(
            "{text} is out of range: give 16Mi to 1Pi (or leave it out for no quota)"
        ));
    }
    Ok(bytes)
}

/// An exec timeout in milliseconds, in range (1ms to 30 days).
pub fn parse_exec_timeout(text: &str) -> Result<u64, String> {
    let ms = quantity::parse_duration_ms(text)?;
    if !(MIN_EXEC_TIMEOUT_MS..=MAX_EXEC_TIMEOUT_MS).contains(&ms) {
        return Err(format!("{text} is out of range: give 1ms to 30d"));
    }
    Ok(ms)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "
apiVersion: sandbox.io/v1
kind: Sandbox
metadata:
  name: dev-environment
spec:
  isolation: container
  limits:
    cpu: \"2\"
    memory: \"4Gi\"
  rollback:
    enabled: true
    autoSnapshot: true
";

    #[test]
    fn seed_spec_parses() {
        let m = SandboxManifest::parse(SEED).unwrap();
        assert_eq!(m.metadata.name.as_deref(), Some("dev-environment"));
        assert!(m.spec.rollback.auto_snapshot);
        let l = m.spec.resolved_limits().unwrap();
        assert_eq!(
            (l.cpu_millis, l.memory_bytes, l.pids),
            (2000, 4 << 30, DEFAULT_PIDS)
        );
    }

    #[test]
    fn json_is_accepted() {
        let m = SandboxManifest::parse(r#"{"apiVersion":"sandbox.io/v1","kind":"Sandbox","spec":{"limits":{"memory":"64Mi"}}}"#)
            .unwrap();
        assert_eq!(m.spec.resolved_limits().unwrap().memory_bytes, 64 << 20);
    }

    #[test]
    fn bad_fields_are_named() {
        let bad = SEED.replace("4Gi", "4XB");
        let e = SandboxManifest::parse(&bad).unwrap_err().to_string();
        assert!(e.starts_with("spec.limits.memory:"), "{e}");
        let typo = SEED.replace("autoSnapshot", "autoSnapshto");
        let e = SandboxManifest::parse(&typo).unwrap_err().to_string();
        assert!(
            e.contains("spec.rollback") && e.contains("autoSnapshto"),
            "{e}"
        );
        let e = SandboxManifest::parse(&SEED.replace("container", "vm"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("spec.isolation"), "{e}");
        let e = SandboxManifest::parse(&SEED.replace("sandbox.io/v1", "v2"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("apiVersion"), "{e}");
        let e = SandboxManifest::parse("a: [").unwrap_err();
        assert!(matches!(e, SpecError::Syntax(_)));
        let e = SandboxManifest::parse(&SEED.replace("dev-environment", "Bad/Name"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("metadata.name"), "{e}");
    }

    #[test]
    fn limits_have_a_range() {
        let spec = |limits: &str| {
            SandboxManifest::parse(&format!(
                r#"{{"apiVersion":"sandbox.io/v1","kind":"Sandbox","spec":{{"limits":{limits}}}}}"#
            ))
        };
        for (limits, field) in [
            (r#"{"memory":"512Ti"}"#, "spec.limits.memory:"),
            (r#"{"memory":"1025Gi"}"#, "spec.limits.memory:"),
            (r#"{"cpu":"1025"}"#, "spec.limits.cpu:"),
            (r#"{"pids":4194305}"#, "spec.limits.pids:"),
            (r#"{"pids":18446744073709551615}"#, "spec.limits.pids:"),
        ] {
            let e = spec(limits).unwrap_err().to_string();
            assert!(e.starts_with(field) && e.contains(" to "), "{limits}: {e}");
        }
        for limits in [
            r#"{"memory":"1Ti","cpu":"1024","pids":4194304}"#,
            r#"{"memory":"4Mi","cpu":"10m","pids":2}"#,
        ] {
            spec(limits).unwrap();
        }
    }

    #[test]
    fn names() {
        assert!(Name::new("dev").is_ok());
        assert!(Name::new("a.b_c-1").is_ok());
        assert!(Name::new("").is_err());
        assert!(Name::new("a/b").is_err());
        assert!(Name::new("-a").is_err());
        assert!(Name::new("Dev").is_err());
        let long = "a".repeat(300);
        let e = Name::new(&long).unwrap_err().to_string();
        assert!(e.contains("63"), "{e}");
        assert!(Name::new(&"a".repeat(63)).is_ok());
    }
}
