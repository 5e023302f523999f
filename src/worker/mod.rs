//! The orchestrator, and the only module that knows both Prefect and Docker, through the two
//! ports it owns ([`ports::PrefectApi`], [`ports::ContainerRuntime`]).
//!
//! Layout:
//! - [`registry`]: every run this process handles and its [`registry::Phase`]; admission,
//!   `--limit` slots and what a cancellation means all live there.
//! - `lifecycle`: one run, claim → resolve → start → watch → report, each step a small
//!   function returning a typed outcome; `policy` turns outcomes into Prefect states.
//! - the loops: `sync` (pool and heartbeat), `poll`, `cancel` (cancellations and fast pickup),
//!   `engine` (the Engine's event facts), `reconcile` (Prefect's runs against this host's
//!   containers: adoption, vanished containers, stale claims, orphaned containers),
//!   `channel` (Prefect's worker channel), `gc_loop`, `prepull`.
//!
//! Error policy: a failed flow run never stops the worker; transient API errors back off and
//! recover; 401/403 stop the worker with a message saying so, since retrying with the same
//! credentials cannot help.

mod admission;
pub use admission::HostAdmission;
mod api_health;
mod cache;
mod cancel;
mod channel;
mod engine;
mod events;
mod exit_codes;
mod gc_loop;
mod infra_pid;
mod jitter;
mod lifecycle;
mod lookups;
mod observe;
mod outage;
mod policy;
mod poll;
pub mod ports;
mod prepull;
mod reconcile;
mod registry;
mod sync;

#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use exit_codes::{crash_message, explain};
pub use jitter::clamped_poisson_interval;

use crate::config::WorkerSettings;
use crate::logs::ApiLogs;
use crate::metrics::{Metrics, PoolMetrics};
use crate::prefect::events::EventSink;
use crate::prefect::{ApiError, ClientConfig, WorkPool};
use ports::{ContainerRuntime, PrefectApi};
use registry::Registry;

/// Why the worker stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The API refused the worker's credentials.
    #[error(
        "the Prefect API rejected the worker's credentials or permissions ({0}); check PREFECT_API_KEY / PREFECT_API_AUTH_STRING"
    )]
    Unauthorized(#[source] ApiError),
    /// Start-up could not complete (bad pool name, pool missing and not to be created, …).
    #[error("could not start the worker: {0}")]
    Startup(#[source] ApiError),
}

/// How long shutdown waits for runs that are mid-submission to get their container started
/// and for reports still being retried through an outage.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A running worker. Shared by its loops and run tasks behind an `Arc`.
pub struct Worker {
    /// What it was started with.
    settings: WorkerSettings,
    /// The Prefect API.
    api: Arc<dyn PrefectApi>,
    /// The Docker Engine.
    docker: Arc<dyn ContainerRuntime>,
    /// Flow-run logs, Prefect events and metrics.
    out: Outputs,
    /// The pool as of the last sync (REST or channel snapshot); `None` until one succeeded.
    pool: RwLock<Option<WorkPool>>,
    /// Every run this process handles, and its phase.
    registry: Arc<Registry>,
    /// Every task the worker spawns (loops, runs, cancellations, label updates), so shutdown
    /// can wait for them.
    tasks: TaskTracker,
    /// When to stop claiming and watching, and when to give up on pending work.
    lifetime: Lifetime,
    /// Deployments and flows read recently, and flow-run labelling.
    lookups: lookups::Lookups,
    /// What the Engine's event stream said about containers (exit codes, OOM kills).
    engine_facts: engine::FactStore,
    /// Prefect's worker channel (heartbeats, pool snapshots, cleanup delivery) and the
    /// `/events/out` subscription's settings.
    channel: channel::ChannelState,
    /// Whether the API answers, and the moment it is back after an outage.
    api_health: api_health::ApiHealth,
}

/// Where the worker's reports go besides state changes.
struct Outputs {
    logs: ApiLogs,
    events: EventSink,
    metrics: PoolMetrics,
    /// The `prefect.worker.started` event, for `stopped` to follow.
    started_event: Mutex<Option<events::Emitted>>,
}

/// The worker's part of the process's token tree.
#[derive(Debug, Clone)]
pub struct Lifetime {
    /// Cancelled by the first SIGTERM/SIGINT: shutdown is asked for. The worker stops
    /// claiming at once; with `--drain-timeout` it goes on watching and reporting until no run
    /// is in flight (or the timeout), then cancels `stop`; without, it cancels `stop` at once.
    pub requested: CancellationToken,
    /// Stop watching (containers keep running for the next worker to adopt); runs
    /// mid-submission still reach a started container.
    pub stop: CancellationToken,
    /// Cancelled when the shutdown grace is over: reports still retried through an outage
    /// give up. The root of the tree.
    pub abandon: CancellationToken,
}

impl Lifetime {
    /// A tree for a worker on its own: `abandon` → `requested`, `stop`.
    pub fn new() -> Self {
        let abandon = CancellationToken::new();
        Self {
            requested: abandon.child_token(),
            stop: abandon.child_token(),
            abandon,
        }
    }

    /// Whether shutdown was asked for (so nothing new is claimed).
    pub fn draining(&self) -> bool {
        self.requested.is_cancelled()
    }
}

impl Default for Lifetime {
    fn default() -> Self {
        Self::new()
    }
}

/// What a worker reports through besides state changes: flow-run logs, Prefect events,
/// metrics, and the API settings of the `/events/out` subscription (`None` = poll only).
/// Shared by every pool's worker of the process.
#[derive(Clone)]
pub struct Reporting {
    /// Flow-run logs to the API.
    pub logs: ApiLogs,
    /// Prefect events (`/events/in`).
    pub events: EventSink,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Settings for the `/events/out` subscription.
    pub events_config: Option<ClientConfig>,
    /// Settings for the worker channel; `None` = sync over REST only.
    pub channel_config: Option<ClientConfig>,
}

/// The two ports the worker drives and the host's admission (shared by every pool's worker
/// of the process).
#[derive(Clone)]
pub struct Ports {
    /// The Prefect API.
    pub api: Arc<dyn PrefectApi>,
    /// The Docker Engine.
    pub docker: Arc<dyn ContainerRuntime>,
    /// Turns to submit and GPUs, the host's, so shared by all pools.
    pub host: HostAdmission,
}

impl Worker {
    /// Wires a worker from its parts. `tasks` is where it spawns everything.
    pub fn new(
        settings: WorkerSettings,
        ports: Ports,
        reporting: Reporting,
        tasks: TaskTracker,
        lifetime: Lifetime,
    ) -> Arc<Self> {
        let Reporting {
            logs,
            events,
            metrics,
            events_config,
            channel_config,
        } = reporting;
        let metrics = metrics.for_pool(&settings.pool);
        Arc::new(Self {
            registry: Registry::with_admission(settings.polling.limit, &ports.host),
            settings,
            api: ports.api,
            docker: ports.docker,
            out: Outputs {
                logs,
                events,
                metrics,
                started_event: Mutex::new(None),
            },
            pool: RwLock::new(None),
            tasks,
            lifetime,
            lookups: lookups::Lookups::new(),
            engine_facts: engine::FactStore::default(),
            channel: channel::ChannelState::new(channel_config, events_config),
            api_health: api_health::ApiHealth::default(),
        })
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    fn current_pool(&self) -> Option<WorkPool> {
        self.pool.read().ok().and_then(|p| p.clone())
    }

    /// Runs until the stop token is cancelled (or, with `--run-once`, until one poll's runs
    /// finished), then winds down: every task is waited for, for up to the shutdown grace.
    ///
    /// # Errors
    /// [`WorkerError`] when the worker cannot go on (credentials, start-up).
    pub async fn run(self: &Arc<Self>) -> Result<(), WorkerError> {
        let loops = self.lifetime.stop.child_token();
        let first_runs = match self.start_up(&loops).await {
            Ok(first_runs) => first_runs,
            Err(e) => {
                loops.cancel();
                return Err(e);
            }
        };
        self.emit_worker_event("prefect.worker.started");
        tracing::info!(worker = %self.settings.name, pool = %self.settings.pool, "Worker '{}' started!", self.settings.name);
        self.spawn_loops(&loops);
        let result = if self.settings.polling.run_once {
            self.run_once().await
        } else {
            let outcome = tokio::select! {
                r = self.sync_loop(loops.clone()) => r,
                r = self.poll_loop(first_runs, loops.clone()) => r,
                () = self.until_stopped() => Ok(()),
            };
            outcome
        };
        loops.cancel();
        self.wind_down().await;
        self.emit_worker_event("prefect.worker.stopped");
        tracing::info!(worker = %self.settings.name, "Worker '{}' stopped!", self.settings.name);
        result
    }

    /// Start-up's round trips overlap: the channel handshake (or a REST sync after it), the
    /// CSRF token the first claim needs, and the first poll. The poll's runs wait for the sync
    /// (they need the pool's template) and for adoption, as always.
    async fn start_up(
        self: &Arc<Self>,
        loops: &CancellationToken,
    ) -> Result<Option<Vec<crate::prefect::FlowRun>>, WorkerError> {
        let run_once = self.settings.polling.run_once;
        let channel = async { !run_once && self.start_channel(loops.child_token()).await };
        let first_poll = async {
            if run_once {
                None
            } else {
                self.fetch_scheduled_runs(&self.settings.pool).await.ok()
            }
        };
        let (over_channel, (), first_runs) =
            tokio::join!(channel, self.api.prefetch_csrf_token(), first_poll);
        let synced = if over_channel {
            Ok(())
        } else {
            self.sync().await
        };
        match synced {
            Ok(()) => Ok(first_runs),
            // A 403 here can also be a refusal of the pool itself (reserved names): say so as is.
            Err(e) if e.status() == Some(401) => Err(WorkerError::Unauthorized(e)),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "first work pool sync failed; will retry");
                Ok(first_runs)
            }
            Err(e) => Err(WorkerError::Startup(e)),
        }
    }

    /// The background loops, each under its own child of `loops`.
    fn spawn_loops(self: &Arc<Self>, loops: &CancellationToken) {
        let run_once = self.settings.polling.run_once;
        if self.settings.cancellation.stop_cancelled {
            let worker = Arc::clone(self);
            let stop = loops.child_token();
            self.tasks
                .spawn(async move { worker.cancellation_loop(stop).await });
        }
        if !run_once {
            let worker = Arc::clone(self);
            let stop = loops.child_token();
            self.tasks
                .spawn(async move { worker.api_probe_loop(stop).await });
        }
        if self.channel.events_config.is_some() && !run_once {
            let worker = Arc::clone(self);
            let stop = loops.child_token();
            self.tasks
                .spawn(async move { worker.pool_events_loop(stop).await });
        }
        {
            let worker = Arc::clone(self);
            let stop = loops.child_token();
            self.tasks
                .spawn(async move { worker.engine_events_loop(stop).await });
        }
        if let Some(interval) = self.settings.gc.interval {
            let worker = Arc::clone(self);
            let stop = loops.child_token();
            self.tasks
                .spawn(async move { worker.gc_loop(interval, stop).await });
        }
        if !run_once {
            let worker = Arc::clone(self);
            let stop = loops.child_token();
            self.tasks
                .spawn(async move { worker.reconcile_loop(stop).await });
        }
        if self.settings.features.prepull && !run_once {
            let worker = Arc::clone(self);
            let stop = loops.child_token();
            self.tasks
                .spawn(async move { worker.prepull_loop(stop).await });
        }
    }

    /// Resolves once the worker is to stop watching: at once on a signal, or after the drain
    /// when `--drain-timeout` is set (or when `stop` is cancelled directly).
    async fn until_stopped(&self) {
        tokio::select! {
            () = self.lifetime.requested.cancelled() => {
                self.drain().await;
                self.lifetime.stop.cancel();
            }
            () = self.lifetime.stop.cancelled() => {}
        }
    }

    /// `--drain-timeout`: with no new claims, waits until no run is in flight or the timeout
    /// passed; the sync (heartbeat), the watches and the reports go on meanwhile, and polls
    /// go on without claiming so `/health` stays 200.
    async fn drain(&self) {
        let Some(timeout) = self.settings.convergence.drain_timeout else {
            return;
        };
        let in_flight = self.registry.len();
        tracing::info!(
            in_flight,
            timeout = %humantime::format_duration(timeout),
            "draining: no new flow runs are claimed; waiting for the runs in flight"
        );
        tokio::select! {
            () = self.registry.until_empty() => {
                tracing::info!("drained: no flow run is in flight");
            }
            () = tokio::time::sleep(timeout) => {
                tracing::warn!(
                    in_flight = self.registry.len(),
                    "drain timeout passed; the containers still running are left for the next worker to adopt"
                );
            }
            () = self.lifetime.stop.cancelled() => {}
        }
    }

    /// `--run-once`: one poll, then wait until every run it started is reported (or a signal).
    async fn run_once(self: &Arc<Self>) -> Result<(), WorkerError> {
        let result = self.poll_once().await;
        tokio::select! {
            () = self.registry.until_empty() => {}
            () = self.until_stopped() => {}
        }
        match result {
            Err(e) if e.is_auth() => Err(WorkerError::Unauthorized(e)),
            Err(e) => {
                tracing::error!(error = %e, "polling for flow runs failed");
                Ok(())
            }
            Ok(_) => Ok(()),
        }
    }

    /// Waits for every task (runs mid-submission, reports, label updates) for up to the
    /// shutdown grace; then pending reports are abandoned and the wait ends.
    async fn wind_down(&self) {
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.registry.len(),
                "some flow runs were still being submitted or reported when the shutdown grace period ended"
            );
            self.lifetime.abandon.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.tasks.wait()).await;
        }
    }

    /// `prefect.worker.started` / `.stopped`, related to the pool when it is known; `stopped`
    /// follows `started`.
    fn emit_worker_event(&self, name: &str) {
        let related: Vec<Value> = self
            .current_pool()
            .map(|p| {
                events::pool_related(&PoolRef {
                    id: p.id,
                    name: p.name,
                })
            })
            .into_iter()
            .collect();
        let Ok(mut started) = self.out.started_event.lock() else {
            return;
        };
        let (event, emitted) = events::build(
            name,
            events::worker_resource(self.name()),
            related,
            started.as_ref(),
        );
        if started.is_none() {
            *started = Some(emitted);
        }
        self.out.events.emit(event);
    }
}

/// The pool facts a run needs, fixed at claim time.
#[derive(Debug, Clone)]
pub(crate) struct PoolRef {
    pub id: String,
    pub name: String,
}

impl PoolRef {
    fn of(pool: &WorkPool) -> Self {
        Self {
            id: pool.id.clone(),
            name: pool.name.clone(),
        }
    }
}
