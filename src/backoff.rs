//! The one retry schedule of the worker: every loop that retries (API outages, reconnecting
//! websockets and Engine streams, waiting out a Docker restart) takes its delays from a
//! [`Backoff`] and sleeps through [`Backoff::wait`], which gives up as soon as shutdown is
//! asked for. So no retry can hold the process up after SIGTERM, and the schedules are
//! written down in one place.
//!
//! The delays come from `backon`'s exponential builder (a well-kept crate, so the doubling,
//! capping and jitter are not hand-written once per loop); this module adds the shutdown
//! select and the "reset after a success" that long-lived loops need.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// Doubling delays from `min` to `max`, forever, optionally jittered.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    /// The cap, for when the builder's iterator is exhausted (it never is without max times).
    max: Duration,
}

impl Backoff {
    /// Delays `min`, `2·min`, `4·min` … capped at `max`, with no end.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            max,
        }
    }

    /// The same schedule with a random jitter added to each delay (up to the delay itself),
    /// so many clients of one server do not retry in step.
    pub fn jittered(min: Duration, max: Duration) -> Self {
        let mut backoff = Self::new(min, max);
        backoff.builder = backoff.builder.with_jitter();
        backoff.delays = backoff.builder.build();
        backoff
    }

    /// The next delay of the schedule.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max)
    }

    /// Starts the schedule again from `min` (after a success).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }

    /// Sleeps the next delay; `false` when `shutdown` was cancelled first (the caller stops).
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next_delay();
        sleep(delay, shutdown).await
    }
}

/// Sleeps `delay`; `false` when `shutdown` was cancelled first.
pub async fn sleep(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = shutdown.cancelled() => false,
    }
}

/// After this many consecutive failures a periodic loop starts stretching its interval.
const FAILURES_BEFORE_BACKOFF: u32 = 3;
/// The longest stretch of a periodic loop's interval (2^4 × interval).
const MAX_STRETCH_EXPONENT: u32 = 4;

/// The interval of a periodic loop (poll, pool sync) after `failures` consecutive failures:
/// `base` as it is for the first few, then doubled per failure up to 16 × `base`. Periodic
/// loops keep their own rhythm (and jitter, see [`crate::worker::clamped_poisson_interval`])
/// and only stretch it when the API keeps failing.
pub fn stretched(base: Duration, failures: u32) -> Duration {
    if failures < FAILURES_BEFORE_BACKOFF {
        return base;
    }
    let exponent = (failures - FAILURES_BEFORE_BACKOFF + 1).min(MAX_STRETCH_EXPONENT);
    base * 2u32.pow(exponent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let delays: Vec<u64> = (0..7).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 30, 30]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_between_the_delay_and_twice_it() {
        let mut b = Backoff::jittered(Duration::from_secs(1), Duration::from_secs(8));
        for expected in [1u64, 2, 4, 8, 8] {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_secs(expected) && d <= Duration::from_secs(2 * expected),
                "{d:?} for {expected}"
            );
        }
    }

    #[test]
    fn stretched_grows_after_three_failures_and_caps() {
        let i = Duration::from_secs(10);
        assert_eq!(stretched(i, 2), i);
        assert_eq!(stretched(i, 3), i * 2);
        assert_eq!(stretched(i, 100), i * 16);
    }

    #[tokio::test]
    async fn wait_ends_at_once_on_shutdown() {
        let mut b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        // An hour-long sleep cannot have finished: `false` means shutdown won.
        assert!(!b.wait(&shutdown).await);
    }
}
