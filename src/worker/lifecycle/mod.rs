//! One flow run's lifecycle: claim → resolve → start → watch → report. Each step is a small
//! function returning a typed outcome; this module only sequences them, and
//! [`super::policy`] turns how the run ended into what Prefect is told. A run the worker
//! adopts after a restart joins the same path at the watch. Step names follow the Python
//! worker's (`create_and_start_container`, `watch_container`) so the two compare side by side.

pub(crate) mod claim;
pub(crate) mod gpus;
pub(crate) mod report;
pub(crate) mod resolve;
pub(crate) mod start;
pub(crate) mod watch;

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tracing::Instrument as _;

use super::policy::{Outcome, SubmitError};
use super::registry::RunGuard;
use super::{PoolRef, Worker};
use crate::docker::FoundContainer;
use crate::prefect::FlowRun;
use claim::{Claim, DeploymentCheck};
use start::Start;

/// Claims, starts and watches one polled flow run. Never fails: every problem is logged and,
/// where the run is involved, reported to Prefect. `guard` holds the run's registry entry
/// (and `--limit` slot) until this returns.
pub(crate) async fn submit(
    worker: &Arc<Worker>,
    flow_run: FlowRun,
    guard: RunGuard,
    pool: PoolRef,
    template: Arc<Value>,
) {
    let span = tracing::info_span!("flow_run", flow_run_id = %flow_run.id);
    submit_steps(worker, flow_run, guard, pool, &template)
        .instrument(span)
        .await;
}

async fn submit_steps(
    worker: &Arc<Worker>,
    flow_run: FlowRun,
    guard: RunGuard,
    pool: PoolRef,
    template: &Value,
) {
    let id = flow_run.id.as_str();
    // The task starts as the poll answers: the snapshot's age is counted from here.
    let polled_at = Instant::now();
    worker.out.logs.info(
        id,
        format!("Worker '{}' submitting flow run '{id}'", worker.name()),
    );
    prefetch_flow(worker, &flow_run.flow_id);
    let deployment = match claim::check_deployment(worker, &flow_run).await {
        DeploymentCheck::Found(deployment) => deployment,
        DeploymentCheck::Gone { deployment_id } => {
            return report::conclude(worker, id, &Outcome::DeploymentGone { deployment_id }).await;
        }
        DeploymentCheck::Unreadable => return,
    };
    if claim::claim(worker, id, polled_at.elapsed()).await != Claim::Claimed {
        return;
    }
    guard.claimed();
    worker.out.metrics.runs_claimed.inc();
    let claimed_at = Instant::now();

    let submission = match resolve::for_run(worker, &flow_run, deployment, &pool, template).await {
        Ok(submission) => submission,
        Err(error) => return submit_failed(worker, &flow_run, error).await,
    };
    match start::start(worker, &guard, &flow_run, submission, &pool, claimed_at).await {
        Start::Running(watched) => watch::follow(worker, *watched, guard).await,
        Start::Withdrawn { stage } => {
            report::conclude(worker, id, &Outcome::Withdrawn { stage }).await;
        }
        Start::StoodDown(reason) => {
            // The run is another worker's: not a failure of the run, nothing to report.
            worker.out.logs.info(
                id,
                format!("Aborted submission of flow run '{id}': {reason}"),
            );
        }
        Start::Failed(e) => submit_failed(worker, &flow_run, SubmitError::Docker(e)).await,
        Start::Interrupted => {
            // Nothing was created; the next worker's reconcile pass puts the claim back.
            tracing::info!("worker stopping before the run's container was created");
        }
    }
}

/// Reads the run's flow into the cache while the deployment is read and the run claimed, so
/// the claimed run does not wait for it (a failed read is tried again when it is needed).
fn prefetch_flow(worker: &Arc<Worker>, flow_id: &str) {
    let reader = Arc::clone(worker);
    let flow_id = flow_id.to_owned();
    worker.tasks.spawn(async move {
        let _ = reader.flow(&flow_id).await;
    });
}

async fn submit_failed(worker: &Worker, flow_run: &FlowRun, error: SubmitError) {
    let outcome = Outcome::SubmitFailed {
        run_name: flow_run.name.clone(),
        error,
    };
    report::conclude(worker, &flow_run.id, &outcome).await;
}

/// Takes up a container found after a restart (left by an earlier process of this worker, or
/// by a worker now offline): a running one is watched to its exit like any run, an exited one
/// is reported at once. One that was created but never started is removed and its run
/// rescheduled while the run is still Pending (so it runs exactly once); otherwise the run is
/// Crashed (starting the container now could run a flow the user may already have retried).
pub(crate) async fn adopt(
    worker: &Arc<Worker>,
    flow_run: FlowRun,
    found: FoundContainer,
    guard: RunGuard,
    pool: PoolRef,
) {
    let span = tracing::info_span!("flow_run", flow_run_id = %flow_run.id);
    async {
        let id = flow_run.id.as_str();
        let name = found.container.display_name().to_owned();
        if !found.running && found.exit_code.is_none() {
            let removed = flow_run.state_type() == Some(crate::prefect::StateType::Pending)
                && worker
                    .docker
                    .remove_container(&found.container.id)
                    .await
                    .is_ok();
            let outcome = Outcome::NeverStarted {
                container: name,
                removed,
            };
            return report::conclude(worker, id, &outcome).await;
        }
        let watched = watch::Watched::adopted(worker, &flow_run, &found, pool).await;
        match found.exit_code.filter(|_| !found.running) {
            None => {
                worker.out.logs.info(
                    id,
                    format!(
                        "Worker '{}' re-attached to flow run '{id}' (container '{name}')",
                        worker.name()
                    ),
                );
                watch::follow(worker, watched, guard).await;
            }
            Some(code) => {
                worker.out.logs.info(
                    id,
                    format!("Container '{name}' of flow run '{id}' exited with status code {code} while no worker was watching"),
                );
                watch::forward_remaining(worker, &watched).await;
                let status = crate::docker::ExitStatus {
                    code,
                    oom_killed: found.oom_killed,
                    engine_lost: false,
                };
                watch::finish(worker, &watched, guard, Ok(status), watch::Observed::none()).await;
            }
        }
    }
    .instrument(span)
    .await;
}
