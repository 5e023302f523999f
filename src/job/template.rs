//! Prefect's job-template language: `{{ name }}` placeholders over a JSON tree.
//!
//! Pure (std + serde_json). Mirrors the semantics Prefect users rely on:
//! a string that is exactly one placeholder is replaced by the value itself with
//! its JSON type kept, and a missing value removes the key (so the typed model's
//! default applies); placeholders embedded in text are formatted the way Python's
//! `str()` would print the value. `{{ $NAME }}` reads the worker's environment.
//! `prefect.blocks.*` and `prefect.variables.*` placeholders are left untouched
//! here: they need the API and are resolved by the caller.

use serde_json::{Map, Value};

/// What kind of placeholder a `{{ … }}` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaceholderKind {
    /// A job variable, looked up as a dotted path.
    Standard,
    /// `{{ $NAME }}`: the worker's environment variable `NAME`.
    EnvVar,
    /// `{{ prefect.blocks.<type>.<name>… }}`.
    Block,
    /// `{{ prefect.variables.<name> }}`.
    Variable,
}

/// One placeholder found in a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder<'a> {
    /// The whole `{{ … }}` text as written.
    pub full_match: &'a str,
    /// The name between the braces, trimmed.
    pub name: &'a str,
    /// Its kind, from the name's prefix.
    pub kind: PlaceholderKind,
}

fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '.' | '-' | '[' | ']' | '$')
}

/// Finds every `{{ name }}` in `text`, in order of appearance (duplicates kept).
pub fn find_placeholders(text: &str) -> Vec<Placeholder<'_>> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(rel) = text[from..].find("{{") {
        let start = from + rel;
        let rest = &text[start + 2..];
        let after_ws = rest.trim_start_matches(' ');
        let name_len: usize = after_ws
            .chars()
            .take_while(|c| is_name_char(*c))
            .map(char::len_utf8)
            .sum();
        if name_len > 0 {
            let name = &after_ws[..name_len];
            let tail = after_ws[name_len..].trim_start_matches(' ');
            if tail.starts_with("}}") {
                let end = text.len() - tail.len() + 2;
                let kind = if name.starts_with('$') {
                    PlaceholderKind::EnvVar
                } else if name.starts_with("prefect.blocks.") {
                    PlaceholderKind::Block
                } else if name.starts_with("prefect.variables.") {
                    PlaceholderKind::Variable
                } else {
                    PlaceholderKind::Standard
                };
                found.push(Placeholder {
                    full_match: &text[start..end],
                    name,
                    kind,
                });
                from = end;
                continue;
            }
        }
        from = start + 2;
    }
    found
}

/// Looks up `a.b[0].c` in `values`. `None` means "not set" (distinct from JSON null).
pub fn lookup<'v>(values: &'v Map<String, Value>, path: &str) -> Option<&'v Value> {
    let mut current: Option<&Value> = None;
    for (i, segment) in path.split('.').enumerate() {
        let (key, indexes) = match segment.find('[') {
            Some(pos) => (&segment[..pos], &segment[pos..]),
            None => (segment, ""),
        };
        let mut value = if i == 0 {
            values.get(key)?
        } else if key.is_empty() {
            current?
        } else {
            current?.as_object()?.get(key)?
        };
        let mut rest = indexes;
        while let Some(stripped) = rest.strip_prefix('[') {
            let close = stripped.find(']')?;
            let index: usize = stripped[..close].trim().parse().ok()?;
            value = value.as_array()?.get(index)?;
            rest = &stripped[close + 1..];
        }
        if !rest.is_empty() {
            return None;
        }
        current = Some(value);
    }
    current
}

/// Formats a JSON value the way Python's `str()` prints the equivalent object,
/// because that is what users see when a placeholder sits inside other text.
pub fn python_str(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => python_repr(other),
    }
}

fn python_repr(value: &Value) -> String {
    match value {
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
                    format!("{f:.1}")
                } else {
                    f.to_string()
                }
            } else {
                n.to_string()
            }
        }
        Value::String(s) => python_string_repr(s),
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(python_repr).collect();
            format!("[{}]", inner.join(", "))
        }
        Value::Object(map) => {
            let inner: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", python_string_repr(k), python_repr(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
    }
}

/// Python's `repr()` of a string (`'a'`, `"it's"`), as messages quoting user input show it.
pub(crate) fn python_string_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Substitutes placeholders through a JSON tree (Prefect's `apply_values`).
///
/// Returns `None` when `template` itself is a lone placeholder whose value is not
/// set: the caller drops that key or list item.
pub fn apply_values(
    template: &Value,
    values: &Map<String, Value>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Value> {
    match template {
        Value::String(text) => apply_to_string(text, values, env),
        Value::Object(map) => {
            let mut out = Map::with_capacity(map.len());
            for (key, value) in map {
                if let Some(rendered) = apply_values(value, values, env) {
                    out.insert(key.clone(), rendered);
                }
            }
            Some(Value::Object(out))
        }
        Value::Array(items) => Some(Value::Array(
            items
                .iter()
                .filter_map(|item| apply_values(item, values, env))
                .collect(),
        )),
        other => Some(other.clone()),
    }
}

fn apply_to_string(
    text: &str,
    values: &Map<String, Value>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Value> {
    let placeholders = find_placeholders(text);
    if placeholders.is_empty() {
        return Some(Value::String(text.to_owned()));
    }
    if let [only] = placeholders.as_slice()
        && only.full_match == text
        && only.kind == PlaceholderKind::Standard
    {
        return lookup(values, only.name).cloned();
    }
    let mut out = text.to_owned();
    let mut done: Vec<&str> = Vec::new();
    for placeholder in &placeholders {
        if done.contains(&placeholder.full_match) {
            continue;
        }
        done.push(placeholder.full_match);
        let replacement = match placeholder.kind {
            PlaceholderKind::Standard => lookup(values, placeholder.name)
                .map(python_str)
                .unwrap_or_default(),
            PlaceholderKind::EnvVar => {
                env(placeholder.name.trim_start_matches('$')).unwrap_or_default()
            }
            PlaceholderKind::Block | PlaceholderKind::Variable => continue,
        };
        out = out.replace(placeholder.full_match, &replacement);
    }
    Some(Value::String(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn finds_placeholders_with_and_without_spaces() {
        let found = find_placeholders("a{{x}}b{{  y.z[0]  }}c{{ $HOME }}{{ nope ");
        let names: Vec<_> = found.iter().map(|p| (p.name, p.kind)).collect();
        assert_eq!(
            names,
            vec![
                ("x", PlaceholderKind::Standard),
                ("y.z[0]", PlaceholderKind::Standard),
                ("$HOME", PlaceholderKind::EnvVar)
            ]
        );
        assert_eq!(found[1].full_match, "{{  y.z[0]  }}");
    }

    #[test]
    fn classifies_prefect_placeholders() {
        let found = find_placeholders(
            "{{ prefect.blocks.docker-registry-credentials.x }} {{ prefect.variables.v }}",
        );
        assert_eq!(found[0].kind, PlaceholderKind::Block);
        assert_eq!(found[1].kind, PlaceholderKind::Variable);
    }

    #[test]
    fn lone_placeholder_keeps_type() {
        let values = vars(json!({"b": true, "n": 5, "l": [1, "a"], "d": {"k": null}, "z": null}));
        for (name, expected) in [
            ("b", json!(true)),
            ("n", json!(5)),
            ("l", json!([1, "a"])),
            ("d", json!({"k": null})),
            ("z", Value::Null),
        ] {
            let t = json!(format!("{{{{ {name} }}}}"));
            assert_eq!(apply_values(&t, &values, &no_env), Some(expected), "{name}");
        }
    }

    #[test]
    fn missing_lone_placeholder_removes_key_and_item() {
        let t = json!({"a": "{{ missing }}", "b": "{{ x }}", "l": ["{{ missing }}", "{{ x }}"]});
        let out = apply_values(&t, &vars(json!({"x": 1})), &no_env);
        assert_eq!(out, Some(json!({"b": 1, "l": [1]})));
    }

    #[test]
    fn embedded_placeholders_use_python_str() {
        let values =
            vars(json!({"myvar": 7, "t": true, "n": null, "d": {"a": 1, "b": "it's"}, "f": 1.0}));
        let t = json!("x{{ myvar }}y {{t}} {{n}} {{d}} {{f}}");
        assert_eq!(
            apply_values(&t, &values, &no_env),
            Some(json!("x7y True None {'a': 1, 'b': \"it's\"} 1.0"))
        );
    }

    #[test]
    fn env_and_missing_in_text() {
        let env = |name: &str| (name == "HOME_TEST").then(|| "/home/x".to_owned());
        let t = json!("prefix-{{ name }}-{{ missing }}-{{ $HOME_TEST }}");
        assert_eq!(
            apply_values(&t, &vars(json!({})), &env),
            Some(json!("prefix---/home/x"))
        );
        // A lone env placeholder is always a string.
        assert_eq!(
            apply_values(&json!("{{ $NOPE }}"), &vars(json!({})), &env),
            Some(json!(""))
        );
    }

    #[test]
    fn dotted_and_indexed_lookup() {
        let values = vars(json!({"a": {"b": [{"c": "deep"}]}}));
        assert_eq!(lookup(&values, "a.b[0].c"), Some(&json!("deep")));
        assert_eq!(lookup(&values, "a.b[1].c"), None);
        assert_eq!(lookup(&values, "a.x"), None);
    }

    #[test]
    fn prefect_placeholders_left_for_the_caller() {
        let t = json!("{{ prefect.variables.v }}");
        assert_eq!(apply_values(&t, &vars(json!({})), &no_env), Some(t.clone()));
    }

    #[test]
    fn numbers_bools_null_untouched() {
        let t = json!({"a": 1, "b": false, "c": null});
        assert_eq!(apply_values(&t, &vars(json!({})), &no_env), Some(t.clone()));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::{apply_values, find_placeholders, lookup, python_str, python_string_repr};
    use crate::job::strategies::{any_json, config, joined, text};

    /// Pieces of template strings: braces, names, paths, indexes, env and Prefect prefixes.
    const PIECES: &[&str] = &[
        "{{",
        "}}",
        "{",
        "}",
        " ",
        "a",
        "b",
        "a.b",
        "[0]",
        "[",
        "]",
        "$HOME",
        "$",
        "prefect.blocks.",
        "prefect.variables.",
        "x",
        ".",
        "é",
        "日",
    ];

    fn template_text() -> BoxedStrategy<String> {
        prop_oneof![text(), joined(PIECES, 10)].boxed()
    }

    /// Variables with the names the template pieces use.
    fn variables() -> BoxedStrategy<Map<String, Value>> {
        proptest::collection::vec(
            (
                proptest::sample::select(&["a", "b", "x", "HOME"][..]),
                any_json(),
            ),
            0..4,
        )
        .prop_map(|kv| kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        .boxed()
    }

    /// A JSON tree whose strings are template text.
    fn template_tree() -> BoxedStrategy<Value> {
        let leaf = prop_oneof![3 => template_text().prop_map(Value::from), 1 => any_json()];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::vec((template_text(), inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
        .boxed()
    }

    fn env(name: &str) -> Option<String> {
        (name == "HOME").then(|| "/home/x".to_owned())
    }

    proptest! {
        #![proptest_config(config(256))]

        /// Every placeholder found is a `{{ … }}` slice of the text with a non-empty name.
        #[test]
        fn placeholders_are_slices_of_the_text(s in template_text()) {
            for p in find_placeholders(&s) {
                prop_assert!(s.contains(p.full_match));
                prop_assert!(p.full_match.starts_with("{{") && p.full_match.ends_with("}}"));
                prop_assert!(!p.name.is_empty() && p.full_match.contains(p.name));
            }
        }

        /// Rendering any tree with any variables never panics; a tree without `{{` renders
        /// to itself.
        #[test]
        fn any_tree_renders(tree in template_tree(), values in variables()) {
            let rendered = apply_values(&tree, &values, &env);
            if !tree.to_string().contains("{{") {
                prop_assert_eq!(rendered, Some(tree));
            }
        }

        /// A lone placeholder is the value with its type; inside text it is the value as
        /// Python prints it; unset, it drops the key or prints nothing.
        #[test]
        fn placeholders_take_the_value(
            value in any_json(),
            set: bool,
            before in "[a-z ]{1,4}",
            after in "[a-z ]{0,4}",
        ) {
            let mut values = Map::new();
            if set {
                values.insert("v".to_owned(), value.clone());
            }
            let lone = apply_values(&json!("{{ v }}"), &values, &env);
            prop_assert_eq!(lone, set.then(|| value.clone()));
            let embedded = apply_values(&json!(format!("{before}{{{{v}}}}{after}")), &values, &env);
            let printed = if set { python_str(&value) } else { String::new() };
            prop_assert_eq!(embedded, Some(json!(format!("{before}{printed}{after}"))));
        }

        /// Looking up any path in any values never panics.
        #[test]
        fn any_path_looks_up(values in variables(), path in template_text()) {
            let _ = lookup(&values, &path);
        }

        /// Python's `str()` of any value never panics, and `repr()` of a string is quoted.
        #[test]
        fn python_printing(value in any_json(), s in text()) {
            let _ = python_str(&value);
            let repr = python_string_repr(&s);
            let quote = repr.chars().next();
            prop_assert!(matches!(quote, Some('\'' | '"')));
            prop_assert!(repr.len() >= 2 && repr.chars().last() == quote);
        }
    }
}
