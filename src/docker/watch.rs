//! Watching a running container to its end: its output streamed as it comes, the exit code
//! from the Engine's wait (or from the `die` event of a container already removed), whether
//! the OOM killer ended it, and riding out an Engine that goes away meanwhile (daemon restart,
//! live-restore). Knows bollard's wait, logs and inspect calls, nothing of Prefect.
//!
//! Output is read with the Engine's own timestamps (`timestamps=true`) and handed on line by
//! line, each with its stream and the time the Engine read it, so whoever keeps the lines can
//! order them as the Engine did; the timestamp prefix is parsed and stripped here.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::query_parameters::{LogsOptionsBuilder, WaitContainerOptionsBuilder};
use chrono::{DateTime, Utc};
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

/// Which of a container's streams a line came from (a TTY container's one stream is stdout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of a container's output, without its line ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLine<'a> {
    /// The stream it was written to.
    pub stream: OutputStream,
    /// When the Engine read it, at the Engine's precision (nanoseconds); `None` when the
    /// Engine sent no timestamp it could be read from (the line is then passed on whole).
    pub timestamp: Option<DateTime<Utc>>,
    /// The text, right-trimmed, invalid UTF-8 replaced.
    pub text: &'a str,
}

/// Where a watch sends a container's output: one call per line, in the Engine's order, each
/// awaited. A sink that cannot keep up (its own queue is full) makes the watch read the
/// Engine's log more slowly rather than buffer it: the Engine keeps the log on disk.
#[async_trait]
pub trait OutputSink: Send + Sync {
    /// Takes one line.
    async fn line(&self, line: OutputLine<'_>);
}

/// A plain function is a sink that never waits (printing, collecting in tests).
#[async_trait]
impl<F> OutputSink for F
where
    F: Fn(OutputLine<'_>) + Send + Sync,
{
    async fn line(&self, line: OutputLine<'_>) {
        self(line);
    }
}

/// A container's output sink.
type Output<'a> = &'a dyn OutputSink;

/// The longest a line is held waiting for its end: a container printing one endless line cannot
/// make the worker hold it; what is longer is handed on in pieces of this size.
const PENDING_LINE_LIMIT: usize = 1 << 20;

impl DockerRuntime {
    /// Streams the container's output to `output` (one call per line) if `stream_output`, and waits for it to exit. The exit code comes from the wait itself,
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
        output: &dyn OutputSink,
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
        output: &dyn OutputSink,
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
        output: &dyn OutputSink,
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
    /// lost in between. A second watch takes the output up just after the last line the first
    /// one handed on (see [`LogCursor`]), so no line is lost or repeated.
    async fn watch_inner(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        stream_output: bool,
        logs_since: Option<i64>,
        output: Output<'_>,
    ) -> Result<(i64, bool), DockerError> {
        let cursor = Mutex::new(LogCursor::new(logs_since));
        let mut engine_lost = false;
        loop {
            match self
                .watch_once(container, auto_remove, stream_output, &cursor, output)
                .await
            {
                Err(DockerError::WatchFailed { failure, .. }) if failure.status.is_none() => {
                    engine_lost = true;
                    tracing::warn!(container = container.display_name(), error = %failure, "lost the Docker Engine while watching; waiting for it to come back");
                    match self.recover(container).await {
                        Ok(Some(code)) => return Ok((code, true)),
                        Ok(None) => {}
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
        cursor: &Mutex<LogCursor>,
        output: Output<'_>,
    ) -> Result<i64, DockerError> {
        let logs = async {
            if stream_output {
                self.stream_logs(container, auto_remove, cursor, output)
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

    /// Follows the container's output from where `cursor` says into `output`, line by line,
    /// until the stream ends; a failure is logged, never fatal to the watch. When the stream
    /// ended with the container, the log is read once more from the last line handed on: a
    /// follow that starts as the container stops can end before the last lines it logged
    /// (seen with Docker 20.10), and those are handed on then.
    async fn stream_logs(
        &self,
        container: &CreatedContainer,
        auto_remove: bool,
        cursor: &Mutex<LogCursor>,
        output: Output<'_>,
    ) {
        if let Err(failure) = self.read_logs(container, cursor, output, true).await {
            log_stream_failure(container, auto_remove, &failure);
            return;
        }
        match self.read_logs(container, cursor, output, false).await {
            Ok(0) => {}
            Ok(missed) => {
                tracing::debug!(
                    container = container.display_name(),
                    missed,
                    "the log read again after the container's end had lines the follow missed"
                );
            }
            Err(failure) => {
                tracing::debug!(container = container.display_name(), error = %failure, "could not read the container's log again after its end");
            }
        }
    }

    /// One read of the container's log from where `cursor` says, following it to its end if
    /// `follow`, each new line handed on and recorded in `cursor`; how many were new.
    async fn read_logs(
        &self,
        container: &CreatedContainer,
        cursor: &Mutex<LogCursor>,
        output: Output<'_>,
        follow: bool,
    ) -> Result<usize, EngineFailure> {
        let (since, mut skip) = match cursor.lock() {
            Ok(c) => c.resume(),
            Err(_) => (None, Skip::default()),
        };
        let mut options = LogsOptionsBuilder::default()
            .follow(follow)
            .stdout(true)
            .stderr(true)
            .timestamps(true)
            .tail("all")
            .build();
        if let Some(since) = since {
            options.since = i32::try_from(since).unwrap_or(i32::MAX);
        }
        let mut lines = LineSplitter::default();
        let mut stream = self.docker.logs(&container.id, Some(options));
        let mut new = 0;
        let mut hand_on = async |line: OutputLine<'_>| {
            if skip.already_seen(line.stream, line.timestamp) {
                return;
            }
            if let Ok(mut c) = cursor.lock() {
                c.saw(line.stream, line.timestamp);
            }
            new += 1;
            output.line(line).await;
        };
        let mut failed = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => {
                    for (stream, timestamp, text) in lines.feed(chunk) {
                        hand_on(OutputLine {
                            stream,
                            timestamp,
                            text: &text,
                        })
                        .await;
                    }
                }
                Err(e) => {
                    failed = Some(EngineFailure::from(e));
                    break;
                }
            }
        }
        for (stream, timestamp, text) in lines.finish() {
            hand_on(OutputLine {
                stream,
                timestamp,
                text: &text,
            })
            .await;
        }
        failed.map_or(Ok(new), Err)
    }
}

/// Where a watch's output stands, so a later read (the watch started again after the Engine
/// came back, or the read after the container's end) hands on only what is new. Each stream's
/// lines are in timestamp order (one reader timestamps them as it reads), the two streams
/// between them not quite; so each stream keeps its own place: a new read starts a second
/// before the earliest of them (`since=` takes whole seconds) and skips, per stream, the lines
/// before its last one and as many lines at that very timestamp as were handed on (lines read
/// together share one timestamp).
#[derive(Debug)]
struct LogCursor {
    /// The first read's `since` (unix seconds), never gone back past.
    since: Option<i64>,
    /// Per stream (stdout, stderr): the timestamp of the last line handed on, and how many
    /// lines had exactly it.
    last: [Option<(DateTime<Utc>, usize)>; 2],
}

/// The index of a stream in per-stream arrays.
fn slot(stream: OutputStream) -> usize {
    match stream {
        OutputStream::Stdout => 0,
        OutputStream::Stderr => 1,
    }
}

impl LogCursor {
    fn new(since: Option<i64>) -> Self {
        Self {
            since,
            last: [None, None],
        }
    }

    /// The `since=` of the next read and what it must skip.
    fn resume(&self) -> (Option<i64>, Skip) {
        let earliest = self
            .last
            .iter()
            .flatten()
            .map(|(at, _)| at.timestamp())
            .min();
        let since = match (earliest, self.since) {
            (Some(earliest), Some(first)) => Some((earliest - 1).max(first)),
            (Some(earliest), None) => Some(earliest - 1),
            (None, first) => first,
        };
        (since, Skip { at: self.last })
    }

    /// Records a line handed on.
    fn saw(&mut self, stream: OutputStream, timestamp: Option<DateTime<Utc>>) {
        let Some(at) = timestamp else { return };
        let last = &mut self.last[slot(stream)];
        *last = match *last {
            Some((previous, count)) if previous == at => Some((at, count + 1)),
            _ => Some((at, 1)),
        };
    }
}

/// The lines a new read skips, per stream: those before the stream's last handed-on line, and
/// as many at its timestamp as were handed on.
#[derive(Debug, Default)]
struct Skip {
    at: [Option<(DateTime<Utc>, usize)>; 2],
}

impl Skip {
    /// Whether a line of `stream` with this timestamp was handed on by an earlier read.
    fn already_seen(&mut self, stream: OutputStream, timestamp: Option<DateTime<Utc>>) -> bool {
        let place = &mut self.at[slot(stream)];
        let (Some((last, count)), Some(at)) = (*place, timestamp) else {
            return false;
        };
        if at < last {
            return true;
        }
        if at == last && count > 0 {
            *place = Some((last, count - 1));
            return true;
        }
        // Past the stream's place: nothing further of it is skipped.
        *place = None;
        false
    }
}

/// Turns the Engine's log frames into lines. A multiplexed frame (a container without a TTY)
/// is one log message, starting with its timestamp; a message longer than the Engine's 16 KiB
/// comes as several frames without a line end, each with its own timestamp, joined here under
/// the first one's. A TTY container's output is raw bytes, each line starting with its
/// timestamp. A line is held at most [`PENDING_LINE_LIMIT`] bytes before it is handed on.
#[derive(Debug, Default)]
struct LineSplitter {
    stdout: Pending,
    stderr: Pending,
}

/// The start of a line still waiting for its end.
#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    timestamp: Option<DateTime<Utc>>,
}

/// A complete line: its stream, its timestamp and its text.
type Line = (OutputStream, Option<DateTime<Utc>>, String);

impl LineSplitter {
    /// The lines a chunk of the stream completes (stdin frames are ignored).
    fn feed(&mut self, chunk: LogOutput) -> Vec<Line> {
        let (stream, framed, bytes) = match chunk {
            LogOutput::StdOut { message } => (OutputStream::Stdout, true, message),
            LogOutput::StdErr { message } => (OutputStream::Stderr, true, message),
            LogOutput::Console { message } => (OutputStream::Stdout, false, message),
            LogOutput::StdIn { .. } => return Vec::new(),
        };
        let pending = match stream {
            OutputStream::Stdout => &mut self.stdout,
            OutputStream::Stderr => &mut self.stderr,
        };
        let mut out = Vec::new();
        if framed {
            let (timestamp, text) = split_timestamp(&bytes);
            if pending.bytes.is_empty() {
                pending.timestamp = timestamp;
            }
            pending.bytes.extend_from_slice(text);
            take_lines(pending, stream, true, &mut out);
        } else {
            pending.bytes.extend_from_slice(&bytes);
            take_lines(pending, stream, false, &mut out);
        }
        out
    }

    /// What is left when the stream ends: a last line without a line end.
    fn finish(&mut self) -> Vec<Line> {
        let mut out = Vec::new();
        for (stream, pending) in [
            (OutputStream::Stdout, &mut self.stdout),
            (OutputStream::Stderr, &mut self.stderr),
        ] {
            if !pending.bytes.is_empty() {
                let bytes = std::mem::take(&mut pending.bytes);
                out.push((stream, pending.timestamp.take(), text_of(&bytes)));
            }
        }
        out
    }
}

/// Moves the complete lines of `pending` into `out`. In a framed stream the pending line's
/// timestamp was read from its first frame; in a raw one each line carries its own.
fn take_lines(pending: &mut Pending, stream: OutputStream, framed: bool, out: &mut Vec<Line>) {
    while let Some(end) = pending.bytes.iter().position(|&b| b == b'\n') {
        let rest = pending.bytes.split_off(end + 1);
        let line = std::mem::replace(&mut pending.bytes, rest);
        let line = &line[..end];
        if framed {
            out.push((stream, pending.timestamp, text_of(line)));
        } else {
            let (timestamp, text) = split_timestamp(line);
            out.push((stream, timestamp, text_of(text)));
        }
    }
    if pending.bytes.len() >= PENDING_LINE_LIMIT {
        let piece = std::mem::take(&mut pending.bytes);
        let (timestamp, text) = if framed {
            (pending.timestamp, &piece[..])
        } else {
            split_timestamp(&piece)
        };
        out.push((stream, timestamp, text_of(text)));
    }
}

/// The Engine's timestamp at the start of `bytes` (RFC 3339 with up to nanoseconds and a
/// space after it) and the rest; `None` and all of `bytes` when there is none.
fn split_timestamp(bytes: &[u8]) -> (Option<DateTime<Utc>>, &[u8]) {
    let Some(space) = bytes.iter().take(40).position(|&b| b == b' ') else {
        return (None, bytes);
    };
    std::str::from_utf8(&bytes[..space])
        .ok()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map_or((None, bytes), |t| {
            (Some(t.with_timezone(&Utc)), &bytes[space + 1..])
        })
}

/// A line's text: invalid UTF-8 replaced, trailing whitespace (`\r` of CRLF output) cut.
fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim_end().to_owned()
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

    fn out(text: &str) -> LogOutput {
        LogOutput::StdOut {
            message: text.as_bytes().to_vec().into(),
        }
    }

    fn err(text: &str) -> LogOutput {
        LogOutput::StdErr {
            message: text.as_bytes().to_vec().into(),
        }
    }

    fn at(text: &str) -> Option<DateTime<Utc>> {
        Some(
            DateTime::parse_from_rfc3339(text)
                .unwrap()
                .with_timezone(&Utc),
        )
    }

    #[test]
    fn frames_become_lines_with_their_stream_and_the_engines_timestamp() {
        let mut lines = LineSplitter::default();
        let got = lines.feed(out("2026-01-02T03:04:05.123456789Z line 1\n"));
        assert_eq!(
            got,
            [(
                OutputStream::Stdout,
                at("2026-01-02T03:04:05.123456789Z"),
                "line 1".to_owned()
            )]
        );
        // Nanoseconds are kept; RFC 3339 as the Engine writes it drops trailing zeros.
        let got = lines.feed(err("2026-01-02T03:04:05.1Z boom\r\n"));
        assert_eq!(
            got,
            [(
                OutputStream::Stderr,
                at("2026-01-02T03:04:05.100Z"),
                "boom".to_owned()
            )]
        );
        // No timestamp (an Engine that ignores `timestamps`): the line is kept whole.
        let got = lines.feed(out("plain text here\n"));
        assert_eq!(
            got,
            [(OutputStream::Stdout, None, "plain text here".to_owned())]
        );
        assert!(lines.finish().is_empty());
    }

    #[test]
    fn a_long_message_split_into_frames_is_one_line_under_its_first_timestamp() {
        let mut lines = LineSplitter::default();
        assert!(
            lines
                .feed(out("2026-01-02T03:04:05.000000001Z aaa"))
                .is_empty()
        );
        // Another stream in between does not join in.
        assert_eq!(
            lines.feed(err("2026-01-02T03:04:05.000000002Z e\n")).len(),
            1
        );
        let got = lines.feed(out("2026-01-02T03:04:05.000000003Z bbb\n"));
        assert_eq!(
            got,
            [(
                OutputStream::Stdout,
                at("2026-01-02T03:04:05.000000001Z"),
                "aaabbb".to_owned()
            )]
        );
        // A last line without its end is handed on when the stream ends.
        assert!(lines.feed(out("2026-01-02T03:04:06Z tail")).is_empty());
        assert_eq!(
            lines.finish(),
            [(
                OutputStream::Stdout,
                at("2026-01-02T03:04:06Z"),
                "tail".to_owned()
            )]
        );
    }

    #[test]
    fn tty_output_is_split_into_lines_each_with_its_own_timestamp() {
        let mut lines = LineSplitter::default();
        let console = |text: &str| LogOutput::Console {
            message: text.as_bytes().to_vec().into(),
        };
        assert!(
            lines
                .feed(console("2026-01-02T03:04:05Z one\r\n2026-01-02T03:"))
                .len()
                == 1
        );
        let got = lines.feed(console("04:06Z two\r\n"));
        assert_eq!(
            got,
            [(
                OutputStream::Stdout,
                at("2026-01-02T03:04:06Z"),
                "two".to_owned()
            )]
        );
    }

    #[test]
    fn an_endless_line_is_handed_on_in_bounded_pieces() {
        let mut lines = LineSplitter::default();
        let piece = "x".repeat(16 * 1024);
        let mut handed = Vec::new();
        for _ in 0..100 {
            handed.extend(lines.feed(out(&format!("2026-01-02T03:04:05Z {piece}"))));
            assert!(lines.stdout.bytes.len() < PENDING_LINE_LIMIT);
        }
        assert!(!handed.is_empty());
        assert!(
            handed
                .iter()
                .all(|(_, t, text)| t.is_some() && text.len() >= PENDING_LINE_LIMIT)
        );
    }

    #[test]
    fn a_second_read_skips_exactly_the_lines_the_first_handed_on() {
        use OutputStream::{Stderr, Stdout};
        let t1 = at("2026-01-02T03:04:05.5Z");
        let t2 = at("2026-01-02T03:04:06.5Z");
        let t0 = at("2026-01-02T03:04:06.4Z");
        let mut cursor = LogCursor::new(Some(100));
        assert_eq!(cursor.resume().0, Some(100));
        // Three stdout lines read together share t2; two were handed on before the read
        // ended. On stderr one line at t0, logged after them with an earlier timestamp.
        for (stream, t) in [(Stdout, t1), (Stdout, t2), (Stdout, t2), (Stderr, t0)] {
            cursor.saw(stream, t);
        }
        let (since, mut skip) = cursor.resume();
        assert_eq!(since, Some(t0.unwrap().timestamp() - 1));
        let again = [
            (Stdout, t1),
            (Stderr, t0),
            (Stdout, t2),
            (Stdout, t2),
            (Stdout, t2),
            (Stderr, at("2026-01-02T03:04:06.45Z")),
            (Stdout, at("2026-01-02T03:04:07Z")),
            (Stdout, t2),
        ];
        let fresh: Vec<bool> = again
            .iter()
            .map(|(s, t)| !skip.already_seen(*s, *t))
            .collect();
        assert_eq!(fresh, [false, false, false, false, true, true, true, true]);
        // A stream with nothing handed on skips nothing; a cursor never goes back past the
        // first read's `since`.
        let mut cursor = LogCursor::new(Some(t2.unwrap().timestamp()));
        cursor.saw(Stdout, t2);
        let (since, mut skip) = cursor.resume();
        assert_eq!(since, Some(t2.unwrap().timestamp()));
        assert!(!skip.already_seen(Stderr, t1));
    }
}
