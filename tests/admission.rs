//! Admission against the real peers: submission turns counted on the Docker socket with 200
//! runs due, GPU partitioning through the create body and the Engine's missing-runtime
//! answer, and `--min-free-memory` leaving runs Scheduled for other workers. Real server, real
//! Docker (behind a recording proxy), a real registry, built binary.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::recorder::{Endpoint, Hold, Recorded, Recorder};
use support::services::{Registry, SlowProxy};
use support::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// How many runs are due at once in the submission test.
const BURST: usize = 200;
/// The worker's `--max-concurrent-submissions` there.
const TURNS: usize = 3;

fn is_create(r: &Recorded) -> bool {
    r.method == "POST" && r.path().ends_with("/containers/create")
}

/// Flow runs of `pool` in `state` (a state type), as the API counts them.
async fn count_runs(api: &Api, pool: &str, state: &str) -> u64 {
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            "flow_runs/count",
            Some(json!({
                "work_pools": {"name": {"any_": [pool]}},
                "flow_runs": {"state": {"type": {"any_": [state]}}},
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body.as_u64().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn with_200_runs_due_at_most_n_creates_are_ever_in_flight() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("admit-burst");
    let guard = ContainerGuard::for_pool(&pool);
    let dep = api
        .busybox_deployment(
            &pool,
            json!({"command": "sh -c 'exit 3'", "image_pull_policy": "Never"}),
        )
        .await;
    for _ in 0..BURST {
        api.create_flow_run(&dep, json!({})).await;
    }
    // Every create is held 150 ms on its way to the Engine, so the turns are really contended:
    // without them, the 200 runs' creates would overlap by the dozen.
    let dir = tempfile::tempdir().unwrap();
    let docker = Recorder::unix_holding(
        &dir.path().join("docker.sock"),
        Endpoint::Unix("/var/run/docker.sock".into()),
        Some(Hold {
            which: is_create,
            delay: Duration::from_millis(150),
        }),
    );
    let Endpoint::Unix(socket) = &docker.listen else {
        unreachable!()
    };
    let docker_host = format!("unix://{}", socket.display());
    let turns = TURNS.to_string();
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool, "--max-concurrent-submissions", &turns],
        &[
            ("DOCKER_HOST", &docker_host),
            ("PREFECT_WORKER_QUERY_SECONDS", "1"),
        ],
    );
    let burst = u64::try_from(BURST).unwrap();
    eventually(
        Duration::from_secs(900),
        format!("all {BURST} runs Crashed (exit 3)"),
        async || {
            let crashed = count_runs(&api, &pool, "CRASHED").await;
            if crashed == burst {
                Ok(())
            } else {
                Err(format!("{crashed} crashed\n{}", tail(&worker.output())))
            }
        },
    )
    .await;
    let creates = docker.records().into_iter().filter(is_create).count();
    assert_eq!(creates, BURST, "one create per run");
    assert_eq!(
        docker.max_in_flight(is_create),
        TURNS,
        "the creates in flight at once must reach the turns (the burst contended) and never pass them"
    );
    assert_eq!(guard.containers().len(), BURST);
}

/// The last lines of a long worker log.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The GPU device ids a run's container was created with.
fn device_ids(guard: &ContainerGuard, run: &str) -> Vec<Value> {
    let created: Vec<Value> = guard
        .containers()
        .iter()
        .map(|id| inspect(id))
        .filter(|i| i["Config"]["Labels"]["io.prefect.flow-run-id"] == run)
        .collect();
    assert_eq!(created.len(), 1, "one container for run {run}");
    let request = &created[0]["HostConfig"]["DeviceRequests"][0];
    assert_eq!(request["Capabilities"], json!([["gpu"]]), "{request}");
    request["DeviceIDs"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_run_gets_its_own_gpus_waits_for_them_and_gives_them_back() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let registry = Registry::start();
    let pushed = registry.push_busybox(&unique("gpu"));
    // The holder's image comes through a proxy that holds every chunk: its pull takes seconds,
    // and it holds the worker's one GPU all that time (devices are reserved before the pull).
    let proxy = SlowProxy::start(&registry.addr, Duration::from_millis(400));
    let slow_image = pushed.replacen(&registry.addr, &proxy.addr, 1);
    let pool = unique("admit-gpu");
    let guard = ContainerGuard::for_pool(&pool);
    let holder_dep = api
        .busybox_deployment(
            &pool,
            json!({
                "image": slow_image,
                "image_pull_policy": "Always",
                "registry_credentials": {"username": registry.user, "password": registry.password,
                                         "registry_url": proxy.addr, "reauth": true},
                "gpus": "1",
            }),
        )
        .await;
    let dep = api
        .busybox_deployment(&pool, json!({"gpus": "1", "image_pull_policy": "Never"}))
        .await;
    let holder = api.create_flow_run(&holder_dep, json!({})).await;
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool, "--gpu-devices", "7"],
        &[("PREFECT_WORKER_QUERY_SECONDS", "1")],
    );
    worker
        .wait_for_output(&format!("Pulling image '{slow_image}"), RUN_TIMEOUT)
        .await;
    // The holder has the device and is pulling: the next run must wait for it, claimed.
    let waiter = api.create_flow_run(&dep, json!({})).await;
    let too_many = api.create_flow_run(&dep, json!({"gpus": "2"})).await;
    api.wait_for_log(
        &waiter,
        "Waiting for 1 of this worker's 1 GPUs",
        RUN_TIMEOUT,
    )
    .await;
    // Both end on this GPU-less host's answer to a GPU request, each with the device to itself.
    for run in [&holder, &waiter] {
        let state = api.wait_for_final_state(run, RUN_TIMEOUT).await;
        let (kind, message) = run_state(&state);
        assert_eq!(kind, "CRASHED", "{state}\n{}", worker.output());
        assert!(message.contains("GpuRuntimeMissing"), "{message}");
        assert_eq!(device_ids(&guard, run), [json!("7")]);
    }
    // The waiter got the device only once the holder was done with it.
    let created = |run: &str| -> String {
        guard
            .containers()
            .iter()
            .map(|id| inspect(id))
            .find(|i| i["Config"]["Labels"]["io.prefect.flow-run-id"] == run)
            .map(|i| i["Created"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    assert!(created(&waiter) > created(&holder), "{}", worker.output());
    // Asking for more than the worker has can never be met: Crashed, saying so, no container.
    let state = api.wait_for_final_state(&too_many, RUN_TIMEOUT).await;
    let (kind, message) = run_state(&state);
    assert_eq!(kind, "CRASHED", "{state}");
    assert!(
        message.contains("asks for 2 GPUs, but this worker hands out 1"),
        "{message}"
    );
    let containers = ContainerGuard::for_label("io.prefect.flow-run-id", &too_many);
    assert!(containers.containers().is_empty());
    let _ = Command::new("docker")
        .args(["image", "rm", "-f", &pushed, &slow_image])
        .output();
}

#[tokio::test(flavor = "multi_thread")]
async fn short_of_memory_no_run_is_claimed_and_another_worker_takes_it() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("admit-mem");
    let _guard = ContainerGuard::for_pool(&pool);
    let dep = api
        .busybox_deployment(
            &pool,
            json!({"command": "sh -c 'exit 4'", "image_pull_policy": "Never"}),
        )
        .await;
    let run = api.create_flow_run(&dep, json!({})).await;
    let port = free_port().to_string();
    // No host has 100 000 GiB available.
    let short = WorkerProcess::start(
        server,
        &[
            "--pool",
            &pool,
            "--min-free-memory",
            "100000g",
            "--with-metrics",
        ],
        &[
            ("PREFECT_WORKER_QUERY_SECONDS", "1"),
            ("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1"),
            ("PREFECT_WORKER_WEBSERVER_PORT", &port),
        ],
    );
    short
        .wait_for_output("below --min-free-memory", RUN_TIMEOUT)
        .await;
    // Three more polls that saw the run and left it: it stays Scheduled.
    let polls = format!("docker_worker_poll_duration_seconds_count{{pool=\"{pool}\"}}");
    let seen = eventually(RUN_TIMEOUT, "/metrics to answer", async || {
        metric_sample(&scrape_metrics(&port).await, &polls)
    })
    .await;
    let metrics = eventually(RUN_TIMEOUT, "three more polls", async || {
        let metrics = scrape_metrics(&port).await;
        match metric_sample(&metrics, &polls) {
            Some(n) if n >= seen + 3.0 => Ok(metrics),
            _ => Err(metrics),
        }
    })
    .await;
    assert_eq!(run_state(&api.read_flow_run(&run).await).0, "SCHEDULED");
    let available = metric_sample(&metrics, "docker_worker_available_memory_bytes").unwrap_or(0.0);
    assert!(available > 0.0, "{metrics}");
    assert!(!short.output().contains(&run), "{}", short.output());
    // A worker without the floor takes it.
    let other = WorkerProcess::start(server, &["--pool", &pool], &[]);
    let state = api.wait_for_final_state(&run, RUN_TIMEOUT).await;
    let (kind, message) = run_state(&state);
    assert_eq!(kind, "CRASHED", "{state}\n{}", other.output());
    assert!(message.contains("non-zero status code 4"), "{message}");
}
