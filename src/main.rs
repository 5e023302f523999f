//! `docker-worker` binary: wiring only. Crypto provider → CLI → settings (exit 64 on bad
//! configuration) → tracing → runtime → `app::run` → exit code.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Parser;
use docker_worker::cli::{Cli, Command};
use docker_worker::config::Settings;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// `EX_USAGE` from sysexits.h: the configuration cannot be used.
const EXIT_CONFIG: u8 = 64;

fn init_tracing(env: &BTreeMap<String, String>) {
    let filter = env
        .get("RUST_LOG")
        .cloned()
        .or_else(|| {
            env.get("PREFECT_LOGGING_LEVEL")
                .map(|l| l.to_ascii_lowercase())
        })
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    // reqwest and bollard both use rustls; one process-wide provider avoids a panic at first use.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let env: BTreeMap<String, String> = std::env::vars().collect();

    match cli.command {
        Command::Start(args) => {
            let settings = match Settings::from_start_args(&args, &env) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("docker-worker: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_tracing(&env);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("docker-worker: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                if let Err(e) = docker_worker::shutdown::spawn_signal_handler(shutdown.clone()) {
                    eprintln!("docker-worker: cannot install signal handlers: {e}");
                    return ExitCode::FAILURE;
                }
                match docker_worker::app::run(settings, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{e:#}");
                        eprintln!("docker-worker: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}
