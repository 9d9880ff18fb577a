//! sbxlet: the sandboxd-o node agent, with a real runtime (runc) and a simulated one, plus a fleet
//! launcher for tests.
#![forbid(unsafe_code)]

mod admission;
mod agent;
pub mod auth;
mod backend;
pub mod cli;
mod config;
mod dataplane;
pub mod error;
mod exec;
mod faults;
pub mod files;
mod fleet;
pub mod metrics;
mod ports;
pub mod runc;
mod server;
mod sim;

pub use agent::{start, AgentHandle};
pub use backend::DataPlaneLimits;
pub use config::SimConfig;
pub use faults::Faults;
pub use fleet::{start_fleet, Fleet, FleetConfig, FleetError};
