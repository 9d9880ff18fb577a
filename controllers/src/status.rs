//! The sandbox status write the controllers share (sandbox, prober, ttl): CAS on the version read,
//! and one info line per phase change.

use crate::objects::{ObjectClient, ObjectError};
use sandboxd_api::{Sandbox, SandboxStatus};

/// Writes a sandbox's new status with CAS, logging a phase change once at info level.
pub async fn write_status(
    objects: &dyn ObjectClient,
    sandbox: &Sandbox,
    status: SandboxStatus,
) -> Result<Sandbox, ObjectError> {
    let written = objects.put_sandbox_status(&sandbox.id, &status, &sandbox.resource_version).await?;
    if sandbox.status.phase != status.phase {
        tracing::info!(
            sandbox = %sandbox.id,
            node = status.node_name.as_deref().unwrap_or(""),
            from = sandbox.status.phase.as_str(),
            to = status.phase.as_str(),
            reason = status.reason.as_deref().unwrap_or(""),
            "sandbox phase changed"
        );
    }
    Ok(written)
}
