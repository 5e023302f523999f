//! The Engine's images, for image garbage collection: listing them with what tells their age,
//! which containers (in any state) use them, removing one without force, the free space of
//! the Engine's data root, and the images this process is pulling or creating containers
//! from right now. Docker only: which images may go is decided by `crate::image_gc`, which
//! asks Prefect which images its deployments use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bollard::query_parameters::{ListImagesOptionsBuilder, RemoveImageOptionsBuilder};
use chrono::{DateTime, Utc};

use super::cleanup::engine_time;
use super::connect::DockerRuntime;
use super::error::{DockerError, EngineFailure};

/// An image on the Engine, as its list shows it (`docker images`, no intermediate layers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    /// `sha256:…`.
    pub id: String,
    /// The image it was built on, for images built here (empty for pulled ones).
    pub parent_id: String,
    /// `repo:tag` names, `<none>:<none>` left out.
    pub repo_tags: Vec<String>,
    /// `repo@sha256:…` names, `<none>@<none>` left out.
    pub repo_digests: Vec<String>,
    /// When it was built (`Created`); for a pulled image that is the build's time, not the
    /// pull's.
    pub created: Option<DateTime<Utc>>,
    /// Its size on disk, shared layers included.
    pub size: i64,
    /// Its labels.
    pub labels: HashMap<String, String>,
}

impl LocalImage {
    /// How it is named in reports: its first tag, else its first digest, else `<none>`.
    pub fn display_name(&self) -> &str {
        self.repo_tags
            .first()
            .or_else(|| self.repo_digests.first())
            .map_or("<none>", String::as_str)
    }

    /// The id without `sha256:`, 12 characters, as `docker images` shows it.
    pub fn short_id(&self) -> String {
        let id = self.id.strip_prefix("sha256:").unwrap_or(&self.id);
        id.chars().take(12).collect()
    }
}

/// A container that uses an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUser {
    /// Its name (or short id when it has none).
    pub name: String,
    /// The Engine's state: `running`, `exited`, `created`, `dead`, …
    pub state: String,
}

/// What [`DockerRuntime::remove_image`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageRemoval {
    /// The image is gone from the Engine.
    Removed,
    /// It was already gone before (someone else removed it).
    AlreadyGone,
}

/// The free space of the Engine's data root, as `statvfs` reports it to an unprivileged
/// process (`f_bavail`: without the blocks reserved for root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpace {
    /// The Engine's `DockerRootDir`.
    pub path: PathBuf,
    /// Bytes available.
    pub available: u64,
}

/// Why the data root's free space cannot be known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskSpaceError {
    /// The Engine's `info` gave no `DockerRootDir`.
    #[error("the Docker Engine did not say where its data root is (DockerRootDir)")]
    NoDataRoot,
    /// The Engine is on another host, whose disk this process cannot see.
    #[error(
        "the Docker Engine at {host} is not on this host, so its data root's free space cannot be checked"
    )]
    Remote {
        /// `DOCKER_HOST`.
        host: String,
    },
    /// `statvfs` of the data root failed (not visible in this process's filesystem, say in a
    /// container that has the socket but not the directory).
    #[error("cannot check the free space of the Engine's data root {path}: {message}")]
    Statvfs {
        /// The data root.
        path: PathBuf,
        /// The system's error.
        message: String,
    },
}

/// Something to do before a pull (the worker's `--min-free-disk` guard: an image collection
/// when the data root is short). The Docker side calls it and knows nothing of what it does.
#[async_trait]
pub trait PullGuard: Send + Sync {
    /// Called once per pull actually made (a shared pull calls it once), before the registry
    /// login and the pull of `image`. Failures are the guard's to report: the pull goes on.
    async fn before_pull(&self, image: &str);
}

/// Where the Docker runtime keeps its [`PullGuard`], if any (a slot, so the runtime stays
/// `Clone` and `Debug`).
#[derive(Clone, Default)]
pub(super) struct GuardSlot(pub(super) Option<Arc<dyn PullGuard>>);

impl std::fmt::Debug for GuardSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Some(PullGuard)"
        } else {
            "None"
        })
    }
}

/// Image references this process is pulling or creating a container from right now, counted,
/// so an image collection never removes one between its pull and its container's create
/// (after that the container protects it).
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<Mutex<HashMap<String, usize>>>);

/// Removes its image from [`InFlight`] when dropped (the create or the pull ended).
#[must_use]
pub struct InFlightEntry {
    images: InFlight,
    image: String,
}

impl InFlight {
    /// Marks `image` as in flight until the returned entry is dropped.
    pub fn enter(&self, image: &str) -> InFlightEntry {
        if let Ok(mut map) = self.0.lock() {
            *map.entry(image.to_owned()).or_default() += 1;
        }
        InFlightEntry {
            images: self.clone(),
            image: image.to_owned(),
        }
    }

    /// The references in flight now.
    pub fn images(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|map| map.keys().cloned().collect())
            .unwrap_or_default()
    }
}

impl Drop for InFlightEntry {
    fn drop(&mut self) {
        if let Ok(mut map) = self.images.0.lock()
            && let Some(count) = map.get_mut(&self.image)
        {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.image);
            }
        }
    }
}

/// `<none>:<none>` and `<none>@<none>` are how older Engines list an untagged image.
fn named(names: Vec<String>) -> Vec<String> {
    names
        .into_iter()
        .filter(|n| !n.starts_with("<none>"))
        .collect()
}

/// Whether `host` (a `DOCKER_HOST`) is an Engine on this machine: a unix socket, or TCP to a
/// loopback address. Only then is its data root a path this process can `statvfs`.
fn is_local(host: &str) -> bool {
    if host.starts_with("unix://") || host.starts_with('/') {
        return true;
    }
    let rest = host.split_once("://").map_or(host, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let name = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `statvfs` of `path`: the bytes an unprivileged process may still write there.
fn available_bytes(path: &Path) -> Result<u64, String> {
    let stat = rustix::fs::statvfs(path).map_err(|e| e.to_string())?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

impl DockerRuntime {
    /// Every image of the Engine (`GET /images/json?all=true`), the intermediate images of
    /// local builds included, so that which image is built on which can be followed.
    ///
    /// # Errors
    /// [`DockerError::Api`] when the Engine cannot list them.
    pub async fn list_images(&self) -> Result<Vec<LocalImage>, DockerError> {
        let options = ListImagesOptionsBuilder::default().all(true).build();
        let summaries =
            self.docker
                .list_images(Some(options))
                .await
                .map_err(|e| DockerError::Api {
                    operation: "list images",
                    failure: e.into(),
                })?;
        Ok(summaries
            .into_iter()
            .map(|s| LocalImage {
                id: s.id,
                parent_id: s.parent_id,
                repo_tags: named(s.repo_tags),
                repo_digests: named(s.repo_digests),
                created: DateTime::from_timestamp(s.created, 0).filter(|t| t.timestamp() > 0),
                size: s.size,
                labels: s.labels,
            })
            .collect())
    }

    /// When the image was last tagged on this Engine (`Metadata.LastTagTime`: `docker tag`,
    /// `build`, `load`); `None` when it never was (a pulled image) or is gone.
    ///
    /// # Errors
    /// [`DockerError::Api`] for anything but 404.
    pub async fn image_last_tagged(&self, id: &str) -> Result<Option<DateTime<Utc>>, DockerError> {
        match self.docker.inspect_image(id).await {
            Ok(info) => Ok(engine_time(
                info.metadata.and_then(|m| m.last_tag_time).as_deref(),
            )),
            Err(e) => {
                let failure = EngineFailure::from(e);
                if failure.is_not_found() {
                    Ok(None)
                } else {
                    Err(DockerError::Api {
                        operation: "inspect image",
                        failure,
                    })
                }
            }
        }
    }

    /// Every container in any state (running, paused, exited, created, dead), by the id of
    /// the image it uses.
    ///
    /// # Errors
    /// [`DockerError::Api`] when the Engine cannot list containers.
    pub async fn image_users(&self) -> Result<HashMap<String, Vec<ImageUser>>, DockerError> {
        let containers = self.list_containers(&HashMap::new()).await?;
        let mut users: HashMap<String, Vec<ImageUser>> = HashMap::new();
        for c in containers {
            let Some(image_id) = c.image_id.filter(|i| !i.is_empty()) else {
                continue;
            };
            let name = c
                .names
                .and_then(|n| n.into_iter().next())
                .map(|n| n.trim_start_matches('/').to_owned())
                .or_else(|| c.id.map(|id| id.chars().take(12).collect()))
                .unwrap_or_default();
            let state = c.state.map(|s| s.to_string()).unwrap_or_default();
            users
                .entry(image_id)
                .or_default()
                .push(ImageUser { name, state });
        }
        Ok(users)
    }

    /// Removes an image without force, so the Engine refuses while any container (running
    /// or stopped) uses it. An image with several tags is untagged one tag at a time (the
    /// Engine refuses to delete it by id then); the last tag's removal deletes it, and an
    /// untagged one is deleted by id. Parent layers no other image needs go with it.
    ///
    /// # Errors
    /// [`DockerError::Api`] when the Engine refuses, for example because a container was
    /// created from it meanwhile (409).
    pub async fn remove_image(&self, image: &LocalImage) -> Result<ImageRemoval, DockerError> {
        let options = RemoveImageOptionsBuilder::default()
            .force(false)
            .noprune(false)
            .build();
        // Tag by tag, each checked to still name this image: a tag pulled again meanwhile
        // names a newer image, which this removal must not untag.
        let mut untagged = false;
        for tag in &image.repo_tags {
            match self.docker.inspect_image(tag).await {
                Ok(info) if info.id.as_deref() == Some(image.id.as_str()) => {}
                _ => continue,
            }
            match self
                .docker
                .remove_image(tag, Some(options.clone()), None)
                .await
            {
                Ok(_) => untagged = true,
                Err(e) => {
                    let failure = EngineFailure::from(e);
                    if !failure.is_not_found() {
                        return Err(DockerError::Api {
                            operation: "remove image",
                            failure,
                        });
                    }
                }
            }
        }
        // Untagged now (or from the start, or its last tag's removal deleted it already).
        match self
            .docker
            .remove_image(&image.id, Some(options), None)
            .await
        {
            Ok(_) => Ok(ImageRemoval::Removed),
            Err(e) => {
                let failure = EngineFailure::from(e);
                if !failure.is_not_found() {
                    Err(DockerError::Api {
                        operation: "remove image",
                        failure,
                    })
                } else if untagged {
                    Ok(ImageRemoval::Removed)
                } else {
                    Ok(ImageRemoval::AlreadyGone)
                }
            }
        }
    }

    /// The references of the images this process is pulling or creating containers from.
    pub fn images_in_flight(&self) -> Vec<String> {
        self.in_flight.images()
    }

    /// The free space of the Engine's data root (`DockerRootDir` of its `info`), when the
    /// Engine is on this host and the directory is visible here.
    ///
    /// # Errors
    /// [`DiskSpaceError`] saying why it cannot be known.
    pub fn data_root_space(&self) -> Result<DiskSpace, DiskSpaceError> {
        let path = self.data_root.clone().ok_or(DiskSpaceError::NoDataRoot)?;
        if !is_local(&self.host) {
            return Err(DiskSpaceError::Remote {
                host: crate::redact::url(&self.host).into_owned(),
            });
        }
        let available = available_bytes(&path).map_err(|message| DiskSpaceError::Statvfs {
            path: path.clone(),
            message,
        })?;
        Ok(DiskSpace { path, available })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_engines() {
        for host in [
            "unix:///var/run/docker.sock",
            "/run/user/1000/docker.sock",
            "tcp://127.0.0.1:2375",
            "tcp://localhost:2376",
            "https://[::1]:2376",
            "http://127.0.0.2:2375/",
        ] {
            assert!(is_local(host), "{host}");
        }
        for host in [
            "tcp://10.0.0.5:2375",
            "tcp://docker.example:2376",
            "ssh://me@host",
            "npipe:////./pipe/docker_engine",
        ] {
            assert!(!is_local(host), "{host}");
        }
    }

    #[test]
    fn in_flight_counts_until_the_last_entry_drops() {
        let images = InFlight::default();
        let a = images.enter("x:1");
        let b = images.enter("x:1");
        assert_eq!(images.images(), ["x:1"]);
        drop(a);
        assert_eq!(images.images(), ["x:1"]);
        drop(b);
        assert!(images.images().is_empty());
    }

    #[test]
    fn names_and_free_space() {
        assert_eq!(named(vec!["<none>:<none>".into(), "a:1".into()]), ["a:1"]);
        let image = LocalImage {
            id: "sha256:0123456789abcdef".into(),
            parent_id: String::new(),
            repo_tags: vec![],
            repo_digests: vec!["a@sha256:1".into()],
            created: None,
            size: 0,
            labels: HashMap::new(),
        };
        assert_eq!(image.display_name(), "a@sha256:1");
        assert_eq!(image.short_id(), "0123456789ab");
        assert!(available_bytes(Path::new("/")).is_ok_and(|n| n > 0));
        assert!(available_bytes(Path::new("/no/such/dir")).is_err());
    }
}
