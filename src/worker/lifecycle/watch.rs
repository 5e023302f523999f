//! Watching a run's container to its exit — one path for a container this process started
//! and one it adopted after a restart — while handling its output (printed, kept as a tail for
//! a crash report, or forwarded to the run's logs) and sampling what it costs; then the exit is
//! completed with the Engine's event facts and reported through the policy. Shutdown stops the
//! watch, never the container.
//!
//! Every output line is stamped by the run's [`RunClock`]: the Engine's own timestamp, made
//! strictly increasing, so the UI (which sorts by timestamp) lists the lines in the order the
//! Engine logged them. A forwarding run adopted after a restart takes its output up just after
//! the newest line the API already has for it (see [`Watched::adopted`]).

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;

use super::super::events::{self, Emitted};
use super::super::observe::{OutputTail, TailLine};
use super::super::policy::{self, Outcome};
use super::super::ports::WatchOptions;
use super::super::registry::{RunGuard, StopReason};
use super::super::{PoolRef, Worker};
use super::report;
use crate::docker::usage::ResourceUsage;
use crate::docker::{
    CreatedContainer, DockerError, ExitStatus, FoundContainer, OutputLine, OutputSink, OutputStream,
};
use crate::logs::{ApiLogs, Level, RunClock};
use crate::prefect::{FlowRun, LastLog};

/// The logger name of a container's stdout lines in the run's logs (forwarded and crash tails).
pub(crate) const STDOUT_LOGGER: &str = "container.stdout";
/// The logger name of its stderr lines.
pub(crate) const STDERR_LOGGER: &str = "container.stderr";

/// The logger name a line of `stream` is sent under: the stream is marked by it, the text is
/// sent as printed.
pub(crate) fn logger_of(stream: OutputStream) -> &'static str {
    match stream {
        OutputStream::Stdout => STDOUT_LOGGER,
        OutputStream::Stderr => STDERR_LOGGER,
    }
}

/// A run whose container is watched, with only what its exit report needs.
#[derive(Debug)]
pub(crate) struct Watched {
    pub flow_run_id: String,
    pub flow_run_name: String,
    pub container: CreatedContainer,
    /// The image as it was asked for.
    pub image: String,
    /// How long its pull took, if one was made.
    pub pull: Option<Duration>,
    pub options: WatchOptions,
    /// Print its output on the worker's stdout (`stream_output`).
    pub print_output: bool,
    /// Forward all of its output to the run's logs (`stream_output_to_api`, `--logs-to-api`).
    pub forward_output: bool,
    /// Stamps its output lines; for an adopted forwarding run, knows which the API has.
    pub clock: RunClock,
    /// The longest it may run (from its creation) before the worker stops it.
    pub max_runtime: Option<Duration>,
    pub pool: PoolRef,
    pub events: RunEvents,
    /// The GPUs it holds (`--gpu-devices`), given back when the watch is done with it.
    pub gpus: Option<crate::worker::admission::GpuLease>,
}

/// What a run's exit events relate to and follow. An adopted run's follow nothing: the
/// events they would follow were emitted by an earlier process, often longer ago than
/// `follows` spans.
#[derive(Debug)]
pub(crate) struct RunEvents {
    pub related: Vec<Value>,
    pub container_related: Vec<Value>,
    pub submitted: Option<Emitted>,
    pub last_container_event: Option<Emitted>,
}

impl Watched {
    /// A container found after a restart: its output from now on only (nothing already
    /// printed is printed twice) — or, when it is forwarded, from just after the newest line
    /// the API has (see [`resume_forwarding`]); its events related to the run's flow and
    /// deployment if they can still be read.
    pub async fn adopted(
        worker: &Worker,
        flow_run: &FlowRun,
        found: &FoundContainer,
        pool: PoolRef,
    ) -> Self {
        let flow = worker.flow(&flow_run.flow_id).await.ok();
        let deployment = match flow_run.deployment_id.as_deref() {
            Some(id) => worker.deployment(id).await.ok().flatten(),
            None => None,
        };
        let related = events::run_related(
            &flow_run.raw,
            flow.as_ref().map(|f| &f.raw),
            deployment.as_ref().map(|d| &d.raw),
            &pool,
        );
        let mut container_related = related.clone();
        container_related.push(events::worker_related(worker.name()));
        let forward_output = worker.settings.reporting.logs_to_api
            || found
                .labels
                .get(crate::job::labels::LOGS_TO_API)
                .is_some_and(|v| v == "true");
        let (logs_since, clock) = if forward_output {
            resume_forwarding(worker, &flow_run.id).await
        } else {
            (Some(chrono::Utc::now().timestamp()), RunClock::new())
        };
        Self {
            flow_run_id: flow_run.id.clone(),
            flow_run_name: flow_run.name.clone(),
            container: found.container.clone(),
            image: found.image.clone(),
            pull: None,
            options: WatchOptions {
                auto_remove: found.auto_remove,
                follow_output: true,
                logs_since,
            },
            print_output: true,
            forward_output,
            clock,
            max_runtime: found
                .labels
                .get(crate::job::labels::MAX_RUNTIME)
                .and_then(|s| s.parse::<u64>().ok())
                .map(Duration::from_secs),
            pool,
            events: RunEvents {
                related,
                container_related,
                submitted: None,
                last_container_event: None,
            },
            gpus: (worker.registry.gpus.is_enabled() && !found.device_ids.is_empty())
                .then(|| worker.registry.gpus.hold(&found.device_ids)),
        }
    }
}

/// Where forwarding an adopted container's output takes up (the Engine's `since=` and the
/// run's clock): the API is asked for the newest line it has of the run's output; the
/// Engine's log is read again from a second before it and the clock, replaying the stamps,
/// skips exactly the lines the API has. With none there, from the container's start. When
/// that cannot be learned, from now, as an adoption without forwarding: lines printed while no
/// worker watched are then missing, and a warning says so.
async fn resume_forwarding(worker: &Worker, run_id: &str) -> (Option<i64>, RunClock) {
    let names = [STDOUT_LOGGER, STDERR_LOGGER];
    match worker.api.last_log_named(run_id, &names).await {
        Ok(LastLog::At(newest)) => {
            tracing::info!(forwarded_until = %newest, "forwarding the adopted container's output from just after the last line the API has");
            (
                Some(RunClock::resume_since(newest)),
                RunClock::resuming(newest),
            )
        }
        Ok(LastLog::None) => (None, RunClock::new()),
        other => {
            let why = match other {
                Err(e) => e.to_string(),
                _ => "not among the run's newest logs".to_owned(),
            };
            worker.out.logs.warn(
                run_id,
                format!("Could not learn how far the container's output was forwarded ({why}); forwarding it from now on"),
            );
            let now = chrono::Utc::now();
            (Some(now.timestamp()), RunClock::resuming(now))
        }
    }
}

/// What was seen of a run while it was watched.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    /// The last output lines.
    pub tail: Vec<TailLine>,
    /// Stats samples.
    pub usage: ResourceUsage,
    /// Watch time.
    pub wall: Duration,
}

impl Observed {
    /// Nothing seen (a container that had exited before it was found).
    pub fn none() -> Self {
        Self::default()
    }
}

/// Watches the container to its exit and reports it; on shutdown, stops watching (the
/// container keeps running for the next worker to adopt). A run with a `max_runtime` has its
/// container stopped when it is over, and the watch goes on to the exit.
pub(crate) async fn follow(worker: &Arc<Worker>, watched: Watched, guard: RunGuard) {
    // Forwarded output is in the run's logs already: no tail is kept for a crash report.
    let tail = OutputTail::new(if watched.forward_output {
        0
    } else {
        worker.settings.reporting.crash_log_lines
    });
    let usage = Mutex::new(ResourceUsage::default());
    let started = Instant::now();
    let output = RunOutput {
        run_id: &watched.flow_run_id,
        logs: &worker.out.logs,
        print: watched.print_output,
        forward: watched.forward_output,
        tail: &tail,
        clock: Mutex::new(watched.clock.clone()),
    };
    let waiting = worker
        .docker
        .watch(&watched.container, watched.options, &output);
    let watching = with_sampling(worker, &watched.container.id, &usage, waiting);
    tokio::pin!(watching);
    let limit = time_left(&watched);
    let mut armed = limit.is_some();
    let mut check_gone = tokio::time::interval(GONE_CHECK);
    check_gone.reset();
    worker.out.metrics.runs_running.inc();
    let waited = loop {
        tokio::select! {
            r = &mut watching => break Some(r),
            () = worker.lifetime.stop.cancelled() => break None,
            () = tokio::time::sleep(limit.unwrap_or_default()), if armed => {
                armed = false;
                worker.enforce_max_runtime(&watched);
            }
            _ = check_gone.tick(), if watched.options.auto_remove => {
                if let Some(gone) = exited_and_removed(worker, &watched).await {
                    break Some(Err(gone));
                }
            }
        }
    };
    worker.out.metrics.runs_running.dec();
    let Some(waited) = waited else {
        tracing::info!(
            container = watched.container.display_name(),
            "worker stopping; the container keeps running"
        );
        return;
    };
    let observed = Observed {
        tail: tail.take(),
        usage: usage.lock().map(|u| *u).unwrap_or_default(),
        wall: started.elapsed(),
    };
    finish(worker, &watched, guard, waited, observed).await;
}

/// Forwards what an adopted forwarding container printed after the API's newest forwarded line
/// and before it exited while no worker watched, so a restart loses none of its output even
/// when the container ended meanwhile. The watch of an exited container returns at once; its
/// exit is reported by the caller, from the inspect.
pub(crate) async fn forward_remaining(worker: &Worker, watched: &Watched) {
    if !watched.forward_output {
        return;
    }
    let no_tail = OutputTail::new(0);
    let output = RunOutput {
        run_id: &watched.flow_run_id,
        logs: &worker.out.logs,
        print: false,
        forward: true,
        tail: &no_tail,
        clock: Mutex::new(watched.clock.clone()),
    };
    let forwarding = worker
        .docker
        .watch(&watched.container, watched.options, &output);
    tokio::select! {
        _ = forwarding => {}
        () = worker.lifetime.stop.cancelled() => {}
    }
}

/// How often an auto-removed container's wait is checked against the Engine's events.
const GONE_CHECK: Duration = Duration::from_secs(5);

/// An auto-removed container whose `die` the Engine's event stream saw and which no longer
/// exists is over, whatever its wait says: an Engine can leave a wait for removal hanging when
/// the removal raced it. The error ends the watch; the exit code comes from the event.
async fn exited_and_removed(worker: &Worker, watched: &Watched) -> Option<DockerError> {
    let id = &watched.container.id;
    worker.engine_facts.exit_code(id)?;
    match worker.docker.container_exists(id).await {
        Ok(false) => Some(DockerError::WatchFailed {
            container: watched.container.display_name().to_owned(),
            failure: crate::docker::EngineFailure {
                status: Some(404),
                message: "the container exited and was removed; its wait did not end".into(),
            },
        }),
        _ => None,
    }
}

/// How long the container may still run: its `max_runtime` from its creation (a container
/// adopted after a restart has used some of it already).
fn time_left(watched: &Watched) -> Option<Duration> {
    let limit = watched.max_runtime?;
    let created = watched.container.created_at;
    let ran = u64::try_from(chrono::Utc::now().timestamp().saturating_sub(created)).unwrap_or(0);
    Some(limit.saturating_sub(Duration::from_secs(ran).min(limit)))
}

impl Worker {
    /// Stops a container that ran past its `max_runtime` (SIGTERM, SIGKILL after the cancel
    /// grace), unless it is already being stopped; the watch reports the exit.
    fn enforce_max_runtime(self: &Arc<Self>, watched: &Watched) {
        let run_id = &watched.flow_run_id;
        let Some(container) = self.registry.stop(run_id, StopReason::MaxRuntime) else {
            return;
        };
        let grace = self.settings.cancellation.grace;
        let limit = watched
            .max_runtime
            .map(humantime::format_duration)
            .map(|d| d.to_string())
            .unwrap_or_default();
        self.out.logs.info(
            run_id,
            format!(
                "Flow run '{run_id}' exceeded its max_runtime of {limit}; stopping its container (grace period {} s)",
                grace.as_secs()
            ),
        );
        let worker = Arc::clone(self);
        let run_id = run_id.clone();
        self.tasks.spawn(async move {
            if let Err(e) = worker.docker.stop_container(&container, grace).await {
                worker.out.metrics.docker_error(&e);
                worker.out.logs.error(
                    &run_id,
                    format!("Could not stop the container of flow run '{run_id}': {e}"),
                );
            }
        });
    }
}

/// Reports a watched container's end: the wait's answer completed with the Engine's facts,
/// turned into a state by the policy, then the crash tail and the exit events.
pub(crate) async fn finish(
    worker: &Worker,
    watched: &Watched,
    guard: RunGuard,
    waited: Result<ExitStatus, DockerError>,
    observed: Observed,
) {
    let stopped = guard.reporting();
    let facts = worker.engine_facts.take(&watched.container.id);
    let name = watched.container.display_name();
    let outcome = match policy::exit_with_facts(waited, facts) {
        Ok(status) if removed_outside(worker, watched, stopped.is_some(), status.code).await => {
            Outcome::Vanished {
                container: name.to_owned(),
                host: worker.docker.base_url().to_owned(),
                cancelling: false,
            }
        }
        Ok(status) => {
            report::account(worker, watched, &status, &observed);
            if status.code == 0 {
                tracing::info!(container = name, "container exited with status code 0");
            }
            Outcome::Exited {
                container: name.to_owned(),
                status,
                stopped,
                max_runtime: watched.max_runtime,
            }
        }
        Err(error) => {
            worker.out.metrics.docker_error(&error);
            Outcome::Lost {
                run_name: watched.flow_run_name.clone(),
                error,
            }
        }
    };
    let verdict = policy::verdict(&watched.flow_run_id, &outcome);
    report::carry_out(worker, &watched.flow_run_id, &verdict).await;
    if let Outcome::Exited { status, .. } = &outcome {
        if verdict.send_tail && !watched.forward_output {
            report::send_crash_tail(worker, watched, status.code, &observed.tail);
        }
        report::emit_exit_events(worker, watched, status);
    }
    drop(guard);
}

/// Whether the container that just exited is gone although nothing here removes it: someone
/// removed it (`docker rm -f`), and its exit code says only that it was killed. A container
/// the Engine removes by itself (`auto_remove`) or one the worker stopped is not asked about.
/// A forced removal kills first and removes a moment later, so a container killed by SIGKILL
/// (137) is given up to [`REMOVAL_WINDOW`] to disappear.
async fn removed_outside(worker: &Worker, watched: &Watched, stopped: bool, code: i64) -> bool {
    if watched.options.auto_remove || stopped {
        return false;
    }
    let checks = if code == 137 { REMOVAL_CHECKS } else { 1 };
    for check in 0..checks {
        match worker.docker.container_exists(&watched.container.id).await {
            Ok(false) => return true,
            Ok(true) if check + 1 < checks => {
                tokio::time::sleep(REMOVAL_WINDOW / REMOVAL_CHECKS).await;
            }
            _ => return false,
        }
    }
    false
}

/// How long a container killed by SIGKILL is watched for a removal that follows the kill.
const REMOVAL_WINDOW: Duration = Duration::from_secs(3);
/// How many times it is looked for in that window.
const REMOVAL_CHECKS: u32 = 6;

/// Runs `watching` to its end while sampling the container's resource use alongside (when
/// resource accounting is on); the sampling never delays the result.
async fn with_sampling<T>(
    worker: &Worker,
    container_id: &str,
    usage: &Mutex<ResourceUsage>,
    watching: impl std::future::Future<Output = T>,
) -> T {
    let sampling = async {
        if worker.settings.reporting.resource_accounting {
            worker.docker.sample_usage(container_id, usage).await;
        }
        std::future::pending::<std::convert::Infallible>().await
    };
    tokio::select! {
        r = watching => r,
        never = sampling => match never {},
    }
}

/// Where a watched run's output lines go, each stamped by the run's clock: the worker's stdout
/// (`stream_output`), then the run's logs (forwarding, waiting while the forwarded output in
/// memory is at its budget) or the crash tail. A line the API already has (a resumed
/// forwarding) goes nowhere.
struct RunOutput<'a> {
    run_id: &'a str,
    logs: &'a ApiLogs,
    print: bool,
    forward: bool,
    tail: &'a OutputTail,
    clock: Mutex<RunClock>,
}

#[async_trait]
impl OutputSink for RunOutput<'_> {
    async fn line(&self, line: OutputLine<'_>) {
        let stamp = match self.clock.lock() {
            Ok(mut clock) => clock.stamp(line.timestamp),
            Err(_) => Some(line.timestamp.unwrap_or_else(chrono::Utc::now)),
        };
        let Some(at) = stamp else { return };
        if self.print {
            print_output(line.text);
        }
        if self.forward {
            let logger = logger_of(line.stream);
            self.logs
                .forward(self.run_id, logger, Level::Info, line.text, at)
                .await;
        } else {
            self.tail.push(at, line.stream, line.text);
        }
    }
}

/// Prints container output on the worker's stdout; errors (a closed pipe) are ignored.
fn print_output(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
}
