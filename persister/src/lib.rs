//! The persister: every completed turn and scan ends up in Postgres exactly once.
//!
//! It owns the durable consumer on completed turns (`chat.done.>`,
//! [`ingest`]), the local SQLite buffer in WAL mode that each turn is
//! committed to before it is acked ([`wal`]), the copy of that buffer into
//! Postgres with retries ([`sync`]), and the Postgres schema and its
//! migrations (`persister/migrations`). SQLite is fast, local and durable;
//! Postgres is the system of record and may be down for minutes without a
//! turn being lost or the persister refusing work. It also answers history
//! requests from both stores ([`history`]). It leaves producing the records
//! to the streamer and ownership checks for clients to the gateway.
//! Completed scans (`scan.done.>`) are drained the same way, into a `scans`
//! table where a later record of the same scan replaces an earlier one.
//! Character grants (`reward.grant.>`) go straight to Postgres in batches
//! ([`rewards`]), which also answers `history.characters`. The data
//! lifecycle: old Postgres rows lose their user id ([`retention`]), and a
//! user's erasure (`DELETE /v1/me`) reaches SQLite and Postgres ([`erase`]).

pub mod admin;
pub mod config;
pub mod erase;
pub mod error;
pub mod history;
pub mod ingest;
pub mod retention;
pub mod rewards;
mod series;
pub mod sync;
pub mod wal;

use std::{marker::PhantomData, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use wal::Wal;

/// How long a readiness probe waits for the SQLite thread.
const READY_SQLITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the persister until `shutdown` fires.
///
/// # Errors
/// When startup fails (SQLite unusable, NATS unreachable, bad `DATABASE_URL`,
/// port in use) or a loop stops unexpectedly.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    Persister::build(config).await?.run(shutdown).await
}

/// A persister that has bound its port, opened SQLite and connected, ready
/// to [`Persister::run`].
pub struct Persister {
    config: Config,
    /// The ops listener; moved into the server by `run`.
    listener: tokio::net::TcpListener,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    consumer: async_nats::jetstream::consumer::PullConsumer,
    max_deliver: i64,
    scan_consumer: async_nats::jetstream::consumer::PullConsumer,
    scan_max_deliver: i64,
    reward_consumer: async_nats::jetstream::consumer::PullConsumer,
    erase_consumer: async_nats::jetstream::consumer::PullConsumer,
    /// The buffer; ingest, sync and readiness each hold a clone.
    wal: Wal,
    postgres: sync::Postgres,
    /// The erasure register bucket, its copy (ingest and the grant writer
    /// hold clones) and the watch that keeps the copy current.
    erasures: async_nats::jetstream::kv::Store,
    register: bus::register::Register,
    register_updates: async_nats::jetstream::kv::Watch,
}

impl Persister {
    /// Binds the ops listener, opens the SQLite buffer, connects to Postgres
    /// (running its migrations) and to NATS, and creates the streams and the
    /// durable consumer.
    ///
    /// # Errors
    /// An actionable message for each startup failure. Postgres being
    /// unreachable is not one: the persister starts degraded (see [`sync`]).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        series::register();
        let listener = bus::ops::bind(&config.listen, "PERSISTER_LISTEN").await?;
        let wal = Wal::open(&config.sqlite_path).await?;
        let postgres = sync::Postgres::connect(&config.database_url).await?;
        let client = config.bus.connect("persister").await?;
        let js = async_nats::jetstream::new(client.clone());
        bus::streams::ensure_all(&js, config.bus.bus_replicas).await?;
        let consumer = bus::streams::PERSISTER_TURNS.ensure(&js).await?;
        let max_deliver = bus::streams::PERSISTER_TURNS.config()?.max_deliver;
        let scan_consumer = bus::streams::PERSISTER_SCANS.ensure(&js).await?;
        let scan_max_deliver = bus::streams::PERSISTER_SCANS.config()?.max_deliver;
        let reward_consumer = bus::streams::PERSISTER_REWARDS.ensure(&js).await?;
        let erase_consumer = bus::streams::PERSISTER_ERASE.ensure(&js).await?;
        let erasures = bus::register::open(&js).await?;
        let (register, register_updates) = bus::register::Register::load(&erasures).await?;
        // Before anything can sync: the rows of erasures this persister
        // missed (it was not running) go now, or they would reach Postgres.
        erase::apply_register(&wal, register.marks())
            .await
            .context("cannot apply the erasure register to the SQLite buffer")?;
        if config.anon_key.is_none() {
            tracing::warn!(
                "PERSISTER_ANON_KEY is unset: Postgres rows keep their user ids past the retention."
            );
        }
        tracing::info!(sqlite = %config.sqlite_path.display(), "Persister configured.");
        Ok(Self {
            config,
            listener,
            client,
            js,
            consumer,
            max_deliver,
            scan_consumer,
            scan_max_deliver,
            reward_consumer,
            erase_consumer,
            wal,
            postgres,
            erasures,
            register,
            register_updates,
        })
    }

    /// The address of the health/metrics listener.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle on the SQLite buffer (shares the one connection thread).
    pub fn wal(&self) -> Wal {
        self.wal.clone()
    }

    /// Ingests and syncs until `shutdown` fires, then stops fetching, finishes
    /// and acks the batch in hand (bounded by [`bus::shutdown::DRAIN`]) and returns.
    ///
    /// # Errors
    /// When the ingest or sync loop stops before `shutdown` (a bug: a panic).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ready = bus::ops::ReadyState::start(
            readiness(
                self.client.clone(),
                self.js.clone(),
                self.wal.clone(),
                self.postgres.status.clone(),
            ),
            bus::ops::READY_REFRESH,
            shutdown.clone(),
        )
        .await;
        let ops = tokio::spawn(bus::ops::serve(self.listener, ready, shutdown.clone()));
        // The backlog of each stream it drains, for alerts on records piling
        // up before SQLite (the task ends with `shutdown`).
        bus::ops::watch_consumers(
            self.js.clone(),
            &[
                bus::streams::PERSISTER_TURNS,
                bus::streams::PERSISTER_SCANS,
                bus::streams::PERSISTER_REWARDS,
            ],
            "persister_consumer_pending",
            "persister_consumer_ack_pending",
            bus::ops::CONSUMER_REFRESH,
            shutdown.clone(),
        );

        // Internal token: a loop that dies stops the other one too.
        let stop = shutdown.child_token();
        let committed = Arc::new(Notify::new());
        let syncer = sync::Syncer {
            wal: self.wal.clone(),
            postgres: self.postgres,
            batch: self.config.sync_batch,
            interval: self.config.sync_interval(),
            retention: self.config.retention(),
            committed: committed.clone(),
        };
        let ingest = ingest::Ingest::<bus::wire::TurnRecord> {
            js: self.js.clone(),
            wal: self.wal.clone(),
            batch_size: self.config.batch_size,
            max_deliver: self.max_deliver,
            committed: committed.clone(),
            register: self.register.clone(),
            kind: PhantomData,
        };
        let scan_ingest = ingest::Ingest::<bus::wire::ScanRecord> {
            js: self.js.clone(),
            wal: self.wal,
            batch_size: self.config.batch_size,
            max_deliver: self.scan_max_deliver,
            committed,
            register: self.register.clone(),
            kind: PhantomData,
        };
        let syncer_pool = syncer.postgres.pool.clone();
        let history = history::History {
            client: self.client.clone(),
            wal: ingest.wal.clone(),
            pool: syncer.postgres.pool.clone(),
            status: syncer.postgres.status.clone(),
        };
        // Sync starts at once: rows a previous run left unsynced go first.
        let mut sync_task = tokio::spawn(syncer.run(stop.clone()));
        let mut history_task = tokio::spawn(history.run(stop.clone()));
        let rewards = rewards::RewardWriter {
            js: self.js.clone(),
            pool: syncer_pool.clone(),
            batch_size: self.config.reward_batch,
            flush_after: self.config.reward_flush(),
            register: self.register.clone(),
        };
        let mut rewards_task = tokio::spawn(rewards.run(self.reward_consumer, stop.clone()));
        let mut collection_task = tokio::spawn(rewards::collection::run(
            self.client.clone(),
            syncer_pool.clone(),
            stop.clone(),
        ));
        let swept = erase::Swept::default();
        let mut erase_local_task = tokio::spawn(erase::serve_local(
            self.client.clone(),
            ingest.wal.clone(),
            swept.clone(),
            stop.clone(),
        ));
        let eraser = erase::PostgresEraser {
            client: self.client.clone(),
            pool: syncer_pool.clone(),
        };
        let mut erase_pg_task = tokio::spawn(eraser.run(self.erase_consumer, stop.clone()));
        let mut register_task = tokio::spawn(erase::follow_register(
            ingest.wal.clone(),
            swept,
            self.erasures,
            self.register,
            self.register_updates,
            stop.clone(),
        ));
        let retention_task = self.config.anon_key.clone().map(|key| {
            let retention = retention::Retention {
                pool: syncer_pool.clone(),
                key,
                keep: self.config.pg_retention(),
                every: self.config.pg_retention_interval(),
            };
            tokio::spawn(retention.run(stop.clone()))
        });
        let heartbeat_task = tokio::spawn(history::heartbeat(
            self.js.clone(),
            self.config.bus.bus_replicas,
            stop.clone(),
        ));
        let mut ingest_task = tokio::spawn(ingest.run(self.consumer, stop.clone()));
        let mut scan_ingest_task = tokio::spawn(scan_ingest.run(self.scan_consumer, stop.clone()));
        tracing::info!("Persister consuming completed turns and scans.");

        let failure = tokio::select! {
            _ = stop.cancelled() => None,
            result = &mut ingest_task => Some(format!("the ingest loop stopped unexpectedly: {result:?}")),
            result = &mut scan_ingest_task => Some(format!("the scan ingest loop stopped unexpectedly: {result:?}")),
            result = &mut sync_task => Some(format!("the sync loop stopped unexpectedly: {result:?}")),
            result = &mut history_task => Some(format!("the history responder stopped unexpectedly: {result:?}")),
            result = &mut rewards_task => Some(format!("the grant writer stopped unexpectedly: {result:?}")),
            result = &mut collection_task => Some(format!("the characters responder stopped unexpectedly: {result:?}")),
            result = &mut erase_local_task => Some(format!("the erase.local responder stopped unexpectedly: {result:?}")),
            result = &mut erase_pg_task => Some(format!("the Postgres eraser stopped unexpectedly: {result:?}")),
            result = &mut register_task => Some(format!("the erasure register follower stopped unexpectedly: {result:?}")),
        };
        stop.cancel();
        let drained = tokio::time::timeout(bus::shutdown::DRAIN, async {
            if !ingest_task.is_finished() {
                let _ = (&mut ingest_task).await;
            }
            if !scan_ingest_task.is_finished() {
                let _ = (&mut scan_ingest_task).await;
            }
            if !sync_task.is_finished() {
                let _ = (&mut sync_task).await;
            }
            if !history_task.is_finished() {
                let _ = (&mut history_task).await;
            }
            if !rewards_task.is_finished() {
                let _ = (&mut rewards_task).await;
            }
            if !collection_task.is_finished() {
                let _ = (&mut collection_task).await;
            }
            if !erase_local_task.is_finished() {
                let _ = (&mut erase_local_task).await;
            }
            if !erase_pg_task.is_finished() {
                let _ = (&mut erase_pg_task).await;
            }
            if !register_task.is_finished() {
                let _ = (&mut register_task).await;
            }
            if let Some(task) = retention_task {
                let _ = task.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("Drain timed out; unacked records will be redelivered.");
            ingest_task.abort();
            scan_ingest_task.abort();
            sync_task.abort();
            history_task.abort();
            rewards_task.abort();
            collection_task.abort();
            erase_local_task.abort();
            erase_pg_task.abort();
            register_task.abort();
        }
        // Withdraw from the persisters bucket so askers stop waiting for us.
        let _ = tokio::time::timeout(Duration::from_secs(2), heartbeat_task).await;
        let _ = self.client.flush().await;
        if let Some(failure) = failure {
            anyhow::bail!(failure);
        }
        let _ = ops.await;
        tracing::info!(status = %json!("stopped"), "Persister stopped.");
        Ok(())
    }
}

/// Ready when NATS is connected with every stream present and SQLite
/// answers and takes writes; `degraded` (still ready) while Postgres is
/// unreachable, because turns are still safely accepted.
fn readiness(
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    wal: Wal,
    postgres: Arc<sync::SyncStatus>,
) -> bus::ops::ReadyFn {
    Arc::new(move || {
        let (client, js, wal, postgres) =
            (client.clone(), js.clone(), wal.clone(), postgres.clone());
        Box::pin(async move {
            let mut checks = serde_json::Map::new();
            let nats_ok = bus::ops::nats_checks(&client, &js, &mut checks).await;
            let sqlite_ok = match tokio::time::timeout(READY_SQLITE_TIMEOUT, wal.backlog()).await {
                Ok(Ok(backlog)) => {
                    checks.insert("pending_sync".into(), json!(backlog.pending));
                    if backlog.rejected > 0 {
                        checks.insert("rejected_sync".into(), json!(backlog.rejected));
                    }
                    match wal.write_error() {
                        None => {
                            checks.insert("sqlite".into(), json!("open"));
                            true
                        }
                        Some(error) => {
                            checks.insert("sqlite".into(), json!(format!("write failed: {error}")));
                            false
                        }
                    }
                }
                Ok(Err(error)) => {
                    checks.insert("sqlite".into(), json!(format!("error: {error}")));
                    false
                }
                Err(_) => {
                    checks.insert("sqlite".into(), json!("not answering"));
                    false
                }
            };
            let postgres_ok = postgres.reachable();
            checks.insert(
                "postgres".into(),
                json!(if postgres_ok {
                    "connected"
                } else {
                    "unreachable"
                }),
            );
            let ready = nats_ok && sqlite_ok;
            bus::ops::Readiness {
                ready,
                status: match (ready, postgres_ok) {
                    (false, _) => "unavailable",
                    (true, false) => "degraded",
                    (true, true) => "ok",
                },
                checks,
            }
        })
    })
}
