//! The caller check: root may call everything; members of a configured group (the peer's
//! uid and gid from `SO_PEERCRED`, membership from /etc/group) may call what the daemon's
//! configured scopes allow; anyone else is refused. Who calls, and for whom
//! (`X-Devbox-Actor`), becomes the engine's [`Caller`]. Callers over TCP need a bearer
//! token instead ([`crate::remote`]): its scopes, sandbox pattern and limits apply. Every
//! refusal is audited.

use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use devbox_engine::{Caller, Engine};
use devbox_wire::{ErrorBody, ErrorDetail};

type AppState = Arc<Engine>;

/// The peer of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Its uid, from SO_PEERCRED (Unix socket).
    pub uid: Option<u32>,
    /// Its (effective) gid, from SO_PEERCRED (Unix socket).
    pub gid: Option<u32>,
    /// Its address (TCP): such a caller needs a token.
    pub remote: Option<std::net::SocketAddr>,
}

pub use devbox_wire::Scope;

/// The scope a request needs: reads need `read`, except the exec stream (`exec`); exec
/// needs `exec`; approving and denying `approve`; anything else `admin`.
pub fn required_scope(method: &axum::http::Method, path: &str) -> Scope {
    use axum::http::Method;
    let under_sandbox = |tail: &str| {
        path.strip_prefix("/v1/sandboxes/")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(_, t)| t == tail)
    };
    if path.starts_with("/v1/approvals/") && (path.ends_with("/approve") || path.ends_with("/deny"))
    {
        return Scope::Approve;
    }
    if under_sandbox("exec/stream") || (*method == Method::POST && under_sandbox("exec")) {
        return Scope::Exec;
    }
    if path == "/v1/run/stream" || path == "/v1/tokens" || path.starts_with("/v1/tokens/") {
        return Scope::Admin;
    }
    if *method == Method::GET || *method == Method::HEAD || path == "/v1/check" {
        return Scope::Read;
    }
    Scope::Admin
}

/// Who besides root may use the API: a group on the socket, and tokens over TCP within
/// these limits.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Members of this group, with these scopes.
    pub group: Option<GroupAccess>,
    /// Tokens' default rate and concurrent execs.
    pub remote: crate::remote::RemoteLimits,
}

/// What the caller check keeps between requests.
pub(crate) struct Guard {
    pub(crate) engine: AppState,
    pub(crate) access: Access,
    pub(crate) limiter: crate::remote::Limiter,
    pub(crate) budget: crate::remote::AuditBudget,
}

impl Guard {
    pub(crate) fn new(engine: AppState, access: Access) -> Self {
        Self {
            limiter: crate::remote::Limiter::new(access.remote.clone()),
            budget: crate::remote::AuditBudget::default(),
            engine,
            access,
        }
    }
}

/// A group allowed on the socket.
#[derive(Debug, Clone)]
pub struct GroupAccess {
    /// Its name.
    pub name: String,
    /// Its gid.
    pub gid: u32,
    /// What its members may do.
    pub scopes: Vec<Scope>,
}

impl GroupAccess {
    /// Looks `name` up in /etc/group.
    pub fn new(name: &str, scopes: Vec<Scope>) -> Result<Self, String> {
        let gid = group_entry(name).map(|(gid, _)| gid).ok_or_else(|| {
            format!(
                "group {name:?} is not in /etc/group: create it (groupadd {name}) or name another"
            )
        })?;
        Ok(Self {
            name: name.to_string(),
            gid,
            scopes,
        })
    }

    /// Whether the peer belongs to the group: its gid is the group's, or its user is a
    /// listed member (read again each time, so membership changes apply at once).
    fn admits(&self, uid: u32, gid: Option<u32>) -> bool {
        if gid == Some(self.gid) {
            return true;
        }
        let user = user_name(uid);
        group_entry(&self.name).is_some_and(|(g, members)| g == self.gid && members.contains(&user))
    }
}

/// A group's gid and members, from /etc/group.
fn group_entry(name: &str) -> Option<(u32, Vec<String>)> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || f[0] != name {
            return None;
        }
        let gid = f[2].parse().ok()?;
        let members = f[3]
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect();
        Some((gid, members))
    })
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, tokio::net::UnixListener>,
    > for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        let cred = stream.io().peer_cred().ok();
        Peer {
            uid: cred.map(|c| c.uid()),
            gid: cred.map(|c| c.gid()),
            remote: None,
        }
    }
}

pub(crate) fn user_name(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
            })
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// Whom the request says it acts for (`X-Devbox-Actor`), cleaned of control characters.
pub(crate) fn on_behalf(req: &Request) -> Option<String> {
    req.headers()
        .get("x-devbox-actor")
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.chars()
                .filter(|c| !c.is_control())
                .take(128)
                .collect::<String>()
        })
}

/// An error answer in the API's shape.
pub(crate) fn refusal(status: StatusCode, code: &str, message: String) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message,
            approval: None,
        },
    };
    (status, Json(body)).into_response()
}

/// Names the caller of every request (the peer's user, and whom it says it acts for in
/// `X-Devbox-Actor`), and refuses peers that are neither root nor admitted by `access` for
/// the request's scope. Handlers find the [`Caller`] in the request's extensions and pass
/// it to the engine.
pub(crate) async fn caller_layer(
    State(guard): State<Arc<Guard>>,
    mut req: Request,
    next: Next,
) -> Response {
    let peer = req.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0);
    if let Some(addr) = peer.and_then(|p| p.remote) {
        return crate::remote::token_layer(guard, addr, req, next).await;
    }
    let (engine, access) = (&guard.engine, &guard.access);
    let uid = peer.and_then(|p| p.uid);
    let gid = peer.and_then(|p| p.gid);
    let on_behalf = on_behalf(&req);
    let Some(uid_known) = uid else {
        // No peer credentials: nothing to tell who calls, so nothing is allowed.
        return refusal(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the caller's credentials (SO_PEERCRED) could not be read".into(),
        );
    };
    let user = user_name(uid_known);
    let caller = Caller::on_behalf(&user, on_behalf.as_deref());
    if let Some(u) = uid
        && u != 0
    {
        let path = req.uri().path().to_string();
        let need = required_scope(req.method(), &path);
        let refused = match &access.group {
            Some(g) if g.admits(u, gid) => {
                if g.scopes.contains(&need) {
                    None
                } else {
                    let have: Vec<&str> = g.scopes.iter().map(|s| s.as_str()).collect();
                    Some((
                        format!("scope {} not granted to group {}", need.as_str(), g.name),
                        format!(
                            "{user} may use dev-box as a member of group {} with the scopes {}, and this needs {}: ask an administrator (sandboxd --group-scopes) or use sudo",
                            g.name,
                            have.join(", "),
                            need.as_str()
                        ),
                    ))
                }
            }
            Some(g) => Some((
                format!("uid {u} is not root nor in group {}", g.name),
                format!(
                    "the dev-box API is for root and members of group {}: run the command with sudo or join the group",
                    g.name
                ),
            )),
            None => Some((
                format!("uid {u} is not root"),
                "the dev-box API is for root only: run the command with sudo".to_string(),
            )),
        };
        if let Some((why, message)) = refused {
            engine.audit_auth_failure(&caller, &path, &why).await;
            return refusal(StatusCode::FORBIDDEN, "forbidden", message);
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn every_route_needs_one_scope() {
        for (method, path, want) in [
            (Method::GET, "/v1/sandboxes", Scope::Read),
            (Method::GET, "/v1/sandboxes/dev", Scope::Read),
            (Method::GET, "/v1/audit", Scope::Read),
            (Method::POST, "/v1/check", Scope::Read),
            (Method::GET, "/v1/sandboxes/dev/exec/stream", Scope::Exec),
            (Method::POST, "/v1/sandboxes/dev/exec", Scope::Exec),
            (Method::POST, "/v1/approvals/a1/approve", Scope::Approve),
            (Method::POST, "/v1/approvals/a1/deny", Scope::Approve),
            (Method::GET, "/v1/run/stream", Scope::Admin),
            (Method::POST, "/v1/sandboxes", Scope::Admin),
            (Method::DELETE, "/v1/sandboxes/dev", Scope::Admin),
            (Method::POST, "/v1/sandboxes/dev/rollback", Scope::Admin),
            // A sandbox named "exec" is not the exec route.
            (Method::POST, "/v1/sandboxes/exec/stop", Scope::Admin),
            (Method::PUT, "/v1/policies/p", Scope::Admin),
            (Method::GET, "/v1/tokens", Scope::Admin),
            (Method::DELETE, "/v1/tokens/ci", Scope::Admin),
        ] {
            assert_eq!(required_scope(&method, path), want, "{method} {path}");
        }
    }
}
