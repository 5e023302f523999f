//! Packaging: the systemd unit passes `systemd-analyze verify`, the worker's image builds here
//! from a locally built base and runs a flow run against the real server, and completions print.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::*;

#[test]
fn systemd_unit_verifies() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing — run `scripts/test-env.sh` (installs systemd)"
    );
    let unit = std::fs::read_to_string(repo_path("deploy/systemd/docker-worker.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/docker-worker start"));
    // Verify the real unit, pointed at the binary this build produced.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docker-worker.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/docker-worker",
            env!("CARGO_BIN_EXE_docker-worker"),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    // And it does catch mistakes (so the check above means something).
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("KillSignal=SIGTERM", "KillSignal=SIGNOPE"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
}

#[test]
fn completions_print() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(env!("CARGO_BIN_EXE_docker-worker"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("docker-worker") && text.contains("pool") && text.contains("run-once"),
            "{shell}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_image_builds_from_local_layers_and_runs_a_flow() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("pkg-image");
    let guard = ContainerGuard::for_pool(&pool);
    let tag = format!("local/docker-worker-test:{}", unique("t"));
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_docker-worker"),
        ctx.path().join("docker-worker"),
    )
    .unwrap();
    let build = Command::new("docker")
        .args(["build", "-q", "-t", &tag, "-f"])
        .arg(repo_path("deploy/Dockerfile"))
        .args([
            "--build-arg",
            "BASE=local/prefect:3.9.1",
            "--build-arg",
            "BINARY=docker-worker",
        ])
        .arg(ctx.path())
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&build.stderr)
    );
    let _image = ImageGuard(tag.clone());

    let version = run_ok(Command::new("docker").args(["run", "--rm", &tag, "--version"]));
    assert_eq!(
        version.trim(),
        format!("docker-worker {}", env!("CARGO_PKG_VERSION"))
    );

    let dep = api
        .busybox_deployment(
            &pool,
            json!({"command": "sh -c 'echo from the containerised worker; exit 6'"}),
        )
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let worker_name = unique("dw-in-docker");
    let _worker_guard = ContainerGuard::for_label("dev.docker-worker.test", &worker_name);
    let out = Command::new("docker")
        .args(["run", "--rm", "--network", "host", "--label"])
        .arg(format!("dev.docker-worker.test={worker_name}"))
        .args(["-v", "/var/run/docker.sock:/var/run/docker.sock", "-e"])
        .arg(format!("PREFECT_API_URL={}", server.api_url))
        .args([&tag, "start", "--pool", &pool, "--run-once"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "containerised worker failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let run = api
        .wait_for_final_state(&run_id, Duration::from_secs(60))
        .await;
    assert_eq!(run["state"]["type"], json!("CRASHED"), "{run}");
    assert!(
        run["state"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("status code 6")
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("from the containerised worker"));
    assert_eq!(guard.containers().len(), 1);
}
