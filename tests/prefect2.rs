//! The REST path against a Prefect 2.x server (prefect 2.20, issue #3 item 10): the worker
//! channel is refused there, so the worker syncs over REST, creates the pool with its template,
//! claims the run, starts its container (deployment job variables live in `infra_overrides` on
//! 2.x) and reports the exit.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

async fn deployment_2x(api: &Api, pool: &str, infra_overrides: Value) -> String {
    let flow = api.create_flow(&unique("flow-2x")).await;
    let (status, dep) = api
        .call(
            reqwest::Method::POST,
            "deployments/",
            Some(json!({
                "flow_id": flow,
                "name": unique("dep-2x"),
                "work_pool_name": pool,
                "entrypoint": "flows.py:exit_code",
                "infra_overrides": infra_overrides,
            })),
        )
        .await;
    assert!(status == 200 || status == 201, "{status} {dep}");
    dep["id"].as_str().expect("deployment id").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prefect_2_server_gets_rest_sync_claims_containers_and_exit_reports() {
    require_docker();
    let server = PrefectServer::start_prefect2();
    let api = Api::new(&server);
    let (status, version) = api.call(reqwest::Method::GET, "admin/version", None).await;
    assert_eq!(status, 200);
    assert!(
        version.as_str().is_some_and(|v| v.starts_with("2.")),
        "not a Prefect 2 API: {version}"
    );
    let pool = unique("p2");
    let _containers = ContainerGuard::for_pool(&pool);
    let worker = WorkerProcess::start(&server, &["--pool", &pool], &[]);

    // The worker channel does not exist on 2.x: the worker creates the pool over REST.
    let pool_json = api.wait_for_pool(&pool, Duration::from_secs(60)).await;
    assert_eq!(pool_json["type"], "docker");
    assert!(
        pool_json["base_job_template"]["variables"]["properties"]
            .get("image")
            .is_some(),
        "{pool_json}"
    );

    let dep = deployment_2x(
        &api,
        &pool,
        json!({"image": BUSYBOX, "command": "sh -c 'echo hello from 2.x; exit 3'"}),
    )
    .await;
    let run = api.create_flow_run(&dep, json!({})).await;
    let state = api
        .wait_for_final_state(&run, Duration::from_secs(120))
        .await;
    let (kind, message) = run_state(&state);
    assert_eq!(kind, "CRASHED", "{state}\n{}", worker.output());
    assert!(message.contains("non-zero status code 3"), "{message}");
    assert!(
        state["infrastructure_pid"]
            .as_str()
            .is_some_and(|p| p.contains(':')),
        "{state}"
    );
    let logs = api
        .wait_for_log(&run, "submitted to infrastructure", Duration::from_secs(60))
        .await;
    assert!(
        logs.iter().any(|l| l.contains("submitting flow run")),
        "{logs:?}"
    );
    let out = worker.output();
    assert!(out.contains("hello from 2.x"), "{out}");
    assert!(
        out.contains("worker channel is not available"),
        "the channel should have been refused and REST used:\n{out}"
    );
}
