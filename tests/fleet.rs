//! A fleet: three Docker hosts (each a network namespace with its own dockerd and one worker of
//! the built binary) on a bridge the test makes, one PostgreSQL-backed Prefect server listening
//! on the bridge. Runs are busybox containers on the host's network that report Running and
//! Completed to the API themselves with `wget` (standing in for the Prefect engine), or exit
//! with a code of their own, so every final state is the truth of one container.
//!
//! F1 spreads 600 runs over three hosts; F2 loses a host and boots it 60 s later; F3 cuts a
//! host off the server for 90 s; F4 restarts every worker in turn (drained) while 300 runs
//! flow; F5 loses a host for good. Each prints its figure (`cargo test --test fleet --
//! --nocapture`).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::fleet::{Host, Network};
use support::*;

/// The network and the server every test of this binary shares (each test its own hosts and
/// pool). Never dropped: the watchdogs tear both down when the test process exits.
struct Shared {
    network: Network,
    server: PrefectServer,
}

fn shared() -> &'static Shared {
    static SHARED: std::sync::OnceLock<Shared> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| {
        require_docker();
        let network = Network::start();
        // Five tests' fleets at once exhaust the default pool of 5 + 10 connections (requests
        // then wait 30 s and fail with 500); a fleet's server gets a bigger one.
        let server = PrefectServer::start_on_postgres(&[
            (HOST_OVERRIDE, &network.gateway),
            ("PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE", "20"),
            ("PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW", "20"),
        ]);
        Shared { network, server }
    })
}

/// F1 and F4 push hundreds of runs: one at a time, so each measures itself, not the other.
/// The others mostly wait on sleeping containers and run beside them.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A shell function for the container's script: propose a state to the API (retried, as the
/// engine would). No single quotes: the command is split like a shell line.
const PROPOSE: &str = r#"st() { for i in 1 2 3 4 5 6 7 8 9 10; do wget -q -O /dev/null --header "Content-Type: application/json" --post-data "{\"state\":{\"type\":\"$1\",\"name\":\"$2\"}}" "$PREFECT_API_URL/flow_runs/$PREFECT__FLOW_RUN_ID/set_state" && return 0; sleep 1; done; return 1; }"#;

/// A deployment of busybox running `script` (after [`PROPOSE`]) on the host's network.
async fn deployment(api: &Api, pool: &str, script: &str) -> String {
    api.busybox_deployment(
        pool,
        json!({
            "command": format!("sh -c '{PROPOSE}; {script}'"),
            "image_pull_policy": "Never",
            "network_mode": "host",
        }),
    )
    .await
}

/// `count` runs of `deployment`, created ten at a time; `vars(i)` gives each its job variables.
async fn create_runs(
    api: &Api,
    deployment: &str,
    count: usize,
    vars: impl Fn(usize) -> Value,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    let mut i = 0;
    while i < count {
        let n = 10.min(count - i);
        let batch = futures_util::future::join_all(
            (i..i + n).map(|k| api.create_flow_run(deployment, vars(k))),
        )
        .await;
        ids.extend(batch);
        i += n;
    }
    ids
}

/// Three hosts of the shared network, each running a worker for `pool` with `args`, once every
/// worker said it started.
async fn fleet(pool: &str, args: &[&str]) -> Vec<Host> {
    let shared = shared();
    let mut hosts = Vec::new();
    for i in 1..=3 {
        let mut host = shared.network.host(&format!("host-{i}"));
        let mut all = vec!["--pool", pool];
        all.extend_from_slice(args);
        host.start_worker(&shared.server.api_url, &all, &[]);
        hosts.push(host);
    }
    for host in &hosts {
        wait_started(host).await;
    }
    hosts
}

/// Waits until the host's current worker says it started.
async fn wait_started(host: &Host) {
    let worker = host.worker.as_ref().expect("a worker");
    worker
        .wait_for_output(
            &format!("Worker '{}' started!", host.label),
            Duration::from_secs(60),
        )
        .await;
}

fn tails(hosts: &[Host]) -> String {
    hosts
        .iter()
        .map(|h| h.worker_tail(40))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The states of many runs, read with one filter call per 200.
async fn states(api: &Api, ids: &[String]) -> HashMap<String, (String, String)> {
    let mut out = HashMap::new();
    for chunk in ids.chunks(200) {
        let (status, runs) = api
            .call(
                reqwest::Method::POST,
                "flow_runs/filter",
                Some(json!({"flow_runs": {"id": {"any_": chunk}}, "limit": 200})),
            )
            .await;
        assert_eq!(status, 200, "{runs}");
        for run in runs.as_array().into_iter().flatten() {
            let (kind, message) = run_state(run);
            out.insert(
                run["id"].as_str().unwrap_or_default().to_owned(),
                (kind.to_owned(), message.to_owned()),
            );
        }
    }
    out
}

fn is_final(kind: &str) -> bool {
    matches!(kind, "COMPLETED" | "FAILED" | "CRASHED" | "CANCELLED")
}

/// Waits until every run in `ids` is final; returns their states.
async fn all_final(
    api: &Api,
    ids: &[String],
    timeout: Duration,
    hosts: &[Host],
) -> HashMap<String, (String, String)> {
    eventually(
        timeout,
        format!("{} runs to be final", ids.len()),
        async || {
            let states = states(api, ids).await;
            let open: Vec<_> = ids
                .iter()
                .filter(|id| !states.get(*id).is_some_and(|(k, _)| is_final(k)))
                .collect();
            if open.is_empty() {
                Ok(states)
            } else {
                let sample: Vec<_> = open
                    .iter()
                    .take(5)
                    .map(|id| (id, states.get(*id)))
                    .collect();
                Err(format!(
                    "{} not final, e.g. {sample:?}\n{}",
                    open.len(),
                    tails(hosts)
                ))
            }
        },
    )
    .await
}

/// Every container of `pool` on every host, by flow run; the hosts' labels by flow run.
fn containers_by_run(hosts: &[Host], pool: &str) -> BTreeMap<String, Vec<String>> {
    let mut by_run: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for host in hosts {
        for c in host.containers(pool) {
            by_run.entry(c.run_id).or_default().push(host.label.clone());
        }
    }
    by_run
}

/// Asserts each run of `ids` has exactly one container across the fleet and no container
/// belongs to another run; returns the runs per host.
fn one_container_each(hosts: &[Host], pool: &str, ids: &[String]) -> BTreeMap<String, usize> {
    let by_run = containers_by_run(hosts, pool);
    let twice: Vec<_> = by_run.iter().filter(|(_, h)| h.len() != 1).collect();
    assert!(
        twice.is_empty(),
        "runs with more than one container: {twice:?}"
    );
    let missing: Vec<_> = ids.iter().filter(|id| !by_run.contains_key(*id)).collect();
    assert!(missing.is_empty(), "runs without a container: {missing:?}");
    assert_eq!(
        by_run.len(),
        ids.len(),
        "containers of runs not created here"
    );
    let mut shares = BTreeMap::new();
    for labels in by_run.values() {
        *shares.entry(labels[0].clone()).or_insert(0) += 1;
    }
    shares
}

/// The final states a run went through, as (type, message), oldest first.
async fn final_states(api: &Api, run_id: &str) -> Vec<(String, String)> {
    let (status, states) = api
        .call(
            reqwest::Method::GET,
            &format!("flow_run_states/?flow_run_id={run_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{states}");
    states
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["type"].as_str().is_some_and(is_final))
        .map(|s| {
            (
                s["type"].as_str().unwrap_or_default().to_owned(),
                s["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Asserts no run was reported final twice. A final state put back by a worker after a late
/// claim displaced it (`[restored by worker …]`, see the README's Reliability) is not a report;
/// returns how many there were.
async fn reported_once(api: &Api, ids: &[String]) -> usize {
    let mut restored = 0;
    for id in ids {
        let finals = final_states(api, id).await;
        let (put_back, reports): (Vec<_>, Vec<_>) = finals
            .iter()
            .partition(|(_, m)| m.contains("[restored by worker"));
        restored += put_back.len();
        assert_eq!(reports.len(), 1, "run {id} went final {finals:?}");
    }
    restored
}

/// F1: 600 short runs on one pool served by three hosts: each executed exactly once (one
/// container in the whole fleet), each Completed.
#[tokio::test(flavor = "multi_thread")]
async fn f1_six_hundred_runs_on_three_hosts_each_once() {
    let _heavy = HEAVY.lock().await;
    let shared = shared();
    let api = Api::new(&shared.server);
    let pool = unique("f1");
    let dep = deployment(&api, &pool, "st RUNNING Running && st COMPLETED Completed").await;
    let hosts = fleet(&pool, &[]).await;
    let started = Instant::now();
    let ids = create_runs(&api, &dep, 600, |_| json!({})).await;
    let created = started.elapsed();
    let states = all_final(&api, &ids, Duration::from_secs(900), &hosts).await;
    let elapsed = started.elapsed();
    let not_completed: Vec<_> = states
        .iter()
        .filter(|(_, (k, _))| k != "COMPLETED")
        .collect();
    assert!(
        not_completed.is_empty(),
        "runs not Completed: {not_completed:?}\n{}",
        tails(&hosts)
    );
    let shares = one_container_each(&hosts, &pool, &ids);
    let restored = reported_once(&api, &ids).await;
    eprintln!(
        "F1 figure: 600/600 Completed, each with one container in the fleet and reported once ({restored} restored states, not reports), in {:.1} s (runs created over {:.1} s); shares per host: {shares:?}",
        elapsed.as_secs_f64(),
        created.as_secs_f64()
    );
}

/// Runs of `ids` whose container is on `host`.
fn runs_on(host: &Host, pool: &str, ids: &[String]) -> Vec<String> {
    let on: std::collections::HashSet<String> = host
        .containers(pool)
        .into_iter()
        .map(|c| c.run_id)
        .collect();
    ids.iter().filter(|id| on.contains(*id)).cloned().collect()
}

/// Running containers of `pool` on `host`.
fn running_on(host: &Host, pool: &str) -> usize {
    host.containers(pool)
        .iter()
        .filter(|c| c.state == "running")
        .count()
}

/// Creates `first` runs of `deployment`, then six more at a time while `host` runs fewer than
/// `want` of the pool's containers (three workers compete for every run, so one host may get
/// few of a batch); returns every run created. `vars(i)` gives the i-th run its job variables.
async fn runs_until_host_busy(
    api: &Api,
    deployment: &str,
    first: usize,
    host: &Host,
    pool: &str,
    want: usize,
    vars: impl Fn(usize) -> Value,
) -> Vec<String> {
    let mut ids = create_runs(api, deployment, first, &vars).await;
    loop {
        if within(Duration::from_secs(10), async || {
            running_on(host, pool) >= want
        })
        .await
        .is_ok()
        {
            return ids;
        }
        assert!(
            ids.len() < 120,
            "{} ran fewer than {want} containers of {} runs:\n{}",
            host.label,
            ids.len(),
            host.worker_tail(40)
        );
        let base = ids.len();
        ids.extend(create_runs(api, deployment, 6, |k| vars(base + k)).await);
    }
}

/// F2: a host lost (dockerd, containerd, containers and worker SIGKILLed at once) while its
/// runs sleep, booted again 60 s later: every run it had ends in a final state with what its
/// container really did (killed: 255), the runs it had only claimed run elsewhere, and the other
/// hosts complete their runs — and new ones — while it is down.
#[tokio::test(flavor = "multi_thread")]
async fn f2_lost_host_comes_back_60_s_later() {
    let shared = shared();
    let api = Api::new(&shared.server);
    let pool = unique("f2");
    let dep = deployment(
        &api,
        &pool,
        "st RUNNING Running && sleep 30 && st COMPLETED Completed",
    )
    .await;
    let mut hosts = fleet(&pool, &[]).await;
    let first = runs_until_host_busy(&api, &dep, 30, &hosts[2], &pool, 3, |_| json!({})).await;
    hosts[2].lose();
    let lost_at = Instant::now();

    // While it is down, the others finish theirs and take new runs.
    let second = create_runs(&api, &dep, 10, |_| json!({})).await;
    let elsewhere: Vec<String> = runs_on(&hosts[0], &pool, &first)
        .into_iter()
        .chain(runs_on(&hosts[1], &pool, &first))
        .chain(second.iter().cloned())
        .collect();
    let during = all_final(&api, &elsewhere, Duration::from_secs(240), &hosts[..2]).await;
    assert!(
        during.values().all(|(k, _)| k == "COMPLETED"),
        "the other hosts' runs: {during:?}"
    );
    let elsewhere_done = lost_at.elapsed();
    // Deliberately down for 60 s in all (the outage is what is tested), not a wait.
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(lost_at.elapsed())).await;

    hosts[2].boot();
    let booted = Instant::now();
    // What the reboot left: the containers that were running (killed), and any created but
    // never started.
    let left = hosts[2].containers(&pool);
    let lost: Vec<String> = left
        .iter()
        .filter(|c| c.state == "exited")
        .map(|c| c.run_id.clone())
        .collect();
    let never_started = left.iter().filter(|c| c.state == "created").count();
    assert!(lost.len() >= 3, "host-3 came back with {left:?}");
    let lost_states = states(&api, &lost).await;
    assert!(
        lost_states.values().all(|(k, _)| !is_final(k)),
        "a run of the lost host went final while nobody could see it: {lost_states:?}"
    );
    hosts[2].start_worker(&shared.server.api_url, &["--pool", &pool], &[]);
    wait_started(&hosts[2]).await;
    all_final(&api, &lost, Duration::from_secs(300), &hosts).await;
    let back = booted.elapsed();
    let all: Vec<String> = first.iter().chain(second.iter()).cloned().collect();
    let states = all_final(&api, &all, Duration::from_secs(300), &hosts).await;
    let all_back = booted.elapsed();
    let rescheduled = hosts[2].worker_output().matches("as rescheduled").count();
    for id in &all {
        let (kind, message) = &states[id];
        if lost.contains(id) {
            assert!(
                kind == "CRASHED" && message.contains("non-zero status code 255"),
                "run {id} of the lost host: {kind} {message}\n{}",
                tails(&hosts)
            );
        } else {
            assert_eq!(kind, "COMPLETED", "run {id}: {message}\n{}", tails(&hosts));
        }
    }
    let shares = one_container_each(&hosts, &pool, &all);
    let restored = reported_once(&api, &all).await;
    eprintln!(
        "F2 figure ({restored} restored states, not reports): host-3 lost with {} runs in containers ({never_started} created, not started): all Crashed (exit 255) {:.1} s after it booted; {rescheduled} runs it had claimed without a container were rescheduled by its own worker at boot and ran elsewhere or there; all {} final {:.1} s after the boot; the other {} runs (10 created after the loss) Completed on host-1/host-2 {:.1} s after the loss, while it was down; one container each: {shares:?}; example: {}",
        lost.len(),
        back.as_secs_f64(),
        all.len(),
        all_back.as_secs_f64(),
        elsewhere.len(),
        elsewhere_done.as_secs_f64(),
        lost.first().map_or("", |id| states[id].1.as_str())
    );
}

/// F3: a host cut off the server for 90 s (its link down at the bridge: packets dropped,
/// connections hang) while its containers run and exit: every run it had is reported with its
/// own exit code once the link is back, none twice; the other hosts run runs created during
/// the partition to the end.
#[tokio::test(flavor = "multi_thread")]
async fn f3_partitioned_host_reports_true_exit_codes_after_healing() {
    let shared = shared();
    let api = Api::new(&shared.server);
    let pool = unique("f3");
    let dep = deployment(&api, &pool, "sleep 20; exit $CODE").await;
    let hosts = fleet(&pool, &[]).await;
    let code = |i: usize| 3 + (i % 60);
    let first = runs_until_host_busy(
        &api,
        &dep,
        24,
        &hosts[2],
        &pool,
        2,
        |i| json!({"env": {"CODE": code(i).to_string()}}),
    )
    .await;
    hosts[2].set_link(false);
    let cut_at = Instant::now();
    let second = create_runs(
        &api,
        &dep,
        20,
        |i| json!({"env": {"CODE": code(first.len() + i).to_string()}}),
    )
    .await;
    let codes: HashMap<String, usize> = first
        .iter()
        .chain(second.iter())
        .enumerate()
        .map(|(i, id)| (id.clone(), code(i)))
        .collect();
    // The others go on: the runs created during the partition end on host-1 and host-2.
    let during = all_final(&api, &second, Duration::from_secs(240), &hosts[..2]).await;
    let others_done = cut_at.elapsed();
    // Host-3's containers exit while it is cut off; nobody can report them.
    eventually(
        Duration::from_secs(120),
        "host-3's containers to exit during the partition",
        async || running_on(&hosts[2], &pool) == 0,
    )
    .await;
    // Deliberately cut for 90 s in all (the partition is what is tested), not a wait.
    tokio::time::sleep(Duration::from_secs(90).saturating_sub(cut_at.elapsed())).await;
    let cut_off = runs_on(&hosts[2], &pool, &first);
    let unreported = states(&api, &cut_off).await;
    assert!(
        unreported.values().all(|(k, _)| !is_final(k)),
        "a run of the cut-off host went final during the partition: {unreported:?}"
    );
    let (_, workers) = api
        .call(
            reqwest::Method::POST,
            &format!("work_pools/{pool}/workers/filter"),
            Some(json!({})),
        )
        .await;
    let seen_as: Vec<String> = workers
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            format!(
                "{}={}",
                w["name"].as_str().unwrap_or(""),
                w["status"].as_str().unwrap_or("")
            )
        })
        .collect();
    hosts[2].set_link(true);
    let healed = Instant::now();
    let all: Vec<String> = first.iter().chain(second.iter()).cloned().collect();
    all_final(&api, &cut_off, Duration::from_secs(300), &hosts).await;
    let last_report = healed.elapsed();
    let states = all_final(&api, &all, Duration::from_secs(300), &hosts).await;
    let all_done = healed.elapsed();
    let later = runs_on(&hosts[2], &pool, &all).len() - cut_off.len();
    for id in &all {
        let (kind, message) = &states[id];
        let want = format!("non-zero status code {}.", codes[id]);
        assert!(
            kind == "CRASHED" && message.contains(&want),
            "run {id} (exit {}): {kind} {message}\n{}",
            codes[id],
            tails(&hosts)
        );
    }
    let shares = one_container_each(&hosts, &pool, &all);
    let restored = reported_once(&api, &all).await;
    eprintln!(
        "F3 figure ({restored} restored states, not reports): host-3 cut off for 90 s; the {} runs whose containers exited during the partition were reported with their own exit codes {:.1} s after the link came back; {later} runs it had claimed as the link went down were started after it came back; all {} final and reported once {:.1} s after healing; the 20 runs created during the partition ended on host-1/host-2 {:.1} s after the cut ({} final); workers as the server saw them just before healing: {seen_as:?}; containers per host: {shares:?}",
        cut_off.len(),
        last_report.as_secs_f64(),
        all.len(),
        all_done.as_secs_f64(),
        others_done.as_secs_f64(),
        during.len(),
    );
}

/// F4: a rolling upgrade: each host's worker in turn stopped with SIGTERM and `--drain-timeout
/// 2m` (it finishes watching its runs) and started again, while 300 runs flow: none lost, none
/// run twice.
#[tokio::test(flavor = "multi_thread")]
async fn f4_rolling_restart_of_every_worker_loses_no_run() {
    let _heavy = HEAVY.lock().await;
    let shared = shared();
    let api = Api::new(&shared.server);
    let pool = unique("f4");
    let dep = deployment(
        &api,
        &pool,
        "st RUNNING Running && sleep 5 && st COMPLETED Completed",
    )
    .await;
    let mut hosts = fleet(&pool, &["--drain-timeout", "2m"]).await;
    let args = ["--pool", pool.as_str(), "--drain-timeout", "2m"];
    let started = Instant::now();
    let creator = {
        let dep = dep.clone();
        tokio::spawn(async move {
            let api = Api::new(&shared.server);
            create_runs(&api, &dep, 300, |_| json!({})).await
        })
    };
    let mut drains = Vec::new();
    for i in 0..3 {
        eventually(
            Duration::from_secs(180),
            format!("{} to run a container", hosts[i].label),
            async || running_on(&hosts[i], &pool) >= 1,
        )
        .await;
        let in_flight = running_on(&hosts[i], &pool);
        let t = Instant::now();
        let status = hosts[i].stop_worker(Duration::from_secs(150)).await;
        let drained = t.elapsed();
        assert!(
            status.success(),
            "{} exited {status}\n{}",
            hosts[i].label,
            tails(&hosts)
        );
        // It watched its runs to the end before leaving.
        assert_eq!(
            running_on(&hosts[i], &pool),
            0,
            "{} left running containers behind\n{}",
            hosts[i].label,
            tails(&hosts)
        );
        drains.push((hosts[i].label.clone(), in_flight, drained.as_secs_f64()));
        hosts[i].start_worker(&shared.server.api_url, &args, &[]);
        wait_started(&hosts[i]).await;
    }
    let rolled_while_creating = !creator.is_finished();
    let ids = creator.await.expect("creating runs");
    let states = all_final(&api, &ids, Duration::from_secs(600), &hosts).await;
    let elapsed = started.elapsed();
    let lost: Vec<_> = states
        .iter()
        .filter(|(_, (k, _))| k != "COMPLETED")
        .collect();
    assert!(
        lost.is_empty(),
        "runs not Completed: {lost:?}\n{}",
        tails(&hosts)
    );
    let shares = one_container_each(&hosts, &pool, &ids);
    let restored = reported_once(&api, &ids).await;
    eprintln!(
        "F4 figure: 300/300 Completed, 0 lost, 0 run twice ({restored} restored states, not reports), in {:.1} s with every worker restarted in turn (host, containers running at SIGTERM, s to drain and exit): {drains:?}; containers per host: {shares:?} (all three rolled while runs were still being created: {rolled_while_creating})",
        elapsed.as_secs_f64()
    );
}

/// A TCP listener on the bridge that accepts connections and never answers: a registry whose
/// pulls hang.
struct Blackhole {
    addr: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Blackhole {
    fn start(ip: &str) -> Self {
        let listener = std::net::TcpListener::bind((ip, 0)).expect("bind the blackhole");
        let addr = listener.local_addr().expect("its address").to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if stopping.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                held.extend(conn.ok());
            }
        });
        Self { addr, stop }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(&self.addr);
    }
}

/// The container's heartbeat, as the Prefect engine sends it with
/// `PREFECT_RUNNER_HEARTBEAT_FREQUENCY` set: a `prefect.flow-run.heartbeat` event.
const HEARTBEAT: &str = r#"hb() { wget -q -O /dev/null --header "Content-Type: application/json" --post-data "[{\"id\":\"$(cat /proc/sys/kernel/random/uuid)\",\"occurred\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\",\"event\":\"prefect.flow-run.heartbeat\",\"resource\":{\"prefect.resource.id\":\"prefect.flow-run.$PREFECT__FLOW_RUN_ID\"}}]" "$PREFECT_API_URL/events"; }"#;

/// Prefect's documented zombie-run automation: a flow run whose heartbeats stop for 30 s
/// (without a final state) is set Crashed.
fn zombie_automation(name: &str) -> Value {
    json!({
        "name": name,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "after": ["prefect.flow-run.heartbeat"],
            "expect": [
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed"
            ],
            "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": 30
        },
        "actions": [{
            "type": "change-flow-run-state",
            "state": "CRASHED",
            "message": "Flow run marked as crashed: no heartbeat for 30 s"
        }]
    })
}

/// Waits until every run of `ids` is in state `kind`.
async fn all_in(api: &Api, ids: &[String], kind: &str, timeout: Duration, hosts: &[Host]) {
    eventually(timeout, format!("{ids:?} to be {kind}"), async || {
        let states = states(api, ids).await;
        if ids
            .iter()
            .all(|id| states.get(id).is_some_and(|(k, _)| k == kind))
        {
            Ok(())
        } else {
            Err(format!("{states:?}\n{}", tails(hosts)))
        }
    })
    .await;
}

/// F5: a host lost for good. The surviving workers' reconcile ends the runs it had claimed but
/// not started once it has been offline for `--orphan-claim-timeout` (Crashed, not rescheduled:
/// their container could exist where they cannot see); its Running runs stay Running — no
/// worker can tell a run on a dead host from a run on a live one it cannot see — until
/// Prefect's zombie automation ends those that sent heartbeats.
#[tokio::test(flavor = "multi_thread")]
async fn f5_host_that_never_comes_back() {
    let shared = shared();
    let api = Api::new(&shared.server);
    let pool = unique("f5");
    let mut hosts: Vec<Host> = (1..=3)
        .map(|i| shared.network.host(&format!("host-{i}")))
        .collect();
    // The server installs no automation of its own: without one, nothing ends a zombie run.
    let (status, existing) = api
        .call(reqwest::Method::POST, "automations/filter", Some(json!({})))
        .await;
    assert!(
        status == 200 && existing.as_array().is_some_and(Vec::is_empty),
        "automations on a fresh server: {status} {existing}"
    );
    let automation = unique("zombies");
    let (status, created) = api
        .call(
            reqwest::Method::POST,
            "automations/",
            Some(zombie_automation(&automation)),
        )
        .await;
    assert_eq!(status, 201, "create the zombie automation: {created}");
    let automation_id = created["id"].as_str().expect("automation id").to_owned();

    // Host-3 alone takes the first runs: two that heartbeat, two that do not, two whose pull hangs.
    hosts[2].start_worker(&shared.server.api_url, &["--pool", &pool], &[]);
    wait_started(&hosts[2]).await;
    let beating = deployment(
        &api,
        &pool,
        &format!("{HEARTBEAT}; st RUNNING Running; while :; do hb; sleep 5; done"),
    )
    .await;
    let quiet = deployment(&api, &pool, "st RUNNING Running; sleep 900").await;
    let beating = create_runs(&api, &beating, 2, |_| json!({})).await;
    let quiet = create_runs(&api, &quiet, 2, |_| json!({})).await;
    let running: Vec<String> = beating.iter().chain(quiet.iter()).cloned().collect();
    all_in(&api, &running, "RUNNING", Duration::from_secs(120), &hosts).await;
    let hole = Blackhole::start(&shared.network.gateway);
    let hanging = api
        .busybox_deployment(
            &pool,
            json!({"image": format!("{}/dw/never:1", hole.addr), "image_pull_policy": "Always", "command": "true"}),
        )
        .await;
    let claimed = create_runs(&api, &hanging, 2, |_| json!({})).await;
    all_in(&api, &claimed, "PENDING", Duration::from_secs(120), &hosts).await;
    hosts[2].lose();
    let lost_at = Instant::now();

    let args = [
        "--pool",
        pool.as_str(),
        "--orphan-claim-timeout",
        "20s",
        "--reconcile-interval",
        "5s",
    ];
    for host in &mut hosts[..2] {
        host.start_worker(&shared.server.api_url, &args, &[]);
        wait_started(host).await;
    }
    let ended = all_final(&api, &claimed, Duration::from_secs(240), &hosts).await;
    let claims_ended = lost_at.elapsed();
    for (id, (kind, message)) in &ended {
        assert!(
            kind == "CRASHED" && message.contains("host-3"),
            "claimed run {id}: {kind} {message}\n{}",
            tails(&hosts)
        );
    }
    let zombies = all_final(&api, &beating, Duration::from_secs(240), &hosts).await;
    let zombies_ended = lost_at.elapsed();
    for (id, (kind, message)) in &zombies {
        assert!(
            kind == "CRASHED" && message.contains("no heartbeat"),
            "heartbeating run {id}: {kind} {message}"
        );
    }
    // Four more reconcile passes of each survivor (deliberately watched for 20 s: what is
    // asserted is that nothing happens).
    tokio::time::sleep(Duration::from_secs(20)).await;
    let still = states(&api, &quiet).await;
    assert!(
        still.values().all(|(k, _)| k == "RUNNING"),
        "the lost host's quiet runs: {still:?}"
    );
    let rerun = containers_by_run(&hosts[..2], &pool);
    assert!(
        running
            .iter()
            .chain(claimed.iter())
            .all(|id| !rerun.contains_key(id)),
        "a run of the lost host ran again elsewhere: {rerun:?}"
    );
    let (status, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("automations/{automation_id}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    eprintln!(
        "F5 figure: host-3 lost for good with 2 claimed-not-started runs, 2 heartbeating and 2 quiet Running runs; the claims Crashed by a survivor's reconcile {:.1} s after the loss (--orphan-claim-timeout 20s, passes every 5 s): {:?}; the heartbeating runs Crashed by the zombie automation {:.1} s after the loss; the quiet runs still Running {:.1} s after the loss; none ran again",
        claims_ended.as_secs_f64(),
        ended.values().next().map(|(_, m)| m.as_str()).unwrap_or(""),
        zombies_ended.as_secs_f64(),
        lost_at.elapsed().as_secs_f64()
    );
}
