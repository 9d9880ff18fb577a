//! The OpenAPI document of every route, generated with utoipa.

use super::ApiState;
use axum::extract::State;
use axum::Json;
use sandboxd_api::schema_rules;
use sandboxd_api::validate::{SandboxPolicy, MAX_PAGE};
use serde_json::{json, Value};
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
        super::nodes::drain,
        super::sandboxes::create,
        super::sandboxes::list,
        super::sandboxes::get_one,
        super::sandboxes::update_spec,
        super::sandboxes::delete,
        super::sandboxes::put_status,
        super::sandboxes::finalize,
        super::events::record,
        super::events::list,
        super::multiwatch::watch_many,
        super::leases::create,
        super::leases::list,
        super::leases::get_one,
        super::leases::update,
        super::leases::delete,
        super::tokens::issue,
        super::tokens::list,
        super::tokens::revoke,
        super::tokens::whoami,
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
        sandboxd_api::event::Event,
        sandboxd_api::event::EventBatch,
        sandboxd_api::event::EventRecord,
        sandboxd_api::event::EventType,
        sandboxd_api::event::ObjectReference,
        sandboxd_api::auth::TokenRequest,
        sandboxd_api::auth::TokenInfo,
        sandboxd_api::auth::IssuedToken,
        sandboxd_api::auth::WhoAmI,
        sandboxd_api::watch::WatchManyRequest,
        sandboxd_api::watch::WatchSpec,
        sandboxd_api::node::NodeCreateRequest,
        sandboxd_api::node::NodeStatusUpdate,
        sandboxd_api::node::DrainRequest,
        sandboxd_api::node::DrainResponse,
        sandboxd_api::sandbox::SandboxCreateRequest,
        sandboxd_api::sandbox::SandboxUpdateRequest,
        sandboxd_api::sandbox::SandboxStatusUpdate,
        sandboxd_api::agent::AgentCreateRequest,
        sandboxd_api::affinity::Affinity,
        sandboxd_api::affinity::Preference,
        sandboxd_api::affinity::Expression,
        sandboxd_api::affinity::Operator,
        sandboxd_api::agent::AgentPort,
        sandboxd_api::dataplane::ExecRequest,
        sandboxd_api::dataplane::ExecResult,
        sandboxd_api::dataplane::DirListing,
        sandboxd_api::dataplane::FileEntry,
        sandboxd_api::dataplane::FileWritten,
    ))
)]
struct ApiDoc;

/// The OpenAPI 3 document as utoipa derives it from the handlers and wire types, before
/// `constrain` adds the rules of validation.
pub fn derived() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The OpenAPI 3 document the server publishes: the derived one with every pattern, range and
/// status code the server enforces, so a client generated from it sends only what is accepted.
pub fn spec(policy: &SandboxPolicy) -> Value {
    let mut doc = serde_json::to_value(derived()).expect("the document serializes");
    constrain(&mut doc, policy);
    doc
}

#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "This OpenAPI document")))]
pub async fn document(State(state): State<ApiState>) -> Json<Value> {
    Json(spec(&state.policy))
}

/// Adds what validation enforces and utoipa cannot derive: component bounds from
/// `sandboxd_api::schema_rules`, parameter schemas, and the error statuses every route can answer.
fn constrain(doc: &mut Value, policy: &SandboxPolicy) {
    document_bearer_auth(doc);
    if let Some(schemas) = doc.pointer_mut("/components/schemas").and_then(Value::as_object_mut) {
        for (schema, property, keywords) in schema_rules::component_constraints(policy) {
            if let Some(target) =
                schemas.get_mut(schema).and_then(|s| s.pointer_mut(&format!("/properties/{property}")))
            {
                merge(target, keywords);
            }
        }
        for (schema, keywords) in schema_rules::schema_keywords() {
            if let Some(target) = schemas.get_mut(schema) {
                merge(target, keywords);
            }
        }
        for schema in schemas.values_mut() {
            bound_unsigned_integers(schema);
        }
        for schema in schema_rules::CLOSED {
            if let Some(schema) = schemas.get_mut(schema).and_then(Value::as_object_mut) {
                schema.insert("additionalProperties".into(), json!(false));
            }
        }
        for schema in schema_rules::ID_ALIASED {
            if let Some(schema) = schemas.get_mut(schema).and_then(Value::as_object_mut) {
                document_name_alias(schema);
            }
        }
        for (schema, fields) in schema_rules::required_fields() {
            let Some(schema) = schemas.get_mut(schema).and_then(Value::as_object_mut) else { continue };
            let required = schema.entry("required").or_insert_with(|| json!([]));
            if let Some(required) = required.as_array_mut() {
                for field in fields {
                    if !required.contains(&json!(field)) {
                        required.push(json!(field));
                    }
                }
            }
        }
    }
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else { return };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else { continue };
        for (method, operation) in item.iter_mut() {
            constrain_parameters(operation);
            document_error_statuses(path, operation);
            if method == "put" && path == "/api/v1/leases/{name}" {
                require_resource_version(operation);
            }
        }
    }
}

/// `name` is accepted for `id` (serde's alias): either one, never both.
fn document_name_alias(schema: &mut serde_json::Map<String, Value>) {
    let alias = json!({ "type": "string", "pattern": schema_rules::NAME, "description": "Another spelling of `id`" });
    if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        properties.insert("name".into(), alias);
    }
    schema.insert("oneOf".into(), json!([{ "required": ["id"] }, { "required": ["name"] }]));
}

/// utoipa marks Rust's unsigned integers `minimum: 0` with the signed format of their width, whose
/// range tools enforce; the server takes them up to the unsigned maximum, so the document states
/// that range instead (a larger number is a 400).
fn bound_unsigned_integers(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let unsigned = map.get("minimum") == Some(&json!(0)) && !map.contains_key("maximum");
            let maximum = match map.get("format").and_then(Value::as_str) {
                Some("int32") if unsigned => Some(json!(u32::MAX)),
                Some("int64") if unsigned => Some(json!(u64::MAX)),
                _ => None,
            };
            if let Some(maximum) = maximum {
                map.remove("format");
                map.insert("maximum".into(), maximum);
            }
            map.values_mut().for_each(bound_unsigned_integers);
        }
        Value::Array(items) => items.iter_mut().for_each(bound_unsigned_integers),
        _ => {}
    }
}

/// Merges `keywords` into a property schema; an optional property (`oneOf` with null) gets them
/// on its non-null branch.
fn merge(target: &mut Value, keywords: Value) {
    if let Some(branches) = target.get_mut("oneOf").and_then(Value::as_array_mut) {
        for branch in branches.iter_mut().filter(|b| b.get("type") != Some(&json!("null"))) {
            merge(branch, keywords.clone());
        }
        return;
    }
    if let (Some(target), Value::Object(keywords)) = (target.as_object_mut(), keywords) {
        target.extend(keywords);
    }
}

/// Path segments are object names; query parameters get the forms the handlers parse.
fn constrain_parameters(operation: &mut Value) {
    let Some(parameters) = operation.get_mut("parameters").and_then(Value::as_array_mut) else { return };
    for parameter in parameters {
        let location = parameter["in"].as_str().unwrap_or_default().to_string();
        let name = parameter["name"].as_str().unwrap_or_default().to_string();
        let schema = match (location.as_str(), name.as_str()) {
            ("path", _) | ("query", "container") => json!({ "type": "string", "pattern": schema_rules::NAME }),
            ("query", "object") => json!({ "type": "string", "pattern": schema_rules::EVENT_OBJECT }),
            ("query", "cursor") => {
                json!({ "type": "string", "pattern": format!("^({})?$", &schema_rules::NAME[1..schema_rules::NAME.len() - 1]) })
            }
            ("query", "limit") => json!({ "type": "integer", "minimum": 1, "maximum": MAX_PAGE }),
            ("query", "tail") => json!({ "type": "integer", "minimum": 0, "maximum": usize::MAX }),
            ("query", "resource_version") => json!({ "type": "string", "pattern": "^[0-9]{0,19}$" }),
            ("query", "watch" | "follow" | "recursive") => json!({ "type": "boolean" }),
            ("query", "mode") => json!({ "type": "string", "pattern": "^0?[0-7]{3,4}$" }),
            ("query", "path") => json!({ "type": "string", "pattern": "^/[^\\u0000]*$" }),
            _ => continue,
        };
        parameter["schema"] = schema;
    }
}

/// A lease update must carry the version it read (compare-and-swap is mandatory for leases).
fn require_resource_version(operation: &mut Value) {
    if let Some(schema) = operation.pointer_mut("/requestBody/content/application~1json/schema") {
        let lease = schema.take();
        *schema = json!({ "allOf": [lease, {
            "required": ["resource_version"],
            "properties": { "resource_version": { "type": "string", "pattern": "^[0-9]{1,19}$" } }
        }] });
    }
}

/// Every route but `/healthz` takes `Authorization: Bearer <token>`.
fn document_bearer_auth(doc: &mut Value) {
    if let Some(components) = doc.get_mut("components").and_then(Value::as_object_mut) {
        components.insert("securitySchemes".into(), json!({ "bearer": { "type": "http", "scheme": "bearer" } }));
    }
    doc["security"] = json!([{ "bearer": [] }]);
    if let Some(healthz) = doc.pointer_mut("/paths/~1healthz/get").and_then(Value::as_object_mut) {
        healthz.insert("security".into(), json!([]));
    }
}

/// Every status a route can answer besides its own: 400 for a bad parameter or body, 401 without
/// the token, 414 for an overlong target, 404 for an unknown object, 413/415 for bodies, 429 when its class is full, and 503
/// when the store is unavailable.
fn document_error_statuses(path: &str, operation: &mut Value) {
    let has_body = operation.get("requestBody").is_some();
    let Some(responses) = operation.get_mut("responses").and_then(Value::as_object_mut) else { return };
    if path == "/healthz" {
        return;
    }
    let mut statuses = vec![
        ("400", "Invalid parameter or body: {\"error\": \"<field>: <why>\"}"),
        ("401", "Missing or wrong bearer token"),
        ("403", "The caller's role may not call this route"),
        ("414", "Request target longer than 16 KiB"),
        ("429", "Too many requests of this class in flight; retry after Retry-After"),
        ("503", "Store unavailable"),
    ];
    if path.contains('{') {
        statuses.push(("404", "Unknown object"));
    }
    if path.starts_with("/api/v1/sandboxes/{id}/") && !path.ends_with("/finalize") && !path.ends_with("/status") {
        statuses.push(("501", "The node's runtime has no such feature (the simulator has no container files)"));
    }
    if has_body {
        statuses.push(("413", "Body larger than max_body_bytes (max_file_bytes for uploads)"));
        statuses.push(("415", "Body is not of the documented content type"));
    }
    for (status, description) in statuses {
        responses.entry(status).or_insert_with(|| json!({ "description": description, "content": error_content() }));
    }
}

fn error_content() -> Value {
    json!({ "application/json": { "schema": {
        "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } }
    } } })
}
