//! The typed Docker job configuration, validated from a rendered template.
//!
//! Pure. Field names, defaults and messages follow prefect-docker's
//! `DockerWorkerJobConfiguration`, so a job variable the Python worker rejects is rejected
//! here with the same words.

use std::fmt;
use std::path::Path;

use serde_json::{Map, Value};

use super::create_kwargs::{EngineOverrides, map_create_kwargs};
use super::image::PullPolicy;
use super::memory::parse_bytes;
use super::template::python_str;
use super::typed::TypedOptions;
use super::volumes::{Volume, parse_volume};

/// Registry login details (normally from a `docker-registry-credentials` block).
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredentials {
    /// Registry user.
    pub username: String,
    /// Registry password; never printed.
    pub password: String,
    /// Registry address (`127.0.0.1:5000`, `index.docker.io`).
    pub registry_url: String,
    /// Log in again even if a login is cached.
    pub reauth: bool,
}

impl fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("password", &"********")
            .field("registry_url", &self.registry_url)
            .field("reauth", &self.reauth)
            .finish()
    }
}

/// A validated Docker job configuration, before the per-run additions of `spec`.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerJobConfiguration {
    /// Command to run; `None` means the worker's default (`prefect flow-run execute`).
    pub command: Option<String>,
    /// Environment from the job, in order; `None` values are removed later.
    pub env: Vec<(String, Option<String>)>,
    /// User labels, in order.
    pub labels: Vec<(String, String)>,
    /// Container name template; `None` means the flow run's name.
    pub name: Option<String>,
    /// Image; `None` means the worker's default image.
    pub image: Option<String>,
    /// Login for pulls.
    pub registry_credentials: Option<RegistryCredentials>,
    /// Pull policy; `None` means "by tag".
    pub image_pull_policy: Option<PullPolicy>,
    /// Networks: the first at create, the rest connected after.
    pub networks: Vec<String>,
    /// Explicit network mode.
    pub network_mode: Option<String>,
    /// Docker removes the container when it exits.
    pub auto_remove: bool,
    /// Validated volumes.
    pub volumes: Vec<Volume>,
    /// Print the container's output on the worker's stdout.
    pub stream_output: bool,
    /// Memory limit in bytes.
    pub mem_limit: Option<i64>,
    /// Memory + swap limit in bytes (`-1` = unlimited swap).
    pub memswap_limit: Option<i64>,
    /// Privileged container.
    pub privileged: bool,
    /// Mapped `container_create_kwargs`, with the typed options applied over them.
    pub overrides: EngineOverrides,
    /// The typed options (`gpus`, `shm_size`, `ipc_mode`, `cpus`, `ports`, `platform`); the
    /// platform also takes `container_create_kwargs.platform` when the job variable is unset.
    pub typed: TypedOptions,
}

/// One field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted field path (`registry_credentials.username`).
    pub field: String,
    /// What is wrong, in pydantic's words where the reference uses them.
    pub message: String,
}

/// The job configuration did not validate; lists every problem at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// Every failing field.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "{n} validation error{} for DockerWorkerJobConfiguration",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n{}\n  {}", e.field, e.message)?;
        }
        Ok(())
    }
}

struct Checker<'a> {
    source: &'a Map<String, Value>,
    errors: Vec<FieldError>,
}

impl Checker<'_> {
    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// `Option<String>` fields: missing or null → None; other types are an error.
    fn opt_string(&mut self, field: &str) -> Option<String> {
        match self.source.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.fail(field, "Input should be a valid string");
                None
            }
        }
    }

    fn boolean(&mut self, field: &str, default: bool) -> bool {
        match self.source.get(field) {
            None => default,
            Some(v) => parse_lax_bool(v).unwrap_or_else(|message| {
                self.fail(field, message);
                default
            }),
        }
    }

    fn string_list(&mut self, field: &str) -> Vec<String> {
        match self.source.get(field) {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        _ => self.fail(&format!("{field}.{i}"), "Input should be a valid string"),
                    }
                }
                out
            }
            Some(_) => {
                self.fail(field, "Input should be a valid list");
                Vec::new()
            }
        }
    }

    /// `Option<dict>` fields: missing or null → None; other types are an error.
    fn object(&mut self, field: &str) -> Option<Map<String, Value>> {
        match self.source.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(_) => {
                self.fail(field, "Input should be a valid dictionary");
                None
            }
        }
    }

    /// `dict` fields with a default: missing → empty; null and other types are an error.
    fn required_object(&mut self, field: &str) -> Map<String, Value> {
        match self.source.get(field) {
            None => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => {
                self.fail(field, "Input should be a valid dictionary");
                Map::new()
            }
        }
    }
}

/// pydantic's lax boolean parsing: booleans, the integers 0 and 1 (also written `1.0`), and
/// the strings `1 0 on off t f true false y n yes no` in any case, without surrounding spaces.
///
/// # Errors
/// pydantic's message: "unable to interpret input" for strings and whole numbers it does
/// not know, the bare message for other types (null, fractions, lists, objects).
pub(crate) fn parse_lax_bool(value: &Value) -> Result<bool, &'static str> {
    const UNINTERPRETABLE: &str = "Input should be a valid boolean, unable to interpret input";
    const NOT_A_BOOLEAN: &str = "Input should be a valid boolean";
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => {
            let whole = n.as_i64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
                    .map(|f| f as i64)
            });
            match whole {
                Some(0) => Ok(false),
                Some(1) => Ok(true),
                Some(_) => Err(UNINTERPRETABLE),
                None if n.is_u64() => Err(UNINTERPRETABLE),
                None => Err(NOT_A_BOOLEAN),
            }
        }
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "1" | "on" | "t" | "true" | "y" | "yes" => Ok(true),
            "0" | "off" | "f" | "false" | "n" | "no" => Ok(false),
            _ => Err(UNINTERPRETABLE),
        },
        _ => Err(NOT_A_BOOLEAN),
    }
}

impl DockerJobConfiguration {
    /// Validates a rendered job configuration. Relative bind sources are resolved against `cwd`.
    ///
    /// # Errors
    /// [`ValidationError`] listing every invalid field.
    pub fn from_rendered(source: &Map<String, Value>, cwd: &Path) -> Result<Self, ValidationError> {
        let mut c = Checker {
            source,
            errors: Vec::new(),
        };
        // Fields are checked in the order of the reference's model, so that the errors are
        // listed as pydantic lists them.
        let command = c.opt_string("command").filter(|s| !s.is_empty());
        let env = c.env();
        let labels = c.labels();
        let name = c.opt_string("name");
        let image = c.image();
        let registry_credentials = c.registry_credentials();
        let image_pull_policy = c.image_pull_policy();
        let networks = c.string_list("networks");
        let network_mode = c.opt_string("network_mode");
        let auto_remove = c.boolean("auto_remove", false);
        let volumes = c.volumes(cwd);
        let stream_output = c.boolean("stream_output", true);
        let mem_limit = c.memory("mem_limit");
        let memswap_limit = c.memory("memswap_limit");
        let privileged = c.boolean("privileged", false);
        let mut overrides = c.create_kwargs(&networks);
        let typed = c.typed_options(&mut overrides);
        if !c.errors.is_empty() {
            return Err(ValidationError { errors: c.errors });
        }
        Ok(Self {
            command,
            env,
            labels,
            name,
            image,
            registry_credentials,
            image_pull_policy,
            networks,
            network_mode,
            auto_remove,
            volumes,
            stream_output,
            mem_limit,
            memswap_limit,
            privileged,
            overrides,
            typed,
        })
    }
}

/// The checks of single fields with more than a type to check, one per field.
impl Checker<'_> {
    /// `env`: values other than null are stringified as Python prints them. The reference's
    /// env pre-validator crashes on anything but a dict (AttributeError); here that is the
    /// dictionary error pydantic gives for `labels`.
    fn env(&mut self) -> Vec<(String, Option<String>)> {
        self.required_object("env")
            .into_iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::Null => None,
                    other => Some(python_str(&other)),
                };
                (k, value)
            })
            .collect()
    }

    /// `labels`: an object of strings; each other value is an error of its own.
    fn labels(&mut self) -> Vec<(String, String)> {
        let mut labels = Vec::new();
        for (k, v) in self.required_object("labels") {
            match v {
                Value::String(s) => labels.push((k, s)),
                _ => self.fail(&format!("labels.{k}"), "Input should be a valid string"),
            }
        }
        labels
    }

    /// `image`: unlike the other optional strings, null is an error (the reference's field
    /// is a `str` with a default).
    fn image(&mut self) -> Option<String> {
        match self.source.get("image") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.fail("image", "Input should be a valid string");
                None
            }
        }
    }

    /// `registry_credentials`: null, or an object with the three strings of a
    /// `DockerRegistryCredentials` block and an optional lax-boolean `reauth`.
    fn registry_credentials(&mut self) -> Option<RegistryCredentials> {
        let map = match self.source.get("registry_credentials") {
            None | Some(Value::Null) => return None,
            Some(Value::Object(map)) => map,
            Some(_) => {
                self.fail(
                    "registry_credentials",
                    "Input should be a valid dictionary or instance of DockerRegistryCredentials",
                );
                return None;
            }
        };
        let username = self.credential_text(map, "username");
        let password = self.credential_text(map, "password");
        let registry_url = self.credential_text(map, "registry_url");
        let reauth = match map.get("reauth") {
            None => true,
            Some(v) => parse_lax_bool(v).unwrap_or_else(|message| {
                self.fail("registry_credentials.reauth", message);
                true
            }),
        };
        Some(RegistryCredentials {
            username: username?,
            password: password?,
            registry_url: registry_url?,
            reauth,
        })
    }

    /// One required string of `registry_credentials`.
    fn credential_text(&mut self, map: &Map<String, Value>, name: &str) -> Option<String> {
        match map.get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.fail(
                    &format!("registry_credentials.{name}"),
                    "Input should be a valid string",
                );
                None
            }
            None => {
                self.fail(&format!("registry_credentials.{name}"), "Field required");
                None
            }
        }
    }

    /// `image_pull_policy`: null, or one of the policy names.
    fn image_pull_policy(&mut self) -> Option<PullPolicy> {
        match self.source.get("image_pull_policy") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if PullPolicy::parse(s).is_some() => PullPolicy::parse(s),
            Some(_) => {
                self.fail(
                    "image_pull_policy",
                    "Input should be 'IfNotPresent', 'Always', 'IfPossible' or 'Never'",
                );
                None
            }
        }
    }

    /// `volumes`: a list of volume strings, each validated (and relative binds resolved
    /// against `cwd`) on its own.
    fn volumes(&mut self, cwd: &Path) -> Vec<Volume> {
        let items = match self.source.get("volumes") {
            None => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.fail("volumes", "Input should be a valid list");
                return Vec::new();
            }
        };
        let mut volumes = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::String(s) => match parse_volume(s, cwd) {
                    Ok(v) => volumes.push(v),
                    Err(m) => self.fail(&format!("volumes.{i}"), format!("Value error, {m}")),
                },
                _ => self.fail(&format!("volumes.{i}"), "Input should be a valid string"),
            }
        }
        volumes
    }

    /// `mem_limit` / `memswap_limit` in bytes. The reference only checks for a string here
    /// and parses the units when it creates the container; both checks happen now, with
    /// docker-py's words for the second.
    fn memory(&mut self, field: &str) -> Option<i64> {
        let text = self.opt_string(field)?;
        match parse_bytes(&text) {
            Ok(n) => Some(n),
            Err(m) => {
                self.fail(field, m);
                None
            }
        }
    }

    /// `container_create_kwargs` mapped to Engine fields, each failing keyword an error of
    /// its own; `networking_config` is kept only when it applies (see
    /// [`keep_networking_config`]).
    fn create_kwargs(&mut self, networks: &[String]) -> EngineOverrides {
        let mut overrides = match self.object("container_create_kwargs") {
            None => EngineOverrides::default(),
            Some(kwargs) => map_create_kwargs(&kwargs).unwrap_or_else(|errors| {
                for error in errors {
                    self.fail(
                        &format!("container_create_kwargs.{}", error.key),
                        error.message,
                    );
                }
                EngineOverrides::default()
            }),
        };
        keep_networking_config(&mut overrides, networks);
        overrides
    }

    /// The typed options, applied over the keywords' fields; the job variable `platform`
    /// wins over `container_create_kwargs.platform` (with a warning when they differ) and
    /// falls back to it.
    fn typed_options(&mut self, overrides: &mut EngineOverrides) -> TypedOptions {
        match TypedOptions::from_rendered(self.source) {
            Ok(mut typed) => {
                typed.apply(overrides);
                if let (Some(ours), Some(theirs)) = (&typed.platform, &overrides.platform)
                    && ours != theirs
                {
                    overrides.warnings.push(format!(
                        "The job variable 'platform' replaces container_create_kwargs.platform ({theirs})"
                    ));
                }
                typed.platform = typed.platform.or_else(|| overrides.platform.clone());
                typed
            }
            Err(errors) => {
                for (field, message) in errors {
                    self.fail(&field, message);
                }
                TypedOptions::default()
            }
        }
    }
}

/// docker-py applies `networking_config` only with the network the container is created on,
/// and only when it names that network: anything else is dropped with a warning.
fn keep_networking_config(overrides: &mut EngineOverrides, networks: &[String]) {
    let Some(endpoints) = overrides.networking_config.take() else {
        return;
    };
    match networks.first() {
        Some(first) if endpoints.contains_key(first) => {
            overrides.networking_config = Some(endpoints);
        }
        first => overrides.warnings.push(format!(
            "container_create_kwargs.networking_config is ignored: it applies only to the first of the job's networks{}",
            first.map_or_else(
                || ", and the job has none".to_owned(),
                |f| format!(" ('{f}'), which it does not name")
            )
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<DockerJobConfiguration, ValidationError> {
        DockerJobConfiguration::from_rendered(v.as_object().unwrap(), Path::new("/w"))
    }

    #[test]
    fn defaults_when_empty() {
        let c = parse(json!({})).unwrap();
        assert_eq!(c.image, None);
        assert!(c.stream_output);
        assert!(!c.auto_remove);
        assert!(c.env.is_empty());
    }

    #[test]
    fn coercions() {
        let c = parse(json!({
            "command": "", "env": {"N": 5, "B": true, "X": null, "S": "s"},
            "auto_remove": "true", "mem_limit": "64m", "memswap_limit": "-1",
            "image_pull_policy": "Never", "volumes": ["./d:/d"]
        }))
        .unwrap();
        assert_eq!(c.command, None);
        assert_eq!(
            c.env,
            vec![
                ("N".into(), Some("5".into())),
                ("B".into(), Some("True".into())),
                ("X".into(), None),
                ("S".into(), Some("s".into()))
            ]
        );
        assert!(c.auto_remove);
        assert_eq!(c.mem_limit, Some(67_108_864));
        assert_eq!(c.memswap_limit, Some(-1));
        assert_eq!(c.image_pull_policy, Some(PullPolicy::Never));
        assert_eq!(c.volumes[0].bind, "/w/d:/d");
    }

    #[test]
    fn reference_messages() {
        let err = parse(json!({
            "image": null, "image_pull_policy": "Sometimes", "mem_limit": 123,
            "labels": {"a": 1}, "volumes": ["/x:rel"], "registry_credentials": {"username": "u"},
            "stream_output": "maybe"
        }))
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "image\n  Input should be a valid string",
            "image_pull_policy\n  Input should be 'IfNotPresent', 'Always', 'IfPossible' or 'Never'",
            "mem_limit\n  Input should be a valid string",
            "labels.a\n  Input should be a valid string",
            "volumes.0\n  Value error, For bind mounts, container path must be absolute",
            "registry_credentials.password\n  Field required",
            "registry_credentials.registry_url\n  Field required",
            "stream_output\n  Input should be a valid boolean",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert!(
            text.starts_with("8 validation errors for DockerWorkerJobConfiguration"),
            "{text}"
        );
    }

    /// (field, message) pairs of a failed validation.
    fn errors(v: Value) -> Vec<(String, String)> {
        parse(v)
            .unwrap_err()
            .errors
            .into_iter()
            .map(|e| (e.field, e.message))
            .collect()
    }

    fn error(v: Value) -> (String, String) {
        let mut all = errors(v.clone());
        assert_eq!(all.len(), 1, "{v}: {all:?}");
        all.remove(0)
    }

    fn pair(field: &str, message: &str) -> (String, String) {
        (field.to_owned(), message.to_owned())
    }

    /// Every field of the reference's model wrong at once: the same errors, in the same order,
    /// as prefect-docker 0.7.4's `DockerWorkerJobConfiguration(**values)` reports (its
    /// `str(ValidationError)` without pydantic's `[type=…]` and documentation-link lines).
    #[test]
    fn every_field_fails_as_in_the_reference_and_in_its_order() {
        let err = parse(json!({
            "command": 5, "env": {"A": 1}, "labels": null, "name": 5, "image": null,
            "registry_credentials": "x", "image_pull_policy": "x", "networks": "x",
            "network_mode": 5, "auto_remove": "x", "volumes": [5], "stream_output": null,
            "mem_limit": 1, "memswap_limit": 2, "privileged": 0.5, "container_create_kwargs": []
        }))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "15 validation errors for DockerWorkerJobConfiguration
command
  Input should be a valid string
labels
  Input should be a valid dictionary
name
  Input should be a valid string
image
  Input should be a valid string
registry_credentials
  Input should be a valid dictionary or instance of DockerRegistryCredentials
image_pull_policy
  Input should be 'IfNotPresent', 'Always', 'IfPossible' or 'Never'
networks
  Input should be a valid list
network_mode
  Input should be a valid string
auto_remove
  Input should be a valid boolean, unable to interpret input
volumes.0
  Input should be a valid string
stream_output
  Input should be a valid boolean
mem_limit
  Input should be a valid string
memswap_limit
  Input should be a valid string
privileged
  Input should be a valid boolean
container_create_kwargs
  Input should be a valid dictionary"
        );
        assert_eq!(
            parse(json!({"image": null})).unwrap_err().to_string(),
            "1 validation error for DockerWorkerJobConfiguration\nimage\n  Input should be a valid string"
        );
    }

    /// Each case and message as the reference's model gives it (run in its venv).
    #[test]
    fn reference_messages_per_field() {
        let string = "Input should be a valid string";
        let dict = "Input should be a valid dictionary";
        let list = "Input should be a valid list";
        let policy = "Input should be 'IfNotPresent', 'Always', 'IfPossible' or 'Never'";
        for (values, field, message) in [
            (json!({"image": 5}), "image", string),
            (json!({"image": ["a"]}), "image", string),
            (json!({"image": true}), "image", string),
            (json!({"command": ["a"]}), "command", string),
            (json!({"name": true}), "name", string),
            (json!({"labels": "x"}), "labels", dict),
            (json!({"labels": {"a": 1}}), "labels.a", string),
            (json!({"labels": {"a": null}}), "labels.a", string),
            (json!({"labels": {"a": true}}), "labels.a", string),
            (
                json!({"image_pull_policy": "always"}),
                "image_pull_policy",
                policy,
            ),
            (json!({"image_pull_policy": 5}), "image_pull_policy", policy),
            (
                json!({"image_pull_policy": ""}),
                "image_pull_policy",
                policy,
            ),
            (json!({"networks": null}), "networks", list),
            (json!({"networks": {"a": 1}}), "networks", list),
            (json!({"networks": [1]}), "networks.0", string),
            (json!({"networks": [null]}), "networks.0", string),
            (json!({"volumes": "x"}), "volumes", list),
            (json!({"volumes": null}), "volumes", list),
            (json!({"volumes": [null]}), "volumes.0", string),
            (json!({"mem_limit": 1.5}), "mem_limit", string),
            (json!({"mem_limit": true}), "mem_limit", string),
            (json!({"memswap_limit": false}), "memswap_limit", string),
            (
                json!({"container_create_kwargs": "x"}),
                "container_create_kwargs",
                dict,
            ),
        ] {
            assert_eq!(error(values.clone()), pair(field, message), "{values}");
        }
        // Null is allowed where the model says Optional.
        parse(
            json!({"command": null, "name": null, "image_pull_policy": null,
                     "network_mode": null, "mem_limit": null, "memswap_limit": null,
                     "container_create_kwargs": null, "registry_credentials": null}),
        )
        .unwrap();
    }

    /// pydantic's lax booleans, with its two messages (cases run against the reference).
    #[test]
    fn booleans_as_pydantic_reads_them() {
        for (value, expected) in [
            (json!(true), true),
            (json!("TRUE"), true),
            (json!("tRuE"), true),
            (json!("True"), true),
            (json!("Yes"), true),
            (json!("ON"), true),
            (json!("t"), true),
            (json!("y"), true),
            (json!("1"), true),
            (json!(1), true),
            (json!(1.0), true),
            (json!("off"), false),
            (json!("n"), false),
            (json!(0), false),
            (json!(0.0), false),
        ] {
            let c = parse(json!({"auto_remove": value, "privileged": value})).unwrap();
            assert_eq!(
                (c.auto_remove, c.privileged),
                (expected, expected),
                "{value}"
            );
        }
        let uninterpretable = "Input should be a valid boolean, unable to interpret input";
        let not_boolean = "Input should be a valid boolean";
        for (value, message) in [
            (json!("maybe"), uninterpretable),
            (json!(" true "), uninterpretable),
            (json!(""), uninterpretable),
            (json!("1.0"), uninterpretable),
            (json!(2), uninterpretable),
            (json!(-1), uninterpretable),
            (json!(2.0), uninterpretable),
            (json!(0.5), not_boolean),
            (json!(1e300), not_boolean),
            (json!(null), not_boolean),
            (json!([1]), not_boolean),
            (json!({"a": 1}), not_boolean),
        ] {
            for field in ["auto_remove", "stream_output", "privileged"] {
                assert_eq!(
                    error(json!({ field: value })),
                    pair(field, message),
                    "{field}: {value}"
                );
            }
        }
    }

    #[test]
    fn env_values_become_python_strings_and_must_be_an_object() {
        let c = parse(json!({"env": {"C": [1], "D": {"x": 1}, "E": 1.5, "F": false}})).unwrap();
        assert_eq!(
            c.env,
            vec![
                ("C".into(), Some("[1]".into())),
                ("D".into(), Some("{'x': 1}".into())),
                ("E".into(), Some("1.5".into())),
                ("F".into(), Some("False".into())),
            ]
        );
        // The reference crashes here (AttributeError: 'str' object has no attribute 'items');
        // pydantic's dictionary message instead (README "Differences").
        for env in [json!("x"), json!([1]), json!(null)] {
            assert_eq!(
                error(json!({ "env": env })),
                pair("env", "Input should be a valid dictionary")
            );
        }
    }

    #[test]
    fn registry_credentials_as_the_block_validates_them() {
        let all_missing = errors(json!({"registry_credentials": {}}));
        assert_eq!(
            all_missing,
            [
                pair("registry_credentials.username", "Field required"),
                pair("registry_credentials.password", "Field required"),
                pair("registry_credentials.registry_url", "Field required"),
            ]
        );
        assert_eq!(
            errors(
                json!({"registry_credentials": {"username": null, "password": 2, "registry_url": 3}})
            ),
            [
                pair(
                    "registry_credentials.username",
                    "Input should be a valid string"
                ),
                pair(
                    "registry_credentials.password",
                    "Input should be a valid string"
                ),
                pair(
                    "registry_credentials.registry_url",
                    "Input should be a valid string"
                ),
            ]
        );
        let creds = |reauth: Value| json!({"registry_credentials": {"username": "u", "password": "p", "registry_url": "r", "reauth": reauth}});
        assert_eq!(
            error(creds(json!("maybe"))),
            pair(
                "registry_credentials.reauth",
                "Input should be a valid boolean, unable to interpret input"
            )
        );
        assert_eq!(
            error(creds(json!(null))),
            pair(
                "registry_credentials.reauth",
                "Input should be a valid boolean"
            )
        );
        let c = parse(creds(json!("false"))).unwrap();
        assert!(!c.registry_credentials.unwrap().reauth);
        for bad in [json!("x"), json!(5), json!([])] {
            assert_eq!(
                error(json!({ "registry_credentials": bad })),
                pair(
                    "registry_credentials",
                    "Input should be a valid dictionary or instance of DockerRegistryCredentials"
                )
            );
        }
        // Extra keys (a block document's own fields) are allowed.
        parse(
            json!({"registry_credentials": {"username": "u", "password": "p", "registry_url": "r",
                                              "block_type_slug": "docker-registry-credentials"}}),
        )
        .unwrap();
    }

    #[test]
    fn volumes_and_memory_report_per_item_with_the_reference_words() {
        assert_eq!(
            errors(json!({"volumes": ["/x:/y", 5, "bad", "/a:/b:ro:x"]})),
            [
                pair("volumes.1", "Input should be a valid string"),
                pair(
                    "volumes.2",
                    "Value error, Invalid volume specification: bad"
                ),
                pair(
                    "volumes.3",
                    "Value error, Invalid volume option: 'ro:x'. Must be 'ro' or 'rw'"
                ),
            ]
        );
        // docker-py's parse_bytes words, at validation (the reference fails at create).
        assert_eq!(
            error(json!({"mem_limit": "12x"})),
            pair(
                "mem_limit",
                "The specified value for memory (12x) should specify the units. The postfix should be one of the `b` `k` `m` `g` characters"
            )
        );
        assert_eq!(
            error(json!({"memswap_limit": "kb"})),
            pair(
                "memswap_limit",
                "Failed converting the string value for memory () to an integer."
            )
        );
        // docker-py reads an empty size as 0 (no limit).
        assert_eq!(parse(json!({"mem_limit": ""})).unwrap().mem_limit, Some(0));
    }

    #[test]
    fn create_kwargs_errors_name_the_key() {
        assert_eq!(
            errors(json!({"container_create_kwargs": {"bogus_option": 1, "cpu_shares": "x"}})),
            [
                pair(
                    "container_create_kwargs.bogus_option",
                    "unknown key 'bogus_option' (not a docker-py containers.create argument)"
                ),
                pair(
                    "container_create_kwargs.cpu_shares",
                    "expected an integer; got \"x\""
                ),
            ]
        );
    }

    #[test]
    fn networking_config_applies_only_to_the_first_network() {
        let kwargs = json!({"networking_config": {"n1": {"Aliases": ["a"]}}});
        let c =
            parse(json!({"networks": ["n1", "n2"], "container_create_kwargs": kwargs})).unwrap();
        assert!(c.overrides.networking_config.is_some());
        assert!(c.overrides.warnings.is_empty());
        let c = parse(json!({"networks": ["n2"], "container_create_kwargs": kwargs})).unwrap();
        assert_eq!(c.overrides.networking_config, None);
        assert!(c.overrides.warnings[0].contains("('n2'), which it does not name"));
        let c = parse(json!({"container_create_kwargs": kwargs})).unwrap();
        assert_eq!(c.overrides.networking_config, None);
        assert!(c.overrides.warnings[0].ends_with("and the job has none"));
    }

    #[test]
    fn credentials_debug_hides_password() {
        let c = parse(json!({"registry_credentials": {"username": "u", "password": "hunter2", "registry_url": "r"}}))
            .unwrap();
        let creds = c.registry_credentials.unwrap();
        assert!(creds.reauth);
        assert!(!format!("{creds:?}").contains("hunter2"));
    }
}

#[cfg(test)]
mod properties {
    use std::path::Path;

    use super::DockerJobConfiguration;
    use crate::job::strategies::{config, remove_field, rendered_job};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(config(256))]

        /// Any rendered configuration validates or lists its errors, never a panic; the
        /// fields are checked independently, so without the ones named the rest validates.
        #[test]
        fn errors_name_exactly_the_failing_fields(mut source in rendered_job()) {
            let cwd = Path::new("/work/dir");
            if let Err(e) = DockerJobConfiguration::from_rendered(&source, cwd) {
                let n = e.errors.len();
                let suffix = if n == 1 { "" } else { "s" };
                let heading =
                    format!("{n} validation error{suffix} for DockerWorkerJobConfiguration");
                prop_assert!(e.to_string().starts_with(&heading));
                for error in &e.errors {
                    prop_assert!(!error.message.is_empty());
                    remove_field(&mut source, &error.field);
                }
                let again = DockerJobConfiguration::from_rendered(&source, cwd);
                prop_assert!(again.is_ok(), "{}", again.unwrap_err());
            }
        }
    }
}
