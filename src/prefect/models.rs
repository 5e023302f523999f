//! The parts of Prefect's API objects the worker reads and writes.
//!
//! Objects whose whole JSON matters downstream (flow runs, flows and deployments feed the
//! job template's `ctx` and the container's labels) are kept as JSON with typed accessors.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A work pool.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkPool {
    /// Pool id.
    pub id: String,
    /// Pool name.
    pub name: String,
    /// Worker type (`docker`).
    #[serde(rename = "type")]
    pub pool_type: String,
    /// `{"job_configuration": …, "variables": …}`; `{}` for a pool created without one.
    #[serde(default)]
    pub base_job_template: Value,
    /// Paused pools hand out no work.
    #[serde(default)]
    pub is_paused: bool,
}

/// The type of a Prefect state. The worker decides on these, so they are an enum, not
/// strings compared here and there; a type this release does not know reads as `Unknown`
/// rather than failing the whole answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum StateType {
    /// Waiting for its scheduled time (or for a worker).
    Scheduled,
    /// Claimed by a worker (`Pending`, `Submitting`).
    Pending,
    /// The engine inside the container reported it running.
    Running,
    /// Final: the flow finished.
    Completed,
    /// Final: the flow raised.
    Failed,
    /// Final: cancelled.
    Cancelled,
    /// Final: the infrastructure failed.
    Crashed,
    /// Paused by the flow.
    Paused,
    /// A cancellation was asked for; the infrastructure should stop.
    Cancelling,
    /// A type newer than this worker.
    #[serde(other)]
    Unknown,
}

impl StateType {
    /// Completed, Failed, Crashed or Cancelled: nothing will run any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Crashed | Self::Cancelled
        )
    }

    /// The API's spelling (`SCHEDULED`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "SCHEDULED",
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
            Self::Crashed => "CRASHED",
            Self::Paused => "PAUSED",
            Self::Cancelling => "CANCELLING",
            Self::Unknown => "UNKNOWN",
        }
    }
}

impl std::fmt::Display for StateType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state as the API returns it (a run's current state, one of its history, or the state a
/// proposal led to), with the fields the worker reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct State {
    /// The state's id (a claim is checked against it).
    #[serde(default)]
    pub id: Option<String>,
    /// Its type.
    #[serde(rename = "type")]
    pub state_type: StateType,
    /// Its name (`Pending`, `Submitting`, `Crashed`, `AwaitingRetry`, …).
    #[serde(default)]
    pub name: Option<String>,
    /// The message shown in the UI.
    #[serde(default)]
    pub message: Option<String>,
    /// When it was set (ISO 8601), for ordering a run's history.
    #[serde(default)]
    pub timestamp: Option<String>,
}

/// A flow run as the API returned it.
#[derive(Debug, Clone)]
pub struct FlowRun {
    /// Run id.
    pub id: String,
    /// Run name (`crimson-dog`).
    pub name: String,
    /// Its flow's id.
    pub flow_id: String,
    /// Its deployment's id, if any.
    pub deployment_id: Option<String>,
    /// Run-level job variable overrides.
    pub job_variables: Map<String, Value>,
    /// Its current state, if it has one.
    pub state: Option<State>,
    /// Where its infrastructure runs (`<docker base url>:<container id>`), once recorded.
    pub infrastructure_pid: Option<String>,
    /// The full JSON, for templating.
    pub raw: Value,
}

impl FlowRun {
    /// Reads the fields the worker needs from the API's JSON.
    ///
    /// # Errors
    /// A message naming the missing field when the JSON is not a flow run.
    pub fn from_value(raw: Value) -> Result<Self, String> {
        let text = |key: &str| raw.get(key).and_then(Value::as_str).map(str::to_owned);
        let state = match raw.get("state") {
            None | Some(Value::Null) => None,
            Some(state) => Some(
                State::deserialize(state)
                    .map_err(|e| format!("flow run with a bad `state`: {e}"))?,
            ),
        };
        Ok(Self {
            id: text("id").ok_or("flow run without an `id`")?,
            name: text("name").unwrap_or_default(),
            flow_id: text("flow_id").ok_or("flow run without a `flow_id`")?,
            deployment_id: text("deployment_id"),
            job_variables: raw
                .get("job_variables")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            state,
            infrastructure_pid: text("infrastructure_pid").filter(|p| !p.is_empty()),
            raw,
        })
    }

    /// The run's current state type, if it has a state.
    pub fn state_type(&self) -> Option<StateType> {
        self.state.as_ref().map(|s| s.state_type)
    }

    /// One of the run's labels (`prefect.worker.name`, …), if set and a string.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.raw.get("labels")?.get(key)?.as_str()
    }
}

/// A worker of a pool as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Its name.
    pub name: String,
    /// The server counts it online (recent heartbeats).
    pub online: bool,
    /// Its last heartbeat, if any.
    pub last_heartbeat: Option<chrono::DateTime<chrono::Utc>>,
}

impl WorkerStatus {
    /// Reads one entry of `workers/filter`; `None` without a name.
    pub fn from_value(value: &Value) -> Option<Self> {
        Some(Self {
            name: value.get("name")?.as_str()?.to_owned(),
            online: value.get("status").and_then(Value::as_str) == Some("ONLINE"),
            last_heartbeat: value
                .get("last_heartbeat_time")
                .and_then(Value::as_str)
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc)),
        })
    }
}

/// The fields of a deployment the worker decides on; the whole JSON stays for templating.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// Deployment id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// When it last changed (`--prepull` pulls again when this moves).
    pub updated: Option<String>,
    /// The full JSON (`ctx.deployment`, job variables, tags).
    pub raw: Value,
}

impl Deployment {
    /// Reads the fields the worker needs.
    ///
    /// # Errors
    /// A message when the JSON has no `id`.
    pub fn from_value(raw: Value) -> Result<Self, String> {
        let text = |key: &str| raw.get(key).and_then(Value::as_str).map(str::to_owned);
        Ok(Self {
            id: text("id").ok_or("deployment without an `id`")?,
            name: text("name").unwrap_or_default(),
            updated: text("updated"),
            raw,
        })
    }
}

/// The fields of a flow the worker reads; the whole JSON stays for templating and events.
#[derive(Debug, Clone)]
pub struct Flow {
    /// Flow id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The full JSON (`ctx.flow`, tags).
    pub raw: Value,
}

impl Flow {
    /// Reads the fields the worker needs.
    ///
    /// # Errors
    /// A message when the JSON has no `id`.
    pub fn from_value(raw: Value) -> Result<Self, String> {
        let text = |key: &str| raw.get(key).and_then(Value::as_str).map(str::to_owned);
        Ok(Self {
            id: text("id").ok_or("flow without an `id`")?,
            name: text("name").unwrap_or_default(),
            raw,
        })
    }
}

/// The outcome of a state proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SetStateStatus {
    /// The proposed state was accepted (it may still differ from what was proposed).
    Accept,
    /// Another state was set instead.
    Reject,
    /// The transition is not allowed at all.
    Abort,
    /// Try again after `details.delay_seconds`.
    Wait,
}

/// The server's answer to `set_state`.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "RawOrchestrationResult")]
pub struct OrchestrationResult {
    /// ACCEPT, REJECT, ABORT or WAIT.
    pub status: SetStateStatus,
    /// The run's state after the proposal.
    pub state: Option<State>,
    /// `reason`, `delay_seconds`, …
    pub details: Value,
    /// That state's `state_details.scheduled_time`. The worker proposes Pending without one;
    /// the server copies it from the run's Scheduled state only when the run goes Scheduled →
    /// Pending (its `CopyScheduledTime` rule), so an accepted claim carrying one was made
    /// from Scheduled.
    pub scheduled_time: Option<String>,
}

#[derive(Deserialize)]
struct RawOrchestrationResult {
    status: SetStateStatus,
    #[serde(default)]
    state: Option<RawState>,
    #[serde(default)]
    details: Value,
}

#[derive(Deserialize)]
struct RawState {
    #[serde(flatten)]
    state: State,
    #[serde(default)]
    state_details: Option<RawStateDetails>,
}

#[derive(Deserialize)]
struct RawStateDetails {
    #[serde(default)]
    scheduled_time: Option<String>,
}

impl From<RawOrchestrationResult> for OrchestrationResult {
    fn from(raw: RawOrchestrationResult) -> Self {
        let (state, scheduled_time) = match raw.state {
            Some(s) => (
                Some(s.state),
                s.state_details.and_then(|d| d.scheduled_time),
            ),
            None => (None, None),
        };
        Self {
            status: raw.status,
            state,
            details: raw.details,
            scheduled_time,
        }
    }
}

impl OrchestrationResult {
    /// The resulting state's type (`PENDING`, `CRASHED`, …).
    pub fn state_type(&self) -> Option<StateType> {
        self.state.as_ref().map(|s| s.state_type)
    }

    /// The resulting state's id.
    pub fn state_id(&self) -> Option<&str> {
        self.state.as_ref()?.id.as_deref()
    }

    /// The server's reason for a REJECT, ABORT or WAIT.
    pub fn reason(&self) -> &str {
        self.details
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// Seconds to wait before proposing again (WAIT).
    pub fn delay_seconds(&self) -> f64 {
        self.details
            .get("delay_seconds")
            .and_then(Value::as_f64)
            .unwrap_or(1.0)
    }
}

/// A state the worker proposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateProposal {
    /// `PENDING`, `CRASHED`, `CANCELLED`, …
    pub state_type: StateType,
    /// `Pending`, `Submitting`, `Crashed`, … (or a name put back as it was).
    pub name: std::borrow::Cow<'static, str>,
    /// Shown in the UI.
    pub message: Option<String>,
}

impl StateProposal {
    /// `PENDING/Pending`: the claim.
    pub fn pending() -> Self {
        Self {
            state_type: StateType::Pending,
            name: "Pending".into(),
            message: None,
        }
    }

    /// `PENDING/Submitting`: the worker is creating the infrastructure.
    pub fn submitting() -> Self {
        Self {
            state_type: StateType::Pending,
            name: "Submitting".into(),
            message: None,
        }
    }

    /// `CRASHED/Crashed` with an explanation.
    pub fn crashed(message: impl Into<String>) -> Self {
        Self {
            state_type: StateType::Crashed,
            name: "Crashed".into(),
            message: Some(message.into()),
        }
    }

    /// `CANCELLED/Cancelled` with an explanation.
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self {
            state_type: StateType::Cancelled,
            name: "Cancelled".into(),
            message: Some(message.into()),
        }
    }

    /// A state put back exactly as it was (type, name and a message).
    pub fn restore(state: &State, message: String) -> Self {
        Self {
            state_type: state.state_type,
            name: state.name.clone().unwrap_or_default().into(),
            message: Some(message),
        }
    }
}

/// One flow-run log line for `POST /logs/`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogEntry {
    /// Logger name (`prefect.flow_runs.worker`).
    pub name: String,
    /// Python logging level (10, 20, 30, 40, 50).
    pub level: u8,
    /// The message.
    pub message: String,
    /// UTC ISO-8601 with microseconds.
    pub timestamp: String,
    /// The run it belongs to.
    pub flow_run_id: Option<String>,
    /// Always null for worker logs.
    pub task_run_id: Option<String>,
}

/// Now, as Prefect writes timestamps (`2026-11-27T22:51:24.111655Z`).
pub fn timestamp_now() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flow_run_from_json() {
        let run = FlowRun::from_value(json!({
            "id": "r", "name": "n", "flow_id": "f", "deployment_id": null,
            "job_variables": {"image": "x"}, "state": {"type": "SCHEDULED"}
        }))
        .unwrap();
        assert_eq!(run.deployment_id, None);
        assert_eq!(run.job_variables["image"], json!("x"));
        assert_eq!(run.state_type(), Some(StateType::Scheduled));
        assert_eq!(run.infrastructure_pid, None);
        assert!(
            FlowRun::from_value(json!({"name": "x"}))
                .unwrap_err()
                .contains("id")
        );
    }

    #[test]
    fn unknown_state_types_do_not_fail_the_answer() {
        let run = FlowRun::from_value(json!({
            "id": "r", "flow_id": "f", "state": {"type": "SOMETHING_NEW", "id": "s"},
            "infrastructure_pid": "http+docker://localhost:abc"
        }))
        .unwrap();
        assert_eq!(run.state_type(), Some(StateType::Unknown));
        assert_eq!(
            run.infrastructure_pid.as_deref(),
            Some("http+docker://localhost:abc")
        );
        assert!(!StateType::Unknown.is_final());
        assert!(StateType::Crashed.is_final());
    }

    #[test]
    fn a_state_of_the_wrong_shape_is_an_error_naming_it() {
        let err = FlowRun::from_value(json!({"id": "r", "flow_id": "f", "state": {"type": 3}}))
            .unwrap_err();
        assert!(err.contains("`state`"), "{err}");
    }

    #[test]
    fn orchestration_result() {
        let r: OrchestrationResult = serde_json::from_value(json!({
            "status": "WAIT", "state": null,
            "details": {"type": "wait_details", "delay_seconds": 3, "reason": "busy"}
        }))
        .unwrap();
        assert_eq!(r.status, SetStateStatus::Wait);
        assert_eq!(r.delay_seconds(), 3.0);
        assert_eq!(r.reason(), "busy");
        assert_eq!(r.scheduled_time, None);
    }

    #[test]
    fn an_accepted_claim_carries_the_scheduled_time_the_server_copied() {
        let r: OrchestrationResult = serde_json::from_value(json!({
            "status": "ACCEPT",
            "state": {"id": "s2", "type": "PENDING", "name": "Pending", "message": null,
                      "timestamp": "2026-12-05T00:00:00.000000Z",
                      "state_details": {"flow_run_id": "r", "scheduled_time": "2026-12-05T00:00:00Z"}},
            "details": {"type": "accept_details"}
        }))
        .unwrap();
        assert_eq!(r.state_id(), Some("s2"));
        assert_eq!(r.scheduled_time.as_deref(), Some("2026-12-05T00:00:00Z"));
    }

    #[test]
    fn timestamps_have_micros_and_z() {
        let t = timestamp_now();
        assert_eq!(t.len(), 27, "{t}");
        assert!(t.ends_with('Z'));
    }
}
