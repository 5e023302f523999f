//! Polling for scheduled runs: every `PREFECT_WORKER_QUERY_SECONDS` (jittered, stretched while
//! the API keeps failing), sooner when the registry is woken (a run became due, a slot freed
//! after a poll had to leave runs behind). Each due run the registry admits gets its own
//! lifecycle task.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::api_health::recovered;
use super::registry::Admission;
use super::{PoolRef, Worker, WorkerError, lifecycle};
use crate::backoff;
use crate::prefect::{ApiError, FlowRun, WorkPool};

impl Worker {
    /// Polls until `shutdown`; `first` = runs already fetched at start-up. While the API
    /// fails, the poll waits out a stretched interval, but polls at once when the API probe
    /// sees the server answer again (cutting short a poll still stuck in retries).
    pub(super) async fn poll_loop(
        self: &Arc<Self>,
        mut first: Option<Vec<FlowRun>>,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        let mut failures = 0;
        let mut adopted = false;
        let mut recoveries = self.api_health.recoveries();
        loop {
            let polled = tokio::select! {
                r = self.poll_with(first.take(), &mut adopted) => Some(r),
                () = recovered(&mut recoveries), if failures > 0 => None,
            };
            match polled {
                None => {
                    tracing::debug!("the Prefect API is back; polling again at once");
                    continue;
                }
                Some(Ok(_)) => {
                    failures = 0;
                    self.api_health.succeeded();
                }
                Some(Err(e)) if e.is_auth() => return Err(WorkerError::Unauthorized(e)),
                Some(Err(e)) => {
                    failures += 1;
                    if e.is_transient() {
                        self.api_health.failed();
                    }
                    self.out.metrics.api_error(&e);
                    tracing::warn!(error = %e, consecutive_failures = failures, "polling for flow runs failed");
                }
            }
            let interval = super::clamped_poisson_interval(self.settings.polling.query_interval);
            let delay = backoff::stretched(interval, failures);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.registry.poll_wanted(), if failures == 0 => {
                    tracing::debug!("polling early: a run became due or a slot freed");
                }
                () = recovered(&mut recoveries), if failures > 0 => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// One poll (`--run-once`). Returns how many runs were taken on.
    pub(super) async fn poll_once(self: &Arc<Self>) -> Result<usize, ApiError> {
        self.poll_with(None, &mut false).await
    }

    /// `POST /work_pools/{pool}/get_scheduled_flow_runs` for runs due within the prefetch.
    /// With `--limit N`, at most N: no poll can take on more (the runs it holds that are still
    /// Scheduled and the free slots make at most N), and every run in the answer costs the
    /// server (the 50 runs of a burst: ≈ 85 ms of its CPU per poll on PostgreSQL).
    pub(super) async fn fetch_scheduled_runs(&self, pool: &str) -> Result<Vec<FlowRun>, ApiError> {
        let prefetch = chrono::Duration::from_std(self.settings.polling.prefetch)
            .unwrap_or_else(|_| chrono::Duration::days(365));
        let scheduled_before = chrono::Utc::now() + prefetch;
        let started = std::time::Instant::now();
        let runs = self
            .api
            .get_scheduled_flow_runs(
                pool,
                &self.settings.work_queues,
                scheduled_before,
                self.settings.polling.limit,
            )
            .await?;
        self.out.metrics.polled(started.elapsed());
        tracing::debug!(count = runs.len(), "polled for scheduled flow runs");
        Ok(runs)
    }

    /// One poll: `prefetched` runs (from start-up's overlapped poll) or freshly fetched ones.
    /// The first successful one reconciles first (adopting what an earlier process left).
    async fn poll_with(
        self: &Arc<Self>,
        prefetched: Option<Vec<FlowRun>>,
        adopted: &mut bool,
    ) -> Result<usize, ApiError> {
        let Some(pool) = self.synced_pool().await? else {
            return Ok(0);
        };
        if !*adopted {
            self.reconcile(&pool).await?;
            *adopted = true;
        }
        let runs = match prefetched {
            Some(runs) => runs,
            None => self.fetch_scheduled_runs(&pool.name).await?,
        };
        if self.lifetime.draining() {
            // Polled only to show the worker is alive (`/health`): nothing new is claimed.
            return Ok(0);
        }
        if !runs.is_empty() && (!self.memory_allows_claims() || !self.engine_answers().await) {
            return Ok(0);
        }
        Ok(self.take_on(runs, &pool))
    }

    /// The pool; with no successful sync yet, one is tried now rather than idling an interval.
    async fn synced_pool(&self) -> Result<Option<WorkPool>, ApiError> {
        if let Some(pool) = self.current_pool() {
            return Ok(Some(pool));
        }
        self.sync().await?;
        Ok(self.current_pool())
    }

    /// Starts a lifecycle task for each run the registry admits, in response order, until the
    /// limit is reached. Returns how many were taken on.
    fn take_on(self: &Arc<Self>, runs: Vec<FlowRun>, pool: &WorkPool) -> usize {
        if self
            .settings
            .polling
            .limit
            .is_some_and(|limit| runs.len() >= limit)
        {
            self.registry.answer_was_cut();
        }
        // One copy of the template per poll, shared by its runs.
        let template = Arc::new(pool.base_job_template.clone());
        let mut taken = 0;
        for flow_run in runs {
            let guard = match self.registry.admit(&flow_run.id) {
                Admission::Admitted(guard) => guard,
                Admission::AlreadyHeld => continue,
                Admission::AtLimit => {
                    let limit = self.settings.polling.limit.unwrap_or_default();
                    tracing::debug!(
                        limit,
                        "Flow run limit reached; {limit} flow runs in progress."
                    );
                    break;
                }
            };
            let worker = Arc::clone(self);
            let template = Arc::clone(&template);
            let pool = PoolRef::of(pool);
            self.tasks.spawn(async move {
                lifecycle::submit(&worker, flow_run, guard, pool, template).await;
            });
            taken += 1;
        }
        taken
    }
}
