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

/// Facts by container id (entries go when their run is reported), and whether the Engine is
/// being waited for.
#[derive(Debug, Default)]
pub(crate) struct FactStore {
    facts: Mutex<HashMap<String, EngineFacts>>,
    /// The Engine did not answer a poll's ping: a probe waits for it to come back.
    waiting_for_engine: std::sync::atomic::AtomicBool,
    /// The host's available memory was below `--min-free-memory` at the last poll.
    short_of_memory: std::sync::atomic::AtomicBool,
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

    /// The exit code the event stream saw for a container, if any (kept for [`FactStore::take`]).
    pub fn exit_code(&self, container_id: &str) -> Option<i64> {
        self.facts
            .lock()
            .ok()
            .and_then(|f| f.get(container_id).and_then(|e| e.exit_code))
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

/// How often an Engine that does not answer is asked again before claiming resumes.
const ENGINE_PROBE_INTERVAL: Duration = Duration::from_secs(1);

impl Worker {
    /// Whether the Engine answers; when it does not, nothing is claimed (runs stay Scheduled for
    /// workers whose Engine works) and a probe wakes the poll the moment it answers again.
    pub(super) async fn engine_answers(self: &Arc<Self>) -> bool {
        let Err(e) = self.docker.ping().await else {
            return true;
        };
        use std::sync::atomic::Ordering;
        if !self
            .engine_facts
            .waiting_for_engine
            .swap(true, Ordering::SeqCst)
        {
            tracing::warn!(error = %e, "the Docker Engine does not answer; no flow run is claimed until it does");
            let worker = Arc::clone(self);
            let stop = self.lifetime.stop.clone();
            self.tasks.spawn(async move {
                while crate::backoff::sleep(ENGINE_PROBE_INTERVAL, &stop).await {
                    if worker.docker.ping().await.is_ok() {
                        tracing::info!("the Docker Engine answers again; polling now");
                        worker
                            .engine_facts
                            .waiting_for_engine
                            .store(false, Ordering::SeqCst);
                        worker.registry.wake_poll();
                        return;
                    }
                }
            });
        }
        false
    }

    /// Whether the host has the memory `--min-free-memory` asks for (always, without it, or
    /// where it cannot be read). Claims pause while it has not; a log line says so when that
    /// changes, and the `available_memory_bytes` gauge shows the figure.
    pub(super) fn memory_allows_claims(&self) -> bool {
        use std::sync::atomic::Ordering;
        let Some(min) = self.settings.admission.min_free_memory else {
            return true;
        };
        let Some(available) = super::admission::available_memory() else {
            return true;
        };
        self.out
            .metrics
            .available_memory
            .set(i64::try_from(available).unwrap_or(i64::MAX));
        let short = available < min;
        let was_short = self
            .engine_facts
            .short_of_memory
            .swap(short, Ordering::SeqCst);
        if short && !was_short {
            tracing::warn!(
                available_mib = available / (1 << 20),
                min_free_mib = min / (1 << 20),
                "the host's available memory is below --min-free-memory; no flow run is claimed until it recovers (runs stay Scheduled for other workers)"
            );
        } else if !short && was_short {
            tracing::info!(
                available_mib = available / (1 << 20),
                "the host has memory again; claiming runs"
            );
        }
        !short
    }

    /// Follows the Engine's events for this pool's containers until `shutdown`, reconnecting
    /// with backoff (1 s doubling to 30 s) and resuming from the last event's time.
    pub(super) async fn engine_events_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let label = format!(
            "{}={}",
            crate::job::labels::WORK_POOL_NAME,
            self.settings.pool
        );
        let mut since = chrono::Utc::now().timestamp();
        // A local Engine is cheap to ask: reconnect within 2 s of it coming back.
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(2));
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
