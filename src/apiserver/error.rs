//! The one mapping from API errors to status codes and `{"error": ...}` bodies.

use crate::registry::RegistryError;
use crate::store::StoreError;
use axum::http::header::{RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Every way an API call fails, each with exactly one status code.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// Authenticated, but the identity's role does not allow this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    UriTooLong(String),
    /// The request's priority class is full (load shedding): retry after `Retry-After`.
    #[error("{0}")]
    TooManyRequests(String),
    /// An agent's own 4xx, passed through with its status.
    #[error("{message}")]
    Upstream { status: u16, message: String },
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Upstream { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        RegistryError::from(e).into()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(m) => ApiError::BadRequest(m),
            RegistryError::NotFound(m) => ApiError::NotFound(m),
            RegistryError::Conflict(m) => ApiError::Conflict(m),
            RegistryError::Gone(m) => ApiError::Gone(m),
            RegistryError::Unavailable(m) => ApiError::Unavailable(m),
            RegistryError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::warn!(status = %self.status(), error = %self, "request failed");
        }
        let retry_after = matches!(self, ApiError::TooManyRequests(_)).then_some([(RETRY_AFTER, "1")]);
        let challenge = matches!(self, ApiError::Unauthorized).then_some([(WWW_AUTHENTICATE, "Bearer")]);
        (self.status(), retry_after, challenge, Json(serde_json::json!({ "error": capped(self.to_string()) })))
            .into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Longest error message answered: a huge invalid body or path must not come back several times
/// larger as its own error.
pub const MAX_ERROR_BYTES: usize = 2048;

fn capped(mut message: String) -> String {
    if message.len() <= MAX_ERROR_BYTES {
        return message;
    }
    let mut cut = MAX_ERROR_BYTES;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = message.len() - cut;
    message.truncate(cut);
    message.push_str(&format!("… ({dropped} more bytes)"));
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = capped(long);
        assert!(cut.len() < MAX_ERROR_BYTES + 40, "{}", cut.len());
        assert!(cut.ends_with("more bytes)"));
        assert_eq!(capped("short".into()), "short");
    }
}
