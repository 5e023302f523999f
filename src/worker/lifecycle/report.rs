//! Carrying a [`Verdict`] out: its log lines, its state (delivered as the policy says), its
//! counters; and the rest of an exit's report — what the run cost, the crash tail, the exit
//! events.

use super::super::Worker;
use super::super::events;
use super::super::observe::{Accounting, EventIds, TailLine};
use super::super::policy::{self, Delivery, Outcome, Report, Tally, Verdict};
use super::start::emit;
use super::watch::{Observed, Watched, logger_of};
use crate::docker::ExitStatus;
use crate::logs::{LOGGER_NAME, Level};
use crate::prefect::SetStateStatus;

/// Applies the policy to an outcome and carries the verdict out.
pub(crate) async fn conclude(worker: &Worker, run_id: &str, outcome: &Outcome) {
    carry_out(worker, run_id, &policy::verdict(run_id, outcome)).await;
}

/// Logs, proposes and counts what `verdict` says, in that order.
pub(crate) async fn carry_out(worker: &Worker, run_id: &str, verdict: &Verdict) {
    let logs = &worker.out.logs;
    for (level, line) in &verdict.before {
        logs.log(run_id, *level, line.clone());
    }
    if let Some(report) = &verdict.report {
        deliver(worker, run_id, report).await;
    }
    for (level, line) in &verdict.after {
        logs.log(run_id, *level, line.clone());
    }
    if verdict.completed {
        worker.out.metrics.runs_completed.inc();
    }
}

fn count(worker: &Worker, tally: Tally) {
    let metrics = &worker.out.metrics;
    match tally {
        Tally::Crashed => metrics.runs_crashed.inc(),
        Tally::Cancelled => metrics.runs_cancelled.inc(),
        Tally::Rescheduled => metrics.runs_rescheduled.inc(),
    };
}

/// Proposes the report's state. A reliable report goes through API outages and counts only
/// when the server took it; a run already final (ABORT) or gone (404) is left as it is.
async fn deliver(worker: &Worker, id: &str, report: &Report) {
    let proposal = &report.proposal;
    let what = proposal.name.to_ascii_lowercase();
    let logs = &worker.out.logs;
    if report.delivery == Delivery::ForcedOnce {
        match worker.api.set_flow_run_state(id, proposal, true).await {
            Ok(_) => count(worker, report.tally),
            Err(e) => logs.error(id, format!("Failed to mark flow run '{id}' as {what}: {e}")),
        }
        return;
    }
    let message = proposal.message.clone().unwrap_or_default();
    match worker
        .through_outage("report a final state", || {
            worker.api.set_flow_run_state(id, proposal, false)
        })
        .await
    {
        Ok(result)
            if result.status == SetStateStatus::Accept
                && result.state_type() == Some(proposal.state_type) =>
        {
            count(worker, report.tally);
            logs.info(id, format!("Reported flow run '{id}' as {what}: {message}"));
        }
        Ok(result) => {
            tracing::debug!(status = ?result.status, reason = result.reason(), state = %proposal.name, "final state not accepted");
        }
        Err(e) if e.is_not_found() => {
            tracing::debug!("flow run no longer exists; not reporting {what}");
        }
        Err(e) => logs.error(
            id,
            format!("Failed to report flow run '{id}' as {what}: {e}"),
        ),
    }
}

/// Sends the last lines a crashed container printed as flow-run logs, so the Prefect UI
/// explains a run that died before its own engine could report anything. Each line carries its
/// stamp from the run's clock (the Engine's timestamp, strictly increasing) and its stream's
/// logger name; the announcement is stamped just before the first, so the UI, which sorts by
/// timestamp, shows it above them and them in the order they were printed.
pub(crate) fn send_crash_tail(worker: &Worker, watched: &Watched, code: i64, tail: &[TailLine]) {
    let Some(first) = tail.first() else {
        return;
    };
    let id = &watched.flow_run_id;
    let logs = &worker.out.logs;
    let announcement = format!(
        "Container '{}' exited with status code {code}; its last {} line{} of output follow",
        watched.container.display_name(),
        tail.len(),
        if tail.len() == 1 { "" } else { "s" }
    );
    tracing::error!(flow_run_id = id.as_str(), "{announcement}");
    let before = first.at - chrono::TimeDelta::microseconds(1);
    logs.to_api_at(id, LOGGER_NAME, Level::Error, announcement, Some(before));
    for line in tail {
        // Already printed on the worker's stdout when streamed: to the API only.
        let logger = logger_of(line.stream);
        logs.to_api_at(id, logger, Level::Error, line.text.clone(), Some(line.at));
    }
}

/// Reports what the run cost: one flow-run log line and a
/// `prefect.docker.container.resources` event.
pub(crate) fn account(
    worker: &Worker,
    watched: &Watched,
    status: &ExitStatus,
    observed: &Observed,
) {
    if !worker.settings.reporting.resource_accounting {
        return;
    }
    let accounting = Accounting {
        usage: observed.usage,
        pull: watched.pull,
        wall: observed.wall,
        exit_code: status.code,
        oom_killed: status.oom_killed,
    };
    let name = watched.container.display_name();
    worker
        .out
        .logs
        .info(&watched.flow_run_id, accounting.summary(name));
    let event = accounting.event(&EventIds {
        container_id: &watched.container.id,
        container_name: name,
        flow_run_id: &watched.flow_run_id,
        flow_run_name: &watched.flow_run_name,
        pool_id: &watched.pool.id,
        pool_name: &watched.pool.name,
        worker_name: worker.name(),
        image: &watched.image,
    });
    worker.out.events.emit(event);
}

/// The exit's events: `prefect.docker.container.exited` following the container's last
/// event (then `removing` for an auto-removed one), then `prefect.worker.executed-flow-run`
/// following `submitted-flow-run`.
pub(crate) fn emit_exit_events(worker: &Worker, watched: &Watched, status: &ExitStatus) {
    let run = &watched.events;
    let resource =
        events::container_resource(&watched.container.id, watched.container.display_name());
    let exited = emit(
        worker,
        "prefect.docker.container.exited",
        resource.clone(),
        run.container_related.clone(),
        run.last_container_event.as_ref(),
    );
    if watched.options.auto_remove {
        // The Engine removes it now: the reference reports the `removing` status it sees.
        emit(
            worker,
            "prefect.docker.container.removing",
            resource,
            run.container_related.clone(),
            Some(&exited),
        );
    }
    let pid = super::super::infra_pid::InfrastructurePid::new(
        worker.docker.base_url(),
        &watched.container.id,
    );
    emit(
        worker,
        "prefect.worker.executed-flow-run",
        events::worker_resource(worker.name()),
        events::with_outcome(run.related.clone(), &pid.to_string(), status.code),
        run.submitted.as_ref(),
    );
}
