//! Connecting to a Docker Engine: the [`DockerRuntime`] handle every other file of this module
//! adds methods to, how a `DOCKER_HOST` (unix socket, TCP, TLS with client certificates) is
//! opened, the Engine's version, Podman detection and the Python worker's `base_url` for
//! infrastructure pids. Knows bollard's connection calls, nothing of Prefect.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bollard::Docker;

use super::error::{ConnectCause, DockerError};
use super::image::PullFailure;
use super::images::{GuardSlot, InFlight, PullGuard};
use super::single_flight::SingleFlight;

/// The `DOCKER_HOST` used when none is given, as the Docker CLI's default.
const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// Where containers of a rootless Engine reach the host's loopback: rootlesskit's
/// slirp4netns gateway, which forwards to the host's 127.0.0.1 unless rootlesskit runs with
/// `--disable-host-loopback`. `host-gateway` would name the bridge inside rootlesskit's
/// network namespace instead, where nothing of the host listens.
pub const ROOTLESS_HOST_ADDRESS: &str = "10.0.2.2";

/// Client certificate files for a TLS Docker host (`ca.pem`, `cert.pem`, `key.pem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA that signed the daemon's certificate.
    pub ca: PathBuf,
    /// Client certificate.
    pub cert: PathBuf,
    /// Client key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The Docker CLI's layout of a `DOCKER_CERT_PATH` directory.
    pub fn in_dir(dir: &Path) -> Self {
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
    /// The bollard client; `pub(super)` so the files of this module share one connection.
    pub(super) docker: Docker,
    /// The `DOCKER_HOST` it talks to.
    pub(super) host: String,
    /// The Python worker's `base_url` for that host (infrastructure pids, proxy matching).
    pub(super) base_url: String,
    /// The Engine's version string, as it reported it at connect time.
    engine_version: String,
    /// Podman's compat API needs a few detours (see `watch_container`).
    pub(super) is_podman: bool,
    /// The Engine runs rootless (its `info` security options say `name=rootless`): its
    /// containers cannot reach the host's loopback through `host-gateway`.
    rootless: bool,
    /// Where the Docker CLI's `config.json` lives (registry credentials for pulls).
    pub(super) docker_config: Option<PathBuf>,
    /// Pulls (with their registry logins) in flight, shared by every run that needs the same
    /// image with the same credentials at the same time.
    pub(super) pulls: SingleFlight<Result<(), PullFailure>>,
    /// Pulls actually made (not joined), for tests and metrics.
    pub(super) pulls_made: Arc<AtomicU64>,
    /// The Engine's `DockerRootDir`, from its `info` at connect time (`--min-free-disk`).
    pub(super) data_root: Option<PathBuf>,
    /// Images being pulled or created from now, shared by the clones of this runtime, so an
    /// image collection leaves them alone.
    pub(super) in_flight: InFlight,
    /// Run before each pull made (`--min-free-disk`); none by default.
    pub(super) pull_guard: GuardSlot,
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

/// A bollard client for `host`: TLS with client certificates when `tls` is given, else by the
/// host's scheme (a bare path is a unix socket). Nothing is sent yet.
fn open(
    host: &str,
    tls: Option<&TlsFiles>,
    timeout: Duration,
) -> Result<Docker, bollard::errors::Error> {
    let seconds = timeout.as_secs().max(1);
    let version = bollard::API_DEFAULT_VERSION;
    match tls {
        Some(files) => {
            Docker::connect_with_ssl(host, &files.key, &files.cert, &files.ca, seconds, version)
        }
        None if host.starts_with('/') => {
            Docker::connect_with_unix(&format!("unix://{host}"), seconds, version)
        }
        None if host.starts_with("unix://") => Docker::connect_with_unix(host, seconds, version),
        None if host.starts_with("tcp://") || host.starts_with("http://") => {
            Docker::connect_with_http(host, seconds, version)
        }
        None => Docker::connect_with_host(host),
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
            .unwrap_or(DEFAULT_HOST)
            .to_owned();
        let connect_error = |error: bollard::errors::Error| DockerError::Connect {
            host: crate::redact::url(&host).into_owned(),
            cause: ConnectCause::of(&error),
            failure: error.into(),
        };
        let docker = open(&host, tls, timeout)
            .map_err(connect_error)?
            .with_timeout(timeout);
        // Both at once, so start-up waits for one round trip.
        let (version, info) = tokio::join!(docker.version(), docker.info());
        let version = version.map_err(connect_error)?;
        // An Engine whose `info` fails still runs containers; it is taken as rootful.
        let info = info.ok();
        let rootless = info.as_ref().is_some_and(|info| {
            info.security_options
                .iter()
                .flatten()
                .any(|o| o.split(',').any(|part| part == "name=rootless"))
        });
        let data_root = info
            .and_then(|info| info.docker_root_dir)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from);
        let is_podman = version
            .components
            .iter()
            .flatten()
            .any(|c| c.name.to_ascii_lowercase().contains("podman"));
        Ok(Self {
            is_podman,
            rootless,
            docker_config: None,
            pulls: SingleFlight::default(),
            pulls_made: Arc::default(),
            data_root,
            in_flight: InFlight::default(),
            pull_guard: GuardSlot::default(),
            base_url: base_url_for(&host, tls.is_some()),
            engine_version: version.version.unwrap_or_default(),
            docker,
            host,
        })
    }

    /// Reads pull credentials from `dir/config.json` (the Docker CLI's `DOCKER_CONFIG`) for
    /// images whose job names no `registry_credentials`.
    #[must_use]
    pub fn with_docker_config(mut self, dir: Option<PathBuf>) -> Self {
        self.docker_config = dir;
        self
    }

    /// Runs `guard` before every pull this runtime (and its later clones) makes. A clone
    /// taken before this call, such as the one the guard itself works with, has no guard.
    #[must_use]
    pub fn with_pull_guard(mut self, guard: Arc<dyn PullGuard>) -> Self {
        self.pull_guard = GuardSlot(Some(guard));
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

    /// Whether the Engine answers now (`GET /_ping`).
    ///
    /// # Errors
    /// [`DockerError::Api`] when it does not.
    pub async fn ping(&self) -> Result<(), DockerError> {
        self.docker
            .ping()
            .await
            .map(drop)
            .map_err(|e| DockerError::Api {
                operation: "ping",
                failure: e.into(),
            })
    }

    /// The Engine's version string as it reports it (`20.10.24+dfsg1`).
    pub fn engine_version(&self) -> &str {
        &self.engine_version
    }

    /// True when the Engine runs rootless.
    pub fn is_rootless(&self) -> bool {
        self.rootless
    }

    /// Under rootless Docker, where containers reach this host's loopback
    /// ([`ROOTLESS_HOST_ADDRESS`]); `None` for a rootful Engine.
    pub fn rootless_host_address(&self) -> Option<&str> {
        self.rootless.then_some(ROOTLESS_HOST_ADDRESS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
