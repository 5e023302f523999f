//! `container_create_kwargs`: docker-py `containers.create` keyword arguments mapped to
//! Docker Engine API fields, so users' existing job variables keep working.
//!
//! Pure. The result is two JSON objects of Engine field names: top-level create fields and
//! `HostConfig` fields. Each keyword is converted as docker-py 7.2 converts it for API 1.41
//! (`_create_container_args`, `ContainerConfig`, `HostConfig`): the same Engine field, the same
//! value, and sent only when docker-py sends it (some only when truthy, some when not null).
//! Where docker-py would fail — an unknown keyword, a value of the wrong type — this is a
//! validation error naming the key, before any container exists. Where the Engine matches
//! field names case-insensitively (`{"target": …}` in a mount), the names are put in the
//! Engine's spelling, since the API client here matches them exactly.

use serde_json::{Map, Value, json};

use super::memory::parse_bytes;
use super::template::python_str;
use When::{NotNull, Truthy};

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
    /// `networking_config`: endpoint settings by network name, for the network the container
    /// is created on (`NetworkingConfig.EndpointsConfig`).
    pub networking_config: Option<Map<String, Value>>,
    /// Non-fatal remarks for the worker log.
    pub warnings: Vec<String>,
    /// The keys given, in order, except the job fields dropped above: what a host policy's
    /// allow-list of keys judges.
    pub keys: Vec<String>,
}

/// One keyword that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KwargError {
    /// The keyword as written.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

/// Job-configuration field names: as keywords they are dropped, since the job field owns them
/// (the reference drops every field of its model).
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

/// When docker-py sends a keyword's field.
#[derive(Clone, Copy, PartialEq, Eq)]
enum When {
    /// Only for a truthy value (`if cpu_shares:`): 0, `""`, `false`, `[]`, `{}` send nothing.
    Truthy,
    /// For any value but null (`if dns is not None:`).
    NotNull,
}

/// A value conversion: the Engine value, or what was expected.
type Convert = fn(&Value) -> Result<Value, String>;

/// A keyword that maps to one Engine field.
struct Keyword {
    /// In `HostConfig` (else at the top of the create body).
    host: bool,
    /// The Engine field.
    field: &'static str,
    when: When,
    convert: Convert,
}

/// A keyword whose field is at the top of the create body.
const fn body(field: &'static str, when: When, convert: Convert) -> Keyword {
    Keyword {
        host: false,
        field,
        when,
        convert,
    }
}

/// A keyword whose field is in `HostConfig`.
const fn host(field: &'static str, when: When, convert: Convert) -> Keyword {
    Keyword {
        host: true,
        field,
        when,
        convert,
    }
}

/// Every keyword that maps to one Engine field, with where it goes, when docker-py sends it
/// and how its value converts. A declarative table: one row per keyword, no logic.
#[rustfmt::skip] // one row per keyword reads as a table
const KEYWORDS: &[(&str, Keyword)] = &[
    // ContainerConfig: every field is sent unless null.
    ("domainname",          body("Domainname", NotNull, string)),
    ("entrypoint",          body("Entrypoint", NotNull, command)),
    ("healthcheck",         body("Healthcheck", NotNull, healthcheck)),
    ("hostname",            body("Hostname", NotNull, string)),
    ("network_disabled",    body("NetworkDisabled", NotNull, boolean)),
    ("stdin_open",          body("OpenStdin", NotNull, boolean)),
    ("stop_signal",         body("StopSignal", NotNull, string)),
    // Not a docker-py keyword (it refuses it); the Engine field works (README difference).
    ("stop_timeout",        body("StopTimeout", NotNull, integer)),
    ("tty",                 body("Tty", NotNull, boolean)),
    ("user",                body("User", NotNull, user)),
    ("working_dir",         body("WorkingDir", NotNull, string)),
    // HostConfig.
    ("blkio_weight",        host("BlkioWeight", Truthy, integer)),
    ("blkio_weight_device", host("BlkioWeightDevice", Truthy, weight_devices)),
    ("cap_add",             host("CapAdd", Truthy, string_list)),
    ("cap_drop",            host("CapDrop", Truthy, string_list)),
    ("cgroup_parent",       host("CgroupParent", NotNull, string)),
    ("cgroupns",            host("CgroupnsMode", Truthy, cgroupns)),
    ("cpu_count",           host("CpuCount", Truthy, integer)),
    ("cpu_percent",         host("CpuPercent", Truthy, integer)),
    ("cpu_period",          host("CpuPeriod", Truthy, integer)),
    ("cpu_quota",           host("CpuQuota", Truthy, integer)),
    // docker-py spells these `CPURealtime…`; the Engine reads field names case-insensitively.
    ("cpu_rt_period",       host("CpuRealtimePeriod", Truthy, integer)),
    ("cpu_rt_runtime",      host("CpuRealtimeRuntime", Truthy, integer)),
    ("cpu_shares",          host("CpuShares", Truthy, integer)),
    ("cpuset_cpus",         host("CpusetCpus", Truthy, string)),
    ("cpuset_mems",         host("CpusetMems", Truthy, string)),
    ("device_cgroup_rules", host("DeviceCgroupRules", NotNull, string_list)),
    ("device_read_bps",     host("BlkioDeviceReadBps", Truthy, throttle_devices)),
    ("device_read_iops",    host("BlkioDeviceReadIOps", Truthy, throttle_devices)),
    ("device_requests",     host("DeviceRequests", NotNull, device_requests)),
    ("device_write_bps",    host("BlkioDeviceWriteBps", Truthy, throttle_devices)),
    ("device_write_iops",   host("BlkioDeviceWriteIOps", Truthy, throttle_devices)),
    ("devices",             host("Devices", Truthy, devices)),
    ("dns",                 host("Dns", NotNull, string_list)),
    ("dns_opt",             host("DnsOptions", NotNull, string_list)),
    ("dns_search",          host("DnsSearch", Truthy, string_list)),
    ("group_add",           host("GroupAdd", Truthy, string_list)),
    ("init",                host("Init", NotNull, boolean)),
    ("ipc_mode",            host("IpcMode", Truthy, string)),
    ("isolation",           host("Isolation", Truthy, isolation)),
    ("links",               host("Links", NotNull, links)),
    ("log_config",          host("LogConfig", NotNull, log_config)),
    ("mem_reservation",     host("MemoryReservation", Truthy, bytes)),
    ("mem_swappiness",      host("MemorySwappiness", NotNull, integer)),
    ("mounts",              host("Mounts", NotNull, mounts)),
    ("nano_cpus",           host("NanoCpus", Truthy, integer)),
    ("oom_kill_disable",    host("OomKillDisable", Truthy, boolean)),
    ("oom_score_adj",       host("OomScoreAdj", Truthy, integer)),
    ("pid_mode",            host("PidMode", Truthy, string)),
    ("pids_limit",          host("PidsLimit", Truthy, integer)),
    ("publish_all_ports",   host("PublishAllPorts", Truthy, boolean)),
    ("read_only",           host("ReadonlyRootfs", NotNull, boolean)),
    ("restart_policy",      host("RestartPolicy", Truthy, restart_policy)),
    ("runtime",             host("Runtime", Truthy, string)),
    ("security_opt",        host("SecurityOpt", NotNull, string_list)),
    ("shm_size",            host("ShmSize", NotNull, bytes)),
    ("storage_opt",         host("StorageOpt", NotNull, string_map)),
    ("sysctls",             host("Sysctls", Truthy, sysctls)),
    ("tmpfs",               host("Tmpfs", Truthy, tmpfs)),
    ("ulimits",             host("Ulimits", NotNull, ulimits)),
    ("userns_mode",         host("UsernsMode", Truthy, host_only)),
    ("uts_mode",            host("UTSMode", Truthy, host_only)),
    ("volume_driver",       host("VolumeDriver", NotNull, string)),
    ("volumes_from",        host("VolumesFrom", NotNull, volumes_from)),
];

/// Keywords with rules of their own (see [`map_keyword`]), beside those of [`KEYWORDS`].
const SPECIAL_KEYWORDS: &[&str] = &[
    "extra_hosts",
    "platform",
    "ports",
    "networking_config",
    "detach",
    "kernel_memory",
    "lxc_conf",
    "use_config_proxy",
    "version",
];

/// Whether `key` is a `container_create_kwargs` keyword this worker accepts, so a host
/// policy's allow-list can be checked for typos.
pub fn is_keyword(key: &str) -> bool {
    keyword(key).is_some() || SPECIAL_KEYWORDS.contains(&key)
}

/// The row of [`KEYWORDS`] for `key`.
fn keyword(key: &str) -> Option<&'static Keyword> {
    KEYWORDS.iter().find(|(k, _)| *k == key).map(|(_, kw)| kw)
}

/// Python truthiness of a JSON value.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
    }
}

fn expected(what: &str, got: &Value) -> String {
    format!("expected {what}; got {got}")
}

fn string(value: &Value) -> Result<Value, String> {
    match value {
        Value::String(_) => Ok(value.clone()),
        other => Err(expected("a string", other)),
    }
}

fn integer(value: &Value) -> Result<Value, String> {
    match value {
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(value.clone()),
        other => Err(expected("an integer", other)),
    }
}

fn boolean(value: &Value) -> Result<Value, String> {
    match value {
        Value::Bool(_) => Ok(value.clone()),
        other => Err(expected("true or false", other)),
    }
}

/// A size: a whole number of bytes, or a docker-py size string (`"1g"`).
fn bytes(value: &Value) -> Result<Value, String> {
    match value {
        Value::String(s) => parse_bytes(s).map(|n| json!(n)),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(value.clone()),
        other => Err(expected(
            "a size such as \"1g\" or a whole number of bytes",
            other,
        )),
    }
}

/// docker-py sends `str(user)`: a uid may be a number.
fn user(value: &Value) -> Result<Value, String> {
    match value {
        Value::String(_) | Value::Number(_) => Ok(json!(python_str(value))),
        other => Err(expected("a user name or id", other)),
    }
}

/// A command line: a string (split like a shell does) or a list of strings.
fn command(value: &Value) -> Result<Value, String> {
    match value {
        Value::String(s) => shlex::split(s)
            .map(|words| json!(words))
            .ok_or_else(|| format!("unbalanced quotes in {value}")),
        Value::Array(items) if items.iter().all(Value::is_string) => Ok(value.clone()),
        other => Err(expected("a string or a list of strings", other)),
    }
}

/// A list of strings. A lone string is taken as a one-item list and other scalars are
/// stringified (docker-py passes both to the Engine, which refuses them).
fn string_list(value: &Value) -> Result<Value, String> {
    match value {
        Value::String(s) => Ok(json!([s])),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(_) => Ok(item.clone()),
                Value::Number(_) | Value::Bool(_) => Ok(json!(python_str(item))),
                other => Err(expected("a list of strings", other)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        other => Err(expected("a list of strings", other)),
    }
}

/// `volumes_from`: a list, or one comma-separated string (docker-py splits it).
fn volumes_from(value: &Value) -> Result<Value, String> {
    match value {
        Value::String(s) => Ok(json!(s.split(',').collect::<Vec<_>>())),
        other => string_list(other),
    }
}

/// An object of strings (`storage_opt`).
fn string_map(value: &Value) -> Result<Value, String> {
    match value {
        Value::Object(map) if map.values().all(Value::is_string) => Ok(value.clone()),
        other => Err(expected("an object of strings", other)),
    }
}

/// `sysctls`: docker-py stringifies the values.
fn sysctls(value: &Value) -> Result<Value, String> {
    let Value::Object(map) = value else {
        return Err(expected(
            "an object such as {\"net.core.somaxconn\": \"1024\"}",
            value,
        ));
    };
    map.iter()
        .map(|(k, v)| match v {
            Value::Array(_) | Value::Object(_) | Value::Null => {
                Err(expected(&format!("a string or number for '{k}'"), v))
            }
            _ => Ok((k.clone(), json!(python_str(v)))),
        })
        .collect::<Result<Map<_, _>, _>>()
        .map(Value::Object)
}

/// `userns_mode` / `uts_mode`: docker-py accepts only `"host"`.
fn host_only(value: &Value) -> Result<Value, String> {
    match value {
        Value::String(s) if s == "host" => Ok(value.clone()),
        other => Err(format!(
            "only \"host\" is accepted (as by docker-py); got {other}"
        )),
    }
}

fn one_of(value: &Value, allowed: &[&str]) -> Result<Value, String> {
    match value {
        Value::String(s) if allowed.contains(&s.as_str()) => Ok(value.clone()),
        other => Err(expected(
            &format!(
                "one of {}",
                allowed
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            other,
        )),
    }
}

fn cgroupns(value: &Value) -> Result<Value, String> {
    one_of(value, &["private", "host"])
}

fn isolation(value: &Value) -> Result<Value, String> {
    one_of(value, &["default", "process", "hyperv"])
}

/// Renames an object's keys to the Engine's spelling, matching them as the Engine does
/// (case-insensitively; `_` is also ignored, so `maximum_retry_count` works too). Unknown
/// keys are kept as written.
fn engine_case(map: &Map<String, Value>, names: &[&str]) -> Map<String, Value> {
    map.iter()
        .map(|(k, v)| {
            let plain = k.replace('_', "");
            let key = names
                .iter()
                .find(|n| n.eq_ignore_ascii_case(&plain))
                .map_or_else(|| k.clone(), |n| (*n).to_owned());
            (key, v.clone())
        })
        .collect()
}

/// A list of objects, each with its keys in the Engine's spelling.
fn object_list(value: &Value, names: &[&str], what: &str) -> Result<Value, String> {
    let Value::Array(items) = value else {
        return Err(expected(what, value));
    };
    items
        .iter()
        .map(|item| match item {
            Value::Object(map) => Ok(Value::Object(engine_case(map, names))),
            other => Err(expected(what, other)),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn weight_devices(value: &Value) -> Result<Value, String> {
    object_list(
        value,
        &["Path", "Weight"],
        "a list such as [{\"Path\": \"/dev/sda\", \"Weight\": 200}]",
    )
}

fn throttle_devices(value: &Value) -> Result<Value, String> {
    object_list(
        value,
        &["Path", "Rate"],
        "a list such as [{\"Path\": \"/dev/sda\", \"Rate\": 1048576}]",
    )
}

/// `mounts`: Engine mount objects (docker-py passes them through).
fn mounts(value: &Value) -> Result<Value, String> {
    const WHAT: &str = "a list of mount objects such as {\"Type\": \"volume\", \"Source\": \"v\", \"Target\": \"/data\"}";
    const MOUNT: &[&str] = &[
        "Target",
        "Source",
        "Type",
        "ReadOnly",
        "Consistency",
        "BindOptions",
        "VolumeOptions",
        "ImageOptions",
        "TmpfsOptions",
    ];
    const BIND: &[&str] = &[
        "Propagation",
        "NonRecursive",
        "CreateMountpoint",
        "ReadOnlyNonRecursive",
        "ReadOnlyForceRecursive",
    ];
    const VOLUME: &[&str] = &["NoCopy", "Labels", "DriverConfig", "Subpath"];
    const DRIVER: &[&str] = &["Name", "Options"];
    const TMPFS: &[&str] = &["SizeBytes", "Mode", "Options"];
    const IMAGE: &[&str] = &["Subpath"];
    let Value::Array(_) = value else {
        return Err(expected(WHAT, value));
    };
    let mut list = object_list(value, MOUNT, WHAT)?;
    for mount in list.as_array_mut().into_iter().flatten() {
        for (options, names) in [
            ("BindOptions", BIND),
            ("VolumeOptions", VOLUME),
            ("ImageOptions", IMAGE),
            ("TmpfsOptions", TMPFS),
        ] {
            if let Some(Value::Object(map)) = mount.get_mut(options) {
                *map = engine_case(map, names);
                if let Some(Value::Object(driver)) = map.get_mut("DriverConfig") {
                    *driver = engine_case(driver, DRIVER);
                }
            }
        }
    }
    Ok(list)
}

/// `restart_policy`: `{"Name": "on-failure", "MaximumRetryCount": 3}`.
fn restart_policy(value: &Value) -> Result<Value, String> {
    const WHAT: &str = "an object such as {\"Name\": \"on-failure\", \"MaximumRetryCount\": 3}";
    let Value::Object(map) = value else {
        return Err(expected(WHAT, value));
    };
    let policy = engine_case(map, &["Name", "MaximumRetryCount"]);
    if let Some(name) = policy.get("Name") {
        one_of(name, &["", "no", "always", "unless-stopped", "on-failure"])
            .map_err(|m| format!("Name: {m}"))?;
    }
    if let Some(count) = policy.get("MaximumRetryCount") {
        integer(count).map_err(|m| format!("MaximumRetryCount: {m}"))?;
    }
    Ok(Value::Object(policy))
}

/// The value of `name` or, failing that, `Name` (docker-py's types read both spellings).
fn either<'v>(map: &'v Map<String, Value>, lower: &str, upper: &str) -> Option<&'v Value> {
    map.get(lower)
        .or_else(|| map.get(upper))
        .filter(|v| !v.is_null())
}

/// `log_config`: `{"type": "json-file", "config": {"max-size": "10m"}}` → `LogConfig`.
fn log_config(value: &Value) -> Result<Value, String> {
    let Value::Object(map) = value else {
        return Err(expected(
            "an object such as {\"type\": \"json-file\", \"config\": {\"max-size\": \"10m\"}}",
            value,
        ));
    };
    let mut out = Map::new();
    if let Some(kind) = either(map, "type", "Type") {
        out.insert(
            "Type".into(),
            string(kind).map_err(|m| format!("type: {m}"))?,
        );
    }
    let config = match either(map, "config", "Config") {
        Some(config) if truthy(config) => string_map(config).map_err(|m| format!("config: {m}"))?,
        _ => json!({}),
    };
    out.insert("Config".into(), config);
    Ok(Value::Object(out))
}

/// `ulimits`: `[{"name": "nofile", "soft": 1024, "hard": 2048}]`.
fn ulimits(value: &Value) -> Result<Value, String> {
    const WHAT: &str = "a list such as [{\"name\": \"nofile\", \"soft\": 1024, \"hard\": 2048}]";
    let Value::Array(items) = value else {
        return Err(expected(WHAT, value));
    };
    items
        .iter()
        .map(|item| {
            let Value::Object(map) = item else {
                return Err(expected(WHAT, item));
            };
            let mut out = Map::new();
            match either(map, "name", "Name") {
                Some(name @ Value::String(_)) => out.insert("Name".into(), name.clone()),
                _ => return Err(format!("each ulimit needs a string name; got {item}")),
            };
            for (lower, upper) in [("soft", "Soft"), ("hard", "Hard")] {
                if let Some(limit) = either(map, lower, upper) {
                    out.insert(
                        upper.into(),
                        integer(limit).map_err(|m| format!("{lower}: {m}"))?,
                    );
                }
            }
            Ok(Value::Object(out))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// `device_requests`: docker-py's `DeviceRequest`, every field filled with its default.
fn device_requests(value: &Value) -> Result<Value, String> {
    const WHAT: &str =
        "a list such as [{\"driver\": \"nvidia\", \"count\": -1, \"capabilities\": [[\"gpu\"]]}]";
    let Value::Array(items) = value else {
        return Err(expected(WHAT, value));
    };
    items
        .iter()
        .map(|item| match item {
            Value::Object(map) => device_request(map),
            other => Err(expected(WHAT, other)),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// One `DeviceRequest`, fields read in either spelling and checked in docker-py's order.
fn device_request(map: &Map<String, Value>) -> Result<Value, String> {
    let field = |lower: &str, upper: &str| either(map, lower, upper);
    let driver = match field("driver", "Driver") {
        None => json!(""),
        Some(v) => string(v).map_err(|m| format!("driver: {m}"))?,
    };
    let count = match field("count", "Count") {
        None => json!(0),
        Some(v) => integer(v).map_err(|m| format!("count: {m}"))?,
    };
    let device_ids = match field("device_ids", "DeviceIDs") {
        None => json!([]),
        Some(v @ Value::Array(ids)) if ids.iter().all(Value::is_string) => v.clone(),
        Some(v) => return Err(format!("device_ids: {}", expected("a list of strings", v))),
    };
    let capabilities = match field("capabilities", "Capabilities") {
        None => json!([]),
        Some(v @ Value::Array(sets))
            if sets.iter().all(|set| {
                set.as_array()
                    .is_some_and(|caps| caps.iter().all(Value::is_string))
            }) =>
        {
            v.clone()
        }
        Some(v) => {
            return Err(format!(
                "capabilities: {}",
                expected("a list of lists of strings such as [[\"gpu\"]]", v)
            ));
        }
    };
    let options = match field("options", "Options") {
        None => json!({}),
        Some(v) => string_map(v).map_err(|m| format!("options: {m}"))?,
    };
    Ok(json!({
        "Driver": driver,
        "Count": count,
        "DeviceIDs": device_ids,
        "Capabilities": capabilities,
        "Options": options,
    }))
}

/// `healthcheck`: docker-py's `Healthcheck` (a string test runs in the shell).
fn healthcheck(value: &Value) -> Result<Value, String> {
    let Value::Object(map) = value else {
        return Err(expected(
            "an object such as {\"test\": \"curl -f http://localhost/\", \"interval\": 1000000000}",
            value,
        ));
    };
    if map.is_empty() {
        return Ok(json!({}));
    }
    let mut out = Map::new();
    match either(map, "test", "Test") {
        None => {}
        Some(Value::String(s)) => {
            out.insert("Test".into(), json!(["CMD-SHELL", s]));
        }
        Some(test) => {
            let list = command(test).map_err(|m| format!("test: {m}"))?;
            out.insert("Test".into(), list);
        }
    }
    // StartInterval is not read by docker-py; the Engine (API 1.44+) takes it.
    for (lower, upper) in [
        ("interval", "Interval"),
        ("timeout", "Timeout"),
        ("retries", "Retries"),
        ("start_period", "StartPeriod"),
        ("start_interval", "StartInterval"),
    ] {
        if let Some(v) = either(map, lower, upper) {
            out.insert(
                upper.into(),
                integer(v).map_err(|m| format!("{lower}: {m}"))?,
            );
        }
    }
    Ok(Value::Object(out))
}

/// `links`: `{"db": "alias"}` or `[["db", "alias"]]` → sorted `db:alias` (`db` alone when
/// the alias is empty); `"db:alias"` strings are taken as they are.
fn links(value: &Value) -> Result<Value, String> {
    const WHAT: &str = "an object such as {\"db\": \"database\"}";
    let mut pairs: Vec<(String, Value)> = Vec::new();
    let mut written: Vec<String> = Vec::new();
    match value {
        Value::Object(map) => pairs.extend(map.iter().map(|(k, v)| (k.clone(), v.clone()))),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) => written.push(s.clone()),
                    Value::Array(pair) if pair.len() == 2 && pair[0].is_string() => {
                        pairs.push((python_str(&pair[0]), pair[1].clone()));
                    }
                    other => return Err(expected(WHAT, other)),
                }
            }
        }
        other => return Err(expected(WHAT, other)),
    }
    pairs.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| python_str(&a.1).cmp(&python_str(&b.1)))
    });
    let mut out: Vec<String> = pairs
        .into_iter()
        .map(|(name, alias)| {
            if truthy(&alias) {
                format!("{name}:{}", python_str(&alias))
            } else {
                name
            }
        })
        .collect();
    out.extend(written);
    Ok(json!(out))
}

/// `ports` as docker-py takes it: container port (`"80"`, `"80/tcp"`) → a host port (number or
/// string; null = any free port), a `{"HostIp": …, "HostPort": …}` object, or a list of these.
/// A list `["127.0.0.1", 8080]` (or `["127.0.0.1"]`) whose first item is an IP address is read
/// as docker-py's `(ip, port)` tuple, which JSON cannot express.
fn convert_ports(value: &Value) -> Result<(Value, Value), String> {
    let map = value.as_object().ok_or_else(|| {
        expected(
            "an object of container port to host port such as {\"80/tcp\": 8080}",
            value,
        )
    })?;
    let mut exposed = Map::new();
    let mut bindings = Map::new();
    for (port, host) in map {
        let key = if port.contains('/') {
            port.clone()
        } else {
            format!("{port}/tcp")
        };
        let list = host_bindings(&key, host)?;
        exposed.insert(key.clone(), json!({}));
        bindings.insert(key, Value::Array(list));
    }
    Ok((Value::Object(exposed), Value::Object(bindings)))
}

/// The bindings of one container port (`key`, as `80/tcp`): an `(ip, port)` or `(ip,)`
/// tuple written as a list, a list of host ports, or one host port.
fn host_bindings(key: &str, host: &Value) -> Result<Vec<Value>, String> {
    let Value::Array(items) = host else {
        return Ok(vec![port_binding(key, "", host)?]);
    };
    let tuple = match items.as_slice() {
        [ip, port] if ip_of(port).is_none() => ip_of(ip).map(|ip| (ip, port)),
        [ip] => ip_of(ip).map(|ip| (ip, &Value::Null)),
        _ => None,
    };
    match tuple {
        Some((ip, port)) => Ok(vec![port_binding(key, ip, port)?]),
        None => items.iter().map(|p| port_binding(key, "", p)).collect(),
    }
}

/// The text of a value that is an IP address.
fn ip_of(value: &Value) -> Option<&str> {
    value
        .as_str()
        .filter(|s| s.parse::<std::net::IpAddr>().is_ok())
}

/// One `{"HostIp": …, "HostPort": …}` binding on `ip` from a host port (null = any free
/// port) or from a binding object (which brings its own address).
fn port_binding(key: &str, ip: &str, host_port: &Value) -> Result<Value, String> {
    let host_port = match host_port {
        Value::Null => String::new(),
        Value::String(_) | Value::Number(_) => python_str(host_port),
        Value::Object(b) => {
            let port = b
                .get("HostPort")
                .filter(|p| !p.is_object() && !p.is_array())
                .ok_or_else(|| {
                    format!("{key}: a binding object needs a HostPort; got {host_port}")
                })?;
            let ip = b.get("HostIp").map_or_else(String::new, python_str);
            let port = if port.is_null() {
                String::new()
            } else {
                python_str(port)
            };
            return Ok(json!({"HostIp": ip, "HostPort": port}));
        }
        other => return Err(format!("{key}: {}", expected("a host port", other))),
    };
    Ok(json!({"HostIp": ip, "HostPort": host_port}))
}

/// `devices`: `"/dev/x[:/dev/y[:rwm]]"` strings or Engine device objects.
fn devices(value: &Value) -> Result<Value, String> {
    const WHAT: &str = "a list of strings such as \"/dev/fuse:/dev/fuse:rwm\"";
    let Value::Array(items) = value else {
        return Err(expected(WHAT, value));
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                let host = parts[0];
                let container = parts.get(1).copied().unwrap_or(host);
                let permissions = parts.get(2).copied().unwrap_or("rwm");
                Ok(json!({"PathOnHost": host, "PathInContainer": container, "CgroupPermissions": permissions}))
            }
            Value::Object(map) => Ok(Value::Object(engine_case(
                map,
                &["PathOnHost", "PathInContainer", "CgroupPermissions"],
            ))),
            other => Err(expected(WHAT, other)),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// `tmpfs`: `{"/run": "size=1m"}` or `["/run:size=1m", "/tmp"]`.
fn tmpfs(value: &Value) -> Result<Value, String> {
    const WHAT: &str =
        "an object such as {\"/run\": \"size=64m\"} or a list such as [\"/run:size=64m\"]";
    match value {
        Value::Object(_) => string_map(value).map_err(|_| expected(WHAT, value)),
        Value::Array(items) => {
            let mut out = Map::new();
            for item in items {
                let s = item.as_str().ok_or_else(|| expected(WHAT, item))?;
                let (path, options) = s.split_once(':').unwrap_or((s, ""));
                out.insert(path.to_owned(), json!(options));
            }
            Ok(Value::Object(out))
        }
        other => Err(expected(WHAT, other)),
    }
}

/// Keywords whose values carry secrets by design (a logging driver's options hold its
/// tokens), whatever their keys are called.
const SECRET_KEYWORDS: &[&str] = &["log_config"];

/// Whether a keyword's value may hold a secret: a keyword made for them, a keyword named like
/// one, or a value with a key named like one at any depth.
fn may_hold_secret(key: &str, value: &Value) -> bool {
    SECRET_KEYWORDS.contains(&key)
        || crate::redact::is_secret_name(key)
        || crate::redact::holds_secret_key(value)
}

/// A message without the value it echoes: what was expected is kept, what was given is not.
fn withhold_value(message: &str) -> String {
    const WITHHELD: &str = "a value not shown here, as it may hold a secret";
    match message.find("; got ") {
        Some(at) => format!("{}; got {WITHHELD}", &message[..at]),
        None => format!("invalid: {WITHHELD}"),
    }
}

/// Maps `container_create_kwargs` to Engine fields.
///
/// # Errors
/// Every keyword that cannot be used, with what is wrong: unknown keywords (named),
/// `environment`/`network` (which clash with job fields), keywords docker-py refuses, and
/// values of the wrong shape.
pub fn map_create_kwargs(kwargs: &Map<String, Value>) -> Result<EngineOverrides, Vec<KwargError>> {
    let mut out = EngineOverrides::default();
    let mut errors = Vec::new();
    for (key, value) in kwargs {
        if JOB_FIELDS.contains(&key.as_str()) {
            if key == "volumes" {
                // The reference's warning, word for word.
                out.warnings.push(
                    "volumes should be specified in job_variables rather than container_create_kwargs. Use job_variables={'volumes': ['/host/path:/container/path']} instead. The volumes in container_create_kwargs will be ignored.".to_owned(),
                );
            }
            continue;
        }
        out.keys.push(key.clone());
        if let Err(message) = map_keyword(&mut out, key, value) {
            let message = if may_hold_secret(key, value) {
                withhold_value(&message)
            } else {
                message
            };
            errors.push(KwargError {
                key: key.clone(),
                message,
            });
        }
    }
    set_attach_flags(&mut out, kwargs);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Maps one keyword that is not a job field into `out`. A dispatch table: the keywords with
/// rules of their own, then [`KEYWORDS`] for the rest.
///
/// # Errors
/// What is wrong with the keyword or its value.
fn map_keyword(out: &mut EngineOverrides, key: &str, value: &Value) -> Result<(), String> {
    match key {
        "extra_hosts" => out.extra_hosts = Some(value.clone()),
        "platform" => out.platform = platform(value)?,
        "ports" => ports(out, value)?,
        "networking_config" => out.networking_config = networking_config(value)?,
        // docker-py: when not detached the container attaches stdout/stderr, and stdin too
        // with stdin_open; the flags are set after every keyword (`set_attach_flags`).
        "detach" => {
            if !value.is_null() {
                boolean(value)?;
            }
        }
        "environment" | "network" => return Err(format!(
            "not allowed: use the `{}` job variable instead",
            if key == "environment" { "env" } else { "networks" }
        )),
        "remove" => return Err(
            "not a containers.create argument (docker-py refuses it): use the `auto_remove` job variable instead".to_owned(),
        ),
        "init_path" => return Err(
            "not supported: docker-py refuses it for Engine API versions above 1.29 (init_path param is not supported in API versions > 1.29)".to_owned(),
        ),
        "mac_address" => return Err(
            "not supported by this worker: its Engine API client has no container-level MacAddress (the Engine moved it to the network endpoint in API 1.44)".to_owned(),
        ),
        "kernel_memory" => {
            out.warnings.push(
                "container_create_kwargs.kernel_memory is ignored: the Docker Engine no longer supports kernel memory limits".to_owned(),
            );
            if truthy(value) {
                bytes(value)?;
            }
        }
        "lxc_conf" => out.warnings.push(
            "container_create_kwargs.lxc_conf is ignored: the Docker Engine has had no LXC driver since 1.10".to_owned(),
        ),
        "use_config_proxy" | "version" => out.warnings.push(format!(
            "container_create_kwargs.{key} has no effect and is ignored"
        )),
        other => engine_field(out, other, value)?,
    }
    Ok(())
}

/// `platform`: a create query parameter, trimmed; null sets nothing.
fn platform(value: &Value) -> Result<Option<String>, String> {
    match value {
        Value::Null => Ok(None),
        Value::String(p) if !p.trim().is_empty() => Ok(Some(p.trim().to_owned())),
        other => Err(expected("a string such as \"linux/amd64\"", other)),
    }
}

/// `ports`: `ExposedPorts` and `PortBindings`, only when the value is truthy.
fn ports(out: &mut EngineOverrides, value: &Value) -> Result<(), String> {
    if !truthy(value) {
        return Ok(());
    }
    let (exposed, bindings) = convert_ports(value)?;
    out.config.insert("ExposedPorts".into(), exposed);
    out.host_config.insert("PortBindings".into(), bindings);
    Ok(())
}

/// `networking_config`: endpoint settings by network name, with the settings' field names in
/// the Engine's spelling; null sets nothing.
fn networking_config(value: &Value) -> Result<Option<Map<String, Value>>, String> {
    const ENDPOINT_FIELDS: &[&str] = &[
        "IPAMConfig",
        "Links",
        "MacAddress",
        "Aliases",
        "DriverOpts",
        "GwPriority",
        "DNSNames",
    ];
    match value {
        Value::Null => Ok(None),
        Value::Object(map) => Ok(Some(
            map.iter()
                .map(|(network, settings)| {
                    let settings = match settings {
                        Value::Object(s) => Value::Object(engine_case(s, ENDPOINT_FIELDS)),
                        other => other.clone(),
                    };
                    (network.clone(), settings)
                })
                .collect(),
        )),
        other => Err(expected(
            "an object of network name to endpoint settings",
            other,
        )),
    }
}

/// A keyword of [`KEYWORDS`]: its Engine field, set when docker-py would send it.
///
/// # Errors
/// An unknown keyword, or a value its conversion refuses.
fn engine_field(out: &mut EngineOverrides, key: &str, value: &Value) -> Result<(), String> {
    let keyword = keyword(key).ok_or_else(|| {
        format!("unknown key '{key}' (not a docker-py containers.create argument)")
    })?;
    let sent = match keyword.when {
        When::Truthy => truthy(value),
        When::NotNull => !value.is_null(),
    };
    if !sent {
        return Ok(());
    }
    let converted = (keyword.convert)(value)?;
    let target = if keyword.host {
        &mut out.host_config
    } else {
        &mut out.config
    };
    target.insert(keyword.field.to_owned(), converted);
    Ok(())
}

/// docker-py's attach flags: a detached container attaches nothing; otherwise stdout and
/// stderr, and stdin (once) when it is kept open.
fn set_attach_flags(out: &mut EngineOverrides, kwargs: &Map<String, Value>) {
    if kwargs.get("detach").is_some_and(truthy) {
        out.config.insert("AttachStdout".into(), json!(false));
        out.config.insert("AttachStderr".into(), json!(false));
    } else if kwargs.get("stdin_open").is_some_and(truthy) {
        out.config.insert("AttachStdin".into(), json!(true));
        out.config.insert("StdinOnce".into(), json!(true));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Result<EngineOverrides, Vec<KwargError>> {
        map_create_kwargs(v.as_object().unwrap())
    }

    /// A rejected value that may hold a secret is not echoed; the field and what was
    /// expected still are.
    #[test]
    fn secret_values_are_not_echoed() {
        for (kwargs, key, expected) in [
            (
                json!({"log_config": {"type": "splunk", "config": {"splunk-token": "SECRET1", "splunk-insecureskipverify": true}}}),
                "log_config",
                "config: expected an object of strings; got a value not shown here, as it may hold a secret",
            ),
            (
                json!({"log_config": "SECRET2"}),
                "log_config",
                "expected an object such as {\"type\": \"json-file\", \"config\": {\"max-size\": \"10m\"}}; got a value not shown here, as it may hold a secret",
            ),
            (
                json!({"storage_opt": {"api_key": 5, "note": "SECRET3"}}),
                "storage_opt",
                "expected an object of strings; got a value not shown here, as it may hold a secret",
            ),
        ] {
            let errors = errors(kwargs.clone());
            assert_eq!(
                errors,
                vec![(key.to_owned(), expected.to_owned())],
                "{kwargs}"
            );
        }
        // Other values are still shown.
        assert_eq!(
            errors(json!({"storage_opt": {"size": 5}})),
            vec![(
                "storage_opt".to_owned(),
                "expected an object of strings; got {\"size\":5}".to_owned()
            )]
        );
    }

    fn errors(v: Value) -> Vec<(String, String)> {
        map(v)
            .unwrap_err()
            .into_iter()
            .map(|e| (e.key, e.message))
            .collect()
    }

    /// The create body this worker sends before any keyword applies (and docker-py too).
    fn baseline() -> Map<String, Value> {
        json!({"Tty": false, "OpenStdin": false, "StdinOnce": false, "AttachStdin": false,
               "AttachStdout": true, "AttachStderr": true, "NetworkDisabled": false})
        .as_object()
        .unwrap()
        .clone()
    }

    /// For comparing with docker-py: drops fields equal to the baseline and null members
    /// (docker-py leaves unset members of its helper types as null; the Engine reads a missing
    /// member the same), and lower-cases the field names (the Engine matches them
    /// case-insensitively: docker-py's `CPURealtimePeriod` is the Engine's `CpuRealtimePeriod`).
    fn comparable(fields: &Map<String, Value>, baseline: &Map<String, Value>) -> Value {
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
        Value::Object(
            fields
                .iter()
                .filter(|(k, v)| baseline.get(*k) != Some(*v))
                .map(|(k, v)| (k.to_ascii_lowercase(), strip_nulls(v)))
                .collect(),
        )
    }

    /// Each row: `container_create_kwargs`, and the fields docker-py 7.2.0 puts in the create
    /// body for them (API 1.41) beyond what it sends without them. The expected JSON comes from
    /// calling docker-py in the reference's venv the way prefect-docker 0.7.4 does
    /// (`_create_container_args`, then `ContainerConfig`, then `APIClient._post_json`'s
    /// removal of top-level nulls); `scripts/docker-py-expectations.py` checks every row
    /// against docker-py and rewrites them with `--write` (no Docker daemon needed).
    #[test]
    fn same_create_body_as_docker_py() {
        let table: &[(&str, &str)] = &[
            (
                r#"{"ports": {"80/tcp": 8080, "81": "8181", "82/udp": [1, 2], "83": null, "84": {"HostIp": "127.0.0.1", "HostPort": 8484}, "85": [null, "8585"]}}"#,
                r#"{"config": {"ExposedPorts": {"80/tcp": {}, "81/tcp": {}, "82/udp": {}, "83/tcp": {}, "84/tcp": {}, "85/tcp": {}}}, "host_config": {"PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": "8080"}], "81/tcp": [{"HostIp": "", "HostPort": "8181"}], "82/udp": [{"HostIp": "", "HostPort": "1"}, {"HostIp": "", "HostPort": "2"}], "83/tcp": [{"HostIp": "", "HostPort": ""}], "84/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8484"}], "85/tcp": [{"HostIp": "", "HostPort": ""}, {"HostIp": "", "HostPort": "8585"}]}}}"#,
            ),
            (r#"{"ports": {}}"#, r#"{"config": {}, "host_config": {}}"#),
            (
                r#"{"device_requests": [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]}"#,
                r#"{"config": {}, "host_config": {"DeviceRequests": [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]}}"#,
            ),
            (
                r#"{"device_requests": [{"Driver": "nvidia", "DeviceIDs": ["0", "1"], "Options": {"a": "b"}}]}"#,
                r#"{"config": {}, "host_config": {"DeviceRequests": [{"Driver": "nvidia", "Count": 0, "DeviceIDs": ["0", "1"], "Capabilities": [], "Options": {"a": "b"}}]}}"#,
            ),
            (
                r#"{"device_requests": [{}]}"#,
                r#"{"config": {}, "host_config": {"DeviceRequests": [{"Driver": "", "Count": 0, "DeviceIDs": [], "Capabilities": [], "Options": {}}]}}"#,
            ),
            (
                r#"{"shm_size": "1g", "ipc_mode": "host", "nano_cpus": 500000000}"#,
                r#"{"config": {}, "host_config": {"ShmSize": 1073741824, "IpcMode": "host", "NanoCpus": 500000000}}"#,
            ),
            (
                r#"{"shm_size": 1048576}"#,
                r#"{"config": {}, "host_config": {"ShmSize": 1048576}}"#,
            ),
            (
                r#"{"cpu_shares": 512, "cpuset_cpus": "0,1", "cpuset_mems": "0", "cpu_count": 2, "cpu_percent": 50, "cpu_period": 100000, "cpu_quota": 50000}"#,
                r#"{"config": {}, "host_config": {"CpuQuota": 50000, "CpuPeriod": 100000, "CpuShares": 512, "CpusetCpus": "0,1", "CpusetMems": "0", "CpuCount": 2, "CpuPercent": 50}}"#,
            ),
            (
                r#"{"cpu_rt_period": 1000000, "cpu_rt_runtime": 950000}"#,
                r#"{"config": {}, "host_config": {"CPURealtimePeriod": 1000000, "CPURealtimeRuntime": 950000}}"#,
            ),
            (
                r#"{"cpu_shares": 0, "cpuset_cpus": "", "pids_limit": 0, "oom_kill_disable": false, "publish_all_ports": false, "nano_cpus": 0, "runtime": "", "ipc_mode": "", "pid_mode": "", "cgroupns": ""}"#,
                r#"{"config": {}, "host_config": {}}"#,
            ),
            (
                r#"{"user": "nobody", "working_dir": "/tmp", "hostname": "h1", "domainname": "example.org", "stop_signal": "SIGINT"}"#,
                r#"{"config": {"Hostname": "h1", "Domainname": "example.org", "User": "nobody", "WorkingDir": "/tmp", "StopSignal": "SIGINT"}, "host_config": {}}"#,
            ),
            (
                r#"{"user": 1000}"#,
                r#"{"config": {"User": "1000"}, "host_config": {}}"#,
            ),
            (
                r#"{"user": null, "hostname": null, "working_dir": null}"#,
                r#"{"config": {}, "host_config": {}}"#,
            ),
            (
                r#"{"entrypoint": "sh -c 'echo hi'"}"#,
                r#"{"config": {"Entrypoint": ["sh", "-c", "echo hi"]}, "host_config": {}}"#,
            ),
            (
                r#"{"entrypoint": ["/bin/sh", "-c"]}"#,
                r#"{"config": {"Entrypoint": ["/bin/sh", "-c"]}, "host_config": {}}"#,
            ),
            (
                r#"{"entrypoint": null}"#,
                r#"{"config": {}, "host_config": {}}"#,
            ),
            (
                r#"{"dns": ["1.1.1.1"], "dns_search": ["example.internal"], "dns_opt": ["ndots:2"]}"#,
                r#"{"config": {}, "host_config": {"DnsSearch": ["example.internal"], "Dns": ["1.1.1.1"], "DnsOptions": ["ndots:2"]}}"#,
            ),
            (
                r#"{"dns": [], "dns_search": [], "dns_opt": []}"#,
                r#"{"config": {}, "host_config": {"Dns": [], "DnsOptions": []}}"#,
            ),
            (
                r#"{"cap_add": ["NET_ADMIN"], "cap_drop": ["MKNOD"]}"#,
                r#"{"config": {}, "host_config": {"CapAdd": ["NET_ADMIN"], "CapDrop": ["MKNOD"]}}"#,
            ),
            (
                r#"{"security_opt": ["no-new-privileges", "seccomp=unconfined"]}"#,
                r#"{"config": {}, "host_config": {"SecurityOpt": ["no-new-privileges", "seccomp=unconfined"]}}"#,
            ),
            (
                r#"{"ulimits": [{"name": "nofile", "soft": 1024, "hard": 2048}, {"Name": "nproc", "Soft": 64}]}"#,
                r#"{"config": {}, "host_config": {"Ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 2048}, {"Name": "nproc", "Soft": 64, "Hard": null}]}}"#,
            ),
            (
                r#"{"tmpfs": {"/run": "size=1m"}}"#,
                r#"{"config": {}, "host_config": {"Tmpfs": {"/run": "size=1m"}}}"#,
            ),
            (
                r#"{"tmpfs": ["/run:size=1m,uid=1000", "/tmp"]}"#,
                r#"{"config": {}, "host_config": {"Tmpfs": {"/run": "size=1m,uid=1000", "/tmp": ""}}}"#,
            ),
            (
                r#"{"devices": ["/dev/fuse", "/dev/sda:/dev/xvda", "/dev/sdb:/dev/xvdb:r"]}"#,
                r#"{"config": {}, "host_config": {"Devices": [{"PathOnHost": "/dev/fuse", "PathInContainer": "/dev/fuse", "CgroupPermissions": "rwm"}, {"PathOnHost": "/dev/sda", "PathInContainer": "/dev/xvda", "CgroupPermissions": "rwm"}, {"PathOnHost": "/dev/sdb", "PathInContainer": "/dev/xvdb", "CgroupPermissions": "r"}]}}"#,
            ),
            (
                r#"{"devices": [{"PathOnHost": "/dev/fuse", "PathInContainer": "/dev/fuse", "CgroupPermissions": "rwm"}]}"#,
                r#"{"config": {}, "host_config": {"Devices": [{"PathOnHost": "/dev/fuse", "PathInContainer": "/dev/fuse", "CgroupPermissions": "rwm"}]}}"#,
            ),
            (
                r#"{"group_add": ["audio", 1000]}"#,
                r#"{"config": {}, "host_config": {"GroupAdd": ["audio", "1000"]}}"#,
            ),
            (
                r#"{"read_only": true}"#,
                r#"{"config": {}, "host_config": {"ReadonlyRootfs": true}}"#,
            ),
            (
                r#"{"read_only": false}"#,
                r#"{"config": {}, "host_config": {"ReadonlyRootfs": false}}"#,
            ),
            (
                r#"{"sysctls": {"net.core.somaxconn": 1024, "net.ipv4.ip_forward": "1"}}"#,
                r#"{"config": {}, "host_config": {"Sysctls": {"net.core.somaxconn": "1024", "net.ipv4.ip_forward": "1"}}}"#,
            ),
            (
                r#"{"init": true}"#,
                r#"{"config": {}, "host_config": {"Init": true}}"#,
            ),
            (
                r#"{"init": false}"#,
                r#"{"config": {}, "host_config": {"Init": false}}"#,
            ),
            (
                r#"{"runtime": "runc"}"#,
                r#"{"config": {}, "host_config": {"Runtime": "runc"}}"#,
            ),
            (
                r#"{"restart_policy": {"Name": "on-failure", "MaximumRetryCount": 3}}"#,
                r#"{"config": {}, "host_config": {"RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 3}}}"#,
            ),
            (
                r#"{"healthcheck": {"test": "curl -f http://localhost/", "interval": 1000000000, "timeout": 2000000000, "retries": 3, "start_period": 5000000000}}"#,
                r#"{"config": {"Healthcheck": {"Test": ["CMD-SHELL", "curl -f http://localhost/"], "Interval": 1000000000, "Timeout": 2000000000, "Retries": 3, "StartPeriod": 5000000000}}, "host_config": {}}"#,
            ),
            (
                r#"{"healthcheck": {"Test": ["CMD", "true"], "Interval": 1000000000}}"#,
                r#"{"config": {"Healthcheck": {"Test": ["CMD", "true"], "Interval": 1000000000, "Timeout": null, "Retries": null, "StartPeriod": null}}, "host_config": {}}"#,
            ),
            (
                r#"{"healthcheck": {"test": ["NONE"]}}"#,
                r#"{"config": {"Healthcheck": {"Test": ["NONE"], "Interval": null, "Timeout": null, "Retries": null, "StartPeriod": null}}, "host_config": {}}"#,
            ),
            (
                r#"{"log_config": {"type": "json-file", "config": {"max-size": "10m"}}}"#,
                r#"{"config": {}, "host_config": {"LogConfig": {"Type": "json-file", "Config": {"max-size": "10m"}}}}"#,
            ),
            (
                r#"{"log_config": {"Type": "none"}}"#,
                r#"{"config": {}, "host_config": {"LogConfig": {"Type": "none", "Config": {}}}}"#,
            ),
            (
                r#"{"pids_limit": 100, "oom_kill_disable": true, "oom_score_adj": 500, "mem_swappiness": 10}"#,
                r#"{"config": {}, "host_config": {"MemorySwappiness": 10, "OomKillDisable": true, "OomScoreAdj": 500, "PidsLimit": 100}}"#,
            ),
            (
                r#"{"mem_swappiness": 0}"#,
                r#"{"config": {}, "host_config": {"MemorySwappiness": 0}}"#,
            ),
            (
                r#"{"mem_reservation": 1048576}"#,
                r#"{"config": {}, "host_config": {"MemoryReservation": 1048576}}"#,
            ),
            (
                r#"{"tty": true, "stdin_open": true}"#,
                r#"{"config": {"Tty": true, "OpenStdin": true, "StdinOnce": true, "AttachStdin": true}, "host_config": {}}"#,
            ),
            (
                r#"{"detach": true}"#,
                r#"{"config": {"AttachStdout": false, "AttachStderr": false}, "host_config": {}}"#,
            ),
            (
                r#"{"detach": true, "stdin_open": true}"#,
                r#"{"config": {"OpenStdin": true, "AttachStdout": false, "AttachStderr": false}, "host_config": {}}"#,
            ),
            (
                r#"{"network_disabled": true}"#,
                r#"{"config": {"NetworkDisabled": true}, "host_config": {}}"#,
            ),
            (
                r#"{"blkio_weight": 300, "blkio_weight_device": [{"Path": "/dev/sda", "Weight": 200}]}"#,
                r#"{"config": {}, "host_config": {"BlkioWeight": 300, "BlkioWeightDevice": [{"Path": "/dev/sda", "Weight": 200}]}}"#,
            ),
            (
                r#"{"device_read_bps": [{"Path": "/dev/sda", "Rate": 1048576}], "device_write_bps": [{"Path": "/dev/sda", "Rate": 1048576}], "device_read_iops": [{"Path": "/dev/sda", "Rate": 100}], "device_write_iops": [{"Path": "/dev/sda", "Rate": 100}]}"#,
                r#"{"config": {}, "host_config": {"BlkioDeviceReadBps": [{"Path": "/dev/sda", "Rate": 1048576}], "BlkioDeviceWriteBps": [{"Path": "/dev/sda", "Rate": 1048576}], "BlkioDeviceReadIOps": [{"Path": "/dev/sda", "Rate": 100}], "BlkioDeviceWriteIOps": [{"Path": "/dev/sda", "Rate": 100}]}}"#,
            ),
            (
                r#"{"device_cgroup_rules": ["c 1:3 mr"]}"#,
                r#"{"config": {}, "host_config": {"DeviceCgroupRules": ["c 1:3 mr"]}}"#,
            ),
            (
                r#"{"cgroup_parent": "/mygroup", "cgroupns": "private"}"#,
                r#"{"config": {}, "host_config": {"CgroupParent": "/mygroup", "CgroupnsMode": "private"}}"#,
            ),
            (
                r#"{"isolation": "default"}"#,
                r#"{"config": {}, "host_config": {"Isolation": "default"}}"#,
            ),
            (
                r#"{"userns_mode": "host", "uts_mode": "host", "pid_mode": "host"}"#,
                r#"{"config": {}, "host_config": {"PidMode": "host", "UsernsMode": "host", "UTSMode": "host"}}"#,
            ),
            (
                r#"{"volume_driver": "local", "volumes_from": ["other:ro"]}"#,
                r#"{"config": {}, "host_config": {"VolumesFrom": ["other:ro"], "VolumeDriver": "local"}}"#,
            ),
            (
                r#"{"volumes_from": "a,b:ro"}"#,
                r#"{"config": {}, "host_config": {"VolumesFrom": ["a", "b:ro"]}}"#,
            ),
            (
                r#"{"storage_opt": {"size": "10G"}}"#,
                r#"{"config": {}, "host_config": {"StorageOpt": {"size": "10G"}}}"#,
            ),
            (
                r#"{"links": {"db": "database", "cache": null}}"#,
                r#"{"config": {}, "host_config": {"Links": ["cache", "db:database"]}}"#,
            ),
            (
                r#"{"links": [["db", "database"]]}"#,
                r#"{"config": {}, "host_config": {"Links": ["db:database"]}}"#,
            ),
            (
                r#"{"mounts": [{"Target": "/data", "Source": "vol", "Type": "volume", "ReadOnly": true}]}"#,
                r#"{"config": {}, "host_config": {"Mounts": [{"Target": "/data", "Source": "vol", "Type": "volume", "ReadOnly": true}]}}"#,
            ),
            (
                r#"{"publish_all_ports": true}"#,
                r#"{"config": {}, "host_config": {"PublishAllPorts": true}}"#,
            ),
            (
                r#"{"platform": "linux/amd64", "use_config_proxy": false, "version": "1.30"}"#,
                r#"{"config": {}, "host_config": {}}"#,
            ),
            (
                r#"{"image": "ignored", "command": "ignored", "name": "ignored", "labels": {"a": "b"}, "env": {"A": "1"}, "volumes": ["/x:/y"], "mem_limit": "1g", "privileged": true, "auto_remove": true, "network_mode": "host", "networks": ["n"], "stream_output": false, "image_pull_policy": "Never", "registry_credentials": {}, "memswap_limit": "1g", "container_create_kwargs": {}}"#,
                r#"{"config": {}, "host_config": {}}"#,
            ),
            (
                r#"{"networking_config": {"n": {"Aliases": ["a"]}}}"#,
                r#"{"config": {}, "host_config": {}}"#,
            ),
        ];
        let empty = Map::new();
        for (kwargs, expected) in table {
            let kwargs: Value = serde_json::from_str(kwargs).unwrap();
            let expected: Value = serde_json::from_str(expected).unwrap();
            let out = map(kwargs.clone()).unwrap_or_else(|e| panic!("{kwargs}: {e:?}"));
            let want_config = expected["config"].as_object().unwrap();
            let want_host = expected["host_config"].as_object().unwrap();
            assert_eq!(
                comparable(&out.config, &baseline()),
                comparable(want_config, &empty),
                "config for {kwargs}"
            );
            assert_eq!(
                comparable(&out.host_config, &empty),
                comparable(want_host, &empty),
                "HostConfig for {kwargs}"
            );
        }
    }

    /// Keywords docker-py fails on (its error, from the same run, on the right; checked and
    /// regenerated by `scripts/docker-py-expectations.py`) are validation errors here, each
    /// naming the key.
    #[test]
    fn docker_py_failures_are_validation_errors() {
        let table: &[(&str, &str)] = &[
            (
                r#"{"bogus": 1}"#,
                "TypeError: run() got an unexpected keyword argument 'bogus'",
            ),
            (
                r#"{"remove": true}"#,
                "TypeError: run() got an unexpected keyword argument 'remove'",
            ),
            (
                r#"{"init_path": "/usr/bin/docker-init"}"#,
                "InvalidVersion: init_path param is not supported in API versions > 1.29",
            ),
            (
                r#"{"cpu_shares": "512"}"#,
                "TypeError: Invalid type for cpu_shares param: expected int but found <class 'str'>",
            ),
            (
                r#"{"cpu_shares": 1.5}"#,
                "TypeError: Invalid type for cpu_shares param: expected int but found <class 'float'>",
            ),
            (
                r#"{"nano_cpus": "1"}"#,
                "TypeError: Invalid type for nano_cpus param: expected int but found <class 'str'>",
            ),
            (
                r#"{"pids_limit": "100"}"#,
                "TypeError: Invalid type for pids_limit param: expected int but found <class 'str'>",
            ),
            (
                r#"{"mem_swappiness": "10"}"#,
                "TypeError: Invalid type for mem_swappiness param: expected int but found <class 'str'>",
            ),
            (
                r#"{"oom_score_adj": "5"}"#,
                "TypeError: Invalid type for oom_score_adj param: expected int but found <class 'str'>",
            ),
            (
                r#"{"cpuset_mems": 0.5}"#,
                "TypeError: Invalid type for cpuset_mems param: expected str but found <class 'float'>",
            ),
            (
                r#"{"restart_policy": "always"}"#,
                "TypeError: Invalid type for restart_policy param: expected dict but found <class 'str'>",
            ),
            (
                r#"{"sysctls": ["a=b"]}"#,
                "TypeError: Invalid type for sysctls param: expected dict but found <class 'list'>",
            ),
            (
                r#"{"ulimits": {"name": "nofile"}}"#,
                "TypeError: Invalid type for ulimits param: expected list but found <class 'dict'>",
            ),
            (
                r#"{"ulimits": [{"soft": 1}]}"#,
                "ValueError: Ulimit.name must be a string",
            ),
            (
                r#"{"ulimits": [{"name": "nofile", "soft": "1"}]}"#,
                "ValueError: Ulimit.soft must be an integer",
            ),
            (
                r#"{"log_config": "json-file"}"#,
                "TypeError: Invalid type for log_config param: expected LogConfig but found <class 'str'>",
            ),
            (
                r#"{"log_config": {"type": "json-file", "config": "x"}}"#,
                "ValueError: LogConfig.config must be a dictionary",
            ),
            (
                r#"{"userns_mode": "private"}"#,
                "ValueError: Invalid value for userns_mode param: private",
            ),
            (
                r#"{"uts_mode": "private"}"#,
                "ValueError: Invalid value for uts_mode param: private",
            ),
            (
                r#"{"isolation": 5}"#,
                "TypeError: Invalid type for isolation param: expected string but found <class 'int'>",
            ),
            (
                r#"{"device_requests": {"count": 1}}"#,
                "TypeError: Invalid type for device_requests param: expected list but found <class 'dict'>",
            ),
            (
                r#"{"device_requests": [{"count": "all"}]}"#,
                "ValueError: DeviceRequest.count must be an integer",
            ),
            (
                r#"{"device_requests": [{"driver": 5}]}"#,
                "ValueError: DeviceRequest.driver must be a string",
            ),
            (
                r#"{"device_requests": [{"device_ids": "0"}]}"#,
                "ValueError: DeviceRequest.device_ids must be a list",
            ),
            (
                r#"{"device_requests": [{"options": []}]}"#,
                "ValueError: DeviceRequest.options must be a dict",
            ),
            (
                r#"{"devices": [5]}"#,
                "DockerException: Invalid device type <class 'int'>",
            ),
            (
                r#"{"tmpfs": "/run"}"#,
                "ValueError: Expected tmpfs value to be either a list or a dict, found: str",
            ),
            (
                r#"{"tmpfs": [5]}"#,
                "ValueError: Expected item in tmpfs list to be a string, found: int",
            ),
            (
                r#"{"blkio_weight": "300"}"#,
                "TypeError: Invalid type for blkio_weight param: expected int but found <class 'str'>",
            ),
            (
                r#"{"blkio_weight_device": {"Path": "/dev/sda"}}"#,
                "TypeError: Invalid type for blkio_weight_device param: expected list but found <class 'dict'>",
            ),
            (
                r#"{"device_read_bps": {"Path": "/dev/sda"}}"#,
                "TypeError: Invalid type for device_read_bps param: expected list but found <class 'dict'>",
            ),
            (
                r#"{"shm_size": "1q"}"#,
                "DockerException: The specified value for memory (1q) should specify the units. The postfix should be one of the `b` `k` `m` `g` characters",
            ),
            (
                r#"{"mem_reservation": "1q"}"#,
                "DockerException: The specified value for memory (1q) should specify the units. The postfix should be one of the `b` `k` `m` `g` characters",
            ),
            (
                r#"{"ports": {"84": {"HostIp": "127.0.0.1"}}}"#,
                "ValueError: {'HostIp': '127.0.0.1'}",
            ),
            (
                r#"{"ports": [80]}"#,
                "AttributeError: 'list' object has no attribute 'items'",
            ),
        ];
        for (kwargs, docker_py) in table {
            let kwargs: Value = serde_json::from_str(kwargs).unwrap();
            let key = kwargs.as_object().unwrap().keys().next().unwrap().clone();
            let errors = map(kwargs.clone()).expect_err(docker_py);
            assert_eq!(errors.len(), 1, "{kwargs}: {errors:?}");
            assert_eq!(errors[0].key, key, "{kwargs} (docker-py: {docker_py})");
        }
    }

    #[test]
    fn messages() {
        let one = |v: Value| errors(v).remove(0).1;
        assert_eq!(
            one(json!({"bogus_option": 1})),
            "unknown key 'bogus_option' (not a docker-py containers.create argument)"
        );
        assert_eq!(
            one(json!({"environment": {}})),
            "not allowed: use the `env` job variable instead"
        );
        assert_eq!(
            one(json!({"network": "n"})),
            "not allowed: use the `networks` job variable instead"
        );
        assert!(one(json!({"remove": true})).contains("`auto_remove` job variable"));
        assert!(
            one(json!({"init_path": "/x"}))
                .contains("init_path param is not supported in API versions > 1.29")
        );
        assert!(one(json!({"mac_address": "02:42:ac:11:00:02"})).starts_with("not supported"));
        assert_eq!(
            one(json!({"cpu_shares": "512"})),
            "expected an integer; got \"512\""
        );
        assert_eq!(
            one(json!({"tty": "yes"})),
            "expected true or false; got \"yes\""
        );
        assert_eq!(one(json!({"hostname": 5})), "expected a string; got 5");
        assert_eq!(
            one(json!({"shm_size": "1q"})),
            "The specified value for memory (1q) should specify the units. The postfix should be one of the `b` `k` `m` `g` characters"
        );
        assert_eq!(
            one(json!({"userns_mode": "private"})),
            "only \"host\" is accepted (as by docker-py); got \"private\""
        );
        assert_eq!(
            one(json!({"cgroupns": "shared"})),
            "expected one of \"private\", \"host\"; got \"shared\""
        );
        assert_eq!(
            one(json!({"restart_policy": {"Name": "sometimes"}})),
            "Name: expected one of \"\", \"no\", \"always\", \"unless-stopped\", \"on-failure\"; got \"sometimes\""
        );
        assert_eq!(
            one(json!({"ulimits": [{"name": "nofile", "soft": "1"}]})),
            "soft: expected an integer; got \"1\""
        );
        assert_eq!(
            one(json!({"device_requests": [{"capabilities": ["gpu"]}]})),
            "capabilities: expected a list of lists of strings such as [[\"gpu\"]]; got [\"gpu\"]"
        );
        assert!(
            one(json!({"ports": {"84": {"HostIp": "127.0.0.1"}}})).contains("needs a HostPort")
        );
        assert!(one(json!({"entrypoint": "sh -c 'oops"})).starts_with("unbalanced quotes"));
        // Every bad keyword is reported, not just the first.
        let keys: Vec<String> = errors(json!({"bogus": 1, "cpu_shares": "x", "tty": 1}))
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["bogus", "cpu_shares", "tty"]);
    }

    #[test]
    fn job_fields_are_dropped_and_volumes_warns_as_the_reference_does() {
        let out = map(
            json!({"image": "x", "command": "y", "env": {"A": "1"}, "volumes": ["/x"],
                             "privileged": true, "container_create_kwargs": {}}),
        )
        .unwrap();
        assert!(out.config.is_empty() && out.host_config.is_empty());
        assert_eq!(
            out.warnings,
            [
                "volumes should be specified in job_variables rather than container_create_kwargs. Use job_variables={'volumes': ['/host/path:/container/path']} instead. The volumes in container_create_kwargs will be ignored."
            ]
        );
    }

    /// Where this worker deliberately does more than docker-py (README "Differences").
    #[test]
    fn deliberate_differences() {
        // docker-py reads a JSON list as several host ports ("127.0.0.1" becomes a port);
        // an IP address first means docker-py's (ip, port) tuple here.
        let out =
            map(json!({"ports": {"81": ["127.0.0.1", 8181], "82": ["::1"], "83": ["8080", 8081]}}))
                .unwrap();
        assert_eq!(
            out.host_config["PortBindings"],
            json!({"81/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8181"}],
                   "82/tcp": [{"HostIp": "::1", "HostPort": ""}],
                   "83/tcp": [{"HostIp": "", "HostPort": "8080"}, {"HostIp": "", "HostPort": "8081"}]})
        );
        // docker-py refuses stop_timeout; it is the Engine's StopTimeout here.
        assert_eq!(
            map(json!({"stop_timeout": 5})).unwrap().config["StopTimeout"],
            json!(5)
        );
        // Lists given as one string: docker-py sends the string, which the Engine refuses
        // (or, for security_opt and device_cgroup_rules, fails with a TypeError).
        let out = map(
            json!({"cap_add": "NET_ADMIN", "security_opt": "no-new-privileges",
                             "device_cgroup_rules": "c 1:3 mr"}),
        )
        .unwrap();
        assert_eq!(out.host_config["DeviceCgroupRules"], json!(["c 1:3 mr"]));
        assert_eq!(out.host_config["CapAdd"], json!(["NET_ADMIN"]));
        assert_eq!(out.host_config["SecurityOpt"], json!(["no-new-privileges"]));
        // Engine field names in any case, as the Engine itself reads them (the API client here
        // matches exactly), and snake_case restart policies.
        let out = map(json!({
            "restart_policy": {"name": "on-failure", "maximum_retry_count": 3},
            "mounts": [{"type": "volume", "source": "v", "target": "/data", "readonly": true,
                        "volumeoptions": {"nocopy": true, "driverconfig": {"name": "local", "options": {"o": "x"}}}}],
            "devices": [{"pathonhost": "/dev/fuse", "pathincontainer": "/dev/fuse", "cgrouppermissions": "rwm"}],
            "device_read_bps": [{"path": "/dev/sda", "rate": 1}],
        }))
        .unwrap();
        assert_eq!(
            out.host_config["RestartPolicy"],
            json!({"Name": "on-failure", "MaximumRetryCount": 3})
        );
        assert_eq!(
            out.host_config["Mounts"],
            json!([{"Type": "volume", "Source": "v", "Target": "/data", "ReadOnly": true,
                    "VolumeOptions": {"NoCopy": true, "DriverConfig": {"Name": "local", "Options": {"o": "x"}}}}])
        );
        assert_eq!(
            out.host_config["Devices"],
            json!([{"PathOnHost": "/dev/fuse", "PathInContainer": "/dev/fuse", "CgroupPermissions": "rwm"}])
        );
        assert_eq!(
            out.host_config["BlkioDeviceReadBps"],
            json!([{"Path": "/dev/sda", "Rate": 1}])
        );
        // Fields the Engine dropped are warned about, not sent.
        let out = map(
            json!({"kernel_memory": "128m", "lxc_conf": {"a": "b"}, "use_config_proxy": false}),
        )
        .unwrap();
        assert!(out.host_config.is_empty());
        assert_eq!(out.warnings.len(), 3, "{:?}", out.warnings);
        // A healthcheck's start interval (API 1.44), which docker-py does not read.
        assert_eq!(
            map(json!({"healthcheck": {"test": ["CMD", "true"], "start_interval": 1000000}}))
                .unwrap()
                .config["Healthcheck"],
            json!({"Test": ["CMD", "true"], "StartInterval": 1000000})
        );
    }

    #[test]
    fn networking_config_is_kept_for_the_caller() {
        // docker-py: with network "n", {"n": {...}} becomes {"EndpointsConfig": {"n": {...}}}
        // (generated with the same harness); config.rs keeps it only when it names the first
        // network.
        let out = map(json!({"networking_config": {"n": {"aliases": ["a"]}}})).unwrap();
        assert_eq!(
            out.networking_config.map(Value::Object),
            Some(json!({"n": {"Aliases": ["a"]}}))
        );
        assert_eq!(
            errors(json!({"networking_config": "n"}))[0].0,
            "networking_config"
        );
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::{JOB_FIELDS, KEYWORDS, map_create_kwargs};
    use crate::job::strategies::{any_json, config, object_with};

    /// Every keyword the mapping knows by name: the table's, the special ones, job fields.
    fn known_keys() -> Vec<&'static str> {
        let special = [
            "extra_hosts",
            "platform",
            "ports",
            "networking_config",
            "detach",
            "environment",
            "network",
            "remove",
            "init_path",
            "mac_address",
            "kernel_memory",
            "lxc_conf",
            "use_config_proxy",
            "version",
        ];
        KEYWORDS
            .iter()
            .map(|(k, _)| *k)
            .chain(special)
            .chain(JOB_FIELDS.iter().copied())
            .collect()
    }

    /// Values near the shapes keywords take (objects of the Engine's helper types, lists of
    /// them, port maps), and any JSON.
    fn value() -> BoxedStrategy<Value> {
        let shaped = proptest::sample::select(vec![
            json!({"Name": "on-failure", "MaximumRetryCount": 3}),
            json!([{"path": "/dev/sda", "weight": 200}]),
            json!(["/dev/fuse", "/a:/b:rwm"]),
            json!([{"name": "nofile", "soft": 1, "hard": 2}]),
            json!([{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]),
            json!({"test": "true", "interval": 1}),
            json!({"db": "alias", "x": ""}),
            json!([["db", "a"], "web:w"]),
            json!({"80/tcp": 8080, "81": ["127.0.0.1", 1], "82": ["::1"], "83": [1, "2"], "84": {"HostPort": null}}),
            json!({"n1": {"aliases": ["a"]}}),
            json!({"type": "json-file", "config": {"max-size": "10m"}}),
            json!([{"type": "volume", "source": "v", "target": "/d", "volume_options": {"driver_config": {"name": "x"}}}]),
            json!(["/run:size=1m", "/tmp"]),
            json!({"net.core.somaxconn": 1024}),
        ]);
        prop_oneof![1 => shaped, 3 => any_json()].boxed()
    }

    fn kwargs() -> BoxedStrategy<Map<String, Value>> {
        object_with(known_keys(), value(), 6)
    }

    proptest! {
        #![proptest_config(config(256))]

        /// Any keywords with any values map or are refused, never a panic: each error names
        /// one keyword that was given, once; a mapping sets only Engine fields (capitalised).
        #[test]
        fn any_kwargs_map_or_are_refused(kwargs in kwargs()) {
            match map_create_kwargs(&kwargs) {
                Ok(out) => {
                    for field in out.config.keys().chain(out.host_config.keys()) {
                        let capitalised = field.starts_with(|c: char| c.is_ascii_uppercase());
                        prop_assert!(capitalised, "{}", field);
                    }
                }
                Err(errors) => {
                    prop_assert!(!errors.is_empty());
                    for (i, error) in errors.iter().enumerate() {
                        prop_assert!(kwargs.contains_key(&error.key), "{}", error.key);
                        prop_assert!(!error.message.is_empty());
                        prop_assert!(errors[..i].iter().all(|e| e.key != error.key));
                    }
                }
            }
        }
    }

    /// Null is "not given" for every keyword with a field: nothing is sent, nothing fails.
    #[test]
    fn null_sends_nothing_for_every_table_keyword() {
        for (key, _) in KEYWORDS {
            let kwargs: Map<String, Value> =
                [((*key).to_owned(), Value::Null)].into_iter().collect();
            let out = map_create_kwargs(&kwargs).unwrap_or_else(|e| panic!("{key}: {e:?}"));
            assert!(out.config.is_empty() && out.host_config.is_empty(), "{key}");
        }
    }
}
