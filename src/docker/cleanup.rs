//! Listing and removing finished containers, for garbage collection. Docker only: which of
//! them may go is decided by the caller (`crate::gc`), which asks Prefect.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::connect::DockerRuntime;
use super::create::CreatedContainer;
use super::error::{DockerError, EngineFailure};

/// A container that is no longer running and will not run again by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoppedContainer {
    /// The container.
    pub container: CreatedContainer,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// The Engine's `State.Status`: `exited` or `dead`.
    pub status: String,
    /// `State.FinishedAt`; `None` when the Engine has none (the zero time), which a `dead`
    /// container may lack.
    pub finished_at: Option<DateTime<Utc>>,
}

/// What [`DockerRuntime::remove_stopped_container`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The container was removed.
    Removed,
    /// It was already gone (someone else removed it).
    AlreadyGone,
}

/// The Engine's time for "never": `0001-01-01T00:00:00Z`.
pub(super) fn engine_time(text: Option<&str>) -> Option<DateTime<Utc>> {
    let time = DateTime::parse_from_rfc3339(text?)
        .ok()?
        .with_timezone(&Utc);
    (time.timestamp() > 0).then_some(time)
}

impl DockerRuntime {
    /// Every `exited` or `dead` container carrying all of `labels` (`key` or `key=value`),
    /// with its finish time. Running, paused, restarting and merely created containers are
    /// never listed: the Engine filters them out.
    ///
    /// # Errors
    /// [`DockerError::Api`] when the Engine cannot list containers. A container removed
    /// between the listing and its inspection is left out.
    pub async fn list_stopped_containers(
        &self,
        labels: &[String],
    ) -> Result<Vec<StoppedContainer>, DockerError> {
        let filters = HashMap::from([
            ("label".to_owned(), labels.to_vec()),
            (
                "status".to_owned(),
                vec!["exited".to_owned(), "dead".to_owned()],
            ),
        ]);
        let summaries = self.list_containers(&filters).await?;
        let mut found = Vec::with_capacity(summaries.len());
        for summary in summaries {
            let Some(id) = summary.id else { continue };
            let info = match self.docker.inspect_container(&id, None).await {
                Ok(info) => info,
                Err(e) => {
                    let failure = EngineFailure::from(e);
                    if failure.is_not_found() {
                        continue;
                    }
                    return Err(DockerError::Api {
                        operation: "inspect container",
                        failure,
                    });
                }
            };
            let state = info.state.unwrap_or_default();
            let status = state
                .status
                .map(|s| s.to_string())
                .unwrap_or_else(|| summary.state.map(|s| s.to_string()).unwrap_or_default());
            // Re-checked here: the listing is a moment older than the inspection.
            if !matches!(status.as_str(), "exited" | "dead") {
                continue;
            }
            found.push(StoppedContainer {
                container: CreatedContainer {
                    name: info.name.map(|n| n.trim_start_matches('/').to_owned()),
                    created_at: summary.created.unwrap_or_default(),
                    id,
                },
                labels: summary.labels.unwrap_or_default(),
                status,
                finished_at: engine_time(state.finished_at.as_deref()),
            });
        }
        Ok(found)
    }

    /// Removes a stopped container and its anonymous volumes (as `docker run --rm` would;
    /// named volumes stay). Not forced: a container that was started again meanwhile makes
    /// the Engine refuse, and it stays.
    ///
    /// # Errors
    /// [`DockerError::Api`] when the Engine refuses (for example because it runs again).
    pub async fn remove_stopped_container(&self, id: &str) -> Result<Removal, DockerError> {
        let options = bollard::query_parameters::RemoveContainerOptionsBuilder::default()
            .v(true)
            .force(false)
            .build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(Removal::Removed),
            Err(e) => {
                let failure = EngineFailure::from(e);
                if failure.is_not_found() {
                    Ok(Removal::AlreadyGone)
                } else {
                    Err(DockerError::Api {
                        operation: "remove container",
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

    #[test]
    fn engine_times() {
        assert_eq!(engine_time(Some("0001-01-01T00:00:00Z")), None);
        assert_eq!(engine_time(None), None);
        assert_eq!(engine_time(Some("soon")), None);
        let t = engine_time(Some("2024-05-01T10:00:00.123456789Z")).unwrap();
        assert_eq!(t.timestamp(), 1_714_557_600);
        let t = engine_time(Some("2024-05-01T12:00:00+02:00")).unwrap();
        assert_eq!(t.timestamp(), 1_714_557_600);
    }
}
