//! `--job-override FILE`: job configuration values of the host's operator, merged into every
//! rendered job configuration (runs, `--prepull`, and the images image garbage collection
//! keeps). Pure: `config` reads the file and hands its text to [`JobOverride::parse`].
//!
//! **Precedence: template < deployment < flow run < override.** The operator wins. Two
//! reasons. The values it exists for are facts of the host that deployment authors cannot
//! know and must not undo by accident: a device, a proxy, a mount, a log driver. And it is
//! merged into the *rendered* configuration, where a template default (`auto_remove: false`,
//! `stream_output: true`, …) cannot be told from a value a deployment set, so "defaults
//! only" could not be done faithfully: every key of the default template is always there.
//!
//! The merge is JSON Merge Patch (RFC 7386): objects (`env`, `labels`,
//! `container_create_kwargs`, and objects inside them) are merged key by key, so a
//! deployment's other keys stay; any other value (a string, a number, a list such as
//! `volumes` or `networks`) replaces the job's; `null` (JSON only: TOML has none) removes the
//! key, so the field takes its default. Values are used as written: `{{ placeholders }}` are
//! not rendered; `{"$ref": …}` block references are resolved like those of job variables.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::config::{DockerJobConfiguration, ValidationError};

/// A job override file, read and checked.
#[derive(Clone, PartialEq)]
pub struct JobOverride {
    /// Where it was read from (named in messages).
    source: PathBuf,
    /// Its top-level object: job configuration field → value.
    values: Map<String, Value>,
}

impl fmt::Debug for JobOverride {
    /// The file and its keys, never its values: an `env` may hold a token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobOverride")
            .field("source", &self.source)
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Why a job override file cannot be used; the worker refuses to start (exit 64).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobOverrideError {
    /// The file cannot be read (`config` reads it).
    #[error("cannot read it: {0}")]
    Read(String),
    /// It is neither valid JSON nor valid TOML (as its extension or content says).
    #[error("not valid {format}: {message}")]
    Syntax {
        /// `JSON` or `TOML`.
        format: &'static str,
        /// The parser's message, with the line where it has one.
        message: String,
    },
    /// The top level is not an object (a JSON object, a TOML document).
    #[error("expected an object of job configuration fields (such as `env` or `volumes`)")]
    NotAnObject,
    /// A key that is no field of a Docker job configuration (a typo would otherwise be
    /// ignored in silence).
    #[error("unknown job configuration field `{field}` (known: {known})")]
    UnknownField {
        /// The key.
        field: String,
        /// The fields there are.
        known: String,
    },
    /// A value the job configuration would refuse, checked now rather than at every run.
    #[error("{0}")]
    Invalid(ValidationError),
}

/// The fields of a Docker job configuration: the job configuration keys of the template
/// this worker gives its pools (the reference's plus the typed options).
fn known_fields() -> Vec<String> {
    super::default_base_job_template()
        .get("job_configuration")
        .and_then(Value::as_object)
        .map(|job| job.keys().cloned().collect())
        .unwrap_or_default()
}

/// Whether `value` holds a `{"$ref": …}` anywhere: resolved per run, so not checked at start.
fn has_reference(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.contains_key("$ref") || map.values().any(has_reference),
        Value::Array(items) => items.iter().any(has_reference),
        _ => false,
    }
}

/// Which syntax a file is in: by its extension, else by its first character (`{` is JSON).
fn is_json(path: &Path, text: &str) -> bool {
    match path.extension().and_then(|e| e.to_str()) {
        Some(ext) if ext.eq_ignore_ascii_case("json") => true,
        Some(ext) if ext.eq_ignore_ascii_case("toml") => false,
        _ => text.trim_start().starts_with('{'),
    }
}

impl JobOverride {
    /// Parses `text` (JSON or TOML, see [`is_json`]) as the file at `path`, and checks it:
    /// an object whose keys are job configuration fields and whose values the job
    /// configuration accepts (relative `volumes` are resolved against `cwd`).
    ///
    /// # Errors
    /// [`JobOverrideError`] naming the problem.
    pub fn parse(path: &Path, text: &str, cwd: &Path) -> Result<Self, JobOverrideError> {
        let value: Value = if is_json(path, text) {
            serde_json::from_str(text).map_err(|e| JobOverrideError::Syntax {
                format: "JSON",
                message: e.to_string(),
            })?
        } else {
            toml::from_str(text).map_err(|e| JobOverrideError::Syntax {
                format: "TOML",
                message: e.to_string().trim_end().replace('\n', " "),
            })?
        };
        let Value::Object(values) = value else {
            return Err(JobOverrideError::NotAnObject);
        };
        let known = known_fields();
        if let Some(field) = values.keys().find(|k| !known.contains(k)) {
            return Err(JobOverrideError::UnknownField {
                field: field.clone(),
                known: known.join(", "),
            });
        }
        // What a run would get from these values alone: removals (null) and block
        // references are left out, the rest must pass the job configuration's checks.
        let checked: Map<String, Value> = values
            .iter()
            .filter(|(_, v)| !v.is_null() && !has_reference(v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        DockerJobConfiguration::from_rendered(&checked, cwd).map_err(JobOverrideError::Invalid)?;
        Ok(Self {
            source: path.to_owned(),
            values,
        })
    }

    /// The file it was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The fields it sets (or removes), for the start-up log.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// Merges the override into a rendered job configuration (JSON Merge Patch: the
    /// override wins; objects merge key by key; `null` removes).
    #[must_use]
    pub fn apply(&self, mut rendered: Map<String, Value>) -> Map<String, Value> {
        merge_patch(&mut rendered, &self.values);
        rendered
    }
}

/// [`JobOverride::apply`] when there is an override; the configuration unchanged when there
/// is none. The one call `resolve_configuration` makes after rendering.
#[must_use]
pub fn apply_override(
    rendered: Map<String, Value>,
    job_override: Option<&JobOverride>,
) -> Map<String, Value> {
    match job_override {
        Some(job_override) => job_override.apply(rendered),
        None => rendered,
    }
}

/// RFC 7386 on objects: `patch`'s nulls remove, its objects merge into objects, anything
/// else replaces.
fn merge_patch(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => {
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(existing) = slot {
                    merge_patch(existing, inner);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::render::{merge_job_variables, render_job_configuration};
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn parsed(name: &str, text: &str) -> Result<JobOverride, JobOverrideError> {
        JobOverride::parse(Path::new(name), text, Path::new("/work"))
    }

    /// The template's default, the deployment's value, the flow run's value and the override
    /// each win over the ones before them, field by field; objects merge key by key.
    #[test]
    fn precedence_is_template_deployment_flow_run_override() {
        let template = crate::job::default_base_job_template();
        let deployment = obj(json!({
            "image": "deployment/image:1",
            "env": {"FROM_DEPLOYMENT": "d", "SHARED": "deployment", "RUN_WINS": "deployment"},
            "labels": {"team": "data"},
            "volumes": ["/deployment:/d"],
            "stream_output": false,
            "container_create_kwargs": {"user": "1000", "restart_policy": {"Name": "no"}},
        }));
        let flow_run = obj(json!({"env": {"RUN_WINS": "run", "FROM_RUN": "r"}, "mem_limit": "1g"}));
        let variables = merge_job_variables(Some(&deployment), Some(&flow_run));
        let rendered = render_job_configuration(&template, &variables, &|_| None).unwrap();
        let over = parsed(
            "o.json",
            r#"{"env": {"SHARED": "operator", "HTTP_PROXY": "http://proxy:3128"},
                "volumes": ["/srv/cache:/cache"], "mem_limit": "2g",
                "container_create_kwargs": {"restart_policy": {"MaximumRetryCount": 2}}}"#,
        )
        .unwrap();
        let out = Value::Object(over.apply(rendered));
        // The template's defaults stay where nobody set the field.
        assert_eq!(out["auto_remove"], json!(false));
        assert_eq!(out["privileged"], json!(false));
        // The deployment's values where neither the run nor the override set them.
        assert_eq!(out["image"], json!("deployment/image:1"));
        assert_eq!(out["stream_output"], json!(false));
        assert_eq!(out["labels"], json!({"team": "data"}));
        // env: each key from whoever set it last; the override's keys win.
        assert_eq!(
            out["env"],
            json!({"FROM_DEPLOYMENT": "d", "SHARED": "operator", "RUN_WINS": "run",
                   "FROM_RUN": "r", "HTTP_PROXY": "http://proxy:3128"})
        );
        // The flow run's mem_limit, replaced by the operator's; a list is replaced whole.
        assert_eq!(out["mem_limit"], json!("2g"));
        assert_eq!(out["volumes"], json!(["/srv/cache:/cache"]));
        // Nested objects merge key by key.
        assert_eq!(
            out["container_create_kwargs"],
            json!({"user": "1000", "restart_policy": {"Name": "no", "MaximumRetryCount": 2}})
        );
    }

    #[test]
    fn null_removes_and_objects_replace_scalars() {
        let over = parsed(
            "o.json",
            r#"{"mem_limit": null, "env": {"DROP": null, "ADD": "1"}, "labels": {"a": "b"}}"#,
        )
        .unwrap();
        let rendered =
            obj(json!({"mem_limit": "1g", "env": {"DROP": "x", "KEEP": "y"}, "labels": "oops"}));
        assert_eq!(
            Value::Object(over.apply(rendered)),
            json!({"env": {"KEEP": "y", "ADD": "1"}, "labels": {"a": "b"}})
        );
        assert_eq!(
            apply_override(obj(json!({"a": 1})), None),
            obj(json!({"a": 1}))
        );
    }

    #[test]
    fn json_and_toml_by_extension_or_content() {
        let toml_text = "image = \"local/app:1\"\n\n[env]\nHTTP_PROXY = \"http://p:3128\"\n";
        for (name, text) in [
            ("o.toml", toml_text),
            ("override", toml_text),
            (
                "o.json",
                r#"{"image": "local/app:1", "env": {"HTTP_PROXY": "http://p:3128"}}"#,
            ),
            (
                "override.conf",
                r#" {"image": "local/app:1", "env": {"HTTP_PROXY": "http://p:3128"}}"#,
            ),
        ] {
            let over = parsed(name, text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut fields: Vec<_> = over.fields().collect();
            fields.sort_unstable();
            assert_eq!(fields, ["env", "image"], "{name}");
            let out = over.apply(Map::new());
            assert_eq!(out["env"]["HTTP_PROXY"], json!("http://p:3128"), "{name}");
        }
    }

    #[test]
    fn unusable_files_say_why() {
        let e = parsed("o.json", "{\"env\": ").unwrap_err();
        assert!(
            matches!(&e, JobOverrideError::Syntax { format: "JSON", message } if message.contains("line 1")),
            "{e}"
        );
        let e = parsed("o.toml", "env = [\n").unwrap_err();
        assert!(
            matches!(e, JobOverrideError::Syntax { format: "TOML", .. }),
            "{e}"
        );
        assert_eq!(
            parsed("o.json", "[1]").unwrap_err(),
            JobOverrideError::NotAnObject
        );
        let e = parsed("o.json", r#"{"imgae": "x"}"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("unknown job configuration field `imgae` (known: "),
            "{e}"
        );
        assert!(e.to_string().contains("container_create_kwargs"), "{e}");
        let e = parsed("o.toml", "mem_limit = \"lots\"\n").unwrap_err();
        assert!(matches!(e, JobOverrideError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("mem_limit"), "{e}");
        let e = parsed("o.json", r#"{"container_create_kwargs": {"bogus": 1}}"#).unwrap_err();
        assert!(
            e.to_string().contains("container_create_kwargs.bogus"),
            "{e}"
        );
        // A block reference is resolved per run, so it is not judged at start.
        parsed(
            "o.json",
            r#"{"registry_credentials": {"$ref": {"block_document_id": "1"}}, "image": null}"#,
        )
        .unwrap();
    }

    /// The README's example reads, and does what the README says.
    #[test]
    fn the_readme_example_reads() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let section = readme
            .split("## Job override")
            .nth(1)
            .expect("a Job override section");
        let toml = section
            .split("```toml\n")
            .nth(1)
            .and_then(|s| s.split("```").next())
            .expect("a TOML example");
        let over = parsed("override.toml", toml).unwrap_or_else(|e| panic!("{e}"));
        let out = over.apply(obj(json!({"env": {"A": "1"}, "volumes": ["/a:/a"]})));
        assert_eq!(out["volumes"], json!(["/srv/cache:/cache"]));
        assert_eq!(out["env"]["A"], json!("1"));
        assert_eq!(
            out["container_create_kwargs"]["log_config"]["type"],
            json!("local")
        );
    }

    #[test]
    fn debug_shows_keys_not_values() {
        let over = parsed("o.json", r#"{"env": {"TOKEN": "secret-value-1"}}"#).unwrap();
        let text = format!("{over:?}");
        assert!(text.contains("env") && text.contains("o.json"), "{text}");
        assert!(!text.contains("secret-value-1"), "{text}");
    }
}
