//! Admission rules every runtime applies before it takes a sandbox: the agent offers its runtime
//! class, its host ports are free on this agent, and the agent has room for its requests.

use crate::error::RuntimeError;
use sandboxd_api::agent::{AgentCreateRequest, AgentPort};
use sandboxd_api::RuntimeClasses;

/// Fails when the agent cannot run the request's runtime class (it was not found at the agent's start).
pub(crate) fn check_runtime_class(offered: RuntimeClasses, request: &AgentCreateRequest) -> Result<(), RuntimeError> {
    if offered.contains(request.runtime_class) {
        return Ok(());
    }
    Err(RuntimeError::Invalid(format!(
        "runtime class {} is not offered by this node (it offers: {})",
        request.runtime_class,
        offered.names().join(", ")
    )))
}

/// Fails with the first host port of `request` that a held sandbox already uses (per protocol).
pub(crate) fn check_ports_free<'a>(
    held: impl IntoIterator<Item = (&'a String, &'a [AgentPort])>,
    request: &AgentCreateRequest,
) -> Result<(), RuntimeError> {
    let held: Vec<(&String, &[AgentPort])> = held.into_iter().collect();
    for wanted in &request.ports {
        let owner = held
            .iter()
            .find(|(_, ports)| ports.iter().any(|p| p.host_port == wanted.host_port && p.protocol == wanted.protocol));
        if let Some((owner, _)) = owner {
            return Err(RuntimeError::PortTaken {
                port: wanted.host_port,
                protocol: wanted.protocol,
                owner: owner.to_string(),
            });
        }
    }
    Ok(())
}

/// Fails when `requested` (cpu millicores, memory bytes) does not fit `capacity` less `used`.
pub(crate) fn check_capacity(
    capacity: (u64, u64),
    used: (u64, u64),
    requested: (u64, u64),
) -> Result<(), RuntimeError> {
    let available_cpu = capacity.0.saturating_sub(used.0);
    if requested.0 > available_cpu {
        return Err(RuntimeError::InsufficientCpu {
            requested: requested.0,
            available: available_cpu,
            capacity: capacity.0,
        });
    }
    let available_memory = capacity.1.saturating_sub(used.1);
    if requested.1 > available_memory {
        return Err(RuntimeError::InsufficientMemory {
            requested: requested.1,
            available: available_memory,
            capacity: capacity.1,
        });
    }
    Ok(())
}
