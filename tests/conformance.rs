//! Conformance with the reference: the Python worker (prefect 3.9.1 + prefect-docker 0.7.4) and
//! this one run the same corpus of job configurations against one Prefect server, each behind a
//! recording proxy on the Docker socket and the Prefect API. For every configuration the
//! `POST /containers/create` requests (query and body) and the flow-run state proposals must be
//! equal, and every flow-run log line the reference sends must be sent by ours too — except the
//! documented fixes of the reference's defects (see the README's "Differences"). Five
//! configurations pull from a real registry with htpasswd auth; for those the registry logins
//! (`POST /auth` bodies) and pulls (`POST /images/create` queries and the credentials in their
//! `X-Registry-Auth`) must be equal too.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Map, Value, json};
use support::recorder::{Endpoint, Recorded, Recorder};
use support::services::Registry;
use support::*;

const WORKER_NAME: &str = "conformance-worker";

/// Images and credentials of the registry configurations.
struct RegistryCase {
    /// Pushed to the registry, not present locally.
    pushed: String,
    /// Neither in the registry nor local.
    missing: String,
    /// Tagged locally only.
    local_only: String,
    /// Neither in the registry nor local (pulled without credentials).
    nowhere: String,
    /// `registry_credentials` that work.
    credentials: Value,
    /// `registry_credentials` with a wrong password.
    wrong_password: Value,
}

impl RegistryCase {
    fn new(registry: &Registry) -> Self {
        let tag = unique("conf");
        let pushed = registry.push_busybox(&tag);
        let local_only = format!("{pushed}-local");
        run_ok(Command::new("docker").args(["tag", BUSYBOX, &local_only]));
        let credentials = json!({"username": registry.user, "password": registry.password, "registry_url": registry.addr});
        let mut wrong_password = credentials.clone();
        wrong_password["password"] = json!("not-the-password");
        Self {
            missing: format!("{pushed}-missing"),
            nowhere: format!("{pushed}-nowhere"),
            local_only,
            pushed,
            credentials,
            wrong_password,
        }
    }

    fn images(&self) -> [&str; 4] {
        [&self.pushed, &self.missing, &self.local_only, &self.nowhere]
    }
}

/// The corpus: (label, job variables). Every job field and Docker rule of the reference, on
/// the busybox image; commands exit with various codes so the crash path is compared too.
fn corpus(network_a: &str, network_b: &str, registry: &RegistryCase) -> Vec<(&'static str, Value)> {
    vec![
        ("defaults-exit-0", json!({"command": "sh -c 'exit 0'"})),
        ("exit-3", json!({"command": "sh -c 'echo failing; exit 3'"})),
        ("exit-137", json!({"command": "sh -c 'kill -9 $$'"})),
        (
            "env",
            json!({"command": "sh -c 'exit 0'", "env": {"A": "1", "B": "two words", "C": ""}}),
        ),
        (
            "env-number-and-bool",
            json!({"command": "sh -c 'exit 0'", "env": {"N": "5", "T": "True"}}),
        ),
        (
            "labels",
            json!({"command": "sh -c 'exit 0'", "labels": {"team": "data", "a.b/c": "d"}}),
        ),
        (
            "name-template",
            json!({"command": "sh -c 'exit 0'", "name": "job-{{ ctx.flow_run.name }}"}),
        ),
        (
            "name-unicode",
            json!({"command": "sh -c 'exit 0'", "name": "Café Ünïcode run"}),
        ),
        (
            "auto-remove",
            json!({"command": "sh -c 'exit 0'", "auto_remove": true}),
        ),
        (
            "auto-remove-exit-2",
            json!({"command": "sh -c 'exit 2'", "auto_remove": true}),
        ),
        (
            "no-stream",
            json!({"command": "sh -c 'exit 0'", "stream_output": false}),
        ),
        (
            "mem-limit",
            json!({"command": "sh -c 'exit 0'", "mem_limit": "64m"}),
        ),
        (
            "mem-and-swap",
            json!({"command": "sh -c 'exit 0'", "mem_limit": "64m", "memswap_limit": "128m"}),
        ),
        (
            "privileged",
            json!({"command": "sh -c 'exit 0'", "privileged": true}),
        ),
        (
            "volumes",
            json!({"command": "sh -c 'exit 0'", "volumes": ["/tmp:/host-tmp:ro", "dw-conf-vol:/data"]}),
        ),
        (
            "network-mode-bridge",
            json!({"command": "sh -c 'exit 0'", "network_mode": "bridge"}),
        ),
        (
            "one-network",
            json!({"command": "sh -c 'exit 0'", "networks": [network_a]}),
        ),
        (
            "two-networks",
            json!({"command": "sh -c 'exit 0'", "networks": [network_a, network_b]}),
        ),
        (
            "pull-never",
            json!({"command": "sh -c 'exit 0'", "image_pull_policy": "Never"}),
        ),
        (
            "pull-if-not-present",
            json!({"command": "sh -c 'exit 0'", "image_pull_policy": "IfNotPresent"}),
        ),
        (
            "kwargs-user-workdir",
            json!({"command": "sh -c 'exit 0'", "container_create_kwargs": {"user": "1000", "working_dir": "/tmp"}}),
        ),
        (
            "kwargs-hostname-dns",
            json!({"command": "sh -c 'exit 0'", "container_create_kwargs": {"hostname": "conf-host", "dns": ["1.1.1.1"], "dns_search": ["example.internal"]}}),
        ),
        (
            "kwargs-caps",
            json!({"command": "sh -c 'exit 0'", "container_create_kwargs": {"cap_add": ["NET_ADMIN"], "cap_drop": ["MKNOD"]}}),
        ),
        (
            "kwargs-shm-cpu",
            json!({"command": "sh -c 'exit 0'", "container_create_kwargs": {"shm_size": "128m", "cpu_shares": 512, "cpuset_cpus": "0"}}),
        ),
        (
            "kwargs-extra-hosts",
            json!({"command": "sh -c 'exit 0'", "container_create_kwargs": {"extra_hosts": {"db.internal": "10.0.0.5"}}}),
        ),
        (
            "kwargs-tmpfs-readonly",
            json!({"command": "sh -c 'exit 0'", "container_create_kwargs": {"tmpfs": {"/run": "size=1m"}, "read_only": true}}),
        ),
        (
            "kwargs-init-pids",
            json!({"command": "sh -c 'exit 0'", "container_create_kwargs": {"init": true, "pids_limit": 100}}),
        ),
        (
            "kwargs-ports",
            json!({"command": "sh -c 'exit 0'", "container_create_kwargs": {"ports": {"8080/tcp": null}}}),
        ),
        (
            "kwargs-restart-policy",
            json!({"command": "sh -c 'exit 0'", "container_create_kwargs": {"restart_policy": {"Name": "no"}}}),
        ),
        (
            "kwargs-security-opt",
            json!({"command": "sh -c 'exit 0'", "container_create_kwargs": {"security_opt": ["no-new-privileges"]}}),
        ),
        (
            "kwargs-stop-signal",
            json!({"command": "sh -c 'exit 0'", "container_create_kwargs": {"stop_signal": "SIGINT", "stop_timeout": 5}}),
        ),
        (
            "api-url-override",
            json!({"command": "sh -c 'exit 0'", "env": {"PREFECT_API_URL": "http://localhost:4200/api"}}),
        ),
        (
            "quoted-command",
            json!({"command": "sh -c 'echo \"a b\" c; exit 4'"}),
        ),
        (
            "missing-image",
            json!({"image": "local/not-there:1", "image_pull_policy": "Never"}),
        ),
        (
            "registry-always",
            json!({"command": "sh -c 'exit 0'", "image": registry.pushed, "image_pull_policy": "Always",
                   "registry_credentials": registry.credentials}),
        ),
        (
            "registry-wrong-password",
            json!({"command": "sh -c 'exit 0'", "image": registry.pushed, "image_pull_policy": "Always",
                   "registry_credentials": registry.wrong_password}),
        ),
        (
            "registry-missing-tag-if-not-present",
            json!({"command": "sh -c 'exit 0'", "image": registry.missing, "image_pull_policy": "IfNotPresent",
                   "registry_credentials": registry.credentials}),
        ),
        (
            "registry-if-possible-local",
            json!({"command": "sh -c 'exit 0'", "image": registry.local_only, "image_pull_policy": "IfPossible",
                   "registry_credentials": registry.credentials}),
        ),
        (
            "registry-if-possible-nowhere",
            json!({"command": "sh -c 'exit 0'", "image": registry.nowhere, "image_pull_policy": "IfPossible"}),
        ),
    ]
}

/// Configurations that stop before `POST /containers/create`: published ports with the host's
/// network (both), `stop_timeout` (the reference, README difference 11), and the registry
/// configurations whose login or pull fails without a local image.
const NO_CREATE: usize = 5;

/// One worker's registry traffic on its Docker socket, in a comparable order: the `POST /auth`
/// bodies, and per `POST /images/create` its query (empty values dropped: the Engine's "unset")
/// and the credentials of its `X-Registry-Auth` (null fields dropped).
fn registry_traffic(side: &Side) -> (Vec<Value>, Vec<Value>) {
    let records = side.docker.records();
    let mut logins: Vec<Value> = records
        .iter()
        .filter(|r| r.method == "POST" && r.path().ends_with("/auth"))
        .map(|r| normalize(&r.json(), &[]))
        .collect();
    let mut pulls: Vec<Value> = records
        .iter()
        .filter(|r| r.method == "POST" && r.path().ends_with("/images/create"))
        .map(|r| {
            let query: Map<String, Value> = r
                .query_map()
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k, json!(v)))
                .collect();
            let auth = r.header("x-registry-auth").map(|h| {
                use base64::Engine as _;
                let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(h.trim_end_matches('='))
                    .unwrap_or_default();
                normalize(
                    &serde_json::from_slice(&decoded).unwrap_or(Value::Null),
                    &[],
                )
            });
            json!({"query": query, "auth": auth.filter(|a| a.as_object().is_some_and(|o| !o.is_empty()))})
        })
        .collect();
    logins.sort_by_key(Value::to_string);
    pulls.sort_by_key(Value::to_string);
    (logins, pulls)
}

/// Replaces run-specific strings (ids, names) with stable placeholders, drops null and empty
/// object fields (the Engine treats them as absent), and sorts `Env`.
fn normalize(value: &Value, replacements: &[(String, String)]) -> Value {
    match value {
        Value::String(s) => {
            let mut s = s.clone();
            for (from, to) in replacements {
                if !from.is_empty() {
                    s = s.replace(from, to);
                }
            }
            Value::String(s)
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| normalize(v, replacements)).collect())
        }
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                if v.is_null() {
                    continue;
                }
                let mut v = normalize(v, replacements);
                if k == "Env"
                    && let Value::Array(items) = &mut v
                {
                    items.sort_by_key(|a| a.to_string());
                }
                // An object left empty (`NetworkingConfig: {"EndpointsConfig": null}`) is
                // absent for the Engine too.
                if v.as_object().is_some_and(Map::is_empty) {
                    continue;
                }
                if k == "io.prefect.deployment-updated" {
                    v = json!("<deployment-updated>");
                }
                out.insert(k.clone(), v);
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

struct Side {
    pool: String,
    pool_id: String,
    deployment_names: BTreeMap<&'static str, String>,
    runs: BTreeMap<&'static str, Value>,
    docker: Recorder,
}

/// What one worker did for one configuration.
#[derive(Debug, Default)]
struct Observed {
    creates: Vec<Value>,
    states: Vec<Value>,
    logs: Vec<String>,
}

fn observe(
    side: &Side,
    api_records: &[Recorded],
    label: &str,
    replacements: &[(String, String)],
) -> Observed {
    let run = &side.runs[label];
    let run_id = run["id"].as_str().unwrap();
    let mut seen = Observed::default();
    // Containers are named after the flow run (or its name template): match by the run label.
    for r in side.docker.records() {
        if r.method == "POST" && r.path().ends_with("/containers/create") {
            let body = r.json();
            if body["Labels"]["io.prefect.flow-run-id"] == run_id {
                seen.creates.push(json!({
                    "name": r.query("name").map(|n| normalize(&json!(n), replacements)),
                    // An empty `platform=` is the Engine's "unset", as an absent one.
                    "platform": r.query("platform").filter(|p| !p.is_empty()),
                    "body": normalize(&body, replacements),
                }));
            }
        }
    }
    for r in api_records {
        if r.method == "POST"
            && r.path()
                .ends_with(&format!("/flow_runs/{run_id}/set_state"))
        {
            let body = r.json();
            let state = &body["state"];
            let proposal = json!({
                "type": state["type"], "name": state["name"],
                "message": normalize(&state["message"], replacements),
                "force": body["force"],
            });
            // The same proposal twice in a row is a client retry of a request the busy SQLite
            // server answered 503 (both workers retry), not a second proposal.
            if seen.states.last() != Some(&proposal) {
                seen.states.push(proposal);
            }
        }
        if r.method == "POST" && r.path().ends_with("/logs/") {
            for entry in r.json().as_array().into_iter().flatten() {
                if entry["flow_run_id"] == run_id {
                    let message = normalize(&entry["message"], replacements);
                    seen.logs
                        .push(message.as_str().unwrap_or_default().to_owned());
                }
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reference_and_this_worker_make_the_same_containers_states_and_logs() {
    require_docker();
    let server = server();
    let dir = tempfile::tempdir().unwrap();
    // Both workers' HOME: a Docker client config with proxies, which docker-py (and so the
    // reference) puts in every container's env — every configuration compares them too.
    std::fs::create_dir_all(dir.path().join(".docker")).unwrap();
    std::fs::write(
        dir.path().join(".docker/config.json"),
        r#"{"proxies": {"default": {"httpProxy": "http://proxy.conformance:3128", "noProxy": "localhost,127.0.0.1"}}}"#,
    )
    .unwrap();
    let api_recorder = Recorder::tcp(Endpoint::Tcp(
        server
            .api_url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_owned(),
    ));
    let Endpoint::Tcp(api_addr) = &api_recorder.listen else {
        unreachable!()
    };
    let api_url = format!("http://{api_addr}/api");
    let api = Api::new(server);

    let suffix = unique("c");
    let network_a = format!("dw-conf-a-{suffix}");
    let network_b = format!("dw-conf-b-{suffix}");
    for n in [&network_a, &network_b] {
        run_ok(Command::new("docker").args(["network", "create", n]));
    }
    let registry = Registry::start();
    let registry_case = RegistryCase::new(&registry);
    let _images: Vec<ImageGuard> = registry_case
        .images()
        .iter()
        .map(|i| ImageGuard((*i).to_owned()))
        .collect();
    let corpus = corpus(&network_a, &network_b, &registry_case);

    let reference_template = docker_worker::job::reference_base_job_template();
    let mut sides = Vec::new();
    for who in ["ref", "ours"] {
        let pool = format!("conf-{who}-{suffix}");
        let (status, body) = api
            .call(
                reqwest::Method::POST,
                "work_pools/",
                Some(json!({"name": pool, "type": "docker", "base_job_template": reference_template})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let pool_id = body["id"].as_str().unwrap().to_owned();
        let mut runs = BTreeMap::new();
        let mut deployment_names = BTreeMap::new();
        for (label, vars) in &corpus {
            let dep = api.busybox_deployment(&pool, vars.clone()).await;
            let (_, deployment) = api
                .call(reqwest::Method::GET, &format!("deployments/{dep}"), None)
                .await;
            deployment_names.insert(*label, deployment["name"].as_str().unwrap().to_owned());
            let (status, run) = api
                .call(
                    reqwest::Method::POST,
                    &format!("deployments/{dep}/create_flow_run"),
                    Some(json!({"name": format!("conf {label}"), "job_variables": {}})),
                )
                .await;
            assert_eq!(status, 201, "{run}");
            runs.insert(*label, run);
        }
        let docker = Recorder::unix(
            &dir.path().join(format!("{who}.sock")),
            Endpoint::Unix("/var/run/docker.sock".into()),
        );
        sides.push(Side {
            pool,
            pool_id,
            deployment_names,
            runs,
            docker,
        });
    }
    let _guards: Vec<ContainerGuard> = sides
        .iter()
        .map(|s| ContainerGuard::for_pool(&s.pool))
        .collect();

    let home = dir.path().join("prefect-home");
    std::fs::create_dir_all(&home).unwrap();
    let env = |cmd: &mut Command, socket: &Endpoint| {
        let Endpoint::Unix(path) = socket else {
            unreachable!()
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("PREFECT_HOME", &home)
            .env("PREFECT_API_URL", &api_url)
            // Both clients retry 503s (SQLite busy under a burst of 39 runs); more attempts
            // than the default 5 keep a busy moment from dropping a run from the comparison.
            .env("PREFECT_CLIENT_MAX_RETRIES", "10")
            .env("DOCKER_HOST", format!("unix://{}", path.display()))
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    };
    // The reference first, then ours (one at a time, so container names never collide).
    let mut reference = Command::new(venv().join("bin/prefect"));
    reference.args([
        "worker",
        "start",
        "--pool",
        &sides[0].pool,
        "--type",
        "docker",
        "--run-once",
        "--name",
        WORKER_NAME,
    ]);
    env(&mut reference, &sides[0].docker.listen);
    let out = run_with_timeout(reference, Duration::from_secs(400));
    assert!(out.0, "reference worker failed:\n{}", out.1);
    remove_pool_containers(&sides[0].pool);
    let mut ours = Command::new(env!("CARGO_BIN_EXE_docker-worker"));
    ours.args([
        "start",
        "--pool",
        &sides[1].pool,
        "--run-once",
        "--name",
        WORKER_NAME,
    ]);
    env(&mut ours, &sides[1].docker.listen);
    let ours_out = run_with_timeout(ours, Duration::from_secs(400));
    assert!(ours_out.0, "our worker failed:\n{}", ours_out.1);
    // Batched logs are flushed at exit, and the recorder has every request a worker had an
    // answer to (it records before forwarding): nothing to wait for.

    let records = api_recorder.records();
    let mut differences = Vec::new();
    let mut creates_seen = (0, 0);
    let mut without_create: (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    for (label, _) in &corpus {
        let observed: Vec<Observed> = sides
            .iter()
            .map(|side| {
                let run = &side.runs[label];
                let dep_id = run["deployment_id"].as_str().unwrap_or_default().to_owned();
                let replacements = vec![
                    (
                        side.deployment_names[label].clone(),
                        "<deployment-name>".to_owned(),
                    ),
                    (side.pool_id.clone(), "<pool-id>".to_owned()),
                    (
                        run["id"].as_str().unwrap().to_owned(),
                        "<run-id>".to_owned(),
                    ),
                    (
                        run["flow_id"].as_str().unwrap().to_owned(),
                        "<flow-id>".to_owned(),
                    ),
                    (dep_id, "<deployment-id>".to_owned()),
                    (side.pool.clone(), "<pool>".to_owned()),
                ];
                observe(side, &records, label, &replacements)
            })
            .collect();
        let (r, o) = (&observed[0], &observed[1]);
        // Every configuration is claimed and logged by both workers, and nearly all reach the
        // create call (counted below): an empty recording would make the comparison vacuous.
        creates_seen.0 += r.creates.len();
        creates_seen.1 += o.creates.len();
        if r.creates.is_empty() {
            without_create.0.push(label);
        }
        if o.creates.is_empty() {
            without_create.1.push(label);
        }
        for (who, seen) in [("reference", r), ("ours", o)] {
            assert!(
                !seen.states.is_empty() && !seen.logs.is_empty(),
                "{label}: nothing recorded for {who}: {seen:?}\n{}",
                ours_out.1
            );
        }
        if let Some((_, why)) = KNOWN_DIFFERENCES.iter().find(|(l, _)| l == label) {
            eprintln!("{label}: not compared ({why})");
            continue;
        }
        if r.creates != o.creates {
            differences.push(format!(
                "{label}: containers/create differ\n  reference: {}\n  ours:      {}",
                serde_json::to_string(&r.creates).unwrap(),
                serde_json::to_string(&o.creates).unwrap()
            ));
        }
        if !same_states(&r.states, &o.states) && !exit_code_fix(r, o) {
            differences.push(format!(
                "{label}: state proposals differ\n  reference: {}\n  ours:      {}",
                serde_json::to_string(&r.states).unwrap(),
                serde_json::to_string(&o.states).unwrap()
            ));
        }
        let missing: Vec<&String> = r.logs.iter().filter(|l| !log_sent(l, &o.logs)).collect();
        if !missing.is_empty() {
            differences.push(format!(
                "{label}: reference log lines ours did not send: {missing:?}\n  ours: {:?}",
                o.logs
            ));
        }
    }
    assert!(
        creates_seen.0 >= corpus.len() - NO_CREATE && creates_seen.1 >= corpus.len() - NO_CREATE,
        "too few containers/create requests recorded: {creates_seen:?}; none for {without_create:?}\n{}",
        differences.join("\n")
    );
    for side in &sides {
        let with_proxy = side
            .docker
            .records()
            .iter()
            .filter(|r| r.method == "POST" && r.path().ends_with("/containers/create"))
            .filter(|r| {
                r.json()["Env"].as_array().is_some_and(|e| {
                    e.iter()
                        .any(|v| v == "HTTP_PROXY=http://proxy.conformance:3128")
                })
            })
            .count();
        assert!(
            with_proxy >= corpus.len() - NO_CREATE,
            "{}: only {with_proxy} creates carry the client config's proxies",
            side.pool
        );
    }
    let (reference_logins, reference_pulls) = registry_traffic(&sides[0]);
    let (our_logins, our_pulls) = registry_traffic(&sides[1]);
    // Four registry configurations log in (one has no credentials); four pull (one login fails).
    assert!(
        reference_logins.len() == 4 && reference_pulls.len() == 4,
        "the reference's registry traffic is not what the corpus asks for: {reference_logins:?} {reference_pulls:?}"
    );
    if reference_logins != our_logins {
        differences.push(format!(
            "registry logins (POST /auth bodies) differ\n  reference: {}\n  ours:      {}",
            serde_json::to_string(&reference_logins).unwrap(),
            serde_json::to_string(&our_logins).unwrap()
        ));
    }
    // The worker's own (console) lines around pulls: the reference's, word for word. It
    // prints one login line, four pulls and two IfPossible warnings.
    let console_lines = pull_console_lines(&out.1);
    assert_eq!(
        console_lines.len(),
        7,
        "the reference's console lines around pulls: {console_lines:?}"
    );
    for line in console_lines {
        let (theirs, ours) = (
            out.1.matches(line.as_str()).count(),
            ours_out.1.matches(line.as_str()).count(),
        );
        if ours < theirs {
            differences.push(format!(
                "console line {line:?}: the reference printed it {theirs} times, ours {ours}"
            ));
        }
    }
    if reference_pulls != our_pulls {
        differences.push(format!(
            "pulls (POST /images/create) differ\n  reference: {}\n  ours:      {}",
            serde_json::to_string(&reference_pulls).unwrap(),
            serde_json::to_string(&our_pulls).unwrap()
        ));
    }
    for n in [&network_a, &network_b] {
        let _ = Command::new("docker").args(["network", "rm", n]).output();
    }
    let _ = Command::new("docker")
        .args(["volume", "rm", "dw-conf-vol"])
        .output();
    assert!(
        differences.is_empty(),
        "{} of {} configurations differ:\n{}\n\nour worker's output:\n{}",
        differences.len(),
        corpus.len(),
        differences.join("\n"),
        ours_out.1
    );
    eprintln!("conformance: {} configurations, all equal", corpus.len());
}

/// Configurations where this worker deliberately behaves differently (listed in the README).
const KNOWN_DIFFERENCES: &[(&str, &str)] = &[(
    "kwargs-stop-signal",
    "the reference crashes with TypeError on container_create_kwargs.stop_timeout; this worker passes it to the Engine as StopTimeout",
)];

const SUBMIT_FAILED: &str = "Failed to submit flow run to infrastructure: ";

/// State proposals are equal in type, name and force, and in message — except that a
/// submission failure's message need only carry the Engine's own explanation (the reference
/// prints docker-py's exception with the request URL; this worker names the failing step).
fn same_states(reference: &[Value], ours: &[Value]) -> bool {
    reference.len() == ours.len()
        && reference.iter().zip(ours).all(|(r, o)| {
            let same_kind =
                r["type"] == o["type"] && r["name"] == o["name"] && r["force"] == o["force"];
            let (rm, om) = (r["message"].as_str(), o["message"].as_str());
            // README difference 20: the claim names its worker, so the reconcile pass can
            // tell a claim that never got a container from other workers' claims.
            let claim_named =
                r["name"] == "Pending" && rm.is_none() && om.is_some_and(is_claim_message);
            same_kind
                && (rm == om
                    || claim_named
                    || matches!((rm, om), (Some(rm), Some(om)) if same_submit_failure(rm, om)))
        })
}

/// This worker's claim message: `Claimed by worker '<name>'`.
fn is_claim_message(message: &str) -> bool {
    message.starts_with("Claimed by worker '") && message.ends_with('\'')
}

/// Where the IfPossible message (pull and local lookup both failed) puts the pull's error.
const LOGIN_PULL_ERROR: &str = "\n-> [1. Login/Pull Error]: ";

/// Two submission-failure messages say the same: ours carries the Engine's explanation from the
/// reference's. The IfPossible message must also have the reference's layout — the same header,
/// each of its two errors with its Engine explanation, the same closing note.
fn same_submit_failure(reference: &str, ours: &str) -> bool {
    if !(reference.starts_with(SUBMIT_FAILED) && ours.starts_with(SUBMIT_FAILED)) {
        return false;
    }
    if !reference.contains(LOGIN_PULL_ERROR) {
        return ours.contains(engine_explanation(reference));
    }
    let (r, o): (Vec<&str>, Vec<&str>) = (
        reference.split("\n\n").collect(),
        ours.split("\n\n").collect(),
    );
    let [r_pull, r_local, r_note] = r[..] else {
        return false;
    };
    let [o_pull, o_local, o_note] = o[..] else {
        return false;
    };
    let (Some((r_head, r_pull)), Some((o_head, o_pull))) = (
        r_pull.split_once(LOGIN_PULL_ERROR),
        o_pull.split_once(LOGIN_PULL_ERROR),
    ) else {
        return false;
    };
    // The exception class before the header differs (RuntimeError / PullFailed).
    let head = |m: &str| {
        m.find("Docker operation completely failed for ")
            .map(|at| m[at..].to_owned())
    };
    let local = "-> [2. Local Error]: ";
    head(r_head).is_some()
        && head(r_head) == head(o_head)
        && o_pull.contains(engine_explanation(r_pull))
        && r_local.starts_with(local)
        && o_local.starts_with(local)
        && o_local.contains(engine_explanation(r_local))
        && r_note == o_note
}

/// Difference 1 of the README: the reference sometimes misses a non-zero exit of an
/// auto-removed container (its inspect finds the container gone) and reports nothing, where
/// this worker reports Crashed with the code from the wait. Ours = the reference's + that one,
/// and only where both workers created the container with `AutoRemove`.
fn exit_code_fix(reference: &Observed, ours: &Observed) -> bool {
    let auto_removed = |creates: &[Value]| {
        !creates.is_empty()
            && creates
                .iter()
                .all(|c| c["body"]["HostConfig"]["AutoRemove"] == true)
    };
    if !(auto_removed(&reference.creates) && auto_removed(&ours.creates)) {
        return false;
    }
    let Some((last, earlier)) = ours.states.split_last() else {
        return false;
    };
    let fixed = same_states(&reference.states, earlier)
        && last["type"] == "CRASHED"
        && last["message"]
            .as_str()
            .is_some_and(|m| m.contains("exited with non-zero status code"));
    if fixed {
        eprintln!("the reference missed a non-zero exit this worker reported (difference 1)");
    }
    fixed
}

/// The Engine's message inside a docker-py error: `… ("No such image: x")` → `No such image: x`;
/// otherwise the text after the exception class.
fn engine_explanation(message: &str) -> &str {
    if let Some(start) = message.rfind("(\"")
        && let Some(end) = message.rfind("\")")
        && end > start
    {
        return &message[start + 2..end];
    }
    message
        .trim_start_matches(SUBMIT_FAILED)
        .split_once(": ")
        .map_or(message, |(_, rest)| rest)
}

/// A reference log line was sent by ours too: identically, or — for a line carrying a Python
/// traceback — as a line starting with the same first sentence.
fn log_sent(line: &str, ours: &[String]) -> bool {
    if ours.iter().any(|l| l == line) {
        return true;
    }
    // "Reported flow run '…' as crashed: Failed to submit …": the same report, the message
    // compared as state messages are.
    if let Some(at) = line.find(SUBMIT_FAILED) {
        let (prefix, _) = line.split_at(at + SUBMIT_FAILED.len());
        return ours
            .iter()
            .any(|l| l.starts_with(prefix) && same_submit_failure(&line[at..], &l[at..]));
    }
    match line.split_once("\nTraceback") {
        Some((first, _)) => {
            let first = first.trim_end_matches('.');
            ours.iter().any(|l| l.starts_with(first))
        }
        None => false,
    }
}

/// The distinct messages (first lines) the reference's worker logger printed around logins and
/// pulls: `Logging into Docker registry...`, `Pulling image '…'...`, and the IfPossible warning.
fn pull_console_lines(output: &str) -> Vec<String> {
    let mut lines: Vec<String> = output
        .lines()
        .filter(|l| l.contains("| prefect.workers.docker."))
        .filter_map(|l| l.split_once(" - ").map(|(_, message)| message.to_owned()))
        .filter(|m| {
            m == "Logging into Docker registry..."
                || m.starts_with("Pulling image '")
                || m.starts_with("We could not pull the image '")
        })
        .collect();
    lines.sort();
    lines.dedup();
    lines
}

fn remove_pool_containers(pool: &str) {
    let guard = ContainerGuard::for_pool(pool);
    drop(guard);
}

/// Runs a command to its end (or kills it after `timeout`): success and combined output.
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> (bool, String) {
    let child = cmd.spawn().expect("start worker");
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    if within_blocking(timeout, || waiter.is_finished()).is_err() {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
    }
    let out = waiter.join().unwrap().expect("worker output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The docker-py-derived expectations in `src/job/create_kwargs.rs` (create bodies and
/// docker-py's errors, per `container_create_kwargs`) are what the venv's docker-py and
/// prefect-docker answer today: the script that regenerates them, in its check mode.
#[test]
fn create_kwargs_expectations_are_docker_pys_answers() {
    let out = Command::new(venv().join("bin/python"))
        .arg(repo_path("scripts/docker-py-expectations.py"))
        .output()
        .expect("run scripts/docker-py-expectations.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rows differ from docker-py (refresh with `scripts/docker-py-expectations.py --write`):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("create bodies, "), "{stdout}");
}
