//! The worker's HTTP endpoints: `GET /health` (the Python worker's rule and bodies) and, when
//! enabled, `GET /metrics` (Prometheus/OpenMetrics text). Served with hyper on one listener.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

/// What the server exposes.
#[derive(Debug, Clone)]
pub struct EndpointSettings {
    /// Listen address (`PREFECT_WORKER_WEBSERVER_HOST:PORT`).
    pub addr: SocketAddr,
    /// Serve `/health`.
    pub health: bool,
    /// Serve `/metrics`.
    pub metrics: bool,
    /// A poll older than this makes `/health` answer 503 (30 × the poll interval).
    pub unhealthy_after: Duration,
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

fn handle(
    req: &Request<hyper::body::Incoming>,
    settings: &EndpointSettings,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") if settings.health => {
            let since = metrics.since_last_poll();
            if since <= settings.unhealthy_after {
                respond(
                    StatusCode::OK,
                    "application/json",
                    r#"{"message":"OK"}"#.into(),
                )
            } else {
                tracing::error!(
                    "Worker has not polled in the last {} seconds and should be restarted",
                    since.as_secs()
                );
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    r#"{"message":"Worker may be unresponsive at this time"}"#.into(),
                )
            }
        }
        (&Method::GET, "/metrics") if settings.metrics => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"detail":"Not Found"}"#.into(),
        ),
    }
}

/// Binds the listener now (so a port clash fails start-up) and serves until `shutdown`.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    settings: EndpointSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(settings.addr).await?;
    let bound = listener.local_addr()?;
    let settings = Arc::new(settings);
    let connections = tasks.clone();
    let handle = tasks.spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "health server accept failed");
                        continue;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            let settings = Arc::clone(&settings);
            let metrics = Arc::clone(&metrics);
            connections.spawn(async move {
                let service = service_fn(move |req| {
                    let resp = handle(&req, &settings, &metrics);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((bound, handle))
}
