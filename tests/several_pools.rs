//! One process serving two pools with different templates and limits: each pool's runs get
//! its own template and limit, the worker heartbeats in both, and metrics say which pool.
//! Real server, real Docker, built binary.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// Runs created in each pool.
const RUNS: usize = 3;

/// Creates `pool` with the default template, its `env` defaulting to `WHICH=<which>`.
async fn pool_with_env(api: &Api, pool: &str, which: &str) {
    let mut template = docker_worker::job::default_base_job_template();
    template["variables"]["properties"]["env"]["default"] = json!({ "WHICH": which });
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            "work_pools/",
            Some(json!({"name": pool, "type": "docker", "base_job_template": template})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

fn polls(pool: &str) -> String {
    format!("docker_worker_poll_duration_seconds_count{{pool=\"{pool}\"}}")
}

/// Names of the workers heartbeating in `pool`.
async fn workers_of(api: &Api, pool: &str) -> Vec<String> {
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            &format!("work_pools/{pool}/workers/filter"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["name"].as_str().map(str::to_owned))
        .collect()
}

/// The `WHICH` entry of a container's environment.
fn which_env(container: &str) -> Option<String> {
    inspect(container)["Config"]["Env"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .find_map(|e| e.strip_prefix("WHICH=").map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread")]
async fn two_pools_with_their_own_templates_and_limits_in_one_process() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let (a, b) = (unique("two-a"), unique("two-b"));
    let guards = (ContainerGuard::for_pool(&a), ContainerGuard::for_pool(&b));
    pool_with_env(&api, &a, "a").await;
    pool_with_env(&api, &b, "b").await;
    // Each container waits for the test to release it, then exits 5.
    let hold = json!({
        "command": "sh -c 'until test -e /release; do sleep 0.2; done; exit 5'",
        "image_pull_policy": "Never",
    });
    let mut runs = Vec::new();
    for pool in [&a, &b] {
        let dep = api.busybox_deployment(pool, hold.clone()).await;
        for _ in 0..RUNS {
            runs.push(api.create_flow_run(&dep, json!({})).await);
        }
    }
    let port = free_port().to_string();
    let pool_limit = format!("{a}=1");
    let worker = WorkerProcess::start(
        server,
        &[
            "--pool",
            &a,
            "--pool",
            &b,
            "--limit",
            "2",
            "--pool-limit",
            &pool_limit,
            "--name",
            "two-pools",
            "--with-metrics",
        ],
        &[
            ("PREFECT_WORKER_QUERY_SECONDS", "1"),
            ("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1"),
            ("PREFECT_WORKER_WEBSERVER_PORT", &port),
        ],
    );

    // Each pool fills its own limit: 1 in a, 2 in b.
    eventually(
        RUN_TIMEOUT,
        "1 container running in a, 2 in b",
        async || {
            let running = (guards.0.running().len(), guards.1.running().len());
            if running == (1, 2) {
                Ok(())
            } else {
                Err(format!("{running:?}\n{}", worker.output()))
            }
        },
    )
    .await;
    // Three more polls of each pool later, neither took more.
    let metrics = scrape_metrics(&port).await;
    let seen = (
        metric_sample(&metrics, &polls(&a)).unwrap_or(0.0),
        metric_sample(&metrics, &polls(&b)).unwrap_or(0.0),
    );
    eventually(RUN_TIMEOUT, "three more polls of each pool", async || {
        let metrics = scrape_metrics(&port).await;
        let now = (
            metric_sample(&metrics, &polls(&a)).unwrap_or(0.0),
            metric_sample(&metrics, &polls(&b)).unwrap_or(0.0),
        );
        if now.0 >= seen.0 + 3.0 && now.1 >= seen.1 + 3.0 {
            Ok(())
        } else {
            Err(metrics)
        }
    })
    .await;
    assert_eq!(
        (guards.0.containers().len(), guards.1.containers().len()),
        (1, 2),
        "{}",
        worker.output()
    );
    // Each pool's containers were rendered with its own template.
    for (guard, which) in [(&guards.0, "a"), (&guards.1, "b")] {
        for container in guard.containers() {
            assert_eq!(which_env(&container).as_deref(), Some(which));
        }
    }
    // The worker heartbeats in both pools, under its one name.
    for pool in [&a, &b] {
        assert_eq!(workers_of(&api, pool).await, ["two-pools"]);
    }

    // Released as they start, every run of both pools ends.
    eventually(RUN_TIMEOUT, "all six runs final", async || {
        for guard in [&guards.0, &guards.1] {
            for id in guard.running() {
                let _ = Command::new("docker")
                    .args(["exec", &id, "touch", "/release"])
                    .output();
            }
        }
        let mut pending = 0;
        for run in &runs {
            let state = api.read_flow_run(run).await;
            if run_state(&state).0 != "CRASHED" {
                pending += 1;
            }
        }
        if pending == 0 {
            Ok(())
        } else {
            Err(format!("{pending} not final\n{}", worker.output()))
        }
    })
    .await;
    let metrics = scrape_metrics(&port).await;
    for pool in [&a, &b] {
        for family in ["flow_runs_claimed_total", "flow_runs_crashed_total"] {
            let series = format!("docker_worker_{family}{{pool=\"{pool}\"}}");
            assert_eq!(
                metric_sample(&metrics, &series),
                Some(3.0),
                "{series}:\n{metrics}"
            );
        }
    }
}
