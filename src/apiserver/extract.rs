//! Request extractors whose rejections use the API's `{"error": ...}` shape.

use super::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// A JSON body: 415 unless `content-type: application/json`, 413 over the body limit, 400 with the field path on bad JSON.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        require_json_content_type(&req)?;
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge("request body is larger than max_body_bytes".into())
            } else {
                ApiError::BadRequest(format!("reading request body: {}", rejection.body_text()))
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

fn require_json_content_type(req: &Request) -> Result<(), ApiError> {
    let content_type = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json")) {
        Ok(())
    } else if content_type.is_empty() {
        Err(ApiError::UnsupportedMediaType("missing content-type: expected application/json".into()))
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "content-type {content_type:?} is not supported: expected application/json"
        )))
    }
}

/// Parses JSON, naming the field path of the first problem (`spec.containers[0].resource.cpu: invalid type ...`).
///
/// A number written with a zero fraction (`80.0`) is the integer it equals, as JSON Schema counts
/// it: when the strict parse fails on a float, the body is parsed again with such numbers made
/// integers. The common body never pays for that second parse.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest("request body is empty: expected a JSON object".into()));
    }
    // The common case parses once, without tracking paths; only a body that fails is parsed again
    // to name the field at fault.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize(&mut de) {
        Ok(value) => {
            de.end().map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
            Ok(value)
        }
        Err(e) if e.inner().to_string().contains("floating point") => {
            let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| field_error(".", e))?;
            integers_for_whole_floats(&mut value);
            serde_path_to_error::deserialize(value).map_err(|e| field_error(&e.path().to_string(), e.into_inner()))
        }
        Err(e) => Err(field_error(&e.path().to_string(), e.into_inner())),
    }
}

fn field_error(path: &str, inner: serde_json::Error) -> ApiError {
    if path == "." || path.is_empty() {
        ApiError::BadRequest(format!("invalid JSON body: {inner}"))
    } else {
        ApiError::BadRequest(format!("{path}: {inner}"))
    }
}

/// Replaces every float with a zero fraction that fits an `i64` or `u64` by that integer.
fn integers_for_whole_floats(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Beyond 2^53 a float no longer names one integer, so those stay floats (and fail).
            if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                *value = serde_json::Value::from(f as i64);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integers_for_whole_floats),
        serde_json::Value::Object(map) => map.values_mut().for_each(integers_for_whole_floats),
        _ => {}
    }
}

/// Query parameters with a 400 `{"error": ...}` on bad values.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str(query).map(ApiQuery).map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))
    }
}
