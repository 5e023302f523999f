//! A subscription to Prefect's event stream (`/events/out` websocket) for the flow runs of one
//! work pool entering Cancelling (so a cancel reaches the worker in well under a second instead
//! of at the next poll) or becoming due (Scheduled, AwaitingRetry, Late: so the worker polls at
//! once instead of at the next interval). Reconnects with backoff and resumes from the last
//! event seen (minus a minute, de-duplicated by event id). Knows websockets and Prefect
//! events, nothing of Docker.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::client::ClientConfig;
use crate::backoff::Backoff;

pub use super::socket::{SocketError as SubscribeError, events_out_url};

/// The flow-run state events the worker acts on.
const EVENT_NAMES: &[&str] = &[
    "prefect.flow-run.Cancelling",
    "prefect.flow-run.Scheduled",
    "prefect.flow-run.AwaitingRetry",
    "prefect.flow-run.Late",
];

/// What happened to one of the pool's flow runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolEvent {
    /// The run entered Cancelling: stop its container.
    Cancelling {
        /// Flow run id.
        flow_run_id: String,
    },
    /// The run entered a Scheduled-type state: it may be due now.
    Scheduled {
        /// Flow run id.
        flow_run_id: String,
        /// When it is due, if the event said.
        scheduled_time: Option<chrono::DateTime<chrono::Utc>>,
    },
}

/// Reads one `/events/out` event into a [`PoolEvent`]; `None` for anything else.
fn pool_event(event: &Value) -> Option<PoolEvent> {
    let flow_run_id = event
        .pointer("/resource/prefect.resource.id")
        .and_then(Value::as_str)?
        .strip_prefix("prefect.flow-run.")?
        .to_owned();
    match event.get("event").and_then(Value::as_str)? {
        "prefect.flow-run.Cancelling" => Some(PoolEvent::Cancelling { flow_run_id }),
        "prefect.flow-run.Scheduled"
        | "prefect.flow-run.AwaitingRetry"
        | "prefect.flow-run.Late" => {
            let scheduled_time = event
                .pointer("/payload/validated_state/state_details/scheduled_time")
                .and_then(Value::as_str)
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc));
            Some(PoolEvent::Scheduled {
                flow_run_id,
                scheduled_time,
            })
        }
        _ => None,
    }
}

fn filter(pool_id: &str, since: chrono::DateTime<chrono::Utc>) -> Value {
    let fmt = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    json!({"type": "filter", "filter": {
        "occurred": {"since": fmt(since), "until": fmt(chrono::Utc::now() + chrono::Duration::days(365))},
        "event": {"prefix": null, "exclude_prefix": null, "name": EVENT_NAMES, "exclude_name": null},
        "resource": null, "related": null,
        "any_resource": {"id": [format!("prefect.work-pool.{pool_id}")], "id_prefix": null, "labels": null},
        "id": {"id": []}, "order": "DESC"
    }})
}

/// The first wait before reconnecting; doubled after each failed or short session…
const RECONNECT_MIN: Duration = Duration::from_secs(1);
/// … up to a minute.
const RECONNECT_MAX: Duration = Duration::from_secs(60);
/// A session that lasted this long was a real one: the next reconnect starts the backoff
/// afresh.
const SESSION_THAT_LASTED: Duration = Duration::from_secs(30);

/// Sends every [`PoolEvent`] of `pool_id`'s flow runs to `tx`, until `shutdown` (or until the
/// receiver is gone). Never returns early: failures are logged and retried with backoff, whose
/// waits end at once on `shutdown`.
pub async fn pool_flow_run_events(
    config: ClientConfig,
    pool_id: String,
    tx: mpsc::Sender<PoolEvent>,
    shutdown: CancellationToken,
    mut reachable: tokio::sync::watch::Receiver<u64>,
) {
    let mut since = chrono::Utc::now() - chrono::Duration::minutes(1);
    let mut seen: VecDeque<String> = VecDeque::new();
    let mut seen_set: HashSet<String> = HashSet::new();
    let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
    loop {
        let attempt = session(&config, &pool_id, &mut since, &tx, &mut seen, &mut seen_set);
        let began = tokio::time::Instant::now();
        let result = tokio::select! {
            r = attempt => r,
            () = shutdown.cancelled() => return,
        };
        let delay = match result {
            Ok(()) if tx.is_closed() => return,
            // Only a session that lasted resets the backoff: a server that accepts and then
            // closes at once (an older Prefect refusing the filter) must not be hammered.
            Ok(()) if began.elapsed() > SESSION_THAT_LASTED => {
                backoff.reset();
                backoff.next_delay()
            }
            Ok(()) => {
                let delay = backoff.next_delay();
                tracing::debug!(
                    retry_in_s = delay.as_secs(),
                    "events subscription closed by the server"
                );
                delay
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::debug!(error = %e, retry_in_s = delay.as_secs(), "events subscription interrupted");
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            // The API answers again (its caller probes it): reconnect now, from the start of
            // the schedule, instead of after a backoff grown long during the outage.
            Ok(()) = reachable.changed() => backoff.reset(),
            () = shutdown.cancelled() => return,
        }
    }
}

async fn session(
    config: &ClientConfig,
    pool_id: &str,
    since: &mut chrono::DateTime<chrono::Utc>,
    tx: &mpsc::Sender<PoolEvent>,
    seen: &mut VecDeque<String>,
    seen_set: &mut HashSet<String>,
) -> Result<(), SubscribeError> {
    let token = super::socket::auth_token(config);
    let mut socket = super::socket::connect(config, "events/out", token).await?;
    socket
        .send(Message::text(filter(pool_id, *since).to_string()))
        .await?;
    tracing::debug!("subscribed to the pool's flow-run events over /events/out");
    while let Some(message) = socket.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if value.get("type").and_then(Value::as_str) != Some("event") {
            continue;
        }
        let event = &value["event"];
        let id = event
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if !id.is_empty() {
            if !seen_set.insert(id.clone()) {
                continue;
            }
            seen.push_back(id);
            if seen.len() > 1000
                && let Some(old) = seen.pop_front()
            {
                seen_set.remove(&old);
            }
        }
        if let Some(occurred) = event
            .get("occurred")
            .and_then(Value::as_str)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        {
            // Resume a minute before the newest event seen; duplicates are dropped by id.
            let resume = occurred.with_timezone(&chrono::Utc) - chrono::Duration::minutes(1);
            if resume > *since {
                *since = resume;
            }
        }
        if let Some(pool_event) = pool_event(event)
            && tx.send(pool_event).await.is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_names_the_pool_and_event() {
        let f = filter("p1", chrono::Utc::now());
        assert_eq!(
            f["filter"]["any_resource"]["id"],
            json!(["prefect.work-pool.p1"])
        );
        assert_eq!(f["filter"]["event"]["name"], json!(EVENT_NAMES));
    }

    #[test]
    fn events_are_read_by_name() {
        let cancel = json!({"event": "prefect.flow-run.Cancelling",
            "resource": {"prefect.resource.id": "prefect.flow-run.r1"}});
        assert_eq!(
            pool_event(&cancel),
            Some(PoolEvent::Cancelling {
                flow_run_id: "r1".into()
            })
        );
        let scheduled = json!({"event": "prefect.flow-run.Scheduled",
            "resource": {"prefect.resource.id": "prefect.flow-run.r2"},
            "payload": {"validated_state": {"state_details": {"scheduled_time": "2026-01-02T03:04:05.123456+00:00"}}}});
        match pool_event(&scheduled) {
            Some(PoolEvent::Scheduled {
                flow_run_id,
                scheduled_time,
            }) => {
                assert_eq!(flow_run_id, "r2");
                assert_eq!(scheduled_time.unwrap().timestamp(), 1_767_323_045);
            }
            other => panic!("unexpected {other:?}"),
        }
        let other = json!({"event": "prefect.flow-run.Running",
            "resource": {"prefect.resource.id": "prefect.flow-run.r3"}});
        assert_eq!(pool_event(&other), None);
        let not_a_run = json!({"event": "prefect.flow-run.Scheduled",
            "resource": {"prefect.resource.id": "prefect.deployment.d"}});
        assert_eq!(pool_event(&not_a_run), None);
    }
}
