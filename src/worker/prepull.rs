//! `--prepull`: pulls the images of the pool's deployments at start and whenever a deployment
//! is created or changed, so a run does not wait for its pull. Each deployment's configuration
//! is resolved by the same function as a run's, so the image, the pull policy and the registry
//! credentials are the ones its runs will use; pulls go through the runtime's single flight,
//! so a run starting meanwhile shares the pull.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::lifecycle::resolve::{JobInputs, resolve_configuration};
use super::{PoolRef, Worker};
use crate::backoff;
use crate::job::PullPolicy;
use crate::prefect::Deployment;

impl Worker {
    /// Checks the pool's deployments every heartbeat interval and pulls the image of each new
    /// or updated one (per its pull policy: `Never` skips, `IfNotPresent` pulls when missing).
    pub(super) async fn prepull_loop(self: Arc<Self>, shutdown: CancellationToken) {
        // Deployment id → its `updated` stamp when its image was last handled.
        let mut handled: HashMap<String, Option<String>> = HashMap::new();
        loop {
            if let Some(pool) = self.current_pool() {
                match self.api.pool_deployments(&pool.name).await {
                    Ok(deployments) => {
                        let template = &pool.base_job_template;
                        let pool = PoolRef::of(&pool);
                        for deployment in deployments {
                            if handled.get(&deployment.id) == Some(&deployment.updated) {
                                continue;
                            }
                            handled.insert(deployment.id.clone(), deployment.updated.clone());
                            let pulling = self.prepull(&deployment, template, &pool);
                            tokio::select! {
                                () = pulling => {}
                                () = shutdown.cancelled() => return,
                            }
                        }
                    }
                    Err(e) => {
                        self.out.metrics.api_error(&e);
                        tracing::warn!(error = %e, "could not list the pool's deployments to pre-pull their images");
                    }
                }
            }
            if !backoff::sleep(self.settings.polling.heartbeat_interval, &shutdown).await {
                return;
            }
        }
    }

    /// Pulls one deployment's image as its runs would; problems are logged, never fatal.
    async fn prepull(&self, deployment: &Deployment, template: &Value, pool: &PoolRef) {
        let name = deployment.name.as_str();
        let inputs = JobInputs {
            template,
            deployment: Some(deployment),
            flow_run: None,
            flow: None,
            pool,
        };
        let spec = match resolve_configuration(self, inputs).await {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(deployment = name, "not pre-pulling: {e}");
                return;
            }
        };
        if spec.pull_policy == PullPolicy::Never {
            tracing::debug!(deployment = name, image = %spec.image, "image_pull_policy is Never; not pre-pulling");
            return;
        }
        match self.docker.ensure_image(&spec).await {
            Ok(Some(took)) => tracing::info!(
                deployment = name,
                image = %spec.image,
                seconds = took.as_secs_f64(),
                "Pre-pulled image"
            ),
            Ok(None) => {
                tracing::debug!(deployment = name, image = %spec.image, "image already present")
            }
            Err(e) => {
                self.out.metrics.docker_error(&e);
                tracing::warn!(deployment = name, error = %e, "could not pre-pull the image");
            }
        }
    }
}
