//! Watching a running container to its end: its output streamed as it comes, the exit code
//! from the Engine's wait (or from the `die` event of a container already removed), whether
//! the OOM killer ended it, and riding out an Engine that goes away meanwhile (daemon restart,
//! live-restore). Knows bollard's wait, logs and inspect calls, nothing of Prefect.

use std::time::Duration;

use bollard::query_parameters::{LogsOptionsBuilder, WaitContainerOptionsBuilder};
use futures_util::StreamExt as _;

use super::connect::DockerRuntime;
use super::create::CreatedContainer;
use super::error::{DockerError, EngineFailure};
use super::find::FoundContainer;
use crate::backoff::Backoff;

/// How long a watch waits for a lost Engine to come back before giving the run up.
const ENGINE_RECOVERY_LIMIT: Duration = Duration::from_secs(15 * 60);
/// The first wait before asking a lost Engine again; doubled after each unanswered ask…
const RECOVERY_BACKOFF_MIN: Duration = Duration::from_millis(500);
/// … up to this, so an Engine back after a long restart is noticed within 2 s (asking a local
/// Engine costs next to nothing).
const RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How a watched container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The process's exit code (-1 when Docker did not know it).
    pub code: i64,
    /// The kernel killed it for exceeding its memory limit (known when the container is kept).
    pub oom_killed: bool,
    /// The Engine went away (restart, crash) while the container ran.
    pub engine_lost: bool,
}

/// A container's output sink: called once per chunk of lines, right-trimmed.
type Output<'a> = &'a (dyn Fn(&str) + Send + Sync);

impl DockerRuntime {
    /// Streams the container's output to `output` (one call per chunk of lines, right-trimmed)
    /// if `stream_output`, and waits for it to exit. The exit code comes from the wait itself,
    /// not from an earlier inspect, so it is right even without streaming. For `auto_remove`
    /// containers it waits for removal; if the container was already gone, the code is
    /// recovered from the Engine's `die` event.
    ///
    /// # Errors
    /// [`DockerError::WatchFailed`] when the outcome cannot be learned.
    pub async fn watch_container(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        stream_output: bool,
        output: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<ExitStatus, DockerError> {
        let (code, engine_lost) = self
            .watch_inner(container, auto_remove, stream_output, None, output)
            .await?;
        Ok(self
            .exit_status(container, auto_remove, code, engine_lost)
            .await)
    }

    /// Watches a container this process did not start (found after a restart): output from
    /// now on only, so nothing already printed is printed twice, then the exit as usual.
    ///
    /// # Errors
    /// [`DockerError::WatchFailed`] when the outcome cannot be learned.
    pub async fn reattach_container(
        &self,
        found: &FoundContainer,
        stream_output: bool,
        output: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<ExitStatus, DockerError> {
        let since = chrono::Utc::now().timestamp();
        let (code, engine_lost) = self
            .watch_inner(
                &found.container,
                found.auto_remove,
                stream_output,
                Some(since),
                output,
            )
            .await?;
        Ok(self
            .exit_status(&found.container, found.auto_remove, code, engine_lost)
            .await)
    }

    /// [`DockerRuntime::watch_container`] with the output taken from `logs_since` (unix
    /// seconds) on when given: one call for a container this process started and for one it
    /// adopted after a restart.
    ///
    /// # Errors
    /// [`DockerError::WatchFailed`] when the outcome cannot be learned.
    pub async fn watch_container_since(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        stream_output: bool,
        logs_since: Option<i64>,
        output: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<ExitStatus, DockerError> {
        let (code, engine_lost) = self
            .watch_inner(container, auto_remove, stream_output, logs_since, output)
            .await?;
        Ok(self
            .exit_status(container, auto_remove, code, engine_lost)
            .await)
    }

    /// The exit code with what is known of an OOM kill: from an inspect of a kept container,
    /// else from the Engine's `oom` event.
    async fn exit_status(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        code: i64,
        engine_lost: bool,
    ) -> ExitStatus {
        let inspected_oom = if auto_remove || code == 0 {
            None
        } else {
            self.docker
                .inspect_container(&container.id, None)
                .await
                .ok()
                .and_then(|i| i.state)
                .and_then(|s| s.oom_killed)
        };
        // A removed container cannot be inspected: its `oom` event says it instead.
        let oom_killed = match inspected_oom {
            Some(oom) => oom,
            None if code != 0 => self.saw_event(container, &["oom"]).await,
            None => false,
        };
        ExitStatus {
            code,
            oom_killed,
            engine_lost,
        }
    }

    /// Watches to the exit, riding out an Engine that goes away (daemon restart): once it
    /// answers again the container is inspected — still running (live-restore) means watch
    /// again, exited means that is the exit code. Returns the code and whether the Engine was
    /// lost in between.
    async fn watch_inner(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        stream_output: bool,
        logs_since: Option<i64>,
        output: Output<'_>,
    ) -> Result<(i64, bool), DockerError> {
        let mut since = logs_since;
        let mut engine_lost = false;
        loop {
            match self
                .watch_once(container, auto_remove, stream_output, since, output)
                .await
            {
                Err(DockerError::WatchFailed { failure, .. }) if failure.status.is_none() => {
                    engine_lost = true;
                    tracing::warn!(container = container.display_name(), error = %failure, "lost the Docker Engine while watching; waiting for it to come back");
                    match self.recover(container).await {
                        Ok(Some(code)) => return Ok((code, true)),
                        Ok(None) => since = Some(chrono::Utc::now().timestamp()),
                        Err(failure) => {
                            return self
                                .exit_code_after_removal(container, auto_remove, failure)
                                .await
                                .map(|code| (code, true));
                        }
                    }
                }
                other => return other.map(|code| (code, engine_lost)),
            }
        }
    }

    /// Waits (with backoff, up to [`ENGINE_RECOVERY_LIMIT`]) for the Engine to answer, then
    /// inspects the container: `Some(code)` if it has exited, `None` if it is still running.
    ///
    /// The waits take no shutdown token: this runs inside a container watch, and the watch's
    /// owner (the run task) selects on shutdown and drops the watch future, which ends the
    /// sleep with it. Stopping the worker stops watching, never the container.
    async fn recover(&self, container: &CreatedContainer) -> Result<Option<i64>, EngineFailure> {
        let started = std::time::Instant::now();
        let mut backoff = Backoff::new(RECOVERY_BACKOFF_MIN, RECOVERY_BACKOFF_MAX);
        loop {
            tokio::time::sleep(backoff.next_delay()).await;
            match self.docker.inspect_container(&container.id, None).await {
                Ok(info) => {
                    let state = info.state.unwrap_or_default();
                    tracing::info!(
                        container = container.display_name(),
                        running = state.running.unwrap_or(false),
                        "Docker Engine answers again"
                    );
                    return Ok(if state.running.unwrap_or(false) {
                        None
                    } else {
                        Some(state.exit_code.unwrap_or(-1))
                    });
                }
                Err(e) => {
                    let failure = EngineFailure::from(e);
                    if failure.status.is_some() || started.elapsed() > ENGINE_RECOVERY_LIMIT {
                        return Err(failure);
                    }
                }
            }
        }
    }

    /// One watch: the wait and (if asked) the output stream side by side, until the exit.
    async fn watch_once(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        stream_output: bool,
        logs_since: Option<i64>,
        output: Output<'_>,
    ) -> Result<i64, DockerError> {
        let logs = async {
            if stream_output {
                self.stream_logs(container, auto_remove, logs_since, output)
                    .await;
            }
        };
        let (waited, ()) = tokio::join!(self.wait_for_exit(container, auto_remove), logs);
        match waited {
            Ok(code) if auto_remove && self.is_podman => {
                self.force_remove(container, "exited container (auto_remove)")
                    .await;
                Ok(code)
            }
            Ok(code) => Ok(code),
            Err(failure) => {
                self.exit_code_after_removal(container, auto_remove, failure)
                    .await
            }
        }
    }

    /// The Engine's wait: for removal when the Engine removes the container itself
    /// (`auto_remove`, not Podman), else for it to stop running. A non-zero exit is a code,
    /// not an error.
    async fn wait_for_exit(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
    ) -> Result<i64, EngineFailure> {
        let removed_by_engine = auto_remove && !self.is_podman;
        let condition = if removed_by_engine {
            "removed"
        } else {
            "not-running"
        };
        let options = WaitContainerOptionsBuilder::default()
            .condition(condition)
            .build();
        let mut stream = self.docker.wait_container(&container.id, Some(options));
        match stream.next().await {
            Some(Ok(resp)) => Ok(resp.status_code),
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(EngineFailure::from(e)),
            None => Err(EngineFailure {
                status: None,
                message: "the wait stream ended without a result".into(),
            }),
        }
    }

    /// The exit code of an `auto_remove` container that was removed before the Engine could
    /// be asked (404): it is still in the event log. Any other failure, or no `die` event, is
    /// [`DockerError::WatchFailed`].
    async fn exit_code_after_removal(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        failure: EngineFailure,
    ) -> Result<i64, DockerError> {
        let code = if auto_remove && failure.is_not_found() {
            self.exit_code_from_events(container).await
        } else {
            None
        };
        code.ok_or_else(|| DockerError::WatchFailed {
            container: container.display_name().to_owned(),
            failure,
        })
    }

    /// Follows the container's output (from `since`, else from its start) into `output` until
    /// the stream ends; a failure is logged, never fatal to the watch.
    async fn stream_logs(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        since: Option<i64>,
        output: Output<'_>,
    ) {
        let mut options = LogsOptionsBuilder::default()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .tail("all")
            .build();
        if let Some(since) = since {
            options.since = i32::try_from(since).unwrap_or(i32::MAX);
        }
        let mut stream = self.docker.logs(&container.id, Some(options));
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => {
                    let bytes = chunk.into_bytes();
                    let text = String::from_utf8_lossy(&bytes);
                    output(text.trim_end());
                }
                Err(e) => {
                    log_stream_failure(container, auto_remove, &EngineFailure::from(e));
                    return;
                }
            }
        }
    }
}

/// The Python worker's words for an output stream that broke off.
fn log_stream_failure(container: &CreatedContainer, auto_remove: bool, failure: &EngineFailure) {
    let name = container.display_name();
    if failure.message.contains("marked for removal") {
        tracing::warn!(
            container = name,
            "Docker container was marked for removal before logs could be retrieved. Output will not be streamed."
        );
    } else if auto_remove && failure.is_not_found() {
        tracing::warn!(
            container = name,
            "Docker container was removed before logs could be retrieved. Output will not be streamed."
        );
    } else {
        tracing::error!(container = name, error = %failure, "An unexpected Docker API error occurred while streaming output from the container");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_recovery_asks_again_after_half_a_second_doubling_to_two() {
        let mut backoff = Backoff::new(RECOVERY_BACKOFF_MIN, RECOVERY_BACKOFF_MAX);
        let delays: Vec<u128> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![500, 1000, 2000, 2000, 2000]);
    }
}
