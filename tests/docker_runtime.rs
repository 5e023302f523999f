//! The Docker runtime against the real daemon: local images only, unique names and a test
//! label, containers and networks removed by guards even when a test fails.

mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use docker_worker::docker::{DockerError, DockerRuntime, OutputLine, OutputStream};
use docker_worker::job::{ContainerSpec, PullPolicy, RegistryCredentials};
use serde_json::json;
use support::recorder::{Endpoint, Recorder};
use support::services::Registry;
use support::*;

async fn runtime() -> DockerRuntime {
    require_docker();
    DockerRuntime::connect(
        std::env::var("DOCKER_HOST").ok().as_deref(),
        Duration::from_secs(60),
    )
    .await
    .expect("connect to the Docker daemon")
}

fn spec(run: &str, command: &str) -> ContainerSpec {
    let mut spec = test_spec(BUSYBOX, run, command);
    spec.env = vec![("GREETING".into(), "hello from env".into())];
    spec
}

struct NetworkGuard(Vec<String>);
impl Drop for NetworkGuard {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("docker").args(["network", "rm", n]).output();
        }
    }
}

#[tokio::test]
async fn streams_output_and_reports_the_exit_code() {
    let docker = runtime().await;
    let run = unique("dw-rt-logs");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &run);
    let s = spec(
        &run,
        "echo \"$GREETING\"; echo to-stderr >&2; printf 'a\\nb\\n'; exit 7",
    );
    let container = docker
        .create_and_start_container(&s)
        .await
        .expect("start")
        .container;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = {
        let lines = Arc::clone(&lines);
        move |line: OutputLine<'_>| {
            lines
                .lock()
                .unwrap()
                .push((line.stream, line.timestamp, line.text.to_owned()));
        }
    };
    let status = docker
        .watch_container(&container, false, true, &sink)
        .await
        .expect("watch");
    assert_eq!(status.code, 7);
    let lines = lines.lock().unwrap().clone();
    // Every line once; the Engine orders the two streams only by when it read each, so only
    // the order within a stream is asserted.
    let stdout: Vec<&str> = lines
        .iter()
        .filter(|(s, _, _)| *s == OutputStream::Stdout)
        .map(|(_, _, t)| t.as_str())
        .collect();
    assert_eq!(stdout, ["hello from env", "a", "b"], "{lines:?}");
    // One call per line, its stream marked, the Engine's timestamp parsed off the text.
    let stream_of = |text: &str| lines.iter().find(|(_, _, t)| t == text).map(|l| l.0);
    assert_eq!(
        stream_of("to-stderr"),
        Some(OutputStream::Stderr),
        "{lines:?}"
    );
    assert_eq!(
        stream_of("hello from env"),
        Some(OutputStream::Stdout),
        "{lines:?}"
    );
    assert!(lines.iter().all(|(_, at, _)| at.is_some()), "{lines:?}");
}

#[tokio::test]
async fn exit_code_is_right_without_streaming() {
    let docker = runtime().await;
    let run = unique("dw-rt-nostream");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &run);
    let mut s = spec(&run, "sleep 1; exit 42");
    s.stream_output = false;
    let container = docker
        .create_and_start_container(&s)
        .await
        .expect("start")
        .container;
    let status = docker
        .watch_container(&container, false, false, &|_: OutputLine<'_>| {
            panic!("no output expected")
        })
        .await
        .expect("watch");
    assert_eq!(status.code, 42);
    let status = docker
        .watch_container(&container, false, false, &|_: OutputLine<'_>| {})
        .await
        .expect("second watch");
    assert_eq!(
        status.code, 42,
        "watching an exited container reports its code again"
    );
}

#[tokio::test]
async fn auto_remove_reports_the_code_and_the_container_is_gone() {
    let docker = runtime().await;
    let run = unique("dw-rt-autorm");
    let guard = ContainerGuard::for_label(TEST_LABEL, &run);
    let mut s = spec(&run, "echo bye; exit 5");
    s.auto_remove = true;
    let container = docker
        .create_and_start_container(&s)
        .await
        .expect("start")
        .container;
    // Let it exit and be removed before we even start watching: the hardest case.
    eventually(
        Duration::from_secs(60),
        "the auto-removed container to be gone",
        async || guard.containers().is_empty(),
    )
    .await;
    let status = docker
        .watch_container(&container, true, true, &|_: OutputLine<'_>| {})
        .await
        .expect("watch");
    assert_eq!(status.code, 5);
    assert!(!docker.container_exists(&container.id).await.unwrap());
    assert!(guard.containers().is_empty());
}

#[tokio::test]
async fn name_conflicts_get_a_numbered_suffix() {
    let docker = runtime().await;
    let run = unique("dw-rt-conflict");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &run);
    let s = spec(&run, "true");
    let first = docker.create_container(&s).await.expect("first");
    let second = docker.create_container(&s).await.expect("second");
    let third = docker.create_container(&s).await.expect("third");
    assert_eq!(first.name.as_deref(), Some(run.as_str()));
    assert_eq!(second.name, Some(format!("{run}-1")));
    assert_eq!(third.name, Some(format!("{run}-2")));
    assert_eq!(inspect(&second.id)["Name"], json!(format!("/{run}-1")));
}

#[tokio::test]
async fn first_network_at_create_and_the_rest_connected() {
    let docker = runtime().await;
    let run = unique("dw-rt-nets");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &run);
    let nets = vec![format!("{run}-a"), format!("{run}-b")];
    let _nets = NetworkGuard(nets.clone());
    for n in &nets {
        run_ok(Command::new("docker").args(["network", "create", n]));
    }
    let mut s = spec(&run, "sleep 30");
    s.network_mode = nets[0].clone();
    s.extra_networks = vec![nets[1].clone()];
    let container = docker
        .create_and_start_container(&s)
        .await
        .expect("start")
        .container;
    let info = inspect(&container.id);
    let attached = info["NetworkSettings"]["Networks"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert!(
        attached.contains_key(&nets[0]) && attached.contains_key(&nets[1]),
        "{attached:?}"
    );
    assert_eq!(info["HostConfig"]["NetworkMode"], json!(nets[0]));
}

#[tokio::test]
async fn missing_second_network_is_a_clear_error() {
    let docker = runtime().await;
    let run = unique("dw-rt-nonet");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &run);
    let mut s = spec(&run, "true");
    s.extra_networks = vec![format!("{run}-missing")];
    let err = docker.create_and_start_container(&s).await.unwrap_err();
    assert!(matches!(err, DockerError::NetworkNotFound { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!("Docker network '{run}-missing' not found")
    );
}

#[tokio::test]
async fn never_policy_with_a_missing_image_is_image_not_found() {
    let docker = runtime().await;
    let run = unique("dw-rt-noimage");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &run);
    let mut s = spec(&run, "true");
    s.image = "local/no-such-image:1".into();
    s.pull_policy = PullPolicy::Never;
    let err = docker.create_and_start_container(&s).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "No such image: local/no-such-image:1 (image_pull_policy is Never, so the worker did not pull it)"
    );
}

#[tokio::test]
async fn a_failed_pull_names_the_image_and_the_registry_error() {
    let docker = runtime().await;
    let run = unique("dw-rt-pull");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &run);
    let mut s = spec(&run, "true");
    // Nothing listens on this port: the Engine's pull fails without leaving the machine.
    s.image = format!("127.0.0.1:{}/nothing/here:1", free_port());
    s.pull_policy = PullPolicy::Always;
    let err = docker.create_and_start_container(&s).await.unwrap_err();
    assert!(matches!(err, DockerError::PullFailed { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("Docker pull failed for {}", s.image)),
        "{err}"
    );
}

fn credentials(registry: &Registry, password: &str) -> Option<RegistryCredentials> {
    Some(RegistryCredentials {
        username: registry.user.clone(),
        password: password.to_owned(),
        registry_url: registry.addr.clone(),
        reauth: true,
    })
}

/// A runtime whose Docker socket is a recording proxy to the machine's daemon.
async fn recorded_runtime(dir: &std::path::Path) -> (DockerRuntime, Recorder) {
    require_docker();
    let recorder = Recorder::unix(
        &dir.join("docker.sock"),
        Endpoint::Unix("/var/run/docker.sock".into()),
    );
    let docker = DockerRuntime::connect(
        Some(&format!("unix://{}", dir.join("docker.sock").display())),
        Duration::from_secs(60),
    )
    .await
    .expect("connect through the recorder");
    (docker, recorder)
}

#[tokio::test]
async fn registry_login_comes_before_the_pull_and_concurrent_runs_share_both() {
    let dir = tempfile::tempdir().unwrap();
    let (docker, recorder) = recorded_runtime(dir.path()).await;
    let registry = Registry::start();
    let image = registry.push_busybox(&unique("login"));
    let _image = ImageGuard(image.clone());
    let run = unique("dw-rt-login");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &run);

    // A wrong password: the login fails, nothing is pulled, the error says it was the login.
    let mut s = spec(&run, "true");
    s.image = image.clone();
    s.pull_policy = PullPolicy::Always;
    s.registry_credentials = credentials(&registry, "wrong");
    let err = docker.create_and_start_container(&s).await.unwrap_err();
    match &err {
        DockerError::PullFailed { login_registry, .. } => {
            assert_eq!(login_registry.as_deref(), Some(registry.addr.as_str()));
        }
        other => panic!("not a failed login: {other}"),
    }
    assert!(
        err.to_string().starts_with(&format!(
            "Docker pull failed for {image}: login to registry {} failed: ",
            registry.addr
        )) && err.to_string().contains("401 Unauthorized"),
        "{err}"
    );
    assert_eq!(docker.pulls_made(), 0);

    // Three runs at once with the right password: one login, one pull, three containers.
    s.registry_credentials = credentials(&registry, &registry.password);
    let specs: Vec<ContainerSpec> = (0..3)
        .map(|i| {
            let mut s = s.clone();
            s.name = Some(format!("{run}-{i}"));
            s
        })
        .collect();
    let started =
        futures_util::future::join_all(specs.iter().map(|s| docker.create_and_start_container(s)))
            .await;
    for result in started {
        result.expect("pulled after the login");
    }
    assert_eq!(docker.pulls_made(), 1);
    let records = recorder.records();
    let logins: Vec<serde_json::Value> = records
        .iter()
        .filter(|r| r.method == "POST" && r.path().ends_with("/auth"))
        .map(|r| r.json())
        .collect();
    let expected = |password: &str| json!({"username": registry.user, "password": password, "serveraddress": registry.addr});
    assert_eq!(
        logins,
        vec![expected("wrong"), expected(&registry.password)],
        "the failed login, then one for the three runs"
    );
    let pulls = records
        .iter()
        .filter(|r| r.method == "POST" && r.path().ends_with("/images/create"))
        .count();
    assert_eq!(pulls, 1);
}

#[tokio::test]
async fn if_possible_falls_back_to_a_local_image_when_the_login_fails() {
    let docker = runtime().await;
    let registry = Registry::start();
    let run = unique("dw-rt-ifpossible");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &run);
    let local = format!("{}/dw/busybox:{}", registry.addr, unique("local"));
    run_ok(Command::new("docker").args(["tag", BUSYBOX, &local]));
    let _image = ImageGuard(local.clone());

    let mut s = spec(&run, "true");
    s.image = local.clone();
    s.pull_policy = PullPolicy::IfPossible;
    s.registry_credentials = credentials(&registry, "wrong");
    let started = docker
        .create_and_start_container(&s)
        .await
        .expect("the local image is used");
    assert_eq!(started.pull_duration, None);

    // Neither in the registry nor here: both failures, in the reference's layout.
    let mut s = spec(&format!("{run}-none"), "true");
    s.labels.insert(TEST_LABEL.to_owned(), run.clone());
    s.image = format!("{local}-missing");
    s.pull_policy = PullPolicy::IfPossible;
    s.registry_credentials = credentials(&registry, "wrong");
    let err = docker.create_and_start_container(&s).await.unwrap_err();
    assert!(
        matches!(err, DockerError::PullAndLocalFailed { .. }),
        "{err}"
    );
    let message = err.to_string();
    let expected_start = format!(
        "Docker operation completely failed for '{image}':\n-> [1. Login/Pull Error]: Docker pull failed for {image}: login to registry {} failed: ",
        registry.addr,
        image = s.image
    );
    assert!(message.starts_with(&expected_start), "{message}");
    assert!(
        message.contains("\n\n-> [2. Local Error]: ")
            && message.contains("No such image")
            && message.ends_with("\n\n-> NOTE: Because ImagePullPolicy was set to 'ImagePullPolicy.IF_POSSIBLE', a local fallback was attempted after the pull failed, but the image could not be found locally either."),
        "{message}"
    );
}

#[tokio::test]
async fn start_failure_is_reported_and_the_container_left_behind() {
    let docker = runtime().await;
    let run = unique("dw-rt-startfail");
    let guard = ContainerGuard::for_label(TEST_LABEL, &run);
    let mut s = spec(&run, "true");
    s.command = vec!["/no/such/binary".into()];
    let err = docker.create_and_start_container(&s).await.unwrap_err();
    assert!(matches!(err, DockerError::StartFailed { .. }), "{err}");
    assert!(err.to_string().contains("/no/such/binary"), "{err}");
    assert_eq!(guard.containers().len(), 1);
}

#[tokio::test]
async fn create_options_reach_the_engine() {
    let docker = runtime().await;
    let run = unique("dw-rt-opts");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &run);
    let mut s = spec(&run, "id -u; pwd");
    s.mem_limit = Some(64 * 1024 * 1024);
    s.extra_hosts = Some(vec!["host.docker.internal:host-gateway".into()]);
    s.config_overrides.insert("User".into(), json!("1234"));
    s.config_overrides
        .insert("WorkingDir".into(), json!("/tmp"));
    s.host_config_overrides
        .insert("ShmSize".into(), json!(16 * 1024 * 1024));
    let container = docker
        .create_and_start_container(&s)
        .await
        .expect("start")
        .container;
    let lines = Arc::new(Mutex::new(String::new()));
    let sink = {
        let lines = Arc::clone(&lines);
        move |l: OutputLine<'_>| lines.lock().unwrap().push_str(&format!("{}\n", l.text))
    };
    assert_eq!(
        docker
            .watch_container(&container, false, true, &sink)
            .await
            .unwrap()
            .code,
        0
    );
    let out = lines.lock().unwrap().clone();
    assert!(out.contains("1234") && out.contains("/tmp"), "{out}");
    let info = inspect(&container.id);
    assert_eq!(info["HostConfig"]["Memory"], json!(64 * 1024 * 1024));
    assert_eq!(info["HostConfig"]["ShmSize"], json!(16 * 1024 * 1024));
    assert_eq!(
        info["HostConfig"]["ExtraHosts"],
        json!(["host.docker.internal:host-gateway"])
    );
    assert_eq!(info["Config"]["Labels"][TEST_LABEL], json!(run));
}

#[tokio::test]
async fn unreachable_daemon_is_a_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = format!("unix://{}/nothing.sock", dir.path().display());
    let err = DockerRuntime::connect(Some(&sock), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("Could not connect to Docker at unix://"),
        "{err}"
    );
}

#[tokio::test]
async fn proxies_from_the_docker_client_config_come_first_in_the_container_env() {
    // As docker-py does: `proxies.default` of config.json, both spellings, before the job's
    // own variables (so a job's HTTP_PROXY, coming later, wins in the Engine).
    let config = tempfile::tempdir().unwrap();
    std::fs::write(
        config.path().join("config.json"),
        r#"{"proxies": {"default": {"httpProxy": "http://proxy.internal:3128", "noProxy": "localhost"}}}"#,
    )
    .unwrap();
    let docker = runtime()
        .await
        .with_docker_config(Some(config.path().to_owned()));
    let run = unique("dw-rt-proxy");
    let _guard = ContainerGuard::for_label(TEST_LABEL, &run);
    let mut s = spec(&run, "exit 0");
    s.env
        .push(("HTTP_PROXY".into(), "http://job-choice:1".into()));
    let container = docker.create_container(&s).await.expect("create");
    let env: Vec<String> = inspect(&container.id)["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        env[..4],
        [
            "http_proxy=http://proxy.internal:3128",
            "HTTP_PROXY=http://proxy.internal:3128",
            "no_proxy=localhost",
            "NO_PROXY=localhost",
        ],
        "{env:?}"
    );
    assert!(
        env.contains(&"GREETING=hello from env".to_owned()),
        "{env:?}"
    );
    let job_choice = env
        .iter()
        .rposition(|e| e == "HTTP_PROXY=http://job-choice:1");
    assert!(
        job_choice > Some(1),
        "the job's own value must come last: {env:?}"
    );
}
