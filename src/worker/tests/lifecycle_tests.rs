//! One run's lifecycle through the fakes: claims, cancellations at every step, exit codes
//! from every source, and the slot freed on every path.

use super::Harness;
use super::fakes::{Plan, Race, Step};
use crate::docker::{ContainerEvent, ContainerEventKind, DockerError, OutputStream};
use crate::prefect::{SetStateStatus, StateType};
use crate::worker::lifecycle::claim::{self, Claim};
use crate::worker::registry::Phase;
use std::time::Duration;

fn state_of(h: &Harness, id: &str) -> (StateType, String) {
    let state = h.api.current(id);
    (state.state_type, state.message.unwrap_or_default())
}

// ---------------------------------------------------------------- claims

#[tokio::test]
async fn a_clean_run_is_claimed_submitted_watched_and_left_to_its_engine() {
    let mut h = Harness::new();
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.submit(run).await;
    let names: Vec<String> = h
        .api
        .history("r1")
        .iter()
        .filter_map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["Scheduled", "Pending", "Submitting"]);
    assert_eq!(h.api.calls_to("pid r1").len(), 1, "{:?}", h.api.calls());
    assert_eq!(h.docker.calls_to("start").len(), 1);
    assert_eq!(h.metrics.runs_completed.get(), 1);
    assert_eq!(h.metrics.runs_claimed.get(), 1);
    assert_eq!(h.worker.registry.len(), 0, "the slot is free");
    let events = h.emitted();
    assert_eq!(
        events,
        [
            "prefect.worker.submitted-flow-run",
            "prefect.docker.container.created",
            "prefect.docker.container.running",
            "prefect.docker.container.resources",
            "prefect.docker.container.exited",
            "prefect.worker.executed-flow-run",
        ]
    );
    let logs = h.logged();
    assert!(
        logs.iter()
            .any(|l| l.contains("submitted to infrastructure")),
        "{logs:?}"
    );
}

#[tokio::test]
async fn a_run_another_worker_claimed_since_a_fresh_poll_is_refused_by_the_server() {
    let h = Harness::new();
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Pending); // another worker's claim
    h.submit(run).await;
    // A fresh poll's run is proposed at once; the server refuses Pending from Pending.
    assert!(h.api.calls_to("read_flow_run").is_empty());
    assert_eq!(h.api.calls_to("set_state r1 PENDING/Pending").len(), 1);
    assert!(h.api.calls_to("set_state r1 PENDING/Submitting").is_empty());
    assert!(h.docker.calls().is_empty());
    assert_eq!(h.worker.registry.len(), 0);
}

#[tokio::test]
async fn a_stale_poll_s_run_no_longer_scheduled_is_not_proposed() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    h.api.set_externally("r1", StateType::Pending); // another worker's claim
    let claim = claim::claim(&h.worker, "r1", Duration::from_secs(5)).await;
    assert_eq!(claim, Claim::NotScheduled(Some(StateType::Pending)));
    assert_eq!(h.api.calls_to("read_flow_run r1").len(), 1);
    assert!(h.api.calls_to("set_state").is_empty());
}

#[tokio::test]
async fn a_claim_the_server_made_from_scheduled_is_not_read_back() {
    let h = Harness::new();
    h.api.add_run("r1", StateType::Scheduled);
    let claim = claim::claim(&h.worker, "r1", Duration::ZERO).await;
    assert_eq!(claim, Claim::Claimed);
    // The answer carries the scheduled time the server copies only from Scheduled: no read
    // of the run before, nor of its history after.
    assert_eq!(h.api.calls(), ["set_state r1 PENDING/Pending force=false"]);
}

#[tokio::test]
async fn a_refused_claim_starts_nothing() {
    let mut h = Harness::new();
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.api
        .answer_next("r1", SetStateStatus::Reject, Some(StateType::Running));
    h.submit(run).await;
    assert!(h.docker.calls().is_empty());
    assert!(
        h.logged()
            .iter()
            .any(|l| l.contains("Server returned a non-pending state 'RUNNING'")),
    );
    assert_eq!(h.metrics.runs_claimed.get(), 0);
    assert_eq!(h.worker.registry.len(), 0);
}

#[tokio::test]
async fn an_aborted_claim_starts_nothing() {
    let mut h = Harness::new();
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.api.answer_next("r1", SetStateStatus::Abort, None);
    h.submit(run).await;
    assert!(h.docker.calls().is_empty());
    assert!(
        h.logged()
            .iter()
            .any(|l| l.contains("Server sent an abort signal: scripted"))
    );
    assert_eq!(h.worker.registry.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_claim_told_to_wait_proposes_again() {
    let h = Harness::new();
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.api.answer_next("r1", SetStateStatus::Wait, None);
    h.submit(run).await;
    assert_eq!(h.api.calls_to("set_state r1 PENDING/Pending").len(), 2);
    assert_eq!(h.docker.calls_to("start").len(), 1);
}

#[tokio::test]
async fn a_claim_displaced_by_an_earlier_one_stands_down() {
    let mut h = Harness::new();
    let run = h.api.add_run("r1", StateType::Scheduled);
    // Another worker's claim lands between our read and ours, and this server accepts ours
    // anyway (what SQLite under load was seen to do).
    h.api.race_claim(
        "r1",
        Race {
            before: vec![StateType::Pending],
            ours_current: true,
            ..Race::default()
        },
    );
    h.submit(run).await;
    assert!(h.docker.calls().is_empty(), "{:?}", h.docker.calls());
    let logs = h.logged();
    assert!(
        logs.iter()
            .any(|l| l
                .contains("another worker claimed it first (state before this claim: 'PENDING')")),
        "{logs:?}"
    );
    assert!(h.api.calls_to("set_state r1 PENDING/Submitting").is_empty());
    assert_eq!(h.worker.registry.len(), 0);
}

#[tokio::test]
async fn a_late_claim_on_a_finished_run_puts_its_final_state_back() {
    let mut h = Harness::new();
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.api.race_claim(
        "r1",
        Race {
            after: vec![StateType::Pending, StateType::Running, StateType::Completed],
            ours_current: true,
            ..Race::default()
        },
    );
    h.submit(run).await;
    let restored = h.api.current("r1");
    assert_eq!(restored.state_type, StateType::Completed);
    assert!(
        restored
            .message
            .unwrap_or_default()
            .contains("[restored by worker 'me' after its late claim displaced it]")
    );
    assert_eq!(
        h.api
            .calls_to("set_state r1 COMPLETED/Completed force=true")
            .len(),
        1
    );
    assert!(h.docker.calls().is_empty());
    assert!(
        h.logged()
            .iter()
            .any(|l| l.contains("Restored the final state 'Completed'"))
    );
}

#[tokio::test]
async fn a_late_claim_that_is_not_current_changes_nothing() {
    let h = Harness::new();
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.api.race_claim(
        "r1",
        Race {
            after: vec![StateType::Pending, StateType::Completed],
            ours_current: false,
            ..Race::default()
        },
    );
    h.submit(run).await;
    assert!(h.api.calls_to("set_state r1 COMPLETED").is_empty());
    assert!(h.docker.calls().is_empty());
}

#[tokio::test]
async fn a_deleted_deployment_cancels_the_run_once_with_force() {
    let h = Harness::new();
    h.api.add_deployment();
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.api.delete_deployment();
    h.submit(run).await;
    let (state, message) = state_of(&h, "r1");
    assert_eq!(state, StateType::Cancelled);
    assert_eq!(message, "Deployment d1 no longer exists, cancelled run.");
    assert_eq!(
        h.api
            .calls_to("set_state r1 CANCELLED/Cancelled force=true")
            .len(),
        1
    );
    assert_eq!(h.metrics.runs_cancelled.get(), 1);
    assert!(h.docker.calls().is_empty());
}

// ---------------------------------------------------------------- cancellation

#[tokio::test]
async fn cancelled_before_the_create_no_container_is_made() {
    let h = Harness::new();
    let run = h.api.add_run("r1", StateType::Scheduled);
    let worker = std::sync::Arc::clone(&h.worker);
    h.docker
        .after(Step::Pulled, move || worker.cancel_run("r1"));
    h.submit(run).await;
    assert!(
        h.docker.calls_to("create").is_empty(),
        "{:?}",
        h.docker.calls()
    );
    let (state, message) = state_of(&h, "r1");
    assert_eq!(state, StateType::Cancelled);
    assert_eq!(
        message,
        "Flow run cancelled by worker while pending (before its container was created)."
    );
    assert_eq!(h.metrics.runs_cancelled.get(), 1);
    assert_eq!(h.worker.registry.len(), 0);
}

#[tokio::test]
async fn cancelled_between_create_and_start_the_container_is_removed() {
    let h = Harness::new();
    let run = h.api.add_run("r1", StateType::Scheduled);
    let worker = std::sync::Arc::clone(&h.worker);
    h.docker
        .after(Step::Created, move || worker.cancel_run("r1"));
    h.submit(run).await;
    assert_eq!(h.docker.calls_to("remove c1").len(), 1);
    assert!(h.docker.calls_to("start").is_empty());
    assert_eq!(h.docker.existing(), 0);
    assert!(
        state_of(&h, "r1")
            .1
            .contains("before its container was started")
    );
    assert_eq!(h.worker.registry.len(), 0);
}

#[tokio::test]
async fn cancelled_right_after_the_start_the_container_is_stopped_at_once() {
    let h = Harness::new();
    h.docker.plan(Plan::Hold);
    let run = h.api.add_run("r1", StateType::Scheduled);
    let worker = std::sync::Arc::clone(&h.worker);
    h.docker
        .after(Step::Started, move || worker.cancel_run("r1"));
    h.submit(run).await;
    assert_eq!(h.docker.calls_to("stop c1 grace=30").len(), 1);
    let (state, message) = state_of(&h, "r1");
    assert_eq!(state, StateType::Cancelled);
    assert!(message.contains("the worker stopped its container 'name-c1' (exit code 143)"));
}

#[tokio::test]
async fn cancelled_while_watched_the_container_is_stopped_once_and_the_run_cancelled() {
    let h = Harness::with(&["--cancel-grace", "5"]);
    h.docker.plan(Plan::Hold);
    let run = h.api.add_run("r1", StateType::Scheduled);
    let task = h.spawn_submit(run);
    h.until("the container is watched", |h| {
        matches!(h.worker.registry.phase("r1"), Some(Phase::Watching { .. }))
    })
    .await;
    h.api.set_externally("r1", StateType::Cancelling);
    h.worker.cancel_run("r1");
    h.worker.cancel_run("r1"); // a second notice (event and poll) does nothing more
    task.await.expect("run task");
    h.worker.tasks.close();
    h.worker.tasks.wait().await;
    assert_eq!(h.docker.calls_to("stop c1 grace=5").len(), 1);
    assert_eq!(state_of(&h, "r1").0, StateType::Cancelled);
    assert_eq!(h.metrics.runs_cancelled.get(), 1);
    assert_eq!(h.worker.registry.len(), 0);
}

#[tokio::test]
async fn a_run_found_cancelled_by_its_submitting_proposal_withdraws_before_the_pull() {
    let h = Harness::new();
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.api
        .answer_next("r1", SetStateStatus::Accept, Some(StateType::Pending));
    h.api
        .answer_next("r1", SetStateStatus::Reject, Some(StateType::Cancelling));
    h.submit(run).await;
    assert!(h.docker.calls().is_empty(), "{:?}", h.docker.calls());
    assert!(
        state_of(&h, "r1")
            .1
            .contains("before its container was pulled")
    );
}

// ---------------------------------------------------------------- exits

#[tokio::test]
async fn a_non_zero_exit_from_the_wait_is_crashed_with_its_tail() {
    let mut h = Harness::new();
    h.docker.plan(Plan::Exit(3));
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.submit(run).await;
    let (state, message) = state_of(&h, "r1");
    assert_eq!(state, StateType::Crashed);
    assert_eq!(message, crate::worker::crash_message(3));
    let logs = h.logged();
    let announce = logs
        .iter()
        .position(|l| l.contains("exited with status code 3; its last 2 lines of output follow"))
        .expect("the tail is announced");
    assert_eq!(logs[announce + 1..announce + 3], ["line 1", "line 2"]);
    assert_eq!(h.metrics.runs_crashed.get(), 1);
}

/// Tail lines carry the Engine's timestamps made strictly increasing (the fake's two lines share
/// one) and their stream's logger name; the announcement is stamped just before the first, so
/// the UI, which sorts by timestamp, shows the announcement and then the lines in order.
#[tokio::test]
async fn the_crash_tail_sorts_by_timestamp_in_the_order_it_was_printed() {
    let mut h = Harness::new();
    h.docker.plan(Plan::Exit(3));
    let at = chrono::DateTime::from_timestamp(1_800_000_000, 0);
    h.docker.print(vec![
        (OutputStream::Stdout, at, "line 1".into()),
        (OutputStream::Stdout, at, "line 2".into()),
        (OutputStream::Stderr, at, "boom".into()),
    ]);
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.submit(run).await;
    let mut entries = h.entries();
    entries.sort_by(|a, b| a.timestamp.cmp(&b.timestamp));
    let start = entries
        .iter()
        .position(|e| e.message.contains("its last 3 lines of output follow"))
        .expect("the tail is announced");
    let tail: Vec<(&str, &str, &str)> = entries[start..start + 4]
        .iter()
        .map(|e| (e.name.as_str(), e.message.as_str(), &e.timestamp[17..]))
        .collect();
    assert_eq!(
        tail,
        [
            ("prefect.flow_runs.worker", tail[0].1, "59.999999Z"),
            ("container.stdout", "line 1", "00.000000Z"),
            ("container.stdout", "line 2", "00.000001Z"),
            ("container.stderr", "boom", "00.000002Z"),
        ]
    );
}

/// A forwarding run (`--logs-to-api`) sends every line as it comes, marked by stream and
/// stamped in order; its crash sends no tail, the lines being there already.
#[tokio::test]
async fn forwarded_output_goes_line_by_line_and_replaces_the_crash_tail() {
    let mut h = Harness::with(&["--logs-to-api"]);
    h.docker.plan(Plan::Exit(3));
    let at = |s: i64, micros: i64| {
        chrono::DateTime::from_timestamp(s, 0).map(|t| t + chrono::TimeDelta::microseconds(micros))
    };
    h.docker.print(vec![
        (OutputStream::Stdout, at(1_800_000_000, 5), "out 1".into()),
        (OutputStream::Stderr, at(1_800_000_000, 5), "err 1".into()),
        (OutputStream::Stdout, at(1_800_000_000, 3), "out 2".into()),
        (OutputStream::Stdout, at(1_800_000_001, 0), "out 3".into()),
    ]);
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.submit(run).await;
    assert_eq!(state_of(&h, "r1").0, StateType::Crashed);
    let entries = h.entries();
    let output: Vec<(&str, &str, &str)> = entries
        .iter()
        .filter(|e| e.name.starts_with("container."))
        .map(|e| (e.name.as_str(), e.message.as_str(), &e.timestamp[17..]))
        .collect();
    assert_eq!(
        output,
        [
            ("container.stdout", "out 1", "00.000005Z"),
            ("container.stderr", "err 1", "00.000006Z"),
            ("container.stdout", "out 2", "00.000007Z"),
            ("container.stdout", "out 3", "01.000000Z"),
        ]
    );
    assert!(
        entries
            .iter()
            .all(|e| e.level == 20 || !e.name.starts_with("container."))
    );
    assert!(
        !entries
            .iter()
            .any(|e| e.message.contains("lines of output follow")),
        "{entries:?}"
    );
}

#[tokio::test]
async fn a_lost_wait_takes_the_exit_code_from_the_engine_events() {
    let h = Harness::new();
    h.docker.plan(Plan::Lost);
    let run = h.api.add_run("r1", StateType::Scheduled);
    let worker = std::sync::Arc::clone(&h.worker);
    h.docker.after(Step::Started, move || {
        worker.engine_facts.record(&ContainerEvent {
            id: "c1".into(),
            kind: ContainerEventKind::Died { code: 7 },
            time: 0,
        });
        worker.engine_facts.record(&ContainerEvent {
            id: "c1".into(),
            kind: ContainerEventKind::OomKilled,
            time: 0,
        });
    });
    h.submit(run).await;
    let (state, message) = state_of(&h, "r1");
    assert_eq!(state, StateType::Crashed);
    assert!(
        message.starts_with(&crate::worker::crash_message(7)),
        "{message}"
    );
    assert!(message.contains("(OOMKilled)"));
}

#[tokio::test]
async fn a_lost_wait_with_no_engine_facts_is_logged_not_reported() {
    let mut h = Harness::new();
    h.docker.plan(Plan::Lost);
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.submit(run).await;
    assert_eq!(h.api.current("r1").name.as_deref(), Some("Submitting"));
    assert!(
        h.logged()
            .iter()
            .any(|l| l.contains("Lost connection to flow run"))
    );
    assert_eq!(h.worker.registry.len(), 0);
}

#[tokio::test]
async fn an_exit_after_an_engine_restart_says_so() {
    let h = Harness::new();
    h.docker.plan(Plan::ExitAfterEngineLoss(1));
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.submit(run).await;
    assert!(state_of(&h, "r1").1.contains("The Docker Engine restarted"));
}

#[tokio::test]
async fn a_create_failure_is_crashed_with_the_step_and_a_creation_failed_event() {
    let mut h = Harness::new();
    h.docker.fail_create(|| DockerError::NameConflict {
        name: "x".into(),
        attempts: 50,
    });
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.submit(run).await;
    let (state, message) = state_of(&h, "r1");
    assert_eq!(state, StateType::Crashed);
    assert!(
        message.starts_with("Failed to submit flow run to infrastructure: NameConflict: "),
        "{message}"
    );
    assert!(
        h.emitted()
            .contains(&"prefect.docker.container.creation-failed".to_owned())
    );
    assert_eq!(h.worker.registry.len(), 0);
}

#[tokio::test]
async fn a_duplicate_on_this_host_stands_down_without_a_report() {
    let mut h = Harness::new();
    h.docker.fail_create(|| DockerError::Duplicate {
        label: "io.prefect.flow-run-id=r1".into(),
    });
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.submit(run).await;
    assert_eq!(h.api.current("r1").name.as_deref(), Some("Submitting"));
    assert!(h.logged().iter().any(|l| l.contains("this one stood down")));
    assert_eq!(h.metrics.runs_crashed.get(), 0);
}

#[tokio::test]
async fn an_invalid_job_configuration_is_crashed_before_any_container() {
    let h = Harness::new();
    let mut run = h.api.add_run("r1", StateType::Scheduled);
    run.job_variables
        .insert("mem_limit".into(), serde_json::json!("lots"));
    h.submit(run).await;
    let (state, message) = state_of(&h, "r1");
    assert_eq!(state, StateType::Crashed);
    assert!(message.contains("ValidationError"), "{message}");
    assert!(h.docker.calls().is_empty());
}

// ---------------------------------------------------------------- shutdown

#[tokio::test]
async fn shutdown_stops_the_watch_not_the_container_and_frees_the_slot() {
    let h = Harness::new();
    h.docker.plan(Plan::Hold);
    let run = h.api.add_run("r1", StateType::Scheduled);
    let task = h.spawn_submit(run);
    h.until("the container is watched", |h| {
        matches!(h.worker.registry.phase("r1"), Some(Phase::Watching { .. }))
    })
    .await;
    h.lifetime.stop.cancel();
    task.await.expect("run task");
    assert!(h.docker.calls_to("stop").is_empty());
    assert_eq!(h.api.current("r1").name.as_deref(), Some("Submitting"));
    assert_eq!(h.worker.registry.len(), 0);
    assert_eq!(h.metrics.runs_running.get(), 0);
}

// ---------------------------------------------------------------- max_runtime

#[tokio::test(start_paused = true)]
async fn a_run_past_its_max_runtime_is_stopped_and_crashed_saying_so() {
    let mut h = Harness::with(&["--cancel-grace", "3"]);
    h.docker.plan(Plan::Hold);
    let mut run = h.api.add_run("r1", StateType::Scheduled);
    run.job_variables
        .insert("max_runtime".into(), serde_json::json!("5s"));
    h.submit(run).await;
    assert_eq!(h.docker.calls_to("stop c1 grace=3").len(), 1);
    let (state, message) = state_of(&h, "r1");
    assert_eq!(state, StateType::Crashed);
    assert_eq!(
        message,
        "Flow run exceeded its max_runtime of 5s; the worker stopped its container 'name-c1' (exit code 143)."
    );
    assert!(
        h.logged()
            .iter()
            .any(|l| l.contains("exceeded its max_runtime of 5s; stopping its container"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_run_that_ends_within_its_max_runtime_is_not_stopped() {
    let h = Harness::new();
    h.docker.plan(Plan::Exit(0));
    let mut run = h.api.add_run("r1", StateType::Scheduled);
    run.job_variables
        .insert("max_runtime".into(), serde_json::json!(3600));
    h.submit(run).await;
    assert!(h.docker.calls_to("stop").is_empty());
    assert_eq!(h.metrics.runs_completed.get(), 1);
}

// ---------------------------------------------------------------- transient failures

fn registry_unavailable() -> DockerError {
    DockerError::PullFailed {
        image: "local/busybox:dw".into(),
        login_registry: None,
        failure: crate::docker::EngineFailure {
            status: Some(500),
            message: "received unexpected HTTP status: 503 Service Unavailable".into(),
        },
    }
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_is_retried_and_each_attempt_logged() {
    let mut h = Harness::new();
    h.docker.fail_create(registry_unavailable);
    h.docker.fail_create(registry_unavailable);
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.submit(run).await;
    assert_eq!(h.docker.calls_to("create c").len(), 1, "one container");
    assert_eq!(h.docker.calls_to("create failed").len(), 2);
    assert_eq!(h.metrics.runs_completed.get(), 1);
    let attempts: Vec<String> = h
        .logged()
        .into_iter()
        .filter(|l| l.contains("to start the flow run's container failed for a transient reason"))
        .collect();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert!(attempts[0].starts_with("Attempt 1 of 4"), "{}", attempts[0]);
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_past_the_retries_is_crashed() {
    let h = Harness::with(&["--submit-retries", "1"]);
    h.docker.fail_create(registry_unavailable);
    h.docker.fail_create(registry_unavailable);
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.submit(run).await;
    assert_eq!(h.docker.calls_to("create failed").len(), 2);
    let (state, message) = state_of(&h, "r1");
    assert_eq!(state, StateType::Crashed);
    assert!(message.contains("PullFailed"), "{message}");
}

#[tokio::test]
async fn a_failure_about_the_job_is_not_retried() {
    let h = Harness::new();
    h.docker.fail_create(|| DockerError::ImageNotFound {
        image: "nope:1".into(),
        policy: "Never",
    });
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.submit(run).await;
    assert_eq!(h.docker.calls_to("create failed").len(), 1);
    assert_eq!(state_of(&h, "r1").0, StateType::Crashed);
}

// ---------------------------------------------------------------- events on the failure paths

#[tokio::test]
async fn a_container_whose_start_fails_still_had_its_created_event() {
    let mut h = Harness::new();
    h.docker.fail_start(|| DockerError::StartFailed {
        container: "name-c1".into(),
        failure: crate::docker::EngineFailure {
            status: Some(500),
            message: "OCI runtime create failed: exec: \"nope\": executable file not found".into(),
        },
    });
    let run = h.api.add_run("r1", StateType::Scheduled);
    h.submit(run).await;
    assert_eq!(
        h.emitted(),
        [
            "prefect.worker.submitted-flow-run",
            "prefect.docker.container.created",
        ],
        "created, and no creation-failed: the create succeeded"
    );
    assert!(state_of(&h, "r1").1.contains("StartFailed"));
}

#[tokio::test]
async fn an_auto_removed_container_ends_with_a_removing_event() {
    let mut h = Harness::new();
    let mut run = h.api.add_run("r1", StateType::Scheduled);
    run.job_variables
        .insert("auto_remove".into(), serde_json::json!(true));
    h.submit(run).await;
    let events = h.emitted();
    let exited = events
        .iter()
        .position(|e| e == "prefect.docker.container.exited")
        .expect("exited");
    assert_eq!(events[exited + 1], "prefect.docker.container.removing");
}

// ---------------------------------------------------------------- GPUs and submission turns

#[tokio::test]
async fn runs_asking_for_gpus_get_their_own_devices_and_wait_their_turn() {
    let h = Harness::with(&["--gpu-devices", "0,1"]);
    h.docker.plan(Plan::Hold);
    let mut first = h.api.add_run("r1", StateType::Scheduled);
    first
        .job_variables
        .insert("gpus".into(), serde_json::json!(2));
    let mut second = h.api.add_run("r2", StateType::Scheduled);
    second
        .job_variables
        .insert("gpus".into(), serde_json::json!(1));
    let a = h.spawn_submit(first);
    h.until("r1 watched", |h| {
        matches!(h.worker.registry.phase("r1"), Some(Phase::Watching { .. }))
    })
    .await;
    let b = h.spawn_submit(second);
    // r2 is claimed but waits: both devices are r1's.
    h.until("r2 claimed", |h| {
        h.api.current("r2").state_type == StateType::Pending
    })
    .await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(h.docker.calls_to("create").len(), 1, "r2 waits for a GPU");
    h.docker.exit("c1", 0);
    a.await.expect("r1");
    h.until("r2 watched", |h| {
        matches!(h.worker.registry.phase("r2"), Some(Phase::Watching { .. }))
    })
    .await;
    let bodies = h.docker.created_specs();
    let ids = |i: usize| bodies[i].host_config_overrides["DeviceRequests"][0]["DeviceIDs"].clone();
    assert_eq!(ids(0), serde_json::json!(["0", "1"]));
    assert_eq!(ids(1).as_array().map(Vec::len), Some(1));
    h.docker.exit("c2", 0);
    b.await.expect("r2");
}

#[tokio::test]
async fn a_run_asking_for_more_gpus_than_the_worker_has_is_crashed_at_once() {
    let h = Harness::with(&["--gpu-devices", "0"]);
    let mut run = h.api.add_run("r1", StateType::Scheduled);
    run.job_variables
        .insert("gpus".into(), serde_json::json!(2));
    h.submit(run).await;
    let (state, message) = state_of(&h, "r1");
    assert_eq!(state, StateType::Crashed);
    assert!(
        message.contains("asks for 2 GPUs, but this worker hands out 1"),
        "{message}"
    );
    assert!(h.docker.calls_to("create").is_empty());
}

#[tokio::test]
async fn a_run_cancelled_while_waiting_for_gpus_ends_without_a_container() {
    let h = Harness::with(&["--gpu-devices", "0"]);
    h.docker.plan(Plan::Hold);
    let mut first = h.api.add_run("r1", StateType::Scheduled);
    first
        .job_variables
        .insert("gpus".into(), serde_json::json!(1));
    let mut second = h.api.add_run("r2", StateType::Scheduled);
    second
        .job_variables
        .insert("gpus".into(), serde_json::json!(1));
    let a = h.spawn_submit(first);
    h.until("r1 watched", |h| {
        matches!(h.worker.registry.phase("r1"), Some(Phase::Watching { .. }))
    })
    .await;
    let b = h.spawn_submit(second);
    h.until("r2 claimed", |h| {
        h.api.current("r2").state_type == StateType::Pending
    })
    .await;
    h.worker.cancel_run("r2");
    b.await.expect("r2");
    let (state, _) = state_of(&h, "r2");
    assert_eq!(state, StateType::Cancelled);
    assert_eq!(h.docker.calls_to("create").len(), 1, "only r1's container");
    // r1 still holds the device, and gives it back at its exit.
    h.docker.exit("c1", 0);
    a.await.expect("r1");
    assert_eq!(
        h.worker
            .registry
            .gpus
            .acquire(1)
            .await
            .map(|l| l.device_ids()),
        Some(vec!["0".to_owned()])
    );
}
