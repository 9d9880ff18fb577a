//! Who a request comes from (bearer tokens: bootstrap token files and issued tokens) and what its
//! role lets it do on each route.

use super::error::ApiError;
use crate::store::{Kind, Store};
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sandboxd_api::auth::{Role, TokenInfo};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    /// `token`, `bootstrap` or `anonymous`.
    pub source: &'static str,
}

impl Identity {
    /// The caller of a server without authentication: it may do everything.
    pub fn anonymous() -> Identity {
        Identity { name: "anonymous".into(), role: Role::Admin, source: "anonymous" }
    }

    pub fn bootstrap_admin() -> Identity {
        Identity { name: "admin".into(), role: Role::Admin, source: "bootstrap" }
    }
}

/// Prefix of issued tokens: `sbx_<id>_<secret>`, so a leaked one is recognisable in a scan.
pub const TOKEN_PREFIX: &str = "sbx_";

/// A token from a file, held as its SHA-256.
type BootstrapToken = ([u8; 32], Identity);

/// Checks bearer tokens against the bootstrap tokens and the issued ones in the store.
#[derive(Clone)]
pub struct Authenticator {
    /// `None`: authentication is off and every caller is `anonymous` (insecure listen).
    bootstrap: Option<Arc<Vec<BootstrapToken>>>,
    store: Arc<dyn Store>,
}

impl Authenticator {
    /// No authentication: every request is the anonymous admin.
    pub fn open(store: Arc<dyn Store>) -> Authenticator {
        Authenticator { bootstrap: None, store }
    }

    /// Authentication required; `bootstrap` tokens (from files) are held only as hashes.
    pub fn required(store: Arc<dyn Store>, bootstrap: Vec<(String, Identity)>) -> Authenticator {
        let hashed = bootstrap.into_iter().map(|(token, identity)| (sha256(token.as_bytes()), identity)).collect();
        Authenticator { bootstrap: Some(Arc::new(hashed)), store }
    }

    pub fn is_required(&self) -> bool {
        self.bootstrap.is_some()
    }

    /// The identity behind a request's `Authorization` header.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, ApiError> {
        let Some(bootstrap) = &self.bootstrap else { return Ok(Identity::anonymous()) };
        let token = bearer_token(headers).ok_or(ApiError::Unauthorized)?;
        let hash = sha256(token.as_bytes());
        // Every bootstrap hash is compared, matched or not, so timing says nothing about which.
        let mut found = None;
        for (known, identity) in bootstrap.iter() {
            if bool::from(known.ct_eq(&hash)) && found.is_none() {
                found = Some(identity.clone());
            }
        }
        if let Some(identity) = found {
            return Ok(identity);
        }
        self.issued(token, &hash).await?.ok_or(ApiError::Unauthorized)
    }

    /// The identity of an issued token; `None` when it is not one (or revoked, or expired). Only
    /// a well-formed id costs a store read.
    async fn issued(&self, token: &str, hash: &[u8; 32]) -> Result<Option<Identity>, ApiError> {
        let Some(id) = token_id(token).filter(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())) else {
            return Ok(None);
        };
        let Some(stored) = self.store.get(Kind::Tokens, id).await? else { return Ok(None) };
        let Ok(info) = stored.decode::<TokenInfo>() else { return Ok(None) };
        let Some(known) = from_hex(&info.sha256) else { return Ok(None) };
        if !bool::from(known.ct_eq(hash)) || expired(&info) {
            return Ok(None);
        }
        Ok(Some(Identity { name: info.identity, role: info.role, source: "token" }))
    }
}

fn expired(info: &TokenInfo) -> bool {
    let Some(expires_at) = &info.expires_at else { return false };
    match sandboxd_api::time::parse_rfc3339(expires_at) {
        Some(at) => at <= sandboxd_api::time::unix_now(),
        // A stored expiry that does not parse cannot be honoured: the token is refused.
        None => true,
    }
}

/// The token of `Authorization: Bearer <token>`, the scheme in any case (RFC 9110 §11.1).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The id part of `sbx_<id>_<secret>`.
fn token_id(token: &str) -> Option<&str> {
    let (id, _secret) = token.strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
    (!id.is_empty()).then_some(id)
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A new random token and its id: `sbx_<16 hex>_<64 hex>` from the operating system's generator.
pub fn new_token() -> (String, String) {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    getrandom::fill(&mut id).expect("the operating system's random generator");
    getrandom::fill(&mut secret).expect("the operating system's random generator");
    let id = to_hex(&id);
    (format!("{TOKEN_PREFIX}{id}_{}", to_hex(&secret)), id)
}

/// Who may call a route besides `admin`, who may call everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub user: bool,
    pub controller: bool,
    /// `node:<name>` on routes whose `{name}` is its own.
    pub own_node: bool,
    /// Every authenticated identity.
    pub anyone: bool,
}

const ADMIN: Access = Access { user: false, controller: false, own_node: false, anyone: false };
const ANYONE: Access = Access { anyone: true, ..ADMIN };
const USER: Access = Access { user: true, ..ADMIN };
const CONTROLLER: Access = Access { controller: true, ..ADMIN };
const USER_CONTROLLER: Access = Access { user: true, controller: true, ..ADMIN };
const READ_NODE: Access = Access { user: true, controller: true, own_node: true, anyone: false };
const CONTROLLER_NODE: Access = Access { controller: true, own_node: true, ..ADMIN };

/// Every route of the API and who may call it. A route missing here is refused to all but admin.
pub const RULES: &[(&str, &str, Access)] = &[
    ("GET", "/openapi.json", ANYONE),
    ("GET", "/api/v1/whoami", ANYONE),
    ("GET", "/metrics", CONTROLLER),
    ("POST", "/api/v1/nodes", ADMIN),
    ("GET", "/api/v1/nodes", USER_CONTROLLER),
    ("GET", "/api/v1/nodes/{name}", READ_NODE),
    ("DELETE", "/api/v1/nodes/{name}", ADMIN),
    ("PUT", "/api/v1/nodes/{name}/status", CONTROLLER_NODE),
    ("POST", "/api/v1/nodes/{name}/drain", ADMIN),
    ("POST", "/api/v1/nodes/{name}/heartbeat", CONTROLLER_NODE),
    ("POST", "/api/v1/nodes/{name}/reconcile", CONTROLLER),
    // Straight to an agent, past scheduling and ports: reads for controllers, writes for admins.
    ("GET", "/api/v1/nodes/{name}/sandboxes", CONTROLLER),
    ("POST", "/api/v1/nodes/{name}/sandboxes", ADMIN),
    ("GET", "/api/v1/nodes/{name}/sandboxes/{id}", CONTROLLER),
    ("DELETE", "/api/v1/nodes/{name}/sandboxes/{id}", ADMIN),
    ("GET", "/api/v1/nodes/{name}/sandboxes/{id}/logs", CONTROLLER),
    ("GET", "/api/v1/nodes/{name}/sandboxes/{id}/containers/{container}/logs", CONTROLLER),
    ("POST", "/api/v1/sandboxes", USER),
    ("GET", "/api/v1/sandboxes", USER_CONTROLLER),
    ("GET", "/api/v1/sandboxes/{id}", USER_CONTROLLER),
    ("PUT", "/api/v1/sandboxes/{id}", USER),
    ("DELETE", "/api/v1/sandboxes/{id}", USER),
    ("PUT", "/api/v1/sandboxes/{id}/status", CONTROLLER),
    ("POST", "/api/v1/sandboxes/{id}/finalize", CONTROLLER),
    ("POST", "/api/v1/sandboxes/{id}/exec", USER),
    ("GET", "/api/v1/sandboxes/{id}/exec/stream", USER),
    ("GET", "/api/v1/sandboxes/{id}/files", USER),
    ("PUT", "/api/v1/sandboxes/{id}/files", USER),
    ("DELETE", "/api/v1/sandboxes/{id}/files", USER),
    ("GET", "/api/v1/sandboxes/{id}/files/archive", USER),
    ("PUT", "/api/v1/sandboxes/{id}/files/archive", USER),
    ("GET", "/api/v1/sandboxes/{id}/logs", USER),
    ("POST", "/api/v1/events", CONTROLLER),
    ("GET", "/api/v1/events", USER_CONTROLLER),
    ("POST", "/api/v1/watch", USER_CONTROLLER),
    ("POST", "/api/v1/leases", CONTROLLER),
    ("GET", "/api/v1/leases", CONTROLLER),
    ("GET", "/api/v1/leases/{name}", CONTROLLER),
    ("PUT", "/api/v1/leases/{name}", CONTROLLER),
    ("DELETE", "/api/v1/leases/{name}", CONTROLLER),
    ("POST", "/api/v1/tokens", ADMIN),
    ("GET", "/api/v1/tokens", ADMIN),
    ("DELETE", "/api/v1/tokens/{id}", ADMIN),
];

/// Whether `identity` may call `method route`; `node` is the route's `{name}`, if it has one.
pub fn authorize(identity: &Identity, method: &Method, route: &str, node: Option<&str>) -> Result<(), String> {
    if identity.role == Role::Admin {
        return Ok(());
    }
    let method = if method == Method::HEAD { "GET" } else { method.as_str() };
    let access = RULES.iter().find(|(m, r, _)| *m == method && *r == route).map(|(_, _, a)| *a).unwrap_or(ADMIN);
    let allowed = access.anyone
        || match &identity.role {
            Role::Admin => true,
            Role::User => access.user,
            Role::Controller => access.controller,
            Role::Node(own) => access.own_node && node == Some(own.as_str()),
        };
    if allowed {
        Ok(())
    } else {
        Err(format!("{} ({}) may not {method} {route}", identity.name, identity.role.as_wire()))
    }
}

/// Authenticates every request of a matched route, checks its role against `RULES`, and hands
/// the `Identity` to the handler.
pub async fn guard(
    State(state): State<super::ApiState>,
    route: MatchedPath,
    params: RawPathParams,
    request: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let request_id = request_id(request.headers());
    let authenticated = state.auth.authenticate(request.headers()).await;
    let node = params.iter().find(|(key, _)| *key == "name").map(|(_, value)| value);
    let (identity, mut response) = match authenticated {
        // Refused callers are audited too, as `unauthenticated`: their attempts are what an audit is for.
        Err(e) => (Identity { name: "unauthenticated".into(), role: Role::User, source: "none" }, e.into_response()),
        Ok(identity) => match authorize(&identity, &method, route.as_str(), node) {
            Ok(()) => {
                let response = admit_and_run(&state, &identity, request, next).await;
                (identity, response)
            }
            Err(reason) => (identity, ApiError::Forbidden(reason).into_response()),
        },
    };
    if state.audit.is_on() && super::audit::audited(&method, route.as_str()) {
        let params: Vec<(&str, &str)> = params.iter().collect();
        state.audit.record(super::audit::Record {
            time: sandboxd_api::time::rfc3339_now(),
            request_id: request_id.clone(),
            identity: identity.name,
            role: if identity.source == "none" { String::new() } else { identity.role.as_wire() },
            verb: method.to_string(),
            route: route.as_str().to_string(),
            object: super::audit::object_of(route.as_str(), &params),
            code: response.status().as_u16(),
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }
    if let Ok(value) = axum::http::HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// Admits an authorised request into its priority class (within its identity's share), runs it,
/// and keeps the slot until a streamed answer ends; a full class or share is a 429.
async fn admit_and_run(state: &super::ApiState, identity: &Identity, mut request: Request, next: Next) -> Response {
    use super::shedding;
    let uri = request.uri();
    let class = shedding::classify_for(&identity.role, request.method(), uri.path(), uri.query().unwrap_or(""));
    // No share for the anonymous caller of a server without authentication (it is everyone), nor
    // for controllers: their replicas share one identity and their work is the system's own.
    if request.extensions().get::<super::SystemListener>().is_some()
        && !shedding::serves_on_system_listener(&identity.role, class)
    {
        return ApiError::Forbidden(format!(
            "{} {} is not served on system_listen, which answers controllers, nodes, /metrics and /healthz; send it to the main listener",
            request.method(),
            request.uri().path()
        ))
        .into_response();
    }
    let unshared = identity.source == "anonymous" || identity.role == Role::Controller;
    let share_key = (!unshared).then_some(identity.name.as_str());
    let admission = match state.shedder.admit(class, share_key) {
        Ok(admission) => admission,
        Err(refusal) => return refusal.into_response(),
    };
    let cell = shedding::AdmissionCell::new(admission);
    request.extensions_mut().insert(identity.clone());
    request.extensions_mut().insert(cell.clone());
    let response = next.run(request).await;
    match cell.take() {
        Some(admission) => shedding::hold_until_streamed(class, admission, response),
        // The handler keeps it (a WebSocket session).
        None => response,
    }
}

/// The header a request id travels in, both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// The caller's `X-Request-Id` when it is short and printable, else a new one.
fn request_id(headers: &HeaderMap) -> String {
    let given = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok());
    match given.filter(|id| !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_graphic())) {
        Some(id) => id.to_string(),
        None => {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).expect("the operating system's random generator");
            to_hex(&bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn the_bearer_scheme_matches_in_any_case() {
        assert_eq!(bearer_token(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("BEARER  abc ")), Some("abc"));
        assert_eq!(bearer_token(&headers("Basic abc")), None);
        assert_eq!(bearer_token(&headers("Bearer")), None);
        assert_eq!(bearer_token(&headers("Bearer ")), None);
    }

    #[test]
    fn issued_tokens_carry_their_id_and_a_256_bit_secret() {
        let (token, id) = new_token();
        assert_eq!(token_id(&token), Some(id.as_str()));
        assert_eq!(token.len(), TOKEN_PREFIX.len() + 16 + 1 + 64);
        assert_ne!(new_token().0, token);
        assert_eq!(from_hex(&to_hex(&sha256(b"x"))), Some(sha256(b"x")));
        assert_eq!(token_id("sbx__secret"), None);
        assert_eq!(token_id("plain"), None);
    }

    #[test]
    fn a_node_may_touch_only_its_own_routes() {
        let node = Identity { name: "n1".into(), role: Role::Node("n1".into()), source: "token" };
        let heartbeat = "/api/v1/nodes/{name}/heartbeat";
        assert!(authorize(&node, &Method::POST, heartbeat, Some("n1")).is_ok());
        assert!(authorize(&node, &Method::POST, heartbeat, Some("n2")).is_err());
        assert!(authorize(&node, &Method::GET, "/api/v1/nodes", None).is_err());
        assert!(authorize(&node, &Method::POST, "/api/v1/sandboxes", None).is_err());
    }

    #[test]
    fn routes_without_a_rule_are_for_admins_only() {
        let user = Identity { name: "u".into(), role: Role::User, source: "token" };
        assert!(authorize(&user, &Method::GET, "/api/v1/unlisted", None).is_err());
        assert!(authorize(&Identity::bootstrap_admin(), &Method::GET, "/api/v1/unlisted", None).is_ok());
    }
}
