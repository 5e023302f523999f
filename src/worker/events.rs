//! The worker's Prefect events, shaped as prefect-docker 0.7.4 shapes them: `prefect.worker.*`
//! about the worker, `prefect.docker.container.*` about each container, related to the run's
//! deployment, flow, flow run, tags and work pool, and chained with `follows`.
//!
//! Pure builders; [`crate::prefect::events::EventSink`] sends them.

use serde_json::{Map, Value, json};

use super::PoolRef;
use crate::job::PREFECT_VERSION;
use crate::job::slug::slugify_lower;

/// `follows` is only set when the previous event is this close in time (Prefect's rule).
const FOLLOWS_WINDOW: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// An event already emitted, for a later one to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Emitted {
    pub id: String,
    pub occurred: chrono::DateTime<chrono::Utc>,
}

/// The worker as an event resource.
pub(crate) fn worker_resource(name: &str) -> Value {
    json!({
        "prefect.resource.id": format!("prefect.worker.docker.{}", slugify_lower(name)),
        "prefect.resource.name": name,
        "prefect.version": PREFECT_VERSION,
        "prefect.worker-type": "docker",
    })
}

/// The work pool as a related resource.
pub(crate) fn pool_related(pool: &PoolRef) -> Value {
    json!({
        "prefect.resource.id": format!("prefect.work-pool.{}", pool.id),
        "prefect.resource.role": "work-pool",
        "prefect.resource.name": pool.name,
    })
}

fn object_related(kind: &str, object: &Value) -> Option<Value> {
    let id = object.get("id").and_then(Value::as_str)?;
    let mut m = Map::new();
    m.insert(
        "prefect.resource.id".into(),
        json!(format!("prefect.{kind}.{id}")),
    );
    m.insert("prefect.resource.role".into(), json!(kind));
    m.insert(
        "prefect.resource.name".into(),
        object.get("name").cloned().unwrap_or(Value::Null),
    );
    Some(Value::Object(m))
}

fn tags(object: Option<&Value>) -> impl Iterator<Item = String> + '_ {
    object
        .and_then(|o| o.get("tags"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(str::to_owned))
}

/// A run's related resources: deployment (if any), flow, flow run, its tags (sorted union of
/// the deployment's, flow's and run's), then the work pool.
pub(crate) fn run_related(
    flow_run: &Value,
    flow: Option<&Value>,
    deployment: Option<&Value>,
    pool: &PoolRef,
) -> Vec<Value> {
    let mut related = Vec::new();
    related.extend(deployment.and_then(|d| object_related("deployment", d)));
    related.extend(flow.and_then(|f| object_related("flow", f)));
    related.extend(object_related("flow-run", flow_run));
    let all_tags: std::collections::BTreeSet<String> = tags(deployment)
        .chain(tags(flow))
        .chain(tags(Some(flow_run)))
        .collect();
    for tag in all_tags {
        related.push(json!({"prefect.resource.id": format!("prefect.tag.{tag}"), "prefect.resource.role": "tag"}));
    }
    related.push(pool_related(pool));
    related
}

/// The worker as a related resource (role `worker`), as container events carry it.
pub(crate) fn worker_related(name: &str) -> Value {
    let mut w = worker_resource(name);
    if let Some(m) = w.as_object_mut() {
        m.insert("prefect.resource.role".into(), json!("worker"));
    }
    w
}

/// A container as an event resource.
pub(crate) fn container_resource(id: &str, name: &str) -> Value {
    json!({"prefect.resource.id": format!("prefect.docker.container.{id}"), "prefect.resource.name": name})
}

/// Adds the infrastructure identifier and exit code to the flow-run entry (executed-flow-run).
pub(crate) fn with_outcome(
    mut related: Vec<Value>,
    identifier: &str,
    status_code: i64,
) -> Vec<Value> {
    for r in &mut related {
        if r.get("prefect.resource.role").and_then(Value::as_str) == Some("flow-run")
            && let Some(m) = r.as_object_mut()
        {
            m.insert(
                "prefect.infrastructure.identifier".into(),
                json!(identifier),
            );
            m.insert(
                "prefect.infrastructure.status-code".into(),
                json!(status_code.to_string()),
            );
        }
    }
    related
}

/// One event, following `follows` when that was emitted less than five minutes ago.
pub(crate) fn build(
    name: &str,
    resource: Value,
    related: Vec<Value>,
    follows: Option<&Emitted>,
) -> (Value, Emitted) {
    let occurred = chrono::Utc::now();
    let id = uuid::Uuid::now_v7().to_string();
    let follows = follows
        .filter(|f| (occurred - f.occurred).abs() < FOLLOWS_WINDOW)
        .map(|f| f.id.clone());
    let event = json!({
        "occurred": occurred.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "event": name,
        "resource": resource,
        "related": related,
        "payload": {},
        "id": id,
        "follows": follows,
    });
    (event, Emitted { id, occurred })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> PoolRef {
        PoolRef {
            id: "p1".into(),
            name: "pool".into(),
        }
    }

    #[test]
    fn run_related_order_and_tags() {
        let run = json!({"id": "r1", "name": "my run", "tags": ["b", "a"]});
        let flow = json!({"id": "f1", "name": "flow", "tags": ["c", "a"]});
        let dep = json!({"id": "d1", "name": "dep", "tags": ["z"]});
        let related = run_related(&run, Some(&flow), Some(&dep), &pool());
        let ids: Vec<&str> = related
            .iter()
            .map(|r| r["prefect.resource.id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            [
                "prefect.deployment.d1",
                "prefect.flow.f1",
                "prefect.flow-run.r1",
                "prefect.tag.a",
                "prefect.tag.b",
                "prefect.tag.c",
                "prefect.tag.z",
                "prefect.work-pool.p1"
            ]
        );
        assert_eq!(related[2]["prefect.resource.name"], "my run");
        assert!(related[3].get("prefect.resource.name").is_none());
        let without = run_related(&run, Some(&flow), None, &pool());
        assert_eq!(without[0]["prefect.resource.role"], "flow");
        let done = with_outcome(related, "http+docker://localhost:c1", 3);
        assert_eq!(done[2]["prefect.infrastructure.status-code"], "3");
        assert_eq!(
            done[2]["prefect.infrastructure.identifier"],
            "http+docker://localhost:c1"
        );
    }

    #[test]
    fn events_follow_only_recent_events() {
        let (first, emitted) = build(
            "prefect.worker.started",
            worker_resource("DockerWorker AB_1"),
            vec![],
            None,
        );
        assert_eq!(
            first["resource"]["prefect.resource.id"],
            "prefect.worker.docker.dockerworker-ab-1"
        );
        assert_eq!(first["follows"], Value::Null);
        let (second, _) = build(
            "prefect.worker.stopped",
            worker_resource("w"),
            vec![],
            Some(&emitted),
        );
        assert_eq!(second["follows"], json!(emitted.id));
        let old = Emitted {
            id: "x".into(),
            occurred: chrono::Utc::now() - chrono::TimeDelta::minutes(6),
        };
        let (third, _) = build(
            "prefect.worker.stopped",
            worker_resource("w"),
            vec![],
            Some(&old),
        );
        assert_eq!(third["follows"], Value::Null);
        assert_eq!(worker_related("w")["prefect.resource.role"], "worker");
    }
}
