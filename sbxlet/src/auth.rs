//! The agent's one credential: every route but `/healthz` needs `Authorization: Bearer <token>`,
//! the token the orchestrator was given for its agents.

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The SHA-256 of the agent's token; `None`: no credential is asked for.
#[derive(Clone, Default)]
pub struct AgentToken(Option<Arc<[u8; 32]>>);

impl AgentToken {
    pub fn new(token: Option<&str>) -> AgentToken {
        AgentToken(token.map(|t| Arc::new(Sha256::digest(t.trim().as_bytes()).into())))
    }

    fn admits(&self, request: &Request) -> bool {
        let Some(expected) = &self.0 else { return true };
        if request.uri().path() == "/healthz" {
            return true;
        }
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(presented) = presented else { return false };
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(hash.ct_eq(&**expected))
    }
}

/// Refuses a request without the agent's token with 401 `{"error": ...}`.
pub async fn require_token(State(token): State<AgentToken>, request: Request, next: Next) -> Response {
    if token.admits(&request) {
        return next.run(request).await;
    }
    let body = Json(serde_json::json!({ "error": "missing or invalid bearer token (the agent token)" }));
    (StatusCode::UNAUTHORIZED, [(WWW_AUTHENTICATE, "Bearer")], body).into_response()
}

/// Reads a token file: one line, not empty.
pub fn read_token_file(path: &std::path::Path) -> std::io::Result<String> {
    let token = std::fs::read_to_string(path)?.trim().to_string();
    if token.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} is empty", path.display())));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn request(path: &str, authorization: Option<&str>) -> Request {
        let mut builder = axum::http::Request::builder().uri(path);
        if let Some(value) = authorization {
            builder = builder.header(AUTHORIZATION, value);
        }
        builder.body(Body::empty()).unwrap()
    }

    #[test]
    fn only_the_token_opens_anything_but_healthz() {
        let token = AgentToken::new(Some("s3cret"));
        assert!(token.admits(&request("/healthz", None)));
        assert!(!token.admits(&request("/api/v1/sandboxes", None)));
        assert!(!token.admits(&request("/api/v1/sandboxes", Some("Bearer wrong"))));
        assert!(token.admits(&request("/api/v1/sandboxes", Some("Bearer s3cret"))));
        assert!(token.admits(&request("/api/v1/sandboxes", Some("bearer s3cret"))));
        assert!(!token.admits(&request("/sim/restart", Some("Basic s3cret"))));
        assert!(AgentToken::new(None).admits(&request("/sim/restart", None)));
    }
}
