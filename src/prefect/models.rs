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
            raw,
        })
    }

    /// The run's current state type (`SCHEDULED`, `PENDING`, …), if it has a state.
    pub fn state_type(&self) -> Option<&str> {
        self.raw.pointer("/state/type").and_then(Value::as_str)
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
pub struct OrchestrationResult {
    /// ACCEPT, REJECT, ABORT or WAIT.
    pub status: SetStateStatus,
    /// The run's state after the proposal.
    #[serde(default)]
    pub state: Option<Value>,
    /// `reason`, `delay_seconds`, …
    #[serde(default)]
    pub details: Value,
}

impl OrchestrationResult {
    /// The resulting state's type (`PENDING`, `CRASHED`, …).
    pub fn state_type(&self) -> Option<&str> {
        self.state.as_ref()?.get("type")?.as_str()
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
    pub state_type: &'static str,
    /// `Pending`, `Submitting`, `Crashed`, …
    pub name: &'static str,
    /// Shown in the UI.
    pub message: Option<String>,
}

impl StateProposal {
    /// `PENDING/Pending`: the claim.
    pub fn pending() -> Self {
        Self {
            state_type: "PENDING",
            name: "Pending",
            message: None,
        }
    }

    /// `PENDING/Submitting`: the worker is creating the infrastructure.
    pub fn submitting() -> Self {
        Self {
            state_type: "PENDING",
            name: "Submitting",
            message: None,
        }
    }

    /// `CRASHED/Crashed` with an explanation.
    pub fn crashed(message: impl Into<String>) -> Self {
        Self {
            state_type: "CRASHED",
            name: "Crashed",
            message: Some(message.into()),
        }
    }

    /// `CANCELLED/Cancelled` with an explanation.
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self {
            state_type: "CANCELLED",
            name: "Cancelled",
            message: Some(message.into()),
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
        assert_eq!(run.state_type(), Some("SCHEDULED"));
        assert!(
            FlowRun::from_value(json!({"name": "x"}))
                .unwrap_err()
                .contains("id")
        );
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
    }

    #[test]
    fn timestamps_have_micros_and_z() {
        let t = timestamp_now();
        assert_eq!(t.len(), 27, "{t}");
        assert!(t.ends_with('Z'));
    }
}
