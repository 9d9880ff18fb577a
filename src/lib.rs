//! sandboxd-o: the store, the HTTP API, the agent client and the wiring of the controllers.
#![forbid(unsafe_code)]

pub mod address_policy;
pub mod agent_client;
pub mod apiserver;
pub mod config;
pub mod controllers;
pub mod http_server;
pub mod metrics;
pub mod objects;
pub mod registry;
pub mod server;
pub mod store;
pub mod tls;
