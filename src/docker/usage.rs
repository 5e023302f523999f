//! Resource accounting: samples a container's stats while it runs and keeps its peak memory
//! and CPU time, so a run's cost is known after it exits, when the Engine no longer has its
//! cgroup to ask. Samples come every second for the first ten seconds, every five until a
//! minute, then every thirty, so hundreds of long runs cost the worker and the Engine little;
//! memory is the cgroup's own high-water mark where the Engine reports one (cgroup v1), which
//! no sample can miss.

use std::sync::Mutex;
use std::time::Duration;

use bollard::query_parameters::StatsOptionsBuilder;
use futures_util::StreamExt as _;

use super::connect::DockerRuntime;

/// What a container used, as far as the samples saw.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ResourceUsage {
    /// Highest memory use seen (the cgroup's own high-water mark where the Engine reports
    /// one, as on cgroup v1; else the highest sample).
    pub peak_memory_bytes: Option<u64>,
    /// CPU time (user + system) at the last sample, in seconds.
    pub cpu_seconds: Option<f64>,
    /// How many samples were read; 0 when the container exited before the first one.
    pub samples: u32,
}

impl ResourceUsage {
    /// Folds one sample in.
    fn record(&mut self, memory: Option<(Option<u64>, Option<u64>)>, cpu_ns: Option<u64>) {
        if let Some((usage, max_usage)) = memory {
            let seen = max_usage.into_iter().chain(usage).max();
            if let Some(seen) = seen.filter(|m| *m > 0) {
                self.peak_memory_bytes = Some(self.peak_memory_bytes.unwrap_or(0).max(seen));
            }
        }
        if let Some(ns) = cpu_ns.filter(|ns| *ns > 0) {
            #[allow(clippy::cast_precision_loss)]
            // nanoseconds of CPU fit f64's 52 bits for 52 days
            let seconds = ns as f64 / 1e9;
            self.cpu_seconds = Some(self.cpu_seconds.unwrap_or(0.0).max(seconds));
        }
        self.samples += 1;
    }
}

/// How long to wait before the next sample of a container that has run for `age`.
fn sample_interval(age: Duration) -> Duration {
    if age < Duration::from_secs(10) {
        Duration::from_secs(1)
    } else if age < Duration::from_secs(60) {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(30)
    }
}

impl DockerRuntime {
    /// Samples the container's stats until it stops (or the caller drops this future),
    /// folding each sample into `usage`. Errors just end the sampling: accounting never
    /// affects the run.
    pub async fn sample_usage(&self, container_id: &str, usage: &Mutex<ResourceUsage>) {
        let options = StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(true)
            .build();
        let mut delay = Duration::from_millis(200);
        let started = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(delay).await;
            delay = sample_interval(started.elapsed());
            let mut stream = self.docker.stats(container_id, Some(options.clone()));
            let Some(Ok(sample)) = stream.next().await else {
                return;
            };
            let memory = sample.memory_stats.as_ref().map(|m| (m.usage, m.max_usage));
            let cpu = sample
                .cpu_stats
                .as_ref()
                .and_then(|c| c.cpu_usage.as_ref())
                .and_then(|u| u.total_usage);
            // A stopped container's sample is all zeros: it has nothing more to tell.
            if memory.is_none_or(|(u, m)| u.unwrap_or(0) == 0 && m.unwrap_or(0) == 0)
                && cpu.unwrap_or(0) == 0
            {
                return;
            }
            if let Ok(mut usage) = usage.lock() {
                usage.record(memory, cpu);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_the_highest_of_marks_and_samples_and_cpu_the_latest_total() {
        let mut u = ResourceUsage::default();
        u.record(Some((Some(10), Some(50))), Some(1_000_000_000));
        u.record(Some((Some(70), None)), Some(2_500_000_000));
        u.record(Some((Some(5), Some(60))), None);
        assert_eq!(u.peak_memory_bytes, Some(70));
        assert_eq!(u.cpu_seconds, Some(2.5));
        assert_eq!(u.samples, 3);
    }

    #[test]
    fn sampling_slows_down_as_a_container_ages() {
        assert_eq!(
            sample_interval(Duration::from_secs(3)),
            Duration::from_secs(1)
        );
        assert_eq!(
            sample_interval(Duration::from_secs(30)),
            Duration::from_secs(5)
        );
        assert_eq!(
            sample_interval(Duration::from_secs(3600)),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn no_samples_means_unknown() {
        let u = ResourceUsage::default();
        assert_eq!(
            (u.peak_memory_bytes, u.cpu_seconds, u.samples),
            (None, None, 0)
        );
    }
}
