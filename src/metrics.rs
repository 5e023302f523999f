//! Prometheus metrics and the liveness facts behind `/health`.
//!
//! Uses `prometheus-client` (the Prometheus project's Rust client). Recording is a few atomic
//! operations, so every path records unconditionally; `/metrics` only decides whether it is
//! exposed. One process may serve several pools: every metric about runs, polls and the
//! channel carries a `pool` label, and each pool's worker records through its own
//! [`PoolMetrics`] handle.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set of per-pool metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// The work pool.
    pub pool: String,
}

/// Label set for error and outcome counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The work pool.
    pub pool: String,
    /// Error class (`transport`, `http_5xx`, `ImageNotFound`, …) or outcome.
    pub kind: String,
}

/// Label set for the policy violation counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    /// The work pool.
    pub pool: String,
    /// The policy file's key of the rule (`privileged`, `bind_outside`, …).
    pub rule: String,
}

type PoolCounters = Family<PoolLabel, Counter>;
type PoolGauges = Family<PoolLabel, Gauge>;
type PoolHistograms = Family<PoolLabel, Histogram, fn() -> Histogram>;

fn submission_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 12))
}

fn pull_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 12))
}

fn poll_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

/// Every metric the worker exports, plus the last successful poll for `/health`.
pub struct Metrics {
    registry: Registry,
    started: Instant,
    last_poll: Mutex<Option<Instant>>,
    /// Flow runs claimed (Pending accepted).
    pub runs_claimed: PoolCounters,
    /// Flow-run containers running and watched.
    pub runs_running: PoolGauges,
    /// Containers that exited 0.
    pub runs_completed: PoolCounters,
    /// Runs reported Crashed (non-zero exit or failed submission).
    pub runs_crashed: PoolCounters,
    /// Runs the worker marked Cancelled.
    pub runs_cancelled: PoolCounters,
    /// Claimed runs put back to Scheduled (their container was never created).
    pub runs_rescheduled: PoolCounters,
    /// Containers stopped because their run was already final.
    pub orphans_stopped: PoolCounters,
    /// Claim → container started.
    pub submission_seconds: PoolHistograms,
    /// Image pulls.
    pub pull_seconds: PoolHistograms,
    /// Poll request latency.
    pub poll_seconds: PoolHistograms,
    /// Prefect API errors by class.
    pub api_errors: Family<KindLabel, Counter>,
    /// Docker errors by class.
    pub docker_errors: Family<KindLabel, Counter>,
    /// Containers removed by the periodic garbage collection.
    pub gc_removed: PoolCounters,
    /// Images removed by the worker's image collections (`--gc-images`, `--min-free-disk`):
    /// the host's, so not per pool.
    pub gc_images_removed: Counter,
    /// 1 while the pool's worker channel is healthy (REST sync stands down), else 0.
    pub channel_connected: PoolGauges,
    /// Cleanups delivered by the worker channel, by outcome (`ack` or the release reason).
    pub cleanups: Family<KindLabel, Counter>,
    /// Runs the host policy refused, by rule.
    pub policy_violations: Family<RuleLabel, Counter>,
    /// Flow-run log lines waiting to be sent to the API (one queue for the process).
    pub queued_reports: Gauge,
    /// The host's available memory at the last check (`--min-free-memory`).
    pub available_memory: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `docker_worker` prefix.
    pub fn new() -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix("docker_worker"),
            started: Instant::now(),
            last_poll: Mutex::new(None),
            runs_claimed: Family::default(),
            runs_running: Family::default(),
            runs_completed: Family::default(),
            runs_crashed: Family::default(),
            runs_cancelled: Family::default(),
            runs_rescheduled: Family::default(),
            orphans_stopped: Family::default(),
            submission_seconds: Family::new_with_constructor(submission_buckets),
            pull_seconds: Family::new_with_constructor(pull_buckets),
            poll_seconds: Family::new_with_constructor(poll_buckets),
            api_errors: Family::default(),
            docker_errors: Family::default(),
            gc_removed: Family::default(),
            gc_images_removed: Counter::default(),
            channel_connected: Family::default(),
            cleanups: Family::default(),
            policy_violations: Family::default(),
            queued_reports: Gauge::default(),
            available_memory: Gauge::default(),
        };
        metrics.register_runs();
        metrics.register_timings_and_errors();
        metrics.register_process();
        metrics
    }

    fn register_runs(&mut self) {
        let r = &mut self.registry;
        r.register(
            "flow_runs_claimed",
            "Flow runs claimed by this worker",
            self.runs_claimed.clone(),
        );
        r.register(
            "flow_runs_running",
            "Flow-run containers running and watched",
            self.runs_running.clone(),
        );
        r.register(
            "flow_runs_completed",
            "Flow-run containers that exited 0",
            self.runs_completed.clone(),
        );
        r.register(
            "flow_runs_crashed",
            "Flow runs reported Crashed",
            self.runs_crashed.clone(),
        );
        r.register(
            "flow_runs_cancelled",
            "Flow runs marked Cancelled by the worker",
            self.runs_cancelled.clone(),
        );
        r.register(
            "flow_runs_rescheduled",
            "Claimed flow runs put back to Scheduled because their container was never created",
            self.runs_rescheduled.clone(),
        );
        r.register(
            "orphans_stopped",
            "Containers stopped because their flow run was already final",
            self.orphans_stopped.clone(),
        );
        r.register(
            "policy_violations",
            "Flow runs the host policy refused, by rule",
            self.policy_violations.clone(),
        );
    }

    fn register_timings_and_errors(&mut self) {
        let r = &mut self.registry;
        r.register(
            "submission_duration_seconds",
            "Time from claiming a flow run to its container running",
            self.submission_seconds.clone(),
        );
        r.register(
            "image_pull_duration_seconds",
            "Image pull duration",
            self.pull_seconds.clone(),
        );
        r.register(
            "poll_duration_seconds",
            "Latency of polls for scheduled flow runs",
            self.poll_seconds.clone(),
        );
        r.register(
            "api_errors",
            "Prefect API errors by kind",
            self.api_errors.clone(),
        );
        r.register(
            "docker_errors",
            "Docker Engine errors by kind",
            self.docker_errors.clone(),
        );
    }

    fn register_process(&mut self) {
        let r = &mut self.registry;
        r.register(
            "channel_connected",
            "1 while the Prefect worker channel websocket is healthy",
            self.channel_connected.clone(),
        );
        r.register(
            "channel_cleanups",
            "Cleanups delivered by the worker channel, by outcome",
            self.cleanups.clone(),
        );
        r.register(
            "queued_reports",
            "Flow-run log lines queued for the Prefect API",
            self.queued_reports.clone(),
        );
        r.register(
            "gc_removed",
            "Finished flow-run containers removed by garbage collection",
            self.gc_removed.clone(),
        );
        r.register(
            "available_memory_bytes",
            "The host's available memory at the last check of --min-free-memory",
            self.available_memory.clone(),
        );
        r.register(
            "gc_images_removed",
            "Images removed by image garbage collection (periodic or before a pull)",
            self.gc_images_removed.clone(),
        );
    }

    /// The handle one pool's worker records through.
    pub fn for_pool(self: &Arc<Self>, pool: &str) -> PoolMetrics {
        let label = PoolLabel { pool: pool.into() };
        PoolMetrics {
            runs_claimed: self.runs_claimed.get_or_create(&label).clone(),
            runs_running: self.runs_running.get_or_create(&label).clone(),
            runs_completed: self.runs_completed.get_or_create(&label).clone(),
            runs_crashed: self.runs_crashed.get_or_create(&label).clone(),
            runs_cancelled: self.runs_cancelled.get_or_create(&label).clone(),
            runs_rescheduled: self.runs_rescheduled.get_or_create(&label).clone(),
            orphans_stopped: self.orphans_stopped.get_or_create(&label).clone(),
            submission_seconds: self.submission_seconds.get_or_create(&label).clone(),
            pull_seconds: self.pull_seconds.get_or_create(&label).clone(),
            gc_removed: self.gc_removed.get_or_create(&label).clone(),
            channel_connected: self.channel_connected.get_or_create(&label).clone(),
            available_memory: self.available_memory.clone(),
            pool: pool.into(),
            shared: Arc::clone(self),
        }
    }

    /// Records a successful poll of `pool` (what `/health` checks).
    fn polled(&self, pool: &str, latency: Duration) {
        self.poll_seconds
            .get_or_create(&PoolLabel { pool: pool.into() })
            .observe(latency.as_secs_f64());
        if let Ok(mut last) = self.last_poll.lock() {
            *last = Some(Instant::now());
        }
    }

    /// Time since the last successful poll of any pool, or since start before the first one.
    pub fn since_last_poll(&self) -> Duration {
        let last = self
            .last_poll
            .lock()
            .ok()
            .and_then(|l| *l)
            .unwrap_or(self.started);
        last.elapsed()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// One pool's metrics: the same names as [`Metrics`], already labelled with the pool.
#[derive(Clone)]
pub struct PoolMetrics {
    pool: String,
    shared: Arc<Metrics>,
    /// Flow runs claimed.
    pub runs_claimed: Counter,
    /// Containers running and watched.
    pub runs_running: Gauge,
    /// Containers that exited 0.
    pub runs_completed: Counter,
    /// Runs reported Crashed.
    pub runs_crashed: Counter,
    /// Runs marked Cancelled.
    pub runs_cancelled: Counter,
    /// Claims put back to Scheduled.
    pub runs_rescheduled: Counter,
    /// Containers of final runs stopped.
    pub orphans_stopped: Counter,
    /// Claim → container started.
    pub submission_seconds: Histogram,
    /// Image pulls.
    pub pull_seconds: Histogram,
    /// Containers removed by garbage collection.
    pub gc_removed: Counter,
    /// The pool's worker channel is healthy.
    pub channel_connected: Gauge,
    /// The host's available memory (shared by every pool).
    pub available_memory: Gauge,
}

impl PoolMetrics {
    /// Counts an API error by class.
    pub fn api_error(&self, error: &crate::prefect::ApiError) {
        let kind = match error.status() {
            Some(s) => format!("http_{s}"),
            None => match error {
                crate::prefect::ApiError::Transport { .. } => "transport".to_owned(),
                crate::prefect::ApiError::Decode { .. } => "decode".to_owned(),
                _ => "other".to_owned(),
            },
        };
        self.shared.api_errors.get_or_create(&self.kind(kind)).inc();
    }

    /// Counts a Docker error by class.
    pub fn docker_error(&self, error: &crate::docker::DockerError) {
        let kind = self.kind(error.kind().to_owned());
        self.shared.docker_errors.get_or_create(&kind).inc();
    }

    /// Counts a cleanup by outcome.
    pub fn cleanup(&self, outcome: &str) {
        let kind = self.kind(outcome.to_owned());
        self.shared.cleanups.get_or_create(&kind).inc();
    }

    /// Counts a run the host policy refused.
    pub fn policy_violation(&self, rule: &str) {
        self.shared
            .policy_violations
            .get_or_create(&RuleLabel {
                pool: self.pool.clone(),
                rule: rule.to_owned(),
            })
            .inc();
    }

    /// Records a successful poll (what `/health` checks).
    pub fn polled(&self, latency: Duration) {
        self.shared.polled(&self.pool, latency);
    }

    fn kind(&self, kind: String) -> KindLabel {
        KindLabel {
            pool: self.pool.clone(),
            kind,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_carry_the_pool() {
        let m = Arc::new(Metrics::new());
        let a = m.for_pool("a");
        let b = m.for_pool("b");
        a.runs_claimed.inc();
        b.runs_claimed.inc();
        b.runs_claimed.inc();
        a.gc_removed.inc();
        a.docker_error(&crate::docker::DockerError::ImageNotFound {
            image: "x".into(),
            policy: "Never",
        });
        a.policy_violation("bind_outside");
        let text = m.encode();
        for line in [
            "docker_worker_flow_runs_claimed_total{pool=\"a\"} 1",
            "docker_worker_flow_runs_claimed_total{pool=\"b\"} 2",
            "docker_worker_docker_errors_total{pool=\"a\",kind=\"ImageNotFound\"} 1",
            "docker_worker_gc_removed_total{pool=\"a\"} 1",
            "docker_worker_policy_violations_total{pool=\"a\",rule=\"bind_outside\"} 1",
            "docker_worker_submission_duration_seconds_bucket{",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    /// `since_last_poll` counts from the start until the first poll, from each poll after it,
    /// and keeps counting between polls. Bounds come from instants taken around the calls, so
    /// no assertion depends on how fast the machine is.
    #[test]
    fn since_last_poll_counts_from_the_start_then_from_each_poll() {
        // Deliberately let this much time pass (what is measured is time passing).
        const GAP: Duration = Duration::from_millis(30);
        let before_new = Instant::now();
        let m = Arc::new(Metrics::new());
        let pool = m.for_pool("p");
        std::thread::sleep(GAP);
        // No poll yet: the time since the start.
        let since_start = m.since_last_poll();
        assert!(since_start >= GAP, "{since_start:?}");
        assert!(since_start <= before_new.elapsed(), "{since_start:?}");

        let before_poll = Instant::now();
        pool.polled(Duration::from_millis(3));
        let since_poll = m.since_last_poll();
        // Reset to the poll: no older than this poll...
        assert!(since_poll <= before_poll.elapsed(), "{since_poll:?}");
        // ...so at least the gap younger than the start.
        assert!(
            since_poll + GAP <= before_new.elapsed(),
            "{since_poll:?} vs start {:?}",
            before_new.elapsed()
        );

        // It advances while no poll succeeds, and the next poll resets it again.
        std::thread::sleep(GAP);
        let advanced = m.since_last_poll();
        assert!(advanced >= GAP, "{advanced:?}");
        let before_second = Instant::now();
        pool.polled(Duration::from_millis(5));
        assert!(m.since_last_poll() <= before_second.elapsed());
        // Both polls' latencies were observed.
        assert!(
            m.encode()
                .contains("docker_worker_poll_duration_seconds_count{pool=\"p\"} 2"),
            "{}",
            m.encode()
        );
    }
}
