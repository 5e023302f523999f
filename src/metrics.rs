//! Prometheus metrics and the liveness facts behind `/health`.
//!
//! Uses `prometheus-client` (the Prometheus project's Rust client). Recording is a few atomic
//! operations, so every path records unconditionally; `/metrics` only decides whether it is
//! exposed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set for error counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Error class (`transport`, `http_5xx`, `ImageNotFound`, …).
    pub kind: String,
}

/// Label set for the policy violation counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    /// The policy file's key of the rule (`privileged`, `bind_outside`, …).
    pub rule: String,
}

/// Every metric the worker exports, plus the last successful poll for `/health`.
pub struct Metrics {
    registry: Registry,
    started: Instant,
    last_poll: Mutex<Option<Instant>>,
    /// Flow runs this worker claimed (Pending accepted).
    pub runs_claimed: Counter,
    /// Flow runs whose container is running and watched.
    pub runs_running: Gauge,
    /// Containers that exited 0.
    pub runs_completed: Counter,
    /// Runs reported Crashed (non-zero exit or failed submission).
    pub runs_crashed: Counter,
    /// Runs the worker marked Cancelled.
    pub runs_cancelled: Counter,
    /// Claimed runs the worker put back to Scheduled (their container was never created).
    pub runs_rescheduled: Counter,
    /// Containers stopped because their run was already final.
    pub orphans_stopped: Counter,
    /// Claim → container started.
    pub submission_seconds: Histogram,
    /// Image pulls.
    pub pull_seconds: Histogram,
    /// Poll request latency.
    pub poll_seconds: Histogram,
    /// Prefect API errors by class.
    pub api_errors: Family<KindLabel, Counter>,
    /// Docker errors by class.
    pub docker_errors: Family<KindLabel, Counter>,
    /// Flow-run log lines waiting to be sent to the API.
    pub queued_reports: Gauge,
    /// Containers removed by the periodic garbage collection.
    pub gc_removed: Counter,
    /// Images removed by the worker's image collections (`--gc-images`, `--min-free-disk`).
    pub gc_images_removed: Counter,
    /// 1 while Prefect's worker channel is healthy (REST sync stands down), else 0.
    pub channel_connected: Gauge,
    /// Cleanups delivered by the worker channel, by outcome (`ack` or the release reason).
    pub cleanups: Family<KindLabel, Counter>,
    /// Runs the host policy refused, by rule.
    pub policy_violations: Family<RuleLabel, Counter>,
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
            runs_claimed: Counter::default(),
            runs_running: Gauge::default(),
            runs_completed: Counter::default(),
            runs_crashed: Counter::default(),
            runs_cancelled: Counter::default(),
            runs_rescheduled: Counter::default(),
            orphans_stopped: Counter::default(),
            submission_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            pull_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 12)),
            poll_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            api_errors: Family::default(),
            docker_errors: Family::default(),
            queued_reports: Gauge::default(),
            gc_removed: Counter::default(),
            gc_images_removed: Counter::default(),
            channel_connected: Gauge::default(),
            cleanups: Family::default(),
            policy_violations: Family::default(),
        };
        metrics.register_channel();
        metrics.register_runs();
        metrics.register_timings_and_errors();
        metrics
    }

    fn register_channel(&mut self) {
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
        r.register(
            "queued_reports",
            "Flow-run log lines queued for the Prefect API",
            self.queued_reports.clone(),
        );
        r.register(
            "policy_violations",
            "Flow runs the host policy refused, by rule",
            self.policy_violations.clone(),
        );
        r.register(
            "gc_removed",
            "Finished flow-run containers removed by garbage collection",
            self.gc_removed.clone(),
        );
        r.register(
            "gc_images_removed",
            "Images removed by image garbage collection (periodic or before a pull)",
            self.gc_images_removed.clone(),
        );
    }

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
        self.api_errors.get_or_create(&KindLabel { kind }).inc();
    }

    /// Counts a Docker error by class.
    pub fn docker_error(&self, error: &crate::docker::DockerError) {
        self.docker_errors
            .get_or_create(&KindLabel {
                kind: error.kind().to_owned(),
            })
            .inc();
    }

    /// Counts a run the host policy refused.
    pub fn policy_violation(&self, rule: &str) {
        self.policy_violations
            .get_or_create(&RuleLabel {
                rule: rule.to_owned(),
            })
            .inc();
    }

    /// Records a successful poll (what `/health` checks).
    pub fn polled(&self, latency: Duration) {
        self.poll_seconds.observe(latency.as_secs_f64());
        if let Ok(mut last) = self.last_poll.lock() {
            *last = Some(Instant::now());
        }
    }

    /// Time since the last successful poll, or since start before the first one.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names() {
        let m = Metrics::new();
        m.runs_claimed.inc();
        m.gc_removed.inc();
        m.docker_errors
            .get_or_create(&KindLabel {
                kind: "ImageNotFound".into(),
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains("docker_worker_flow_runs_claimed_total 1"),
            "{text}"
        );
        assert!(
            text.contains("docker_worker_docker_errors_total{kind=\"ImageNotFound\"} 1"),
            "{text}"
        );
        assert!(text.contains("docker_worker_gc_removed_total 1"), "{text}");
        m.policy_violation("bind_outside");
        assert!(
            m.encode()
                .contains("docker_worker_policy_violations_total{rule=\"bind_outside\"} 1"),
            "{}",
            m.encode()
        );
        assert!(
            text.contains("docker_worker_submission_duration_seconds_bucket"),
            "{text}"
        );
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
        let m = Metrics::new();
        std::thread::sleep(GAP);
        // No poll yet: the time since the start.
        let since_start = m.since_last_poll();
        assert!(since_start >= GAP, "{since_start:?}");
        assert!(since_start <= before_new.elapsed(), "{since_start:?}");

        let before_poll = Instant::now();
        m.polled(Duration::from_millis(3));
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
        m.polled(Duration::from_millis(5));
        assert!(m.since_last_poll() <= before_second.elapsed());
        // Both polls' latencies were observed.
        assert!(
            m.encode()
                .contains("docker_worker_poll_duration_seconds_count 2"),
            "{}",
            m.encode()
        );
    }
}
