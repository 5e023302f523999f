//! The run registry: every flow run this process handles, from the moment a poll admits it
//! (or adoption finds its container) until its outcome is reported, with its phase as a value.
//!
//! It is the one place that answers "is this run ours?", "how many slots are taken?" and "what
//! does a cancellation of this run mean right now?". Admission hands out a [`RunGuard`]; its
//! `Drop` removes the entry, frees the `--limit` slot and wakes a poll that had to leave runs
//! behind, so no path (an early return, a panic, a shutdown) can forget one of those steps.
//! The lock is held only for a map operation, never across an await (mini-redis's `Db`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Where a run is in its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Admitted from a poll; the claim (Pending) is being proposed and checked.
    Claiming {
        /// A cancellation arrived: withdraw before the next step.
        cancel_requested: bool,
    },
    /// Claimed: configuration, pull, create and start.
    Submitting {
        /// A cancellation arrived: withdraw before the next step; a container created in
        /// between is removed and none is ever started.
        cancel_requested: bool,
    },
    /// Its container runs and is watched.
    Watching {
        /// The container's id.
        container: String,
        /// The worker is stopping it, and why (which decides what its exit means).
        stopping: Option<StopReason>,
    },
    /// The watch ended; the outcome is being reported.
    Reporting,
    /// The run is over in Prefect but its container still ran: the worker is stopping it.
    Stopping {
        /// The container's id.
        container: String,
    },
}

/// Why the worker stops a watched container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// The run was cancelled: its exit means Cancelled.
    Cancelled,
    /// It ran longer than its `max_runtime`: its exit means Crashed, saying so.
    MaxRuntime,
    /// Its run is already final (set from outside): nothing more to report.
    RunOver,
}

/// What a cancellation of a run asks the worker to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CancelAction {
    /// The run is being claimed or submitted: its submission withdraws at its next step.
    Withdraw,
    /// Stop this container (SIGTERM, then SIGKILL after the grace period).
    Stop {
        /// The container's id.
        container: String,
    },
    /// Nothing: not ours, already being cancelled, or already reporting.
    Nothing,
}

/// The answer to a poll's request to take a run on.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Taken on; the guard holds the slot.
    Admitted(RunGuard),
    /// Every `--limit` slot is taken (the next freed slot wakes the poll).
    AtLimit,
    /// This process already handles the run.
    AlreadyHeld,
}

#[derive(Debug, Default)]
struct Inner {
    runs: HashMap<String, Phase>,
    /// A poll left due runs behind for lack of a slot.
    saturated: bool,
}

/// Every run this process handles, by flow-run id.
#[derive(Debug)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
    /// `--limit`: runs handled at once (adopted ones included).
    limit: Option<usize>,
    /// Wakes the poll loop before its interval (a slot freed after saturation, fast pickup).
    wake: Notify,
    /// Signalled whenever the registry becomes empty (`--run-once`, drain).
    emptied: Notify,
    /// Turns to pull, create and start (`--max-concurrent-submissions`).
    pub submissions: super::admission::Submissions,
    /// The GPUs handed out one run at a time (`--gpu-devices`).
    pub gpus: Arc<super::admission::GpuPool>,
}

impl Registry {
    /// An empty registry with `limit` slots (`None` = unlimited), eight submissions at once and
    /// no GPUs to hand out.
    #[cfg(test)]
    pub fn new(limit: Option<usize>) -> Arc<Self> {
        Self::with_admission(limit, &super::admission::HostAdmission::new(8, &[]))
    }

    /// An empty registry with `limit` slots that takes its turns to submit and its GPUs from
    /// the host's shares.
    pub fn with_admission(
        limit: Option<usize>,
        host: &super::admission::HostAdmission,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            limit,
            wake: Notify::new(),
            emptied: Notify::new(),
            submissions: host.submissions.clone(),
            gpus: Arc::clone(&host.gpus),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves a consistent map (every critical section is
        // one map operation), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a polled run on, if a slot is free and it is not already held.
    pub fn admit(self: &Arc<Self>, run_id: &str) -> Admission {
        let mut inner = self.lock();
        if inner.runs.contains_key(run_id) {
            return Admission::AlreadyHeld;
        }
        if self.limit.is_some_and(|limit| inner.runs.len() >= limit) {
            inner.saturated = true;
            return Admission::AtLimit;
        }
        inner.runs.insert(
            run_id.to_owned(),
            Phase::Claiming {
                cancel_requested: false,
            },
        );
        Admission::Admitted(self.guard(run_id))
    }

    /// A poll's answer was cut at the limit it asked for, so due runs may have been left
    /// behind: the next freed slot polls at once, as when `admit` refused one.
    pub fn answer_was_cut(&self) {
        self.lock().saturated = true;
    }

    /// Takes on a run whose container already exists (adoption after a restart) in `phase`,
    /// whatever the limit: the container runs whether or not a slot is free, and it holds one
    /// until it is reported. `None` when the run is already held.
    pub fn adopt(self: &Arc<Self>, run_id: &str, phase: Phase) -> Option<RunGuard> {
        let mut inner = self.lock();
        if inner.runs.contains_key(run_id) {
            return None;
        }
        inner.runs.insert(run_id.to_owned(), phase);
        Some(self.guard(run_id))
    }

    fn guard(self: &Arc<Self>, run_id: &str) -> RunGuard {
        RunGuard {
            registry: Arc::clone(self),
            run_id: run_id.to_owned(),
        }
    }

    /// What a cancellation of `run_id` means now, recording it (so a second one for the same
    /// run does nothing).
    pub fn cancel(&self, run_id: &str) -> CancelAction {
        let mut inner = self.lock();
        match inner.runs.get_mut(run_id) {
            Some(Phase::Claiming { cancel_requested } | Phase::Submitting { cancel_requested })
                if !*cancel_requested =>
            {
                *cancel_requested = true;
                CancelAction::Withdraw
            }
            Some(Phase::Watching {
                container,
                stopping: stopping @ None,
            }) => {
                *stopping = Some(StopReason::Cancelled);
                CancelAction::Stop {
                    container: container.clone(),
                }
            }
            _ => CancelAction::Nothing,
        }
    }

    /// Marks a watched run's container as being stopped for `reason`; its id when it was not
    /// already being stopped (so it is stopped once, for the first reason).
    pub fn stop(&self, run_id: &str, reason: StopReason) -> Option<String> {
        let mut inner = self.lock();
        match inner.runs.get_mut(run_id) {
            Some(Phase::Watching {
                container,
                stopping: stopping @ None,
            }) => {
                *stopping = Some(reason);
                Some(container.clone())
            }
            _ => None,
        }
    }

    /// The run's phase, if it is held.
    pub fn phase(&self, run_id: &str) -> Option<Phase> {
        self.lock().runs.get(run_id).cloned()
    }

    /// Whether the run is held (claimed, submitted, watched or being reported).
    pub fn holds(&self, run_id: &str) -> bool {
        self.lock().runs.contains_key(run_id)
    }

    /// Every held run's id.
    pub fn run_ids(&self) -> Vec<String> {
        self.lock().runs.keys().cloned().collect()
    }

    /// How many runs are held.
    pub fn len(&self) -> usize {
        self.lock().runs.len()
    }

    /// Wakes the poll loop now (a run became due).
    pub fn wake_poll(&self) {
        self.wake.notify_one();
    }

    /// Resolves when something wants a poll before the interval.
    pub async fn poll_wanted(&self) {
        self.wake.notified().await;
    }

    /// Resolves once no run is held.
    pub async fn until_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            // Registered before the check, so an emptying in between is not missed.
            emptied.as_mut().enable();
            if self.len() == 0 {
                return;
            }
            emptied.await;
        }
    }

    fn set(&self, run_id: &str, phase: Phase) {
        if let Some(entry) = self.lock().runs.get_mut(run_id) {
            *entry = phase;
        }
    }

    fn release(&self, run_id: &str) {
        let (saturated, empty) = {
            let mut inner = self.lock();
            inner.runs.remove(run_id);
            (std::mem::take(&mut inner.saturated), inner.runs.is_empty())
        };
        if saturated {
            self.wake.notify_one();
        }
        if empty {
            self.emptied.notify_waiters();
        }
    }
}

/// A run's hold on the registry. Moving it through the phases goes through its methods;
/// dropping it releases the run.
#[derive(Debug)]
pub(crate) struct RunGuard {
    registry: Arc<Registry>,
    run_id: String,
}

impl RunGuard {
    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The claim stood: on to submission (a cancellation already asked for is kept).
    pub fn claimed(&self) {
        let cancel_requested = self.cancel_requested();
        self.registry
            .set(&self.run_id, Phase::Submitting { cancel_requested });
    }

    /// Whether the submission should withdraw before its next step.
    pub fn cancel_requested(&self) -> bool {
        matches!(
            self.registry.phase(&self.run_id),
            Some(
                Phase::Claiming {
                    cancel_requested: true
                } | Phase::Submitting {
                    cancel_requested: true
                }
            )
        )
    }

    /// The run was found cancelled by the submission itself (its Submitting state refused).
    pub fn request_cancel(&self) {
        let _ = self.registry.cancel(&self.run_id);
    }

    /// The container runs and is watched now. A cancellation that arrived during the
    /// submission comes back as [`CancelAction::Stop`], so the caller stops it at once.
    pub fn watching(&self, container: &str) -> CancelAction {
        let cancelled = self.cancel_requested();
        self.registry.set(
            &self.run_id,
            Phase::Watching {
                container: container.to_owned(),
                stopping: cancelled.then_some(StopReason::Cancelled),
            },
        );
        if cancelled {
            CancelAction::Stop {
                container: container.to_owned(),
            }
        } else {
            CancelAction::Nothing
        }
    }

    /// The watch ended; returns why the worker had stopped the container, if it had.
    pub fn reporting(&self) -> Option<StopReason> {
        let stopping = match self.registry.phase(&self.run_id) {
            Some(Phase::Watching { stopping, .. }) => stopping,
            _ => None,
        };
        self.registry.set(&self.run_id, Phase::Reporting);
        stopping
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.registry.release(&self.run_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(registry: &Arc<Registry>, id: &str) -> RunGuard {
        match registry.admit(id) {
            Admission::Admitted(guard) => guard,
            other => panic!("{id} not admitted: {other:?}"),
        }
    }

    #[test]
    fn the_limit_counts_every_held_run_and_a_drop_frees_a_slot() {
        let registry = Registry::new(Some(2));
        let a = admitted(&registry, "a");
        let _adopted = registry.adopt("b", Phase::Reporting).expect("adopted");
        assert!(matches!(registry.admit("c"), Admission::AtLimit));
        drop(a);
        assert_eq!(registry.len(), 1);
        let _c = admitted(&registry, "c");
        assert!(matches!(registry.admit("c"), Admission::AlreadyHeld));
    }

    #[test]
    fn a_freed_slot_wakes_the_poll_only_after_saturation() {
        use futures_util::FutureExt as _;
        let registry = Registry::new(Some(1));
        let a = admitted(&registry, "a");
        drop(a);
        // Not saturated: no wake-up is pending (a pending one resolves on the first poll).
        assert!(registry.poll_wanted().now_or_never().is_none());
        let b = admitted(&registry, "b");
        assert!(matches!(registry.admit("c"), Admission::AtLimit));
        drop(b);
        assert!(registry.poll_wanted().now_or_never().is_some());
        assert!(registry.poll_wanted().now_or_never().is_none(), "once");
        // An answer cut at the limit asked for counts as saturation too.
        let d = admitted(&registry, "d");
        registry.answer_was_cut();
        drop(d);
        assert!(registry.poll_wanted().now_or_never().is_some());
    }

    #[test]
    fn adoption_ignores_the_limit_but_not_a_held_run() {
        let registry = Registry::new(Some(1));
        let _a = admitted(&registry, "a");
        let _b = registry
            .adopt("b", Phase::Reporting)
            .expect("over the limit");
        assert!(registry.adopt("a", Phase::Reporting).is_none());
    }

    #[test]
    fn cancelling_a_submission_withdraws_it_once() {
        let registry = Registry::new(None);
        let guard = admitted(&registry, "a");
        assert_eq!(registry.cancel("a"), CancelAction::Withdraw);
        assert_eq!(registry.cancel("a"), CancelAction::Nothing);
        guard.claimed();
        assert!(guard.cancel_requested(), "kept across the claim");
        assert_eq!(
            guard.watching("c1"),
            CancelAction::Stop {
                container: "c1".into()
            }
        );
        assert_eq!(
            guard.reporting(),
            Some(StopReason::Cancelled),
            "its exit means Cancelled"
        );
    }

    #[test]
    fn cancelling_a_watched_run_stops_its_container_once() {
        let registry = Registry::new(None);
        let guard = admitted(&registry, "a");
        guard.claimed();
        assert_eq!(guard.watching("c1"), CancelAction::Nothing);
        assert_eq!(
            registry.cancel("a"),
            CancelAction::Stop {
                container: "c1".into()
            }
        );
        assert_eq!(registry.cancel("a"), CancelAction::Nothing);
        assert_eq!(
            registry.stop("a", StopReason::MaxRuntime),
            None,
            "stopped once"
        );
        assert_eq!(guard.reporting(), Some(StopReason::Cancelled));
        assert_eq!(registry.cancel("a"), CancelAction::Nothing);
    }

    #[test]
    fn unknown_runs_and_reporting_runs_need_nothing() {
        let registry = Registry::new(None);
        assert_eq!(registry.cancel("nope"), CancelAction::Nothing);
        let guard = admitted(&registry, "a");
        guard.claimed();
        assert_eq!(guard.watching("c"), CancelAction::Nothing);
        assert_eq!(guard.reporting(), None, "not stopped by the worker");
        assert_eq!(registry.cancel("a"), CancelAction::Nothing);
    }

    #[tokio::test]
    async fn until_empty_waits_for_the_last_guard() {
        let registry = Registry::new(None);
        registry.until_empty().await; // empty already
        let a = admitted(&registry, "a");
        let waiter = {
            let registry = Arc::clone(&registry);
            tokio::spawn(async move { registry.until_empty().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        waiter.await.expect("waiter ended");
        assert_eq!(registry.len(), 0);
    }
}
