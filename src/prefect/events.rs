//! Sends Prefect events over the `/events/in` websocket, as Prefect's own client does: events
//! are queued and sent in the background; delivery is confirmed with a ping/pong checkpoint
//! after each batch; a lost connection is reopened with backoff and every unconfirmed event is
//! sent again (the server de-duplicates by event id). Knows Prefect events, nothing of Docker.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::client::ClientConfig;
use super::socket::{EventSocket, SocketError, connect, connect_legacy, is_subprotocol_refusal};

/// Events waiting to be sent or confirmed; beyond this the oldest are dropped (with a warning).
const QUEUE_LIMIT: usize = 10_000;
/// How long shutdown waits to deliver what is still queued.
const FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// A handle for emitting events; cheap to clone. A disabled handle drops them.
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: Option<mpsc::Sender<Value>>,
}

impl EventSink {
    /// A sink that sends nothing.
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// Starts the sender; it delivers until `shutdown`, then flushes for up to 5 s.
    pub fn spawn(config: ClientConfig, shutdown: CancellationToken) -> (Self, JoinHandle<()>) {
        let (sink, rx) = Self::queue();
        let task = tokio::spawn(send_loop(config, rx, shutdown));
        (sink, task)
    }

    /// A sink and the queue its events go to, for a sender of the caller's choosing (the
    /// websocket sender above; a test reading what was emitted).
    pub fn queue() -> (Self, mpsc::Receiver<Value>) {
        let (tx, rx) = mpsc::channel(QUEUE_LIMIT);
        (Self { tx: Some(tx) }, rx)
    }

    /// Queues one event (a full Prefect event object). Never blocks.
    pub fn emit(&self, event: Value) {
        if let Some(tx) = &self.tx
            && tx.try_send(event).is_err()
        {
            tracing::warn!("the event queue is full; an event was dropped");
        }
    }
}

async fn send_loop(
    config: ClientConfig,
    mut rx: mpsc::Receiver<Value>,
    shutdown: CancellationToken,
) {
    let mut unconfirmed: VecDeque<Value> = VecDeque::new();
    let mut socket: Option<EventSocket> = None;
    let mut delay = Duration::from_secs(1);
    let mut flush_deadline: Option<tokio::time::Instant> = None;
    // Prefect 2 servers take events without the subprotocol and auth message.
    let mut legacy = false;
    // Nothing was ever delivered: at shutdown there is no point waiting for a server that
    // has not taken a single event.
    let mut ever_delivered = false;
    loop {
        if unconfirmed.is_empty() {
            let next = tokio::select! {
                e = rx.recv() => e,
                () = shutdown.cancelled(), if flush_deadline.is_none() => None,
            };
            match next {
                Some(event) => unconfirmed.push_back(event),
                None => {
                    while let Ok(event) = rx.try_recv() {
                        unconfirmed.push_back(event);
                    }
                    if unconfirmed.is_empty() {
                        close(socket.take()).await;
                        return;
                    }
                    flush_deadline.get_or_insert_with(|| tokio::time::Instant::now() + FLUSH_LIMIT);
                }
            }
        }
        while let Ok(event) = rx.try_recv() {
            unconfirmed.push_back(event);
        }
        if unconfirmed.len() > QUEUE_LIMIT {
            let excess = unconfirmed.len() - QUEUE_LIMIT;
            unconfirmed.drain(..excess);
            tracing::warn!(
                dropped = excess,
                "events could not be delivered for a while; dropped the oldest"
            );
        }
        if shutdown.is_cancelled() {
            if !ever_delivered && socket.is_none() {
                tracing::debug!(
                    undelivered = unconfirmed.len(),
                    "stopping with events no server ever accepted"
                );
                return;
            }
            flush_deadline.get_or_insert_with(|| tokio::time::Instant::now() + FLUSH_LIMIT);
        }
        let attempt = deliver(&config, &mut socket, &unconfirmed, legacy);
        let result = match flush_deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, attempt)
                .await
                .unwrap_or_else(|_| Err(SocketError::Handshake("shutdown flush timed out".into()))),
            None => attempt.await,
        };
        match result {
            Ok(()) => {
                unconfirmed.clear();
                ever_delivered = true;
                delay = Duration::from_secs(1);
            }
            Err(e) if !legacy && socket.is_none() && is_subprotocol_refusal(&e) => {
                tracing::debug!(error = %e, "the server does not speak Prefect 3's events protocol; using the legacy one");
                legacy = true;
            }
            Err(e) => {
                socket = None;
                if let Some(deadline) = flush_deadline
                    && tokio::time::Instant::now() >= deadline
                {
                    tracing::warn!(error = %e, undelivered = unconfirmed.len(), "could not deliver the last events before stopping");
                    return;
                }
                tracing::debug!(error = %e, pending = unconfirmed.len(), retry_in_s = delay.as_secs(), "events not confirmed; will reconnect and resend");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled(), if flush_deadline.is_none() => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Sends every unconfirmed event (opening the socket if needed), then pings and waits for the
/// pong: once it arrives, the server has read everything sent before it.
async fn deliver(
    config: &ClientConfig,
    socket: &mut Option<EventSocket>,
    events: &VecDeque<Value>,
    legacy: bool,
) -> Result<(), SocketError> {
    if socket.is_none() {
        *socket = Some(if legacy {
            connect_legacy(config, "events/in").await?
        } else {
            let token = config.auth_string.clone().filter(|s| !s.is_empty());
            connect(config, "events/in", token).await?
        });
    }
    let Some(ws) = socket.as_mut() else {
        return Err(SocketError::Handshake("no socket".into()));
    };
    for event in events {
        ws.feed(Message::text(event.to_string())).await?;
    }
    let nonce = uuid::Uuid::new_v4().as_bytes().to_vec();
    ws.send(Message::Ping(nonce.clone().into())).await?;
    let confirmed = async {
        while let Some(message) = ws.next().await {
            if let Message::Pong(payload) = message?
                && payload.as_ref() == nonce.as_slice()
            {
                return Ok(());
            }
        }
        Err(SocketError::Handshake(
            "the server closed the events socket".into(),
        ))
    };
    tokio::time::timeout(Duration::from_secs(10), confirmed)
        .await
        .map_err(|_| SocketError::Handshake("no pong within 10 s".into()))?
}

async fn close(socket: Option<EventSocket>) {
    if let Some(mut ws) = socket {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
}
