//! Block and variable references in a rendered job configuration, resolved the way Prefect
//! resolves them after `apply_values`: `{"$ref": {"block_document_id": …}}` objects and
//! `{{ prefect.blocks.<type>.<name>[.path] }}` strings become block data (so
//! `registry_credentials` can come from a docker-registry-credentials block), and
//! `{{ prefect.variables.<name> }}` becomes the variable's value.
//!
//! Pure: [`References::collect`] says what to fetch, the caller fetches it from the API, and
//! [`resolve`] substitutes.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::template::{PlaceholderKind, find_placeholders, python_str};

/// What a configuration refers to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct References {
    /// Block documents by id (`$ref` objects).
    pub block_ids: BTreeSet<String>,
    /// Block documents by (type slug, document name).
    pub block_names: BTreeSet<(String, String)>,
    /// Variables by name.
    pub variables: BTreeSet<String>,
}

impl References {
    /// Everything `tree` refers to.
    pub fn collect(tree: &Value) -> Self {
        let mut refs = Self::default();
        refs.walk(tree);
        refs
    }

    /// Nothing to fetch.
    pub fn is_empty(&self) -> bool {
        self.block_ids.is_empty() && self.block_names.is_empty() && self.variables.is_empty()
    }

    fn walk(&mut self, value: &Value) {
        match value {
            Value::Object(map) => match block_ref_id(map) {
                Some(id) => {
                    self.block_ids.insert(id.to_owned());
                }
                None => map.values().for_each(|v| self.walk(v)),
            },
            Value::Array(items) => items.iter().for_each(|v| self.walk(v)),
            Value::String(text) => {
                for p in find_placeholders(text) {
                    match p.kind {
                        PlaceholderKind::Block => {
                            if let Some((slug, name, _)) = block_parts(p.name) {
                                self.block_names.insert((slug.to_owned(), name.to_owned()));
                            }
                        }
                        PlaceholderKind::Variable => {
                            self.variables
                                .insert(p.name.trim_start_matches("prefect.variables.").to_owned());
                        }
                        PlaceholderKind::Standard | PlaceholderKind::EnvVar => {}
                    }
                }
            }
            _ => {}
        }
    }
}

/// What the API said for each reference.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    /// Block document data by id.
    pub blocks_by_id: BTreeMap<String, Value>,
    /// Block document data by (type slug, name).
    pub blocks_by_name: BTreeMap<(String, String), Value>,
    /// Variable values by name; `None` = no such variable (it renders as an empty string).
    pub variables: BTreeMap<String, Option<Value>>,
}

/// A reference that cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    /// A block placeholder inside other text resolved to a dict or list.
    #[error(
        "Invalid template: {template:?}. The block placeholder resolved to a {kind}, which cannot be used for inline string substitution."
    )]
    NotInline {
        /// The string.
        template: String,
        /// `dict` or `list`.
        kind: &'static str,
    },
    /// `prefect.blocks.<type>.<name>` is missing its type or name.
    #[error(
        "Invalid template: {template:?}. A block placeholder needs a block type and a name: {{{{ prefect.blocks.<type>.<name> }}}}"
    )]
    BadBlockPlaceholder {
        /// The string.
        template: String,
    },
    /// The key path into the block's data does not exist.
    #[error(
        "Invalid template: {template:?}. Could not resolve the keypath in the block document data."
    )]
    BadKeyPath {
        /// The string.
        template: String,
    },
    /// The job configuration as a whole resolved to something that is not an object.
    #[error("the job configuration must be an object, but its references resolved to {0}")]
    NotAnObject(String),
    /// A `$ref` names a block document that does not exist.
    #[error("Block document {0} not found")]
    MissingBlock(String),
    /// A `prefect.blocks` placeholder names a block document that does not exist.
    #[error("Block not found: '{name}' of type '{block_type}'")]
    BlockNotFound {
        /// Document name.
        name: String,
        /// Block type slug.
        block_type: String,
    },
}

/// Replaces every reference in `tree` with what was fetched.
///
/// # Errors
/// [`RefError`] for a malformed placeholder or a block that was not found.
pub fn resolve(tree: &Value, fetched: &Fetched) -> Result<Value, RefError> {
    let blocks = resolve_blocks(tree, fetched)?;
    Ok(resolve_variables(&blocks, fetched))
}

fn resolve_blocks(value: &Value, fetched: &Fetched) -> Result<Value, RefError> {
    match value {
        Value::Object(map) => {
            if let Some(id) = block_ref_id(map) {
                return fetched
                    .blocks_by_id
                    .get(id)
                    .cloned()
                    .ok_or_else(|| RefError::MissingBlock(id.to_owned()));
            }
            let mut out = Map::new();
            for (k, v) in map {
                out.insert(k.clone(), resolve_blocks(v, fetched)?);
            }
            Ok(Value::Object(out))
        }
        Value::Array(items) => items
            .iter()
            .map(|v| resolve_blocks(v, fetched))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::String(text) => {
            let placeholders = find_placeholders(text);
            if !placeholders
                .iter()
                .any(|p| p.kind == PlaceholderKind::Block)
            {
                return Ok(value.clone());
            }
            if let [only] = placeholders.as_slice()
                && only.full_match == text
            {
                // The whole string: the block's value with its JSON type.
                return block_value(only.name, text, fetched);
            }
            // Embedded in text: each block placeholder becomes its value printed as Python
            // would; a dict or list cannot be printed into a string.
            let mut out = text.clone();
            for p in placeholders
                .iter()
                .filter(|p| p.kind == PlaceholderKind::Block)
            {
                let v = block_value(p.name, text, fetched)?;
                if v.is_object() || v.is_array() {
                    return Err(RefError::NotInline {
                        template: text.clone(),
                        kind: if v.is_object() { "dict" } else { "list" },
                    });
                }
                out = out.replace(p.full_match, &python_str(&v));
            }
            Ok(Value::String(out))
        }
        other => Ok(other.clone()),
    }
}

/// The value a `prefect.blocks.<type>.<name>[.path]` placeholder stands for.
fn block_value(name: &str, template: &str, fetched: &Fetched) -> Result<Value, RefError> {
    let (slug, doc, path) = block_parts(name).ok_or_else(|| RefError::BadBlockPlaceholder {
        template: template.to_owned(),
    })?;
    let mut data = fetched
        .blocks_by_name
        .get(&(slug.to_owned(), doc.to_owned()))
        .cloned()
        .ok_or_else(|| RefError::BlockNotFound {
            name: doc.to_owned(),
            block_type: slug.to_owned(),
        })?;
    // Single-value system blocks (String, JSON, Secret…) stand for their value.
    if let Value::Object(map) = &data
        && map.len() == 1
        && map.contains_key("value")
        && !path.is_some_and(|p| p == "value" || p.starts_with("value.") || p.starts_with("value["))
    {
        data = map["value"].clone();
    }
    match path {
        None => Ok(data),
        Some(path) => key_path(&data, path)
            .cloned()
            .ok_or_else(|| RefError::BadKeyPath {
                template: template.to_owned(),
            }),
    }
}

fn resolve_variables(value: &Value, fetched: &Fetched) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), resolve_variables(v, fetched)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| resolve_variables(v, fetched))
                .collect(),
        ),
        Value::String(text) => {
            let placeholders = find_placeholders(text);
            if !placeholders
                .iter()
                .any(|p| p.kind == PlaceholderKind::Variable)
            {
                return value.clone();
            }
            let lookup = |name: &str| {
                fetched
                    .variables
                    .get(name.trim_start_matches("prefect.variables."))
                    .cloned()
                    .flatten()
            };
            if let [only] = placeholders.as_slice()
                && only.full_match == text
            {
                // The whole string: the variable's value with its JSON type.
                return lookup(only.name).unwrap_or_else(|| Value::String(String::new()));
            }
            let mut out = text.clone();
            for p in placeholders
                .iter()
                .filter(|p| p.kind == PlaceholderKind::Variable)
            {
                let replacement = lookup(p.name).map(|v| python_str(&v)).unwrap_or_default();
                out = out.replace(p.full_match, &replacement);
            }
            Value::String(out)
        }
        other => other.clone(),
    }
}

/// The id of a `{"$ref": {"block_document_id": "…"}}` object (the only key), if it is one.
fn block_ref_id(map: &Map<String, Value>) -> Option<&str> {
    map.get("$ref")?
        .get("block_document_id")?
        .as_str()
        .filter(|id| !id.is_empty())
}

/// `prefect.blocks.<type>.<name>[.<path>]` → (type, name, path).
fn block_parts(name: &str) -> Option<(&str, &str, Option<&str>)> {
    let rest = name.strip_prefix("prefect.blocks.")?;
    let mut parts = rest.splitn(3, '.');
    let slug = parts.next().filter(|s| !s.is_empty())?;
    let doc = parts.next().filter(|s| !s.is_empty())?;
    Some((slug, doc, parts.next().filter(|s| !s.is_empty())))
}

/// `a.b[0].c` into a JSON value.
fn key_path<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    let mut current = value;
    for segment in path.split('.') {
        let (key, indexes) = match segment.find('[') {
            Some(i) => (&segment[..i], &segment[i..]),
            None => (segment, ""),
        };
        if !key.is_empty() {
            current = current.get(key)?;
        }
        for index in indexes.split(['[', ']']).filter(|s| !s.is_empty()) {
            current = current.get(index.parse::<usize>().ok()?)?;
        }
    }
    Some(current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fetched() -> Fetched {
        let mut f = Fetched::default();
        f.blocks_by_id.insert(
            "b1".into(),
            json!({"username": "u", "password": "p", "registry_url": "r:5000", "reauth": true}),
        );
        f.blocks_by_name.insert(
            ("docker-registry-credentials".into(), "prod".into()),
            json!({"username": "u2", "password": "p2", "registry_url": "r2", "nested": {"list": [1, {"x": "deep"}]}}),
        );
        f.blocks_by_name
            .insert(("string".into(), "greeting".into()), json!({"value": "hi"}));
        f.variables.insert("tag".into(), Some(json!("v1")));
        f.variables.insert("replicas".into(), Some(json!(3)));
        f.variables.insert("missing".into(), None);
        f
    }

    #[test]
    fn collects_every_reference_once() {
        let tree = json!({
            "registry_credentials": {"$ref": {"block_document_id": "b1"}},
            "a": "{{ prefect.blocks.string.greeting }}",
            "b": ["{{ prefect.variables.tag }}", "x {{ prefect.variables.tag }} {{ prefect.variables.replicas }}"],
            "c": "{{ plain }}",
        });
        let refs = References::collect(&tree);
        assert_eq!(refs.block_ids, BTreeSet::from(["b1".to_owned()]));
        assert_eq!(
            refs.block_names,
            BTreeSet::from([("string".to_owned(), "greeting".to_owned())])
        );
        assert_eq!(
            refs.variables,
            BTreeSet::from(["replicas".to_owned(), "tag".to_owned()])
        );
        assert!(References::collect(&json!({"x": 1})).is_empty());
    }

    #[test]
    fn blocks_and_variables_are_substituted_like_prefect() {
        let tree = json!({
            "registry_credentials": {"$ref": {"block_document_id": "b1"}},
            "by_name": "{{ prefect.blocks.docker-registry-credentials.prod }}",
            "path": "{{ prefect.blocks.docker-registry-credentials.prod.nested.list[1].x }}",
            "system": "{{ prefect.blocks.string.greeting }}",
            "whole": "{{ prefect.variables.replicas }}",
            "embedded": "img:{{ prefect.variables.tag }}-{{ prefect.variables.replicas }}{{ prefect.variables.missing }}",
            "gone": "{{ prefect.variables.missing }}",
        });
        let out = resolve(&tree, &fetched()).unwrap();
        assert_eq!(out["registry_credentials"]["registry_url"], "r:5000");
        assert_eq!(out["by_name"]["username"], "u2");
        assert_eq!(out["path"], "deep");
        assert_eq!(out["system"], "hi");
        assert_eq!(out["whole"], 3);
        assert_eq!(out["embedded"], "img:v1-3");
        assert_eq!(out["gone"], "");
    }

    #[test]
    fn bad_block_placeholders_are_named() {
        let f = fetched();
        let ok = resolve(
            &json!({"x": "a {{ prefect.blocks.string.greeting }} b"}),
            &f,
        )
        .unwrap();
        assert_eq!(ok["x"], "a hi b");
        let err = resolve(
            &json!({"x": "a {{ prefect.blocks.docker-registry-credentials.prod }}"}),
            &f,
        )
        .unwrap_err();
        assert!(
            matches!(err, RefError::NotInline { kind: "dict", .. }),
            "{err}"
        );
        let err = resolve(&json!({"x": "{{ prefect.blocks.string }}"}), &f).unwrap_err();
        assert!(matches!(err, RefError::BadBlockPlaceholder { .. }), "{err}");
        let err = resolve(&json!({"x": "{{ prefect.blocks.string.nope }}"}), &f).unwrap_err();
        assert_eq!(err.to_string(), "Block not found: 'nope' of type 'string'");
        let err = resolve(
            &json!({"x": "{{ prefect.blocks.docker-registry-credentials.prod.nope }}"}),
            &f,
        )
        .unwrap_err();
        assert!(matches!(err, RefError::BadKeyPath { .. }), "{err}");
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::{Fetched, References, resolve};
    use crate::job::strategies::{any_json, config, joined};

    /// Pieces of reference strings and `$ref` objects.
    const PIECES: &[&str] = &[
        "{{ ",
        " }}",
        "prefect.blocks.",
        "prefect.variables.",
        "string",
        "s",
        ".",
        "greeting",
        "value",
        "[0]",
        "x",
        " ",
    ];

    fn tree() -> BoxedStrategy<Value> {
        let leaf = prop_oneof![
            3 => joined(PIECES, 8).prop_map(Value::from),
            1 => Just(json!({"$ref": {"block_document_id": "b1"}})),
            1 => Just(json!({"$ref": {"block_document_id": "gone"}})),
            1 => any_json(),
        ];
        leaf.prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
                proptest::collection::btree_map("[a-z$]{0,4}", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
        .boxed()
    }

    proptest! {
        #![proptest_config(config(256))]

        /// Collecting and resolving any tree against any fetched data never panics; a
        /// reference that was not fetched is an error or renders empty, never a crash.
        #[test]
        fn any_tree_resolves(
            tree in tree(),
            block in any_json(),
            variable in proptest::option::of(any_json()),
        ) {
            let refs = References::collect(&tree);
            let mut fetched = Fetched::default();
            fetched.blocks_by_id.insert("b1".to_owned(), block.clone());
            for name in refs.block_names {
                fetched.blocks_by_name.insert(name, block.clone());
            }
            for name in refs.variables {
                fetched.variables.insert(name, variable.clone());
            }
            let _ = resolve(&tree, &fetched);
        }
    }
}
