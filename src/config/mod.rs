//! Validated, typed settings built from the command line and an injectable environment.
//!
//! Names and defaults are Prefect's (`PREFECT_API_URL`, `PREFECT_WORKER_QUERY_SECONDS`, …) so
//! an existing worker's environment works unchanged; every variable read, with its default, is
//! an entry of [`env_table::ENV_VARS`], which `--help` prints too. Anything invalid is a
//! [`ConfigError`] that `main` turns into exit code 64. Depends on [`crate::cli`] for the raw
//! arguments and on the settings types of the modules it configures.

mod env;
pub mod env_table;
mod profile;
mod worker;

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use crate::cli::{GcArgs, StartArgs};
use crate::gc::GcOptions;
use crate::health::EndpointSettings;
use crate::image_gc::{ImageGcOptions, PoolScope};
use crate::prefect::ClientConfig;
use env::Env;
use env_table as var;

pub use env_table::{DEFAULT_IMAGE, ENV_VARS, EnvDefault, EnvVar};
pub use profile::with_profile;
pub use worker::{
    AdmissionSettings, CancellationSettings, ConvergenceSettings, FeatureSettings, GcLoopSettings,
    PollingSettings, ReportingSettings, RunDefaults, WorkerSettings,
};

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `PREFECT_API_URL` is not set.
    #[error(
        "`PREFECT_API_URL` must be set to start a Worker (for example `export PREFECT_API_URL=http://127.0.0.1:4200/api`)"
    )]
    MissingApiUrl,
    /// A setting has a value of the wrong form.
    #[error("invalid value for {name}: {value:?} ({reason})")]
    Invalid {
        /// Setting or flag.
        name: String,
        /// The value given.
        value: String,
        /// What is expected.
        reason: String,
    },
    /// The Prefect profiles file cannot be used.
    #[error("cannot use Prefect profiles file {path}: {reason}")]
    Profiles {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The host policy file cannot be used.
    #[error("cannot use policy file {0}")]
    Policy(#[from] crate::guard::PolicyFileError),
    /// The `--job-override` file cannot be used.
    #[error("cannot use job override file {path}: {reason}")]
    JobOverride {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The `--base-job-template` file cannot be used.
    #[error("cannot use base job template {path}: {reason}")]
    BaseJobTemplate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Settings of the Docker connection.
#[derive(Clone)]
pub struct DockerSettings {
    /// `DOCKER_HOST`; `None` = the default socket.
    pub host: Option<String>,
    /// Per-call timeout (`DOCKER_CLIENT_TIMEOUT`); streams are not cut.
    pub timeout: Duration,
    /// `DOCKER_CERT_PATH` (default `~/.docker`) when `DOCKER_TLS_VERIFY` is set: TLS with
    /// client certificates `ca.pem`, `cert.pem`, `key.pem`.
    pub tls_cert_dir: Option<PathBuf>,
    /// `DOCKER_CONFIG` (default `~/.docker`): `config.json` with registry credentials.
    pub config_dir: Option<PathBuf>,
}

impl std::fmt::Debug for DockerSettings {
    /// The host without any credentials a URL-style `DOCKER_HOST` may carry.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerSettings")
            .field("host", &self.host.as_deref().map(crate::redact::url))
            .field("timeout", &self.timeout)
            .field("tls_cert_dir", &self.tls_cert_dir)
            .field("config_dir", &self.config_dir)
            .finish()
    }
}

/// The worker's own log on stderr, for `start` and `gc` alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// Level filter (`RUST_LOG` syntax), else `PREFECT_LOGGING_LEVEL` in tracing's words.
    pub filter: String,
    /// `NO_COLOR` is set (and not empty): no ANSI colours even on a terminal
    /// (<https://no-color.org>). Off a terminal there are none anyway.
    pub no_color: bool,
}

/// How the worker writes its own log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Everything `docker-worker start` needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Prefect API client settings.
    pub api: ClientConfig,
    /// Worker loop settings (of the first pool; [`Settings::worker_for`] gives each pool's).
    pub worker: WorkerSettings,
    /// The pools this process serves, each with its own worker.
    pub pools: Vec<PoolSettings>,
    /// Docker settings.
    pub docker: DockerSettings,
    /// `/health` and `/metrics`; `None` when neither is enabled.
    pub endpoints: Option<EndpointSettings>,
    /// Log format on stderr.
    pub log_format: LogFormat,
    /// The stderr log's filter and colours.
    pub logging: LogSettings,
    /// The worker's image collections (periodic, and before pulls).
    pub images: ImageGcSettings,
}

/// The worker's image collections: every `--gc-interval` with `--gc-images`, and before a
/// pull with `--min-free-disk`. Process-wide, not per pool: images belong to the Docker host,
/// and every pool's deployments keep theirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageGcSettings {
    /// Collect images at every `--gc-interval` too (no interval: never).
    pub periodic: bool,
    /// Only images carrying this label (`KEY` or `KEY=VALUE`) are looked at.
    pub label: Option<String>,
    /// Bytes that should stay free on the Engine's data root; below, a pull is preceded by
    /// an image collection. `None` = no guard.
    pub min_free_disk: Option<u64>,
}

impl Settings {
    /// What the worker's image collections do: the rules of `gc --images` without `--pool`
    /// (every pool's deployments keep their images, since workers of other pools may share
    /// this Docker host), with `--gc-older-than`, the default image and the job override.
    #[must_use]
    pub fn image_gc_options(&self) -> ImageGcOptions {
        ImageGcOptions {
            pools: PoolScope::All,
            older_than: self.worker.gc.older_than,
            dry_run: false,
            label: self.images.label.clone(),
            default_image: self.worker.run_defaults.default_image.clone(),
            job_override: self.worker.run_defaults.job_override.clone(),
        }
    }
}

/// One pool this process serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// The pool's name.
    pub name: String,
    /// Its `--limit`.
    pub limit: Option<usize>,
}

impl Settings {
    /// The worker settings of one of the pools: the shared ones with its name and limit.
    pub fn worker_for(&self, pool: &PoolSettings) -> WorkerSettings {
        let mut worker = self.worker.clone();
        worker.pool = pool.name.clone();
        worker.polling.limit = pool.limit;
        worker
    }
}

/// Everything `docker-worker gc` needs: the same API and Docker settings as `start`.
#[derive(Debug, Clone)]
pub struct GcSettings {
    /// Prefect API client settings.
    pub api: ClientConfig,
    /// Docker settings.
    pub docker: DockerSettings,
    /// What to collect.
    pub options: GcOptions,
    /// With `--images`: the image collection that follows the containers'.
    pub images: Option<ImageGcOptions>,
    /// The stderr log's filter and colours.
    pub logging: LogSettings,
}

/// `PREFECT_WORKER_WEBSERVER_HOST:PREFECT_WORKER_WEBSERVER_PORT`, where `/health` and
/// `/metrics` listen.
fn endpoint_addr(env: &Env) -> Result<SocketAddr, ConfigError> {
    let host = env.text(&var::PREFECT_WORKER_WEBSERVER_HOST);
    let port_text = env.text(&var::PREFECT_WORKER_WEBSERVER_PORT);
    let port: u16 = port_text.trim().parse().map_err(|_| ConfigError::Invalid {
        name: var::PREFECT_WORKER_WEBSERVER_PORT.name.into(),
        value: port_text.clone(),
        reason: "expected a TCP port number".into(),
    })?;
    (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ConfigError::Invalid {
            name: var::PREFECT_WORKER_WEBSERVER_HOST.name.into(),
            value: host,
            reason: "expected an address to listen on".into(),
        })
}

/// `/health` and `/metrics` when either is asked for; a poll older than 30 poll intervals
/// makes `/health` unhealthy.
fn endpoints(
    args: &StartArgs,
    env: &Env,
    query_interval: Duration,
) -> Result<Option<EndpointSettings>, ConfigError> {
    let metrics = args.with_metrics || env.boolean(&var::DOCKER_WORKER_METRICS_ENABLED)?;
    if !args.with_healthcheck && !metrics {
        return Ok(None);
    }
    Ok(Some(EndpointSettings {
        addr: endpoint_addr(env)?,
        health: args.with_healthcheck,
        metrics,
        // Saturating: a huge poll interval must not overflow into a panic.
        unhealthy_after: query_interval.saturating_mul(30),
    }))
}

/// `--log-format`, else `DOCKER_WORKER_LOG_FORMAT`, else text.
fn log_format(args: &StartArgs, env: &Env) -> Result<LogFormat, ConfigError> {
    let text = args
        .log_format
        .clone()
        .unwrap_or_else(|| env.text(&var::DOCKER_WORKER_LOG_FORMAT));
    match text.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(ConfigError::Invalid {
            name: "--log-format".into(),
            value: text,
            reason: "expected `text` or `json`".into(),
        }),
    }
}

/// `--name` (default `DockerWorker <uuid>`), checked as Prefect checks it, and `--pool`.
fn identity(args: &StartArgs) -> Result<String, ConfigError> {
    let name = match &args.name {
        Some(n) => n.clone(),
        None => format!("DockerWorker {}", uuid::Uuid::new_v4()),
    };
    if name.contains('/') || name.contains('%') {
        return Err(ConfigError::Invalid {
            name: "--name".into(),
            value: name,
            reason: "Worker name cannot contain '/' or '%'".into(),
        });
    }
    for (i, pool) in args.pool.iter().enumerate() {
        if pool.trim().is_empty() {
            return Err(ConfigError::Invalid {
                name: "--pool".into(),
                value: pool.clone(),
                reason: "the work pool name cannot be empty".into(),
            });
        }
        if args.pool[..i].contains(pool) {
            return Err(ConfigError::Invalid {
                name: "--pool".into(),
                value: pool.clone(),
                reason: "the work pool is named twice".into(),
            });
        }
    }
    Ok(name)
}

/// Every `--pool` with its limit: its `--pool-limit POOL=N` (or its entry in
/// `DOCKER_WORKER_POOL_LIMITS` when no `--pool-limit` is given), else `--limit`.
fn pools(args: &StartArgs, env: &Env) -> Result<Vec<PoolSettings>, ConfigError> {
    let (source, given): (&str, Vec<String>) = if args.pool_limit.is_empty() {
        let var = &env_table::DOCKER_WORKER_POOL_LIMITS;
        let text = env.non_empty(var).unwrap_or_default();
        let entries = text
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        (var.name, entries)
    } else {
        ("--pool-limit", args.pool_limit.clone())
    };
    let invalid = |value: &str, reason: &str| ConfigError::Invalid {
        name: source.into(),
        value: value.into(),
        reason: reason.into(),
    };
    let mut limits = BTreeMap::new();
    for text in &given {
        let (pool, n) = text
            .rsplit_once('=')
            .ok_or_else(|| invalid(text, "expected POOL=N"))?;
        let n: usize = n
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid(text, "the limit must be a whole number of at least 1"))?;
        if !args.pool.iter().any(|p| p == pool) {
            return Err(invalid(text, "no --pool of that name"));
        }
        limits.insert(pool.to_owned(), n);
    }
    Ok(args
        .pool
        .iter()
        .map(|name| PoolSettings {
            name: name.clone(),
            limit: limits.get(name).copied().or(args.limit),
        })
        .collect())
}

/// The Prefect API client settings: `PREFECT_API_URL` and the client's `PREFECT_*` knobs.
fn api_settings(env: &Env, worker_name: Option<String>) -> Result<ClientConfig, ConfigError> {
    let api_url_text = env
        .non_empty(&var::PREFECT_API_URL)
        .ok_or(ConfigError::MissingApiUrl)?;
    let mut api_url = Url::parse(api_url_text.trim())
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| ConfigError::Invalid {
            name: var::PREFECT_API_URL.name.into(),
            value: crate::redact::url(&api_url_text).into_owned(),
            reason: "expected an http(s) URL such as http://127.0.0.1:4200/api".into(),
        })?;
    let userinfo = take_userinfo(&mut api_url);
    let max_retries = env.count_trimmed(&var::PREFECT_CLIENT_MAX_RETRIES)?;
    Ok(ClientConfig {
        api_url,
        api_key: env.non_empty(&var::PREFECT_API_KEY),
        auth_string: env.non_empty(&var::PREFECT_API_AUTH_STRING).or(userinfo),
        timeout: env.seconds(&var::PREFECT_API_REQUEST_TIMEOUT)?,
        max_retries,
        worker_name,
        csrf_enabled: env.boolean(&var::PREFECT_CLIENT_CSRF_SUPPORT_ENABLED)?,
    })
}

/// Removes `user:pass@` from the API URL and returns it decoded: it becomes the basic-auth
/// string (unless `PREFECT_API_AUTH_STRING` is set), as an HTTP client reads a URL's
/// credentials, and the URL the worker keeps, logs and prints has no secret left in it.
fn take_userinfo(url: &mut Url) -> Option<String> {
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let user = crate::redact::percent_decode(url.username());
    let pass = url.password().map(crate::redact::percent_decode);
    // Cannot fail for http(s) URLs, which have a host.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Some(match pass {
        Some(pass) => format!("{user}:{pass}"),
        None => user,
    })
}

/// The Docker connection settings, read as the Docker CLI reads them.
fn docker_settings(env: &Env) -> Result<DockerSettings, ConfigError> {
    let home_docker = || {
        env.raw(&var::HOME)
            .map(|h| PathBuf::from(h).join(".docker"))
    };
    Ok(DockerSettings {
        host: env.non_empty(&var::DOCKER_HOST),
        timeout: env.seconds(&var::DOCKER_CLIENT_TIMEOUT)?,
        tls_cert_dir: env
            .non_empty(&var::DOCKER_TLS_VERIFY)
            .filter(|v| v.trim() != "0")
            .and_then(|_| {
                env.non_empty(&var::DOCKER_CERT_PATH)
                    .map(PathBuf::from)
                    .or_else(home_docker)
            }),
        config_dir: env
            .non_empty(&var::DOCKER_CONFIG)
            .map(PathBuf::from)
            .or_else(home_docker),
    })
}

/// The host policy file at `path`, protecting the socket of a unix `DOCKER_HOST` along with
/// the default ones.
fn load_policy(path: &std::path::Path, env: &Env) -> Result<crate::guard::HostPolicy, ConfigError> {
    let mut policy = crate::guard::HostPolicy::load(path)?;
    let socket = env.non_empty(&var::DOCKER_HOST).and_then(|h| {
        h.strip_prefix("unix://")
            .map(str::to_owned)
            .or_else(|| h.starts_with('/').then_some(h))
    });
    if let Some(socket) = socket {
        policy = policy.with_docker_socket(PathBuf::from(socket));
    }
    Ok(policy)
}

/// The host policy file at `path` as `docker-worker start` would read it in environment `env`
/// (for `docker-worker policy check`).
///
/// # Errors
/// [`ConfigError::Policy`] when the file cannot be used.
pub fn policy_for_check(
    path: &std::path::Path,
    env: &BTreeMap<String, String>,
) -> Result<crate::guard::HostPolicy, ConfigError> {
    load_policy(path, &Env::new(env))
}

/// The stderr log: its filter and whether `NO_COLOR` forbids colours.
fn logging(env: &Env) -> LogSettings {
    LogSettings {
        filter: log_filter(env),
        no_color: env.non_empty(&var::NO_COLOR).is_some(),
    }
}

/// The stderr log filter: `RUST_LOG`, else `PREFECT_LOGGING_LEVEL` in tracing's words.
fn log_filter(env: &Env) -> String {
    env.non_empty(&var::RUST_LOG).unwrap_or_else(|| {
        match env
            .text(&var::PREFECT_LOGGING_LEVEL)
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "warning" => "warn".to_owned(),
            "critical" => "error".to_owned(),
            other => other.to_owned(),
        }
    })
}

/// `--gc-image-label` / `gc --image-label`, else `DOCKER_WORKER_GC_IMAGE_LABEL`: `KEY` or
/// `KEY=VALUE`, as Docker's `label` filter takes it.
fn image_label(
    flag: Option<&str>,
    flag_name: &str,
    env: &Env,
) -> Result<Option<String>, ConfigError> {
    let (name, text) = match flag {
        Some(text) => (flag_name, text.to_owned()),
        None => match env.non_empty(&var::DOCKER_WORKER_GC_IMAGE_LABEL) {
            Some(text) => (var::DOCKER_WORKER_GC_IMAGE_LABEL.name, text),
            None => return Ok(None),
        },
    };
    let label = text.trim();
    let key = label.split_once('=').map_or(label, |(k, _)| k);
    if key.trim().is_empty() || key.chars().any(char::is_whitespace) {
        return Err(ConfigError::Invalid {
            name: name.to_owned(),
            value: text.clone(),
            reason: "expected a label as KEY or KEY=VALUE".into(),
        });
    }
    Ok(Some(label.to_owned()))
}

/// A size such as `10g`, `500M`, `1.5GiB` or `1073741824` (bytes): units `b k m g t`, with or
/// without `b`/`ib`, in any case, all powers of 1024 as Docker's are.
///
/// # Errors
/// What is expected, when `text` is not such a size.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let power = match unit.trim() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 1,
        "m" | "mb" | "mib" => 2,
        "g" | "gb" | "gib" => 3,
        "t" | "tb" | "tib" => 4,
        _ => return Err("expected a size such as 10g, 500m or 1.5GiB".into()),
    };
    let number: f64 = number
        .parse()
        .map_err(|_| "expected a size such as 10g, 500m or 1.5GiB".to_owned())?;
    let bytes = number * 1024f64.powi(power);
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err("the size is too large".into());
    }
    // Whole bytes: a fraction of a byte means nothing for free space.
    Ok(bytes as u64)
}

/// `--min-free-disk`, else `DOCKER_WORKER_MIN_FREE_DISK`; `0` or unset = no guard.
fn min_free_disk(args: &StartArgs, env: &Env) -> Result<Option<u64>, ConfigError> {
    let (name, text) = match &args.min_free_disk {
        Some(text) => ("--min-free-disk", text.clone()),
        None => match env.non_empty(&var::DOCKER_WORKER_MIN_FREE_DISK) {
            Some(text) => (var::DOCKER_WORKER_MIN_FREE_DISK.name, text),
            None => return Ok(None),
        },
    };
    let bytes = parse_size(&text).map_err(|reason| ConfigError::Invalid {
        name: name.to_owned(),
        value: text.clone(),
        reason,
    })?;
    Ok((bytes > 0).then_some(bytes))
}

/// `--gc-images`, `--gc-image-label`, `--min-free-disk`.
fn image_gc(args: &StartArgs, env: &Env) -> Result<ImageGcSettings, ConfigError> {
    Ok(ImageGcSettings {
        periodic: args.gc_images || env.boolean(&var::DOCKER_WORKER_GC_IMAGES)?,
        label: image_label(args.gc_image_label.as_deref(), "--gc-image-label", env)?,
        min_free_disk: min_free_disk(args, env)?,
    })
}

/// `gc --images` and what it needs to render the deployments' images as `start` would:
/// `--default-image` and `--job-override` (else their variables).
fn gc_images(
    args: &GcArgs,
    env: &Env,
    older_than: std::time::Duration,
) -> Result<Option<ImageGcOptions>, ConfigError> {
    if !(args.images || env.boolean(&var::DOCKER_WORKER_GC_IMAGES)?) {
        return Ok(None);
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    Ok(Some(ImageGcOptions {
        pools: args.pool.clone().map_or(PoolScope::All, PoolScope::One),
        older_than,
        dry_run: args.dry_run,
        label: image_label(args.image_label.as_deref(), "--image-label", env)?,
        default_image: args
            .default_image
            .clone()
            .unwrap_or_else(|| env.text(&var::DOCKER_WORKER_DEFAULT_IMAGE)),
        job_override: worker::job_override(args.job_override.as_deref(), env, &cwd)?,
    }))
}

impl GcSettings {
    /// Builds settings from `docker-worker gc` arguments and an environment.
    ///
    /// # Errors
    /// [`ConfigError`] for a missing API URL or any malformed value.
    pub fn from_gc_args(
        args: &GcArgs,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        Self::read(args, &Env::new(env))
    }

    fn read(args: &GcArgs, env: &Env) -> Result<Self, ConfigError> {
        if args.pool.as_deref().is_some_and(|p| p.trim().is_empty()) {
            return Err(ConfigError::Invalid {
                name: "--pool".into(),
                value: String::new(),
                reason: "the work pool name cannot be empty".into(),
            });
        }
        let older_than = env.required_duration(
            args.older_than.as_deref(),
            "--older-than",
            &var::DOCKER_WORKER_GC_OLDER_THAN,
        )?;
        Ok(Self {
            images: gc_images(args, env, older_than)?,
            api: api_settings(env, None)?,
            docker: docker_settings(env)?,
            options: GcOptions {
                pool: args.pool.clone(),
                older_than,
                dry_run: args.dry_run,
            },
            logging: logging(env),
        })
    }
}

impl Settings {
    /// Builds settings from `docker-worker start` arguments and an environment.
    ///
    /// # Errors
    /// [`ConfigError`] for a missing API URL or any malformed value.
    pub fn from_start_args(
        args: &StartArgs,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        Self::read(args, &Env::new(env))
    }

    fn read(args: &StartArgs, env: &Env) -> Result<Self, ConfigError> {
        // Checked first: a missing API URL is the most common mistake and says what to do.
        env.non_empty(&var::PREFECT_API_URL)
            .ok_or(ConfigError::MissingApiUrl)?;
        let name = identity(args)?;
        // Read in the order of the flat function this replaced, so that when several settings
        // are wrong the same one is reported (reporting, cancellation and feature variables
        // are now read group by group, the one exception).
        let polling = worker::polling(args, env)?;
        let run_defaults = worker::run_defaults(args, env)?;
        let endpoints = endpoints(args, env, polling.query_interval)?;
        let log_format = log_format(args, env)?;
        let logging = logging(env);
        let gc = worker::gc(args, env)?;
        let images = image_gc(args, env)?;
        let api = api_settings(env, Some(name.clone()))?;
        let worker = WorkerSettings::from_parts(args, name, polling, run_defaults, gc, env)?;
        Ok(Self {
            api,
            worker,
            pools: pools(args, env)?,
            docker: docker_settings(env)?,
            endpoints,
            log_format,
            logging,
            images,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> StartArgs {
        let mut argv = vec!["docker-worker", "start", "--pool", "p"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::parse_from(argv).command {
            crate::cli::Command::Start(a) => *a,
            _ => unreachable!("parsed `start`"),
        }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_pool_gets_its_own_limit_or_the_shared_one() {
        let api = ("PREFECT_API_URL", "http://127.0.0.1:4200/api");
        let s = Settings::from_start_args(
            &args(&[
                "--pool",
                "q",
                "--pool",
                "r",
                "--limit",
                "3",
                "--pool-limit",
                "q=1",
            ]),
            &env(&[api]),
        )
        .unwrap();
        let limits: Vec<(&str, Option<usize>)> =
            s.pools.iter().map(|p| (p.name.as_str(), p.limit)).collect();
        assert_eq!(limits, [("p", Some(3)), ("q", Some(1)), ("r", Some(3))]);
        let q = s.worker_for(&s.pools[1]);
        assert_eq!((q.pool.as_str(), q.polling.limit), ("q", Some(1)));
        // The environment's limits apply when no flag gives any.
        let s = Settings::from_start_args(
            &args(&["--pool", "q"]),
            &env(&[api, ("DOCKER_WORKER_POOL_LIMITS", "p=2, q=5")]),
        )
        .unwrap();
        let limits: Vec<Option<usize>> = s.pools.iter().map(|p| p.limit).collect();
        assert_eq!(limits, [Some(2), Some(5)]);
    }

    #[test]
    fn bad_pool_lists_are_errors_naming_the_entry() {
        let api = ("PREFECT_API_URL", "http://127.0.0.1:4200/api");
        for (extra, vars, needle) in [
            (&["--pool", "p"][..], &[][..], "named twice"),
            (&["--pool-limit", "p"][..], &[][..], "expected POOL=N"),
            (&["--pool-limit", "p=0"][..], &[][..], "at least 1"),
            (
                &["--pool-limit", "x=2"][..],
                &[][..],
                "no --pool of that name",
            ),
            (
                &[][..],
                &[("DOCKER_WORKER_POOL_LIMITS", "p=many")][..],
                "DOCKER_WORKER_POOL_LIMITS",
            ),
        ] {
            let mut pairs = vec![api];
            pairs.extend_from_slice(vars);
            let err = Settings::from_start_args(&args(extra), &env(&pairs))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{extra:?} {vars:?}: {err}");
        }
    }

    #[test]
    fn defaults() {
        let s = Settings::from_start_args(
            &args(&[]),
            &env(&[("PREFECT_API_URL", "http://127.0.0.1:4200/api")]),
        )
        .unwrap();
        assert!(s.worker.name.starts_with("DockerWorker "));
        assert_eq!(s.worker.polling.query_interval, Duration::from_secs(10));
        assert_eq!(s.worker.polling.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(s.worker.polling.prefetch, Duration::from_secs(10));
        assert_eq!(s.api.timeout, Duration::from_secs(60));
        assert!(s.worker.polling.create_pool_if_not_found);
        assert_eq!(s.worker.run_defaults.default_image, DEFAULT_IMAGE);
        assert_eq!(
            s.worker.run_defaults.settings_env,
            vec![(
                "PREFECT_API_URL".to_owned(),
                "http://127.0.0.1:4200/api".to_owned()
            )]
        );
    }

    #[test]
    fn missing_api_url() {
        assert_eq!(
            Settings::from_start_args(&args(&[]), &env(&[])).unwrap_err(),
            ConfigError::MissingApiUrl
        );
    }

    #[test]
    fn bad_values_are_named() {
        let base = [("PREFECT_API_URL", "http://x/api")];
        let e = Settings::from_start_args(&args(&["--name", "a/b"]), &env(&base)).unwrap_err();
        assert!(
            e.to_string()
                .contains("Worker name cannot contain '/' or '%'"),
            "{e}"
        );
        let e = Settings::from_start_args(
            &args(&[]),
            &env(&[
                ("PREFECT_API_URL", "http://x/api"),
                ("PREFECT_WORKER_QUERY_SECONDS", "soon"),
            ]),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("PREFECT_WORKER_QUERY_SECONDS"),
            "{e}"
        );
        let e = Settings::from_start_args(&args(&[]), &env(&[("PREFECT_API_URL", "not a url")]))
            .unwrap_err();
        assert!(e.to_string().contains("PREFECT_API_URL"), "{e}");
        let e = Settings::from_start_args(&args(&["--limit", "0"]), &env(&base)).unwrap_err();
        assert!(e.to_string().contains("--limit"), "{e}");
    }

    #[test]
    fn profile_under_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("profiles.toml"),
            "active = \"local\"\n[profiles.local]\nPREFECT_API_URL = \"http://from-profile/api\"\nPREFECT_WORKER_QUERY_SECONDS = 3\n[profiles.other]\nPREFECT_API_URL = \"http://other/api\"\n",
        )
        .unwrap();
        let home = dir.path().to_string_lossy().into_owned();
        let merged = with_profile(env(&[("PREFECT_HOME", &home)])).unwrap();
        assert_eq!(merged["PREFECT_API_URL"], "http://from-profile/api");
        assert_eq!(merged["PREFECT_WORKER_QUERY_SECONDS"], "3");
        let merged = with_profile(env(&[
            ("PREFECT_HOME", &home),
            ("PREFECT_API_URL", "http://env/api"),
        ]))
        .unwrap();
        assert_eq!(merged["PREFECT_API_URL"], "http://env/api");
        let merged = with_profile(env(&[
            ("PREFECT_HOME", &home),
            ("PREFECT_PROFILE", "other"),
        ]))
        .unwrap();
        assert_eq!(merged["PREFECT_API_URL"], "http://other/api");
        let err =
            with_profile(env(&[("PREFECT_HOME", &home), ("PREFECT_PROFILE", "nope")])).unwrap_err();
        assert!(
            err.to_string().contains("profile 'nope' not found"),
            "{err}"
        );
        let empty = tempfile::tempdir().unwrap();
        let merged =
            with_profile(env(&[("PREFECT_HOME", &empty.path().to_string_lossy())])).unwrap();
        assert!(!merged.contains_key("PREFECT_API_URL"));
    }

    #[test]
    fn endpoints_and_log_settings() {
        let s = Settings::from_start_args(
            &args(&["--with-healthcheck", "--log-format", "json"]),
            &env(&[
                ("PREFECT_API_URL", "http://x/api"),
                ("PREFECT_WORKER_WEBSERVER_PORT", "9099"),
                ("PREFECT_LOGGING_LEVEL", "WARNING"),
            ]),
        )
        .unwrap();
        let e = s.endpoints.unwrap();
        assert_eq!(e.addr.port(), 9099);
        assert!(e.health && !e.metrics);
        assert_eq!(e.unhealthy_after, Duration::from_secs(300));
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.logging.filter, "warn");
        assert!(!s.logging.no_color);
        let none =
            Settings::from_start_args(&args(&[]), &env(&[("PREFECT_API_URL", "http://x/api")]))
                .unwrap();
        assert!(none.endpoints.is_none());
        let bad = Settings::from_start_args(
            &args(&["--log-format", "xml"]),
            &env(&[("PREFECT_API_URL", "http://x/api")]),
        );
        assert!(bad.unwrap_err().to_string().contains("--log-format"));
    }

    fn gc_args(extra: &[&str]) -> GcArgs {
        let mut argv = vec!["docker-worker", "gc"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::parse_from(argv).command {
            crate::cli::Command::Gc(a) => a,
            _ => unreachable!("parsed `gc`"),
        }
    }

    #[test]
    fn sizes() {
        let gib = 1024 * 1024 * 1024;
        assert_eq!(parse_size("10g"), Ok(10 * gib));
        assert_eq!(parse_size(" 10GB "), Ok(10 * gib));
        assert_eq!(parse_size("1.5GiB"), Ok(gib + gib / 2));
        assert_eq!(parse_size("500m"), Ok(500 * 1024 * 1024));
        assert_eq!(parse_size("2t"), Ok(2 * 1024 * gib));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["", "g", "lots", "-1g", "1.2.3g", "10q", "1e3"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("99999999999999t").is_err());
    }

    /// `--gc-images`, `--gc-image-label`, `--min-free-disk` (and their variables) make the
    /// worker's image collections; `gc --images` its own, with the pool, the default image
    /// and the job override it renders deployments with.
    #[test]
    fn image_collection_settings() {
        let base = [("PREFECT_API_URL", "http://x/api")];
        let s = Settings::from_start_args(&args(&[]), &env(&base)).unwrap();
        assert_eq!(
            s.images,
            ImageGcSettings {
                periodic: false,
                label: None,
                min_free_disk: None
            }
        );
        let s = Settings::from_start_args(
            &args(&[
                "--gc-images",
                "--gc-image-label",
                "team=data",
                "--min-free-disk",
                "10g",
                "--gc-older-than",
                "7d",
                "--default-image",
                "local/x:1",
            ]),
            &env(&base),
        )
        .unwrap();
        assert_eq!(
            s.images,
            ImageGcSettings {
                periodic: true,
                label: Some("team=data".into()),
                min_free_disk: Some(10 * 1024 * 1024 * 1024)
            }
        );
        let options = s.image_gc_options();
        assert_eq!(options.pools, PoolScope::All);
        assert_eq!(options.older_than, Duration::from_secs(7 * 86_400));
        assert_eq!(options.default_image, "local/x:1");
        assert!(!options.dry_run && options.job_override.is_none());
        let s = Settings::from_start_args(
            &args(&[]),
            &env(&[
                base[0],
                ("DOCKER_WORKER_GC_IMAGES", "true"),
                ("DOCKER_WORKER_GC_IMAGE_LABEL", "k"),
                ("DOCKER_WORKER_MIN_FREE_DISK", "0"),
            ]),
        )
        .unwrap();
        assert!(s.images.periodic);
        assert_eq!(s.images.label.as_deref(), Some("k"));
        assert_eq!(s.images.min_free_disk, None, "0 = off");

        let s = GcSettings::from_gc_args(&gc_args(&[]), &env(&base)).unwrap();
        assert!(s.images.is_none());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("o.json");
        std::fs::write(&file, r#"{"image": "local/host:1"}"#).unwrap();
        let s = GcSettings::from_gc_args(
            &gc_args(&[
                "--images",
                "--pool",
                "p",
                "--image-label",
                "k=v",
                "--dry-run",
            ]),
            &env(&[
                base[0],
                ("DOCKER_WORKER_DEFAULT_IMAGE", "local/default:1"),
                ("DOCKER_WORKER_JOB_OVERRIDE", &file.to_string_lossy()),
            ]),
        )
        .unwrap();
        let images = s.images.expect("--images");
        assert_eq!(images.pools, PoolScope::One("p".into()));
        assert_eq!(images.label.as_deref(), Some("k=v"));
        assert_eq!(images.default_image, "local/default:1");
        assert!(images.dry_run);
        assert_eq!(
            images.job_override.map(|o| o.source().to_owned()),
            Some(file.clone())
        );
        let e =
            GcSettings::from_gc_args(&gc_args(&["--images", "--image-label", "=v"]), &env(&base))
                .unwrap_err();
        assert!(e.to_string().contains("--image-label"), "{e}");
    }

    #[test]
    fn gc_settings() {
        let base = [("PREFECT_API_URL", "http://x/api")];
        let s = GcSettings::from_gc_args(&gc_args(&[]), &env(&base)).unwrap();
        assert_eq!(
            s.options,
            GcOptions {
                pool: None,
                older_than: Duration::from_secs(24 * 3600),
                dry_run: false
            }
        );
        assert_eq!(s.api.api_url.as_str(), "http://x/api");
        assert_eq!(s.api.worker_name, None);
        let s = GcSettings::from_gc_args(
            &gc_args(&["--pool", "p", "--older-than", "7d", "--dry-run"]),
            &env(&[
                ("PREFECT_API_URL", "http://x/api"),
                ("DOCKER_WORKER_GC_OLDER_THAN", "30m"),
            ]),
        )
        .unwrap();
        assert_eq!(s.options.pool.as_deref(), Some("p"));
        assert_eq!(s.options.older_than, Duration::from_secs(7 * 86_400));
        assert!(s.options.dry_run);
        let s = GcSettings::from_gc_args(
            &gc_args(&[]),
            &env(&[
                ("PREFECT_API_URL", "http://x/api"),
                ("DOCKER_WORKER_GC_OLDER_THAN", "1h 30m"),
            ]),
        )
        .unwrap();
        assert_eq!(s.options.older_than, Duration::from_secs(5400));
        let s = GcSettings::from_gc_args(&gc_args(&["--older-than", "0s"]), &env(&base)).unwrap();
        assert_eq!(s.options.older_than, Duration::ZERO);
        let e =
            GcSettings::from_gc_args(&gc_args(&["--older-than", "soon"]), &env(&base)).unwrap_err();
        assert!(e.to_string().contains("--older-than"), "{e}");
        assert_eq!(
            GcSettings::from_gc_args(&gc_args(&[]), &env(&[])).unwrap_err(),
            ConfigError::MissingApiUrl
        );
    }

    #[test]
    fn periodic_gc_settings() {
        let base = [("PREFECT_API_URL", "http://x/api")];
        let s = Settings::from_start_args(&args(&[]), &env(&base)).unwrap();
        assert_eq!(s.worker.gc.interval, None);
        assert_eq!(s.worker.gc.older_than, Duration::from_secs(86_400));
        let s = Settings::from_start_args(
            &args(&["--gc-interval", "1s", "--gc-older-than", "0s"]),
            &env(&base),
        )
        .unwrap();
        assert_eq!(s.worker.gc.interval, Some(Duration::from_secs(1)));
        assert_eq!(s.worker.gc.older_than, Duration::ZERO);
        let s = Settings::from_start_args(
            &args(&[]),
            &env(&[
                ("PREFECT_API_URL", "http://x/api"),
                ("DOCKER_WORKER_GC_INTERVAL", "1h"),
                ("DOCKER_WORKER_GC_OLDER_THAN", "7d"),
            ]),
        )
        .unwrap();
        assert_eq!(s.worker.gc.interval, Some(Duration::from_secs(3600)));
        assert_eq!(s.worker.gc.older_than, Duration::from_secs(7 * 86_400));
        let s = Settings::from_start_args(
            &args(&[]),
            &env(&[
                ("PREFECT_API_URL", "http://x/api"),
                ("DOCKER_WORKER_GC_INTERVAL", "0"),
            ]),
        )
        .unwrap();
        assert_eq!(s.worker.gc.interval, None, "0 turns it off");
        let e = Settings::from_start_args(
            &args(&[]),
            &env(&[
                ("PREFECT_API_URL", "http://x/api"),
                ("DOCKER_WORKER_GC_INTERVAL", "often"),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("DOCKER_WORKER_GC_INTERVAL"), "{e}");
    }

    #[test]
    fn flags_and_env() {
        let s = Settings::from_start_args(
            &args(&[
                "-n",
                "w1",
                "-q",
                "a",
                "-q",
                "b",
                "-l",
                "2",
                "--run-once",
                "--no-create-pool-if-not-found",
                "--prefetch-seconds",
                "3",
            ]),
            &env(&[
                ("PREFECT_API_URL", "http://x/api"),
                ("PREFECT_API_KEY", "k"),
                ("PREFECT_WORKER_HEARTBEAT_SECONDS", "15.7"),
                ("PREFECT__FLOW_RUN_ID", "not-passed"),
            ]),
        )
        .unwrap();
        assert_eq!(s.worker.name, "w1");
        assert_eq!(s.worker.work_queues, vec!["a", "b"]);
        assert_eq!(s.worker.polling.limit, Some(2));
        assert!(s.worker.polling.run_once && !s.worker.polling.create_pool_if_not_found);
        assert_eq!(s.worker.polling.prefetch, Duration::from_secs(3));
        assert_eq!(s.worker.polling.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(s.api.api_key.as_deref(), Some("k"));
        assert!(
            !s.worker
                .run_defaults
                .settings_env
                .iter()
                .any(|(k, _)| k.starts_with("PREFECT__"))
        );
    }

    #[test]
    fn flow_run_log_size_limits_default_to_prefects_and_are_checked_as_it_checks_them() {
        let base = [("PREFECT_API_URL", "http://x/api")];
        let s = Settings::from_start_args(&args(&[]), &env(&base)).unwrap();
        assert_eq!(
            s.worker.reporting.log_limits,
            crate::logs::LogLimits::default()
        );
        assert_eq!(s.worker.reporting.log_limits.max_log_size, 1_000_000);
        assert_eq!(s.worker.reporting.log_limits.batch_size, 4_000_000);
        let s = Settings::from_start_args(
            &args(&[]),
            &env(&[
                base[0],
                ("PREFECT_LOGGING_TO_API_MAX_LOG_SIZE", "2000"),
                ("PREFECT_LOGGING_TO_API_BATCH_SIZE", "10000"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (
                s.worker.reporting.log_limits.max_log_size,
                s.worker.reporting.log_limits.batch_size
            ),
            (2000, 10000)
        );
        let e = Settings::from_start_args(
            &args(&[]),
            &env(&[base[0], ("PREFECT_LOGGING_TO_API_MAX_LOG_SIZE", "5000000")]),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains(
                "`PREFECT_LOGGING_TO_API_MAX_LOG_SIZE` cannot be larger than `PREFECT_LOGGING_TO_API_BATCH_SIZE`"
            ),
            "{e}"
        );
    }

    /// An interval of 0 would make a loop spin against the API (the log batch interval would
    /// even panic in tokio): each is a configuration error naming the variable. A heartbeat
    /// is whole seconds (the Python CLI truncates it), so under one second is refused too.
    #[test]
    fn zero_intervals_are_errors() {
        let base = [("PREFECT_API_URL", "http://x/api")];
        for (name, value, reason) in [
            ("PREFECT_WORKER_QUERY_SECONDS", "0", "longer than 0 seconds"),
            (
                "PREFECT_WORKER_QUERY_SECONDS",
                " 0.0 ",
                "longer than 0 seconds",
            ),
            ("PREFECT_WORKER_HEARTBEAT_SECONDS", "0", "at least 1s"),
            ("PREFECT_WORKER_HEARTBEAT_SECONDS", "0.5", "at least 1s"),
            (
                "DOCKER_WORKER_CANCELLATION_POLL_SECONDS",
                "0",
                "longer than 0 seconds",
            ),
            (
                "PREFECT_LOGGING_TO_API_BATCH_INTERVAL",
                "0",
                "longer than 0 seconds",
            ),
        ] {
            let e =
                Settings::from_start_args(&args(&[]), &env(&[base[0], (name, value)])).unwrap_err();
            assert_eq!(
                e,
                ConfigError::Invalid {
                    name: name.into(),
                    value: value.trim().into(),
                    reason: format!("an interval must be {reason}"),
                },
                "{name}={value}"
            );
        }
        let s = Settings::from_start_args(
            &args(&[]),
            &env(&[
                base[0],
                ("PREFECT_WORKER_QUERY_SECONDS", "0.05"),
                ("PREFECT_WORKER_HEARTBEAT_SECONDS", "1.9"),
            ]),
        )
        .unwrap();
        assert_eq!(s.worker.polling.query_interval, Duration::from_millis(50));
        assert_eq!(s.worker.polling.heartbeat_interval, Duration::from_secs(1));
    }

    /// Values a `Duration` cannot hold are configuration errors (exit 64), not panics.
    #[test]
    fn huge_durations_are_errors_not_panics() {
        let base = [("PREFECT_API_URL", "http://x/api")];
        for (flags, vars) in [
            (vec!["--cancel-grace", "1e30"], vec![]),
            (vec!["--prefetch-seconds", "1e30"], vec![]),
            (
                vec![],
                vec![("DOCKER_WORKER_CANCELLATION_POLL_SECONDS", "1e30")],
            ),
        ] {
            let vars: Vec<_> = base.iter().copied().chain(vars).collect();
            let e = Settings::from_start_args(&args(&flags), &env(&vars)).unwrap_err();
            assert!(
                e.to_string().contains("expected a non-negative number"),
                "{e}"
            );
        }
        let s = Settings::from_start_args(
            &args(&["--with-healthcheck"]),
            &env(&[base[0], ("PREFECT_WORKER_QUERY_SECONDS", "1e18")]),
        )
        .unwrap();
        assert_eq!(s.endpoints.unwrap().unhealthy_after, Duration::MAX);
    }

    /// Every variable the settings code reads, on every path (start with the endpoints and
    /// TLS on, gc, the profile lookup with and without `PREFECT_HOME`), is an entry of the
    /// table, and every entry is read on some path: the table is neither short nor stale.
    #[test]
    fn the_table_lists_exactly_the_variables_read() {
        let mut read = std::collections::BTreeSet::new();
        let full = env(&[
            ("PREFECT_API_URL", "http://x/api"),
            ("DOCKER_TLS_VERIFY", "1"),
        ]);
        let start = Env::new(&full);
        Settings::read(&args(&["--with-healthcheck"]), &start).unwrap();
        read.extend(start.read());
        let gc = Env::new(&full);
        GcSettings::read(&gc_args(&[]), &gc).unwrap();
        read.extend(gc.read());
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_string_lossy().into_owned();
        for vars in [env(&[("HOME", &home)]), env(&[("PREFECT_HOME", &home)])] {
            let profile = Env::new(&vars);
            profile::active_profile(&profile).unwrap();
            read.extend(profile.read());
        }
        let table: std::collections::BTreeSet<&str> = ENV_VARS.iter().map(|v| v.name).collect();
        let missing: Vec<_> = read.difference(&table).collect();
        assert!(missing.is_empty(), "read but not in the table: {missing:?}");
        let stale: Vec<_> = table.difference(&read).collect();
        assert!(stale.is_empty(), "in the table but never read: {stale:?}");
    }

    /// Setting a variable to the default the table shows changes nothing: what users are told
    /// is what the code does.
    #[test]
    fn the_shown_defaults_are_the_defaults_applied() {
        let base = [("PREFECT_API_URL", "http://x/api")];
        let cmd = ["-n", "w", "--with-healthcheck"];
        // Settings without the Prefect settings handed on, which list what is set.
        let shown = |s: Settings| {
            let mut s = s;
            s.worker.run_defaults.settings_env.clear();
            format!("{s:?}")
        };
        let unset = shown(Settings::from_start_args(&args(&cmd), &env(&base)).unwrap());
        for var in ENV_VARS {
            let Some(default) = var.default.value() else {
                continue;
            };
            let vars = env(&[base[0], (var.name, &default)]);
            let set = shown(Settings::from_start_args(&args(&cmd), &vars).unwrap());
            assert_eq!(set, unset, "{}={default}", var.name);
        }
    }

    #[test]
    fn with_defaults_is_start_with_no_flags_and_no_environment() {
        let w = WorkerSettings::with_defaults("p", "w");
        assert_eq!((w.pool.as_str(), w.name.as_str()), ("p", "w"));
        assert!(w.work_queues.is_empty() && w.run_defaults.settings_env.is_empty());
        let mut started = Settings::from_start_args(
            &args(&["-n", "w"]),
            &env(&[("PREFECT_API_URL", "http://x/api")]),
        )
        .unwrap()
        .worker;
        started.run_defaults.settings_env.clear();
        assert_eq!(format!("{w:?}"), format!("{started:?}"));
        assert_eq!(w.polling.query_interval, Duration::from_secs(10));
        assert_eq!(w.cancellation.grace, Duration::from_secs(30));
        assert_eq!(w.gc.older_than, Duration::from_secs(86_400));
        assert_eq!(w.reporting.crash_log_lines, 200);
        assert!(w.features.worker_channel && !w.features.prepull);
    }

    /// `--policy` (else `DOCKER_WORKER_POLICY`) is read and checked with the settings: a bad
    /// file is a configuration error naming the file and the line; a unix `DOCKER_HOST`'s
    /// socket is protected too.
    #[test]
    fn the_policy_file_is_read_with_the_settings() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(
            &good,
            "[deny]\nprivileged = true\nbind_outside = [\"/srv\"]\n",
        )
        .unwrap();
        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "[deny]\nprivileged = true\n\n[force]\npids_limit = \"many\"\n",
        )
        .unwrap();
        let base = [("PREFECT_API_URL", "http://x/api")];
        let s = Settings::from_start_args(&args(&[]), &env(&base)).unwrap();
        assert!(s.worker.run_defaults.policy.is_none());
        let good_text = good.to_string_lossy().into_owned();
        let s = Settings::from_start_args(
            &args(&[]),
            &env(&[
                base[0],
                ("DOCKER_WORKER_POLICY", &good_text),
                ("DOCKER_HOST", "unix:///srv/d.sock"),
            ]),
        )
        .unwrap();
        let policy = s.worker.run_defaults.policy.expect("a policy");
        assert_eq!(policy.source(), good.as_path());
        assert!(policy.describe().join("\n").contains("/srv/d.sock"));
        let e = Settings::from_start_args(
            &args(&["--policy", &bad.to_string_lossy()]),
            &env(&[base[0], ("DOCKER_WORKER_POLICY", &good_text)]),
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("cannot use policy file "), "{text}");
        assert!(text.contains("bad.toml: line 5, column 14: "), "{text}");
        let e =
            Settings::from_start_args(&args(&["--policy", "/no/such/policy.toml"]), &env(&base))
                .unwrap_err();
        assert!(
            e.to_string()
                .contains("/no/such/policy.toml: cannot read it"),
            "{e}"
        );
    }

    /// No `{:?}` of the settings prints a secret: `settings_env` holds every `PREFECT_*`
    /// value, the API key and auth string among them.
    #[test]
    fn debug_prints_no_setting_values() {
        let secrets = [
            ("PREFECT_API_KEY", "pnu_secret-key-1"),
            ("PREFECT_API_AUTH_STRING", "admin:secret-pass-2"),
            ("PREFECT_EXTRA_TOKEN", "secret-token-3"),
        ];
        let mut vars = env(&secrets);
        vars.insert("PREFECT_API_URL".into(), "http://x/api".into());
        let s = Settings::from_start_args(&args(&[]), &vars).unwrap();
        assert_eq!(s.worker.run_defaults.settings_env.len(), 4);
        // Credentials in the API URL are taken out of it and used as the auth string.
        let mut vars = env(&secrets);
        vars.insert(
            "PREFECT_API_URL".into(),
            "http://dw%40user:secret-url-4@x/api".into(),
        );
        vars.remove("PREFECT_API_AUTH_STRING");
        vars.insert(
            "DOCKER_HOST".into(),
            "tcp://d:secret-docker-5@h:2375".into(),
        );
        let with_userinfo = Settings::from_start_args(&args(&[]), &vars).unwrap();
        assert_eq!(with_userinfo.api.api_url.as_str(), "http://x/api");
        assert_eq!(
            with_userinfo.api.auth_string.as_deref(),
            Some("dw@user:secret-url-4")
        );
        let text = format!("{with_userinfo:?}");
        assert!(
            !text.contains("secret-url-4") && !text.contains("secret-docker-5"),
            "{text}"
        );
        let bad = Settings::from_start_args(
            &args(&[]),
            &env(&[("PREFECT_API_URL", "ftp://u:secret-url-6@x/api")]),
        )
        .unwrap_err();
        assert!(!bad.to_string().contains("secret-url-6"), "{bad}");
        for text in [
            format!("{s:?}"),
            format!("{s:#?}"),
            format!("{:?}", s.worker.run_defaults),
        ] {
            for (name, value) in secrets {
                assert!(text.contains(name), "{name} missing from {text}");
                assert!(!text.contains(value), "{name}'s value printed: {text}");
            }
            assert!(text.contains("<redacted>"), "{text}");
        }
    }
}
