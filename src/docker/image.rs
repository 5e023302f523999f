//! Making a job's image available: the pull policy, the registry login (`POST /auth`) before a
//! pull, the credentials a pull sends, and one shared pull (single-flight) for every run that
//! needs the same image with the same credentials at the same time. Knows bollard's image
//! calls and the job's `ContainerSpec`, nothing of Prefect.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::query_parameters::CreateImageOptionsBuilder;
use futures_util::StreamExt as _;
use serde_json::Value;
use tracing::Instrument as _;

use super::connect::DockerRuntime;
use super::error::{DockerError, EngineFailure};
use crate::job::{ContainerSpec, PullPolicy, RegistryCredentials};

/// How a shared pull failed: at the registry login before it, or at the pull itself.
#[derive(Debug, Clone)]
pub(super) enum PullFailure {
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

/// One pull as the single flight runs it: everything it needs, owned, so the flight does not
/// borrow from the run that happened to start it.
struct Pull {
    docker: Docker,
    /// The registry to log in to first, when the job has credentials not already logged in.
    login: Option<RegistryCredentials>,
    /// What the pull sends as `X-Registry-Auth`.
    credentials: Option<DockerCredentials>,
    image: String,
    platform: Option<String>,
    /// The runtime's count of pulls made.
    made: Arc<AtomicU64>,
    /// Run first (`--min-free-disk`: an image collection when the disk is short).
    guard: Option<Arc<dyn super::images::PullGuard>>,
}

impl Pull {
    /// Logs in (if asked to), then pulls the image to the end of the Engine's progress stream.
    async fn run(self) -> Result<(), PullFailure> {
        if let Some(guard) = &self.guard {
            guard.before_pull(&self.image).await;
        }
        if let Some(login) = &self.login {
            tracing::info!(registry = %login.registry_url, "Logging into Docker registry...");
            registry_login(&self.docker, login)
                .await
                .map_err(|failure| PullFailure::Login {
                    registry: login.registry_url.clone(),
                    failure,
                })?;
        }
        self.made.fetch_add(1, Ordering::Relaxed);
        let image = &self.image;
        tracing::info!(image = %image, "Pulling image '{image}'...");
        let image_ref = crate::job::image::ImageRef::parse(image).map_err(|e| {
            PullFailure::Pull(EngineFailure {
                status: None,
                message: e.to_string(),
            })
        })?;
        let mut options = CreateImageOptionsBuilder::default()
            .from_image(&image_ref.repository)
            .tag(image_ref.tag.as_deref().unwrap_or("latest"));
        if let Some(platform) = &self.platform {
            options = options.platform(platform);
        }
        let mut stream = self
            .docker
            .create_image(Some(options.build()), None, self.credentials);
        while let Some(item) = stream.next().await {
            item.map_err(|e| PullFailure::Pull(e.into()))?;
        }
        Ok(())
    }
}

impl DockerRuntime {
    /// Makes sure the image is available according to the spec's pull policy. Returns how long
    /// a pull took, when one happened.
    ///
    /// # Errors
    /// [`DockerError::PullFailed`], [`DockerError::PullAndLocalFailed`] or an API error.
    pub async fn ensure_image(
        &self,
        spec: &ContainerSpec,
    ) -> Result<Option<Duration>, DockerError> {
        let started = Instant::now();
        // Pre-pulls too: an image collection must not remove an image while it arrives.
        let _in_flight = self.in_flight.enter(&spec.image);
        let pulled = self.ensure_image_inner(spec).await?;
        Ok(pulled.then(|| started.elapsed()))
    }

    /// True when a pull was made.
    async fn ensure_image_inner(&self, spec: &ContainerSpec) -> Result<bool, DockerError> {
        match spec.pull_policy {
            PullPolicy::Never => Ok(false),
            PullPolicy::Always => self.pull_image(spec).await.map(|()| true),
            PullPolicy::IfNotPresent => self.pull_if_missing(spec).await,
            PullPolicy::IfPossible => self.pull_or_use_local(spec).await,
        }
    }

    /// `if_not_present`: pulls only when the Engine does not have the image. True when a pull
    /// was made.
    async fn pull_if_missing(&self, spec: &ContainerSpec) -> Result<bool, DockerError> {
        match self.docker.inspect_image(&spec.image).await {
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
        }
    }

    /// `if_possible`: pulls, and falls back to a local image when the pull fails. True when a
    /// pull was made.
    async fn pull_or_use_local(&self, spec: &ContainerSpec) -> Result<bool, DockerError> {
        let Err(pull) = self.pull_image(spec).await else {
            return Ok(true);
        };
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

    /// How many pulls this runtime has made (concurrent requests for one image count once).
    pub fn pulls_made(&self) -> u64 {
        self.pulls_made.load(Ordering::Relaxed)
    }

    /// Whether the Docker SDK would skip the login: `reauth: false` and `config.json` already
    /// holds a login of the same user for that registry (whose credentials the pull then uses).
    async fn login_cached(&self, credentials: &RegistryCredentials) -> bool {
        if credentials.reauth {
            return false;
        }
        let Some(dir) = self.docker_config.as_deref() else {
            return false;
        };
        super::auth::credentials_for_registry(&credentials.registry_url, dir)
            .await
            .is_some_and(|stored| stored.username.as_deref() == Some(&credentials.username))
    }

    /// The credentials sent with a pull (`X-Registry-Auth`): the job's `registry_credentials`
    /// when they are for the image's registry (and were logged in with), else whatever
    /// `config.json` holds for that registry.
    async fn pull_credentials(&self, spec: &ContainerSpec) -> Option<DockerCredentials> {
        if let Some(c) = &spec.registry_credentials
            && super::auth::serves(&c.registry_url, &spec.image)
            && !self.login_cached(c).await
        {
            return Some(DockerCredentials {
                username: Some(c.username.clone()),
                password: Some(c.password.clone()),
                serveraddress: Some(c.registry_url.clone()),
                ..DockerCredentials::default()
            });
        }
        let dir = self.docker_config.as_deref()?;
        super::auth::credentials_for(&spec.image, dir).await
    }

    /// Logs in to the registry when the job has `registry_credentials` (`POST /auth`), then
    /// pulls the spec's image; a failed login fails the pull. Concurrent pulls of the same image
    /// (same platform, same credentials) are one login and one pull: the later callers wait for
    /// it and share its outcome.
    async fn pull_image(&self, spec: &ContainerSpec) -> Result<(), DockerError> {
        let login = match &spec.registry_credentials {
            Some(c) if !self.login_cached(c).await => Some(c.clone()),
            _ => None,
        };
        let credentials = self.pull_credentials(spec).await;
        let key = pull_key(spec, login.as_ref(), credentials.as_ref());
        let pull = Pull {
            docker: self.docker.clone(),
            login,
            credentials,
            image: spec.image.clone(),
            platform: spec.platform.clone(),
            made: Arc::clone(&self.pulls_made),
            guard: self.pull_guard.0.clone(),
        };
        let (result, started_here) = self
            .pulls
            .run(&key, move || pull.run().in_current_span())
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
}
