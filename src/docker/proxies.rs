//! Proxy variables for containers from the Docker CLI's `config.json` (`proxies`), which
//! docker-py — and so the Python worker — puts in every container's environment: a worker
//! host set up with `docker` client proxies gets them in flow-run containers here too.

use std::path::Path;

use serde_json::Value;

/// `config.json`'s field → the variables it sets (lower-case first, as docker-py orders them).
const FIELDS: [(&str, [&str; 2]); 4] = [
    ("httpProxy", ["http_proxy", "HTTP_PROXY"]),
    ("httpsProxy", ["https_proxy", "HTTPS_PROXY"]),
    ("ftpProxy", ["ftp_proxy", "FTP_PROXY"]),
    ("noProxy", ["no_proxy", "NO_PROXY"]),
];

/// `KEY=value` entries for the proxies configured for the Docker host — its own entry under
/// `proxies`, keyed by any of `host_keys` (the `DOCKER_HOST` form, or docker-py's base URL),
/// else `proxies.default`; empty when none are (or the file is unreadable).
pub fn proxy_env(config_dir: &Path, host_keys: &[&str]) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(config_dir.join("config.json")) else {
        return Vec::new();
    };
    let Ok(config) = serde_json::from_str::<Value>(&text) else {
        return Vec::new();
    };
    let proxies = config.get("proxies");
    let Some(chosen) = host_keys
        .iter()
        .find_map(|key| proxies.and_then(|p| p.get(*key)))
        .or_else(|| proxies.and_then(|p| p.get("default")))
    else {
        return Vec::new();
    };
    let mut env = Vec::new();
    for (field, names) in FIELDS {
        if let Some(value) = chosen
            .get(field)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
        {
            env.extend(names.iter().map(|name| format!("{name}={value}")));
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_proxies_become_both_spellings_and_a_hosts_own_entry_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"proxies": {
                "default": {"httpProxy": "http://proxy:3128", "noProxy": "localhost,.internal", "ftpProxy": ""},
                "tcp://build-host:2376": {"httpsProxy": "http://other:8080"}}}"#,
        )
        .unwrap();
        assert_eq!(
            proxy_env(dir.path(), &["unix:///var/run/docker.sock"]),
            vec![
                "http_proxy=http://proxy:3128",
                "HTTP_PROXY=http://proxy:3128",
                "no_proxy=localhost,.internal",
                "NO_PROXY=localhost,.internal",
            ]
        );
        assert_eq!(
            proxy_env(dir.path(), &["x", "tcp://build-host:2376"]),
            vec![
                "https_proxy=http://other:8080",
                "HTTPS_PROXY=http://other:8080"
            ]
        );
    }

    #[test]
    fn no_file_no_proxies_or_a_broken_file_add_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(proxy_env(dir.path(), &["x"]).is_empty());
        std::fs::write(dir.path().join("config.json"), r#"{"auths": {}}"#).unwrap();
        assert!(proxy_env(dir.path(), &["x"]).is_empty());
        std::fs::write(dir.path().join("config.json"), "not json").unwrap();
        assert!(proxy_env(dir.path(), &["x"]).is_empty());
    }
}
