//! The daemon's image collections: every `--gc-interval` with `--gc-images`, and before a
//! pull when the Engine's data root has less free space than `--min-free-disk` (the
//! [`DiskGuard`] the Docker runtime calls). Both log each decision as the container
//! collection does and never stop the worker.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{ImageGcError, ImageGcOptions, ImageOutcome, ImageReport, collect};
use crate::docker::{DockerRuntime, PullGuard};
use crate::metrics::Metrics;
use crate::prefect::PrefectClient;

/// `n` bytes for people: `512 B`, `3.2 MiB`, `41.0 GiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Logs one collection: removals at info (and counted), failures at warn, the rest at debug;
/// notes on deployments whose image could not be told at info; the summary at info when
/// anything was removed or failed.
fn log_report(result: Result<ImageReport, ImageGcError>, metrics: &Metrics) {
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            tracing::warn!(error = %e, "image garbage collection failed; will try again");
            return;
        }
    };
    for note in &report.notes {
        tracing::info!("image garbage collection: {note}");
    }
    for decision in &report.decisions {
        match &decision.outcome {
            ImageOutcome::Removed => {
                metrics.gc_images_removed.inc();
                tracing::info!(image = %decision.name, "{decision}");
            }
            ImageOutcome::Kept(reason) if reason.is_error() => {
                tracing::warn!(image = %decision.name, "{decision}");
            }
            _ => tracing::debug!(image = %decision.name, "{decision}"),
        }
    }
    if report.removed() > 0 || report.errors() > 0 {
        tracing::info!(
            removed = report.removed(),
            kept = report.kept(),
            errors = report.errors(),
            "{}",
            report.summary()
        );
    } else {
        tracing::debug!(kept = report.kept(), "{}", report.summary());
    }
}

/// `--gc-images`: one image collection now and then every `interval` until `shutdown`.
pub async fn run_periodic(
    docker: DockerRuntime,
    api: Arc<PrefectClient>,
    options: ImageGcOptions,
    interval: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            result = collect(&docker, &api, &options) => log_report(result, &metrics),
            () = shutdown.cancelled() => return,
        }
        if !crate::backoff::sleep(interval, &shutdown).await {
            return;
        }
    }
}

/// `--min-free-disk`: before a pull, when the Engine's data root has less free space than
/// the minimum, one image collection (with the periodic collection's rules); if still short,
/// a warning, and the pull goes on (a failed pull would help nobody).
pub struct DiskGuard {
    /// A runtime without the guard (it never pulls), sharing the images in flight.
    docker: DockerRuntime,
    api: Arc<PrefectClient>,
    options: ImageGcOptions,
    /// Bytes that should stay free.
    min_free: u64,
    metrics: Arc<Metrics>,
    /// One collection at a time: concurrent pulls of different images wait for it and then
    /// find the space it freed.
    running: tokio::sync::Mutex<()>,
}

impl DiskGuard {
    /// A guard keeping `min_free` bytes free on `docker`'s data root.
    pub fn new(
        docker: DockerRuntime,
        api: Arc<PrefectClient>,
        options: ImageGcOptions,
        min_free: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            docker,
            api,
            options,
            min_free,
            metrics,
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether the data root is short now; `None` when its space cannot be known (the
    /// start-up log said why once).
    fn short(&self) -> Option<crate::docker::DiskSpace> {
        let space = self.docker.data_root_space().ok()?;
        (space.available < self.min_free).then_some(space)
    }
}

#[async_trait]
impl PullGuard for DiskGuard {
    async fn before_pull(&self, image: &str) {
        if self.short().is_none() {
            return;
        }
        let _one = self.running.lock().await;
        // Another pull's collection may have freed enough while this one waited.
        let Some(space) = self.short() else {
            return;
        };
        tracing::info!(
            image,
            data_root = %space.path.display(),
            available = space.available,
            min_free_disk = self.min_free,
            "the Docker Engine's data root has {} free, less than --min-free-disk {}; collecting images before pulling {image}",
            format_bytes(space.available),
            format_bytes(self.min_free),
        );
        log_report(
            collect(&self.docker, &self.api, &self.options).await,
            &self.metrics,
        );
        match self.docker.data_root_space() {
            Ok(after) if after.available < self.min_free => tracing::warn!(
                image,
                data_root = %after.path.display(),
                available = after.available,
                min_free_disk = self.min_free,
                "still only {} free on the Docker Engine's data root after collecting images (--min-free-disk {}); pulling {image} anyway",
                format_bytes(after.available),
                format_bytes(self.min_free),
            ),
            Ok(after) => tracing::info!(
                image,
                available = after.available,
                "{} free on the Docker Engine's data root after collecting images",
                format_bytes(after.available)
            ),
            Err(e) => tracing::warn!(error = %e, "after collecting images"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_for_people() {
        assert_eq!(super::format_bytes(0), "0 B");
        assert_eq!(super::format_bytes(1023), "1023 B");
        assert_eq!(super::format_bytes(1536), "1.5 KiB");
        assert_eq!(super::format_bytes(10 * 1024 * 1024 * 1024), "10.0 GiB");
        assert_eq!(super::format_bytes(u64::MAX), "16777216.0 TiB");
    }
}
