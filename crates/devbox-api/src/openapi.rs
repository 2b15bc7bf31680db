//! The OpenAPI document of the REST API (`GET /openapi.json`, `sandbox api openapi`).

use utoipa::OpenApi;

/// The API's OpenAPI description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "dev-box API",
        description = "Sandboxes that start in milliseconds, run commands, and are destroyed without a trace. \
The daemon serves this API on a root-only Unix socket (/run/dev-box/api.sock by default). \
Errors have the shape {\"error\": {\"code\", \"message\"}}."
    ),
    paths(
        crate::server::version,
        crate::server::list_sandboxes,
        crate::server::create_sandbox,
        crate::server::inspect_sandbox,
        crate::server::destroy_sandbox,
        crate::server::start_sandbox,
        crate::server::stop_sandbox,
        crate::server::exec,
        crate::server::list_snapshots,
        crate::server::take_snapshot,
        crate::server::delete_snapshot,
        crate::server::export_snapshot,
        crate::server::import_snapshot,
        crate::server::rollback,
        crate::server::clone_sandbox,
        crate::server::diff,
        crate::ws::exec_stream,
        crate::ws::run_stream,
        crate::server::list_images,
        crate::server::import_image,
        crate::server::remove_image,
        crate::server::pool_info,
        crate::safety::check,
        crate::safety::list_policies,
        crate::safety::put_policy,
        crate::safety::delete_policy,
        crate::safety::list_approvals,
        crate::safety::get_approval,
        crate::safety::approve,
        crate::safety::deny,
        crate::safety::audit,
        crate::safety::verify,
        crate::safety::export_logs,
    ),
    components(schemas(
        crate::server::ErrorBody,
        crate::server::ErrorDetail,
        crate::server::VersionInfo,
        crate::wire::ClientMsg,
        crate::wire::ServerMsg,
        devbox_spec::SandboxManifest,
    ))
)]
pub struct ApiDoc;
