//! The streamer: the LLM core.
//!
//! It owns the durable pull consumer on chat requests (`chat.req.>`), the
//! calls to OpenAI-compatible streaming APIs ([`upstream`]), and the
//! publishing of each turn's frames, one writer at a time ([`frames`]), and
//! its completed record ([`chat`]), and each conversation's newest turns,
//! the next prompt's context ([`context`]). It closes turns and scans whose
//! deliveries ran out from JetStream's advisories ([`exhausted`]).
//! It also owns the scan pipeline ([`scan`]): the durable consumer on scan
//! jobs (`scan.req.>`), the image model behind [`vision::Vision`], the
//! perceptual hash ([`phash`]), the disposal rules ([`rules`]), the
//! character catalogue and its match cache ([`catalogue`]), the reward
//! stage that grants characters on `reward.grant.<scan>`, and the DLQ
//! reprocessing of failed scans. It purges a user's entries from the
//! buckets only it writes when the user is erased (`erase`).
//! It keeps no state of its own: everything it knows is in JetStream, so any
//! number of streamers share the work and a killed one loses nothing.

pub mod catalogue;
pub mod chat;
mod config;
pub mod context;
mod erase;
mod exhausted;
pub mod frames;
pub mod grounding;
pub mod phash;
pub mod retrieval;
pub use bus::rules;
pub mod scan;
mod series;
mod turn;
pub mod upstream;
pub mod vision;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::StreamExt as _;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::{Command, Config, DEFAULT_SYSTEM_PROMPT, Provider};

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
    scan: scan::ScanWorker,
    /// Stops the character watch when the streamer is dropped or stops.
    _watch: tokio_util::sync::DropGuard,
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
        series::register();
        let listener = bus::ops::bind(&config.listen, "STREAMER_LISTEN").await?;
        let client = config.bus.connect("streamer").await?;
        let js = async_nats::jetstream::new(client.clone());
        bus::streams::ensure_all(&js, config.bus.bus_replicas).await?;
        anyhow::ensure!(
            (1..=256).contains(&config.scan_concurrency),
            "SCAN_CONCURRENCY must be between 1 and 256"
        );
        let upstream = upstream::Upstream::build(&config)?;
        tracing::info!(llm = %bus::connect::redact(&config.llm_base_url), model = %config.llm_model, "Streamer configured.");
        let mut consumer = bus::streams::STREAMER_CHAT.config()?;
        if let Some(ms) = config.ack_wait_ms {
            consumer.ack_wait = Duration::from_millis(ms.max(500));
        }
        // One rules file for chat and scans; indexed once here.
        let grounding = Arc::new(grounding::Grounding::build(rules::Rules::load(
            config.scan_rules.as_deref(),
        )?));
        let worker = chat::Worker {
            grounding: grounding.clone(),
            client: client.clone(),
            js: js.clone(),
            upstream,
            system_prompt: config.system_prompt.clone(),
            max_tokens: config.max_tokens,
            lease: consumer.ack_wait,
            token_linger: Duration::from_millis(config.token_linger_ms),
            history: bus::history::HistoryClient::start(client.clone(), &js).await?,
            context: context::Contexts::open(&js).await?,
        };
        let catalogue = catalogue::Catalogue::load(config.scan_characters.as_deref())?;
        let characters = js
            .get_key_value(bus::streams::KV_CHARACTERS)
            .await
            .context("KV bucket characters is missing")?;
        catalogue.seed(&characters).await?;
        let watch = CancellationToken::new();
        let scan = scan::ScanWorker {
            characters: catalogue::MatchCache::start(characters, watch.clone()),
            owners: js
                .get_key_value(bus::streams::KV_CHARACTER_OWNERS)
                .await
                .context("KV bucket character_owners is missing")?,
            client: client.clone(),
            js: js.clone(),
            images: js
                .get_object_store(bus::streams::OBJ_SCAN_IMAGES)
                .await
                .context("object store scan_images is missing")?,
            cache: js
                .get_key_value(bus::streams::KV_SCAN_CACHE)
                .await
                .context("KV bucket scan_cache is missing")?,
            vision: build_vision(&config)?,
            upstream: worker.upstream.clone(),
            grounding,
            settings: Arc::new(scan::Settings {
                vision_soft: Duration::from_millis(config.vision_soft_timeout_ms),
                vision_hard: Duration::from_millis(config.vision_hard_timeout_ms),
                answer_soft: Duration::from_millis(config.answer_soft_timeout_ms),
                answer_hard: Duration::from_millis(config.answer_hard_timeout_ms),
                max_attempts: config.scan_max_attempts.max(1),
                retry_base: Duration::from_millis(config.scan_retry_base_ms),
                max_tokens: config.max_tokens,
                reward_soft: Duration::from_millis(config.reward_soft_timeout_ms),
                reward_hard: Duration::from_millis(config.reward_hard_timeout_ms),
                progress_every: config
                    .ack_wait_ms
                    .map(|ms| Duration::from_millis(ms.max(500)))
                    .unwrap_or(bus::streams::STREAMER_SCAN.config()?.ack_wait)
                    / 3,
            }),
        };
        tracing::info!(vision = %scan.vision.name(), "Scan pipeline configured.");
        Ok(Self {
            config,
            consumer,
            listener,
            client,
            js,
            worker,
            scan,
            _watch: watch.drop_guard(),
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
        let ready = bus::ops::ReadyState::start(
            bus::ops::nats_ready(self.client.clone(), self.js.clone()),
            bus::ops::READY_REFRESH,
            shutdown.clone(),
        )
        .await;
        let ops = tokio::spawn(bus::ops::serve(self.listener, ready, shutdown.clone()));
        // The backlog of each request stream, for alerts on work piling up
        // (the task ends with `shutdown`).
        bus::ops::watch_consumers(
            self.js.clone(),
            &[
                bus::streams::STREAMER_CHAT,
                bus::streams::STREAMER_SCAN,
                bus::streams::STREAMER_EXHAUSTED,
                bus::streams::STREAMER_DLQ_SCAN,
            ],
            "streamer_consumer_pending",
            "streamer_consumer_ack_pending",
            bus::ops::CONSUMER_REFRESH,
            shutdown.clone(),
        );

        tokio::spawn(erase::serve(
            self.client.clone(),
            self.js.clone(),
            shutdown.clone(),
        ));
        let tracker = TaskTracker::new();
        let chat = bus::streams::STREAMER_CHAT
            .ensure_with(&self.js, self.consumer.clone())
            .await?;
        let worker = self.worker.clone();
        let chat = consume(
            chat,
            "chat requests",
            self.config.concurrency,
            tracker.clone(),
            shutdown.clone(),
            move |message| {
                let worker = worker.clone();
                async move { worker.handle(message).await }
            },
        );
        let mut scan_consumer = bus::streams::STREAMER_SCAN.config()?;
        if let Some(ms) = self.config.ack_wait_ms {
            scan_consumer.ack_wait = Duration::from_millis(ms.max(500));
        }
        let scans = bus::streams::STREAMER_SCAN
            .ensure_with(&self.js, scan_consumer)
            .await?;
        let scan = self.scan.clone();
        let scans = consume(
            scans,
            "scan jobs",
            self.config.scan_concurrency,
            tracker.clone(),
            shutdown.clone(),
            move |message| {
                let scan = scan.clone();
                async move { scan.handle(message).await }
            },
        );
        let exhausted = bus::streams::STREAMER_EXHAUSTED.ensure(&self.js).await?;
        let (worker, scan) = (self.worker.clone(), self.scan.clone());
        let exhausted = consume(
            exhausted,
            "exhausted work",
            4,
            tracker.clone(),
            shutdown.clone(),
            move |message| {
                let (worker, scan) = (worker.clone(), scan.clone());
                async move { exhausted::handle(&worker, &scan, message).await }
            },
        );
        let reprocess = reprocess_periodically(
            self.js.clone(),
            Duration::from_secs(self.config.dlq_reprocess_every_s),
            shutdown.clone(),
        );
        tokio::try_join!(chat, scans, exhausted, async {
            reprocess.await;
            Ok(())
        })?;
        tracker.close();
        if tokio::time::timeout(bus::shutdown::DRAIN, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = tracker.len(),
                "Drain timed out; unfinished turns and scans will be redelivered to another worker."
            );
        }
        let _ = self.client.flush().await;
        let _ = ops.await;
        tracing::info!(status = %json!("stopped"), "Streamer stopped.");
        Ok(())
    }
}

fn build_vision(config: &Config) -> anyhow::Result<Arc<dyn vision::Vision>> {
    Ok(match &config.vision_base_url {
        Some(url) => Arc::new(vision::openai::OpenAiVision::new(
            url,
            &config.vision_model,
            vision_api_key(config, url),
            config.vision_threshold,
            config.connect_timeout(),
        )?),
        None => {
            let path = config.local_model_path();
            Arc::new(
                vision::local::LocalVision::load(&path, config.vision_threshold).with_context(
                    || {
                        format!(
                            "cannot load the local image model from {} (run scripts/setup.sh, set VISION_LOCAL_MODEL, or set VISION_BASE_URL)",
                            path.display()
                        )
                    },
                )?,
            )
        }
    })
}

/// The key sent to `vision_url`: `VISION_API_KEY`, else `LLM_API_KEY` only
/// when the vision host is the LLM's own (same scheme, host and port). A
/// key goes only to the host it was configured for, never to a third party.
fn vision_api_key(config: &Config, vision_url: &str) -> Option<secrecy::SecretString> {
    let origin = |url: &str| {
        let url = reqwest::Url::parse(url).ok()?;
        Some((
            url.scheme().to_owned(),
            url.host_str()?.to_ascii_lowercase(),
            url.port_or_known_default(),
        ))
    };
    let same_host = origin(vision_url).is_some_and(|o| Some(o) == origin(&config.llm_base_url));
    config
        .vision_api_key
        .clone()
        .or_else(|| config.llm_api_key.clone().filter(|_| same_host))
}

/// Pulls from `consumer` and runs `handle` on each message, at most
/// `concurrency` at once, until `shutdown` fires.
async fn consume<F, Fut>(
    consumer: async_nats::jetstream::consumer::Consumer<
        async_nats::jetstream::consumer::pull::Config,
    >,
    what: &'static str,
    concurrency: usize,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    handle: F,
) -> anyhow::Result<()>
where
    F: Fn(async_nats::jetstream::Message) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(concurrency)
        .messages()
        .await
        .with_context(|| format!("cannot start consuming {what}"))?;
    let permits = Arc::new(Semaphore::new(concurrency));
    tracing::info!(concurrency, "Streamer consuming {what}.");
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
                let work = handle(message);
                tracker.spawn(async move {
                    work.await;
                    drop(permit);
                });
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "Pulling {what} failed; retrying.");
            }
            None => break,
        }
    }
    Ok(())
}

/// Runs a DLQ reprocess pass every `every` (never when zero), like the
/// seeds' five-minute job: at most ten scans a pass.
async fn reprocess_periodically(
    js: async_nats::jetstream::Context,
    every: Duration,
    shutdown: CancellationToken,
) {
    if every.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match scan::reprocess_dead_letters(&js, 10).await {
            Ok(report) if report.requeued.is_empty() && report.archived.is_empty() => {}
            Ok(report) => tracing::info!(
                requeued = report.requeued.len(),
                archived = report.archived.len(),
                "Reprocessed failed scans from the DLQ."
            ),
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "DLQ reprocess pass failed.")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use secrecy::ExposeSecret as _;

    use super::*;

    fn key(args: &[&str], vision_url: &str) -> Option<String> {
        let mut all = vec!["streamer"];
        all.extend_from_slice(args);
        vision_api_key(&Config::parse_from(all), vision_url).map(|k| k.expose_secret().to_owned())
    }

    #[test]
    fn the_llm_key_goes_to_the_vision_host_only_when_it_is_the_llm_host() {
        let llm = [
            "--llm-base-url",
            "https://api.openai.com/v1",
            "--llm-api-key",
            "sk-llm",
        ];
        assert_eq!(
            key(&llm, "https://api.openai.com/v1").as_deref(),
            Some("sk-llm")
        );
        assert_eq!(
            key(&llm, "https://API.openai.com:443/v2").as_deref(),
            Some("sk-llm")
        );
        for elsewhere in [
            "https://vision.example.com/v1",
            "http://api.openai.com/v1",
            "https://api.openai.com:8443/v1",
            "not a url",
        ] {
            assert_eq!(key(&llm, elsewhere), None, "{elsewhere}");
        }
        let mut own = llm.to_vec();
        own.extend(["--vision-api-key", "sk-vision"]);
        assert_eq!(
            key(&own, "https://vision.example.com/v1").as_deref(),
            Some("sk-vision")
        );
    }
}
