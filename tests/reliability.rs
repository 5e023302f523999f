//! Never lose a run: a worker killed with runs in flight is restarted and reports every run
//! exactly once with its true exit code; the kernel's OOM kill is named. Real server, real
//! Docker, the built binary. Each test prints its figure.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// The machine, shared by the tests of this binary. R7 asserts how soon a cancel stops a
/// container, so it takes this for writing and runs alone; every test that loads the machine
/// (many containers, an OOM-killing cgroup, a private dockerd, a server restart) takes it for
/// reading, so they still run beside one another but never beside R7.
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A run's Crashed states, told apart.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct CrashedStates {
    /// Reports of the run's crash: exactly one is right.
    reports: usize,
    /// The final state put back by a worker after another worker's late claim displaced it
    /// (its message says `[restored by worker …]`): not a second report, but counted.
    restored: usize,
}

async fn crashed_states(api: &Api, run_id: &str) -> CrashedStates {
    let (status, states) = api
        .call(
            reqwest::Method::GET,
            &format!("flow_run_states/?flow_run_id={run_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{states}");
    let mut counted = CrashedStates::default();
    for state in states.as_array().into_iter().flatten() {
        if state["type"] != json!("CRASHED") {
            continue;
        }
        let message = state["message"].as_str().unwrap_or_default();
        if message.contains("[restored by worker") {
            counted.restored += 1;
        } else {
            counted.reports += 1;
        }
    }
    counted
}

/// Asserts each run was reported Crashed exactly once; returns how many restored states
/// there were in all (for the test's figure).
async fn reported_once(api: &Api, ids: &[&str]) -> usize {
    let mut restored = 0;
    for id in ids {
        let states = crashed_states(api, id).await;
        assert_eq!(
            states.reports, 1,
            "run {id} reported more than once: {states:?}"
        );
        restored += states.restored;
    }
    restored
}

/// R1: SIGKILL the worker with 20 runs in flight; restart it; 20/20 reported with their true
/// exit codes, none twice, no container started twice.
#[tokio::test(flavor = "multi_thread")]
async fn r1_killed_worker_restarts_and_reports_every_run_once() {
    let _load = MACHINE.read().await;
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("r1");
    let guard = ContainerGuard::for_pool(&pool);
    let dep = api.busybox_deployment(&pool, json!({})).await;
    // Half exit while the worker is down, half are still running when it comes back.
    let mut runs: Vec<(String, i64)> = Vec::new();
    for i in 0..20i64 {
        let code = i + 1;
        let sleep = if i % 2 == 0 { 2 } else { 25 };
        let id = api
            .create_flow_run(
                &dep,
                json!({"command": format!("sh -c 'sleep {sleep}; exit {code}'")}),
            )
            .await;
        runs.push((id, code));
    }
    let name = unique("r1-worker");
    let mut worker = WorkerProcess::start(server, &["--pool", &pool, "--name", &name], &[]);
    eventually(Duration::from_secs(180), "20 containers", async || {
        let n = guard.containers().len();
        if n < 20 {
            Err(format!("{n} containers; worker:\n{}", worker.output()))
        } else {
            Ok(())
        }
    })
    .await;
    // Every pid recorded: all 20 are in flight.
    let ids: Vec<&str> = runs.iter().map(|(id, _)| id.as_str()).collect();
    wait_for_pids(&api, &ids, Duration::from_secs(120), &worker).await;
    worker.child.kill().expect("SIGKILL the worker");
    let _ = worker.child.wait();
    // The short ones exit unwatched.
    let short: Vec<&str> = runs.iter().step_by(2).map(|(id, _)| id.as_str()).collect();
    eventually(
        Duration::from_secs(60),
        "the short runs' containers to exit while no worker watches",
        async || {
            let running: Vec<String> = guard
                .running()
                .iter()
                .filter_map(|c| {
                    let labels = &inspect(c)["Config"]["Labels"];
                    labels["io.prefect.flow-run-id"].as_str().map(str::to_owned)
                })
                .filter(|run| short.contains(&run.as_str()))
                .collect();
            if running.is_empty() {
                Ok(())
            } else {
                Err(format!("still running: {running:?}"))
            }
        },
    )
    .await;
    let restarted = Instant::now();
    let worker = WorkerProcess::start(server, &["--pool", &pool, "--name", &name], &[]);
    let mut reported = 0;
    for (id, code) in &runs {
        let run = api.wait_for_final_state(id, Duration::from_secs(120)).await;
        assert_eq!(
            run["state"]["type"],
            json!("CRASHED"),
            "{run}\n{}",
            worker.output()
        );
        let message = run["state"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("non-zero status code {code}.")),
            "run {id} expected code {code}: {message}"
        );
        reported += 1;
    }
    let last_report = restarted.elapsed();
    let restored = reported_once(&api, &ids).await;
    assert_eq!(guard.containers().len(), 20, "a run got a second container");
    // Adopted runs emit their exit events like any other: the container exited, and the
    // restarted worker executed the run (whose exit code the event carries).
    let worker_id = format!("prefect.worker.docker.{name}");
    for (id, code) in &runs[..2] {
        let filter = json!({
            "any_resource": {"id": [format!("prefect.flow-run.{id}")]},
            "occurred": {"since": "2020-01-01T00:00:00Z"},
            "order": "ASC",
        });
        let (exited, executed) = eventually(
            Duration::from_secs(60),
            format!("one exited and one executed event of adopted run {id}"),
            async || {
                let events = api.events(filter.clone(), 50).await;
                let named = |name: &str| -> Vec<Value> {
                    events
                        .iter()
                        .filter(|e| e["event"] == name)
                        .cloned()
                        .collect()
                };
                match (
                    &named("prefect.docker.container.exited")[..],
                    &named("prefect.worker.executed-flow-run")[..],
                ) {
                    ([exited], [executed]) => Ok((exited.clone(), executed.clone())),
                    (exited, executed) => Err(format!(
                        "exited {} / executed {} events:\n{}",
                        exited.len(),
                        executed.len(),
                        worker.output()
                    )),
                }
            },
        )
        .await;
        assert!(
            exited["related"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["prefect.resource.id"] == worker_id.as_str()),
            "{exited}"
        );
        assert_eq!(executed["resource"]["prefect.resource.id"], worker_id);
        let run_related = executed["related"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["prefect.resource.role"] == "flow-run")
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            run_related["prefect.infrastructure.status-code"],
            code.to_string(),
            "{executed}"
        );
    }
    eprintln!(
        "R1 figure: {reported}/20 runs reported with true exit codes after SIGKILL + restart, 0 duplicates ({restored} restored states, not reports), last report {:.1} s after restart",
        last_report.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oom_kill_is_named_in_the_crashed_message() {
    let _load = MACHINE.read().await;
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("oom");
    let _guard = ContainerGuard::for_pool(&pool);
    let mut runs = Vec::new();
    // Kept containers are inspected; auto-removed ones are known from the Engine's oom event.
    // (On this machine the kernel takes ~40 s to OOM-kill a 16 MiB cgroup even for a bare
    // `docker run`, longer under the suite's load: the wait is long, the test is not timed.)
    for auto_remove in [false, true] {
        let dep = api
            .busybox_deployment(
                &pool,
                json!({"mem_limit": "16m", "memswap_limit": "16m", "auto_remove": auto_remove,
                    "command": "sh -c 'head -c 200m /dev/zero | tail > /dev/null'"
                }),
            )
            .await;
        runs.push(api.create_flow_run(&dep, json!({})).await);
    }
    let worker = WorkerProcess::start(server, &["--pool", &pool], &[]);
    for run_id in &runs {
        let run: Value = api
            .wait_for_final_state(run_id, Duration::from_secs(400))
            .await;
        let message = run["state"]["message"].as_str().unwrap_or_default();
        assert_eq!(
            run["state"]["type"],
            json!("CRASHED"),
            "{run}\n{}",
            worker.output()
        );
        assert!(message.contains("non-zero status code 137"), "{message}");
        assert!(message.contains("OOMKilled"), "{message}");
    }
}

/// How a worker learns that a run was cancelled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Learns {
    /// From its `/events/out` subscription.
    FromEvents,
    /// From its cancellation poll.
    FromPolling,
}

/// Starts a `sleep 300` run, sets it Cancelling, and returns how long until its container
/// stopped (the Engine's `FinishedAt` minus the time of the request); asserts the run ends
/// Cancelled. Runs alone on the machine (see [`MACHINE`]).
async fn cancel_a_running_run(grace: u64, learns: Learns, extra_env: &[(&str, &str)]) -> Duration {
    let _alone = MACHINE.write().await;
    let server = server();
    let api = Api::new(server);
    let pool = unique("r7");
    let guard = ContainerGuard::for_pool(&pool);
    // PID 1 `sleep` ignores SIGTERM: the stop has to escalate to SIGKILL after the grace.
    let dep = api
        .busybox_deployment(&pool, json!({"command": "sleep 300"}))
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool, "--cancel-grace", &grace.to_string()],
        extra_env,
    );
    wait_for_pids(&api, &[&run_id], Duration::from_secs(120), &worker).await;
    let running = guard.running();
    assert_eq!(running.len(), 1, "{}", worker.output());
    if learns == Learns::FromEvents {
        worker
            .wait_for_output(
                "subscribed to the pool's flow-run events",
                Duration::from_secs(60),
            )
            .await;
    }
    let cancelled_at = chrono::Utc::now();
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            &format!("flow_runs/{run_id}/set_state"),
            Some(json!({"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": true})),
        )
        .await;
    assert!(status < 300, "{status} {body}");
    eventually(
        Duration::from_secs(60),
        "the container to stop",
        async || {
            if guard.running().is_empty() {
                Ok(())
            } else {
                Err(worker.output())
            }
        },
    )
    .await;
    let state = &inspect(&running[0])["State"];
    let finished = state["FinishedAt"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .unwrap_or_else(|| panic!("no FinishedAt: {state}"));
    let stopped_after = (finished.to_utc() - cancelled_at)
        .to_std()
        .unwrap_or_default();
    let run = api
        .wait_for_final_state(&run_id, Duration::from_secs(60))
        .await;
    assert_eq!(
        run["state"]["type"],
        json!("CANCELLED"),
        "{run}\n{}",
        worker.output()
    );
    stopped_after
}

/// R7: cancelling a running run stops its container within the grace period (+2 s) and the
/// run ends Cancelled — learnt from the `/events/out` subscription (polling is set to 5 min,
/// so only the event can explain the stop).
#[tokio::test(flavor = "multi_thread")]
async fn r7_cancelling_a_running_run_stops_its_container() {
    require_docker();
    const GRACE: u64 = 4;
    let stopped = cancel_a_running_run(
        GRACE,
        Learns::FromEvents,
        &[("DOCKER_WORKER_CANCELLATION_POLL_SECONDS", "300")],
    )
    .await;
    assert!(
        stopped <= Duration::from_secs(GRACE + 2),
        "container stopped {stopped:?} after the cancel request (grace {GRACE} s)"
    );
    eprintln!(
        "R7 figure: container stopped {:.1} s after Cancelling (grace {GRACE} s, via /events/out), run Cancelled",
        stopped.as_secs_f64()
    );
}

/// R7, fallback: with the subscription off, the poll finds the cancellation.
#[tokio::test(flavor = "multi_thread")]
async fn r7_polling_fallback_stops_a_cancelled_run() {
    require_docker();
    const GRACE: u64 = 2;
    let stopped = cancel_a_running_run(
        GRACE,
        Learns::FromPolling,
        &[
            ("DOCKER_WORKER_CANCELLATION_EVENTS", "false"),
            ("DOCKER_WORKER_CANCELLATION_POLL_SECONDS", "1"),
        ],
    )
    .await;
    assert!(
        stopped <= Duration::from_secs(GRACE + 3),
        "stopped after {stopped:?}"
    );
    eprintln!(
        "R7 fallback figure: container stopped {:.1} s after Cancelling (grace {GRACE} s, 1 s polling)",
        stopped.as_secs_f64()
    );
}

/// R3: restart the Docker daemon mid-run (with live-restore, so the containers survive it):
/// the worker stays up, re-watches the containers once the daemon is back, reports their true
/// exit codes noting the restart, and runs submitted after the restart work.
#[tokio::test(flavor = "multi_thread")]
async fn r3_docker_daemon_restart_mid_run() {
    let _load = MACHINE.read().await;
    require_docker();
    let mut daemon = support::services::TlsDockerd::start();
    let server = server();
    let api = Api::new(server);
    let pool = unique("r3");
    let dep = api
        .busybox_deployment(&pool, json!({"command": "sh -c 'sleep 20; exit 5'"}))
        .await;
    let runs = [
        api.create_flow_run(&dep, json!({})).await,
        api.create_flow_run(&dep, json!({})).await,
        api.create_flow_run(&dep, json!({})).await,
    ];
    let certs = daemon.client_certs.to_string_lossy().into_owned();
    let mut worker = WorkerProcess::start(
        server,
        &["--pool", &pool],
        &[
            ("DOCKER_HOST", &daemon.host),
            ("DOCKER_TLS_VERIFY", "1"),
            ("DOCKER_CERT_PATH", &certs),
        ],
    );
    let ids: Vec<&str> = runs.iter().map(String::as_str).collect();
    wait_for_pids(&api, &ids, Duration::from_secs(120), &worker).await;
    let restart_began = Instant::now();
    daemon.restart(Duration::from_secs(3));
    for id in &runs {
        let run = api.wait_for_final_state(id, Duration::from_secs(120)).await;
        assert_eq!(
            run["state"]["type"],
            json!("CRASHED"),
            "{run}\n{}",
            worker.output()
        );
        let message = run["state"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("non-zero status code 5.")
                && message.contains("The Docker Engine restarted"),
            "{message}"
        );
    }
    let accounted_after = restart_began.elapsed();
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "the worker must stay up:\n{}",
        worker.output()
    );

    let after = api
        .busybox_deployment(&pool, json!({"command": "sh -c 'exit 6'"}))
        .await;
    let new_run = api.create_flow_run(&after, json!({})).await;
    let run = api
        .wait_for_final_state(&new_run, Duration::from_secs(120))
        .await;
    assert!(
        run["state"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("status code 6"),
        "{run}\n{}",
        worker.output()
    );
    eprintln!(
        "R3 figure: 3/3 runs accounted for {:.1} s after the daemon restart began, worker up, a new run after it reported code 6",
        accounted_after.as_secs_f64()
    );
}

/// R2: the Prefect API goes away for 120 s while runs are in flight: the worker stays up,
/// keeps watching, and once the API is back every run is reported once with its true code.
#[tokio::test(flavor = "multi_thread")]
async fn r2_prefect_outage_of_120_s_loses_no_run() {
    let _load = MACHINE.read().await;
    require_docker();
    let mut server = PrefectServer::start();
    let api = Api::new(&server);
    let pool = unique("r2");
    let guard = ContainerGuard::for_pool(&pool);
    let dep = api.busybox_deployment(&pool, json!({})).await;
    let mut runs = Vec::new();
    for code in 1..=5 {
        let id = api
            .create_flow_run(
                &dep,
                json!({"command": format!("sh -c 'sleep 15; exit {code}'")}),
            )
            .await;
        runs.push((id, code));
    }
    let mut worker = WorkerProcess::start(&server, &["--pool", &pool], &[]);
    let ids: Vec<&str> = runs.iter().map(|(id, _)| id.as_str()).collect();
    wait_for_pids(&api, &ids, Duration::from_secs(120), &worker).await;
    server.stop();
    // Deliberately 120 s: the outage is what R2 is about (the containers exit during it).
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "the worker must stay up:\n{}",
        worker.output()
    );
    assert!(
        guard.running().is_empty(),
        "containers should have exited during the outage"
    );
    server.restart();
    let back = Instant::now();
    for (id, code) in &runs {
        let run = api.wait_for_final_state(id, Duration::from_secs(180)).await;
        let message = run["state"]["message"].as_str().unwrap_or_default();
        assert_eq!(
            run["state"]["type"],
            json!("CRASHED"),
            "{run}\n{}",
            worker.output()
        );
        assert!(
            message.contains(&format!("non-zero status code {code}.")),
            "{message}"
        );
    }
    let last_report = back.elapsed();
    let restored = reported_once(&api, &ids).await;
    eprintln!(
        "R2 figure: 5/5 runs reported once with true exit codes after a 120 s API outage ({restored} restored states, not reports), last one {:.1} s after the API came back",
        last_report.as_secs_f64()
    );
}

/// R4: three workers on one pool and 300 short runs: every run executed exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn r4_three_workers_300_runs_each_executed_once() {
    let _load = MACHINE.read().await;
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("r4");
    let guard = ContainerGuard::for_pool(&pool);
    let dep = api
        .busybox_deployment(&pool, json!({"command": "sh -c 'exit 7'"}))
        .await;
    // Three workers poll the pool while the 300 runs arrive; they compete for every one.
    let started = Instant::now();
    let workers: Vec<WorkerProcess> = (1..=3)
        .map(|i| {
            WorkerProcess::start(
                server,
                &["--pool", &pool, "--name", &format!("{pool}-w{i}")],
                &[],
            )
        })
        .collect();
    let mut ids = Vec::new();
    for _ in 0..60 {
        let batch =
            futures_util::future::join_all((0..5).map(|_| api.create_flow_run(&dep, json!({}))))
                .await;
        ids.extend(batch);
    }
    assert_eq!(ids.len(), 300);
    for id in &ids {
        let run = api.wait_for_final_state(id, Duration::from_secs(600)).await;
        assert_eq!(
            run["state"]["type"],
            json!("CRASHED"),
            "{run}\n{}",
            workers
                .iter()
                .map(WorkerProcess::output)
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
    }
    let elapsed = started.elapsed();
    // Exactly one container per run, and each run reported once.
    let containers = guard.containers();
    let mut per_run = std::collections::HashMap::<String, usize>::new();
    let mut per_worker = std::collections::HashMap::<String, usize>::new();
    for c in &containers {
        let info = inspect(c);
        let labels = &info["Config"]["Labels"];
        *per_run
            .entry(
                labels["io.prefect.flow-run-id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default() += 1;
        *per_worker
            .entry(
                labels["io.prefect.worker-name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default() += 1;
    }
    assert_eq!(containers.len(), 300, "containers: {}", containers.len());
    assert!(
        per_run.values().all(|n| *n == 1) && per_run.len() == 300,
        "a run ran twice"
    );
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let restored = reported_once(&api, &ids).await;
    let mut shares: Vec<_> = per_worker.into_iter().collect();
    shares.sort();
    eprintln!(
        "R4 figure: 300/300 runs executed and reported exactly once by 3 workers in {:.1} s ({restored} restored states, not reports); per worker: {shares:?}",
        elapsed.as_secs_f64()
    );
}
