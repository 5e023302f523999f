//! The reconcile pass: Prefect's view of the pool's runs and this Docker host's containers are
//! compared, and every disagreement is resolved — the same code at start-up (where it adopts
//! what an earlier process left) and every `--reconcile-interval`, in the manner of
//! kube-runtime's controller.
//!
//! One pass reads the pool's live runs (one filtered read: Pending, Running, Cancelling,
//! Paused) and then lists the pool's containers on this host (one list call); the registry is
//! looked at last, so a run this process takes on meanwhile is never mistaken for an orphan.
//! [`plan`] turns what was seen into [`Fix`]es, purely; each fix may read a little more
//! (a run's history, the pool's workers) before it acts, and only when it has to.
//!
//! | seen | fix |
//! |---|---|
//! | a container of a live run, watched by nobody here | adopt it (unless another worker that is online made it) |
//! | a running container whose run is not live | read the run; final for longer than `--orphan-grace` → stop it |
//! | a live run whose `infrastructure_pid` names this host's Engine, no such container | Crashed: removed outside the worker |
//!
//! A pid of a unix socket (`http+docker://localhost`, as docker-py writes it) reads the same on
//! every machine, so it names this host's Engine only if the run's claimer (label, claim
//! message, or else its history) is this worker or a worker whose containers are on this Engine
//! too; otherwise the run is another machine's.
//! | a Pending run with no pid and no container here, claimed by this worker | Rescheduled: the container was never created |
//! | the same, claimed by a worker offline longer than `--orphan-claim-timeout` | Crashed (or Rescheduled with `--reschedule-orphans`) |

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::infra_pid::InfrastructurePid;
use super::lifecycle::{self, claim::claimer_of};
use super::policy::Outcome;
use super::registry::{Phase, StopReason};
use super::{PoolRef, Worker};
use crate::backoff;
use crate::docker::ListedContainer;
use crate::job::labels;
use crate::prefect::{ApiError, FlowRun, State, StateProposal, StateType, WorkPool, WorkerStatus};

/// The run states one pass reads: the runs that have, or may have, a container.
pub(crate) const READ_STATES: [StateType; 4] = [
    StateType::Pending,
    StateType::Running,
    StateType::Cancelling,
    StateType::Paused,
];

/// States in which a run's recorded container must exist. A Paused run's container may
/// legitimately be gone (a suspended flow exits).
fn container_expected(state: Option<StateType>) -> bool {
    matches!(
        state,
        Some(StateType::Pending | StateType::Running | StateType::Cancelling)
    )
}

/// What one pass saw.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// The pool's runs in [`READ_STATES`].
    pub runs: Vec<FlowRun>,
    /// This host's containers of the pool.
    pub containers: Vec<ListedContainer>,
    /// Runs this process handles (looked at after both reads).
    pub held: HashSet<String>,
}

/// A disagreement and how it is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fix {
    /// A container of a live run that nobody here watches.
    Adopt {
        run_id: String,
        container_id: String,
        /// The worker that created it (its label).
        owner: Option<String>,
    },
    /// A running container whose run is not live: read the run, stop the container if the
    /// run is final and has been for longer than the orphan grace.
    CheckOrphan {
        run_id: String,
        container_id: String,
        /// This process watches it.
        held: bool,
    },
    /// The run records a container on this host that no longer exists.
    Vanished {
        run_id: String,
        container_id: String,
        /// Who claimed the run, as far as the run says.
        claimer: Option<String>,
    },
    /// The same for a unix-socket pid whose claimer the run does not say (its label not sent
    /// yet, a Submitting state): vanished only if its history names a claimer in `here` (this
    /// worker, or one whose containers are on this Engine); else another machine's run.
    VanishedIfClaimedHere {
        run_id: String,
        container_id: String,
        /// The workers known to use this Engine, sorted.
        here: Vec<String>,
    },
    /// A Pending run with no container recorded and none on this host.
    StaleClaim {
        run_id: String,
        /// Who claimed it, as far as the run's current state and labels say.
        claimer: Option<String>,
    },
}

/// Who claimed a run, from its labels (set right after a claim) or its claim message.
fn claimer(run: &FlowRun) -> Option<String> {
    run.label("prefect.worker.name")
        .map(str::to_owned)
        .or_else(|| run.state.as_ref().and_then(claimer_of).map(str::to_owned))
}

/// The fixes for what one pass saw by the worker `me`, on the Engine at `base_url`.
pub(crate) fn plan(snapshot: &Snapshot, base_url: &str, me: &str) -> Vec<Fix> {
    // Workers known to use this Engine: this one, and those whose containers are here.
    let here: HashSet<&str> = snapshot
        .containers
        .iter()
        .filter_map(|c| c.labels.get(labels::WORKER_NAME).map(String::as_str))
        .chain([me])
        .collect();
    let live: HashMap<&str, &FlowRun> = snapshot.runs.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut fixes = Vec::new();
    let mut with_container: HashSet<&str> = HashSet::new();
    for c in &snapshot.containers {
        let Some(run_id) = c.labels.get(labels::FLOW_RUN_ID) else {
            continue;
        };
        with_container.insert(run_id);
        let held = snapshot.held.contains(run_id);
        let fix = match (live.get(run_id.as_str()), held) {
            (Some(_), true) => continue,
            (Some(_), false) => Fix::Adopt {
                run_id: run_id.clone(),
                container_id: c.container.id.clone(),
                owner: c.labels.get(labels::WORKER_NAME).cloned(),
            },
            (None, held) if c.running => Fix::CheckOrphan {
                run_id: run_id.clone(),
                container_id: c.container.id.clone(),
                held,
            },
            // An exited container of a run that is over: garbage collection's business.
            (None, _) => continue,
        };
        if !fixes.iter().any(|f| fix_run(f) == run_id) {
            fixes.push(fix);
        }
    }
    for run in &snapshot.runs {
        if snapshot.held.contains(&run.id) || with_container.contains(run.id.as_str()) {
            continue;
        }
        if !container_expected(run.state_type()) {
            continue;
        }
        match run
            .infrastructure_pid
            .as_deref()
            .map(InfrastructurePid::parse)
        {
            Some(Some(pid)) if pid.is_on(base_url) => match claimer(run) {
                claimer if !pid.is_machine_local() => fixes.push(Fix::Vanished {
                    run_id: run.id.clone(),
                    container_id: pid.container_id().to_owned(),
                    claimer,
                }),
                Some(claimer) if here.contains(claimer.as_str()) => fixes.push(Fix::Vanished {
                    run_id: run.id.clone(),
                    container_id: pid.container_id().to_owned(),
                    claimer: Some(claimer),
                }),
                Some(_) => {}
                None => {
                    let mut here: Vec<String> = here.iter().map(|w| (*w).to_owned()).collect();
                    here.sort();
                    fixes.push(Fix::VanishedIfClaimedHere {
                        run_id: run.id.clone(),
                        container_id: pid.container_id().to_owned(),
                        here,
                    });
                }
            },
            // Another host's container (a socket pid of a worker not seen on this Engine is
            // another machine's), or a pid this worker did not write.
            Some(_) => {}
            None if run.state_type() == Some(StateType::Pending) => {
                fixes.push(Fix::StaleClaim {
                    run_id: run.id.clone(),
                    claimer: claimer(run),
                });
            }
            None => {}
        }
    }
    fixes
}

fn fix_run(fix: &Fix) -> &str {
    match fix {
        Fix::Adopt { run_id, .. }
        | Fix::CheckOrphan { run_id, .. }
        | Fix::Vanished { run_id, .. }
        | Fix::VanishedIfClaimedHere { run_id, .. }
        | Fix::StaleClaim { run_id, .. } => run_id,
    }
}

/// The pool's workers, read once per pass and only if a fix needs them.
struct Workers(Option<Vec<WorkerStatus>>);

impl Workers {
    async fn get(&mut self, worker: &Worker, pool: &str) -> Result<&[WorkerStatus], ApiError> {
        if self.0.is_none() {
            self.0 = Some(worker.api.pool_workers(pool).await?);
        }
        Ok(self.0.as_deref().unwrap_or_default())
    }
}

/// Whether `name` is a worker the server sees online.
fn is_online(workers: &[WorkerStatus], name: &str) -> bool {
    workers.iter().any(|w| w.name == name && w.online)
}

fn parse_time(text: Option<&str>) -> Option<DateTime<Utc>> {
    text.and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// How long ago `since` was (zero for a future or unknown time).
fn age(since: Option<DateTime<Utc>>) -> Duration {
    since
        .and_then(|t| (Utc::now() - t).to_std().ok())
        .unwrap_or_default()
}

impl Worker {
    /// Reconciles now, then every `--reconcile-interval` until `shutdown`.
    pub(super) async fn reconcile_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let interval = self.settings.convergence.reconcile_interval;
        while backoff::sleep(interval, &shutdown).await {
            let Some(pool) = self.current_pool() else {
                continue;
            };
            if self.lifetime.draining() {
                // Adopting now would only keep this worker from exiting: the next one will.
                continue;
            }
            if let Err(e) = self.reconcile(&pool).await {
                self.out.metrics.api_error(&e);
                tracing::warn!(error = %e, "reconcile pass failed; will try again");
            }
        }
    }

    /// One pass: read, list, plan, fix.
    ///
    /// # Errors
    /// An API error of the reads (the next pass tries again); a Docker listing failure is
    /// only logged.
    pub(crate) async fn reconcile(self: &Arc<Self>, pool: &WorkPool) -> Result<(), ApiError> {
        let runs = self
            .api
            .read_pool_flow_runs(&pool.name, &READ_STATES)
            .await?;
        let label = format!("{}={}", labels::WORK_POOL_NAME, pool.name);
        let containers = match self.docker.list_labelled(&[label]).await {
            Ok(containers) => containers,
            Err(e) => {
                self.out.metrics.docker_error(&e);
                tracing::warn!(error = %e, "could not list this pool's containers; reconcile skipped");
                return Ok(());
            }
        };
        let snapshot = Snapshot {
            runs,
            containers,
            held: self.registry.run_ids().into_iter().collect(),
        };
        let fixes = plan(&snapshot, self.docker.base_url(), self.name());
        let runs: HashMap<String, FlowRun> = snapshot
            .runs
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let mut workers = Workers(None);
        for fix in fixes {
            tracing::debug!(?fix, "reconciling");
            self.apply_fix(fix, &runs, pool, &mut workers).await?;
        }
        Ok(())
    }

    async fn apply_fix(
        self: &Arc<Self>,
        fix: Fix,
        runs: &HashMap<String, FlowRun>,
        pool: &WorkPool,
        workers: &mut Workers,
    ) -> Result<(), ApiError> {
        match fix {
            Fix::Adopt {
                run_id,
                container_id,
                owner,
            } => {
                if let Some(owner) = owner.filter(|o| o != self.name())
                    && is_online(workers.get(self, &pool.name).await?, &owner)
                {
                    tracing::debug!(flow_run_id = %run_id, owner, "container belongs to a live worker; not adopting");
                    return Ok(());
                }
                if let Some(run) = runs.get(&run_id) {
                    self.adopt(run.clone(), &container_id, pool).await;
                }
            }
            Fix::CheckOrphan {
                run_id,
                container_id,
                held,
            } => self.check_orphan(&run_id, &container_id, held).await?,
            Fix::Vanished {
                run_id,
                container_id,
                claimer,
            } => {
                if let Some(claimer) = claimer.filter(|c| c != self.name())
                    && is_online(workers.get(self, &pool.name).await?, &claimer)
                {
                    return Ok(());
                }
                if let Some(run) = runs.get(&run_id) {
                    self.report_vanished(run, &container_id).await;
                }
            }
            Fix::VanishedIfClaimedHere {
                run_id,
                container_id,
                here,
            } => {
                // One read of the history, only for a run whose claimer nothing else says.
                let Some(claimer) = self.claimer_from_history(&run_id).await? else {
                    return Ok(()); // a claim naming no worker: another machine's, perhaps Python's
                };
                if !here.contains(&claimer) {
                    return Ok(()); // another machine's
                }
                if claimer != self.name()
                    && is_online(workers.get(self, &pool.name).await?, &claimer)
                {
                    return Ok(());
                }
                if let Some(run) = runs.get(&run_id) {
                    self.report_vanished(run, &container_id).await;
                }
            }
            Fix::StaleClaim { run_id, claimer } => {
                self.settle_stale_claim(&run_id, claimer, pool, workers)
                    .await?;
            }
        }
        Ok(())
    }

    /// Takes up a container nobody here watches (see [`lifecycle::adopt`]).
    async fn adopt(self: &Arc<Self>, run: FlowRun, container_id: &str, pool: &WorkPool) {
        let found = match self.docker.inspect_found(container_id).await {
            Ok(Some(found)) => found,
            Ok(None) => return, // removed meanwhile: the next pass sees that
            Err(e) => {
                tracing::warn!(error = %e, flow_run_id = %run.id, "could not inspect a container to adopt");
                return;
            }
        };
        let phase = if found.running {
            Phase::Watching {
                container: found.container.id.clone(),
                stopping: None,
            }
        } else {
            Phase::Reporting
        };
        let Some(guard) = self.registry.adopt(&run.id, phase) else {
            return;
        };
        let worker = Arc::clone(self);
        let pool = PoolRef::of(pool);
        self.tasks.spawn(async move {
            lifecycle::adopt(&worker, run, found, guard, pool).await;
        });
    }

    /// Stops a running container whose run has been final for longer than the orphan grace.
    async fn check_orphan(
        self: &Arc<Self>,
        run_id: &str,
        container_id: &str,
        held: bool,
    ) -> Result<(), ApiError> {
        if !self.settings.convergence.stop_orphans {
            return Ok(());
        }
        let run = match self.api.read_flow_run(run_id).await {
            Ok(run) => run,
            // A run the API does not know may be another server's: never touched.
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(state) = run.state.as_ref().filter(|s| s.state_type.is_final()) else {
            return Ok(());
        };
        let over_for = age(parse_time(state.timestamp.as_deref()));
        if over_for < self.settings.convergence.orphan_grace {
            return Ok(());
        }
        let container = if held {
            match self.registry.stop(run_id, StopReason::RunOver) {
                Some(container) => container,
                None => return Ok(()),
            }
        } else {
            container_id.to_owned()
        };
        self.stop_orphan(run_id, state, container, over_for);
        Ok(())
    }

    /// Stops an orphan container in the background (SIGTERM, then SIGKILL after the cancel
    /// grace), logging it to the run and counting it.
    fn stop_orphan(
        self: &Arc<Self>,
        run_id: &str,
        state: &State,
        container: String,
        over_for: Duration,
    ) {
        // A container nobody watches is held while it is stopped, so the next pass does not
        // stop it again.
        let guard = self.registry.adopt(
            run_id,
            Phase::Stopping {
                container: container.clone(),
            },
        );
        let grace = self.settings.cancellation.grace;
        self.out.logs.info(
            run_id,
            format!(
                "Container '{}' of flow run '{run_id}' was still running {} s after the run became {}; stopping it (grace period {} s)",
                short(&container),
                over_for.as_secs(),
                state.name.as_deref().unwrap_or(state.state_type.as_str()),
                grace.as_secs()
            ),
        );
        self.out.metrics.orphans_stopped.inc();
        let worker = Arc::clone(self);
        let run_id = run_id.to_owned();
        self.tasks.spawn(async move {
            if let Err(e) = worker.docker.stop_container(&container, grace).await {
                worker.out.metrics.docker_error(&e);
                tracing::warn!(error = %e, flow_run_id = %run_id, "could not stop an orphaned container");
            }
            drop(guard);
        });
    }

    /// A live run whose container on this host is gone: Crashed (Cancelled when it was being
    /// cancelled anyway).
    async fn report_vanished(&self, run: &FlowRun, container_id: &str) {
        let outcome = Outcome::Vanished {
            container: short(container_id).to_owned(),
            host: self.docker.base_url().to_owned(),
            cancelling: run.state_type() == Some(StateType::Cancelling),
        };
        lifecycle::report::conclude(self, &run.id, &outcome).await;
    }

    /// A Pending run with no container: rescheduled when this worker claimed it; ended when
    /// its claimer has been offline too long; otherwise left alone.
    async fn settle_stale_claim(
        &self,
        run_id: &str,
        claimer: Option<String>,
        pool: &WorkPool,
        workers: &mut Workers,
    ) -> Result<(), ApiError> {
        let claimer = match claimer {
            Some(claimer) => claimer,
            None => match self.claimer_from_history(run_id).await? {
                Some(claimer) => claimer,
                // A claim nothing attributes (another kind of worker): never touched.
                None => return Ok(()),
            },
        };
        let orphaned = if claimer == self.name() {
            None
        } else {
            let statuses = workers.get(self, &pool.name).await?;
            if is_online(statuses, &claimer) {
                return Ok(());
            }
            let heartbeat = statuses
                .iter()
                .find(|w| w.name == claimer)
                .and_then(|w| w.last_heartbeat);
            let offline_for = age(heartbeat);
            if offline_for < self.settings.convergence.orphan_claim_timeout {
                return Ok(());
            }
            Some(offline_for)
        };
        // Checked again right before acting: still Pending, still no container recorded,
        // and not taken on by this process meanwhile.
        let run = self.api.read_flow_run(run_id).await?;
        if run.state_type() != Some(StateType::Pending)
            || run.infrastructure_pid.is_some()
            || self.registry.holds(run_id)
        {
            return Ok(());
        }
        let outcome = match orphaned {
            None => Outcome::Rescheduled {
                claimer,
                host: self.docker.base_url().to_owned(),
            },
            Some(offline_for) => Outcome::OrphanedClaim {
                claimer,
                offline_for,
                reschedule: self.settings.convergence.reschedule_orphans,
            },
        };
        lifecycle::report::conclude(self, run_id, &outcome).await;
        Ok(())
    }

    /// The claimer recorded in the run's history (the newest claim message), for a run whose
    /// current state no longer carries it (Submitting) and which has no labels.
    async fn claimer_from_history(&self, run_id: &str) -> Result<Option<String>, ApiError> {
        let states = self.api.read_flow_run_states(run_id).await?;
        Ok(states.iter().rev().find_map(claimer_of).map(str::to_owned))
    }
}

/// The short id Docker shows.
fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// A reschedule proposal: back to Scheduled, due now, named so the UI says why.
pub(crate) fn reschedule(message: String) -> StateProposal {
    StateProposal {
        state_type: StateType::Scheduled,
        name: "Rescheduled".into(),
        message: Some(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::CreatedContainer;
    use serde_json::json;

    const HOST: &str = "http+docker://localhost";

    fn run(id: &str, state: &str, name: &str, message: Option<&str>, pid: Option<&str>) -> FlowRun {
        FlowRun::from_value(json!({
            "id": id, "flow_id": "f", "infrastructure_pid": pid,
            "state": {"id": format!("s-{id}"), "type": state, "name": name, "message": message},
        }))
        .expect("run")
    }

    fn container(id: &str, run_id: &str, running: bool) -> ListedContainer {
        ListedContainer {
            container: CreatedContainer {
                id: id.into(),
                name: None,
                created_at: 0,
            },
            labels: [
                (labels::FLOW_RUN_ID.to_owned(), run_id.to_owned()),
                (labels::WORKER_NAME.to_owned(), "me".to_owned()),
            ]
            .into(),
            running,
        }
    }

    #[test]
    fn an_unwatched_container_of_a_live_run_is_adopted() {
        let snapshot = Snapshot {
            runs: vec![run("r1", "RUNNING", "Running", None, Some("x"))],
            containers: vec![container("c1", "r1", true)],
            held: HashSet::new(),
        };
        assert_eq!(
            plan(&snapshot, HOST, "me"),
            [Fix::Adopt {
                run_id: "r1".into(),
                container_id: "c1".into(),
                owner: Some("me".into())
            }]
        );
    }

    #[test]
    fn held_runs_and_exited_containers_of_final_runs_need_nothing() {
        let snapshot = Snapshot {
            runs: vec![run("r1", "RUNNING", "Running", None, None)],
            containers: vec![container("c1", "r1", true), container("c2", "r2", false)],
            held: ["r1".to_owned()].into(),
        };
        assert!(plan(&snapshot, HOST, "me").is_empty());
    }

    #[test]
    fn a_running_container_of_a_run_that_is_not_live_is_checked_held_or_not() {
        let snapshot = Snapshot {
            runs: vec![],
            containers: vec![container("c1", "r1", true), container("c2", "r2", true)],
            held: ["r2".to_owned()].into(),
        };
        assert_eq!(
            plan(&snapshot, HOST, "me"),
            [
                Fix::CheckOrphan {
                    run_id: "r1".into(),
                    container_id: "c1".into(),
                    held: false
                },
                Fix::CheckOrphan {
                    run_id: "r2".into(),
                    container_id: "c2".into(),
                    held: true
                },
            ]
        );
    }

    /// A Running run claimed by `claimer` (its `prefect.worker.name` label), recorded at `pid`.
    fn claimed_run(id: &str, claimer: Option<&str>, pid: &str) -> FlowRun {
        FlowRun::from_value(json!({
            "id": id, "flow_id": "f", "infrastructure_pid": pid,
            "labels": claimer.map_or(json!({}), |c| json!({"prefect.worker.name": c})),
            "state": {"id": format!("s-{id}"), "type": "RUNNING", "name": "Running"},
        }))
        .expect("run")
    }

    #[test]
    fn a_recorded_container_missing_from_this_host_vanished_but_another_hosts_is_left() {
        let mut peers = container("c9", "r9", true);
        peers
            .labels
            .insert(labels::WORKER_NAME.to_owned(), "peer".to_owned());
        let snapshot = Snapshot {
            runs: vec![
                claimed_run("r1", Some("me"), "http+docker://localhost:c1"),
                run(
                    "r2",
                    "RUNNING",
                    "Running",
                    None,
                    Some("https://10.0.0.9:2376:c2"),
                ),
                run(
                    "r3",
                    "PAUSED",
                    "Suspended",
                    None,
                    Some("http+docker://localhost:c3"),
                ),
                // A worker sharing this Engine (its container is here).
                claimed_run("r4", Some("peer"), "http+docker://localhost:c4"),
                // The same socket pid written on other machines: not this Engine's.
                claimed_run("r5", Some("elsewhere"), "http+docker://localhost:c5"),
                claimed_run("r6", None, "http+docker://localhost:c6"),
                // An address that names one Engine is this one whoever claimed the run.
                claimed_run("r7", Some("elsewhere"), "https://10.0.0.1:2376:c7"),
                claimed_run("r9", Some("peer"), "http+docker://localhost:c9"),
            ],
            containers: vec![peers],
            held: HashSet::new(),
        };
        let vanished = |run: &str, container: &str, claimer: &str| Fix::Vanished {
            run_id: run.into(),
            container_id: container.into(),
            claimer: Some(claimer.into()),
        };
        assert_eq!(
            plan(&snapshot, HOST, "me"),
            [
                Fix::Adopt {
                    run_id: "r9".into(),
                    container_id: "c9".into(),
                    owner: Some("peer".into())
                },
                vanished("r1", "c1", "me"),
                vanished("r4", "c4", "peer"),
                Fix::VanishedIfClaimedHere {
                    run_id: "r6".into(),
                    container_id: "c6".into(),
                    here: vec!["me".into(), "peer".into()],
                },
            ]
        );
        assert_eq!(
            plan(&snapshot, "https://10.0.0.1:2376", "me"),
            [
                Fix::Adopt {
                    run_id: "r9".into(),
                    container_id: "c9".into(),
                    owner: Some("peer".into())
                },
                vanished("r7", "c7", "elsewhere"),
            ]
        );
    }

    #[test]
    fn a_pending_run_without_a_container_is_a_stale_claim_with_its_claimer() {
        let snapshot = Snapshot {
            runs: vec![
                run(
                    "r1",
                    "PENDING",
                    "Pending",
                    Some("Claimed by worker 'me'"),
                    None,
                ),
                run("r2", "PENDING", "Submitting", None, None),
                run("r3", "RUNNING", "Running", None, None),
            ],
            containers: vec![],
            held: HashSet::new(),
        };
        assert_eq!(
            plan(&snapshot, HOST, "me"),
            [
                Fix::StaleClaim {
                    run_id: "r1".into(),
                    claimer: Some("me".into())
                },
                Fix::StaleClaim {
                    run_id: "r2".into(),
                    claimer: None
                },
            ]
        );
    }
}
