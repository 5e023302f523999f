//! Rare API paths a real server will not produce on demand (503 with `Retry-After`, 401, a
//! CSRF-enabled server, a malformed body), against an in-process HTTP stub on 127.0.0.1.
//! The normal paths are covered against a real Prefect server in `e2e.rs`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use docker_worker::prefect::{ClientConfig, PrefectClient, StateProposal, StateType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One recorded request: first line and headers (lower-cased names).
#[derive(Debug, Clone)]
struct Seen {
    line: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A scripted answer: status, extra headers, body.
type Scripted = (u16, Vec<(&'static str, &'static str)>, &'static str);

/// Serves scripted responses (`status`, extra headers, body) in order, the last one repeated.
async fn stub(responses: Vec<Scripted>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut i = 0;
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            // One request per connection keeps the stub simple (we answer Connection: close).
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf);
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&buf).into_owned();
            let mut lines = text.lines();
            let line = lines.next().unwrap_or_default().to_owned();
            let headers = lines
                .take_while(|l| !l.is_empty())
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            log.lock().unwrap().push(Seen { line, headers });
            let (status, extra, body) = &responses[i.min(responses.len() - 1)];
            i += 1;
            let mut resp = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in extra {
                resp.push_str(&format!("{k}: {v}\r\n"));
            }
            resp.push_str("\r\n");
            resp.push_str(body);
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        }
    });
    (url, seen)
}

fn client(url: &str, key: Option<&str>) -> PrefectClient {
    PrefectClient::new(&ClientConfig {
        api_url: url.parse().unwrap(),
        api_key: key.map(str::to_owned),
        auth_string: None,
        timeout: Duration::from_secs(5),
        max_retries: 3,
        worker_name: Some("w 1".into()),
        csrf_enabled: true,
    })
    .unwrap()
}

const POOL: &str =
    r#"{"id":"p1","name":"pool","type":"docker","base_job_template":{},"is_paused":false}"#;

#[tokio::test]
async fn retries_503_honouring_retry_after() {
    let (url, seen) = stub(vec![
        (503, vec![("Retry-After", "1")], "{}"),
        (200, vec![], POOL),
    ])
    .await;
    let started = Instant::now();
    let pool = client(&url, Some("secret-key"))
        .read_work_pool("pool")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pool.id, "p1");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After not honoured"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    let first = &seen[0];
    assert_eq!(first.line, "GET /api/work_pools/pool HTTP/1.1");
    assert_eq!(first.header("authorization"), Some("Bearer secret-key"));
    assert_eq!(first.header("x-prefect-api-version"), Some("0.8.4"));
    assert_eq!(
        first.header("user-agent"),
        Some("prefect/3.9.1 (API 0.8.4)")
    );
    assert_eq!(first.header("x-prefect-worker-name"), Some("w 1"));
}

#[tokio::test]
async fn unauthorized_is_not_retried_and_is_classified() {
    let (url, seen) = stub(vec![(401, vec![], r#"{"detail":"bad key"}"#)]).await;
    let err = client(&url, Some("k"))
        .read_work_pool("pool")
        .await
        .unwrap_err();
    assert!(err.is_auth() && !err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("401") && err.to_string().contains("bad key"),
        "{err}"
    );
    assert!(
        !err.to_string().contains("Bearer"),
        "no secrets in errors: {err}"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn csrf_token_is_fetched_once_and_sent_on_mutations() {
    let token = r#"{"token":"tok-123","expiration":"2999-01-01T00:00:00Z","client":"x"}"#;
    let accepted = r#"{"status":"ACCEPT","state":{"type":"PENDING","name":"Pending"},"details":{"type":"accept_details"}}"#;
    let (url, seen) = stub(vec![
        (200, vec![], token),
        (201, vec![], accepted),
        (201, vec![], accepted),
    ])
    .await;
    let c = client(&url, None);
    for _ in 0..2 {
        let r = c
            .set_flow_run_state("run-1", &StateProposal::pending(), false)
            .await
            .unwrap();
        assert_eq!(r.state_type(), Some(StateType::Pending));
    }
    let seen = seen.lock().unwrap();
    assert!(
        seen[0].line.starts_with("GET /api/csrf-token?client="),
        "{:?}",
        seen[0]
    );
    assert_eq!(seen.len(), 3, "token fetched once: {seen:?}");
    for s in &seen[1..] {
        assert_eq!(s.line, "POST /api/flow_runs/run-1/set_state HTTP/1.1");
        assert_eq!(s.header("prefect-csrf-token"), Some("tok-123"));
        assert!(s.header("prefect-csrf-client").is_some());
    }
}

#[tokio::test]
async fn malformed_scheduled_runs_are_a_decode_error() {
    let (url, _) = stub(vec![(200, vec![], r#"[{"flow_run":{"name":"no id"}}]"#)]).await;
    let err = client(&url, None)
        .get_scheduled_flow_runs("pool", &[], chrono::Utc::now(), None)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("flow run without an `id`"),
        "{err}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn missing_pool_on_poll_means_no_runs() {
    let (url, seen) = stub(vec![(404, vec![], r#"{"detail":"Work pool not found"}"#)]).await;
    let runs = client(&url, None)
        .get_scheduled_flow_runs("pool", &["q".into()], chrono::Utc::now(), None)
        .await
        .unwrap();
    assert!(runs.is_empty());
    let seen = seen.lock().unwrap();
    // A 404 on the CSRF endpoint turns CSRF off for this client; then the poll itself.
    assert!(seen[0].line.starts_with("GET /api/csrf-token"), "{seen:?}");
    assert_eq!(
        seen[1].line,
        "POST /api/work_pools/pool/get_scheduled_flow_runs HTTP/1.1"
    );
    assert_eq!(seen.len(), 2);
}
