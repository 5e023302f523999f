//! The orchestrator: keeps the work pool in sync (heartbeats), polls for scheduled flow runs,
//! and runs each one in its own task. The only module that knows both Prefect and Docker.
//!
//! Error policy: a failed flow run never stops the worker; transient API errors (no answer,
//! 5xx) back off and recover; 401/403 stop the worker with a message saying so, since
//! retrying with the same credentials cannot help.

mod cache;
mod channel;
mod events;
mod exit_codes;
mod gc_loop;
mod jitter;
mod observe;
mod prepull;
mod run;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use exit_codes::{crash_message, explain};
pub use jitter::clamped_poisson_interval;

use crate::config::WorkerSettings;
use crate::docker::DockerRuntime;
use crate::job::default_base_job_template;
use crate::logs::ApiLogs;
use crate::metrics::Metrics;
use crate::prefect::events::EventSink;
use crate::prefect::subscriber::PoolEvent;
use crate::prefect::{ApiError, FlowRun, PrefectClient, WorkPool};

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

/// After this many consecutive failures a loop starts backing off.
const FAILURES_BEFORE_BACKOFF: u32 = 3;
/// The longest back-off multiplier (2^4 × interval).
const MAX_BACKOFF_EXPONENT: u32 = 4;
/// How long shutdown waits for runs that are mid-submission to get their container started.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A running worker. Shared by its loops and run tasks behind an `Arc`.
pub struct Worker {
    settings: WorkerSettings,
    api: Arc<PrefectClient>,
    docker: DockerRuntime,
    logs: ApiLogs,
    metrics: Arc<Metrics>,
    /// The pool as of the last successful sync; `None` until one succeeded.
    pool: RwLock<Option<WorkPool>>,
    /// Runs this process is handling (claim through exit), so a re-poll never submits twice.
    in_progress: Mutex<HashSet<String>>,
    /// `--limit` slots.
    limiter: Option<Arc<Semaphore>>,
    /// Every run task, so shutdown and `--run-once` can wait for them.
    tasks: TaskTracker,
    /// Cancelled on SIGINT/SIGTERM: stop claiming, stop watching, leave containers running.
    shutdown: CancellationToken,
    /// Containers left by an earlier run of this worker (or a dead one) were looked for.
    adopted: std::sync::atomic::AtomicBool,
    /// Flow run id → container id, for every container being watched (cancellation).
    running: Mutex<std::collections::HashMap<String, String>>,
    /// Runs whose container the worker is stopping because the run was cancelled.
    cancelling: Mutex<HashSet<String>>,
    /// Runs cancelled while still being submitted (no container running yet): their
    /// submission stops before the next step and no container is ever started for them.
    cancel_requested: Mutex<HashSet<String>>,
    /// Wakes the poll loop before its interval: a run became due (fast pickup) or a `--limit`
    /// slot freed while due runs were waiting.
    poll_now: tokio::sync::Notify,
    /// The last poll left due runs behind because every `--limit` slot was taken.
    saturated: std::sync::atomic::AtomicBool,
    /// API settings for the `/events/out` subscription; `None` = poll only.
    events_config: Option<crate::prefect::ClientConfig>,
    /// Prefect events (`/events/in`).
    events: EventSink,
    /// Deployments read in the last few seconds (a burst of runs reads each once).
    deployments: cache::TtlCache<Value>,
    /// Flows read recently.
    flows: cache::TtlCache<Value>,
    /// The server has no flow-run labels endpoint (Prefect 2): labels are not sent.
    labels_unsupported: std::sync::atomic::AtomicBool,
    /// Label updates in flight at once.
    labels_gate: Semaphore,
    /// The `prefect.worker.started` event, for `stopped` to follow.
    started_event: Mutex<Option<events::Emitted>>,
    /// Prefect's worker channel (heartbeats, pool snapshots, cleanup delivery).
    channel: channel::ChannelState,
    /// Facts from the Engine's event stream, by container id: exit codes seen in `die`
    /// events, and containers the OOM killer hit. Entries go when their run is reported.
    engine_facts: Mutex<std::collections::HashMap<String, EngineFacts>>,
}

/// What the Engine's event stream said about one container.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EngineFacts {
    /// Exit code from its `die` event.
    pub exit_code: Option<i64>,
    /// An `oom` event was seen.
    pub oom_killed: bool,
}

/// What a worker reports through besides state changes: flow-run logs, Prefect events,
/// metrics, and the API settings of the `/events/out` subscription (`None` = poll only).
pub struct Reporting {
    /// Flow-run logs to the API.
    pub logs: ApiLogs,
    /// Prefect events (`/events/in`).
    pub events: EventSink,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Settings for the `/events/out` subscription.
    pub events_config: Option<crate::prefect::ClientConfig>,
    /// Settings for the worker channel; `None` = sync over REST only.
    pub channel_config: Option<crate::prefect::ClientConfig>,
}

impl Worker {
    /// Wires a worker from its parts.
    pub fn new(
        settings: WorkerSettings,
        api: Arc<PrefectClient>,
        docker: DockerRuntime,
        reporting: Reporting,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let Reporting {
            logs,
            events,
            metrics,
            events_config,
            channel_config,
        } = reporting;
        let limiter = settings.polling.limit.map(|n| Arc::new(Semaphore::new(n)));
        Arc::new(Self {
            settings,
            api,
            docker,
            logs,
            metrics,
            pool: RwLock::new(None),
            in_progress: Mutex::new(HashSet::new()),
            limiter,
            tasks: TaskTracker::new(),
            shutdown,
            adopted: std::sync::atomic::AtomicBool::new(false),
            running: Mutex::new(std::collections::HashMap::new()),
            cancelling: Mutex::new(HashSet::new()),
            cancel_requested: Mutex::new(HashSet::new()),
            poll_now: tokio::sync::Notify::new(),
            saturated: std::sync::atomic::AtomicBool::new(false),
            events_config,
            events,
            deployments: cache::TtlCache::new(Duration::from_secs(3)),
            flows: cache::TtlCache::new(Duration::from_secs(30)),
            labels_unsupported: std::sync::atomic::AtomicBool::new(false),
            labels_gate: Semaphore::new(2),
            started_event: Mutex::new(None),
            engine_facts: Mutex::new(std::collections::HashMap::new()),
            channel: channel::ChannelState::new(channel_config),
        })
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    fn current_pool(&self) -> Option<WorkPool> {
        self.pool.read().ok().and_then(|p| p.clone())
    }

    /// Runs until the shutdown token is cancelled (or, with `--run-once`, until one poll's
    /// runs finished).
    ///
    /// # Errors
    /// [`WorkerError`] when the worker cannot go on (credentials, start-up).
    pub async fn run(self: &Arc<Self>) -> Result<(), WorkerError> {
        let shutdown = self.shutdown.clone();
        // Start-up's round trips overlap: the channel handshake (or REST sync after it), the
        // CSRF token the first claim needs, and the first poll. The poll's runs wait for the
        // sync (they need the pool's template) and for re-attachment, as always.
        let channel = async {
            !self.settings.polling.run_once && self.start_channel(shutdown.child_token()).await
        };
        let first_poll = async {
            if self.settings.polling.run_once {
                None
            } else {
                self.fetch_scheduled_runs(&self.settings.pool).await.ok()
            }
        };
        let (over_channel, (), first_runs) =
            tokio::join!(channel, self.api.prefetch_csrf_token(), first_poll);
        match if over_channel {
            Ok(())
        } else {
            self.sync().await
        } {
            Ok(()) => {}
            // A 403 here can also be a refusal of the pool itself (reserved names): say so as is.
            Err(e) if e.status() == Some(401) => return Err(WorkerError::Unauthorized(e)),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "first work pool sync failed; will retry");
            }
            Err(e) => return Err(WorkerError::Startup(e)),
        }
        self.emit_worker_event("prefect.worker.started");
        tracing::info!(worker = %self.settings.name, pool = %self.settings.pool, "Worker '{}' started!", self.settings.name);
        if self.settings.cancellation.stop_cancelled {
            let worker = Arc::clone(self);
            let stop = shutdown.child_token();
            tokio::spawn(async move { worker.cancellation_loop(stop).await });
        }
        if self.events_config.is_some() && !self.settings.polling.run_once {
            let worker = Arc::clone(self);
            let stop = shutdown.child_token();
            tokio::spawn(async move { worker.pool_events_loop(stop).await });
        }
        {
            let worker = Arc::clone(self);
            let stop = shutdown.child_token();
            tokio::spawn(async move { worker.engine_events_loop(stop).await });
        }
        if let Some(interval) = self.settings.gc.interval {
            let worker = Arc::clone(self);
            let stop = shutdown.child_token();
            tokio::spawn(async move { worker.gc_loop(interval, stop).await });
        }
        if self.settings.features.prepull && !self.settings.polling.run_once {
            let worker = Arc::clone(self);
            let stop = shutdown.child_token();
            tokio::spawn(async move { worker.prepull_loop(stop).await });
        }

        let result = if self.settings.polling.run_once {
            let result = self.poll_once().await;
            self.tasks.close();
            // Run tasks stop watching on shutdown, so this wait ends promptly on a signal too.
            self.tasks.wait().await;
            match result {
                Err(e) if e.is_auth() => Err(WorkerError::Unauthorized(e)),
                Err(e) => {
                    tracing::error!(error = %e, "polling for flow runs failed");
                    Ok(())
                }
                Ok(_) => Ok(()),
            }
        } else {
            let loops = shutdown.child_token();
            let outcome = tokio::select! {
                r = self.sync_loop(loops.clone()) => r,
                r = self.poll_loop(first_runs, loops.clone()) => r,
                () = shutdown.cancelled() => Ok(()),
            };
            loops.cancel();
            self.tasks.close();
            if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    "some flow runs were still being submitted when the shutdown grace period ended"
                );
            }
            outcome
        };
        self.emit_worker_event("prefect.worker.stopped");
        tracing::info!(worker = %self.settings.name, "Worker '{}' stopped!", self.settings.name);
        result
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
        let Ok(mut started) = self.started_event.lock() else {
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
        self.events.emit(event);
    }

    /// Reads (or creates) the pool, fills an empty base job template, and sends a heartbeat.
    async fn sync(&self) -> Result<(), ApiError> {
        let name = &self.settings.pool;
        let mut pool = match self.api.read_work_pool(name).await? {
            Some(pool) => pool,
            None if self.settings.polling.create_pool_if_not_found => {
                tracing::info!(pool = %name, "Work pool not found; creating it");
                match self
                    .api
                    .create_work_pool(
                        name,
                        "docker",
                        self.settings.polling.base_job_template.as_ref(),
                    )
                    .await
                {
                    Ok(pool) => pool,
                    Err(e) if e.status() == Some(409) => match self.api.read_work_pool(name).await?
                    {
                        Some(pool) => pool,
                        None => return Err(e),
                    },
                    Err(e) => return Err(e),
                }
            }
            None => {
                tracing::warn!(pool = %name, "Work pool '{name}' not found!");
                return Ok(());
            }
        };
        if pool
            .base_job_template
            .as_object()
            .is_none_or(|t| t.is_empty())
        {
            let template = self
                .settings
                .polling
                .base_job_template
                .clone()
                .unwrap_or_else(default_base_job_template);
            self.api.update_work_pool_template(name, &template).await?;
            pool.base_job_template = template;
        }
        if self.channel.healthy() {
            // The channel came back while this sync was in flight: its snapshot is newer.
            return Ok(());
        }
        self.api
            .send_worker_heartbeat(
                name,
                &self.settings.name,
                self.settings.polling.heartbeat_interval.as_secs(),
            )
            .await?;
        self.record_pool(pool);
        Ok(())
    }

    /// Makes `pool` the worker's view of its pool (from a REST read or a channel snapshot),
    /// warning when its type is not `docker` or it is paused, as the state changes.
    fn record_pool(&self, pool: WorkPool) {
        let Ok(mut guard) = self.pool.write() else {
            return;
        };
        let previous = guard.as_ref();
        if pool.pool_type != "docker" && previous.is_none_or(|p| p.pool_type != pool.pool_type) {
            tracing::warn!(
                "Worker type mismatch! This worker process expects type 'docker' but received '{}' from the server. Unexpected behavior may occur.",
                pool.pool_type
            );
        }
        if pool.is_paused && previous.is_none_or(|p| !p.is_paused) {
            tracing::warn!(pool = %pool.name, "Work pool is paused; no flow runs will be handed out until it is resumed");
        }
        *guard = Some(pool);
    }

    async fn sync_loop(&self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let mut failures = 0;
        loop {
            let delay = backoff(self.settings.polling.heartbeat_interval, failures);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
            if self.channel.healthy() {
                tracing::debug!("worker channel healthy: no REST heartbeat or pool read");
                continue;
            }
            match self.sync().await {
                Ok(()) => failures = 0,
                Err(e) if e.is_auth() => return Err(WorkerError::Unauthorized(e)),
                Err(e) => {
                    failures += 1;
                    self.metrics.api_error(&e);
                    tracing::warn!(error = %e, consecutive_failures = failures, "work pool sync failed");
                }
            }
        }
    }

    /// Polls every interval (sooner when woken); `first` = runs already fetched at start-up.
    async fn poll_loop(
        self: &Arc<Self>,
        mut first: Option<Vec<FlowRun>>,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        let mut failures = 0;
        loop {
            match self.poll_with(first.take()).await {
                Ok(_) => failures = 0,
                Err(e) if e.is_auth() => return Err(WorkerError::Unauthorized(e)),
                Err(e) => {
                    failures += 1;
                    self.metrics.api_error(&e);
                    tracing::warn!(error = %e, consecutive_failures = failures, "polling for flow runs failed");
                }
            }
            let delay = backoff(self.settings.polling.query_interval, failures);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.poll_now.notified(), if failures == 0 => {
                    tracing::debug!("polling early: a run became due or a slot freed");
                }
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// A deployment, from the short-lived cache or the API; `None` when it no longer exists.
    pub(crate) async fn deployment(&self, id: &str) -> Result<Option<Arc<Value>>, ApiError> {
        if let Some(d) = self.deployments.get(id) {
            return Ok(Some(d));
        }
        Ok(self
            .api
            .read_deployment(id)
            .await?
            .map(|d| self.deployments.put(id, d)))
    }

    /// A flow, from the cache or the API (through outages).
    pub(crate) async fn flow(&self, id: &str) -> Result<Arc<Value>, ApiError> {
        if let Some(f) = self.flows.get(id) {
            return Ok(f);
        }
        let flow = self
            .through_outage("read flow", || self.api.read_flow(id))
            .await?;
        Ok(self.flows.put(id, flow))
    }

    /// Wakes the poll loop if the last poll had to leave due runs behind for lack of a slot.
    fn slot_freed(&self) {
        if self
            .saturated
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            self.poll_now.notify_one();
        }
    }

    /// One poll: fetch due runs and submit each (in response order) until `--limit` is reached.
    /// Returns how many runs were submitted.
    async fn poll_once(self: &Arc<Self>) -> Result<usize, ApiError> {
        self.poll_with(None).await
    }

    /// `POST /work_pools/{pool}/get_scheduled_flow_runs` for runs due within the prefetch.
    async fn fetch_scheduled_runs(&self, pool: &str) -> Result<Vec<FlowRun>, ApiError> {
        let scheduled_before = chrono::Utc::now()
            + chrono::Duration::seconds(
                self.settings
                    .polling
                    .prefetch
                    .as_secs()
                    .try_into()
                    .unwrap_or(i64::MAX / 2),
            );
        let started = std::time::Instant::now();
        let runs = self
            .api
            .get_scheduled_flow_runs(pool, &self.settings.work_queues, scheduled_before)
            .await?;
        self.metrics.polled(started.elapsed());
        tracing::debug!(count = runs.len(), "polled for scheduled flow runs");
        Ok(runs)
    }

    /// One poll: `prefetched` runs (from start-up's overlapped poll) or freshly fetched ones,
    /// each submitted in its own task.
    async fn poll_with(
        self: &Arc<Self>,
        prefetched: Option<Vec<FlowRun>>,
    ) -> Result<usize, ApiError> {
        let pool = match self.current_pool() {
            Some(pool) => pool,
            None => {
                // No successful sync yet: try one now rather than idling a whole interval.
                self.sync().await?;
                match self.current_pool() {
                    Some(pool) => pool,
                    None => return Ok(0),
                }
            }
        };
        if !self.adopted.load(std::sync::atomic::Ordering::Relaxed) {
            self.adopt_orphans(&pool).await?;
            self.adopted
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let runs = match prefetched {
            Some(runs) => runs,
            None => self.fetch_scheduled_runs(&pool.name).await?,
        };
        let mut submitted = 0;
        // One copy of the template per poll, shared by its runs.
        let template = Arc::new(pool.base_job_template.clone());
        for flow_run in runs {
            if self
                .in_progress
                .lock()
                .is_ok_and(|set| set.contains(&flow_run.id))
            {
                continue;
            }
            let permit = match &self.limiter {
                None => None,
                Some(limiter) => match limiter.clone().try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => {
                        self.saturated
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!(
                            limit = self.settings.polling.limit.unwrap_or_default(),
                            "Flow run limit reached; {} flow runs in progress.",
                            self.settings.polling.limit.unwrap_or_default()
                        );
                        break;
                    }
                },
            };
            if let Ok(mut set) = self.in_progress.lock() {
                set.insert(flow_run.id.clone());
            }
            let worker = Arc::clone(self);
            let template = Arc::clone(&template);
            let pool_ref = PoolRef {
                id: pool.id.clone(),
                name: pool.name.clone(),
            };
            self.tasks.spawn(async move {
                let id = flow_run.id.clone();
                run::submit_and_watch(&worker, flow_run, &pool_ref, &template).await;
                if let Ok(mut set) = worker.in_progress.lock() {
                    set.remove(&id);
                }
                if let Ok(mut set) = worker.cancel_requested.lock() {
                    set.remove(&id);
                }
                drop(permit);
                worker.slot_freed();
            });
            submitted += 1;
        }
        Ok(submitted)
    }
}

impl Worker {
    /// Registers a watched container so a cancellation can stop it.
    pub(crate) fn watching(&self, flow_run_id: &str, container_id: &str) {
        if let Ok(mut running) = self.running.lock() {
            running.insert(flow_run_id.to_owned(), container_id.to_owned());
        }
    }

    /// Unregisters it; true when the worker had stopped it for a cancellation.
    pub(crate) fn done_watching(&self, flow_run_id: &str) -> bool {
        if let Ok(mut running) = self.running.lock() {
            running.remove(flow_run_id);
        }
        self.cancelling
            .lock()
            .is_ok_and(|mut c| c.remove(flow_run_id))
    }

    /// Follows the Engine's `die`/`oom`/`kill` events for this pool's containers, reconnecting
    /// with backoff and resuming from the last event's time, so an exit or an OOM kill is known
    /// even when a container's own wait could not tell (it was removed, or the wait broke).
    async fn engine_events_loop(self: Arc<Self>, shutdown: CancellationToken) {
        use futures_util::StreamExt as _;
        let label = format!("io.prefect.work-pool-name={}", self.settings.pool);
        let mut since = chrono::Utc::now().timestamp();
        let mut delay = Duration::from_secs(1);
        loop {
            let mut stream = std::pin::pin!(self.docker.container_events(&label, since));
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    () = shutdown.cancelled() => return,
                };
                match item {
                    Some(Ok(event)) => {
                        delay = Duration::from_secs(1);
                        since = since.max(event.time);
                        self.on_engine_event(event);
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "Docker event stream interrupted");
                        break;
                    }
                    None => break,
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    fn on_engine_event(&self, event: crate::docker::ContainerEvent) {
        use crate::docker::ContainerEventKind as K;
        let Ok(mut facts) = self.engine_facts.lock() else {
            return;
        };
        // Bounded: only containers being watched are of interest, at most a few per run.
        if facts.len() > 10_000 {
            facts.clear();
        }
        let entry = facts.entry(event.id.clone()).or_default();
        match event.kind {
            K::Died { code } => entry.exit_code = Some(code),
            K::OomKilled => entry.oom_killed = true,
            K::Killed { signal } => {
                tracing::debug!(container = %event.id, signal, "container received a signal")
            }
        }
    }

    /// Takes (and forgets) what the event stream said about a container.
    pub(crate) fn engine_facts(&self, container_id: &str) -> EngineFacts {
        self.engine_facts
            .lock()
            .ok()
            .and_then(|mut f| f.remove(container_id))
            .unwrap_or_default()
    }

    /// Checks every `cancellation_poll` which watched runs were cancelled (the safety net
    /// under the `/events/out` subscription) and stops their containers with the grace
    /// period; the run task then reports Cancelled.
    async fn cancellation_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.settings.cancellation.poll_interval) => self.poll_cancellations().await,
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Follows the pool's flow-run events on `/events/out` once the pool is known: a
    /// Cancelling run has its container stopped at once, and a run that became due wakes the
    /// poll loop (fast pickup). The periodic poll and cancellation check stay as safety nets.
    async fn pool_events_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(config) = self.events_config.clone() else {
            return;
        };
        let pool_id = loop {
            if let Some(pool) = self.current_pool() {
                break pool.id;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return,
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(crate::prefect::subscriber::pool_flow_run_events(
            config,
            pool_id,
            tx,
            shutdown.clone(),
        ));
        loop {
            let event = tokio::select! {
                e = rx.recv() => e,
                () = shutdown.cancelled() => return,
            };
            match event {
                None => return,
                Some(PoolEvent::Cancelling { flow_run_id }) => {
                    if self.settings.cancellation.stop_cancelled
                        && self.settings.cancellation.events
                    {
                        self.cancel_run(&flow_run_id);
                    }
                }
                Some(PoolEvent::Scheduled {
                    flow_run_id,
                    scheduled_time,
                }) => {
                    let horizon = chrono::Utc::now()
                        + chrono::Duration::from_std(self.settings.polling.prefetch)
                            .unwrap_or_else(|_| chrono::Duration::seconds(10));
                    let due = scheduled_time.is_none_or(|t| t <= horizon);
                    if self.settings.features.fast_pickup && due {
                        tracing::debug!(flow_run_id, "a flow run became due; polling now");
                        // A short random pause, so several workers of one pool do not all
                        // claim the same run at the same instant.
                        let pause = Duration::from_millis(rand::random_range(0..200));
                        let worker = Arc::clone(&self);
                        tokio::spawn(async move {
                            tokio::time::sleep(pause).await;
                            worker.poll_now.notify_one();
                        });
                    }
                }
            }
        }
    }

    /// Asks the API which of the runs this worker handles (watched, or still being submitted)
    /// are Cancelling (or already Cancelled).
    async fn poll_cancellations(self: &Arc<Self>) {
        let mut ids: Vec<String> = self
            .running
            .lock()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        if let Ok(set) = self.in_progress.lock() {
            ids.extend(
                set.iter()
                    .filter(|id| !ids.contains(id))
                    .cloned()
                    .collect::<Vec<_>>(),
            );
        }
        if ids.is_empty() {
            return;
        }
        match self
            .api
            .flow_runs_in_states(&ids, &["CANCELLING", "CANCELLED"])
            .await
        {
            Ok(cancelled) => {
                for run_id in cancelled {
                    self.cancel_run(&run_id);
                }
            }
            Err(e) => {
                self.metrics.api_error(&e);
                tracing::debug!(error = %e, "could not check runs for cancellation");
            }
        }
    }

    /// Whether a run still being submitted was cancelled.
    pub(crate) fn cancel_requested(&self, run_id: &str) -> bool {
        self.cancel_requested
            .lock()
            .is_ok_and(|set| set.contains(run_id))
    }

    /// Notes that a run being submitted was cancelled (its submission checks before each step).
    pub(crate) fn request_cancel(&self, run_id: &str) {
        if let Ok(mut set) = self.cancel_requested.lock() {
            set.insert(run_id.to_owned());
        }
    }

    /// Stops the container of a watched run once (later calls for the same run do nothing);
    /// a run still being submitted is flagged so it never gets a container started.
    pub(crate) fn cancel_run(self: &Arc<Self>, run_id: &str) {
        let Some(container) = self
            .running
            .lock()
            .ok()
            .and_then(|r| r.get(run_id).cloned())
        else {
            if self
                .in_progress
                .lock()
                .is_ok_and(|set| set.contains(run_id))
                && !self.cancel_requested(run_id)
            {
                tracing::info!(
                    flow_run_id = run_id,
                    "flow run cancelled while being submitted; its container will not be started"
                );
                self.request_cancel(run_id);
            }
            return;
        };
        if !self
            .cancelling
            .lock()
            .is_ok_and(|mut c| c.insert(run_id.to_owned()))
        {
            return;
        }
        self.logs.info(
            run_id,
            format!(
                "Flow run '{run_id}' was cancelled; stopping its container (grace period {} s)",
                self.settings.cancellation.grace.as_secs()
            ),
        );
        let worker = Arc::clone(self);
        let run_id = run_id.to_owned();
        tokio::spawn(async move {
            if let Err(e) = worker
                .docker
                .stop_container(&container, worker.settings.cancellation.grace)
                .await
            {
                worker.metrics.docker_error(&e);
                worker.logs.error(
                    &run_id,
                    format!("Could not stop the container of cancelled flow run '{run_id}': {e}"),
                );
            }
        });
    }

    /// Runs an API call through outages: transient failures (no answer, 5xx — after the
    /// client's own retries) are retried with backoff (1 s doubling to 30 s) until the API
    /// answers, so a state report made during an outage is delivered, in order, once it is
    /// over. Other errors are returned at once. Shutdown bounds it: the process exits after
    /// its grace period whatever is still pending.
    pub(crate) async fn through_outage<T, F, Fut>(
        &self,
        what: &str,
        mut op: F,
    ) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let mut delay = Duration::from_secs(1);
        let mut failures = 0u32;
        loop {
            match op().await {
                Ok(value) => {
                    if failures > 0 {
                        tracing::info!(what, failures, "Prefect API reachable again; delivered");
                    }
                    return Ok(value);
                }
                Err(e) if e.is_transient() => {
                    self.metrics.api_error(&e);
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(what, error = %e, "Prefect API unavailable; keeping this report and retrying until it is delivered");
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Finds this pool's flow-run containers that nobody watches — left by an earlier process
    /// of this worker, or by a worker the server now sees offline — and watches them again:
    /// running ones to their exit, exited ones reported at once (Crashed for non-zero), each
    /// only while its flow run is not yet final, so nothing is reported twice or run again.
    /// Containers of workers that are still online are theirs and left alone.
    async fn adopt_orphans(self: &Arc<Self>, pool: &WorkPool) -> Result<(), ApiError> {
        let found = match self
            .docker
            .find_containers(&[format!("io.prefect.work-pool-name={}", pool.name)])
            .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "could not list this pool's containers; none re-attached");
                return Ok(());
            }
        };
        if found.is_empty() {
            return Ok(());
        }
        let online = self.api.online_workers(&pool.name).await?;
        for container in found {
            let Some(run_id) = container.labels.get("io.prefect.flow-run-id").cloned() else {
                continue;
            };
            let owner = container
                .labels
                .get("io.prefect.worker-name")
                .map(String::as_str);
            if owner.is_some_and(|o| o != self.settings.name && online.iter().any(|w| w == o)) {
                tracing::debug!(flow_run_id = %run_id, owner, "container belongs to a live worker; not adopting");
                continue;
            }
            if self
                .in_progress
                .lock()
                .is_ok_and(|set| set.contains(&run_id))
            {
                continue;
            }
            let flow_run = match self.api.read_flow_run(&run_id).await {
                Ok(run) => run,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            if matches!(
                flow_run.state_type(),
                Some("COMPLETED" | "FAILED" | "CRASHED" | "CANCELLED") | None
            ) {
                continue;
            }
            if let Ok(mut set) = self.in_progress.lock() {
                set.insert(run_id.clone());
            }
            let permit = self
                .limiter
                .as_ref()
                .and_then(|l| Arc::clone(l).try_acquire_owned().ok());
            let worker = Arc::clone(self);
            let pool_ref = PoolRef {
                id: pool.id.clone(),
                name: pool.name.clone(),
            };
            self.tasks.spawn(async move {
                run::reattach(&worker, flow_run, container, &pool_ref).await;
                if let Ok(mut set) = worker.in_progress.lock() {
                    set.remove(&run_id);
                }
                drop(permit);
                worker.slot_freed();
            });
        }
        Ok(())
    }
}

/// The pool facts a run needs, fixed at claim time.
#[derive(Debug, Clone)]
pub(crate) struct PoolRef {
    pub id: String,
    pub name: String,
}

/// The jittered interval, doubled per failure once failures pile up.
fn backoff(interval: Duration, failures: u32) -> Duration {
    let base = clamped_poisson_interval(interval);
    if failures < FAILURES_BEFORE_BACKOFF {
        return base;
    }
    let exponent = (failures - FAILURES_BEFORE_BACKOFF + 1).min(MAX_BACKOFF_EXPONENT);
    base * 2u32.pow(exponent)
}

/// The labels PATCHed onto a flow run so the UI shows which worker and pool ran it.
pub(crate) fn flow_run_labels(worker: &str, pool: &PoolRef) -> Value {
    serde_json::json!({
        "prefect.worker.name": worker,
        "prefect.worker.type": "docker",
        "prefect.work-pool.name": pool.name,
        "prefect.work-pool.id": pool.id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_after_three_failures_and_caps() {
        let i = Duration::from_secs(10);
        assert!(backoff(i, 2) <= Duration::from_secs(13));
        assert!(backoff(i, 3) >= Duration::from_secs(15));
        assert!(backoff(i, 100) <= Duration::from_secs(13 * 16));
    }
}
