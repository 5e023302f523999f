//! The worker's loops through the fakes: adoption after a restart, polls and the `--limit`
//! slots, cancellation polls, and reports through API outages and shutdown.

use std::time::Duration;

use super::Harness;
use super::fakes::{Plan, found};
use crate::docker::OutputStream;
use crate::prefect::{LastLog, StateProposal, StateType};
use crate::worker::ports::PrefectApi as _;
use crate::worker::registry::Phase;

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

// ---------------------------------------------------------------- adoption

#[tokio::test]
async fn its_own_running_container_is_watched_again_and_reported() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Running);
    h.docker.leave(found("old1", "r1", "me", true, None));
    h.worker.reconcile(&pool()).await.expect("adopted");
    assert!(matches!(
        h.worker.registry.phase("r1"),
        Some(Phase::Watching { .. })
    ));
    h.docker.exit("old1", 2);
    drain(&h).await;
    let state = h.api.current("r1");
    assert_eq!(state.state_type, StateType::Crashed);
    assert_eq!(
        state.message.as_deref(),
        Some(crate::worker::crash_message(2).as_str())
    );
    assert_eq!(h.worker.registry.len(), 0);
}

/// A forwarding container adopted after a restart: the Engine's log is read again from a
/// second before the newest line the API has, and exactly the lines after it are forwarded,
/// with the timestamps the first worker would have given them.
#[tokio::test]
async fn an_adopted_forwarding_container_resumes_after_the_last_line_the_api_has() {
    let mut h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Running);
    let mut container = found("old1", "r1", "me", true, None);
    container
        .labels
        .insert(crate::job::labels::LOGS_TO_API.into(), "true".into());
    h.docker.leave(container);
    let t = |s: i64, micros: i64| {
        chrono::DateTime::from_timestamp(1_800_000_000 + s, 0)
            .map(|t| t + chrono::TimeDelta::microseconds(micros))
    };
    // Three lines read together at 10.5 s (stamped .5, .500001, .500002), then two more.
    let lines = [(0, 0), (10, 500_000), (10, 500_000), (10, 500_000), (12, 0)];
    h.docker.print(
        lines
            .iter()
            .enumerate()
            .map(|(i, (s, us))| (OutputStream::Stdout, t(*s, *us), format!("n {i}")))
            .collect(),
    );
    // The first worker got as far as the second line of the burst.
    let newest = t(10, 500_001).unwrap();
    h.api.set_last_log("r1", LastLog::At(newest));
    h.worker.reconcile(&pool()).await.expect("adopted");
    h.docker.exit("old1", 0);
    drain(&h).await;
    assert_eq!(
        h.docker.watches()[0].logs_since,
        Some(newest.timestamp() - 1)
    );
    let forwarded: Vec<(String, String)> = h
        .entries()
        .into_iter()
        .filter(|e| e.name.starts_with("container."))
        .map(|e| (e.message, e.timestamp))
        .collect();
    assert_eq!(
        forwarded,
        [
            ("n 3".to_owned(), "2027-01-15T08:00:10.500002Z".to_owned()),
            ("n 4".to_owned(), "2027-01-15T08:00:12.000000Z".to_owned()),
        ]
    );
    assert_eq!(h.api.calls_to("last_log r1").len(), 1);
}

/// A forwarding container that exited while no worker watched: what it printed after the
/// API's newest forwarded line is forwarded before the exit is reported.
#[tokio::test]
async fn an_exited_forwarding_container_still_has_its_remaining_output_forwarded() {
    let mut h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Running);
    let mut container = found("old1", "r1", "me", false, Some(3));
    container
        .labels
        .insert(crate::job::labels::LOGS_TO_API.into(), "true".into());
    h.docker.leave(container);
    let t = |s: i64| chrono::DateTime::from_timestamp(1_800_000_000 + s, 0);
    h.docker.print(
        (0..4)
            .map(|i| (OutputStream::Stderr, t(i), format!("e {i}")))
            .collect(),
    );
    h.api.set_last_log("r1", LastLog::At(t(1).unwrap()));
    h.worker.reconcile(&pool()).await.expect("adopted");
    drain(&h).await;
    assert_eq!(h.api.current("r1").state_type, StateType::Crashed);
    let forwarded: Vec<String> = h
        .entries()
        .into_iter()
        .filter(|e| e.name == "container.stderr")
        .map(|e| e.message)
        .collect();
    assert_eq!(forwarded, ["e 2", "e 3"]);
}

#[tokio::test]
async fn an_offline_workers_exited_container_is_reported_at_once() {
    let mut h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Running);
    h.api.set_online(&["someone-else"]);
    h.docker
        .leave(found("old1", "r1", "gone-worker", false, Some(5)));
    h.worker.reconcile(&pool()).await.expect("adopted");
    drain(&h).await;
    assert_eq!(h.api.current("r1").state_type, StateType::Crashed);
    assert!(
        h.docker.calls_to("watch").is_empty(),
        "no watch for an exited one"
    );
    assert!(
        h.logged()
            .iter()
            .any(|l| l.contains("while no worker was watching"))
    );
    assert!(
        h.emitted()
            .contains(&"prefect.worker.executed-flow-run".to_owned())
    );
}

#[tokio::test]
async fn an_online_workers_container_is_left_alone() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Running);
    h.api.set_online(&["other"]);
    h.docker.leave(found("old1", "r1", "other", true, None));
    h.worker.reconcile(&pool()).await.expect("looked");
    assert_eq!(h.worker.registry.len(), 0);
    assert!(h.docker.calls_to("watch").is_empty());
}

#[tokio::test]
async fn a_container_of_a_final_run_is_not_adopted() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Completed);
    h.docker.leave(found("old1", "r1", "me", true, None));
    h.worker.reconcile(&pool()).await.expect("looked");
    assert_eq!(h.worker.registry.len(), 0);
}

#[tokio::test]
async fn a_container_created_but_never_started_is_removed_and_its_run_rescheduled() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Pending);
    h.docker.leave(found("old1", "r1", "me", false, None));
    h.worker.reconcile(&pool()).await.expect("adopted");
    drain(&h).await;
    let state = h.api.current("r1");
    assert_eq!(state.name.as_deref(), Some("Rescheduled"));
    assert!(state.message.unwrap_or_default().contains(
        "created container 'name-old1' for this flow run but stopped before starting it"
    ));
    assert_eq!(h.docker.calls_to("remove old1").len(), 1);
    assert!(h.docker.calls_to("start").is_empty());
}

#[tokio::test]
async fn a_never_started_container_of_a_run_past_pending_is_crashed_and_kept() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Running);
    h.docker.leave(found("old1", "r1", "me", false, None));
    h.worker.reconcile(&pool()).await.expect("adopted");
    drain(&h).await;
    let state = h.api.current("r1");
    assert_eq!(state.state_type, StateType::Crashed);
    assert!(
        state
            .message
            .unwrap_or_default()
            .contains("WorkerInterrupted: the worker stopped after creating container 'name-old1'")
    );
    assert!(h.docker.calls_to("remove").is_empty());
}

#[tokio::test]
async fn an_adopted_run_can_be_cancelled() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Running);
    h.docker.leave(found("old1", "r1", "me", true, None));
    h.worker.reconcile(&pool()).await.expect("adopted");
    h.api.set_externally("r1", StateType::Cancelling);
    h.worker.cancel_run("r1");
    drain(&h).await;
    assert_eq!(h.docker.calls_to("stop old1").len(), 1);
    assert_eq!(h.api.current("r1").state_type, StateType::Cancelled);
}

// ---------------------------------------------------------------- polls and slots

#[tokio::test]
async fn a_poll_takes_runs_up_to_the_limit_and_a_freed_slot_polls_again() {
    let h = Harness::with(&["--limit", "2"]);
    h.docker.plan(Plan::Hold);
    for id in ["r1", "r2", "r3"] {
        h.api.add_run(id, StateType::Scheduled);
    }
    h.worker.record_pool(pool());
    let taken = h.worker.poll_once().await.expect("polled");
    assert_eq!(taken, 2);
    h.until("both are watched", |h| {
        h.docker.calls_to("watch").len() == 2
    })
    .await;
    assert_eq!(h.worker.registry.len(), 2);
    h.docker.exit("c1", 0);
    h.until("the slot is free", |h| h.worker.registry.len() == 1)
        .await;
    use futures_util::FutureExt as _;
    assert!(
        h.worker.registry.poll_wanted().now_or_never().is_some(),
        "the freed slot asks for a poll"
    );
    assert_eq!(h.worker.poll_once().await.expect("polled"), 1);
    h.until("r3 is watched", |h| h.docker.calls_to("watch").len() == 3)
        .await;
    h.docker.exit("c2", 0);
    h.docker.exit("c3", 0);
    drain(&h).await;
    assert_eq!(h.worker.registry.len(), 0);
}

#[tokio::test]
async fn a_run_already_held_is_not_submitted_twice() {
    let h = Harness::new();
    h.docker.plan(Plan::Hold);
    h.api.add_run("r1", StateType::Scheduled);
    h.worker.record_pool(pool());
    assert_eq!(h.worker.poll_once().await.expect("polled"), 1);
    // The run is still Scheduled in a stale poll answer: set it back to be offered again.
    h.until("claimed", |h| h.worker.registry.phase("r1").is_some())
        .await;
    assert!(matches!(
        h.worker.registry.admit("r1"),
        crate::worker::registry::Admission::AlreadyHeld
    ));
    h.lifetime.stop.cancel();
    drain(&h).await;
}

#[tokio::test]
async fn the_cancellation_poll_cancels_held_runs_found_cancelling() {
    let h = Harness::new();
    h.docker.plan(Plan::Hold);
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.spawn_submit(run);
    h.until("watched", |h| {
        matches!(h.worker.registry.phase("r1"), Some(Phase::Watching { .. }))
    })
    .await;
    h.api.set_externally("r1", StateType::Cancelling);
    h.worker.poll_cancellations().await;
    drain(&h).await;
    assert_eq!(h.api.current("r1").state_type, StateType::Cancelled);
}

// ---------------------------------------------------------------- outages and shutdown

#[tokio::test(start_paused = true)]
async fn a_report_made_during_an_outage_is_delivered_when_it_ends() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.fail_next("set_flow_run_state", 4);
    let boom = StateProposal::crashed("boom");
    let delivered = h
        .worker
        .through_outage("report", || h.api.set_flow_run_state("r1", &boom, false))
        .await;
    assert!(delivered.is_ok());
    assert_eq!(h.api.calls_to("set_state r1 CRASHED").len(), 5);
    assert_eq!(h.api.current("r1").state_type, StateType::Crashed);
}

#[tokio::test(start_paused = true)]
async fn a_report_still_failing_when_the_grace_ends_is_given_up() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.fail_next("set_flow_run_state", u32::MAX);
    let abandon = h.lifetime.abandon.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        abandon.cancel();
    });
    let boom = StateProposal::crashed("boom");
    let result = h
        .worker
        .through_outage("report", || h.api.set_flow_run_state("r1", &boom, false))
        .await;
    assert!(result.is_err_and(|e| e.is_transient()));
    let tries = h.api.calls_to("set_state").len();
    // 1 s doubling: tries at 0, 1, 3, 7, 15 s, then the wait to 31 s is cut at 30 s.
    assert_eq!(tries, 5);
}

#[tokio::test]
async fn a_non_transient_error_is_not_retried() {
    let h = Harness::new();
    let boom = StateProposal::crashed("boom");
    let result = h
        .worker
        .through_outage("report", || {
            h.api.set_flow_run_state("missing", &boom, false)
        })
        .await;
    assert!(result.is_err_and(|e| e.is_not_found()));
    assert_eq!(h.api.calls_to("set_state missing").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_crash_report_through_an_outage_arrives_in_order_after_it() {
    let h = Harness::new();
    h.docker.plan(Plan::Exit(1));
    let run = h.api.add_run("r1", StateType::Scheduled);
    // Claim and Submitting go through; the crash report meets a 3-failure outage.
    let api = std::sync::Arc::clone(&h.api);
    h.docker.after(super::fakes::Step::Started, move || {
        api.fail_next("set_flow_run_state", 3);
    });
    h.submit(run).await;
    assert_eq!(h.api.calls_to("set_state r1 CRASHED").len(), 4);
    assert_eq!(h.api.current("r1").state_type, StateType::Crashed);
    assert_eq!(h.metrics.runs_crashed.get(), 1);
}

#[tokio::test]
async fn an_idle_worker_winds_down_at_once() {
    let h = Harness::new();
    h.worker.tasks.spawn({
        let stop = h.lifetime.stop.clone();
        async move { stop.cancelled().await }
    });
    h.lifetime.stop.cancel();
    // Nothing in flight: the wind-down needs no grace (a paused clock would not hide a wait,
    // so this runs on real time and would take 30 s if it waited).
    h.worker.wind_down().await;
    assert!(
        !h.lifetime.abandon.is_cancelled(),
        "nothing had to be abandoned"
    );
}

// ---------------------------------------------------------------- drain

/// Waits on the paused clock (which then advances) until `condition` holds.
async fn until_paused(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(start_paused = true)]
async fn a_drain_claims_nothing_new_but_watches_and_reports_to_the_end() {
    let h = Harness::with(&["--drain-timeout", "10m"]);
    h.docker.plan(Plan::Hold);
    h.api.add_run("r1", StateType::Scheduled);
    let worker = std::sync::Arc::clone(&h.worker);
    let running = tokio::spawn(async move { worker.run().await });
    let registry = std::sync::Arc::clone(&h.worker.registry);
    until_paused("r1 is watched", || {
        matches!(registry.phase("r1"), Some(Phase::Watching { .. }))
    })
    .await;
    h.lifetime.requested.cancel(); // SIGTERM
    h.api.add_run("r2", StateType::Scheduled);
    let polls = h.api.calls_to("poll pool").len();
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(!running.is_finished(), "still draining");
    assert!(
        h.api.calls_to("poll pool").len() > polls,
        "polls go on (for /health)"
    );
    assert_eq!(
        h.api.current("r2").state_type,
        StateType::Scheduled,
        "not claimed"
    );
    h.docker.exit("c1", 4);
    running.await.expect("joined").expect("clean exit");
    assert_eq!(
        h.api.current("r1").state_type,
        StateType::Crashed,
        "reported"
    );
    assert_eq!(h.worker.registry.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_times_out_leaves_the_container_running_for_adoption() {
    let h = Harness::with(&["--drain-timeout", "2m"]);
    h.docker.plan(Plan::Hold);
    h.api.add_run("r1", StateType::Scheduled);
    let worker = std::sync::Arc::clone(&h.worker);
    let running = tokio::spawn(async move { worker.run().await });
    let registry = std::sync::Arc::clone(&h.worker.registry);
    until_paused("r1 is watched", || {
        matches!(registry.phase("r1"), Some(Phase::Watching { .. }))
    })
    .await;
    h.lifetime.requested.cancel();
    running.await.expect("joined").expect("clean exit");
    assert!(
        h.docker.calls_to("stop").is_empty(),
        "the container keeps running"
    );
    assert_eq!(h.api.current("r1").name.as_deref(), Some("Submitting"));
}

#[tokio::test(start_paused = true)]
async fn without_drain_a_signal_stops_watching_at_once() {
    let h = Harness::new();
    h.docker.plan(Plan::Hold);
    h.api.add_run("r1", StateType::Scheduled);
    let worker = std::sync::Arc::clone(&h.worker);
    let running = tokio::spawn(async move { worker.run().await });
    let registry = std::sync::Arc::clone(&h.worker.registry);
    until_paused("r1 is watched", || {
        matches!(registry.phase("r1"), Some(Phase::Watching { .. }))
    })
    .await;
    h.lifetime.requested.cancel();
    running.await.expect("joined").expect("clean exit");
    assert!(h.lifetime.stop.is_cancelled());
    assert!(h.docker.calls_to("stop").is_empty());
}

// ---------------------------------------------------------------- recovering from outages

#[tokio::test(start_paused = true)]
async fn after_a_long_api_outage_a_new_run_is_claimed_as_soon_as_the_api_answers() {
    let h = Harness::new();
    h.docker.plan(Plan::Hold);
    h.worker.record_pool(pool());
    h.api.fail_next("get_scheduled_flow_runs", u32::MAX);
    h.api.fail_next("probe", u32::MAX);
    let worker = std::sync::Arc::clone(&h.worker);
    let stop = h.lifetime.stop.clone();
    tokio::spawn(async move { worker.api_probe_loop(stop).await });
    let worker = std::sync::Arc::clone(&h.worker);
    let stop = h.lifetime.stop.clone();
    let polling = tokio::spawn(async move { worker.poll_loop(None, stop).await });
    // Five minutes of failures: the poll interval has stretched to minutes.
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert!(h.worker.api_health.is_down());
    h.api.fail_next("get_scheduled_flow_runs", 0);
    h.api.fail_next("probe", 0);
    h.api.add_run("r1", StateType::Scheduled);
    let back = tokio::time::Instant::now();
    let api = std::sync::Arc::clone(&h.api);
    until_paused("r1 is claimed", || {
        api.current("r1").state_type == StateType::Pending
    })
    .await;
    // The probe (every 2 s) saw it, and the poll went at once: not the stretched interval.
    assert!(
        back.elapsed() < Duration::from_secs(5),
        "claimed {:?} after the API answered",
        back.elapsed()
    );
    h.lifetime.stop.cancel();
    polling.await.expect("joined").expect("ok");
}

#[tokio::test(start_paused = true)]
async fn while_the_engine_does_not_answer_nothing_is_claimed_and_its_return_polls_at_once() {
    let h = Harness::new();
    h.docker.plan(Plan::Hold);
    h.worker.record_pool(pool());
    h.docker.set_engine_down(true);
    h.api.add_run("r1", StateType::Scheduled);
    assert_eq!(h.worker.poll_once().await.expect("polled"), 0);
    assert_eq!(
        h.api.current("r1").state_type,
        StateType::Scheduled,
        "left for others"
    );
    use futures_util::FutureExt as _;
    assert!(h.worker.registry.poll_wanted().now_or_never().is_none());
    h.docker.set_engine_down(false);
    let registry = std::sync::Arc::clone(&h.worker.registry);
    tokio::time::timeout(Duration::from_secs(5), registry.poll_wanted())
        .await
        .expect("the Engine's return asks for a poll");
    assert_eq!(h.worker.poll_once().await.expect("polled"), 1);
    h.lifetime.stop.cancel();
    drain(&h).await;
}
