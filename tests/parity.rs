//! Parity with prefect-docker 0.7.4 (issue #3), against the real server, Docker and registry:
//! block document references and Prefect variables in job variables.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::services::Registry;
use support::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// Registers a `docker-registry-credentials`-like block type, schema and document holding the
/// registry's login; returns the document id.
async fn credentials_block(api: &Api, registry: &Registry) -> String {
    let slug = unique("dw-creds");
    let (status, block_type) = api
        .call(
            reqwest::Method::POST,
            "block_types/",
            Some(json!({"name": slug, "slug": slug})),
        )
        .await;
    assert_eq!(status, 201, "{block_type}");
    let (status, schema) = api
        .call(
            reqwest::Method::POST,
            "block_schemas/",
            Some(json!({
                "block_type_id": block_type["id"],
                "fields": {"title": slug, "type": "object", "properties": {
                    "username": {"type": "string"}, "password": {"type": "string", "format": "password", "writeOnly": true},
                    "registry_url": {"type": "string"}, "reauth": {"type": "boolean"}},
                    "secret_fields": ["password"], "block_type_slug": slug, "block_schema_references": {}},
                "capabilities": [],
            })),
        )
        .await;
    assert_eq!(status, 201, "{schema}");
    let (status, doc) = api
        .call(
            reqwest::Method::POST,
            "block_documents/",
            Some(json!({
                "name": "prod",
                "block_type_id": block_type["id"],
                "block_schema_id": schema["id"],
                "data": {"username": registry.user, "password": registry.password,
                         "registry_url": registry.addr, "reauth": true},
            })),
        )
        .await;
    assert_eq!(status, 201, "{doc}");
    doc["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_credentials_from_a_block_and_the_image_from_a_variable() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let registry = Registry::start();
    let image = registry.push_busybox(&unique("blk"));
    let _image = ImageGuard(image.clone());
    let variable = unique("dw_image").replace('-', "_");
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            "variables/",
            Some(json!({"name": variable, "value": image})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let block_id = credentials_block(&api, &registry).await;
    let pool = unique("refs");
    let guard = ContainerGuard::for_pool(&pool);
    // As the UI's block picker stores it: the pool's default for registry_credentials is a
    // reference to the block document (the server's job-variable validation of 3.9.1 does not
    // accept a `$ref` in a run's own job variables, since it only rewrites `definitions`).
    let mut template = docker_worker::job::default_base_job_template();
    template["variables"]["properties"]["registry_credentials"]["default"] =
        json!({"$ref": {"block_document_id": block_id}});
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            "work_pools/",
            Some(json!({"name": pool, "type": "docker", "base_job_template": template})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let worker = WorkerProcess::start(server, &["--pool", &pool], &[]);
    let dep = api
        .busybox_deployment(
            &pool,
            json!({
                "image": format!("{{{{ prefect.variables.{variable} }}}}"),
                "image_pull_policy": "Always",
                "env": {"WHERE": "from {{ prefect.variables.nope_not_set }}the block"},
                "command": "sh -c 'echo $WHERE; exit 5'",
            }),
        )
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let run = api.wait_for_final_state(&run_id, RUN_TIMEOUT).await;
    let (state, message) = run_state(&run);
    // Exit 5 means the image was pulled with the block's credentials and ran.
    assert_eq!(state, "CRASHED", "{run}\n{}", worker.output());
    assert!(
        message.contains("exit code 5") || message.contains("status code 5"),
        "{message}"
    );
    let ids = guard.containers();
    assert_eq!(ids.len(), 1);
    let info = inspect(&ids[0]);
    assert_eq!(info["Config"]["Image"], image.as_str(), "{info}");
    let env: Vec<&str> = info["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(env.contains(&"WHERE=from the block"), "{env:?}");
    // The password never shows in the state message or the worker's log.
    assert!(!message.contains(&registry.password));
    assert!(!worker.output().contains(&registry.password));

    // A block that does not exist: Crashed, naming it, before any container.
    let missing = api
        .create_flow_run(
            &dep,
            json!({"env": {"SECRET": "{{ prefect.blocks.no-such-type.prod }}"}}),
        )
        .await;
    let run = api.wait_for_final_state(&missing, RUN_TIMEOUT).await;
    let (state, message) = run_state(&run);
    assert_eq!(state, "CRASHED", "{run}");
    assert!(
        message.contains("Block not found: 'prod' of type 'no-such-type'"),
        "{message}"
    );
    assert_eq!(guard.containers().len(), 1);
}

/// Docker `start` events of the pool's containers since `since` (unix seconds).
fn start_events(pool: &str, since: i64) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args([
            "events",
            "--since",
            &since.to_string(),
            "--until",
            &(chrono::Utc::now().timestamp() + 1).to_string(),
            "--filter",
            &format!("label=io.prefect.work-pool-name={pool}"),
            "--filter",
            "event=start",
            "--format",
            "{{.ID}}",
        ])
        .output()
        .expect("docker events");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_cancelled_while_pending_never_gets_a_container_started() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let registry = Registry::start();
    let pushed = registry.push_busybox(&unique("slow"));
    // The same repository through a proxy that holds every chunk: the pull takes seconds.
    let proxy = support::services::SlowProxy::start(&registry.addr, Duration::from_millis(400));
    let image = pushed.replacen(&registry.addr, &proxy.addr, 1);
    let _images = (ImageGuard(pushed.clone()), ImageGuard(image.clone()));
    let pool = unique("pending-cancel");
    let guard = ContainerGuard::for_pool(&pool);
    let worker = WorkerProcess::start(server, &["--pool", &pool], &[]);
    api.wait_for_pool(&pool, Duration::from_secs(60)).await;
    let dep = api
        .busybox_deployment(
            &pool,
            json!({
                "image": image,
                "image_pull_policy": "Always",
                "registry_credentials": {"username": registry.user, "password": registry.password,
                                         "registry_url": proxy.addr, "reauth": true},
                "command": "sh -c 'sleep 60'",
            }),
        )
        .await;
    let t0 = chrono::Utc::now().timestamp() - 1;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    // Cancel it as soon as a worker has claimed it (Pending), while its image is being pulled.
    eventually(RUN_TIMEOUT, "a worker to claim the run", async || {
        let run = api.read_flow_run(&run_id).await;
        if run_state(&run).0 == "PENDING" {
            Ok(())
        } else {
            Err(format!("{run}\n{}", worker.output()))
        }
    })
    .await;
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            &format!("flow_runs/{run_id}/set_state"),
            Some(json!({"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": true})),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    let run = api.wait_for_final_state(&run_id, RUN_TIMEOUT).await;
    let (state, message) = run_state(&run);
    assert_eq!(state, "CANCELLED", "{run}\n{}", worker.output());
    assert!(
        message.contains("cancelled by worker while pending"),
        "{message}"
    );
    // Once the worker is done with the run (its last word about it has reached the API), no
    // container of this pool ever started, and none is left behind.
    let logs = api
        .wait_for_log(
            &run_id,
            "Cancelled pending flow run",
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(
        start_events(&pool, t0),
        Vec::<String>::new(),
        "{}",
        worker.output()
    );
    assert!(guard.containers().is_empty(), "{:?}", guard.containers());
    assert!(run["infrastructure_pid"].is_null(), "{run}");
    assert!(
        logs.iter()
            .any(|l| l == &format!("Cancelled pending flow run '{run_id}'")),
        "{logs:?}"
    );
}

/// Every event whose resource or related resources include `resource_id`, oldest first.
async fn events_about(api: &Api, resource_id: &str) -> Vec<Value> {
    let filter = json!({
        "any_resource": {"id": [resource_id]},
        "occurred": {"since": "2020-01-01T00:00:00Z"},
        "order": "ASC",
    });
    api.events(filter, 50).await
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_and_container_events_have_the_reference_shapes_and_chains() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("events");
    let _guard = ContainerGuard::for_pool(&pool);
    let name = format!("Events Worker {}", unique("w"));
    let mut worker = WorkerProcess::start(server, &["--pool", &pool, "--name", &name], &[]);
    api.wait_for_pool(&pool, Duration::from_secs(60)).await;
    let dep = api
        .busybox_deployment(&pool, json!({"command": "sh -c 'exit 3'"}))
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let run = api.wait_for_final_state(&run_id, RUN_TIMEOUT).await;
    assert_eq!(run_state(&run).0, "CRASHED", "{run}");
    // Once the run's exit events are in, stop the worker for `stopped`.
    let run_resource = format!("prefect.flow-run.{run_id}");
    eventually(
        Duration::from_secs(60),
        "the run's exit events",
        async || {
            let events = events_about(&api, &run_resource).await;
            let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
            let exit_events = [
                "prefect.docker.container.exited",
                "prefect.worker.executed-flow-run",
            ];
            if exit_events.iter().all(|name| names.contains(name)) {
                Ok(())
            } else {
                Err(format!("{names:?}"))
            }
        },
    )
    .await;
    worker.signal("TERM");
    assert!(worker.wait_timeout(Duration::from_secs(30)).await.is_some());

    let slug = name.to_lowercase().replace(' ', "-");
    let worker_id = format!("prefect.worker.docker.{slug}");
    let events = eventually(
        Duration::from_secs(30),
        "the worker's stopped event",
        async || {
            let events = events_about(&api, &worker_id).await;
            if events
                .iter()
                .any(|e| e["event"] == "prefect.worker.stopped")
            {
                Ok(events)
            } else {
                Err(format!("{events:#?}\n{}", worker.output()))
            }
        },
    )
    .await;
    let find = |name: &str| -> Value {
        events
            .iter()
            .find(|e| e["event"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {events:#?}\n{}", worker.output()))
    };
    let started = find("prefect.worker.started");
    let stopped = find("prefect.worker.stopped");
    assert_eq!(started["resource"]["prefect.resource.name"], name.as_str());
    assert_eq!(started["resource"]["prefect.worker-type"], "docker");
    assert_eq!(started["resource"]["prefect.version"], "3.9.1");
    assert_eq!(started["related"][0]["prefect.resource.role"], "work-pool");
    assert_eq!(stopped["follows"], started["id"]);

    let submitted = find("prefect.worker.submitted-flow-run");
    let executed = find("prefect.worker.executed-flow-run");
    let roles: Vec<&str> = submitted["related"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["prefect.resource.role"].as_str())
        .collect();
    assert_eq!(roles, ["deployment", "flow", "flow-run", "work-pool"]);
    assert_eq!(
        submitted["related"][2]["prefect.resource.id"],
        format!("prefect.flow-run.{run_id}")
    );
    assert_eq!(executed["follows"], submitted["id"]);
    let run_entry = &executed["related"][2];
    assert_eq!(run_entry["prefect.infrastructure.status-code"], "3");
    assert_eq!(
        run_entry["prefect.infrastructure.identifier"],
        run["infrastructure_pid"]
    );

    let created = find("prefect.docker.container.created");
    let running = find("prefect.docker.container.running");
    let exited = find("prefect.docker.container.exited");
    let container_id = run["infrastructure_pid"]
        .as_str()
        .and_then(|p| p.rsplit(':').next())
        .unwrap();
    assert_eq!(
        created["resource"]["prefect.resource.id"],
        format!("prefect.docker.container.{container_id}")
    );
    assert_eq!(running["follows"], created["id"]);
    assert_eq!(exited["follows"], running["id"]);
    let last = exited["related"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["prefect.resource.role"], "worker");
    assert_eq!(last["prefect.resource.id"], worker_id.as_str());
}
