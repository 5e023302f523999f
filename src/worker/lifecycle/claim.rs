//! The claim: a run becomes this worker's by the server accepting its Pending proposal. Before
//! it, the run's deployment must still exist (and, when the poll's snapshot is not fresh, the
//! run must still be Scheduled).
//!
//! The server refuses Pending from Pending, Running, Cancelling and Cancelled, and judges each
//! proposal on the run's current state, read under a row lock (`SELECT … FOR UPDATE` on
//! PostgreSQL, a write transaction on SQLite): of two workers claiming one Scheduled run, one
//! wins. But it accepts Pending out of Completed (without persisted result), Failed and
//! Crashed: a worker claiming from a stale poll after another had run the run to its end would
//! run it again (seen on SQLite under load, R4). So an accepted claim must show it was made
//! from Scheduled: the server's answer does when it carries the scheduled time Prefect copies
//! only on a Scheduled → Pending transition; otherwise the claim is checked against the run's
//! state history (the state before it must be Scheduled and it must be the newest; a displaced
//! final state is put back).

use std::sync::Arc;
use std::time::Duration;

use super::super::Worker;
use crate::prefect::{
    ApiError, Deployment, FlowRun, OrchestrationResult, SetStateStatus, State, StateProposal,
    StateType,
};

/// Whether the run's deployment is still there.
#[derive(Debug)]
pub(crate) enum DeploymentCheck {
    /// It is (or the run has none).
    Found(Option<Arc<Deployment>>),
    /// It was deleted: the run is cancelled, never claimed.
    Gone {
        /// The deployment's id.
        deployment_id: String,
    },
    /// It could not be read: the run stays Scheduled for a later poll.
    Unreadable,
}

/// How a claim ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The run is ours.
    Claimed,
    /// It was no longer Scheduled when looked at again.
    NotScheduled(Option<StateType>),
    /// The server put it in another state (REJECT, or an accepted non-Pending state).
    Refused(Option<StateType>),
    /// The server refused the transition outright (ABORT).
    Aborted(String),
    /// Another worker's claim came first.
    Displaced,
    /// The API failed; the run is left as it is.
    Failed,
    /// Shutdown came while the server asked to wait.
    Interrupted,
}

/// What a claim message starts with; the worker's name follows in quotes.
const CLAIMED_BY: &str = "Claimed by worker '";

/// The Pending proposal that claims a run. Its message names the worker, so a run left
/// Pending by a worker that died can be told apart from other workers' claims and put back
/// (the reconcile pass), whichever worker finds it.
pub(crate) fn claim_proposal(worker: &str) -> StateProposal {
    StateProposal {
        message: Some(format!("{CLAIMED_BY}{worker}'")),
        ..StateProposal::pending()
    }
}

/// The worker that made the claim `state` records, if it is one of this worker's claims.
pub(crate) fn claimer_of(state: &State) -> Option<&str> {
    if state.state_type != StateType::Pending {
        return None;
    }
    state
        .message
        .as_deref()?
        .strip_prefix(CLAIMED_BY)?
        .strip_suffix('\'')
}

/// Reads the run's deployment (through the short-lived cache), logging a failure.
pub(crate) async fn check_deployment(worker: &Worker, flow_run: &FlowRun) -> DeploymentCheck {
    let Some(deployment_id) = &flow_run.deployment_id else {
        return DeploymentCheck::Found(None);
    };
    match worker.deployment(deployment_id).await {
        Ok(Some(deployment)) => DeploymentCheck::Found(Some(deployment)),
        Ok(None) => DeploymentCheck::Gone {
            deployment_id: deployment_id.clone(),
        },
        Err(e) => {
            let id = &flow_run.id;
            worker.out.logs.error(
                id,
                format!("Failed to read deployment {deployment_id} for flow run '{id}': {e}"),
            );
            DeploymentCheck::Unreadable
        }
    }
}

/// A poll's answer younger than this is claimed from as it is, without reading the run
/// again: the server refuses Pending from Pending, Running and Cancelling, and a run another
/// worker claimed, ran and ended in between is caught by the claim check (which puts its final
/// state back). Older snapshots (a run that waited for its deployment through an outage) are
/// read first, to spare such a run the detour.
const FRESH_SNAPSHOT: Duration = Duration::from_secs(1);

/// Proposes Pending until the server answers ACCEPT, REJECT or ABORT, and checks an accepted
/// claim. `snapshot_age`: how long ago the poll answered with this run. Every outcome but
/// [`Claim::Claimed`] is logged to the run here.
pub(crate) async fn claim(worker: &Worker, id: &str, snapshot_age: Duration) -> Claim {
    if snapshot_age >= FRESH_SNAPSHOT
        && let Some(state) = no_longer_scheduled(worker, id).await
    {
        return Claim::NotScheduled(state);
    }
    loop {
        let result = match worker
            .api
            .set_flow_run_state(id, &claim_proposal(worker.name()), false)
            .await
        {
            Ok(result) => result,
            Err(e) => {
                let message = format!("Failed to update state of flow run '{id}': {e}");
                worker.out.logs.error(id, message);
                return Claim::Failed;
            }
        };
        match answer(worker, id, &result) {
            Answer::Accepted if result.scheduled_time.is_some() => return Claim::Claimed,
            Answer::Accepted => {
                return match result.state_id() {
                    Some(ours) => check_claim(worker, id, ours).await,
                    None => Claim::Claimed,
                };
            }
            Answer::Ended(claim) => return claim,
            Answer::Wait(delay) => {
                if !crate::backoff::sleep(delay, &worker.lifetime.stop).await {
                    return Claim::Interrupted;
                }
            }
        }
    }
}

/// The poll's snapshot may be stale (another worker may have claimed or even finished the
/// run since): only a run that is still Scheduled is claimed. `Some(state)` when it is not;
/// a failed read is left to the proposal, which the server judges anyway.
async fn no_longer_scheduled(worker: &Worker, id: &str) -> Option<Option<StateType>> {
    match worker.api.read_flow_run(id).await {
        Ok(run) if run.state_type() != Some(StateType::Scheduled) => {
            tracing::debug!(
                state = ?run.state_type(),
                "flow run is no longer scheduled; not claiming it"
            );
            Some(run.state_type())
        }
        _ => None,
    }
}

/// What the server's answer to a Pending proposal means.
enum Answer {
    /// Pending accepted: check it against the history.
    Accepted,
    /// Not ours (logged).
    Ended(Claim),
    /// Propose again after this long.
    Wait(Duration),
}

fn answer(worker: &Worker, id: &str, result: &OrchestrationResult) -> Answer {
    let logs = &worker.out.logs;
    match result.status {
        SetStateStatus::Accept if result.state_type() == Some(StateType::Pending) => {
            Answer::Accepted
        }
        SetStateStatus::Accept | SetStateStatus::Reject => {
            let state = result.state_type().map_or("unknown", StateType::as_str);
            logs.info(
                id,
                format!("Aborted submission of flow run '{id}': Server returned a non-pending state '{state}'"),
            );
            Answer::Ended(Claim::Refused(result.state_type()))
        }
        SetStateStatus::Abort => {
            logs.info(
                id,
                format!(
                    "Aborted submission of flow run '{id}'. Server sent an abort signal: {}",
                    result.reason()
                ),
            );
            Answer::Ended(Claim::Aborted(result.reason().to_owned()))
        }
        SetStateStatus::Wait => {
            let delay = Duration::from_secs_f64(result.delay_seconds().clamp(0.0, 3600.0));
            tracing::debug!(
                delay_s = delay.as_secs_f64(),
                "server asked to wait before claiming"
            );
            Answer::Wait(delay)
        }
    }
}

/// What a run's state history says of an accepted claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum History {
    /// The state right before ours was Scheduled and ours is the newest: the claim stands.
    Stands,
    /// Another state came between (another worker's claim, or the run's end).
    Displaced {
        /// The type of the state right before ours.
        previous: Option<StateType>,
        /// The newest final state other than ours, if the run had ended.
        last_final: Option<State>,
    },
}

/// Judges a claim (state `ours`) by the run's history, oldest first. A claim not found in the
/// history stands (nothing says otherwise).
pub(crate) fn judge_history(states: &[State], ours: &str) -> History {
    let Some(pos) = states.iter().position(|s| s.id.as_deref() == Some(ours)) else {
        return History::Stands;
    };
    let previous = pos.checked_sub(1).map(|i| states[i].state_type);
    let from_scheduled = previous.is_none_or(|p| p == StateType::Scheduled);
    if from_scheduled && pos + 1 == states.len() {
        return History::Stands;
    }
    let last_final = states
        .iter()
        .rev()
        .filter(|s| s.id.as_deref() != Some(ours))
        .find(|s| s.state_type.is_final())
        .cloned();
    History::Displaced {
        previous,
        last_final,
    }
}

/// Checks an accepted claim against the run's state history. A late claim that became the
/// current state of a run that had already ended (states are listed by their timestamps, which
/// need not be the order the server committed them) puts the run's final state back.
async fn check_claim(worker: &Worker, id: &str, ours: &str) -> Claim {
    let states = match worker
        .through_outage("verify claim", || worker.api.read_flow_run_states(id))
        .await
    {
        Ok(states) => states,
        Err(e) => {
            claim_unverified(worker, id, &e);
            return Claim::Failed;
        }
    };
    let History::Displaced {
        previous,
        last_final,
    } = judge_history(&states, ours)
    else {
        return Claim::Claimed;
    };
    let displaced = previous.map_or("", StateType::as_str);
    worker.out.logs.info(
        id,
        format!("Aborted submission of flow run '{id}': another worker claimed it first (state before this claim: '{displaced}')"),
    );
    if let Some(last_final) = last_final {
        restore_final_state(worker, id, ours, &last_final).await;
    }
    Claim::Displaced
}

fn claim_unverified(worker: &Worker, id: &str, e: &ApiError) {
    worker.out.logs.error(
        id,
        format!("Failed to verify the claim of flow run '{id}': {e}"),
    );
}

/// Puts `last_final` back if our late claim is the run's current state.
async fn restore_final_state(worker: &Worker, id: &str, ours: &str, last_final: &State) {
    let current = match worker
        .through_outage("read flow run", || worker.api.read_flow_run(id))
        .await
    {
        Ok(run) => run,
        Err(e) => return claim_unverified(worker, id, &e),
    };
    if current.state.as_ref().and_then(|s| s.id.as_deref()) != Some(ours) {
        return;
    }
    let restore = StateProposal::restore(
        last_final,
        format!(
            "{} [restored by worker '{}' after its late claim displaced it]",
            last_final.message.as_deref().unwrap_or_default(),
            worker.name()
        ),
    );
    let name = &restore.name;
    match worker.api.set_flow_run_state(id, &restore, true).await {
        Ok(_) => worker.out.logs.info(
            id,
            format!("Restored the final state '{name}' of flow run '{id}', which this worker's late claim had displaced"),
        ),
        Err(e) => worker.out.logs.error(
            id,
            format!("Failed to restore the final state of flow run '{id}': {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: &str, ty: StateType) -> State {
        State {
            id: Some(id.into()),
            state_type: ty,
            name: None,
            message: None,
            timestamp: None,
        }
    }

    #[test]
    fn a_claim_names_its_worker_and_reads_back() {
        let proposal = claim_proposal("host-1 worker");
        let claim = State {
            message: proposal.message.clone(),
            ..state("s", StateType::Pending)
        };
        assert_eq!(proposal.name, "Pending");
        assert_eq!(claimer_of(&claim), Some("host-1 worker"));
        let other = State {
            message: Some("something else".into()),
            ..state("s", StateType::Pending)
        };
        assert_eq!(claimer_of(&other), None);
        let scheduled = State {
            state_type: StateType::Scheduled,
            ..claim.clone()
        };
        assert_eq!(claimer_of(&scheduled), None);
    }

    #[test]
    fn a_claim_right_after_scheduled_and_newest_stands() {
        let states = [
            state("s", StateType::Scheduled),
            state("ours", StateType::Pending),
        ];
        assert_eq!(judge_history(&states, "ours"), History::Stands);
        assert_eq!(judge_history(&states, "missing"), History::Stands);
    }

    #[test]
    fn a_claim_after_another_claim_is_displaced() {
        let states = [
            state("s", StateType::Scheduled),
            state("theirs", StateType::Pending),
            state("ours", StateType::Pending),
        ];
        assert_eq!(
            judge_history(&states, "ours"),
            History::Displaced {
                previous: Some(StateType::Pending),
                last_final: None
            }
        );
    }

    #[test]
    fn a_late_claim_on_a_finished_run_names_its_final_state() {
        let states = [
            state("s", StateType::Scheduled),
            state("ours", StateType::Pending),
            state("p", StateType::Pending),
            state("r", StateType::Running),
            state("done", StateType::Completed),
        ];
        let History::Displaced { last_final, .. } = judge_history(&states, "ours") else {
            panic!("not displaced");
        };
        assert_eq!(last_final.and_then(|s| s.id), Some("done".into()));
    }
}
