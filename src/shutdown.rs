//! Signals: the first SIGINT/SIGTERM cancels the root token (graceful: stop claiming, leave
//! containers running); a second one exits the process at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit code used when a second signal forces an immediate exit (128 + SIGINT).
pub const FORCED_EXIT_CODE: i32 = 130;

/// Spawns the signal watcher for `root`. It is the one task outside the trackers: it lives
/// as long as the process, so that a second signal can still end it while shutdown waits.
///
/// # Errors
/// When the signal handlers cannot be installed.
pub fn spawn_signal_handler(root: CancellationToken) -> std::io::Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = sigint.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                tracing::info!(
                    "shutdown requested; stopping (send the signal again to exit at once)"
                );
                root.cancel();
            } else {
                tracing::warn!("second signal; exiting now");
                std::process::exit(FORCED_EXIT_CODE);
            }
        }
    });
    Ok(())
}
