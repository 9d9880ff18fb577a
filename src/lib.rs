//! sandboxd-o: the store, the HTTP API, the agent client and the wiring of the controllers.
#![forbid(unsafe_code)]

pub mod config;
pub mod store;
pub mod apiserver;
pub mod server;
