//! The one policy that turns how a run's handling ended into what Prefect is told: which state
//! is proposed (and how it is delivered), what the run's logs say before and after, and which
//! counter it counts in. Every state message the worker writes lives here, so they can be
//! read (and tested) side by side, in the style of kube-runtime's `error_policy`.
//!
//! Pure: no I/O. `lifecycle::report` carries a [`Verdict`] out.

use crate::docker::{DockerError, ExitStatus};
use crate::logs::Level;
use crate::prefect::{ApiError, StateProposal};

use super::engine::EngineFacts;
use super::registry::StopReason;
use super::{crash_message, explain};

/// Why a run could not be started; becomes the Crashed message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SubmitError {
    #[error(transparent)]
    Template(#[from] crate::job::render::TemplateError),
    #[error(transparent)]
    Validation(#[from] crate::job::ValidationError),
    #[error(transparent)]
    Prepare(#[from] crate::job::PrepareError),
    #[error(transparent)]
    Reference(#[from] crate::job::refs::RefError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    /// The host policy refused the job (before anything was pulled or created).
    #[error(transparent)]
    Policy(#[from] crate::guard::Violation),
}

impl SubmitError {
    /// The class name shown before the message, like the Python worker's exception class.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Template(_) | Self::Prepare(_) | Self::Reference(_) => "ValueError",
            Self::Validation(_) => "ValidationError",
            Self::Api(_) => "PrefectHTTPStatusError",
            Self::Docker(e) => e.kind(),
            Self::Policy(_) => "PolicyViolation",
        }
    }
}

/// How a run's handling ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Its deployment was deleted before the claim.
    DeploymentGone {
        /// The deployment's id.
        deployment_id: String,
    },
    /// Claimed, but its configuration or container could not be made.
    SubmitFailed {
        /// The run's name (for the log line).
        run_name: String,
        /// What failed.
        error: SubmitError,
    },
    /// Cancelled while it was being submitted, before the named step (`pulled`, `created`,
    /// `started`): no container was started.
    Withdrawn {
        /// The step that did not happen.
        stage: &'static str,
    },
    /// Adopted after a restart: its container was created but never started.
    NeverStarted {
        /// The container's name.
        container: String,
        /// The run was still Pending, so the container was removed and the run can start
        /// over.
        removed: bool,
    },
    /// Its container exited.
    Exited {
        /// The container's name.
        container: String,
        /// How.
        status: ExitStatus,
        /// Why the worker had stopped it, if it had.
        stopped: Option<StopReason>,
        /// The run's `max_runtime`, for the message when that is why.
        max_runtime: Option<std::time::Duration>,
    },
    /// The run's container on this host was removed by someone else (seen by the watch or a
    /// reconcile pass).
    Vanished {
        /// The container's name or short id.
        container: String,
        /// The Engine's base URL.
        host: String,
        /// The run was being cancelled anyway.
        cancelling: bool,
    },
    /// This worker claimed the run and stopped before creating its container.
    Rescheduled {
        /// The worker that claimed it (this one).
        claimer: String,
        /// The Engine's base URL.
        host: String,
    },
    /// Another worker claimed the run and has been offline too long without recording a
    /// container for it.
    OrphanedClaim {
        claimer: String,
        offline_for: std::time::Duration,
        /// `--reschedule-orphans`.
        reschedule: bool,
    },
    /// The exit could not be learnt (the Engine lost the container).
    Lost {
        /// The run's name.
        run_name: String,
        /// Why.
        error: DockerError,
    },
}

/// The counter a reported state counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tally {
    Crashed,
    Cancelled,
    Rescheduled,
}

/// How a state is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Retried through API outages; counted and logged only when the server took it.
    Reliable,
    /// Proposed once with `force` (the run was never claimed); counted when the API answered.
    ForcedOnce,
}

/// A state to propose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    pub proposal: StateProposal,
    pub delivery: Delivery,
    pub tally: Tally,
}

/// What to tell Prefect about a run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Verdict {
    /// Flow-run log lines before the state.
    pub before: Vec<(Level, String)>,
    /// The state, if any (a clean exit is reported by the engine inside the container).
    pub report: Option<Report>,
    /// Flow-run log lines after it.
    pub after: Vec<(Level, String)>,
    /// Counts as a completed container (exit 0).
    pub completed: bool,
    /// The container's last output lines follow (a crash).
    pub send_tail: bool,
}

/// The policy: what `outcome` of run `run_id` means for Prefect. Each arm names the rule; the
/// words are in the functions below, one per kind of ending.
pub(crate) fn verdict(run_id: &str, outcome: &Outcome) -> Verdict {
    match outcome {
        Outcome::DeploymentGone { deployment_id } => deployment_gone(run_id, deployment_id),
        Outcome::SubmitFailed { run_name, error } => submit_failed(run_name, error),
        Outcome::Withdrawn { stage } => withdrawn(run_id, stage),
        Outcome::NeverStarted { container, removed } => never_started(container, *removed),
        Outcome::Exited {
            container,
            status,
            stopped,
            max_runtime,
        } => exited(container, status, *stopped, *max_runtime),
        Outcome::Vanished {
            container,
            host,
            cancelling,
        } => vanished(container, host, *cancelling),
        Outcome::Rescheduled { claimer, host } => rescheduled(format!(
            "Worker '{claimer}' claimed this flow run but stopped before creating its container (there is none on Docker host {host} and no infrastructure_pid was recorded); rescheduled so that it runs once."
        )),
        Outcome::OrphanedClaim {
            claimer,
            offline_for,
            reschedule,
        } => orphaned_claim(claimer, *offline_for, *reschedule),
        Outcome::Lost { run_name, error } => Verdict {
            before: vec![(
                Level::Error,
                format!(
                    "Lost connection to flow run '{run_name}' infrastructure. The flow run's final state will be determined by the execution environment. ({error})"
                ),
            )],
            ..Verdict::default()
        },
    }
}

fn deployment_gone(run_id: &str, deployment_id: &str) -> Verdict {
    Verdict {
        before: vec![(
            Level::Error,
            format!(
                "Deployment {deployment_id} no longer exists. Flow run {run_id} will not be submitted for execution"
            ),
        )],
        report: Some(Report {
            proposal: StateProposal::cancelled(format!(
                "Deployment {deployment_id} no longer exists, cancelled run."
            )),
            delivery: Delivery::ForcedOnce,
            tally: Tally::Cancelled,
        }),
        ..Verdict::default()
    }
}

fn submit_failed(run_name: &str, error: &SubmitError) -> Verdict {
    Verdict {
        before: vec![(
            Level::Error,
            format!("Failed to submit flow run '{run_name}' to infrastructure: {error}"),
        )],
        report: Some(crashed(format!(
            "Failed to submit flow run to infrastructure: {}: {error}",
            error.kind()
        ))),
        ..Verdict::default()
    }
}

fn withdrawn(run_id: &str, stage: &str) -> Verdict {
    Verdict {
        report: Some(cancelled(format!(
            "Flow run cancelled by worker while pending (before its container was {stage})."
        ))),
        after: vec![(
            Level::Info,
            format!("Cancelled pending flow run '{run_id}'"),
        )],
        ..Verdict::default()
    }
}

fn never_started(container: &str, removed: bool) -> Verdict {
    if removed {
        return rescheduled(format!(
            "The worker created container '{container}' for this flow run but stopped before starting it; the container was removed and the run rescheduled so that it runs once."
        ));
    }
    Verdict {
        report: Some(crashed(format!(
            "Failed to submit flow run to infrastructure: WorkerInterrupted: the worker stopped after creating container '{container}' and before starting it"
        ))),
        ..Verdict::default()
    }
}

fn vanished(container: &str, host: &str, cancelling: bool) -> Verdict {
    let report = if cancelling {
        cancelled(format!(
            "Flow run was being cancelled and its container '{container}' is gone from Docker host {host}."
        ))
    } else {
        crashed(format!(
            "The container '{container}' of this flow run was removed from Docker host {host} outside the worker; the flow run's outcome is unknown."
        ))
    };
    Verdict {
        report: Some(report),
        ..Verdict::default()
    }
}

fn orphaned_claim(claimer: &str, offline_for: std::time::Duration, reschedule: bool) -> Verdict {
    // A short --orphan-claim-timeout would read "offline for 0 min": seconds below two minutes.
    let secs = offline_for.as_secs();
    let how_long = if secs < 120 {
        format!("{secs} s")
    } else {
        format!("{} min", secs / 60)
    };
    let lead = format!(
        "Worker '{claimer}' claimed this flow run and has been offline for {how_long} without recording a container for it"
    );
    if reschedule {
        return rescheduled(format!("{lead}; rescheduled (--reschedule-orphans)."));
    }
    Verdict {
        report: Some(crashed(format!(
            "{lead}. Its container may exist on a Docker host this worker cannot see, so the run is not rescheduled (start workers with --reschedule-orphans to reschedule such runs)."
        ))),
        ..Verdict::default()
    }
}

fn cancelled(message: String) -> Report {
    Report {
        proposal: StateProposal::cancelled(message),
        delivery: Delivery::Reliable,
        tally: Tally::Cancelled,
    }
}

fn rescheduled(message: String) -> Verdict {
    Verdict {
        report: Some(Report {
            proposal: super::reconcile::reschedule(message),
            delivery: Delivery::Reliable,
            tally: Tally::Rescheduled,
        }),
        ..Verdict::default()
    }
}

fn cancelled_exit(container: &str, status: &ExitStatus) -> Verdict {
    Verdict {
        report: Some(cancelled(format!(
            "Flow run was cancelled; the worker stopped its container '{container}' (exit code {}).",
            status.code
        ))),
        ..Verdict::default()
    }
}

fn crashed(message: String) -> Report {
    Report {
        proposal: StateProposal::crashed(message),
        delivery: Delivery::Reliable,
        tally: Tally::Crashed,
    }
}

fn exited(
    container: &str,
    status: &ExitStatus,
    stopped: Option<StopReason>,
    max_runtime: Option<std::time::Duration>,
) -> Verdict {
    match stopped {
        Some(StopReason::Cancelled) => return cancelled_exit(container, status),
        // The run is already final: there is nothing to tell Prefect.
        Some(StopReason::RunOver) => return Verdict::default(),
        Some(StopReason::MaxRuntime) => {
            let limit = max_runtime.map_or_else(String::new, |d| {
                format!(" of {}", humantime::format_duration(d))
            });
            return Verdict {
                report: Some(crashed(format!(
                    "Flow run exceeded its max_runtime{limit}; the worker stopped its container '{container}' (exit code {}).",
                    status.code
                ))),
                ..Verdict::default()
            };
        }
        None => {}
    }
    if status.code == 0 {
        return Verdict {
            completed: true,
            ..Verdict::default()
        };
    }
    let mut message = crash_message(status.code);
    if status.oom_killed {
        message.push_str(
            " The kernel killed the container for exceeding its memory limit (OOMKilled).",
        );
    }
    if status.engine_lost {
        message
            .push_str(" The Docker Engine restarted or was unreachable while the container ran.");
    }
    Verdict {
        report: Some(crashed(message)),
        after: vec![(Level::Info, explain(status.code).resolution.to_owned())],
        send_tail: true,
        ..Verdict::default()
    }
}

/// The exit as far as it can be known: the wait's answer, completed by the Engine's event
/// stream — an OOM kill the wait could not see, or the exit code when the wait failed.
pub(crate) fn exit_with_facts(
    waited: Result<ExitStatus, DockerError>,
    facts: EngineFacts,
) -> Result<ExitStatus, DockerError> {
    match waited {
        Ok(mut status) => {
            status.oom_killed |= facts.oom_killed;
            Ok(status)
        }
        Err(e) => match facts.exit_code {
            Some(code) => {
                tracing::info!(error = %e, code, "the wait failed but the Engine's event stream saw the exit");
                Ok(ExitStatus {
                    code,
                    oom_killed: facts.oom_killed,
                    engine_lost: false,
                })
            }
            None => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::EngineFailure;
    use crate::prefect::StateType;

    fn status(code: i64) -> ExitStatus {
        ExitStatus {
            code,
            oom_killed: false,
            engine_lost: false,
        }
    }

    fn lost() -> DockerError {
        DockerError::WatchFailed {
            container: "c".into(),
            failure: EngineFailure {
                status: None,
                message: "connection refused".into(),
            },
        }
    }

    fn state_of(v: &Verdict) -> (StateType, String) {
        let report = v.report.as_ref().expect("a state is reported");
        (
            report.proposal.state_type,
            report.proposal.message.clone().unwrap_or_default(),
        )
    }

    #[test]
    fn an_orphaned_claim_says_how_long_its_worker_was_offline() {
        let message = |secs| {
            let outcome = Outcome::OrphanedClaim {
                claimer: "host-3".into(),
                offline_for: std::time::Duration::from_secs(secs),
                reschedule: false,
            };
            state_of(&verdict("r", &outcome)).1
        };
        assert!(
            message(25).contains("offline for 25 s without"),
            "{}",
            message(25)
        );
        assert!(message(1500).contains("offline for 25 min without"));
    }

    #[test]
    fn a_clean_exit_reports_nothing_and_counts_completed() {
        let v = verdict(
            "r",
            &Outcome::Exited {
                container: "c".into(),
                status: status(0),
                stopped: None,
                max_runtime: None,
            },
        );
        assert!(v.report.is_none() && v.completed && !v.send_tail);
    }

    #[test]
    fn a_failed_exit_is_crashed_with_the_explanation_oom_and_engine_loss() {
        let mut s = status(137);
        s.oom_killed = true;
        s.engine_lost = true;
        let v = verdict(
            "r",
            &Outcome::Exited {
                container: "c".into(),
                status: s,
                stopped: None,
                max_runtime: None,
            },
        );
        let (ty, message) = state_of(&v);
        assert_eq!(ty, StateType::Crashed);
        assert!(message.starts_with(&crash_message(137)), "{message}");
        assert!(message.contains("(OOMKilled)") && message.contains("Engine restarted"));
        assert!(v.send_tail);
        assert_eq!(v.after, vec![(Level::Info, explain(137).resolution.into())]);
    }

    #[test]
    fn an_exit_after_a_cancel_stop_is_cancelled_whatever_the_code() {
        let v = verdict(
            "r",
            &Outcome::Exited {
                container: "happy-cat".into(),
                status: status(143),
                stopped: Some(StopReason::Cancelled),
                max_runtime: None,
            },
        );
        let (ty, message) = state_of(&v);
        assert_eq!(ty, StateType::Cancelled);
        assert_eq!(
            message,
            "Flow run was cancelled; the worker stopped its container 'happy-cat' (exit code 143)."
        );
        assert!(!v.send_tail && !v.completed);
    }

    #[test]
    fn an_exit_after_the_max_runtime_stop_is_crashed_saying_so() {
        let v = verdict(
            "r",
            &Outcome::Exited {
                container: "slow".into(),
                status: status(137),
                stopped: Some(StopReason::MaxRuntime),
                max_runtime: Some(std::time::Duration::from_secs(5)),
            },
        );
        let (ty, message) = state_of(&v);
        assert_eq!(ty, StateType::Crashed);
        assert_eq!(
            message,
            "Flow run exceeded its max_runtime of 5s; the worker stopped its container 'slow' (exit code 137)."
        );
        let over = verdict(
            "r",
            &Outcome::Exited {
                container: "c".into(),
                status: status(143),
                stopped: Some(StopReason::RunOver),
                max_runtime: None,
            },
        );
        assert!(over.report.is_none() && !over.completed);
    }

    #[test]
    fn a_deleted_deployment_cancels_once_with_force() {
        let v = verdict(
            "r1",
            &Outcome::DeploymentGone {
                deployment_id: "d1".into(),
            },
        );
        let report = v.report.as_ref().expect("reported");
        assert_eq!(report.delivery, Delivery::ForcedOnce);
        assert_eq!(report.tally, Tally::Cancelled);
        assert_eq!(
            v.before[0].1,
            "Deployment d1 no longer exists. Flow run r1 will not be submitted for execution"
        );
    }

    #[test]
    fn a_withdrawn_submission_names_the_step_that_did_not_happen() {
        let v = verdict("r1", &Outcome::Withdrawn { stage: "started" });
        let (ty, message) = state_of(&v);
        assert_eq!(ty, StateType::Cancelled);
        assert_eq!(
            message,
            "Flow run cancelled by worker while pending (before its container was started)."
        );
        assert_eq!(v.after[0].1, "Cancelled pending flow run 'r1'");
    }

    #[test]
    fn a_submission_failure_names_the_error_kind() {
        let error = SubmitError::Docker(DockerError::ImageNotFound {
            image: "nope:1".into(),
            policy: "Never",
        });
        let v = verdict(
            "r",
            &Outcome::SubmitFailed {
                run_name: "crimson-dog".into(),
                error,
            },
        );
        let (ty, message) = state_of(&v);
        assert_eq!(ty, StateType::Crashed);
        assert!(
            message.starts_with("Failed to submit flow run to infrastructure: ImageNotFound: "),
            "{message}"
        );
        assert!(v.before[0].1.contains("'crimson-dog'"));
    }

    #[test]
    fn a_lost_container_is_logged_not_reported() {
        let v = verdict(
            "r",
            &Outcome::Lost {
                run_name: "n".into(),
                error: lost(),
            },
        );
        assert!(v.report.is_none());
        assert_eq!(v.before[0].0, Level::Error);
    }

    #[test]
    fn the_wait_wins_and_engine_facts_fill_in() {
        let oom = EngineFacts {
            exit_code: Some(9),
            oom_killed: true,
        };
        let from_wait = exit_with_facts(Ok(status(3)), oom).expect("known");
        assert_eq!((from_wait.code, from_wait.oom_killed), (3, true));
        let from_events = exit_with_facts(Err(lost()), oom).expect("from the event");
        assert_eq!(from_events.code, 9);
        assert!(!from_events.engine_lost);
        assert!(exit_with_facts(Err(lost()), EngineFacts::default()).is_err());
    }
}
