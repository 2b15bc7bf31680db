//! The schema of the Sandbox document ([`devbox_spec::SandboxManifest`]) and of the limits
//! in force ([`devbox_spec::ResolvedLimits`]) in the OpenAPI document.
//!
//! These types describe the spec crate's types for the document only (fields of the wire
//! model name them with `#[schema(value_type = ...)]`); nothing builds them. They mirror the
//! spec crate's fields and serde attributes: change both together.

use std::collections::BTreeMap;

use utoipa::ToSchema;

/// How a sandbox is isolated.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Namespaces, cgroups, seccomp (the native backend).
    Container,
    /// A virtual machine.
    Vm,
}

/// Network access of a sandbox.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Loopback only: the network is closed (published ports still reach it).
    None,
    /// Egress only to the allowed names, networks and ports.
    Allow,
    /// Egress anywhere but the denied names and networks.
    Open,
}

/// `spec.network`: a bare mode (`none`, the older form) or the whole object.
#[derive(ToSchema)]
#[serde(untagged)]
pub enum Network {
    /// Just the mode.
    Mode(NetworkMode),
    /// Mode, rules and ports.
    Spec(NetworkSpec),
}

/// Mode, egress rules and published ports.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// none (loopback only), allow (only what `allow` lists) or open (all but `deny`).
    #[serde(default)]
    pub mode: NetworkMode,
    /// Egress allowed in mode `allow`: `pypi.org`, `*.npmjs.org`, `10.1.2.0/24`,
    /// `10.1.2.0/24:443`, `example.com:443`, `[2001:db8::/32]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Egress refused (modes allow and open), also where an allow rule matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Published TCP ports: `8080:3000`, `127.0.0.1:8080:3000`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
}

/// Resource limits (strings as in Kubernetes: `cpu: "1.5"` or `"500m"`, `memory: 2Gi`).
#[derive(ToSchema)]
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
    /// Most bytes the writable layer may hold: `"10Gi"` (btrfs pools only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Default timeout of every exec: `"30s"`, `"5m"`.
    #[serde(
        default,
        rename = "execTimeout",
        skip_serializing_if = "Option::is_none"
    )]
    pub exec_timeout: Option<String>,
}

/// Snapshot behaviour.
#[derive(ToSchema)]
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

/// The `spec` section.
#[derive(ToSchema)]
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
    /// Network access.
    #[serde(default)]
    pub network: Network,
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
    /// Alert rules; each given rule replaces the daemon's global one.
    #[serde(default)]
    pub alerts: AlertsSpec,
    /// A command the daemon runs now and then to tell whether the sandbox is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthcheckSpec>,
    /// What happens to the sandbox when nobody has used it for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleSpec>,
}

/// What the daemon does when a sandbox turns unhealthy.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnUnhealthy {
    /// Nothing but recording it.
    None,
    /// Stop the sandbox and start it again.
    Restart,
    /// Roll back to the newest snapshot taken while it was healthy.
    Rollback,
}

/// `spec.healthcheck`.
#[derive(ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthcheckSpec {
    /// The check: one element is shell text run by `/bin/sh -c`, several are a program and
    /// its arguments. Exit code 0 is a success.
    pub command: Vec<String>,
    /// Time between two checks (default 10s; at least 100ms).
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

/// What happens to an idle sandbox.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IdleAction {
    /// Freeze its processes; the next exec thaws it.
    Freeze,
    /// Stop it; the next exec starts it.
    Stop,
}

/// `spec.idle`.
#[derive(ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IdleSpec {
    /// Time without an exec, an attached session or a published-port connection after which
    /// the sandbox is idle: `15m`, `500ms` (at least 100ms).
    pub after: String,
    /// What happens then (default freeze).
    #[serde(default)]
    pub action: IdleAction,
}

/// `deniedCommands`: `count` denied commands within `within`.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeniedCommandsRule {
    /// How many (at least 1).
    pub count: u32,
    /// Within how long: `30s`, `10m`, `1h` (at most 1d).
    pub within: String,
}

/// `alerts`: each rule is off unless given.
#[derive(ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AlertsSpec {
    /// Memory use above this share of the memory limit: `90%` or `0.9`.
    pub memory: Option<String>,
    /// Disk use above this share of the disk quota: `80%` or `0.8`.
    pub disk: Option<String>,
    /// An exec running longer than this: `30s`, `10m`.
    pub exec_duration: Option<String>,
    /// Too many denied commands within a window.
    pub denied_commands: Option<DeniedCommandsRule>,
    /// Fires while the health check reports unhealthy.
    pub unhealthy: Option<bool>,
}

/// `metadata`.
#[derive(ToSchema)]
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
#[derive(ToSchema)]
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

/// Limits in numbers, after parsing and defaults.
#[derive(ToSchema)]
pub struct ResolvedLimits {
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// CPU in thousandths.
    pub cpu_millis: u64,
    /// Process limit.
    pub pids: u64,
    /// Bytes the writable layer may hold (absent: no quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// Default exec timeout in milliseconds (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_timeout_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    /// The field names of every object schema named `name` reaches, by schema name.
    fn schema_fields(doc: &Value, name: &str, out: &mut Vec<(String, BTreeSet<String>)>) {
        let schema = &doc["components"]["schemas"][name];
        let Some(props) = schema["properties"].as_object() else {
            return;
        };
        out.push((name.to_string(), props.keys().cloned().collect()));
        for p in props.values() {
            let r = p["$ref"]
                .as_str()
                .or_else(|| p["allOf"][0]["$ref"].as_str())
                .or_else(|| p["oneOf"][0]["$ref"].as_str());
            if let Some(r) = r {
                let child = r.rsplit('/').next().unwrap_or_default().to_string();
                if !out.iter().any(|(n, _)| *n == child) {
                    schema_fields(doc, &child, out);
                }
            }
        }
    }

    /// The mirrors describe the spec crate's types: a manifest with every field set
    /// serialises to exactly the fields the schema names, level by level.
    #[test]
    fn mirrors_match_the_spec() {
        let doc = serde_json::to_value(crate::openapi::document()).unwrap();
        let mut fields = Vec::new();
        schema_fields(&doc, "SandboxManifest", &mut fields);
        schema_fields(&doc, "ResolvedLimits", &mut fields);
        let manifest = devbox_spec::SandboxManifest::parse(
            "apiVersion: sandbox.io/v1\nkind: Sandbox\nmetadata: {name: a, labels: {k: v}}\n\
             spec:\n  image: host\n  limits: {cpu: '1', memory: 1Gi, pids: 10, disk: 1Gi, execTimeout: 5m}\n\
             \x20 rollback: {enabled: true, autoSnapshot: true, keep: 3, maxAge: 1d}\n\
             \x20 network: none\n  env: {A: b}\n  workdir: /w\n  user: root\n\
             \x20 hostname: h\n  command: [sleep, '1']\n\
             \x20 healthcheck: {command: [a], interval: 1s, timeout: 1s, retries: 2, startPeriod: 1s, onUnhealthy: restart}\n\
             \x20 idle: {after: 1m, action: stop}\n\
             \x20 alerts: {memory: 90%, disk: 80%, execDuration: 10m, deniedCommands: {count: 5, within: 10m}, unhealthy: true}\n",
        )
        .unwrap();
        let limits = manifest.spec.resolved_limits().unwrap();
        let value = serde_json::json!({
            "SandboxManifest": manifest,
            "Metadata": manifest.metadata,
            "SandboxSpec": manifest.spec,
            "LimitsSpec": manifest.spec.limits,
            "RollbackSpec": manifest.spec.rollback,
            "ResolvedLimits": limits,
            "HealthcheckSpec": manifest.spec.healthcheck,
            "IdleSpec": manifest.spec.idle,
            "AlertsSpec": manifest.spec.alerts,
            "DeniedCommandsRule": manifest.spec.alerts.denied_commands,
        });
        for (name, schema) in &fields {
            let actual: BTreeSet<String> = value[name]
                .as_object()
                .unwrap_or_else(|| panic!("no sample of {name}"))
                .keys()
                .cloned()
                .collect();
            assert_eq!(&actual, schema, "{name}: fields of the spec vs its schema");
        }
        assert_eq!(fields.len(), 10, "{fields:?}");
    }

    /// `spec.network`'s object form matches its mirror too.
    #[test]
    fn network_mirror_matches() {
        let doc = serde_json::to_value(crate::openapi::document()).unwrap();
        let mut fields = Vec::new();
        schema_fields(&doc, "NetworkSpec", &mut fields);
        let m = devbox_spec::SandboxManifest::parse(
            "apiVersion: sandbox.io/v1\nkind: Sandbox\nspec:\n  network: {mode: allow, allow: [a.b], deny: [c.d], ports: ['1:2']}\n",
        )
        .unwrap();
        let actual: BTreeSet<String> = serde_json::to_value(&m.spec.network)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(fields, vec![("NetworkSpec".to_string(), actual)]);
        let one_of = &doc["components"]["schemas"]["Network"]["oneOf"];
        assert_eq!(one_of.as_array().map(Vec::len), Some(2), "{one_of}");
    }
}
