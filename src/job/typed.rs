//! Typed container options: the job variables users of the Python worker keep asking for —
//! `gpus`, `shm_size`, `ipc_mode`, `cpus`, `ports`, `platform` — each validated with a message
//! that says what is accepted, and turned into Engine fields. They compose with
//! `container_create_kwargs`: a typed option wins over the keyword it overlaps, with a warning.
//! `max_runtime` and `stream_output_to_api` are not Engine fields: the worker stops a run's
//! container when it has run that long, and forwards its output to the run's logs.
//!
//! Pure: JSON in, Engine JSON out.

use serde_json::{Map, Value, json};

use super::create_kwargs::EngineOverrides;
use super::memory::parse_bytes;

/// The typed options' job-variable names, in template order.
pub const TYPED_FIELDS: &[&str] = &[
    "gpus",
    "shm_size",
    "ipc_mode",
    "cpus",
    "ports",
    "platform",
    "max_runtime",
    "stream_output_to_api",
];

/// `ExposedPorts` and `PortBindings`, as Engine JSON.
pub type PortMaps = (Map<String, Value>, Map<String, Value>);

/// Validated typed options; `None` = not set (the Engine's default applies).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypedOptions {
    /// One Engine `DeviceRequest`, as `docker run --gpus` builds it.
    pub gpus: Option<Value>,
    /// `/dev/shm` size in bytes.
    pub shm_size: Option<i64>,
    /// IPC namespace mode.
    pub ipc_mode: Option<String>,
    /// CPU limit in billionths of a CPU (`NanoCpus`).
    pub nano_cpus: Option<i64>,
    /// `ExposedPorts` and `PortBindings`.
    pub ports: Option<PortMaps>,
    /// Image platform for the pull and the create (`linux/arm64`).
    pub platform: Option<String>,
    /// The longest a run's container may run before the worker stops it.
    pub max_runtime: Option<std::time::Duration>,
    /// Forward all of the container's output to the run's logs.
    pub stream_output_to_api: Option<bool>,
}

/// A typed option that did not validate: the field and what is wrong with it.
pub type TypedError = (String, String);

impl TypedOptions {
    /// Reads the typed options from a rendered job configuration. Missing or null fields are
    /// unset; every invalid one is reported.
    ///
    /// # Errors
    /// Each invalid field with its message.
    pub fn from_rendered(source: &Map<String, Value>) -> Result<Self, Vec<TypedError>> {
        let mut errors = Vec::new();
        let mut check = |field: &str, parse: &dyn Fn(&Value) -> Result<(), String>| {
            if let Some(value) = source.get(field).filter(|v| !v.is_null())
                && let Err(message) = parse(value)
            {
                errors.push((field.to_owned(), message));
            }
        };
        check("gpus", &|v| parse_gpus(v).map(drop));
        check("shm_size", &|v| parse_size(v).map(drop));
        check("ipc_mode", &|v| parse_ipc_mode(v).map(drop));
        check("cpus", &|v| parse_cpus(v).map(drop));
        check("ports", &|v| parse_ports(v).map(drop));
        check("platform", &|v| parse_platform(v).map(drop));
        check("max_runtime", &|v| parse_max_runtime(v).map(drop));
        check("stream_output_to_api", &|v| parse_flag(v).map(drop));
        if !errors.is_empty() {
            return Err(errors);
        }
        let get = |field: &str| source.get(field).filter(|v| !v.is_null());
        Ok(Self {
            gpus: get("gpus").and_then(|v| parse_gpus(v).ok()),
            shm_size: get("shm_size").and_then(|v| parse_size(v).ok()),
            ipc_mode: get("ipc_mode").and_then(|v| parse_ipc_mode(v).ok()),
            nano_cpus: get("cpus").and_then(|v| parse_cpus(v).ok()),
            ports: get("ports").and_then(|v| parse_ports(v).ok()),
            platform: get("platform").and_then(|v| parse_platform(v).ok()),
            max_runtime: get("max_runtime").and_then(|v| parse_max_runtime(v).ok()),
            stream_output_to_api: get("stream_output_to_api").and_then(|v| parse_flag(v).ok()),
        })
    }

    /// Writes the set options into the Engine overrides from `container_create_kwargs`,
    /// replacing what a keyword set for the same field and saying so in a warning.
    pub fn apply(&self, overrides: &mut EngineOverrides) {
        let mut set = |host: bool, field: &str, option: &str, keyword: &str, value: Value| {
            let target = if host {
                &mut overrides.host_config
            } else {
                &mut overrides.config
            };
            if let Some(previous) = target.insert(field.to_owned(), value.clone())
                && previous != value
            {
                overrides.warnings.push(format!(
                    "The job variable '{option}' replaces container_create_kwargs.{keyword} ({field})"
                ));
            }
        };
        if let Some(request) = &self.gpus {
            set(
                true,
                "DeviceRequests",
                "gpus",
                "device_requests",
                json!([request]),
            );
        }
        if let Some(bytes) = self.shm_size {
            set(true, "ShmSize", "shm_size", "shm_size", json!(bytes));
        }
        if let Some(mode) = &self.ipc_mode {
            set(true, "IpcMode", "ipc_mode", "ipc_mode", json!(mode));
        }
        if let Some(nanos) = self.nano_cpus {
            set(true, "NanoCpus", "cpus", "nano_cpus", json!(nanos));
        }
        if let Some((exposed, bindings)) = &self.ports {
            set(
                false,
                "ExposedPorts",
                "ports",
                "ports",
                Value::Object(exposed.clone()),
            );
            set(
                true,
                "PortBindings",
                "ports",
                "ports",
                Value::Object(bindings.clone()),
            );
        }
    }
}

/// What `gpus` accepts, the start of each of its messages.
const GPUS_EXPECTED: &str = "expected \"all\", a number of GPUs, device ids (\"device=0,1\"), or options such as \"count=2,capabilities=compute,utility\"";

/// `gpus` like `docker run --gpus`: `"all"`, a count (`2` or `"2"`), or comma-separated
/// options `count=…`, `device=0,1`, `driver=…`, `capabilities=compute,utility`; a list of
/// device ids is also taken. Defaults as the Docker CLI: one GPU when neither count nor
/// devices are given, capabilities `[["gpu"]]`.
fn parse_gpus(value: &Value) -> Result<Value, String> {
    let text = match value {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        Value::Array(ids) => return gpu_device_ids(ids, value),
        other => return Err(format!("{GPUS_EXPECTED}; got {other}")),
    };
    if text.is_empty() {
        return Err(format!("{GPUS_EXPECTED}; got an empty string"));
    }
    GpuOptions::parse(&text)
}

/// `gpus` as a non-empty list of device ids (non-blank strings or numbers).
fn gpu_device_ids(ids: &[Value], value: &Value) -> Result<Value, String> {
    let ids: Option<Vec<String>> = ids
        .iter()
        .map(|i| match i {
            Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .collect();
    match ids {
        Some(ids) if !ids.is_empty() => Ok(device_request("", None, ids, None)),
        _ => Err(format!("{GPUS_EXPECTED}; got {value}")),
    }
}

/// A GPU count: `all` (any case) is `-1`, else a positive whole number.
fn gpu_count(s: &str) -> Result<i64, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(-1);
    }
    match s.parse::<i64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{GPUS_EXPECTED}; '{s}' is not a count")),
    }
}

/// The Docker CLI's `--gpus` options, read item by item from `text`.
#[derive(Default)]
struct GpuOptions<'t> {
    /// The whole option string, for messages.
    text: &'t str,
    driver: String,
    count: Option<i64>,
    devices: Vec<String>,
    capabilities: Option<Vec<String>>,
    /// The key a bare item continues (`device=0,1` → devices 0 and 1).
    list_key: Option<&'static str>,
    /// The keys given so far; each may be given once.
    seen: Vec<String>,
}

impl<'t> GpuOptions<'t> {
    /// Parses `count=…,device=…,driver=…,capabilities=…` (or a bare count) into one Engine
    /// `DeviceRequest`.
    fn parse(text: &'t str) -> Result<Value, String> {
        let mut options = Self {
            text,
            ..Self::default()
        };
        for item in text.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(format!("{GPUS_EXPECTED}; got '{text}'"));
            }
            match item.split_once('=') {
                Some((key, val)) => options.keyed(key.trim(), val.trim())?,
                None => options.bare(item)?,
            }
        }
        options.into_request()
    }

    /// `key=value`: sets the option, or starts the list a bare item continues.
    fn keyed(&mut self, key: &str, val: &str) -> Result<(), String> {
        let text = self.text;
        if self.seen.iter().any(|k| k == key) {
            return Err(format!("'{key}' is given more than once in '{text}'"));
        }
        self.seen.push(key.to_owned());
        self.list_key = None;
        match key {
            "driver" => self.driver = val.to_owned(),
            "count" => self.count = Some(gpu_count(val)?),
            "device" | "devices" => {
                self.devices.push(val.to_owned());
                self.list_key = Some("device");
            }
            "capabilities" => {
                self.capabilities = Some(vec![val.to_owned()]);
                self.list_key = Some("capabilities");
            }
            other => {
                return Err(format!(
                    "unknown option '{other}' in '{text}' (expected count, device, driver or capabilities)"
                ));
            }
        }
        Ok(())
    }

    /// An item without `=`: the next device or capability of a list, else the count.
    fn bare(&mut self, item: &str) -> Result<(), String> {
        match self.list_key {
            Some("device") => self.devices.push(item.to_owned()),
            Some(_) => {
                if let Some(caps) = self.capabilities.as_mut() {
                    caps.push(item.to_owned());
                }
            }
            None => {
                if self.count.is_some() {
                    return Err(format!(
                        "'count' is given more than once in '{}'",
                        self.text
                    ));
                }
                self.count = Some(gpu_count(item)?);
            }
        }
        Ok(())
    }

    /// The request: device ids or a count (one GPU when neither is given), not both.
    fn into_request(self) -> Result<Value, String> {
        if !self.devices.is_empty() && self.count.is_some() {
            return Err(format!(
                "give either a count or device ids, not both (got '{}')",
                self.text
            ));
        }
        let count = if self.devices.is_empty() {
            Some(self.count.unwrap_or(1))
        } else {
            None
        };
        Ok(device_request(
            &self.driver,
            count,
            self.devices,
            self.capabilities,
        ))
    }
}

fn device_request(
    driver: &str,
    count: Option<i64>,
    devices: Vec<String>,
    capabilities: Option<Vec<String>>,
) -> Value {
    let capabilities = match capabilities {
        None => vec!["gpu".to_owned()],
        Some(mut caps) => {
            if !caps.iter().any(|c| c == "gpu") {
                caps.push("gpu".to_owned());
            }
            caps
        }
    };
    let mut request = json!({
        "Driver": driver,
        "Count": count.unwrap_or(0),
        "Capabilities": [capabilities],
        "Options": {},
    });
    if !devices.is_empty() {
        request["DeviceIDs"] = json!(devices);
    }
    request
}

/// A size in bytes: a number, or a string with a unit (`"1g"`, `"512m"`).
fn parse_size(value: &Value) -> Result<i64, String> {
    let bytes = match value {
        Value::Number(n) => n.as_i64().ok_or_else(|| {
            format!("expected a whole number of bytes or a size such as \"1g\"; got {n}")
        })?,
        Value::String(s) => parse_bytes(s).map_err(|_| {
            format!("expected a size such as \"512m\" or \"1g\" (units b, k, m, g); got '{s}'")
        })?,
        other => {
            return Err(format!(
                "expected a size such as \"512m\" or \"1g\"; got {other}"
            ));
        }
    };
    if bytes <= 0 {
        return Err(format!("expected a positive size; got {value}"));
    }
    Ok(bytes)
}

/// `none`, `private`, `shareable`, `host`, or `container:<name or id>`.
fn parse_ipc_mode(value: &Value) -> Result<String, String> {
    const EXPECTED: &str = "expected one of \"none\", \"private\", \"shareable\", \"host\" or \"container:<name or id>\"";
    let Value::String(s) = value else {
        return Err(format!("{EXPECTED}; got {value}"));
    };
    let mode = s.trim();
    match mode {
        "none" | "private" | "shareable" | "host" => Ok(mode.to_owned()),
        _ if mode
            .strip_prefix("container:")
            .is_some_and(|c| !c.trim().is_empty()) =>
        {
            Ok(mode.to_owned())
        }
        _ => Err(format!("{EXPECTED}; got '{s}'")),
    }
}

/// A positive number of CPUs (`1.5`, `"0.5"`) → `NanoCpus`.
fn parse_cpus(value: &Value) -> Result<i64, String> {
    let cpus = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match cpus {
        #[allow(clippy::cast_possible_truncation)] // bounded to 1..=1e12 just above
        Some(c) if (0.001..=1000.0).contains(&c) => Ok((c * 1e9).round() as i64),
        _ => Err(format!(
            "expected a positive number of CPUs such as 1.5 (at least 0.001); got {value}"
        )),
    }
}

/// `ports`: a list (or one string) of `[ip:][host_port:]container_port[/protocol]`, ports
/// or equal-length ranges (`8000-8001:9000-9001`); an empty host port picks a free one.
fn parse_ports(value: &Value) -> Result<PortMaps, String> {
    let items: Vec<&str> = match value {
        Value::String(s) => vec![s.as_str()],
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .ok_or_else(|| format!("expected strings such as \"8080:80/tcp\"; got {i}"))
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(format!(
                "expected a list of strings such as [\"8080:80/tcp\"]; got {other}"
            ));
        }
    };
    let mut exposed = Map::new();
    let mut bindings = Map::new();
    for item in items {
        for (key, binding) in parse_port_spec(item)? {
            exposed.insert(key.clone(), json!({}));
            if let Some(binding) = binding
                && let Value::Array(list) = bindings.entry(key).or_insert_with(|| json!([]))
            {
                list.push(binding);
            }
        }
    }
    Ok((exposed, bindings))
}

/// One `ports` entry → (`"80/tcp"`, binding) pairs; no binding when only a container port is
/// given (exposed, not published).
fn parse_port_spec(spec: &str) -> Result<Vec<(String, Option<Value>)>, String> {
    let bad = |why: &str| {
        format!(
            "'{spec}' is not a port mapping ({why}); expected [ip:][host_port:]container_port[/tcp|udp|sctp] such as \"8080:80/tcp\""
        )
    };
    let (rest, protocol) = split_protocol(spec.trim()).map_err(bad)?;
    let (ip, host, container) = split_address(rest).map_err(bad)?;
    let container = port_range(container).ok_or_else(|| bad("bad container port"))?;
    // `None`: not published; `Some(None)`: published on any free port.
    let host = match host {
        None => None,
        Some("") => Some(None),
        Some(h) => Some(Some(port_range(h).ok_or_else(|| bad("bad host port"))?)),
    };
    if let Some(Some((lo, hi))) = host
        && hi - lo != container.1 - container.0
        && lo != hi
    {
        return Err(bad("the host and container ranges differ in length"));
    }
    Ok(port_bindings(
        container,
        host,
        ip.as_deref().unwrap_or_default(),
        &protocol,
    ))
}

/// `rest/protocol` → (rest, lower-case protocol); `tcp` when none is given.
fn split_protocol(text: &str) -> Result<(&str, String), &'static str> {
    match text.rsplit_once('/') {
        Some((rest, proto)) => match proto.to_ascii_lowercase().as_str() {
            p @ ("tcp" | "udp" | "sctp") => Ok((rest, p.to_owned())),
            _ => Err("the protocol must be tcp, udp or sctp"),
        },
        None => Ok((text, "tcp".to_owned())),
    }
}

/// `[ip:][host_port:]container_port` → (ip, host port, container port); an IPv6 address is
/// written in brackets (`[::1]:8080:80`) and the address must parse.
fn split_address(rest: &str) -> Result<(Option<String>, Option<&str>, &str), &'static str> {
    let (ip, rest) = if let Some(after) = rest.strip_prefix('[') {
        let (ip, after) = after.split_once("]:").ok_or("unclosed [")?;
        (Some(ip.to_owned()), after)
    } else {
        (None, rest)
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let (ip, host, container) = match (ip, parts.as_slice()) {
        (None, [c]) => (None, None, *c),
        (None, [h, c]) => (None, Some(*h), *c),
        (None, [ip, h, c]) => (Some((*ip).to_owned()), Some(*h), *c),
        (Some(ip), [h, c]) => (Some(ip), Some(*h), *c),
        _ => return Err("too many ':'"),
    };
    if let Some(ip) = &ip
        && ip.parse::<std::net::IpAddr>().is_err()
    {
        return Err("the host address is not an IP address");
    }
    Ok((ip, host, container))
}

/// One (`"80/tcp"`, binding) pair per container port of the range; the host range is
/// walked alongside, a single host port is given for every container port (Docker picks).
fn port_bindings(
    container: (u16, u16),
    host: Option<Option<(u16, u16)>>,
    ip: &str,
    protocol: &str,
) -> Vec<(String, Option<Value>)> {
    (container.0..=container.1)
        .enumerate()
        .map(|(i, port)| {
            let binding = host.map(|host| {
                let host_port = match host {
                    None => String::new(),
                    Some((lo, hi)) if lo == hi => lo.to_string(),
                    Some((lo, _)) => (u32::from(lo) + u32::try_from(i).unwrap_or(0)).to_string(),
                };
                json!({"HostIp": ip, "HostPort": host_port})
            });
            (format!("{port}/{protocol}"), binding)
        })
        .collect()
}

/// `80` or `8000-8010` → inclusive bounds; ports 1–65535.
fn port_range(text: &str) -> Option<(u16, u16)> {
    let port = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p > 0);
    match text.split_once('-') {
        None => port(text).map(|p| (p, p)),
        Some((lo, hi)) => {
            let (lo, hi) = (port(lo)?, port(hi)?);
            (lo <= hi).then_some((lo, hi))
        }
    }
}

/// `os[/arch[/variant]]`, lower-case, as the Engine takes it (`linux/arm64/v8`).
fn parse_platform(value: &Value) -> Result<String, String> {
    const EXPECTED: &str = "expected os[/architecture[/variant]] such as \"linux/amd64\"";
    let Value::String(s) = value else {
        return Err(format!("{EXPECTED}; got {value}"));
    };
    let text = s.trim();
    let parts: Vec<&str> = text.split('/').collect();
    let ok = (1..=3).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
    if ok {
        Ok(text.to_owned())
    } else {
        Err(format!("{EXPECTED}; got '{s}'"))
    }
}

/// A positive number of seconds, or a duration with units (`90m`, `2h`, `1h 30m`), at most a
/// year (a longer limit is no limit, and would overflow the worker's timer).
pub fn parse_max_runtime(value: &Value) -> Result<std::time::Duration, String> {
    const EXPECTED: &str =
        "expected a positive number of seconds or a duration such as \"90m\" or \"2h\"";
    const YEAR: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
    let parsed = match value {
        Value::Number(n) => n
            .as_f64()
            .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok()),
        Value::String(s) => {
            let text = s.trim();
            match text.parse::<f64>() {
                Ok(seconds) => std::time::Duration::try_from_secs_f64(seconds).ok(),
                Err(_) => humantime::parse_duration(text).ok(),
            }
        }
        _ => None,
    };
    match parsed {
        Some(d) if !d.is_zero() && d <= YEAR => Ok(d),
        Some(d) if d > YEAR => Err(format!("{EXPECTED}, at most a year; got {value}")),
        _ => Err(format!("{EXPECTED}; got {value}")),
    }
}

/// A yes/no option, read as the job's other booleans are (pydantic's lax booleans).
fn parse_flag(value: &Value) -> Result<bool, String> {
    super::config::parse_lax_bool(value).map_err(str::to_owned)
}

/// The JSON-schema properties the typed options add to the base job template's variables,
/// with titles and descriptions for the Prefect UI form.
pub fn template_variables() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("gpus".into(), json!({
        "title": "GPUs",
        "description": "GPUs to give the container, as with `docker run --gpus`: \"all\", a number of GPUs (\"2\"), device ids (\"device=0,1\"), optionally with driver and capabilities (\"count=1,capabilities=compute,utility\"). The Docker host needs a GPU runtime such as the NVIDIA Container Toolkit.",
        "type": "string"
    }));
    m.insert("shm_size".into(), json!({
        "title": "Shared Memory Size",
        "description": "Size of /dev/shm, with a unit: \"512m\", \"2g\". Docker's default is 64m, too small for PyTorch data loaders and browsers.",
        "type": "string"
    }));
    m.insert("ipc_mode".into(), json!({
        "title": "IPC Mode",
        "description": "IPC namespace: \"private\", \"shareable\", \"host\", \"none\" or \"container:<name or id>\".",
        "type": "string"
    }));
    m.insert(
        "cpus".into(),
        json!({
            "title": "CPUs",
            "description": "CPU limit as a number of CPUs, as with `docker run --cpus`: 0.5, 2.",
            "type": "number"
        }),
    );
    m.insert("ports".into(), json!({
        "title": "Ports",
        "description": "Ports to publish, as with `docker run -p`: \"8080:80\", \"127.0.0.1:8080:80/tcp\", \"9000-9001:9000-9001\", or \"80\" to expose only.",
        "type": "array",
        "items": {"type": "string"}
    }));
    m.insert("platform".into(), json!({
        "title": "Platform",
        "description": "Image platform to pull and run, such as \"linux/amd64\" or \"linux/arm64\", for multi-platform images.",
        "type": "string"
    }));
    m.insert("max_runtime".into(), json!({
        "title": "Maximum Runtime",
        "description": "The longest the flow run's container may run, in seconds (7200) or as a duration (\"2h\", \"90m\"). At the limit the worker stops the container (SIGTERM, then SIGKILL after its grace period) and marks the run Crashed. Empty = no limit.",
        "anyOf": [{"type": "string"}, {"type": "number"}]
    }));
    m.insert("stream_output_to_api".into(), json!({
        "title": "Stream Output To API",
        "description": "Send everything the container prints (stdout and stderr, each line with the time Docker logged it) to the flow run's logs, so shell scripts and non-Prefect processes are visible in the UI. Resumes without gaps or duplicates if the worker restarts.",
        "type": "boolean"
    }));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(v: Value) -> Result<TypedOptions, Vec<TypedError>> {
        TypedOptions::from_rendered(v.as_object().unwrap())
    }

    #[test]
    fn max_runtime_takes_seconds_or_a_duration() {
        use std::time::Duration;
        assert_eq!(parse_max_runtime(&json!(5)), Ok(Duration::from_secs(5)));
        assert_eq!(
            parse_max_runtime(&json!(1.5)),
            Ok(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_max_runtime(&json!("300")),
            Ok(Duration::from_secs(300))
        );
        assert_eq!(
            parse_max_runtime(&json!("2h")),
            Ok(Duration::from_secs(7200))
        );
        assert_eq!(
            parse_max_runtime(&json!("1h 30m")),
            Ok(Duration::from_secs(5400))
        );
        for bad in [
            json!(0),
            json!(-1),
            json!("soon"),
            json!(""),
            json!(true),
            json!("400d"),
        ] {
            let err = parse_max_runtime(&bad).unwrap_err();
            assert!(
                err.starts_with("expected a positive number of seconds"),
                "{bad}: {err}"
            );
        }
        let t = typed(json!({"max_runtime": "90m"})).unwrap();
        assert_eq!(t.max_runtime, Some(Duration::from_secs(5400)));
        let errors = typed(json!({"max_runtime": "x"})).unwrap_err();
        assert_eq!(errors[0].0, "max_runtime");
    }

    #[test]
    fn gpus_follow_the_docker_cli() {
        let all = parse_gpus(&json!("all")).unwrap();
        assert_eq!(
            all,
            json!({"Driver": "", "Count": -1, "Capabilities": [["gpu"]], "Options": {}})
        );
        assert_eq!(parse_gpus(&json!(2)).unwrap()["Count"], 2);
        assert_eq!(parse_gpus(&json!("2")).unwrap()["Count"], 2);
        let devices = parse_gpus(&json!("device=0,1")).unwrap();
        assert_eq!(devices["DeviceIDs"], json!(["0", "1"]));
        assert_eq!(devices["Count"], 0);
        let caps =
            parse_gpus(&json!("count=1,driver=nvidia,capabilities=compute,utility")).unwrap();
        assert_eq!(caps["Driver"], "nvidia");
        assert_eq!(caps["Count"], 1);
        assert_eq!(caps["Capabilities"], json!([["compute", "utility", "gpu"]]));
        assert_eq!(parse_gpus(&json!("driver=nvidia")).unwrap()["Count"], 1);
        assert_eq!(
            parse_gpus(&json!(["GPU-abc", 3])).unwrap()["DeviceIDs"],
            json!(["GPU-abc", "3"])
        );
        for bad in [
            json!("some"),
            json!("0"),
            json!(""),
            json!("count=2,count=3"),
            json!("speed=fast"),
            json!("2,device=1"),
            json!(true),
            json!([]),
        ] {
            assert!(parse_gpus(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_cpus_ipc_and_platform() {
        assert_eq!(parse_size(&json!("1g")).unwrap(), 1 << 30);
        assert_eq!(parse_size(&json!(1024)).unwrap(), 1024);
        assert!(parse_size(&json!("1q")).unwrap_err().contains("512m"));
        assert!(parse_size(&json!(0)).is_err());
        assert_eq!(parse_cpus(&json!(1.5)).unwrap(), 1_500_000_000);
        assert_eq!(parse_cpus(&json!("0.25")).unwrap(), 250_000_000);
        assert!(parse_cpus(&json!(0)).is_err());
        assert!(parse_cpus(&json!("many")).is_err());
        assert_eq!(parse_ipc_mode(&json!("host")).unwrap(), "host");
        assert_eq!(
            parse_ipc_mode(&json!("container:db")).unwrap(),
            "container:db"
        );
        assert!(parse_ipc_mode(&json!("container:")).is_err());
        assert!(parse_ipc_mode(&json!("shared")).is_err());
        assert_eq!(
            parse_platform(&json!("linux/arm64/v8")).unwrap(),
            "linux/arm64/v8"
        );
        assert!(parse_platform(&json!("Linux/AMD64")).is_err());
        assert!(parse_platform(&json!("linux//x")).is_err());
    }

    #[test]
    fn ports_publish_and_expose() {
        let (exposed, bindings) = parse_ports(&json!([
            "8080:80",
            "127.0.0.1:8443:443/tcp",
            "53:53/udp",
            "9000",
            "[::1]::7000",
            "6000-6001:7000-7001",
            "127.0.0.1:8081:80"
        ]))
        .unwrap();
        assert_eq!(
            exposed.keys().cloned().collect::<Vec<_>>(),
            [
                "80/tcp", "443/tcp", "53/udp", "9000/tcp", "7000/tcp", "7001/tcp"
            ]
        );
        assert_eq!(
            bindings["80/tcp"],
            json!([{"HostIp": "", "HostPort": "8080"}, {"HostIp": "127.0.0.1", "HostPort": "8081"}])
        );
        assert_eq!(
            bindings["443/tcp"],
            json!([{"HostIp": "127.0.0.1", "HostPort": "8443"}])
        );
        assert_eq!(
            bindings["7000/tcp"],
            json!([{"HostIp": "::1", "HostPort": ""}, {"HostIp": "", "HostPort": "6000"}])
        );
        assert_eq!(
            bindings["7001/tcp"],
            json!([{"HostIp": "", "HostPort": "6001"}])
        );
        assert!(!bindings.contains_key("9000/tcp"));
        for bad in [
            "80/icmp",
            "a:b",
            "1:2:3:4",
            "0",
            "70000",
            "1-3:5-6",
            "nothost:80:80",
            "[::1",
        ] {
            assert!(parse_ports(&json!([bad])).is_err(), "{bad}");
        }
        assert!(parse_ports(&json!({"80": 80})).is_err());
    }

    #[test]
    fn every_invalid_field_is_reported_and_typed_options_win_with_a_warning() {
        let errors = typed(json!({"gpus": "lots", "cpus": -1, "ports": ["x"], "shm_size": null}))
            .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["gpus", "cpus", "ports"]);

        let t = typed(
            json!({"gpus": "all", "shm_size": "2g", "ipc_mode": "host", "cpus": 2,
                             "ports": ["8080:80"], "platform": "linux/amd64"}),
        )
        .unwrap();
        let mut o = EngineOverrides::default();
        o.host_config.insert("ShmSize".into(), json!(1));
        o.host_config.insert("IpcMode".into(), json!("host"));
        t.apply(&mut o);
        assert_eq!(o.host_config["ShmSize"], json!(2_i64 << 30));
        assert_eq!(o.host_config["NanoCpus"], json!(2_000_000_000_i64));
        assert_eq!(o.host_config["DeviceRequests"][0]["Count"], -1);
        assert_eq!(o.config["ExposedPorts"], json!({"80/tcp": {}}));
        assert_eq!(t.platform.as_deref(), Some("linux/amd64"));
        // Only a real conflict (a different value) warns.
        assert_eq!(o.warnings.len(), 1, "{:?}", o.warnings);
        assert!(o.warnings[0].contains("'shm_size' replaces container_create_kwargs.shm_size"));
    }

    #[test]
    fn template_variables_have_titles_and_descriptions() {
        let vars = template_variables();
        assert_eq!(
            vars.keys().map(String::as_str).collect::<Vec<_>>(),
            TYPED_FIELDS
        );
        for (name, schema) in &vars {
            assert!(schema["title"].is_string(), "{name}");
            assert!(
                schema["description"].as_str().is_some_and(|d| d.len() > 20),
                "{name}"
            );
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::{
        TYPED_FIELDS, TypedOptions, parse_cpus, parse_gpus, parse_ipc_mode, parse_max_runtime,
        parse_platform, parse_ports, parse_size,
    };
    use crate::job::create_kwargs::EngineOverrides;
    use crate::job::strategies::{any_json, config, joined, text};

    /// Pieces of `--gpus` option strings.
    const GPU_PIECES: &[&str] = &[
        "all",
        "ALL",
        "1",
        "2",
        "0",
        "-1",
        "99999999999999999999",
        ",",
        "=",
        " ",
        "count=",
        "device=",
        "devices=",
        "driver=",
        "capabilities=",
        "nvidia",
        "compute",
        "utility",
        "gpu",
        "x",
        "é",
    ];

    /// Pieces of port specs.
    const PORT_PIECES: &[&str] = &[
        "80",
        "8080",
        "0",
        "65535",
        "65536",
        "1",
        ":",
        "-",
        "/",
        "tcp",
        "udp",
        "SCTP",
        "http",
        "127.0.0.1",
        "[",
        "]",
        "::1",
        "[::1]",
        " ",
        "é",
    ];

    /// Pieces of sizes, IPC modes and platforms.
    const OTHER_PIECES: &[&str] = &[
        "0",
        "1",
        "512",
        ".",
        "5",
        "m",
        "g",
        "k",
        "b",
        "-",
        "container:",
        "host",
        "private",
        "none",
        "shareable",
        "linux",
        "/",
        "amd64",
        "arm64",
        "v8",
        "_",
        " ",
        "L",
        "é",
    ];

    /// A value for a typed option: structured text, any text, or any JSON.
    fn option_value(pieces: &'static [&'static str], max: usize) -> BoxedStrategy<Value> {
        prop_oneof![
            3 => joined(pieces, max).prop_map(Value::from),
            2 => text().prop_map(Value::from),
            2 => any_json(),
            1 => proptest::collection::vec(joined(pieces, max).prop_map(Value::from), 0..4)
                .prop_map(Value::from),
        ]
        .boxed()
    }

    proptest! {
        #![proptest_config(config(256))]

        /// `gpus`: any value is one Engine device request or a message; the request always
        /// asks for the `gpu` capability and has a count or device ids, not both.
        #[test]
        fn gpus(value in option_value(GPU_PIECES, 8)) {
            match parse_gpus(&value) {
                Ok(request) => {
                    let capabilities = request["Capabilities"][0].as_array();
                    prop_assert!(capabilities.is_some_and(|c| c.contains(&json!("gpu"))));
                    let count = request["Count"].as_i64();
                    prop_assert!(count.is_some());
                    let has_ids = request.get("DeviceIDs").is_some();
                    prop_assert_eq!(has_ids, count == Some(0), "{}", request);
                }
                Err(message) => prop_assert!(!message.is_empty()),
            }
        }

        /// `shm_size`: a positive size, which re-parses equal written as a number.
        #[test]
        fn shm_size(value in option_value(OTHER_PIECES, 4)) {
            if let Ok(bytes) = parse_size(&value) {
                prop_assert!(bytes > 0);
                prop_assert_eq!(parse_size(&json!(bytes)), Ok(bytes));
                prop_assert_eq!(parse_size(&json!(bytes.to_string())), Ok(bytes));
            }
        }

        /// `ipc_mode`: a mode re-parses to itself.
        #[test]
        fn ipc_mode(value in option_value(OTHER_PIECES, 3)) {
            if let Ok(mode) = parse_ipc_mode(&value) {
                prop_assert_eq!(parse_ipc_mode(&json!(mode.clone())), Ok(mode));
            }
        }

        /// `cpus`: between a thousandth and a thousand CPUs, in billionths.
        #[test]
        fn cpus(
            value in prop_oneof![option_value(OTHER_PIECES, 4), (-1e4f64..1e4).prop_map(Value::from)],
        ) {
            if let Ok(nanos) = parse_cpus(&value) {
                prop_assert!((1_000_000..=1_000_000_000_000).contains(&nanos), "{}", nanos);
            }
        }

        /// `ports`: every published port is also exposed, each binding names a host port.
        #[test]
        fn ports(value in option_value(PORT_PIECES, 7)) {
            if let Ok((exposed, bindings)) = parse_ports(&value) {
                for (port, list) in &bindings {
                    prop_assert!(exposed.contains_key(port));
                    for binding in list.as_array().into_iter().flatten() {
                        prop_assert!(binding["HostPort"].is_string());
                        prop_assert!(binding["HostIp"].is_string());
                    }
                }
            }
        }

        /// A well-formed range mapping publishes each container port on the host port at the
        /// same offset, with the protocol (lower-cased) in the key; a single host port is
        /// given for every container port.
        #[test]
        fn port_ranges_map_by_offset(
            host in 1u16..60000,
            container in 1u16..60000,
            extra in 0u16..5,
            single_host: bool,
            protocol in proptest::sample::select(&["tcp", "UDP", "sctp"][..]),
        ) {
            let host_part = if single_host {
                host.to_string()
            } else {
                format!("{host}-{}", host + extra)
            };
            let spec = format!("127.0.0.1:{host_part}:{container}-{}/{protocol}", container + extra);
            let (exposed, bindings) = parse_ports(&json!(spec)).map_err(TestCaseError::fail)?;
            let protocol = protocol.to_ascii_lowercase();
            prop_assert_eq!(exposed.len(), usize::from(extra) + 1);
            for offset in 0..=extra {
                let key = format!("{}/{protocol}", container + offset);
                let host_port = if single_host { host } else { host + offset };
                let expected = json!([{"HostIp": "127.0.0.1", "HostPort": host_port.to_string()}]);
                prop_assert_eq!(&bindings[&key], &expected);
            }
        }

        /// `platform`: a platform re-parses to itself.
        #[test]
        fn platform(value in option_value(OTHER_PIECES, 6)) {
            if let Ok(platform) = parse_platform(&value) {
                prop_assert_eq!(parse_platform(&json!(platform.clone())), Ok(platform));
            }
        }

        /// `max_runtime`: anything gives a positive limit of at most a year, or a message; a
        /// limit given back as its number of seconds reads the same.
        #[test]
        fn max_runtime(value in option_value(OTHER_PIECES, 6)) {
            if let Ok(limit) = parse_max_runtime(&value) {
                prop_assert!(!limit.is_zero());
                prop_assert!(limit <= std::time::Duration::from_secs(365 * 24 * 3600));
                prop_assert_eq!(parse_max_runtime(&json!(limit.as_secs_f64())), Ok(limit));
            }
        }

        /// All six together: the options or one error per invalid field; applied over no
        /// keywords, they replace nothing and so warn about nothing.
        #[test]
        fn all_options(
            values in proptest::collection::vec(
                proptest::option::of(prop_oneof![
                    option_value(GPU_PIECES, 6),
                    option_value(PORT_PIECES, 6),
                    option_value(OTHER_PIECES, 4),
                ]),
                6,
            ),
        ) {
            let source: Map<String, Value> = TYPED_FIELDS
                .iter()
                .zip(values)
                .filter_map(|(field, value)| Some(((*field).to_owned(), value?)))
                .collect();
            match TypedOptions::from_rendered(&source) {
                Ok(typed) => {
                    let mut overrides = EngineOverrides::default();
                    typed.apply(&mut overrides);
                    prop_assert!(overrides.warnings.is_empty());
                }
                Err(errors) => {
                    for (field, message) in &errors {
                        prop_assert!(TYPED_FIELDS.contains(&field.as_str()));
                        prop_assert!(!message.is_empty());
                    }
                }
            }
        }
    }
}
