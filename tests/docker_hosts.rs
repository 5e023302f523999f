//! Docker hosts beyond the local socket: a private dockerd on 127.0.0.1 with TLS client
//! verification (certificates made by the test), and pulls from a real registry with htpasswd
//! auth using credentials from the job or from the Docker CLI's config.json.

mod support;

use std::time::Duration;

use docker_worker::docker::{DockerError, DockerRuntime, TlsFiles};
use docker_worker::job::{ContainerSpec, PullPolicy, RegistryCredentials};
use serde_json::json;
use support::services::{Registry, TlsDockerd};
use support::*;

fn spec(image: &str, command: &str, label: &str) -> ContainerSpec {
    test_spec(image, label, command)
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_docker_host_runs_containers_and_the_worker_end_to_end() {
    require_docker();
    let daemon = TlsDockerd::start();
    let tls = TlsFiles::in_dir(&daemon.client_certs);
    let docker =
        DockerRuntime::connect_with_tls(Some(&daemon.host), Some(&tls), Duration::from_secs(30))
            .await
            .expect("connect over TLS");
    assert!(
        docker.base_url().starts_with("https://127.0.0.1:"),
        "{}",
        docker.base_url()
    );
    let label = unique("dw-tls");
    let started = docker
        .create_and_start_container(&spec(BUSYBOX, "echo over tls; exit 3", &label))
        .await
        .expect("start over TLS");
    let status = docker
        .watch_container(
            &started.container,
            false,
            false,
            &|_: docker_worker::docker::OutputLine<'_>| {},
        )
        .await
        .unwrap();
    assert_eq!(status.code, 3);

    // Without a client certificate the daemon refuses us, and we say where we tried.
    let err = DockerRuntime::connect(Some(&daemon.host), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(err, DockerError::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&daemon.host), "{err}");

    // The binary picks the same settings up from DOCKER_HOST / DOCKER_TLS_VERIFY / DOCKER_CERT_PATH.
    let server = server();
    let api = Api::new(server);
    let pool = unique("tls-pool");
    let dep = api
        .busybox_deployment(&pool, json!({"command": "sh -c 'exit 8'"}))
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let certs = daemon.client_certs.to_string_lossy().into_owned();
    let mut worker = WorkerProcess::start(
        server,
        &["--pool", &pool, "--run-once"],
        &[
            ("DOCKER_HOST", &daemon.host),
            ("DOCKER_TLS_VERIFY", "1"),
            ("DOCKER_CERT_PATH", &certs),
        ],
    );
    let exit = worker.wait_timeout(Duration::from_secs(120)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}\n{}",
        worker.output()
    );
    let run = api.read_flow_run(&run_id).await;
    assert_eq!(
        run["state"]["type"],
        json!("CRASHED"),
        "{run}\n{}",
        worker.output()
    );
    assert!(
        run["state"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("status code 8")
    );
    assert!(
        run["infrastructure_pid"]
            .as_str()
            .unwrap_or_default()
            .starts_with("https://127.0.0.1:"),
        "{run}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn private_registry_pulls_with_job_credentials_or_docker_config() {
    let registry = Registry::start();
    let image = registry.push_busybox(&unique("t"));
    let label = unique("dw-reg");
    let _guard = ContainerGuard::for_label("dev.docker-worker.test", &label);
    let _image = ImageGuard(image.clone());
    let docker = DockerRuntime::connect(None, Duration::from_secs(60))
        .await
        .unwrap();

    // No credentials anywhere: the registry refuses and the error names the image.
    let mut s = spec(&image, "exit 0", &label);
    s.pull_policy = PullPolicy::Always;
    let err = docker.create_and_start_container(&s).await.unwrap_err();
    assert!(matches!(err, DockerError::PullFailed { .. }), "{err}");
    assert!(err.to_string().contains(&image), "{err}");

    // Wrong password in the job's registry_credentials: refused too.
    s.registry_credentials = Some(RegistryCredentials {
        username: registry.user.clone(),
        password: "wrong".into(),
        registry_url: registry.addr.clone(),
        reauth: true,
    });
    assert!(matches!(
        docker.create_and_start_container(&s).await,
        Err(DockerError::PullFailed { .. })
    ));

    // The job's registry_credentials (X-Registry-Auth on the pull).
    s.registry_credentials = Some(RegistryCredentials {
        username: registry.user.clone(),
        password: registry.password.clone(),
        registry_url: registry.addr.clone(),
        reauth: true,
    });
    let started = docker
        .create_and_start_container(&s)
        .await
        .expect("pull with job credentials");
    assert!(started.pull_duration.is_some());
    assert_eq!(
        docker
            .watch_container(
                &started.container,
                false,
                false,
                &|_: docker_worker::docker::OutputLine<'_>| {}
            )
            .await
            .unwrap()
            .code,
        0
    );
    let _ = std::process::Command::new("docker")
        .args(["rmi", "-f", &image])
        .output();

    // `docker login` on the worker's host (config.json auths) is enough.
    let docker = docker.with_docker_config(Some(registry.docker_config()));
    let mut s = spec(&image, "exit 0", &label);
    s.name = Some(format!("{label}-cfg"));
    s.pull_policy = PullPolicy::Always;
    let started = docker
        .create_and_start_container(&s)
        .await
        .expect("pull with config.json");
    assert!(started.pull_duration.is_some());
}
