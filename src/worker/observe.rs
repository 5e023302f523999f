//! What the worker learns about a run besides its exit code: the last lines of its output
//! (sent to the Prefect UI when it crashes, so a run that died before its engine connected is
//! still explained) and what it cost (peak memory, CPU, pull time, OOM), sent as a
//! `prefect.docker.container.resources` event and one flow-run log line.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::docker::OutputStream;
use crate::docker::usage::ResourceUsage;

/// The longest line a tail keeps: a container printing one endless line cannot make the
/// worker hold it (and the Prefect UI shows a line this long whole).
pub(crate) const TAIL_LINE_LIMIT: usize = 4096;

/// One kept line: when (the run clock's stamp), on which stream, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TailLine {
    /// Its timestamp in the run's logs, so the UI shows the tail in the order it was printed.
    pub at: DateTime<Utc>,
    /// stdout or stderr.
    pub stream: OutputStream,
    /// The text, cut at [`TAIL_LINE_LIMIT`] bytes.
    pub text: String,
}

/// The last `capacity` lines a container printed, each cut at [`TAIL_LINE_LIMIT`] bytes.
pub(crate) struct OutputTail {
    capacity: usize,
    lines: Mutex<VecDeque<TailLine>>,
}

impl OutputTail {
    /// Keeps up to `capacity` lines; 0 keeps none.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            lines: Mutex::new(VecDeque::new()),
        }
    }

    /// Whether a tail of `capacity` lines keeps anything (so output must be followed even
    /// when it is not printed).
    pub fn keeps_lines(capacity: usize) -> bool {
        capacity > 0
    }

    /// Adds one line.
    pub fn push(&self, at: DateTime<Utc>, stream: OutputStream, line: &str) {
        if self.capacity == 0 {
            return;
        }
        let Ok(mut lines) = self.lines.lock() else {
            return;
        };
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(TailLine {
            at,
            stream,
            text: cut(line),
        });
    }

    /// The kept lines, oldest first.
    pub fn take(&self) -> Vec<TailLine> {
        self.lines
            .lock()
            .map(|mut l| l.drain(..).collect())
            .unwrap_or_default()
    }
}

/// `line`, or its first [`TAIL_LINE_LIMIT`] bytes (on a character boundary) with a note.
fn cut(line: &str) -> String {
    if line.len() <= TAIL_LINE_LIMIT {
        return line.to_owned();
    }
    let mut end = TAIL_LINE_LIMIT;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [line cut at {TAIL_LINE_LIMIT} bytes]", &line[..end])
}

/// One run's accounting, gathered from the pull, the stats samples and the exit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Accounting {
    /// What the stats samples saw.
    pub usage: ResourceUsage,
    /// How long the image pull took; `None` when no pull was needed.
    pub pull: Option<Duration>,
    /// From start to exit as the worker saw it.
    pub wall: Duration,
    /// The exit code.
    pub exit_code: i64,
    /// The kernel's OOM killer ended it.
    pub oom_killed: bool,
}

impl Accounting {
    /// The event payload: figures in plain units; `null` where unknown.
    pub fn payload(&self, image: &str) -> Value {
        json!({
            "peak_memory_bytes": self.usage.peak_memory_bytes,
            "cpu_seconds": self.usage.cpu_seconds.map(round3),
            "pull_seconds": self.pull.map(|d| round3(d.as_secs_f64())),
            "pulled": self.pull.is_some(),
            "wall_seconds": round3(self.wall.as_secs_f64()),
            "oom_killed": self.oom_killed,
            "exit_code": self.exit_code,
            "samples": self.usage.samples,
            "image": image,
        })
    }

    /// The flow-run log line.
    pub fn summary(&self, container: &str) -> String {
        let memory = self
            .usage
            .peak_memory_bytes
            .map_or_else(|| "unknown".to_owned(), mebibytes);
        let cpu = self
            .usage
            .cpu_seconds
            .map_or_else(|| "unknown".to_owned(), |c| format!("{c:.2} s"));
        let pull = self.pull.map_or_else(
            || "none".to_owned(),
            |d| format!("{:.2} s", d.as_secs_f64()),
        );
        format!(
            "Container '{container}' resources: peak memory {memory}, CPU {cpu}, wall {:.2} s, image pull {pull}, OOM-killed {}",
            self.wall.as_secs_f64(),
            if self.oom_killed { "yes" } else { "no" }
        )
    }

    /// The `prefect.docker.container.resources` event, about the container and related to
    /// the flow run, the work pool and the worker.
    pub fn event(&self, ids: &EventIds<'_>) -> Value {
        json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "occurred": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "event": "prefect.docker.container.resources",
            "resource": {
                "prefect.resource.id": format!("prefect.docker.container.{}", ids.container_id),
                "prefect.resource.name": ids.container_name,
            },
            "related": [
                {"prefect.resource.id": format!("prefect.flow-run.{}", ids.flow_run_id),
                 "prefect.resource.role": "flow-run",
                 "prefect.resource.name": ids.flow_run_name},
                {"prefect.resource.id": format!("prefect.work-pool.{}", ids.pool_id),
                 "prefect.resource.role": "work-pool",
                 "prefect.resource.name": ids.pool_name,
                 "prefect.work-pool.type": "docker"},
                {"prefect.resource.id": format!("prefect.worker.docker.{}", crate::job::slug::slugify_lower(ids.worker_name)),
                 "prefect.resource.role": "worker",
                 "prefect.resource.name": ids.worker_name,
                 "prefect.worker-type": "docker"},
            ],
            "payload": self.payload(ids.image),
        })
    }
}

/// Who and what an accounting event names.
pub(crate) struct EventIds<'a> {
    pub container_id: &'a str,
    pub container_name: &'a str,
    pub flow_run_id: &'a str,
    pub flow_run_name: &'a str,
    pub pool_id: &'a str,
    pub pool_name: &'a str,
    pub worker_name: &'a str,
    pub image: &'a str,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn mebibytes(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // display only
    let mib = bytes as f64 / (1024.0 * 1024.0);
    format!("{mib:.1} MiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(lines: &[TailLine]) -> Vec<&str> {
        lines.iter().map(|l| l.text.as_str()).collect()
    }

    #[test]
    fn an_endless_line_is_cut_with_a_note() {
        let tail = OutputTail::new(2);
        tail.push(
            Utc::now(),
            OutputStream::Stdout,
            &"é".repeat(TAIL_LINE_LIMIT),
        );
        let kept = tail.take();
        assert!(
            kept[0].text.len() < TAIL_LINE_LIMIT + 64,
            "{}",
            kept[0].text.len()
        );
        assert!(
            kept[0]
                .text
                .ends_with(&format!("… [line cut at {TAIL_LINE_LIMIT} bytes]"))
        );
    }

    #[test]
    fn tail_keeps_the_last_lines_with_their_stream_and_time() {
        let tail = OutputTail::new(3);
        let t0 = Utc::now();
        for (i, text) in ["a", "b", "c", "d"].iter().enumerate() {
            let at = t0 + chrono::TimeDelta::microseconds(i64::try_from(i).unwrap());
            tail.push(at, OutputStream::Stdout, text);
        }
        tail.push(t0, OutputStream::Stderr, "e");
        let kept = tail.take();
        assert_eq!(texts(&kept), ["c", "d", "e"]);
        assert_eq!(kept[0].at, t0 + chrono::TimeDelta::microseconds(2));
        assert_eq!(kept[2].stream, OutputStream::Stderr);
        assert!(tail.take().is_empty());
        let off = OutputTail::new(0);
        off.push(t0, OutputStream::Stdout, "x");
        assert!(!OutputTail::keeps_lines(0) && OutputTail::keeps_lines(3));
        assert!(off.take().is_empty());
    }

    #[test]
    fn accounting_reads_well_and_names_its_resources() {
        let a = Accounting {
            usage: ResourceUsage {
                peak_memory_bytes: Some(52 * 1024 * 1024 + 512 * 1024),
                cpu_seconds: Some(1.23456),
                samples: 4,
            },
            pull: None,
            wall: Duration::from_millis(2500),
            exit_code: 0,
            oom_killed: false,
        };
        assert_eq!(
            a.summary("c1"),
            "Container 'c1' resources: peak memory 52.5 MiB, CPU 1.23 s, wall 2.50 s, image pull none, OOM-killed no"
        );
        let e = a.event(&EventIds {
            container_id: "abc",
            container_name: "c1",
            flow_run_id: "r1",
            flow_run_name: "happy-cat",
            pool_id: "p1",
            pool_name: "pool",
            worker_name: "My Worker",
            image: "img:1",
        });
        assert_eq!(e["event"], "prefect.docker.container.resources");
        assert_eq!(
            e["resource"]["prefect.resource.id"],
            "prefect.docker.container.abc"
        );
        assert_eq!(
            e["related"][0]["prefect.resource.id"],
            "prefect.flow-run.r1"
        );
        assert_eq!(e["related"][0]["prefect.resource.role"], "flow-run");
        assert_eq!(e["payload"]["cpu_seconds"], 1.235);
        assert_eq!(e["payload"]["pulled"], false);
        assert_eq!(e["payload"]["pull_seconds"], Value::Null);
    }
}
