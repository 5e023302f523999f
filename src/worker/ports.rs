//! The worker's ports: the two traits through which it talks to the outside, owned here so the
//! Prefect client knows no Docker and the Docker runtime knows no Prefect. The real
//! [`PrefectClient`] and [`DockerRuntime`] implement them below; unit tests implement them with
//! in-memory fakes, so a race between a claim, a cancel and an exit can be replayed in
//! milliseconds with no server and no daemon.
//!
//! The traits are object-safe (`async_trait`), so the worker holds `Arc<dyn …>` and stays one
//! concrete type; a boxed future per call costs nothing next to an HTTP round trip.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde_json::Value;

use crate::docker::cleanup::{Removal, StoppedContainer};
use crate::docker::usage::ResourceUsage;
use crate::docker::{
    ContainerEvent, CreatedContainer, DockerError, DockerRuntime, ExitStatus, FoundContainer,
    ListedContainer, OutputSink, StartedContainer,
};
use crate::job::ContainerSpec;
use crate::prefect::{
    ApiError, Deployment, Flow, FlowRun, LastLog, OrchestrationResult, PrefectClient, State,
    StateProposal, StateType, WorkPool, WorkerStatus,
};

/// What the worker asks of the Prefect API.
#[async_trait]
pub trait PrefectApi: Send + Sync {
    /// Fetches the CSRF token ahead of the first write (a no-op when the server has none).
    async fn prefetch_csrf_token(&self);
    /// Whether the API answers right now (one quick `GET /health`, no retries).
    async fn probe(&self) -> bool;
    /// The pool; `None` when it does not exist.
    async fn read_work_pool(&self, name: &str) -> Result<Option<WorkPool>, ApiError>;
    /// Creates the pool.
    async fn create_work_pool(
        &self,
        name: &str,
        pool_type: &str,
        template: Option<&Value>,
    ) -> Result<WorkPool, ApiError>;
    /// Sets the pool's base job template.
    async fn update_work_pool_template(&self, name: &str, template: &Value)
    -> Result<(), ApiError>;
    /// The REST heartbeat.
    async fn send_worker_heartbeat(
        &self,
        pool: &str,
        worker: &str,
        interval_seconds: u64,
    ) -> Result<(), ApiError>;
    /// Runs of the pool due before `scheduled_before`, at most `limit` (else the server's
    /// default, 200).
    async fn get_scheduled_flow_runs(
        &self,
        pool: &str,
        queues: &[String],
        scheduled_before: chrono::DateTime<chrono::Utc>,
        limit: Option<usize>,
    ) -> Result<Vec<FlowRun>, ApiError>;
    /// Every deployment of the pool.
    async fn pool_deployments(&self, pool: &str) -> Result<Vec<Deployment>, ApiError>;
    /// The pool's workers, with their status and last heartbeat.
    async fn pool_workers(&self, pool: &str) -> Result<Vec<WorkerStatus>, ApiError>;
    /// The pool's runs in one of `states` (one filtered read, every page).
    async fn read_pool_flow_runs(
        &self,
        pool: &str,
        states: &[StateType],
    ) -> Result<Vec<FlowRun>, ApiError>;
    /// Which of `ids` are in one of `states`.
    async fn flow_runs_in_states(
        &self,
        ids: &[String],
        states: &[StateType],
    ) -> Result<Vec<String>, ApiError>;
    /// A deployment; `None` when it was deleted.
    async fn read_deployment(&self, id: &str) -> Result<Option<Deployment>, ApiError>;
    /// A block document's data by id; `None` when missing.
    async fn read_block_document(&self, id: &str) -> Result<Option<Value>, ApiError>;
    /// A block document's data by type slug and name; `None` when missing.
    async fn read_block_document_by_name(
        &self,
        slug: &str,
        name: &str,
    ) -> Result<Option<Value>, ApiError>;
    /// A variable's value; `None` when missing.
    async fn read_variable(&self, name: &str) -> Result<Option<Value>, ApiError>;
    /// A flow.
    async fn read_flow(&self, id: &str) -> Result<Flow, ApiError>;
    /// A flow run.
    async fn read_flow_run(&self, id: &str) -> Result<FlowRun, ApiError>;
    /// A flow run's states, oldest first.
    async fn read_flow_run_states(&self, id: &str) -> Result<Vec<State>, ApiError>;
    /// Proposes a state.
    async fn set_flow_run_state(
        &self,
        id: &str,
        state: &StateProposal,
        force: bool,
    ) -> Result<OrchestrationResult, ApiError>;
    /// Records where the run's container is.
    async fn set_infrastructure_pid(&self, id: &str, pid: &str) -> Result<(), ApiError>;
    /// Labels the run with the worker and pool.
    async fn update_flow_run_labels(&self, id: &str, labels: &Value) -> Result<(), ApiError>;
    /// The newest of the run's logs under one of `names`: where forwarding of its container's
    /// output stands.
    async fn last_log_named(&self, id: &str, names: &[&str]) -> Result<LastLog, ApiError>;
}

/// How a container is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchOptions {
    /// The Engine removes it at exit (wait for removal, take the code from events if late).
    pub auto_remove: bool,
    /// Follow its output (to print it, or to keep a tail for a crash report).
    pub follow_output: bool,
    /// Output from this unix time on only (a container adopted after a restart), else all.
    pub logs_since: Option<i64>,
}

/// What the worker asks of the Docker Engine.
#[async_trait]
pub trait ContainerRuntime: Send + Sync {
    /// The `base_url` infrastructure pids carry (`http+docker://localhost`, `https://h:2376`).
    fn base_url(&self) -> &str;
    /// The Engine's version.
    fn engine_version(&self) -> &str;
    /// Whether the Engine answers now.
    async fn ping(&self) -> Result<(), DockerError>;
    /// Under rootless Docker, the address containers reach this host's loopback at;
    /// `None` for a rootful Engine.
    fn rootless_host_address(&self) -> Option<&str> {
        None
    }
    /// Pulls the spec's image per its pull policy; `Some(took)` when a pull was made.
    async fn ensure_image(&self, spec: &ContainerSpec) -> Result<Option<Duration>, DockerError>;
    /// Pull, create, connect networks and start, asking `wanted()` before each step; once it
    /// says no, nothing more happens and the answer is [`DockerError::Withdrawn`]. `created`
    /// hears of the container as soon as it exists, even if a later step fails.
    async fn create_and_start(
        &self,
        spec: &ContainerSpec,
        wanted: &(dyn Fn() -> bool + Sync),
        created: &(dyn for<'c> Fn(&'c CreatedContainer) + Sync),
    ) -> Result<StartedContainer, DockerError>;
    /// Follows the container to its exit, its output (if followed) to `output` line by line.
    async fn watch(
        &self,
        container: &CreatedContainer,
        options: WatchOptions,
        output: &dyn OutputSink,
    ) -> Result<ExitStatus, DockerError>;
    /// SIGTERM, then SIGKILL after `grace`; a container already gone is not an error.
    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), DockerError>;
    /// Every container carrying all of `labels` (`key=value`), from one list call.
    async fn list_labelled(&self, labels: &[String]) -> Result<Vec<ListedContainer>, DockerError>;
    /// One container in detail (exit code, auto-remove, OOM); `None` when it is gone.
    async fn inspect_found(&self, id: &str) -> Result<Option<FoundContainer>, DockerError>;
    /// Force-removes a container that must not run; one already gone is not an error.
    async fn remove_container(&self, id: &str) -> Result<(), DockerError>;
    /// Whether a container exists.
    async fn container_exists(&self, id: &str) -> Result<bool, DockerError>;
    /// The Engine's live `die`/`oom`/`kill` events of containers carrying `label`.
    fn container_events(
        &self,
        label: &str,
        since: i64,
    ) -> BoxStream<'static, Result<ContainerEvent, DockerError>>;
    /// Samples the container's resource use into `usage` until the future is dropped.
    async fn sample_usage(&self, id: &str, usage: &Mutex<ResourceUsage>);
    /// Exited or dead containers carrying `labels` (garbage collection).
    async fn list_stopped_containers(
        &self,
        labels: &[String],
    ) -> Result<Vec<StoppedContainer>, DockerError>;
    /// Removes a stopped container (garbage collection).
    async fn remove_stopped_container(&self, id: &str) -> Result<Removal, DockerError>;
}

#[async_trait]
impl PrefectApi for PrefectClient {
    async fn prefetch_csrf_token(&self) {
        PrefectClient::prefetch_csrf_token(self).await;
    }
    async fn probe(&self) -> bool {
        PrefectClient::probe(self).await
    }
    async fn read_work_pool(&self, name: &str) -> Result<Option<WorkPool>, ApiError> {
        PrefectClient::read_work_pool(self, name).await
    }
    async fn create_work_pool(
        &self,
        name: &str,
        pool_type: &str,
        template: Option<&Value>,
    ) -> Result<WorkPool, ApiError> {
        PrefectClient::create_work_pool(self, name, pool_type, template).await
    }
    async fn update_work_pool_template(
        &self,
        name: &str,
        template: &Value,
    ) -> Result<(), ApiError> {
        PrefectClient::update_work_pool_template(self, name, template).await
    }
    async fn send_worker_heartbeat(
        &self,
        pool: &str,
        worker: &str,
        interval_seconds: u64,
    ) -> Result<(), ApiError> {
        PrefectClient::send_worker_heartbeat(self, pool, worker, interval_seconds).await
    }
    async fn get_scheduled_flow_runs(
        &self,
        pool: &str,
        queues: &[String],
        scheduled_before: chrono::DateTime<chrono::Utc>,
        limit: Option<usize>,
    ) -> Result<Vec<FlowRun>, ApiError> {
        PrefectClient::get_scheduled_flow_runs(self, pool, queues, scheduled_before, limit).await
    }
    async fn pool_deployments(&self, pool: &str) -> Result<Vec<Deployment>, ApiError> {
        PrefectClient::pool_deployments(self, pool).await
    }
    async fn pool_workers(&self, pool: &str) -> Result<Vec<WorkerStatus>, ApiError> {
        PrefectClient::pool_workers(self, pool).await
    }
    async fn read_pool_flow_runs(
        &self,
        pool: &str,
        states: &[StateType],
    ) -> Result<Vec<FlowRun>, ApiError> {
        let names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        PrefectClient::read_pool_flow_runs(self, pool, &names).await
    }
    async fn flow_runs_in_states(
        &self,
        ids: &[String],
        states: &[StateType],
    ) -> Result<Vec<String>, ApiError> {
        let names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        PrefectClient::flow_runs_in_states(self, ids, &names).await
    }
    async fn read_deployment(&self, id: &str) -> Result<Option<Deployment>, ApiError> {
        PrefectClient::read_deployment(self, id).await
    }
    async fn read_block_document(&self, id: &str) -> Result<Option<Value>, ApiError> {
        PrefectClient::read_block_document(self, id).await
    }
    async fn read_block_document_by_name(
        &self,
        slug: &str,
        name: &str,
    ) -> Result<Option<Value>, ApiError> {
        PrefectClient::read_block_document_by_name(self, slug, name).await
    }
    async fn read_variable(&self, name: &str) -> Result<Option<Value>, ApiError> {
        PrefectClient::read_variable(self, name).await
    }
    async fn read_flow(&self, id: &str) -> Result<Flow, ApiError> {
        PrefectClient::read_flow(self, id).await
    }
    async fn read_flow_run(&self, id: &str) -> Result<FlowRun, ApiError> {
        PrefectClient::read_flow_run(self, id).await
    }
    async fn read_flow_run_states(&self, id: &str) -> Result<Vec<State>, ApiError> {
        PrefectClient::read_flow_run_states(self, id).await
    }
    async fn set_flow_run_state(
        &self,
        id: &str,
        state: &StateProposal,
        force: bool,
    ) -> Result<OrchestrationResult, ApiError> {
        PrefectClient::set_flow_run_state(self, id, state, force).await
    }
    async fn set_infrastructure_pid(&self, id: &str, pid: &str) -> Result<(), ApiError> {
        PrefectClient::set_infrastructure_pid(self, id, pid).await
    }
    async fn update_flow_run_labels(&self, id: &str, labels: &Value) -> Result<(), ApiError> {
        PrefectClient::update_flow_run_labels(self, id, labels).await
    }
    async fn last_log_named(&self, id: &str, names: &[&str]) -> Result<LastLog, ApiError> {
        PrefectClient::last_log_named(self, id, names).await
    }
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    fn base_url(&self) -> &str {
        DockerRuntime::base_url(self)
    }
    fn engine_version(&self) -> &str {
        DockerRuntime::engine_version(self)
    }
    async fn ping(&self) -> Result<(), DockerError> {
        DockerRuntime::ping(self).await
    }
    fn rootless_host_address(&self) -> Option<&str> {
        DockerRuntime::rootless_host_address(self)
    }
    async fn ensure_image(&self, spec: &ContainerSpec) -> Result<Option<Duration>, DockerError> {
        DockerRuntime::ensure_image(self, spec).await
    }
    async fn create_and_start(
        &self,
        spec: &ContainerSpec,
        wanted: &(dyn Fn() -> bool + Sync),
        created: &(dyn for<'c> Fn(&'c CreatedContainer) + Sync),
    ) -> Result<StartedContainer, DockerError> {
        self.create_and_start_observed(spec, wanted, created).await
    }
    async fn watch(
        &self,
        container: &CreatedContainer,
        options: WatchOptions,
        output: &dyn OutputSink,
    ) -> Result<ExitStatus, DockerError> {
        self.watch_container_since(
            container,
            options.auto_remove,
            options.follow_output,
            options.logs_since,
            output,
        )
        .await
    }
    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        DockerRuntime::stop_container(self, id, grace).await
    }
    async fn list_labelled(&self, labels: &[String]) -> Result<Vec<ListedContainer>, DockerError> {
        DockerRuntime::list_labelled(self, labels).await
    }
    async fn inspect_found(&self, id: &str) -> Result<Option<FoundContainer>, DockerError> {
        DockerRuntime::inspect_found(self, id).await
    }
    async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        DockerRuntime::remove_container(self, id).await
    }
    async fn container_exists(&self, id: &str) -> Result<bool, DockerError> {
        DockerRuntime::container_exists(self, id).await
    }
    fn container_events(
        &self,
        label: &str,
        since: i64,
    ) -> BoxStream<'static, Result<ContainerEvent, DockerError>> {
        Box::pin(DockerRuntime::container_events(self, label, since))
    }
    async fn sample_usage(&self, id: &str, usage: &Mutex<ResourceUsage>) {
        DockerRuntime::sample_usage(self, id, usage).await;
    }
    async fn list_stopped_containers(
        &self,
        labels: &[String],
    ) -> Result<Vec<StoppedContainer>, DockerError> {
        DockerRuntime::list_stopped_containers(self, labels).await
    }
    async fn remove_stopped_container(&self, id: &str) -> Result<Removal, DockerError> {
        DockerRuntime::remove_stopped_container(self, id).await
    }
}
