//! `--prepull`: pulls the images of the pool's deployments at start and whenever a deployment
//! is created or changed, so a run does not wait for its pull. Each deployment's job
//! variables are rendered through the pool's template exactly as for a run, so the image, the
//! pull policy and the registry credentials are the ones its runs will use; pulls go through
//! the runtime's single flight, so a run starting meanwhile shares the pull.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::job::render::{deployment_job_variables, merge_job_variables, render_job_configuration};
use crate::job::{ContainerSpec, DockerJobConfiguration, PullPolicy, RunContext};

impl Worker {
    /// Checks the pool's deployments every heartbeat interval and pulls the image of each new
    /// or updated one (per its pull policy: `Never` skips, `IfNotPresent` pulls when missing).
    pub(super) async fn prepull_loop(self: Arc<Self>, shutdown: CancellationToken) {
        // Deployment id → its `updated` stamp when its image was last handled.
        let mut handled: HashMap<String, String> = HashMap::new();
        loop {
            if let Some(pool) = self.current_pool() {
                match self.api.pool_deployments(&pool.name).await {
                    Ok(deployments) => {
                        for deployment in deployments {
                            let Some(id) = deployment.get("id").and_then(Value::as_str) else {
                                continue;
                            };
                            let updated = deployment
                                .get("updated")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_owned();
                            if handled.get(id) == Some(&updated) {
                                continue;
                            }
                            handled.insert(id.to_owned(), updated);
                            let pulling = self.prepull(&deployment, &pool.base_job_template);
                            tokio::select! {
                                () = pulling => {}
                                () = shutdown.cancelled() => return,
                            }
                        }
                    }
                    Err(e) => {
                        self.metrics.api_error(&e);
                        tracing::warn!(error = %e, "could not list the pool's deployments to pre-pull their images");
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.settings.polling.heartbeat_interval) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Pulls one deployment's image as its runs would; problems are logged, never fatal.
    async fn prepull(&self, deployment: &Value, template: &Value) {
        let name = deployment
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let spec = match self.deployment_spec(deployment, template) {
            Ok(spec) => spec,
            Err(message) => {
                tracing::warn!(deployment = name, "not pre-pulling: {message}");
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
                self.metrics.docker_error(&e);
                tracing::warn!(deployment = name, error = %e, "could not pre-pull the image");
            }
        }
    }

    /// The container spec a run of this deployment would get, as far as the image goes.
    fn deployment_spec(
        &self,
        deployment: &Value,
        template: &Value,
    ) -> Result<ContainerSpec, String> {
        let variables = merge_job_variables(deployment_job_variables(deployment), None);
        let rendered =
            render_job_configuration(template, &variables, &|name| std::env::var(name).ok())
                .map_err(|e| e.to_string())?;
        let config =
            DockerJobConfiguration::from_rendered(&rendered, &self.settings.run_defaults.cwd)
                .map_err(|e| e.to_string())?;
        let placeholder_run = json!({"id": "", "name": "prepull"});
        config
            .prepare(&RunContext {
                flow_run: &placeholder_run,
                flow: None,
                deployment: Some(deployment),
                worker_name: self.name(),
                work_pool_name: &self.settings.pool,
                work_pool_id: "",
                settings_env: &self.settings.run_defaults.settings_env,
                default_image: &self.settings.run_defaults.default_image,
                engine_version: Some(self.docker.engine_version()),
            })
            .map_err(|e| e.to_string())
    }
}
