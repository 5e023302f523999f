//! Command-line interface (clap derive). Raw values only; `config` validates them.
//!
//! The help of the environment variables is not written here: [`command`] adds it from
//! [`crate::config::env_table`], the table the settings are read with, so the help cannot show
//! a default the code does not use.

use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::env_table::{environment_help, flag_env_help};

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
// Parsed once per process: the size of the `start` variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the worker: poll a work pool and run its flow runs in Docker containers.
    Start(Box<StartArgs>),
    /// Remove the exited containers of flow runs that are over in Prefect, and with --images
    /// unused images (garbage collection).
    Gc(GcArgs),
    /// Check a host policy file, and what it would do to a job.
    Policy {
        /// What to do with the policy.
        #[command(subcommand)]
        action: PolicyCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Arguments of `docker-worker start`.
#[derive(Debug, Default, Args)]
pub struct StartArgs {
    /// A work pool to poll for flow runs (repeatable: one process serves several pools, each
    /// with its own template, sync, limit, adoption, reconcile and garbage collection).
    #[arg(short = 'p', long, required = true)]
    pub pool: Vec<String>,

    /// A pool's own `--limit`, as POOL=N (repeatable); pools without one get `--limit`.
    #[arg(long, value_name = "POOL=N")]
    pub pool_limit: Vec<String>,

    /// The worker's name (its identity in heartbeats). Default: `DockerWorker <uuid>`.
    #[arg(short = 'n', long)]
    pub name: Option<String>,

    /// A work queue to poll (repeatable). Default: every queue of the pool.
    #[arg(short = 'q', long = "work-queue")]
    pub work_queue: Vec<String>,

    /// Maximum number of flow runs to run at once.
    #[arg(short = 'l', long)]
    pub limit: Option<usize>,

    /// Claim runs scheduled up to this many seconds ahead.
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

    /// Image for jobs that name none.
    #[arg(long, value_name = "IMAGE")]
    pub default_image: Option<String>,

    /// Serve GET /health on PREFECT_WORKER_WEBSERVER_HOST:PREFECT_WORKER_WEBSERVER_PORT.
    #[arg(long)]
    pub with_healthcheck: bool,

    /// Serve Prometheus GET /metrics on the same address.
    #[arg(long)]
    pub with_metrics: bool,

    /// When a running flow run is cancelled, stop its container: SIGTERM, then SIGKILL after
    /// this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub cancel_grace: Option<f64>,

    /// Leave cancelled runs' containers to the Prefect engine inside them (do not stop them).
    #[arg(long)]
    pub no_stop_cancelled: bool,

    /// Pull the images of the pool's deployments at start and whenever a deployment is created
    /// or changed, so the first run does not wait for its pull.
    #[arg(long)]
    pub prepull: bool,

    /// Forward all of every run's container output (stdout and stderr) to the run's logs in
    /// the Prefect UI, as the job variable `stream_output_to_api` does for one deployment.
    #[arg(long)]
    pub logs_to_api: bool,

    /// Worker log format on stderr: `text` or `json`.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,

    /// Collect this pool's finished containers every DURATION (`1h`, `30m`); `0` or unset
    /// turns it off.
    #[arg(long, value_name = "DURATION")]
    pub gc_interval: Option<String>,

    /// With --gc-interval: keep containers that finished less than DURATION ago.
    #[arg(long, value_name = "DURATION")]
    pub gc_older_than: Option<String>,

    /// Compare the pool's runs with this host's containers and fix every disagreement this
    /// often (`30s`): runs whose container vanished, claims never started, containers of
    /// final runs.
    #[arg(long, value_name = "DURATION")]
    pub reconcile_interval: Option<String>,

    /// A run claimed by another worker that has been offline this long (`10m`), with no
    /// container recorded, is marked Crashed.
    #[arg(long, value_name = "DURATION")]
    pub orphan_claim_timeout: Option<String>,

    /// Reschedule such runs instead of crashing them (only safe if no host this worker cannot
    /// see may hold their container).
    #[arg(long)]
    pub reschedule_orphans: bool,

    /// A container still running this long (`60s`) after its run went final is stopped.
    #[arg(long, value_name = "DURATION")]
    pub orphan_grace: Option<String>,

    /// Never stop containers whose run is final.
    #[arg(long)]
    pub no_stop_orphans: bool,

    /// On the first SIGTERM, stop claiming but keep watching and reporting until no run is in
    /// flight or DURATION (`2m`) passed, then exit 0 (containers left for the next worker).
    #[arg(long, value_name = "DURATION")]
    pub drain_timeout: Option<String>,

    /// How often a pull, create or start that failed for a transient reason (a 5xx, a timeout,
    /// a registry rate limit) is retried before the run is Crashed.
    #[arg(long, value_name = "N")]
    pub submit_retries: Option<u32>,

    /// Pulls, creates and starts in flight at once (runs beyond wait their turn, claimed).
    #[arg(long, value_name = "N")]
    pub max_concurrent_submissions: Option<usize>,

    /// Claim no run while the host's available memory is below SIZE (`512m`, `2g`); runs stay
    /// Scheduled for other workers.
    #[arg(long, value_name = "SIZE")]
    pub min_free_memory: Option<String>,

    /// GPU device ids (`0,1,2,3`) to hand out: a run asking for `gpus: N` gets N free ones
    /// (and waits, claimed, while none are free).
    #[arg(long, value_name = "IDS")]
    pub gpu_devices: Option<String>,
    /// Host policy (TOML): what jobs may not ask of this host and what every container gets.
    /// Checked at start; `docker-worker policy check FILE` tries one out.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,

    /// Job configuration values of this host (JSON or TOML), merged into every run's rendered
    /// job configuration: they win over the template, the deployment and the flow run.
    #[arg(long, value_name = "FILE")]
    pub job_override: Option<PathBuf>,

    /// With --gc-interval: also remove images no container uses and no deployment of any
    /// pool uses, created or tagged at least --gc-older-than ago.
    #[arg(long)]
    pub gc_images: bool,

    /// Image collections look only at images carrying this label (KEY or KEY=VALUE).
    #[arg(long, value_name = "LABEL")]
    pub gc_image_label: Option<String>,

    /// Before a pull, collect images when the Docker Engine's data root has less free space
    /// than SIZE (`10g`, `500m`); if still short, pull anyway with a warning.
    #[arg(long, value_name = "SIZE")]
    pub min_free_disk: Option<String>,
}

/// `docker-worker policy …`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file and say what it does; with --job, show what it would do to a
    /// job (refused with the violation, exit 1; or allowed, with the container create body).
    Check {
        /// The policy file (TOML).
        file: PathBuf,
        /// A job's variables as a deployment would give them: inline JSON (`{"privileged":
        /// true}`) or the path of a JSON file.
        #[arg(long, value_name = "JSON")]
        job: Option<String>,
    },
}

/// Arguments of `docker-worker gc`.
///
/// Removes containers labelled `io.prefect.flow-run-id` that have exited, finished long enough
/// ago, and whose flow run is Completed, Failed, Crashed or Cancelled. Never touches running
/// containers or containers without that label. With `--images`, then removes images no
/// container and no deployment uses.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Only this work pool's containers; with --images, only its deployments keep their
    /// images. Default: every pool's.
    #[arg(short = 'p', long)]
    pub pool: Option<String>,

    /// Keep containers that finished (and images created or tagged) less than DURATION ago
    /// (`30m`, `24h`, `7d`, `0s`).
    #[arg(long, value_name = "DURATION")]
    pub older_than: Option<String>,

    /// Say what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Then remove images no container uses (in any state) and no deployment uses (of
    /// --pool, else of every pool), created or tagged at least --older-than ago.
    #[arg(long)]
    pub images: bool,

    /// With --images: look only at images carrying this label (KEY or KEY=VALUE).
    #[arg(long, value_name = "LABEL")]
    pub image_label: Option<String>,

    /// With --images: the image of jobs that name none, as `start --default-image`.
    #[arg(long, value_name = "IMAGE")]
    pub default_image: Option<String>,

    /// With --images: the job override file `start` uses (it may set every job's image).
    #[arg(long, value_name = "FILE")]
    pub job_override: Option<PathBuf>,
}

/// The command line with the environment's help added from the table: each flag backed by a
/// variable ends in `[env: NAME; default: VALUE]`, and `start --help` ends with every variable.
/// Done at run time because clap's derive attributes take literals, not the table.
#[must_use]
pub fn command() -> clap::Command {
    Cli::command()
        .mut_subcommand("start", |start| {
            with_flag_env_help(start, "start")
                .after_help("Environment variables: see --help.")
                .after_long_help(environment_help())
        })
        .mut_subcommand("gc", |gc| with_flag_env_help(gc, "gc"))
}

/// Appends the `[env: …; default: …]` of the table to the help of `subcommand`'s flags.
fn with_flag_env_help(cmd: clap::Command, subcommand: &str) -> clap::Command {
    cmd.mut_args(|arg| {
        let suffix = arg
            .get_long()
            .and_then(|long| flag_env_help(subcommand, long));
        match suffix {
            Some(suffix) => {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                arg.help(format!("{help} {suffix}"))
            }
            None => arg,
        }
    })
}

/// Parses the process's arguments against [`command`], exiting as clap does (help, version,
/// usage errors with code 2).
#[must_use]
pub fn parse() -> Cli {
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn every_flag_of_the_table_exists_and_gets_its_variable_in_its_help() {
        let mut cmd = command();
        for var in crate::config::ENV_VARS {
            for flag in var.flags {
                let sub = cmd
                    .find_subcommand_mut(flag.command)
                    .unwrap_or_else(|| panic!("no subcommand {}", flag.command));
                let arg = sub
                    .get_arguments()
                    .find(|a| a.get_long() == Some(flag.long))
                    .unwrap_or_else(|| panic!("{} has no --{}", flag.command, flag.long));
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                assert!(
                    help.ends_with(&format!(
                        "[env: {}; default: {}]",
                        var.name,
                        var.default.shown()
                    )),
                    "{help}"
                );
            }
        }
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
