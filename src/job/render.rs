//! From a work pool's base job template and job variables to a rendered job configuration.
//!
//! Pure. Follows the order Prefect applies: schema defaults, dotted-key expansion,
//! `env` merges, then placeholder substitution (see `template`).

use serde_json::{Map, Value};

use super::template::apply_values;

/// Merges a deployment's job variables with a flow run's overrides.
///
/// Every flow-run key replaces the deployment's, except `env`, which is merged key by key
/// when both sides are objects (what Prefect users get from the Python worker).
pub fn merge_job_variables(
    deployment: Option<&Map<String, Value>>,
    flow_run: Option<&Map<String, Value>>,
) -> Map<String, Value> {
    let mut merged = deployment.cloned().unwrap_or_default();
    for (key, value) in flow_run.into_iter().flatten() {
        if key == "env"
            && let (Some(Value::Object(base)), Value::Object(over)) = (merged.get_mut("env"), value)
        {
            for (k, v) in over {
                base.insert(k.clone(), v.clone());
            }
            continue;
        }
        merged.insert(key.clone(), value.clone());
    }
    merged
}

/// Expands `{"env.FOO": "x"}` into `{"env": {"FOO": "x"}}`; plain keys are applied on top
/// (an object deep-merges over the dotted result, anything else replaces it).
pub fn expand_dotted_keys(values: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in values.iter().filter(|(k, _)| k.contains('.')) {
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut node = &mut out;
        for part in parts {
            let entry = node
                .entry(part.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            node = match entry {
                Value::Object(map) => map,
                _ => unreachable!("just made an object"),
            };
        }
        node.insert(last.to_owned(), value.clone());
    }
    for (key, value) in values.iter().filter(|(k, _)| !k.contains('.')) {
        match (out.get_mut(key), value) {
            (Some(Value::Object(existing)), Value::Object(plain)) => deep_merge(existing, plain),
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    out
}

fn deep_merge(base: &mut Map<String, Value>, over: &Map<String, Value>) {
    for (key, value) in over {
        match (base.get_mut(key), value) {
            (Some(Value::Object(b)), Value::Object(o)) => deep_merge(b, o),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Errors in the base job template itself (not in the job variables).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// The template is not `{"job_configuration": {...}, "variables": {...}}`.
    #[error("the work pool's base job template has no `job_configuration` object")]
    MissingJobConfiguration,
}

/// A deployment's job variables: `job_variables` (Prefect 3), or `infra_overrides` where a
/// Prefect 2 server keeps them (it answers `job_variables: null`).
pub fn deployment_job_variables(deployment: &Value) -> Option<&Map<String, Value>> {
    deployment
        .get("job_variables")
        .and_then(Value::as_object)
        .or_else(|| deployment.get("infra_overrides").and_then(Value::as_object))
}

/// Renders `base_job_template` with `job_variables`, returning the job configuration object
/// (still untyped; validation happens in `config`).
///
/// # Errors
/// [`TemplateError`] when the template lacks a `job_configuration` object.
pub fn render_job_configuration(
    base_job_template: &Value,
    job_variables: &Map<String, Value>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Map<String, Value>, TemplateError> {
    let mut job_configuration = base_job_template
        .get("job_configuration")
        .and_then(Value::as_object)
        .cloned()
        .ok_or(TemplateError::MissingJobConfiguration)?;
    // 1. Defaults from the variables schema.
    let mut variables = schema_defaults(base_job_template);
    // 2. A non-empty default `env` is folded into (or replaces) the template's env.
    if let Some(Value::Object(default_env)) = variables.get("env")
        && !default_env.is_empty()
    {
        match job_configuration.get_mut("env") {
            Some(Value::Object(job_env)) => extend(job_env, default_env),
            _ => {
                job_configuration.insert("env".to_owned(), Value::Object(default_env.clone()));
            }
        }
    }
    // 3. Job variables (dotted keys expanded) override the defaults key by key.
    variables.extend(expand_dotted_keys(job_variables));
    // 4. A literal env object in the template takes the variables' env on top.
    if let (Some(Value::Object(job_env)), Some(Value::Object(var_env))) =
        (job_configuration.get_mut("env"), variables.get("env"))
    {
        extend(job_env, var_env);
    }
    // 5. Substitution.
    match apply_values(&Value::Object(job_configuration), &variables, env) {
        Some(Value::Object(rendered)) => Ok(rendered),
        _ => Ok(Map::new()),
    }
}

/// The variables schema's defaults by variable name (null defaults do not count).
fn schema_defaults(base_job_template: &Value) -> Map<String, Value> {
    let mut defaults = Map::new();
    if let Some(properties) = base_job_template
        .pointer("/variables/properties")
        .and_then(Value::as_object)
    {
        for (name, schema) in properties {
            if let Some(default) = schema.get("default").filter(|d| !d.is_null()) {
                defaults.insert(name.clone(), default.clone());
            }
        }
    }
    defaults
}

/// Sets every key of `over` in `base`, replacing what was there.
fn extend(base: &mut Map<String, Value>, over: &Map<String, Value>) {
    for (k, v) in over {
        base.insert(k.clone(), v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::default_base_job_template;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn flow_run_env_merges_other_keys_replace() {
        let dep =
            obj(json!({"env": {"A": "1", "B": "2"}, "container_create_kwargs": {"x": 1, "y": 2}}));
        let run = obj(json!({"env": {"B": "3"}, "container_create_kwargs": {"x": 9}}));
        let merged = merge_job_variables(Some(&dep), Some(&run));
        assert_eq!(
            Value::Object(merged),
            json!({"env": {"A": "1", "B": "3"}, "container_create_kwargs": {"x": 9}})
        );
    }

    #[test]
    fn dotted_keys_expand_and_plain_merges_over() {
        let v = obj(json!({"env.FOO": "x", "env": {"BAR": "y"}, "a.b.c": 1}));
        assert_eq!(
            Value::Object(expand_dotted_keys(&v)),
            json!({"env": {"FOO": "x", "BAR": "y"}, "a": {"b": {"c": 1}}})
        );
    }

    #[test]
    fn default_template_renders_defaults_and_drops_missing() {
        let rendered =
            render_job_configuration(&default_base_job_template(), &Map::new(), &|_| None).unwrap();
        // Only keys whose schema has a non-null default survive; `image`, `env`, … are dropped.
        assert_eq!(
            Value::Object(rendered),
            json!({"auto_remove": false, "stream_output": true, "privileged": false})
        );
    }

    #[test]
    fn job_variables_fill_the_template() {
        let vars = obj(
            json!({"image": "local/busybox:dw", "env.X": "1", "command": "echo hi", "mem_limit": "1g"}),
        );
        let rendered =
            render_job_configuration(&default_base_job_template(), &vars, &|_| None).unwrap();
        assert_eq!(rendered["image"], json!("local/busybox:dw"));
        assert_eq!(rendered["env"], json!({"X": "1"}));
        assert_eq!(rendered["command"], json!("echo hi"));
        assert_eq!(rendered["mem_limit"], json!("1g"));
    }

    #[test]
    fn literal_env_in_template_merges_defaults_and_variables() {
        let template = json!({
            "job_configuration": {"env": {"T": "t", "D": "template"}, "image": "{{ image }}"},
            "variables": {"properties": {"env": {"default": {"D": "default"}}, "image": {}}}
        });
        let vars = obj(json!({"env": {"V": "v"}}));
        let rendered = render_job_configuration(&template, &vars, &|_| None).unwrap();
        assert_eq!(rendered["env"], json!({"T": "t", "D": "default", "V": "v"}));
        assert!(!rendered.contains_key("image"));
    }

    #[test]
    fn template_without_job_configuration_is_an_error() {
        assert_eq!(
            render_job_configuration(&json!({}), &Map::new(), &|_| None),
            Err(TemplateError::MissingJobConfiguration)
        );
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::{expand_dotted_keys, merge_job_variables, render_job_configuration};
    use crate::job::strategies::{any_json, config, object_with};

    /// Job-variable names as users write them, dotted ones included.
    const KEYS: &[&str] = &[
        "env", "env.FOO", "image", "command", "a.b.c", "a", ".", "a.", ".a", "env..X", "",
    ];

    /// A base job template: sometimes without a `job_configuration` object, with schema
    /// defaults of any shape.
    fn template() -> BoxedStrategy<Value> {
        let job = prop_oneof![
            Just(
                json!({"env": {"T": "t"}, "image": "{{ image }}", "command": "{{ command }} {{ $HOME }}"})
            ),
            Just(json!({"env": "{{ env }}", "a": "{{ a.b.c }}"})),
            any_json(),
        ];
        let default = proptest::option::of(any_json())
            .prop_map(|d| d.map_or_else(|| json!({}), |d| json!({"default": d})));
        (
            proptest::option::of(job),
            object_with(KEYS.to_vec(), default.boxed(), 4),
        )
            .prop_map(|(job, properties)| {
                let mut t = Map::new();
                if let Some(job) = job {
                    t.insert("job_configuration".to_owned(), job);
                }
                t.insert("variables".to_owned(), json!({"properties": properties}));
                Value::Object(t)
            })
            .boxed()
    }

    proptest! {
        #![proptest_config(config(256))]

        /// Any template renders with any variables, or is refused when it has no job
        /// configuration object; never a panic.
        #[test]
        fn any_template_renders(
            template in template(),
            variables in object_with(KEYS.to_vec(), any_json(), 5),
        ) {
            let rendered = render_job_configuration(&template, &variables, &|_| None);
            prop_assert_eq!(rendered.is_ok(), template["job_configuration"].is_object());
        }

        /// Expanded variables have no dotted key at the top, and every plain key keeps a value.
        #[test]
        fn dotted_keys_expand(variables in object_with(KEYS.to_vec(), any_json(), 6)) {
            let expanded = expand_dotted_keys(&variables);
            prop_assert!(expanded.keys().all(|k| !k.contains('.')));
            for key in variables.keys().filter(|k| !k.contains('.')) {
                prop_assert!(expanded.contains_key(key));
            }
        }

        /// A flow run's variables override the deployment's, `env` objects merge key by key.
        #[test]
        fn flow_run_variables_win(
            deployment in object_with(KEYS.to_vec(), any_json(), 4),
            flow_run in object_with(KEYS.to_vec(), any_json(), 4),
        ) {
            let merged = merge_job_variables(Some(&deployment), Some(&flow_run));
            for (key, value) in &flow_run {
                match (key.as_str(), deployment.get(key), value) {
                    ("env", Some(Value::Object(_)), Value::Object(over)) => {
                        for (k, v) in over {
                            prop_assert_eq!(&merged["env"][k], v);
                        }
                    }
                    _ => prop_assert_eq!(&merged[key], value),
                }
            }
        }
    }
}
