//! The OpenAPI document of every route, generated with utoipa.

use axum::Json;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "sandboxd-o", description = "Control plane for fleets of sandboxes"),
    paths(
        super::healthz,
        super::metrics,
        super::nodes::create_or_update,
        super::nodes::list,
        super::nodes::get_one,
        super::nodes::delete,
        super::nodes::put_status,
        super::sandboxes::create,
        super::sandboxes::list,
        super::sandboxes::get_one,
        super::sandboxes::update_spec,
        super::sandboxes::delete,
        super::sandboxes::put_status,
        super::sandboxes::finalize,
        super::leases::create,
        super::leases::list,
        super::leases::get_one,
        super::leases::update,
        super::leases::delete,
        super::proxy::heartbeat,
        super::proxy::reconcile,
        super::proxy::list_sandboxes,
        super::proxy::get_sandbox,
        super::proxy::create_sandbox,
        super::proxy::delete_sandbox,
        super::proxy::logs,
        super::proxy::container_logs,
        super::dataplane::exec,
        super::dataplane::exec_stream,
        super::dataplane::read_file,
        super::dataplane::write_file,
        super::dataplane::delete_file,
        super::dataplane::read_archive,
        super::dataplane::write_archive,
        super::dataplane::logs,
        document,
    ),
    components(schemas(
        sandboxd_api::Node,
        sandboxd_api::Sandbox,
        sandboxd_api::Lease,
        sandboxd_api::node::NodeCreateRequest,
        sandboxd_api::node::NodeStatusUpdate,
        sandboxd_api::sandbox::SandboxCreateRequest,
        sandboxd_api::sandbox::SandboxUpdateRequest,
        sandboxd_api::sandbox::SandboxStatusUpdate,
        sandboxd_api::dataplane::ExecRequest,
        sandboxd_api::dataplane::ExecResult,
        sandboxd_api::dataplane::DirListing,
        sandboxd_api::dataplane::FileEntry,
        sandboxd_api::dataplane::FileWritten,
    ))
)]
struct ApiDoc;

/// The OpenAPI 3 document.
pub fn spec() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "This OpenAPI document")))]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(spec())
}
