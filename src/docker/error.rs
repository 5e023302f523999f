//! Docker runtime errors: one variant per step, each carrying what a user needs to act.

/// A bollard error reduced to what callers branch on: the HTTP status (if the Engine
/// answered) and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineFailure {
    /// HTTP status from the Engine, `None` for transport or stream errors.
    pub status: Option<u16>,
    /// The Engine's message (or the transport error's text).
    pub message: String,
}

impl std::fmt::Display for EngineFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(status) => write!(f, "{} (HTTP {status})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl From<bollard::errors::Error> for EngineFailure {
    fn from(error: bollard::errors::Error) -> Self {
        use bollard::errors::Error as E;
        match error {
            E::DockerResponseServerError {
                status_code,
                message,
            } => Self {
                status: Some(status_code),
                message,
            },
            E::DockerStreamError { error } => Self {
                status: None,
                message: error,
            },
            other => Self {
                status: None,
                message: with_sources(&other),
            },
        }
    }
}

/// Words of Engine and registry messages that say "try again later".
const TRANSIENT_WORDS: &[&str] = &[
    "timeout",
    "timed out",
    "deadline exceeded",
    "temporarily",
    "try again",
    "connection reset",
    "connection refused",
    "unexpected eof",
    "toomanyrequests",
    "too many requests",
    "service unavailable",
    "bad gateway",
    "gateway timeout",
    "http status: 502",
    "http status: 503",
    "http status: 504",
];

/// Words that say the job itself is at fault, whatever the status.
const PERMANENT_WORDS: &[&str] = &[
    "not found",
    "manifest unknown",
    "unauthorized",
    "denied",
    "no such",
    "invalid",
    "executable file",
    "permission",
    "oci runtime",
];
/// An error's text followed by each of its sources' that adds something: hyper's
/// `client error (Connect)` alone does not say that the socket refused permission.
fn with_sources(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// Why a connection to the Engine failed, as far as the error's sources tell, with what to do
/// about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectCause {
    /// The socket exists but this user may not use it.
    PermissionDenied,
    /// No socket (or directory) at the path.
    NoSuchSocket,
    /// Nothing listens at the address.
    Refused,
    /// The TLS handshake failed (certificates, or a daemon that does not speak TLS there).
    Tls,
    /// Something else; the message says what.
    Other,
}

impl ConnectCause {
    /// Classifies a bollard connection error by its sources.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        let mut tls = false;
        while let Some(cause) = source {
            if let Some(bollard::errors::Error::SocketNotFoundError(_)) =
                cause.downcast_ref::<bollard::errors::Error>()
            {
                return Self::NoSuchSocket;
            }
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                // An io error's `source()` skips the error it wraps: look at that too.
                tls |= io
                    .get_ref()
                    .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
                match io.kind() {
                    std::io::ErrorKind::PermissionDenied => return Self::PermissionDenied,
                    std::io::ErrorKind::NotFound => return Self::NoSuchSocket,
                    std::io::ErrorKind::ConnectionRefused => return Self::Refused,
                    _ => {}
                }
            }
            if cause.downcast_ref::<rustls::Error>().is_some() {
                tls = true;
            }
            let text = cause.to_string().to_ascii_lowercase();
            tls |= ["tls", "certificate", "handshake", "corrupt message"]
                .iter()
                .any(|w| text.contains(w));
            source = cause.source();
        }
        if tls { Self::Tls } else { Self::Other }
    }

    /// What to do about it, for the message.
    pub fn hint(self) -> &'static str {
        match self {
            Self::PermissionDenied => {
                "permission denied on the Docker socket: add the user the worker runs as to the `docker` group (or point DOCKER_HOST at a socket it may use)"
            }
            Self::NoSuchSocket => {
                "no such socket: is the Docker daemon running, and is DOCKER_HOST right?"
            }
            Self::Refused => {
                "connection refused: nothing listens there; is the Docker daemon running, and is DOCKER_HOST right?"
            }
            Self::Tls => {
                "the TLS handshake failed: check DOCKER_CERT_PATH (ca.pem, cert.pem, key.pem) and that the daemon serves TLS at DOCKER_HOST"
            }
            Self::Other => "",
        }
    }
}

fn hint_suffix(cause: &ConnectCause) -> String {
    match cause.hint() {
        "" => String::new(),
        hint => format!(" ({hint})"),
    }
}

impl EngineFailure {
    /// Worth trying again in a moment: no answer at all, a gateway/unavailable status, a
    /// registry rate limit, or a 5xx whose message says it is temporary. A failure whose
    /// message names the job's fault (missing image, bad credentials, bad command) never is.
    pub fn is_transient(&self) -> bool {
        let message = self.message.to_ascii_lowercase();
        if PERMANENT_WORDS.iter().any(|w| message.contains(w)) {
            return false;
        }
        let says_transient = TRANSIENT_WORDS.iter().any(|w| message.contains(w));
        match self.status {
            None => true,
            Some(429 | 502 | 503 | 504) => true,
            Some(s) if s >= 500 => says_transient,
            Some(_) => false,
        }
    }

    /// 404, or Podman's "no such container" wording.
    pub fn is_not_found(&self) -> bool {
        self.status == Some(404)
            || self
                .message
                .to_ascii_lowercase()
                .contains("no such container")
    }

    /// The Engine's answer to a create whose name is taken.
    /// Podman answers the same situation with a 500 and "… name … is already in use".
    pub fn is_name_conflict(&self) -> bool {
        let docker = self.status == Some(409)
            && self.message.contains("Conflict")
            && self.message.contains("container name");
        let podman = self.status == Some(500)
            && self.message.contains("name")
            && self.message.contains("already in use");
        docker || podman
    }
}

/// Everything the Docker runtime can fail at.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// No Engine answers at the configured host.
    #[error("Could not connect to Docker at {host}: {failure}{}", hint_suffix(.cause))]
    Connect {
        /// `DOCKER_HOST` or the default socket (credentials removed).
        host: String,
        /// What happened, with the error's sources.
        failure: EngineFailure,
        /// Why, as far as the sources tell.
        cause: ConnectCause,
    },
    /// The registry or the Engine refused a pull, or the registry login (`POST /auth`) that
    /// comes first when the job has `registry_credentials`.
    #[error("Docker pull failed for {image}: {}{failure}", login_failed_prefix(.login_registry.as_deref()))]
    PullFailed {
        /// Image reference.
        image: String,
        /// The registry whose login failed, when it was the login that failed.
        login_registry: Option<String>,
        /// What the Engine said.
        failure: EngineFailure,
    },
    /// `IfPossible`: the pull (or its login) failed and there is no local copy either. Laid out
    /// as the Python worker's message, so both read the same in the UI.
    #[error(
        "Docker operation completely failed for '{image}':\n-> [1. Login/Pull Error]: {pull}\n\n-> [2. Local Error]: {local}\n\n-> NOTE: Because ImagePullPolicy was set to 'ImagePullPolicy.IF_POSSIBLE', a local fallback was attempted after the pull failed, but the image could not be found locally either."
    )]
    PullAndLocalFailed {
        /// Image reference.
        image: String,
        /// Why the pull failed (a [`DockerError::PullFailed`]).
        pull: Box<DockerError>,
        /// Why the local lookup failed.
        local: EngineFailure,
    },
    /// The image is not on this Docker host and the policy did not allow pulling it.
    #[error(
        "No such image: {image} (image_pull_policy is {policy}, so the worker did not pull it)"
    )]
    ImageNotFound {
        /// Image reference.
        image: String,
        /// The effective pull policy.
        policy: &'static str,
    },
    /// Every name suffix tried was taken.
    #[error(
        "Docker container name '{name}' is already in use and {attempts} suffixed names were taken too"
    )]
    NameConflict {
        /// The configured name.
        name: String,
        /// How many names were tried.
        attempts: u32,
    },
    /// `container_create_kwargs` produced fields the Engine API model rejects.
    #[error("invalid container options: {message}")]
    InvalidOptions {
        /// What did not fit.
        message: String,
    },
    /// A combination of options the Docker SDK refuses before asking the Engine (published
    /// ports with the host's network, where the Engine would silently drop them).
    #[error("{message}")]
    InvalidArgument {
        /// What is wrong, in docker-py's words.
        message: String,
    },
    /// The Engine refused to create the container.
    #[error("Docker could not create container '{name}': {failure}")]
    CreateFailed {
        /// Requested name (or `<auto>`).
        name: String,
        /// What the Engine said.
        failure: EngineFailure,
    },
    /// A network to connect does not exist.
    #[error("Docker network '{network}' not found")]
    NetworkNotFound {
        /// Network name.
        network: String,
    },
    /// Connecting the container to a network failed.
    #[error("Docker could not connect container '{container}' to network '{network}': {failure}")]
    NetworkConnectFailed {
        /// Container name or id.
        container: String,
        /// Network name.
        network: String,
        /// What the Engine said.
        failure: EngineFailure,
    },
    /// The container was created but would not start.
    #[error("Docker could not start container '{container}': {failure}")]
    StartFailed {
        /// Container name or id.
        container: String,
        /// What the Engine said.
        failure: EngineFailure,
    },
    /// The container asked for GPUs (`DeviceRequests`) and the Engine has no runtime that
    /// provides them.
    #[error(
        "Docker could not start container '{container}': the job requests GPUs, but this Docker host has no GPU runtime to provide them (install the NVIDIA Container Toolkit and register its runtime with Docker, or run the job on a GPU host): {failure}"
    )]
    NoGpuRuntime {
        /// Container name or id.
        container: String,
        /// What the Engine said.
        failure: EngineFailure,
    },
    /// Waiting for the container failed; its outcome is unknown.
    #[error("lost track of container '{container}': {failure}")]
    WatchFailed {
        /// Container name or id.
        container: String,
        /// What the Engine said.
        failure: EngineFailure,
    },
    /// Another container with the same exclusive label exists (another worker on this host
    /// runs the same flow run); ours was removed before it started.
    #[error("another container labelled {label} exists on this Docker host; this one stood down")]
    Duplicate {
        /// The exclusive label.
        label: String,
    },
    /// The caller withdrew the run before its container was started (it was cancelled); a
    /// container already created was removed.
    #[error("the run was withdrawn before its container was {stage}")]
    Withdrawn {
        /// The step that did not happen: `pulled`, `created` or `started`.
        stage: &'static str,
    },
    /// Any other Engine call.
    #[error("Docker API call {operation} failed: {failure}")]
    Api {
        /// The call (`inspect container`, `version`, …).
        operation: &'static str,
        /// What the Engine said.
        failure: EngineFailure,
    },
}

fn login_failed_prefix(registry: Option<&str>) -> String {
    registry
        .map(|r| format!("login to registry {r} failed: "))
        .unwrap_or_default()
}

impl DockerError {
    /// A failure of the Engine or the registry that may well not happen again: worth retrying
    /// the submission (`--submit-retries`). Failures about the job (missing image, invalid
    /// options, name conflicts, a bad command) are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::PullFailed { failure, .. }
            | Self::CreateFailed { failure, .. }
            | Self::NetworkConnectFailed { failure, .. }
            | Self::StartFailed { failure, .. }
            | Self::Api { failure, .. } => failure.is_transient(),
            _ => false,
        }
    }

    /// A short class name for Prefect state messages, in the spirit of the Python worker's
    /// `<ExceptionClass>: <message>` (`ImageNotFound`, `PullFailed`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "DockerConnectionError",
            // A failed login is reported as a failed pull: it is the first step of getting the
            // image, as in the Python worker's "[1. Login/Pull Error]".
            Self::PullFailed { .. } => "PullFailed",
            Self::PullAndLocalFailed { .. } => "PullFailed",
            Self::ImageNotFound { .. } => "ImageNotFound",
            Self::NameConflict { .. } => "NameConflict",
            Self::InvalidOptions { .. } => "InvalidContainerOptions",
            Self::InvalidArgument { .. } => "InvalidArgument",
            Self::CreateFailed { .. } => "CreateFailed",
            Self::NetworkNotFound { .. } => "NetworkNotFound",
            Self::NetworkConnectFailed { .. } => "NetworkConnectFailed",
            Self::StartFailed { .. } => "StartFailed",
            Self::NoGpuRuntime { .. } => "GpuRuntimeMissing",
            Self::WatchFailed { .. } => "WatchFailed",
            Self::Api { .. } => "DockerAPIError",
            Self::Duplicate { .. } => "Duplicate",
            Self::Withdrawn { .. } => "Withdrawn",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(status: Option<u16>, message: &str) -> EngineFailure {
        EngineFailure {
            status,
            message: message.into(),
        }
    }

    #[test]
    fn registry_hiccups_and_timeouts_are_transient() {
        for (status, message) in [
            (
                Some(500),
                "received unexpected HTTP status: 503 Service Unavailable",
            ),
            (
                Some(500),
                "toomanyrequests: You have reached your pull rate limit",
            ),
            (None, "error trying to connect: operation timed out"),
            (Some(503), "the daemon is busy"),
            (Some(500), "context deadline exceeded"),
        ] {
            assert!(
                failure(status, message).is_transient(),
                "{status:?} {message}"
            );
        }
    }

    #[test]
    fn the_jobs_own_faults_are_not() {
        for (status, message) in [
            (Some(404), "manifest for x:1 not found: manifest unknown"),
            (
                Some(500),
                "Head https://r/v2/x/manifests/1: unauthorized: authentication required",
            ),
            (Some(400), "invalid reference format"),
            (
                Some(500),
                "OCI runtime create failed: exec: \"nope\": executable file not found in $PATH",
            ),
            (Some(500), "something the Engine did not like"),
            (Some(409), "Conflict. The container name is already in use"),
        ] {
            assert!(
                !failure(status, message).is_transient(),
                "{status:?} {message}"
            );
        }
        let pull = DockerError::PullFailed {
            image: "x".into(),
            login_registry: None,
            failure: failure(
                Some(500),
                "received unexpected HTTP status: 503 Service Unavailable",
            ),
        };
        assert!(pull.is_transient());
        let missing = DockerError::ImageNotFound {
            image: "x".into(),
            policy: "Never",
        };
        assert!(!missing.is_transient());
    }
}
