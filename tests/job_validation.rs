//! The job configuration carried through to the Engine create body: every Engine field a
//! `container_create_kwargs` keyword maps to (see `src/job/create_kwargs.rs`, whose unit tests
//! compare the mapping with docker-py) must reach `POST /containers/create`. The body goes
//! through the API client's typed model, which silently drops a field it does not know or
//! refuses a value of the wrong type, so this checks the two agree. Pure: no daemon, no server.

#![recursion_limit = "256"]

use std::path::Path;

use docker_worker::docker::DockerRuntime;
use docker_worker::job::{DockerJobConfiguration, RunContext};
use serde_json::{Map, Value, json};

fn config(job: &Value) -> DockerJobConfiguration {
    DockerJobConfiguration::from_rendered(job.as_object().unwrap(), Path::new("/w"))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The create body for a job configuration, as JSON.
fn create_body(job: &Value) -> Value {
    let flow_run = json!({"id": "run-1", "name": "r"});
    let spec = config(job)
        .prepare(&RunContext {
            flow_run: &flow_run,
            flow: None,
            deployment: None,
            worker_name: "w",
            work_pool_name: "p",
            work_pool_id: "i",
            settings_env: &[],
            default_image: "busybox:1",
            engine_version: Some("20.10.24"),
            rootless_host: None,
        })
        .unwrap();
    serde_json::to_value(DockerRuntime::create_body(&spec).unwrap()).unwrap()
}

fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_nulls).collect()),
        other => other.clone(),
    }
}

fn assert_carried(fields: &Map<String, Value>, body: &Value, what: &str) {
    for (field, value) in fields {
        assert_eq!(
            body.get(field).map(strip_nulls),
            Some(strip_nulls(value)),
            "{what}.{field} is not in the create body as mapped"
        );
    }
}

/// Every mapped keyword at once (those that exclude each other are in the second set).
#[test]
fn every_mapped_keyword_reaches_the_create_body() {
    let sets = [
        json!({
            "domainname": "example.org", "entrypoint": "sh -c 'echo hi'", "hostname": "h1",
            "healthcheck": {"test": "true", "interval": 1_000_000_000, "timeout": 2_000_000_000,
                            "retries": 3, "start_period": 5_000_000_000_u64, "start_interval": 1_000_000},
            "network_disabled": false, "stdin_open": true, "stop_signal": "SIGINT",
            "stop_timeout": 5, "tty": true, "user": 1000, "working_dir": "/tmp",
            "blkio_weight": 300, "blkio_weight_device": [{"Path": "/dev/sda", "Weight": 200}],
            "cap_add": ["NET_ADMIN"], "cap_drop": ["MKNOD"], "cgroup_parent": "/g",
            "cgroupns": "private", "cpu_count": 2, "cpu_percent": 50, "cpu_period": 100_000,
            "cpu_quota": 50_000, "cpu_rt_period": 1_000_000, "cpu_rt_runtime": 950_000,
            "cpu_shares": 512, "cpuset_cpus": "0", "cpuset_mems": "0",
            "device_cgroup_rules": ["c 1:3 mr"],
            "device_read_bps": [{"path": "/dev/sda", "rate": 1_048_576}],
            "device_read_iops": [{"Path": "/dev/sda", "Rate": 100}],
            "device_write_bps": [{"Path": "/dev/sda", "Rate": 1_048_576}],
            "device_write_iops": [{"Path": "/dev/sda", "Rate": 100}],
            "device_requests": [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]],
                                 "options": {"a": "b"}}],
            "devices": ["/dev/fuse", {"pathonhost": "/dev/sda", "PathInContainer": "/dev/xvda",
                                      "CgroupPermissions": "r"}],
            "dns": ["1.1.1.1"], "dns_opt": ["ndots:2"], "dns_search": ["example.internal"],
            "group_add": ["audio", 1000], "init": true, "ipc_mode": "shareable",
            "isolation": "default", "links": {"db": "database"},
            "log_config": {"type": "json-file", "config": {"max-size": "10m"}},
            "mem_reservation": "64m", "mem_swappiness": 10,
            "mounts": [{"type": "volume", "source": "v", "target": "/data", "readonly": true,
                        "VolumeOptions": {"NoCopy": true, "Labels": {"a": "b"}}}],
            "nano_cpus": 500_000_000, "oom_kill_disable": true, "oom_score_adj": 500,
            "pid_mode": "host", "pids_limit": 100, "publish_all_ports": true, "read_only": true,
            "restart_policy": {"Name": "on-failure", "MaximumRetryCount": 3}, "runtime": "runc",
            "security_opt": ["no-new-privileges"], "shm_size": "1g", "storage_opt": {"size": "10G"},
            "sysctls": {"net.core.somaxconn": 1024}, "tmpfs": ["/run:size=1m", "/tmp"],
            "ulimits": [{"name": "nofile", "soft": 1024, "hard": 2048}],
            "userns_mode": "host", "uts_mode": "host", "volume_driver": "local",
            "volumes_from": "a,b:ro",
            "ports": {"80/tcp": 8080, "81": ["127.0.0.1", 8181], "82/udp": [1, 2], "83": null,
                      "84": {"HostIp": "127.0.0.1", "HostPort": 8484}},
        }),
        json!({"detach": true, "tmpfs": {"/run": "size=1m"}, "links": [["db", "x"], "c:d"],
               "healthcheck": {"Test": ["CMD", "true"]}, "entrypoint": ["/bin/sh", "-c"],
               "devices": [], "device_requests": [{}], "log_config": {"Type": "none"}}),
    ];
    for kwargs in sets {
        let job = json!({"container_create_kwargs": kwargs});
        let overrides = config(&job).overrides;
        assert!(overrides.warnings.is_empty(), "{:?}", overrides.warnings);
        let body = create_body(&job);
        assert_carried(&overrides.config, &body, "body");
        assert_carried(&overrides.host_config, &body["HostConfig"], "HostConfig");
    }
}

#[test]
fn networking_config_reaches_the_create_body_for_the_first_network() {
    let job = json!({
        "networks": ["n1", "n2"],
        "container_create_kwargs": {"networking_config": {"n1": {"aliases": ["db"], "IPAMConfig": {"IPv4Address": "10.0.0.5"}}}},
    });
    let body = create_body(&job);
    assert_eq!(body["HostConfig"]["NetworkMode"], "n1");
    assert_eq!(
        strip_nulls(&body["NetworkingConfig"]),
        json!({"EndpointsConfig": {"n1": {"Aliases": ["db"], "IPAMConfig": {"IPv4Address": "10.0.0.5"}}}})
    );
}

/// The job fields themselves, with values in the forms the reference accepts.
#[test]
fn job_fields_reach_the_create_body() {
    let body = create_body(&json!({
        "command": "sh -c 'exit 7'", "image": "local/busybox:1", "auto_remove": "yes",
        "privileged": 1, "mem_limit": "64mb", "memswap_limit": "128m", "network_mode": "bridge",
        "volumes": ["./data:/data:ro", "/tmp:/hosttmp", "pfnamedvol:/nv", "/anon"],
        "labels": {"a.b.c/d": "x"}, "env": {"N": 5, "B": true, "X": null},
    }));
    assert_eq!(body["Cmd"], json!(["sh", "-c", "exit 7"]));
    assert_eq!(body["Image"], "local/busybox:1");
    let host = &body["HostConfig"];
    assert_eq!(host["AutoRemove"], true);
    assert_eq!(host["Privileged"], true);
    assert_eq!(host["Memory"], 67_108_864);
    assert_eq!(host["MemorySwap"], 134_217_728);
    assert_eq!(host["NetworkMode"], "bridge");
    assert_eq!(
        host["Binds"],
        json!([
            "/w/data:/data:ro",
            "/tmp:/hosttmp",
            "pfnamedvol:/nv",
            "/anon"
        ])
    );
    assert_eq!(
        body["Volumes"],
        json!({"/data": {}, "/hosttmp": {}, "/nv": {}, "/anon": {}})
    );
    assert_eq!(body["Labels"]["c.b.a.d"], "x");
    let env: Vec<&str> = body["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(env.contains(&"N=5") && env.contains(&"B=True"), "{env:?}");
    assert!(!env.iter().any(|e| e.starts_with("X=")), "{env:?}");
}
