//! Delivering through Prefect API outages: a report (a state, an `infrastructure_pid`, a read
//! a submission cannot do without) made while the API is unreachable or answering 5xx is
//! retried with backoff until the API answers, so it is delivered, in order, once the outage
//! is over. Shutdown bounds it: when the shutdown grace ends, what is still pending gives up.

use std::time::Duration;

use super::Worker;
use crate::backoff::Backoff;
use crate::prefect::ApiError;

/// Retry delays through an outage: 1 s doubling to 30 s.
pub(crate) fn outage_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
}

impl Worker {
    /// Runs `op` until it succeeds or fails with a non-transient error (returned at once).
    /// Transient failures (no answer, 5xx — after the client's own retries) are retried until
    /// the API answers, or until the shutdown grace is over (then the last error is returned).
    pub(crate) async fn through_outage<T, F, Fut>(
        &self,
        what: &str,
        mut op: F,
    ) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let mut backoff = outage_backoff();
        let mut failures = 0u32;
        loop {
            match op().await {
                Ok(value) => {
                    if failures > 0 {
                        tracing::info!(what, failures, "Prefect API reachable again; delivered");
                    }
                    return Ok(value);
                }
                Err(e) if e.is_transient() => {
                    self.out.metrics.api_error(&e);
                    self.api_health.failed();
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(what, error = %e, "Prefect API unavailable; keeping this report and retrying until it is delivered");
                    }
                    let mut recoveries = self.api_health.recoveries();
                    tokio::select! {
                        more = backoff.wait(&self.lifetime.abandon) => if !more {
                            tracing::warn!(what, error = %e, "shutdown grace over; giving up on this report");
                            return Err(e);
                        },
                        // The probe saw the API answer: deliver now rather than after the delay.
                        () = super::api_health::recovered(&mut recoveries) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}
