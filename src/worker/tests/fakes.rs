//! In-memory fakes of the worker's two ports, for replaying the lifecycle's decisions in
//! milliseconds. They behave like their peers where the worker's decisions depend on it (a
//! Pending proposal is accepted only from Scheduled, a final run refuses unforced proposals, a
//! stopped container exits 143) and let a test script the rest: answers, failures, and hooks
//! that run between a submission's steps.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde_json::{Value, json};

use crate::docker::cleanup::{Removal, StoppedContainer};
use crate::docker::usage::ResourceUsage;
use crate::docker::{
    ContainerEvent, CreatedContainer, DockerError, EngineFailure, ExitStatus, FoundContainer,
    ListedContainer, OutputLine, OutputSink, OutputStream, StartedContainer,
};
use crate::job::ContainerSpec;
use crate::prefect::{
    ApiError, Deployment, Flow, FlowRun, LastLog, OrchestrationResult, SetStateStatus, State,
    StateProposal, StateType, WorkPool, WorkerStatus,
};
use crate::worker::ports::{ContainerRuntime, PrefectApi, WatchOptions};

/// A 503 from the API: transient.
pub fn unavailable(path: &str) -> ApiError {
    ApiError::Status {
        method: reqwest::Method::POST,
        path: path.into(),
        status: 503,
        body: "busy".into(),
    }
}

fn not_found(path: &str) -> ApiError {
    ApiError::Status {
        method: reqwest::Method::GET,
        path: path.into(),
        status: 404,
        body: r#"{"detail":"Flow run not found"}"#.into(),
    }
}

#[derive(Debug, Default)]
struct ApiState {
    runs: HashMap<String, Value>,
    histories: HashMap<String, Vec<State>>,
    deployments: HashMap<String, Value>,
    workers: Vec<WorkerStatus>,
    /// Scripted answers to the next proposals, by run.
    answers: HashMap<String, VecDeque<OrchestrationResult>>,
    /// Claims that race another party's states, by run.
    races: HashMap<String, Race>,
    /// Transient failures still to give, by method name.
    failures: HashMap<&'static str, u32>,
    /// Every call, in order (`set_state r1 PENDING/Pending force=false`, …).
    calls: Vec<String>,
    next_state: u32,
    /// The newest forwarded output line of a run, by run (none when unset).
    last_logs: HashMap<String, LastLog>,
}

/// What happens around the next claim of a run: states another party sets just before and
/// just after ours, and whether ours ends up the run's current state (a server may order a
/// run's history by timestamps that differ from the order it committed the states).
#[derive(Debug, Clone, Default)]
pub struct Race {
    pub before: Vec<StateType>,
    pub after: Vec<StateType>,
    pub ours_current: bool,
}

/// The Prefect API in memory.
#[derive(Debug, Default)]
pub struct FakeApi {
    state: Mutex<ApiState>,
}

impl FakeApi {
    fn with<T>(&self, f: impl FnOnce(&mut ApiState) -> T) -> T {
        f(&mut self.state.lock().expect("fake api lock"))
    }

    /// Adds a run of flow `f1` in `state` (and deployment `d1` if it exists).
    pub fn add_run(&self, id: &str, state: StateType) -> FlowRun {
        let raw = self.with(|s| {
            s.next_state += 1;
            let state = State {
                id: Some(format!("state-{}", s.next_state)),
                state_type: state,
                name: Some(title(state).into()),
                message: None,
                timestamp: Some(crate::prefect::models::timestamp_now()),
            };
            let deployment = s.deployments.contains_key("d1").then_some("d1");
            let raw = json!({
                "id": id, "name": format!("run-{id}"), "flow_id": "f1",
                "deployment_id": deployment, "job_variables": {"image": "local/busybox:dw"},
                "state": state_json(&state), "tags": [],
            });
            s.histories.insert(id.into(), vec![state]);
            s.runs.insert(id.into(), raw.clone());
            raw
        });
        FlowRun::from_value(raw).expect("a fake run parses")
    }

    /// What the API says of the newest forwarded output line of run `id`.
    pub fn set_last_log(&self, id: &str, last: LastLog) {
        self.with(|s| s.last_logs.insert(id.into(), last));
    }

    /// Adds deployment `d1`; runs added later belong to it.
    pub fn add_deployment(&self) {
        self.with(|s| {
            s.deployments.insert(
                "d1".into(),
                json!({"id": "d1", "name": "dep", "updated": "u1", "job_variables": {}}),
            );
        });
    }

    /// Deletes deployment `d1`.
    pub fn delete_deployment(&self) {
        self.with(|s| s.deployments.remove("d1"));
    }

    /// The run's state history.
    pub fn history(&self, id: &str) -> Vec<State> {
        self.with(|s| s.histories.get(id).cloned().unwrap_or_default())
    }

    /// The run's current state.
    pub fn current(&self, id: &str) -> State {
        self.history(id)
            .last()
            .cloned()
            .expect("the run has a state")
    }

    /// Sets a state as another party would (an operator, another worker, the server).
    pub fn set_externally(&self, id: &str, state_type: StateType) {
        self.record_state(id, state_type, title(state_type), None);
    }

    /// The next proposal for `id` gets this answer instead of the orchestration's.
    pub fn answer_next(&self, id: &str, status: SetStateStatus, state: Option<StateType>) {
        let result = OrchestrationResult {
            status,
            state: state.map(|t| State {
                id: Some("scripted".into()),
                state_type: t,
                name: Some(title(t).into()),
                message: None,
                timestamp: None,
            }),
            details: json!({"reason": "scripted", "delay_seconds": 0.0}),
            scheduled_time: None,
        };
        self.with(|s| s.answers.entry(id.into()).or_default().push_back(result));
    }

    /// The next claim of `id` races another party as `race` says; the claim is accepted.
    pub fn race_claim(&self, id: &str, race: Race) {
        self.with(|s| s.races.insert(id.into(), race));
    }

    fn run_race(&self, id: &str, race: &Race) -> OrchestrationResult {
        for t in &race.before {
            self.set_externally(id, *t);
        }
        let ours = self.record_state(id, StateType::Pending, "Pending", None);
        for t in &race.after {
            self.set_externally(id, *t);
        }
        if race.ours_current {
            self.with(|s| {
                if let Some(run) = s.runs.get_mut(id) {
                    run["state"] = state_json(&ours);
                }
            });
        }
        // A race is a claim the server accepted out of another state than Scheduled (or
        // listed out of its commit order): it copies no scheduled time.
        OrchestrationResult {
            status: SetStateStatus::Accept,
            state: Some(ours),
            details: json!({}),
            scheduled_time: None,
        }
    }

    /// The next `n` calls of `method` fail with a 503.
    pub fn fail_next(&self, method: &'static str, n: u32) {
        self.with(|s| s.failures.insert(method, n));
    }

    /// Workers the server reports online.
    pub fn set_online(&self, workers: &[&str]) {
        for w in workers {
            self.set_worker(w, true, Duration::ZERO);
        }
    }

    /// A worker of the pool, online or not, last seen `ago`.
    pub fn set_worker(&self, name: &str, online: bool, ago: Duration) {
        let status = WorkerStatus {
            name: name.into(),
            online,
            last_heartbeat: chrono::Duration::from_std(ago)
                .ok()
                .map(|d| chrono::Utc::now() - d),
        };
        self.with(|s| {
            s.workers.retain(|w| w.name != name);
            s.workers.push(status);
        });
    }

    /// Records a container on the run, as a worker does after its start.
    pub fn set_pid(&self, id: &str, pid: &str) {
        self.with(|s| {
            if let Some(run) = s.runs.get_mut(id) {
                run["infrastructure_pid"] = json!(pid);
            }
        });
    }

    /// Labels the run with the worker that claimed it.
    pub fn set_claim_label(&self, id: &str, worker: &str) {
        self.with(|s| {
            if let Some(run) = s.runs.get_mut(id) {
                run["labels"] = json!({"prefect.worker.name": worker});
            }
        });
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<String> {
        self.with(|s| s.calls.clone())
    }

    /// The calls whose text starts with `prefix`.
    pub fn calls_to(&self, prefix: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.starts_with(prefix))
            .collect()
    }

    fn call(&self, method: &'static str, text: String) -> Result<(), ApiError> {
        self.with(|s| {
            s.calls.push(text);
            match s.failures.get_mut(method) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    Err(unavailable(method))
                }
                _ => Ok(()),
            }
        })
    }

    fn record_state(
        &self,
        id: &str,
        state_type: StateType,
        name: &str,
        message: Option<String>,
    ) -> State {
        self.with(|s| {
            s.next_state += 1;
            let state = State {
                id: Some(format!("state-{}", s.next_state)),
                state_type,
                name: Some(name.into()),
                message,
                timestamp: Some(crate::prefect::models::timestamp_now()),
            };
            s.histories
                .entry(id.into())
                .or_default()
                .push(state.clone());
            if let Some(run) = s.runs.get_mut(id) {
                run["state"] = state_json(&state);
            }
            state
        })
    }

    /// What the server's orchestration does with a proposal, in the parts the worker relies
    /// on: Pending only from Scheduled, nothing unforced out of a final state.
    fn orchestrate(&self, id: &str, proposal: &StateProposal, force: bool) -> OrchestrationResult {
        let current = self.history(id).last().cloned();
        let from = current.as_ref().map(|s| s.state_type);
        let refused = !force
            && (from.is_some_and(StateType::is_final)
                || (proposal.state_type == StateType::Pending
                    && proposal.name == "Pending"
                    && from != Some(StateType::Scheduled))
                || (proposal.name == "Submitting" && from != Some(StateType::Pending)));
        if refused {
            return OrchestrationResult {
                status: SetStateStatus::Abort,
                state: current,
                details: json!({"reason": format!("cannot go from {from:?}")}),
                scheduled_time: None,
            };
        }
        let state = self.record_state(
            id,
            proposal.state_type,
            &proposal.name,
            proposal.message.clone(),
        );
        // Prefect's CopyScheduledTime: only Scheduled → Pending carries the scheduled time.
        let scheduled_time = (from == Some(StateType::Scheduled)
            && proposal.state_type == StateType::Pending)
            .then(|| "2026-01-01T00:00:00Z".to_owned());
        OrchestrationResult {
            status: SetStateStatus::Accept,
            state: Some(state),
            details: json!({}),
            scheduled_time,
        }
    }
}

fn title(t: StateType) -> &'static str {
    match t {
        StateType::Scheduled => "Scheduled",
        StateType::Pending => "Pending",
        StateType::Running => "Running",
        StateType::Completed => "Completed",
        StateType::Failed => "Failed",
        StateType::Cancelled => "Cancelled",
        StateType::Crashed => "Crashed",
        StateType::Paused => "Paused",
        StateType::Cancelling => "Cancelling",
        StateType::Unknown => "Unknown",
    }
}

fn state_json(state: &State) -> Value {
    json!({"id": state.id, "type": state.state_type, "name": state.name,
           "message": state.message, "timestamp": state.timestamp})
}

#[async_trait]
impl PrefectApi for FakeApi {
    async fn prefetch_csrf_token(&self) {}
    async fn probe(&self) -> bool {
        self.call("probe", "probe".into()).is_ok()
    }
    async fn read_work_pool(&self, name: &str) -> Result<Option<WorkPool>, ApiError> {
        self.call("read_work_pool", format!("read_work_pool {name}"))?;
        Ok(Some(WorkPool {
            id: "pool-id".into(),
            name: name.into(),
            pool_type: "docker".into(),
            base_job_template: crate::job::default_base_job_template(),
            is_paused: false,
        }))
    }
    async fn create_work_pool(
        &self,
        name: &str,
        _pool_type: &str,
        _template: Option<&Value>,
    ) -> Result<WorkPool, ApiError> {
        Err(unavailable(&format!("create_work_pool {name}")))
    }
    async fn update_work_pool_template(
        &self,
        name: &str,
        _template: &Value,
    ) -> Result<(), ApiError> {
        self.call(
            "update_work_pool_template",
            format!("update_template {name}"),
        )
    }
    async fn send_worker_heartbeat(
        &self,
        pool: &str,
        worker: &str,
        _interval: u64,
    ) -> Result<(), ApiError> {
        self.call("heartbeat", format!("heartbeat {pool} {worker}"))
    }
    async fn get_scheduled_flow_runs(
        &self,
        pool: &str,
        _queues: &[String],
        _before: chrono::DateTime<chrono::Utc>,
        _limit: Option<usize>,
    ) -> Result<Vec<FlowRun>, ApiError> {
        self.call("get_scheduled_flow_runs", format!("poll {pool}"))?;
        let raws: Vec<Value> = self.with(|s| {
            let mut ids: Vec<&String> = s.runs.keys().collect();
            ids.sort();
            ids.into_iter()
                .filter(|id| {
                    s.histories
                        .get(*id)
                        .and_then(|h| h.last())
                        .map(|st| st.state_type)
                        == Some(StateType::Scheduled)
                })
                .filter_map(|id| s.runs.get(id).cloned())
                .collect()
        });
        Ok(raws
            .into_iter()
            .filter_map(|r| FlowRun::from_value(r).ok())
            .collect())
    }
    async fn pool_deployments(&self, _pool: &str) -> Result<Vec<Deployment>, ApiError> {
        Ok(self.with(|s| {
            s.deployments
                .values()
                .filter_map(|d| Deployment::from_value(d.clone()).ok())
                .collect()
        }))
    }
    async fn pool_workers(&self, pool: &str) -> Result<Vec<WorkerStatus>, ApiError> {
        self.call("pool_workers", format!("pool_workers {pool}"))?;
        Ok(self.with(|s| s.workers.clone()))
    }
    async fn read_pool_flow_runs(
        &self,
        pool: &str,
        states: &[StateType],
    ) -> Result<Vec<FlowRun>, ApiError> {
        self.call("read_pool_flow_runs", format!("read_pool_flow_runs {pool}"))?;
        let raws: Vec<Value> = self.with(|s| {
            let mut ids: Vec<&String> = s.runs.keys().collect();
            ids.sort();
            ids.into_iter()
                .filter_map(|id| s.runs.get(id))
                .filter(|r| {
                    r["state"]["type"]
                        .as_str()
                        .and_then(|t| serde_json::from_value(json!(t)).ok())
                        .is_some_and(|t: StateType| states.contains(&t))
                })
                .cloned()
                .collect()
        });
        Ok(raws
            .into_iter()
            .filter_map(|r| FlowRun::from_value(r).ok())
            .collect())
    }
    async fn flow_runs_in_states(
        &self,
        ids: &[String],
        states: &[StateType],
    ) -> Result<Vec<String>, ApiError> {
        self.call("flow_runs_in_states", "flow_runs_in_states".into())?;
        Ok(ids
            .iter()
            .filter(|id| {
                self.history(id)
                    .last()
                    .is_some_and(|s| states.contains(&s.state_type))
            })
            .cloned()
            .collect())
    }
    async fn read_deployment(&self, id: &str) -> Result<Option<Deployment>, ApiError> {
        self.call("read_deployment", format!("read_deployment {id}"))?;
        let raw = self.with(|s| s.deployments.get(id).cloned());
        Ok(raw.and_then(|d| Deployment::from_value(d).ok()))
    }
    async fn read_block_document(&self, _id: &str) -> Result<Option<Value>, ApiError> {
        Ok(None)
    }
    async fn read_block_document_by_name(
        &self,
        _slug: &str,
        _name: &str,
    ) -> Result<Option<Value>, ApiError> {
        Ok(None)
    }
    async fn read_variable(&self, _name: &str) -> Result<Option<Value>, ApiError> {
        Ok(None)
    }
    async fn read_flow(&self, id: &str) -> Result<Flow, ApiError> {
        self.call("read_flow", format!("read_flow {id}"))?;
        Flow::from_value(json!({"id": id, "name": "flow", "tags": []})).map_err(ApiError::Config)
    }
    async fn read_flow_run(&self, id: &str) -> Result<FlowRun, ApiError> {
        self.call("read_flow_run", format!("read_flow_run {id}"))?;
        let raw = self.with(|s| s.runs.get(id).cloned());
        let raw = raw.ok_or_else(|| not_found(id))?;
        FlowRun::from_value(raw).map_err(ApiError::Config)
    }
    async fn read_flow_run_states(&self, id: &str) -> Result<Vec<State>, ApiError> {
        self.call("read_flow_run_states", format!("read_states {id}"))?;
        Ok(self.history(id))
    }
    async fn set_flow_run_state(
        &self,
        id: &str,
        state: &StateProposal,
        force: bool,
    ) -> Result<OrchestrationResult, ApiError> {
        self.call(
            "set_flow_run_state",
            format!(
                "set_state {id} {}/{} force={force}",
                state.state_type, state.name
            ),
        )?;
        if !self.with(|s| s.runs.contains_key(id)) {
            return Err(not_found(id));
        }
        if state.name == "Pending"
            && let Some(race) = self.with(|s| s.races.remove(id))
        {
            return Ok(self.run_race(id, &race));
        }
        let scripted = self.with(|s| s.answers.get_mut(id).and_then(VecDeque::pop_front));
        Ok(scripted.unwrap_or_else(|| self.orchestrate(id, state, force)))
    }
    async fn set_infrastructure_pid(&self, id: &str, pid: &str) -> Result<(), ApiError> {
        self.call("set_infrastructure_pid", format!("pid {id} {pid}"))?;
        self.with(|s| {
            if let Some(run) = s.runs.get_mut(id) {
                run["infrastructure_pid"] = json!(pid);
            }
        });
        Ok(())
    }
    async fn update_flow_run_labels(&self, id: &str, _labels: &Value) -> Result<(), ApiError> {
        self.call("update_flow_run_labels", format!("labels {id}"))
    }
    async fn last_log_named(&self, id: &str, names: &[&str]) -> Result<LastLog, ApiError> {
        self.call(
            "last_log_named",
            format!("last_log {id} {}", names.join(",")),
        )?;
        Ok(self.with(|s| s.last_logs.get(id).copied().unwrap_or(LastLog::None)))
    }
}

/// How a fake container ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Exits at once with this code.
    Exit(i64),
    /// Runs until stopped (then exits 143).
    Hold,
    /// The wait fails: the Engine lost the container.
    Lost,
    /// Exits with this code after the Engine was lost and came back.
    ExitAfterEngineLoss(i64),
}

/// A step of a submission after which a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    Pulled,
    Created,
    Started,
}

type Hook = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct RuntimeState {
    next: u32,
    plan: Option<Plan>,
    create_errors: VecDeque<fn() -> DockerError>,
    start_errors: VecDeque<fn() -> DockerError>,
    engine_down: bool,
    created_specs: Vec<ContainerSpec>,
    hooks: HashMap<Step, Hook>,
    containers: HashMap<String, FakeContainer>,
    found: Vec<FoundContainer>,
    calls: Vec<String>,
    /// What every container prints (default: `line 1`, `line 2` at one timestamp).
    output: Option<Vec<FakeLine>>,
    /// The options of every watch, in order.
    watches: Vec<WatchOptions>,
}

/// A line a fake container prints: its stream, the Engine's timestamp, its text.
pub type FakeLine = (OutputStream, Option<chrono::DateTime<chrono::Utc>>, String);

struct FakeContainer {
    exit: tokio::sync::watch::Sender<Option<Plan>>,
    running: bool,
    labels: HashMap<String, String>,
}

/// The Docker Engine in memory.
#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<RuntimeState>,
}

impl std::fmt::Debug for FakeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeRuntime")
    }
}

impl FakeRuntime {
    fn with<T>(&self, f: impl FnOnce(&mut RuntimeState) -> T) -> T {
        f(&mut self.state.lock().expect("fake runtime lock"))
    }

    /// How the next containers end (default: exit 0).
    pub fn plan(&self, plan: Plan) {
        self.with(|s| s.plan = Some(plan));
    }

    /// What containers print; a watch hands on the lines at or after its `logs_since`, as the
    /// Engine does.
    pub fn print(&self, lines: Vec<FakeLine>) {
        self.with(|s| s.output = Some(lines));
    }

    /// The options of every watch so far.
    pub fn watches(&self) -> Vec<WatchOptions> {
        self.with(|s| s.watches.clone())
    }

    /// The Engine stops (or starts again) answering pings.
    pub fn set_engine_down(&self, down: bool) {
        self.with(|s| s.engine_down = down);
    }

    /// The next start (after a successful create) fails with this error.
    pub fn fail_start(&self, error: fn() -> DockerError) {
        self.with(|s| s.start_errors.push_back(error));
    }

    /// The next create fails with this error (each call queues one more failure).
    pub fn fail_create(&self, error: fn() -> DockerError) {
        self.with(|s| s.create_errors.push_back(error));
    }

    /// Runs `hook` once, right after `step` of the next submission.
    pub fn after(&self, step: Step, hook: impl FnOnce() + Send + 'static) {
        self.with(|s| s.hooks.insert(step, Box::new(hook)));
    }

    /// A container left on the host (by an earlier process, or another worker).
    pub fn leave(&self, found: FoundContainer) {
        let id = found.container.id.clone();
        let running = found.running;
        // An exited one answers a wait at once, with its code.
        let ended = found.exit_code.filter(|_| !running).map(Plan::Exit);
        self.with(|s| {
            let (exit, _) = tokio::sync::watch::channel(ended);
            let labels = found.labels.clone();
            s.containers.insert(
                id,
                FakeContainer {
                    exit,
                    running,
                    labels,
                },
            );
            s.found.push(found);
        });
    }

    /// Removes a container as an operator's `docker rm -f` would (a watch sees it killed).
    pub fn remove_outside(&self, id: &str) {
        self.with(|s| {
            if let Some(c) = s.containers.remove(id) {
                c.exit.send_replace(Some(Plan::Exit(137)));
            }
        });
    }

    /// Ends a held container as if it exited with `code`.
    pub fn exit(&self, id: &str, code: i64) {
        self.with(|s| {
            if let Some(c) = s.containers.get_mut(id) {
                c.running = false;
                c.exit.send_replace(Some(Plan::Exit(code)));
            }
        });
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<String> {
        self.with(|s| s.calls.clone())
    }

    /// The calls whose text starts with `prefix`.
    pub fn calls_to(&self, prefix: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.starts_with(prefix))
            .collect()
    }

    /// The specs of every create, in order.
    pub fn created_specs(&self) -> Vec<ContainerSpec> {
        self.with(|s| s.created_specs.clone())
    }

    /// Containers that exist now.
    pub fn existing(&self) -> usize {
        self.with(|s| s.containers.len())
    }

    fn run_hook(&self, step: Step) {
        let hook = self.with(|s| s.hooks.remove(&step));
        if let Some(hook) = hook {
            hook();
        }
    }

    fn record(&self, call: String) {
        self.with(|s| s.calls.push(call));
    }
}

/// A found container of run `run_id`, created by `owner`.
pub fn found(
    id: &str,
    run_id: &str,
    owner: &str,
    running: bool,
    exit_code: Option<i64>,
) -> FoundContainer {
    FoundContainer {
        container: CreatedContainer {
            id: id.into(),
            name: Some(format!("name-{id}")),
            created_at: 0,
        },
        labels: HashMap::from([
            ("io.prefect.flow-run-id".to_owned(), run_id.to_owned()),
            ("io.prefect.work-pool-name".to_owned(), "pool".to_owned()),
            ("io.prefect.worker-name".to_owned(), owner.to_owned()),
        ]),
        image: "local/busybox:dw".into(),
        running,
        exit_code,
        auto_remove: false,
        oom_killed: false,
        device_ids: Vec::new(),
    }
}

fn lost(container: &str) -> DockerError {
    DockerError::WatchFailed {
        container: container.into(),
        failure: EngineFailure {
            status: None,
            message: "connection refused".into(),
        },
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    fn base_url(&self) -> &str {
        "http+docker://localhost"
    }
    fn engine_version(&self) -> &str {
        "28.0.0"
    }
    async fn ping(&self) -> Result<(), DockerError> {
        if self.with(|s| s.engine_down) {
            Err(lost("ping"))
        } else {
            Ok(())
        }
    }
    async fn ensure_image(&self, spec: &ContainerSpec) -> Result<Option<Duration>, DockerError> {
        self.record(format!("pull {}", spec.image));
        Ok(None)
    }
    async fn create_and_start(
        &self,
        spec: &ContainerSpec,
        wanted: &(dyn Fn() -> bool + Sync),
        created: &(dyn for<'c> Fn(&'c CreatedContainer) + Sync),
    ) -> Result<StartedContainer, DockerError> {
        if !wanted() {
            return Err(DockerError::Withdrawn { stage: "pulled" });
        }
        self.ensure_image(spec).await?;
        self.run_hook(Step::Pulled);
        if !wanted() {
            return Err(DockerError::Withdrawn { stage: "created" });
        }
        if let Some(error) = self.with(|s| s.create_errors.pop_front()) {
            self.record("create failed".into());
            return Err(error());
        }
        let (id, plan) = self.with(|s| {
            s.next += 1;
            let id = format!("c{}", s.next);
            let (exit, _) = tokio::sync::watch::channel(None);
            s.containers.insert(
                id.clone(),
                FakeContainer {
                    exit,
                    running: false,
                    labels: spec.labels.clone().into_iter().collect(),
                },
            );
            (id, s.plan.unwrap_or(Plan::Exit(0)))
        });
        self.record(format!("create {id}"));
        self.with(|s| s.created_specs.push(spec.clone()));
        created(&CreatedContainer {
            id: id.clone(),
            name: Some(format!("name-{id}")),
            created_at: chrono::Utc::now().timestamp(),
        });
        if let Some(error) = self.with(|s| s.start_errors.pop_front()) {
            self.record(format!("start failed {id}"));
            return Err(error());
        }
        self.run_hook(Step::Created);
        if !wanted() {
            self.record(format!("remove {id}"));
            self.with(|s| s.containers.remove(&id));
            return Err(DockerError::Withdrawn { stage: "started" });
        }
        self.record(format!("start {id}"));
        self.with(|s| {
            if let Some(c) = s.containers.get_mut(&id) {
                c.running = true;
                if plan != Plan::Hold {
                    c.exit.send_replace(Some(plan));
                }
            }
        });
        self.run_hook(Step::Started);
        Ok(StartedContainer {
            container: CreatedContainer {
                id: id.clone(),
                name: Some(format!("name-{id}")),
                created_at: chrono::Utc::now().timestamp(),
            },
            pull_duration: None,
        })
    }
    async fn watch(
        &self,
        container: &CreatedContainer,
        options: WatchOptions,
        output: &dyn OutputSink,
    ) -> Result<ExitStatus, DockerError> {
        self.record(format!("watch {}", container.id));
        self.with(|s| s.watches.push(options));
        let rx = self.with(|s| s.containers.get(&container.id).map(|c| c.exit.subscribe()));
        let Some(mut rx) = rx else {
            return Err(lost(&container.id));
        };
        let lines = self.with(|s| s.output.clone()).unwrap_or_else(|| {
            let at = chrono::DateTime::from_timestamp(1_800_000_000, 0);
            vec![
                (OutputStream::Stdout, at, "line 1".to_owned()),
                (OutputStream::Stdout, at, "line 2".to_owned()),
            ]
        });
        for (stream, timestamp, text) in &lines {
            let since = options.logs_since.unwrap_or(i64::MIN);
            if timestamp.is_some_and(|t| t.timestamp() < since) {
                continue;
            }
            output
                .line(OutputLine {
                    stream: *stream,
                    timestamp: *timestamp,
                    text,
                })
                .await;
        }
        let plan = loop {
            if let Some(plan) = *rx.borrow_and_update() {
                break plan;
            }
            if rx.changed().await.is_err() {
                return Err(lost(&container.id));
            }
        };
        let status = |code, engine_lost| ExitStatus {
            code,
            oom_killed: false,
            engine_lost,
        };
        match plan {
            Plan::Exit(code) => Ok(status(code, false)),
            Plan::ExitAfterEngineLoss(code) => Ok(status(code, true)),
            Plan::Lost => Err(lost(&container.id)),
            Plan::Hold => Err(lost(&container.id)),
        }
    }
    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        self.record(format!("stop {id} grace={}", grace.as_secs()));
        self.exit(id, 143);
        Ok(())
    }
    async fn list_labelled(&self, labels: &[String]) -> Result<Vec<ListedContainer>, DockerError> {
        self.record(format!("list {}", labels.join(",")));
        Ok(self.with(|s| {
            let mut ids: Vec<&String> = s.containers.keys().collect();
            ids.sort();
            ids.into_iter()
                .map(|id| ListedContainer {
                    container: CreatedContainer {
                        id: id.clone(),
                        name: Some(format!("name-{id}")),
                        created_at: 0,
                    },
                    labels: s.containers[id].labels.clone(),
                    running: s.containers[id].running,
                })
                .collect()
        }))
    }
    async fn inspect_found(&self, id: &str) -> Result<Option<FoundContainer>, DockerError> {
        Ok(self.with(|s| {
            let running = s.containers.get(id)?.running;
            let mut found = s.found.iter().find(|f| f.container.id == id)?.clone();
            found.running = running;
            Some(found)
        }))
    }
    async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        self.record(format!("remove {id}"));
        self.with(|s| s.containers.remove(id));
        Ok(())
    }
    async fn container_exists(&self, id: &str) -> Result<bool, DockerError> {
        Ok(self.with(|s| s.containers.contains_key(id)))
    }
    fn container_events(
        &self,
        _label: &str,
        _since: i64,
    ) -> BoxStream<'static, Result<ContainerEvent, DockerError>> {
        Box::pin(futures_util::stream::pending())
    }
    async fn sample_usage(&self, _id: &str, _usage: &Mutex<ResourceUsage>) {
        std::future::pending::<()>().await;
    }
    async fn list_stopped_containers(
        &self,
        _labels: &[String],
    ) -> Result<Vec<StoppedContainer>, DockerError> {
        Ok(Vec::new())
    }
    async fn remove_stopped_container(&self, _id: &str) -> Result<Removal, DockerError> {
        Ok(Removal::AlreadyGone)
    }
}
