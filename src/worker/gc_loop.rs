//! The worker's periodic garbage collection (`--gc-interval`): one [`crate::gc::collect`] for
//! the worker's own pool every interval, logged; failures are logged and never stop the worker.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::gc::{self, GcOptions, Outcome};

impl Worker {
    /// Collects the pool's finished containers now and then every `interval` until `shutdown`.
    /// Runs this worker is still handling (claimed, watched or adopted) are kept whatever their
    /// state, so a container is never removed while the worker still reads its exit status.
    pub(super) async fn gc_loop(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let options = GcOptions {
            pool: Some(self.settings.pool.clone()),
            older_than: self.settings.gc.older_than,
            dry_run: false,
        };
        let in_use = |run_id: &str| self.registry.holds(run_id);
        loop {
            let collection = gc::collect(&*self.docker, &*self.api, &options, &in_use);
            tokio::select! {
                result = collection => self.log_collection(result),
                () = shutdown.cancelled() => return,
            }
            if !crate::backoff::sleep(interval, &shutdown).await {
                return;
            }
        }
    }

    fn log_collection(&self, result: Result<gc::Report, gc::GcError>) {
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                let gc::GcError::ListFailed(docker) = &e;
                self.out.metrics.docker_error(docker);
                tracing::warn!(error = %e, "garbage collection failed; will try again");
                return;
            }
        };
        for decision in &report.decisions {
            match &decision.outcome {
                Outcome::Removed => {
                    self.out.metrics.gc_removed.inc();
                    tracing::info!(flow_run_id = %decision.flow_run_id, container = %decision.name, "{decision}");
                }
                Outcome::Kept(reason) if reason.is_error() => {
                    tracing::warn!(flow_run_id = %decision.flow_run_id, container = %decision.name, "{decision}");
                }
                _ => {
                    tracing::debug!(flow_run_id = %decision.flow_run_id, container = %decision.name, "{decision}");
                }
            }
        }
        if report.removed() > 0 || report.errors() > 0 {
            tracing::info!(
                removed = report.removed(),
                kept = report.kept(),
                errors = report.errors(),
                "{}",
                report.summary()
            );
        } else {
            tracing::debug!(kept = report.kept(), "{}", report.summary());
        }
    }
}
