//! The worker side of Prefect's worker channel: while a session is healthy the pool comes from
//! pushed snapshots and the heartbeat goes over the socket (no REST sync at all); otherwise the
//! REST sync runs as before. Cleanup work the server delivers — stop the container of a run it
//! moved out of Cancelling — is done here: one at a time, the lease renewed 5 s before it
//! lapses, then acknowledged or released with the reason the reference gives.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::Worker;
use super::infra_pid::InfrastructurePid;
use crate::job::default_base_job_template;
use crate::prefect::ClientConfig;
use crate::prefect::channel::{
    self, CANCELLING_TIMEOUT_TEARDOWN, CleanupMessage, Hello, Inbound, Operation, OperationResult,
    PENDING_CLAIM_TEARDOWN, Session, Snapshot,
};

/// The grace period of a cleanup's container stop, as the reference's handler uses.
const TEARDOWN_GRACE: Duration = Duration::from_secs(30);
/// A lease is renewed this long before it lapses.
const RENEW_BEFORE: Duration = Duration::from_secs(5);
/// How long one operation waits for its result.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts per operation, one second apart.
const OPERATION_ATTEMPTS: u32 = 3;

/// The channel's state as the rest of the worker sees it.
pub(crate) struct ChannelState {
    /// API settings; `None` = the channel is not used.
    config: Option<ClientConfig>,
    /// API settings for the `/events/out` subscription; `None` = poll only.
    pub(super) events_config: Option<ClientConfig>,
    consumer_id: String,
    /// A session is up and has applied a snapshot: REST sync stands down.
    healthy: AtomicBool,
    /// The newest snapshot sequence applied on the current connection.
    sequence: Mutex<Option<u64>>,
    metadata_sent: AtomicBool,
    /// Frames for whichever session is live (kept across reconnects).
    outbound: mpsc::UnboundedSender<String>,
    outbound_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// Operation frame id → who waits for its result.
    pending: Mutex<HashMap<String, oneshot::Sender<OperationResult>>>,
    /// Reservation tokens being worked on.
    active: Mutex<HashSet<String>>,
    /// Cleanups allowed at once (the server's effective limit, at most 1).
    max_concurrency: Mutex<u64>,
    /// Ask for `pending_claim_teardown.v1` too; switched off once a server refused a hello
    /// that asked for it (a schema without the kind).
    claim_teardown: AtomicBool,
}

impl ChannelState {
    /// `config`: `None` when the channel is switched off; `events_config`: `None` when the
    /// `/events/out` subscription is.
    pub(crate) fn new(config: Option<ClientConfig>, events_config: Option<ClientConfig>) -> Self {
        let (outbound, rx) = mpsc::unbounded_channel();
        Self {
            config,
            events_config,
            consumer_id: channel::frame_id(),
            healthy: AtomicBool::new(false),
            sequence: Mutex::new(None),
            metadata_sent: AtomicBool::new(false),
            outbound,
            outbound_rx: Mutex::new(Some(rx)),
            pending: Mutex::new(HashMap::new()),
            active: Mutex::new(HashSet::new()),
            max_concurrency: Mutex::new(1),
            claim_teardown: AtomicBool::new(true),
        }
    }

    /// Whether a healthy session carries the heartbeat and the pool (REST sync stands down).
    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }
}

/// Why a cleanup gives its message back.
type Release = &'static str;

impl Worker {
    fn hello(&self) -> Hello {
        let mut queues = self.settings.work_queues.clone();
        queues.sort();
        let metadata = (!self.channel.metadata_sent.load(Ordering::SeqCst)).then(|| {
            json!({"integrations": [{"name": env!("CARGO_PKG_NAME"), "version": env!("CARGO_PKG_VERSION")}]})
        });
        Hello {
            consumer_id: self.channel.consumer_id.clone(),
            worker_name: self.settings.name.clone(),
            worker_type: "docker".into(),
            heartbeat_interval_seconds: self.settings.polling.heartbeat_interval.as_secs().max(1),
            work_queue_names: queues,
            cleanup_kinds: if self.channel.claim_teardown.load(Ordering::SeqCst) {
                vec![CANCELLING_TIMEOUT_TEARDOWN, PENDING_CLAIM_TEARDOWN]
            } else {
                vec![CANCELLING_TIMEOUT_TEARDOWN]
            },
            create_pool_if_not_found: self.settings.polling.create_pool_if_not_found,
            default_base_job_template: self
                .settings
                .polling
                .base_job_template
                .clone()
                .unwrap_or_else(default_base_job_template),
            worker_metadata: metadata,
        }
    }

    /// The first sync's channel attempt (up to 10 s). `true` when a session is healthy and
    /// has brought the pool, so no REST sync is needed; the channel then lives in its own
    /// task, reconnecting as the reference does, until a terminal failure or shutdown.
    pub(super) async fn start_channel(self: &Arc<Self>, shutdown: CancellationToken) -> bool {
        let Some(config) = self.channel.config.clone() else {
            return false;
        };
        let mut first = channel::open(&config, &self.settings.pool, &self.hello(), false).await;
        if first
            .as_ref()
            .is_err_and(channel::ChannelError::is_protocol_error)
            && self.channel.claim_teardown.swap(false, Ordering::SeqCst)
        {
            tracing::debug!(
                "the server refused a hello asking for pending-claim teardowns; asking without"
            );
            first = channel::open(&config, &self.settings.pool, &self.hello(), false).await;
        }
        let session = match first {
            Ok(session) => Some(session),
            Err(e) if e.is_terminal() => {
                tracing::info!(error = %e, "Prefect's worker channel is not available; syncing over REST");
                return false;
            }
            Err(e) => {
                tracing::warn!(error = %e, "worker channel unhealthy; REST sync is active while it reconnects");
                None
            }
        };
        let healthy = session.is_some();
        if let Some(s) = &session {
            self.session_ready(s);
        }
        let worker = Arc::clone(self);
        self.tasks
            .spawn(async move { worker.channel_loop(config, session, shutdown).await });
        healthy
    }

    fn session_ready(&self, session: &Session) {
        self.channel.metadata_sent.store(true, Ordering::SeqCst);
        if let Ok(mut sequence) = self.channel.sequence.lock() {
            *sequence = None;
        }
        if let Ok(mut max) = self.channel.max_concurrency.lock() {
            *max = session.ready.max_cleanup_concurrency.min(1);
        }
        self.apply_snapshot(session.ready.initial_snapshot.clone());
        self.channel.healthy.store(true, Ordering::SeqCst);
        self.out.metrics.channel_connected.set(1);
        tracing::info!(
            heartbeat_seconds = session.ready.heartbeat_interval_seconds,
            cleanup = session.ready.cleanup_accepted,
            "connected to Prefect's worker channel"
        );
    }

    async fn channel_loop(
        self: Arc<Self>,
        config: ClientConfig,
        mut session: Option<Session>,
        shutdown: CancellationToken,
    ) {
        let Some(mut outbound) = self
            .channel
            .outbound_rx
            .lock()
            .ok()
            .and_then(|mut r| r.take())
        else {
            return;
        };
        let mut attempt = 0u32;
        let mut recoveries = self.api_health.recoveries();
        // The session handed in was readied by `start_channel`; later ones are readied here.
        let mut fresh = session.is_none();
        // A refused connection is terminal until a session was once healthy, then retryable.
        let mut been_healthy = session.is_some();
        loop {
            let current = match session.take() {
                Some(s) => Ok(s),
                None => {
                    let hello = self.hello();
                    tokio::select! {
                        r = channel::open(&config, &self.settings.pool, &hello, been_healthy) => r,
                        () = shutdown.cancelled() => return,
                    }
                }
            };
            let error = match current {
                Ok(live) => {
                    if fresh {
                        self.session_ready(&live);
                    }
                    fresh = true;
                    been_healthy = true;
                    attempt = 0;
                    let hello = self.hello();
                    let worker = Arc::clone(&self);
                    tokio::select! {
                        e = live.run(&hello, &mut outbound, move |frame| worker.on_frame(frame)) => e,
                        () = shutdown.cancelled() => return,
                    }
                }
                Err(e) => e,
            };
            self.channel.healthy.store(false, Ordering::SeqCst);
            self.out.metrics.channel_connected.set(0);
            if error.is_terminal() {
                tracing::warn!(error = %error, "worker channel disabled; syncing over REST from now on");
                return;
            }
            attempt += 1;
            let delay = channel::reconnect_delay(attempt);
            tracing::warn!(error = %error, retry_in_seconds = delay.as_secs(), "worker channel lost; REST sync is active while it reconnects");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                // The API answers again: reconnect now, from the start of the schedule.
                () = super::api_health::recovered(&mut recoveries) => attempt = 0,
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Applies a snapshot unless an equal or newer one already was.
    fn apply_snapshot(&self, snapshot: Snapshot) {
        if let Ok(mut last) = self.channel.sequence.lock() {
            if last.is_some_and(|l| snapshot.sequence <= l) {
                return;
            }
            *last = Some(snapshot.sequence);
        }
        let mut pool = snapshot.pool;
        if pool
            .base_job_template
            .as_object()
            .is_none_or(|t| t.is_empty())
        {
            pool.base_job_template = default_base_job_template();
        }
        self.record_pool(pool);
    }

    fn on_frame(self: &Arc<Self>, frame: Inbound) {
        match frame {
            Inbound::Snapshot(snapshot) => self.apply_snapshot(snapshot),
            Inbound::OperationResult(result) => {
                let waiter = self
                    .channel
                    .pending
                    .lock()
                    .ok()
                    .and_then(|mut p| p.remove(&result.request_frame_id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(result);
                }
            }
            Inbound::Cleanup(message) => {
                // A cleanup in flight at shutdown gets the shutdown grace, no more.
                let worker = Arc::clone(self);
                let abandon = self.lifetime.abandon.clone();
                self.tasks.spawn(async move {
                    tokio::select! {
                        () = worker.execute_cleanup(message) => {}
                        () = abandon.cancelled() => {}
                    }
                });
            }
        }
    }

    async fn execute_cleanup(self: Arc<Self>, message: CleanupMessage) {
        if message.kind != CANCELLING_TIMEOUT_TEARDOWN && message.kind != PENDING_CLAIM_TEARDOWN {
            self.finish_cleanup(&message, Err("unsupported_cleanup_kind"))
                .await;
            return;
        }
        if Utc::now() >= message.lease_expires_at {
            tracing::debug!(message_id = %message.message_id, "cleanup lease already expired; skipped");
            return;
        }
        let max = self.channel.max_concurrency.lock().map_or(1, |m| *m);
        let admitted = self.channel.active.lock().ok().and_then(|mut active| {
            if active.contains(&message.reservation_token) {
                None
            } else if u64::try_from(active.len()).unwrap_or(u64::MAX) >= max {
                Some(false)
            } else {
                active.insert(message.reservation_token.clone());
                Some(true)
            }
        });
        match admitted {
            Some(true) => {}
            Some(false) => {
                self.finish_cleanup(&message, Err("concurrency_limit_reached"))
                    .await;
                return;
            }
            _ => return,
        }
        let lease = Arc::new(Mutex::new(message.lease_expires_at));
        let outcome = tokio::select! {
            outcome = self.cleanup(&message) => Some(outcome),
            () = self.renew_until_lost(&message, Arc::clone(&lease)) => None,
        };
        match outcome {
            Some(outcome) => self.finish_cleanup(&message, outcome).await,
            None => {
                tracing::warn!(message_id = %message.message_id, "cleanup reservation lost; another worker may take it over");
            }
        }
        if let Ok(mut active) = self.channel.active.lock() {
            active.remove(&message.reservation_token);
        }
    }

    async fn finish_cleanup(&self, message: &CleanupMessage, outcome: Result<(), Release>) {
        let kind = match outcome {
            Ok(()) => "ack",
            Err(reason) => reason,
        };
        self.out.metrics.cleanup(kind);
        let result = match outcome {
            Ok(()) => self.operation(Operation::Ack, message, None, None).await,
            Err(reason) => {
                self.operation(Operation::Release, message, Some(reason), None)
                    .await
            }
        };
        tracing::info!(
            flow_run_id = message.flow_run_id.as_deref().unwrap_or_default(),
            outcome = ?outcome,
            answer = result.as_ref().map_or("none", |r| r.status.as_str()),
            "cleanup delivered by the worker channel finished"
        );
    }

    /// Renews the lease 5 s before it lapses; returns only when the reservation is lost.
    async fn renew_until_lost(
        &self,
        message: &CleanupMessage,
        lease: Arc<Mutex<chrono::DateTime<Utc>>>,
    ) {
        loop {
            let expires = lease.lock().map_or_else(|_| Utc::now(), |l| *l);
            let until_renewal = (expires - Utc::now())
                .to_std()
                .unwrap_or_default()
                .saturating_sub(RENEW_BEFORE);
            tokio::time::sleep(until_renewal).await;
            if Utc::now() >= expires {
                return;
            }
            match self
                .operation(Operation::Renew, message, None, Some(expires))
                .await
            {
                Some(result) if result.status == "accepted" => {
                    tracing::debug!(message_id = %message.message_id, lease_expires_at = ?result.lease_expires_at, "cleanup lease renewed");
                    if let (Some(new), Ok(mut l)) = (result.lease_expires_at, lease.lock()) {
                        *l = new;
                    }
                }
                Some(result) if result.status != "error" && !unknown_status(&result.status) => {
                    return;
                }
                _ => {
                    if Utc::now() >= expires {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Sends one cleanup operation and waits for its result: up to 3 attempts, 30 s each (or
    /// until `deadline`), 1 s apart; a retryable answer is tried again.
    async fn operation(
        &self,
        operation: Operation,
        message: &CleanupMessage,
        reason: Option<&str>,
        deadline: Option<chrono::DateTime<Utc>>,
    ) -> Option<OperationResult> {
        let mut last = None;
        for attempt in 1..=OPERATION_ATTEMPTS {
            let mut wait = OPERATION_TIMEOUT;
            if let Some(deadline) = deadline {
                wait = wait.min((deadline - Utc::now()).to_std().unwrap_or_default());
            }
            if wait.is_zero() {
                break;
            }
            let id = channel::frame_id();
            let (tx, rx) = oneshot::channel();
            if let Ok(mut pending) = self.channel.pending.lock() {
                pending.insert(id.clone(), tx);
            }
            let frame = channel::operation_frame(operation, &id, message, reason);
            let answer = if self.channel.outbound.send(frame).is_ok() {
                tokio::time::timeout(wait, rx)
                    .await
                    .ok()
                    .and_then(Result::ok)
            } else {
                None
            };
            if let Ok(mut pending) = self.channel.pending.lock() {
                pending.remove(&id);
            }
            match answer {
                Some(result) if result.status != "error" && !unknown_status(&result.status) => {
                    return Some(result);
                }
                other => last = other.or(last),
            }
            if attempt < OPERATION_ATTEMPTS {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        last
    }

    /// Does one cleanup of either kind.
    async fn cleanup(self: &Arc<Self>, message: &CleanupMessage) -> Result<(), Release> {
        if message.kind == PENDING_CLAIM_TEARDOWN {
            self.teardown_pending_claim(message).await
        } else {
            self.teardown(message).await
        }
    }

    /// `pending_claim_teardown.v1`: the server withdrew the run's claim, so nothing of it may
    /// run. A submission this process has in flight withdraws (or, if its container already
    /// runs, is stopped); a container of the run on this host that nobody here watches is
    /// removed; then the message is acknowledged. A pid naming another Docker host releases it
    /// to that host's worker.
    pub(super) async fn teardown_pending_claim(
        self: &Arc<Self>,
        message: &CleanupMessage,
    ) -> Result<(), Release> {
        let Some(run_id) = message.flow_run_id.as_deref() else {
            return Err("invalid_payload");
        };
        if let Some(pid) = message
            .infrastructure_pid
            .as_deref()
            .and_then(InfrastructurePid::parse)
            && !pid.is_on(self.docker.base_url())
        {
            return Err("infrastructure_not_available");
        }
        if self.registry.holds(run_id) {
            self.cancel_run(run_id);
            return Ok(());
        }
        let label = format!("{}={run_id}", crate::job::labels::FLOW_RUN_ID);
        let containers = match self.docker.list_labelled(&[label]).await {
            Ok(containers) => containers,
            Err(e) => {
                tracing::warn!(error = %e, flow_run_id = run_id, "cleanup could not list the run's containers");
                return Err("handler_failed");
            }
        };
        for found in containers {
            if let Err(e) = self.docker.remove_container(&found.container.id).await {
                self.out.metrics.docker_error(&e);
                tracing::warn!(error = %e, flow_run_id = run_id, "cleanup could not remove a container of a withdrawn claim");
                return Err("handler_failed");
            }
            tracing::info!(
                flow_run_id = run_id,
                container = found.container.display_name(),
                "removed the container of a claim the server withdrew"
            );
        }
        Ok(())
    }

    /// `cancelling_timeout_teardown.v1`: stop the run's container. `Ok` = acknowledge
    /// (done, or nothing to do); `Err(reason)` = release the message with that reason.
    async fn teardown(&self, message: &CleanupMessage) -> Result<(), Release> {
        let Some(run_id) = message.flow_run_id.as_deref() else {
            return Err("invalid_payload");
        };
        let run = match self.api.read_flow_run(run_id).await {
            Ok(run) => run,
            Err(e) if e.status() == Some(404) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, flow_run_id = run_id, "cleanup could not read the flow run");
                return Err("handler_failed");
            }
        };
        let Some(pid) = message
            .infrastructure_pid
            .as_deref()
            .filter(|p| !p.is_empty())
        else {
            return if run.infrastructure_pid.is_some() {
                Err("missing_infrastructure_handle")
            } else {
                Ok(())
            };
        };
        if let Some(deployment_id) = run.deployment_id.as_deref() {
            match self.deployment(deployment_id).await {
                Ok(Some(_)) => {}
                Ok(None) => return Err("configuration_context_unavailable"),
                Err(e) => {
                    tracing::warn!(error = %e, flow_run_id = run_id, "cleanup could not read the deployment");
                    return Err("handler_failed");
                }
            }
        }
        let Some(pid) = InfrastructurePid::parse(pid) else {
            return Err("infrastructure_not_available");
        };
        let container = pid.container_id();
        if !pid.is_on(self.docker.base_url()) {
            tracing::info!(
                flow_run_id = run_id,
                pid = %pid,
                "cleanup names a container on another Docker host; leaving it to that host's worker"
            );
            return Err("infrastructure_not_available");
        }
        match self.docker.container_exists(container).await {
            Ok(false) => {
                tracing::info!(
                    flow_run_id = run_id,
                    "Docker container '{container}' not found"
                );
                return Ok(());
            }
            Ok(true) => {}
            Err(e) => {
                tracing::warn!(error = %e, flow_run_id = run_id, "cleanup could not inspect the container");
                return Err("handler_failed");
            }
        }
        // The run is already Cancelled by the server: its watcher's exit report is refused
        // (ABORT), so the server's own message stays, as with the reference.
        match self.docker.stop_container(container, TEARDOWN_GRACE).await {
            Ok(()) => {
                tracing::info!(
                    flow_run_id = run_id,
                    "Stopped Docker container '{container}'"
                );
                Ok(())
            }
            Err(e) => {
                self.out.metrics.docker_error(&e);
                tracing::warn!(error = %e, flow_run_id = run_id, "cleanup could not stop the container");
                Err("handler_failed")
            }
        }
    }
}

/// Statuses the protocol does not define are treated as retryable errors, as the reference does.
fn unknown_status(status: &str) -> bool {
    !matches!(
        status,
        "accepted"
            | "error"
            | "not_current"
            | "not_found"
            | "expired"
            | "invalid_token"
            | "unauthorized"
            | "dead_lettered"
    )
}
