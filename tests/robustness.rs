//! Bad input never brings the worker down or loses a run: a corpus of malformed API answers
//! (through an in-process stub, since a real server will not produce them on demand) and a
//! container that floods its output (real server, real Engine). Each test prints its figure.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Malformed answers to the poll, each served once, in order.
fn poll_corpus() -> Vec<(&'static str, Vec<u8>)> {
    let huge = {
        let mut body = b"[".to_vec();
        for i in 0..300_000 {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(br#"{"flow_run":{"junk":true}}"#);
        }
        body.push(b']');
        body
    };
    vec![
        ("truncated JSON", br#"[{"flow_run": {"id": "x""#.to_vec()),
        (
            "an object instead of a list",
            br#"{"not": "a list"}"#.to_vec(),
        ),
        (
            "a list of the wrong types",
            br#"[1, "two", null, true]"#.to_vec(),
        ),
        (
            "runs missing their ids",
            br#"[{"flow_run": {"name": "no id"}}]"#.to_vec(),
        ),
        (
            "a state of the wrong type",
            br#"[{"flow_run": {"id": "r", "flow_id": "f", "state": {"type": 7}}}]"#.to_vec(),
        ),
        ("an HTML page", b"<html><body>oops</body></html>".to_vec()),
        ("an empty body", Vec::new()),
        ("bytes that are not UTF-8", vec![0xff, 0xfe, 0x00, 0x80]),
        ("a 9 MB list of junk", huge),
        ("JSON nested 5000 deep", {
            let mut b = "[".repeat(5000).into_bytes();
            b.extend("]".repeat(5000).into_bytes());
            b
        }),
    ]
}

/// What the stub saw and served.
#[derive(Default)]
struct Stub {
    /// Corpus entries served so far.
    served: AtomicUsize,
    /// Requests seen (`METHOD path`).
    seen: Mutex<Vec<String>>,
}

/// A flow run the worker can run on busybox: no deployment, exits 0.
fn run_json(state: &str, name: &str) -> serde_json::Value {
    json!({"id": "11111111-1111-1111-1111-111111111111", "name": "sturdy-run",
           "flow_id": "22222222-2222-2222-2222-222222222222", "deployment_id": null,
           "job_variables": {"image": BUSYBOX, "command": "true", "image_pull_policy": "Never"},
           "parameters": {}, "tags": [], "labels": {},
           "state": {"id": "33333333-3333-3333-3333-333333333333", "type": state, "name": name}})
}

async fn answer(
    stub: &Stub,
    method: &str,
    path: &str,
    corpus: &[(&str, Vec<u8>)],
) -> (u16, Vec<u8>) {
    let pool = json!({"id": "44444444-4444-4444-4444-444444444444", "name": "sturdy",
                      "type": "docker", "base_job_template": docker_worker::job::default_base_job_template(),
                      "is_paused": false});
    let claimed = stub
        .seen
        .lock()
        .unwrap()
        .iter()
        .any(|s| s.contains("/infrastructure") || s.starts_with("PATCH /api/flow_runs/1111"));
    match (method, path) {
        ("GET", p) if p.ends_with("/csrf-token") => (404, b"{}".to_vec()),
        ("GET", "/api/work_pools/sturdy") => (200, pool.to_string().into_bytes()),
        ("POST", p) if p.ends_with("/get_scheduled_flow_runs") => {
            let i = stub.served.fetch_add(1, Ordering::SeqCst);
            match corpus.get(i) {
                Some((_, body)) => (200, body.clone()),
                None if claimed => (200, b"[]".to_vec()),
                None => (
                    200,
                    json!([{"flow_run": run_json("SCHEDULED", "Scheduled")}])
                        .to_string()
                        .into_bytes(),
                ),
            }
        }
        ("POST", "/api/flow_runs/filter") => (200, b"[]".to_vec()),
        ("GET", p) if p.starts_with("/api/flow_runs/1111") => {
            let state = if claimed { ("PENDING", "Submitting") } else { ("SCHEDULED", "Scheduled") };
            (200, run_json(state.0, state.1).to_string().into_bytes())
        }
        ("POST", p) if p.ends_with("/set_state") => (
            201,
            json!({"status": "ACCEPT", "details": {},
                   "state": {"id": "55555555-5555-5555-5555-555555555555", "type": "PENDING", "name": "Pending"}})
            .to_string()
            .into_bytes(),
        ),
        ("GET", p) if p.starts_with("/api/flow_run_states/") => (200, b"[]".to_vec()),
        ("GET", p) if p.starts_with("/api/flows/") => (
            200,
            json!({"id": "22222222-2222-2222-2222-222222222222", "name": "sturdy-flow", "tags": []})
                .to_string()
                .into_bytes(),
        ),
        _ => (200, b"{}".to_vec()),
    }
}

async fn serve_one(
    mut sock: TcpStream,
    stub: Arc<Stub>,
    corpus: Arc<Vec<(&'static str, Vec<u8>)>>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (method, path) = loop {
        let n = sock.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let len = text[..end]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            })
            .unwrap_or(0);
        if buf.len() < end + 4 + len {
            continue;
        }
        let mut first = text.lines().next().unwrap_or_default().split_whitespace();
        let method = first.next().unwrap_or_default().to_owned();
        let path = first
            .next()
            .unwrap_or_default()
            .split('?')
            .next()
            .unwrap_or_default()
            .to_owned();
        break (method, path);
    };
    let (status, body) = answer(&stub, &method, &path, &corpus).await;
    stub.seen.lock().unwrap().push(format!("{method} {path}"));
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = sock.write_all(head.as_bytes()).await;
    let _ = sock.write_all(&body).await;
    let _ = sock.shutdown().await;
}

/// The worker meets every malformed answer in the corpus, stays up, and still claims and runs
/// the run it is then offered.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_api_answers_are_logged_and_lose_no_run() {
    require_docker();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api", listener.local_addr().unwrap());
    let stub = Arc::new(Stub::default());
    let corpus = Arc::new(poll_corpus());
    let kinds = corpus.len();
    {
        let (stub, corpus) = (Arc::clone(&stub), Arc::clone(&corpus));
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve_one(sock, Arc::clone(&stub), Arc::clone(&corpus)));
            }
        });
    }
    let _guard = ContainerGuard::for_label("io.prefect.work-pool-name", "sturdy");
    let mut worker = WorkerProcess::start_at(
        &url,
        &["--pool", "sturdy", "--name", &unique("sturdy")],
        &[
            ("DOCKER_WORKER_CHANNEL", "false"),
            ("DOCKER_WORKER_EMIT_EVENTS", "false"),
            ("DOCKER_WORKER_CANCELLATION_EVENTS", "false"),
            ("DOCKER_WORKER_FAST_PICKUP", "false"),
            ("PREFECT_CLIENT_MAX_RETRIES", "0"),
        ],
    );
    let seen = Arc::clone(&stub);
    eventually(
        Duration::from_secs(120),
        "the run offered after the corpus to be claimed and its container recorded",
        async || {
            let recorded = seen
                .seen
                .lock()
                .unwrap()
                .iter()
                .any(|s| s.starts_with("PATCH /api/flow_runs/1111"));
            if recorded {
                Ok(())
            } else {
                Err(worker.output())
            }
        },
    )
    .await;
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "the worker must stay up:\n{}",
        worker.output()
    );
    let served = stub.served.load(Ordering::SeqCst);
    assert!(served >= kinds, "only {served} of {kinds} answers served");
    let failures = worker
        .output()
        .matches("polling for flow runs failed")
        .count();
    assert!(
        failures >= kinds - 1,
        "{failures} failures logged:\n{}",
        worker.output()
    );
    worker.signal("TERM");
    let status = worker.wait_timeout(Duration::from_secs(30)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    eprintln!(
        "Robustness figure: {kinds} kinds of malformed poll answers (truncated, wrong types, missing fields, HTML, empty, not UTF-8, 9 MB, 5000 deep): {failures} logged failures, the worker stayed up, and the run offered next was claimed and run"
    );
}

/// Peak resident memory of a process (kB), from `/proc`.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A container printing 200 MB as fast as it can: the worker follows it all and keeps only a
/// bounded tail; the run's logs get that tail under a note saying how much it is.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_flooding_its_output_is_followed_with_bounded_memory() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("flood");
    let _guard = ContainerGuard::for_pool(&pool);
    let dep = api
        .busybox_deployment(&pool, json!({"stream_output": false}))
        .await;
    let id = api
        .create_flow_run(
            &dep,
            json!({"command": "sh -c 'yes 0123456789abcdefghijklmnopqrstuvwxyz0123456789 | head -c 200000000; exit 3'"}),
        )
        .await;
    let worker = WorkerProcess::start(server, &["--pool", &pool], &[]);
    let run = api
        .wait_for_final_state(&id, Duration::from_secs(600))
        .await;
    assert_eq!(run["state"]["type"], json!("CRASHED"), "{run}");
    let peak = peak_rss_kib(worker.child.id()).expect("the worker's /proc status");
    let logs = api
        .wait_for_log(&id, "of output follow", Duration::from_secs(60))
        .await;
    let note = logs
        .iter()
        .find(|l| l.contains("of output follow"))
        .expect("the tail's note");
    assert!(
        note.contains("its last 200 lines of output follow"),
        "{note}"
    );
    let tail: Vec<&String> = logs
        .iter()
        .filter(|l| l.starts_with("0123456789abcdefghij"))
        .collect();
    assert!(
        !tail.is_empty() && tail.len() <= 200,
        "{} tail lines",
        tail.len()
    );
    eprintln!(
        "Flood figure: 200 MB of output followed; the worker's peak RSS {:.1} MiB; the run's logs got {} lines under \"{note}\"",
        peak as f64 / 1024.0,
        tail.len()
    );
}
