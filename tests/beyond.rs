//! Beyond the reference (issue #5), against the real Prefect server and Docker daemon: typed
//! container options, a GPU request on a host without a GPU runtime, single-flight pulls from a
//! real registry, crash tails in the flow-run logs, resource accounting events, and early polls
//! (a run that became due, a freed `--limit` slot).

mod support;

use std::time::{Duration, Instant};

use docker_worker::docker::{DockerError, DockerRuntime};
use docker_worker::job::PullPolicy;
use serde_json::{Value, json};
use support::services::Registry;
use support::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a flow-run log line may take to reach the API (lines go in batches).
const LOG_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the pool's runs have made `n` containers; returns their ids.
async fn wait_for_containers(
    guard: &ContainerGuard,
    n: usize,
    worker: &WorkerProcess,
) -> Vec<String> {
    eventually(RUN_TIMEOUT, format!("{n} containers"), async || {
        let ids = guard.containers();
        if ids.len() >= n {
            Ok(ids)
        } else {
            Err(format!(
                "{} containers; worker:\n{}",
                ids.len(),
                worker.output()
            ))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn typed_options_reach_the_container_and_a_gpu_request_without_runtime_is_named() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("typed");
    let guard = ContainerGuard::for_pool(&pool);
    let worker = WorkerProcess::start(server, &["--pool", &pool], &[]);
    api.wait_for_pool(&pool, Duration::from_secs(60)).await;
    let host_port = free_port();

    // shm_size, ipc_mode, cpus, ports, platform: the container runs with them.
    let dep = api
        .busybox_deployment(
            &pool,
            json!({
                "command": "sh -c 'df -k /dev/shm | tail -1; exit 7'",
                "shm_size": "96m",
                "ipc_mode": "shareable",
                "cpus": 0.5,
                "ports": [format!("127.0.0.1:{host_port}:8080/tcp"), "9090"],
                "network_mode": "bridge",
                "platform": "linux/amd64",
                "container_create_kwargs": {"shm_size": "32m", "cpu_shares": 512},
            }),
        )
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let run = api.wait_for_final_state(&run_id, RUN_TIMEOUT).await;
    assert_eq!(run_state(&run).0, "CRASHED", "{run}\n{}", worker.output());
    let ids = guard.containers();
    assert_eq!(ids.len(), 1);
    let info = inspect(&ids[0]);
    let host = &info["HostConfig"];
    assert_eq!(host["ShmSize"], json!(96 * 1024 * 1024), "{host}");
    assert_eq!(host["IpcMode"], "shareable");
    assert_eq!(host["NanoCpus"], json!(500_000_000));
    assert_eq!(
        host["CpuShares"],
        json!(512),
        "kwargs still apply where no typed option overlaps"
    );
    assert_eq!(
        host["PortBindings"]["8080/tcp"],
        json!([{"HostIp": "127.0.0.1", "HostPort": host_port.to_string()}])
    );
    assert!(
        info["Config"]["ExposedPorts"]["9090/tcp"].is_object(),
        "{}",
        info["Config"]
    );
    // The typed option won over container_create_kwargs, with a warning in the run's logs.
    let logs = api.wait_for_log(&run_id, "98304", LOG_TIMEOUT).await;
    assert!(
        logs.iter()
            .any(|l| l.contains("'shm_size' replaces container_create_kwargs.shm_size")),
        "{logs:?}"
    );
    // The crash tail shows what the container printed: /dev/shm is 96 MiB = 98304 KiB.
    assert!(logs.iter().any(|l| l.contains("98304")), "{logs:?}");

    // A platform the image does not have: the Engine refuses the create, and says so.
    let wrong = api
        .create_flow_run(&dep, json!({"platform": "linux/s390x"}))
        .await;
    let run = api.wait_for_final_state(&wrong, RUN_TIMEOUT).await;
    let (state, message) = run_state(&run);
    assert_eq!(state, "CRASHED", "{run}");
    assert!(
        message.contains("platform") || message.contains("s390x"),
        "{message}"
    );

    // gpus on a host without a GPU runtime: the container was created with the request, and
    // the start failure is a Crashed state naming the missing runtime.
    let gpu = api
        .create_flow_run(
            &dep,
            json!({"gpus": "count=1,capabilities=compute,utility", "platform": null}),
        )
        .await;
    let run = api.wait_for_final_state(&gpu, RUN_TIMEOUT).await;
    let (state, message) = run_state(&run);
    assert_eq!(state, "CRASHED", "{run}\n{}", worker.output());
    assert!(message.contains("GpuRuntimeMissing"), "{message}");
    assert!(message.contains("no GPU runtime"), "{message}");
    assert!(message.contains("NVIDIA Container Toolkit"), "{message}");
    let created: Vec<Value> = guard
        .containers()
        .iter()
        .map(|id| inspect(id))
        .filter(|i| i["Config"]["Labels"]["io.prefect.flow-run-id"] == gpu.as_str())
        .collect();
    assert_eq!(
        created.len(),
        1,
        "the GPU run's container is left for inspection"
    );
    let request = &created[0]["HostConfig"]["DeviceRequests"][0];
    assert_eq!(request["Count"], 1, "{request}");
    assert_eq!(
        request["Capabilities"],
        json!([["compute", "utility", "gpu"]])
    );

    // An invalid typed option is a validation error naming the field, before any container.
    let bad = api
        .create_flow_run(&dep, json!({"gpus": "lots", "cpus": -2, "platform": null}))
        .await;
    let run = api.wait_for_final_state(&bad, RUN_TIMEOUT).await;
    let (state, message) = run_state(&run);
    assert_eq!(state, "CRASHED", "{run}");
    assert!(message.contains("2 validation errors"), "{message}");
    assert!(message.contains("\ngpus\n"), "{message}");
    assert!(message.contains("\ncpus\n"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_runs_needing_one_image_share_one_pull_and_its_error() {
    require_docker();
    let registry = Registry::start();
    let image = registry.push_busybox(&unique("sf"));
    let _image = ImageGuard(image.clone());
    let label = unique("dw-sf");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &label);
    let docker = DockerRuntime::connect(None, Duration::from_secs(60))
        .await
        .unwrap()
        .with_docker_config(Some(registry.docker_config()));

    let spec_for = |image: &str, i: usize| {
        let mut s = test_spec(image, &format!("{label}-{i}"), "exit 0");
        s.labels.insert(TEST_LABEL.into(), label.clone());
        s.pull_policy = PullPolicy::Always;
        s
    };
    let specs: Vec<_> = (0..6).map(|i| spec_for(&image, i)).collect();
    let before = docker.pulls_made();
    let results =
        futures_util::future::join_all(specs.iter().map(|s| docker.ensure_image(s))).await;
    assert_eq!(docker.pulls_made() - before, 1, "six runs, one pull");
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    // The image really came from the registry.
    assert!(!inspect_image(&image).is_null());

    // A failing pull is shared too: every run gets the registry's error.
    let missing = format!("{}/dw/not-there:{}", registry.addr, unique("x"));
    let specs: Vec<_> = (0..6).map(|i| spec_for(&missing, i)).collect();
    let before = docker.pulls_made();
    let results =
        futures_util::future::join_all(specs.iter().map(|s| docker.ensure_image(s))).await;
    assert_eq!(docker.pulls_made() - before, 1);
    for r in results {
        match r {
            Err(DockerError::PullFailed { image, .. }) => assert_eq!(image, missing),
            other => panic!("expected the shared pull error, got {other:?}"),
        }
    }
    // Once finished, the next pull is a new one.
    let before = docker.pulls_made();
    docker.ensure_image(&spec_for(&image, 9)).await.unwrap();
    assert_eq!(docker.pulls_made() - before, 1);
}

fn inspect_image(image: &str) -> Value {
    let out = std::process::Command::new("docker")
        .args(["image", "inspect", image])
        .output()
        .expect("docker image inspect");
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.get(0).cloned())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_sends_the_output_tail_and_every_run_its_resource_accounting() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("acct");
    let _guard = ContainerGuard::for_pool(&pool);
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool],
        &[("DOCKER_WORKER_CRASH_LOG_LINES", "50")],
    );
    api.wait_for_pool(&pool, Duration::from_secs(60)).await;

    // Not streamed, 300 lines, exit 4: the last 50 reach the flow-run logs.
    let dep = api
        .busybox_deployment(
            &pool,
            json!({
                "stream_output": false,
                "command": "sh -c 'i=1; while [ $i -le 300 ]; do echo line $i; i=$((i+1)); done; exit 4'",
            }),
        )
        .await;
    let crashed = api.create_flow_run(&dep, json!({})).await;
    let run = api.wait_for_final_state(&crashed, RUN_TIMEOUT).await;
    assert_eq!(run_state(&run).0, "CRASHED", "{run}");

    // 96 MiB written to a 128m /dev/shm (charged to the container's memory), a busy loop
    // for CPU, then a pause so the samples see the end state.
    let busy = api
        .create_flow_run(
            &dep,
            json!({
                "shm_size": "128m",
                "command": "sh -c 'dd if=/dev/zero of=/dev/shm/fill bs=1M count=96 2>/dev/null; i=0; while [ $i -lt 150000 ]; do i=$((i+1)); done; sleep 3'",
            }),
        )
        .await;
    let event = eventually(RUN_TIMEOUT, "the busy run's resources event", async || {
        let found = resource_events(&api, &busy).await;
        found.into_iter().next().ok_or_else(|| worker.output())
    })
    .await;

    let logs = api.wait_for_log(&crashed, "line 300", LOG_TIMEOUT).await;
    let header = logs
        .iter()
        .position(|l| l.contains("exited with status code 4; its last 50 lines of output follow"))
        .unwrap_or_else(|| panic!("no crash tail header: {logs:?}"));
    let tail: Vec<&String> = logs[header + 1..]
        .iter()
        .filter(|l| l.starts_with("line "))
        .collect();
    assert_eq!(tail.len(), 50, "{logs:?}");
    assert_eq!(tail[0], "line 251");
    assert_eq!(tail[49], "line 300");
    assert!(!logs.iter().any(|l| l == "line 250"));
    // The crashed run was accounted for as well.
    assert_eq!(resource_events(&api, &crashed).await.len(), 1);

    let payload = &event["payload"];
    let peak = payload["peak_memory_bytes"].as_u64().unwrap_or_default();
    assert!(peak >= 90 * 1024 * 1024, "peak {peak}: {event}");
    let cpu = payload["cpu_seconds"].as_f64().unwrap_or_default();
    assert!(cpu > 0.05, "cpu {cpu}: {event}");
    assert_eq!(payload["oom_killed"], false);
    assert_eq!(payload["exit_code"], 0);
    assert_eq!(payload["pulled"], false);
    assert_eq!(
        event["resource"]["prefect.resource.id"]
            .as_str()
            .map(|s| s.starts_with("prefect.docker.container.")),
        Some(true)
    );
    let related: Vec<&str> = event["related"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["prefect.resource.role"].as_str())
        .collect();
    assert_eq!(related, ["flow-run", "work-pool", "worker"]);
    let busy_logs = api
        .wait_for_log(&busy, "resources: peak memory", LOG_TIMEOUT)
        .await;
    assert!(
        busy_logs
            .iter()
            .any(|l| l.contains("resources: peak memory") && l.contains("OOM-killed no")),
        "{busy_logs:?}"
    );
    eprintln!("sample accounting: {payload}");
}

/// The `prefect.docker.container.resources` events related to a flow run.
async fn resource_events(api: &Api, flow_run_id: &str) -> Vec<Value> {
    let filter = json!({
        "event": {"name": ["prefect.docker.container.resources"]},
        "related": {"id": [format!("prefect.flow-run.{flow_run_id}")]},
        "occurred": {"since": "2020-01-01T00:00:00Z"},
    });
    api.events(filter, 10).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_due_now_and_a_freed_slot_are_picked_up_before_the_next_poll() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("pickup");
    let guard = ContainerGuard::for_pool(&pool);
    // Polls every 120 s: anything picked up sooner came from an event or a freed slot.
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool, "--limit", "1"],
        &[("PREFECT_WORKER_QUERY_SECONDS", "120")],
    );
    api.wait_for_pool(&pool, Duration::from_secs(60)).await;
    let dep = api
        .busybox_deployment(&pool, json!({"command": "sh -c 'sleep 2'"}))
        .await;
    // Let the first poll and the events subscription happen.
    worker
        .wait_for_output(
            "subscribed to the pool's flow-run events",
            Duration::from_secs(60),
        )
        .await;

    let created = Instant::now();
    let first = api.create_flow_run(&dep, json!({})).await;
    let second = api.create_flow_run(&dep, json!({})).await;
    wait_for_containers(&guard, 1, &worker).await;
    let first_pickup = created.elapsed();
    // The second run waits for the only slot; when the first exits, the freed slot polls.
    wait_for_containers(&guard, 2, &worker).await;
    let second_pickup = created.elapsed();
    assert!(
        second_pickup < Duration::from_secs(60),
        "second run after {second_pickup:?}: not picked up by the freed slot\n{}",
        worker.output()
    );
    assert!(
        first_pickup < Duration::from_secs(60),
        "first run after {first_pickup:?}: not picked up by the event\n{}",
        worker.output()
    );
    let out = worker.output();
    assert!(out.contains("a flow run became due; polling now"), "{out}");
    // Both were claimed and started by this worker (their containers recorded).
    wait_for_pids(&api, &[&first, &second], RUN_TIMEOUT, &worker).await;
    eprintln!(
        "pickup with a 120 s poll interval: first {first_pickup:?}, second {second_pickup:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prepull_fetches_deployment_images_at_start_and_when_deployments_change() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let registry = Registry::start();
    let first = registry.push_busybox(&unique("pp1"));
    let second = registry.push_busybox(&unique("pp2"));
    let _images = (ImageGuard(first.clone()), ImageGuard(second.clone()));
    let pool = unique("prepull");
    let guard = ContainerGuard::for_pool(&pool);
    api.busybox_deployment(
        &pool,
        json!({"image": first, "image_pull_policy": "IfNotPresent"}),
    )
    .await;
    // A deployment whose policy forbids pulls is left alone.
    let never = format!("{}/dw/never:{}", registry.addr, unique("n"));
    api.busybox_deployment(&pool, json!({"image": never, "image_pull_policy": "Never"}))
        .await;
    let config = registry.docker_config();
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool, "--prepull"],
        &[("DOCKER_CONFIG", config.to_str().unwrap())],
    );
    let wait_for_image = async |image: &str| {
        eventually(
            Duration::from_secs(90),
            format!("{image} to be pre-pulled"),
            async || {
                if inspect_image(image).is_null() {
                    Err(worker.output())
                } else {
                    Ok(())
                }
            },
        )
        .await;
    };
    wait_for_image(&first).await;
    // A deployment created while the worker runs is pre-pulled too, with no flow run at all.
    api.busybox_deployment(
        &pool,
        json!({"image": second, "image_pull_policy": "Always"}),
    )
    .await;
    wait_for_image(&second).await;
    let out = worker.output();
    assert!(out.contains("Pre-pulled image"), "{out}");
    assert!(
        out.contains("image_pull_policy is Never; not pre-pulling"),
        "{out}"
    );
    assert!(inspect_image(&never).is_null());
    assert!(guard.containers().is_empty());
}

/// `--job-override` (here through `DOCKER_WORKER_JOB_OVERRIDE`, TOML) reaches the container:
/// the operator's values win over the deployment's and the flow run's, objects (`env`,
/// `labels`, `container_create_kwargs`) merge key by key, and what nobody overrode stays.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_override_reaches_the_container_over_deployment_and_flow_run() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("override");
    let guard = ContainerGuard::for_pool(&pool);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("override.toml");
    std::fs::write(
        &file,
        "mem_limit = \"96m\"\n\n[env]\nSHARED = \"operator\"\nHOST_ONLY = \"h\"\n\n\
         [labels]\n\"dev.docker-worker.override\" = \"host\"\n\n\
         [container_create_kwargs]\nworking_dir = \"/tmp\"\n",
    )
    .unwrap();
    let worker = WorkerProcess::start(
        server,
        &["--pool", &pool],
        &[("DOCKER_WORKER_JOB_OVERRIDE", file.to_str().unwrap())],
    );
    api.wait_for_pool(&pool, Duration::from_secs(60)).await;
    let dep = api
        .busybox_deployment(
            &pool,
            json!({
                "command": "true",
                "mem_limit": "64m",
                "env": {"SHARED": "deployment", "FROM_DEPLOYMENT": "d", "RUN_WINS": "deployment"},
                "labels": {"team": "data"},
                "container_create_kwargs": {"user": "nobody"},
            }),
        )
        .await;
    let run_id = api
        .create_flow_run(&dep, json!({"env": {"RUN_WINS": "run", "FROM_RUN": "r"}}))
        .await;
    let ids = wait_for_containers(&guard, 1, &worker).await;
    let info = inspect(&ids[0]);
    let env: Vec<&str> = info["Config"]["Env"]
        .as_array()
        .map(|e| e.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for expected in [
        "SHARED=operator",
        "HOST_ONLY=h",
        "FROM_DEPLOYMENT=d",
        "RUN_WINS=run",
        "FROM_RUN=r",
    ] {
        assert!(env.contains(&expected), "{expected} not in {env:?}");
    }
    assert!(!env.contains(&"SHARED=deployment"), "{env:?}");
    let labels = &info["Config"]["Labels"];
    assert_eq!(labels["dev.docker-worker.override"], "host", "{labels}");
    assert_eq!(labels["team"], "data", "{labels}");
    assert_eq!(
        labels["io.prefect.flow-run-id"],
        run_id.as_str(),
        "{labels}"
    );
    assert_eq!(info["Config"]["WorkingDir"], "/tmp");
    assert_eq!(info["Config"]["User"], "nobody");
    assert_eq!(info["HostConfig"]["Memory"], json!(96 * 1024 * 1024));
    let log = worker.output();
    assert!(
        log.contains("job override: merged into every job configuration")
            && log.contains("override.toml"),
        "{log}"
    );
}
