//! Finding the worker's containers on the host by their labels (reattachment after a
//! restart, reconciliation) and asking whether one still exists. Knows bollard's list and
//! inspect calls, nothing of Prefect.

use std::collections::HashMap;

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary};
use bollard::query_parameters::ListContainersOptionsBuilder;

use super::connect::DockerRuntime;
use super::create::CreatedContainer;
use super::error::{DockerError, EngineFailure};

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
    /// The device ids its `DeviceRequests` name (GPUs it holds).
    pub device_ids: Vec<String>,
}

/// A container of ours as the Engine's list shows it: enough to tell which run it belongs to
/// and whether it runs, without an inspect per container (a reconcile pass lists every
/// container of the pool every interval).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedContainer {
    /// The container.
    pub container: CreatedContainer,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// It is running (else created, exited, dead, paused or restarting).
    pub running: bool,
}

/// A [`FoundContainer`] from the list entry `summary` (whose id is `id`) and its inspect.
fn found_container(
    id: String,
    summary: ContainerSummary,
    info: ContainerInspectResponse,
) -> FoundContainer {
    let state = info.state.unwrap_or_default();
    let running = state.running.unwrap_or(false);
    let exited = matches!(
        state.status,
        Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD)
    );
    FoundContainer {
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
            .as_ref()
            .and_then(|h| h.auto_remove)
            .unwrap_or(false),
        oom_killed: state.oom_killed.unwrap_or(false),
        device_ids: info
            .host_config
            .and_then(|h| h.device_requests)
            .into_iter()
            .flatten()
            .flat_map(|r| r.device_ids.unwrap_or_default())
            .collect(),
    }
}

impl DockerRuntime {
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
        for mut summary in summaries {
            let Some(id) = summary.id.take() else {
                continue;
            };
            let Ok(info) = self.docker.inspect_container(&id, None).await else {
                continue; // removed meanwhile
            };
            found.push(found_container(id, summary, info));
        }
        Ok(found)
    }

    /// Every container (any state) carrying all of `labels`, from one list call.
    ///
    /// # Errors
    /// [`DockerError::Api`] when the Engine cannot list containers.
    pub async fn list_labelled(
        &self,
        labels: &[String],
    ) -> Result<Vec<ListedContainer>, DockerError> {
        let filters = HashMap::from([("label".to_owned(), labels.to_vec())]);
        let summaries = self.list_containers(&filters).await?;
        Ok(summaries
            .into_iter()
            .filter_map(|summary| {
                let id = summary.id?;
                let name = summary
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_owned());
                Some(ListedContainer {
                    container: CreatedContainer {
                        id,
                        name,
                        created_at: summary.created.unwrap_or_default(),
                    },
                    labels: summary.labels.unwrap_or_default(),
                    running: summary.state.is_some_and(|s| s.to_string() == "running"),
                })
            })
            .collect())
    }

    /// The container with this id as [`DockerRuntime::find_containers`] describes it; `None`
    /// when it no longer exists.
    ///
    /// # Errors
    /// [`DockerError::Api`] when the Engine cannot list or inspect it.
    pub async fn inspect_found(&self, id: &str) -> Result<Option<FoundContainer>, DockerError> {
        let filters = HashMap::from([("id".to_owned(), vec![id.to_owned()])]);
        let Some(mut summary) = self
            .list_containers(&filters)
            .await?
            .into_iter()
            .find(|s| s.id.as_deref() == Some(id))
        else {
            return Ok(None);
        };
        let id = summary.id.take().unwrap_or_default();
        match self.docker.inspect_container(&id, None).await {
            Ok(info) => Ok(Some(found_container(id, summary, info))),
            Err(e) => {
                let failure = EngineFailure::from(e);
                if failure.is_not_found() {
                    Ok(None)
                } else {
                    Err(DockerError::Api {
                        operation: "inspect container",
                        failure,
                    })
                }
            }
        }
    }

    /// Every container (running or not) matching the Engine's list `filters`.
    pub(super) async fn list_containers(
        &self,
        filters: &HashMap<String, Vec<String>>,
    ) -> Result<Vec<ContainerSummary>, DockerError> {
        let options = ListContainersOptionsBuilder::default()
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
