//! Starting a claimed run: mark it Submitting, pull, create and start its container (asking
//! the registry before each step whether it was cancelled meanwhile), record the container's
//! id on the run, and hand it to the watch. Emits the reference's `submitted-flow-run`,
//! `container.created` and `container.running` events along the way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::super::events::{self, Emitted};
use super::super::infra_pid::InfrastructurePid;
use super::super::observe::OutputTail;
use super::super::ports::WatchOptions;
use super::super::registry::{CancelAction, RunGuard};
use super::super::{PoolRef, Worker};
use super::gpus::{self, NoLease};
use super::resolve::Submission;
use super::watch::{RunEvents, Watched};
use crate::docker::{CreatedContainer, DockerError, StartedContainer};
use crate::job::ContainerSpec;
use crate::prefect::{FlowRun, SetStateStatus, StateProposal, StateType};

/// How a start ended.
#[derive(Debug)]
pub(crate) enum Start {
    /// The container runs; watch it.
    Running(Box<Watched>),
    /// The run was cancelled before the named step; no container was started.
    Withdrawn {
        /// The step that did not happen.
        stage: &'static str,
    },
    /// Another container of this run exists on this host (another worker runs it); ours
    /// stood down. Not a failure of the run.
    StoodDown(DockerError),
    /// The pull, create or start failed.
    Failed(DockerError),
    /// The worker is stopping before anything was created.
    Interrupted,
}

/// Starts a claimed run's container.
pub(crate) async fn start(
    worker: &Arc<Worker>,
    guard: &RunGuard,
    flow_run: &FlowRun,
    submission: Submission,
    pool: &PoolRef,
    claimed_at: Instant,
) -> Start {
    let id = flow_run.id.as_str();
    let Submission {
        mut spec,
        deployment,
        flow,
    } = submission;
    if worker.settings.reporting.logs_to_api {
        // On the container, so a worker adopting it after a restart goes on forwarding.
        spec.forward_output();
    }
    let related = events::run_related(
        &flow_run.raw,
        Some(&flow.raw),
        deployment.as_ref().map(|d| &d.raw),
        pool,
    );
    let submitted = emit(
        worker,
        "prefect.worker.submitted-flow-run",
        events::worker_resource(worker.name()),
        related.clone(),
        None,
    );
    worker.label_run(id, pool);
    let gpus = match gpus::reserve(worker, guard, &mut spec).await {
        Ok(lease) => lease,
        Err(NoLease::Cancelled) => return Start::Withdrawn { stage: "pulled" },
        Err(NoLease::Stopping) => return Start::Interrupted,
        Err(NoLease::TooMany(e)) => return Start::Failed(e),
    };
    mark_submitting(worker, guard, id).await;
    let mut container_related = related.clone();
    container_related.push(events::worker_related(worker.name()));
    let created = CreatedEvent::new(worker, &container_related);
    // A turn among the submissions in flight, held through the pull, create and start.
    let Some(turn) = worker.registry.submissions.turn().await else {
        return Start::Interrupted;
    };
    let started = match create_and_start_container(worker, guard, &spec, &related, &created).await {
        Ok(started) => started,
        Err(ended) => return ended,
    };
    drop(turn);
    let metrics = &worker.out.metrics;
    if let Some(pull) = started.pull_duration {
        metrics.pull_seconds.observe(pull.as_secs_f64());
    }
    metrics
        .submission_seconds
        .observe(claimed_at.elapsed().as_secs_f64());
    let events = RunEvents {
        last_container_event: Some(created.running(&started.container)),
        related,
        container_related,
        submitted: Some(submitted),
    };
    record_pid(worker, id, &started.container.id).await;
    worker.out.logs.info(
        id,
        format!("Flow run '{}' submitted to infrastructure", flow_run.name),
    );
    if let CancelAction::Stop { container } = guard.watching(&started.container.id) {
        // Cancelled between the last check and the start: stop it now.
        worker.stop_for_cancel(id, container);
    }
    let mut watched = watched(worker, flow_run, &spec, started, pool, events);
    watched.gpus = gpus;
    Start::Running(Box::new(watched))
}

/// What the watch needs of a started run. A run may be watched for days, hundreds at a time:
/// only what the exit report needs is kept, not the deployment, flow, rendered spec or the
/// run's full JSON.
fn watched(
    worker: &Worker,
    flow_run: &FlowRun,
    spec: &ContainerSpec,
    started: StartedContainer,
    pool: &PoolRef,
    events: RunEvents,
) -> Watched {
    let forward_output = spec.forwards_output();
    Watched {
        flow_run_id: flow_run.id.clone(),
        flow_run_name: flow_run.name.clone(),
        container: started.container,
        image: spec.image.clone(),
        pull: started.pull_duration,
        options: WatchOptions {
            auto_remove: spec.auto_remove,
            follow_output: spec.stream_output
                || forward_output
                || OutputTail::keeps_lines(worker.settings.reporting.crash_log_lines),
            logs_since: None,
        },
        print_output: spec.stream_output,
        forward_output,
        clock: crate::logs::RunClock::new(),
        max_runtime: spec.max_runtime,
        pool: pool.clone(),
        events,
        gpus: None,
    }
}

/// Pull, create and start, withdrawing as soon as the registry says the run was cancelled.
/// A transient failure (a registry 503 or rate limit, a timeout, an Engine 5xx not about the
/// job) is retried with backoff up to `--submit-retries` times, each attempt logged to the
/// run; a failure is counted, and announced with `creation-failed` where the reference does.
async fn create_and_start_container(
    worker: &Worker,
    guard: &RunGuard,
    spec: &ContainerSpec,
    related: &[Value],
    created: &CreatedEvent<'_>,
) -> Result<StartedContainer, Start> {
    let wanted = || !guard.cancel_requested();
    let on_created = |c: &CreatedContainer| created.emit(c);
    let retries = worker.settings.convergence.submit_retries;
    let mut backoff = crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut attempt = 0;
    let error = loop {
        attempt += 1;
        match worker
            .docker
            .create_and_start(spec, &wanted, &on_created)
            .await
        {
            Ok(started) => return Ok(started),
            Err(e) if e.is_transient() && attempt <= retries => {
                worker.out.metrics.docker_error(&e);
                let delay = backoff.next_delay();
                worker.out.logs.warn(
                    guard.run_id(),
                    format!(
                        "Attempt {attempt} of {} to start the flow run's container failed for a transient reason ({}: {e}); trying again in {} s",
                        retries + 1,
                        e.kind(),
                        delay.as_secs()
                    ),
                );
                if !crate::backoff::sleep(delay, &worker.lifetime.stop).await {
                    // Shutdown: nothing was started; the next worker's reconcile pass puts the
                    // claim back.
                    break e;
                }
            }
            Err(e) => break e,
        }
    };
    match error {
        DockerError::Withdrawn { stage } => Err(Start::Withdrawn { stage }),
        e @ DockerError::Duplicate { .. } => Err(Start::StoodDown(e)),
        e => {
            worker.out.metrics.docker_error(&e);
            if creation_failed(&e) {
                emit(
                    worker,
                    "prefect.docker.container.creation-failed",
                    events::worker_resource(worker.name()),
                    related.to_vec(),
                    None,
                );
            }
            Err(Start::Failed(e))
        }
    }
}

/// The container's own events: `created` as soon as it exists (even if its start then fails,
/// as the reference emits it), `running` following it once it started.
struct CreatedEvent<'a> {
    worker: &'a Worker,
    related: &'a [Value],
    emitted: std::sync::Mutex<Option<Emitted>>,
}

impl<'a> CreatedEvent<'a> {
    fn new(worker: &'a Worker, related: &'a [Value]) -> Self {
        Self {
            worker,
            related,
            emitted: std::sync::Mutex::new(None),
        }
    }

    fn emit(&self, container: &CreatedContainer) {
        let emitted = emit(
            self.worker,
            "prefect.docker.container.created",
            events::container_resource(&container.id, container.display_name()),
            self.related.to_vec(),
            None,
        );
        if let Ok(mut slot) = self.emitted.lock() {
            *slot = Some(emitted);
        }
    }

    /// Emits `running`, following `created`; returns it for the exit to follow.
    fn running(&self, container: &CreatedContainer) -> Emitted {
        let created = self.emitted.lock().ok().and_then(|mut e| e.take());
        emit(
            self.worker,
            "prefect.docker.container.running",
            events::container_resource(&container.id, container.display_name()),
            self.related.to_vec(),
            created.as_ref(),
        )
    }
}

/// Errors after which the reference emits `prefect.docker.container.creation-failed`.
fn creation_failed(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::CreateFailed { .. }
            | DockerError::NameConflict { .. }
            | DockerError::ImageNotFound { .. }
            | DockerError::InvalidOptions { .. }
            | DockerError::InvalidArgument { .. }
    )
}

/// Proposes `PENDING/Submitting`. A refusal because the run was cancelled meanwhile is
/// recorded in the registry, so the submission withdraws before its next step.
async fn mark_submitting(worker: &Worker, guard: &RunGuard, id: &str) {
    let answer = worker
        .api
        .set_flow_run_state(id, &StateProposal::submitting(), false)
        .await;
    let result = match answer {
        Ok(result) if result.status == SetStateStatus::Accept => return,
        Ok(result) => result,
        Err(e) => {
            tracing::debug!(error = %e, "could not set the Submitting state; continuing");
            return;
        }
    };
    tracing::debug!(status = ?result.status, state = ?result.state_type(), "the Submitting state was not accepted");
    let cancelled =
        |t: Option<StateType>| matches!(t, Some(StateType::Cancelling | StateType::Cancelled));
    if cancelled(result.state_type()) {
        guard.request_cancel();
    } else if let Ok(run) = worker.api.read_flow_run(id).await
        && cancelled(run.state_type())
    {
        guard.request_cancel();
    }
}

/// Records `<base_url>:<container id>` on the run (through outages), so the run can be
/// cancelled and its container found again.
async fn record_pid(worker: &Worker, id: &str, container_id: &str) {
    let pid = InfrastructurePid::new(worker.docker.base_url(), container_id).to_string();
    if let Err(e) = worker
        .through_outage("record infrastructure_pid", || {
            worker.api.set_infrastructure_pid(id, &pid)
        })
        .await
    {
        worker.out.logs.error(
            id,
            format!("An error occurred while setting the `infrastructure_pid` on flow run '{id}'. The flow run will not be cancellable. ({e})"),
        );
    }
}

/// Emits one event and returns it for later ones to follow.
pub(super) fn emit(
    worker: &Worker,
    name: &str,
    resource: Value,
    related: Vec<Value>,
    follows: Option<&Emitted>,
) -> Emitted {
    let (event, emitted) = events::build(name, resource, related, follows);
    worker.out.events.emit(event);
    emitted
}
