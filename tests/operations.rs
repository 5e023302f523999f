//! Operating the worker: /health and /metrics over real HTTP, JSON logs, and secrets never
//! appearing in logs, flow-run logs or state messages. Real server, real Docker, built binary.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

async fn wait_for_http(url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while reqwest::get(url).await.is_err() {
        assert!(Instant::now() < deadline, "{url} never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_metrics_over_http() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("ops-metrics");
    let _guard = ContainerGuard::for_pool(&pool);
    let dep = api
        .busybox_deployment(&pool, json!({"command": "sh -c 'exit 2'"}))
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let port = free_port().to_string();
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool, "--with-healthcheck", "--with-metrics"],
        &[
            ("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1"),
            ("PREFECT_WORKER_WEBSERVER_PORT", &port),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_for_http(&format!("{base}/health"), Duration::from_secs(30)).await;
    let run = api
        .wait_for_final_state(&run_id, Duration::from_secs(120))
        .await;
    assert_eq!(
        run["state"]["type"],
        json!("CRASHED"),
        "{run}\n{}",
        worker.output()
    );

    let (status, body) = get(&format!("{base}/health")).await;
    assert_eq!((status, body.as_str()), (200, r#"{"message":"OK"}"#));
    let (status, metrics) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    for expected in [
        "docker_worker_flow_runs_claimed_total 1",
        "docker_worker_flow_runs_crashed_total 1",
        "docker_worker_flow_runs_running 0",
        "docker_worker_submission_duration_seconds_count 1",
        "docker_worker_poll_duration_seconds_count",
        "docker_worker_queued_reports",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in:\n{metrics}"
        );
    }
    assert_eq!(get(&format!("{base}/nope")).await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_turns_503_when_polls_stop_succeeding() {
    require_docker();
    // An API that never answers: the worker stays up, its polls fail, /health notices.
    let dead_api = format!("http://127.0.0.1:{}/api", free_port());
    let port = free_port().to_string();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_docker-worker"));
    let log = std::env::temp_dir().join(format!("{}.log", unique("dw-health")));
    let file = std::fs::File::create(&log).unwrap();
    let mut child = cmd
        .args(["start", "--pool", "p", "--with-healthcheck"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PREFECT_API_URL", &dead_api)
        .env("PREFECT_WORKER_QUERY_SECONDS", "0.05")
        .env("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1")
        .env("PREFECT_WORKER_WEBSERVER_PORT", &port)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/health");
    wait_for_http(&url, Duration::from_secs(30)).await;
    // 30 × 0.05 s = 1.5 s without a successful poll.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = get(&url).await;
    let _ = child.kill();
    let _ = child.wait();
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            r#"{"message":"Worker may be unresponsive at this time"}"#
        ),
        "{output}"
    );
    assert!(
        output.contains("Worker has not polled in the last"),
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_and_no_secret_anywhere() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("ops-secrets");
    let _guard = ContainerGuard::for_pool(&pool);
    const API_KEY: &str = "pnu_SECRETkey0123456789";
    const AUTH: &str = "admin:SECRETauthstring";
    const REGISTRY_PASSWORD: &str = "SECRETregistrypass";
    let registry = format!("127.0.0.1:{}", free_port());
    let dep = api
        .create_deployment(
            &pool,
            "hello",
            "flows.py:hello",
            json!({
                "image": format!("{registry}/private/img:1"),
                "image_pull_policy": "Always",
                "registry_credentials": {"username": "user", "password": REGISTRY_PASSWORD, "registry_url": registry},
            }),
        )
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool, "--log-format", "json"],
        &[
            ("PREFECT_API_KEY", API_KEY),
            ("PREFECT_API_AUTH_STRING", AUTH),
            ("RUST_LOG", "trace"),
        ],
    );
    let run = api
        .wait_for_final_state(&run_id, Duration::from_secs(120))
        .await;
    let message = run["state"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        run["state"]["type"],
        json!("CRASHED"),
        "{run}\n{}",
        worker.output()
    );
    assert!(message.contains("PullFailed"), "{message}");
    tokio::time::sleep(Duration::from_secs(3)).await; // let the log batch land
    let logs = api.flow_run_logs(&run_id).await.join("\n");
    let output = worker.output();
    for secret in [API_KEY, "SECRETauthstring", REGISTRY_PASSWORD] {
        assert!(
            !output.contains(secret),
            "{secret} leaked into the worker log"
        );
        assert!(!logs.contains(secret), "{secret} leaked into flow-run logs");
        assert!(
            !message.contains(secret),
            "{secret} leaked into the state message"
        );
    }
    // Every stderr line is a JSON object; the run's lines carry its id.
    let mut with_run_id = 0;
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if line.contains(&run_id) {
            with_run_id += 1;
        }
    }
    assert!(
        with_run_id >= 2,
        "flow-run lines should carry flow_run_id:\n{output}"
    );
}
