//! The streamer: the LLM core.
//!
//! It owns the durable pull consumer on chat requests (`chat.req.>`), the
//! calls to OpenAI-compatible streaming APIs ([`upstream`]), and the
//! publishing of each turn's frames and its completed record ([`chat`]).
//! It keeps no state of its own: everything it knows is in JetStream, so any
//! number of streamers share the work and a killed one loses nothing.
//! The scan pipeline will live here too (the scan issue).

pub mod chat;
mod config;
pub mod upstream;
pub mod vision;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::StreamExt as _;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::{Config, DEFAULT_SYSTEM_PROMPT, Provider};

/// Runs the streamer until `shutdown` fires.
///
/// # Errors
/// When startup fails (NATS unreachable, port in use) or the consumer breaks.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    Streamer::build(config).await?.run(shutdown).await
}

/// A streamer that has bound its port and connected, ready to [`Streamer::run`].
pub struct Streamer {
    config: Config,
    consumer: async_nats::jetstream::consumer::pull::Config,
    listener: tokio::net::TcpListener,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    worker: chat::Worker,
}

impl Streamer {
    /// Binds the ops listener, connects to NATS and creates the streams.
    ///
    /// # Errors
    /// An actionable message for each startup failure.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=chat::ACK_BUDGET).contains(&config.concurrency),
            "STREAMER_CONCURRENCY must be between 1 and {}",
            chat::ACK_BUDGET
        );
        let listener = bus::ops::bind(&config.listen, "STREAMER_LISTEN").await?;
        let client = bus::connect::connect(&config.nats_url, "streamer").await?;
        let js = async_nats::jetstream::new(client.clone());
        bus::streams::ensure_all(&js).await?;
        let upstream = upstream::Upstream::build(&config)?;
        tracing::info!(llm = %bus::connect::redact(&config.llm_base_url), model = %config.llm_model, "Streamer configured.");
        let mut consumer = bus::streams::STREAMER_CHAT.config()?;
        if let Some(ms) = config.ack_wait_ms {
            consumer.ack_wait = Duration::from_millis(ms.max(500));
        }
        let worker = chat::Worker {
            client: client.clone(),
            js: js.clone(),
            upstream,
            system_prompt: config.system_prompt.clone(),
            max_tokens: config.max_tokens,
            progress_every: consumer.ack_wait / 3,
            history: bus::history::HistoryClient::start(client.clone(), &js).await?,
            ack_window: (chat::ACK_BUDGET / config.concurrency).clamp(1, 64),
        };
        Ok(Self {
            config,
            consumer,
            listener,
            client,
            js,
            worker,
        })
    }

    /// The address of the health/metrics listener.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Consumes chat requests until `shutdown` fires, then stops fetching,
    /// lets turns in flight finish (bounded by [`bus::shutdown::DRAIN`]) and returns.
    ///
    /// # Errors
    /// When the consumer cannot be created.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ready = bus::ops::nats_ready(self.client.clone(), self.js.clone());
        let ops = tokio::spawn(bus::ops::serve(self.listener, ready, shutdown.clone()));

        let consumer = bus::streams::STREAMER_CHAT
            .ensure_with(&self.js, self.consumer.clone())
            .await?;
        let concurrency = self.config.concurrency;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(concurrency)
            .messages()
            .await
            .context("cannot start consuming chat requests")?;
        let permits = Arc::new(Semaphore::new(concurrency));
        let tracker = TaskTracker::new();
        tracing::info!(concurrency, "Streamer consuming chat requests.");
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = permits.clone().acquire_owned() => permit.expect("semaphore never closes"),
            };
            let message = tokio::select! {
                _ = shutdown.cancelled() => break,
                message = messages.next() => message,
            };
            match message {
                Some(Ok(message)) => {
                    let worker = self.worker.clone();
                    tracker.spawn(async move {
                        worker.handle(message).await;
                        drop(permit);
                    });
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "Pulling chat requests failed; retrying.");
                }
                None => break,
            }
        }
        drop(messages);
        tracker.close();
        if tokio::time::timeout(bus::shutdown::DRAIN, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = tracker.len(),
                "Drain timed out; unfinished turns will be redelivered to another worker."
            );
        }
        let _ = self.client.flush().await;
        let _ = ops.await;
        tracing::info!(status = %json!("stopped"), "Streamer stopped.");
        Ok(())
    }
}
