//! Prefect's worker channel (issue #3, §3.1/§7.3), against a real Prefect 3.9.1 server: the
//! websocket replaces REST heartbeats and pool reads, the server creates the pool from the
//! hello, and cleanup delivery stops the container of a run the server cancelled on its own.

mod support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::json;
use support::recorder::{Endpoint, Recorder};
use support::*;

/// This binary's server: CANCELLING runs time out after 15 s (the default is 300 s), so the
/// server hands the teardown to a connected worker within the test.
fn channel_server() -> &'static PrefectServer {
    static SERVER: OnceLock<PrefectServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        PrefectServer::start_with_env(&[(
            "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_CANCELLING_TIMEOUT_SECONDS",
            "15",
        )])
    })
}

fn api_recorder(server: &PrefectServer) -> (Recorder, String) {
    let recorder = Recorder::tcp(Endpoint::Tcp(format!("127.0.0.1:{}", server.port)));
    let Endpoint::Tcp(addr) = &recorder.listen else {
        unreachable!()
    };
    let url = format!("http://{addr}/api");
    (recorder, url)
}

/// A worker's `last_heartbeat_time`, as a time.
fn heartbeat_time(worker: &serde_json::Value) -> chrono::DateTime<chrono::FixedOffset> {
    let text = worker["last_heartbeat_time"].as_str().unwrap_or_default();
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("last_heartbeat_time {text:?}: {e}\n{worker}"))
}

async fn workers_of(api: &Api, pool: &str) -> Vec<serde_json::Value> {
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            &format!("work_pools/{pool}/workers/filter"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_channel_creates_the_pool_and_carries_heartbeats_instead_of_rest() {
    // The worker connects to Docker before it talks to Prefect.
    require_docker();
    let server = channel_server();
    let api = Api::new(server);
    let (recorder, url) = api_recorder(server);
    let pool = unique("chan-pool");
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool, "--name", "chan-worker"],
        &[
            ("PREFECT_API_URL", &url),
            ("PREFECT_WORKER_HEARTBEAT_SECONDS", "1"),
        ],
    );
    worker
        .wait_for_output(
            "connected to Prefect's worker channel",
            Duration::from_secs(30),
        )
        .await;

    // The server created the pool from the hello, with this worker's template.
    let pool_json = api.wait_for_pool(&pool, Duration::from_secs(10)).await;
    assert_eq!(pool_json["type"], "docker");
    let properties = &pool_json["base_job_template"]["variables"]["properties"];
    assert!(
        properties.get("image").is_some() && properties.get("gpus").is_some(),
        "{pool_json}"
    );

    // Heartbeats arrive over the socket: the worker's heartbeat time moves on…
    let first = workers_of(&api, &pool).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["name"], "chan-worker");
    assert_eq!(first[0]["status"], "ONLINE");
    let t0 = heartbeat_time(&first[0]);
    eventually(
        Duration::from_secs(20),
        "a heartbeat over the channel",
        async || {
            let now = heartbeat_time(&workers_of(&api, &pool).await[0]);
            if now > t0 {
                Ok(())
            } else {
                Err(format!("still {now}; worker:\n{}", worker.output()))
            }
        },
    )
    .await;

    // …while REST saw the upgrade and polls, and — while the channel was up — no heartbeat or
    // pool read at all, over several heartbeat intervals. A busy SQLite server may refuse a
    // handshake or drop the channel (`heartbeat_persistence_failed`); REST rightly covers such
    // moments, as in the reference, so a window in which the channel was lost is measured again.
    let lost = |out: &str| out.matches("worker channel lost").count();
    // Healthy when the last word about the channel is that it connected.
    let healthy = |out: &str| {
        out.rfind("connected to Prefect's worker channel") > out.rfind("worker channel lost")
    };
    let mut attempts = 0;
    let (all, paths) = loop {
        attempts += 1;
        let out = worker.output();
        let (lost_before, healthy_at_start) = (lost(&out), healthy(&out));
        let before = recorder.records().len();
        let window_start = heartbeat_time(&workers_of(&api, &pool).await[0]);
        // Deliberately a fixed window (several 1 s heartbeat intervals): what must not happen
        // in it is REST sync, which no condition could wait for.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let all = recorder.records();
        let window_end = heartbeat_time(&workers_of(&api, &pool).await[0]);
        if (!healthy_at_start || lost(&worker.output()) != lost_before) && attempts < 5 {
            continue;
        }
        assert!(
            window_end > window_start,
            "no heartbeat during the window: {window_start} → {window_end}"
        );
        let paths: Vec<String> = all[before..]
            .iter()
            .map(|r| format!("{} {}", r.method, r.path()))
            .collect();
        break (all, paths);
    };
    let upgrade = format!("/api/work_pools/{pool}/workers/connect");
    assert!(
        all.iter()
            .any(|r| r.path() == upgrade && r.header("sec-websocket-protocol") == Some("prefect")),
        "no channel upgrade recorded"
    );
    assert!(
        paths
            .iter()
            .any(|p| p.ends_with("/get_scheduled_flow_runs")),
        "{paths:?}"
    );
    assert!(
        !paths
            .iter()
            .any(|p| p.ends_with("/workers/heartbeat")
                || *p == format!("GET /api/work_pools/{pool}")),
        "REST sync happened while the channel was healthy: {paths:?}"
    );
    drop(worker);

    // With the channel switched off, the same worker syncs over REST.
    let (recorder, url) = api_recorder(server);
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool, "--name", "rest-worker"],
        &[
            ("PREFECT_API_URL", &url),
            ("PREFECT_WORKER_HEARTBEAT_SECONDS", "1"),
            ("DOCKER_WORKER_CHANNEL", "false"),
        ],
    );
    worker
        .wait_for_output("started!", Duration::from_secs(30))
        .await;
    let records = eventually(Duration::from_secs(30), "two REST heartbeats", async || {
        let records = recorder.records();
        let heartbeats = records
            .iter()
            .filter(|r| r.path().ends_with("/workers/heartbeat"))
            .count();
        if heartbeats >= 2 {
            Ok(records)
        } else {
            Err(format!(
                "{heartbeats} heartbeats; worker:\n{}",
                worker.output()
            ))
        }
    })
    .await;
    assert!(
        !records
            .iter()
            .any(|r| r.path().ends_with("/workers/connect"))
    );
}

/// A run of a long `sleep` picked up by a worker that does not stop cancelled runs itself — so
/// only the server's cleanup can — with `/metrics` served.
struct CleanupCase {
    api: Api,
    pool: String,
    run: String,
    worker: WorkerProcess,
    metrics_port: String,
    /// The run's container (the only one carrying its id).
    container: ContainerGuard,
    _pool_containers: ContainerGuard,
}

impl CleanupCase {
    /// `command`: what the container runs (how it answers SIGTERM decides the stop's length).
    async fn start(pool_prefix: &str, command: &str) -> Self {
        let server = channel_server();
        let api = Api::new(server);
        let pool = unique(pool_prefix);
        let pool_containers = ContainerGuard::for_pool(&pool);
        let deployment = api
            .busybox_deployment(&pool, json!({ "command": command }))
            .await;
        let metrics_port = free_port().to_string();
        let worker = WorkerProcess::start(
            server,
            &["--pool", &pool, "--no-stop-cancelled", "--with-metrics"],
            &[
                ("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1"),
                ("PREFECT_WORKER_WEBSERVER_PORT", &metrics_port),
            ],
        );
        worker
            .wait_for_output(
                "connected to Prefect's worker channel",
                Duration::from_secs(30),
            )
            .await;
        let run = api.create_flow_run(&deployment, json!({})).await;
        wait_for_pids(&api, &[&run], Duration::from_secs(120), &worker).await;
        let container = ContainerGuard::for_label("io.prefect.flow-run-id", &run);
        assert_eq!(container.running().len(), 1, "{}", worker.output());
        Self {
            api,
            pool,
            run,
            worker,
            metrics_port,
            container,
            _pool_containers: pool_containers,
        }
    }

    async fn set_cancelling(&self) {
        let (status, body) = self
            .api
            .call(
                reqwest::Method::POST,
                &format!("flow_runs/{}/set_state", self.run),
                Some(json!({"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": true})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// The worker's log line saying how the cleanup ended.
    async fn cleanup_outcome(&self) -> String {
        const FINISHED: &str = "cleanup delivered by the worker channel finished";
        self.worker
            .wait_for_output(FINISHED, Duration::from_secs(120))
            .await;
        self.worker
            .output()
            .lines()
            .find(|l| l.contains(FINISHED))
            .unwrap()
            .to_owned()
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cleanup_delivery_stops_the_container_of_a_run_the_server_cancelled() {
    require_docker();
    // The container ignores SIGTERM: the stop lasts the whole 30 s grace, longer than the
    // server's 30 s lease, so the worker must renew it before acknowledging.
    let case = CleanupCase::start(
        "chan-cleanup",
        "sh -c \"trap '' TERM; echo started; sleep 600 & wait\"",
    )
    .await;
    case.set_cancelling().await;
    let cancelling_at = Instant::now();

    // The container keeps running until the server times the cancellation out (15 s)…
    // (deliberately 8 s of nothing happening: a stop that must not come has no condition).
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        case.container.running().len(),
        1,
        "stopped before the timeout:\n{}",
        case.worker.output()
    );
    // …then the server marks it Cancelled and delivers the teardown to this worker.
    eventually(
        Duration::from_secs(120),
        "the cleanup to stop the container",
        async || {
            if case.container.running().is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{}\n{}",
                    case.worker.output(),
                    channel_server().log_tail()
                ))
            }
        },
    )
    .await;
    // Not before the 15 s timeout, and with the 30 s grace honoured after it.
    let stopped_after = cancelling_at.elapsed();
    assert!(
        stopped_after >= Duration::from_secs(45),
        "{stopped_after:?}"
    );
    let state = case.api.read_flow_run(&case.run).await;
    let (kind, message) = run_state(&state);
    assert_eq!(kind, "CANCELLED", "{state}");
    assert!(message.contains("timed out"), "{message}");
    // Acknowledged, and the server accepted the ack.
    let outcome = case.cleanup_outcome().await;
    assert!(
        outcome.contains("Ok(())") && outcome.contains("\"accepted\""),
        "{outcome}"
    );
    let out = case.worker.output();
    assert!(out.contains("Stopped Docker container"), "{out}");
    assert!(out.contains("cleanup lease renewed"), "{out}");
    let metrics = case.metrics().await;
    let pool = &case.pool;
    for expected in [
        format!("docker_worker_channel_connected{{pool=\"{pool}\"}} 1"),
        format!("docker_worker_channel_cleanups_total{{pool=\"{pool}\",kind=\"ack\"}} 1"),
    ] {
        assert!(
            metrics.contains(&expected),
            "missing {expected:?} in:\n{metrics}"
        );
    }

    // The container's exit report does not overwrite the server's Cancelled state: read it
    // once the worker is done with the run (it sends the run's exit events after reporting).
    let run_resource = format!("prefect.flow-run.{}", case.run);
    eventually(
        Duration::from_secs(60),
        "the run's executed-flow-run event",
        async || {
            let filter = json!({
                "any_resource": {"id": [run_resource]},
                "event": {"name": ["prefect.worker.executed-flow-run"]},
                "occurred": {"since": "2020-01-01T00:00:00Z"},
            });
            if case.api.events(filter, 10).await.is_empty() {
                Err(case.worker.output())
            } else {
                Ok(())
            }
        },
    )
    .await;
    let final_state = case.api.read_flow_run(&case.run).await;
    assert_eq!(
        run_state(&final_state),
        ("CANCELLED", message),
        "{final_state}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cleanup_for_another_docker_hosts_container_is_released_and_nothing_is_stopped() {
    require_docker();
    let case = CleanupCase::start(
        "chan-elsewhere",
        "sh -c \"trap 'exit 0' TERM; sleep 600 & wait\"",
    )
    .await;
    let ids = case.container.running();
    // The run's pid now names the same container id on another Docker host.
    let (status, body) = case
        .api
        .call(
            reqwest::Method::PATCH,
            &format!("flow_runs/{}", case.run),
            Some(json!({"infrastructure_pid": format!("tcp://10.255.0.1:2376:{}", ids[0])})),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    case.set_cancelling().await;
    let outcome = case.cleanup_outcome().await;
    assert!(
        outcome.contains("infrastructure_not_available"),
        "{outcome}"
    );
    let out = case.worker.output();
    assert!(!out.contains("Stopped Docker container"), "{out}");
    assert_eq!(
        case.container.running(),
        ids,
        "the container must keep running"
    );
    let metrics = case.metrics().await;
    assert!(
        metrics.contains(&format!(
            "docker_worker_channel_cleanups_total{{pool=\"{}\",kind=\"infrastructure_not_available\"}}",
            case.pool
        )),
        "{metrics}"
    );
}
