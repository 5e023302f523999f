//! Keeping secrets out of what the worker prints: credentials in URLs, and values of fields
//! that may hold secrets. Pure.

use std::borrow::Cow;

/// `text` with the credentials of a URL in it (`scheme://user:pass@host…`) replaced by `***`,
/// so a URL can be logged or put in a message. Text without credentials comes back as is.
pub fn url(text: &str) -> Cow<'_, str> {
    let Some(scheme_end) = text.find("://") else {
        return Cow::Borrowed(text);
    };
    let rest_start = scheme_end + 3;
    let rest = &text[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => Cow::Owned(format!("{}***{}", &text[..rest_start], &rest[at..])),
        None => Cow::Borrowed(text),
    }
}

/// Whether a field name says its value is a secret (`token`, `secret`, `password`, `key`,
/// in any case, anywhere in the name: `splunk-token`, `PREFECT_API_KEY`).
pub fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    ["token", "secret", "password", "key"]
        .iter()
        .any(|word| lower.contains(word))
}

/// Whether a JSON value holds, at any depth, an object key that names a secret.
pub fn holds_secret_key(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Object(map) => map
            .iter()
            .any(|(k, v)| is_secret_name(k) || holds_secret_key(v)),
        serde_json::Value::Array(items) => items.iter().any(holds_secret_key),
        _ => false,
    }
}

/// Percent-decodes URL userinfo (`p%40ss` → `p@ss`); malformed escapes are kept as written.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            url("http://user:pa@ss@127.0.0.1:4200/api"),
            "http://***@127.0.0.1:4200/api"
        );
        assert_eq!(url("https://tok@h/a@b"), "https://***@h/a@b");
        assert_eq!(
            url("http://127.0.0.1:4200/api"),
            "http://127.0.0.1:4200/api"
        );
        assert_eq!(
            url("unix:///var/run/docker.sock"),
            "unix:///var/run/docker.sock"
        );
        assert_eq!(url("no url here"), "no url here");
        assert_eq!(
            url("could not reach tcp://u:p@h:2375"),
            "could not reach tcp://***@h:2375"
        );
    }

    #[test]
    fn secret_names_and_values() {
        assert!(is_secret_name("splunk-token") && is_secret_name("PREFECT_API_KEY"));
        assert!(is_secret_name("Password") && is_secret_name("client_secret"));
        assert!(!is_secret_name("max-size"));
        assert!(holds_secret_key(&json!({"config": {"splunk-token": 1}})));
        assert!(holds_secret_key(&json!([{"apiKey": "x"}])));
        assert!(!holds_secret_key(&json!({"config": {"max-size": "1m"}})));
    }

    #[test]
    fn userinfo_is_decoded() {
        assert_eq!(percent_decode("p%40ss%3Aw"), "p@ss:w");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
