//! The worker's decisions, replayed through its own ports with in-memory fakes: claims,
//! cancellations at every step, exit codes from every source, adoption, outages and the
//! `--limit` slot on every path. No Docker, no server; each test takes milliseconds. The
//! real-peer suites under tests/ prove the wiring.

mod converge_tests;
mod fakes;
mod lifecycle_tests;
mod loops_tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use clap::Parser as _;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::registry::{Admission, RunGuard};
use super::{HostAdmission, Lifetime, PoolRef, Ports, Reporting, Worker};
use crate::config::WorkerSettings;
use crate::logs::{ApiLogs, LogLimits};
use crate::metrics::Metrics;
use crate::prefect::events::EventSink;
use crate::prefect::{FlowRun, LogEntry};
use fakes::{FakeApi, FakeRuntime};

/// Settings as `docker-worker start --pool pool --name me <extra>` would make them.
fn settings(extra: &[&str]) -> WorkerSettings {
    let mut argv = vec!["docker-worker", "start", "--pool", "pool", "--name", "me"];
    argv.extend_from_slice(extra);
    let crate::cli::Command::Start(args) = crate::cli::Cli::parse_from(argv).command else {
        panic!("parsed `start`");
    };
    let env = BTreeMap::from([(
        "PREFECT_API_URL".to_owned(),
        "http://127.0.0.1:9/api".to_owned(),
    )]);
    crate::config::Settings::from_start_args(&args, &env)
        .expect("test settings are valid")
        .worker
}

/// A worker wired to fakes, with its logs and events readable.
struct Harness {
    worker: Arc<Worker>,
    api: Arc<FakeApi>,
    docker: Arc<FakeRuntime>,
    metrics: crate::metrics::PoolMetrics,
    logs: mpsc::Receiver<LogEntry>,
    events: mpsc::Receiver<Value>,
    lifetime: Lifetime,
}

impl Harness {
    fn new() -> Self {
        Self::with(&[])
    }

    fn with(extra: &[&str]) -> Self {
        let api = Arc::new(FakeApi::default());
        let docker = Arc::new(FakeRuntime::default());
        let metrics = Arc::new(Metrics::new());
        let (logs_handle, logs) = ApiLogs::queue(LogLimits::default(), None);
        let (events_handle, events) = EventSink::queue();
        let lifetime = Lifetime::new();
        let settings = settings(extra);
        let host = HostAdmission::new(
            settings.admission.max_concurrent_submissions,
            &settings.admission.gpu_devices,
        );
        let worker = Worker::new(
            settings,
            Ports {
                api: Arc::clone(&api) as _,
                docker: Arc::clone(&docker) as _,
                host,
            },
            Reporting {
                logs: logs_handle,
                events: events_handle,
                metrics: Arc::clone(&metrics),
                events_config: None,
                channel_config: None,
            },
            TaskTracker::new(),
            lifetime.clone(),
        );
        Self {
            worker,
            api,
            docker,
            metrics: metrics.for_pool("pool"),
            logs,
            events,
            lifetime,
        }
    }

    /// Every flow-run log message so far.
    fn logged(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(entry) = self.logs.try_recv() {
            out.push(entry.message);
        }
        out
    }

    /// Every flow-run log entry so far (name, timestamp and all).
    fn entries(&mut self) -> Vec<LogEntry> {
        let mut out = Vec::new();
        while let Ok(entry) = self.logs.try_recv() {
            out.push(entry);
        }
        out
    }

    /// The names of every event emitted so far.
    fn emitted(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            out.push(event["event"].as_str().unwrap_or_default().to_owned());
        }
        out
    }

    fn pool() -> PoolRef {
        PoolRef {
            id: "pool-id".into(),
            name: "pool".into(),
        }
    }

    fn admit(&self, run: &FlowRun) -> RunGuard {
        match self.worker.registry.admit(&run.id) {
            Admission::Admitted(guard) => guard,
            other => panic!("not admitted: {other:?}"),
        }
    }

    /// Runs a polled run's whole lifecycle to its end.
    async fn submit(&self, run: FlowRun) {
        let guard = self.admit(&run);
        super::lifecycle::submit(
            &self.worker,
            run,
            guard,
            Self::pool(),
            Arc::new(crate::job::default_base_job_template()),
        )
        .await;
    }

    /// Starts a polled run's lifecycle in the worker's tracker.
    fn spawn_submit(&self, run: FlowRun) -> tokio::task::JoinHandle<()> {
        let guard = self.admit(&run);
        let worker = Arc::clone(&self.worker);
        self.worker.tasks.spawn(async move {
            super::lifecycle::submit(
                &worker,
                run,
                guard,
                Self::pool(),
                Arc::new(crate::job::default_base_job_template()),
            )
            .await;
        })
    }

    /// Waits (yielding to the worker's tasks) until `condition` holds; fails with `what`.
    async fn until(&self, what: &str, condition: impl Fn(&Self) -> bool) {
        for _ in 0..10_000 {
            if condition(self) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never happened: {what}");
    }
}
