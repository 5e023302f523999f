//! Sends Prefect events over the `/events/in` websocket, as Prefect's own client does: events
//! are queued and sent in the background; delivery is confirmed with a ping/pong checkpoint
//! after each batch; a lost connection is reopened with backoff and every unconfirmed event is
//! sent again (the server de-duplicates by event id). Knows Prefect events, nothing of Docker.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::ClientConfig;
use super::socket::{EventSocket, SocketError, connect, connect_legacy, is_subprotocol_refusal};
use crate::backoff::{self, Backoff};

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

    /// Starts the sender in `tasks`; it delivers until `shutdown`, then flushes for up to 5 s.
    pub fn spawn(
        config: ClientConfig,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> (Self, JoinHandle<()>) {
        let (sink, rx) = Self::queue();
        let task = tasks.spawn(send_loop(config, rx, shutdown));
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

/// The first wait before reconnecting after events went unconfirmed…
const RECONNECT_MIN: Duration = Duration::from_secs(1);
/// … doubled per failure up to this.
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// The sender task: delivers until `shutdown`, then flushes what is left for up to
/// [`FLUSH_LIMIT`].
async fn send_loop(config: ClientConfig, rx: mpsc::Receiver<Value>, shutdown: CancellationToken) {
    let mut sender = Sender::new(config, rx, shutdown);
    loop {
        if sender.gather().await.is_break() {
            return;
        }
        let result = sender.attempt().await;
        if sender.settle(result).await.is_break() {
            return;
        }
    }
}

/// The sender task's state between delivery attempts.
struct Sender {
    config: ClientConfig,
    rx: mpsc::Receiver<Value>,
    shutdown: CancellationToken,
    /// Events taken from the queue and not yet confirmed by a pong; all are sent again over a
    /// new connection (the server de-duplicates by event id).
    unconfirmed: VecDeque<Value>,
    /// The open connection, if any.
    socket: Option<EventSocket>,
    /// The wait before reconnecting; reset by a confirmed delivery.
    backoff: Backoff,
    /// Set once shutdown began: delivery ends by then, delivered or not.
    flush_deadline: Option<Instant>,
    /// Prefect 2 servers take events without the subprotocol and auth message.
    legacy: bool,
    /// Nothing was ever delivered: at shutdown there is no point waiting for a server that
    /// has not taken a single event.
    ever_delivered: bool,
}

impl Sender {
    fn new(config: ClientConfig, rx: mpsc::Receiver<Value>, shutdown: CancellationToken) -> Self {
        Self {
            config,
            rx,
            shutdown,
            unconfirmed: VecDeque::new(),
            socket: None,
            backoff: Backoff::new(RECONNECT_MIN, RECONNECT_MAX),
            flush_deadline: None,
            legacy: false,
            ever_delivered: false,
        }
    }

    /// Gets the next batch ready: waits for an event when none is pending, takes everything
    /// queued, drops the oldest beyond [`QUEUE_LIMIT`], and starts the flush at shutdown.
    /// `Break` when there is nothing (more) to deliver.
    async fn gather(&mut self) -> ControlFlow<()> {
        if self.unconfirmed.is_empty() {
            self.wait_for_events().await?;
        }
        self.take_queued();
        self.drop_oldest_beyond_limit();
        if self.shutdown.is_cancelled() {
            if !self.ever_delivered && self.socket.is_none() {
                tracing::debug!(
                    undelivered = self.unconfirmed.len(),
                    "stopping with events no server ever accepted"
                );
                return ControlFlow::Break(());
            }
            self.start_flush();
        }
        ControlFlow::Continue(())
    }

    /// Waits for the next event, or for shutdown (before the flush began). `Break` when the
    /// queue is closed or shutdown came with nothing left to deliver (the socket is closed).
    async fn wait_for_events(&mut self) -> ControlFlow<()> {
        let next = tokio::select! {
            e = self.rx.recv() => e,
            () = self.shutdown.cancelled(), if self.flush_deadline.is_none() => None,
        };
        match next {
            Some(event) => self.unconfirmed.push_back(event),
            None => {
                self.take_queued();
                if self.unconfirmed.is_empty() {
                    close(self.socket.take()).await;
                    return ControlFlow::Break(());
                }
                self.start_flush();
            }
        }
        ControlFlow::Continue(())
    }

    /// Moves every event already queued to the unconfirmed ones.
    fn take_queued(&mut self) {
        while let Ok(event) = self.rx.try_recv() {
            self.unconfirmed.push_back(event);
        }
    }

    /// Bounds the backlog of a long outage: the oldest events beyond [`QUEUE_LIMIT`] go.
    fn drop_oldest_beyond_limit(&mut self) {
        if self.unconfirmed.len() > QUEUE_LIMIT {
            let excess = self.unconfirmed.len() - QUEUE_LIMIT;
            self.unconfirmed.drain(..excess);
            tracing::warn!(
                dropped = excess,
                "events could not be delivered for a while; dropped the oldest"
            );
        }
    }

    /// Starts the shutdown flush (once): from now on delivery has [`FLUSH_LIMIT`] left.
    fn start_flush(&mut self) {
        self.flush_deadline
            .get_or_insert_with(|| Instant::now() + FLUSH_LIMIT);
    }

    /// One delivery of every unconfirmed event, cut off at the flush deadline if there is one.
    async fn attempt(&mut self) -> Result<(), SocketError> {
        let attempt = deliver(
            &self.config,
            &mut self.socket,
            &self.unconfirmed,
            self.legacy,
        );
        match self.flush_deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, attempt)
                .await
                .unwrap_or_else(|_| Err(SocketError::Handshake("shutdown flush timed out".into()))),
            None => attempt.await,
        }
    }

    /// Takes in a delivery's outcome: confirmed events are done; a server that refuses Prefect
    /// 3's subprotocol gets the legacy one next; any other failure drops the connection and
    /// waits before the next attempt. `Break` when the flush deadline has passed.
    async fn settle(&mut self, result: Result<(), SocketError>) -> ControlFlow<()> {
        match result {
            Ok(()) => {
                self.unconfirmed.clear();
                self.ever_delivered = true;
                self.backoff.reset();
            }
            Err(e) if !self.legacy && self.socket.is_none() && is_subprotocol_refusal(&e) => {
                tracing::debug!(error = %e, "the server does not speak Prefect 3's events protocol; using the legacy one");
                self.legacy = true;
            }
            Err(e) => return self.back_off(&e).await,
        }
        ControlFlow::Continue(())
    }

    /// After a failed delivery: gives up once the flush deadline has passed, else waits the
    /// next backoff delay. Before shutdown the wait ends at shutdown, so the flush starts at
    /// once; during the flush the token is already cancelled, so the wait ends at the flush
    /// deadline at the latest.
    async fn back_off(&mut self, error: &SocketError) -> ControlFlow<()> {
        self.socket = None;
        if let Some(deadline) = self.flush_deadline
            && Instant::now() >= deadline
        {
            tracing::warn!(error = %error, undelivered = self.unconfirmed.len(), "could not deliver the last events before stopping");
            return ControlFlow::Break(());
        }
        let delay = self.backoff.next_delay();
        tracing::debug!(error = %error, pending = self.unconfirmed.len(), retry_in_s = delay.as_secs(), "events not confirmed; will reconnect and resend");
        match self.flush_deadline {
            // `false` means shutdown came: the next round starts the flush.
            None => _ = backoff::sleep(delay, &self.shutdown).await,
            Some(deadline) => tokio::time::sleep_until(deadline.min(Instant::now() + delay)).await,
        }
        ControlFlow::Continue(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    fn config(port: u16) -> ClientConfig {
        ClientConfig {
            api_url: format!("http://127.0.0.1:{port}/api").parse().unwrap(),
            api_key: None,
            auth_string: None,
            timeout: Duration::from_secs(5),
            max_retries: 0,
            worker_name: None,
            csrf_enabled: false,
        }
    }

    /// A generous guard, so a sender that never gets there fails the test instead of hanging
    /// it; nothing is asserted about how long it took.
    async fn within<T>(what: &str, step: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), step)
            .await
            .unwrap_or_else(|_| panic!("the sender never {what}"))
    }

    fn event(id: u32) -> Value {
        json!({"id": id.to_string(), "event": "test"})
    }

    /// Accepts one `/events/in` connection the way Prefect 3 does: the `prefect` subprotocol,
    /// then the in-band auth message answered with `auth_success`.
    async fn accept(
        listener: &TcpListener,
    ) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
        let (tcp, _) = listener.accept().await.unwrap();
        #[expect(
            clippy::result_large_err,
            reason = "tungstenite's handshake callback fixes this signature"
        )]
        let with_subprotocol = |_: &Request, mut response: Response| {
            response
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", "prefect".parse().unwrap());
            Ok(response)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, with_subprotocol)
            .await
            .unwrap();
        let auth = ws.next().await.unwrap().unwrap();
        assert!(auth.to_text().unwrap().contains("\"auth\""), "{auth:?}");
        ws.send(Message::text(json!({"type": "auth_success"}).to_string()))
            .await
            .unwrap();
        ws
    }

    /// The next event id the server reads (pings are answered by tungstenite as it reads).
    async fn next_id(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> String {
        loop {
            if let Message::Text(text) = ws.next().await.unwrap().unwrap() {
                let value: Value = serde_json::from_str(&text).unwrap();
                return value["id"].as_str().unwrap().to_owned();
            }
        }
    }

    #[tokio::test]
    async fn unconfirmed_events_are_resent_over_a_new_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shutdown = CancellationToken::new();
        let (sink, task) = EventSink::spawn(config(port), shutdown.clone(), &TaskTracker::new());
        sink.emit(event(1));

        // The first connection reads the event and drops before its pong: not confirmed.
        let mut first = within("connected", accept(&listener)).await;
        assert_eq!(within("sent", next_id(&mut first)).await, "1");
        drop(first);

        // The sender reconnects (after its backoff) and sends the event again; the server
        // keeps reading, so its pong goes out and later events follow on the same socket.
        let mut second = within("reconnected", accept(&listener)).await;
        assert_eq!(within("resent", next_id(&mut second)).await, "1");
        sink.emit(event(2));
        assert_eq!(within("sent the next", next_id(&mut second)).await, "2");
        let server = tokio::spawn(async move { while second.next().await.is_some() {} });

        // With everything confirmed, shutdown ends the sender (it closes the socket).
        shutdown.cancel();
        within("stopped", task).await.unwrap();
        within("closed", server).await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_does_not_wait_for_a_server_that_never_took_an_event() {
        let (tx, rx) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let mut sender = Sender::new(config(1), rx, shutdown.clone());
        tx.send(event(1)).await.unwrap();
        shutdown.cancel();
        // No delivery is tried (the flush would wait up to FLUSH_LIMIT on a server that
        // never answered): the sender stops with the event undelivered.
        assert!(sender.gather().await.is_break());
        assert_eq!(sender.unconfirmed.len(), 1);
    }

    #[tokio::test]
    async fn shutdown_flushes_once_a_server_took_events() {
        let (tx, rx) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let mut sender = Sender::new(config(1), rx, shutdown.clone());
        sender.ever_delivered = true;
        tx.send(event(1)).await.unwrap();
        shutdown.cancel();
        assert!(sender.gather().await.is_continue());
        assert!(sender.flush_deadline.is_some());
    }

    #[test]
    fn a_long_outage_drops_the_oldest_events() {
        let (_tx, rx) = mpsc::channel(1);
        let mut sender = Sender::new(config(1), rx, CancellationToken::new());
        let limit = u32::try_from(QUEUE_LIMIT).unwrap();
        sender.unconfirmed = (0..limit + 3).map(event).collect();
        sender.drop_oldest_beyond_limit();
        assert_eq!(sender.unconfirmed.len(), QUEUE_LIMIT);
        assert_eq!(sender.unconfirmed.front(), Some(&event(3)));
    }
}
