//! Test support: the real peers. A Prefect server started from the test venv on a free
//! loopback port (one per test binary), the real Docker daemon through the `docker` CLI,
//! and the built `docker-worker` binary. A missing peer fails the test with a message
//! saying what is missing and how to get it; nothing is skipped.
#![allow(dead_code)]

pub mod fleet;
pub mod postgres;
pub mod recorder;
pub mod services;
pub mod wait;

pub use wait::{eventually, eventually_blocking, within, within_blocking};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};

/// Where `scripts/test-env.sh` puts things.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python venv with prefect 3.9.1 and prefect-docker 0.7.4.
pub fn venv() -> PathBuf {
    let venv = std::env::var_os("DW_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".test-env/venv"));
    assert!(
        venv.join("bin/prefect").exists(),
        "the Prefect test venv is missing at {} — run `scripts/test-env.sh` first (or set DW_TEST_VENV)",
        venv.display()
    );
    venv
}

/// Fails loudly unless the Docker daemon answers and the test images exist.
pub fn require_docker() {
    let out = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the Docker daemon does not answer (`docker info` failed: {}) — start it or run `scripts/test-env.sh`",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("the `docker` CLI is not available ({e}) — run `scripts/test-env.sh`"),
    }
    for image in [BUSYBOX, FLOW_IMAGE] {
        let ok = Command::new("docker")
            .args(["image", "inspect", image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "the test image {image} is missing — run `scripts/test-env.sh` to build it"
        );
    }
}

/// Static busybox image, built FROM scratch by the test-env script.
pub const BUSYBOX: &str = "local/busybox:dw";
/// Prefect 3.9.1 runtime image with tests/flows baked in at /opt/flows.
pub const FLOW_IMAGE: &str = "local/prefect-flow:3.9.1";

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// A unique, readable name for pools, deployments and containers of one test.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A Prefect server process, stopped when the test process exits (a watchdog shell ends it
/// when its parent is gone, so even a panicking test leaves nothing behind).
pub struct PrefectServer {
    pub port: u16,
    pub api_url: String,
    home: PathBuf,
    log: PathBuf,
    child: Child,
    /// Extra server settings (environment), kept for restarts.
    env: Vec<(String, String)>,
    /// `sqlite` or `postgres`: the database behind it.
    pub database: &'static str,
}

fn http_get_status(addr: &str, path: &str) -> Option<u16> {
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).ok()?;
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace().nth(1)?.parse().ok()
}

impl PrefectServer {
    fn spawn(home: &Path, port: u16, log: &Path, env: &[(String, String)]) -> Child {
        let venv = env
            .iter()
            .find(|(k, _)| k == VENV_OVERRIDE)
            .map_or_else(venv, |(_, v)| PathBuf::from(v));
        let host = env
            .iter()
            .find(|(k, _)| k == HOST_OVERRIDE)
            .map_or("127.0.0.1", |(_, v)| v.as_str());
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("server log");
        let script = r#"parent=$1; shift; "$@" & child=$!; trap 'kill $child 2>/dev/null; exit 0' TERM INT
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 1; done
kill "$child" 2>/dev/null; sleep 2; kill -9 "$child" 2>/dev/null; wait"#;
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(std::process::id().to_string())
            .arg(venv.join("bin/prefect"))
            .args([
                "server",
                "start",
                "--host",
                host,
                "--port",
                &port.to_string(),
            ])
            .env("PREFECT_HOME", home)
            .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            .env("PREFECT_UI_ENABLED", "false")
            .env("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
            .env_remove("PREFECT_API_URL")
            .envs(
                env.iter()
                    .filter(|(k, _)| k != VENV_OVERRIDE && k != HOST_OVERRIDE)
                    .map(|(k, v)| (k, v)),
            )
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("start `prefect server start`")
    }

    fn wait_healthy(&mut self) {
        eventually_blocking(
            Duration::from_secs(180),
            "the Prefect server to answer /api/health",
            || {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!(
                        "the Prefect server exited ({status}) before it was ready:\n{}",
                        self.log_tail()
                    );
                }
                match http_get_status(&self.addr(), "/api/health") {
                    Some(200) => Ok(()),
                    status => Err(format!(
                        "status {status:?}; server log:\n{}",
                        self.log_tail()
                    )),
                }
            },
        );
    }

    /// A server of the caller's own (stopped when dropped), for tests that stop and restart it.
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    /// Like [`Self::start`], with extra server settings (`PREFECT_SERVER_…` variables). On
    /// PostgreSQL when `DW_TEST_DB=postgres` (see [`postgres::use_postgres`]), except for
    /// another venv's server.
    pub fn start_with_env(env: &[(&str, &str)]) -> Self {
        let other_venv = env.iter().any(|(k, _)| *k == VENV_OVERRIDE);
        Self::start_on(postgres::use_postgres() && !other_venv, env)
    }

    /// A server of the caller's own on a new database of this binary's PostgreSQL cluster,
    /// whatever `DW_TEST_DB` says.
    pub fn start_on_postgres(env: &[(&str, &str)]) -> Self {
        Self::start_on(true, env)
    }

    fn start_on(on_postgres: bool, env: &[(&str, &str)]) -> Self {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if on_postgres {
            env.push((
                "PREFECT_API_DATABASE_CONNECTION_URL".to_owned(),
                postgres::cluster().create_database(),
            ));
        }
        let port = free_port();
        let home = std::env::temp_dir().join(unique("dw-prefect-home"));
        std::fs::create_dir_all(&home).expect("temp PREFECT_HOME");
        let log = home.join("server.log");
        let child = Self::spawn(&home, port, &log, &env);
        let host = env
            .iter()
            .find(|(k, _)| k == HOST_OVERRIDE)
            .map_or("127.0.0.1", |(_, v)| v.as_str());
        let mut server = Self {
            port,
            api_url: format!("http://{host}:{port}/api"),
            home,
            log,
            child,
            database: if on_postgres { "postgres" } else { "sqlite" },
            env,
        };
        server.wait_healthy();
        eprintln!(
            "[support] Prefect server at {} on {}",
            server.api_url, server.database
        );
        server
    }

    /// A Prefect 2.x server (`.test-env/venv-prefect2`, made by `scripts/test-env.sh`).
    pub fn start_prefect2() -> Self {
        let venv2 = venv()
            .parent()
            .map(|d| d.join("venv-prefect2"))
            .expect("venv dir");
        assert!(
            venv2.join("bin/prefect").exists(),
            "the Prefect 2.x test venv is missing at {} — run `scripts/test-env.sh` first",
            venv2.display()
        );
        Self::start_with_env(&[(VENV_OVERRIDE, venv2.to_str().expect("utf-8 path"))])
    }

    /// Stops the server process (its database stays).
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        // The process is gone; give a lingering listener (its workers) a moment to close.
        let _ = within_blocking(Duration::from_secs(30), || {
            http_get_status(&self.addr(), "/api/health").is_none()
        });
    }

    /// Starts it again on the same port and database.
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.home, self.port, &self.log, &self.env);
        self.wait_healthy();
    }

    /// `host:port` it listens on.
    pub fn addr(&self) -> String {
        let host = self
            .env
            .iter()
            .find(|(k, _)| k == HOST_OVERRIDE)
            .map_or("127.0.0.1", |(_, v)| v.as_str());
        format!("{host}:{}", self.port)
    }

    /// The last lines the server printed.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for PrefectServer {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Pseudo-setting naming another venv's `prefect` to start (not passed to the server).
const VENV_OVERRIDE: &str = "DW_TEST_SERVER_VENV";
/// Pseudo-setting naming the address the server listens on instead of 127.0.0.1 (a bridge's,
/// for workers in other network namespaces); not passed to the server.
pub const HOST_OVERRIDE: &str = "DW_TEST_SERVER_HOST";

/// The one server of this test binary, started on first use.
pub fn server() -> &'static PrefectServer {
    static SERVER: OnceLock<PrefectServer> = OnceLock::new();
    // Never dropped: the watchdog shell ends it when the test process exits.
    SERVER.get_or_init(PrefectServer::start)
}

async fn tracing_free_sleep(attempt: u64, error: &reqwest::Error) {
    eprintln!("test API helper: retrying after {error}");
    tokio::time::sleep(Duration::from_millis((250 * attempt).min(3000))).await;
}

/// A tiny blocking-free REST helper for setting up pools, deployments and runs in tests.
pub struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(server: &PrefectServer) -> Self {
        Self {
            base: server.api_url.clone(),
            http: reqwest::Client::new(),
        }
    }

    /// One request; 502/503 (SQLite busy on a loaded machine) are retried like Prefect's client does.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut attempt = 0;
        loop {
            let mut req = self
                .http
                .request(method.clone(), format!("{}/{}", self.base, path));
            if let Some(body) = &body {
                req = req.json(body);
            }
            let resp = match req.send().await {
                Ok(resp) => resp,
                // A loaded server sometimes drops a kept-alive connection: try again.
                Err(e) if attempt < 20 => {
                    attempt += 1;
                    tracing_free_sleep(attempt, &e).await;
                    continue;
                }
                Err(e) => panic!("{method} {path}: {e}"),
            };
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            if matches!(status, 502 | 503) && attempt < 20 {
                attempt += 1;
                // A backoff before retrying, not a wait for something to happen.
                tokio::time::sleep(Duration::from_millis((250 * attempt).min(3000))).await;
                continue;
            }
            return (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            );
        }
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.call(method.clone(), path, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path} → {status}: {value}"
        );
        value
    }

    pub async fn create_flow(&self, name: &str) -> String {
        let flow = self
            .ok(reqwest::Method::POST, "flows/", Some(json!({"name": name})))
            .await;
        flow["id"].as_str().expect("flow id").to_owned()
    }

    /// Creates a docker pool with no template (as `prefect work-pool create` without one
    /// would; the worker fills in its default). An existing pool is fine.
    pub async fn ensure_pool(&self, pool: &str) {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "work_pools/",
                Some(json!({"name": pool, "type": "docker"})),
            )
            .await;
        assert!(
            status == 201 || status == 409,
            "create pool {pool}: {status} {body}"
        );
    }

    /// Waits until `pool` exists with a base job template (for example once a worker created it).
    pub async fn wait_for_pool(&self, pool: &str, timeout: Duration) -> Value {
        eventually(
            timeout,
            format!("pool {pool} with a base job template"),
            async || {
                let (status, body) = self.read_work_pool(pool).await;
                let templated = body["base_job_template"]
                    .as_object()
                    .is_some_and(|t| !t.is_empty());
                if status == 200 && templated {
                    Ok(body)
                } else {
                    Err(format!("{status} {body}"))
                }
            },
        )
        .await
    }

    /// A deployment of a flow baked into the test image (`/opt/flows/flows.py:<function>`).
    pub async fn create_deployment(
        &self,
        pool: &str,
        flow: &str,
        entrypoint: &str,
        job_variables: Value,
    ) -> String {
        self.ensure_pool(pool).await;
        let flow_id = self.create_flow(flow).await;
        let body = json!({
            "flow_id": flow_id,
            "name": unique("dep"),
            "work_pool_name": pool,
            "entrypoint": entrypoint,
            "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/flows"}}],
            "job_variables": job_variables,
        });
        let dep = self
            .ok(reqwest::Method::POST, "deployments/", Some(body))
            .await;
        dep["id"].as_str().expect("deployment id").to_owned()
    }

    /// A deployment running `job_variables` on the busybox image (the `exit_code` flow's
    /// entrypoint; these runs never start the Prefect engine, so the container's exit decides).
    pub async fn busybox_deployment(&self, pool: &str, mut job_variables: Value) -> String {
        if let Some(vars) = job_variables.as_object_mut() {
            vars.entry("image").or_insert_with(|| json!(BUSYBOX));
        }
        self.create_deployment(pool, "exit-code", "flows.py:exit_code", job_variables)
            .await
    }

    pub async fn create_flow_run(&self, deployment_id: &str, job_variables: Value) -> String {
        let run = self
            .ok(
                reqwest::Method::POST,
                &format!("deployments/{deployment_id}/create_flow_run"),
                Some(json!({"job_variables": job_variables})),
            )
            .await;
        run["id"].as_str().expect("flow run id").to_owned()
    }

    pub async fn read_flow_run(&self, id: &str) -> Value {
        self.ok(reqwest::Method::GET, &format!("flow_runs/{id}"), None)
            .await
    }

    pub async fn read_work_pool(&self, name: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, &format!("work_pools/{name}"), None)
            .await
    }

    pub async fn flow_run_logs(&self, id: &str) -> Vec<String> {
        let body =
            json!({"logs": {"flow_run_id": {"any_": [id]}}, "sort": "TIMESTAMP_ASC", "limit": 200});
        let logs = self
            .ok(reqwest::Method::POST, "logs/filter", Some(body))
            .await;
        logs.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["message"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Events matching a Prefect event `filter` (`POST /events/filter`), up to `limit`.
    pub async fn events(&self, filter: Value, limit: usize) -> Vec<Value> {
        let body = json!({"filter": filter, "limit": limit});
        let (status, page) = self
            .call(reqwest::Method::POST, "events/filter", Some(body))
            .await;
        assert_eq!(status, 200, "{page}");
        page["events"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until a flow-run log line contains `needle` (logs arrive in batches) and returns
    /// all of the run's log lines; panics, showing the lines there were, if none does within
    /// `timeout`.
    pub async fn wait_for_log(&self, run_id: &str, needle: &str, timeout: Duration) -> Vec<String> {
        eventually(
            timeout,
            format!("a log line of flow run {run_id} containing {needle:?}"),
            async || {
                let logs = self.flow_run_logs(run_id).await;
                if logs.iter().any(|l| l.contains(needle)) {
                    Ok(logs)
                } else {
                    Err(format!("{logs:#?}"))
                }
            },
        )
        .await
    }

    /// Waits until the run's state is final, returning the run; after `timeout`, returns the
    /// run as it is (the callers' assertions on its state say what they expected, with their
    /// worker's output).
    pub async fn wait_for_final_state(&self, id: &str, timeout: Duration) -> Value {
        let last = within(timeout, async || {
            let run = self.read_flow_run(id).await;
            let state = run["state"]["type"].as_str().unwrap_or_default();
            if matches!(state, "COMPLETED" | "FAILED" | "CRASHED" | "CANCELLED") {
                Ok(run)
            } else {
                Err(run)
            }
        })
        .await;
        last.unwrap_or_else(|run| run)
    }
}

/// The built worker binary running against a server; killed when dropped.
pub struct WorkerProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    pub fn start(server: &PrefectServer, args: &[&str], extra_env: &[(&str, &str)]) -> Self {
        Self::start_at(&server.api_url, args, extra_env)
    }

    /// [`WorkerProcess::start`] against any API URL (an in-process stub).
    pub fn start_at(api_url: &str, args: &[&str], extra_env: &[(&str, &str)]) -> Self {
        let cmd = Command::new(env!("CARGO_BIN_EXE_docker-worker"));
        Self::start_wrapped(cmd, api_url, args, extra_env)
    }

    /// [`WorkerProcess::start_at`] with the binary run by `wrapper` (a command that execs its
    /// last arguments, such as `nsenter --net=…`); the binary's path is appended to it, unless
    /// `wrapper` already is the binary.
    pub fn start_wrapped(
        mut cmd: Command,
        api_url: &str,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Self {
        let bin = env!("CARGO_BIN_EXE_docker-worker");
        if cmd.get_program() != bin {
            cmd.arg(bin);
        }
        let log = std::env::temp_dir().join(format!("{}.log", unique("dw-worker")));
        let file = std::fs::File::create(&log).expect("worker log");
        cmd.arg("start")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("PREFECT_API_URL", api_url)
            .env("PREFECT_WORKER_QUERY_SECONDS", "1")
            .env("PREFECT_WORKER_HEARTBEAT_SECONDS", "5")
            .env("RUST_LOG", "info,docker_worker=debug")
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start the docker-worker binary");
        Self { child, log }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the worker's output contains `needle`; panics with the output if it does not
    /// within `timeout`.
    pub async fn wait_for_output(&self, needle: &str, timeout: Duration) {
        eventually(
            timeout,
            format!("the worker to print {needle:?}"),
            async || {
                let out = self.output();
                if out.contains(needle) {
                    Ok(())
                } else {
                    Err(out)
                }
            },
        )
        .await;
    }

    /// Sends a signal by name (`TERM`, `INT`) to this process only.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "could not send SIG{name} to the worker");
    }

    /// Waits for exit up to `timeout`; `None` if still running.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        within(timeout, async || self.child.try_wait().ok().flatten())
            .await
            .ok()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes every container carrying `label=value` when dropped (even when the test panicked).
pub struct ContainerGuard {
    pub filter: String,
}

impl ContainerGuard {
    pub fn for_pool(pool: &str) -> Self {
        Self {
            filter: format!("label=io.prefect.work-pool-name={pool}"),
        }
    }

    pub fn for_label(label: &str, value: &str) -> Self {
        Self {
            filter: format!("label={label}={value}"),
        }
    }

    /// Ids of the matching containers (running or not).
    pub fn containers(&self) -> Vec<String> {
        docker_ids(&["ps", "-aq", "--no-trunc", "--filter", &self.filter])
    }

    /// Ids of the matching running containers.
    pub fn running(&self) -> Vec<String> {
        docker_ids(&["ps", "-q", "--no-trunc", "--filter", &self.filter])
    }
}

fn docker_ids(args: &[&str]) -> Vec<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let ids = self.containers();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .arg("rm")
                .arg("-f")
                .args(&ids)
                .output();
        }
    }
}

/// `docker inspect` of one container as JSON.
pub fn inspect(id: &str) -> Value {
    let out = Command::new("docker")
        .args(["inspect", id])
        .output()
        .expect("docker inspect");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.get(0).cloned().unwrap_or(Value::Null)
}

/// A flow run's state type and message.
pub fn run_state(run: &Value) -> (&str, &str) {
    (
        run["state"]["type"].as_str().unwrap_or_default(),
        run["state"]["message"].as_str().unwrap_or_default(),
    )
}

/// Waits until every run has its `infrastructure_pid` (its container is started and recorded).
pub async fn wait_for_pids(api: &Api, ids: &[&str], timeout: Duration, worker: &WorkerProcess) {
    let mut pending = ids.to_vec();
    eventually(
        timeout,
        format!("the infrastructure_pid of runs {ids:?}"),
        async || {
            let mut still = Vec::new();
            for id in pending.iter().copied() {
                if api.read_flow_run(id).await["infrastructure_pid"].is_null() {
                    still.push(id);
                }
            }
            pending = still;
            if pending.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "no pid for {pending:?}; worker:\n{}",
                    worker.output()
                ))
            }
        },
    )
    .await;
}

/// The label every container made by the runtime-level tests carries.
pub const TEST_LABEL: &str = "dev.docker-worker.test";

/// A container spec for runtime-level tests: `sh -c command` in `image`, named and labelled
/// `name` (so a [`ContainerGuard::for_label`] on [`TEST_LABEL`] removes it).
pub fn test_spec(image: &str, name: &str, command: &str) -> docker_worker::job::ContainerSpec {
    docker_worker::job::ContainerSpec {
        image: image.into(),
        pull_policy: docker_worker::job::PullPolicy::IfNotPresent,
        registry_credentials: None,
        name: Some(name.to_owned()),
        command: vec!["sh".into(), "-c".into(), command.into()],
        env: vec![],
        labels: std::collections::BTreeMap::from([(TEST_LABEL.to_owned(), name.to_owned())]),
        network_mode: "default".into(),
        extra_networks: vec![],
        binds: vec![],
        volume_paths: vec![],
        mem_limit: None,
        memswap_limit: None,
        privileged: false,
        auto_remove: false,
        stream_output: true,
        extra_hosts: None,
        config_overrides: serde_json::Map::new(),
        host_config_overrides: serde_json::Map::new(),
        exclusive_label: None,
        platform: None,
        max_runtime: None,
        create_kwargs_keys: vec![],
    }
}

/// Removes a local image tag when dropped.
pub struct ImageGuard(pub String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

/// Runs a command and returns its stdout, failing the test on error.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A path inside the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    repo_root().join(Path::new(rel))
}

/// The `/metrics` page of the worker's health listener on 127.0.0.1:`port`.
pub async fn scrape_metrics(port: &str) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

/// A Prometheus sample `name{pool="…"}` (or any other label set given whole) in a scrape.
pub fn metric_sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
