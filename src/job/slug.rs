//! Container names from free text, as python-slugify (legacy algorithm) makes them,
//! so a run keeps the container name users see with the Python worker.
//!
//! Pure. Transliteration uses `deunicode` (Unidecode's tables), entities `html-escape`.

/// Slugifies `text` keeping case, allowing `[a-zA-Z0-9_.-]`, at most 250 characters.
pub fn slugify_container_name(text: &str) -> String {
    slugify(
        text,
        false,
        |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'),
        250,
    )
}

/// Lower-case slug with `[-a-z0-9]` only (the form Prefect uses in resource ids).
pub fn slugify_lower(text: &str) -> String {
    slugify(
        text,
        true,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-',
        0,
    )
}

fn slugify(
    text: &str,
    lowercase: bool,
    allowed: impl Fn(char) -> bool,
    max_length: usize,
) -> String {
    // Quotes become dashes before transliteration.
    let text = collapse_runs(text, |c| c == '\'', "-");
    let text = deunicode::deunicode(&text);
    let text = html_escape::decode_html_entities(&text).into_owned();
    let text = deunicode::deunicode(&text);
    let text = if lowercase { text.to_lowercase() } else { text };
    let text: String = text.chars().filter(|c| *c != '\'').collect();
    let text = remove_commas_between_digits(&text);
    let text = collapse_runs(&text, |c| !allowed(c), "-");
    let text = collapse_runs(&text, |c| c == '-', "-");
    let mut text = text.trim_matches('-').to_owned();
    if max_length > 0 && text.chars().count() > max_length {
        text = text
            .chars()
            .take(max_length)
            .collect::<String>()
            .trim_matches('-')
            .to_owned();
    }
    text
}

fn collapse_runs(text: &str, matches: impl Fn(char) -> bool, with: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_run = false;
    for c in text.chars() {
        if matches(c) {
            if !in_run {
                out.push_str(with);
            }
            in_run = true;
        } else {
            out.push(c);
            in_run = false;
        }
    }
    out
}

fn remove_commas_between_digits(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, c) in chars.iter().enumerate() {
        let between_digits = *c == ','
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if !between_digits {
            out.push(*c);
        }
    }
    out
}

/// The Docker container name for a configured name: the slug with leading `_-.` removed;
/// `None` (let Docker pick) when nothing is left.
pub fn container_name(text: &str) -> Option<String> {
    let slug = slugify_container_name(text);
    let trimmed = slug.trim_start_matches(['_', '-', '.']);
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_examples() {
        assert_eq!(container_name("my run/1 ü").as_deref(), Some("my-run-1-u"));
        assert_eq!(
            container_name("Hello World!!").as_deref(),
            Some("Hello-World")
        );
        assert_eq!(container_name("straße").as_deref(), Some("strasse"));
        assert_eq!(container_name("日本語").as_deref(), Some("Ri-Ben-Yu"));
        assert_eq!(container_name("a &amp; b").as_deref(), Some("a-b"));
        assert_eq!(container_name("it's 1,000").as_deref(), Some("it-s-1000"));
        assert_eq!(
            container_name(".hidden_name").as_deref(),
            Some("hidden_name")
        );
        assert_eq!(container_name("!!!"), None);
        assert_eq!(container_name(&"x".repeat(300)).map(|s| s.len()), Some(250));
    }

    #[test]
    fn lower_slug_for_resource_ids() {
        assert_eq!(
            slugify_lower("DockerWorker 0b5d-11"),
            "dockerworker-0b5d-11"
        );
        assert_eq!(slugify_lower("w_1.x"), "w-1-x");
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::{container_name, slugify_lower};
    use crate::job::strategies::{config, text};

    proptest! {
        #![proptest_config(config(256))]

        /// A container name has only Docker's characters, is at most 250 long, does not
        /// start with `_`, `-` or `.`, and is its own slug (a name the worker made, read back
        /// as a configured name, is kept).
        #[test]
        fn container_names_are_valid_and_stable(s in text()) {
            if let Some(name) = container_name(&s) {
                prop_assert!(!name.is_empty());
                prop_assert!(name.chars().count() <= 250);
                prop_assert!(
                    name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')),
                    "{:?}", name
                );
                prop_assert!(!name.starts_with(['_', '-', '.']));
                prop_assert_eq!(container_name(&name), Some(name.clone()));
            }
        }

        /// A lower slug has only `[-a-z0-9]`, no leading, trailing or doubled dash, and is
        /// its own slug.
        #[test]
        fn lower_slugs_are_valid_and_stable(s in text()) {
            let slug = slugify_lower(&s);
            prop_assert!(
                slug.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{:?}", slug
            );
            prop_assert!(!slug.starts_with('-') && !slug.ends_with('-') && !slug.contains("--"));
            prop_assert_eq!(slugify_lower(&slug), slug.clone());
        }
    }
}
