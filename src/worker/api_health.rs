//! Knowing the moment the Prefect API is back. While calls fail, a probe (one quick
//! `GET /health`, no retries) runs every [`PROBE_INTERVAL`]; the first answer wakes everything
//! that waits on it — the poll (which polls at once, cutting short a request still stuck in the
//! client's retries), the events subscription and the worker channel (which reconnect at once)
//! — so runs created after an outage are picked up within seconds of the server answering,
//! not after the longest backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::backoff;

/// How often the API is probed while it is down.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Whether the API is answering, and a signal for each time it came back.
#[derive(Debug)]
pub(crate) struct ApiHealth {
    down: AtomicBool,
    /// Wakes the probe when the API went down.
    went_down: Notify,
    /// Counts recoveries; waiters see it change.
    recoveries: watch::Sender<u64>,
}

impl Default for ApiHealth {
    fn default() -> Self {
        Self {
            down: AtomicBool::new(false),
            went_down: Notify::new(),
            recoveries: watch::Sender::new(0),
        }
    }
}

impl ApiHealth {
    /// A call failed for want of an answer (or with a 5xx): probe until the API is back.
    pub fn failed(&self) {
        if !self.down.swap(true, Ordering::SeqCst) {
            self.went_down.notify_one();
        }
    }

    /// A call succeeded: the API is up (waiters are woken if it had been down).
    pub fn succeeded(&self) {
        if self.down.swap(false, Ordering::SeqCst) {
            self.recoveries.send_modify(|n| *n += 1);
        }
    }

    /// Whether calls are failing now.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// A receiver that sees every recovery from now on.
    pub fn recoveries(&self) -> watch::Receiver<u64> {
        self.recoveries.subscribe()
    }
}

/// Resolves at the next recovery `rx` sees (never, if the sender is gone).
pub(crate) async fn recovered(rx: &mut watch::Receiver<u64>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Worker {
    /// Probes the API every [`PROBE_INTERVAL`] while it is down, until `shutdown`.
    pub(super) async fn api_probe_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            while !self.api_health.is_down() {
                tokio::select! {
                    () = self.api_health.went_down.notified() => {}
                    () = shutdown.cancelled() => return,
                }
            }
            if !backoff::sleep(PROBE_INTERVAL, &shutdown).await {
                return;
            }
            if self.api_health.is_down() && self.api.probe().await {
                tracing::info!("the Prefect API answers again; syncing and polling now");
                self.api_health.succeeded();
            }
        }
    }
}
