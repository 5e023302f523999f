//! Application wiring for `docker-worker start`: connect to both sides, start the log
//! shipper, run the worker, shut down in order.

use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::docker::DockerRuntime;
use crate::logs::ApiLogs;
use crate::prefect::PrefectClient;
use crate::worker::Worker;

/// Runs the worker until `shutdown` is cancelled or it stops on its own.
///
/// # Errors
/// Start-up failures (Docker unreachable, API rejected the worker) and fatal worker errors,
/// with context for the user.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let api =
        Arc::new(PrefectClient::new(&settings.api).context("building the Prefect API client")?);
    let docker = DockerRuntime::connect(settings.docker.host.as_deref(), settings.docker.timeout)
        .await
        .context(
            "connecting to the Docker Engine (is the daemon running and is DOCKER_HOST right?)",
        )?;
    tracing::info!(
        docker_host = docker.host(),
        engine_version = docker.engine_version(),
        api_url = %settings.api.api_url,
        "connected to Docker"
    );

    let log_shutdown = CancellationToken::new();
    let (logs, log_task) = if settings.worker.logging_to_api {
        let (logs, task) = ApiLogs::spawn(
            Arc::clone(&api),
            settings.worker.log_batch_interval,
            log_shutdown.clone(),
        );
        (logs, Some(task))
    } else {
        (ApiLogs::disabled(), None)
    };

    let worker = Worker::new(settings.worker, api, docker, logs, shutdown);
    let result = worker.run().await;

    // Flush queued flow-run logs last, after every run task is done writing them.
    log_shutdown.cancel();
    if let Some(task) = log_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
    }
    result.map_err(anyhow::Error::from)
}
