//! Turning SIGINT/SIGTERM into a cancellation token.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long a service may take to drain after the signal before it gives up.
pub const DRAIN: Duration = Duration::from_secs(10);

/// A token cancelled on the first SIGINT or SIGTERM. A second signal exits
/// at once, for an operator who does not want to wait for the drain.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let fired = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("Shutdown signal received; draining.");
        fired.cancel();
        wait_for_signal().await;
        tracing::warn!("Second signal; exiting without draining.");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
