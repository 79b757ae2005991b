//! Connecting to NATS the same way in every service.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::{Client, ConnectOptions, Event};

/// Connects to `url`, failing fast (a few seconds) when the server is not
/// reachable at start; once connected, the client reconnects by itself
/// forever and in-flight publishes wait for it.
///
/// # Errors
/// An actionable message naming the URL when the first connection fails.
pub async fn connect(url: &str, client_name: &str) -> anyhow::Result<Client> {
    let url_for_log = redact(url);
    ConnectOptions::new()
        .name(client_name)
        .connection_timeout(Duration::from_secs(3))
        .event_callback(move |event| {
            let url = url_for_log.clone();
            async move {
                match event {
                    Event::Connected => tracing::info!(%url, "Connected to NATS."),
                    Event::Disconnected => tracing::warn!(%url, "Disconnected from NATS; reconnecting."),
                    other => tracing::debug!(event = %other, "NATS client event."),
                }
            }
        })
        .connect(url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {} (is nats-server running with JetStream? set NATS_URL)",
                redact(url)
            )
        })
}

/// Drops credentials from a URL before it is logged.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_credentials() {
        assert_eq!(super::redact("nats://u:p@h:4222"), "nats://***@h:4222");
        assert_eq!(super::redact("postgres://u:p@h/db"), "postgres://***@h/db");
        assert_eq!(super::redact("nats://h:4222"), "nats://h:4222");
    }
}
