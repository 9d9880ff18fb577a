//! Configuration of one simulated agent, with every default in one place.

use crate::faults::Faults;
use sandboxd_api::{RuntimeClass, RuntimeClasses};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Everything one simulated agent needs to start.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Address of the agent API; published ports bind on the same IP. Port 0 picks a free port.
    pub listen: SocketAddr,
    pub capacity_cpu_milli: u64,
    pub capacity_memory_bytes: u64,
    /// Address clients outside the cluster use, reported in `/api/v1/status`; may be empty.
    pub external: String,
    /// How long a new sandbox stays `creating` before it is `running`.
    pub create_delay: Duration,
    /// IPv4 CIDR private sandbox addresses are taken from.
    pub ip_pool: String,
    /// Faults active from the start.
    pub faults: Faults,
    /// Count every admission per id for `AgentHandle::admissions` (tests). It keeps one entry per id
    /// ever admitted, so it is off for real agents, which run for months.
    pub record_admissions: bool,
    /// Every route but `/healthz` needs this bearer token; `None`: none is asked for.
    pub token: Option<String>,
    /// Serve the `/sim/*` routes (faults, restart, fail): off unless asked for (the binary's
    /// `--enable-fault-injection`, on a loopback address).
    pub fault_injection: bool,
    /// The runtime classes the agent claims to run (a simulator runs any).
    pub runtime_classes: RuntimeClasses,
    /// Serve the process's `process_*` series on `/metrics`: only where the agent is the process
    /// (the `sbxlet` binary), not where several agents or a server share it (a fleet, demo agents).
    pub process_metrics: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            capacity_cpu_milli: 4000,
            capacity_memory_bytes: 16 << 30,
            external: String::new(),
            create_delay: Duration::ZERO,
            ip_pool: "10.88.0.0/16".into(),
            faults: Faults::default(),
            record_admissions: false,
            token: None,
            fault_injection: false,
            runtime_classes: RuntimeClass::ALL.into_iter().collect(),
            process_metrics: false,
        }
    }
}
