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
    },
    /// Its container exited.
    Exited {
        /// The container's name.
        container: String,
        /// How.
        status: ExitStatus,
        /// The worker had stopped it for a cancellation.
        stopped_for_cancel: bool,
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

/// The policy: what `outcome` of run `run_id` means for Prefect.
pub(crate) fn verdict(run_id: &str, outcome: &Outcome) -> Verdict {
    match outcome {
        Outcome::DeploymentGone { deployment_id } => Verdict {
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
        },
        Outcome::SubmitFailed { run_name, error } => Verdict {
            before: vec![(
                Level::Error,
                format!("Failed to submit flow run '{run_name}' to infrastructure: {error}"),
            )],
            report: Some(crashed(format!(
                "Failed to submit flow run to infrastructure: {}: {error}",
                error.kind()
            ))),
            ..Verdict::default()
        },
        Outcome::Withdrawn { stage } => Verdict {
            report: Some(Report {
                proposal: StateProposal::cancelled(format!(
                    "Flow run cancelled by worker while pending (before its container was {stage})."
                )),
                delivery: Delivery::Reliable,
                tally: Tally::Cancelled,
            }),
            after: vec![(
                Level::Info,
                format!("Cancelled pending flow run '{run_id}'"),
            )],
            ..Verdict::default()
        },
        Outcome::NeverStarted { container } => Verdict {
            report: Some(crashed(format!(
                "Failed to submit flow run to infrastructure: WorkerInterrupted: the worker stopped after creating container '{container}' and before starting it"
            ))),
            ..Verdict::default()
        },
        Outcome::Exited {
            container,
            status,
            stopped_for_cancel,
        } => exited(container, status, *stopped_for_cancel),
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

fn crashed(message: String) -> Report {
    Report {
        proposal: StateProposal::crashed(message),
        delivery: Delivery::Reliable,
        tally: Tally::Crashed,
    }
}

fn exited(container: &str, status: &ExitStatus, stopped_for_cancel: bool) -> Verdict {
    if stopped_for_cancel {
        return Verdict {
            report: Some(Report {
                proposal: StateProposal::cancelled(format!(
                    "Flow run was cancelled; the worker stopped its container '{container}' (exit code {}).",
                    status.code
                )),
                delivery: Delivery::Reliable,
                tally: Tally::Cancelled,
            }),
            ..Verdict::default()
        };
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
    fn a_clean_exit_reports_nothing_and_counts_completed() {
        let v = verdict(
            "r",
            &Outcome::Exited {
                container: "c".into(),
                status: status(0),
                stopped_for_cancel: false,
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
                stopped_for_cancel: false,
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
                stopped_for_cancel: true,
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
