//! Never lose a run: a worker killed with runs in flight is restarted and reports every run
//! exactly once with its true exit code; the kernel's OOM kill is named. Real server, real
//! Docker, the built binary. Each test prints its figure.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

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
        .map(|a| a.iter().filter(|s| s["type"] == json!("CRASHED")).count())
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
    let dep = api
        .create_deployment(
            &pool,
            "exit-code",
            "flows.py:exit_code",
            json!({"image": BUSYBOX}),
        )
        .await;
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
    for (id, _) in &runs {
        while api.read_flow_run(id).await["infrastructure_pid"].is_null() {
            assert!(Instant::now() < deadline, "run {id} never got its pid");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
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
    let dep = api
        .create_deployment(
            &pool,
            "exit-code",
            "flows.py:exit_code",
            json!({
                "image": BUSYBOX, "mem_limit": "16m", "memswap_limit": "16m",
                "command": "sh -c 'head -c 200m /dev/zero | tail > /dev/null'"
            }),
        )
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let worker = WorkerProcess::start(server, &["--pool", &pool], &[]);
    let run: Value = api
        .wait_for_final_state(&run_id, Duration::from_secs(120))
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

/// R7: cancelling a running run stops its container within the grace period (+2 s) and the
/// run ends Cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn r7_cancelling_a_running_run_stops_its_container() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("r7");
    let guard = ContainerGuard::for_pool(&pool);
    // PID 1 `sleep` ignores SIGTERM: the stop has to escalate to SIGKILL after the grace.
    let dep = api
        .create_deployment(
            &pool,
            "exit-code",
            "flows.py:exit_code",
            json!({"image": BUSYBOX, "command": "sleep 300"}),
        )
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    const GRACE: u64 = 4;
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool, "--cancel-grace", &GRACE.to_string()],
        &[("DOCKER_WORKER_CANCELLATION_POLL_SECONDS", "0.5")],
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
    assert!(
        stopped_after <= Duration::from_secs(GRACE + 2),
        "container stopped {stopped_after:?} after the cancel request (grace {GRACE} s)"
    );
    eprintln!(
        "R7 figure: container stopped {:.1} s after Cancelling (grace {GRACE} s), run Cancelled",
        stopped_after.as_secs_f64()
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
        .create_deployment(
            &pool,
            "exit-code",
            "flows.py:exit_code",
            json!({"image": BUSYBOX, "command": "sh -c 'sleep 20; exit 5'"}),
        )
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
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &runs {
        while api.read_flow_run(id).await["infrastructure_pid"].is_null() {
            assert!(
                Instant::now() < deadline,
                "run {id} never started:\n{}",
                worker.output()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
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
        .create_deployment(
            &pool,
            "exit-code",
            "flows.py:exit_code",
            json!({"image": BUSYBOX, "command": "sh -c 'exit 6'"}),
        )
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
