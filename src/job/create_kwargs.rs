//! `container_create_kwargs`: docker-py `containers.create` keyword arguments mapped to
//! Docker Engine API fields, so users' existing job variables keep working.
//!
//! Pure. The result is two JSON objects of Engine field names: top-level create fields and
//! `HostConfig` fields. Unknown keywords are a validation error naming the key (the Python
//! worker fails later with a `TypeError`).

use serde_json::{Map, Value, json};

use super::memory::parse_bytes;

/// Engine fields produced from `container_create_kwargs`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineOverrides {
    /// Fields of the create body (`User`, `WorkingDir`, `Entrypoint`, `ExposedPorts`, …).
    pub config: Map<String, Value>,
    /// Fields of `HostConfig` (`ShmSize`, `DeviceRequests`, `PortBindings`, …).
    pub host_config: Map<String, Value>,
    /// `extra_hosts` as given (merged with the automatic host-gateway entry later).
    pub extra_hosts: Option<Value>,
    /// `platform` (a create query parameter, not a body field).
    pub platform: Option<String>,
    /// Non-fatal remarks for the worker log.
    pub warnings: Vec<String>,
}

/// Job-configuration field names: as keywords they are dropped, since the job field owns them.
const JOB_FIELDS: &[&str] = &[
    "command",
    "env",
    "labels",
    "name",
    "image",
    "registry_credentials",
    "image_pull_policy",
    "networks",
    "network_mode",
    "auto_remove",
    "volumes",
    "stream_output",
    "mem_limit",
    "memswap_limit",
    "privileged",
    "container_create_kwargs",
];

#[derive(Clone, Copy)]
enum Conv {
    /// Passed through unchanged.
    Same,
    /// A memory size (`"1g"` or bytes).
    Bytes,
    /// An integer user id or a name: always a string for the Engine.
    Stringify,
    /// A string (shell-split) or a list.
    ShellList,
    /// A list of strings (a lone string becomes a one-item list).
    StringList,
    /// An object whose keys are capitalised (`{"name": "x"}` → `{"Name": "x"}`).
    Capitalize,
}

fn lookup_keyword(key: &str) -> Option<(bool, &'static str, Conv)> {
    // (is_host_config, Engine field, conversion)
    use Conv::*;
    Some(match key {
        "domainname" => (false, "Domainname", Same),
        "entrypoint" => (false, "Entrypoint", ShellList),
        "hostname" => (false, "Hostname", Same),
        "mac_address" => (false, "MacAddress", Same),
        "network_disabled" => (false, "NetworkDisabled", Same),
        "stdin_open" => (false, "OpenStdin", Same),
        "stop_signal" => (false, "StopSignal", Same),
        "stop_timeout" => (false, "StopTimeout", Same),
        "tty" => (false, "Tty", Same),
        "user" => (false, "User", Stringify),
        "working_dir" => (false, "WorkingDir", Same),
        "healthcheck" => (false, "Healthcheck", Capitalize),
        "blkio_weight" => (true, "BlkioWeight", Same),
        "blkio_weight_device" => (true, "BlkioWeightDevice", Same),
        "cap_add" => (true, "CapAdd", StringList),
        "cap_drop" => (true, "CapDrop", StringList),
        "cgroup_parent" => (true, "CgroupParent", Same),
        "cgroupns" => (true, "CgroupnsMode", Same),
        "cpu_count" => (true, "CpuCount", Same),
        "cpu_percent" => (true, "CpuPercent", Same),
        "cpu_period" => (true, "CpuPeriod", Same),
        "cpu_quota" => (true, "CpuQuota", Same),
        "cpu_shares" => (true, "CpuShares", Same),
        "cpuset_cpus" => (true, "CpusetCpus", Same),
        "cpuset_mems" => (true, "CpusetMems", Same),
        "cpu_rt_period" => (true, "CpuRealtimePeriod", Same),
        "cpu_rt_runtime" => (true, "CpuRealtimeRuntime", Same),
        "device_cgroup_rules" => (true, "DeviceCgroupRules", StringList),
        "device_read_bps" => (true, "BlkioDeviceReadBps", Same),
        "device_read_iops" => (true, "BlkioDeviceReadIOps", Same),
        "device_write_bps" => (true, "BlkioDeviceWriteBps", Same),
        "device_write_iops" => (true, "BlkioDeviceWriteIOps", Same),
        "dns" => (true, "Dns", StringList),
        "dns_opt" => (true, "DnsOptions", StringList),
        "dns_search" => (true, "DnsSearch", StringList),
        "group_add" => (true, "GroupAdd", StringList),
        "init" => (true, "Init", Same),
        "ipc_mode" => (true, "IpcMode", Same),
        "isolation" => (true, "Isolation", Same),
        "kernel_memory" => (true, "KernelMemory", Bytes),
        "links" => (true, "Links", Same),
        "mem_reservation" => (true, "MemoryReservation", Bytes),
        "mem_swappiness" => (true, "MemorySwappiness", Same),
        "nano_cpus" => (true, "NanoCpus", Same),
        "oom_kill_disable" => (true, "OomKillDisable", Same),
        "oom_score_adj" => (true, "OomScoreAdj", Same),
        "pid_mode" => (true, "PidMode", Same),
        "pids_limit" => (true, "PidsLimit", Same),
        "publish_all_ports" => (true, "PublishAllPorts", Same),
        "read_only" => (true, "ReadonlyRootfs", Same),
        "runtime" => (true, "Runtime", Same),
        "security_opt" => (true, "SecurityOpt", StringList),
        "shm_size" => (true, "ShmSize", Bytes),
        "storage_opt" => (true, "StorageOpt", Same),
        "sysctls" => (true, "Sysctls", Same),
        "userns_mode" => (true, "UsernsMode", Same),
        "uts_mode" => (true, "UTSMode", Same),
        "volume_driver" => (true, "VolumeDriver", Same),
        "volumes_from" => (true, "VolumesFrom", StringList),
        "restart_policy" => (true, "RestartPolicy", Capitalize),
        "log_config" => (true, "LogConfig", Capitalize),
        "mounts" => (true, "Mounts", Same),
        _ => return None,
    })
}

fn capitalize_keys(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k.as_str() {
                        "maximum_retry_count" => "MaximumRetryCount".to_owned(),
                        "start_period" => "StartPeriod".to_owned(),
                        "start_interval" => "StartInterval".to_owned(),
                        other => {
                            let mut chars = other.chars();
                            chars
                                .next()
                                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                                .unwrap_or_default()
                        }
                    };
                    (key, v.clone())
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

fn convert(key: &str, value: &Value, conv: Conv) -> Result<Value, String> {
    Ok(match conv {
        Conv::Same => value.clone(),
        Conv::Capitalize => capitalize_keys(value),
        Conv::Bytes => match value {
            Value::String(s) => json!(parse_bytes(s)?),
            Value::Number(_) => value.clone(),
            _ => {
                return Err(format!(
                    "container_create_kwargs.{key}: expected a size such as \"1g\" or a number of bytes"
                ));
            }
        },
        Conv::Stringify => match value {
            Value::String(_) => value.clone(),
            Value::Number(n) => json!(n.to_string()),
            _ => {
                return Err(format!(
                    "container_create_kwargs.{key}: expected a string or a number"
                ));
            }
        },
        Conv::ShellList => match value {
            Value::String(s) => json!(shlex::split(s).ok_or_else(|| format!(
                "container_create_kwargs.{key}: unbalanced quotes in {s:?}"
            ))?),
            Value::Array(_) | Value::Null => value.clone(),
            _ => {
                return Err(format!(
                    "container_create_kwargs.{key}: expected a string or a list of strings"
                ));
            }
        },
        Conv::StringList => match value {
            Value::String(s) => json!([s]),
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| match i {
                        Value::String(_) => i.clone(),
                        other => json!(super::template::python_str(other)),
                    })
                    .collect(),
            ),
            _ => {
                return Err(format!(
                    "container_create_kwargs.{key}: expected a list of strings"
                ));
            }
        },
    })
}

/// `ports` as docker-py takes it: `{"80/tcp": 8080, "81": ["127.0.0.1", 81], "82/udp": [1, 2], "83": null}`.
fn convert_ports(value: &Value) -> Result<(Value, Value), String> {
    let map = value.as_object().ok_or(
        "container_create_kwargs.ports: expected an object of container port to host port",
    )?;
    let mut exposed = Map::new();
    let mut bindings = Map::new();
    for (port, host) in map {
        let key = if port.contains('/') {
            port.clone()
        } else {
            format!("{port}/tcp")
        };
        exposed.insert(key.clone(), json!({}));
        let binding = |ip: &str, port: &Value| -> Result<Value, String> {
            let host_port = match port {
                Value::Null => String::new(),
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.clone(),
                _ => {
                    return Err(format!(
                        "container_create_kwargs.ports.{key}: bad host port {port}"
                    ));
                }
            };
            Ok(json!({"HostIp": ip, "HostPort": host_port}))
        };
        let list = match host {
            Value::Null => vec![binding("", &Value::Null)?],
            Value::Number(_) | Value::String(_) => vec![binding("", host)?],
            Value::Array(items)
                if items.len() == 2 && items[0].is_string() && !items[1].is_string() =>
            {
                vec![binding(items[0].as_str().unwrap_or_default(), &items[1])?]
            }
            Value::Array(items) if items.len() == 1 && items[0].is_string() => {
                vec![binding(
                    items[0].as_str().unwrap_or_default(),
                    &Value::Null,
                )?]
            }
            Value::Array(items) => items
                .iter()
                .map(|p| binding("", p))
                .collect::<Result<Vec<_>, _>>()?,
            other => {
                return Err(format!(
                    "container_create_kwargs.ports.{key}: bad host port {other}"
                ));
            }
        };
        bindings.insert(key, Value::Array(list));
    }
    Ok((Value::Object(exposed), Value::Object(bindings)))
}

/// `devices` strings (`/dev/x[:/dev/y[:rwm]]`) to Engine device mappings.
fn convert_devices(value: &Value) -> Result<Value, String> {
    let items = value
        .as_array()
        .ok_or("container_create_kwargs.devices: expected a list")?;
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                let host = parts[0];
                let container = parts.get(1).copied().unwrap_or(host);
                let perms = parts.get(2).copied().unwrap_or("rwm");
                Ok(json!({"PathOnHost": host, "PathInContainer": container, "CgroupPermissions": perms}))
            }
            Value::Object(_) => Ok(item.clone()),
            _ => Err("container_create_kwargs.devices: expected strings like /dev/x:/dev/x:rwm".to_owned()),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn convert_device_requests(value: &Value) -> Result<Value, String> {
    let items = value
        .as_array()
        .ok_or("container_create_kwargs.device_requests: expected a list")?;
    items
        .iter()
        .map(|item| {
            let map = item
                .as_object()
                .ok_or("container_create_kwargs.device_requests: expected objects")?;
            let mut out = Map::new();
            for (k, v) in map {
                let key = match k.as_str() {
                    "driver" => "Driver",
                    "count" => "Count",
                    "device_ids" => "DeviceIDs",
                    "capabilities" => "Capabilities",
                    "options" => "Options",
                    other => other,
                };
                out.insert(key.to_owned(), v.clone());
            }
            Ok(Value::Object(out))
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Value::Array)
}

fn convert_tmpfs(value: &Value) -> Result<Value, String> {
    match value {
        Value::Object(_) => Ok(value.clone()),
        Value::Array(items) => {
            let mut out = Map::new();
            for item in items {
                let s = item
                    .as_str()
                    .ok_or("container_create_kwargs.tmpfs: expected strings")?;
                let (path, opts) = s.split_once(':').unwrap_or((s, ""));
                out.insert(path.to_owned(), json!(opts));
            }
            Ok(Value::Object(out))
        }
        _ => Err("container_create_kwargs.tmpfs: expected an object or a list".to_owned()),
    }
}

fn convert_ulimits(value: &Value) -> Result<Value, String> {
    let items = value
        .as_array()
        .ok_or("container_create_kwargs.ulimits: expected a list")?;
    Ok(Value::Array(items.iter().map(capitalize_keys).collect()))
}

/// Maps `container_create_kwargs` to Engine fields.
///
/// # Errors
/// A message naming the offending key: unknown keywords, `environment`/`network` (which clash
/// with job fields), and values of the wrong shape.
pub fn map_create_kwargs(kwargs: &Map<String, Value>) -> Result<EngineOverrides, String> {
    let mut out = EngineOverrides::default();
    for (key, value) in kwargs {
        if JOB_FIELDS.contains(&key.as_str()) {
            if key == "volumes" {
                out.warnings.push(
                    "volumes should be specified in job_variables rather than container_create_kwargs. Values specified in container_create_kwargs will be ignored.".to_owned(),
                );
            }
            continue;
        }
        match key.as_str() {
            "extra_hosts" => out.extra_hosts = Some(value.clone()),
            "platform" => match value {
                Value::Null => {}
                Value::String(p) if !p.trim().is_empty() => {
                    out.platform = Some(p.trim().to_owned())
                }
                other => {
                    return Err(format!(
                        "container_create_kwargs.platform: expected a string such as \"linux/amd64\"; got {other}"
                    ));
                }
            },
            "ports" => {
                let (exposed, bindings) = convert_ports(value)?;
                out.config.insert("ExposedPorts".into(), exposed);
                out.host_config.insert("PortBindings".into(), bindings);
            }
            "devices" => {
                out.host_config
                    .insert("Devices".into(), convert_devices(value)?);
            }
            "device_requests" => {
                out.host_config
                    .insert("DeviceRequests".into(), convert_device_requests(value)?);
            }
            "tmpfs" => {
                out.host_config
                    .insert("Tmpfs".into(), convert_tmpfs(value)?);
            }
            "ulimits" => {
                out.host_config
                    .insert("Ulimits".into(), convert_ulimits(value)?);
            }
            "environment" | "network" => {
                return Err(format!(
                    "container_create_kwargs.{key} is not allowed: use the `{}` job variable instead",
                    if key == "environment" {
                        "env"
                    } else {
                        "networks"
                    }
                ));
            }
            "detach" | "remove" | "use_config_proxy" | "version" => {
                out.warnings.push(format!(
                    "container_create_kwargs.{key} has no effect and is ignored"
                ));
            }
            other => {
                let (host, field, conv) = lookup_keyword(other).ok_or_else(|| {
                    format!("container_create_kwargs has an unknown key '{other}' (not a docker-py containers.create argument)")
                })?;
                let converted = convert(other, value, conv)?;
                if host {
                    out.host_config.insert(field.to_owned(), converted);
                } else {
                    out.config.insert(field.to_owned(), converted);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Result<EngineOverrides, String> {
        map_create_kwargs(v.as_object().unwrap())
    }

    #[test]
    fn renames_and_conversions() {
        let out = map(json!({
            "user": 1000, "working_dir": "/tmp", "entrypoint": "sh -c", "shm_size": "1g",
            "nano_cpus": 500000000, "cap_add": "NET_ADMIN", "read_only": true,
            "restart_policy": {"name": "on-failure", "maximum_retry_count": 3},
            "ulimits": [{"name": "nofile", "soft": 1024, "hard": 2048}],
            "device_requests": [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}],
            "image": "ignored", "extra_hosts": {"a": "1.2.3.4"}
        }))
        .unwrap();
        assert_eq!(out.config["User"], json!("1000"));
        assert_eq!(out.config["WorkingDir"], json!("/tmp"));
        assert_eq!(out.config["Entrypoint"], json!(["sh", "-c"]));
        assert_eq!(out.host_config["ShmSize"], json!(1_073_741_824));
        assert_eq!(out.host_config["NanoCpus"], json!(500_000_000));
        assert_eq!(out.host_config["CapAdd"], json!(["NET_ADMIN"]));
        assert_eq!(out.host_config["ReadonlyRootfs"], json!(true));
        assert_eq!(
            out.host_config["RestartPolicy"],
            json!({"Name": "on-failure", "MaximumRetryCount": 3})
        );
        assert_eq!(
            out.host_config["Ulimits"],
            json!([{"Name": "nofile", "Soft": 1024, "Hard": 2048}])
        );
        assert_eq!(
            out.host_config["DeviceRequests"],
            json!([{"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}])
        );
        assert!(!out.config.contains_key("Image"));
        assert_eq!(out.extra_hosts, Some(json!({"a": "1.2.3.4"})));
    }

    #[test]
    fn ports() {
        let out = map(json!({"ports": {"80/tcp": 8080, "81": ["127.0.0.1", 8181], "82/udp": [1, 2], "83": null}})).unwrap();
        assert_eq!(
            out.config["ExposedPorts"],
            json!({"80/tcp": {}, "81/tcp": {}, "82/udp": {}, "83/tcp": {}})
        );
        assert_eq!(
            out.host_config["PortBindings"]["81/tcp"],
            json!([{"HostIp": "127.0.0.1", "HostPort": "8181"}])
        );
        assert_eq!(
            out.host_config["PortBindings"]["82/udp"],
            json!([{"HostIp": "", "HostPort": "1"}, {"HostIp": "", "HostPort": "2"}])
        );
        assert_eq!(
            out.host_config["PortBindings"]["83/tcp"],
            json!([{"HostIp": "", "HostPort": ""}])
        );
    }

    #[test]
    fn unknown_and_clashing_keys_are_named() {
        assert!(map(json!({"bogus": 1})).unwrap_err().contains("'bogus'"));
        assert!(
            map(json!({"environment": {}}))
                .unwrap_err()
                .contains("environment")
        );
        assert!(
            map(json!({"shm_size": "1q"}))
                .unwrap_err()
                .contains("should specify the units")
        );
        let out = map(json!({"volumes": ["/x"]})).unwrap();
        assert_eq!(out.warnings.len(), 1);
    }
}
