//! Connecting to NATS the same way in every service: one set of settings
//! ([`BusConfig`], flattened into each binary's `Config`), one connect.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use secrecy::{ExposeSecret as _, SecretString};

/// How a service reaches the bus and lays out what it creates there.
#[derive(Debug, Clone, clap::Args)]
pub struct BusConfig {
    /// NATS server URL, or a cluster's nodes comma-separated; the client
    /// reconnects across them.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// This service's NATS user (with NATS_PASSWORD).
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// The NATS user's password.
    #[arg(long, env = "NATS_PASSWORD", value_parser = crate::parse_secret, hide_env_values = true)]
    pub nats_password: Option<SecretString>,
    /// A NATS credentials file (user JWT and nkey seed), instead of a user
    /// and password.
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// Replicas of every stream, KV bucket and object store (3 on a
    /// 3-node cluster); raised on an existing deployment at start.
    #[arg(long, env = "BUS_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub bus_replicas: u8,
}

impl BusConfig {
    /// Settings for `url` alone (tests and tools).
    pub fn url(url: impl Into<String>) -> Self {
        Self {
            nats_url: url.into(),
            nats_user: None,
            nats_password: None,
            nats_creds: None,
            bus_replicas: 1,
        }
    }

    /// The servers of [`Self::nats_url`].
    ///
    /// # Errors
    /// When the list is empty or an entry is not a NATS URL.
    pub fn servers(&self) -> anyhow::Result<Vec<ServerAddr>> {
        let servers = self
            .nats_url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<ServerAddr>()
                    .with_context(|| format!("NATS_URL entry {:?} is not a NATS URL", redact(s)))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!servers.is_empty(), "NATS_URL is empty");
        Ok(servers)
    }

    /// Connects as `client_name`, failing fast (a few seconds) when no
    /// server is reachable at start; once connected, the client reconnects
    /// by itself forever, to any server of the list, and in-flight
    /// publishes wait for it.
    ///
    /// # Errors
    /// An actionable message naming the URL when the first connection fails.
    pub async fn connect(&self, client_name: &str) -> anyhow::Result<Client> {
        let servers = self.servers()?;
        let url_for_log = redact(&self.nats_url);
        let mut options = match &self.nats_creds {
            Some(path) => ConnectOptions::with_credentials_file(path)
                .await
                .with_context(|| format!("cannot read NATS_CREDS {}", path.display()))?,
            None => ConnectOptions::new(),
        };
        match (&self.nats_user, &self.nats_password) {
            (Some(user), Some(password)) => {
                // Replies (JetStream acks, history answers) come to an inbox
                // only this user may read: the bus's permissions name it.
                options = options
                    .user_and_password(user.clone(), password.expose_secret().to_owned())
                    .custom_inbox_prefix(format!("_INBOX_{user}"));
            }
            (None, None) => {}
            _ => anyhow::bail!("set both NATS_USER and NATS_PASSWORD, or neither"),
        }
        options
            .name(client_name)
            .connection_timeout(Duration::from_secs(3))
            .event_callback(move |event| {
                let url = url_for_log.clone();
                async move {
                    match event {
                        Event::Connected => tracing::info!(%url, "Connected to NATS."),
                        Event::Disconnected => {
                            tracing::warn!(%url, "Disconnected from NATS; reconnecting.");
                        }
                        // A permissions violation or an authorization
                        // problem: the operator must see it.
                        Event::ServerError(error) => {
                            tracing::warn!(%error, "NATS server reported an error.");
                        }
                        other => tracing::debug!(event = %other, "NATS client event."),
                    }
                }
            })
            .connect(servers)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to NATS at {} (is nats-server running with JetStream? set NATS_URL, and NATS_USER/NATS_PASSWORD if it requires them)",
                    redact(&self.nats_url)
                )
            })
    }
}

/// Connects to `url` with no credentials (tests and tools).
///
/// # Errors
/// As [`BusConfig::connect`].
pub async fn connect(url: &str, client_name: &str) -> anyhow::Result<Client> {
    BusConfig::url(url).connect(client_name).await
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

    #[test]
    fn a_url_list_names_every_server_and_a_bad_entry_is_named() {
        let config = super::BusConfig::url("nats://a:4222, nats://b:4223,,nats://c:4224");
        assert_eq!(config.servers().unwrap().len(), 3);
        let bad = super::BusConfig::url("nats://a:4222,http://u:secret@b");
        let error = format!("{:#}", bad.servers().unwrap_err());
        assert!(error.contains("not a NATS URL"), "{error}");
        assert!(!error.contains("secret"), "{error}");
        assert!(super::BusConfig::url(" , ").servers().is_err());
    }
}
