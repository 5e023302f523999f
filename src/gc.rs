//! Garbage collection of finished flow-run containers: `docker-worker gc` and the worker's
//! optional periodic collection. Like [`worker`](crate::worker) it wires both sides: the
//! Docker runtime lists and removes containers, the Prefect client says whether their flow
//! runs are over. Neither side knows of the other.
//!
//! A container is removed only when all of these hold: it carries `io.prefect.flow-run-id`
//! (and `io.prefect.work-pool-name=<pool>` when a pool is given); the Engine reports it
//! `exited` or `dead`; it finished at least `older_than` ago; and Prefect says its flow run is
//! in a final state (Completed, Failed, Crashed, Cancelled). Anything in doubt is kept: a flow
//! run the API does not know (404; it may belong to another server), an API or Engine error,
//! a container without a finish time. Running, paused, restarting and created containers and
//! containers without the label are never even listed.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::docker::{DockerError, Removal, StoppedContainer};
use crate::job::labels;
use crate::worker::ports::{ContainerRuntime, PrefectApi};

/// What one collection looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcOptions {
    /// Only this pool's containers; `None` = every pool's.
    pub pool: Option<String>,
    /// Keep containers that finished less than this long ago.
    pub older_than: Duration,
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
}

/// Why a stopped flow-run container was kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepReason {
    /// It finished less than `older_than` ago.
    TooYoung {
        /// The threshold.
        older_than: Duration,
    },
    /// The Engine has no finish time for it, so its age is unknown.
    NoFinishTime,
    /// The worker running this collection is still handling its flow run.
    InUse,
    /// Its flow run is not in a final state.
    RunNotFinal {
        /// The run's state type (`RUNNING`, `PENDING`, …; empty when it has none).
        state_type: String,
    },
    /// The API does not know its flow run: it may belong to another Prefect server.
    RunNotFound,
    /// The flow run could not be read (counts as an error).
    ApiError(String),
    /// The Engine refused to remove it (counts as an error).
    RemoveFailed(String),
}

impl KeepReason {
    /// Whether this keep is the result of a failure (the `gc` command then exits non-zero).
    pub fn is_error(&self) -> bool {
        matches!(self, Self::ApiError(_) | Self::RemoveFailed(_))
    }
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooYoung { older_than } => write!(
                f,
                "finished less than {} ago",
                humantime::format_duration(*older_than)
            ),
            Self::NoFinishTime => f.write_str("the Engine has no finish time for it"),
            Self::InUse => f.write_str("this worker is still handling its flow run"),
            Self::RunNotFinal { state_type } if state_type.is_empty() => {
                f.write_str("its flow run has no state yet")
            }
            Self::RunNotFinal { state_type } => {
                write!(f, "its flow run is not in a final state ({state_type})")
            }
            Self::RunNotFound => f.write_str(
                "its flow run does not exist in this Prefect API (404); it may belong to another server",
            ),
            Self::ApiError(e) => write!(f, "could not read its flow run: {e}"),
            Self::RemoveFailed(e) => write!(f, "could not remove it: {e}"),
        }
    }
}

/// What happened to one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Removed.
    Removed,
    /// Would have been removed (`--dry-run`).
    WouldRemove,
    /// Someone else removed it between the listing and the removal.
    Gone,
    /// Kept, and why.
    Kept(KeepReason),
}

/// One stopped flow-run container and what the collection did with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Container name (or id when it has none).
    pub name: String,
    /// Full container id.
    pub id: String,
    /// The `io.prefect.flow-run-id` label.
    pub flow_run_id: String,
    /// The flow run's state name (`Completed`); `None` when it was not read.
    pub state: Option<String>,
    /// When the container finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// What was done.
    pub outcome: Outcome,
    /// When the collection looked (for "finished … ago").
    pub checked_at: DateTime<Utc>,
}

/// A duration rounded to what a reader cares about: seconds under an hour, minutes under a
/// day, hours beyond.
fn rounded(d: Duration) -> Duration {
    let s = d.as_secs();
    let unit = match s {
        0..3600 => 1,
        3600..86400 => 60,
        _ => 3600,
    };
    Duration::from_secs(s / unit * unit)
}

impl fmt::Display for Decision {
    /// `removed|would remove|gone|kept <name> <short id> flow run <id> (<state>, finished
    /// <ago>)`, and `: <reason>` for kept ones.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.outcome {
            Outcome::Removed => "removed",
            Outcome::WouldRemove => "would remove",
            Outcome::Gone => "gone",
            Outcome::Kept(_) => "kept",
        };
        let short_id: String = self.id.chars().take(12).collect();
        let state = self.state.as_deref().unwrap_or("state not checked");
        write!(
            f,
            "{verb} {} {short_id} flow run {} ({state}, ",
            self.name, self.flow_run_id
        )?;
        match self.finished_at {
            Some(at) => {
                let ago = (self.checked_at - at).to_std().unwrap_or_default();
                write!(
                    f,
                    "finished {} ago)",
                    humantime::format_duration(rounded(ago))
                )?;
            }
            None => f.write_str("finish time unknown)")?,
        }
        match &self.outcome {
            Outcome::Kept(reason) => write!(f, ": {reason}"),
            Outcome::Gone => f.write_str(": removed by someone else meanwhile"),
            _ => Ok(()),
        }
    }
}

/// Everything one collection decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// One entry per stopped flow-run container looked at.
    pub decisions: Vec<Decision>,
    /// The collection was a dry run.
    pub dry_run: bool,
}

impl Report {
    fn count(&self, pred: impl Fn(&Outcome) -> bool) -> usize {
        self.decisions.iter().filter(|d| pred(&d.outcome)).count()
    }

    /// Containers removed.
    pub fn removed(&self) -> usize {
        self.count(|o| *o == Outcome::Removed)
    }

    /// Containers a dry run would have removed.
    pub fn would_remove(&self) -> usize {
        self.count(|o| *o == Outcome::WouldRemove)
    }

    /// Containers kept.
    pub fn kept(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Kept(_)))
    }

    /// Containers kept because something failed (API or Engine).
    pub fn errors(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Kept(r) if r.is_error()))
    }

    /// The summary line: `gc: 2 removed, 3 kept, 0 errors` (`gc (dry run): 2 would remove, …`).
    pub fn summary(&self) -> String {
        let gone = self.count(|o| *o == Outcome::Gone);
        let gone = if gone > 0 {
            format!(", {gone} already gone")
        } else {
            String::new()
        };
        if self.dry_run {
            format!(
                "gc (dry run): {} would remove, {} kept{gone}, {} errors",
                self.would_remove(),
                self.kept(),
                self.errors()
            )
        } else {
            format!(
                "gc: {} removed, {} kept{gone}, {} errors",
                self.removed(),
                self.kept(),
                self.errors()
            )
        }
    }
}

/// A collection that could not even start.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The Engine could not list the containers.
    #[error("could not list flow-run containers: {0}")]
    ListFailed(#[source] DockerError),
}

/// The label filters for the containers a collection looks at.
pub fn label_filters(pool: Option<&str>) -> Vec<String> {
    let mut filters = vec![labels::FLOW_RUN_ID.to_owned()];
    if let Some(pool) = pool {
        filters.push(format!("{}={pool}", labels::WORK_POOL_NAME));
    }
    filters
}

/// The part of a decision that needs neither the Engine nor the API: the container's age,
/// and whether the caller is still busy with its run. `None` = ask Prefect.
fn keep_before_asking(
    container: &StoppedContainer,
    older_than: Duration,
    now: DateTime<Utc>,
    in_use: bool,
) -> Option<KeepReason> {
    if in_use {
        return Some(KeepReason::InUse);
    }
    let Some(finished_at) = container.finished_at else {
        return Some(KeepReason::NoFinishTime);
    };
    // A finish time in the future (clock skew) is age zero.
    let age = (now - finished_at).to_std().unwrap_or_default();
    (age < older_than).then_some(KeepReason::TooYoung { older_than })
}

/// What a decision shows as the run's state: its name, else its type, else "no state".
fn state_label(run: &crate::prefect::FlowRun, type_text: &str) -> String {
    run.state
        .as_ref()
        .and_then(|s| s.name.as_deref())
        .filter(|n| !n.is_empty())
        .unwrap_or(if type_text.is_empty() {
            "no state"
        } else {
            type_text
        })
        .to_owned()
}

/// The decision about one stopped container of flow run `flow_run_id`, carried out.
async fn decide(
    docker: &dyn ContainerRuntime,
    api: &dyn PrefectApi,
    options: &GcOptions,
    container: &StoppedContainer,
    flow_run_id: String,
    in_use: &(dyn Fn(&str) -> bool + Send + Sync),
) -> Decision {
    let now = Utc::now();
    let mut decision = Decision {
        name: container.container.display_name().to_owned(),
        id: container.container.id.clone(),
        flow_run_id: flow_run_id.clone(),
        state: None,
        finished_at: container.finished_at,
        outcome: Outcome::WouldRemove,
        checked_at: now,
    };
    if let Some(reason) =
        keep_before_asking(container, options.older_than, now, in_use(&flow_run_id))
    {
        decision.outcome = Outcome::Kept(reason);
        return decision;
    }
    let run = match api.read_flow_run(&flow_run_id).await {
        Ok(run) => run,
        Err(e) if e.is_not_found() => {
            decision.outcome = Outcome::Kept(KeepReason::RunNotFound);
            return decision;
        }
        Err(e) => {
            decision.outcome = Outcome::Kept(KeepReason::ApiError(e.to_string()));
            return decision;
        }
    };
    let state_type = run.state_type();
    let type_text = state_type
        .map(|t| t.as_str().to_owned())
        .unwrap_or_default();
    decision.state = Some(state_label(&run, &type_text));
    if !state_type.is_some_and(crate::prefect::StateType::is_final) {
        decision.outcome = Outcome::Kept(KeepReason::RunNotFinal {
            state_type: type_text,
        });
    } else if !options.dry_run {
        decision.outcome = match docker.remove_stopped_container(&decision.id).await {
            Ok(Removal::Removed) => Outcome::Removed,
            Ok(Removal::AlreadyGone) => Outcome::Gone,
            Err(e) => Outcome::Kept(KeepReason::RemoveFailed(e.to_string())),
        };
    }
    decision
}

/// Runs one collection. `in_use` names flow runs the caller is still handling (the worker's
/// own); they are kept whatever their state.
///
/// Per-container failures are kept and reported in the [`Report`], never returned: one bad
/// container or API hiccup does not stop the others.
///
/// # Errors
/// [`GcError::ListFailed`] when the Engine cannot list containers at all.
pub async fn collect(
    docker: &dyn ContainerRuntime,
    api: &dyn PrefectApi,
    options: &GcOptions,
    in_use: &(dyn Fn(&str) -> bool + Send + Sync),
) -> Result<Report, GcError> {
    let containers = docker
        .list_stopped_containers(&label_filters(options.pool.as_deref()))
        .await
        .map_err(GcError::ListFailed)?;
    let mut report = Report {
        decisions: Vec::with_capacity(containers.len()),
        dry_run: options.dry_run,
    };
    for container in containers {
        let Some(flow_run_id) = container.labels.get(labels::FLOW_RUN_ID).cloned() else {
            continue; // the label filter guarantees it; never touch a container without it
        };
        let decision = decide(docker, api, options, &container, flow_run_id, in_use).await;
        report.decisions.push(decision);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::CreatedContainer;
    use std::collections::HashMap;

    fn stopped(finished_at: Option<DateTime<Utc>>) -> StoppedContainer {
        StoppedContainer {
            container: CreatedContainer {
                id: "0123456789abcdef0123".into(),
                name: Some("crimson-dog".into()),
                created_at: 0,
            },
            labels: HashMap::from([(labels::FLOW_RUN_ID.to_owned(), "run-1".to_owned())]),
            status: "exited".into(),
            finished_at,
        }
    }

    #[test]
    fn age_and_use_decide_before_the_api() {
        let now = Utc::now();
        let day = Duration::from_secs(86_400);
        let old = stopped(Some(now - chrono::Duration::hours(25)));
        let young = stopped(Some(now - chrono::Duration::hours(23)));
        let future = stopped(Some(now + chrono::Duration::minutes(5)));
        assert_eq!(keep_before_asking(&old, day, now, false), None);
        assert_eq!(
            keep_before_asking(&young, day, now, false),
            Some(KeepReason::TooYoung { older_than: day })
        );
        assert_eq!(
            keep_before_asking(&future, Duration::ZERO, now, false),
            None
        );
        assert_eq!(
            keep_before_asking(&old, day, now, true),
            Some(KeepReason::InUse)
        );
        assert_eq!(
            keep_before_asking(&stopped(None), Duration::ZERO, now, false),
            Some(KeepReason::NoFinishTime)
        );
    }

    #[test]
    fn filters() {
        assert_eq!(label_filters(None), vec!["io.prefect.flow-run-id"]);
        assert_eq!(
            label_filters(Some("p")),
            vec!["io.prefect.flow-run-id", "io.prefect.work-pool-name=p"]
        );
    }

    #[test]
    fn lines_and_summary() {
        let now = Utc::now();
        let mut d = Decision {
            name: "crimson-dog".into(),
            id: "0123456789abcdef0123".into(),
            flow_run_id: "run-1".into(),
            state: Some("Completed".into()),
            finished_at: Some(now - chrono::Duration::seconds(3 * 3600 + 125)),
            outcome: Outcome::Removed,
            checked_at: now,
        };
        assert_eq!(
            d.to_string(),
            "removed crimson-dog 0123456789ab flow run run-1 (Completed, finished 3h 2m ago)"
        );
        d.outcome = Outcome::Kept(KeepReason::RunNotFinal {
            state_type: "RUNNING".into(),
        });
        d.state = Some("Running".into());
        assert_eq!(
            d.to_string(),
            "kept crimson-dog 0123456789ab flow run run-1 (Running, finished 3h 2m ago): its flow run is not in a final state (RUNNING)"
        );
        d.outcome = Outcome::Kept(KeepReason::TooYoung {
            older_than: Duration::from_secs(86_400),
        });
        d.state = None;
        d.finished_at = None;
        assert_eq!(
            d.to_string(),
            "kept crimson-dog 0123456789ab flow run run-1 (state not checked, finish time unknown): finished less than 1day ago"
        );
        let mut report = Report {
            decisions: vec![d.clone()],
            dry_run: false,
        };
        d.outcome = Outcome::Removed;
        report.decisions.push(d.clone());
        d.outcome = Outcome::Kept(KeepReason::ApiError("boom".into()));
        report.decisions.push(d.clone());
        assert_eq!(report.summary(), "gc: 1 removed, 2 kept, 1 errors");
        assert_eq!(report.errors(), 1);
        report.dry_run = true;
        assert_eq!(
            report.summary(),
            "gc (dry run): 0 would remove, 2 kept, 1 errors"
        );
    }
}
