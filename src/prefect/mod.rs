//! The Prefect side: a REST client for the endpoints a worker uses and their models.
//! Depends on HTTP and serde only; nothing here knows about Docker.

pub mod channel;
pub mod client;
pub mod events;
pub mod models;
pub mod socket;
pub mod subscriber;

pub use client::{ApiError, ClientConfig, LastLog, LogsNotTaken, PrefectClient};
pub use models::{
    Deployment, Flow, FlowRun, LogEntry, OrchestrationResult, SetStateStatus, State, StateProposal,
    StateType, WorkPool, WorkerStatus,
};
