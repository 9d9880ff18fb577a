//! Informer reconnect backoff: jittered doubling from 0.8 s up to 30 s.

use std::time::Duration;

use tokio::time::Instant;

/// Tuning for [`Backoff`]; the defaults are the informer reconnect policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Ceiling for any single delay, jitter included.
    pub max: Duration,
    /// Fraction each delay moves up or down at random, so replicas don't reconnect in lockstep.
    pub jitter: f64,
    /// How long a connection must stay healthy before the backoff starts over.
    pub healthy_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(800),
            max: Duration::from_secs(30),
            jitter: 0.2,
            healthy_after: Duration::from_secs(2 * 60),
        }
    }
}

/// Jittered exponential backoff between reconnect attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    /// The next delay before jitter.
    nominal: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    /// Creates a backoff that starts at `config.initial`.
    pub fn new(config: BackoffConfig) -> Self {
        Self { nominal: config.initial.min(config.max), config, rng: fastrand::Rng::new() }
    }

    /// Returns the delay before the next attempt and doubles the one after it.
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.nominal;
        self.nominal = nominal.saturating_mul(2).min(self.config.max);
        self.jittered(nominal)
    }

    /// Starts over at the initial delay.
    pub fn reset(&mut self) {
        self.nominal = self.config.initial.min(self.config.max);
    }

    /// Starts over if the connection has been healthy since `since` for `healthy_after`; returns whether it did.
    pub fn reset_if_healthy_since(&mut self, since: Instant) -> bool {
        let healthy = since.elapsed() >= self.config.healthy_after;
        if healthy {
            self.reset();
        }
        healthy
    }

    fn jittered(&mut self, nominal: Duration) -> Duration {
        let spread = self.config.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + spread * (2.0 * self.rng.f64() - 1.0);
        nominal.mul_f64(factor).min(self.config.max)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BackoffConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn without_jitter() -> Backoff {
        Backoff::new(BackoffConfig { jitter: 0.0, ..BackoffConfig::default() })
    }

    fn within_jitter(delay: Duration, nominal: Duration) -> bool {
        let (low, high) = (nominal.mul_f64(0.8), nominal.mul_f64(1.2));
        (low..=high).contains(&delay)
    }

    #[test]
    fn backoff_doubles_from_800ms_to_30s_cap() {
        let mut backoff = without_jitter();
        let delays: Vec<_> = (0..8).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [800, 1_600, 3_200, 6_400, 12_800, 25_600, 30_000, 30_000]);
    }

    #[test]
    fn backoff_jitter_stays_within_twenty_percent() {
        let mut delays = Vec::new();
        for _ in 0..200 {
            let mut backoff = Backoff::default();
            let delay = backoff.next_delay();
            assert!(within_jitter(delay, Duration::from_millis(800)), "{delay:?}");
            delays.push(delay);
        }
        delays.dedup();
        assert!(delays.len() > 1, "no jitter applied");
    }

    #[test]
    fn backoff_jitter_never_exceeds_cap() {
        let mut backoff = Backoff::default();
        let delays: Vec<_> = (0..100).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|&delay| delay <= Duration::from_secs(30)));
        assert!(within_jitter(delays[99], Duration::from_secs(30)));
    }

    #[test]
    fn backoff_reset_restarts_at_initial() {
        let mut backoff = without_jitter();
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(800));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_resets_only_after_two_healthy_minutes() {
        let mut backoff = without_jitter();
        for _ in 0..10 {
            backoff.next_delay();
        }
        let connected_at = Instant::now();

        advance(Duration::from_secs(119)).await;
        assert!(!backoff.reset_if_healthy_since(connected_at));
        assert_eq!(backoff.next_delay(), Duration::from_secs(30));

        advance(Duration::from_secs(1)).await;
        assert!(backoff.reset_if_healthy_since(connected_at));
        assert_eq!(backoff.next_delay(), Duration::from_millis(800));
    }
}
