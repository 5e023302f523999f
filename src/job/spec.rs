//! From a validated job configuration and the run's context to the exact container to create.
//!
//! Pure. This is `prepare_for_flow_run` plus the Docker worker's rules: environment and
//! attribution variables, the API-URL rewrite, labels, the container name, network mode
//! inference and the `host.docker.internal` extra host.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::config::{DockerJobConfiguration, RegistryCredentials};
use super::image::{ImageRef, InvalidImage, PullPolicy};
use super::labels::{self, docker_label_key};
use super::slug::container_name;
use super::template::{apply_values, python_str};

/// The Prefect release whose behaviour (and version labels) this worker reproduces.
pub const PREFECT_VERSION: &str = "3.9.1";

/// Everything about the run that the job configuration does not say.
#[derive(Debug, Clone, Copy)]
pub struct RunContext<'a> {
    /// The flow run as the API returned it.
    pub flow_run: &'a Value,
    /// The run's flow.
    pub flow: Option<&'a Value>,
    /// The run's deployment, if any.
    pub deployment: Option<&'a Value>,
    /// This worker's name.
    pub worker_name: &'a str,
    /// The work pool's name.
    pub work_pool_name: &'a str,
    /// The work pool's id.
    pub work_pool_id: &'a str,
    /// The worker's Prefect settings to hand to the container (`PREFECT_API_URL`, key, …).
    pub settings_env: &'a [(String, String)],
    /// Image used when the job names none.
    pub default_image: &'a str,
    /// The Docker Engine's version string (`20.10.24+dfsg1`), for the host-gateway rule.
    pub engine_version: Option<&'a str>,
    /// Under rootless Docker, the address containers reach the host's loopback at
    /// (rootlesskit's); `None` on a rootful Engine. There `host` networking is rootlesskit's
    /// namespace and `host-gateway` its bridge, so neither reaches a localhost API.
    pub rootless_host: Option<&'a str>,
}

/// The container to create, in terms the Docker runtime understands (no Prefect types).
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    /// Image reference.
    pub image: String,
    /// Effective pull policy (the by-tag default already applied).
    pub pull_policy: PullPolicy,
    /// Login for pulls.
    pub registry_credentials: Option<RegistryCredentials>,
    /// Container name; `None` lets Docker choose.
    pub name: Option<String>,
    /// `Cmd`.
    pub command: Vec<String>,
    /// `Env`, in order.
    pub env: Vec<(String, String)>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `HostConfig.NetworkMode` (`default` when none was chosen).
    pub network_mode: String,
    /// Networks to connect after create (all but the first).
    pub extra_networks: Vec<String>,
    /// `HostConfig.Binds`.
    pub binds: Vec<String>,
    /// `Volumes`: container paths.
    pub volume_paths: Vec<String>,
    /// `HostConfig.Memory`.
    pub mem_limit: Option<i64>,
    /// `HostConfig.MemorySwap`.
    pub memswap_limit: Option<i64>,
    /// `HostConfig.Privileged`.
    pub privileged: bool,
    /// `HostConfig.AutoRemove`.
    pub auto_remove: bool,
    /// Print the output on the worker's stdout.
    pub stream_output: bool,
    /// `HostConfig.ExtraHosts`; `None` omits the key.
    pub extra_hosts: Option<Vec<String>>,
    /// Extra create-body fields from `container_create_kwargs`.
    pub config_overrides: Map<String, Value>,
    /// Extra `HostConfig` fields from `container_create_kwargs`.
    pub host_config_overrides: Map<String, Value>,
    /// A label (`key`, `value`) no other container on the host may carry at the same time:
    /// the flow run id, so two workers sharing a host never both start one run.
    pub exclusive_label: Option<(String, String)>,
    /// Image platform (`linux/arm64`) for the pull and the create, when the job names one.
    pub platform: Option<String>,
    /// The longest the container may run (the job variable `max_runtime`); not sent to the
    /// Engine: the worker stops the container when it is over.
    pub max_runtime: Option<std::time::Duration>,
    /// The `container_create_kwargs` keys the job gave (those that are not job fields), for
    /// a host policy that allows only some.
    pub create_kwargs_keys: Vec<String>,
}

#[cfg(test)]
impl ContainerSpec {
    /// A spec running `image` with nothing else set, for tests of code that takes a spec.
    pub fn for_tests(image: &str) -> Self {
        Self {
            image: image.into(),
            pull_policy: PullPolicy::Never,
            registry_credentials: None,
            name: None,
            command: Vec::new(),
            env: Vec::new(),
            labels: BTreeMap::new(),
            network_mode: "default".into(),
            extra_networks: Vec::new(),
            binds: Vec::new(),
            volume_paths: Vec::new(),
            mem_limit: None,
            memswap_limit: None,
            privileged: false,
            auto_remove: false,
            stream_output: false,
            extra_hosts: None,
            config_overrides: Map::new(),
            host_config_overrides: Map::new(),
            exclusive_label: None,
            platform: None,
            create_kwargs_keys: Vec::new(),
            max_runtime: None,
        }
    }
}

impl ContainerSpec {
    /// Whether the container's output is forwarded to its run's logs: the decision travels on
    /// the container as its [`labels::LOGS_TO_API`] label, so a worker adopting it after a
    /// restart reads it the same way from the container.
    pub fn forwards_output(&self) -> bool {
        self.labels
            .get(labels::LOGS_TO_API)
            .is_some_and(|v| v == "true")
    }

    /// Marks the container's output as forwarded (the worker's `--logs-to-api`).
    pub fn forward_output(&mut self) {
        self.labels
            .insert(labels::LOGS_TO_API.to_owned(), "true".to_owned());
    }
}

/// Why a valid configuration still cannot become a container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    /// The image reference cannot be split into name and tag.
    #[error(transparent)]
    InvalidImage(#[from] InvalidImage),
    /// The command is not valid shell words.
    #[error("invalid command {command:?}: unbalanced quotes")]
    InvalidCommand {
        /// The command as configured.
        command: String,
    },
    /// `extra_hosts` is neither an object nor a list of `host:ip`.
    #[error("container_create_kwargs.extra_hosts must be an object or a list of 'host:ip' strings")]
    InvalidExtraHosts,
}

fn str_field<'v>(value: Option<&'v Value>, key: &str) -> Option<&'v str> {
    value?.get(key)?.as_str()
}

/// Does an API URL point at this host (the reference's unanchored pattern, dots as wildcards)?
fn looks_local(api_url: &str) -> bool {
    let matches_at = |pattern: &str| {
        let p: Vec<char> = pattern.chars().collect();
        let t: Vec<char> = api_url.chars().collect();
        t.windows(p.len())
            .any(|w| w.iter().zip(&p).all(|(c, pc)| *pc == '.' || c == pc))
    };
    matches_at("localhost") || matches_at("127.0.0.1") || matches_at("host.docker.internal")
}

/// Parses Docker's non-semver version strings (`20.10.24+dfsg1`, `17.03.0-ce`).
pub fn engine_version(text: &str) -> Option<semver::Version> {
    let core = text
        .trim()
        .trim_start_matches('v')
        .split(['+', '-', '~'])
        .next()?;
    let mut nums = core.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u64>()
            .ok()
    });
    let major = nums.next()??;
    let minor = nums.next().flatten().unwrap_or(0);
    let patch = nums.next().flatten().unwrap_or(0);
    Some(semver::Version::new(major, minor, patch))
}

/// The host of an API URL, as Python's `urlparse(url).hostname` reads it (credentials before
/// an `@` are not the host).
fn api_url_host(url: &str) -> &str {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let netloc = after_scheme.split('/').next().unwrap_or_default();
    let host_port = netloc.rsplit_once('@').map_or(netloc, |(_, h)| h);
    host_port.split(':').next().unwrap_or_default()
}

/// Python `datetime.isoformat()` of a UTC timestamp from the API (`+00:00`, no zero micros).
fn python_isoformat_utc(text: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(text) {
        Ok(dt) => {
            let dt = dt.with_timezone(&chrono::Utc);
            if dt.timestamp_subsec_micros() == 0 {
                dt.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
            } else {
                dt.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
            }
        }
        Err(_) => text.to_owned(),
    }
}

fn extra_host_entries(value: &Value) -> Result<Vec<(String, String)>, PrepareError> {
    match value {
        Value::Object(map) => Ok(map
            .iter()
            .map(|(k, v)| (k.clone(), python_str(v)))
            .collect()),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .and_then(|s| s.split_once(':'))
                    .map(|(h, ip)| (h.to_owned(), ip.to_owned()))
                    .ok_or(PrepareError::InvalidExtraHosts)
            })
            .collect(),
        _ => Err(PrepareError::InvalidExtraHosts),
    }
}

impl DockerJobConfiguration {
    /// Applies the per-run additions and Docker rules, producing the container to create.
    ///
    /// # Errors
    /// [`PrepareError`] for an unparsable image, command or `extra_hosts`.
    pub fn prepare(&self, ctx: &RunContext<'_>) -> Result<ContainerSpec, PrepareError> {
        let flow_run_id = str_field(Some(ctx.flow_run), "id").unwrap_or_default();
        let flow_run_name = str_field(Some(ctx.flow_run), "name").unwrap_or_default();
        let network_mode = self.network_mode_for(ctx);
        let env = self.container_env(ctx, flow_run_id, network_mode == "host");
        let labels = self.container_labels(ctx, flow_run_id, flow_run_name);
        let name = container_name(&self.name_source(ctx, flow_run_name));
        // The errors come in this order: command, image, extra_hosts.
        let command = self.command_words()?;
        let (image, pull_policy) = self.image_and_pull_policy(ctx)?;
        let automatic = automatic_extra_hosts(&env, ctx.engine_version, ctx.rootless_host);
        let extra_hosts = merge_extra_hosts(automatic, self.overrides.extra_hosts.as_ref())?;
        Ok(ContainerSpec {
            image,
            pull_policy,
            registry_credentials: self.registry_credentials.clone(),
            name,
            command,
            env,
            labels,
            network_mode,
            extra_networks: self.networks.iter().skip(1).cloned().collect(),
            binds: self.volumes.iter().map(|v| v.bind.clone()).collect(),
            volume_paths: self
                .volumes
                .iter()
                .map(|v| v.container_path.clone())
                .collect(),
            mem_limit: self.mem_limit,
            memswap_limit: self.memswap_limit,
            privileged: self.privileged,
            auto_remove: self.auto_remove,
            stream_output: self.stream_output,
            extra_hosts,
            config_overrides: self.config_overrides(),
            host_config_overrides: self.overrides.host_config.clone(),
            exclusive_label: Some((labels::FLOW_RUN_ID.to_owned(), flow_run_id.to_owned())),
            platform: self.typed.platform.clone(),
            max_runtime: self.typed.max_runtime,
            create_kwargs_keys: self.overrides.keys.clone(),
        })
    }

    /// `HostConfig.NetworkMode`: the first network, else the explicit mode, else `host` when
    /// no networks are given and the API URL (the job's, else the worker's) is on this Linux
    /// host, else `default`.
    fn network_mode_for(&self, ctx: &RunContext<'_>) -> String {
        if let Some(first) = self.networks.first() {
            return first.clone();
        }
        let inferred = match &self.network_mode {
            Some(mode) => Some(mode.clone()),
            None => {
                let job_api_url = self
                    .env
                    .iter()
                    .find(|(k, _)| k == "PREFECT_API_URL")
                    .and_then(|(_, v)| v.as_deref());
                let worker_api_url = ctx
                    .settings_env
                    .iter()
                    .find(|(k, _)| k == "PREFECT_API_URL")
                    .map(|(_, v)| v.as_str());
                job_api_url
                    .or(worker_api_url)
                    .filter(|url| matches!(api_url_host(url), "localhost" | "127.0.0.1"))
                    .filter(|_| cfg!(target_os = "linux") && ctx.rootless_host.is_none())
                    .map(|_| "host".to_owned())
            }
        };
        inferred.unwrap_or_else(|| "default".to_owned())
    }

    /// `Env`: the worker's settings (the API URL rewritten to `host.docker.internal` unless
    /// the container shares the host's network), the run id, attribution, then the job's own
    /// variables, which win; a job variable set to null removes the key.
    fn container_env(
        &self,
        ctx: &RunContext<'_>,
        flow_run_id: &str,
        host_mode: bool,
    ) -> Vec<(String, String)> {
        let mut env: Map<String, Value> = Map::new();
        for (k, v) in ctx.settings_env {
            // Under rootless Docker even `host` networking is not the host's: rewrite there too.
            let value = if k == "PREFECT_API_URL" && (!host_mode || ctx.rootless_host.is_some()) {
                v.replace("localhost", "host.docker.internal")
                    .replace("127.0.0.1", "host.docker.internal")
            } else {
                v.clone()
            };
            env.insert(k.clone(), json!(value));
        }
        env.insert("PREFECT__FLOW_RUN_ID".into(), json!(flow_run_id));
        env.insert("PREFECT__WORKER_NAME".into(), json!(ctx.worker_name));
        let attribution = [
            ("PREFECT__FLOW_ID", str_field(ctx.flow, "id")),
            ("PREFECT__FLOW_NAME", str_field(ctx.flow, "name")),
            ("PREFECT__DEPLOYMENT_ID", str_field(ctx.deployment, "id")),
            (
                "PREFECT__DEPLOYMENT_NAME",
                str_field(ctx.deployment, "name"),
            ),
        ];
        for (key, value) in attribution {
            if let Some(value) = value {
                env.insert(key.into(), json!(value));
            }
        }
        for (k, v) in &self.env {
            env.insert(k.clone(), v.clone().map_or(Value::Null, Value::String));
        }
        env.into_iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_owned())))
            .collect()
    }

    /// `Labels`: Prefect's, then the user's (which may replace them), then the version; keys
    /// in Docker's reverse-DNS convention.
    fn container_labels(
        &self,
        ctx: &RunContext<'_>,
        flow_run_id: &str,
        flow_run_name: &str,
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (k, v) in prefect_labels(ctx, flow_run_id, flow_run_name)
            .into_iter()
            .chain(self.labels.iter().cloned())
        {
            out.insert(docker_label_key(&k), v);
        }
        out.insert(labels::VERSION.into(), PREFECT_VERSION.into());
        if let Some(limit) = self.typed.max_runtime {
            // Whole seconds, at least one: the label must never mean "no time at all left".
            out.insert(
                labels::MAX_RUNTIME.into(),
                limit.as_secs().max(1).to_string(),
            );
        }
        if self.typed.stream_output_to_api == Some(true) {
            out.insert(labels::LOGS_TO_API.into(), "true".into());
        }
        out
    }

    /// The text the container name is made from: the job's `name` rendered with
    /// `ctx.flow` / `ctx.flow_run`, or the run's name when that is unset or renders empty.
    fn name_source(&self, ctx: &RunContext<'_>, flow_run_name: &str) -> String {
        self.name
            .as_deref()
            .map(|template| render_name(template, ctx))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| flow_run_name.to_owned())
    }

    /// `Cmd`: the job's command split into shell words, or `prefect flow-run execute`.
    fn command_words(&self) -> Result<Vec<String>, PrepareError> {
        match &self.command {
            None => Ok(vec!["prefect".into(), "flow-run".into(), "execute".into()]),
            Some(cmd) => shlex::split(cmd).ok_or_else(|| PrepareError::InvalidCommand {
                command: cmd.clone(),
            }),
        }
    }

    /// The image (the job's, else the worker's default) and its pull policy (the job's, else
    /// the one its tag implies).
    fn image_and_pull_policy(
        &self,
        ctx: &RunContext<'_>,
    ) -> Result<(String, PullPolicy), PrepareError> {
        let image = self
            .image
            .clone()
            .unwrap_or_else(|| ctx.default_image.to_owned());
        let image_ref = ImageRef::parse(&image)?;
        let pull_policy = self
            .image_pull_policy
            .unwrap_or_else(|| image_ref.default_pull_policy());
        Ok((image, pull_policy))
    }

    /// The create body's extra fields from `container_create_kwargs`, with
    /// `NetworkingConfig` when validation kept it (it names the first network, which is how
    /// docker-py uses it).
    fn config_overrides(&self) -> Map<String, Value> {
        let mut config = self.overrides.config.clone();
        if let Some(endpoints) = &self.overrides.networking_config {
            config.insert(
                "NetworkingConfig".into(),
                json!({"EndpointsConfig": endpoints}),
            );
        }
        config
    }
}

/// Prefect's labels for a run: the always-present ones, then those of the flow and
/// deployment that the context has (keys already in Docker's form).
fn prefect_labels(
    ctx: &RunContext<'_>,
    flow_run_id: &str,
    flow_run_name: &str,
) -> Vec<(String, String)> {
    let always = [
        (labels::FLOW_RUN_ID, flow_run_id),
        (labels::FLOW_RUN_NAME, flow_run_name),
        (labels::VERSION, PREFECT_VERSION),
        (labels::WORK_POOL_NAME, ctx.work_pool_name),
        (labels::WORK_POOL_ID, ctx.work_pool_id),
        (labels::WORKER_NAME, ctx.worker_name),
    ];
    let optional = [
        (
            labels::FLOW_ID,
            str_field(ctx.flow, "id").map(str::to_owned),
        ),
        (
            labels::FLOW_NAME,
            str_field(ctx.flow, "name").map(str::to_owned),
        ),
        (
            labels::DEPLOYMENT_ID,
            str_field(ctx.deployment, "id").map(str::to_owned),
        ),
        (
            labels::DEPLOYMENT_NAME,
            str_field(ctx.deployment, "name").map(str::to_owned),
        ),
        (
            labels::DEPLOYMENT_UPDATED,
            str_field(ctx.deployment, "updated").map(python_isoformat_utc),
        ),
    ];
    always
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .chain(
            optional
                .into_iter()
                .filter_map(|(k, v)| Some((k.to_owned(), v?))),
        )
        .collect()
}

/// The job's `name` template rendered with `ctx.flow` and `ctx.flow_run`; a missing or null
/// value renders empty, any other non-string as Python prints it.
fn render_name(template: &str, ctx: &RunContext<'_>) -> String {
    let mut ctx_values = Map::new();
    ctx_values.insert(
        "ctx".into(),
        json!({"flow": ctx.flow.cloned().unwrap_or(Value::Null), "flow_run": ctx.flow_run}),
    );
    match apply_values(&json!(template), &ctx_values, &|_| None) {
        Some(Value::String(s)) => s,
        Some(Value::Null) | None => String::new(),
        Some(other) => python_str(&other),
    }
}

/// The reference's automatic `host.docker.internal` entry, on Linux when the container's API
/// URL looks local (or is unset): `host-gateway` on Engines from 20.10 (or of unknown
/// version), and no entry at all (but the key still sent) on older ones; under rootless
/// Docker, rootlesskit's host loopback address instead. `None` omits `ExtraHosts` unless the
/// user gave some.
fn automatic_extra_hosts(
    env: &[(String, String)],
    engine: Option<&str>,
    rootless_host: Option<&str>,
) -> Option<BTreeMap<String, String>> {
    let final_api_url = env
        .iter()
        .find(|(k, _)| k == "PREFECT_API_URL")
        .map(|(_, v)| v.as_str());
    if !(cfg!(target_os = "linux") && final_api_url.is_none_or(looks_local)) {
        return None;
    }
    if let Some(address) = rootless_host {
        return Some(BTreeMap::from([(
            "host.docker.internal".to_owned(),
            address.to_owned(),
        )]));
    }
    let supported = engine
        .and_then(engine_version)
        .is_none_or(|v| v >= semver::Version::new(20, 10, 0));
    Some(if supported {
        BTreeMap::from([("host.docker.internal".to_owned(), "host-gateway".to_owned())])
    } else {
        BTreeMap::new()
    })
}

/// `ExtraHosts` as `host:ip`: the user's entries merged over a non-empty automatic entry
/// (sorted by host), else the user's object sorted by host, the user's list in order, or the
/// automatic entries alone.
fn merge_extra_hosts(
    automatic: Option<BTreeMap<String, String>>,
    user: Option<&Value>,
) -> Result<Option<Vec<String>>, PrepareError> {
    let joined = |entries: Vec<(String, String)>| -> Vec<String> {
        entries
            .into_iter()
            .map(|(h, ip)| format!("{h}:{ip}"))
            .collect()
    };
    Ok(match (automatic, user) {
        (Some(mut auto), Some(user)) if !auto.is_empty() => {
            auto.extend(extra_host_entries(user)?);
            Some(joined(auto.into_iter().collect()))
        }
        (_, Some(Value::Object(map))) => {
            let sorted: BTreeMap<_, _> = map
                .iter()
                .map(|(k, v)| (k.clone(), python_str(v)))
                .collect();
            Some(joined(sorted.into_iter().collect()))
        }
        (_, Some(list)) => Some(joined(extra_host_entries(list)?)),
        (Some(auto), None) => Some(joined(auto.into_iter().collect())),
        (None, None) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(v: Value) -> DockerJobConfiguration {
        DockerJobConfiguration::from_rendered(v.as_object().unwrap(), Path::new("/w")).unwrap()
    }

    struct Fixture {
        flow_run: Value,
        flow: Value,
        deployment: Value,
        settings: Vec<(String, String)>,
    }

    fn fixture(api_url: &str) -> Fixture {
        Fixture {
            flow_run: json!({"id": "run-1", "name": "my run/1 ü", "tags": []}),
            flow: json!({"id": "flow-1", "name": "demo-flow"}),
            deployment: json!({"id": "dep-1", "name": "dep1", "updated": "2026-11-27T22:51:24.000000Z"}),
            settings: vec![
                ("PREFECT_API_URL".into(), api_url.into()),
                ("PREFECT_API_KEY".into(), "k".into()),
            ],
        }
    }

    fn prepare(c: &DockerJobConfiguration, f: &Fixture, engine: Option<&str>) -> ContainerSpec {
        c.prepare(&RunContext {
            flow_run: &f.flow_run,
            flow: Some(&f.flow),
            deployment: Some(&f.deployment),
            worker_name: "w1",
            work_pool_name: "p1",
            work_pool_id: "pool-1",
            settings_env: &f.settings,
            default_image: "prefecthq/prefect:3.9.1-python3.11",
            engine_version: engine,
            rootless_host: None,
        })
        .unwrap()
    }

    #[test]
    fn defaults_for_a_local_api() {
        let f = fixture("http://127.0.0.1:4200/api");
        let spec = prepare(&config(json!({})), &f, Some("20.10.24+dfsg1"));
        assert_eq!(spec.image, "prefecthq/prefect:3.9.1-python3.11");
        assert_eq!(spec.pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(spec.command, vec!["prefect", "flow-run", "execute"]);
        assert_eq!(spec.name.as_deref(), Some("my-run-1-u"));
        assert_eq!(spec.network_mode, "host");
        assert_eq!(
            spec.extra_hosts,
            Some(vec!["host.docker.internal:host-gateway".to_owned()])
        );
        let env: Vec<&str> = spec.env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            env,
            vec![
                "PREFECT_API_URL",
                "PREFECT_API_KEY",
                "PREFECT__FLOW_RUN_ID",
                "PREFECT__WORKER_NAME",
                "PREFECT__FLOW_ID",
                "PREFECT__FLOW_NAME",
                "PREFECT__DEPLOYMENT_ID",
                "PREFECT__DEPLOYMENT_NAME"
            ]
        );
        assert_eq!(spec.env[0].1, "http://127.0.0.1:4200/api");
        assert_eq!(spec.labels["io.prefect.flow-run-id"], "run-1");
        assert_eq!(
            spec.labels["io.prefect.deployment-updated"],
            "2026-11-27T22:51:24+00:00"
        );
        assert_eq!(spec.labels["io.prefect.version"], PREFECT_VERSION);
    }

    #[test]
    fn networks_rewrite_the_api_url_and_job_env_wins() {
        let f = fixture("http://localhost:4200/api");
        let spec = prepare(
            &config(json!({"networks": ["n1", "n2"], "env": {"PREFECT_API_KEY": null, "X": "1"}})),
            &f,
            Some("20.10.24"),
        );
        assert_eq!(spec.network_mode, "n1");
        assert_eq!(spec.extra_networks, vec!["n2"]);
        assert_eq!(
            spec.env[0],
            (
                "PREFECT_API_URL".into(),
                "http://host.docker.internal:4200/api".into()
            )
        );
        assert!(!spec.env.iter().any(|(k, _)| k == "PREFECT_API_KEY"));
        assert_eq!(spec.env.last().unwrap(), &("X".to_owned(), "1".to_owned()));
    }

    /// Under rootless Docker a localhost API is reached through rootlesskit's host loopback
    /// address: no `host` network is inferred (it would be rootlesskit's), the URL is
    /// rewritten even in `host` mode, and `host.docker.internal` maps to that address.
    #[test]
    fn rootless_docker_reaches_a_local_api_through_rootlesskit() {
        let f = fixture("http://127.0.0.1:4200/api");
        let ctx = |job: &DockerJobConfiguration| {
            job.prepare(&RunContext {
                flow_run: &f.flow_run,
                flow: Some(&f.flow),
                deployment: Some(&f.deployment),
                worker_name: "w1",
                work_pool_name: "p1",
                work_pool_id: "pool-1",
                settings_env: &f.settings,
                default_image: "x:1",
                engine_version: Some("20.10.24"),
                rootless_host: Some("10.0.2.2"),
            })
            .unwrap()
        };
        for job in [json!({}), json!({"network_mode": "host"})] {
            let spec = ctx(&config(job.clone()));
            let expected_mode = if job.get("network_mode").is_some() {
                "host"
            } else {
                "default"
            };
            assert_eq!(spec.network_mode, expected_mode);
            assert_eq!(
                spec.env[0],
                (
                    "PREFECT_API_URL".into(),
                    "http://host.docker.internal:4200/api".into()
                )
            );
            assert_eq!(
                spec.extra_hosts,
                Some(vec!["host.docker.internal:10.0.2.2".to_owned()])
            );
        }
        // The job's own entry still wins.
        let spec = ctx(&config(
            json!({"container_create_kwargs": {"extra_hosts": {"host.docker.internal": "192.0.2.1"}}}),
        ));
        assert_eq!(
            spec.extra_hosts,
            Some(vec!["host.docker.internal:192.0.2.1".to_owned()])
        );
    }

    #[test]
    fn remote_api_gets_no_extra_hosts_and_default_network() {
        let f = fixture("https://api.example.com/api");
        let spec = prepare(&config(json!({"image": "busybox"})), &f, Some("20.10.24"));
        assert_eq!(spec.network_mode, "default");
        assert_eq!(spec.extra_hosts, None);
        assert_eq!(spec.pull_policy, PullPolicy::Always);
    }

    #[test]
    fn old_engine_gets_empty_extra_hosts_and_user_hosts_merge() {
        let f = fixture("http://127.0.0.1:4200/api");
        let spec = prepare(&config(json!({})), &f, Some("17.03.0-ce"));
        assert_eq!(spec.extra_hosts, Some(vec![]));
        let spec = prepare(
            &config(json!({"container_create_kwargs": {"extra_hosts": {"foo": "1.2.3.4"}}})),
            &f,
            Some("20.10.24"),
        );
        assert_eq!(
            spec.extra_hosts,
            Some(vec![
                "foo:1.2.3.4".to_owned(),
                "host.docker.internal:host-gateway".to_owned()
            ])
        );
    }

    #[test]
    fn name_template_and_command() {
        let f = fixture("http://127.0.0.1:4200/api");
        let spec = prepare(
            &config(
                json!({"name": ".{{ ctx.flow.name }}/{{ ctx.flow_run.id }}", "command": "sh -c 'exit 3'"}),
            ),
            &f,
            None,
        );
        assert_eq!(spec.name.as_deref(), Some("demo-flow-run-1"));
        assert_eq!(spec.command, vec!["sh", "-c", "exit 3"]);
        let bad = config(json!({"command": "sh -c 'oops"})).prepare(&RunContext {
            flow_run: &f.flow_run,
            flow: None,
            deployment: None,
            worker_name: "w",
            work_pool_name: "p",
            work_pool_id: "i",
            settings_env: &[],
            default_image: "x:1",
            engine_version: None,
            rootless_host: None,
        });
        assert!(matches!(bad, Err(PrepareError::InvalidCommand { .. })));
    }

    #[test]
    fn networking_config_goes_to_the_create_body_for_the_first_network() {
        let f = fixture("https://api.example.com/api");
        let spec = prepare(
            &config(json!({"networks": ["n1"],
                           "container_create_kwargs": {"networking_config": {"n1": {"Aliases": ["a"]}}}})),
            &f,
            None,
        );
        assert_eq!(
            spec.config_overrides["NetworkingConfig"],
            json!({"EndpointsConfig": {"n1": {"Aliases": ["a"]}}})
        );
        let spec = prepare(&config(json!({"networks": ["n1"]})), &f, None);
        assert!(!spec.config_overrides.contains_key("NetworkingConfig"));
    }

    #[test]
    fn docker_versions() {
        assert_eq!(
            engine_version("20.10.24+dfsg1"),
            Some(semver::Version::new(20, 10, 24))
        );
        assert_eq!(
            engine_version("17.03.0-ce"),
            Some(semver::Version::new(17, 3, 0))
        );
        assert_eq!(engine_version("24.0"), Some(semver::Version::new(24, 0, 0)));
        assert_eq!(engine_version("junk"), None);
    }

    #[test]
    fn the_api_host_is_after_the_credentials() {
        assert_eq!(api_url_host("http://u:p@127.0.0.1:4200/api"), "127.0.0.1");
        assert_eq!(api_url_host("http://localhost/api"), "localhost");
        assert_eq!(api_url_host("https://a@b@host/api"), "host");
    }

    #[test]
    fn local_pattern() {
        assert!(looks_local("http://127.0.0.1:4200/api"));
        assert!(looks_local("http://localhost/api"));
        assert!(looks_local("http://host.docker.internal:4200/api"));
        assert!(!looks_local("https://api.prefect.cloud/api"));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::{RunContext, api_url_host, engine_version, looks_local, python_isoformat_utc};
    use crate::job::labels;
    use crate::job::strategies::{any_json, config, joined, text, valid_job};

    /// Pieces of API URLs and Engine versions.
    const URL_PIECES: &[&str] = &[
        "http://",
        "https://",
        "localhost",
        "127.0.0.1",
        "host.docker.internal",
        "example.com",
        ":4200",
        "/api",
        "v",
        "20",
        "17",
        ".",
        "10",
        "24",
        "+dfsg1",
        "-ce",
        "~",
        "é",
        " ",
    ];

    fn url_text() -> BoxedStrategy<String> {
        prop_oneof![joined(URL_PIECES, 6), text()].boxed()
    }

    /// A run object (flow run, flow or deployment) with `id`, `name`, `updated` of any kind.
    fn run_object() -> BoxedStrategy<Value> {
        let field = prop_oneof![3 => text().prop_map(Value::from), 1 => any_json()];
        (
            proptest::option::of(field.clone()),
            proptest::option::of(field.clone()),
            proptest::option::of(field),
        )
            .prop_map(|(id, name, updated)| {
                let mut m = Map::new();
                for (k, v) in [("id", id), ("name", name), ("updated", updated)] {
                    if let Some(v) = v {
                        m.insert(k.to_owned(), v);
                    }
                }
                Value::Object(m)
            })
            .boxed()
    }

    proptest! {
        #![proptest_config(config(256))]

        /// Any valid configuration with any run context becomes a container or a
        /// `PrepareError`, never a panic; the container always carries the run's id as its
        /// exclusive label, and its name (if any) is a valid Docker name.
        #[test]
        fn any_valid_configuration_prepares(
            job in valid_job(),
            flow_run in run_object(),
            flow in proptest::option::of(run_object()),
            deployment in proptest::option::of(run_object()),
            api_url in proptest::option::of(url_text()),
            engine in proptest::option::of(url_text()),
            default_image in text(),
        ) {
            let settings: Vec<(String, String)> =
                api_url.into_iter().map(|u| ("PREFECT_API_URL".to_owned(), u)).collect();
            let ctx = RunContext {
                flow_run: &flow_run,
                flow: flow.as_ref(),
                deployment: deployment.as_ref(),
                worker_name: "w",
                work_pool_name: "p",
                work_pool_id: "i",
                settings_env: &settings,
                default_image: &default_image,
                engine_version: engine.as_deref(),
                rootless_host: None,
            };
            if let Ok(spec) = job.prepare(&ctx) {
                let id = flow_run["id"].as_str().unwrap_or_default();
                let exclusive = (labels::FLOW_RUN_ID.to_owned(), id.to_owned());
                prop_assert_eq!(spec.exclusive_label, Some(exclusive));
                prop_assert!(spec.labels.contains_key(labels::FLOW_RUN_ID));
                let version = spec.labels.get(labels::VERSION).map(String::as_str);
                prop_assert_eq!(version, Some(super::PREFECT_VERSION));
                let docker_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
                if let Some(name) = spec.name {
                    prop_assert!(name.chars().all(docker_char), "{}", name);
                }
            }
        }

        /// The small text helpers take any text.
        #[test]
        fn text_helpers(s in url_text()) {
            let _ = looks_local(&s);
            let _ = api_url_host(&s);
            let _ = python_isoformat_utc(&s);
            if let Some(version) = engine_version(&s) {
                let again = engine_version(&version.to_string());
                prop_assert_eq!(again, Some(version));
            }
        }
    }
}
