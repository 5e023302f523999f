//! The binary's command line: help, version, and configuration errors (exit 64).

use std::process::Command;

fn worker() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_docker-worker"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

#[test]
fn version_and_help() {
    let out = worker().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("docker-worker {}", env!("CARGO_PKG_VERSION"))
    );
    let out = worker().args(["start", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--pool",
        "--work-queue",
        "--limit",
        "--run-once",
        "--prefetch-seconds",
        "--base-job-template",
        "--no-create-pool-if-not-found",
    ] {
        assert!(help.contains(flag), "{flag} missing from help:\n{help}");
    }
}

/// `start --help` ends with every variable of the environment table and its default, and a
/// flag backed by a variable names it; the help is generated from the table, not written.
#[test]
fn start_help_lists_the_environment_from_the_table() {
    let out = worker().args(["start", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let section = help
        .split_once("Environment")
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no Environment section in:\n{help}"));
    for var in docker_worker::config::ENV_VARS {
        let line = section
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{}  ", var.name)))
            .unwrap_or_else(|| panic!("{} missing from start --help:\n{help}", var.name));
        assert!(
            line.contains(&format!("[default: {}]", var.default.shown())),
            "{line}"
        );
    }
    assert!(
        help.contains("[env: PREFECT_WORKER_PREFETCH_SECONDS; default: 10]"),
        "{help}"
    );
    let out = worker().args(["start", "-h"]).output().unwrap();
    let short = String::from_utf8_lossy(&out.stdout);
    assert!(
        short.contains("[env: DOCKER_WORKER_GC_OLDER_THAN; default: 24h]"),
        "{short}"
    );
    let out = worker().args(["gc", "--help"]).output().unwrap();
    let gc = String::from_utf8_lossy(&out.stdout);
    assert!(
        gc.contains("[env: DOCKER_WORKER_GC_OLDER_THAN; default: 24h]"),
        "{gc}"
    );
}

#[test]
fn missing_api_url_exits_64_with_a_clear_message() {
    let out = worker().args(["start", "--pool", "p"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("`PREFECT_API_URL` must be set to start a Worker")
    );
}

#[test]
fn bad_settings_exit_64() {
    for (args, env, expected) in [
        (
            vec!["start", "--pool", "p", "--name", "a%b"],
            vec![],
            "Worker name cannot contain",
        ),
        (
            vec!["start", "--pool", "p"],
            vec![("PREFECT_WORKER_QUERY_SECONDS", "x")],
            "PREFECT_WORKER_QUERY_SECONDS",
        ),
        (
            vec![
                "start",
                "--pool",
                "p",
                "--base-job-template",
                "/no/such/file.json",
            ],
            vec![],
            "/no/such/file.json",
        ),
    ] {
        let out = worker()
            .args(&args)
            .env("PREFECT_API_URL", "http://127.0.0.1:9/api")
            .envs(env)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expected),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A policy file that cannot be used stops `start` with exit 64, naming the file, the line
/// and the problem, before anything else happens (no Docker or API is reachable here).
#[test]
fn a_bad_policy_file_exits_64_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "[deny]\nprivileged = true\nhost_namespaces = [\"net\"]\n",
    )
    .unwrap();
    for (flag, env) in [
        (vec!["--policy", file.to_str().unwrap()], vec![]),
        (
            vec![],
            vec![("DOCKER_WORKER_POLICY", file.to_str().unwrap())],
        ),
    ] {
        let out = worker()
            .args(["start", "--pool", "p"])
            .args(&flag)
            .env("PREFECT_API_URL", "http://127.0.0.1:9/api")
            .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
            .envs(env)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(
            err.contains(&format!(
                "cannot use policy file {}: line 3, column 20: unknown variant `net`",
                file.display()
            )),
            "{err}"
        );
    }
    let out = worker()
        .args(["start", "--pool", "p", "--policy", "/no/such/policy.toml"])
        .env("PREFECT_API_URL", "http://127.0.0.1:9/api")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/policy.toml: cannot read it"));
}

/// A job override file that cannot be used stops `start` (and `gc --images`, which renders
/// with it) with exit 64 naming the file and the problem: unreadable, bad syntax with its
/// line, an unknown field, a value the job configuration refuses. By flag and by variable.
#[test]
fn a_bad_job_override_file_exits_64_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    let syntax = write("syntax.toml", "[env]\nA = \"1\"\nB = \n");
    let unknown = write("unknown.json", r#"{"imgae": "x"}"#);
    let invalid = write("invalid.json", r#"{"mem_limit": "lots"}"#);
    for (file, expected) in [
        ("/no/such/override.json".to_owned(), "cannot read it"),
        (syntax.clone(), "not valid TOML: TOML parse error at line 3"),
        (unknown.clone(), "unknown job configuration field `imgae`"),
        (invalid.clone(), "mem_limit"),
    ] {
        let wanted = format!("cannot use job override file {file}: ");
        for (args, env) in [
            (
                vec!["start", "--pool", "p", "--job-override", &file],
                vec![],
            ),
            (
                vec!["start", "--pool", "p"],
                vec![("DOCKER_WORKER_JOB_OVERRIDE", file.as_str())],
            ),
            (vec!["gc", "--images", "--job-override", &file], vec![]),
        ] {
            let out = worker()
                .args(&args)
                .env("PREFECT_API_URL", "http://127.0.0.1:9/api")
                .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
                .envs(env)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
            assert!(
                err.contains(&wanted) && err.contains(expected),
                "{args:?}: {err}"
            );
        }
    }
}

/// 2 is for a command line clap cannot parse; 64 for a value that parses but cannot be used,
/// whether it came from a flag or from the environment.
#[test]
fn unusable_values_exit_64_and_unparsable_command_lines_2() {
    for (args, env, expected) in [
        (vec!["--limit", "0"], vec![], "--limit"),
        (vec!["--log-format", "xml"], vec![], "--log-format"),
        (
            vec![],
            vec![("DOCKER_WORKER_LOG_FORMAT", "xml")],
            "--log-format",
        ),
        (
            vec![],
            vec![("PREFECT_WORKER_QUERY_SECONDS", "0")],
            "PREFECT_WORKER_QUERY_SECONDS",
        ),
        (
            vec![],
            vec![("PREFECT_WORKER_HEARTBEAT_SECONDS", "0")],
            "PREFECT_WORKER_HEARTBEAT_SECONDS",
        ),
        (vec!["--min-free-disk", "lots"], vec![], "--min-free-disk"),
        (
            vec![],
            vec![("DOCKER_WORKER_MIN_FREE_DISK", "-1g")],
            "DOCKER_WORKER_MIN_FREE_DISK",
        ),
        (vec!["--gc-image-label", "a b"], vec![], "--gc-image-label"),
    ] {
        let out = worker()
            .args(["start", "--pool", "p"])
            .args(&args)
            .env("PREFECT_API_URL", "http://127.0.0.1:9/api")
            .envs(env.clone())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {err}");
        assert!(err.contains(expected), "{args:?} {env:?}: {err}");
    }
    let out = worker()
        .args(["start", "--pool", "p", "--limit", "abc"])
        .env("PREFECT_API_URL", "http://127.0.0.1:9/api")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'abc'"));
}

/// The text log written to a file (here a pipe, as for the journal or `docker logs`) has no
/// ANSI escape codes; an invalid `RUST_LOG` is named in a warning and the log is at info; and
/// `--run-once` exits 0 when its poll failed (the error is in the log). Needs the Docker
/// daemon (the worker connects to it before the API); the API is a closed port.
#[test]
fn the_text_log_off_a_terminal_is_plain_and_a_bad_filter_is_named() {
    let out = worker()
        .args(["start", "--pool", "p", "--run-once"])
        .env("PREFECT_API_URL", "http://127.0.0.1:9/api")
        .env("PREFECT_CLIENT_MAX_RETRIES", "0")
        .env("RUST_LOG", "=not=a=filter=")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("could not connect to Docker") && !err.contains("Could not connect"),
        "this test needs the Docker daemon: {err}"
    );
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains('\u{1b}'), "escape codes in a file:\n{err:?}");
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.contains("WARN")
            && first.contains("the log filter (RUST_LOG, else PREFECT_LOGGING_LEVEL) is not valid; logging at info")
            && first.contains("=not=a=filter="),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("ERROR") && l.contains("polling for flow runs failed")),
        "{err}"
    );
    assert!(
        !err.lines().any(|l| l.contains("DEBUG")),
        "info, not debug:\n{err}"
    );
}

#[test]
fn missing_pool_flag_is_a_usage_error() {
    let out = worker().arg("start").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pool"));
}

#[test]
fn unreachable_docker_fails_with_a_message() {
    let out = worker()
        .args(["start", "--pool", "p"])
        .env("PREFECT_API_URL", "http://127.0.0.1:9/api")
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("connecting to the Docker Engine")
            && err.contains("Could not connect to Docker at unix:///nonexistent/docker.sock")
            && err.contains("no such socket"),
        "{err}"
    );
}

/// Starts the worker against `docker_host` (with `extra` settings) through `wrap` (a command
/// prefix, e.g. to run it as another user) and returns its stderr, after checking exit 1.
fn connect_failure(
    wrap: &[&str],
    binary: &std::path::Path,
    docker_host: &str,
    extra: &[(&str, &str)],
) -> String {
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(binary);
            cmd
        }
        None => Command::new(binary),
    };
    let out = cmd
        .args(["start", "--pool", "p"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PREFECT_API_URL", "http://127.0.0.1:9/api")
        .env("DOCKER_HOST", docker_host)
        .envs(extra.iter().copied())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("Could not connect to Docker at {docker_host}: ")),
        "{err}"
    );
    err
}

/// A TCP port nothing listens on: refused, said so, with the address.
#[test]
fn a_refused_docker_connection_says_so() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_docker-worker"));
    let err = connect_failure(&[], binary, &format!("tcp://127.0.0.1:{port}"), &[]);
    assert!(
        err.contains("Connection refused")
            && err.contains("connection refused: nothing listens there"),
        "{err}"
    );
}

/// A socket the worker's user may not open (mode 000, worker run as `nobody` with
/// `setpriv`, which needs root): permission denied, with the `docker` group hint.
#[test]
fn a_socket_without_permission_says_to_join_the_docker_group() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("docker.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o000)).unwrap();
    // A copy `nobody` can run wherever the build directory is.
    let binary = dir.path().join("docker-worker");
    std::fs::copy(env!("CARGO_BIN_EXE_docker-worker"), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = connect_failure(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        &binary,
        &format!("unix://{}", socket.display()),
        &[],
    );
    assert!(
        err.contains("Permission denied") && err.contains("to the `docker` group"),
        "{err}"
    );
}

/// `DOCKER_TLS_VERIFY` against a port that answers in plain HTTP: the handshake fails and the
/// message points at the certificates and the daemon's TLS.
#[test]
fn a_failed_tls_handshake_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=dw",
        ])
        .arg("-keyout")
        .arg(dir.path().join("key.pem"))
        .arg("-out")
        .arg(dir.path().join("cert.pem"))
        .output()
        .expect("openssl is needed (scripts/test-env.sh installs it)");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    std::fs::copy(dir.path().join("cert.pem"), dir.path().join("ca.pem")).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 512];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\nnot TLS");
        }
    });
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_docker-worker"));
    let cert_path = dir.path().display().to_string();
    let err = connect_failure(
        &[],
        binary,
        &format!("tcp://127.0.0.1:{port}"),
        &[("DOCKER_TLS_VERIFY", "1"), ("DOCKER_CERT_PATH", &cert_path)],
    );
    assert!(err.contains("the TLS handshake failed"), "{err}");
}

#[test]
fn gc_command_line() {
    let out = worker().args(["gc", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--pool", "--older-than", "--dry-run"] {
        assert!(help.contains(flag), "{flag} missing from gc help:\n{help}");
    }
    let out = worker().args(["start", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--gc-interval", "--gc-older-than"] {
        assert!(
            help.contains(flag),
            "{flag} missing from start help:\n{help}"
        );
    }
    for (args, env, expected) in [
        (vec!["gc"], vec![], "`PREFECT_API_URL` must be set"),
        (
            vec!["gc", "--older-than", "soon"],
            vec![("PREFECT_API_URL", "http://127.0.0.1:9/api")],
            "--older-than",
        ),
        (
            vec!["start", "--pool", "p", "--gc-interval", "often"],
            vec![("PREFECT_API_URL", "http://127.0.0.1:9/api")],
            "--gc-interval",
        ),
    ] {
        let out = worker().args(&args).envs(env).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expected),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = worker()
        .args(["gc", "--dry-run"])
        .env("PREFECT_API_URL", "http://127.0.0.1:9/api")
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connecting to the Docker Engine"), "{err}");
}
