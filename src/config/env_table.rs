//! The one table of the environment variables the worker reads: name, default as shown to
//! users, the flags it is the default of, and what it means.
//!
//! [`super::env::Env`] reads a variable only through its entry here, taking the default from
//! it too, and `docker-worker start --help` prints [`ENV_VARS`] (see [`environment_help`]), so
//! the code, the help and the README (checked by a test) cannot drift apart. Depends on
//! nothing but [`crate::logs::LogLimits`], whose defaults are Prefect's.

use std::borrow::Cow;
use std::fmt::Write as _;

/// An environment variable the worker reads.
#[derive(Debug)]
pub struct EnvVar {
    /// The variable's name, as Prefect and Docker spell it.
    pub name: &'static str,
    /// What applies when it is unset or blank.
    pub default: EnvDefault,
    /// The flags it is the default of (a flag given on the command line wins).
    pub flags: &'static [Flag],
    /// One line on what it does, for `--help`.
    pub meaning: &'static str,
}

/// A flag, of one subcommand, whose default comes from an environment variable.
#[derive(Debug)]
pub struct Flag {
    /// The subcommand (`start`, `gc`).
    pub command: &'static str,
    /// The long flag without its dashes.
    pub long: &'static str,
}

/// What applies when a variable is unset or blank.
#[derive(Debug)]
pub enum EnvDefault {
    /// A value read exactly as a user's would be: the one copy of this default.
    Value(&'static str),
    /// A value owned by another module (Prefect's log limits), rendered when needed, so the
    /// table does not keep a second copy of it.
    Computed(fn() -> String),
    /// No value: the text says what happens instead. Never parsed.
    Absent(&'static str),
}

impl EnvDefault {
    /// The value to parse when the variable is unset; `None` for [`EnvDefault::Absent`].
    pub fn value(&self) -> Option<Cow<'static, str>> {
        match self {
            Self::Value(v) => Some(Cow::Borrowed(v)),
            Self::Computed(f) => Some(Cow::Owned(f())),
            Self::Absent(_) => None,
        }
    }

    /// The default as users see it in `--help` and the README.
    pub fn shown(&self) -> Cow<'static, str> {
        match self {
            Self::Value(v) | Self::Absent(v) => Cow::Borrowed(v),
            Self::Computed(f) => Cow::Owned(f()),
        }
    }
}

/// The image used when a job names none: the Prefect release this worker implements, on the
/// Python the reference worker runs on.
pub const DEFAULT_IMAGE: &str = "prefecthq/prefect:3.9.1-python3.11";

const fn var(
    name: &'static str,
    default: EnvDefault,
    flags: &'static [Flag],
    meaning: &'static str,
) -> EnvVar {
    EnvVar {
        name,
        default,
        flags,
        meaning,
    }
}

const fn start(long: &'static str) -> Flag {
    Flag {
        command: "start",
        long,
    }
}

const fn gc(long: &'static str) -> Flag {
    Flag {
        command: "gc",
        long,
    }
}

use EnvDefault::{Absent, Computed, Value};

fn max_log_size() -> String {
    crate::logs::LogLimits::default().max_log_size.to_string()
}

fn log_batch_size() -> String {
    crate::logs::LogLimits::default().batch_size.to_string()
}

/// Prefect API to talk to.
pub const PREFECT_API_URL: EnvVar = var(
    "PREFECT_API_URL",
    Absent("none, required"),
    &[],
    "Prefect API, e.g. http://127.0.0.1:4200/api",
);
/// Prefect Cloud credentials.
pub const PREFECT_API_KEY: EnvVar = var(
    "PREFECT_API_KEY",
    Absent("none"),
    &[],
    "sent as `Authorization: Bearer …`",
);
/// Self-hosted server credentials.
pub const PREFECT_API_AUTH_STRING: EnvVar = var(
    "PREFECT_API_AUTH_STRING",
    Absent("none"),
    &[],
    "self-hosted basic auth (`user:pass`); wins over the key",
);
/// Per-request timeout of the API client.
pub const PREFECT_API_REQUEST_TIMEOUT: EnvVar = var(
    "PREFECT_API_REQUEST_TIMEOUT",
    Value("60"),
    &[],
    "seconds per API request",
);
/// Retries of the API client.
pub const PREFECT_CLIENT_MAX_RETRIES: EnvVar = var(
    "PREFECT_CLIENT_MAX_RETRIES",
    Value("5"),
    &[],
    "retries on 408/429/502/503 (honouring Retry-After) and timeouts",
);
/// CSRF tokens of the API client.
pub const PREFECT_CLIENT_CSRF_SUPPORT_ENABLED: EnvVar = var(
    "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED",
    Value("true"),
    &[],
    "fetch and send CSRF tokens when the server enables them",
);
/// Poll interval.
pub const PREFECT_WORKER_QUERY_SECONDS: EnvVar = var(
    "PREFECT_WORKER_QUERY_SECONDS",
    Value("10"),
    &[],
    "poll interval in seconds (jittered to 0.75-1.3x)",
);
/// Heartbeat interval.
pub const PREFECT_WORKER_HEARTBEAT_SECONDS: EnvVar = var(
    "PREFECT_WORKER_HEARTBEAT_SECONDS",
    Value("30"),
    &[],
    "pool sync and heartbeat interval (whole seconds)",
);
/// Look-ahead of the poll.
pub const PREFECT_WORKER_PREFETCH_SECONDS: EnvVar = var(
    "PREFECT_WORKER_PREFETCH_SECONDS",
    Value("10"),
    &[start("prefetch-seconds")],
    "claim runs scheduled up to this many seconds ahead",
);
/// Flow-run logs to the API.
pub const PREFECT_LOGGING_TO_API_ENABLED: EnvVar = var(
    "PREFECT_LOGGING_TO_API_ENABLED",
    Value("true"),
    &[],
    "send the worker's flow-run messages to the run's logs in the UI",
);
/// Batching of flow-run logs.
pub const PREFECT_LOGGING_TO_API_BATCH_INTERVAL: EnvVar = var(
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL",
    Value("2"),
    &[],
    "seconds between log batches",
);
/// Largest flow-run log entry.
pub const PREFECT_LOGGING_TO_API_MAX_LOG_SIZE: EnvVar = var(
    "PREFECT_LOGGING_TO_API_MAX_LOG_SIZE",
    Computed(max_log_size),
    &[],
    "largest log entry (JSON bytes); longer messages end in `... [truncated]`",
);
/// Largest flow-run log request.
pub const PREFECT_LOGGING_TO_API_BATCH_SIZE: EnvVar = var(
    "PREFECT_LOGGING_TO_API_BATCH_SIZE",
    Computed(log_batch_size),
    &[],
    "largest `POST /logs/` body; not below the entry size, as Prefect checks",
);
/// The worker's own log level, Prefect's way.
pub const PREFECT_LOGGING_LEVEL: EnvVar = var(
    "PREFECT_LOGGING_LEVEL",
    Value("info"),
    &[],
    "worker log level (DEBUG, INFO, WARNING, ERROR, CRITICAL)",
);
/// The worker's own log filter, tracing's way.
pub const RUST_LOG: EnvVar = var(
    "RUST_LOG",
    Absent("none"),
    &[],
    "worker log filter (`target=level` directives); wins over PREFECT_LOGGING_LEVEL; an invalid one is info, with a warning",
);
/// Colours of the text log (<https://no-color.org>).
pub const NO_COLOR: EnvVar = var(
    "NO_COLOR",
    Absent("unset"),
    &[],
    "set (not empty): no ANSI colours in the text log, even on a terminal (off a terminal there are none)",
);
/// Address of `/health` and `/metrics`.
pub const PREFECT_WORKER_WEBSERVER_HOST: EnvVar = var(
    "PREFECT_WORKER_WEBSERVER_HOST",
    Value("0.0.0.0"),
    &[],
    "address of /health and /metrics",
);
/// Port of `/health` and `/metrics`.
pub const PREFECT_WORKER_WEBSERVER_PORT: EnvVar = var(
    "PREFECT_WORKER_WEBSERVER_PORT",
    Value("8080"),
    &[],
    "port of /health and /metrics",
);
/// Where Prefect's files are.
pub const PREFECT_HOME: EnvVar = var(
    "PREFECT_HOME",
    Absent("~/.prefect"),
    &[],
    "directory of the Prefect profiles file",
);
/// Which Prefect profile to read.
pub const PREFECT_PROFILE: EnvVar = var(
    "PREFECT_PROFILE",
    Absent("the file's `active`"),
    &[],
    "Prefect profile to read settings from (under the environment)",
);
/// Which Prefect profiles file to read.
pub const PREFECT_PROFILES_PATH: EnvVar = var(
    "PREFECT_PROFILES_PATH",
    Absent("$PREFECT_HOME/profiles.toml"),
    &[],
    "Prefect profiles file",
);
/// The user's home, under which Prefect's and Docker's files are by default.
pub const HOME: EnvVar = var(
    "HOME",
    Absent("none"),
    &[],
    "where ~/.prefect and ~/.docker are",
);
/// The Docker Engine to use.
pub const DOCKER_HOST: EnvVar = var(
    "DOCKER_HOST",
    Absent("unix:///var/run/docker.sock"),
    &[],
    "Docker Engine: unix://…, tcp://host:port, or Podman's socket",
);
/// TLS to a `tcp://` Docker host.
pub const DOCKER_TLS_VERIFY: EnvVar = var(
    "DOCKER_TLS_VERIFY",
    Absent("off"),
    &[],
    "TLS with client certificates to a tcp:// DOCKER_HOST",
);
/// The certificates of that TLS.
pub const DOCKER_CERT_PATH: EnvVar = var(
    "DOCKER_CERT_PATH",
    Absent("~/.docker"),
    &[],
    "directory of ca.pem, cert.pem and key.pem for DOCKER_TLS_VERIFY",
);
/// The Docker client configuration (registry logins, proxies).
pub const DOCKER_CONFIG: EnvVar = var(
    "DOCKER_CONFIG",
    Absent("~/.docker"),
    &[],
    "directory of config.json with registry logins and proxies",
);
/// Per-call timeout of the Docker client.
pub const DOCKER_CLIENT_TIMEOUT: EnvVar = var(
    "DOCKER_CLIENT_TIMEOUT",
    Value("60"),
    &[],
    "seconds per Docker call (log streams and waits are not cut)",
);
/// Image of jobs that name none.
pub const DOCKER_WORKER_DEFAULT_IMAGE: EnvVar = var(
    "DOCKER_WORKER_DEFAULT_IMAGE",
    Value(DEFAULT_IMAGE),
    &[start("default-image"), gc("default-image")],
    "image for jobs that name none",
);
/// Prometheus metrics.
pub const DOCKER_WORKER_METRICS_ENABLED: EnvVar = var(
    "DOCKER_WORKER_METRICS_ENABLED",
    Value("false"),
    &[start("with-metrics")],
    "serve Prometheus GET /metrics",
);
/// Format of the worker's own log.
pub const DOCKER_WORKER_LOG_FORMAT: EnvVar = var(
    "DOCKER_WORKER_LOG_FORMAT",
    Value("text"),
    &[start("log-format")],
    "worker log format on stderr: text or json",
);
/// Stopping cancelled runs' containers.
pub const DOCKER_WORKER_STOP_CANCELLED: EnvVar = var(
    "DOCKER_WORKER_STOP_CANCELLED",
    Value("true"),
    &[start("no-stop-cancelled")],
    "stop the containers of runs cancelled while running",
);
/// Grace of that stop.
pub const DOCKER_WORKER_CANCEL_GRACE_SECONDS: EnvVar = var(
    "DOCKER_WORKER_CANCEL_GRACE_SECONDS",
    Value("30"),
    &[start("cancel-grace")],
    "seconds from SIGTERM to SIGKILL when stopping a cancelled run",
);
/// Cancellations pushed by the server.
pub const DOCKER_WORKER_CANCELLATION_EVENTS: EnvVar = var(
    "DOCKER_WORKER_CANCELLATION_EVENTS",
    Value("true"),
    &[],
    "learn cancellations at once from the /events/out websocket",
);
/// Cancellations polled for.
pub const DOCKER_WORKER_CANCELLATION_POLL_SECONDS: EnvVar = var(
    "DOCKER_WORKER_CANCELLATION_POLL_SECONDS",
    Value("10"),
    &[],
    "how often running runs are also checked for cancellation",
);
/// Polling at once when a run becomes due.
pub const DOCKER_WORKER_FAST_PICKUP: EnvVar = var(
    "DOCKER_WORKER_FAST_PICKUP",
    Value("true"),
    &[],
    "poll at once when /events/out says one of the pool's runs became due",
);
/// Crashed containers' output in the UI.
pub const DOCKER_WORKER_CRASH_LOG_LINES: EnvVar = var(
    "DOCKER_WORKER_CRASH_LOG_LINES",
    Value("200"),
    &[],
    "last output lines of a crashed container sent to the run's logs (0 = none)",
);
/// All of containers' output in the UI.
pub const DOCKER_WORKER_LOGS_TO_API: EnvVar = var(
    "DOCKER_WORKER_LOGS_TO_API",
    Value("false"),
    &[start("logs-to-api")],
    "forward all of every run's container output to the run's logs",
);
/// Memory and CPU of containers.
pub const DOCKER_WORKER_RESOURCE_ACCOUNTING: EnvVar = var(
    "DOCKER_WORKER_RESOURCE_ACCOUNTING",
    Value("true"),
    &[],
    "sample each container's memory and CPU and report them at exit",
);
/// Pulling deployments' images ahead of their runs.
pub const DOCKER_WORKER_PREPULL: EnvVar = var(
    "DOCKER_WORKER_PREPULL",
    Value("false"),
    &[start("prepull")],
    "pull the pool's deployments' images at start and when a deployment changes",
);
/// Prefect events.
pub const DOCKER_WORKER_EMIT_EVENTS: EnvVar = var(
    "DOCKER_WORKER_EMIT_EVENTS",
    Value("true"),
    &[],
    "send the worker's and containers' Prefect events over /events/in",
);
/// The worker channel websocket.
pub const DOCKER_WORKER_CHANNEL: EnvVar = var(
    "DOCKER_WORKER_CHANNEL",
    Value("true"),
    &[],
    "sync over Prefect's worker channel websocket when the server has one",
);
/// Periodic garbage collection.
pub const DOCKER_WORKER_GC_INTERVAL: EnvVar = var(
    "DOCKER_WORKER_GC_INTERVAL",
    Absent("off"),
    &[start("gc-interval")],
    "collect this pool's finished containers this often (30m, 1h; 0 = off)",
);
/// Age of the containers garbage collection removes.
pub const DOCKER_WORKER_GC_OLDER_THAN: EnvVar = var(
    "DOCKER_WORKER_GC_OLDER_THAN",
    Value("24h"),
    &[start("gc-older-than"), gc("older-than")],
    "garbage collection keeps containers that finished less than this long ago",
);
/// The host policy file.
pub const DOCKER_WORKER_POLICY: EnvVar = var(
    "DOCKER_WORKER_POLICY",
    Absent("none"),
    &[start("policy")],
    "TOML host policy: what jobs may not ask for, what every container gets",
);
/// The operator's job configuration values.
pub const DOCKER_WORKER_JOB_OVERRIDE: EnvVar = var(
    "DOCKER_WORKER_JOB_OVERRIDE",
    Absent("none"),
    &[start("job-override"), gc("job-override")],
    "JSON or TOML job configuration values merged into every job, winning over template, deployment and flow run",
);
/// Image garbage collection.
pub const DOCKER_WORKER_GC_IMAGES: EnvVar = var(
    "DOCKER_WORKER_GC_IMAGES",
    Value("false"),
    &[start("gc-images"), gc("images")],
    "also remove images no container and no deployment uses (start: every --gc-interval)",
);
/// The images image garbage collection looks at.
pub const DOCKER_WORKER_GC_IMAGE_LABEL: EnvVar = var(
    "DOCKER_WORKER_GC_IMAGE_LABEL",
    Absent("none: every image"),
    &[start("gc-image-label"), gc("image-label")],
    "image garbage collection looks only at images with this label (KEY or KEY=VALUE)",
);
/// The free-space guard before pulls.
pub const DOCKER_WORKER_MIN_FREE_DISK: EnvVar = var(
    "DOCKER_WORKER_MIN_FREE_DISK",
    Absent("off"),
    &[start("min-free-disk")],
    "collect images before a pull when the Engine's data root has less free space (10g, 500m; 0 = off)",
);

/// The reconcile pass.
pub const DOCKER_WORKER_RECONCILE_INTERVAL: EnvVar = var(
    "DOCKER_WORKER_RECONCILE_INTERVAL",
    Value("30s"),
    &[start("reconcile-interval")],
    "compare the pool's runs with this host's containers and fix disagreements this often",
);
/// Claims of workers that went away.
pub const DOCKER_WORKER_ORPHAN_CLAIM_TIMEOUT: EnvVar = var(
    "DOCKER_WORKER_ORPHAN_CLAIM_TIMEOUT",
    Value("10m"),
    &[start("orphan-claim-timeout")],
    "a run claimed by another worker offline this long is ended (Crashed)",
);
/// Rescheduling instead of crashing them.
pub const DOCKER_WORKER_RESCHEDULE_ORPHANS: EnvVar = var(
    "DOCKER_WORKER_RESCHEDULE_ORPHANS",
    Value("false"),
    &[start("reschedule-orphans")],
    "reschedule such runs instead (their container may exist on a host this worker cannot see)",
);
/// Containers that outlive their run.
pub const DOCKER_WORKER_ORPHAN_GRACE: EnvVar = var(
    "DOCKER_WORKER_ORPHAN_GRACE",
    Value("60s"),
    &[start("orphan-grace")],
    "a container still running this long after its run went final is stopped",
);
/// Stopping them at all.
pub const DOCKER_WORKER_STOP_ORPHANS: EnvVar = var(
    "DOCKER_WORKER_STOP_ORPHANS",
    Value("true"),
    &[start("no-stop-orphans")],
    "stop containers whose run is final (after the orphan grace)",
);
/// Draining on the first SIGTERM.
pub const DOCKER_WORKER_DRAIN_TIMEOUT: EnvVar = var(
    "DOCKER_WORKER_DRAIN_TIMEOUT",
    Absent("off"),
    &[start("drain-timeout")],
    "on SIGTERM stop claiming, keep watching and reporting until no run is in flight or this long passed",
);
/// Retrying transient infrastructure failures.
pub const DOCKER_WORKER_SUBMIT_RETRIES: EnvVar = var(
    "DOCKER_WORKER_SUBMIT_RETRIES",
    Value("3"),
    &[start("submit-retries")],
    "retries of a pull, create or start that failed for a transient reason (5xx, timeout, rate limit)",
);

/// Submissions in flight at once.
pub const DOCKER_WORKER_MAX_CONCURRENT_SUBMISSIONS: EnvVar = var(
    "DOCKER_WORKER_MAX_CONCURRENT_SUBMISSIONS",
    Value("8"),
    &[start("max-concurrent-submissions")],
    "pulls, creates and starts in flight at once, so a burst of due runs does not swamp the host",
);
/// Memory the host must have left to claim a run.
pub const DOCKER_WORKER_MIN_FREE_MEMORY: EnvVar = var(
    "DOCKER_WORKER_MIN_FREE_MEMORY",
    Absent("off"),
    &[start("min-free-memory")],
    "claim no run while the host's available memory is below this (512m, 2g)",
);
/// GPUs handed out one run at a time.
pub const DOCKER_WORKER_GPU_DEVICES: EnvVar = var(
    "DOCKER_WORKER_GPU_DEVICES",
    Absent("none"),
    &[start("gpu-devices")],
    "GPU device ids (0,1,2,3) this worker hands out, each to one run at a time",
);
/// Per-pool limits when one process serves several pools.
pub const DOCKER_WORKER_POOL_LIMITS: EnvVar = var(
    "DOCKER_WORKER_POOL_LIMITS",
    Absent("--limit for every pool"),
    &[start("pool-limit")],
    "each pool's own limit as POOL=N,POOL=N; a pool without one gets --limit",
);

/// Every variable the worker reads, in the order `--help` shows them. Besides, every
/// `PREFECT_*` variable set, these and any other, is passed into each flow-run container.
pub const ENV_VARS: &[&EnvVar] = &[
    &PREFECT_API_URL,
    &PREFECT_API_KEY,
    &PREFECT_API_AUTH_STRING,
    &PREFECT_API_REQUEST_TIMEOUT,
    &PREFECT_CLIENT_MAX_RETRIES,
    &PREFECT_CLIENT_CSRF_SUPPORT_ENABLED,
    &PREFECT_WORKER_QUERY_SECONDS,
    &PREFECT_WORKER_HEARTBEAT_SECONDS,
    &PREFECT_WORKER_PREFETCH_SECONDS,
    &PREFECT_LOGGING_TO_API_ENABLED,
    &PREFECT_LOGGING_TO_API_BATCH_INTERVAL,
    &PREFECT_LOGGING_TO_API_MAX_LOG_SIZE,
    &PREFECT_LOGGING_TO_API_BATCH_SIZE,
    &PREFECT_LOGGING_LEVEL,
    &RUST_LOG,
    &NO_COLOR,
    &PREFECT_WORKER_WEBSERVER_HOST,
    &PREFECT_WORKER_WEBSERVER_PORT,
    &PREFECT_HOME,
    &PREFECT_PROFILE,
    &PREFECT_PROFILES_PATH,
    &HOME,
    &DOCKER_HOST,
    &DOCKER_TLS_VERIFY,
    &DOCKER_CERT_PATH,
    &DOCKER_CONFIG,
    &DOCKER_CLIENT_TIMEOUT,
    &DOCKER_WORKER_DEFAULT_IMAGE,
    &DOCKER_WORKER_METRICS_ENABLED,
    &DOCKER_WORKER_LOG_FORMAT,
    &DOCKER_WORKER_STOP_CANCELLED,
    &DOCKER_WORKER_CANCEL_GRACE_SECONDS,
    &DOCKER_WORKER_CANCELLATION_EVENTS,
    &DOCKER_WORKER_CANCELLATION_POLL_SECONDS,
    &DOCKER_WORKER_FAST_PICKUP,
    &DOCKER_WORKER_CRASH_LOG_LINES,
    &DOCKER_WORKER_LOGS_TO_API,
    &DOCKER_WORKER_RESOURCE_ACCOUNTING,
    &DOCKER_WORKER_PREPULL,
    &DOCKER_WORKER_EMIT_EVENTS,
    &DOCKER_WORKER_CHANNEL,
    &DOCKER_WORKER_GC_INTERVAL,
    &DOCKER_WORKER_GC_OLDER_THAN,
    &DOCKER_WORKER_RECONCILE_INTERVAL,
    &DOCKER_WORKER_ORPHAN_CLAIM_TIMEOUT,
    &DOCKER_WORKER_RESCHEDULE_ORPHANS,
    &DOCKER_WORKER_ORPHAN_GRACE,
    &DOCKER_WORKER_STOP_ORPHANS,
    &DOCKER_WORKER_DRAIN_TIMEOUT,
    &DOCKER_WORKER_SUBMIT_RETRIES,
    &DOCKER_WORKER_MAX_CONCURRENT_SUBMISSIONS,
    &DOCKER_WORKER_MIN_FREE_MEMORY,
    &DOCKER_WORKER_GPU_DEVICES,
    &DOCKER_WORKER_POOL_LIMITS,
    &DOCKER_WORKER_POLICY,
    &DOCKER_WORKER_JOB_OVERRIDE,
    &DOCKER_WORKER_GC_IMAGES,
    &DOCKER_WORKER_GC_IMAGE_LABEL,
    &DOCKER_WORKER_MIN_FREE_DISK,
];

/// The "Environment:" section of `docker-worker start --help`, one entry per [`ENV_VARS`]
/// row: name, default and flags on one line, the meaning indented below (clap's own layout).
#[must_use]
pub fn environment_help() -> String {
    let mut out = String::from(
        "Environment (a flag wins over its variable, a variable over the Prefect profile):\n",
    );
    for var in ENV_VARS {
        let _ = write!(out, "  {}  [default: {}]", var.name, var.default.shown());
        for flag in var.flags {
            let _ = write!(out, " [flag: {}]", flag_text(flag));
        }
        let _ = writeln!(out, "\n          {}", var.meaning);
    }
    out.push_str(
        "\nEvery PREFECT_* variable set, these and any other, is also passed into each flow-run container.",
    );
    out
}

/// `--flag` for `start`, `gc --flag` for the others, so the shared table says which command a
/// flag belongs to.
fn flag_text(flag: &Flag) -> String {
    if flag.command == "start" {
        format!("--{}", flag.long)
    } else {
        format!("{} --{}", flag.command, flag.long)
    }
}

/// The suffix of a flag's help naming the variable its default comes from, e.g.
/// `[env: DOCKER_WORKER_PREPULL; default: false]`; `None` for flags without one.
#[must_use]
pub fn flag_env_help(command: &str, long: &str) -> Option<String> {
    ENV_VARS
        .iter()
        .find(|v| {
            v.flags
                .iter()
                .any(|f| f.command == command && f.long == long)
        })
        .map(|v| format!("[env: {}; default: {}]", v.name, v.default.shown()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_meanings_one_line() {
        let mut names: Vec<&str> = ENV_VARS.iter().map(|v| v.name).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "a variable is listed twice");
        for var in ENV_VARS {
            assert!(
                !var.meaning.is_empty() && !var.meaning.contains('\n'),
                "{}",
                var.name
            );
        }
    }

    #[test]
    fn computed_defaults_are_prefects_log_limits() {
        assert_eq!(
            PREFECT_LOGGING_TO_API_MAX_LOG_SIZE.default.shown(),
            "1000000"
        );
        assert_eq!(PREFECT_LOGGING_TO_API_BATCH_SIZE.default.shown(), "4000000");
        assert_eq!(PREFECT_API_URL.default.value(), None);
    }

    #[test]
    fn help_lists_every_variable_with_its_default_and_flags() {
        let help = environment_help();
        for var in ENV_VARS {
            let line = help
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{}  ", var.name)))
                .unwrap_or_else(|| panic!("{} missing from:\n{help}", var.name));
            assert!(line.contains(&*var.default.shown()), "{line}");
            for flag in var.flags {
                assert!(line.contains(&flag_text(flag)), "{line}");
            }
        }
        assert_eq!(
            flag_env_help("gc", "older-than").as_deref(),
            Some("[env: DOCKER_WORKER_GC_OLDER_THAN; default: 24h]")
        );
        assert_eq!(flag_env_help("start", "pool"), None);
    }

    /// The variables named in the first column of the README's "Configuration (environment)"
    /// table; `` `A_HOST` / `_PORT` `` names `A_HOST` and `A_PORT`.
    fn readme_variables(readme: &str) -> Vec<String> {
        let mut names = Vec::new();
        let rows = readme
            .lines()
            .skip_while(|l| l.trim() != "### Configuration (environment)")
            .skip(1)
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2);
        for row in rows {
            let first_cell = row.split('|').nth(1).unwrap_or_default();
            let mut previous = String::new();
            for name in first_cell.split('`').skip(1).step_by(2) {
                let name = match name.strip_prefix('_') {
                    Some(suffix) => match previous.rsplit_once('_') {
                        Some((stem, _)) => format!("{stem}_{suffix}"),
                        None => name.to_owned(),
                    },
                    None => name.to_owned(),
                };
                previous.clone_from(&name);
                names.push(name);
            }
        }
        names
    }

    #[test]
    fn the_readme_table_lists_every_variable() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let listed = readme_variables(&readme);
        assert!(
            listed.iter().any(|n| n == "PREFECT_WORKER_WEBSERVER_PORT"),
            "the README's table was not found or not parsed: {listed:?}"
        );
        let missing: Vec<&str> = ENV_VARS
            .iter()
            .map(|v| v.name)
            .filter(|name| !listed.iter().any(|n| n == name))
            .collect();
        assert!(
            missing.is_empty(),
            "missing from README.md's \"Configuration (environment)\" table: {missing:?}"
        );
    }
}
