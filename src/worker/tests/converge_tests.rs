//! The reconcile pass through the fakes: every disagreement between the pool's runs and this
//! host's containers, and what resolves it.

use std::time::Duration;

use super::Harness;
use super::fakes::{Plan, found};
use crate::prefect::StateType;
use crate::worker::lifecycle::claim::claim_proposal;
use crate::worker::ports::PrefectApi as _;
use crate::worker::registry::Phase;

const HOST: &str = "http+docker://localhost";

fn pool() -> crate::prefect::WorkPool {
    crate::prefect::WorkPool {
        id: "pool-id".into(),
        name: "pool".into(),
        pool_type: "docker".into(),
        base_job_template: crate::job::default_base_job_template(),
        is_paused: false,
    }
}

async fn drain(h: &Harness) {
    h.worker.tasks.close();
    h.worker.tasks.wait().await;
}

/// A run claimed by `claimer` as this worker claims (the claim message), left Pending.
async fn claimed_by(h: &Harness, id: &str, claimer: &str) {
    h.api.add_run(id, StateType::Scheduled);
    h.api
        .set_flow_run_state(id, &claim_proposal(claimer), false)
        .await
        .expect("claimed");
}

// ---------------------------------------------------------------- stale claims

#[tokio::test]
async fn its_own_claim_that_never_got_a_container_is_rescheduled_once() {
    let mut h = Harness::new();
    claimed_by(&h, "r1", "me").await;
    h.worker.reconcile(&pool()).await.expect("reconciled");
    let state = h.api.current("r1");
    assert_eq!(state.state_type, StateType::Scheduled);
    assert_eq!(state.name.as_deref(), Some("Rescheduled"));
    let message = state.message.unwrap_or_default();
    assert!(
        message.contains(
            "Worker 'me' claimed this flow run but stopped before creating its container"
        ) && message.contains(HOST),
        "{message}"
    );
    assert_eq!(
        h.api
            .calls_to("set_state r1 SCHEDULED/Rescheduled force=false")
            .len(),
        1
    );
    assert_eq!(h.metrics.runs_rescheduled.get(), 1);
    assert!(h.logged().iter().any(|l| l.contains("as rescheduled")));
    // A second pass finds nothing to do: the run is Scheduled again, for a poll to take.
    h.worker.reconcile(&pool()).await.expect("reconciled");
    assert_eq!(h.api.calls_to("set_state r1 SCHEDULED").len(), 1);
}

#[tokio::test]
async fn a_claim_in_submitting_is_attributed_from_its_history() {
    let h = Harness::new();
    claimed_by(&h, "r1", "me").await;
    h.api
        .set_flow_run_state("r1", &crate::prefect::StateProposal::submitting(), false)
        .await
        .expect("submitting");
    h.worker.reconcile(&pool()).await.expect("reconciled");
    assert_eq!(h.api.calls_to("read_states r1").len(), 1);
    assert_eq!(h.api.current("r1").name.as_deref(), Some("Rescheduled"));
}

#[tokio::test]
async fn a_claim_this_process_holds_is_never_touched() {
    let h = Harness::new();
    h.docker.plan(Plan::Hold);
    let run = h.api.add_run("r1", StateType::Scheduled);
    let guard = h.admit(&run);
    h.api
        .set_flow_run_state("r1", &claim_proposal("me"), false)
        .await
        .expect("claimed");
    h.worker.reconcile(&pool()).await.expect("reconciled");
    assert_eq!(h.api.current("r1").name.as_deref(), Some("Pending"));
    drop(guard);
}

#[tokio::test]
async fn a_claim_nothing_attributes_is_never_touched() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Pending); // e.g. a Python worker's claim
    h.worker.reconcile(&pool()).await.expect("reconciled");
    assert_eq!(h.api.current("r1").state_type, StateType::Pending);
    assert!(h.api.calls_to("set_state r1 SCHEDULED").is_empty());
}

#[tokio::test]
async fn another_workers_claim_is_ended_only_when_it_has_been_offline_too_long() {
    let h = Harness::new();
    claimed_by(&h, "online", "w-online").await;
    claimed_by(&h, "recent", "w-recent").await;
    claimed_by(&h, "gone", "w-gone").await;
    h.api.set_worker("w-online", true, Duration::ZERO);
    h.api.set_worker("w-recent", false, Duration::from_secs(60));
    h.api
        .set_worker("w-gone", false, Duration::from_secs(20 * 60));
    h.worker.reconcile(&pool()).await.expect("reconciled");
    assert_eq!(h.api.current("online").state_type, StateType::Pending);
    assert_eq!(h.api.current("recent").state_type, StateType::Pending);
    let gone = h.api.current("gone");
    assert_eq!(gone.state_type, StateType::Crashed);
    let message = gone.message.unwrap_or_default();
    assert!(
        message
            .starts_with("Worker 'w-gone' claimed this flow run and has been offline for 20 min")
            && message.contains("not rescheduled"),
        "{message}"
    );
    assert_eq!(h.api.calls_to("pool_workers").len(), 1, "one read per pass");
}

#[tokio::test]
async fn with_reschedule_orphans_another_workers_dead_claim_is_rescheduled() {
    let h = Harness::with(&["--reschedule-orphans", "--orphan-claim-timeout", "1m"]);
    claimed_by(&h, "r1", "w-gone").await;
    h.api.set_worker("w-gone", false, Duration::from_secs(120));
    h.worker.reconcile(&pool()).await.expect("reconciled");
    let state = h.api.current("r1");
    assert_eq!(state.name.as_deref(), Some("Rescheduled"));
    assert!(
        state
            .message
            .unwrap_or_default()
            .contains("--reschedule-orphans")
    );
}

// ---------------------------------------------------------------- vanished containers

#[tokio::test]
async fn a_run_whose_container_on_this_host_is_gone_is_crashed() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Running);
    h.api.set_pid("r1", &format!("{HOST}:deadbeef0000aaaa"));
    h.api.set_claim_label("r1", "me");
    h.api.add_run("r2", StateType::Scheduled);
    h.api.set_externally("r2", StateType::Running);
    h.api.set_pid("r2", "https://10.1.2.3:2376:other");
    h.worker.reconcile(&pool()).await.expect("reconciled");
    let state = h.api.current("r1");
    assert_eq!(state.state_type, StateType::Crashed);
    assert_eq!(
        state.message.as_deref(),
        Some(
            "The container 'deadbeef0000' of this flow run was removed from Docker host http+docker://localhost outside the worker; the flow run's outcome is unknown."
        )
    );
    assert_eq!(
        h.api.current("r2").state_type,
        StateType::Running,
        "another host's"
    );
}

/// Fleet F2/F3: every worker on a unix socket writes `http+docker://localhost:<id>`, so a
/// worker offline on another machine (lost, or cut off) must not have its runs Crashed here as
/// "removed outside the worker": nothing says its container was ever on this Engine.
#[tokio::test]
async fn a_socket_pid_of_an_offline_worker_not_seen_on_this_engine_is_left_alone() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Running);
    h.api.set_pid("r1", &format!("{HOST}:abc"));
    h.api.set_claim_label("r1", "host-3");
    h.api.set_worker("host-3", false, Duration::from_secs(3600));
    h.api.add_run("r2", StateType::Scheduled);
    h.api.set_externally("r2", StateType::Running);
    h.api.set_pid("r2", &format!("{HOST}:def"));
    h.worker.reconcile(&pool()).await.expect("reconciled");
    assert_eq!(h.api.current("r1").state_type, StateType::Running);
    assert_eq!(
        h.api.current("r2").state_type,
        StateType::Running,
        "no claimer known (a Python worker's run)"
    );
}

/// C2's case: killed right after recording the pid, before the run's labels were sent; the
/// claim is in the history only.
#[tokio::test]
async fn a_socket_pid_of_its_own_claim_known_from_the_history_only_is_crashed() {
    let h = Harness::new();
    claimed_by(&h, "r1", "me").await;
    h.api.set_externally("r1", StateType::Running);
    h.api.set_pid("r1", &format!("{HOST}:abc"));
    claimed_by(&h, "r2", "host-3").await;
    h.api.set_externally("r2", StateType::Running);
    h.api.set_pid("r2", &format!("{HOST}:def"));
    h.worker.reconcile(&pool()).await.expect("reconciled");
    assert_eq!(h.api.current("r1").state_type, StateType::Crashed);
    assert_eq!(
        h.api.current("r2").state_type,
        StateType::Running,
        "another machine's worker"
    );
}

#[tokio::test]
async fn a_gone_container_of_a_run_another_live_worker_watches_is_left_to_it() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Running);
    h.api.set_pid("r1", &format!("{HOST}:abc"));
    h.api.set_claim_label("r1", "neighbour");
    h.api.set_online(&["neighbour"]);
    h.worker.reconcile(&pool()).await.expect("reconciled");
    assert_eq!(h.api.current("r1").state_type, StateType::Running);
}

#[tokio::test]
async fn a_watched_container_removed_outside_the_worker_is_crashed_as_such() {
    let h = Harness::new();
    h.docker.plan(Plan::Hold);
    let run = h.api.add_run("r1", StateType::Scheduled);
    let task = h.spawn_submit(run);
    h.until("watched", |h| {
        matches!(h.worker.registry.phase("r1"), Some(Phase::Watching { .. }))
    })
    .await;
    h.docker.remove_outside("c1");
    task.await.expect("run task");
    let state = h.api.current("r1");
    assert_eq!(state.state_type, StateType::Crashed);
    assert!(
        state
            .message
            .unwrap_or_default()
            .contains("was removed from Docker host")
    );
}

// ---------------------------------------------------------------- orphaned containers

#[tokio::test]
async fn a_container_outliving_its_final_run_is_stopped_once_after_the_grace() {
    let mut h = Harness::with(&["--orphan-grace", "0s", "--cancel-grace", "7"]);
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Crashed);
    h.docker.leave(found("c9", "r1", "someone", true, None));
    h.worker.reconcile(&pool()).await.expect("reconciled");
    drain(&h).await;
    assert_eq!(h.docker.calls_to("stop c9 grace=7").len(), 1);
    assert_eq!(h.metrics.orphans_stopped.get(), 1);
    assert!(h.logged().iter().any(|l| l.contains("was still running")));
    assert_eq!(
        h.api.current("r1").state_type,
        StateType::Crashed,
        "unchanged"
    );
}

#[tokio::test]
async fn within_the_grace_or_with_no_stop_orphans_it_is_left_running() {
    let h = Harness::new(); // grace 60 s; the run just became final
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Completed);
    h.docker.leave(found("c9", "r1", "me", true, None));
    h.worker.reconcile(&pool()).await.expect("reconciled");
    assert!(h.docker.calls_to("stop").is_empty());

    let off = Harness::with(&["--orphan-grace", "0s", "--no-stop-orphans"]);
    off.api.add_run("r1", StateType::Scheduled);
    off.api.set_externally("r1", StateType::Crashed);
    off.docker.leave(found("c9", "r1", "me", true, None));
    off.worker.reconcile(&pool()).await.expect("reconciled");
    assert!(off.docker.calls_to("stop").is_empty());
}

#[tokio::test]
async fn a_watched_run_set_crashed_through_the_api_has_its_container_stopped() {
    let h = Harness::with(&["--orphan-grace", "0s"]);
    h.docker.plan(Plan::Hold);
    let run = h.api.add_run("r1", StateType::Scheduled);
    let task = h.spawn_submit(run);
    h.until("watched", |h| {
        matches!(h.worker.registry.phase("r1"), Some(Phase::Watching { .. }))
    })
    .await;
    h.api.set_externally("r1", StateType::Crashed); // an operator or an automation
    h.worker.reconcile(&pool()).await.expect("reconciled");
    task.await.expect("run task");
    drain(&h).await;
    assert_eq!(h.docker.calls_to("stop c1").len(), 1);
    assert_eq!(h.metrics.orphans_stopped.get(), 1);
    let state = h.api.current("r1");
    assert_eq!(state.state_type, StateType::Crashed);
    assert_eq!(state.message, None, "the operator's state stays");
}

#[tokio::test]
async fn a_container_of_a_live_run_is_never_stopped() {
    let h = Harness::with(&["--orphan-grace", "0s"]);
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Running);
    h.docker.leave(found("c9", "r1", "me", true, None));
    h.worker.reconcile(&pool()).await.expect("reconciled");
    assert!(h.docker.calls_to("stop").is_empty());
    assert!(matches!(
        h.worker.registry.phase("r1"),
        Some(Phase::Watching { .. })
    ));
    h.lifetime.stop.cancel();
    drain(&h).await;
}

#[tokio::test]
async fn one_pass_costs_one_filtered_read_when_all_agree() {
    let h = Harness::new();
    h.worker.reconcile(&pool()).await.expect("reconciled");
    assert_eq!(h.api.calls(), ["read_pool_flow_runs pool"]);
    assert_eq!(h.docker.calls().len(), 1, "{:?}", h.docker.calls());
}

// ---------------------------------------------------------------- pending-claim teardowns

/// A `cleanup.message.v1` frame as Prefect's pending-claim protocol will send it.
fn pending_claim_frame(run_id: &str, pid: Option<&str>) -> crate::prefect::channel::CleanupMessage {
    let lease = (chrono::Utc::now() + chrono::Duration::minutes(1)).to_rfc3339();
    let frame = serde_json::json!({
        "type": "cleanup.message.v1", "id": "f1", "sent_at": "2026-12-04T00:00:00Z",
        "payload": {
            "message_id": "m1", "reservation_token": "t1", "lease_expires_at": lease,
            "delivery_count": 1, "kind": "pending_claim_teardown.v1", "data": {},
            "target": {"flow_run_id": run_id, "claim_id": "c-1", "execution_id": null,
                       "infrastructure_pid": pid},
        }
    });
    match crate::prefect::channel::parse_inbound(&frame).expect("a valid frame") {
        crate::prefect::channel::Inbound::Cleanup(message) => message,
        other => panic!("not a cleanup: {other:?}"),
    }
}

#[tokio::test]
async fn a_withdrawn_claims_container_on_this_host_is_removed_and_acknowledged() {
    let h = Harness::new();
    h.docker.leave(found("c7", "r1", "me", false, None));
    let message = pending_claim_frame("r1", None);
    assert_eq!(message.kind, "pending_claim_teardown.v1");
    assert_eq!(h.worker.teardown_pending_claim(&message).await, Ok(()));
    assert_eq!(h.docker.calls_to("remove c7").len(), 1);
    assert_eq!(h.docker.existing(), 0);
    // Nothing left: acknowledged again without touching anything.
    assert_eq!(h.worker.teardown_pending_claim(&message).await, Ok(()));
    assert_eq!(h.docker.calls_to("remove").len(), 1);
}

#[tokio::test]
async fn a_withdrawn_claim_on_another_host_is_released_to_it() {
    let h = Harness::new();
    h.docker.leave(found("c7", "r1", "me", true, None));
    let message = pending_claim_frame("r1", Some("https://10.9.9.9:2376:c7"));
    assert_eq!(
        h.worker.teardown_pending_claim(&message).await,
        Err("infrastructure_not_available")
    );
    assert!(h.docker.calls_to("remove").is_empty());
}

#[tokio::test]
async fn a_withdrawn_claim_being_submitted_here_withdraws_before_its_container() {
    let h = Harness::new();
    let run = h.api.add_run("r1", StateType::Scheduled);
    let message = pending_claim_frame("r1", None);
    let worker = std::sync::Arc::clone(&h.worker);
    h.docker.after(super::fakes::Step::Pulled, move || {
        use futures_util::FutureExt as _;
        // For a run held here the teardown needs no I/O: it completes on its first poll.
        let done = worker.teardown_pending_claim(&message).now_or_never();
        assert_eq!(done, Some(Ok(())));
    });
    h.submit(run).await;
    drain(&h).await;
    assert!(
        h.docker.calls_to("start").is_empty(),
        "{:?}",
        h.docker.calls()
    );
}
