//! Converge: a run's state in Prefect and its container agree, whatever fails. Real server,
//! real Engine, the built binary; each test prints its figure (the README's Reliability
//! table gives them).
//!
//! C1 claims cut short by SIGKILLs · C2 containers removed behind the worker's back · C3 runs
//! set final from outside · C4 `max_runtime` · C5 drain · C6 a registry answering 503 · C7 an
//! API outage.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// The machine, shared by this binary's tests: C4 and C7 print how soon something happened,
/// so they run alone; the others may run beside one another.
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Worker flags that make a reconcile pass come every 5 s, so the tests need not wait 30.
const FAST_PASSES: &[&str] = &["--reconcile-interval", "5s"];

async fn states(api: &Api, run_id: &str) -> Vec<Value> {
    let (status, states) = api
        .call(
            reqwest::Method::GET,
            &format!("flow_run_states/?flow_run_id={run_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{states}");
    states.as_array().cloned().unwrap_or_default()
}

/// The containers carrying the run's label (any state), without removing them (a
/// `ContainerGuard` would, when dropped).
fn containers_of(run_id: &str) -> Vec<String> {
    let out = run_ok(std::process::Command::new("docker").args([
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=io.prefect.flow-run-id={run_id}"),
    ]));
    out.lines().map(str::to_owned).collect()
}

fn start_worker(server: &PrefectServer, pool: &str, name: &str, extra: &[&str]) -> WorkerProcess {
    let mut args = vec!["--pool", pool, "--name", name];
    args.extend_from_slice(FAST_PASSES);
    args.extend_from_slice(extra);
    WorkerProcess::start(server, &args, &[])
}

/// C1: the worker SIGKILLed 6 times during a 30-run claim burst, then one worker runs: every
/// run ends with its true exit code, none is stuck, none got two containers.
#[tokio::test(flavor = "multi_thread")]
async fn c1_claims_cut_short_by_sigkills_all_run_exactly_once() {
    let _machine = MACHINE.read().await;
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("c1");
    let _guard = ContainerGuard::for_pool(&pool);
    let dep = api.busybox_deployment(&pool, json!({})).await;
    let mut runs = Vec::new();
    for code in 1..=30i64 {
        let command = format!("sh -c 'sleep 2; exit {code}'");
        runs.push((
            api.create_flow_run(&dep, json!({"command": command})).await,
            code,
        ));
    }
    let name = unique("c1-worker");
    for kill in 0..6u64 {
        let mut worker = start_worker(server, &pool, &name, &[]);
        worker
            .wait_for_output("started!", Duration::from_secs(60))
            .await;
        // Deliberate: each SIGKILL lands at another point of the claim burst.
        tokio::time::sleep(Duration::from_millis(100 + 150 * kill)).await;
        worker.child.kill().expect("SIGKILL the worker");
        let _ = worker.child.wait();
    }
    let claimed_or_later = {
        let mut n = 0;
        for (id, _) in &runs {
            if run_state(&api.read_flow_run(id).await).0 != "SCHEDULED" {
                n += 1;
            }
        }
        n
    };
    let worker = start_worker(server, &pool, &name, &[]);
    let started = Instant::now();
    let mut rescheduled = 0;
    for (id, code) in &runs {
        let run = api.wait_for_final_state(id, Duration::from_secs(300)).await;
        let message = run["state"]["message"].as_str().unwrap_or_default();
        assert_eq!(
            run["state"]["type"],
            json!("CRASHED"),
            "{run}\n{}",
            worker.output()
        );
        assert!(
            message.contains(&format!("non-zero status code {code}.")),
            "run {id}: {message}\n{}",
            worker.output()
        );
        let history = states(&api, id).await;
        let crashed = history.iter().filter(|s| s["type"] == "CRASHED").count();
        assert_eq!(crashed, 1, "run {id} reported more than once: {history:?}");
        rescheduled += history
            .iter()
            .filter(|s| s["name"] == "Rescheduled")
            .count();
        assert_eq!(
            containers_of(id).len(),
            1,
            "run {id} must have had exactly one container"
        );
    }
    eprintln!(
        "C1 figure: 30/30 runs ended with their true exit code after 6 SIGKILLs during the claim burst ({claimed_or_later} claimed or started before the last kill, {rescheduled} claims rescheduled), 0 stuck, 0 runs with two containers; the last report {:.1} s after the final start",
        started.elapsed().as_secs_f64()
    );
}

/// C2: containers removed while the worker is down are reported at start-up; one removed
/// while the worker watches it is reported at once.
#[tokio::test(flavor = "multi_thread")]
async fn c2_containers_removed_behind_the_workers_back_are_crashed() {
    let _machine = MACHINE.read().await;
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("c2");
    let guard = ContainerGuard::for_pool(&pool);
    let dep = api.busybox_deployment(&pool, json!({})).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(
            api.create_flow_run(&dep, json!({"command": "sleep 300"}))
                .await,
        );
    }
    let name = unique("c2-worker");
    let mut worker = start_worker(server, &pool, &name, &[]);
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    wait_for_pids(&api, &refs, Duration::from_secs(120), &worker).await;
    worker.child.kill().expect("SIGKILL");
    let _ = worker.child.wait();
    for c in guard.containers() {
        run_ok(std::process::Command::new("docker").args(["rm", "-f", &c]));
    }
    let worker = start_worker(server, &pool, &name, &[]);
    let restarted = Instant::now();
    for id in &ids {
        let run = api.wait_for_final_state(id, Duration::from_secs(60)).await;
        let message = run["state"]["message"].as_str().unwrap_or_default();
        assert_eq!(run["state"]["type"], json!("CRASHED"), "{run}");
        assert!(
            message.contains("outside the worker"),
            "{message}\n{}",
            worker.output()
        );
    }
    let at_start = restarted.elapsed();

    // One removed while the worker watches it.
    let id = api
        .create_flow_run(&dep, json!({"command": "sleep 300"}))
        .await;
    wait_for_pids(&api, &[id.as_str()], Duration::from_secs(120), &worker).await;
    let removed = Instant::now();
    for c in guard.running() {
        run_ok(std::process::Command::new("docker").args(["rm", "-f", &c]));
    }
    let run = api.wait_for_final_state(&id, Duration::from_secs(60)).await;
    assert_eq!(run["state"]["type"], json!("CRASHED"), "{run}");
    assert!(
        run["state"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("was removed from Docker host"),
        "{run}"
    );
    eprintln!(
        "C2 figure: 2/2 runs whose containers were removed while the worker was down Crashed {:.1} s after its restart; one removed while watched Crashed {:.1} s after the removal",
        at_start.as_secs_f64(),
        removed.elapsed().as_secs_f64()
    );
}

/// C3: two running runs set Crashed through the API have their containers stopped after the
/// orphan grace; a flow that Completes and exits by itself is never stopped.
#[tokio::test(flavor = "multi_thread")]
async fn c3_containers_of_runs_set_final_from_outside_are_stopped() {
    let _machine = MACHINE.read().await;
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("c3");
    let guard = ContainerGuard::for_pool(&pool);
    let dep = api.busybox_deployment(&pool, json!({})).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(
            api.create_flow_run(&dep, json!({"command": "sleep 600"}))
                .await,
        );
    }
    let flow_dep = api
        .create_deployment(
            &pool,
            "hello",
            "flows.py:hello",
            json!({"image": FLOW_IMAGE, "image_pull_policy": "Never"}),
        )
        .await;
    let flow_run = api.create_flow_run(&flow_dep, json!({})).await;
    let name = unique("c3-worker");
    let worker = start_worker(
        server,
        &pool,
        &name,
        &["--orphan-grace", "10s", "--cancel-grace", "5"],
    );
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    wait_for_pids(&api, &refs, Duration::from_secs(120), &worker).await;
    let crashed_at = Instant::now();
    for id in &ids {
        let (status, body) = api
            .call(
                reqwest::Method::POST,
                &format!("flow_runs/{id}/set_state"),
                Some(json!({"state": {"type": "CRASHED", "name": "Crashed",
                                       "message": "set by an operator"}, "force": true})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let completed = api
        .wait_for_final_state(&flow_run, Duration::from_secs(240))
        .await;
    assert_eq!(
        completed["state"]["type"],
        json!("COMPLETED"),
        "{completed}"
    );
    let stopped = eventually(
        Duration::from_secs(90),
        "both orphaned containers to be stopped",
        async || {
            let running: Vec<String> = guard
                .running()
                .into_iter()
                .filter(|c| {
                    let run = inspect(c)["Config"]["Labels"]["io.prefect.flow-run-id"].clone();
                    ids.iter().any(|id| run == json!(id))
                })
                .collect();
            if running.is_empty() {
                Ok(crashed_at.elapsed())
            } else {
                Err(format!("still running: {running:?}\n{}", worker.output()))
            }
        },
    )
    .await;
    for id in &ids {
        let run = api.read_flow_run(id).await;
        assert_eq!(
            run["state"]["message"],
            json!("set by an operator"),
            "{run}"
        );
        let logs = api
            .wait_for_log(id, "was still running", Duration::from_secs(30))
            .await;
        assert!(!logs.is_empty());
    }
    // The Completed flow's container exited by itself, with 0: it was never stopped.
    let flow_container = containers_of(&flow_run)
        .pop()
        .expect("the flow's container is kept");
    let state = &inspect(&flow_container)["State"];
    assert_eq!(state["ExitCode"], json!(0), "{state}");
    assert!(
        !worker
            .output()
            .contains(&format!("flow run '{flow_run}' was still running")),
        "the completed flow's container must not be stopped"
    );
    eprintln!(
        "C3 figure: 2/2 containers of runs set Crashed through the API stopped {:.1} s after (orphan grace 10 s + stop grace 5 s + pass 5 s); the Completed flow's container exited by itself with 0",
        stopped.as_secs_f64()
    );
}

/// C4: `max_runtime: 5` on `sleep 60`: stopped at 5 s + grace, Crashed saying so.
#[tokio::test(flavor = "multi_thread")]
async fn c4_a_run_past_its_max_runtime_is_stopped_and_crashed() {
    let _machine = MACHINE.write().await;
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("c4");
    let _guard = ContainerGuard::for_pool(&pool);
    let dep = api.busybox_deployment(&pool, json!({})).await;
    let id = api
        .create_flow_run(&dep, json!({"command": "sleep 60", "max_runtime": 5}))
        .await;
    let worker = start_worker(
        server,
        &pool,
        &unique("c4-worker"),
        &["--cancel-grace", "3"],
    );
    let run = api
        .wait_for_final_state(&id, Duration::from_secs(120))
        .await;
    let message = run["state"]["message"].as_str().unwrap_or_default();
    assert_eq!(run["state"]["type"], json!("CRASHED"), "{run}");
    assert!(
        message.starts_with("Flow run exceeded its max_runtime of 5s"),
        "{message}\n{}",
        worker.output()
    );
    let container = containers_of(&id).pop().expect("kept");
    let state = &inspect(&container)["State"];
    let ran = chrono::DateTime::parse_from_rfc3339(state["FinishedAt"].as_str().unwrap()).unwrap()
        - chrono::DateTime::parse_from_rfc3339(state["StartedAt"].as_str().unwrap()).unwrap();
    eprintln!(
        "C4 figure: max_runtime 5 s on sleep 60: the container ran {:.1} s (limit 5 s + grace up to 3 s), exit {}; Crashed with \"{message}\"",
        ran.num_milliseconds() as f64 / 1000.0,
        state["ExitCode"]
    );
}

/// C5: SIGTERM with 3 runs in flight and `--drain-timeout 2m`: no new claim, all 3
/// reported, then exit 0.
#[tokio::test(flavor = "multi_thread")]
async fn c5_drain_reports_the_runs_in_flight_and_claims_nothing_new() {
    let _machine = MACHINE.read().await;
    require_docker();
    let server = server();
    let api = Api::new(server);
    let pool = unique("c5");
    let _guard = ContainerGuard::for_pool(&pool);
    let dep = api.busybox_deployment(&pool, json!({})).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            api.create_flow_run(&dep, json!({"command": "sh -c 'sleep 15; exit 3'"}))
                .await,
        );
    }
    let port = free_port();
    let port_text = port.to_string();
    let name = unique("c5-worker");
    let mut args = vec!["--pool", pool.as_str(), "--name", name.as_str()];
    args.extend_from_slice(FAST_PASSES);
    args.extend_from_slice(&["--drain-timeout", "2m", "--with-healthcheck"]);
    let mut worker = WorkerProcess::start(
        server,
        &args,
        &[
            ("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1"),
            ("PREFECT_WORKER_WEBSERVER_PORT", &port_text),
        ],
    );
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    wait_for_pids(&api, &refs, Duration::from_secs(120), &worker).await;
    worker.signal("TERM");
    let signalled = Instant::now();
    worker
        .wait_for_output("draining", Duration::from_secs(10))
        .await;
    let late = api.create_flow_run(&dep, json!({"command": "true"})).await;
    let health = reqwest::get(format!("http://127.0.0.1:{port}/health"))
        .await
        .expect("/health answers while draining");
    assert_eq!(health.status(), 200, "/health stays 200 while draining");
    let status = worker
        .wait_timeout(Duration::from_secs(150))
        .await
        .expect("the worker exits once the runs are reported");
    assert!(status.success(), "{status:?}\n{}", worker.output());
    for id in &ids {
        let run = api.read_flow_run(id).await;
        assert_eq!(run["state"]["type"], json!("CRASHED"), "{run}");
    }
    let late_run = api.read_flow_run(&late).await;
    assert_eq!(
        run_state(&late_run).0,
        "SCHEDULED",
        "nothing new is claimed while draining"
    );
    eprintln!(
        "C5 figure: SIGTERM with 3 runs in flight and --drain-timeout 2m: 3/3 reported, 0 new claims, exit 0 {:.1} s after the signal",
        signalled.elapsed().as_secs_f64()
    );
}

/// A proxy to a registry that is unavailable (answers every HTTP request with a 503) in its
/// first `outages` bursts of requests, then serves. One pull (with its login) makes a few
/// requests in a burst; a retry comes a second or more later, so a burst is what one attempt
/// sees.
struct FlakyRegistry {
    addr: String,
    /// Bursts refused so far.
    refused: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

/// Requests closer together than this belong to one burst (one pull attempt).
const BURST: Duration = Duration::from_millis(500);

impl FlakyRegistry {
    fn start(target: &str, outages: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let refused = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (target, bursts, stopping) =
            (target.to_owned(), Arc::clone(&refused), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut last_refusal: Option<Instant> = None;
            for client in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut client) = client else { continue };
                let mut head = [0u8; 4];
                let Ok(()) = client.read_exact(&mut head) else {
                    continue;
                };
                let http = head.starts_with(b"GET ")
                    || head.starts_with(b"HEAD")
                    || head.starts_with(b"POST");
                let same_burst = last_refusal.is_some_and(|t| t.elapsed() < BURST);
                let refuse = http && (same_burst || bursts.load(Ordering::SeqCst) < outages);
                if refuse {
                    if !same_burst {
                        bursts.fetch_add(1, Ordering::SeqCst);
                    }
                    last_refusal = Some(Instant::now());
                    let _ = client.write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                let Ok(mut upstream) = TcpStream::connect(&target) else {
                    continue;
                };
                if upstream.write_all(&head).is_err() {
                    continue;
                }
                let (mut c_read, mut u_write) =
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut u_write);
                    let _ = u_write.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut upstream, &mut client);
                    let _ = client.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Self {
            addr,
            refused,
            stop,
        }
    }
}

impl Drop for FlakyRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr);
    }
}

/// C6: a registry that answers 503 twice, then serves: one container, the run Completed, the
/// two failed attempts logged to the run.
#[tokio::test(flavor = "multi_thread")]
async fn c6_a_registry_503_is_retried_and_the_run_completes() {
    let _machine = MACHINE.read().await;
    require_docker();
    let registry = support::services::Registry::start();
    let config = registry.docker_config();
    let pushed = format!("{}/dw/flow:{}", registry.addr, unique("c6"));
    run_ok(std::process::Command::new("docker").args(["tag", FLOW_IMAGE, &pushed]));
    run_ok(
        std::process::Command::new("docker")
            .env("DOCKER_CONFIG", &config)
            .args(["push", &pushed]),
    );
    run_ok(std::process::Command::new("docker").args(["rmi", &pushed]));
    let flaky = FlakyRegistry::start(&registry.addr, 2);
    let image = pushed.replacen(&registry.addr, &flaky.addr, 1);
    let _image_guard = ImageGuard(image.clone());
    let server = server();
    let api = Api::new(server);
    let pool = unique("c6");
    let _guard = ContainerGuard::for_pool(&pool);
    let dep = api
        .create_deployment(
            &pool,
            "hello",
            "flows.py:hello",
            json!({"image": image, "image_pull_policy": "Always",
                   "registry_credentials": {"username": registry.user, "password": registry.password,
                                            "registry_url": flaky.addr, "reauth": true}}),
        )
        .await;
    let id = api.create_flow_run(&dep, json!({})).await;
    let worker = start_worker(server, &pool, &unique("c6-worker"), &[]);
    let run = api
        .wait_for_final_state(&id, Duration::from_secs(300))
        .await;
    assert_eq!(
        run["state"]["type"],
        json!("COMPLETED"),
        "{run}\n{}",
        worker.output()
    );
    assert_eq!(containers_of(&id).len(), 1, "one container");
    let attempts: Vec<String> = api
        .flow_run_logs(&id)
        .await
        .into_iter()
        .filter(|l| l.contains("failed for a transient reason"))
        .collect();
    assert_eq!(
        flaky.refused.load(Ordering::SeqCst),
        2,
        "the registry was unavailable twice"
    );
    assert_eq!(attempts.len(), 2, "{attempts:#?}\n{}", worker.output());
    eprintln!(
        "C6 figure: registry 503 twice then OK: 1 container, run Completed, {} failed attempts logged ({})",
        attempts.len(),
        attempts[0]
    );
}

/// C7: the API down 120 s, then back: a run created after it returns is picked up at once.
#[tokio::test(flavor = "multi_thread")]
async fn c7_runs_created_after_an_api_outage_are_picked_up_at_once() {
    let _machine = MACHINE.write().await;
    require_docker();
    let mut server = PrefectServer::start();
    let api = Api::new(&server);
    let pool = unique("c7");
    let _guard = ContainerGuard::for_pool(&pool);
    let dep = api.busybox_deployment(&pool, json!({})).await;
    let worker = start_worker(&server, &pool, &unique("c7-worker"), &[]);
    worker
        .wait_for_output("started!", Duration::from_secs(60))
        .await;
    server.stop();
    // Deliberate: the outage is what C7 is about; the worker's backoffs grow meanwhile.
    tokio::time::sleep(Duration::from_secs(120)).await;
    server.restart();
    let id = api
        .create_flow_run(&dep, json!({"command": "sh -c 'exit 5'"}))
        .await;
    let created = Instant::now();
    let picked_up = eventually(
        Duration::from_secs(120),
        "the run created after the outage to be claimed",
        async || {
            let run = api.read_flow_run(&id).await;
            if run_state(&run).0 == "SCHEDULED" {
                Err(worker.output())
            } else {
                Ok(created.elapsed())
            }
        },
    )
    .await;
    let run = api
        .wait_for_final_state(&id, Duration::from_secs(120))
        .await;
    assert_eq!(run["state"]["type"], json!("CRASHED"), "{run}");
    eprintln!(
        "C7 figure: API down 120 s then back: a run created after it returned was claimed {:.1} s after its creation (target 5 s; the API is probed every 2 s)",
        picked_up.as_secs_f64()
    );
}
