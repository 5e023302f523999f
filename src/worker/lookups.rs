//! The API reads and writes a run needs besides its states: its deployment and flow (cached
//! briefly, so a burst of runs of one deployment reads each once) and the labels that tell
//! the UI which worker and pool ran it (sent alongside, never holding a run up).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use super::cache::TtlCache;
use super::{PoolRef, Worker};
use crate::prefect::{ApiError, Deployment, Flow};

/// Label updates in flight at once: a burst of hundreds of runs must not flood a busy server
/// with label updates (and their retries) ahead of the calls that matter.
const LABEL_UPDATES_AT_ONCE: usize = 2;

/// Recent reads and the labelling state.
pub(crate) struct Lookups {
    /// Deployments read in the last few seconds.
    deployments: TtlCache<Deployment>,
    /// Flows read recently.
    flows: TtlCache<Flow>,
    /// The server has no flow-run labels endpoint (Prefect 2): labels are not sent.
    labels_unsupported: AtomicBool,
    labels_gate: Semaphore,
}

impl Lookups {
    pub fn new() -> Self {
        Self {
            deployments: TtlCache::new(Duration::from_secs(3)),
            flows: TtlCache::new(Duration::from_secs(30)),
            labels_unsupported: AtomicBool::new(false),
            labels_gate: Semaphore::new(LABEL_UPDATES_AT_ONCE),
        }
    }
}

impl Worker {
    /// A deployment, from the short-lived cache or the API; `None` when it no longer exists.
    pub(crate) async fn deployment(&self, id: &str) -> Result<Option<Arc<Deployment>>, ApiError> {
        self.lookups
            .deployments
            .get_or_fetch(id, || self.api.read_deployment(id))
            .await
    }

    /// A flow, from the cache or the API (through outages).
    pub(crate) async fn flow(&self, id: &str) -> Result<Arc<Flow>, ApiError> {
        let flow = self
            .lookups
            .flows
            .get_or_fetch(id, || async {
                self.through_outage("read flow", || self.api.read_flow(id))
                    .await
                    .map(Some)
            })
            .await?;
        // The fetch never answers "nothing"; a read that found no flow failed above.
        flow.ok_or_else(|| ApiError::Decode {
            path: format!("flows/{id}"),
            message: "no flow".into(),
        })
    }

    /// PATCHes the run's labels in the background (two at a time). The labels only inform
    /// the UI: a busy server answering 503 must not delay a container's start by its retries.
    /// A server without the endpoint (Prefect 2) is not asked again.
    pub(crate) fn label_run(self: &Arc<Self>, run_id: &str, pool: &PoolRef) {
        if self.lookups.labels_unsupported.load(Ordering::Relaxed) {
            return;
        }
        let worker = Arc::clone(self);
        let labels = flow_run_labels(self.name(), pool);
        let run_id = run_id.to_owned();
        self.tasks.spawn(
            async move {
                let Ok(_permit) = worker.lookups.labels_gate.acquire().await else {
                    return;
                };
                match worker.api.update_flow_run_labels(&run_id, &labels).await {
                    Ok(()) => {}
                    Err(e) if e.is_missing_endpoint() => {
                        if !worker.lookups.labels_unsupported.swap(true, Ordering::Relaxed) {
                            tracing::info!("this Prefect server has no flow-run labels endpoint (Prefect 2); runs are not labelled with the worker and pool");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not label the flow run with this worker and pool"),
                }
            }
            .in_current_span(),
        );
    }
}

/// The labels PATCHed onto a flow run so the UI shows which worker and pool ran it.
pub(crate) fn flow_run_labels(worker: &str, pool: &PoolRef) -> Value {
    serde_json::json!({
        "prefect.worker.name": worker,
        "prefect.worker.type": "docker",
        "prefect.work-pool.name": pool.name,
        "prefect.work-pool.id": pool.id,
    })
}
