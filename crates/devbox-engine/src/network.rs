//! Sandbox networks (`devbox-net`) in the engine's lifecycle: made before a sandbox starts
//! (its processes join the persisted namespace), removed when it is destroyed, re-attached
//! (resolver, port proxies) and swept at reconcile. Everything the engine does with the
//! network goes through this file.

use std::path::PathBuf;
use std::sync::Arc;

use devbox_net::{NetConfig, Networks, Policy, PortMap};
use devbox_spec::{NetworkMode, SandboxSpec};
use devbox_store::SandboxRecord;

use crate::{Engine, EngineError, Result};

/// The daemon's networks, if it has any (none: sandboxes get a loopback-only namespace of
/// their own, as before; the engine's unit tests run so, without root).
#[derive(Default)]
pub(crate) struct Net(pub(crate) Option<Arc<Networks>>);

impl Net {
    /// Opens the networks of `cfg` (inside the tokio runtime).
    pub(crate) fn open(cfg: Option<&NetConfig>) -> Result<Net> {
        match cfg {
            None => Ok(Net(None)),
            Some(c) => Networks::new(c.clone())
                .map(|n| Net(Some(n)))
                .map_err(|e| EngineError::Internal(format!("sandbox networks: {e}"))),
        }
    }
}

/// The default network settings under `state_dir`: as root only (the networks need it).
/// `$DEVBOX_NET_SUBNET` sets the pool (default: the first of dev-box's candidates no route
/// of the host uses), `$DEVBOX_NET_DNS` the upstream resolvers, comma-separated (default:
/// /etc/resolv.conf's).
pub fn default_config(state_dir: &std::path::Path) -> Option<NetConfig> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let subnet = match std::env::var("DEVBOX_NET_SUBNET")
        .ok()
        .filter(|s| !s.is_empty())
    {
        Some(s) => s.parse().ok()?,
        None => devbox_net::default_subnet().ok()?,
    };
    let upstream_dns = match std::env::var("DEVBOX_NET_DNS")
        .ok()
        .filter(|s| !s.is_empty())
    {
        Some(s) => s
            .split(',')
            .filter_map(|a| {
                let a = a.trim();
                a.parse()
                    .ok()
                    .or_else(|| a.parse::<std::net::IpAddr>().ok().map(|ip| (ip, 53).into()))
            })
            .collect(),
        None => devbox_net::system_resolvers(),
    };
    Some(NetConfig {
        subnet,
        upstream_dns,
        state_dir: state_dir.join("net"),
    })
}

/// A sandbox's network policy, from its spec.
pub(crate) fn policy_of(spec: &SandboxSpec) -> Policy {
    match spec.network {
        NetworkMode::None => Policy::default(),
    }
}

/// A sandbox's published ports, from its spec.
pub(crate) fn ports_of(_spec: &SandboxSpec) -> Vec<PortMap> {
    Vec::new()
}

fn net_err(e: devbox_net::NetError) -> EngineError {
    match e {
        devbox_net::NetError::Invalid(m) => EngineError::InvalidRequest(m),
        e => EngineError::Internal(format!("sandbox network: {e}")),
    }
}

impl Engine {
    /// Makes (or re-attaches) the sandbox's network before it starts: the namespace to join
    /// and the resolv.conf to write.
    pub(crate) fn net_attach(
        &self,
        rec: &SandboxRecord,
        spec: &SandboxSpec,
    ) -> Result<(Option<PathBuf>, Option<String>)> {
        let policy = policy_of(spec);
        let Some(nets) = &self.net.0 else {
            if policy.mode != devbox_net::Mode::None {
                return Err(EngineError::InvalidRequest(
                    "this daemon has no sandbox networks (it runs without root)".into(),
                ));
            }
            return Ok((None, None));
        };
        let ports = ports_of(spec);
        if policy.mode == devbox_net::Mode::None && ports.is_empty() {
            // Loopback only and nothing published: the sandbox's own namespace, as before
            // (CRIU cannot yet dump a sandbox in a namespace its user namespace does not own).
            nets.remove(&rec.id).map_err(net_err)?;
            return Ok((None, None));
        }
        let att = nets.create(&rec.id, &policy, &ports).map_err(net_err)?;
        let resolv = att.resolv_conf();
        Ok((Some(att.netns), resolv))
    }

    /// The persisted namespace a running sandbox joined, if it has one.
    pub(crate) fn net_netns(&self, rec: &SandboxRecord) -> Option<PathBuf> {
        let nets = self.net.0.as_ref()?;
        nets.netns_of(&rec.id).ok().filter(|p| p.exists())
    }

    /// Removes a sandbox's network (destroy, a failed create).
    pub(crate) fn net_remove(&self, id: &str) -> Result<()> {
        match &self.net.0 {
            Some(nets) => nets.remove(id).map_err(net_err),
            None => Ok(()),
        }
    }

    /// Reconcile: removes the networks of sandboxes that no longer exist (a killed daemon's
    /// leftovers too) and re-attaches those of running sandboxes (resolver, port proxies).
    pub(crate) fn net_reconcile(&self, kept: &[SandboxRecord]) {
        let Some(nets) = &self.net.0 else { return };
        let keep: Vec<String> = kept.iter().map(|r| r.id.clone()).collect();
        match nets.cleanup(&keep) {
            Ok(gone) if !gone.is_empty() => {
                tracing::info!(count = gone.len(), "removed networks no sandbox owns")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("removing networks no sandbox owns: {e}"),
        }
        for rec in kept {
            if rec.state != devbox_store::SandboxState::Running || !self.net_netns_exists(rec) {
                continue;
            }
            let spec = match Self::manifest_of(rec) {
                Ok(m) => m.spec,
                Err(e) => {
                    tracing::warn!(sandbox = %rec.name, "re-attaching its network: {e}");
                    continue;
                }
            };
            if let Err(e) = self.net_attach(rec, &spec) {
                tracing::warn!(sandbox = %rec.name, "re-attaching its network: {e}");
            }
        }
    }

    fn net_netns_exists(&self, rec: &SandboxRecord) -> bool {
        self.net_netns(rec).is_some()
    }
}
