//! All of a container's output in the run's logs, against the real server and Engine with the
//! built binary: 10 000 numbered lines with the worker SIGKILLed and restarted in the middle
//! (every number exactly once, in order by timestamp as the UI sorts); the crash tail of a
//! container that printed to stdout and then stderr, in that order; and an API answering 429
//! to `POST /logs/` (an in-test proxy in front of the real server) losing no batch. Each test
//! prints its figure.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

/// How long a run may take to reach the point a test waits for.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// The logger names forwarded and tail lines are sent under.
const STDOUT: &str = "container.stdout";
const STDERR: &str = "container.stderr";

/// Every log of a run, sorted by timestamp as the UI sorts them (`TIMESTAMP_ASC`), page by page.
async fn all_logs(api: &Api, run_id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let body = json!({
            "logs": {"flow_run_id": {"any_": [run_id]}},
            "sort": "TIMESTAMP_ASC",
            "limit": 200,
            "offset": out.len(),
        });
        let (status, page) = api
            .call(reqwest::Method::POST, "logs/filter", Some(body))
            .await;
        assert_eq!(status, 200, "{page}");
        let page = page.as_array().cloned().unwrap_or_default();
        let done = page.len() < 200;
        out.extend(page);
        if done {
            return out;
        }
    }
}

/// Whether the API has at least `at_least` logs of the run (one cheap read; Prefect's log
/// filter has no logger-name criterion, so the worker's few messages count too).
async fn has_logs(api: &Api, run_id: &str, at_least: usize) -> bool {
    let body = json!({
        "logs": {"flow_run_id": {"any_": [run_id]}},
        "sort": "TIMESTAMP_ASC",
        "limit": 1,
        "offset": at_least - 1,
    });
    let (status, page) = api
        .call(reqwest::Method::POST, "logs/filter", Some(body))
        .await;
    status == 200 && page.as_array().is_some_and(|p| !p.is_empty())
}

/// The forwarded lines of `logs` (already in the UI's order): (logger, message, timestamp).
fn forwarded(logs: &[Value]) -> Vec<(String, String, String)> {
    logs.iter()
        .filter(|l| l["name"] == STDOUT || l["name"] == STDERR)
        .map(|l| {
            let text = |k: &str| l[k].as_str().unwrap_or_default().to_owned();
            (text("name"), text("message"), text("timestamp"))
        })
        .collect()
}

/// Parses the server's timestamps, so order is compared as times, not as strings.
fn instant(text: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("timestamp {text:?}: {e}"))
        .with_timezone(&chrono::Utc)
}

/// Stops a worker with SIGTERM and waits for it: its last batch of logs is flushed, and no
/// request can come after the test reads the logs.
async fn stop(mut worker: WorkerProcess) {
    worker.signal("TERM");
    let status = worker.wait_timeout(Duration::from_secs(60)).await;
    assert!(
        status.is_some(),
        "the worker did not stop:\n{}",
        worker.output()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_lines_survive_a_sigkill_and_restart_once_each_and_in_order() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("out10k");
    let guard = ContainerGuard::for_pool(&pool);
    let name = unique("out10k-worker");
    let env = [("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.5")];
    let args = ["--pool", pool.as_str(), "--name", name.as_str()];
    let mut first = WorkerProcess::start(server, &args, &env);
    api.wait_for_pool(&pool, Duration::from_secs(60)).await;
    // 10 000 numbered lines, in bursts of 250 (lines the Engine reads together share a
    // timestamp), over about 20 s, so the worker can be killed in the middle. The job
    // variable, not the worker flag, asks for forwarding.
    let dep = api
        .busybox_deployment(
            &pool,
            json!({
                "stream_output_to_api": true,
                "command": "sh -c 'i=1; while [ $i -le 10000 ]; do echo \"n $i\"; if [ $((i % 250)) -eq 0 ]; then sleep 0.5; fi; i=$((i+1)); done; exit 3'",
            }),
        )
        .await;
    let run = api.create_flow_run(&dep, json!({})).await;
    eventually(
        RUN_TIMEOUT,
        "2 000 of the run's logs in the API",
        async || {
            if has_logs(&api, &run, 2_000).await {
                Ok(())
            } else {
                Err(first.output())
            }
        },
    )
    .await;
    first.child.kill().expect("SIGKILL the worker");
    let _ = first.child.wait();
    let at_kill = forwarded(&all_logs(&api, &run).await).len();
    let container = guard.running();
    assert_eq!(
        container.len(),
        1,
        "the container must still run when the worker is killed ({at_kill} lines forwarded)"
    );

    let second = WorkerProcess::start(server, &args, &env);
    let state = api.wait_for_final_state(&run, RUN_TIMEOUT).await;
    assert_eq!(
        run_state(&state).0,
        "CRASHED",
        "{state}\n{}",
        second.output()
    );
    assert!(
        second.output().contains("re-attached to flow run"),
        "the restarted worker adopted the running container:\n{}",
        second.output()
    );
    assert!(
        second.output().contains(
            "forwarding the adopted container's output from just after the last line the API has"
        ),
        "the restarted worker resumed from the API's newest line:\n{}",
        second.output()
    );
    stop(second).await;

    let logs = all_logs(&api, &run).await;
    let lines = forwarded(&logs);
    let numbers: Vec<u32> = lines
        .iter()
        .filter_map(|(_, m, _)| m.strip_prefix("n ").and_then(|n| n.parse().ok()))
        .collect();
    let expected: Vec<u32> = (1..=10_000).collect();
    let duplicates = numbers.len() as i64 - 10_000;
    if numbers != expected {
        let missing: Vec<&u32> = expected.iter().filter(|n| !numbers.contains(n)).collect();
        let first_out_of_order = numbers.windows(2).position(|w| w[0] >= w[1]);
        panic!(
            "{} lines, {} missing (first: {:?}), first out of order at {first_out_of_order:?}, killed after {at_kill}",
            numbers.len(),
            missing.len(),
            missing.first()
        );
    }
    assert_eq!(
        lines.len(),
        10_000,
        "only the numbered lines were forwarded"
    );
    assert!(lines.iter().all(|(logger, _, _)| logger == STDOUT));
    // Strictly increasing timestamps: the UI's sort cannot reorder them.
    let stamps: Vec<_> = lines.iter().map(|(_, _, t)| instant(t)).collect();
    assert!(
        stamps.windows(2).all(|w| w[0] < w[1]),
        "timestamps tie or go back"
    );
    // The crash sends no tail: the lines are there already.
    assert!(
        !logs.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("lines of output follow"))),
        "a tail was sent for a forwarded run"
    );
    assert!(
        (1..10_000).contains(&at_kill),
        "the kill was not in the middle: {at_kill}"
    );
    eprintln!(
        "output figure: 10 000/10 000 lines forwarded, {duplicates} duplicates, in order by timestamp (strictly increasing); worker SIGKILLed after {at_kill} lines were in the API and restarted under the same name"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_tail_of_stdout_then_stderr_sorts_as_printed() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("outtail");
    let _guard = ContainerGuard::for_pool(&pool);
    let worker = WorkerProcess::start(server, &["--pool", &pool], &[]);
    api.wait_for_pool(&pool, Duration::from_secs(60)).await;
    // The case seen in the UI: five lines on stdout, then `boom` on stderr, exit 3. The pause
    // makes "then" well defined: Docker orders two streams only by when it read each.
    let dep = api
        .busybox_deployment(
            &pool,
            json!({
                "stream_output": false,
                "command": "sh -c 'for i in 1 2 3 4 5; do echo \"line $i\"; done; sleep 0.2; echo boom >&2; exit 3'",
            }),
        )
        .await;
    let run = api.create_flow_run(&dep, json!({})).await;
    let state = api.wait_for_final_state(&run, RUN_TIMEOUT).await;
    assert_eq!(
        run_state(&state).0,
        "CRASHED",
        "{state}\n{}",
        worker.output()
    );
    api.wait_for_log(&run, "boom", RUN_TIMEOUT).await;
    let logs = all_logs(&api, &run).await;
    let start = logs
        .iter()
        .position(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("exited with status code 3; its last 6 lines"))
        })
        .unwrap_or_else(|| panic!("no tail announcement: {logs:#?}"));
    // The worker's own messages sort among the lines by when they were logged (the container
    // printed `line 1..5` before the worker said it was submitted, and `boom` after).
    let after: Vec<&Value> = logs[start + 1..]
        .iter()
        .filter(|l| l["name"] == STDOUT || l["name"] == STDERR)
        .collect();
    let tail: Vec<(&str, &str)> = after
        .iter()
        .take(6)
        .map(|l| {
            (
                l["name"].as_str().unwrap_or_default(),
                l["message"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        tail,
        [
            (STDOUT, "line 1"),
            (STDOUT, "line 2"),
            (STDOUT, "line 3"),
            (STDOUT, "line 4"),
            (STDOUT, "line 5"),
            (STDERR, "boom"),
        ],
        "{logs:#?}"
    );
    let stamps: Vec<_> = std::iter::once(&logs[start])
        .chain(after.iter().copied().take(6))
        .map(|l| instant(l["timestamp"].as_str().unwrap_or_default()))
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
    eprintln!(
        "tail figure: announcement then line 1..5 (stdout) and boom (stderr), strictly increasing timestamps"
    );
}

/// A proxy in front of the real server that answers `429 Too Many Requests` (with
/// `Retry-After: 1`) to the first `refusals` `POST /api/logs/` and passes everything else on.
struct RateLimiter {
    url: String,
    refused: Arc<AtomicUsize>,
    taken: Arc<AtomicUsize>,
}

impl RateLimiter {
    async fn start(upstream: &str, refusals: usize) -> Self {
        use http_body_util::{BodyExt as _, Full};
        use hyper::body::Bytes;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/api", listener.local_addr().unwrap());
        let upstream = upstream.trim_end_matches("/api").to_owned();
        let refused = Arc::new(AtomicUsize::new(0));
        let taken = Arc::new(AtomicUsize::new(0));
        let (r, t) = (Arc::clone(&refused), Arc::clone(&taken));
        let client = reqwest::Client::new();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (r, t, client, upstream) = (
                    Arc::clone(&r),
                    Arc::clone(&t),
                    client.clone(),
                    upstream.clone(),
                );
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (r, t, client, upstream) = (
                                Arc::clone(&r),
                                Arc::clone(&t),
                                client.clone(),
                                upstream.clone(),
                            );
                            async move {
                                let logs = req.method() == hyper::Method::POST
                                    && req.uri().path() == "/api/logs/";
                                if logs && r.load(Ordering::SeqCst) < refusals {
                                    r.fetch_add(1, Ordering::SeqCst);
                                    let refusal = hyper::Response::builder()
                                        .status(429)
                                        .header("Retry-After", "1")
                                        .header("Content-Type", "application/json")
                                        .body(Full::new(Bytes::from_static(
                                            br#"{"detail":"rate limited"}"#,
                                        )))
                                        .unwrap();
                                    return Ok::<_, Infallible>(refusal);
                                }
                                let method = req.method().clone();
                                let target = format!(
                                    "{upstream}{}",
                                    req.uri().path_and_query().map_or("/", |p| p.as_str())
                                );
                                let mut forward = client.request(method, target);
                                for (k, v) in req.headers() {
                                    if !matches!(
                                        k.as_str(),
                                        "host"
                                            | "content-length"
                                            | "connection"
                                            | "accept-encoding"
                                    ) {
                                        forward = forward.header(k, v);
                                    }
                                }
                                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                                let answer = match body {
                                    Ok(body) => forward.body(body).send().await,
                                    Err(_) => return Ok(bad_gateway()),
                                };
                                let Ok(answer) = answer else {
                                    return Ok(bad_gateway());
                                };
                                if logs && answer.status().is_success() {
                                    t.fetch_add(1, Ordering::SeqCst);
                                }
                                let mut back = hyper::Response::builder().status(answer.status());
                                for (k, v) in answer.headers() {
                                    if !matches!(
                                        k.as_str(),
                                        "content-length" | "connection" | "transfer-encoding"
                                    ) {
                                        back = back.header(k, v);
                                    }
                                }
                                let body = answer.bytes().await.unwrap_or_default();
                                Ok(back.body(Full::new(body)).unwrap())
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(socket);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Self {
            url,
            refused,
            taken,
        }
    }
}

fn bad_gateway() -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    hyper::Response::builder()
        .status(502)
        .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_api_loses_no_batch() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    const REFUSALS: usize = 4;
    let limiter = RateLimiter::start(&server.api_url, REFUSALS).await;
    let pool = unique("out429");
    let _guard = ContainerGuard::for_pool(&pool);
    // The client does not retry by itself here, so every 429 reaches the log sender, which
    // must keep the batch and send it again after the Retry-After. Only REST goes through the
    // proxy: the websockets (events, the worker channel) are off.
    let worker = WorkerProcess::start_at(
        &limiter.url,
        &["--pool", &pool, "--logs-to-api"],
        &[
            ("PREFECT_CLIENT_MAX_RETRIES", "0"),
            ("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3"),
            ("DOCKER_WORKER_EMIT_EVENTS", "false"),
            ("DOCKER_WORKER_CHANNEL", "false"),
            ("DOCKER_WORKER_CANCELLATION_EVENTS", "false"),
            ("DOCKER_WORKER_FAST_PICKUP", "false"),
        ],
    );
    api.wait_for_pool(&pool, Duration::from_secs(60)).await;
    let dep = api
        .busybox_deployment(
            &pool,
            json!({
                "command": "sh -c 'i=1; while [ $i -le 500 ]; do echo \"n $i\"; if [ $((i % 100)) -eq 0 ]; then sleep 0.5; fi; i=$((i+1)); done; exit 3'",
            }),
        )
        .await;
    let run = api.create_flow_run(&dep, json!({})).await;
    let state = api.wait_for_final_state(&run, RUN_TIMEOUT).await;
    assert_eq!(
        run_state(&state).0,
        "CRASHED",
        "{state}\n{}",
        worker.output()
    );
    eventually(RUN_TIMEOUT, "the 500th line in the API", async || {
        let lines = forwarded(&all_logs(&api, &run).await).len();
        if lines >= 500 {
            Ok(())
        } else {
            Err(format!("{lines} lines; worker:\n{}", worker.output()))
        }
    })
    .await;
    stop(worker).await;
    let refused = limiter.refused.load(Ordering::SeqCst);
    let taken = limiter.taken.load(Ordering::SeqCst);
    assert_eq!(
        refused, REFUSALS,
        "the proxy refused fewer batches than it was set to"
    );
    let logs = all_logs(&api, &run).await;
    let messages: Vec<String> = forwarded(&logs).into_iter().map(|(_, m, _)| m).collect();
    let expected: Vec<String> = (1..=500).map(|i| format!("n {i}")).collect();
    assert_eq!(messages, expected, "lines lost, repeated or out of order");
    // The worker's own messages went through the same refused batches.
    assert!(
        logs.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("submitted to infrastructure"))),
        "{logs:#?}"
    );
    eprintln!(
        "429 figure: {refused} batches answered 429, {taken} batches taken, 500/500 lines in order, 0 lost, 0 duplicated"
    );
}
