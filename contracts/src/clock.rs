//! Wall-clock time as the API writes it (Unix seconds, RFC 3339 UTC), and the `Clock` controllers
//! read it through, so time-driven rules run on tokio's paused time in tests.
//! The clock functions are defined once in `sandboxd_api::time` and re-exported here.

pub use sandboxd_api::time::{rfc3339_now, unix_now};

/// Where a controller reads wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// Seconds since the Unix epoch.
    fn unix_now(&self) -> i64;

    /// The same instant as the API writes timestamps (RFC 3339 UTC, whole seconds).
    fn rfc3339_now(&self) -> String {
        sandboxd_api::time::format_unix(self.unix_now())
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_now(&self) -> i64 {
        unix_now()
    }
}

/// A wall clock that starts at `start_unix` and then follows tokio's clock, so a test on paused time
/// moves it with `tokio::time::advance`.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start_unix: i64,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// Starts at `start_unix` now (read `tokio::time::Instant::now()` inside the runtime).
    pub fn starting_at(start_unix: i64) -> TokioClock {
        TokioClock { start_unix, start: tokio::time::Instant::now() }
    }
}

impl Clock for TokioClock {
    fn unix_now(&self) -> i64 {
        self.start_unix + self.start.elapsed().as_secs() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_moves_with_paused_time_only() {
        let clock = TokioClock::starting_at(1_000);
        assert_eq!(clock.unix_now(), 1_000);
        tokio::time::advance(std::time::Duration::from_secs(61)).await;
        assert_eq!(clock.unix_now(), 1_061);
    }
}
