//! Application wiring for `docker-worker start`: health/metrics server first (so it answers
//! even while the API is unreachable), then the Docker connection, the API client, the log
//! shipper and the worker; shut down in order. Also `docker-worker gc`: one collection.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{DockerSettings, GcSettings, Settings};
use crate::docker::{DockerRuntime, TlsFiles};
use crate::gc::Report;
use crate::image_gc::{DiskGuard, ImageReport};
use crate::logs::ApiLogs;
use crate::metrics::Metrics;
use crate::prefect::PrefectClient;
use crate::prefect::events::EventSink;
use crate::worker::{HostAdmission, Lifetime, Ports, Reporting, Worker};

/// How long the log and event senders get to deliver what is queued after the worker ended.
const FLUSH_GRACE: Duration = Duration::from_secs(10);

/// Runs the worker until shutdown is asked for (`lifetime.requested`) and it has stopped, or
/// until it stops on its own.
///
/// The token tree: `lifetime.abandon` (the process) → `lifetime.requested` (the first signal),
/// `lifetime.stop` (stop watching: at once, or after `--drain-timeout`), and the senders'
/// flush token, cancelled once the worker is done so what it queued last is delivered. Every service task (health server, log and
/// event senders) is spawned in one tracker; the worker has its own for its loops and runs.
///
/// # Errors
/// Start-up failures (Docker unreachable, API rejected the worker, port in use) and fatal
/// worker errors, with context for the user.
pub async fn run(settings: Settings, lifetime: Lifetime) -> anyhow::Result<()> {
    let services = TaskTracker::new();
    let metrics = Arc::new(Metrics::new());
    let server_stop = lifetime.abandon.child_token();
    if let Some(endpoints) = settings.endpoints.clone() {
        let addr = endpoints.addr;
        let (bound, _task) = crate::health::serve(
            endpoints,
            Arc::clone(&metrics),
            server_stop.clone(),
            &services,
        )
        .await
        .with_context(|| format!("starting the health/metrics server on {addr}"))?;
        tracing::info!(address = %bound, "serving health/metrics endpoints");
    }

    let api =
        Arc::new(PrefectClient::new(&settings.api).context("building the Prefect API client")?);
    let docker = connect_docker(&settings.docker).await?;
    tracing::info!(
        docker_host = %crate::redact::url(docker.host()),
        engine_version = docker.engine_version(),
        api_url = %crate::redact::url(settings.api.api_url.as_str()),
        "connected to Docker"
    );
    if let Some(policy) = &settings.worker.run_defaults.policy {
        tracing::info!(
            file = %policy.source().display(),
            rules = %policy.describe().join("; "),
            "host policy: every new run's container is judged and changed by it"
        );
    }
    if let Some(address) = docker.rootless_host_address() {
        tracing::info!(
            address,
            "rootless Docker: a localhost PREFECT_API_URL reaches flow-run containers as host.docker.internal, mapped to rootlesskit's host loopback address (rootlesskit must run without --disable-host-loopback; otherwise give the worker a PREFECT_API_URL containers can reach)"
        );
    }

    let docker = image_collections(&settings, docker, &api, &metrics, &lifetime, &services);
    if let Some(job_override) = &settings.worker.run_defaults.job_override {
        tracing::info!(
            file = %job_override.source().display(),
            fields = %job_override.fields().collect::<Vec<_>>().join(", "),
            "job override: merged into every job configuration, over the template, the deployment and the flow run"
        );
    }

    let flush = lifetime.abandon.child_token();
    let (reporting, senders) = reporting(&settings, &api, metrics, &flush, &services);
    let admission = &settings.worker.admission;
    let ports = Ports {
        api,
        docker: Arc::new(docker),
        host: HostAdmission::new(admission.max_concurrent_submissions, &admission.gpu_devices),
    };
    let result = run_pools(&settings, &ports, &reporting, &lifetime).await;
    // The workers' handles to the log and event queues are gone, so their queues close.
    drop((reporting, ports));

    // Deliver the last events (`prefect.worker.stopped`) and flow-run logs.
    flush.cancel();
    let _ = tokio::time::timeout(FLUSH_GRACE, futures_util::future::join_all(senders)).await;
    server_stop.cancel();
    services.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), services.wait()).await;
    result.map_err(anyhow::Error::from)
}

/// One worker per pool, sharing the API client, the Docker connection, the log and event
/// senders and the metrics, until all have stopped. A worker that fails (credentials, a pool
/// it may not use) stops the others too: the process exits with its error.
async fn run_pools(
    settings: &Settings,
    ports: &Ports,
    reporting: &Reporting,
    lifetime: &Lifetime,
) -> Result<(), crate::worker::WorkerError> {
    let workers: Vec<Arc<Worker>> = settings
        .pools
        .iter()
        .map(|pool| {
            Worker::new(
                settings.worker_for(pool),
                ports.clone(),
                reporting.clone(),
                TaskTracker::new(),
                lifetime.clone(),
            )
        })
        .collect();
    let runs = workers.iter().map(|worker| async move {
        let result = worker.run().await;
        if result.is_err() {
            lifetime.requested.cancel();
        }
        result
    });
    let results = futures_util::future::join_all(runs).await;
    results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
}

/// The flow-run log and event senders (or disabled handles), spawned in `services`, and the
/// settings of the worker's server-push connections.
fn reporting(
    settings: &Settings,
    api: &Arc<PrefectClient>,
    metrics: Arc<Metrics>,
    flush: &CancellationToken,
    services: &TaskTracker,
) -> (Reporting, Vec<JoinHandle<()>>) {
    let worker = &settings.worker;
    let mut senders = Vec::new();
    let logs = if worker.reporting.logging_to_api {
        let (logs, task) = ApiLogs::spawn(
            Arc::clone(api),
            worker.reporting.log_batch_interval,
            worker.reporting.log_limits,
            Arc::clone(&metrics),
            flush.clone(),
            services,
        );
        senders.push(task);
        logs
    } else {
        ApiLogs::disabled()
    };
    let events = if worker.reporting.emit_events {
        let (sink, task) = EventSink::spawn(settings.api.clone(), flush.clone(), services);
        senders.push(task);
        sink
    } else {
        EventSink::disabled()
    };
    let reporting = Reporting {
        logs,
        events,
        metrics,
        events_config: (worker.cancellation.events || worker.features.fast_pickup)
            .then(|| settings.api.clone()),
        channel_config: worker.features.worker_channel.then(|| settings.api.clone()),
    };
    (reporting, senders)
}

/// The worker's image collections: `--min-free-disk`'s guard before pulls (the runtime
/// returned carries it) and `--gc-images` every `--gc-interval` (spawned in `services`, until
/// the first signal). Both keep the images of every pool's deployments.
fn image_collections(
    settings: &Settings,
    docker: DockerRuntime,
    api: &Arc<PrefectClient>,
    metrics: &Arc<Metrics>,
    lifetime: &Lifetime,
    services: &TaskTracker,
) -> DockerRuntime {
    let options = settings.image_gc_options();
    if settings.images.periodic {
        match settings.worker.gc.interval {
            Some(interval) => {
                let task = crate::image_gc::run_periodic(
                    docker.clone(),
                    Arc::clone(api),
                    options.clone(),
                    interval,
                    Arc::clone(metrics),
                    lifetime.requested.child_token(),
                );
                services.spawn(task);
            }
            None => tracing::warn!(
                "--gc-images collects images at every --gc-interval, and no interval is set: images are collected only before pulls with --min-free-disk"
            ),
        }
    }
    let Some(min_free) = settings.images.min_free_disk else {
        return docker;
    };
    match docker.data_root_space() {
        Ok(space) => tracing::info!(
            data_root = %space.path.display(),
            available = space.available,
            min_free_disk = min_free,
            "--min-free-disk: images are collected before a pull when the Docker Engine's data root has less than {} free (now {})",
            crate::image_gc::format_bytes(min_free),
            crate::image_gc::format_bytes(space.available),
        ),
        Err(e) => tracing::warn!("--min-free-disk cannot be enforced: {e}"),
    }
    let guard = DiskGuard::new(
        docker.clone(),
        Arc::clone(api),
        options,
        min_free,
        Arc::clone(metrics),
    );
    docker.with_pull_guard(Arc::new(guard))
}

/// Connects to the Docker Engine the settings name (TLS and registry credentials included).
async fn connect_docker(settings: &DockerSettings) -> anyhow::Result<DockerRuntime> {
    let tls = settings.tls_cert_dir.as_deref().map(TlsFiles::in_dir);
    Ok(
        DockerRuntime::connect_with_tls(settings.host.as_deref(), tls.as_ref(), settings.timeout)
            .await
            .context("connecting to the Docker Engine")?
            .with_docker_config(settings.config_dir.clone()),
    )
}

/// What `docker-worker gc` did, for its exit code.
#[derive(Debug)]
pub struct GcOutcome {
    /// The container collection.
    pub containers: Report,
    /// The image collection (`--images`); `Some(Err)` when it could not start.
    pub images: Option<Result<ImageReport, String>>,
}

impl GcOutcome {
    /// How many failures kept something (an image collection that could not start is one).
    pub fn errors(&self) -> usize {
        self.containers.errors()
            + match &self.images {
                Some(Ok(report)) => report.errors(),
                Some(Err(_)) => 1,
                None => 0,
            }
    }
}

/// `docker-worker gc`: one container collection, one line per stopped flow-run container on
/// stdout and a summary line; with `--images`, then one image collection, likewise (and a
/// `note:` line per deployment whose image could not be told). Containers go first, so the
/// images only they used can go in the same invocation.
///
/// # Errors
/// Docker unreachable, the API client cannot be built, or the containers cannot be listed.
pub async fn gc(settings: GcSettings) -> anyhow::Result<GcOutcome> {
    let api = PrefectClient::new(&settings.api).context("building the Prefect API client")?;
    let docker = connect_docker(&settings.docker).await?;
    let report = crate::gc::collect(&docker, &api, &settings.options, &|_| false).await?;
    for decision in &report.decisions {
        println!("{decision}");
    }
    println!("{}", report.summary());
    let images = match &settings.images {
        None => None,
        Some(options) => Some(
            match crate::image_gc::collect(&docker, &api, options).await {
                Ok(images) => {
                    for note in &images.notes {
                        println!("note: {note}");
                    }
                    for decision in &images.decisions {
                        println!("{decision}");
                    }
                    println!("{}", images.summary());
                    Ok(images)
                }
                Err(e) => {
                    println!("gc images: not run: {e}");
                    Err(e.to_string())
                }
            },
        ),
    };
    Ok(GcOutcome {
        containers: report,
        images,
    })
}

/// What `docker-worker policy check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyCheck {
    /// The policy file is valid (and the job, if any, allowed): the report to print.
    Allowed(String),
    /// The policy refuses the job: the report to print.
    Refused(String),
}

/// Why `docker-worker policy check` could not check.
#[derive(Debug, thiserror::Error)]
pub enum PolicyCheckError {
    /// The policy file cannot be used.
    #[error(transparent)]
    Policy(#[from] crate::config::ConfigError),
    /// The job cannot be read, rendered or validated.
    #[error("cannot use the job: {0}")]
    Job(String),
}

/// `docker-worker policy check FILE [--job JSON]`: reads the policy as `start` would in
/// environment `env`, describes it, and with a job (its variables, inline JSON or a file)
/// renders it through the default base job template as a run would, applies the policy and
/// shows the verdict and, when allowed, the container create body.
///
/// # Errors
/// [`PolicyCheckError`] when the policy file or the job cannot be used.
pub fn check_policy(
    file: &std::path::Path,
    job: Option<&str>,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<PolicyCheck, PolicyCheckError> {
    use std::fmt::Write as _;
    let policy = crate::config::policy_for_check(file, env)?;
    let mut report = format!("Policy {} is valid. It will:\n", file.display());
    let rules = policy.describe();
    if rules.is_empty() {
        report.push_str("  - change nothing (no rule is on)\n");
    }
    for rule in rules {
        let _ = writeln!(report, "  - {rule}");
    }
    let Some(job) = job else {
        return Ok(PolicyCheck::Allowed(report));
    };
    let mut spec = job_spec(job, env).map_err(PolicyCheckError::Job)?;
    match policy.apply(&mut spec) {
        Err(violation) => {
            let _ = writeln!(report, "Job: refused: PolicyViolation: {violation}");
            Ok(PolicyCheck::Refused(report))
        }
        Ok(applied) => {
            let _ = writeln!(
                report,
                "Job: allowed; the policy changes: {}",
                if applied.changes.is_empty() {
                    "nothing".to_owned()
                } else {
                    applied.to_string()
                }
            );
            let body = DockerRuntime::create_body_json(&spec)
                .map_err(|e| PolicyCheckError::Job(e.to_string()))?;
            let pretty = serde_json::to_string_pretty(&body).unwrap_or_default();
            let _ = writeln!(report, "Container create body:\n{pretty}");
            Ok(PolicyCheck::Allowed(report))
        }
    }
}

/// A job's variables (inline JSON or a file) → the container a run of it would get, with
/// the default base job template, the API URL of `env` and no Engine.
fn job_spec(
    job: &str,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<crate::job::ContainerSpec, String> {
    use crate::job::render::{merge_job_variables, render_job_configuration};
    use crate::job::{DockerJobConfiguration, RunContext};
    let text = if job.trim_start().starts_with('{') {
        job.to_owned()
    } else {
        std::fs::read_to_string(job).map_err(|e| format!("cannot read {job}: {e}"))?
    };
    let variables: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("not valid JSON: {e}"))?;
    let variables = variables
        .as_object()
        .ok_or("expected a JSON object of job variables")?;
    let template = crate::job::default_base_job_template();
    let merged = merge_job_variables(None, Some(variables));
    let rendered = render_job_configuration(&template, &merged, &|name| env.get(name).cloned())
        .map_err(|e| e.to_string())?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let config =
        DockerJobConfiguration::from_rendered(&rendered, &cwd).map_err(|e| e.to_string())?;
    let settings_env: Vec<(String, String)> = env
        .get("PREFECT_API_URL")
        .map(|url| ("PREFECT_API_URL".to_owned(), url.clone()))
        .into_iter()
        .collect();
    let flow_run =
        serde_json::json!({"id": "00000000-0000-0000-0000-000000000000", "name": "policy-check"});
    config
        .prepare(&RunContext {
            flow_run: &flow_run,
            flow: None,
            deployment: None,
            worker_name: "policy-check",
            work_pool_name: "policy-check",
            work_pool_id: "",
            settings_env: &settings_env,
            default_image: crate::config::DEFAULT_IMAGE,
            engine_version: None,
            rootless_host: None,
        })
        .map_err(|e| e.to_string())
}
