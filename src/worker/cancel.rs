//! Cancellation, and the pool's flow-run events that bring it: a run that goes to Cancelling
//! is learnt at once from `/events/out` (with a poll every `cancellation_poll` as the safety
//! net), and the registry says what it means now — withdraw a submission, stop a container,
//! or nothing. The same subscription also wakes the poll when one of the pool's runs becomes
//! due (fast pickup).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Worker;
use super::registry::CancelAction;
use crate::backoff;
use crate::prefect::StateType;
use crate::prefect::subscriber::PoolEvent;

impl Worker {
    /// Checks every `cancellation_poll` which held runs were cancelled (the safety net under
    /// the `/events/out` subscription).
    pub(super) async fn cancellation_loop(self: Arc<Self>, shutdown: CancellationToken) {
        while backoff::sleep(self.settings.cancellation.poll_interval, &shutdown).await {
            self.poll_cancellations().await;
        }
    }

    /// Asks the API which held runs (watched, or still being submitted) are Cancelling (or
    /// already Cancelled), and cancels them.
    pub(super) async fn poll_cancellations(self: &Arc<Self>) {
        let ids = self.registry.run_ids();
        if ids.is_empty() {
            return;
        }
        match self
            .api
            .flow_runs_in_states(&ids, &[StateType::Cancelling, StateType::Cancelled])
            .await
        {
            Ok(cancelled) => {
                for run_id in cancelled {
                    self.cancel_run(&run_id);
                }
            }
            Err(e) => {
                self.out.metrics.api_error(&e);
                tracing::debug!(error = %e, "could not check runs for cancellation");
            }
        }
    }

    /// Follows the pool's flow-run events on `/events/out` once the pool is known.
    pub(super) async fn pool_events_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(config) = self.channel.events_config.clone() else {
            return;
        };
        let pool_id = loop {
            if let Some(pool) = self.current_pool() {
                break pool.id;
            }
            if !backoff::sleep(Duration::from_secs(1), &shutdown).await {
                return;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(256);
        self.tasks
            .spawn(crate::prefect::subscriber::pool_flow_run_events(
                config,
                pool_id,
                tx,
                shutdown.clone(),
                self.api_health.recoveries(),
            ));
        loop {
            let event = tokio::select! {
                e = rx.recv() => e,
                () = shutdown.cancelled() => return,
            };
            match event {
                None => return,
                Some(event) => self.on_pool_event(event),
            }
        }
    }

    fn on_pool_event(self: &Arc<Self>, event: PoolEvent) {
        match event {
            PoolEvent::Cancelling { flow_run_id } => {
                if self.settings.cancellation.stop_cancelled && self.settings.cancellation.events {
                    self.cancel_run(&flow_run_id);
                }
            }
            PoolEvent::Scheduled {
                flow_run_id,
                scheduled_time,
            } => {
                let prefetch = chrono::Duration::from_std(self.settings.polling.prefetch)
                    .unwrap_or_else(|_| chrono::Duration::seconds(10));
                let due = scheduled_time.is_none_or(|t| t <= chrono::Utc::now() + prefetch);
                if self.settings.features.fast_pickup && due {
                    tracing::debug!(flow_run_id, "a flow run became due; polling now");
                    // A short random pause, so several workers of one pool do not all claim
                    // the same run at the same instant.
                    let pause = Duration::from_millis(rand::random_range(0..200));
                    let registry = Arc::clone(&self.registry);
                    self.tasks.spawn(async move {
                        tokio::time::sleep(pause).await;
                        registry.wake_poll();
                    });
                }
            }
        }
    }

    /// Acts on a cancellation of `run_id` as the registry says: a submission withdraws at its
    /// next step (no container is ever started), a watched container is stopped once, with the
    /// grace period; the run's task then reports Cancelled.
    pub(crate) fn cancel_run(self: &Arc<Self>, run_id: &str) {
        match self.registry.cancel(run_id) {
            CancelAction::Withdraw => tracing::info!(
                flow_run_id = run_id,
                "flow run cancelled while being submitted; its container will not be started"
            ),
            CancelAction::Stop { container } => self.stop_for_cancel(run_id, container),
            CancelAction::Nothing => {}
        }
    }

    /// Stops a cancelled run's container in the background (SIGTERM, SIGKILL after the
    /// grace); the watch sees the exit and the run is reported Cancelled.
    pub(crate) fn stop_for_cancel(self: &Arc<Self>, run_id: &str, container: String) {
        let grace = self.settings.cancellation.grace;
        self.out.logs.info(
            run_id,
            format!(
                "Flow run '{run_id}' was cancelled; stopping its container (grace period {} s)",
                grace.as_secs()
            ),
        );
        let worker = Arc::clone(self);
        let run_id = run_id.to_owned();
        self.tasks.spawn(async move {
            if let Err(e) = worker.docker.stop_container(&container, grace).await {
                worker.out.metrics.docker_error(&e);
                worker.out.logs.error(
                    &run_id,
                    format!("Could not stop the container of cancelled flow run '{run_id}': {e}"),
                );
            }
        });
    }
}
