//! Never lose a run: a worker killed with runs in flight is restarted and reports every run
//! exactly once with its true exit code; the kernel's OOM kill is named. Real server, real
//! Docker, the built binary. Each test prints its figure.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// R4 loads the machine for minutes; the R7 timings must not run under that load.
static LOAD_SENSITIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn crashed_states(api: &Api, run_id: &str) -> usize {
    let (status, states) = api
        .call(
            reqwest::Method::GET,
            &format!("flow_run_states/?flow_run_id={run_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{states}");
    states
        .as_array()
        .map(|a| {
            a.iter()
                // A final state put back after another worker's late claim displaced it is
                // not a second report of the run.
                .filter(|s| {
                    s["type"] == json!("CRASHED")
                        && !s["message"]
                            .as_str()
                            .unwrap_or_default()
                            .contains("[restored by worker")
                })
                .count()
        })
        .unwrap_or_default()
}

/// R1: SIGKILL the worker with 20 runs in flight; restart it; 20/20 reported with their true
/// exit codes, none twice, no container started twice.
#[tokio::test(flavor = "multi_thread")]
async fn r1_killed_worker_restarts_and_reports_every_run_once() {
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
    let deadline = Instant::now() + Duration::from_secs(180);
    while guard.containers().len() < 20 {
        assert!(
            Instant::now() < deadline,
            "only {} containers started:\n{}",
            guard.containers().len(),
            worker.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every pid recorded: all 20 are in flight.
    let ids: Vec<&str> = runs.iter().map(|(id, _)| id.as_str()).collect();
    wait_for_pids(&api, &ids, Duration::from_secs(120), &worker).await;
    worker.child.kill().expect("SIGKILL the worker");
    let _ = worker.child.wait();
    tokio::time::sleep(Duration::from_secs(4)).await; // the short ones exit unwatched
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
        assert_eq!(
            crashed_states(&api, id).await,
            1,
            "run {id} reported more than once"
        );
        reported += 1;
    }
    assert_eq!(guard.containers().len(), 20, "a run got a second container");
    // Adopted runs emit their exit events like any other: the container exited, and the
    // restarted worker executed the run (whose exit code the event carries).
    for (id, code) in &runs[..2] {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let filter = json!({
                "any_resource": {"id": [format!("prefect.flow-run.{id}")]},
                "occurred": {"since": "2020-01-01T00:00:00Z"},
                "order": "ASC",
            });
            let events = api.events(filter, 50).await;
            let named = |name: &str| {
                events
                    .iter()
                    .filter(|e| e["event"] == name)
                    .cloned()
                    .collect::<Vec<_>>()
            };
            let exited = named("prefect.docker.container.exited");
            let executed = named("prefect.worker.executed-flow-run");
            if exited.len() == 1 && executed.len() == 1 {
                let worker_id = format!("prefect.worker.docker.{name}");
                assert!(
                    exited[0]["related"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|r| r["prefect.resource.id"] == worker_id.as_str()),
                    "{}",
                    exited[0]
                );
                assert_eq!(executed[0]["resource"]["prefect.resource.id"], worker_id);
                let run_related = executed[0]["related"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["prefect.resource.role"] == "flow-run")
                    .cloned()
                    .unwrap_or_default();
                assert_eq!(
                    run_related["prefect.infrastructure.status-code"],
                    code.to_string(),
                    "{}",
                    executed[0]
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "adopted run {id}: exited {} / executed {} events:\n{}",
                exited.len(),
                executed.len(),
                worker.output()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    eprintln!(
        "R1 figure: {reported}/20 runs reported with true exit codes after SIGKILL + restart, 0 duplicates, last report {:.1} s after restart",
        restarted.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oom_kill_is_named_in_the_crashed_message() {
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

/// Starts a `sleep 300` run, sets it Cancelling, and returns how long until its container
/// stopped; asserts the run ends Cancelled.
async fn cancel_a_running_run(grace: u64, extra_env: &[(&str, &str)]) -> Duration {
    let _exclusive = LOAD_SENSITIVE.lock().await;
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
    let deadline = Instant::now() + Duration::from_secs(120);
    while guard.running().is_empty()
        || api.read_flow_run(&run_id).await["infrastructure_pid"].is_null()
    {
        assert!(
            Instant::now() < deadline,
            "never started:\n{}",
            worker.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // let the events subscription settle
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            &format!("flow_runs/{run_id}/set_state"),
            Some(json!({"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": true})),
        )
        .await;
    assert!(status < 300, "{status} {body}");
    let cancelled_at = Instant::now();
    while !guard.running().is_empty() {
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(60),
            "container never stopped:\n{}",
            worker.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped_after = cancelled_at.elapsed();
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
    let stopped =
        cancel_a_running_run(GRACE, &[("DOCKER_WORKER_CANCELLATION_POLL_SECONDS", "300")]).await;
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
    tokio::time::sleep(Duration::from_secs(120)).await; // the containers exit during the outage
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
        assert_eq!(crashed_states(&api, id).await, 1);
    }
    eprintln!(
        "R2 figure: 5/5 runs reported with true exit codes after a 120 s API outage, last one {:.1} s after the API came back",
        back.elapsed().as_secs_f64()
    );
}

/// R4: three workers on one pool and 300 short runs: every run executed exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn r4_three_workers_300_runs_each_executed_once() {
    let _exclusive = LOAD_SENSITIVE.lock().await;
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
    for id in &ids {
        assert_eq!(crashed_states(&api, id).await, 1, "run {id}");
    }
    let mut shares: Vec<_> = per_worker.into_iter().collect();
    shares.sort();
    eprintln!(
        "R4 figure: 300/300 runs executed exactly once by 3 workers in {:.1} s; per worker: {shares:?}",
        elapsed.as_secs_f64()
    );
}
