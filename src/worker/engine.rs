//! Facts from the Engine's event stream: the `die`, `oom` and `kill` events of the pool's
//! containers, followed for the life of the worker (resumed from the last event's time after a
//! reconnect), so an exit code or an OOM kill is known even when a container's own wait could
//! not tell (it was removed, or the wait broke with the Engine).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::backoff::Backoff;
use crate::docker::{ContainerEvent, ContainerEventKind};

/// What the Engine's event stream said about one container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct EngineFacts {
    /// Exit code from its `die` event.
    pub exit_code: Option<i64>,
    /// An `oom` event was seen.
    pub oom_killed: bool,
}

/// Facts by container id. Entries go when their run is reported.
#[derive(Debug, Default)]
pub(crate) struct FactStore {
    facts: Mutex<HashMap<String, EngineFacts>>,
}

/// Bound on remembered containers: only watched ones matter, at most a few per run.
const MAX_REMEMBERED: usize = 10_000;

impl FactStore {
    /// Records one event.
    pub fn record(&self, event: &ContainerEvent) {
        let Ok(mut facts) = self.facts.lock() else {
            return;
        };
        if facts.len() > MAX_REMEMBERED {
            facts.clear();
        }
        let entry = facts.entry(event.id.clone()).or_default();
        match &event.kind {
            ContainerEventKind::Died { code } => entry.exit_code = Some(*code),
            ContainerEventKind::OomKilled => entry.oom_killed = true,
            ContainerEventKind::Killed { signal } => {
                tracing::debug!(container = %event.id, signal, "container received a signal");
            }
        }
    }

    /// Takes (and forgets) what was said about a container.
    pub fn take(&self, container_id: &str) -> EngineFacts {
        self.facts
            .lock()
            .ok()
            .and_then(|mut f| f.remove(container_id))
            .unwrap_or_default()
    }
}

impl Worker {
    /// Follows the Engine's events for this pool's containers until `shutdown`, reconnecting
    /// with backoff (1 s doubling to 30 s) and resuming from the last event's time.
    pub(super) async fn engine_events_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let label = format!(
            "{}={}",
            crate::job::labels::WORK_POOL_NAME,
            self.settings.pool
        );
        let mut since = chrono::Utc::now().timestamp();
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let mut stream = self.docker.container_events(&label, since);
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    () = shutdown.cancelled() => return,
                };
                match item {
                    Some(Ok(event)) => {
                        backoff.reset();
                        since = since.max(event.time);
                        self.engine_facts.record(&event);
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "Docker event stream interrupted");
                        break;
                    }
                    None => break,
                }
            }
            if !backoff.wait(&shutdown).await {
                return;
            }
        }
    }
}
