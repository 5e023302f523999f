//! The Engine's container events: a container's past events (its exit code and OOM kill
//! after it was removed), and the live stream of `die`, `oom` and `kill` events of the
//! worker's containers. Knows bollard's events call, nothing of Prefect.

use std::collections::HashMap;

use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptionsBuilder;
use futures_util::StreamExt as _;

use super::connect::DockerRuntime;
use super::create::CreatedContainer;
use super::error::DockerError;

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

/// Reads one Engine event into a [`ContainerEvent`]; `None` for events the worker does not
/// follow or that name no container.
fn container_event(event: EventMessage) -> Option<ContainerEvent> {
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
    Some(ContainerEvent {
        id,
        kind,
        time: event.time.unwrap_or_default(),
    })
}

/// Whether `event` is one of `actions` (`die` also matching Podman's `died`) of `container`.
fn is_wanted(event: &EventMessage, container: &CreatedContainer, actions: &[&str]) -> bool {
    let ours = event.actor.as_ref().and_then(|a| a.id.as_deref()) == Some(container.id.as_str());
    let action = match event.action.as_deref() {
        Some("died") => "die",
        Some(a) => a,
        None => return false,
    };
    ours && actions.contains(&action)
}

impl DockerRuntime {
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
        for filtered in [true, false] {
            let mut builder = EventsOptionsBuilder::default().since(&since).until(&until);
            if filtered {
                builder = builder.filters(&filters);
            }
            let mut stream = self.docker.events(Some(builder.build()));
            let mut found = Vec::new();
            while let Some(Ok(event)) = stream.next().await {
                if is_wanted(&event, container, actions) {
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
    pub(super) async fn exit_code_from_events(&self, container: &CreatedContainer) -> Option<i64> {
        self.past_events(container, &["die"])
            .await
            .into_iter()
            .filter_map(|e| e.actor?.attributes?.get("exitCode")?.parse().ok())
            .next_back()
    }

    /// Whether the Engine's event log has one of `actions` for this container.
    pub(super) async fn saw_event(&self, container: &CreatedContainer, actions: &[&str]) -> bool {
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
                    Ok(event) => container_event(event).map(Ok),
                }
            })
    }
}
