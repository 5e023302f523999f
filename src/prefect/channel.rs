//! The worker channel of Prefect ≥ 3.9: one websocket per worker
//! (`/work_pools/{pool}/workers/connect`) that replaces the REST heartbeat and pool reads with
//! pushed work-pool snapshots, and delivers cleanup work (tearing down the infrastructure of
//! runs the server cancelled on its own). This module speaks the protocol — handshake, frames,
//! heartbeats, and which failures end the channel for good — and knows nothing of Docker.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, Message};

use super::client::ClientConfig;
use super::models::WorkPool;
use super::socket::{EventSocket, SocketError, auth_token, upgrade};
use crate::backoff::Backoff;

/// The protocol version both sides must support.
pub const CHANNEL_VERSION: &str = "work_pool_worker_channel.v1";
/// The one cleanup kind this worker handles.
pub const CANCELLING_TIMEOUT_TEARDOWN: &str = "cancelling_timeout_teardown.v1";
/// Cleanup kind: tear down whatever a claim the server withdrew left (Prefect's planned
/// pending-claim protocol; 3.9's schema defines it, the OSS 3.9.1 server does not send it yet).
pub const PENDING_CLAIM_TEARDOWN: &str = "pending_claim_teardown.v1";
const HEARTBEAT: &str = "worker_heartbeat.v1";
const SNAPSHOTS: &str = "work_pool_snapshot.v1";
const CLEANUP: &str = "cleanup_delivery.v1";
/// Connecting and the whole handshake must fit in this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the channel failed, and whether trying again can help. A terminal failure disables the
/// channel for the life of the process (the worker stays on REST); a retryable one reconnects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// Authentication, authorization, version, protocol errors, or no such endpoint.
    #[error("worker channel disabled ({reason}): {message}")]
    Terminal {
        /// The protocol's close reason (`protocol_error`, `endpoint_unavailable`, …).
        reason: String,
        /// What happened.
        message: String,
    },
    /// A lost connection, a timeout or a transient server error.
    #[error("worker channel unavailable ({reason}): {message}")]
    Retryable {
        /// The protocol's close reason (`connection_lost`, `transient_server_error`, …).
        reason: String,
        /// What happened.
        message: String,
    },
}

impl ChannelError {
    fn terminal(reason: &str, message: impl Into<String>) -> Self {
        Self::Terminal {
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    fn retryable(reason: &str, message: impl Into<String>) -> Self {
        Self::Retryable {
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    /// Whether the channel is off for good.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Terminal { .. })
    }

    /// Whether the server refused a frame it could not read (`protocol_error`): what a server
    /// whose schema lacks a cleanup kind the hello asked for answers.
    pub fn is_protocol_error(&self) -> bool {
        matches!(self, Self::Terminal { reason, .. } if reason == "protocol_error")
    }
}

/// What the worker tells the server about itself in `worker.hello.v1`.
#[derive(Debug, Clone)]
pub struct Hello {
    /// Fixed per worker process; the server echoes it in `worker.ready.v1`.
    pub consumer_id: String,
    /// Worker name.
    pub worker_name: String,
    /// Worker type (`docker`).
    pub worker_type: String,
    /// Requested heartbeat interval.
    pub heartbeat_interval_seconds: u64,
    /// `--work-queue` names (sorted).
    pub work_queue_names: Vec<String>,
    /// The cleanup kinds to ask for (one at a time); empty = no cleanup delivery.
    pub cleanup_kinds: Vec<&'static str>,
    /// Create the pool when it does not exist.
    pub create_pool_if_not_found: bool,
    /// Template for a created pool, or to fill an empty one.
    pub default_base_job_template: Value,
    /// Sent until sent once (`{"integrations": […]}`).
    pub worker_metadata: Option<Value>,
}

/// A work-pool snapshot pushed by the server; newer sequences replace older ones.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Increases within one connection; starts at 1 with the initial snapshot.
    pub sequence: u64,
    /// The pool as the server has it now.
    pub pool: WorkPool,
}

/// The server's answer to the hello.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The worker's id (Cloud only).
    pub worker_id: Option<String>,
    /// The heartbeat interval to keep.
    pub heartbeat_interval_seconds: u64,
    /// The server will send cleanup work.
    pub cleanup_accepted: bool,
    /// How many cleanups at once the server allows.
    pub max_cleanup_concurrency: u64,
    /// The pool at connection time.
    pub initial_snapshot: Snapshot,
}

/// Cleanup work: tear down the infrastructure of a run the server moved out of Cancelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanupMessage {
    /// Identifies the message across deliveries.
    pub message_id: String,
    /// Proves the reservation in renew/ack/release.
    pub reservation_token: String,
    /// The reservation lapses then unless renewed.
    pub lease_expires_at: DateTime<Utc>,
    /// `cancelling_timeout_teardown.v1` (or a kind this worker does not handle).
    pub kind: String,
    /// The run concerned.
    pub flow_run_id: Option<String>,
    /// Its infrastructure pid as the server recorded it.
    pub infrastructure_pid: Option<String>,
}

/// The server's answer to a renew, ack or release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationResult {
    /// The id of the frame answered.
    pub request_frame_id: String,
    /// `renew`, `ack` or `release`.
    pub operation: String,
    /// `accepted`, `error`, `not_found`, `expired`, …
    pub status: String,
    /// The new lease of an accepted renew.
    pub lease_expires_at: Option<DateTime<Utc>>,
}

/// A cleanup operation the worker sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Extend the lease while working.
    Renew,
    /// Done.
    Ack,
    /// Give the message back, with a reason.
    Release,
}

impl Operation {
    fn frame_type(self) -> &'static str {
        match self {
            Self::Renew => "cleanup.renew.v1",
            Self::Ack => "cleanup.ack.v1",
            Self::Release => "cleanup.release.v1",
        }
    }
}

/// What arrives during a session.
#[derive(Debug, Clone)]
pub enum Inbound {
    /// `work_pool.snapshot.v1`.
    Snapshot(Snapshot),
    /// `cleanup.message.v1`.
    Cleanup(CleanupMessage),
    /// `cleanup.operation_result.v1`.
    OperationResult(OperationResult),
}

/// A new frame id (UUIDv7, as Prefect's client uses).
pub fn frame_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn frame(kind: &str, id: &str, payload: Value) -> String {
    json!({
        "type": kind,
        "id": id,
        "sent_at": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "payload": payload,
    })
    .to_string()
}

/// A renew/ack/release frame; `reason` only for a release.
pub fn operation_frame(
    operation: Operation,
    id: &str,
    message: &CleanupMessage,
    reason: Option<&str>,
) -> String {
    let mut payload = json!({
        "message_id": message.message_id,
        "reservation_token": message.reservation_token,
    });
    if let Some(reason) = reason {
        payload["reason"] = json!(reason);
    }
    frame(operation.frame_type(), id, payload)
}

/// `ws://…/api/work_pools/<pool, every reserved byte escaped>/workers/connect`.
fn channel_path(pool: &str) -> String {
    let mut encoded = String::new();
    for b in pool.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("work_pools/{encoded}/workers/connect")
}

/// An open, negotiated channel.
pub struct Session {
    socket: EventSocket,
    /// What the server agreed to.
    pub ready: Ready,
}

/// Connects and negotiates, within 10 s. `has_been_healthy`: a refused connection is terminal
/// before the first healthy session (no channel here) and retryable after (a restart).
///
/// # Errors
/// [`ChannelError`], classified as the reference worker classifies it.
pub async fn open(
    config: &ClientConfig,
    pool: &str,
    hello: &Hello,
    has_been_healthy: bool,
) -> Result<Session, ChannelError> {
    match tokio::time::timeout(
        SETUP_TIMEOUT,
        negotiate(config, pool, hello, has_been_healthy),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(ChannelError::retryable(
            "setup_timeout",
            "Worker channel setup timed out",
        )),
    }
}

async fn negotiate(
    config: &ClientConfig,
    pool: &str,
    hello: &Hello,
    has_been_healthy: bool,
) -> Result<Session, ChannelError> {
    let mut socket = upgrade(config, &channel_path(pool))
        .await
        .map_err(|e| classify_setup(e, has_been_healthy))?;
    send(
        &mut socket,
        json!({"type": "auth", "token": auth_token(config)}).to_string(),
    )
    .await?;
    let auth = receive(&mut socket).await?;
    if auth.get("type").and_then(Value::as_str) != Some("auth_success") {
        let reason = auth
            .get("reason")
            .and_then(Value::as_str)
            .filter(|r| close_reason(r).is_some())
            .unwrap_or("protocol_error");
        return Err(ChannelError::terminal(
            reason,
            "Worker channel authentication failed",
        ));
    }
    send(&mut socket, hello_frame(hello)).await?;
    let ready = receive(&mut socket).await?;
    let ready = parse_ready(&ready, hello)?;
    Ok(Session { socket, ready })
}

fn hello_frame(hello: &Hello) -> String {
    let mut capabilities = vec![HEARTBEAT, SNAPSHOTS];
    let concurrency = if hello.cleanup_kinds.is_empty() {
        0
    } else {
        capabilities.push(CLEANUP);
        1
    };
    let kinds = &hello.cleanup_kinds;
    frame(
        "worker.hello.v1",
        &frame_id(),
        json!({
            "consumer_id": hello.consumer_id,
            "worker_name": hello.worker_name,
            "worker_type": hello.worker_type,
            "heartbeat_interval_seconds": hello.heartbeat_interval_seconds,
            "supported_channel_versions": [CHANNEL_VERSION],
            "requested_capabilities": capabilities,
            "work_queue_names": hello.work_queue_names,
            "handled_cleanup_kinds": kinds,
            "max_cleanup_concurrency": concurrency,
            "create_pool_if_not_found": hello.create_pool_if_not_found,
            "default_base_job_template": hello.default_base_job_template,
            "worker_metadata": hello.worker_metadata,
        }),
    )
}

fn malformed(what: &str) -> ChannelError {
    ChannelError::terminal(
        "protocol_error",
        format!("Worker channel received a malformed protocol frame ({what})"),
    )
}

fn parse_ready(value: &Value, hello: &Hello) -> Result<Ready, ChannelError> {
    if value.get("type").and_then(Value::as_str) != Some("worker.ready.v1") {
        return Err(ChannelError::terminal(
            "protocol_error",
            "Expected worker.ready.v1 during worker channel setup",
        ));
    }
    let payload = value.get("payload").ok_or_else(|| malformed("ready"))?;
    if payload.get("consumer_id").and_then(Value::as_str) != Some(hello.consumer_id.as_str()) {
        return Err(ChannelError::terminal(
            "protocol_error",
            "Worker channel ready frame consumer_id did not match hello",
        ));
    }
    let accepted: Vec<&str> = payload
        .get("accepted_capabilities")
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("ready capabilities"))?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if !accepted.contains(&HEARTBEAT) || !accepted.contains(&SNAPSHOTS) {
        return Err(malformed("required capabilities not accepted"));
    }
    let cleanup_accepted = accepted.contains(&CLEANUP);
    if cleanup_accepted && hello.cleanup_kinds.is_empty() {
        return Err(ChannelError::terminal(
            "protocol_error",
            "Worker channel accepted cleanup_delivery.v1 even though the worker did not request it",
        ));
    }
    let heartbeat_interval_seconds = payload
        .get("effective_heartbeat_interval_seconds")
        .and_then(Value::as_u64)
        .filter(|s| *s > 0)
        .ok_or_else(|| malformed("heartbeat interval"))?;
    let initial_snapshot = parse_snapshot(payload.get("initial_snapshot"))?;
    if initial_snapshot.sequence != 1 {
        return Err(malformed("initial snapshot sequence"));
    }
    Ok(Ready {
        worker_id: payload
            .get("worker_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        heartbeat_interval_seconds,
        cleanup_accepted,
        max_cleanup_concurrency: payload
            .get("effective_max_cleanup_concurrency")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        initial_snapshot,
    })
}

fn parse_snapshot(payload: Option<&Value>) -> Result<Snapshot, ChannelError> {
    let payload = payload.ok_or_else(|| malformed("snapshot"))?;
    let sequence = payload
        .get("snapshot_sequence")
        .and_then(Value::as_u64)
        .filter(|s| *s > 0)
        .ok_or_else(|| malformed("snapshot sequence"))?;
    let pool: WorkPool = payload
        .get("work_pool")
        .cloned()
        .and_then(|p| serde_json::from_value(p).ok())
        .ok_or_else(|| malformed("snapshot work pool"))?;
    Ok(Snapshot { sequence, pool })
}

fn parse_time(value: Option<&Value>) -> Option<DateTime<Utc>> {
    value
        .and_then(Value::as_str)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn str_field(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// Parses one frame received during a session.
///
/// # Errors
/// A terminal `protocol_error` for an unknown or malformed frame, as the reference treats it.
pub fn parse_inbound(value: &Value) -> Result<Inbound, ChannelError> {
    let payload = value.get("payload").ok_or_else(|| malformed("payload"))?;
    match value.get("type").and_then(Value::as_str) {
        Some("work_pool.snapshot.v1") => Ok(Inbound::Snapshot(parse_snapshot(Some(payload))?)),
        Some("cleanup.message.v1") => {
            let target = payload.get("target").cloned().unwrap_or(Value::Null);
            Ok(Inbound::Cleanup(CleanupMessage {
                message_id: str_field(payload, "message_id")
                    .ok_or_else(|| malformed("cleanup message id"))?,
                reservation_token: str_field(payload, "reservation_token")
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| malformed("cleanup reservation token"))?,
                lease_expires_at: parse_time(payload.get("lease_expires_at"))
                    .ok_or_else(|| malformed("cleanup lease"))?,
                kind: str_field(payload, "kind").ok_or_else(|| malformed("cleanup kind"))?,
                flow_run_id: str_field(&target, "flow_run_id"),
                infrastructure_pid: str_field(&target, "infrastructure_pid"),
            }))
        }
        Some("cleanup.operation_result.v1") => Ok(Inbound::OperationResult(OperationResult {
            request_frame_id: str_field(payload, "request_frame_id")
                .ok_or_else(|| malformed("operation result frame id"))?,
            operation: str_field(payload, "operation")
                .ok_or_else(|| malformed("operation result operation"))?,
            status: str_field(payload, "status")
                .ok_or_else(|| malformed("operation result status"))?,
            lease_expires_at: parse_time(payload.get("lease_expires_at")),
        })),
        other => Err(ChannelError::terminal(
            "protocol_error",
            format!("Worker channel received unsupported frame type {other:?}"),
        )),
    }
}

/// Whether `reason` is one of the protocol's close reasons, and if so whether it is terminal.
fn close_reason(reason: &str) -> Option<bool> {
    match reason {
        "authentication_failed"
        | "authorization_failed"
        | "unsupported_version"
        | "protocol_error" => Some(true),
        "heartbeat_persistence_failed" | "transient_server_error" => Some(false),
        _ => None,
    }
}

/// A close frame's reason and code, classified.
fn classify_close(reason: &str, code: Option<u16>) -> ChannelError {
    let message = format!("closed by the server (code {code:?}, reason {reason:?})");
    match (close_reason(reason), code) {
        (Some(true), _) => ChannelError::terminal(reason, message),
        (Some(false), _) => ChannelError::retryable(reason, message),
        (None, Some(1008)) => ChannelError::terminal("authorization_failed", message),
        (None, Some(1002)) => ChannelError::terminal("protocol_error", message),
        (None, Some(1011)) => ChannelError::retryable("transient_server_error", message),
        _ => ChannelError::retryable("connection_lost", message),
    }
}

fn classify_setup(error: SocketError, has_been_healthy: bool) -> ChannelError {
    if let SocketError::Socket(tungstenite::Error::Http(response)) = &error {
        let status = response.status().as_u16();
        return match status {
            401 => ChannelError::terminal(
                "authentication_failed",
                "Worker channel setup was rejected by the server (401)",
            ),
            403 => ChannelError::terminal(
                "authorization_failed",
                "Worker channel setup was rejected by the server (403)",
            ),
            404 | 405 => ChannelError::terminal(
                "endpoint_unavailable",
                format!("Worker channel endpoint is unavailable ({status})"),
            ),
            500.. => ChannelError::retryable(
                "transient_server_error",
                format!("Worker channel setup failed due to a transient server error ({status})"),
            ),
            _ => ChannelError::terminal(
                "endpoint_unavailable",
                format!("Worker channel setup failed during HTTP upgrade ({status})"),
            ),
        };
    }
    let connection_failed = matches!(
        &error,
        SocketError::Socket(
            tungstenite::Error::Io(_)
                | tungstenite::Error::Url(_)
                | tungstenite::Error::Protocol(_)
                | tungstenite::Error::Tls(_)
        ) | SocketError::Url(_)
    );
    if connection_failed {
        if has_been_healthy {
            ChannelError::retryable("connection_lost", format!("reconnect failed: {error}"))
        } else {
            ChannelError::terminal(
                "endpoint_unavailable",
                format!("Worker channel endpoint is unavailable: {error}"),
            )
        }
    } else {
        ChannelError::retryable(
            "transient_server_error",
            format!("Worker channel setup failed due to a transient error: {error}"),
        )
    }
}

fn classify_socket(error: &tungstenite::Error) -> ChannelError {
    match error {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            ChannelError::retryable("connection_closed", "Worker channel connection closed")
        }
        other => ChannelError::retryable(
            "connection_lost",
            format!("Worker channel connection was lost: {other}"),
        ),
    }
}

async fn send(socket: &mut EventSocket, text: String) -> Result<(), ChannelError> {
    socket
        .send(Message::text(text))
        .await
        .map_err(|e| classify_socket(&e))
}

/// The next JSON frame; pings are answered by the socket, closes are classified.
async fn receive(socket: &mut EventSocket) -> Result<Value, ChannelError> {
    loop {
        match socket.next().await {
            None => {
                return Err(ChannelError::retryable(
                    "connection_closed",
                    "Worker channel connection closed",
                ));
            }
            Some(Err(e)) => return Err(classify_socket(&e)),
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(&text).map_err(|_| {
                    ChannelError::terminal("protocol_error", "Worker channel received invalid JSON")
                });
            }
            Some(Ok(Message::Binary(bytes))) => {
                return serde_json::from_slice(&bytes).map_err(|_| {
                    ChannelError::terminal("protocol_error", "Worker channel received invalid JSON")
                });
            }
            Some(Ok(Message::Close(close))) => {
                let (reason, code) = close.map_or((String::new(), None), |c| {
                    (c.reason.to_string(), Some(u16::from(c.code)))
                });
                return Err(classify_close(&reason, code));
            }
            Some(Ok(_)) => {}
        }
    }
}

impl Session {
    /// Runs the session until it ends: sends a heartbeat every agreed interval, sends
    /// `outbound` frames, and hands every received frame to `on_frame`. Returns why it ended.
    pub async fn run(
        mut self,
        hello: &Hello,
        outbound: &mut mpsc::UnboundedReceiver<String>,
        mut on_frame: impl FnMut(Inbound),
    ) -> ChannelError {
        let interval = Duration::from_secs(self.ready.heartbeat_interval_seconds);
        let mut next_heartbeat = tokio::time::Instant::now() + interval;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next_heartbeat) => {
                    next_heartbeat += interval;
                    let beat = frame(
                        "worker.heartbeat.v1",
                        &frame_id(),
                        json!({
                            "consumer_id": hello.consumer_id,
                            "worker_name": hello.worker_name,
                            "heartbeat_interval_seconds": self.ready.heartbeat_interval_seconds,
                        }),
                    );
                    if let Err(e) = send(&mut self.socket, beat).await {
                        return e;
                    }
                }
                Some(text) = outbound.recv() => {
                    if let Err(e) = send(&mut self.socket, text).await {
                        return e;
                    }
                }
                received = receive(&mut self.socket) => {
                    let parsed = received.and_then(|v| parse_inbound(&v));
                    match parsed {
                        Ok(Inbound::Cleanup(_) | Inbound::OperationResult(_))
                            if !self.ready.cleanup_accepted =>
                        {
                            return ChannelError::terminal(
                                "protocol_error",
                                "Worker channel received cleanup work without accepted cleanup delivery",
                            );
                        }
                        Ok(frame) => on_frame(frame),
                        Err(e) => {
                            let _ = self.socket.close(None).await;
                            return e;
                        }
                    }
                }
            }
        }
    }
}

/// The first wait before reconnecting the channel…
const RECONNECT_MIN: Duration = Duration::from_secs(1);
/// … doubled per failed attempt up to this.
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// How many delays it takes the schedule to reach [`RECONNECT_MAX`] (1, 2, 4, 8, 16, 30):
/// later attempts wait as long as this one.
const RECONNECT_STEPS_TO_MAX: u32 = 6;

/// The channel's reconnect schedule: 1 s doubling to 30 s. A reconnect loop keeps one, sleeps
/// through [`Backoff::wait`] (which ends at once on shutdown) and resets it once a session is
/// up.
pub fn reconnect_backoff() -> Backoff {
    Backoff::new(RECONNECT_MIN, RECONNECT_MAX)
}

/// The wait before reconnect attempt `attempt` (1-based): the `attempt`-th delay of
/// [`reconnect_backoff`], for a loop that counts its attempts instead of keeping a [`Backoff`].
pub fn reconnect_delay(attempt: u32) -> Duration {
    let mut backoff = reconnect_backoff();
    let earlier = attempt.clamp(1, RECONNECT_STEPS_TO_MAX) - 1;
    for _ in 0..earlier {
        backoff.next_delay();
    }
    backoff.next_delay()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            consumer_id: "c1".into(),
            worker_name: "w".into(),
            worker_type: "docker".into(),
            heartbeat_interval_seconds: 30,
            work_queue_names: vec![],
            cleanup_kinds: vec![CANCELLING_TIMEOUT_TEARDOWN],
            create_pool_if_not_found: true,
            default_base_job_template: json!({}),
            worker_metadata: None,
        }
    }

    fn ready(accepted: Value, consumer: &str) -> Value {
        json!({"type": "worker.ready.v1", "id": "x", "sent_at": "2026-01-01T00:00:00Z", "payload": {
            "consumer_id": consumer, "worker_id": null, "selected_channel_version": CHANNEL_VERSION,
            "effective_heartbeat_interval_seconds": 15, "accepted_capabilities": accepted,
            "rejected_capabilities": [], "effective_max_cleanup_concurrency": 1,
            "resolved_work_queues": [],
            "initial_snapshot": {"snapshot_sequence": 1, "reason": "initial", "work_pool": {
                "id": "p1", "name": "pool", "type": "docker", "base_job_template": {}, "is_paused": false}}}})
    }

    #[test]
    fn pool_names_are_escaped_like_pythons_quote_with_no_safe_characters() {
        assert_eq!(
            channel_path("my pool/ä"),
            "work_pools/my%20pool%2F%C3%A4/workers/connect"
        );
        assert_eq!(
            channel_path("a-b_c.d~e"),
            "work_pools/a-b_c.d~e/workers/connect"
        );
    }

    #[test]
    fn ready_frames_are_checked() {
        let all = json!([HEARTBEAT, SNAPSHOTS, CLEANUP]);
        let r = parse_ready(&ready(all.clone(), "c1"), &hello()).unwrap();
        assert_eq!(r.heartbeat_interval_seconds, 15);
        assert!(r.cleanup_accepted);
        assert_eq!(r.initial_snapshot.pool.name, "pool");
        let wrong = parse_ready(&ready(all.clone(), "other"), &hello()).unwrap_err();
        assert!(wrong.is_terminal() && wrong.to_string().contains("consumer_id"));
        let mut no_cleanup = hello();
        no_cleanup.cleanup_kinds.clear();
        assert!(parse_ready(&ready(all, "c1"), &no_cleanup).is_err());
        assert!(parse_ready(&ready(json!([HEARTBEAT]), "c1"), &hello()).is_err());
    }

    #[test]
    fn close_reasons_decide_between_retry_and_giving_up() {
        assert!(classify_close("protocol_error", Some(1002)).is_terminal());
        assert!(classify_close("authentication_failed", Some(1008)).is_terminal());
        assert!(!classify_close("transient_server_error", Some(1011)).is_terminal());
        assert!(!classify_close("heartbeat_persistence_failed", Some(1011)).is_terminal());
        assert!(classify_close("", Some(1008)).is_terminal());
        assert!(!classify_close("", Some(1000)).is_terminal());
        assert!(!classify_close("", None).is_terminal());
    }

    #[test]
    fn inbound_frames_parse_and_unknown_ones_are_protocol_errors() {
        let cleanup = json!({"type": "cleanup.message.v1", "id": "f", "sent_at": "2026-01-01T00:00:00Z",
            "payload": {"message_id": "m", "reservation_token": "t", "lease_expires_at": "2026-01-01T00:00:30Z",
            "delivery_count": 1, "kind": CANCELLING_TIMEOUT_TEARDOWN, "data": {},
            "target": {"flow_run_id": "r", "infrastructure_pid": "unix:///var/run/docker.sock:abc"}}});
        let Inbound::Cleanup(m) = parse_inbound(&cleanup).unwrap() else {
            panic!("not a cleanup")
        };
        assert_eq!(
            m.infrastructure_pid.as_deref(),
            Some("unix:///var/run/docker.sock:abc")
        );
        assert_eq!(m.flow_run_id.as_deref(), Some("r"));
        let odd = json!({"type": "worker.hello.v1", "payload": {}});
        assert!(parse_inbound(&odd).unwrap_err().is_terminal());
        let frame: Value =
            serde_json::from_str(&operation_frame(Operation::Release, "i", &m, Some("why")))
                .unwrap();
        assert_eq!(frame["type"], "cleanup.release.v1");
        assert_eq!(
            frame["payload"],
            json!({"message_id": "m", "reservation_token": "t", "reason": "why"})
        );
    }

    #[test]
    fn reconnects_back_off_to_thirty_seconds() {
        let delays: Vec<u64> = (1..=7).map(|a| reconnect_delay(a).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(reconnect_delay(0), Duration::from_secs(1));
        assert_eq!(reconnect_delay(u32::MAX), Duration::from_secs(30));
        let mut backoff = reconnect_backoff();
        let kept: Vec<u64> = (0..7).map(|_| backoff.next_delay().as_secs()).collect();
        assert_eq!(kept, delays);
    }
}
