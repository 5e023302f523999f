//! The Docker runtime: pull, create (with name-conflict retries), connect networks, start,
//! stream output and wait, through bollard. bollard types never leave this module; the
//! input is a [`ContainerSpec`], the outputs are plain Rust values.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::models::{ContainerCreateBody, EventMessage, NetworkConnectRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    LogsOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use tracing::Instrument as _;

use super::error::{DockerError, EngineFailure};
use super::single_flight::SingleFlight;
use crate::job::{ContainerSpec, PullPolicy, RegistryCredentials};

/// How long a watch waits for a lost Engine to come back before giving the run up.
const ENGINE_RECOVERY_LIMIT: Duration = Duration::from_secs(15 * 60);

/// How many suffixed names (`-1`, `-2`, …) to try after a name conflict.
const NAME_CONFLICT_ATTEMPTS: u32 = 50;

/// A container that was created (and maybe started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedContainer {
    /// Full container id.
    pub id: String,
    /// The name it got (after conflict retries), if one was requested.
    pub name: Option<String>,
    /// Unix time (s) just before it was created: the lower bound for its events.
    pub created_at: i64,
}

impl CreatedContainer {
    /// The name for messages: the container name, else the short id.
    pub fn display_name(&self) -> &str {
        self.name
            .as_deref()
            .unwrap_or(&self.id[..self.id.len().min(12)])
    }
}

/// A container that is running, with what it took to get there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedContainer {
    /// The container.
    pub container: CreatedContainer,
    /// How long the image pull took, if one was needed.
    pub pull_duration: Option<Duration>,
}

/// How a watched container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The process's exit code (-1 when Docker did not know it).
    pub code: i64,
    /// The kernel killed it for exceeding its memory limit (known when the container is kept).
    pub oom_killed: bool,
    /// The Engine went away (restart, crash) while the container ran.
    pub engine_lost: bool,
}

/// One lifecycle event of a container, from the Engine's event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    /// Container id.
    pub id: String,
    /// What happened.
    pub kind: ContainerEventKind,
    /// When (unix seconds), for resuming the stream.
    pub time: i64,
}

/// The events the worker follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerEventKind {
    /// The main process exited.
    Died {
        /// Its exit code.
        code: i64,
    },
    /// The kernel's OOM killer hit the container.
    OomKilled,
    /// A signal was sent to it.
    Killed {
        /// The signal number.
        signal: String,
    },
}

/// A container of ours found on the host by its labels (for reattachment after a restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundContainer {
    /// The container, as if this process had created it.
    pub container: CreatedContainer,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// The image it runs, as it was asked for.
    pub image: String,
    /// Still running (else exited, created or dead).
    pub running: bool,
    /// Its exit code, when it has exited.
    pub exit_code: Option<i64>,
    /// `HostConfig.AutoRemove`.
    pub auto_remove: bool,
    /// The kernel killed it for memory.
    pub oom_killed: bool,
}

/// Client certificate files for a TLS Docker host (`ca.pem`, `cert.pem`, `key.pem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA that signed the daemon's certificate.
    pub ca: std::path::PathBuf,
    /// Client certificate.
    pub cert: std::path::PathBuf,
    /// Client key.
    pub key: std::path::PathBuf,
}

impl TlsFiles {
    /// The Docker CLI's layout of a `DOCKER_CERT_PATH` directory.
    pub fn in_dir(dir: &std::path::Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }
}

/// A connection to one Docker Engine (or Podman's Docker-compatible API).
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    pub(super) docker: Docker,
    host: String,
    base_url: String,
    engine_version: String,
    /// Podman's compat API needs a few detours (see `watch_container`).
    is_podman: bool,
    /// Where the Docker CLI's `config.json` lives (registry credentials for pulls).
    docker_config: Option<std::path::PathBuf>,
    /// Pulls (with their registry logins) in flight, shared by every run that needs the same
    /// image with the same credentials at the same time.
    pulls: SingleFlight<Result<(), PullFailure>>,
    /// Pulls actually made (not joined), for tests and metrics.
    pulls_made: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// How a shared pull failed: at the registry login before it, or at the pull itself.
#[derive(Debug, Clone)]
enum PullFailure {
    Login {
        registry: String,
        failure: EngineFailure,
    },
    Pull(EngineFailure),
}

/// What `POST /auth` receives: the body docker-py's `login` sends (it drops its null `email`).
#[derive(serde::Serialize)]
struct LoginRequest<'a> {
    username: &'a str,
    password: &'a str,
    serveraddress: &'a str,
}

/// Logs the Engine in to a registry (`POST /auth`), which checks the credentials with the
/// registry. bollard 0.21 has no call for this endpoint, so a clone of the client whose request
/// modifier turns its `GET /_ping` into `POST /auth` with the login body makes it: the same
/// transport (unix socket, TCP, TLS), timeout and error classification as every other call.
async fn registry_login(
    docker: &Docker,
    credentials: &RegistryCredentials,
) -> Result<(), EngineFailure> {
    let body = serde_json::to_vec(&LoginRequest {
        username: &credentials.username,
        password: &credentials.password,
        serveraddress: &credentials.registry_url,
    })
    .map_err(|e| EngineFailure {
        status: None,
        message: e.to_string(),
    })?;
    let login = docker.clone().with_request_modifier(move |mut request| {
        let mut parts = request.uri().clone().into_parts();
        parts.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static("/auth"));
        if let Ok(uri) = hyper::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
            *request.method_mut() = hyper::Method::POST;
            *request.body_mut() = bollard::body_full(body.clone().into());
        }
        request
    });
    let answer = login.ping().await.map_err(EngineFailure::from)?;
    // `{"Status":"Login Succeeded", …}`; anything else (the ping's `OK` if the request could
    // not be rewritten) is not a login.
    let status = serde_json::from_str::<Value>(&answer)
        .ok()
        .and_then(|v| v.get("Status").and_then(Value::as_str).map(str::to_owned));
    match status {
        Some(_) => Ok(()),
        None => Err(EngineFailure {
            status: None,
            message: format!("unexpected answer to the registry login: {answer}"),
        }),
    }
}

/// The single-flight key of a pull: image, platform, and who logs in and pulls. The password
/// enters only as a hash, so a run with a wrong password never shares a good one's pull.
fn pull_key(
    spec: &ContainerSpec,
    login: Option<&RegistryCredentials>,
    pull: Option<&DockerCredentials>,
) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let secret = |password: Option<&str>| {
        let mut hasher = std::hash::DefaultHasher::new();
        password.hash(&mut hasher);
        hasher.finish()
    };
    let login = login.map_or_else(String::new, |c| {
        format!(
            "{}@{}#{:x}",
            c.username,
            c.registry_url,
            secret(Some(&c.password))
        )
    });
    let pull = pull.map_or_else(String::new, |c| {
        format!(
            "{}@{}#{:x}",
            c.username.as_deref().unwrap_or_default(),
            c.serveraddress.as_deref().unwrap_or_default(),
            secret(c.password.as_deref().or(c.identitytoken.as_deref()))
        )
    });
    format!(
        "{}|{}|{login}|{pull}",
        spec.image,
        spec.platform.as_deref().unwrap_or_default()
    )
}

/// The `base_url` the Python worker puts in infrastructure pids, so pids stay comparable.
fn base_url_for(host: &str, tls: bool) -> String {
    if host.starts_with("unix://") || host.starts_with('/') {
        "http+docker://localhost".to_owned()
    } else if host.starts_with("npipe://") {
        "http+docker://localnpipe".to_owned()
    } else if host.starts_with("ssh://") {
        "http+docker://ssh".to_owned()
    } else {
        let rest = host.split_once("://").map_or(host, |(_, r)| r);
        let scheme = if tls || host.starts_with("https://") {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", rest.trim_end_matches('/'))
    }
}

impl DockerRuntime {
    /// Connects to `host` (a `DOCKER_HOST` value; `None` = the default socket) and reads the
    /// Engine's version, so an unreachable daemon is reported at start-up.
    ///
    /// # Errors
    /// [`DockerError::Connect`] when no Engine answers.
    pub async fn connect(host: Option<&str>, timeout: Duration) -> Result<Self, DockerError> {
        Self::connect_with_tls(host, None, timeout).await
    }

    /// Like [`DockerRuntime::connect`], over TLS with client certificates when `tls` is given
    /// (`DOCKER_TLS_VERIFY` / `DOCKER_CERT_PATH`).
    ///
    /// # Errors
    /// [`DockerError::Connect`] when no Engine answers or the certificates cannot be used.
    pub async fn connect_with_tls(
        host: Option<&str>,
        tls: Option<&TlsFiles>,
        timeout: Duration,
    ) -> Result<Self, DockerError> {
        let host = host
            .filter(|h| !h.is_empty())
            .unwrap_or("unix:///var/run/docker.sock")
            .to_owned();
        let connect_error = |failure: EngineFailure| DockerError::Connect {
            host: host.clone(),
            failure,
        };
        let docker = match tls {
            Some(files) => Docker::connect_with_ssl(
                &host,
                &files.key,
                &files.cert,
                &files.ca,
                timeout.as_secs().max(1),
                bollard::API_DEFAULT_VERSION,
            ),
            None if host.starts_with('/') => Docker::connect_with_unix(
                &format!("unix://{host}"),
                timeout.as_secs().max(1),
                bollard::API_DEFAULT_VERSION,
            ),
            None if host.starts_with("unix://") => Docker::connect_with_unix(
                &host,
                timeout.as_secs().max(1),
                bollard::API_DEFAULT_VERSION,
            ),
            None if host.starts_with("tcp://") || host.starts_with("http://") => {
                Docker::connect_with_http(
                    &host,
                    timeout.as_secs().max(1),
                    bollard::API_DEFAULT_VERSION,
                )
            }
            None => Docker::connect_with_host(&host),
        }
        .map_err(|e| connect_error(e.into()))?
        .with_timeout(timeout);
        let version = docker
            .version()
            .await
            .map_err(|e| connect_error(e.into()))?;
        let is_podman = version
            .components
            .iter()
            .flatten()
            .any(|c| c.name.to_ascii_lowercase().contains("podman"));
        Ok(Self {
            is_podman,
            docker_config: None,
            pulls: SingleFlight::default(),
            pulls_made: std::sync::Arc::default(),
            base_url: base_url_for(&host, tls.is_some()),
            engine_version: version.version.unwrap_or_default(),
            docker,
            host,
        })
    }

    /// Reads pull credentials from `dir/config.json` (the Docker CLI's `DOCKER_CONFIG`) for
    /// images whose job names no `registry_credentials`.
    #[must_use]
    pub fn with_docker_config(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.docker_config = dir;
        self
    }

    /// True when the Engine is Podman's Docker-compatible service.
    pub fn is_podman(&self) -> bool {
        self.is_podman
    }

    /// The `DOCKER_HOST` this runtime talks to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The Python worker's `base_url` for this host (used in infrastructure pids).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The Engine's version string as it reports it (`20.10.24+dfsg1`).
    pub fn engine_version(&self) -> &str {
        &self.engine_version
    }

    /// Makes sure the image is available according to the spec's pull policy. Returns how long
    /// a pull took, when one happened.
    ///
    /// # Errors
    /// [`DockerError::PullFailed`], [`DockerError::PullAndLocalFailed`] or an API error.
    pub async fn ensure_image(
        &self,
        spec: &ContainerSpec,
    ) -> Result<Option<Duration>, DockerError> {
        let started = std::time::Instant::now();
        let pulled = self.ensure_image_inner(spec).await?;
        Ok(pulled.then(|| started.elapsed()))
    }

    /// True when a pull was made.
    async fn ensure_image_inner(&self, spec: &ContainerSpec) -> Result<bool, DockerError> {
        match spec.pull_policy {
            PullPolicy::Never => Ok(false),
            PullPolicy::Always => self.pull_image(spec).await.map(|()| true),
            PullPolicy::IfNotPresent => match self.docker.inspect_image(&spec.image).await {
                Ok(_) => Ok(false),
                Err(e) => {
                    let failure = EngineFailure::from(e);
                    if failure.status == Some(404) {
                        tracing::debug!(image = %spec.image, "Could not find Docker image locally: {}", spec.image);
                        self.pull_image(spec).await.map(|()| true)
                    } else {
                        Err(DockerError::Api {
                            operation: "inspect image",
                            failure,
                        })
                    }
                }
            },
            PullPolicy::IfPossible => match self.pull_image(spec).await {
                Ok(()) => Ok(true),
                Err(pull) => {
                    // The Python worker's warning, word for word, so log searches find both.
                    tracing::warn!(
                        image = %spec.image,
                        error = %pull,
                        "We could not pull the image '{}'. But because ImagePullPolicy is set to 'ImagePullPolicy.IF_POSSIBLE' we still continue. Maybe we have an local one.\nPulling failed with:\n{pull}",
                        spec.image
                    );
                    match self.docker.inspect_image(&spec.image).await {
                        Ok(_) => Ok(false),
                        Err(e) => Err(DockerError::PullAndLocalFailed {
                            image: spec.image.clone(),
                            pull: Box::new(pull),
                            local: e.into(),
                        }),
                    }
                }
            },
        }
    }

    /// How many pulls this runtime has made (concurrent requests for one image count once).
    pub fn pulls_made(&self) -> u64 {
        self.pulls_made.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the Docker SDK would skip the login: `reauth: false` and `config.json` already
    /// holds a login of the same user for that registry (whose credentials the pull then uses).
    fn login_cached(&self, credentials: &RegistryCredentials) -> bool {
        !credentials.reauth
            && self
                .docker_config
                .as_deref()
                .and_then(|dir| {
                    super::auth::credentials_for_registry(&credentials.registry_url, dir)
                })
                .is_some_and(|stored| stored.username.as_deref() == Some(&credentials.username))
    }

    /// The credentials sent with a pull (`X-Registry-Auth`): the job's `registry_credentials`
    /// when they are for the image's registry (and were logged in with), else whatever
    /// `config.json` holds for that registry.
    fn pull_credentials(&self, spec: &ContainerSpec) -> Option<DockerCredentials> {
        match &spec.registry_credentials {
            Some(c)
                if super::auth::serves(&c.registry_url, &spec.image) && !self.login_cached(c) =>
            {
                Some(DockerCredentials {
                    username: Some(c.username.clone()),
                    password: Some(c.password.clone()),
                    serveraddress: Some(c.registry_url.clone()),
                    ..DockerCredentials::default()
                })
            }
            _ => self
                .docker_config
                .as_deref()
                .and_then(|dir| super::auth::credentials_for(&spec.image, dir)),
        }
    }

    /// Logs in to the registry when the job has `registry_credentials` (`POST /auth`), then
    /// pulls the spec's image; a failed login fails the pull. Concurrent pulls of the same image
    /// (same platform, same credentials) are one login and one pull: the later callers wait for
    /// it and share its outcome.
    async fn pull_image(&self, spec: &ContainerSpec) -> Result<(), DockerError> {
        let login = spec
            .registry_credentials
            .as_ref()
            .filter(|c| !self.login_cached(c))
            .cloned();
        let credentials = self.pull_credentials(spec);
        let key = pull_key(spec, login.as_ref(), credentials.as_ref());
        let docker = self.docker.clone();
        let image = spec.image.clone();
        let platform = spec.platform.clone();
        let made = std::sync::Arc::clone(&self.pulls_made);
        let (result, started_here) = self
            .pulls
            .run(&key, move || {
                async move {
                    if let Some(login) = &login {
                        tracing::info!(registry = %login.registry_url, "Logging into Docker registry...");
                        registry_login(&docker, login)
                            .await
                            .map_err(|failure| PullFailure::Login {
                                registry: login.registry_url.clone(),
                                failure,
                            })?;
                    }
                    made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(image = %image, "Pulling image '{image}'...");
                    let image_ref = crate::job::image::ImageRef::parse(&image).map_err(|e| {
                        PullFailure::Pull(EngineFailure {
                            status: None,
                            message: e.to_string(),
                        })
                    })?;
                    let mut options = CreateImageOptionsBuilder::default()
                        .from_image(&image_ref.repository)
                        .tag(image_ref.tag.as_deref().unwrap_or("latest"));
                    if let Some(platform) = &platform {
                        options = options.platform(platform);
                    }
                    let mut stream = docker.create_image(Some(options.build()), None, credentials);
                    while let Some(item) = stream.next().await {
                        item.map_err(|e| PullFailure::Pull(e.into()))?;
                    }
                    Ok(())
                }
                .in_current_span()
            })
            .await;
        if !started_here {
            tracing::info!(image = %spec.image, ok = result.is_ok(), "shared another run's pull of the same image");
        }
        result.map_err(|failure| {
            let (login_registry, failure) = match failure {
                PullFailure::Login { registry, failure } => (Some(registry), failure),
                PullFailure::Pull(failure) => (None, failure),
            };
            DockerError::PullFailed {
                image: spec.image.clone(),
                login_registry,
                failure,
            }
        })
    }

    /// The Engine create body for a spec (what `POST /containers/create` receives).
    ///
    /// # Errors
    /// [`DockerError::InvalidOptions`] when `container_create_kwargs` fields do not fit the API model.
    pub fn create_body(spec: &ContainerSpec) -> Result<ContainerCreateBody, DockerError> {
        if spec.network_mode == "host"
            && spec
                .host_config_overrides
                .get("PortBindings")
                .and_then(Value::as_object)
                .is_some_and(|b| !b.is_empty())
        {
            return Err(DockerError::InvalidArgument {
                message: "\"host\" network_mode is incompatible with port_bindings".into(),
            });
        }
        let mut host_config = Map::new();
        host_config.insert("NetworkMode".into(), json!(spec.network_mode));
        if let Some(m) = spec.mem_limit {
            host_config.insert("Memory".into(), json!(m));
        }
        if let Some(m) = spec.memswap_limit {
            host_config.insert("MemorySwap".into(), json!(m));
        }
        if spec.privileged {
            host_config.insert("Privileged".into(), json!(true));
        }
        if !spec.binds.is_empty() {
            host_config.insert("Binds".into(), json!(spec.binds));
        }
        if let Some(hosts) = &spec.extra_hosts {
            host_config.insert("ExtraHosts".into(), json!(hosts));
        }
        if spec.auto_remove {
            host_config.insert("AutoRemove".into(), json!(true));
        }
        for (k, v) in &spec.host_config_overrides {
            host_config.insert(k.clone(), v.clone());
        }

        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut body = Map::new();
        body.insert("Tty".into(), json!(false));
        body.insert("OpenStdin".into(), json!(false));
        body.insert("StdinOnce".into(), json!(false));
        body.insert("AttachStdin".into(), json!(false));
        body.insert("AttachStdout".into(), json!(true));
        body.insert("AttachStderr".into(), json!(true));
        body.insert("Env".into(), json!(env));
        body.insert("Cmd".into(), json!(spec.command));
        body.insert("Image".into(), json!(spec.image));
        body.insert("NetworkDisabled".into(), json!(false));
        if !spec.volume_paths.is_empty() {
            let volumes: Map<String, Value> = spec
                .volume_paths
                .iter()
                .map(|p| (p.clone(), json!({})))
                .collect();
            body.insert("Volumes".into(), Value::Object(volumes));
        }
        body.insert("Labels".into(), json!(spec.labels));
        body.insert("HostConfig".into(), Value::Object(host_config));
        for (k, v) in &spec.config_overrides {
            body.insert(k.clone(), v.clone());
        }
        serde_json::from_value(Value::Object(body)).map_err(|e| DockerError::InvalidOptions {
            message: e.to_string(),
        })
    }

    /// Creates the container, retrying with `<name>-1`, `<name>-2`, … while the name is taken.
    ///
    /// # Errors
    /// [`DockerError::ImageNotFound`], [`DockerError::NameConflict`], [`DockerError::CreateFailed`].
    pub async fn create_container(
        &self,
        spec: &ContainerSpec,
    ) -> Result<CreatedContainer, DockerError> {
        let mut body = Self::create_body(spec)?;
        // docker-py puts the client's configured proxies first, so the job's own env wins.
        if let Some(dir) = &self.docker_config {
            let proxies = super::proxies::proxy_env(dir, &[&self.host, &self.base_url]);
            if !proxies.is_empty() {
                let env = body.env.take().unwrap_or_default();
                body.env = Some(proxies.into_iter().chain(env).collect());
            }
        }
        if self.is_podman
            && let Some(host_config) = body.host_config.as_mut()
        {
            // Podman's compat wait misreports AutoRemove containers (0, -1 or a hang), so the
            // worker removes them itself after a reliable `not-running` wait.
            host_config.auto_remove = None;
        }
        let created_at = chrono::Utc::now().timestamp();
        let mut attempt = 0;
        loop {
            let name = spec.name.as_ref().map(|n| {
                if attempt == 0 {
                    n.clone()
                } else {
                    format!("{n}-{attempt}")
                }
            });
            let options = match (&name, &spec.platform) {
                (None, None) => None,
                (name, platform) => {
                    let mut options = CreateContainerOptionsBuilder::default();
                    if let Some(n) = name {
                        options = options.name(n);
                    }
                    if let Some(p) = platform {
                        options = options.platform(p);
                    }
                    Some(options.build())
                }
            };
            tracing::info!(
                container = name.as_deref().unwrap_or("<auto>"),
                "Creating Docker container"
            );
            match self.docker.create_container(options, body.clone()).await {
                Ok(resp) => {
                    return Ok(CreatedContainer {
                        id: resp.id,
                        name,
                        created_at,
                    });
                }
                Err(e) => {
                    let failure = EngineFailure::from(e);
                    if failure.is_name_conflict() && spec.name.is_some() {
                        attempt += 1;
                        if attempt > NAME_CONFLICT_ATTEMPTS {
                            return Err(DockerError::NameConflict {
                                name: spec.name.clone().unwrap_or_default(),
                                attempts: NAME_CONFLICT_ATTEMPTS,
                            });
                        }
                        tracing::info!(
                            container = name.as_deref().unwrap_or_default(),
                            "Docker container name already exists; retrying"
                        );
                        continue;
                    }
                    if failure.status == Some(404) && failure.message.contains("No such image") {
                        return Err(DockerError::ImageNotFound {
                            image: spec.image.clone(),
                            policy: spec.pull_policy.as_str(),
                        });
                    }
                    return Err(DockerError::CreateFailed {
                        name: name.unwrap_or_else(|| "<auto>".into()),
                        failure,
                    });
                }
            }
        }
    }

    /// Connects the container to each network, in order.
    ///
    /// # Errors
    /// [`DockerError::NetworkNotFound`] or [`DockerError::NetworkConnectFailed`].
    pub async fn connect_networks(
        &self,
        container: &CreatedContainer,
        networks: &[String],
    ) -> Result<(), DockerError> {
        for network in networks {
            let inspected = self
                .docker
                .inspect_network(network, None)
                .await
                .map_err(|e| match EngineFailure::from(e) {
                    f if f.status == Some(404) => DockerError::NetworkNotFound {
                        network: network.clone(),
                    },
                    failure => DockerError::NetworkConnectFailed {
                        container: container.display_name().to_owned(),
                        network: network.clone(),
                        failure,
                    },
                })?;
            let id = inspected.id.unwrap_or_else(|| network.clone());
            let request = NetworkConnectRequest {
                container: container.id.clone(),
                endpoint_config: Some(Default::default()),
            };
            self.docker
                .connect_network(&id, request)
                .await
                .map_err(|e| DockerError::NetworkConnectFailed {
                    container: container.display_name().to_owned(),
                    network: network.clone(),
                    failure: e.into(),
                })?;
        }
        Ok(())
    }

    /// If another container carries the same exclusive label, one of them (earliest created,
    /// then lowest id) goes on and the others are removed before they start.
    async fn stand_down_if_duplicate(
        &self,
        ours: &CreatedContainer,
        key: &str,
        value: &str,
    ) -> Result<(), DockerError> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{key}={value}")])]);
        let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let Ok(all) = self.docker.list_containers(Some(options)).await else {
            return Ok(()); // cannot tell: go on, as without the check
        };
        if all.len() < 2 {
            return Ok(());
        }
        let winner = all
            .iter()
            .filter_map(|c| Some((c.created.unwrap_or(i64::MAX), c.id.as_deref()?)))
            .min();
        if winner.is_some_and(|(_, id)| id != ours.id) {
            let options = bollard::query_parameters::RemoveContainerOptionsBuilder::default()
                .force(true)
                .build();
            let _ = self.docker.remove_container(&ours.id, Some(options)).await;
            return Err(DockerError::Duplicate {
                label: format!("{key}={value}"),
            });
        }
        Ok(())
    }

    /// Starts a created container.
    ///
    /// # Errors
    /// [`DockerError::StartFailed`].
    pub async fn start_container(&self, container: &CreatedContainer) -> Result<(), DockerError> {
        self.docker
            .start_container(&container.id, None)
            .await
            .map_err(|e| DockerError::StartFailed {
                container: container.display_name().to_owned(),
                failure: e.into(),
            })
    }

    /// Pull (per policy), create, connect the extra networks and start: everything up to a
    /// running container. A container created before a later step failed is left in place, as
    /// the Python worker leaves it, so its state can be inspected.
    ///
    /// # Errors
    /// The failing step's [`DockerError`].
    pub async fn create_and_start_container(
        &self,
        spec: &ContainerSpec,
    ) -> Result<StartedContainer, DockerError> {
        self.create_and_start_while(spec, &|| true).await
    }

    /// [`DockerRuntime::create_and_start_container`], asking `wanted()` before the pull,
    /// before the create and right before the start: once it says no, nothing more happens, a
    /// container already created is removed, and the answer is [`DockerError::Withdrawn`].
    /// So a run cancelled while it was being submitted never gets a container started.
    ///
    /// # Errors
    /// The failing step's [`DockerError`], or [`DockerError::Withdrawn`].
    pub async fn create_and_start_while(
        &self,
        spec: &ContainerSpec,
        wanted: &(dyn Fn() -> bool + Sync),
    ) -> Result<StartedContainer, DockerError> {
        if !wanted() {
            return Err(DockerError::Withdrawn { stage: "pulled" });
        }
        let pull_duration = self.ensure_image(spec).await?;
        if !wanted() {
            return Err(DockerError::Withdrawn { stage: "created" });
        }
        let container = self.create_container(spec).await?;
        if let Some((key, value)) = &spec.exclusive_label {
            self.stand_down_if_duplicate(&container, key, value).await?;
        }
        self.connect_networks(&container, &spec.extra_networks)
            .await?;
        if !wanted() {
            self.force_remove(&container, "withdrawn container").await;
            return Err(DockerError::Withdrawn { stage: "started" });
        }
        match self.start_container(&container).await {
            Err(DockerError::StartFailed { container, failure })
                if spec.host_config_overrides.contains_key("DeviceRequests")
                    && failure.message.contains("could not select device driver") =>
            {
                return Err(DockerError::NoGpuRuntime { container, failure });
            }
            other => other?,
        }
        Ok(StartedContainer {
            container,
            pull_duration,
        })
    }

    /// Force-removes a container the worker is done with; a failure is only logged, with
    /// `what` saying which container it was.
    async fn force_remove(&self, container: &CreatedContainer, what: &str) {
        let options = bollard::query_parameters::RemoveContainerOptionsBuilder::default()
            .force(true)
            .build();
        if let Err(e) = self
            .docker
            .remove_container(&container.id, Some(options))
            .await
        {
            tracing::warn!(container = container.display_name(), error = %EngineFailure::from(e), "could not remove the {what}");
        }
    }

    /// Streams the container's output to `output` (one call per chunk of lines, right-trimmed)
    /// if `stream_output`, and waits for it to exit. The exit code comes from the wait itself,
    /// not from an earlier inspect, so it is right even without streaming. For `auto_remove`
    /// containers it waits for removal; if the container was already gone, the code is
    /// recovered from the Engine's `die` event.
    ///
    /// # Errors
    /// [`DockerError::WatchFailed`] when the outcome cannot be learned.
    pub async fn watch_container(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        stream_output: bool,
        output: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<ExitStatus, DockerError> {
        let (code, engine_lost) = self
            .watch_inner(container, auto_remove, stream_output, None, output)
            .await?;
        Ok(self
            .exit_status(container, auto_remove, code, engine_lost)
            .await)
    }

    /// Watches a container this process did not start (found after a restart): output from
    /// now on only, so nothing already printed is printed twice, then the exit as usual.
    ///
    /// # Errors
    /// [`DockerError::WatchFailed`] when the outcome cannot be learned.
    pub async fn reattach_container(
        &self,
        found: &FoundContainer,
        stream_output: bool,
        output: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<ExitStatus, DockerError> {
        let since = chrono::Utc::now().timestamp();
        let (code, engine_lost) = self
            .watch_inner(
                &found.container,
                found.auto_remove,
                stream_output,
                Some(since),
                output,
            )
            .await?;
        Ok(self
            .exit_status(&found.container, found.auto_remove, code, engine_lost)
            .await)
    }

    /// [`DockerRuntime::watch_container`] with the output taken from `logs_since` (unix
    /// seconds) on when given: one call for a container this process started and for one it
    /// adopted after a restart.
    ///
    /// # Errors
    /// [`DockerError::WatchFailed`] when the outcome cannot be learned.
    pub async fn watch_container_since(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        stream_output: bool,
        logs_since: Option<i64>,
        output: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<ExitStatus, DockerError> {
        let (code, engine_lost) = self
            .watch_inner(container, auto_remove, stream_output, logs_since, output)
            .await?;
        Ok(self
            .exit_status(container, auto_remove, code, engine_lost)
            .await)
    }

    async fn exit_status(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        code: i64,
        engine_lost: bool,
    ) -> ExitStatus {
        let inspected_oom = if auto_remove || code == 0 {
            None
        } else {
            self.docker
                .inspect_container(&container.id, None)
                .await
                .ok()
                .and_then(|i| i.state)
                .and_then(|s| s.oom_killed)
        };
        // A removed container cannot be inspected: its `oom` event says it instead.
        let oom_killed = match inspected_oom {
            Some(oom) => oom,
            None if code != 0 => self.saw_event(container, &["oom"]).await,
            None => false,
        };
        ExitStatus {
            code,
            oom_killed,
            engine_lost,
        }
    }

    /// Watches to the exit, riding out an Engine that goes away (daemon restart): once it
    /// answers again the container is inspected — still running (live-restore) means watch
    /// again, exited means that is the exit code. Returns the code and whether the Engine was
    /// lost in between.
    async fn watch_inner(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        stream_output: bool,
        logs_since: Option<i64>,
        output: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(i64, bool), DockerError> {
        let mut since = logs_since;
        let mut engine_lost = false;
        loop {
            match self
                .watch_once(container, auto_remove, stream_output, since, output)
                .await
            {
                Err(DockerError::WatchFailed { failure, .. }) if failure.status.is_none() => {
                    engine_lost = true;
                    tracing::warn!(container = container.display_name(), error = %failure, "lost the Docker Engine while watching; waiting for it to come back");
                    match self.recover(container).await {
                        Ok(Some(code)) => return Ok((code, true)),
                        Ok(None) => {
                            since = Some(chrono::Utc::now().timestamp());
                            continue;
                        }
                        Err(failure) if auto_remove && failure.is_not_found() => {
                            return self
                                .exit_code_from_events(container)
                                .await
                                .map(|code| (code, true))
                                .ok_or(DockerError::WatchFailed {
                                    container: container.display_name().to_owned(),
                                    failure,
                                });
                        }
                        Err(failure) => {
                            return Err(DockerError::WatchFailed {
                                container: container.display_name().to_owned(),
                                failure,
                            });
                        }
                    }
                }
                other => return other.map(|code| (code, engine_lost)),
            }
        }
    }

    /// Waits (with backoff, up to [`ENGINE_RECOVERY_LIMIT`]) for the Engine to answer, then
    /// inspects the container: `Some(code)` if it has exited, `None` if it is still running.
    async fn recover(&self, container: &CreatedContainer) -> Result<Option<i64>, EngineFailure> {
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(500);
        loop {
            tokio::time::sleep(delay).await;
            match self.docker.inspect_container(&container.id, None).await {
                Ok(info) => {
                    let state = info.state.unwrap_or_default();
                    tracing::info!(
                        container = container.display_name(),
                        running = state.running.unwrap_or(false),
                        "Docker Engine answers again"
                    );
                    return Ok(if state.running.unwrap_or(false) {
                        None
                    } else {
                        Some(state.exit_code.unwrap_or(-1))
                    });
                }
                Err(e) => {
                    let failure = EngineFailure::from(e);
                    if failure.status.is_some() || started.elapsed() > ENGINE_RECOVERY_LIMIT {
                        return Err(failure);
                    }
                }
            }
            delay = (delay * 2).min(Duration::from_secs(15));
        }
    }

    async fn watch_once(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        stream_output: bool,
        logs_since: Option<i64>,
        output: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<i64, DockerError> {
        let removed_by_engine = auto_remove && !self.is_podman;
        let condition = if removed_by_engine {
            "removed"
        } else {
            "not-running"
        };
        let wait = async {
            let options = WaitContainerOptionsBuilder::default()
                .condition(condition)
                .build();
            let mut stream = self.docker.wait_container(&container.id, Some(options));
            match stream.next().await {
                Some(Ok(resp)) => Ok(resp.status_code),
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    Ok(code)
                }
                Some(Err(e)) => Err(EngineFailure::from(e)),
                None => Err(EngineFailure {
                    status: None,
                    message: "the wait stream ended without a result".into(),
                }),
            }
        };
        let logs = async {
            if stream_output {
                self.stream_logs(container, auto_remove, logs_since, output)
                    .await;
            }
        };
        let (waited, ()) = tokio::join!(wait, logs);
        match waited {
            Ok(code) if auto_remove && self.is_podman => {
                self.force_remove(container, "exited container (auto_remove)")
                    .await;
                Ok(code)
            }
            Ok(code) => Ok(code),
            Err(failure) if auto_remove && failure.is_not_found() => {
                // Removed before the wait registered: the exit code is still in the event log.
                self.exit_code_from_events(container)
                    .await
                    .ok_or(DockerError::WatchFailed {
                        container: container.display_name().to_owned(),
                        failure,
                    })
            }
            Err(failure) => Err(DockerError::WatchFailed {
                container: container.display_name().to_owned(),
                failure,
            }),
        }
    }

    async fn stream_logs(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        since: Option<i64>,
        output: &(dyn Fn(&str) + Send + Sync),
    ) {
        let mut options = LogsOptionsBuilder::default()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .tail("all")
            .build();
        if let Some(since) = since {
            options.since = i32::try_from(since).unwrap_or(i32::MAX);
        }
        let mut stream = self.docker.logs(&container.id, Some(options));
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => {
                    let bytes = chunk.into_bytes();
                    let text = String::from_utf8_lossy(&bytes);
                    output(text.trim_end());
                }
                Err(e) => {
                    let failure = EngineFailure::from(e);
                    let name = container.display_name();
                    if failure.message.contains("marked for removal") {
                        tracing::warn!(
                            container = name,
                            "Docker container was marked for removal before logs could be retrieved. Output will not be streamed."
                        );
                    } else if auto_remove && failure.is_not_found() {
                        tracing::warn!(
                            container = name,
                            "Docker container was removed before logs could be retrieved. Output will not be streamed."
                        );
                    } else {
                        tracing::error!(container = name, error = %failure, "An unexpected Docker API error occurred while streaming output from the container");
                    }
                    return;
                }
            }
        }
    }

    /// The container's past events whose action is one of `actions` (`die` also matches
    /// Podman's `died`), since it was created, oldest first. Docker filters server-side;
    /// Podman's compat API ignores list-form filters and answers nothing, so an empty answer is
    /// retried unfiltered over the container's lifetime and matched here.
    async fn past_events(
        &self,
        container: &CreatedContainer,
        actions: &[&str],
    ) -> Vec<EventMessage> {
        let since = (container.created_at - 1).to_string();
        let until = (chrono::Utc::now().timestamp() + 1).to_string();
        let filters = HashMap::from([
            ("container".to_owned(), vec![container.id.clone()]),
            (
                "event".to_owned(),
                actions.iter().map(|a| (*a).to_owned()).collect(),
            ),
        ]);
        let wanted = |event: &EventMessage| {
            let ours =
                event.actor.as_ref().and_then(|a| a.id.as_deref()) == Some(container.id.as_str());
            let action = match event.action.as_deref() {
                Some("died") => "die",
                Some(a) => a,
                None => return false,
            };
            ours && actions.contains(&action)
        };
        for filtered in [true, false] {
            let mut builder = EventsOptionsBuilder::default().since(&since).until(&until);
            if filtered {
                builder = builder.filters(&filters);
            }
            let mut stream = self.docker.events(Some(builder.build()));
            let mut found = Vec::new();
            while let Some(Ok(event)) = stream.next().await {
                if wanted(&event) {
                    found.push(event);
                }
            }
            if !found.is_empty() {
                return found;
            }
        }
        Vec::new()
    }

    /// The exit code from the container's most recent `die` event.
    async fn exit_code_from_events(&self, container: &CreatedContainer) -> Option<i64> {
        self.past_events(container, &["die"])
            .await
            .into_iter()
            .filter_map(|e| e.actor?.attributes?.get("exitCode")?.parse().ok())
            .next_back()
    }

    /// Whether the Engine's event log has one of `actions` for this container.
    async fn saw_event(&self, container: &CreatedContainer, actions: &[&str]) -> bool {
        !self.past_events(container, actions).await.is_empty()
    }

    /// The Engine's live stream of `die`, `oom` and `kill` events of containers carrying
    /// `label` (`key=value`), from `since` (unix seconds) on. Ends when the connection does.
    pub fn container_events(
        &self,
        label: &str,
        since: i64,
    ) -> impl futures_util::Stream<Item = Result<ContainerEvent, DockerError>> + use<> {
        let filters = HashMap::from([
            ("label".to_owned(), vec![label.to_owned()]),
            ("type".to_owned(), vec!["container".to_owned()]),
            (
                "event".to_owned(),
                vec!["die".to_owned(), "oom".to_owned(), "kill".to_owned()],
            ),
        ]);
        let options = EventsOptionsBuilder::default()
            .since(&since.to_string())
            .filters(&filters)
            .build();
        self.docker
            .events(Some(options))
            .filter_map(|item| async move {
                match item {
                    Err(e) => Some(Err(DockerError::Api {
                        operation: "events",
                        failure: e.into(),
                    })),
                    Ok(event) => {
                        let actor = event.actor?;
                        let id = actor.id?;
                        let attributes = actor.attributes.unwrap_or_default();
                        let kind = match event.action.as_deref()? {
                            "die" | "died" => ContainerEventKind::Died {
                                code: attributes
                                    .get("exitCode")
                                    .and_then(|c| c.parse().ok())
                                    .unwrap_or(-1),
                            },
                            "oom" => ContainerEventKind::OomKilled,
                            "kill" => ContainerEventKind::Killed {
                                signal: attributes.get("signal").cloned().unwrap_or_default(),
                            },
                            _ => return None,
                        };
                        Some(Ok(ContainerEvent {
                            id,
                            kind,
                            time: event.time.unwrap_or_default(),
                        }))
                    }
                }
            })
    }

    /// Stops a container: SIGTERM (or its stop signal), then SIGKILL after `grace`. A container
    /// that is already gone or stopped is not an error.
    ///
    /// # Errors
    /// [`DockerError::Api`] when the Engine refuses.
    pub async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = bollard::query_parameters::StopContainerOptionsBuilder::default()
            .t(seconds)
            .build();
        // The stop call itself lasts up to `grace`: give it that on top of the usual timeout.
        let docker = self
            .docker
            .clone()
            .with_timeout(self.docker.timeout() + grace);
        match docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let failure = EngineFailure::from(e);
                if failure.is_not_found() || failure.status == Some(304) {
                    Ok(())
                } else {
                    Err(DockerError::Api {
                        operation: "stop container",
                        failure,
                    })
                }
            }
        }
    }

    /// Every container (any state) carrying all of `labels` (`key=value`).
    ///
    /// # Errors
    /// [`DockerError::Api`] when the Engine cannot list containers.
    pub async fn find_containers(
        &self,
        labels: &[String],
    ) -> Result<Vec<FoundContainer>, DockerError> {
        let filters = HashMap::from([("label".to_owned(), labels.to_vec())]);
        let summaries = self.list_containers(&filters).await?;
        let mut found = Vec::with_capacity(summaries.len());
        for summary in summaries {
            let Some(id) = summary.id else { continue };
            let Ok(info) = self.docker.inspect_container(&id, None).await else {
                continue; // removed meanwhile
            };
            let state = info.state.unwrap_or_default();
            let running = state.running.unwrap_or(false);
            let exited = matches!(
                state.status,
                Some(
                    bollard::models::ContainerStateStatusEnum::EXITED
                        | bollard::models::ContainerStateStatusEnum::DEAD
                )
            );
            found.push(FoundContainer {
                container: CreatedContainer {
                    name: info.name.map(|n| n.trim_start_matches('/').to_owned()),
                    created_at: summary.created.unwrap_or_default(),
                    id,
                },
                labels: summary.labels.unwrap_or_default(),
                image: summary.image.unwrap_or_default(),
                running,
                exit_code: if exited { state.exit_code } else { None },
                auto_remove: info
                    .host_config
                    .and_then(|h| h.auto_remove)
                    .unwrap_or(false),
                oom_killed: state.oom_killed.unwrap_or(false),
            });
        }
        Ok(found)
    }

    /// Every container (running or not) matching the Engine's list `filters`.
    pub(super) async fn list_containers(
        &self,
        filters: &HashMap<String, Vec<String>>,
    ) -> Result<Vec<bollard::models::ContainerSummary>, DockerError> {
        let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
            .all(true)
            .filters(filters)
            .build();
        self.docker
            .list_containers(Some(options))
            .await
            .map_err(|e| DockerError::Api {
                operation: "list containers",
                failure: e.into(),
            })
    }

    /// Whether a container exists (for tests and reattachment).
    ///
    /// # Errors
    /// [`DockerError::Api`] for anything but 404.
    pub async fn container_exists(&self, id: &str) -> Result<bool, DockerError> {
        match self.docker.inspect_container(id, None).await {
            Ok(_) => Ok(true),
            Err(e) => {
                let failure = EngineFailure::from(e);
                if failure.status == Some(404) {
                    Ok(false)
                } else {
                    Err(DockerError::Api {
                        operation: "inspect container",
                        failure,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            image: "local/busybox:dw".into(),
            pull_policy: PullPolicy::Never,
            registry_credentials: None,
            name: Some("n".into()),
            command: vec!["true".into()],
            env: vec![("A".into(), "1".into())],
            labels: BTreeMap::from([("l".into(), "v".into())]),
            network_mode: "host".into(),
            extra_networks: vec![],
            binds: vec!["/tmp:/t".into()],
            volume_paths: vec!["/t".into()],
            mem_limit: Some(1 << 26),
            memswap_limit: None,
            privileged: false,
            auto_remove: true,
            stream_output: true,
            extra_hosts: Some(vec!["host.docker.internal:host-gateway".into()]),
            config_overrides: Map::from_iter([("User".to_owned(), json!("1000"))]),
            host_config_overrides: Map::from_iter([("ShmSize".to_owned(), json!(1024))]),
            exclusive_label: None,
            platform: None,
        }
    }

    #[test]
    fn create_body_has_the_reference_shape() {
        let body = serde_json::to_value(DockerRuntime::create_body(&spec()).unwrap()).unwrap();
        assert_eq!(body["Env"], json!(["A=1"]));
        assert_eq!(body["Cmd"], json!(["true"]));
        assert_eq!(body["Volumes"], json!({"/t": {}}));
        assert_eq!(body["User"], json!("1000"));
        let hc = &body["HostConfig"];
        assert_eq!(hc["NetworkMode"], json!("host"));
        assert_eq!(hc["Memory"], json!(1 << 26));
        assert_eq!(hc["AutoRemove"], json!(true));
        assert_eq!(hc["ShmSize"], json!(1024));
        assert_eq!(
            hc["ExtraHosts"],
            json!(["host.docker.internal:host-gateway"])
        );
        assert!(hc.get("Privileged").is_none() && hc.get("MemorySwap").is_none());
    }

    #[test]
    fn bad_overrides_are_reported() {
        let mut s = spec();
        s.host_config_overrides
            .insert("ShmSize".into(), json!("not a number"));
        assert!(matches!(
            DockerRuntime::create_body(&s),
            Err(DockerError::InvalidOptions { .. })
        ));
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url_for("unix:///var/run/docker.sock", false),
            "http+docker://localhost"
        );
        assert_eq!(
            base_url_for("tcp://127.0.0.1:2376", false),
            "http://127.0.0.1:2376"
        );
        assert_eq!(
            base_url_for("tcp://127.0.0.1:2376", true),
            "https://127.0.0.1:2376"
        );
    }
}
