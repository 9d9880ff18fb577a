//! Wire types of identities, roles and API tokens.

use serde::{Deserialize, Serialize};

/// What an identity may do. On the wire: `admin`, `user`, `controller` or `node:<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything.
    Admin,
    /// Sandboxes and their data plane, nodes read-only; no status writes, no leases.
    User,
    /// Status writes, leases and reads: the controllers' role.
    Controller,
    /// One node: its own heartbeat, and the parts of its status its agent reports.
    Node(String),
}

impl Role {
    /// The role's wire form.
    pub fn as_wire(&self) -> String {
        match self {
            Role::Admin => "admin".into(),
            Role::User => "user".into(),
            Role::Controller => "controller".into(),
            Role::Node(name) => format!("node:{name}"),
        }
    }

    /// Parses the wire form; a node role's name must be a valid object name.
    pub fn parse(text: &str) -> Result<Role, String> {
        match text {
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            "controller" => Ok(Role::Controller),
            _ => match text.strip_prefix("node:") {
                Some(name) => {
                    crate::validate::validate_name("role", name).map_err(|e| e.to_string())?;
                    Ok(Role::Node(name.to_string()))
                }
                None => Err(format!("role: {text:?} is not admin, user, controller or node:<name>")),
            },
        }
    }
}

impl Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.as_wire())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Role::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Who a request comes from, as `GET /api/v1/whoami` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WhoAmI {
    /// The identity's name; leases it writes must name it as holder.
    pub identity: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "user"))]
    pub role: Role,
    /// Where the credential comes from: `token` (issued), `bootstrap` (a token file) or `anonymous`
    /// (a server without authentication).
    pub source: String,
}

/// Body of `POST /api/v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Name of the identity the token authenticates (an object name).
    pub identity: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "user"))]
    pub role: Role,
    /// The token stops working this many seconds after it is issued; absent: it works until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 315360000))]
    pub ttl_seconds: Option<u64>,
    /// Free text for people: who holds the token and why.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// Longest token lifetime: ten years.
pub const MAX_TOKEN_TTL_SECONDS: u64 = 315_360_000;
/// Longest token description.
pub const MAX_TOKEN_DESCRIPTION: usize = 256;

/// An issued token as stored and listed: never the secret, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenInfo {
    /// The token's id, also its first part: `sbx_<id>_<secret>`.
    pub id: String,
    pub identity: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "user"))]
    pub role: Role,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Identity that issued it.
    pub issued_by: String,
    /// Hex SHA-256 of the whole token; listed so that an operator can match a leaked token without
    /// the server ever storing it.
    pub sha256: String,
}

/// Answer of `POST /api/v1/tokens`: the token itself, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IssuedToken {
    pub token: String,
    pub info: TokenInfo,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_their_wire_form() {
        for role in [Role::Admin, Role::User, Role::Controller, Role::Node("n-1".into())] {
            assert_eq!(Role::parse(&role.as_wire()), Ok(role.clone()));
        }
    }

    #[test]
    fn unknown_roles_and_bad_node_names_are_refused() {
        assert!(Role::parse("root").is_err());
        assert!(Role::parse("node:").is_err());
        assert!(Role::parse("node:Bad_Name").is_err());
        assert!(Role::parse("Admin").is_err());
    }
}
