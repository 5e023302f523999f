//! Adoption: at start-up the worker looks for this pool's flow-run containers that nobody
//! watches — left by an earlier process of this worker, or by a worker the server now sees
//! offline — and takes them up: running ones are watched to their exit, exited ones reported
//! at once, each only while its flow run is not yet final, so nothing is reported twice or
//! run again. Containers of workers that are still online are theirs and left alone.

use std::sync::Arc;

use super::registry::Phase;
use super::{PoolRef, Worker, lifecycle};
use crate::docker::FoundContainer;
use crate::job::labels;
use crate::prefect::{ApiError, WorkPool};

/// Whether a container created by `owner` is this worker's to adopt: its own (same name), one
/// without an owner label, or one whose worker the server no longer sees online.
pub(crate) fn may_adopt(owner: Option<&str>, me: &str, online: &[String]) -> bool {
    match owner {
        None => true,
        Some(owner) if owner == me => true,
        Some(owner) => !online.iter().any(|w| w == owner),
    }
}

impl Worker {
    /// Finds the pool's containers and adopts those that are this worker's to adopt.
    ///
    /// # Errors
    /// An API error reading the online workers or a run (the next poll tries again); a
    /// Docker listing failure is only logged.
    pub(super) async fn adopt_orphans(self: &Arc<Self>, pool: &WorkPool) -> Result<(), ApiError> {
        let found = match self
            .docker
            .find_containers(&[format!("{}={}", labels::WORK_POOL_NAME, pool.name)])
            .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "could not list this pool's containers; none re-attached");
                return Ok(());
            }
        };
        if found.is_empty() {
            return Ok(());
        }
        let online = self.api.online_workers(&pool.name).await?;
        for container in found {
            let Some(run_id) = container.labels.get(labels::FLOW_RUN_ID).cloned() else {
                continue;
            };
            let owner = container
                .labels
                .get(labels::WORKER_NAME)
                .map(String::as_str);
            if !may_adopt(owner, self.name(), &online) {
                tracing::debug!(flow_run_id = %run_id, owner, "container belongs to a live worker; not adopting");
                continue;
            }
            if self.registry.holds(&run_id) {
                continue;
            }
            self.adopt_one(&run_id, container, pool).await?;
        }
        Ok(())
    }

    /// Adopts one container if its run is not final.
    async fn adopt_one(
        self: &Arc<Self>,
        run_id: &str,
        container: FoundContainer,
        pool: &WorkPool,
    ) -> Result<(), ApiError> {
        let flow_run = match self.api.read_flow_run(run_id).await {
            Ok(run) => run,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        if flow_run.state_type().is_none_or(|t| t.is_final()) {
            return Ok(());
        }
        let phase = if container.running {
            Phase::Watching {
                container: container.container.id.clone(),
                stopping: false,
            }
        } else {
            Phase::Reporting
        };
        let Some(guard) = self.registry.adopt(run_id, phase) else {
            return Ok(());
        };
        let worker = Arc::clone(self);
        let pool = PoolRef::of(pool);
        self.tasks.spawn(async move {
            lifecycle::adopt(&worker, flow_run, container, guard, pool).await;
        });
        Ok(())
    }
}
