//! The host policy (`--policy`) against the real Engine: the built worker, a real Prefect
//! server, the local Docker daemon seen through a recording proxy. Every rule refuses the job
//! that breaks it (Crashed with `PolicyViolation: <rule> (<field>)`, counted by rule, logged to
//! the run, and nothing pulled or created for it) and allows the job that keeps to it; the
//! forced options reach the container (inspected, and checked from inside it); a container
//! adopted after a restart is not judged again.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use support::recorder::{Endpoint, Recorder};
use support::*;

/// The policy under test, every rule on; `{allowed}` is the allowed bind prefix.
const POLICY: &str = r#"
[deny]
privileged = true
host_namespaces = ["network", "pid", "ipc", "uts", "userns", "cgroup"]
bind_outside = ["{allowed}"]
cap_add = true
devices = true
unconfined = true

[allow]
registries = ["local/*"]
capabilities = ["NET_BIND_SERVICE"]
devices = ["/dev/null"]
create_kwargs = ["cap_add", "devices", "pid_mode", "uts_mode", "security_opt", "pids_limit"]

[force]
no_new_privileges = true
read_only_rootfs = true
user = "1000:1000"
pids_limit = 64
memory = "128m"
max_memory = "256m"
cpus = 0.5
max_cpus = 1
cap_drop = ["NET_RAW"]
"#;

/// A directory tree for the bind rules: `allowed/` (the allowed prefix) with `data/marker`,
/// an alias link to `data`, a link out to `/etc`, and a link to the Docker socket.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("dw-guard")
            .tempdir_in("/var/tmp")
            .expect("temp dir");
        let allowed = dir.path().join("allowed");
        std::fs::create_dir_all(allowed.join("data")).unwrap();
        std::fs::write(allowed.join("data/marker"), "judged\n").unwrap();
        // The container runs as 1000:1000 and reads it.
        run_ok(std::process::Command::new("chmod").args([
            "-R",
            "a+rX",
            &dir.path().to_string_lossy(),
        ]));
        std::os::unix::fs::symlink(allowed.join("data"), allowed.join("alias")).unwrap();
        std::os::unix::fs::symlink("/etc", allowed.join("escape")).unwrap();
        std::os::unix::fs::symlink("/var/run/docker.sock", allowed.join("docker.sock")).unwrap();
        Self { dir }
    }

    fn allowed(&self) -> PathBuf {
        self.dir.path().join("allowed")
    }

    fn path(&self, rel: &str) -> String {
        self.allowed().join(rel).display().to_string()
    }
}

/// Job variables that keep to every rule, on top of which each case breaks one.
fn keeping(extra: Value) -> Value {
    let mut vars = json!({
        "image": BUSYBOX,
        "image_pull_policy": "Never",
        "network_mode": "bridge",
        "command": "sh -c 'exit 7'",
    });
    for (k, v) in extra.as_object().unwrap() {
        vars[k] = v.clone();
    }
    vars
}

/// `docker_worker_policy_violations_total{pool="…",rule="…"}` in a scrape.
fn violations(metrics: &str, pool: &str, rule: &str) -> Option<f64> {
    let prefix =
        format!("docker_worker_policy_violations_total{{pool=\"{pool}\",rule=\"{rule}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rule_refuses_what_breaks_it_and_allows_what_keeps_to_it() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("guard");
    let guard = ContainerGuard::for_pool(&pool);
    let tree = Tree::new();
    let policy_file = tree.dir.path().join("policy.toml");
    std::fs::write(
        &policy_file,
        POLICY.replace("{allowed}", &tree.allowed().display().to_string()),
    )
    .unwrap();

    // (case, job variables, rule, field, words the message must have)
    let refused: Vec<(&str, Value, &str, &str, &str)> = vec![
        (
            "privileged",
            keeping(json!({"privileged": true})),
            "privileged",
            "privileged",
            "privileged containers",
        ),
        (
            "network host",
            keeping(json!({"network_mode": "host"})),
            "host_namespaces",
            "network_mode",
            "`host`",
        ),
        (
            "inferred host",
            {
                // No network named and a localhost API URL: the worker itself picks `host`.
                let mut v = keeping(json!({}));
                v.as_object_mut().unwrap().remove("network_mode");
                v
            },
            "host_namespaces",
            "network_mode",
            "PREFECT_API_URL is on localhost",
        ),
        (
            "pid host",
            keeping(json!({"container_create_kwargs": {"pid_mode": "host"}})),
            "host_namespaces",
            "container_create_kwargs.pid_mode",
            "`host`",
        ),
        (
            "ipc container",
            keeping(json!({"ipc_mode": "container:other"})),
            "host_namespaces",
            "ipc_mode",
            "container:other",
        ),
        (
            "uts host",
            keeping(json!({"container_create_kwargs": {"uts_mode": "host"}})),
            "host_namespaces",
            "container_create_kwargs.uts_mode",
            "`host`",
        ),
        (
            "cap_add",
            keeping(json!({"container_create_kwargs": {"cap_add": ["SYS_ADMIN"]}})),
            "cap_add",
            "container_create_kwargs.cap_add",
            "SYS_ADMIN",
        ),
        (
            "devices",
            keeping(json!({"container_create_kwargs": {"devices": ["/dev/mem:/dev/mem"]}})),
            "devices",
            "container_create_kwargs.devices",
            "/dev/mem",
        ),
        (
            "unconfined",
            keeping(json!({"container_create_kwargs": {"security_opt": ["seccomp=unconfined"]}})),
            "unconfined",
            "container_create_kwargs.security_opt",
            "seccomp",
        ),
        (
            "bind outside",
            keeping(json!({"volumes": ["/etc:/host-etc:ro"]})),
            "bind_outside",
            "volumes.0",
            "outside the allowed host paths",
        ),
        (
            "link out",
            keeping(json!({"volumes": [format!("{}:/x", tree.path("escape"))]})),
            "bind_outside",
            "volumes.0",
            "resolves to /etc",
        ),
        (
            "socket link alone",
            keeping(
                json!({"volumes": [format!("{}:/var/run/docker.sock", tree.path("docker.sock"))]}),
            ),
            "bind_outside",
            "volumes.0",
            "is the Docker socket",
        ),
        // Would be pulled (Always) if it got that far.
        (
            "registry",
            keeping(json!({"image": "busybox:latest", "image_pull_policy": "Always"})),
            "registries",
            "image",
            "busybox:latest",
        ),
        (
            "create kwargs",
            keeping(json!({"container_create_kwargs": {"hostname": "h"}})),
            "create_kwargs",
            "container_create_kwargs.hostname",
            "not an allowed",
        ),
        (
            "max memory",
            keeping(json!({"mem_limit": "1g"})),
            "max_memory",
            "mem_limit",
            "at most",
        ),
        (
            "max cpus",
            keeping(json!({"cpus": 4})),
            "max_cpus",
            "cpus",
            "at most",
        ),
    ];
    // The keeping side of each rule, all at once: an allowed capability, device, bind (by a
    // link inside the prefix, mounted by its real path), image and keys; inside, the forced
    // user, read-only root and writable /tmp are checked.
    let check = "id -u | grep -qx 1000 || exit 11; touch /probe 2>/dev/null && exit 12; \
                 touch /tmp/ok || exit 13; grep -q judged /data/marker || exit 14; exit 7";
    let allowed_vars = keeping(json!({
        "command": format!("sh -c '{check}'"),
        "volumes": [format!("{}:/data:ro", tree.path("alias"))],
        "container_create_kwargs": {"cap_add": ["NET_BIND_SERVICE"], "devices": ["/dev/null:/dev/xnull"]},
    }));

    let mut runs = Vec::new();
    for (case, vars, rule, field, words) in &refused {
        let dep = api.busybox_deployment(&pool, vars.clone()).await;
        runs.push((
            api.create_flow_run(&dep, json!({})).await,
            *case,
            *rule,
            *field,
            *words,
        ));
    }
    let allowed_dep = api.busybox_deployment(&pool, allowed_vars).await;
    let allowed_run = api.create_flow_run(&allowed_dep, json!({})).await;

    let dir = tempfile::tempdir().unwrap();
    let docker = Recorder::unix(
        &dir.path().join("docker.sock"),
        Endpoint::Unix("/var/run/docker.sock".into()),
    );
    let Endpoint::Unix(socket) = &docker.listen else {
        unreachable!()
    };
    let docker_host = format!("unix://{}", socket.display());
    let port = free_port().to_string();
    let worker = WorkerProcess::start(
        server,
        &[
            "--pool",
            &pool,
            "--limit",
            "4",
            "--with-metrics",
            "--policy",
            &policy_file.to_string_lossy(),
        ],
        &[
            ("DOCKER_HOST", &docker_host),
            ("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1"),
            ("PREFECT_WORKER_WEBSERVER_PORT", &port),
        ],
    );

    worker
        .wait_for_output("host policy: every new run", Duration::from_secs(60))
        .await;
    for (run_id, case, rule, field, words) in &runs {
        let run = api
            .wait_for_final_state(run_id, Duration::from_secs(180))
            .await;
        let (kind, message) = run_state(&run);
        let expected = format!("PolicyViolation: {rule} ({field})");
        assert_eq!(kind, "CRASHED", "{case}: {run}\n{}", worker.output());
        assert!(
            message.contains(&expected) && message.contains(words),
            "{case}: expected {expected:?} and {words:?} in {message:?}"
        );
    }
    let run = api
        .wait_for_final_state(&allowed_run, Duration::from_secs(180))
        .await;
    let (kind, message) = run_state(&run);
    assert_eq!(kind, "CRASHED", "{run}\n{}", worker.output());
    assert!(
        message.contains("non-zero status code 7."),
        "the allowed container's checks failed (11 user, 12 root writable, 13 /tmp, 14 bind): {message}"
    );

    // Refused before anything was pulled or created: no create carries a refused run's id,
    // and the refused image was never pulled.
    let records = docker.records();
    let created: Vec<String> = records
        .iter()
        .filter(|r| r.method == "POST" && r.path().ends_with("/containers/create"))
        .filter_map(|r| {
            r.json()["Labels"]["io.prefect.flow-run-id"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(created, vec![allowed_run.clone()], "{}", worker.output());
    assert!(
        !records.iter().any(|r| r.path().ends_with("/images/create")),
        "something was pulled"
    );

    // The forced options are in the create body the Engine kept.
    let containers = guard.containers();
    assert_eq!(containers.len(), 1);
    let c = inspect(&containers[0]);
    let hc = &c["HostConfig"];
    assert_eq!(c["Config"]["User"], json!("1000:1000"));
    assert_eq!(hc["ReadonlyRootfs"], json!(true));
    assert!(
        hc["SecurityOpt"]
            .as_array()
            .unwrap()
            .contains(&json!("no-new-privileges")),
        "{hc}"
    );
    assert_eq!(hc["Tmpfs"]["/tmp"], json!(""));
    assert_eq!(hc["PidsLimit"], json!(64));
    assert_eq!(hc["Memory"], json!(128 << 20));
    assert_eq!(hc["NanoCpus"], json!(500_000_000));
    assert_eq!(hc["CapDrop"], json!(["NET_RAW"]));
    assert_eq!(hc["CapAdd"], json!(["NET_BIND_SERVICE"]));
    assert_eq!(
        hc["Binds"],
        json!([format!("{}:/data:ro", tree.path("data"))])
    );

    // Logged to the run, and counted by rule.
    let logs = api
        .wait_for_log(
            &runs[0].0,
            "privileged (privileged)",
            Duration::from_secs(30),
        )
        .await;
    assert!(
        logs.iter().any(|l| l.contains("Failed to submit flow run")),
        "{logs:?}"
    );
    let allowed_logs = api
        .wait_for_log(&allowed_run, "host policy applied", Duration::from_secs(30))
        .await;
    assert!(
        allowed_logs.iter().any(|l| l.contains("User 1000:1000")),
        "{allowed_logs:?}"
    );
    let scrape = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (rule, count) in [
        ("privileged", 1.0),
        ("host_namespaces", 5.0),
        ("cap_add", 1.0),
        ("devices", 1.0),
        ("unconfined", 1.0),
        ("bind_outside", 3.0),
        ("registries", 1.0),
        ("create_kwargs", 1.0),
        ("max_memory", 1.0),
        ("max_cpus", 1.0),
    ] {
        assert_eq!(
            violations(&scrape, &pool, rule),
            Some(count),
            "{rule}:\n{scrape}"
        );
    }
}

/// A container a worker without the policy started is adopted by a worker with it after a
/// restart and watched to its exit: it is not judged again.
#[tokio::test(flavor = "multi_thread")]
async fn adopted_containers_are_not_judged_again() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("guard-adopt");
    let guard = ContainerGuard::for_pool(&pool);
    let dir = tempfile::tempdir().unwrap();
    let policy_file = dir.path().join("policy.toml");
    // Its image is not allowed: judged again, the run would be refused.
    std::fs::write(
        &policy_file,
        "[allow]\nregistries = [\"registry.internal:5000/*\"]\n",
    )
    .unwrap();
    let dep = api
        .busybox_deployment(
            &pool,
            json!({"network_mode": "bridge",
                   "command": "sh -c 'until test -e /release; do sleep 1; done; exit 5'"}),
        )
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let name = unique("guard-worker");
    let mut first = WorkerProcess::start(server, &["--pool", &pool, "--name", &name], &[]);
    wait_for_pids(&api, &[&run_id], Duration::from_secs(120), &first).await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let second = WorkerProcess::start(
        server,
        &[
            "--pool",
            &pool,
            "--name",
            &name,
            "--policy",
            &policy_file.to_string_lossy(),
        ],
        &[],
    );
    second
        .wait_for_output("re-attached", Duration::from_secs(60))
        .await;
    let running = guard.running();
    assert_eq!(running.len(), 1, "{}", second.output());
    run_ok(std::process::Command::new("docker").args(["exec", &running[0], "touch", "/release"]));
    let run = api
        .wait_for_final_state(&run_id, Duration::from_secs(120))
        .await;
    let (kind, message) = run_state(&run);
    assert_eq!(kind, "CRASHED", "{run}\n{}", second.output());
    assert!(message.contains("non-zero status code 5."), "{message}");
    assert!(!message.contains("PolicyViolation"), "{message}");
}

/// `policy check` with the same policy: the file is described, a breaking job is refused
/// (exit 1) with the worker's words, a keeping one shows its create body with the forced
/// options; a bad file is exit 64 with its line.
#[test]
fn policy_check_shows_what_a_policy_does_to_a_job() {
    let tree = Tree::new();
    let file = tree.dir.path().join("policy.toml");
    std::fs::write(
        &file,
        POLICY.replace("{allowed}", &tree.allowed().display().to_string()),
    )
    .unwrap();
    let check = |job: Option<String>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_docker-worker"));
        cmd.env_clear().args(["policy", "check"]).arg(&file);
        if let Some(job) = job {
            cmd.args(["--job", &job]);
        }
        cmd.output().unwrap()
    };
    let out = check(None);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("refuse privileged containers"), "{text}");
    let socket_job = json!({"image": BUSYBOX, "network_mode": "bridge",
        "volumes": [format!("{}:/s", tree.path("docker.sock"))]});
    let out = check(Some(socket_job.to_string()));
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Job: refused: PolicyViolation: bind_outside (volumes.0)")
            && text.contains("Docker socket"),
        "{text}"
    );
    let job_file = tree.dir.path().join("job.json");
    std::fs::write(
        &job_file,
        json!({"image": BUSYBOX, "network_mode": "bridge"}).to_string(),
    )
    .unwrap();
    let out = check(Some(job_file.display().to_string()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"ReadonlyRootfs\": true") && text.contains("\"User\": \"1000:1000\""),
        "{text}"
    );

    let bad = tree.dir.path().join("bad.toml");
    std::fs::write(&bad, "[force]\nuser = \"1000\"\nmemory = \"lots\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_docker-worker"))
        .env_clear()
        .args(["policy", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}: line 3, column 10: ", bad.display())),
        "{err}"
    );
    assert!(Path::new(&bad).exists());
}
