//! Keeping the work pool in sync over REST: read (or create) the pool, fill an empty base job
//! template, heartbeat — every heartbeat interval, unless Prefect's worker channel carries
//! the heartbeat and pushes the pool instead.

use tokio_util::sync::CancellationToken;

use super::api_health::recovered;
use super::{Worker, WorkerError};
use crate::backoff;
use crate::job::default_base_job_template;
use crate::prefect::{ApiError, WorkPool};

impl Worker {
    /// Reads (or creates) the pool, fills an empty base job template, and sends a heartbeat.
    pub(super) async fn sync(&self) -> Result<(), ApiError> {
        let Some(mut pool) = self.read_or_create_pool().await? else {
            return Ok(());
        };
        let name = &self.settings.pool;
        if pool
            .base_job_template
            .as_object()
            .is_none_or(|t| t.is_empty())
        {
            let template = self
                .settings
                .polling
                .base_job_template
                .clone()
                .unwrap_or_else(default_base_job_template);
            self.api.update_work_pool_template(name, &template).await?;
            pool.base_job_template = template;
        }
        if self.channel.healthy() {
            // The channel came back while this sync was in flight: its snapshot is newer.
            return Ok(());
        }
        self.api
            .send_worker_heartbeat(
                name,
                &self.settings.name,
                self.settings.polling.heartbeat_interval.as_secs(),
            )
            .await?;
        self.record_pool(pool);
        Ok(())
    }

    /// The pool, created when missing (if allowed); `None` when it is missing and may not be.
    async fn read_or_create_pool(&self) -> Result<Option<WorkPool>, ApiError> {
        let name = &self.settings.pool;
        if let Some(pool) = self.api.read_work_pool(name).await? {
            return Ok(Some(pool));
        }
        if !self.settings.polling.create_pool_if_not_found {
            tracing::warn!(pool = %name, "Work pool '{name}' not found!");
            return Ok(None);
        }
        tracing::info!(pool = %name, "Work pool not found; creating it");
        match self
            .api
            .create_work_pool(
                name,
                "docker",
                self.settings.polling.base_job_template.as_ref(),
            )
            .await
        {
            Ok(pool) => Ok(Some(pool)),
            // Another worker created it meanwhile.
            Err(e) if e.status() == Some(409) => match self.api.read_work_pool(name).await? {
                Some(pool) => Ok(Some(pool)),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Makes `pool` the worker's view of its pool (from a REST read or a channel snapshot),
    /// warning when its type is not `docker` or it is paused, as the state changes.
    pub(super) fn record_pool(&self, pool: WorkPool) {
        let Ok(mut guard) = self.pool.write() else {
            return;
        };
        let previous = guard.as_ref();
        if pool.pool_type != "docker" && previous.is_none_or(|p| p.pool_type != pool.pool_type) {
            tracing::warn!(
                "Worker type mismatch! This worker process expects type 'docker' but received '{}' from the server. Unexpected behavior may occur.",
                pool.pool_type
            );
        }
        if pool.is_paused && previous.is_none_or(|p| !p.is_paused) {
            tracing::warn!(pool = %pool.name, "Work pool is paused; no flow runs will be handed out until it is resumed");
        }
        *guard = Some(pool);
    }

    /// Syncs every heartbeat interval (stretched while the API keeps failing, but at once
    /// when the API probe sees it answer again) until `shutdown`.
    pub(super) async fn sync_loop(&self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let mut failures = 0;
        let mut recoveries = self.api_health.recoveries();
        loop {
            let interval =
                super::clamped_poisson_interval(self.settings.polling.heartbeat_interval);
            tokio::select! {
                () = tokio::time::sleep(backoff::stretched(interval, failures)) => {}
                () = recovered(&mut recoveries), if failures > 0 => {}
                () = shutdown.cancelled() => return Ok(()),
            }
            if self.channel.healthy() {
                tracing::debug!("worker channel healthy: no REST heartbeat or pool read");
                continue;
            }
            match self.sync().await {
                Ok(()) => {
                    failures = 0;
                    self.api_health.succeeded();
                }
                Err(e) if e.is_auth() => return Err(WorkerError::Unauthorized(e)),
                Err(e) => {
                    failures += 1;
                    if e.is_transient() {
                        self.api_health.failed();
                    }
                    self.out.metrics.api_error(&e);
                    tracing::warn!(error = %e, consecutive_failures = failures, "work pool sync failed");
                }
            }
        }
    }
}
