//! Operating the worker: /health and /metrics over real HTTP, JSON logs, and secrets never
//! appearing in logs, flow-run logs or state messages. Real server, real Docker (behind a
//! recording proxy for the secrets test), a real registry, built binary.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::recorder::{Endpoint, Recorder};
use support::services::Registry;
use support::*;

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

async fn wait_for_http(url: &str, timeout: Duration) {
    eventually(timeout, format!("{url} to answer"), async || {
        reqwest::get(url).await.map(drop)
    })
    .await;
}

/// The value of `name{pool="<pool>"}` in a scrape.
fn sample(metrics: &str, name: &str, pool: &str) -> Option<f64> {
    metric_sample(metrics, &format!("{name}{{pool=\"{pool}\"}}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_metrics_over_http() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("ops-metrics");
    let guard = ContainerGuard::for_pool(&pool);
    // The container exits (2) only when the test says so: the running gauge is read while it
    // runs, not raced against a container that is already gone.
    let dep = api
        .busybox_deployment(
            &pool,
            json!({"command": "sh -c 'until test -e /release; do sleep 1; done; exit 2'"}),
        )
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
    wait_for_pids(&api, &[&run_id], Duration::from_secs(120), &worker).await;
    let scrape = async || get(&format!("{base}/metrics")).await.1;
    eventually(
        Duration::from_secs(30),
        "flow_runs_running 1 while the run's container runs",
        async || {
            let metrics = scrape().await;
            match sample(&metrics, "docker_worker_flow_runs_running", &pool) {
                Some(1.0) => Ok(()),
                _ => Err(metrics),
            }
        },
    )
    .await;
    let container = guard.running();
    assert_eq!(container.len(), 1, "{}", worker.output());
    let release = ["exec", container[0].as_str(), "touch", "/release"];
    run_ok(std::process::Command::new("docker").args(release));
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
    // The server has the Crashed state before the worker has counted its report: wait for the
    // counter, and read the gauge only after it (it drops when the worker is done with the run).
    eventually(
        Duration::from_secs(30),
        "the crash report to be counted",
        async || {
            let metrics = scrape().await;
            match sample(&metrics, "docker_worker_flow_runs_crashed_total", &pool) {
                Some(1.0) => Ok(()),
                _ => Err(metrics),
            }
        },
    )
    .await;
    let metrics = eventually(
        Duration::from_secs(30),
        "flow_runs_running 0 once the report was counted",
        async || {
            let metrics = scrape().await;
            match sample(&metrics, "docker_worker_flow_runs_running", &pool) {
                Some(0.0) => Ok(metrics),
                _ => Err(metrics),
            }
        },
    )
    .await;
    for expected in [
        format!("docker_worker_flow_runs_claimed_total{{pool=\"{pool}\"}} 1"),
        format!("docker_worker_flow_runs_crashed_total{{pool=\"{pool}\"}} 1"),
        format!("docker_worker_submission_duration_seconds_count{{pool=\"{pool}\"}} 1"),
        format!("docker_worker_poll_duration_seconds_count{{pool=\"{pool}\"}}"),
        "docker_worker_queued_reports".to_string(),
    ] {
        assert!(
            metrics.contains(&expected),
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
    let child = cmd
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
    // Killed when dropped, even if an assertion fails.
    let worker = WorkerProcess { child, log };
    let url = format!("http://127.0.0.1:{port}/health");
    wait_for_http(&url, Duration::from_secs(30)).await;
    // 30 × 0.05 s = 1.5 s without a successful poll turns it unhealthy.
    let body = eventually(
        Duration::from_secs(30),
        "/health to answer 503",
        async || match get(&url).await {
            (503, body) => Ok(body),
            (status, body) => Err(format!("{status} {body}\n{}", worker.output())),
        },
    )
    .await;
    assert_eq!(
        body,
        r#"{"message":"Worker may be unresponsive at this time"}"#,
        "{}",
        worker.output()
    );
    worker
        .wait_for_output("Worker has not polled in the last", Duration::from_secs(30))
        .await;
}

/// Secrets never show in the worker's log (at trace level), in flow-run logs, in events or in
/// state messages, on the paths that handle them: a pull that fails (its error is reported),
/// a run that logs in to a real registry, pulls, and creates its container — whose environment
/// carries the API key, the auth string and the API URL's credentials to the flow, as the
/// reference's does — and a `log_config` holding a token that fails validation. The worker's
/// API URL carries `user:pass@`.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_and_no_secret_anywhere() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("ops-secrets");
    let guard = ContainerGuard::for_pool(&pool);
    const API_KEY: &str = "pnu_SECRETkey0123456789";
    const AUTH: &str = "admin:SECRETauthstring";
    const UNREACHABLE_PASSWORD: &str = "SECRETregistrypass";
    const URL_PASSWORD: &str = "SECRETurlpass";
    const LOG_TOKEN: &str = "SECRETlogtoken";
    let registry = Registry::start();
    let image = registry.push_busybox(&unique("ops"));
    let _image = ImageGuard(image.clone());
    let secrets = [
        API_KEY,
        "SECRETauthstring",
        UNREACHABLE_PASSWORD,
        &registry.password,
        URL_PASSWORD,
        LOG_TOKEN,
    ];

    // Nothing listens there: the pull fails and its error becomes the state message.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let unreachable = api
        .create_deployment(
            &pool,
            "hello",
            "flows.py:hello",
            json!({
                "image": format!("{nowhere}/private/img:1"),
                "image_pull_policy": "Always",
                "registry_credentials": {"username": "user", "password": UNREACHABLE_PASSWORD, "registry_url": nowhere},
            }),
        )
        .await;
    // A real login and pull, then a container (printing nothing) that exits 3.
    let pulled = api
        .busybox_deployment(
            &pool,
            json!({
                "image": image,
                "image_pull_policy": "Always",
                "registry_credentials": {"username": registry.user, "password": registry.password, "registry_url": registry.addr},
                "command": "sh -c 'exit 3'",
            }),
        )
        .await;
    // A logging driver's options with a token, one of them of the wrong type: refused at
    // validation, whose message must name the field and not echo the value.
    let bad_log_config = api
        .busybox_deployment(
            &pool,
            json!({"container_create_kwargs": {"log_config": {"type": "splunk",
                "config": {"splunk-token": LOG_TOKEN, "splunk-insecureskipverify": true}}}}),
        )
        .await;
    let log_config_run = api.create_flow_run(&bad_log_config, json!({})).await;
    let pull_failed_run = api.create_flow_run(&unreachable, json!({})).await;
    let created_run = api.create_flow_run(&pulled, json!({})).await;

    // The worker's Docker connection goes through a recorder, to see what it sent.
    let dir = tempfile::tempdir().unwrap();
    let docker = Recorder::unix(
        &dir.path().join("docker.sock"),
        Endpoint::Unix("/var/run/docker.sock".into()),
    );
    let Endpoint::Unix(socket) = &docker.listen else {
        unreachable!()
    };
    let docker_host = format!("unix://{}", socket.display());
    // The server has no auth: it takes the request whatever Authorization says.
    let api_url = server
        .api_url
        .replace("http://", &format!("http://dwuser:{URL_PASSWORD}@"));
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool, "--log-format", "json"],
        &[
            ("PREFECT_API_URL", &api_url),
            ("PREFECT_API_KEY", API_KEY),
            ("PREFECT_API_AUTH_STRING", AUTH),
            ("RUST_LOG", "trace"),
            ("DOCKER_HOST", &docker_host),
        ],
    );

    let mut messages = Vec::new();
    for (run_id, expected) in [
        (&pull_failed_run, "PullFailed"),
        (&created_run, "non-zero status code 3."),
        (&log_config_run, "container_create_kwargs.log_config"),
    ] {
        let run = api
            .wait_for_final_state(run_id, Duration::from_secs(120))
            .await;
        let (kind, message) = run_state(&run);
        assert_eq!(kind, "CRASHED", "{run}\n{}", worker.output());
        assert!(message.contains(expected), "{message}");
        messages.push(message.to_owned());
    }
    // The paths that handle the secrets ran: the login carried the password, and the
    // container was created with the API key and auth string in its environment.
    let records = docker.records();
    assert!(
        records.iter().any(|r| r.method == "POST"
            && r.path().ends_with("/auth")
            && r.json()["password"] == registry.password.as_str()),
        "no registry login recorded"
    );
    let creates: Vec<Value> = records
        .iter()
        .filter(|r| r.method == "POST" && r.path().ends_with("/containers/create"))
        .map(|r| r.json())
        .filter(|body| body["Labels"]["io.prefect.flow-run-id"] == created_run.as_str())
        .collect();
    assert_eq!(creates.len(), 1, "{}", worker.output());
    let env = &creates[0]["Env"];
    for expected in [
        format!("PREFECT_API_KEY={API_KEY}"),
        format!("PREFECT_API_AUTH_STRING={AUTH}"),
        format!("PREFECT_API_URL={api_url}"),
    ] {
        assert!(
            env.as_array().is_some_and(|e| e.contains(&json!(expected))),
            "the container's environment lacks {expected}: {env}"
        );
    }
    assert_eq!(guard.containers().len(), 1);

    // Everything searched below is there to search: the worker's log, both runs' flow-run
    // logs (up to the report of their crash, the last line the worker sends), their states.
    let mut logs = Vec::new();
    for run_id in [&pull_failed_run, &created_run, &log_config_run] {
        let lines = api
            .wait_for_log(run_id, "Reported flow run", Duration::from_secs(60))
            .await;
        logs.extend(lines);
    }
    let logs = logs.join("\n");
    // The runs' events, once the exit of the created one is among them (each run has a
    // submitted event before it).
    let run_ids = [&pull_failed_run, &created_run, &log_config_run];
    let related: Vec<String> = run_ids
        .iter()
        .map(|id| format!("prefect.flow-run.{id}"))
        .collect();
    let events = eventually(Duration::from_secs(60), "the runs' events", async || {
        let filter = json!({
            "any_resource": {"id": related},
            "occurred": {"since": "2020-01-01T00:00:00Z"},
        });
        let events = api.events(filter, 50).await;
        let exited = events
            .iter()
            .any(|e| e["event"] == "prefect.docker.container.exited");
        let submitted = run_ids
            .iter()
            .all(|id| events.iter().any(|e| e.to_string().contains(id.as_str())));
        if exited && submitted {
            Ok(events)
        } else {
            Err(format!("{events:#?}"))
        }
    })
    .await;
    let events = serde_json::to_string(&events).unwrap();
    let output = worker.output();
    assert!(!output.trim().is_empty(), "the worker logged nothing");
    assert!(!logs.trim().is_empty(), "no flow-run logs to search");
    assert!(events.len() > 2, "no events to search");
    // At trace level, so the searched log holds the worker's most talkative lines.
    assert!(
        output.contains("\"level\":\"TRACE\"") || output.contains("\"level\":\"DEBUG\""),
        "not a verbose log"
    );
    assert!(messages.iter().all(|m| !m.is_empty()), "{messages:?}");
    for secret in secrets {
        assert!(
            !output.contains(secret),
            "{secret} leaked into the worker log"
        );
        assert!(!logs.contains(secret), "{secret} leaked into flow-run logs");
        assert!(!events.contains(secret), "{secret} leaked into events");
        for message in &messages {
            assert!(
                !message.contains(secret),
                "{secret} leaked into a state message: {message}"
            );
        }
    }
    // Every line of its output is a JSON object; a run's lines carry its id.
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    for line in &lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    for run_id in [&pull_failed_run, &created_run, &log_config_run] {
        let with_run_id = lines.iter().filter(|l| l.contains(run_id.as_str())).count();
        assert!(
            with_run_id >= 2,
            "flow-run lines should carry flow_run_id {run_id}:\n{output}"
        );
    }
}
