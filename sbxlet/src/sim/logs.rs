//! Synthetic container logs, derived from the spec and phase on every read.

use sandboxd_api::agent::AgentPhase;
use sandboxd_api::Container;

/// The log lines of one container, without a prefix.
pub fn container_lines(container: &Container, phase: AgentPhase, failure: Option<&str>) -> Vec<String> {
    let mut lines = vec![
        format!("pulling image {}", container.image),
        format!("pulled image {}", container.image),
        format!("created container {}", container.name),
    ];
    if phase == AgentPhase::Creating {
        return lines;
    }
    lines.push("started".into());
    if !container.args.is_empty() {
        lines.push(format!("running {}", container.args.join(" ")));
    }
    if let Some(message) = failure {
        lines.push(format!("failed: {message}"));
    }
    lines
}

/// Every container's lines, each prefixed with `[name] `.
pub fn sandbox_lines(containers: &[Container], phase: AgentPhase, failure: Option<&str>) -> Vec<String> {
    containers
        .iter()
        .flat_map(|c| container_lines(c, phase, failure).into_iter().map(move |l| format!("[{}] {l}", c.name)))
        .collect()
}

/// Keeps only the last `tail` lines when a tail is asked for.
pub fn keep_tail(mut lines: Vec<String>, tail: Option<usize>) -> Vec<String> {
    if let Some(n) = tail {
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, image: &str) -> Container {
        Container {
            name: name.into(),
            image: image.into(),
            args: vec![],
            env: vec![],
            work_dir: String::new(),
            resource: None,
        }
    }

    #[test]
    fn running_container_has_pulled_and_started_lines() {
        let lines = container_lines(&container("web", "nginx:latest"), AgentPhase::Running, None);
        assert!(lines.contains(&"pulled image nginx:latest".to_string()), "{lines:?}");
        assert_eq!(lines.last().map(String::as_str), Some("started"));
    }

    #[test]
    fn creating_container_has_not_started() {
        let lines = container_lines(&container("web", "nginx"), AgentPhase::Creating, None);
        assert!(!lines.iter().any(|l| l == "started"), "{lines:?}");
    }

    #[test]
    fn failure_message_is_logged() {
        let lines = container_lines(&container("web", "nginx"), AgentPhase::Failed, Some("oom killed"));
        assert_eq!(lines.last().map(String::as_str), Some("failed: oom killed"));
    }

    #[test]
    fn sandbox_lines_are_prefixed_per_container_in_order() {
        let cs = [container("web", "nginx"), container("db", "postgres")];
        let lines = sandbox_lines(&cs, AgentPhase::Running, None);
        assert!(lines.iter().take(4).all(|l| l.starts_with("[web] ")), "{lines:?}");
        assert!(lines.iter().skip(4).all(|l| l.starts_with("[db] ")), "{lines:?}");
        assert_eq!(lines.len(), 8);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let lines: Vec<String> = (0..5).map(|i| i.to_string()).collect();
        assert_eq!(keep_tail(lines.clone(), Some(2)), vec!["3", "4"]);
        assert_eq!(keep_tail(lines.clone(), Some(0)), Vec::<String>::new());
        assert_eq!(keep_tail(lines.clone(), Some(99)).len(), 5);
        assert_eq!(keep_tail(lines, None).len(), 5);
    }
}
