//! Erasing a user (`DELETE /v1/me`) from what the persister holds.
//!
//! Two parts, in this order (the gateway drives it):
//! 1. `erase.local`: every persister deletes the user's rows from its own
//!    SQLite file and leaves a tombstone ([`Wal::erase_user`]), holding the
//!    sync lock so no row it read for Postgres lands there afterwards.
//! 2. `erase.pg.<user key>` on the `ERASE` work queue: one persister (the
//!    shared durable consumer `persister-erase`) deletes the user's rows from
//!    every Postgres table that holds a user id, writes an audit row to
//!    `erasures`, acks, and reports the counts on `erase.done.<erase id>`.
//!    While Postgres is down the message is handed back with a growing delay
//!    and erased when Postgres returns; the gateway answers `pending` meanwhile.
//!
//! The bus's own per-user data (KV buckets, the image store) is the
//! gateway's to erase.
//!
//! Before both, the gateway records the erasure in the register (KV bucket
//! `erasures`, [`bus::register`]). A persister applies the register to its
//! file at startup, before its sync loop starts ([`apply_register`]: a
//! persister that was not running during an erasure never syncs the user's
//! older rows), and then follows it ([`follow_register`]); its ingest and
//! its grant writer check it too.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use bus::wire::{EraseRequest, HistoryReply, PostgresErased, SqliteErased};
use futures::StreamExt as _;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::Wal;

/// Longest delay before a failed Postgres erasure is tried again.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);

/// Rows the register follower erased before the user's `erase.local`
/// arrived (user key -> counts): the register is written first, so the
/// follower often gets there first, and `erase.local` reports them too.
pub type Swept = Arc<Mutex<HashMap<String, SqliteErased>>>;

/// Answers `erase.local` until `shutdown` fires: erases the user from this
/// persister's SQLite file and replies with the counts (with what the
/// register follower already erased of theirs).
///
/// # Errors
/// When the subject cannot be subscribed to.
pub async fn serve_local(
    client: async_nats::Client,
    wal: Wal,
    swept: Swept,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // No queue group: every persister erases its own file.
    let mut requests = client.subscribe(bus::subject::ERASE_LOCAL).await?;
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = requests.next() => match next {
                Some(message) => message,
                None => return Ok(()),
            },
        };
        let Some(reply) = message.reply.clone() else {
            continue;
        };
        let answer = match serde_json::from_slice::<EraseRequest>(&message.payload) {
            Ok(request) => {
                let _sync = wal.sync_lock().await;
                match wal.erase_user(&request).await {
                    Ok(mut erased) => {
                        let key = bus::subject::user_key(&request.user_id);
                        if let Some(before) = lock(&swept).remove(&key) {
                            erased.turns += before.turns;
                            erased.scans += before.scans;
                        }
                        metrics::counter!("persister_erasures_total", "store" => "sqlite")
                            .increment(1);
                        tracing::info!(erase_id = %request.erase_id, turns = erased.turns, scans = erased.scans, "Erased a user from SQLite.");
                        serde_json::to_vec(&HistoryReply::Ok(erased))
                    }
                    Err(error) => {
                        tracing::error!(erase_id = %request.erase_id, %error, "Erasing a user from SQLite failed.");
                        serde_json::to_vec(&HistoryReply::<()>::error(
                            "unavailable",
                            error.to_string(),
                        ))
                    }
                }
            }
            Err(error) => {
                serde_json::to_vec(&HistoryReply::<()>::error("bad_request", error.to_string()))
            }
        };
        if let Ok(answer) = answer
            && let Err(error) = client.publish(reply, answer.into()).await
        {
            tracing::warn!(%error, "Answering erase.local failed.");
        }
    }
}

/// Erases from `wal` the rows every mark of `register` covers (see
/// [`Wal::erase_registered`]), holding the sync lock.
///
/// # Errors
/// When SQLite fails; nothing changed.
pub async fn apply_register(
    wal: &Wal,
    marks: HashMap<String, chrono::DateTime<chrono::Utc>>,
) -> Result<SqliteErased, crate::error::WalError> {
    let _sync = wal.sync_lock().await;
    let erased = wal.erase_registered(marks).await?;
    if erased.turns + erased.scans > 0 {
        metrics::counter!("persister_erasures_total", "store" => "register").increment(1);
        tracing::info!(
            turns = erased.turns,
            scans = erased.scans,
            "Erased rows of registered erasures from SQLite."
        );
    }
    Ok(erased)
}

/// Follows the erasure register until `shutdown` fires: keeps `register`
/// current for ingest and the grant writer, and erases each newly
/// registered user's older rows from `wal` (a live persister also gets
/// `erase.local`; this covers one that was starting meanwhile). A watch
/// that ends (NATS restarted) is opened again from every current mark;
/// marks already known change nothing.
pub async fn follow_register(
    wal: Wal,
    swept: Swept,
    kv: async_nats::jetstream::kv::Store,
    register: bus::register::Register,
    mut updates: async_nats::jetstream::kv::Watch,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let entry = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = updates.next() => next,
        };
        let entry = match entry {
            Some(Ok(entry)) => entry,
            Some(Err(error)) => {
                tracing::warn!(%error, "Reading the erasure register failed.");
                continue;
            }
            None => {
                tracing::warn!("The erasure register's watch ended; watching it again.");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if let Ok(again) = kv.watch_with_history(">").await {
                    updates = again;
                }
                continue;
            }
        };
        let Some((key, at)) = register.apply(&entry) else {
            continue;
        };
        let marks = HashMap::from([(key.clone(), at)]);
        let mut attempt = 0;
        // A failure here leaves rows a sync could copy: keep trying.
        loop {
            // Counted under the sync lock, so erase.local (which takes it)
            // finds the counts or does the erasing itself.
            let sync = wal.sync_lock().await;
            let error = match wal.erase_registered(marks.clone()).await {
                Ok(erased) => {
                    if erased.turns + erased.scans > 0 {
                        metrics::counter!("persister_erasures_total", "store" => "register")
                            .increment(1);
                        tracing::info!(
                            turns = erased.turns,
                            scans = erased.scans,
                            "Erased a registered user's rows from SQLite."
                        );
                        let mut swept = lock(&swept);
                        let total = swept.entry(key.clone()).or_default();
                        total.turns += erased.turns;
                        total.scans += erased.scans;
                    }
                    break;
                }
                Err(error) => error,
            };
            drop(sync);
            tracing::error!(%error, "Applying an erasure to SQLite failed; retrying.");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(bus::backoff::delay(Duration::from_millis(250), attempt, MAX_RETRY_DELAY)) => {}
            }
            attempt += 1;
        }
    }
}

fn lock(swept: &Swept) -> std::sync::MutexGuard<'_, HashMap<String, SqliteErased>> {
    swept.lock().unwrap_or_else(|e| e.into_inner())
}

/// The Postgres eraser; `run` owns the consumer.
pub struct PostgresEraser {
    /// For the `erase.done.<erase id>` reports.
    pub client: async_nats::Client,
    /// The system of record.
    pub pool: PgPool,
}

impl PostgresEraser {
    /// Erases queued users from Postgres until `shutdown` fires.
    ///
    /// # Errors
    /// When the consumer cannot be read from at all.
    pub async fn run(
        self,
        consumer: PullConsumer,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(1)
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("cannot consume erasures: {e}"))?;
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                next = messages.next() => match next {
                    None => return Ok(()),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "Pulling erasures failed; retrying.");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    Some(Ok(message)) => message,
                },
            };
            self.handle(message).await;
        }
    }

    async fn handle(&self, message: jetstream::Message) {
        let request = match serde_json::from_slice::<EraseRequest>(&message.payload) {
            Ok(request) => request,
            Err(error) => {
                // Nothing to erase can be read from it; keeping it would
                // block no one (each message stands alone), but retrying is futile.
                tracing::error!(%error, subject = %message.subject, "An erasure is not JSON; dropped.");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        match erase_postgres(&self.pool, &request).await {
            Ok(erased) => {
                // Ack first: the work is done even if nobody hears about it.
                if let Err(error) = message.double_ack().await {
                    tracing::warn!(erase_id = %request.erase_id, %error, "Acking an erasure failed; it will be erased again (harmless).");
                }
                metrics::counter!("persister_erasures_total", "store" => "postgres").increment(1);
                tracing::info!(erase_id = %request.erase_id, ?erased, "Erased a user from Postgres.");
                if let Ok(subject) = bus::subject::erase_done(&request.erase_id)
                    && let Ok(body) = serde_json::to_vec(&erased)
                {
                    let _ = self.client.publish(subject, body.into()).await;
                }
            }
            Err(error) => {
                let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
                let delay = retry_delay(delivered);
                if delivered <= 1 {
                    tracing::warn!(erase_id = %request.erase_id, %error, "Erasing a user from Postgres failed; retrying until it succeeds.");
                } else {
                    tracing::debug!(erase_id = %request.erase_id, %error, delivered, "Erasing a user from Postgres failed again.");
                }
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            }
        }
    }
}

/// 250 ms doubling per delivery, at most [`MAX_RETRY_DELAY`].
fn retry_delay(delivered: i64) -> Duration {
    let doublings = u32::try_from(delivered.clamp(1, 16) - 1).unwrap_or(0);
    (Duration::from_millis(250) * 2u32.pow(doublings)).min(MAX_RETRY_DELAY)
}

/// Deletes every row of `request.user_id` from the tables that hold a user
/// id, and records the erasure in `erasures`, in one transaction. Idempotent:
/// a second run deletes nothing and keeps the first audit row.
///
/// # Errors
/// When Postgres fails; nothing was deleted.
pub async fn erase_postgres(
    pool: &PgPool,
    request: &EraseRequest,
) -> Result<PostgresErased, sqlx::Error> {
    let user = request.user_id.as_str();
    let mut tx = pool.begin().await?;
    // Turns first (they reference conversations), also turns of the user's
    // conversations whose user id retention already replaced with a hash.
    let turns = sqlx::query(
        "DELETE FROM turns WHERE user_id = $1
            OR conversation_id IN (SELECT conversation_id FROM conversations WHERE user_id = $1)",
    )
    .bind(user)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let mut erased = PostgresErased {
        turns,
        ..PostgresErased::default()
    };
    for (table, count) in [
        ("conversations", &mut erased.conversations),
        ("scans", &mut erased.scans),
        ("reward_grants", &mut erased.reward_grants),
        ("character_ownership", &mut erased.character_ownership),
        ("my_characters", &mut erased.my_characters),
    ] {
        *count = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE user_id = $1"
        )))
        .bind(user)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    sqlx::query(
        "INSERT INTO erasures (erase_id, requested_at, rows) VALUES ($1, $2, $3)
         ON CONFLICT (erase_id) DO NOTHING",
    )
    .bind(&request.erase_id)
    .bind(request.requested_at)
    .bind(serde_json::to_value(erased).unwrap_or_default())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(erased)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_is_capped() {
        assert_eq!(retry_delay(1), Duration::from_millis(250));
        assert_eq!(retry_delay(2), Duration::from_millis(500));
        assert_eq!(retry_delay(100), MAX_RETRY_DELAY);
    }
}
