//! Garbage collection (`docker-worker gc` and `start --gc-interval`) with the built binary
//! against a real Prefect server and the real Docker daemon. Containers are made directly with
//! the `docker` CLI and the labels the worker gives its own; flow runs are put in the wanted
//! state with a forced `set_state`. Outcomes are checked by inspecting the containers.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::*;

/// Labels of one test container: an optional flow-run id and pool, plus the test label that
/// the guard removes it by.
struct Labels<'a> {
    run: Option<&'a str>,
    pool: Option<&'a str>,
    tag: &'a str,
}

fn pool_labels<'a>(run: &'a str, pool: &'a str, tag: &'a str) -> Labels<'a> {
    Labels {
        run: Some(run),
        pool: Some(pool),
        tag,
    }
}

fn docker_run(labels: &Labels<'_>, command: &str) -> String {
    let mut cmd = Command::new("docker");
    cmd.args(["run", "-d", "--name", &unique("gc")])
        .args(["--label", &format!("{TEST_LABEL}={}", labels.tag)]);
    if let Some(run) = labels.run {
        cmd.args(["--label", &format!("io.prefect.flow-run-id={run}")]);
    }
    if let Some(pool) = labels.pool {
        cmd.args(["--label", &format!("io.prefect.work-pool-name={pool}")]);
    }
    cmd.args([BUSYBOX, "sh", "-c", command]);
    run_ok(&mut cmd).trim().to_owned()
}

/// A container that ran and exited 0.
fn exited(labels: &Labels<'_>) -> String {
    let id = docker_run(labels, "true");
    run_ok(Command::new("docker").args(["wait", &id]));
    assert_eq!(inspect(&id)["State"]["Status"], "exited");
    id
}

/// A container that keeps running.
fn running(labels: &Labels<'_>) -> String {
    let id = docker_run(labels, "sleep 600");
    assert_eq!(inspect(&id)["State"]["Status"], "running");
    id
}

fn exists(id: &str) -> bool {
    !inspect(id).is_null()
}

/// A flow run (no deployment needed) forced into `state_type`.
async fn flow_run_in(api: &Api, state_type: &str) -> String {
    let flow_id = api.create_flow(&unique("gc-flow")).await;
    let (status, run) = api
        .call(
            reqwest::Method::POST,
            "flow_runs/",
            Some(json!({"flow_id": flow_id, "name": unique("gc-run")})),
        )
        .await;
    assert!(status < 300, "create flow run: {status} {run}");
    let id = run["id"].as_str().expect("flow run id").to_owned();
    let name = {
        let mut chars = state_type.chars();
        let first = chars.next().unwrap_or_default();
        format!("{first}{}", chars.as_str().to_ascii_lowercase())
    };
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            &format!("flow_runs/{id}/set_state"),
            Some(json!({"state": {"type": state_type, "name": name}, "force": true})),
        )
        .await;
    assert!(status < 300, "set_state {state_type}: {status} {body}");
    assert_eq!(api.read_flow_run(&id).await["state"]["type"], state_type);
    id
}

/// Runs `docker-worker gc ARGS` against the server; returns (exit code, stdout, stderr).
fn gc(server: &PrefectServer, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_docker-worker"))
        .arg("gc")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PREFECT_API_URL", &server.api_url)
        .output()
        .expect("run docker-worker gc");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The output line about container `id`, if any.
fn line_for<'a>(stdout: &'a str, id: &str) -> Option<&'a str> {
    stdout.lines().find(|l| l.contains(&id[..12]))
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_only_exited_containers_of_final_runs() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("gc-pool");
    let other_pool = unique("gc-other");
    let tag = unique("gc-main");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &tag);
    let mut removable = Vec::new();
    for state in ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"] {
        let run = flow_run_in(&api, state).await;
        removable.push((state, exited(&pool_labels(&run, &pool, &tag))));
    }
    let running_run = flow_run_in(&api, "RUNNING").await;
    let exited_of_running_run = exited(&pool_labels(&running_run, &pool, &tag));
    let completed = flow_run_in(&api, "COMPLETED").await;
    let running_container = running(&pool_labels(&completed, &pool, &tag));
    let unknown_run = uuid::Uuid::new_v4().to_string();
    let exited_of_unknown_run = exited(&pool_labels(&unknown_run, &pool, &tag));
    let other_completed = flow_run_in(&api, "COMPLETED").await;
    let other_pools = exited(&Labels {
        run: Some(&other_completed),
        pool: Some(&other_pool),
        tag: &tag,
    });
    let unlabelled = exited(&Labels {
        run: None,
        pool: Some(&pool),
        tag: &tag,
    });

    let (code, stdout, stderr) = gc(server, &["--pool", &pool, "--older-than", "0s"]);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");

    for (state, id) in &removable {
        assert!(
            !exists(id),
            "{state} run's exited container survived:\n{stdout}"
        );
        let line = line_for(&stdout, id).unwrap_or_default();
        assert!(line.starts_with("removed "), "{state}: {line:?}\n{stdout}");
        assert!(line.contains("finished "), "{line}");
    }
    let line = line_for(&stdout, &exited_of_running_run).unwrap_or_default();
    assert!(exists(&exited_of_running_run), "{stdout}");
    assert!(
        line.starts_with("kept ") && line.contains("(Running, ") && line.contains("RUNNING"),
        "{line:?}\n{stdout}"
    );
    let line = line_for(&stdout, &exited_of_unknown_run).unwrap_or_default();
    assert!(exists(&exited_of_unknown_run), "{stdout}");
    assert!(
        line.starts_with("kept ") && line.contains("does not exist") && line.contains("404"),
        "{line:?}\n{stdout}"
    );
    // Never considered at all, so no line either.
    for (what, id) in [
        ("running container", &running_container),
        ("other pool's container", &other_pools),
        ("unlabelled container", &unlabelled),
    ] {
        assert!(exists(id), "{what} was removed:\n{stdout}");
        assert!(
            line_for(&stdout, id).is_none(),
            "{what} reported:\n{stdout}"
        );
    }
    assert_eq!(inspect(&running_container)["State"]["Status"], "running");
    assert!(
        stdout
            .trim_end()
            .ends_with("gc: 4 removed, 2 kept, 0 errors"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_dry_run_and_age_threshold_remove_nothing() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("gc-dry");
    let other_pool = unique("gc-dry-other");
    let tag = unique("gc-dry");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &tag);
    let run = flow_run_in(&api, "COMPLETED").await;
    let id = exited(&Labels {
        run: Some(&run),
        pool: Some(&pool),
        tag: &tag,
    });
    let other_run = flow_run_in(&api, "FAILED").await;
    let other = exited(&Labels {
        run: Some(&other_run),
        pool: Some(&other_pool),
        tag: &tag,
    });

    // Too young: it finished just now, the threshold is an hour.
    let (code, stdout, stderr) = gc(server, &["--pool", &pool, "--older-than", "1h"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(exists(&id), "{stdout}");
    let line = line_for(&stdout, &id).unwrap_or_default();
    assert!(
        line.starts_with("kept ") && line.contains("finished less than 1h ago"),
        "{line:?}\n{stdout}"
    );
    assert!(
        stdout
            .trim_end()
            .ends_with("gc: 0 removed, 1 kept, 0 errors"),
        "{stdout}"
    );

    // The default threshold is a day.
    let (_, stdout, _) = gc(server, &["--pool", &pool]);
    assert!(exists(&id), "{stdout}");
    assert!(
        line_for(&stdout, &id).is_some_and(|l| l.contains("less than 1day ago")),
        "{stdout}"
    );

    // Dry run without --pool: every pool's qualifying container is named, none removed.
    let (code, stdout, stderr) = gc(server, &["--older-than", "0s", "--dry-run"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    for id in [&id, &other] {
        assert!(exists(id), "dry run removed {id}:\n{stdout}");
        let line = line_for(&stdout, id).unwrap_or_default();
        assert!(line.starts_with("would remove "), "{line:?}\n{stdout}");
    }
    assert!(
        line_for(&stdout, &id).is_some_and(|l| l.contains(&format!("flow run {run} (Completed, "))),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("gc (dry run): ")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_reports_an_unreachable_api_and_exits_non_zero() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("gc-err");
    let tag = unique("gc-err");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &tag);
    let run = flow_run_in(&api, "COMPLETED").await;
    let id = exited(&Labels {
        run: Some(&run),
        pool: Some(&pool),
        tag: &tag,
    });
    let out = Command::new(env!("CARGO_BIN_EXE_docker-worker"))
        .args(["gc", "--pool", &pool, "--older-than", "0s"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env(
            "PREFECT_API_URL",
            format!("http://127.0.0.1:{}/api", free_port()),
        )
        .env("PREFECT_CLIENT_MAX_RETRIES", "0")
        .env("PREFECT_API_REQUEST_TIMEOUT", "5")
        .output()
        .expect("run docker-worker gc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(exists(&id), "{stdout}");
    let line = line_for(&stdout, &id).unwrap_or_default();
    assert!(
        line.starts_with("kept ") && line.contains("could not read its flow run"),
        "{line:?}\n{stdout}"
    );
    assert!(stdout.trim_end().ends_with("1 errors"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_collects_its_pool_periodically() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("gc-daemon");
    let other_pool = unique("gc-daemon-other");
    let tag = unique("gc-daemon");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &tag);
    let _pool_guard = ContainerGuard::for_pool(&pool);
    let port = free_port().to_string();
    let worker = WorkerProcess::start(
        server,
        &[
            "--pool",
            &pool,
            "--gc-interval",
            "1s",
            "--gc-older-than",
            "0s",
            "--with-metrics",
        ],
        &[
            ("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1"),
            ("PREFECT_WORKER_WEBSERVER_PORT", &port),
        ],
    );
    api.wait_for_pool(&pool, Duration::from_secs(60)).await;

    let completed = flow_run_in(&api, "COMPLETED").await;
    let qualifying = exited(&Labels {
        run: Some(&completed),
        pool: Some(&pool),
        tag: &tag,
    });
    let still_running = running(&Labels {
        run: Some(&completed),
        pool: Some(&pool),
        tag: &tag,
    });
    let unknown_run = uuid::Uuid::new_v4().to_string();
    let unknown = exited(&Labels {
        run: Some(&unknown_run),
        pool: Some(&pool),
        tag: &tag,
    });
    let other_run = flow_run_in(&api, "COMPLETED").await;
    let other = exited(&Labels {
        run: Some(&other_run),
        pool: Some(&other_pool),
        tag: &tag,
    });

    eventually(
        Duration::from_secs(60),
        "the worker to collect the finished run's container",
        async || {
            if exists(&qualifying) {
                Err(worker.output())
            } else {
                Ok(())
            }
        },
    )
    .await;
    // What did not qualify must still be there after a later round, one that removed nothing.
    eventually(
        Duration::from_secs(60),
        "a collection round after the removal",
        async || {
            let log = worker.output();
            let after = log
                .lines()
                .skip_while(|l| !(l.contains("removed ") && l.contains(&qualifying[..12])))
                .skip(1)
                .any(|l| l.contains("gc: 0 removed"));
            if after { Ok(()) } else { Err(log) }
        },
    )
    .await;
    assert_eq!(
        inspect(&still_running)["State"]["Status"],
        "running",
        "{}",
        worker.output()
    );
    assert!(exists(&unknown), "{}", worker.output());
    assert!(exists(&other), "{}", worker.output());
    let log = worker.output();
    assert!(
        log.lines()
            .any(|l| l.contains("removed ") && l.contains(&qualifying[..12])),
        "{log}"
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        metrics.contains(&format!(
            "docker_worker_gc_removed_total{{pool=\"{pool}\"}} 1"
        )),
        "{metrics}"
    );
}
