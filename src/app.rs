//! Application wiring for `docker-worker start`: health/metrics server first (so it answers
//! even while the API is unreachable), then the Docker connection, the API client, the log
//! shipper and the worker; shut down in order. Also `docker-worker gc`: one collection.

use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{DockerSettings, GcSettings, Settings};
use crate::docker::{DockerRuntime, TlsFiles};
use crate::gc::Report;
use crate::logs::ApiLogs;
use crate::metrics::Metrics;
use crate::prefect::PrefectClient;
use crate::prefect::events::EventSink;
use crate::worker::{Lifetime, Ports, Reporting, Worker};

/// Runs the worker until `shutdown` is cancelled or it stops on its own.
///
/// # Errors
/// Start-up failures (Docker unreachable, API rejected the worker, port in use) and fatal
/// worker errors, with context for the user.
pub async fn run(settings: Settings, lifetime: Lifetime) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let server_shutdown = CancellationToken::new();
    if let Some(endpoints) = settings.endpoints.clone() {
        let addr = endpoints.addr;
        let (bound, _task) =
            crate::health::serve(endpoints, Arc::clone(&metrics), server_shutdown.clone())
                .await
                .with_context(|| format!("starting the health/metrics server on {addr}"))?;
        tracing::info!(address = %bound, "serving health/metrics endpoints");
    }

    let api =
        Arc::new(PrefectClient::new(&settings.api).context("building the Prefect API client")?);
    let docker = connect_docker(&settings.docker).await?;
    tracing::info!(
        docker_host = docker.host(),
        engine_version = docker.engine_version(),
        api_url = %settings.api.api_url,
        "connected to Docker"
    );

    let log_shutdown = CancellationToken::new();
    let (logs, log_task) = if settings.worker.reporting.logging_to_api {
        let (logs, task) = ApiLogs::spawn(
            Arc::clone(&api),
            settings.worker.reporting.log_batch_interval,
            settings.worker.reporting.log_limits,
            Arc::clone(&metrics),
            log_shutdown.clone(),
        );
        (logs, Some(task))
    } else {
        (ApiLogs::disabled(), None)
    };

    let events_config = (settings.worker.cancellation.events
        || settings.worker.features.fast_pickup)
        .then(|| settings.api.clone());
    let events_shutdown = CancellationToken::new();
    let (events, events_task) = if settings.worker.reporting.emit_events {
        let (sink, task) = EventSink::spawn(settings.api.clone(), events_shutdown.clone());
        (sink, Some(task))
    } else {
        (EventSink::disabled(), None)
    };
    let reporting = Reporting {
        logs,
        events,
        metrics,
        events_config,
        channel_config: settings
            .worker
            .features
            .worker_channel
            .then(|| settings.api.clone()),
    };
    let ports = Ports {
        api,
        docker: Arc::new(docker),
    };
    let worker = Worker::new(
        settings.worker,
        ports,
        reporting,
        TaskTracker::new(),
        lifetime,
    );
    let result = worker.run().await;
    // The worker's handles to the log and event queues go with it, so their senders close.
    drop(worker);

    // Deliver the last events (`prefect.worker.stopped`) before the process ends.
    events_shutdown.cancel();
    if let Some(task) = events_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(6), task).await;
    }

    // Flush queued flow-run logs last, after every run task is done writing them.
    log_shutdown.cancel();
    if let Some(task) = log_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
    }
    server_shutdown.cancel();
    result.map_err(anyhow::Error::from)
}

/// Connects to the Docker Engine the settings name (TLS and registry credentials included).
async fn connect_docker(settings: &DockerSettings) -> anyhow::Result<DockerRuntime> {
    let tls = settings.tls_cert_dir.as_deref().map(TlsFiles::in_dir);
    Ok(
        DockerRuntime::connect_with_tls(settings.host.as_deref(), tls.as_ref(), settings.timeout)
            .await
            .context(
                "connecting to the Docker Engine (is the daemon running and is DOCKER_HOST right?)",
            )?
            .with_docker_config(settings.config_dir.clone()),
    )
}

/// `docker-worker gc`: one collection, one line per stopped flow-run container on stdout and a
/// summary line. Returns the report so the caller can choose the exit code.
///
/// # Errors
/// Docker unreachable, the API client cannot be built, or the containers cannot be listed.
pub async fn gc(settings: GcSettings) -> anyhow::Result<Report> {
    let api = PrefectClient::new(&settings.api).context("building the Prefect API client")?;
    let docker = connect_docker(&settings.docker).await?;
    let report = crate::gc::collect(&docker, &api, &settings.options, &|_| false).await?;
    for decision in &report.decisions {
        println!("{decision}");
    }
    println!("{}", report.summary());
    Ok(report)
}
