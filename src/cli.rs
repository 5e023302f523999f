//! Command-line interface (clap derive). Raw values only; `config` validates them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// A native Prefect worker that runs flow runs as Docker containers.
///
/// Drop-in replacement for `prefect worker start --type docker`. Reads the same settings from
/// the environment (PREFECT_API_URL, PREFECT_API_KEY, PREFECT_WORKER_QUERY_SECONDS, DOCKER_HOST, …).
#[derive(Debug, Parser)]
#[command(name = "docker-worker", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the worker: poll a work pool and run its flow runs in Docker containers.
    Start(StartArgs),
    /// Remove the exited containers of flow runs that are over in Prefect (garbage collection).
    Gc(GcArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Arguments of `docker-worker start`.
#[derive(Debug, Default, Args)]
pub struct StartArgs {
    /// The work pool to poll for flow runs.
    #[arg(short = 'p', long)]
    pub pool: String,

    /// The worker's name (its identity in heartbeats). Default: `DockerWorker <uuid>`.
    #[arg(short = 'n', long)]
    pub name: Option<String>,

    /// A work queue to poll (repeatable). Default: every queue of the pool.
    #[arg(short = 'q', long = "work-queue")]
    pub work_queue: Vec<String>,

    /// Maximum number of flow runs to run at once.
    #[arg(short = 'l', long)]
    pub limit: Option<usize>,

    /// Claim runs scheduled up to this many seconds ahead [env: PREFECT_WORKER_PREFETCH_SECONDS; default: 10].
    #[arg(long)]
    pub prefetch_seconds: Option<f64>,

    /// Poll once, wait for the runs it started to finish, then exit.
    #[arg(long)]
    pub run_once: bool,

    /// JSON base job template used only when this worker creates the pool.
    #[arg(long, value_name = "PATH")]
    pub base_job_template: Option<PathBuf>,

    /// Create the work pool if it does not exist (the default).
    #[arg(long, overrides_with = "no_create_pool_if_not_found")]
    pub create_pool_if_not_found: bool,

    /// Do not create the work pool if it does not exist.
    #[arg(long, overrides_with = "create_pool_if_not_found")]
    pub no_create_pool_if_not_found: bool,

    /// Image for jobs that name none [env: DOCKER_WORKER_DEFAULT_IMAGE; default: prefecthq/prefect:3.9.1-python3.11].
    #[arg(long, value_name = "IMAGE")]
    pub default_image: Option<String>,

    /// Serve GET /health on PREFECT_WORKER_WEBSERVER_HOST:PREFECT_WORKER_WEBSERVER_PORT (0.0.0.0:8080).
    #[arg(long)]
    pub with_healthcheck: bool,

    /// Serve Prometheus GET /metrics on the same address [env: DOCKER_WORKER_METRICS_ENABLED].
    #[arg(long)]
    pub with_metrics: bool,

    /// When a running flow run is cancelled, stop its container: SIGTERM, then SIGKILL after
    /// this many seconds [env: DOCKER_WORKER_CANCEL_GRACE_SECONDS; default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub cancel_grace: Option<f64>,

    /// Leave cancelled runs' containers to the Prefect engine inside them (do not stop them)
    /// [env: DOCKER_WORKER_STOP_CANCELLED=false].
    #[arg(long)]
    pub no_stop_cancelled: bool,

    /// Pull the images of the pool's deployments at start and whenever a deployment is created
    /// or changed, so the first run does not wait for its pull [env: DOCKER_WORKER_PREPULL].
    #[arg(long)]
    pub prepull: bool,

    /// Worker log format on stderr: `text` or `json` [env: DOCKER_WORKER_LOG_FORMAT; default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,

    /// Collect this pool's finished containers every DURATION (`1h`, `30m`); `0` or unset
    /// turns it off [env: DOCKER_WORKER_GC_INTERVAL].
    #[arg(long, value_name = "DURATION")]
    pub gc_interval: Option<String>,

    /// With --gc-interval: keep containers that finished less than DURATION ago
    /// [env: DOCKER_WORKER_GC_OLDER_THAN; default: 24h].
    #[arg(long, value_name = "DURATION")]
    pub gc_older_than: Option<String>,
}

/// Arguments of `docker-worker gc`.
///
/// Removes containers labelled `io.prefect.flow-run-id` that have exited, finished long enough
/// ago, and whose flow run is Completed, Failed, Crashed or Cancelled. Never touches running
/// containers or containers without that label.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Only this work pool's containers. Default: every pool's.
    #[arg(short = 'p', long)]
    pub pool: Option<String>,

    /// Keep containers that finished less than DURATION ago (`30m`, `24h`, `7d`, `0s`)
    /// [env: DOCKER_WORKER_GC_OLDER_THAN; default: 24h].
    #[arg(long, value_name = "DURATION")]
    pub older_than: Option<String>,

    /// Say what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn create_pool_flags_override_each_other() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["docker-worker", "start", "-p", "x"];
            argv.extend_from_slice(extra);
            match Cli::parse_from(argv).command {
                Command::Start(a) => a.no_create_pool_if_not_found,
                _ => unreachable!("parsed `start`"),
            }
        };
        assert!(!parse(&[]));
        assert!(parse(&["--no-create-pool-if-not-found"]));
        assert!(!parse(&[
            "--no-create-pool-if-not-found",
            "--create-pool-if-not-found"
        ]));
    }
}
