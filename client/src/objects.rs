//! The HTTP `ObjectClient` and `LeaseClient`: controllers in their own process, against a remote API server.

use crate::{Client, ClientError};
use async_trait::async_trait;
use futures::StreamExt;
use reqwest::Method;
use sandboxd_api::node::NodeStatus;
use sandboxd_api::{EventType, Lease, Node, Sandbox, SandboxStatus};
use sandboxd_contracts::objects::{ObjectClient, ObjectError, ObjectKind, ObjectResult, RawEvent, RawWatch};
use sandboxd_contracts::LeaseClient;
use serde_json::{json, Value};

/// Controllers' view of a remote API server.
#[derive(Clone)]
pub struct HttpObjects {
    client: Client,
}

impl HttpObjects {
    pub fn new(client: Client) -> HttpObjects {
        HttpObjects { client }
    }
}

fn object_error(e: ClientError) -> ObjectError {
    let message = e.to_string();
    match e.status() {
        Some(409) => ObjectError::Conflict(message),
        Some(404) => ObjectError::NotFound(message),
        Some(410) => ObjectError::Gone(message),
        Some(400) => ObjectError::Invalid(message),
        _ => ObjectError::Unavailable(message),
    }
}

fn decode<T: serde::de::DeserializeOwned>(value: Value) -> ObjectResult<T> {
    serde_json::from_value(value).map_err(|e| ObjectError::Unavailable(format!("unexpected answer: {e}")))
}

impl HttpObjects {
    async fn get_optional(&self, path: &str, key: &str) -> ObjectResult<Option<Value>> {
        match self.client.call::<Value>(Method::GET, path, None).await {
            Ok((_, mut body)) => Ok(Some(body[key].take())),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(object_error(e)),
        }
    }

    async fn send(&self, method: Method, path: &str, body: &Value, key: &str) -> ObjectResult<Value> {
        let (_, mut answer) = self.client.call::<Value>(method, path, Some(body)).await.map_err(object_error)?;
        Ok(answer[key].take())
    }
}

#[async_trait]
impl ObjectClient for HttpObjects {
    async fn list(&self, kind: ObjectKind) -> ObjectResult<(Vec<Vec<u8>>, u64)> {
        let (_, body) = self
            .client
            .call::<Value>(Method::GET, &format!("/api/v1/{}", kind.as_str()), None)
            .await
            .map_err(object_error)?;
        let revision = body["resource_version"]
            .as_str()
            .and_then(|rv| rv.parse().ok())
            .ok_or_else(|| ObjectError::Unavailable("list without resource_version".into()))?;
        let items = body["items"].as_array().cloned().unwrap_or_default();
        let raw = items.iter().map(|item| serde_json::to_vec(item).expect("values serialize")).collect();
        Ok((raw, revision))
    }

    async fn watch(&self, kind: ObjectKind, from: u64) -> ObjectResult<RawWatch> {
        let stream = self.client.watch(kind.as_str(), Some(&from.to_string())).await.map_err(object_error)?;
        Ok(stream
            .map(|event| {
                let event = event.map_err(object_error)?;
                let raw = || serde_json::to_vec(&event.object).expect("values serialize");
                match event.event_type {
                    EventType::Added => Ok(RawEvent::Added(raw())),
                    EventType::Modified => Ok(RawEvent::Modified(raw())),
                    EventType::Deleted => Ok(RawEvent::Deleted(raw())),
                    EventType::Bookmark => {
                        let rv = event.object["resource_version"].as_str().and_then(|rv| rv.parse().ok()).unwrap_or(0);
                        Ok(RawEvent::Bookmark(rv))
                    }
                    EventType::Error => {
                        let message = event.object["error"].as_str().unwrap_or("watch error").to_string();
                        if event.object["code"] == 410 {
                            Err(ObjectError::Gone(message))
                        } else {
                            Err(ObjectError::Unavailable(message))
                        }
                    }
                }
            })
            .boxed())
    }

    async fn get_node(&self, name: &str) -> ObjectResult<Option<Node>> {
        self.get_optional(&format!("/api/v1/nodes/{name}"), "node").await?.map(decode).transpose()
    }

    async fn get_sandbox(&self, id: &str) -> ObjectResult<Option<Sandbox>> {
        self.get_optional(&format!("/api/v1/sandboxes/{id}"), "sandbox").await?.map(decode).transpose()
    }

    async fn put_node_status(&self, name: &str, status: &NodeStatus, resource_version: &str) -> ObjectResult<Node> {
        let body = json!({ "resource_version": resource_version, "status": status });
        decode(self.send(Method::PUT, &format!("/api/v1/nodes/{name}/status"), &body, "node").await?)
    }

    async fn put_sandbox_status(
        &self,
        id: &str,
        status: &SandboxStatus,
        resource_version: &str,
    ) -> ObjectResult<Sandbox> {
        let body = json!({ "resource_version": resource_version, "status": status });
        decode(self.send(Method::PUT, &format!("/api/v1/sandboxes/{id}/status"), &body, "sandbox").await?)
    }

    async fn remove_sandbox(&self, id: &str, resource_version: &str) -> ObjectResult<()> {
        let body = json!({ "resource_version": resource_version });
        self.send(Method::POST, &format!("/api/v1/sandboxes/{id}/finalize"), &body, "deleted").await.map(|_| ())
    }

    async fn record_events(&self, events: &[sandboxd_api::event::EventRecord]) -> ObjectResult<()> {
        let body = json!({ "events": events });
        self.send(Method::POST, "/api/v1/events", &body, "recorded").await.map(|_| ())
    }
}

#[async_trait]
impl LeaseClient for HttpObjects {
    async fn get_lease(&self, name: &str) -> ObjectResult<Option<Lease>> {
        self.get_optional(&format!("/api/v1/leases/{name}"), "lease").await?.map(decode).transpose()
    }

    async fn create_lease(&self, lease: &Lease) -> ObjectResult<Lease> {
        let body = serde_json::to_value(lease).expect("leases serialize");
        decode(self.send(Method::POST, "/api/v1/leases", &body, "lease").await?)
    }

    async fn update_lease(&self, lease: &Lease) -> ObjectResult<Lease> {
        let body = serde_json::to_value(lease).expect("leases serialize");
        decode(self.send(Method::PUT, &format!("/api/v1/leases/{}", lease.name), &body, "lease").await?)
    }
}
