//! Settings of the worker loop, one sub-struct per subsystem, each built by one small function
//! from the `start` flags and the environment (read through [`super::env_table`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::ConfigError;
use super::env::Env;
use super::env_table as var;
use crate::cli::StartArgs;
use crate::guard::HostPolicy;
use crate::job::overrides::JobOverride;
use crate::logs::LogLimits;

/// Settings of the worker loop.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Work pool name: the one pool this worker polls and heartbeats to.
    pub pool: String,
    /// Worker name, its identity in heartbeats (Prefect tells workers apart by it).
    pub name: String,
    /// Queues to poll; empty = all, as the Python worker's `--work-queue` default.
    pub work_queues: Vec<String>,
    /// How and how often the pool is polled and synced.
    pub polling: PollingSettings,
    /// What happens when a running run is cancelled, and how the worker learns of it.
    pub cancellation: CancellationSettings,
    /// What every flow-run container gets unless its job says otherwise.
    pub run_defaults: RunDefaults,
    /// What the worker reports to Prefect besides states: logs, crash output, usage, events.
    pub reporting: ReportingSettings,
    /// The periodic garbage collection of the pool's finished containers.
    pub gc: GcLoopSettings,
    /// Features beyond the Python worker, each of which can be switched off.
    pub features: FeatureSettings,
    /// How Prefect's view of the runs and this host's containers are kept in agreement.
    pub convergence: ConvergenceSettings,
    /// What a run must wait for before it is submitted, beyond `--limit`.
    pub admission: AdmissionSettings,
}

/// What a run must wait for before it is submitted, beyond `--limit`.
#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    /// Pulls, creates and starts in flight at once: a burst of due runs on a small host is
    /// submitted a few at a time instead of all at once.
    pub max_concurrent_submissions: usize,
    /// No claim while the host's available memory (bytes) is below this; `None` = no check.
    pub min_free_memory: Option<u64>,
    /// GPU device ids handed out one run at a time; empty = Docker picks (no partitioning).
    pub gpu_devices: Vec<String>,
}

/// How Prefect's view of the runs and this host's containers are kept in agreement.
#[derive(Debug, Clone)]
pub struct ConvergenceSettings {
    /// How often the reconcile pass runs (it also runs at start-up).
    pub reconcile_interval: Duration,
    /// A run claimed by another worker offline this long, with no container recorded, is
    /// ended; shorter would end runs whose worker is only restarting.
    pub orphan_claim_timeout: Duration,
    /// Reschedule such runs instead of crashing them. Off by default: their container may
    /// exist on a Docker host this worker cannot see, and rescheduling would run them twice.
    pub reschedule_orphans: bool,
    /// A container of a final run is stopped once it outlived its run by this much, so an
    /// engine that reported Completed has time to exit by itself.
    pub orphan_grace: Duration,
    /// Stop containers of final runs at all.
    pub stop_orphans: bool,
    /// On the first SIGTERM, keep watching and reporting (but stop claiming) for up to this
    /// long, for rolling upgrades; `None` = exit at once, leaving containers for adoption.
    pub drain_timeout: Option<Duration>,
    /// Retries of a submission step that failed for a transient reason.
    pub submit_retries: u32,
}

/// How and how often the pool is polled and synced.
#[derive(Debug, Clone)]
pub struct PollingSettings {
    /// Maximum concurrent runs (`--limit`): a slot is held until the container exits, so a
    /// host is not overcommitted; `None` = no limit.
    pub limit: Option<usize>,
    /// Look-ahead for scheduled runs, so a run starts on time despite the poll interval.
    pub prefetch: Duration,
    /// Poll once, wait for the runs, exit: for cron-driven and test use.
    pub run_once: bool,
    /// Poll interval (`PREFECT_WORKER_QUERY_SECONDS`); also sets when `/health` turns
    /// unhealthy.
    pub query_interval: Duration,
    /// Heartbeat and pool sync interval (`PREFECT_WORKER_HEARTBEAT_SECONDS`), whole seconds as
    /// the Python CLI truncates it; Prefect marks a worker offline after missed heartbeats.
    pub heartbeat_interval: Duration,
    /// Create a missing pool (type `docker`) instead of failing, as the Python worker does.
    pub create_pool_if_not_found: bool,
    /// Template to create the pool with, checked at start so a bad file fails before any
    /// API call; `None` = the prefect-docker default.
    pub base_job_template: Option<Value>,
}

/// What happens when a running run is cancelled, and how the worker learns of it.
#[derive(Debug, Clone)]
pub struct CancellationSettings {
    /// Stop the containers of runs cancelled while running; off leaves them to the Prefect
    /// engine inside, as the Python worker does.
    pub stop_cancelled: bool,
    /// SIGTERM → SIGKILL grace when stopping them, so flows can clean up.
    pub grace: Duration,
    /// How often running runs are checked for cancellation: the safety net under the events.
    pub poll_interval: Duration,
    /// Also learn cancellations at once from the `/events/out` websocket, instead of waiting
    /// for the next check.
    pub events: bool,
}

/// What every flow-run container gets unless its job says otherwise.
#[derive(Clone)]
pub struct RunDefaults {
    /// Image when the job names none.
    pub default_image: String,
    /// The worker's `PREFECT_*` settings handed to every flow-run container, so the engine
    /// inside talks to the same API with the same credentials. Holds the API key: the
    /// `Debug` of this struct prints the names only.
    pub settings_env: Vec<(String, String)>,
    /// Directory relative bind mounts are resolved against, as docker-py resolves them
    /// against the Python worker's.
    pub cwd: PathBuf,
    /// The host policy (`--policy`): judges every new run's container before anything is
    /// pulled or created, and adds what it forces; `None` = the reference's behaviour.
    pub policy: Option<Arc<HostPolicy>>,
    /// The operator's job configuration values (`--job-override`), merged into every
    /// rendered job configuration, winning over template, deployment and flow run; read and
    /// checked at start. Its `Debug` shows the file and keys, never values.
    pub job_override: Option<Arc<JobOverride>>,
}

/// What the worker reports to Prefect besides states.
#[derive(Debug, Clone)]
pub struct ReportingSettings {
    /// Send the worker's flow-run messages to the run's logs, so the UI explains failures.
    pub logging_to_api: bool,
    /// Interval of log batches: fewer requests at the cost of latency in the UI.
    pub log_batch_interval: Duration,
    /// Size limits of flow-run logs, Prefect's, which the server enforces.
    pub log_limits: LogLimits,
    /// How many of a failed container's last output lines are sent as flow-run logs, so a run
    /// that died before its engine connected is explained in the UI (0 = none).
    pub crash_log_lines: usize,
    /// Forward all of every run's container output to the run's logs (`--logs-to-api`), not
    /// only the runs whose job asks for it.
    pub logs_to_api: bool,
    /// Sample each container's memory and CPU and report them when it exits.
    pub resource_accounting: bool,
    /// Emit the worker's and containers' Prefect events over `/events/in`, as the Python
    /// worker does, for automations.
    pub emit_events: bool,
}

/// The periodic garbage collection of the pool's finished containers.
#[derive(Debug, Clone)]
pub struct GcLoopSettings {
    /// Collect this often; `None` = never (finished containers are kept for inspection, as
    /// the Python worker keeps them).
    pub interval: Option<Duration>,
    /// Keep containers that finished less than this long ago, so recent failures can still be
    /// inspected.
    pub older_than: Duration,
}

/// Features beyond the Python worker, each of which can be switched off if it misbehaves
/// with a given server.
#[derive(Debug, Clone)]
pub struct FeatureSettings {
    /// Pull the images of the pool's deployments at start and when deployments change, so a
    /// run does not wait for its pull.
    pub prepull: bool,
    /// Poll at once when the `/events/out` websocket says one of the pool's runs became due,
    /// instead of at the next interval.
    pub fast_pickup: bool,
    /// Sync over Prefect's worker channel websocket (≥ 3.9) when the server offers it, which
    /// also brings cleanup delivery; REST otherwise.
    pub worker_channel: bool,
}

impl fmt::Debug for RunDefaults {
    /// The settings' names, never their values: one of them is the API key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Names<'a>(&'a [(String, String)]);
        impl fmt::Debug for Names<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.iter().map(|(k, _)| (k, format_args!("<redacted>"))))
                    .finish()
            }
        }
        f.debug_struct("RunDefaults")
            .field("default_image", &self.default_image)
            .field("settings_env", &Names(&self.settings_env))
            .field("cwd", &self.cwd)
            .field("policy", &self.policy)
            .field("job_override", &self.job_override)
            .finish()
    }
}

impl WorkerSettings {
    /// The settings of a worker started with `--pool pool --name name` and nothing else, in an
    /// empty environment: the documented defaults, from the same table as real settings. For
    /// tests of code that takes a `WorkerSettings`.
    ///
    /// # Panics
    /// If a default of the environment table does not parse, a bug a unit test guards against.
    #[must_use]
    pub fn with_defaults(pool: &str, name: &str) -> Self {
        let args = StartArgs {
            pool: vec![pool.to_owned()],
            ..StartArgs::default()
        };
        let empty = std::collections::BTreeMap::new();
        let env = Env::new(&empty);
        let settings = polling(&args, &env).and_then(|polling| {
            let gc = gc(&args, &env)?;
            let run_defaults = run_defaults(&args, &env)?;
            Self::from_parts(&args, name.to_owned(), polling, run_defaults, gc, &env)
        });
        match settings {
            Ok(settings) => settings,
            Err(e) => panic!("a default of the environment table does not parse: {e}"),
        }
    }

    /// The worker loop settings of `start` for a worker named `name` (already checked), from
    /// the parts [`super::Settings`] reads before the API settings (its order decides which
    /// error is reported when several settings are wrong).
    pub(super) fn from_parts(
        args: &StartArgs,
        name: String,
        polling: PollingSettings,
        run_defaults: RunDefaults,
        gc: GcLoopSettings,
        env: &Env,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            pool: args.pool.first().cloned().unwrap_or_default(),
            name,
            work_queues: args.work_queue.clone(),
            polling,
            run_defaults,
            gc,
            reporting: reporting(args, env)?,
            cancellation: cancellation(args, env)?,
            features: features(args, env)?,
            convergence: convergence(args, env)?,
            admission: admission(args, env)?,
        })
    }
}

/// `--limit`, `--prefetch-seconds`, `--run-once`, the pool flags and the poll intervals.
pub(super) fn polling(args: &StartArgs, env: &Env) -> Result<PollingSettings, ConfigError> {
    if args.limit == Some(0) {
        return Err(ConfigError::Invalid {
            name: "--limit".into(),
            value: "0".into(),
            reason: "the limit must be at least 1".into(),
        });
    }
    let base_job_template = match &args.base_job_template {
        None => None,
        Some(path) => Some(base_job_template(path)?),
    };
    let prefetch = match flag_seconds(
        args.prefetch_seconds,
        "--prefetch-seconds",
        "expected a non-negative number",
    )? {
        Some(prefetch) => prefetch,
        None => env.seconds(&var::PREFECT_WORKER_PREFETCH_SECONDS)?,
    };
    // The Python CLI truncates the heartbeat interval to whole seconds, so less than one
    // second would be a heartbeat every 0 s: refused, as a poll interval of 0 is.
    let heartbeat = env.interval(
        &var::PREFECT_WORKER_HEARTBEAT_SECONDS,
        Duration::from_secs(1),
    )?;
    Ok(PollingSettings {
        limit: args.limit,
        prefetch,
        run_once: args.run_once,
        query_interval: env.interval(&var::PREFECT_WORKER_QUERY_SECONDS, Duration::ZERO)?,
        heartbeat_interval: Duration::from_secs(heartbeat.as_secs()),
        create_pool_if_not_found: !args.no_create_pool_if_not_found,
        base_job_template,
    })
}

/// The `--base-job-template` file: JSON with a `job_configuration` object.
fn base_job_template(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::BaseJobTemplate {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|e| ConfigError::BaseJobTemplate {
        path: path.to_owned(),
        reason: format!("not valid JSON: {e}"),
    })?;
    if !value.get("job_configuration").is_some_and(Value::is_object) {
        return Err(ConfigError::BaseJobTemplate {
            path: path.to_owned(),
            reason: "expected an object with `job_configuration` and `variables`".into(),
        });
    }
    Ok(value)
}

/// A seconds flag, if given: a non-negative number a `Duration` can hold, else an error
/// naming it with `reason`.
fn flag_seconds(
    value: Option<f64>,
    flag: &str,
    reason: &str,
) -> Result<Option<Duration>, ConfigError> {
    let Some(s) = value else {
        return Ok(None);
    };
    // `try_`: negative, NaN, infinite, and too large for a `Duration` are errors, not panics.
    Duration::try_from_secs_f64(s)
        .map(Some)
        .map_err(|_| ConfigError::Invalid {
            name: flag.into(),
            value: s.to_string(),
            reason: reason.into(),
        })
}

/// `--no-stop-cancelled`, `--cancel-grace` and how cancellations are learnt.
fn cancellation(args: &StartArgs, env: &Env) -> Result<CancellationSettings, ConfigError> {
    let stop_cancelled =
        !args.no_stop_cancelled && env.boolean(&var::DOCKER_WORKER_STOP_CANCELLED)?;
    let grace = match flag_seconds(
        args.cancel_grace,
        "--cancel-grace",
        "expected a non-negative number of seconds",
    )? {
        Some(grace) => grace,
        None => env.seconds(&var::DOCKER_WORKER_CANCEL_GRACE_SECONDS)?,
    };
    Ok(CancellationSettings {
        stop_cancelled,
        grace,
        poll_interval: env.interval(
            &var::DOCKER_WORKER_CANCELLATION_POLL_SECONDS,
            Duration::ZERO,
        )?,
        events: env.boolean(&var::DOCKER_WORKER_CANCELLATION_EVENTS)?,
    })
}

/// `--default-image`, the Prefect settings passed on, the working directory and the host
/// policy.
pub(super) fn run_defaults(args: &StartArgs, env: &Env) -> Result<RunDefaults, ConfigError> {
    // Every explicitly set Prefect setting goes to the flow-run container, as the reference
    // does, so the engine inside talks to the same API with the same credentials. Internal
    // `PREFECT__*` variables are the worker's own and are set per run instead.
    // Booleans are written as Python prints them, as the reference's settings export does.
    let settings_env = env
        .prefect_settings()
        .map(|(k, v)| {
            let value = match v.trim().to_ascii_lowercase().as_str() {
                "true" => "True".to_owned(),
                "false" => "False".to_owned(),
                _ => v.clone(),
            };
            (k.clone(), value)
        })
        .collect();
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    Ok(RunDefaults {
        default_image: args
            .default_image
            .clone()
            .unwrap_or_else(|| env.text(&var::DOCKER_WORKER_DEFAULT_IMAGE)),
        settings_env,
        policy: policy(args, env)?,
        job_override: job_override(args.job_override.as_deref(), env, &cwd)?,
        cwd,
    })
}

/// `--job-override`, else `DOCKER_WORKER_JOB_OVERRIDE`: the file read and checked now (its
/// syntax, its fields, their values), so a bad one stops the worker (or `gc`) before
/// anything happens, naming the file and the problem.
pub(super) fn job_override(
    flag: Option<&Path>,
    env: &Env,
    cwd: &Path,
) -> Result<Option<Arc<JobOverride>>, ConfigError> {
    let Some(path) = flag.map(Path::to_path_buf).or_else(|| {
        env.non_empty(&var::DOCKER_WORKER_JOB_OVERRIDE)
            .map(PathBuf::from)
    }) else {
        return Ok(None);
    };
    let unusable = |e: crate::job::overrides::JobOverrideError| ConfigError::JobOverride {
        path: path.clone(),
        reason: e.to_string(),
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| unusable(crate::job::overrides::JobOverrideError::Read(e.to_string())))?;
    let parsed = JobOverride::parse(&path, &text, cwd).map_err(unusable)?;
    Ok(Some(Arc::new(parsed)))
}

/// `--policy`, else `DOCKER_WORKER_POLICY`: the file read and checked now, so a bad one stops
/// the worker before it claims anything. The socket of a unix `DOCKER_HOST` is protected
/// along with the default ones.
fn policy(args: &StartArgs, env: &Env) -> Result<Option<Arc<HostPolicy>>, ConfigError> {
    let Some(path) = args
        .policy
        .clone()
        .or_else(|| env.non_empty(&var::DOCKER_WORKER_POLICY).map(PathBuf::from))
    else {
        return Ok(None);
    };
    let policy = super::load_policy(&path, env)?;
    Ok(Some(Arc::new(policy)))
}

/// Flow-run logs, container output, resource accounting and events.
fn reporting(args: &StartArgs, env: &Env) -> Result<ReportingSettings, ConfigError> {
    Ok(ReportingSettings {
        logging_to_api: env.boolean(&var::PREFECT_LOGGING_TO_API_ENABLED)?,
        log_batch_interval: env
            .interval(&var::PREFECT_LOGGING_TO_API_BATCH_INTERVAL, Duration::ZERO)?,
        log_limits: log_limits(env)?,
        crash_log_lines: env.count(&var::DOCKER_WORKER_CRASH_LOG_LINES)?,
        logs_to_api: args.logs_to_api || env.boolean(&var::DOCKER_WORKER_LOGS_TO_API)?,
        resource_accounting: env.boolean(&var::DOCKER_WORKER_RESOURCE_ACCOUNTING)?,
        emit_events: env.boolean(&var::DOCKER_WORKER_EMIT_EVENTS)?,
    })
}

/// `PREFECT_LOGGING_TO_API_MAX_LOG_SIZE` / `_BATCH_SIZE`, checked as Prefect checks them.
fn log_limits(env: &Env) -> Result<LogLimits, ConfigError> {
    let max_size = &var::PREFECT_LOGGING_TO_API_MAX_LOG_SIZE;
    let batch_size = &var::PREFECT_LOGGING_TO_API_BATCH_SIZE;
    let limits = LogLimits {
        max_log_size: env.count(max_size)?,
        batch_size: env.count(batch_size)?,
    };
    if limits.batch_size < limits.max_log_size {
        return Err(ConfigError::Invalid {
            name: max_size.name.into(),
            value: limits.max_log_size.to_string(),
            reason: format!(
                "`{}` cannot be larger than `{}`",
                max_size.name, batch_size.name
            ),
        });
    }
    Ok(limits)
}

/// `--gc-interval` and `--gc-older-than`.
pub(super) fn gc(args: &StartArgs, env: &Env) -> Result<GcLoopSettings, ConfigError> {
    // `0` turns the periodic collection off, like leaving it unset.
    let interval = env
        .duration(
            args.gc_interval.as_deref(),
            "--gc-interval",
            &var::DOCKER_WORKER_GC_INTERVAL,
        )?
        .filter(|d| !d.is_zero());
    let older_than = env.required_duration(
        args.gc_older_than.as_deref(),
        "--gc-older-than",
        &var::DOCKER_WORKER_GC_OLDER_THAN,
    )?;
    Ok(GcLoopSettings {
        interval,
        older_than,
    })
}

/// `--prepull`, fast pickup and the worker channel.
fn features(args: &StartArgs, env: &Env) -> Result<FeatureSettings, ConfigError> {
    let fast_pickup = env.boolean(&var::DOCKER_WORKER_FAST_PICKUP)?;
    let prepull = args.prepull || env.boolean(&var::DOCKER_WORKER_PREPULL)?;
    Ok(FeatureSettings {
        prepull,
        fast_pickup,
        worker_channel: env.boolean(&var::DOCKER_WORKER_CHANNEL)?,
    })
}

/// The reconcile pass, orphans, drain and submission retries.
fn convergence(args: &StartArgs, env: &Env) -> Result<ConvergenceSettings, ConfigError> {
    let reconcile_interval = env.required_duration(
        args.reconcile_interval.as_deref(),
        "--reconcile-interval",
        &var::DOCKER_WORKER_RECONCILE_INTERVAL,
    )?;
    if reconcile_interval.is_zero() {
        return Err(ConfigError::Invalid {
            name: "--reconcile-interval".into(),
            value: "0".into(),
            reason: "the reconcile interval must be longer than 0".into(),
        });
    }
    let submit_retries = match args.submit_retries {
        Some(n) => n,
        None => env.count_trimmed(&var::DOCKER_WORKER_SUBMIT_RETRIES)?,
    };
    Ok(ConvergenceSettings {
        reconcile_interval,
        orphan_claim_timeout: env.required_duration(
            args.orphan_claim_timeout.as_deref(),
            "--orphan-claim-timeout",
            &var::DOCKER_WORKER_ORPHAN_CLAIM_TIMEOUT,
        )?,
        reschedule_orphans: args.reschedule_orphans
            || env.boolean(&var::DOCKER_WORKER_RESCHEDULE_ORPHANS)?,
        orphan_grace: env.required_duration(
            args.orphan_grace.as_deref(),
            "--orphan-grace",
            &var::DOCKER_WORKER_ORPHAN_GRACE,
        )?,
        stop_orphans: !args.no_stop_orphans && env.boolean(&var::DOCKER_WORKER_STOP_ORPHANS)?,
        drain_timeout: env
            .duration(
                args.drain_timeout.as_deref(),
                "--drain-timeout",
                &var::DOCKER_WORKER_DRAIN_TIMEOUT,
            )?
            .filter(|d| !d.is_zero()),
        submit_retries,
    })
}

/// `--max-concurrent-submissions`, `--min-free-memory` and `--gpu-devices`.
fn admission(args: &StartArgs, env: &Env) -> Result<AdmissionSettings, ConfigError> {
    let max_concurrent_submissions = match args.max_concurrent_submissions {
        Some(n) => n,
        None => {
            let var = &var::DOCKER_WORKER_MAX_CONCURRENT_SUBMISSIONS;
            usize::try_from(env.count_trimmed(var)?).unwrap_or(usize::MAX)
        }
    };
    if max_concurrent_submissions == 0 {
        return Err(ConfigError::Invalid {
            name: "--max-concurrent-submissions".into(),
            value: "0".into(),
            reason: "at least one submission must be allowed".into(),
        });
    }
    let (memory_name, memory) = match &args.min_free_memory {
        Some(text) => ("--min-free-memory", Some(text.clone())),
        None => (
            var::DOCKER_WORKER_MIN_FREE_MEMORY.name,
            env.non_empty(&var::DOCKER_WORKER_MIN_FREE_MEMORY),
        ),
    };
    let min_free_memory = match memory {
        None => None,
        Some(text) => Some(
            crate::job::memory::parse_bytes(text.trim())
                .ok()
                .and_then(|b| u64::try_from(b).ok())
                .filter(|b| *b > 0)
                .ok_or_else(|| ConfigError::Invalid {
                    name: memory_name.into(),
                    value: text.clone(),
                    reason: "expected a size such as 512m or 2g".into(),
                })?,
        ),
    };
    let devices = args
        .gpu_devices
        .clone()
        .or_else(|| env.non_empty(&var::DOCKER_WORKER_GPU_DEVICES))
        .unwrap_or_default();
    let gpu_devices = devices
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(AdmissionSettings {
        max_concurrent_submissions,
        min_free_memory,
        gpu_devices,
    })
}
