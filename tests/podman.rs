//! The worker against Podman's Docker-compatible API (`podman system service`): flows run,
//! exit codes are right (also with auto_remove, where Podman's wait answers 0), and Podman's
//! 500 name conflicts get the same numbered suffix as Docker's 409s.

mod support;

use std::time::Duration;

use docker_worker::docker::DockerRuntime;
use serde_json::json;
use support::services::PodmanService;
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn flows_run_against_podman() {
    require_docker();
    let podman = PodmanService::start(&[BUSYBOX, FLOW_IMAGE]);
    let runtime = DockerRuntime::connect(Some(&podman.host), Duration::from_secs(30))
        .await
        .expect("connect to podman");
    assert!(runtime.is_podman(), "expected Podman's compat API");

    let server = server();
    let api = Api::new(server);
    let pool = unique("podman-pool");
    let hello = api
        .create_deployment(
            &pool,
            "hello",
            "flows.py:hello",
            json!({"image": FLOW_IMAGE}),
        )
        .await;
    let exits = api
        .busybox_deployment(
            &pool,
            json!({"command": "sh -c 'echo from podman; exit 3'", "name": "dw-podman-same"}),
        )
        .await;
    let auto_removed = api
        .busybox_deployment(
            &pool,
            json!({"command": "sh -c 'exit 4'", "auto_remove": true}),
        )
        .await;
    let hello_run = api.create_flow_run(&hello, json!({})).await;
    let exit_a = api.create_flow_run(&exits, json!({})).await;
    let exit_b = api.create_flow_run(&exits, json!({})).await;
    let removed_run = api.create_flow_run(&auto_removed, json!({})).await;

    let worker = WorkerProcess::start(server, &["--pool", &pool], &[("DOCKER_HOST", &podman.host)]);
    let run = api
        .wait_for_final_state(&hello_run, Duration::from_secs(240))
        .await;
    assert_eq!(run_state(&run).0, "COMPLETED", "{run}\n{}", worker.output());
    for id in [&exit_a, &exit_b] {
        let run = api.wait_for_final_state(id, Duration::from_secs(120)).await;
        assert_eq!(
            run_state(&run),
            (
                "CRASHED",
                "Flow run infrastructure exited with non-zero status code 3. Process exited with an unexpected status code."
            ),
            "{run}\n{}",
            worker.output()
        );
    }
    let run = api
        .wait_for_final_state(&removed_run, Duration::from_secs(120))
        .await;
    assert_eq!(run_state(&run).0, "CRASHED", "{run}\n{}", worker.output());
    assert!(run_state(&run).1.contains("status code 4"), "{run}");
    // auto_remove held: the exited container is gone from Podman.
    let pid = run["infrastructure_pid"].as_str().unwrap_or_default();
    let id = pid.rsplit(':').next().unwrap_or_default();
    assert!(!id.is_empty(), "{run}");
    assert!(
        !runtime.container_exists(id).await.unwrap(),
        "auto_remove container {id} still exists"
    );
    // Two runs asked for the same container name: the second got a suffix.
    let output = worker.output();
    assert!(output.contains("from podman"), "{output}");
    assert!(
        output.contains("dw-podman-same-1"),
        "expected a suffixed name after Podman's conflict:\n{output}"
    );
}
