//! Validated, typed settings built from the command line and an injectable environment.
//!
//! Names and defaults are Prefect's (`PREFECT_API_URL`, `PREFECT_WORKER_QUERY_SECONDS`, …) so
//! an existing worker's environment works unchanged. Anything invalid is a [`ConfigError`]
//! that `main` turns into exit code 64.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use url::Url;

use crate::cli::{GcArgs, StartArgs};
use crate::gc::GcOptions;
use crate::health::EndpointSettings;
use crate::prefect::ClientConfig;

/// The image used when a job names none: the Prefect release this worker implements, on the
/// Python the reference worker runs on.
pub const DEFAULT_IMAGE: &str = "prefecthq/prefect:3.9.1-python3.11";

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
    /// The `--base-job-template` file cannot be used.
    #[error("cannot use base job template {path}: {reason}")]
    BaseJobTemplate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Settings of the worker loop.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Work pool name.
    pub pool: String,
    /// Worker name (heartbeat identity).
    pub name: String,
    /// Queues to poll; empty = all.
    pub work_queues: Vec<String>,
    /// Maximum concurrent runs.
    pub limit: Option<usize>,
    /// Look-ahead for scheduled runs.
    pub prefetch: Duration,
    /// Poll once, wait for the runs, exit.
    pub run_once: bool,
    /// Template to create the pool with.
    pub base_job_template: Option<Value>,
    /// Create a missing pool.
    pub create_pool_if_not_found: bool,
    /// Poll interval (`PREFECT_WORKER_QUERY_SECONDS`).
    pub query_interval: Duration,
    /// Heartbeat interval (`PREFECT_WORKER_HEARTBEAT_SECONDS`).
    pub heartbeat_interval: Duration,
    /// Image when the job names none.
    pub default_image: String,
    /// Send flow-run logs to the API.
    pub logging_to_api: bool,
    /// Interval of log batches.
    pub log_batch_interval: Duration,
    /// Size limits of flow-run logs (`PREFECT_LOGGING_TO_API_MAX_LOG_SIZE` / `_BATCH_SIZE`).
    pub log_limits: crate::logs::LogLimits,
    /// The worker's `PREFECT_*` settings handed to every flow-run container.
    pub settings_env: Vec<(String, String)>,
    /// Directory relative bind mounts are resolved against.
    pub cwd: PathBuf,
    /// Stop the containers of runs cancelled while running.
    pub stop_cancelled: bool,
    /// SIGTERM → SIGKILL grace when stopping them.
    pub cancel_grace: Duration,
    /// How often running runs are checked for cancellation.
    pub cancellation_poll: Duration,
    /// Also learn cancellations at once from the `/events/out` websocket.
    pub cancellation_events: bool,
    /// Poll at once when the `/events/out` websocket says one of the pool's runs became due.
    pub fast_pickup: bool,
    /// How many of a failed container's last output lines are sent as flow-run logs (0 = none).
    pub crash_log_lines: usize,
    /// Sample each container's memory and CPU and report them when it exits.
    pub resource_accounting: bool,
    /// Pull the images of the pool's deployments at start and when deployments change.
    pub prepull: bool,
    /// Emit the worker's and containers' Prefect events over `/events/in`.
    pub emit_events: bool,
    /// Sync over Prefect's worker channel websocket (≥ 3.9) when the server offers it,
    /// which also brings cleanup delivery; REST otherwise.
    pub worker_channel: bool,
    /// Collect the pool's finished containers this often; `None` = never.
    pub gc_interval: Option<Duration>,
    /// Periodic collection keeps containers that finished less than this long ago.
    pub gc_older_than: Duration,
}

/// Settings of the Docker connection.
#[derive(Debug, Clone)]
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
    /// Worker loop settings.
    pub worker: WorkerSettings,
    /// Docker settings.
    pub docker: DockerSettings,
    /// `/health` and `/metrics`; `None` when neither is enabled.
    pub endpoints: Option<EndpointSettings>,
    /// Log format on stderr.
    pub log_format: LogFormat,
    /// Log level filter (`RUST_LOG` syntax).
    pub log_filter: String,
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
    /// Log level filter (`RUST_LOG` syntax) for the stderr log.
    pub log_filter: String,
}

/// How long a container must have been finished before garbage collection removes it, when
/// neither `--older-than` nor `DOCKER_WORKER_GC_OLDER_THAN` says.
pub const DEFAULT_GC_OLDER_THAN: Duration = Duration::from_secs(24 * 3600);

/// Prefect 3.9.1's packaged `profiles.toml`, used when the user has none (as Prefect does):
/// its active `ephemeral` profile sets `PREFECT_SERVER_EPHEMERAL_ENABLED`, which the reference
/// then passes into every flow-run container.
const DEFAULT_PROFILES: &str = r#"active = "ephemeral"

[profiles.ephemeral]
PREFECT_SERVER_EPHEMERAL_ENABLED = "true"

[profiles.local]
PREFECT_API_URL = "http://127.0.0.1:4200/api"

[profiles.test]
PREFECT_SERVER_EPHEMERAL_ENABLED = "true"
PREFECT_SERVER_DATABASE_CONNECTION_URL = "sqlite+aiosqlite:///:memory:"

[profiles.cloud]
"#;

/// The process environment with the active Prefect profile underneath, as Prefect resolves
/// settings: environment over profile over defaults. The profile is
/// `$PREFECT_PROFILES_PATH` (default `$PREFECT_HOME/profiles.toml`, `PREFECT_HOME` default
/// `~/.prefect`); `PREFECT_PROFILE` selects it, else the file's `active`.
///
/// # Errors
/// [`ConfigError::Profiles`] for an unreadable or malformed file, or a selected profile that
/// does not exist.
pub fn with_profile(
    process_env: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let home = process_env
        .get("PREFECT_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            process_env
                .get("HOME")
                .map(|h| PathBuf::from(h).join(".prefect"))
        });
    let explicit_path = process_env.contains_key("PREFECT_PROFILES_PATH");
    let path = match process_env.get("PREFECT_PROFILES_PATH") {
        Some(p) => PathBuf::from(p),
        None => match home {
            Some(h) => h.join("profiles.toml"),
            None => return Ok(process_env),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        // Like Prefect: with no profiles file of the user's, its packaged defaults apply.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit_path => {
            DEFAULT_PROFILES.to_owned()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(process_env),
        Err(e) => {
            return Err(ConfigError::Profiles {
                path,
                reason: e.to_string(),
            });
        }
    };
    let doc: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Profiles {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let selected = process_env.get("PREFECT_PROFILE").cloned().or_else(|| {
        doc.get("active")
            .and_then(|a| a.as_str())
            .map(str::to_owned)
    });
    let Some(selected) = selected else {
        return Ok(process_env);
    };
    let profile = doc
        .get("profiles")
        .and_then(|p| p.get(&selected))
        .and_then(|p| p.as_table());
    let Some(profile) = profile else {
        if process_env.contains_key("PREFECT_PROFILE") {
            return Err(ConfigError::Profiles {
                path,
                reason: format!("profile '{selected}' not found"),
            });
        }
        return Ok(process_env);
    };
    let mut merged: BTreeMap<String, String> = profile
        .iter()
        .map(|(k, v)| {
            let value = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => serde_json::to_string(other).unwrap_or_default(),
            };
            (k.clone(), value)
        })
        .collect();
    merged.extend(process_env);
    Ok(merged)
}

fn endpoint_addr(env: &BTreeMap<String, String>) -> Result<SocketAddr, ConfigError> {
    let host = non_empty(env, "PREFECT_WORKER_WEBSERVER_HOST").unwrap_or_else(|| "0.0.0.0".into());
    let port_text =
        non_empty(env, "PREFECT_WORKER_WEBSERVER_PORT").unwrap_or_else(|| "8080".into());
    let port: u16 = port_text.trim().parse().map_err(|_| ConfigError::Invalid {
        name: "PREFECT_WORKER_WEBSERVER_PORT".into(),
        value: port_text.clone(),
        reason: "expected a TCP port number".into(),
    })?;
    (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ConfigError::Invalid {
            name: "PREFECT_WORKER_WEBSERVER_HOST".into(),
            value: host,
            reason: "expected an address to listen on".into(),
        })
}

fn seconds(
    env: &BTreeMap<String, String>,
    name: &str,
    default: f64,
) -> Result<Duration, ConfigError> {
    match env.get(name).map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => Ok(Duration::from_secs_f64(default)),
        Some(text) => text
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| ConfigError::Invalid {
                name: name.to_owned(),
                value: text.to_owned(),
                reason: "expected a non-negative number of seconds".into(),
            }),
    }
}

fn boolean(env: &BTreeMap<String, String>, name: &str, default: bool) -> Result<bool, ConfigError> {
    match env.get(name).map(|s| s.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if v.is_empty() => Ok(default),
        Some(v) => match v.as_str() {
            "1" | "true" | "t" | "yes" | "y" | "on" => Ok(true),
            "0" | "false" | "f" | "no" | "n" | "off" => Ok(false),
            _ => Err(ConfigError::Invalid {
                name: name.to_owned(),
                value: v,
                reason: "expected true or false".into(),
            }),
        },
    }
}

/// `PREFECT_LOGGING_TO_API_MAX_LOG_SIZE` / `_BATCH_SIZE`, checked as Prefect checks them.
fn log_limits(env: &BTreeMap<String, String>) -> Result<crate::logs::LogLimits, ConfigError> {
    let defaults = crate::logs::LogLimits::default();
    let limits = crate::logs::LogLimits {
        max_log_size: count(
            env,
            "PREFECT_LOGGING_TO_API_MAX_LOG_SIZE",
            defaults.max_log_size,
        )?,
        batch_size: count(
            env,
            "PREFECT_LOGGING_TO_API_BATCH_SIZE",
            defaults.batch_size,
        )?,
    };
    if limits.batch_size < limits.max_log_size {
        return Err(ConfigError::Invalid {
            name: "PREFECT_LOGGING_TO_API_MAX_LOG_SIZE".into(),
            value: limits.max_log_size.to_string(),
            reason: "`PREFECT_LOGGING_TO_API_MAX_LOG_SIZE` cannot be larger than `PREFECT_LOGGING_TO_API_BATCH_SIZE`".into(),
        });
    }
    Ok(limits)
}

/// A non-negative whole number from the environment.
fn count(env: &BTreeMap<String, String>, name: &str, default: usize) -> Result<usize, ConfigError> {
    match non_empty(env, name) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| ConfigError::Invalid {
            name: name.into(),
            value: v.clone(),
            reason: "expected a whole number".into(),
        }),
    }
}

fn non_empty(env: &BTreeMap<String, String>, name: &str) -> Option<String> {
    env.get(name).filter(|v| !v.trim().is_empty()).cloned()
}

/// A human duration (`30m`, `24h`, `7d`, `1h 30m`, `0s`) from a flag, else from `env_name`,
/// else `default`. `name` is what an error names.
fn human_duration(
    flag: Option<&str>,
    name: &str,
    env: &BTreeMap<String, String>,
    env_name: &str,
    default: Option<Duration>,
) -> Result<Option<Duration>, ConfigError> {
    let (name, text) = match flag {
        Some(text) => (name, text.to_owned()),
        None => match non_empty(env, env_name) {
            Some(text) => (env_name, text),
            None => return Ok(default),
        },
    };
    humantime::parse_duration(text.trim())
        .map(Some)
        .map_err(|e| ConfigError::Invalid {
            name: name.to_owned(),
            value: text.clone(),
            reason: format!("expected a duration such as 30m, 24h or 7d ({e})"),
        })
}

/// The Prefect API client settings: `PREFECT_API_URL` and the client's `PREFECT_*` knobs.
fn api_settings(
    env: &BTreeMap<String, String>,
    worker_name: Option<String>,
) -> Result<ClientConfig, ConfigError> {
    let api_url_text = non_empty(env, "PREFECT_API_URL").ok_or(ConfigError::MissingApiUrl)?;
    let api_url = Url::parse(api_url_text.trim())
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| ConfigError::Invalid {
            name: "PREFECT_API_URL".into(),
            value: api_url_text.clone(),
            reason: "expected an http(s) URL such as http://127.0.0.1:4200/api".into(),
        })?;
    let max_retries = match env.get("PREFECT_CLIENT_MAX_RETRIES").map(|s| s.trim()) {
        None | Some("") => 5,
        Some(v) => v.parse().map_err(|_| ConfigError::Invalid {
            name: "PREFECT_CLIENT_MAX_RETRIES".into(),
            value: v.into(),
            reason: "expected a whole number".into(),
        })?,
    };
    Ok(ClientConfig {
        api_url,
        api_key: non_empty(env, "PREFECT_API_KEY"),
        auth_string: non_empty(env, "PREFECT_API_AUTH_STRING"),
        timeout: seconds(env, "PREFECT_API_REQUEST_TIMEOUT", 60.0)?,
        max_retries,
        worker_name,
        csrf_enabled: boolean(env, "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", true)?,
    })
}

/// The Docker connection settings, read as the Docker CLI reads them.
fn docker_settings(env: &BTreeMap<String, String>) -> Result<DockerSettings, ConfigError> {
    Ok(DockerSettings {
        host: non_empty(env, "DOCKER_HOST"),
        timeout: seconds(env, "DOCKER_CLIENT_TIMEOUT", 60.0)?,
        tls_cert_dir: non_empty(env, "DOCKER_TLS_VERIFY")
            .filter(|v| v.trim() != "0")
            .and_then(|_| {
                non_empty(env, "DOCKER_CERT_PATH")
                    .map(PathBuf::from)
                    .or_else(|| env.get("HOME").map(|h| PathBuf::from(h).join(".docker")))
            }),
        config_dir: non_empty(env, "DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| env.get("HOME").map(|h| PathBuf::from(h).join(".docker"))),
    })
}

/// The stderr log filter: `RUST_LOG`, else `PREFECT_LOGGING_LEVEL` in tracing's words, else info.
fn log_filter(env: &BTreeMap<String, String>) -> String {
    non_empty(env, "RUST_LOG")
        .or_else(|| {
            non_empty(env, "PREFECT_LOGGING_LEVEL").map(|l| {
                match l.trim().to_ascii_lowercase().as_str() {
                    "warning" => "warn".to_owned(),
                    "critical" => "error".to_owned(),
                    other => other.to_owned(),
                }
            })
        })
        .unwrap_or_else(|| "info".into())
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
        if args.pool.as_deref().is_some_and(|p| p.trim().is_empty()) {
            return Err(ConfigError::Invalid {
                name: "--pool".into(),
                value: String::new(),
                reason: "the work pool name cannot be empty".into(),
            });
        }
        let older_than = human_duration(
            args.older_than.as_deref(),
            "--older-than",
            env,
            "DOCKER_WORKER_GC_OLDER_THAN",
            Some(DEFAULT_GC_OLDER_THAN),
        )?
        .unwrap_or(DEFAULT_GC_OLDER_THAN);
        Ok(Self {
            api: api_settings(env, None)?,
            docker: docker_settings(env)?,
            options: GcOptions {
                pool: args.pool.clone(),
                older_than,
                dry_run: args.dry_run,
            },
            log_filter: log_filter(env),
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
        // Checked first: a missing API URL is the most common mistake and says what to do.
        non_empty(env, "PREFECT_API_URL").ok_or(ConfigError::MissingApiUrl)?;

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
        if args.pool.trim().is_empty() {
            return Err(ConfigError::Invalid {
                name: "--pool".into(),
                value: args.pool.clone(),
                reason: "the work pool name cannot be empty".into(),
            });
        }
        if args.limit == Some(0) {
            return Err(ConfigError::Invalid {
                name: "--limit".into(),
                value: "0".into(),
                reason: "the limit must be at least 1".into(),
            });
        }

        let base_job_template = match &args.base_job_template {
            None => None,
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| ConfigError::BaseJobTemplate {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                let value: Value =
                    serde_json::from_str(&text).map_err(|e| ConfigError::BaseJobTemplate {
                        path: path.clone(),
                        reason: format!("not valid JSON: {e}"),
                    })?;
                if !value.get("job_configuration").is_some_and(Value::is_object) {
                    return Err(ConfigError::BaseJobTemplate {
                        path: path.clone(),
                        reason: "expected an object with `job_configuration` and `variables`"
                            .into(),
                    });
                }
                Some(value)
            }
        };

        let prefetch = match args.prefetch_seconds {
            Some(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
            Some(s) => {
                return Err(ConfigError::Invalid {
                    name: "--prefetch-seconds".into(),
                    value: s.to_string(),
                    reason: "expected a non-negative number".into(),
                });
            }
            None => seconds(env, "PREFECT_WORKER_PREFETCH_SECONDS", 10.0)?,
        };
        // The Python CLI truncates the heartbeat interval to whole seconds.
        let heartbeat = seconds(env, "PREFECT_WORKER_HEARTBEAT_SECONDS", 30.0)?;
        let heartbeat = Duration::from_secs(heartbeat.as_secs().max(1));

        // Every explicitly set Prefect setting goes to the flow-run container, as the reference
        // does, so the engine inside talks to the same API with the same credentials. Internal
        // `PREFECT__*` variables are the worker's own and are set per run instead.
        // Booleans are written as Python prints them, as the reference's settings export does.
        let settings_env: Vec<(String, String)> = env
            .iter()
            .filter(|(k, _)| k.starts_with("PREFECT_") && !k.starts_with("PREFECT__"))
            .map(|(k, v)| {
                let value = match v.trim().to_ascii_lowercase().as_str() {
                    "true" => "True".to_owned(),
                    "false" => "False".to_owned(),
                    _ => v.clone(),
                };
                (k.clone(), value)
            })
            .collect();

        let default_image = args
            .default_image
            .clone()
            .or_else(|| non_empty(env, "DOCKER_WORKER_DEFAULT_IMAGE"))
            .unwrap_or_else(|| DEFAULT_IMAGE.to_owned());

        let query_interval = seconds(env, "PREFECT_WORKER_QUERY_SECONDS", 10.0)?;
        let metrics = args.with_metrics || boolean(env, "DOCKER_WORKER_METRICS_ENABLED", false)?;
        let endpoints = if args.with_healthcheck || metrics {
            Some(EndpointSettings {
                addr: endpoint_addr(env)?,
                health: args.with_healthcheck,
                metrics,
                unhealthy_after: query_interval * 30,
            })
        } else {
            None
        };
        let log_format_text = args
            .log_format
            .clone()
            .or_else(|| non_empty(env, "DOCKER_WORKER_LOG_FORMAT"))
            .unwrap_or_else(|| "text".into());
        let log_format = match log_format_text.trim().to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => {
                return Err(ConfigError::Invalid {
                    name: "--log-format".into(),
                    value: log_format_text,
                    reason: "expected `text` or `json`".into(),
                });
            }
        };
        let log_filter = log_filter(env);
        // `0` turns the periodic collection off, like leaving it unset.
        let gc_interval = human_duration(
            args.gc_interval.as_deref(),
            "--gc-interval",
            env,
            "DOCKER_WORKER_GC_INTERVAL",
            None,
        )?
        .filter(|d| !d.is_zero());
        let gc_older_than = human_duration(
            args.gc_older_than.as_deref(),
            "--gc-older-than",
            env,
            "DOCKER_WORKER_GC_OLDER_THAN",
            Some(DEFAULT_GC_OLDER_THAN),
        )?
        .unwrap_or(DEFAULT_GC_OLDER_THAN);

        Ok(Self {
            endpoints,
            log_format,
            log_filter,
            api: api_settings(env, Some(name.clone()))?,
            worker: WorkerSettings {
                pool: args.pool.clone(),
                name,
                work_queues: args.work_queue.clone(),
                limit: args.limit,
                prefetch,
                run_once: args.run_once,
                base_job_template,
                create_pool_if_not_found: !args.no_create_pool_if_not_found,
                query_interval,
                heartbeat_interval: heartbeat,
                default_image,
                logging_to_api: boolean(env, "PREFECT_LOGGING_TO_API_ENABLED", true)?,
                log_batch_interval: seconds(env, "PREFECT_LOGGING_TO_API_BATCH_INTERVAL", 2.0)?,
                log_limits: log_limits(env)?,
                settings_env,
                cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
                stop_cancelled: !args.no_stop_cancelled
                    && boolean(env, "DOCKER_WORKER_STOP_CANCELLED", true)?,
                cancel_grace: match args.cancel_grace {
                    Some(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
                    Some(s) => {
                        return Err(ConfigError::Invalid {
                            name: "--cancel-grace".into(),
                            value: s.to_string(),
                            reason: "expected a non-negative number of seconds".into(),
                        });
                    }
                    None => seconds(env, "DOCKER_WORKER_CANCEL_GRACE_SECONDS", 30.0)?,
                },
                cancellation_poll: seconds(env, "DOCKER_WORKER_CANCELLATION_POLL_SECONDS", 10.0)?,
                cancellation_events: boolean(env, "DOCKER_WORKER_CANCELLATION_EVENTS", true)?,
                fast_pickup: boolean(env, "DOCKER_WORKER_FAST_PICKUP", true)?,
                crash_log_lines: count(env, "DOCKER_WORKER_CRASH_LOG_LINES", 200)?,
                resource_accounting: boolean(env, "DOCKER_WORKER_RESOURCE_ACCOUNTING", true)?,
                prepull: args.prepull || boolean(env, "DOCKER_WORKER_PREPULL", false)?,
                emit_events: boolean(env, "DOCKER_WORKER_EMIT_EVENTS", true)?,
                worker_channel: boolean(env, "DOCKER_WORKER_CHANNEL", true)?,
                gc_interval,
                gc_older_than,
            },
            docker: docker_settings(env)?,
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
            crate::cli::Command::Start(a) => a,
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
    fn defaults() {
        let s = Settings::from_start_args(
            &args(&[]),
            &env(&[("PREFECT_API_URL", "http://127.0.0.1:4200/api")]),
        )
        .unwrap();
        assert!(s.worker.name.starts_with("DockerWorker "));
        assert_eq!(s.worker.query_interval, Duration::from_secs(10));
        assert_eq!(s.worker.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(s.worker.prefetch, Duration::from_secs(10));
        assert_eq!(s.api.timeout, Duration::from_secs(60));
        assert!(s.worker.create_pool_if_not_found);
        assert_eq!(s.worker.default_image, DEFAULT_IMAGE);
        assert_eq!(
            s.worker.settings_env,
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
        assert_eq!(s.log_filter, "warn");
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
        assert_eq!(s.worker.gc_interval, None);
        assert_eq!(s.worker.gc_older_than, Duration::from_secs(86_400));
        let s = Settings::from_start_args(
            &args(&["--gc-interval", "1s", "--gc-older-than", "0s"]),
            &env(&base),
        )
        .unwrap();
        assert_eq!(s.worker.gc_interval, Some(Duration::from_secs(1)));
        assert_eq!(s.worker.gc_older_than, Duration::ZERO);
        let s = Settings::from_start_args(
            &args(&[]),
            &env(&[
                ("PREFECT_API_URL", "http://x/api"),
                ("DOCKER_WORKER_GC_INTERVAL", "1h"),
                ("DOCKER_WORKER_GC_OLDER_THAN", "7d"),
            ]),
        )
        .unwrap();
        assert_eq!(s.worker.gc_interval, Some(Duration::from_secs(3600)));
        assert_eq!(s.worker.gc_older_than, Duration::from_secs(7 * 86_400));
        let s = Settings::from_start_args(
            &args(&[]),
            &env(&[
                ("PREFECT_API_URL", "http://x/api"),
                ("DOCKER_WORKER_GC_INTERVAL", "0"),
            ]),
        )
        .unwrap();
        assert_eq!(s.worker.gc_interval, None, "0 turns it off");
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
        assert_eq!(s.worker.limit, Some(2));
        assert!(s.worker.run_once && !s.worker.create_pool_if_not_found);
        assert_eq!(s.worker.prefetch, Duration::from_secs(3));
        assert_eq!(s.worker.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(s.api.api_key.as_deref(), Some("k"));
        assert!(
            !s.worker
                .settings_env
                .iter()
                .any(|(k, _)| k.starts_with("PREFECT__"))
        );
    }

    #[test]
    fn flow_run_log_size_limits_default_to_prefects_and_are_checked_as_it_checks_them() {
        let base = [("PREFECT_API_URL", "http://x/api")];
        let s = Settings::from_start_args(&args(&[]), &env(&base)).unwrap();
        assert_eq!(s.worker.log_limits, crate::logs::LogLimits::default());
        assert_eq!(s.worker.log_limits.max_log_size, 1_000_000);
        assert_eq!(s.worker.log_limits.batch_size, 4_000_000);
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
                s.worker.log_limits.max_log_size,
                s.worker.log_limits.batch_size
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
}
