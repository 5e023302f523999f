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
        let server = PrefectServer::start_on_postgres(&[(HOST_OVERRIDE, &network.gateway)]);
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

/// Three hosts of the shared network, each running a worker for `pool` with `args`.
fn fleet(pool: &str, args: &[&str]) -> Vec<Host> {
    let shared = shared();
    (1..=3)
        .map(|i| {
            let mut host = shared.network.host(&format!("host-{i}"));
            let mut all = vec!["--pool", pool];
            all.extend_from_slice(args);
            host.start_worker(&shared.server.api_url, &all, &[]);
            host
        })
        .collect()
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

/// How many final states of each type the run went through (a run reported twice has two).
async fn final_states(api: &Api, run_id: &str) -> Vec<String> {
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
        .filter_map(|s| s["type"].as_str())
        .filter(|k| is_final(k))
        .map(str::to_owned)
        .collect()
}

/// Asserts no run went final twice.
async fn reported_once(api: &Api, ids: &[String]) {
    for id in ids {
        let finals = final_states(api, id).await;
        assert_eq!(finals.len(), 1, "run {id} went final {finals:?}");
    }
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
    let hosts = fleet(&pool, &[]);
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
    reported_once(&api, &ids).await;
    eprintln!(
        "F1 figure: 600/600 Completed, each with one container in the fleet, in {:.1} s (runs created over {:.1} s); shares per host: {shares:?}",
        elapsed.as_secs_f64(),
        created.as_secs_f64()
    );
}
