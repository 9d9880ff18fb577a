//! The lifecycle of a simulated sandbox, computed from its creation instant rather than by timers.

use sandboxd_api::agent::{AgentContainer, AgentPhase};
use std::time::{Duration, Instant};

/// The phase of a sandbox created at `created` as seen at `now`.
///
/// A recorded failure wins; otherwise the sandbox is `creating` until `create_delay` has elapsed.
pub fn phase_at(created: Instant, now: Instant, create_delay: Duration, failure: Option<&str>) -> AgentPhase {
    if failure.is_some() {
        return AgentPhase::Failed;
    }
    if now.saturating_duration_since(created) < create_delay {
        AgentPhase::Creating
    } else {
        AgentPhase::Running
    }
}

/// The state of one container of a sandbox in `phase`.
pub fn container_in(name: &str, phase: AgentPhase) -> AgentContainer {
    let (state, exit_code) = match phase {
        AgentPhase::Creating => ("waiting", None),
        AgentPhase::Running => ("running", None),
        AgentPhase::Failed => ("terminated", Some(1)),
        AgentPhase::Exited | AgentPhase::Deleting | AgentPhase::Deleted => ("terminated", Some(0)),
    };
    AgentContainer { name: name.to_string(), state: state.into(), restart_count: 0, exit_code, reason: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creating_until_the_delay_has_elapsed_then_running() {
        let t0 = Instant::now();
        let delay = Duration::from_secs(2);
        assert_eq!(phase_at(t0, t0, delay, None), AgentPhase::Creating);
        assert_eq!(phase_at(t0, t0 + Duration::from_millis(1999), delay, None), AgentPhase::Creating);
        assert_eq!(phase_at(t0, t0 + delay, delay, None), AgentPhase::Running);
        assert_eq!(phase_at(t0, t0 + Duration::from_secs(60), delay, None), AgentPhase::Running);
    }

    #[test]
    fn zero_delay_is_running_at_once() {
        let t0 = Instant::now();
        assert_eq!(phase_at(t0, t0, Duration::ZERO, None), AgentPhase::Running);
    }

    #[test]
    fn a_failure_wins_over_the_clock() {
        let t0 = Instant::now();
        let delay = Duration::from_secs(5);
        assert_eq!(phase_at(t0, t0, delay, Some("oom")), AgentPhase::Failed);
        assert_eq!(phase_at(t0, t0 + delay, delay, Some("oom")), AgentPhase::Failed);
    }

    #[test]
    fn containers_follow_the_sandbox_phase() {
        assert_eq!(container_in("web", AgentPhase::Creating).state, "waiting");
        assert_eq!(container_in("web", AgentPhase::Running).state, "running");
        let failed = container_in("web", AgentPhase::Failed);
        assert_eq!((failed.state.as_str(), failed.exit_code), ("terminated", Some(1)));
    }
}
