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
            Some(v) => parse_lax_bool(v).unwrap_or_else(|| {
                self.fail(field, "Input should be a valid boolean");
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
}

/// pydantic's lax boolean parsing (`"true"`, `"0"`, `1`, …).
fn parse_lax_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_f64() {
            Some(0.0) => Some(false),
            Some(1.0) => Some(true),
            _ => None,
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
            "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
            _ => None,
        },
        _ => None,
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

        let command = c.opt_string("command").filter(|s| !s.is_empty());
        let name = c.opt_string("name");
        let network_mode = c.opt_string("network_mode");

        let image = match source.get("image") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                c.fail("image", "Input should be a valid string");
                None
            }
        };

        let env = match c.object("env") {
            None => Vec::new(),
            Some(map) => map
                .into_iter()
                .map(|(k, v)| {
                    let value = match v {
                        Value::Null => None,
                        other => Some(python_str(&other)),
                    };
                    (k, value)
                })
                .collect(),
        };

        let mut labels = Vec::new();
        for (k, v) in c.object("labels").unwrap_or_default() {
            match v {
                Value::String(s) => labels.push((k, s)),
                _ => c.fail(&format!("labels.{k}"), "Input should be a valid string"),
            }
        }

        let registry_credentials = c.object("registry_credentials").and_then(|map| {
            let mut field = |name: &str| match map.get(name) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => {
                    c.fail(
                        &format!("registry_credentials.{name}"),
                        "Input should be a valid string",
                    );
                    None
                }
                None => {
                    c.fail(&format!("registry_credentials.{name}"), "Field required");
                    None
                }
            };
            let username = field("username");
            let password = field("password");
            let registry_url = field("registry_url");
            let reauth = map.get("reauth").and_then(parse_lax_bool).unwrap_or(true);
            Some(RegistryCredentials {
                username: username?,
                password: password?,
                registry_url: registry_url?,
                reauth,
            })
        });

        let image_pull_policy = match source.get("image_pull_policy") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if PullPolicy::parse(s).is_some() => PullPolicy::parse(s),
            Some(_) => {
                c.fail(
                    "image_pull_policy",
                    "Input should be 'IfNotPresent', 'Always', 'IfPossible' or 'Never'",
                );
                None
            }
        };

        let networks = c.string_list("networks");
        let auto_remove = c.boolean("auto_remove", false);
        let stream_output = c.boolean("stream_output", true);
        let privileged = c.boolean("privileged", false);

        let mut volumes = Vec::new();
        match source.get("volumes") {
            None => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => match parse_volume(s, cwd) {
                            Ok(v) => volumes.push(v),
                            Err(m) => c.fail(&format!("volumes.{i}"), format!("Value error, {m}")),
                        },
                        _ => c.fail(
                            &format!("volumes.{i}"),
                            "Value error, Invalid volume specification: must be a string",
                        ),
                    }
                }
            }
            Some(_) => c.fail("volumes", "Input should be a valid list"),
        }

        let mut memory = |field: &str| {
            c.opt_string(field).and_then(|s| match parse_bytes(&s) {
                Ok(n) => Some(n),
                Err(m) => {
                    c.fail(field, m);
                    None
                }
            })
        };
        let mem_limit = memory("mem_limit");
        let memswap_limit = memory("memswap_limit");

        let mut overrides = match c.object("container_create_kwargs") {
            None => EngineOverrides::default(),
            Some(kwargs) => map_create_kwargs(&kwargs).unwrap_or_else(|m| {
                c.fail("container_create_kwargs", m);
                EngineOverrides::default()
            }),
        };
        let typed = match TypedOptions::from_rendered(source) {
            Ok(mut typed) => {
                typed.apply(&mut overrides);
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
                    c.fail(&field, message);
                }
                TypedOptions::default()
            }
        };

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

    #[test]
    fn credentials_debug_hides_password() {
        let c = parse(json!({"registry_credentials": {"username": "u", "password": "hunter2", "registry_url": "r"}}))
            .unwrap();
        let creds = c.registry_credentials.unwrap();
        assert!(creds.reauth);
        assert!(!format!("{creds:?}").contains("hunter2"));
    }
}
