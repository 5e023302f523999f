//! Resolving a run's job configuration: the pool's base job template rendered with the
//! deployment's and the run's job variables, block and variable references fetched and
//! substituted, validated, and prepared into a [`ContainerSpec`]. `--prepull` resolves a
//! deployment's configuration with the same function, so it pulls exactly what a run would.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::super::policy::SubmitError;
use super::super::{PoolRef, Worker};
use crate::job::refs::{Fetched, RefError, References, resolve};
use crate::job::render::{deployment_job_variables, merge_job_variables, render_job_configuration};
use crate::job::{ContainerSpec, DockerJobConfiguration, RunContext};
use crate::prefect::{Deployment, Flow, FlowRun};

/// What a configuration is resolved from.
pub(crate) struct JobInputs<'a> {
    /// The pool's base job template.
    pub template: &'a Value,
    /// The run's deployment, if any.
    pub deployment: Option<&'a Deployment>,
    /// The run (`None` when pre-pulling for a deployment).
    pub flow_run: Option<&'a FlowRun>,
    /// The run's flow.
    pub flow: Option<&'a Flow>,
    /// The pool.
    pub pool: &'a PoolRef,
}

/// A claimed run's resolved configuration and what its events relate to.
pub(crate) struct Submission {
    pub spec: ContainerSpec,
    pub deployment: Option<Arc<Deployment>>,
    pub flow: Arc<Flow>,
}

/// Resolves a claimed run's configuration (reading its flow through the cache).
pub(crate) async fn for_run(
    worker: &Worker,
    flow_run: &FlowRun,
    deployment: Option<Arc<Deployment>>,
    pool: &PoolRef,
    template: &Value,
) -> Result<Submission, SubmitError> {
    let flow = worker.flow(&flow_run.flow_id).await?;
    let spec = resolve_configuration(
        worker,
        JobInputs {
            template,
            deployment: deployment.as_deref(),
            flow_run: Some(flow_run),
            flow: Some(&flow),
            pool,
        },
    )
    .await?;
    Ok(Submission {
        spec,
        deployment,
        flow,
    })
}

/// The one way a job configuration becomes a [`ContainerSpec`].
pub(crate) async fn resolve_configuration(
    worker: &Worker,
    inputs: JobInputs<'_>,
) -> Result<ContainerSpec, SubmitError> {
    let deployment_vars = inputs
        .deployment
        .and_then(|d| deployment_job_variables(&d.raw));
    let variables = merge_job_variables(deployment_vars, inputs.flow_run.map(|r| &r.job_variables));
    let rendered = render_job_configuration(inputs.template, &variables, &|name| {
        std::env::var(name).ok()
    })?;
    let rendered = crate::job::overrides::apply_override(
        rendered,
        worker.settings.run_defaults.job_override.as_deref(),
    );
    let rendered = resolve_references(worker, rendered).await?;
    let config =
        DockerJobConfiguration::from_rendered(&rendered, &worker.settings.run_defaults.cwd)?;
    if let Some(run) = inputs.flow_run {
        for warning in &config.overrides.warnings {
            worker.out.logs.warn(&run.id, warning.clone());
        }
    }
    let placeholder_run = json!({"id": "", "name": "prepull"});
    let spec = config.prepare(&RunContext {
        flow_run: inputs.flow_run.map_or(&placeholder_run, |r| &r.raw),
        flow: inputs.flow.map(|f| &f.raw),
        deployment: inputs.deployment.map(|d| &d.raw),
        worker_name: worker.name(),
        work_pool_name: &inputs.pool.name,
        work_pool_id: &inputs.pool.id,
        settings_env: &worker.settings.run_defaults.settings_env,
        default_image: &worker.settings.run_defaults.default_image,
        engine_version: Some(worker.docker.engine_version()),
        rootless_host: worker.docker.rootless_host_address(),
    })?;
    apply_host_policy(worker, inputs.flow_run, spec)
}

/// The host policy, last: on the container exactly as it would be created. A refusal is
/// counted (for runs, not pre-pulls) and becomes the run's Crashed state; what it changed is
/// said in the run's logs.
fn apply_host_policy(
    worker: &Worker,
    flow_run: Option<&FlowRun>,
    mut spec: ContainerSpec,
) -> Result<ContainerSpec, SubmitError> {
    let Some(policy) = &worker.settings.run_defaults.policy else {
        return Ok(spec);
    };
    match policy.apply(&mut spec) {
        Ok(applied) => {
            if let Some(run) = flow_run.filter(|_| !applied.changes.is_empty()) {
                let line = format!("The worker's host policy applied: {applied}");
                worker.out.logs.info(&run.id, line);
            }
            Ok(spec)
        }
        Err(violation) => {
            if flow_run.is_some() {
                worker.out.metrics.policy_violation(violation.rule.as_str());
            }
            Err(violation.into())
        }
    }
}

/// Fetches the blocks and variables the rendered configuration refers to and substitutes them
/// (a missing block is an error; a missing variable renders as an empty string, as in Prefect).
async fn resolve_references(
    worker: &Worker,
    rendered: Map<String, Value>,
) -> Result<Map<String, Value>, SubmitError> {
    let tree = Value::Object(rendered);
    let refs = References::collect(&tree);
    if refs.is_empty() {
        return Ok(match tree {
            Value::Object(map) => map,
            _ => Map::new(),
        });
    }
    let fetched = fetch_references(worker, &refs).await?;
    match resolve(&tree, &fetched)? {
        Value::Object(map) => Ok(map),
        // Only a job configuration that is itself one `$ref` can become something else.
        other => Err(SubmitError::Reference(RefError::NotAnObject(
            other.to_string(),
        ))),
    }
}

async fn fetch_references(worker: &Worker, refs: &References) -> Result<Fetched, SubmitError> {
    let api = &worker.api;
    let mut fetched = Fetched::default();
    for id in &refs.block_ids {
        if let Some(data) = worker
            .through_outage("read block document", || api.read_block_document(id))
            .await?
        {
            fetched.blocks_by_id.insert(id.clone(), data);
        }
    }
    for (slug, name) in &refs.block_names {
        if let Some(data) = worker
            .through_outage("read block document", || {
                api.read_block_document_by_name(slug, name)
            })
            .await?
        {
            fetched
                .blocks_by_name
                .insert((slug.clone(), name.clone()), data);
        }
    }
    for name in &refs.variables {
        let value = worker
            .through_outage("read variable", || api.read_variable(name))
            .await?;
        fetched.variables.insert(name.clone(), value);
    }
    Ok(fetched)
}
