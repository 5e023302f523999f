//! proptest strategies shared by the job modules' property tests: text and JSON as users and
//! the API can send them (unicode, huge numbers, empty and deeply nested values).
//!
//! Test-only. The property tests themselves live beside the code they check.

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Map, Value};

use super::DockerJobConfiguration;

/// A runner configuration with `cases` cases (`PROPTEST_CASES` overrides it, for a longer
/// hunt by hand) and no regression files: a found input becomes a plain unit test instead,
/// next to the code it broke.
pub fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Text with a bias towards the characters parsers split on, plus arbitrary unicode.
pub fn text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => any::<String>(),
        3 => "[ -~]{0,24}",
        2 => "[a-z0-9:/@._=,\\[\\] {}$-]{0,24}",
        1 => "\\PC{0,8}",
        1 => proptest::sample::select(TRICKY).prop_map(str::to_owned),
        1 => huge_number_text(),
    ]
    .boxed()
}

/// Text built from `pieces` (0 to `max` of them, joined by nothing): how structured inputs
/// (`count=2,device=0`, `8080:80/tcp`) get near the valid forms that random text rarely hits.
pub fn joined(pieces: &'static [&'static str], max: usize) -> BoxedStrategy<String> {
    proptest::collection::vec(proptest::sample::select(pieces), 0..=max)
        .prop_map(|parts| parts.concat())
        .boxed()
}

/// Inputs that have broken parsers elsewhere: empty, blank, separators alone, multi-byte
/// characters next to separators, control characters.
const TRICKY: &[&str] = &[
    "",
    " ",
    "\t\n",
    ":",
    "::",
    "/",
    "@",
    "=",
    ",",
    "-",
    "[",
    "]",
    "{{",
    "}}",
    "{{ }}",
    "{{}}",
    "é:",
    ":é",
    "ü/é",
    "日本語",
    "\u{0}",
    "\u{feff}",
    "١٢٣",
    "½",
    "NaN",
    "inf",
    "-inf",
    "1e308",
    "1e309",
    "-0",
    "0x10",
];

/// Numbers written as text at and past the edges of the integer types.
pub fn huge_number_text() -> BoxedStrategy<String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i128>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        "[0-9]{19,40}",
    ]
    .boxed()
}

/// A JSON number of any kind serde_json can hold: i64, u64 and finite f64.
pub fn json_number() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        proptest::sample::select(&[0.0, -0.0, 0.5, 1.0, 1e300, -1e300][..]).prop_map(Value::from),
        (-3i64..=3).prop_map(Value::from),
    ]
    .boxed()
}

/// A JSON scalar.
pub fn json_leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        json_number(),
        text().prop_map(Value::from),
    ]
    .boxed()
}

/// Any JSON value, nested a few levels, with object keys from [`text`].
pub fn json() -> BoxedStrategy<Value> {
    json_leaf()
        .prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::vec((text(), inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
        .boxed()
}

/// A value nested as deep as the API's JSON parser allows (serde_json stops at 128).
pub fn deep_json() -> BoxedStrategy<Value> {
    (json_leaf(), 1usize..=127, any::<bool>())
        .prop_map(|(leaf, depth, arrays)| {
            (0..depth).fold(leaf, |inner, _| {
                if arrays {
                    Value::Array(vec![inner])
                } else {
                    let mut map = Map::new();
                    map.insert("k".to_owned(), inner);
                    Value::Object(map)
                }
            })
        })
        .boxed()
}

/// Any JSON value, now and then a very deep one.
pub fn any_json() -> BoxedStrategy<Value> {
    prop_oneof![9 => json(), 1 => deep_json()].boxed()
}

/// An object whose keys come mostly from `keys` (the ones the code under test knows) and
/// whose values come from `values`.
pub fn object_with(
    keys: Vec<&'static str>,
    values: BoxedStrategy<Value>,
    max: usize,
) -> BoxedStrategy<Map<String, Value>> {
    let key = prop_oneof![
        4 => proptest::sample::select(keys).prop_map(str::to_owned),
        1 => text(),
    ];
    proptest::collection::vec((key, values), 0..=max)
        .prop_map(|kv| kv.into_iter().collect())
        .boxed()
}

/// The fields of a rendered Docker job configuration, typed options included.
const JOB_KEYS: &[&str] = &[
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
    "gpus",
    "shm_size",
    "ipc_mode",
    "cpus",
    "ports",
    "platform",
];

/// Values valid for some job field (so that whole configurations validate now and then),
/// and any JSON.
fn job_value() -> BoxedStrategy<Value> {
    use serde_json::json;
    let shaped = proptest::sample::select(vec![
        json!("echo hi"),
        json!("sh -c 'unbalanced"),
        json!({"A": "1", "B": null, "PREFECT_API_URL": "http://localhost:4200/api"}),
        json!({"prefect.io/flow-run-id": "mine", "a": "b"}),
        json!("{{ ctx.flow.name }}-{{ ctx.flow_run.id }}"),
        json!("busybox:1.36"),
        json!("a:b:c"),
        json!({"username": "u", "password": "p", "registry_url": "r:5000"}),
        json!("Always"),
        json!(["n1", "n2"]),
        json!("host"),
        json!(true),
        json!("yes"),
        json!(["/a:/b", "./x:/y:ro", "vol:/d"]),
        json!("1g"),
        json!("-1"),
        json!({"user": "1000", "extra_hosts": {"h": "1.2.3.4"}, "networking_config": {"n1": {}}}),
        json!({"extra_hosts": ["h:1.2.3.4", "bad"], "platform": "linux/arm64"}),
        json!("all"),
        json!("count=2,capabilities=compute,utility"),
        json!("512m"),
        json!(1.5),
        json!(["8080:80/tcp", "[::1]::81"]),
        json!("linux/amd64"),
    ]);
    prop_oneof![2 => shaped, 1 => any_json()].boxed()
}

/// A rendered job configuration: job fields with valid or arbitrary values, and now and
/// then an unknown key.
pub fn rendered_job() -> BoxedStrategy<Map<String, Value>> {
    object_with(JOB_KEYS.to_vec(), job_value(), 10)
}

/// Removes what `field` (a validation error's dotted path) points into: the keyword of
/// `container_create_kwargs`, else the whole top-level field.
pub fn remove_field(source: &mut Map<String, Value>, field: &str) {
    if let Some(key) = field.strip_prefix("container_create_kwargs.")
        && let Some(Value::Object(kwargs)) = source.get_mut("container_create_kwargs")
    {
        kwargs.remove(key);
        return;
    }
    let top = field.split('.').next().unwrap_or_default();
    source.remove(top);
}

/// A rendered job configuration that validates: [`rendered_job`] without the fields that
/// do not.
pub fn valid_job() -> BoxedStrategy<DockerJobConfiguration> {
    rendered_job()
        .prop_filter_map("fields are validated independently", |mut source| {
            let cwd = Path::new("/w");
            if let Err(e) = DockerJobConfiguration::from_rendered(&source, cwd) {
                for error in &e.errors {
                    remove_field(&mut source, &error.field);
                }
            }
            DockerJobConfiguration::from_rendered(&source, cwd).ok()
        })
        .boxed()
}
