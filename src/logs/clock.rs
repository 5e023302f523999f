//! The timestamps of one run's container output in the API: the Engine's own, made strictly
//! increasing at the precision Prefect stores (microseconds), so the UI, which sorts a run's
//! logs by timestamp, shows them in the order the Engine logged them.
//!
//! Lines the Engine read together share one timestamp (and nanoseconds apart become equal
//! microseconds): each line gets `max(its own, previous + 1 µs)`. That rule is also what makes
//! a resume after a restart exact without storing anything: replayed over the same lines from
//! a moment before the last forwarded one, it gives every line the timestamp it was sent with,
//! so the lines at or before the API's newest forwarded timestamp are exactly those it has.
//! The replay agrees with the original once the chain of bumped stamps it started in has
//! ended, which takes a run of lines faster than one per microsecond for longer than the
//! replay's head start (one second or more; no Engine logs a million lines a second).
//!
//! Pure: no I/O.

use chrono::{DateTime, TimeDelta, Utc};

/// Strictly increasing microsecond timestamps for one run's forwarded lines.
#[derive(Debug, Clone, Default)]
pub struct RunClock {
    /// The last timestamp given.
    last: Option<DateTime<Utc>>,
    /// Lines stamped at or before this are already in the API (a resumed watch).
    sent_until: Option<DateTime<Utc>>,
}

/// How long before the API's newest forwarded line a resumed watch re-reads the Engine's
/// log (whole seconds: the Engine's `since=` takes no fraction): the replay's head start.
pub const RESUME_HEAD_START: i64 = 1;

impl RunClock {
    /// A clock for output of which nothing was sent yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A clock for a run whose output the API has up to `sent_until` (its newest forwarded
    /// line), to be fed the Engine's lines from [`RunClock::resume_since`] on.
    pub fn resuming(sent_until: DateTime<Utc>) -> Self {
        Self {
            last: None,
            sent_until: Some(sent_until),
        }
    }

    /// The Engine's `since=` (unix seconds) for a resume after `sent_until`.
    pub fn resume_since(sent_until: DateTime<Utc>) -> i64 {
        sent_until.timestamp() - RESUME_HEAD_START
    }

    /// The timestamp of the next line, which the Engine logged at `engine` (now when it gave
    /// none); `None` when the API already has the line.
    pub fn stamp(&mut self, engine: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
        let own = micros(engine.unwrap_or_else(Utc::now));
        let stamp = match self.last {
            Some(last) if own <= last => last + TimeDelta::microseconds(1),
            _ => own,
        };
        self.last = Some(stamp);
        match self.sent_until {
            Some(sent) if stamp <= sent => None,
            _ => {
                self.sent_until = None;
                Some(stamp)
            }
        }
    }
}

/// `at` cut to whole microseconds, as Prefect stores it.
fn micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn shown(stamps: &[Option<DateTime<Utc>>]) -> Vec<String> {
        stamps
            .iter()
            .map(|s| s.map_or_else(|| "-".to_owned(), |s| s.format("%S%.6f").to_string()))
            .collect()
    }

    #[test]
    fn equal_and_backward_timestamps_become_strictly_increasing_microseconds() {
        let mut clock = RunClock::new();
        let engine = [
            "2026-01-02T03:04:05.000001999Z",
            "2026-01-02T03:04:05.000001999Z",
            "2026-01-02T03:04:05.000001001Z",
            "2026-01-02T03:04:05.000000500Z",
            "2026-01-02T03:04:05.000009Z",
            "2026-01-02T03:04:06Z",
        ];
        let stamps: Vec<_> = engine.iter().map(|t| clock.stamp(Some(at(t)))).collect();
        assert_eq!(
            shown(&stamps),
            [
                "05.000001",
                "05.000002",
                "05.000003",
                "05.000004",
                "05.000009",
                "06.000000"
            ]
        );
    }

    /// A worker killed after sending some lines; the next replays the Engine's log from a
    /// second before the newest line the API has and sends exactly the rest, with the same
    /// timestamps the first would have given them.
    #[test]
    fn a_resumed_clock_skips_exactly_what_the_api_has_and_continues_the_sequence() {
        // Bursts of lines read together (one timestamp each), as the Engine logs fast output,
        // over five seconds, so a resume's replay starts in the middle.
        let mut engine = Vec::new();
        for burst in 0..50u32 {
            for _ in 0..40 {
                engine.push(
                    at("2026-01-02T03:04:05Z")
                        + TimeDelta::microseconds(i64::from(burst * 100_000)),
                );
            }
        }
        let mut first = RunClock::new();
        let all: Vec<DateTime<Utc>> = engine
            .iter()
            .map(|t| first.stamp(Some(*t)).unwrap())
            .collect();
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        for sent in [0, 1, 39, 40, 41, 999, 1000, 1999] {
            let newest = all[sent];
            let since = RunClock::resume_since(newest);
            let mut resumed = RunClock::resuming(newest);
            let rest: Vec<DateTime<Utc>> = engine
                .iter()
                .filter(|t| t.timestamp() >= since)
                .filter_map(|t| resumed.stamp(Some(*t)))
                .collect();
            assert_eq!(rest, all[sent + 1..], "resumed after line {sent}");
        }
    }
}
