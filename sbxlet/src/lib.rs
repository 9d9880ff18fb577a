//! sbxlet: the sandboxd-o node agent, here with a simulated runtime, plus a fleet launcher for tests.
#![forbid(unsafe_code)]

mod agent;
pub mod cli;
mod config;
mod faults;
mod fleet;
mod ports;
mod server;
mod sim;

pub use agent::{start, AgentHandle};
pub use config::SimConfig;
pub use faults::Faults;
pub use fleet::{start_fleet, Fleet, FleetConfig, FleetError};
