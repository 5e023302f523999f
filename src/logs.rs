//! Flow-run logs from the worker to the Prefect API, batched in the background.
//!
//! The worker's messages about a run ("submitting flow run …", "reported as crashed …")
//! appear in the Prefect UI beside the run, as with the Python worker. Every line is also
//! written to the worker's own log. The queue is bounded: when it is full, lines are
//! dropped with a warning rather than growing memory without limit.
//!
//! Batching follows Prefect's `APILogWorker`: one flush per `PREFECT_LOGGING_TO_API_BATCH_INTERVAL`
//! (and one at shutdown), lines of several runs in one request, requests within Prefect's
//! 4 MB batch size, and an entry over 1 MB of JSON cut and marked `... [truncated]`.
//!
//! Containers' output forwarded to the API ([`ApiLogs::forward`]) goes through a queue of its
//! own, so a chatty container cannot crowd out the worker's messages, and is never dropped for
//! lack of room: a forwarded line waits until the output held in memory (queued or in a batch
//! not yet taken) is under [`FORWARD_BUDGET`] bytes, which slows the reading of the
//! container's log instead. A batch the API could not take (unreachable, 5xx, 429) is kept and
//! sent again: after the `Retry-After` it asked for; after a 429 without one, a doubling pause
//! from the batch interval to [`MAX_PAUSE`]; else at the next interval.
//! Depends on `prefect` (the client) and `metrics` only.

mod clock;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use clock::RunClock;

use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::prefect::{LogEntry, PrefectClient, models::timestamp_now};

/// The logger name Prefect uses for worker messages about a flow run.
pub const LOGGER_NAME: &str = "prefect.flow_runs.worker";
/// Lines held in memory at most.
const QUEUE_CAPACITY: usize = 10_000;
/// Largest log entry, as JSON (Prefect's `PREFECT_LOGGING_TO_API_MAX_LOG_SIZE` default).
const MAX_LOG_SIZE: usize = 1_000_000;
/// Largest request body (Prefect's `PREFECT_LOGGING_TO_API_BATCH_SIZE` default).
const BATCH_SIZE: usize = 4_000_000;
/// Forwarded container output held in memory at most, as JSON bytes, across all runs (raised
/// to the batch size when that is larger, so a full batch can always be assembled).
pub const FORWARD_BUDGET: usize = 16 << 20;
/// Forwarded lines waiting for the sender at most (each also counts against the budget).
const FORWARD_QUEUE: usize = 1024;
/// The longest pause between tries of a batch the API could not take, unless it asks longer.
pub const MAX_PAUSE: Duration = Duration::from_secs(60);

/// Size limits of flow-run logs sent to the API
/// (`PREFECT_LOGGING_TO_API_MAX_LOG_SIZE` / `_BATCH_SIZE`, Prefect's defaults by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Largest log entry, as JSON; longer messages are cut.
    pub max_log_size: usize,
    /// Largest request body.
    pub batch_size: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_log_size: MAX_LOG_SIZE,
            batch_size: BATCH_SIZE,
        }
    }
}

impl LogLimits {
    /// A batch takes entries while their JSON, one separator each, is under this; the last
    /// one taken may be of the maximum size, so the request stays within `batch_size`
    /// (Prefect's `BATCH_SIZE - MAX_LOG_SIZE - 1`).
    fn max_batch_bytes(self) -> usize {
        self.batch_size.saturating_sub(self.max_log_size + 1)
    }
}
/// What a cut message ends with (Prefect's words).
const TRUNCATED: &str = "... [truncated]";
/// Characters cut beyond the excess, leaving room for [`TRUNCATED`] (Prefect's margin).
const TRUNCATION_MARGIN: usize = 50;

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
    /// Forwarded container output, with its memory budget; `None` for a handle whose lines all
    /// go to `tx` (a test's queue).
    forward: Option<Forward>,
    dropped: Arc<AtomicU64>,
    metrics: Option<Arc<Metrics>>,
    limits: LogLimits,
}

/// The queue of forwarded output and the bytes it may still take.
#[derive(Clone)]
struct Forward {
    tx: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
    /// The budget's size in permits (bytes), the most one entry may take.
    size: u32,
    /// How many lines had to wait for room, for the worker's log.
    waited: Arc<AtomicU64>,
}

/// A log entry waiting to be sent; a forwarded one holds its share of [`FORWARD_BUDGET`]
/// until it is sent (or refused), so the budget counts what is really in memory.
struct Queued {
    entry: LogEntry,
    permit: Option<OwnedSemaphorePermit>,
}

impl Queued {
    fn plain(entry: LogEntry) -> Self {
        Self {
            entry,
            permit: None,
        }
    }

    fn is_forwarded(&self) -> bool {
        self.permit.is_some()
    }
}

impl serde::Serialize for Queued {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.entry.serialize(serializer)
    }
}

impl ApiLogs {
    /// A handle that only writes to the worker's own log (`PREFECT_LOGGING_TO_API_ENABLED=false`).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            forward: None,
            dropped: Arc::new(AtomicU64::new(0)),
            metrics: None,
            limits: LogLimits::default(),
        }
    }

    /// Starts the background sender, flushing every `interval` and once more at shutdown.
    pub fn spawn(
        api: Arc<PrefectClient>,
        interval: Duration,
        limits: LogLimits,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> (Self, JoinHandle<()>) {
        let budget = FORWARD_BUDGET.max(limits.batch_size);
        Self::spawn_with_budget(api, interval, limits, metrics, shutdown, tasks, budget)
    }

    /// [`Self::spawn`] with forwarded output bounded at `budget` bytes.
    fn spawn_with_budget(
        api: Arc<PrefectClient>,
        interval: Duration,
        limits: LogLimits,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
        budget: usize,
    ) -> (Self, JoinHandle<()>) {
        let (mut logs, rx) = Self::queue(limits, Some(Arc::clone(&metrics)));
        let (forward_tx, forward_rx) = mpsc::channel(FORWARD_QUEUE);
        let size = u32::try_from(budget).unwrap_or(u32::MAX);
        logs.forward = Some(Forward {
            tx: forward_tx,
            budget: Arc::new(Semaphore::new(size as usize)),
            size,
            waited: Arc::new(AtomicU64::new(0)),
        });
        let queues = Queues {
            worker: rx,
            forwarded: forward_rx,
        };
        let handle = tasks.spawn(send_loop(api, queues, interval, limits, metrics, shutdown));
        (logs, handle)
    }

    /// A handle and the queue its lines go to, for a sender of the caller's choosing (the
    /// background sender above; a test reading what a run logged).
    pub fn queue(
        limits: LogLimits,
        metrics: Option<Arc<Metrics>>,
    ) -> (Self, mpsc::Receiver<LogEntry>) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let logs = Self {
            tx: Some(tx),
            forward: None,
            dropped: Arc::new(AtomicU64::new(0)),
            metrics,
            limits,
        };
        (logs, rx)
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
        self.to_api_at(flow_run_id, LOGGER_NAME, level, message, None);
    }

    /// [`Self::to_api`] under a logger name of the caller's and at a time of its choosing
    /// (`None` = now): for lines whose order in the UI, which sorts by timestamp, must be the
    /// order they were written in. Never waits: when the queue is full the line is dropped,
    /// counted and warned about.
    pub fn to_api_at(
        &self,
        flow_run_id: &str,
        logger: &str,
        level: Level,
        message: impl Into<String>,
        at: Option<DateTime<Utc>>,
    ) {
        let Some(tx) = &self.tx else { return };
        let entry = self.entry(flow_run_id, logger, level, message.into(), at);
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

    /// Queues a line of a container's output for the API, waiting while the forwarded output
    /// in memory is at its budget (back-pressure: the caller reads the container's log more
    /// slowly). Never dropped for lack of room; lost only if the API refuses its batch (4xx).
    pub async fn forward(
        &self,
        flow_run_id: &str,
        logger: &str,
        level: Level,
        message: &str,
        at: DateTime<Utc>,
    ) {
        let entry = self.entry(flow_run_id, logger, level, message.to_owned(), Some(at));
        match &self.forward {
            Some(forward) => {
                let bytes = u32::try_from(json_size(&entry))
                    .unwrap_or(u32::MAX)
                    .clamp(1, forward.size);
                let budget = Arc::clone(&forward.budget);
                let permit = match Arc::clone(&budget).try_acquire_many_owned(bytes) {
                    Ok(permit) => permit,
                    Err(_) => {
                        let n = forward.waited.fetch_add(1, Ordering::Relaxed) + 1;
                        if n == 1 || n.is_power_of_two() {
                            tracing::info!(
                                waited = n,
                                budget_bytes = forward.size,
                                "forwarded container output is at its memory budget; reading containers' logs more slowly until the API takes it"
                            );
                        }
                        let Ok(permit) = budget.acquire_many_owned(bytes).await else {
                            return;
                        };
                        permit
                    }
                };
                let queued = Queued {
                    entry,
                    permit: Some(permit),
                };
                // Closed only when the sender stopped (shutdown): the line is for the next
                // worker, which resumes after the last line the API has.
                let _ = forward.tx.send(queued).await;
            }
            None => {
                if let Some(tx) = &self.tx {
                    let _ = tx.send(entry).await;
                }
            }
        }
    }

    fn entry(
        &self,
        flow_run_id: &str,
        logger: &str,
        level: Level,
        message: String,
        at: Option<DateTime<Utc>>,
    ) -> LogEntry {
        let mut entry = LogEntry {
            name: logger.to_owned(),
            level: level as u8,
            message,
            timestamp: at.map_or_else(timestamp_now, format_timestamp),
            flow_run_id: Some(flow_run_id.to_owned()),
            task_run_id: None,
        };
        truncate(&mut entry, self.limits.max_log_size);
        entry
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

/// A time as Prefect writes it, to the microsecond it stores (`2026-11-27T22:51:24.111655Z`).
pub fn format_timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// What the sender reads from.
struct Queues {
    /// The worker's own messages (and crash tails).
    worker: mpsc::Receiver<LogEntry>,
    /// Forwarded container output.
    forwarded: mpsc::Receiver<Queued>,
}

async fn send_loop(
    api: Arc<PrefectClient>,
    mut queues: Queues,
    interval: Duration,
    limits: LogLimits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut batch: Vec<Queued> = Vec::new();
    // The first flush is one interval in, not at once: lines logged together go together.
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pause = Pause::new(interval);
    loop {
        tokio::select! {
            entry = queues.worker.recv() => match entry {
                Some(entry) => batch.push(Queued::plain(entry)),
                None => break,
            },
            Some(queued) = queues.forwarded.recv() => batch.push(queued),
            _ = ticker.tick() => {
                if pause.over() {
                    let held = flush(&api, &mut batch, limits).await;
                    pause.after(held);
                }
                metrics.queued_reports.set(queues.worker.len() as i64);
            }
            () = shutdown.cancelled() => break,
        }
    }
    while let Ok(entry) = queues.worker.try_recv() {
        batch.push(Queued::plain(entry));
    }
    while let Ok(queued) = queues.forwarded.try_recv() {
        batch.push(queued);
    }
    flush(&api, &mut batch, limits).await;
}

/// When the next flush may try again after the API did not take a batch.
struct Pause {
    until: Option<Instant>,
    backoff: Backoff,
}

impl Pause {
    fn new(interval: Duration) -> Self {
        Self {
            until: None,
            backoff: Backoff::new(interval, MAX_PAUSE.max(interval)),
        }
    }

    fn over(&self) -> bool {
        self.until.is_none_or(|until| Instant::now() >= until)
    }

    /// After a flush: `None` when everything went, else the batch was held, with the wait the
    /// API asked for if it did.
    fn after(&mut self, held: Option<Held>) {
        match held {
            None => {
                self.until = None;
                self.backoff.reset();
            }
            Some(Held {
                retry_after,
                rate_limited,
            }) => {
                let wait = match retry_after {
                    Some(asked) => Some(asked),
                    None if rate_limited => Some(self.backoff.next_delay()),
                    // Unreachable or failing: the client backed off already; the next tick
                    // tries again, so logs follow an outage's end within an interval.
                    None => None,
                };
                self.until = wait.map(|wait| Instant::now() + wait);
            }
        }
    }
}

/// A flush that stopped with lines still queued, because the API could not take them now.
#[derive(Debug, PartialEq, Eq)]
struct Held {
    /// The API's `Retry-After`.
    retry_after: Option<Duration>,
    /// It answered 429: back off even when it did not say how long.
    rate_limited: bool,
}

/// Sends the batch in chunks. A chunk the API could not take because it is unreachable,
/// failing (5xx) or rate-limiting (429) stays queued, in order, for the next try; the worker's
/// own lines are bounded, dropping their oldest with a warning (forwarded output is bounded by
/// its budget instead, and never dropped here). Other failures drop the chunk (the API refused
/// its content), with a warning.
async fn flush(api: &PrefectClient, batch: &mut Vec<Queued>, limits: LogLimits) -> Option<Held> {
    let plain = batch.iter().filter(|q| !q.is_forwarded()).count();
    if plain > QUEUE_CAPACITY {
        let mut excess = plain - QUEUE_CAPACITY;
        let dropped = excess;
        batch.retain(|q| {
            if excess > 0 && !q.is_forwarded() {
                excess -= 1;
                false
            } else {
                true
            }
        });
        tracing::warn!(
            dropped,
            "flow-run log backlog is full during an API outage; dropped the oldest lines"
        );
    }
    while !batch.is_empty() {
        let take = next_batch_len(batch, limits.max_batch_bytes());
        match api.create_logs(&batch[..take]).await {
            Ok(()) => {
                batch.drain(..take);
            }
            Err(e) if e.error.is_transient() => {
                tracing::debug!(error = %e.error, retry_after = ?e.retry_after, queued = batch.len(), "Prefect API could not take flow-run logs now; keeping them queued");
                return Some(Held {
                    retry_after: e.retry_after,
                    rate_limited: e.error.status() == Some(429),
                });
            }
            Err(e) => {
                tracing::warn!(error = %e.error, lines = take, "the Prefect API refused flow-run logs; dropping them");
                batch.drain(..take);
            }
        }
    }
    None
}

impl AsRef<LogEntry> for LogEntry {
    fn as_ref(&self) -> &LogEntry {
        self
    }
}

impl AsRef<LogEntry> for Queued {
    fn as_ref(&self) -> &LogEntry {
        &self.entry
    }
}

/// The size of an entry in a request body.
fn json_size(entry: &LogEntry) -> usize {
    serde_json::to_vec(entry).map_or(0, |json| json.len())
}

/// Cuts an entry whose JSON is over `max_log_size` as Prefect does: the message loses as
/// many characters as the JSON has bytes too many, plus a margin, and ends with
/// `... [truncated]`, so the entry fits.
fn truncate(entry: &mut LogEntry, max_log_size: usize) {
    let size = json_size(entry);
    if size <= max_log_size {
        return;
    }
    let excess = size - max_log_size;
    let keep = entry
        .message
        .chars()
        .count()
        .saturating_sub(excess + TRUNCATION_MARGIN);
    let end = entry
        .message
        .char_indices()
        .nth(keep)
        .map_or(entry.message.len(), |(i, _)| i);
    entry.message.truncate(end);
    entry.message.push_str(TRUNCATED);
}

/// How many of the queued entries the next request takes: the first, then more while the
/// batch (each entry's JSON and its separator) is under `max_batch_bytes`.
fn next_batch_len<T: AsRef<LogEntry>>(batch: &[T], max_batch_bytes: usize) -> usize {
    let mut size = 0;
    let mut take = 0;
    for entry in batch.iter().map(AsRef::as_ref) {
        if size >= max_batch_bytes {
            break;
        }
        size += json_size(entry) + 1;
        take += 1;
    }
    take
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use crate::prefect::ClientConfig;

    fn entry(message: &str) -> LogEntry {
        LogEntry {
            name: LOGGER_NAME.to_owned(),
            level: 20,
            message: message.to_owned(),
            timestamp: "2026-11-27T22:51:24.111655Z".to_owned(),
            flow_run_id: Some("9235a16a-76c1-4c82-8caa-25dd8d07031c".to_owned()),
            task_run_id: None,
        }
    }

    #[test]
    fn an_entry_over_the_maximum_is_cut_as_prefect_cuts_it() {
        // Under the limit: untouched.
        let mut small = entry(&"x".repeat(MAX_LOG_SIZE - 1000));
        truncate(&mut small, MAX_LOG_SIZE);
        assert_eq!(small.message.len(), MAX_LOG_SIZE - 1000);

        // Over: the message loses the excess bytes of JSON plus 50 characters, then ends with
        // the marker (Prefect: message[:len - oversize - 50] + "... [truncated]").
        let mut big = entry(&"x".repeat(MAX_LOG_SIZE));
        let excess = json_size(&big) - MAX_LOG_SIZE;
        truncate(&mut big, MAX_LOG_SIZE);
        assert_eq!(
            big.message.len(),
            MAX_LOG_SIZE - excess - TRUNCATION_MARGIN + TRUNCATED.len()
        );
        assert!(big.message.ends_with("x... [truncated]"));
        assert!(json_size(&big) <= MAX_LOG_SIZE);

        // Characters, not bytes, are cut; JSON escapes count toward the size.
        let mut wide = entry(&"é\"".repeat(MAX_LOG_SIZE / 3));
        let excess = json_size(&wide) - MAX_LOG_SIZE;
        let chars = wide.message.chars().count();
        truncate(&mut wide, MAX_LOG_SIZE);
        assert_eq!(
            wide.message.chars().count(),
            chars - excess - TRUNCATION_MARGIN + TRUNCATED.chars().count()
        );
        assert!(json_size(&wide) <= MAX_LOG_SIZE);
    }

    #[test]
    fn batches_stay_within_prefects_request_size() {
        // Each entry ~900 KB: the batch takes entries while it is under 2 999 999 bytes, so
        // four (the fourth may be a maximum-size entry) and then the rest.
        let lines: Vec<LogEntry> = (0..5).map(|_| entry(&"y".repeat(900_000))).collect();
        assert_eq!(
            next_batch_len(&lines, LogLimits::default().max_batch_bytes()),
            4
        );
        assert_eq!(
            next_batch_len(&lines[4..], LogLimits::default().max_batch_bytes()),
            1
        );
        let body = serde_json::to_vec(&lines[..4]).unwrap();
        assert!(body.len() <= BATCH_SIZE, "{}", body.len());
        // Maximum-size entries: three fit under the threshold after the first two.
        let mut max = entry(&"z".repeat(2 * MAX_LOG_SIZE));
        truncate(&mut max, MAX_LOG_SIZE);
        let maxed = vec![max; 5];
        let take = next_batch_len(&maxed, LogLimits::default().max_batch_bytes());
        assert_eq!(take, 4);
        assert!(serde_json::to_vec(&maxed[..take]).unwrap().len() <= BATCH_SIZE);
        // Small lines all go together; one line always goes.
        let small: Vec<LogEntry> = (0..1000).map(|i| entry(&format!("line {i}"))).collect();
        assert_eq!(
            next_batch_len(&small, LogLimits::default().max_batch_bytes()),
            1000
        );
        assert_eq!(
            next_batch_len(&small[..1], LogLimits::default().max_batch_bytes()),
            1
        );
        assert_eq!(
            next_batch_len::<LogEntry>(&[], LogLimits::default().max_batch_bytes()),
            0
        );
    }

    /// A `MakeWriter` keeping what a tracing subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// PREFECT_LOGGING_TO_API_ENABLED=false gives this handle (src/app.rs): every line still
    /// reaches the worker's own log, none is queued for the API, so even far more lines than a
    /// queue holds are neither dropped nor warned about.
    #[test]
    fn a_disabled_handle_logs_locally_and_queues_nothing() {
        let worker_log = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(worker_log.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .finish();
        let logs = ApiLogs::disabled();
        tracing::subscriber::with_default(subscriber, || {
            logs.info("run-1", "submitting flow run 'run-1'");
            logs.warn("run-1", "a warning");
            for i in 0..=QUEUE_CAPACITY {
                logs.to_api("run-2", Level::Info, format!("container line {i}"));
            }
        });
        let text = String::from_utf8(worker_log.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("submitting flow run 'run-1'") && text.contains("flow_run_id=\"run-1\""),
            "{text}"
        );
        assert!(text.contains("a warning"), "{text}");
        // `to_api` lines are for the API only: not written to the worker's log either.
        assert!(!text.contains("container line"), "{text}");
        assert!(!text.contains("queue is full"), "{text}");
        assert_eq!(logs.dropped.load(Ordering::Relaxed), 0);
    }

    /// `PREFECT_LOGGING_TO_API_ENABLED` (Prefect's boolean words) and
    /// `PREFECT_LOGGING_TO_API_BATCH_INTERVAL` as the settings read them; src/app.rs spawns the
    /// sender with that interval, or uses [`ApiLogs::disabled`].
    #[test]
    fn settings_turn_api_logs_off_and_set_the_interval() {
        use clap::Parser;
        let settings = |pairs: &[(&str, &str)]| {
            let crate::cli::Command::Start(args) =
                crate::cli::Cli::parse_from(["docker-worker", "start", "--pool", "p"]).command
            else {
                unreachable!("parsed `start`")
            };
            let env: std::collections::BTreeMap<String, String> =
                [("PREFECT_API_URL", "http://127.0.0.1:4200/api")]
                    .iter()
                    .chain(pairs)
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect();
            crate::config::Settings::from_start_args(&args, &env)
        };
        let default = settings(&[]).unwrap();
        assert!(default.worker.reporting.logging_to_api);
        assert_eq!(
            default.worker.reporting.log_batch_interval,
            Duration::from_secs(2)
        );
        for off in ["false", "FALSE", "0", "off", "no", "f", "n"] {
            let s = settings(&[("PREFECT_LOGGING_TO_API_ENABLED", off)]).unwrap();
            assert!(!s.worker.reporting.logging_to_api, "{off}");
        }
        for on in ["true", "True", "1", "on", "yes"] {
            let s = settings(&[("PREFECT_LOGGING_TO_API_ENABLED", on)]).unwrap();
            assert!(s.worker.reporting.logging_to_api, "{on}");
        }
        assert!(settings(&[("PREFECT_LOGGING_TO_API_ENABLED", "maybe")]).is_err());
        let s = settings(&[("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.5")]).unwrap();
        assert_eq!(
            s.worker.reporting.log_batch_interval,
            Duration::from_millis(500)
        );
    }

    /// Bodies of the `POST /logs/` requests a stub API received; answers `statuses` in order
    /// (the last repeated). A stub because request boundaries are what is checked here; the
    /// real server's view of the logs is checked in tests/e2e.rs and tests/conformance.rs.
    async fn stub(statuses: Vec<u16>) -> (Arc<PrefectClient>, Arc<Mutex<Vec<Value>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/api/", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&bodies);
        tokio::spawn(async move {
            let mut i = 0;
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 1 << 16];
                let body_start = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break Some(end + 4);
                    }
                };
                let Some(start) = body_start else { continue };
                let status = statuses[i.min(statuses.len() - 1)];
                i += 1;
                if status == 201 {
                    seen.lock()
                        .unwrap()
                        .push(serde_json::from_slice(&buf[start..]).unwrap_or(Value::Null));
                }
                let body = if status == 201 { "null" } else { "{}" };
                // A rate limit says when to come back, as Prefect Cloud's does.
                let retry_after = if status == 429 {
                    "Retry-After: 1\r\n"
                } else {
                    ""
                };
                let response = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{retry_after}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(response.as_bytes()).await;
                let _ = sock.shutdown().await;
            }
        });
        let client = PrefectClient::new(&ClientConfig {
            api_url: url.parse().unwrap(),
            api_key: None,
            auth_string: None,
            timeout: Duration::from_secs(10),
            max_retries: 0,
            worker_name: None,
            csrf_enabled: false,
        })
        .unwrap();
        (Arc::new(client), bodies)
    }

    async fn wait_for(bodies: &Mutex<Vec<Value>>, n: usize) {
        for _ in 0..200 {
            if bodies.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "expected {n} requests, got {:?}",
            bodies.lock().unwrap().len()
        );
    }

    #[tokio::test]
    async fn lines_of_several_runs_go_in_one_batch_per_interval_and_the_rest_at_shutdown() {
        let (api, bodies) = stub(vec![201]).await;
        let shutdown = CancellationToken::new();
        let (logs, task) = ApiLogs::spawn(
            api,
            Duration::from_millis(300),
            LogLimits::default(),
            Arc::new(Metrics::new()),
            shutdown.clone(),
            &TaskTracker::new(),
        );
        logs.info("run-a", "Worker 'w1' submitting flow run 'run-a'");
        logs.warn("run-b", "warned");
        logs.error("run-a", "failed");
        wait_for(&bodies, 1).await;
        logs.log("run-b", Level::Debug, "last");
        shutdown.cancel();
        task.await.unwrap();
        let bodies = bodies.lock().unwrap().clone();
        assert_eq!(bodies.len(), 2, "{bodies:?}");
        let first = bodies[0].as_array().unwrap();
        let summary: Vec<(&str, u64, &str)> = first
            .iter()
            .map(|e| {
                (
                    e["flow_run_id"].as_str().unwrap(),
                    e["level"].as_u64().unwrap(),
                    e["message"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("run-a", 20, "Worker 'w1' submitting flow run 'run-a'"),
                ("run-b", 30, "warned"),
                ("run-a", 40, "failed"),
            ]
        );
        for e in first {
            assert_eq!(e["name"], LOGGER_NAME);
            assert_eq!(e["task_run_id"], Value::Null);
            let ts = e["timestamp"].as_str().unwrap();
            assert!(ts.ends_with('Z') && ts.len() == 27, "{ts}");
        }
        assert_eq!(bodies[1][0]["message"], "last");
        assert_eq!(bodies[1][0]["level"], 10);
    }

    /// Beyond the reference, which drops a batch it could not send: a batch the API could
    /// not take (5xx, unreachable) is sent again at the next interval; a refused one (4xx)
    /// is dropped.
    #[test]
    fn configured_limits_cut_entries_and_batches_at_their_sizes() {
        let limits = LogLimits {
            max_log_size: 2_000,
            batch_size: 10_000,
        };
        let mut big = entry(&"y".repeat(5_000));
        truncate(&mut big, limits.max_log_size);
        assert!(json_size(&big) <= 2_000, "{}", json_size(&big));
        assert!(big.message.ends_with(TRUNCATED));
        let lines: Vec<LogEntry> = (0..20).map(|_| big.clone()).collect();
        let take = next_batch_len(&lines, limits.max_batch_bytes());
        let body: usize = lines[..take].iter().map(|e| json_size(e) + 1).sum();
        assert!(
            take > 1 && body <= limits.batch_size,
            "{take} entries, {body} bytes"
        );
    }

    #[tokio::test]
    async fn an_unavailable_api_delays_the_batch_and_a_refusing_one_drops_it() {
        let (api, bodies) = stub(vec![503, 201]).await;
        let shutdown = CancellationToken::new();
        let (logs, task) = ApiLogs::spawn(
            api,
            Duration::from_millis(100),
            LogLimits::default(),
            Arc::new(Metrics::new()),
            shutdown.clone(),
            &TaskTracker::new(),
        );
        logs.info("run-a", "kept");
        wait_for(&bodies, 1).await;
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(bodies.lock().unwrap()[0][0]["message"], "kept");

        let (api, bodies) = stub(vec![422, 201]).await;
        let mut batch = vec![Queued::plain(entry("refused"))];
        assert_eq!(flush(&api, &mut batch, LogLimits::default()).await, None);
        assert!(batch.is_empty());
        batch.push(Queued::plain(entry("accepted")));
        flush(&api, &mut batch, LogLimits::default()).await;
        let bodies = bodies.lock().unwrap().clone();
        assert_eq!(bodies.len(), 1);
        assert_eq!(bodies[0][0]["message"], "accepted");
    }

    #[tokio::test]
    async fn one_flush_splits_a_large_backlog_into_requests_within_the_batch_size() {
        let (api, bodies) = stub(vec![201]).await;
        let mut batch: Vec<Queued> = (0..5)
            .map(|_| Queued::plain(entry(&"y".repeat(900_000))))
            .collect();
        flush(&api, &mut batch, LogLimits::default()).await;
        let bodies = bodies.lock().unwrap().clone();
        let sizes: Vec<usize> = bodies.iter().map(|b| b.as_array().unwrap().len()).collect();
        assert_eq!(sizes, [4, 1]);
    }

    /// A 429 is not a refusal: the batch stays queued, the API's `Retry-After` sets the pause,
    /// and the lines go once it is over; nothing is lost, nothing sent twice.
    #[tokio::test]
    async fn a_rate_limited_batch_is_kept_and_sent_after_the_pause_it_asked_for() {
        let (api, bodies) = stub(vec![429, 201]).await;
        let mut batch = vec![
            Queued::plain(entry("first")),
            Queued::plain(entry("second")),
        ];
        let held = flush(&api, &mut batch, LogLimits::default()).await;
        assert_eq!(
            held,
            Some(Held {
                retry_after: Some(Duration::from_secs(1)),
                rate_limited: true,
            })
        );
        assert_eq!(batch.len(), 2);
        let mut pause = Pause::new(Duration::from_millis(100));
        pause.after(held);
        assert!(!pause.over(), "the pause the API asked for has not passed");
        assert_eq!(flush(&api, &mut batch, LogLimits::default()).await, None);
        pause.after(None);
        assert!(pause.over());
        let bodies = bodies.lock().unwrap().clone();
        assert_eq!(bodies.len(), 1);
        assert_eq!(bodies[0][0]["message"], "first");
        assert_eq!(bodies[0][1]["message"], "second");

        // A 429 without a Retry-After: the pause doubles from the interval up to its cap.
        let mut pause = Pause::new(Duration::from_secs(2));
        let waits: Vec<Duration> = (0..8)
            .map(|_| {
                let before = Instant::now();
                pause.after(Some(Held {
                    retry_after: None,
                    rate_limited: true,
                }));
                pause.until.unwrap() - before
            })
            .collect();
        assert!(waits[0] >= Duration::from_secs(2) && waits[1] >= Duration::from_secs(4));
        assert!(
            waits
                .iter()
                .all(|w| *w <= MAX_PAUSE + Duration::from_millis(50))
        );
    }

    /// Forwarded output waits, rather than being dropped, while the API cannot take it and
    /// what is held reaches the budget; the worker's own messages still queue meanwhile; once
    /// the API answers, every forwarded line arrives once, in order, at its own timestamp.
    #[tokio::test]
    async fn forwarded_output_waits_at_its_budget_and_then_goes_in_order() {
        use futures_util::FutureExt as _;
        // Unavailable for the first five tries, then taking everything.
        let (api, bodies) = stub(vec![503, 503, 503, 503, 503, 201]).await;
        let shutdown = CancellationToken::new();
        let (logs, task) = ApiLogs::spawn_with_budget(
            api,
            Duration::from_millis(20),
            LogLimits::default(),
            Arc::new(Metrics::new()),
            shutdown.clone(),
            &TaskTracker::new(),
            4_000,
        );
        let t0 = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.000001Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |i: i64| t0 + chrono::TimeDelta::microseconds(i);
        let mut sent = 0;
        // Each entry is about 200 bytes of JSON: about 20 fit in the budget.
        while sent < 100 {
            let line = format!("output line {sent:03}");
            let forward = logs.forward("run-f", "container.stdout", Level::Info, &line, at(sent));
            if forward.now_or_never().is_none() {
                break;
            }
            sent += 1;
        }
        assert!(
            (5..100).contains(&sent),
            "forwarding never waited: {sent} lines queued"
        );
        // The worker's own messages are not held up by the forwarded output.
        logs.info("run-f", "a worker message");
        // The rest wait their turn and go as the API recovers.
        for i in sent..100 {
            let line = format!("output line {i:03}");
            logs.forward("run-f", "container.stdout", Level::Info, &line, at(i))
                .await;
        }
        let forwarded = |bodies: &Mutex<Vec<Value>>| -> Vec<(String, String)> {
            bodies
                .lock()
                .unwrap()
                .iter()
                .flat_map(|b| b.as_array().cloned().unwrap_or_default())
                .filter(|e| e["name"] == "container.stdout")
                .map(|e| {
                    (
                        e["message"].as_str().unwrap_or_default().to_owned(),
                        e["timestamp"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        };
        for _ in 0..400 {
            if forwarded(&bodies).len() >= 100 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        shutdown.cancel();
        task.await.unwrap();
        let got = forwarded(&bodies);
        let expected: Vec<(String, String)> = (0..100)
            .map(|i| (format!("output line {i:03}"), format_timestamp(at(i))))
            .collect();
        assert_eq!(got, expected);
        let all: Vec<Value> = bodies
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b.as_array().cloned().unwrap_or_default())
            .collect();
        assert!(all.iter().any(|e| e["message"] == "a worker message"));
    }
}
