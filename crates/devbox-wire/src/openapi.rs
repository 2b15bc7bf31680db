//! The OpenAPI document of the REST API (`GET /openapi.json`, `sandbox api openapi`).
//!
//! Each route is described by a function of this module that does nothing but carry the
//! route's `#[utoipa::path]`; the daemon's handlers (crate `devbox-api`) implement them. The
//! document needs only the wire model, so a client prints it without a daemon.

use utoipa::OpenApi;

use crate::checks::{
    ApprovalInfo, AuditRecord, AuditVerification, Check, CheckRequest, DenyRequest, PolicyInfo,
    PolicyRequest,
};
use crate::error::{ErrorBody, ErrorDetail};
use crate::events::{Event, EventsQuery, WebhookStatus};
use crate::model::{
    CloneRequest, CreateSandboxRequest, DiffResult, ExecRequest, ExecResult, ImageInfo,
    ImportImageRequest, PoolInfo, RollbackRequest, SandboxInfo, SnapshotInfo, SnapshotRequest,
    StopRequest, UpdateLimitsRequest, VersionInfo,
};
use crate::network::{BlockedAttempt, NetworkInfo, NetworkRulesRequest};
use crate::query::{
    ApprovalsQuery, AuditQuery, DeleteSnapshotQuery, DestroyQuery, DiffQuery, ImportSnapshotQuery,
    NetworkLogQuery, ScopeQuery, VerifyQuery, WaitQuery,
};
use crate::stats::{ProcessList, SandboxStats, StatsQuery};
use crate::stream::{ClientMsg, ServerMsg};
use crate::tokens::{CreateTokenRequest, CreatedToken, TokenInfo};

/// The API's OpenAPI description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "dev-box API",
        description = "Sandboxes that start in milliseconds, run commands, and are destroyed without a trace. \
The daemon serves this API on a Unix socket (/run/dev-box/api.sock by default) for root and the members of a configured group within its scopes, \
and, when configured (sandboxd --listen), on TCP (TLS with --tls-cert/--tls-key) for callers with a bearer token (`Authorization: Bearer TOKEN`, see /v1/tokens): \
401 `unauthorized` without a valid token, 403 `forbidden` outside its scopes or sandbox pattern, 429 `rate_limited` with Retry-After past its rate or concurrent execs. \
Errors have the shape {\"error\": {\"code\", \"message\"}}."
    ),
    paths(
        version,
        list_sandboxes,
        create_sandbox,
        inspect_sandbox,
        destroy_sandbox,
        start_sandbox,
        stop_sandbox,
        update_limits,
        exec,
        list_snapshots,
        take_snapshot,
        delete_snapshot,
        export_snapshot,
        import_snapshot,
        rollback,
        clone_sandbox,
        diff,
        network,
        network_allow,
        network_deny,
        network_reset,
        network_log,
        stats,
        sandbox_stats,
        ps,
        metrics,
        exec_stream,
        run_stream,
        list_images,
        import_image,
        remove_image,
        pool_info,
        check,
        list_policies,
        put_policy,
        delete_policy,
        list_approvals,
        get_approval,
        approve,
        deny,
        audit,
        verify,
        export_logs,
        events,
        webhooks,
        list_tokens,
        create_token,
        revoke_token,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        VersionInfo,
        ClientMsg,
        ServerMsg,
        crate::spec_schema::SandboxManifest,
    ))
)]
pub struct ApiDoc;

#[utoipa::path(get, path = "/v1/version", tag = "crate::server", responses((status = 200, body = VersionInfo)))]
#[allow(dead_code)]
fn version() {}

#[utoipa::path(get, path = "/v1/sandboxes", tag = "crate::server", responses((status = 200, body = Vec<SandboxInfo>)))]
#[allow(dead_code)]
fn list_sandboxes() {}

#[utoipa::path(post, path = "/v1/sandboxes", tag = "crate::server", request_body = CreateSandboxRequest,
    responses((status = 201, body = SandboxInfo), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[allow(dead_code)]
fn create_sandbox() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}", tag = "crate::server", params(("name" = String, Path)),
    responses((status = 200, body = SandboxInfo), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn inspect_sandbox() {}

#[utoipa::path(delete, path = "/v1/sandboxes/{name}", tag = "crate::server", params(("name" = String, Path), DestroyQuery),
    responses((status = 204), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn destroy_sandbox() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/start", tag = "crate::server", params(("name" = String, Path)),
    responses((status = 200, body = SandboxInfo), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn start_sandbox() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/stop", tag = "crate::server", params(("name" = String, Path)), request_body = StopRequest,
    responses((status = 200, body = SandboxInfo), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn stop_sandbox() {}

#[utoipa::path(patch, path = "/v1/sandboxes/{name}/limits", tag = "crate::server", params(("name" = String, Path)), request_body = UpdateLimitsRequest,
    description = "Changes a sandbox's limits; a running sandbox gets them at once, without a restart (its cgroup and disk quota). POST works too. Nothing changes unless all of them can: values out of range, and memory, pids or disk below what the sandbox uses now, are refused (400). Audited as sandbox.update with the old and new values.",
    responses((status = 200, body = SandboxInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[allow(dead_code)]
fn update_limits() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/exec", tag = "crate::server", params(("name" = String, Path)), request_body = ExecRequest,
    responses((status = 200, body = ExecResult), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
#[allow(dead_code)]
fn exec() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/snapshots", tag = "crate::server", params(("name" = String, Path)),
    responses((status = 200, body = Vec<SnapshotInfo>), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn list_snapshots() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/snapshots", tag = "crate::server", params(("name" = String, Path)), request_body = SnapshotRequest,
    responses((status = 201, body = SnapshotInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 507, body = ErrorBody)))]
#[allow(dead_code)]
fn take_snapshot() {}

#[utoipa::path(delete, path = "/v1/sandboxes/{name}/snapshots/{snapshot}", tag = "crate::server", params(("name" = String, Path), ("snapshot" = String, Path), DeleteSnapshotQuery),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[allow(dead_code)]
fn delete_snapshot() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/snapshots/{snapshot}/export", tag = "crate::server", params(("name" = String, Path), ("snapshot" = String, Path)),
    description = "The snapshot as a dev-box.snapshot/v1 archive (zstd-compressed tar of manifest.json and layer.tar).",
    responses((status = 200, content_type = "application/zstd"), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn export_snapshot() {}

#[utoipa::path(post, path = "/v1/snapshots/import", tag = "crate::server", params(ImportSnapshotQuery),
    description = "Body: a dev-box.snapshot/v1 archive. Makes a sandbox whose state and history head is the snapshot.",
    request_body(content_type = "application/zstd"),
    responses((status = 201, body = SandboxInfo), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[allow(dead_code)]
fn import_snapshot() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/rollback", tag = "crate::server", params(("name" = String, Path)), request_body = RollbackRequest,
    responses((status = 200, body = SandboxInfo), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn rollback() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/clone", tag = "crate::server", params(("name" = String, Path)), request_body = CloneRequest,
    responses((status = 201, body = SandboxInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[allow(dead_code)]
fn clone_sandbox() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/diff", tag = "crate::server", params(("name" = String, Path), DiffQuery),
    responses((status = 200, body = DiffResult), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn diff() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/network", tag = "crate::network", params(("name" = String, Path)),
    description = "Mode, rules in force, published ports, address and counters.",
    responses((status = 200, body = NetworkInfo), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn network() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/network/allow", tag = "crate::network", params(("name" = String, Path)), request_body = NetworkRulesRequest,
    description = "Allows more egress, live (from the next connection or DNS question); kept across restarts, snapshots and clones; audited as network.allow.",
    responses((status = 200, body = NetworkInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[allow(dead_code)]
fn network_allow() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/network/deny", tag = "crate::network", params(("name" = String, Path)), request_body = NetworkRulesRequest,
    description = "Denies egress, live; kept like allow; audited as network.deny.",
    responses((status = 200, body = NetworkInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[allow(dead_code)]
fn network_deny() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/network/reset", tag = "crate::network", params(("name" = String, Path)),
    description = "Drops the live changes: the spec's rules apply again; audited as network.reset.",
    responses((status = 200, body = NetworkInfo), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn network_reset() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/network/log", tag = "crate::network", params(("name" = String, Path), NetworkLogQuery),
    description = "Blocked attempts (refused DNS names and connections), oldest first, from the audit log.",
    responses((status = 200, body = Vec<BlockedAttempt>), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn network_log() {}

#[utoipa::path(get, path = "/v1/stats", tag = "crate::monitoring", params(StatsQuery),
    description = "Resource use of sandboxes, by name: CPU % (averaged over the time since the daemon's previous sample of that sandbox, 0.1 to 10 s ago; without one, the call samples again after 0.1 s), memory, pids, disk and network bytes.",
    responses((status = 200, body = Vec<SandboxStats>), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn stats() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/stats", tag = "crate::monitoring", params(("name" = String, Path)),
    description = "Resource use of one sandbox, as in /v1/stats.",
    responses((status = 200, body = SandboxStats), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn sandbox_stats() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/ps", tag = "crate::monitoring", params(("name" = String, Path)),
    description = "The processes inside a running sandbox (pid inside, uid inside, CPU time, RSS, escaped command) and the exec each belongs to, with how that is known.",
    responses((status = 200, body = ProcessList), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[allow(dead_code)]
fn ps() {}

#[utoipa::path(get, path = "/metrics", tag = "crate::monitoring",
    description = "Prometheus metrics (text format 0.0.4): devbox_operations_total and devbox_operation_duration_seconds by operation (create, exec, snapshot, checkpoint, rollback) and result, devbox_policy_denials_total, devbox_approvals_pending, devbox_pool_used_bytes, devbox_pool_size_bytes, devbox_sandboxes_running, and per running sandbox devbox_sandbox_cpu_seconds_total, devbox_sandbox_memory_bytes, devbox_sandbox_pids.",
    responses((status = 200, description = "the metrics", content_type = "text/plain")))]
#[allow(dead_code)]
fn metrics() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/exec/stream", tag = "crate::ws", params(("name" = String, Path)),
    description = "WebSocket: send {\"type\":\"exec\",\"exec\":ExecRequest,\"stdin\":bool}; receive started, output frames (first byte 1 stdout, 2 stderr), exit.",
    responses((status = 101, description = "switching to the WebSocket protocol")))]
#[allow(dead_code)]
fn exec_stream() {}

#[utoipa::path(get, path = "/v1/run/stream", tag = "crate::ws",
    description = "WebSocket: send {\"type\":\"run\",\"sandbox\":CreateSandboxRequest,\"exec\":ExecRequest,\"stdin\":bool}; the sandbox is created, runs the command as on exec/stream, and is destroyed when the command ends or the client leaves.",
    responses((status = 101, description = "switching to the WebSocket protocol")))]
#[allow(dead_code)]
fn run_stream() {}

#[utoipa::path(get, path = "/v1/images", tag = "crate::server", responses((status = 200, body = Vec<ImageInfo>)))]
#[allow(dead_code)]
fn list_images() {}

#[utoipa::path(post, path = "/v1/images/import", tag = "crate::server", request_body = ImportImageRequest,
    responses((status = 201, body = ImageInfo), (status = 400, body = ErrorBody), (status = 507, body = ErrorBody)))]
#[allow(dead_code)]
fn import_image() {}

#[utoipa::path(delete, path = "/v1/images/{reference}", tag = "crate::server", params(("reference" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[allow(dead_code)]
fn remove_image() {}

#[utoipa::path(get, path = "/v1/pool", tag = "crate::server", responses((status = 200, body = PoolInfo)))]
#[allow(dead_code)]
fn pool_info() {}

#[utoipa::path(post, path = "/v1/check", tag = "crate::safety", request_body = CheckRequest,
    description = "What the checks decide for a command, and why; nothing runs.",
    responses((status = 200, body = Check), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn check() {}

#[utoipa::path(get, path = "/v1/policies", tag = "crate::safety", params(ScopeQuery), responses((status = 200, body = Vec<PolicyInfo>)))]
#[allow(dead_code)]
fn list_policies() {}

#[utoipa::path(put, path = "/v1/policies/{name}", tag = "crate::safety", params(("name" = String, Path)), request_body = PolicyRequest,
    description = "Adds or replaces a policy. A global policy named `default` replaces the built-in one.",
    responses((status = 200, body = PolicyInfo), (status = 400, body = ErrorBody)))]
#[allow(dead_code)]
fn put_policy() {}

#[utoipa::path(delete, path = "/v1/policies/{name}", tag = "crate::safety", params(("name" = String, Path), ScopeQuery),
    responses((status = 204), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn delete_policy() {}

#[utoipa::path(get, path = "/v1/approvals", tag = "crate::safety", params(ApprovalsQuery), responses((status = 200, body = Vec<ApprovalInfo>)))]
#[allow(dead_code)]
fn list_approvals() {}

#[utoipa::path(get, path = "/v1/approvals/{id}", tag = "crate::safety", params(("id" = String, Path), WaitQuery),
    description = "An approval; with ?wait=N, answers once it is decided or after N seconds.",
    responses((status = 200, body = ApprovalInfo), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn get_approval() {}

#[utoipa::path(post, path = "/v1/approvals/{id}/approve", tag = "crate::safety", params(("id" = String, Path)),
    description = "Approves a pending command: it may then run once (a waiting exec stream runs it at once; a REST client re-sends the exec with `approval`).",
    responses((status = 200, body = ApprovalInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[allow(dead_code)]
fn approve() {}

#[utoipa::path(post, path = "/v1/approvals/{id}/deny", tag = "crate::safety", params(("id" = String, Path)), request_body = DenyRequest,
    responses((status = 200, body = ApprovalInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[allow(dead_code)]
fn deny() {}

#[utoipa::path(get, path = "/v1/audit", tag = "crate::safety", params(AuditQuery), responses((status = 200, body = Vec<AuditRecord>)))]
#[allow(dead_code)]
fn audit() {}

#[utoipa::path(get, path = "/v1/audit/verify", tag = "crate::safety", params(VerifyQuery),
    description = "Checks every record's hash and link, and that the chain starts where retention's own record says it pruned to; reports the first broken record and the head (the newest record's hash). With `head`, also checks that the chain reaches that head.",
    responses((status = 200, body = AuditVerification), (status = 400, body = ErrorBody)))]
#[allow(dead_code)]
fn verify() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/logs/export", tag = "crate::safety", params(("name" = String, Path)),
    description = "A .tar.gz of the sandbox's exec outputs, exec records and audit records.",
    responses((status = 200, content_type = "application/gzip"), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn export_logs() {}

#[utoipa::path(get, path = "/v1/events", tag = "crate::monitoring", params(EventsQuery),
    description = "Events: every audit record with its kind (lifecycle, exec, snapshot, rollback, limit, network, approval, policy, health, alert, idle, ...), oldest first. With `follow=true` or `Accept: text/event-stream`, Server-Sent Events: the past events, then new ones as they happen; each `id:` is the event's id, so a client that reconnects with `Last-Event-ID` resumes after it without gaps or duplicates. A client too slow to keep up gets an `event: lagged` message with how many it missed (they remain in GET /v1/events).",
    responses((status = 200, body = Vec<Event>), (status = 200, content_type = "text/event-stream"), (status = 400, body = ErrorBody)))]
#[allow(dead_code)]
fn events() {}

#[utoipa::path(get, path = "/v1/webhooks", tag = "crate::monitoring",
    description = "The configured webhooks and their delivery state.",
    responses((status = 200, body = Vec<WebhookStatus>)))]
#[allow(dead_code)]
fn webhooks() {}

/// The OpenAPI document (serialises to JSON; `to_pretty_json` prints it).
pub type Document = utoipa::openapi::OpenApi;

/// The API's OpenAPI document.
pub fn document() -> Document {
    let mut doc = ApiDoc::openapi();
    // OpenAPI 3.1 requires a description on every response: those the routes leave out are
    // the meaning of their status here.
    for item in doc.paths.paths.values_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
            &mut item.head,
        ];
        for op in ops.into_iter().flatten() {
            for (status, r) in op.responses.responses.iter_mut() {
                if let utoipa::openapi::RefOr::T(r) = r
                    && r.description.is_empty()
                {
                    r.description = status_description(status).into();
                }
            }
        }
    }
    doc
}

/// What a status means in this API (the body of an error says more).
fn status_description(status: &str) -> &'static str {
    match status {
        "200" => "done: the result",
        "201" => "created: what was made",
        "202" => {
            "the command waits for an approval (error code approval_required, with the approval)"
        }
        "204" => "done, nothing to return",
        "400" => "invalid request: the error says what is wrong and what to send",
        "401" | "403" => "the caller may not do this (error code forbidden)",
        "404" => "no such sandbox, snapshot, image, policy or approval",
        "409" => "the state does not allow it now (the error says what to do first)",
        "422" => "the command could not run (error code exec_failed)",
        "429" => "too many requests: retry after the time given",
        "500" => "an internal error (the daemon's log says more)",
        "507" => "the storage pool is full",
        _ => "see the error's code and message",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_response_has_a_description() {
        let doc = super::document();
        let v = serde_json::to_value(&doc).expect("json");
        let mut seen = 0;
        for (path, item) in v["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("item") {
                for (status, r) in op["responses"].as_object().into_iter().flatten() {
                    seen += 1;
                    assert!(
                        r["description"].as_str().is_some_and(|d| !d.is_empty()),
                        "{method} {path} {status}"
                    );
                }
            }
        }
        assert!(seen > 40, "{seen} responses");
    }
}

#[utoipa::path(get, path = "/v1/tokens", tag = "crate::auth",
    description = "The API tokens (never their secrets).",
    responses((status = 200, body = Vec<TokenInfo>)))]
#[allow(dead_code)]
fn list_tokens() {}

#[utoipa::path(post, path = "/v1/tokens", tag = "crate::auth", request_body = CreateTokenRequest,
    description = "Makes a token; the answer shows it this once (the daemon keeps a hash). Audited as token.create.",
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[allow(dead_code)]
fn create_token() {}

#[utoipa::path(delete, path = "/v1/tokens/{name}", tag = "crate::auth", params(("name" = String, Path)),
    description = "Revokes a token at once (its next request is refused). Audited as token.revoke.",
    responses((status = 204), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn revoke_token() {}
