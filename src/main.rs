//! `docker-worker` binary: wiring only. Crypto provider → CLI → settings (exit 64 on bad
//! configuration) → tracing → runtime → `app::run` (or `app::gc`) → exit code.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::process::ExitCode;

use docker_worker::cli::{self, Command, GcArgs, PolicyCommand, StartArgs};
use docker_worker::config::{
    ConfigError, GcSettings, LogFormat, LogSettings, Settings, with_profile,
};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// `EX_USAGE` from sysexits.h: the configuration cannot be used.
const EXIT_CONFIG: u8 = 64;

/// Crates whose debug/trace output includes request bodies, headers or websocket frames
/// (container env with the API key, registry auth, the events auth message): capped at info so
/// no log level can leak a secret.
const CAPPED_CRATES: [&str; 9] = [
    "bollard",
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
    "rustls",
    "tungstenite",
    "tokio_tungstenite",
    "http",
];

/// The worker's log filter: `RUST_LOG`-style `target=level` directives (a plain `Targets`
/// filter: span and field filters are not supported, and not needed by a daemon), with the
/// capped crates (and their modules) held at info or quieter. A filter that does not parse is
/// `info`, and the parse error is returned so it can be logged as a warning once the log is
/// up: a typo in `RUST_LOG` must not silently change what the worker logs.
fn log_targets(log_filter: &str) -> (Targets, Option<String>) {
    let (user, error) = match log_filter.parse::<Targets>() {
        Ok(user) => (user, None),
        Err(e) => (
            Targets::new().with_default(LevelFilter::INFO),
            Some(e.to_string()),
        ),
    };
    let capped = |target: &str| {
        CAPPED_CRATES
            .iter()
            .any(|k| target == *k || target.starts_with(&format!("{k}::")))
    };
    let mut targets = match user.default_level() {
        Some(level) => Targets::new().with_default(level),
        None => Targets::new(),
    };
    for (target, level) in user.iter() {
        let level = if capped(target) {
            level.min(LevelFilter::INFO)
        } else {
            level
        };
        targets = targets.with_target(target, level);
    }
    for krate in CAPPED_CRATES {
        let level = user
            .iter()
            .find(|(t, _)| *t == krate)
            .map_or_else(
                || user.default_level().unwrap_or(LevelFilter::OFF),
                |(_, l)| l,
            )
            .min(LevelFilter::INFO);
        targets = targets.with_target(krate, level);
    }
    (targets, error)
}

/// Whether the text log may use ANSI colours: only when stderr is a terminal (not the journal,
/// a file or `docker logs`), and never with `NO_COLOR` set (<https://no-color.org>).
fn use_colour(no_color: bool) -> bool {
    !no_color && std::io::stderr().is_terminal()
}

/// The stderr log. Records of dependencies that log through the `log` crate (rustls,
/// tungstenite, bollard, reqwest) reach it too (`tracing-log`, installed by `init`), under
/// the same filter and caps as tracing's own events.
fn init_tracing(logging: &LogSettings, log_format: LogFormat) {
    let (targets, filter_error) = log_targets(&logging.filter);
    let registry = tracing_subscriber::registry().with(targets);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(use_colour(logging.no_color));
    match log_format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry
            .with(fmt.json().flatten_event(true).with_current_span(true))
            .init(),
    }
    if let Some(error) = filter_error {
        tracing::warn!(
            filter = %logging.filter,
            error = %error,
            "the log filter (RUST_LOG, else PREFECT_LOGGING_LEVEL) is not valid; logging at info"
        );
    }
}

fn main() -> ExitCode {
    // reqwest and bollard both use rustls; one process-wide provider avoids a panic at first use.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // Not `Cli::parse()`: the help of the environment variables is added at run time.
    let cli = cli::parse();

    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut cli::command(),
                "docker-worker",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Gc(args) => gc(&args),
        Command::Policy {
            action: PolicyCommand::Check { file, job },
        } => policy_check(&file, job.as_deref()),
        Command::Start(args) => start(&args),
    }
}

/// Settings from the process environment over the Prefect profile, built by `build`; a
/// configuration error is printed and becomes exit code 64.
fn settings<T>(
    build: impl FnOnce(&BTreeMap<String, String>) -> Result<T, ConfigError>,
) -> Result<T, ExitCode> {
    with_profile(std::env::vars().collect::<BTreeMap<_, _>>())
        .and_then(|env| build(&env))
        .map_err(|e| {
            eprintln!("docker-worker: {e}");
            ExitCode::from(EXIT_CONFIG)
        })
}

/// The tokio runtime `build` describes; a failure to start it is printed.
fn runtime(build: &mut tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    build.enable_all().build().map_err(|e| {
        eprintln!("docker-worker: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

/// `docker-worker gc`: one collection on a single thread.
fn gc(args: &GcArgs) -> ExitCode {
    let settings = match settings(|env| GcSettings::from_gc_args(args, env)) {
        Ok(s) => s,
        Err(code) => return code,
    };
    init_tracing(&settings.logging, LogFormat::Text);
    let runtime = match runtime(&mut tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(docker_worker::app::gc(settings)) {
        // Anything kept because of a failure makes the run fail, after the others.
        Ok(outcome) if outcome.errors() > 0 => ExitCode::FAILURE,
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("docker-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `docker-worker policy check`: 0 valid (and the job allowed), 1 the job refused, 64 the
/// policy or the job unusable. The environment is the one `start` would read.
fn policy_check(file: &std::path::Path, job: Option<&str>) -> ExitCode {
    use docker_worker::app::{PolicyCheck, check_policy};
    let env: BTreeMap<String, String> = std::env::vars().collect();
    match check_policy(file, job, &env) {
        Ok(PolicyCheck::Allowed(report)) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Ok(PolicyCheck::Refused(report)) => {
            print!("{report}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("docker-worker: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `docker-worker start`: the worker until a signal (or the end of `--run-once`).
fn start(args: &StartArgs) -> ExitCode {
    let settings = match settings(|env| Settings::from_start_args(args, env)) {
        Ok(s) => s,
        Err(code) => return code,
    };
    init_tracing(&settings.logging, settings.log_format);
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread().worker_threads(2)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let lifetime = docker_worker::worker::Lifetime::new();
        if let Err(e) = docker_worker::shutdown::spawn_signal_handler(lifetime.requested.clone()) {
            eprintln!("docker-worker: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
        match docker_worker::app::run(settings, lifetime).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("docker-worker: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn capped_crates_never_go_below_info() {
        let (t, error) = log_targets(
            "trace,docker_worker=debug,bollard=trace,reqwest::connect=trace,hyper=warn",
        );
        assert_eq!(error, None);
        assert!(t.would_enable("docker_worker::worker", &Level::DEBUG));
        assert!(t.would_enable("some_crate", &Level::TRACE));
        assert!(!t.would_enable("bollard::docker", &Level::DEBUG));
        assert!(t.would_enable("bollard::docker", &Level::INFO));
        assert!(!t.would_enable("reqwest::connect", &Level::DEBUG));
        assert!(!t.would_enable("tungstenite::protocol", &Level::TRACE));
        assert!(
            !t.would_enable("hyper::proto", &Level::INFO),
            "quieter than info is kept"
        );
        assert!(t.would_enable("hyper::proto", &Level::WARN));
    }

    #[test]
    fn a_bad_filter_falls_back_to_info_and_says_why() {
        let (t, error) = log_targets("this is not a filter ===");
        assert!(error.is_some_and(|e| !e.is_empty()));
        assert!(t.would_enable("docker_worker", &Level::INFO));
        assert!(!t.would_enable("docker_worker", &Level::DEBUG));
    }
}
