//! Registry credentials from the Docker CLI's `config.json` (`$DOCKER_CONFIG` or
//! `~/.docker`): inline `auths`, per-registry `credHelpers` and the default `credsStore`,
//! so `docker login` on the worker's host is enough for private images, as with docker-py.
//! Credential helpers run as child processes with `tokio::process` and the file is read with
//! `tokio::fs`: a slow helper (a keychain prompt, a cloud CLI) must not block the runtime's
//! threads, which serve every other run.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

use base64::Engine as _;
use bollard::auth::DockerCredentials;
use serde_json::Value;

/// The key Docker Hub credentials are stored under.
const DOCKER_HUB: &str = "https://index.docker.io/v1/";

/// The registry host of an image reference (`docker.io` for Hub images).
pub fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_owned()
        }
        _ => "docker.io".to_owned(),
    }
}

fn host_of_key(key: &str) -> &str {
    let without_scheme = key.split_once("://").map_or(key, |(_, rest)| rest);
    without_scheme.split('/').next().unwrap_or(without_scheme)
}

fn same_registry(key: &str, registry: &str) -> bool {
    let host = host_of_key(key);
    let hub = |h: &str| matches!(h, "docker.io" | "index.docker.io" | "registry-1.docker.io");
    host == registry || (hub(host) && hub(registry))
}

/// How long a credential helper may take before the pull goes on without its credentials.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

async fn from_helper(helper: &str, server: &str) -> Option<DockerCredentials> {
    run_helper(Path::new(&format!("docker-credential-{helper}")), server).await
}

/// Runs a credential helper program (`get`, the server on stdin) and reads its answer.
async fn run_helper(program: &Path, server: &str) -> Option<DockerCredentials> {
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    stdin.write_all(server.as_bytes()).await.ok()?;
    drop(stdin);
    let out = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .ok()?
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let username = v.get("Username")?.as_str()?.to_owned();
    let secret = v.get("Secret")?.as_str()?.to_owned();
    Some(if username == "<token>" {
        DockerCredentials {
            identitytoken: Some(secret),
            serveraddress: Some(server.to_owned()),
            ..Default::default()
        }
    } else {
        DockerCredentials {
            username: Some(username),
            password: Some(secret),
            serveraddress: Some(server.to_owned()),
            ..Default::default()
        }
    })
}

/// Whether a registry address as users write it (`127.0.0.1:5000`,
/// `https://index.docker.io/v1/`) is the registry `image` is pulled from: only then do a job's
/// `registry_credentials` go with the pull, as docker-py keys logins by registry.
pub fn serves(registry_url: &str, image: &str) -> bool {
    same_registry(registry_url, &registry_of(image))
}

/// Credentials for `image`'s registry from `config_dir/config.json`, if any are stored.
pub async fn credentials_for(image: &str, config_dir: &Path) -> Option<DockerCredentials> {
    credentials_for_registry(&registry_of(image), config_dir).await
}

/// The credentials `docker login` stored inline in `auths` for `registry`: a user and password
/// (or the base64 `auth` pair, which wins) or an identity token.
fn from_auths(config: &Value, registry: &str) -> Option<DockerCredentials> {
    let (key, entry) = config
        .get("auths")
        .and_then(Value::as_object)
        .and_then(|auths| auths.iter().find(|(k, _)| same_registry(k, registry)))?;
    let field = |name: &str| {
        entry
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let (mut username, mut password) = (
        field("username").map(str::to_owned),
        field("password").map(str::to_owned),
    );
    if let Some(auth) = field("auth")
        && let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(auth)
        && let Some((u, p)) = String::from_utf8_lossy(&decoded).split_once(':')
    {
        username = Some(u.to_owned());
        password = Some(p.to_owned());
    }
    (username.is_some() || field("identitytoken").is_some()).then(|| DockerCredentials {
        username,
        password,
        identitytoken: field("identitytoken").map(str::to_owned),
        serveraddress: Some(key.clone()),
        ..Default::default()
    })
}

/// Credentials stored in `config_dir/config.json` for a registry address (a host, `host:port`
/// or a URL such as `https://index.docker.io/v1/`), if any.
pub async fn credentials_for_registry(
    registry: &str,
    config_dir: &Path,
) -> Option<DockerCredentials> {
    let text = tokio::fs::read_to_string(config_dir.join("config.json"))
        .await
        .ok()?;
    let config: Value = serde_json::from_str(&text).ok()?;
    let host = host_of_key(registry);
    let registry = if same_registry(host, "docker.io") {
        "docker.io".to_owned()
    } else {
        host.to_owned()
    };
    let server = if registry == "docker.io" {
        DOCKER_HUB.to_owned()
    } else {
        registry.clone()
    };

    if let Some(helper) = config
        .get("credHelpers")
        .and_then(Value::as_object)
        .and_then(|helpers| helpers.iter().find(|(k, _)| same_registry(k, &registry)))
        .and_then(|(_, v)| v.as_str())
    {
        return from_helper(helper, &server).await;
    }
    if let Some(credentials) = from_auths(&config, &registry) {
        return Some(credentials);
    }
    if let Some(store) = config.get("credsStore").and_then(Value::as_str) {
        return from_helper(store, &server).await;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries() {
        assert_eq!(registry_of("busybox"), "docker.io");
        assert_eq!(registry_of("library/busybox:1"), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/a/b:1"), "127.0.0.1:5000");
        assert_eq!(registry_of("ghcr.io/x/y"), "ghcr.io");
        assert_eq!(registry_of("localhost/x"), "localhost");
    }

    #[tokio::test]
    async fn inline_auths() {
        let dir = tempfile::tempdir().unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode("user:pa:ss");
        std::fs::write(
            dir.path().join("config.json"),
            format!(r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"username":"hub","password":"p"}}}}}}"#),
        )
        .unwrap();
        let c = credentials_for("127.0.0.1:5000/x:1", dir.path())
            .await
            .unwrap();
        assert_eq!(
            (c.username.as_deref(), c.password.as_deref()),
            (Some("user"), Some("pa:ss"))
        );
        let hub = credentials_for("busybox", dir.path()).await.unwrap();
        assert_eq!(hub.username.as_deref(), Some("hub"));
        assert!(credentials_for("ghcr.io/x/y", dir.path()).await.is_none());
        assert!(
            credentials_for("x", Path::new("/nonexistent"))
                .await
                .is_none()
        );
        let by_url = credentials_for_registry("https://index.docker.io/v1/", dir.path())
            .await
            .unwrap();
        assert_eq!(by_url.username.as_deref(), Some("hub"));
        let by_host = credentials_for_registry("http://127.0.0.1:5000", dir.path())
            .await
            .unwrap();
        assert_eq!(by_host.username.as_deref(), Some("user"));
    }

    #[test]
    fn registry_addresses_serve_their_images() {
        assert!(serves("127.0.0.1:5000", "127.0.0.1:5000/a/b:1"));
        assert!(serves("http://127.0.0.1:5000/", "127.0.0.1:5000/a/b:1"));
        assert!(serves("https://index.docker.io/v1/", "busybox"));
        assert!(serves("index.docker.io", "library/busybox:1"));
        assert!(!serves("127.0.0.1:5000", "127.0.0.1:5001/a/b:1"));
        assert!(!serves("ghcr.io", "busybox"));
    }

    #[tokio::test]
    async fn missing_helper_gives_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"credsStore":"no-such-helper-dw"}"#,
        )
        .unwrap();
        assert!(credentials_for("ghcr.io/x/y", dir.path()).await.is_none());
    }

    /// A helper is a child process the runtime awaits: its answer is read, and on a
    /// current-thread runtime another task makes progress while it runs.
    #[tokio::test(flavor = "current_thread")]
    async fn helpers_run_without_blocking_the_runtime() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-dwtest");
        // Waits for the test's flag file before answering, so it can only answer if the
        // runtime kept running the other task meanwhile (it gives up after 30 s, failing the
        // test rather than hanging it, if the runtime was blocked).
        let flag = dir.path().join("flag");
        std::fs::write(
            &helper,
            format!(
                "#!/bin/sh\nread server\nn=0\nwhile [ ! -e {} ]; do n=$((n+1)); [ $n -gt 600 ] && exit 1; sleep 0.05; done\necho '{{\"Username\":\"u\",\"Secret\":\"s\"}}'\n",
                flag.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let flag_writer = async {
            tokio::task::yield_now().await;
            tokio::fs::write(&flag, "").await.unwrap();
        };
        let (found, ()) = tokio::join!(run_helper(&helper, "ghcr.io"), flag_writer);
        let found = found.expect("the helper's credentials");
        assert_eq!(
            (found.username.as_deref(), found.password.as_deref()),
            (Some("u"), Some("s"))
        );
    }
}
