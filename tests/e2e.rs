//! End to end: the built `docker-worker` binary against a real Prefect 3.9.1 server and the
//! real Docker daemon, running flows from the locally built Prefect image.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread")]
async fn hello_flow_completes_and_pool_gets_the_default_template() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("e2e-hello");
    let _guard = ContainerGuard::for_pool(&pool);
    // The worker creates the pool itself.
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool, "--name", "e2e-hello-worker"],
        &[],
    );
    api.wait_for_pool(&pool, Duration::from_secs(60)).await;
    let dep = api
        .create_deployment(
            &pool,
            "hello",
            "flows.py:hello",
            json!({"image": FLOW_IMAGE}),
        )
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let run = api.wait_for_final_state(&run_id, RUN_TIMEOUT).await;
    assert_eq!(
        run_state(&run).0,
        "COMPLETED",
        "run: {run}\nworker output:\n{}",
        worker.output()
    );
    // The worker recorded the container and labelled the run.
    let pid = run["infrastructure_pid"].as_str().unwrap_or_default();
    assert!(
        pid.starts_with("http+docker://localhost:"),
        "infrastructure_pid {pid:?}"
    );
    // Labels go in the background (retried through a busy server's 503s, never holding up
    // the container), so they may land after the run finished: wait for them.
    let labels = eventually(
        Duration::from_secs(90),
        "the worker's labels on the run",
        async || {
            let labels = api.read_flow_run(&run_id).await["labels"].clone();
            if labels["prefect.worker.name"].is_null() {
                Err(format!("{labels}\n{}", worker.output()))
            } else {
                Ok(labels)
            }
        },
    )
    .await;
    assert_eq!(
        labels["prefect.worker.name"],
        json!("e2e-hello-worker"),
        "{labels}\n{}",
        worker.output()
    );
    assert_eq!(labels["prefect.work-pool.name"], json!(pool));
    // Container output was streamed to the worker's stdout.
    worker
        .wait_for_output("hello world from", Duration::from_secs(30))
        .await;
    // The worker's flow-run logs reached the API.
    let logs = api.flow_run_logs(&run_id).await;
    assert!(
        logs.iter()
            .any(|l| l == &format!("Worker 'e2e-hello-worker' submitting flow run '{run_id}'")),
        "logs: {logs:?}"
    );

    // The pool this worker created carries the reference's default template exactly, plus the
    // typed options (gpus, shm_size, ipc_mode, cpus, ports, platform) and nothing else.
    let (status, pool_json) = api.read_work_pool(&pool).await;
    assert_eq!(status, 200);
    let reference = Command::new(venv().join("bin/prefect"))
        .args([
            "work-pool",
            "get-default-base-job-template",
            "--type",
            "docker",
        ])
        .env("PREFECT_API_URL", &server.api_url)
        .output()
        .expect("run prefect CLI");
    assert!(
        reference.status.success(),
        "{}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let reference: Value =
        serde_json::from_slice(&reference.stdout).expect("reference template JSON");
    assert_eq!(
        serde_json::from_str::<Value>(docker_worker::job::REFERENCE_BASE_JOB_TEMPLATE).unwrap(),
        reference
    );
    let mut ours = pool_json["base_job_template"].clone();
    assert_eq!(ours, docker_worker::job::default_base_job_template());
    for field in docker_worker::job::typed::TYPED_FIELDS {
        assert!(ours["variables"]["properties"][field]["description"].is_string());
        ours["job_configuration"]
            .as_object_mut()
            .unwrap()
            .remove(*field);
        ours["variables"]["properties"]
            .as_object_mut()
            .unwrap()
            .remove(*field);
    }
    assert_eq!(ours, reference);
}

#[tokio::test(flavor = "multi_thread")]
async fn non_zero_exit_is_crashed_with_the_code_and_explanation() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("e2e-exit");
    let guard = ContainerGuard::for_pool(&pool);
    let dep = api
        .busybox_deployment(
            &pool,
            json!({"command": "sh -c 'echo bye from busybox; exit 3'"}),
        )
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let worker = WorkerProcess::start(server, &["--pool", &pool], &[]);
    let run = api.wait_for_final_state(&run_id, RUN_TIMEOUT).await;
    let (ty, message) = run_state(&run);
    assert_eq!(ty, "CRASHED", "run: {run}\nworker:\n{}", worker.output());
    assert_eq!(
        message,
        "Flow run infrastructure exited with non-zero status code 3. Process exited with an unexpected status code."
    );
    assert!(worker.output().contains("bye from busybox"));
    // The container is left for inspection (auto_remove is off) and really exited 3.
    let ids = guard.containers();
    assert_eq!(ids.len(), 1);
    assert_eq!(inspect(&ids[0])["State"]["ExitCode"], json!(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_output_false_still_reports_the_true_exit_code() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("e2e-nostream");
    let _guard = ContainerGuard::for_pool(&pool);
    let dep = api
        .busybox_deployment(&pool, json!({"command": "sh -c 'sleep 1; exit 5'", "stream_output": false, "auto_remove": true}),
        )
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let worker = WorkerProcess::start(server, &["--pool", &pool], &[]);
    let run = api.wait_for_final_state(&run_id, RUN_TIMEOUT).await;
    let (ty, message) = run_state(&run);
    assert_eq!(ty, "CRASHED", "run: {run}\nworker:\n{}", worker.output());
    assert!(message.contains("non-zero status code 5"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_image_crashes_with_a_specific_message_and_the_worker_goes_on() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("e2e-missing");
    let _guard = ContainerGuard::for_pool(&pool);
    let bad = api
        .create_deployment(
            &pool,
            "hello",
            "flows.py:hello",
            json!({"image": "local/does-not-exist:1", "image_pull_policy": "Never"}),
        )
        .await;
    let good = api
        .create_deployment(
            &pool,
            "hello",
            "flows.py:hello",
            json!({"image": FLOW_IMAGE}),
        )
        .await;
    let bad_run = api.create_flow_run(&bad, json!({})).await;
    let worker = WorkerProcess::start(server, &["--pool", &pool], &[]);
    let run = api.wait_for_final_state(&bad_run, RUN_TIMEOUT).await;
    let (ty, message) = run_state(&run);
    assert_eq!(ty, "CRASHED", "run: {run}\nworker:\n{}", worker.output());
    assert_eq!(
        message,
        "Failed to submit flow run to infrastructure: ImageNotFound: No such image: local/does-not-exist:1 (image_pull_policy is Never, so the worker did not pull it)"
    );
    // The same worker process completes the next run.
    let good_run = api.create_flow_run(&good, json!({})).await;
    let run = api.wait_for_final_state(&good_run, RUN_TIMEOUT).await;
    assert_eq!(
        run_state(&run).0,
        "COMPLETED",
        "run: {run}\nworker:\n{}",
        worker.output()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_job_variables_crash_with_the_validation_message() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("e2e-invalid");
    let _guard = ContainerGuard::for_pool(&pool);
    let dep = api
        .create_deployment(
            &pool,
            "hello",
            "flows.py:hello",
            json!({"image": BUSYBOX, "container_create_kwargs": {"bogus_option": 1}}),
        )
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let worker = WorkerProcess::start(server, &["--pool", &pool], &[]);
    let run = api.wait_for_final_state(&run_id, RUN_TIMEOUT).await;
    let (ty, message) = run_state(&run);
    assert_eq!(ty, "CRASHED", "run: {run}\nworker:\n{}", worker.output());
    assert!(
        message.starts_with(
            "Failed to submit flow run to infrastructure: ValidationError: 1 validation error"
        ) && message.contains("unknown key 'bogus_option'"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn limit_one_never_runs_two_containers_at_once() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("e2e-limit");
    let guard = ContainerGuard::for_pool(&pool);
    let dep = api
        .busybox_deployment(&pool, json!({"command": "sh -c 'sleep 3; exit 9'"}))
        .await;
    let a = api.create_flow_run(&dep, json!({})).await;
    let b = api.create_flow_run(&dep, json!({})).await;
    let worker = WorkerProcess::start(server, &["--pool", &pool, "--limit", "1"], &[]);
    for id in [&a, &b] {
        let run = api.wait_for_final_state(id, RUN_TIMEOUT).await;
        assert_eq!(
            run_state(&run).0,
            "CRASHED",
            "run: {run}\nworker:\n{}",
            worker.output()
        );
    }
    let ids = guard.containers();
    assert_eq!(ids.len(), 2, "expected two containers");
    // Docker's RFC 3339 times (nanoseconds, trailing zeros dropped) compared as times.
    let time = |state: &Value, field: &str| {
        let text = state["State"][field].as_str().unwrap_or_default();
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap_or_else(|e| panic!("{field} {text:?}: {e}\n{state}"))
    };
    let mut spans: Vec<_> = ids
        .iter()
        .map(|id| {
            let s = inspect(id);
            (time(&s, "StartedAt"), time(&s, "FinishedAt"))
        })
        .collect();
    spans.sort();
    assert!(
        spans[0].1 <= spans[1].0,
        "containers overlapped: first finished {} after second started {}",
        spans[0].1,
        spans[1].0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_once_exits_after_its_runs_finish() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("e2e-once");
    let guard = ContainerGuard::for_pool(&pool);
    let dep = api
        .busybox_deployment(&pool, json!({"command": "sh -c 'sleep 2; exit 4'"}))
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let mut worker = WorkerProcess::start(server, &["--pool", &pool, "--run-once"], &[]);
    let status = worker.wait_timeout(RUN_TIMEOUT).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "worker did not exit cleanly: {status:?}\n{}",
        worker.output()
    );
    // By the time it exited, its run had finished and been reported, and the labels sent in
    // the background had landed too (the worker waits for its tasks before it exits).
    let run = api.read_flow_run(&run_id).await;
    assert_eq!(
        run_state(&run).0,
        "CRASHED",
        "run: {run}\nworker:\n{}",
        worker.output()
    );
    assert_eq!(
        run["labels"]["prefect.work-pool.name"],
        json!(pool),
        "labels flushed before exit: {run}\n{}",
        worker.output()
    );
    assert!(guard.running().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_claiming_and_leaves_containers_running() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("e2e-sigterm");
    let guard = ContainerGuard::for_pool(&pool);
    let dep = api
        .busybox_deployment(&pool, json!({"command": "sleep 60"}))
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let mut worker = WorkerProcess::start(server, &["--pool", &pool], &[]);
    eventually(RUN_TIMEOUT, "the run's container to start", async || {
        if guard.running().is_empty() {
            Err(worker.output())
        } else {
            Ok(())
        }
    })
    .await;
    assert_eq!(guard.running().len(), 1, "{}", worker.output());
    // Wait until the pid is recorded, so the run is fully handed to the container.
    wait_for_pids(&api, &[&run_id], Duration::from_secs(30), &worker).await;
    worker.signal("TERM");
    let status = worker.wait_timeout(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "worker did not exit 0 on SIGTERM: {status:?}\n{}",
        worker.output()
    );
    assert_eq!(
        guard.running().len(),
        1,
        "the container must keep running after the worker stops"
    );
    let run = api.read_flow_run(&run_id).await;
    assert_eq!(
        run_state(&run).0,
        "PENDING",
        "the run is left to the container: {run}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_pool_without_creation_is_not_created() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("e2e-nopool");
    let mut worker = WorkerProcess::start(
        server,
        &[
            "--pool",
            &pool,
            "--no-create-pool-if-not-found",
            "--run-once",
        ],
        &[],
    );
    let status = worker.wait_timeout(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        worker.output()
    );
    assert!(
        worker
            .output()
            .contains(&format!("Work pool '{pool}' not found!")),
        "{}",
        worker.output()
    );
    assert_eq!(api.read_work_pool(&pool).await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn reserved_pool_name_stops_the_worker_with_the_servers_reason() {
    require_docker();
    let server = server();
    let mut worker =
        WorkerProcess::start(server, &["--pool", "prefect-reserved", "--run-once"], &[]);
    let status = worker.wait_timeout(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "{status:?}\n{}",
        worker.output()
    );
    assert!(
        worker.output().contains("reserved for internal use"),
        "{}",
        worker.output()
    );
}
