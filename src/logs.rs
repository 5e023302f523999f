//! Flow-run logs from the worker to the Prefect API, batched in the background.
//!
//! The worker's messages about a run ("submitting flow run …", "reported as crashed …")
//! appear in the Prefect UI beside the run, as with the Python worker. Every line is also
//! written to the worker's own log. The queue is bounded: when it is full, lines are
//! dropped with a warning rather than growing memory without limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::prefect::{LogEntry, PrefectClient, models::timestamp_now};

/// The logger name Prefect uses for worker messages about a flow run.
pub const LOGGER_NAME: &str = "prefect.flow_runs.worker";
/// Lines held in memory at most.
const QUEUE_CAPACITY: usize = 10_000;
/// Longest message sent; longer ones are cut (Prefect's `MAX_LOG_SIZE`).
const MAX_MESSAGE_BYTES: usize = 1_000_000;
/// Largest batch body (Prefect's `BATCH_SIZE - MAX_LOG_SIZE - 1`).
const MAX_BATCH_BYTES: usize = 3_000_000 - 1;

/// Python logging levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// 10
    Debug = 10,
    /// 20
    Info = 20,
    /// 30
    Warning = 30,
    /// 40
    Error = 40,
}

/// A handle for queueing flow-run logs; cheap to clone.
#[derive(Clone)]
pub struct ApiLogs {
    tx: Option<mpsc::Sender<LogEntry>>,
    dropped: Arc<AtomicU64>,
    metrics: Option<Arc<Metrics>>,
}

impl ApiLogs {
    /// A handle that only writes to the worker's own log (`PREFECT_LOGGING_TO_API_ENABLED=false`).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
            metrics: None,
        }
    }

    /// Starts the background sender, flushing every `interval` and once more at shutdown.
    pub fn spawn(
        api: Arc<PrefectClient>,
        interval: Duration,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let handle = tokio::spawn(send_loop(api, rx, interval, Arc::clone(&metrics), shutdown));
        (
            Self {
                tx: Some(tx),
                dropped: Arc::new(AtomicU64::new(0)),
                metrics: Some(metrics),
            },
            handle,
        )
    }

    /// Logs `message` for a flow run: to the worker's log now, to the API soon.
    pub fn log(&self, flow_run_id: &str, level: Level, message: impl Into<String>) {
        let message = message.into();
        match level {
            Level::Debug => tracing::debug!(flow_run_id, "{message}"),
            Level::Info => tracing::info!(flow_run_id, "{message}"),
            Level::Warning => tracing::warn!(flow_run_id, "{message}"),
            Level::Error => tracing::error!(flow_run_id, "{message}"),
        }
        self.to_api(flow_run_id, level, message);
    }

    /// Queues `message` for the API only, not the worker's log: for text the worker log
    /// already has, such as container output it printed.
    pub fn to_api(&self, flow_run_id: &str, level: Level, message: impl Into<String>) {
        let mut message = message.into();
        let Some(tx) = &self.tx else { return };
        if message.len() > MAX_MESSAGE_BYTES {
            let mut end = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str("... [truncated]");
        }
        let entry = LogEntry {
            name: LOGGER_NAME.to_owned(),
            level: level as u8,
            message,
            timestamp: timestamp_now(),
            flow_run_id: Some(flow_run_id.to_owned()),
            task_run_id: None,
        };
        let sent = tx.try_send(entry);
        if let Some(m) = &self.metrics {
            m.queued_reports
                .set((tx.max_capacity() - tx.capacity()) as i64);
        }
        if sent.is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n == 1 || n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "flow-run log queue is full; dropping log lines for the API"
                );
            }
        }
    }

    /// Shorthand for [`Level::Info`].
    pub fn info(&self, flow_run_id: &str, message: impl Into<String>) {
        self.log(flow_run_id, Level::Info, message);
    }

    /// Shorthand for [`Level::Warning`].
    pub fn warn(&self, flow_run_id: &str, message: impl Into<String>) {
        self.log(flow_run_id, Level::Warning, message);
    }

    /// Shorthand for [`Level::Error`].
    pub fn error(&self, flow_run_id: &str, message: impl Into<String>) {
        self.log(flow_run_id, Level::Error, message);
    }
}

async fn send_loop(
    api: Arc<PrefectClient>,
    mut rx: mpsc::Receiver<LogEntry>,
    interval: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut batch: Vec<LogEntry> = Vec::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            entry = rx.recv() => match entry {
                Some(entry) => batch.push(entry),
                None => break,
            },
            _ = ticker.tick() => {
                flush(&api, &mut batch).await;
                metrics.queued_reports.set(rx.len() as i64);
            }
            () = shutdown.cancelled() => break,
        }
    }
    while let Ok(entry) = rx.try_recv() {
        batch.push(entry);
    }
    flush(&api, &mut batch).await;
}

/// Sends the batch in chunks. A chunk the API could not take because it is unreachable stays
/// queued (in order) for the next tick; the queue is bounded, dropping its oldest lines with a
/// warning. Other failures drop the chunk (the API refused its content).
async fn flush(api: &PrefectClient, batch: &mut Vec<LogEntry>) {
    if batch.len() > QUEUE_CAPACITY {
        let excess = batch.len() - QUEUE_CAPACITY;
        batch.drain(..excess);
        tracing::warn!(
            dropped = excess,
            "flow-run log backlog is full during an API outage; dropped the oldest lines"
        );
    }
    while !batch.is_empty() {
        let mut size = 0;
        let mut take = 0;
        for entry in batch.iter() {
            size += entry.message.len() + 200;
            if take > 0 && size > MAX_BATCH_BYTES {
                break;
            }
            take += 1;
        }
        match api.create_logs(&batch[..take]).await {
            Ok(()) => {
                batch.drain(..take);
            }
            Err(e) if e.is_transient() => {
                tracing::debug!(error = %e, queued = batch.len(), "Prefect API unavailable; keeping flow-run logs queued");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, lines = take, "the Prefect API refused flow-run logs; dropping them");
                batch.drain(..take);
            }
        }
    }
}
