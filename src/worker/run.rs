//! One flow run's lifecycle: claim (Pending), resolve the job configuration, label, mark
//! Submitting, create and start the container, record its id, watch it, and report a non-zero
//! exit as Crashed. Names follow the Python worker's steps so the two can be compared.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tracing::Instrument as _;

use super::events;
use super::observe::{Accounting, EventIds, OutputTail};
use super::{PoolRef, Worker, crash_message, explain, flow_run_labels};
use crate::docker::usage::ResourceUsage;
use crate::docker::{CreatedContainer, DockerError, ExitStatus, FoundContainer};
use crate::job::render::{deployment_job_variables, merge_job_variables, render_job_configuration};
use crate::job::{ContainerSpec, DockerJobConfiguration, RunContext};
use crate::prefect::{ApiError, FlowRun, SetStateStatus, StateProposal};

/// Why a run could not be started; becomes the Crashed message.
#[derive(Debug, thiserror::Error)]
enum SubmitError {
    #[error(transparent)]
    Template(#[from] crate::job::render::TemplateError),
    #[error(transparent)]
    Validation(#[from] crate::job::ValidationError),
    #[error(transparent)]
    Prepare(#[from] crate::job::PrepareError),
    #[error(transparent)]
    Reference(#[from] crate::job::refs::RefError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Docker(#[from] DockerError),
}

impl SubmitError {
    /// The class name shown before the message, like the Python worker's exception class.
    fn kind(&self) -> &'static str {
        match self {
            Self::Template(_) | Self::Prepare(_) | Self::Reference(_) => "ValueError",
            Self::Validation(_) => "ValidationError",
            Self::Api(_) => "PrefectHTTPStatusError",
            Self::Docker(e) => e.kind(),
        }
    }
}

/// Claims, runs and watches one flow run. Never fails: every problem is logged and, where
/// the run is involved, reported to Prefect.
pub(crate) async fn submit_and_watch(
    worker: &Arc<Worker>,
    flow_run: FlowRun,
    pool: &PoolRef,
    template: &Value,
) {
    let span = tracing::info_span!("flow_run", flow_run_id = %flow_run.id);
    run(worker, flow_run, pool, template).instrument(span).await;
}

async fn run(worker: &Arc<Worker>, mut flow_run: FlowRun, pool: &PoolRef, template: &Value) {
    let run_id = flow_run.id.clone();
    let id = run_id.as_str();
    let logs = &worker.logs;
    logs.info(
        id,
        format!("Worker '{}' submitting flow run '{id}'", worker.name()),
    );

    let deployment = match &flow_run.deployment_id {
        None => None,
        Some(deployment_id) => match worker.deployment(deployment_id).await {
            Ok(Some(d)) => Some(d),
            Ok(None) => {
                logs.error(
                    id,
                    format!("Deployment {deployment_id} no longer exists. Flow run {id} will not be submitted for execution"),
                );
                let state = StateProposal::cancelled(format!(
                    "Deployment {deployment_id} no longer exists, cancelled run."
                ));
                match worker.api.set_flow_run_state(id, &state, true).await {
                    Ok(_) => {
                        worker.metrics.runs_cancelled.inc();
                    }
                    Err(e) => logs.error(
                        id,
                        format!("Failed to mark flow run '{id}' as cancelled: {e}"),
                    ),
                }
                return;
            }
            Err(e) => {
                // Not claimed yet: the run stays Scheduled and is picked up by a later poll.
                logs.error(
                    id,
                    format!("Failed to read deployment {deployment_id} for flow run '{id}': {e}"),
                );
                return;
            }
        },
    };

    if !claim(worker, id).await {
        return;
    }
    worker.metrics.runs_claimed.inc();
    let claimed_at = std::time::Instant::now();

    let (spec, flow) =
        match resolve_configuration(worker, &flow_run, deployment.as_deref(), pool, template).await
        {
            Ok(resolved) => resolved,
            Err(e) => return report_submission_failure(worker, &flow_run, &e).await,
        };
    let related = events::run_related(&flow_run.raw, Some(&flow), deployment.as_deref(), pool);
    let submitted = emit(
        worker,
        "prefect.worker.submitted-flow-run",
        events::worker_resource(worker.name()),
        related.clone(),
        None,
    );

    // The labels only inform the UI: sent alongside, never holding up the container (a busy
    // server answering 503 would otherwise delay every start by its retries). A server without
    // the endpoint (Prefect 2) is not asked again.
    if !worker
        .labels_unsupported
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        let w = Arc::clone(worker);
        let labels = flow_run_labels(worker.name(), pool);
        let run = id.to_owned();
        tokio::spawn(
            async move {
                // Two at a time: a burst of hundreds of runs must not flood a busy server
                // with label updates (and their retries) ahead of the calls that matter.
                let Ok(_permit) = w.labels_gate.acquire().await else {
                    return;
                };
                match w.api.update_flow_run_labels(&run, &labels).await {
                    Ok(()) => {}
                    Err(e) if e.is_missing_endpoint() => {
                        if !w
                            .labels_unsupported
                            .swap(true, std::sync::atomic::Ordering::Relaxed)
                        {
                            tracing::info!("this Prefect server has no flow-run labels endpoint (Prefect 2); runs are not labelled with the worker and pool");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not label the flow run with this worker and pool"),
                }
            }
            .in_current_span(),
        );
    }
    match worker
        .api
        .set_flow_run_state(id, &StateProposal::submitting(), false)
        .await
    {
        Ok(result) if result.status == SetStateStatus::Accept => {}
        Ok(result) => {
            // Refused: the run left Pending meanwhile. If it was cancelled, stop here.
            tracing::debug!(status = ?result.status, state = result.state_type(), "the Submitting state was not accepted");
            if matches!(result.state_type(), Some("CANCELLING" | "CANCELLED")) {
                worker.request_cancel(id);
            } else if let Ok(run) = worker.api.read_flow_run(id).await
                && matches!(run.state_type(), Some("CANCELLING" | "CANCELLED"))
            {
                worker.request_cancel(id);
            }
        }
        Err(e) => tracing::debug!(error = %e, "could not set the Submitting state; continuing"),
    }

    let still_wanted = || !worker.cancel_requested(id);
    let started = worker
        .docker
        .create_and_start_while(&spec, &still_wanted)
        .await;
    let (container, pull) = match started {
        Ok(started) => {
            if let Some(pull) = started.pull_duration {
                worker.metrics.pull_seconds.observe(pull.as_secs_f64());
            }
            let submission = claimed_at.elapsed().as_secs_f64();
            worker.metrics.submission_seconds.observe(submission);
            (started.container, started.pull_duration)
        }
        Err(DockerError::Withdrawn { stage }) => {
            report_final_state(
                worker,
                id,
                StateProposal::cancelled(format!(
                    "Flow run cancelled by worker while pending (before its container was {stage})."
                )),
                &worker.metrics.runs_cancelled,
            )
            .await;
            logs.info(id, format!("Cancelled pending flow run '{id}'"));
            return;
        }
        Err(e @ DockerError::Duplicate { .. }) => {
            // The run is another worker's: not a failure of the run, nothing to report.
            logs.info(id, format!("Aborted submission of flow run '{id}': {e}"));
            return;
        }
        Err(e) => {
            worker.metrics.docker_error(&e);
            if matches!(
                e,
                DockerError::CreateFailed { .. }
                    | DockerError::NameConflict { .. }
                    | DockerError::ImageNotFound { .. }
                    | DockerError::InvalidOptions { .. }
                    | DockerError::InvalidArgument { .. }
            ) {
                emit(
                    worker,
                    "prefect.docker.container.creation-failed",
                    events::worker_resource(worker.name()),
                    related.clone(),
                    None,
                );
            }
            return report_submission_failure(worker, &flow_run, &SubmitError::Docker(e)).await;
        }
    };
    // The container's own events: created, then running, each following the one before.
    let mut container_related = related.clone();
    container_related.push(events::worker_related(worker.name()));
    let container_resource = events::container_resource(&container.id, container.display_name());
    let created = emit(
        worker,
        "prefect.docker.container.created",
        container_resource.clone(),
        container_related.clone(),
        None,
    );
    let running = emit(
        worker,
        "prefect.docker.container.running",
        container_resource,
        container_related.clone(),
        Some(&created),
    );
    let pid = format!("{}:{}", worker.docker.base_url(), container.id);
    if let Err(e) = worker
        .through_outage("record infrastructure_pid", || {
            worker.api.set_infrastructure_pid(id, &pid)
        })
        .await
    {
        logs.error(
            id,
            format!("An error occurred while setting the `infrastructure_pid` on flow run '{id}'. The flow run will not be cancellable. ({e})"),
        );
    }
    logs.info(
        id,
        format!("Flow run '{}' submitted to infrastructure", flow_run.name),
    );

    worker.metrics.runs_running.inc();
    worker.watching(id, &container.id);
    if worker.cancel_requested(id) {
        // Cancelled between the last check and the start: stop it now.
        worker.cancel_run(id);
    }
    // A run may be watched for days, hundreds at a time: keep only what the exit report
    // needs, not the deployment, flow, template-rendered spec or the run's full JSON.
    let (image, auto_remove, stream_output) =
        (spec.image.clone(), spec.auto_remove, spec.stream_output);
    drop(spec);
    drop(flow);
    drop(deployment);
    flow_run.raw = Value::Null;
    flow_run.job_variables = serde_json::Map::new();
    let target = Target {
        flow_run: &flow_run,
        container: &container,
        pool,
        image: &image,
        pull,
        events: Some(RunEvents {
            related,
            container_related,
            submitted: Some(submitted),
            last_container_event: Some(running),
        }),
    };
    watch(worker, &target, auto_remove, stream_output).await;
    worker.metrics.runs_running.dec();
}

/// The run a watch is about, for its reports.
struct Target<'a> {
    flow_run: &'a FlowRun,
    container: &'a CreatedContainer,
    pool: &'a PoolRef,
    image: &'a str,
    pull: Option<Duration>,
    /// What the exit's events relate to and follow.
    events: Option<RunEvents>,
}

/// A run's event context. An adopted run's exit events follow nothing: the events they
/// would follow were emitted by an earlier process, often longer ago than `follows` spans.
struct RunEvents {
    related: Vec<Value>,
    container_related: Vec<Value>,
    submitted: Option<events::Emitted>,
    last_container_event: Option<events::Emitted>,
}

/// Emits one event and returns it for later ones to follow.
fn emit(
    worker: &Worker,
    name: &str,
    resource: Value,
    related: Vec<Value>,
    follows: Option<&events::Emitted>,
) -> events::Emitted {
    let (event, emitted) = events::build(name, resource, related, follows);
    worker.events.emit(event);
    emitted
}

/// The exit's events: `prefect.docker.container.exited` following the container's last
/// event, then `prefect.worker.executed-flow-run` following `submitted-flow-run`.
fn emit_exit_events(worker: &Worker, target: &Target<'_>, status: &ExitStatus) {
    let Some(run) = &target.events else {
        return;
    };
    emit(
        worker,
        "prefect.docker.container.exited",
        events::container_resource(&target.container.id, target.container.display_name()),
        run.container_related.clone(),
        run.last_container_event.as_ref(),
    );
    let identifier = format!("{}:{}", worker.docker.base_url(), target.container.id);
    emit(
        worker,
        "prefect.worker.executed-flow-run",
        events::worker_resource(worker.name()),
        events::with_outcome(run.related.clone(), &identifier, status.code),
        run.submitted.as_ref(),
    );
}

/// Watches a container found after a restart until its exit and reports it like any other run.
pub(crate) async fn reattach(
    worker: &Arc<Worker>,
    flow_run: FlowRun,
    found: FoundContainer,
    pool: &PoolRef,
) {
    let span = tracing::info_span!("flow_run", flow_run_id = %flow_run.id);
    async {
        let id = flow_run.id.as_str();
        let name = found.container.display_name().to_owned();
        let tail = OutputTail::new(worker.settings.reporting.crash_log_lines);
        let usage = Mutex::new(ResourceUsage::default());
        let started = std::time::Instant::now();
        let outcome = if found.running {
            worker.logs.info(
                id,
                format!("Worker '{}' re-attached to flow run '{id}' (container '{name}')", worker.name()),
            );
            worker.metrics.runs_running.inc();
            worker.watching(id, &found.container.id);
            let output = |text: &str| {
                print_output(text);
                tail.push(text);
            };
            let watching = worker.docker.reattach_container(&found, true, &output);
            let outcome = tokio::select! {
                r = with_sampling(worker, &found.container.id, &usage, watching) => Some(r),
                () = worker.shutdown.cancelled() => None,
            };
            worker.metrics.runs_running.dec();
            match outcome {
                Some(r) => r,
                None => return,
            }
        } else {
            match found.exit_code {
                Some(code) => {
                    worker.logs.info(
                        id,
                        format!("Container '{name}' of flow run '{id}' exited with status code {code} while no worker was watching"),
                    );
                    Ok(ExitStatus {
                        code,
                        oom_killed: found.oom_killed,
                        engine_lost: false,
                    })
                }
                // Created but never started (the worker stopped in between): nothing ran, and
                // starting it now could run a flow the user may already have retried.
                None => {
                    let message = format!(
                        "Failed to submit flow run to infrastructure: WorkerInterrupted: the worker stopped after creating container '{name}' and before starting it"
                    );
                    propose_crashed(worker, id, message).await;
                    return;
                }
            }
        };
        let target = Target {
            flow_run: &flow_run,
            container: &found.container,
            pool,
            image: &found.image,
            pull: None,
            events: Some(adopted_run_events(worker, &flow_run, pool).await),
        };
        let observed = Observed {
            tail: tail.take(),
            usage: usage.lock().map(|u| *u).unwrap_or_default(),
            wall: started.elapsed(),
        };
        report_exit(worker, &target, outcome, observed).await;
    }
    .instrument(span)
    .await;
}

/// The event context of an adopted run, read when its container exits (the deployment or
/// flow may be gone by then: the events still relate to the run and the pool).
async fn adopted_run_events(worker: &Worker, flow_run: &FlowRun, pool: &PoolRef) -> RunEvents {
    let flow = worker.flow(&flow_run.flow_id).await.ok();
    let deployment = match flow_run.deployment_id.as_deref() {
        Some(id) => worker.deployment(id).await.ok().flatten(),
        None => None,
    };
    let related = events::run_related(&flow_run.raw, flow.as_deref(), deployment.as_deref(), pool);
    let mut container_related = related.clone();
    container_related.push(events::worker_related(worker.name()));
    RunEvents {
        related,
        container_related,
        submitted: None,
        last_container_event: None,
    }
}

/// Checks an accepted claim against the run's state history. Under load a server on SQLite
/// has been seen to accept a Pending proposal made from a stale poll after another worker had
/// already claimed (or even finished) the run. The claim stands only if the state right
/// before ours was Scheduled and ours is still the newest; a claim that became the current
/// state of a run that had already ended puts the run's final state back.
async fn claim_stands(
    worker: &Worker,
    id: &str,
    accepted: &crate::prefect::OrchestrationResult,
) -> bool {
    let Some(ours) = accepted
        .state
        .as_ref()
        .and_then(|s| s.get("id"))
        .and_then(Value::as_str)
    else {
        return true;
    };
    let states = match worker
        .through_outage("verify claim", || worker.api.read_flow_run_states(id))
        .await
    {
        Ok(states) => states,
        Err(e) => {
            worker.logs.error(
                id,
                format!("Failed to verify the claim of flow run '{id}': {e}"),
            );
            return false;
        }
    };
    let Some(pos) = states
        .iter()
        .position(|s| s.get("id").and_then(Value::as_str) == Some(ours))
    else {
        return true;
    };
    let state_type = |s: &Value| {
        s.get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let previous = pos.checked_sub(1).map(|i| &states[i]);
    let from_scheduled = previous.is_none_or(|p| state_type(p) == "SCHEDULED");
    let newest = pos + 1 == states.len();
    if from_scheduled && newest {
        return true;
    }
    let displaced = previous.map(state_type).unwrap_or_default();
    worker.logs.info(
        id,
        format!("Aborted submission of flow run '{id}': another worker claimed it first (state before this claim: '{displaced}')"),
    );
    // If this late claim is now the run's current state although the run had already ended
    // (states are listed by their timestamps, which need not be the order the server committed
    // them), the run's newest final state is put back as it was.
    let is_final = |s: &Value| {
        matches!(
            state_type(s).as_str(),
            "COMPLETED" | "FAILED" | "CRASHED" | "CANCELLED"
        )
    };
    let Some(last_final) = states
        .iter()
        .rev()
        .filter(|s| s.get("id").and_then(Value::as_str) != Some(ours))
        .find(|s| is_final(s))
    else {
        return false;
    };
    let current = match worker
        .through_outage("read flow run", || worker.api.read_flow_run(id))
        .await
    {
        Ok(run) => run,
        Err(e) => {
            worker.logs.error(
                id,
                format!("Failed to verify the claim of flow run '{id}': {e}"),
            );
            return false;
        }
    };
    if current.raw.pointer("/state/id").and_then(Value::as_str) != Some(ours) {
        return false;
    }
    let final_type = state_type(last_final);
    let restore = crate::prefect::StateProposal {
        state_type: match final_type.as_str() {
            "COMPLETED" => "COMPLETED",
            "FAILED" => "FAILED",
            "CRASHED" => "CRASHED",
            _ => "CANCELLED",
        },
        name: "",
        message: Some(format!(
            "{} [restored by worker '{}' after its late claim displaced it]",
            last_final
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            worker.name()
        )),
    };
    let name = last_final
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    match worker
        .api
        .set_flow_run_state_named(id, &restore, &name, true)
        .await
    {
        Ok(_) => worker.logs.info(
            id,
            format!("Restored the final state '{name}' of flow run '{id}', which this worker's late claim had displaced"),
        ),
        Err(e) => worker.logs.error(
            id,
            format!("Failed to restore the final state of flow run '{id}': {e}"),
        ),
    }
    false
}

/// Proposes Pending until the server answers ACCEPT/REJECT/ABORT. True when the run is ours.
async fn claim(worker: &Worker, id: &str) -> bool {
    let logs = &worker.logs;
    // The poll's snapshot may be stale (another worker may have claimed or even finished the
    // run since): only a run that is still Scheduled is claimed.
    match worker.api.read_flow_run(id).await {
        Ok(run) if run.state_type() != Some("SCHEDULED") => {
            tracing::debug!(
                state = run.state_type(),
                "flow run is no longer scheduled; not claiming it"
            );
            return false;
        }
        _ => {}
    }
    loop {
        match worker
            .api
            .set_flow_run_state(id, &StateProposal::pending(), false)
            .await
        {
            Ok(result) => match result.status {
                SetStateStatus::Accept if result.state_type() == Some("PENDING") => {
                    return claim_stands(worker, id, &result).await;
                }
                SetStateStatus::Accept | SetStateStatus::Reject => {
                    logs.info(
                        id,
                        format!(
                            "Aborted submission of flow run '{id}': Server returned a non-pending state '{}'",
                            result.state_type().unwrap_or("unknown")
                        ),
                    );
                    return false;
                }
                SetStateStatus::Abort => {
                    logs.info(
                        id,
                        format!("Aborted submission of flow run '{id}'. Server sent an abort signal: {}", result.reason()),
                    );
                    return false;
                }
                SetStateStatus::Wait => {
                    let delay = Duration::from_secs_f64(result.delay_seconds().clamp(0.0, 3600.0));
                    tracing::debug!(
                        delay_s = delay.as_secs_f64(),
                        "server asked to wait before claiming"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = worker.shutdown.cancelled() => return false,
                    }
                }
            },
            Err(e) => {
                logs.error(
                    id,
                    format!("Failed to update state of flow run '{id}': {e}"),
                );
                return false;
            }
        }
    }
}

async fn resolve_configuration(
    worker: &Worker,
    flow_run: &FlowRun,
    deployment: Option<&Value>,
    pool: &PoolRef,
    template: &Value,
) -> Result<(ContainerSpec, Arc<Value>), SubmitError> {
    let flow = worker.flow(&flow_run.flow_id).await?;
    let deployment_vars = deployment.and_then(deployment_job_variables);
    let variables = merge_job_variables(deployment_vars, Some(&flow_run.job_variables));
    let rendered =
        render_job_configuration(template, &variables, &|name| std::env::var(name).ok())?;
    let rendered = resolve_references(worker, rendered).await?;
    let config =
        DockerJobConfiguration::from_rendered(&rendered, &worker.settings.run_defaults.cwd)?;
    for warning in &config.overrides.warnings {
        worker.logs.warn(&flow_run.id, warning.clone());
    }
    let spec = config.prepare(&RunContext {
        flow_run: &flow_run.raw,
        flow: Some(flow.as_ref()),
        deployment,
        worker_name: worker.name(),
        work_pool_name: &pool.name,
        work_pool_id: &pool.id,
        settings_env: &worker.settings.run_defaults.settings_env,
        default_image: &worker.settings.run_defaults.default_image,
        engine_version: Some(worker.docker.engine_version()),
    })?;
    Ok((spec, flow))
}

/// Fetches the blocks and variables the rendered configuration refers to and substitutes them
/// (a missing block is an error; a missing variable renders as an empty string, as in Prefect).
async fn resolve_references(
    worker: &Worker,
    rendered: serde_json::Map<String, Value>,
) -> Result<serde_json::Map<String, Value>, SubmitError> {
    use crate::job::refs::{Fetched, References, resolve};
    let tree = Value::Object(rendered);
    let refs = References::collect(&tree);
    if refs.is_empty() {
        return Ok(match tree {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        });
    }
    let mut fetched = Fetched::default();
    for id in &refs.block_ids {
        if let Some(data) = worker
            .through_outage("read block document", || worker.api.read_block_document(id))
            .await?
        {
            fetched.blocks_by_id.insert(id.clone(), data);
        }
    }
    for (slug, name) in &refs.block_names {
        if let Some(data) = worker
            .through_outage("read block document", || {
                worker.api.read_block_document_by_name(slug, name)
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
            .through_outage("read variable", || worker.api.read_variable(name))
            .await?;
        fetched.variables.insert(name.clone(), value);
    }
    match resolve(&tree, &fetched)? {
        Value::Object(map) => Ok(map),
        // Only a job configuration that is itself one `$ref` can become something else.
        other => Err(SubmitError::Reference(
            crate::job::refs::RefError::NotAnObject(other.to_string()),
        )),
    }
}

async fn report_submission_failure(worker: &Worker, flow_run: &FlowRun, error: &SubmitError) {
    let id = flow_run.id.as_str();
    worker.logs.error(
        id,
        format!(
            "Failed to submit flow run '{}' to infrastructure: {error}",
            flow_run.name
        ),
    );
    let message = format!(
        "Failed to submit flow run to infrastructure: {}: {error}",
        error.kind()
    );
    propose_crashed(worker, id, message).await;
}

async fn propose_crashed(worker: &Worker, id: &str, message: String) {
    report_final_state(
        worker,
        id,
        StateProposal::crashed(message),
        &worker.metrics.runs_crashed,
    )
    .await;
}

/// Proposes a final state (Crashed, Cancelled) through API outages; counts and logs it when
/// the server took it. A run already final (ABORT) or gone (404) is left as it is.
async fn report_final_state(
    worker: &Worker,
    id: &str,
    proposal: StateProposal,
    accepted: &prometheus_client::metrics::counter::Counter,
) {
    let what = proposal.name.to_ascii_lowercase();
    let message = proposal.message.clone().unwrap_or_default();
    match worker
        .through_outage("report a final state", || {
            worker.api.set_flow_run_state(id, &proposal, false)
        })
        .await
    {
        Ok(result)
            if result.status == SetStateStatus::Accept
                && result.state_type() == Some(proposal.state_type) =>
        {
            accepted.inc();
            worker
                .logs
                .info(id, format!("Reported flow run '{id}' as {what}: {message}"));
        }
        Ok(result) => {
            tracing::debug!(status = ?result.status, reason = result.reason(), state = proposal.name, "final state not accepted");
        }
        Err(e) if e.is_not_found() => {
            tracing::debug!("flow run no longer exists; not reporting {what}")
        }
        Err(e) => worker.logs.error(
            id,
            format!("Failed to report flow run '{id}' as {what}: {e}"),
        ),
    }
}

/// Sends the last lines a crashed container printed as flow-run logs, so the Prefect UI
/// explains a run that died before its own engine could report anything.
fn send_crash_tail(worker: &Worker, id: &str, container: &str, code: i64, tail: &[String]) {
    if tail.is_empty() {
        return;
    }
    worker.logs.error(
        id,
        format!(
            "Container '{container}' exited with status code {code}; its last {} line{} of output follow",
            tail.len(),
            if tail.len() == 1 { "" } else { "s" }
        ),
    );
    for line in tail {
        // Already printed on the worker's stdout when streamed: to the API only.
        worker
            .logs
            .to_api(id, crate::logs::Level::Error, line.clone());
    }
}

/// Reports what the run cost: one flow-run log line and a
/// `prefect.docker.container.resources` event.
async fn account(worker: &Worker, target: &Target<'_>, status: &ExitStatus, observed: &Observed) {
    if !worker.settings.reporting.resource_accounting {
        return;
    }
    let accounting = Accounting {
        usage: observed.usage,
        pull: target.pull,
        wall: observed.wall,
        exit_code: status.code,
        oom_killed: status.oom_killed,
    };
    let name = target.container.display_name();
    worker
        .logs
        .info(&target.flow_run.id, accounting.summary(name));
    let event = accounting.event(&EventIds {
        container_id: &target.container.id,
        container_name: name,
        flow_run_id: &target.flow_run.id,
        flow_run_name: &target.flow_run.name,
        pool_id: &target.pool.id,
        pool_name: &target.pool.name,
        worker_name: worker.name(),
        image: target.image,
    });
    worker.events.emit(event);
}

/// Prints container output on the worker's stdout; errors (a closed pipe) are ignored.
fn print_output(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
}

async fn watch(worker: &Worker, target: &Target<'_>, auto_remove: bool, stream_output: bool) {
    let tail = OutputTail::new(worker.settings.reporting.crash_log_lines);
    let usage = Mutex::new(ResourceUsage::default());
    let started = std::time::Instant::now();
    let output = |text: &str| {
        if stream_output {
            print_output(text);
        }
        tail.push(text);
    };
    // Output is followed when printed or when its tail is kept for a crash report.
    let follow = stream_output || tail.enabled();
    let watching = worker
        .docker
        .watch_container(target.container, auto_remove, follow, &output);
    let outcome = tokio::select! {
        r = with_sampling(worker, &target.container.id, &usage, watching) => r,
        () = worker.shutdown.cancelled() => {
            tracing::info!(container = target.container.display_name(), "worker stopping; the container keeps running");
            return;
        }
    };
    let observed = Observed {
        tail: tail.take(),
        usage: usage.lock().map(|u| *u).unwrap_or_default(),
        wall: started.elapsed(),
    };
    report_exit(worker, target, outcome, observed).await;
}

/// Runs `watching` to its end while sampling the container's resource use alongside (when
/// resource accounting is on); the sampling never delays the result.
async fn with_sampling<T>(
    worker: &Worker,
    container_id: &str,
    usage: &Mutex<ResourceUsage>,
    watching: impl std::future::Future<Output = T>,
) -> T {
    let sampling = async {
        if worker.settings.reporting.resource_accounting {
            worker.docker.sample_usage(container_id, usage).await;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        r = watching => r,
        () = sampling => unreachable!("sampling never ends on its own"),
    }
}

/// What was seen of a run while it was watched.
struct Observed {
    /// The last output lines.
    tail: Vec<String>,
    /// Stats samples.
    usage: ResourceUsage,
    /// Watch time.
    wall: Duration,
}

/// Reports a watched container's end: nothing for 0 (the engine inside reported the state),
/// Crashed with the exit-code explanation otherwise, a log line when the outcome is unknown.
async fn report_exit(
    worker: &Worker,
    target: &Target<'_>,
    outcome: Result<ExitStatus, DockerError>,
    observed: Observed,
) {
    let (flow_run, container) = (target.flow_run, target.container);
    let id = flow_run.id.as_str();
    let container_name = container.display_name();
    let cancelled_by_worker = worker.done_watching(id);
    // The Engine's event stream fills in what the wait could not tell.
    let facts = worker.engine_facts(&container.id);
    let outcome = match outcome {
        Ok(mut status) => {
            status.oom_killed |= facts.oom_killed;
            Ok(status)
        }
        Err(e) => match facts.exit_code {
            Some(code) => {
                tracing::info!(error = %e, code, "the wait failed but the Engine's event stream saw the exit");
                Ok(ExitStatus {
                    code,
                    oom_killed: facts.oom_killed,
                    engine_lost: false,
                })
            }
            None => Err(e),
        },
    };
    if let Ok(status) = &outcome {
        account(worker, target, status, &observed).await;
    }
    let exited = outcome.as_ref().ok().copied();
    match outcome {
        Ok(status) if cancelled_by_worker => {
            let message = format!(
                "Flow run was cancelled; the worker stopped its container '{container_name}' (exit code {}).",
                status.code
            );
            report_final_state(
                worker,
                id,
                StateProposal::cancelled(message),
                &worker.metrics.runs_cancelled,
            )
            .await;
        }
        Ok(status) if status.code == 0 => {
            worker.metrics.runs_completed.inc();
            tracing::info!(
                container = container_name,
                "container exited with status code 0"
            );
        }
        Ok(status) => {
            let mut message = crash_message(status.code);
            if status.oom_killed {
                message.push_str(
                    " The kernel killed the container for exceeding its memory limit (OOMKilled).",
                );
            }
            if status.engine_lost {
                message.push_str(
                    " The Docker Engine restarted or was unreachable while the container ran.",
                );
            }
            propose_crashed(worker, id, message).await;
            worker.logs.info(id, explain(status.code).resolution);
            send_crash_tail(worker, id, container_name, status.code, &observed.tail);
        }
        Err(e) => {
            worker.metrics.docker_error(&e);
            worker.logs.error(
                id,
                format!(
                    "Lost connection to flow run '{}' infrastructure. The flow run's final state will be determined by the execution environment. ({e})",
                    flow_run.name
                ),
            );
        }
    }
    if let Some(status) = exited {
        emit_exit_events(worker, target, &status);
    }
}
