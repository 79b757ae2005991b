//! Character grants into Postgres: the durable consumer `persister-rewards`
//! on `reward.grant.>`, written in batches of at most
//! `PERSISTER_REWARD_BATCH` grants (50) or after `PERSISTER_REWARD_FLUSH_MS`
//! (5 s) from a batch's first grant, whichever comes first, as the seeds'
//! `character.save_ownership` and `my.save_character`.
//!
//! A batch is one Postgres statement and one commit, and only after that
//! commit is each of its messages acked. Grants skip SQLite: unlike a turn,
//! nothing reads a grant before Postgres has it, and JetStream already
//! holds it durably; during a Postgres outage the batch in hand is retried
//! with backoff (kept alive with progress acks) and the rest wait in the
//! `REWARDS` stream, so nothing is lost and everything catches up. The
//! statement is idempotent (`ON CONFLICT` on the grant's scan id), so a
//! grant delivered twice counts once. A grant that cannot be decoded, or
//! that Postgres refuses for good (a data or constraint error: the batch is
//! split to find it), goes to `dlq.rewards` and is terminated.
//!
//! A grant of a user in the erasure register (KV bucket `erasures`) granted
//! up to their erasure is acked and dropped before each commit attempt:
//! it may have waited in `REWARDS` (or in a batch held through a Postgres
//! outage) while the user was erased, and writing it afterwards would bring
//! their rewards back.
//!
//! It also answers `history.characters` ([`collection`]).

pub mod collection;

use std::{collections::HashSet, time::Duration};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use bus::wire::{RewardGrant, valid_character_id};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The batched grant writer; `run` owns the consumer.
pub struct RewardWriter {
    /// For dead letters.
    pub js: jetstream::Context,
    /// The system of record.
    pub pool: PgPool,
    /// Most grants in one commit.
    pub batch_size: usize,
    /// Longest a grant waits for its batch to fill.
    pub flush_after: Duration,
    /// The erasure register, kept current by the persister's follower.
    pub register: bus::register::Register,
}

/// A decoded message waiting for its batch's commit.
struct Pending {
    message: jetstream::Message,
    grant: RewardGrant,
}

/// Why a batch was written.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Size,
    Time,
    Shutdown,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Size => "size",
            Self::Time => "time",
            Self::Shutdown => "shutdown",
        }
    }
}

/// How often grants held through an outage are kept from redelivery.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Longest wait between two commit attempts while Postgres fails.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl RewardWriter {
    /// Writes grants until `shutdown` fires; the batch in hand is written
    /// (if Postgres answers) before it returns.
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
            .max_messages_per_batch(self.batch_size.max(1))
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("cannot consume grants: {e}"))?;
        tracing::info!(
            batch = self.batch_size,
            flush_ms = self.flush_after.as_millis() as u64,
            "Persister writing character grants."
        );
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                next = messages.next() => next,
            };
            let mut batch = Vec::with_capacity(self.batch_size);
            match first {
                None => return Ok(()),
                Some(Err(error)) => {
                    tracing::warn!(%error, "Pulling grants failed; retrying.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Some(Ok(message)) => self.take(message, &mut batch).await,
            }
            let deadline = Instant::now() + self.flush_after;
            let mut trigger = Trigger::Size;
            while batch.len() < self.batch_size {
                tokio::select! {
                    _ = shutdown.cancelled() => { trigger = Trigger::Shutdown; break; }
                    _ = tokio::time::sleep_until(deadline) => { trigger = Trigger::Time; break; }
                    next = messages.next() => match next {
                        Some(Ok(message)) => self.take(message, &mut batch).await,
                        Some(Err(error)) => tracing::warn!(%error, "Pulling grants failed; retrying."),
                        None => { trigger = Trigger::Shutdown; break; }
                    },
                }
            }
            if batch.is_empty() {
                continue;
            }
            metrics::counter!("persister_reward_batches_total", "trigger" => trigger.as_str())
                .increment(1);
            self.commit(batch, &shutdown).await;
        }
    }

    /// Decodes `message` into the batch, or dead-letters it.
    async fn take(&self, message: jetstream::Message, batch: &mut Vec<Pending>) {
        match decode(&message.payload) {
            Ok(grant) => batch.push(Pending { message, grant }),
            Err(reason) => {
                metrics::counter!("persister_reward_dead_letters_total", "reason" => "undecodable")
                    .increment(1);
                bus::dlq::terminate(&self.js, bus::subject::DLQ_REWARDS, &message, &reason).await;
            }
        }
    }

    /// Writes `batch` and acks it; retries while Postgres is unreachable,
    /// splits it to find a grant Postgres refuses for good.
    async fn commit(&self, mut batch: Vec<Pending>, shutdown: &CancellationToken) {
        let mut attempt = 0;
        let mut kept_alive = Instant::now();
        loop {
            // Each attempt: the user may have been erased while it waited.
            batch = self.drop_erased(batch).await;
            if batch.is_empty() {
                return;
            }
            let started = Instant::now();
            let grants: Vec<&RewardGrant> = batch.iter().map(|p| &p.grant).collect();
            match write(&self.pool, &grants).await {
                Ok(stored) => {
                    metrics::histogram!("persister_reward_commit_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!("persister_reward_grants_total", "outcome" => "stored")
                        .increment(stored as u64);
                    metrics::counter!("persister_reward_grants_total", "outcome" => "duplicate")
                        .increment((batch.len() - stored) as u64);
                    tracing::debug!(grants = batch.len(), stored, "Grants committed.");
                    for pending in &batch {
                        if let Err(error) = pending.message.ack().await {
                            tracing::debug!(%error, "Ack of a committed grant failed; its redelivery changes nothing.");
                        }
                    }
                    return;
                }
                Err(error) if refused_for_good(&error) => {
                    if batch.len() == 1 {
                        let pending = &batch[0];
                        metrics::counter!("persister_reward_dead_letters_total", "reason" => "refused")
                            .increment(1);
                        let reason = format!("Postgres refused the grant: {error}");
                        bus::dlq::terminate(
                            &self.js,
                            bus::subject::DLQ_REWARDS,
                            &pending.message,
                            &reason,
                        )
                        .await;
                        return;
                    }
                    tracing::warn!(%error, grants = batch.len(), "Postgres refused a batch of grants; writing them one by one.");
                    for pending in batch {
                        Box::pin(self.commit(vec![pending], shutdown)).await;
                    }
                    return;
                }
                Err(error) => {
                    metrics::counter!("persister_reward_commit_failures_total").increment(1);
                    tracing::warn!(%error, grants = batch.len(), attempt, "Writing grants to Postgres failed; retrying.");
                    if shutdown.is_cancelled() {
                        // Unacked, they are redelivered to whoever runs next.
                        return;
                    }
                    if kept_alive.elapsed() >= KEEP_ALIVE {
                        for pending in &batch {
                            let _ = pending.message.ack_with(AckKind::Progress).await;
                        }
                        kept_alive = Instant::now();
                    }
                    let delay =
                        bus::backoff::delay(Duration::from_millis(200), attempt, MAX_BACKOFF);
                    attempt += 1;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

impl RewardWriter {
    /// Acks and drops the grants of `batch` whose user was erased at or
    /// after the grant; the rest.
    async fn drop_erased(&self, batch: Vec<Pending>) -> Vec<Pending> {
        let (erased, kept): (Vec<Pending>, Vec<Pending>) = batch.into_iter().partition(|p| {
            self.register
                .erased_since(&p.grant.user_id, p.grant.granted_at)
        });
        if erased.is_empty() {
            return kept;
        }
        metrics::counter!("persister_reward_grants_total", "outcome" => "erased")
            .increment(erased.len() as u64);
        tracing::info!(grants = erased.len(), "Dropped grants of erased users.");
        for pending in &erased {
            if let Err(error) = pending.message.ack().await {
                tracing::debug!(%error, "Ack of a dropped grant failed; its redelivery is dropped again.");
            }
        }
        kept
    }
}

/// A grant, checked: the scan id is a subject token, the user id is not
/// empty, the character id is a catalogue id.
fn decode(payload: &[u8]) -> Result<RewardGrant, String> {
    let grant: RewardGrant =
        serde_json::from_slice(payload).map_err(|e| format!("undecodable grant: {e}"))?;
    if bus::subject::token(&grant.scan_id).is_err() {
        return Err("grant with an invalid scan_id".into());
    }
    if grant.user_id.is_empty() {
        return Err("grant with an empty user_id".into());
    }
    if !valid_character_id(&grant.character_id) {
        return Err("grant with an invalid character_id".into());
    }
    Ok(grant)
}

/// True for Postgres errors that retrying cannot fix: data exceptions
/// (class 22, such as a NUL byte in a text) and constraint violations
/// (class 23). A missing table (the migrations have not run yet because
/// Postgres was down at startup) and connection trouble are not.
fn refused_for_good(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
        _ => false,
    }
}

/// Writes `grants` in one statement and commits; returns how many were new
/// to `reward_grants` (the rest were stored before).
async fn write(pool: &PgPool, grants: &[&RewardGrant]) -> Result<usize, sqlx::Error> {
    // One grant per scan even within a batch (a redelivery can arrive
    // beside its original).
    let mut seen = HashSet::new();
    let grants: Vec<&RewardGrant> = grants
        .iter()
        .copied()
        .filter(|g| seen.insert(g.scan_id.as_str()))
        .collect();
    let column = |f: fn(&RewardGrant) -> String| grants.iter().map(|g| f(g)).collect::<Vec<_>>();
    let scan_ids = column(|g| g.scan_id.clone());
    let user_ids = column(|g| g.user_id.clone());
    let character_ids = column(|g| g.character_id.clone());
    let categories = column(|g| g.category.clone());
    let news: Vec<bool> = grants.iter().map(|g| g.new).collect();
    let times: Vec<DateTime<Utc>> = grants.iter().map(|g| g.granted_at).collect();
    let mut tx = pool.begin().await?;
    // Only grants new to reward_grants reach the other two tables, so a
    // repeat never counts twice. Ownership keeps the earliest grant.
    let stored: i64 = sqlx::query_scalar(
        "WITH incoming AS (
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[], $6::timestamptz[])
                AS t(scan_id, user_id, character_id, category, new, granted_at)
        ), fresh AS (
            INSERT INTO reward_grants (scan_id, user_id, character_id, category, new, granted_at)
            SELECT scan_id, user_id, character_id, category, new, granted_at FROM incoming
            ON CONFLICT (scan_id) DO NOTHING
            RETURNING scan_id, user_id, character_id, granted_at
        ), owned AS (
            INSERT INTO character_ownership (user_id, character_id, first_earned_at, scan_id)
            SELECT DISTINCT ON (user_id, character_id) user_id, character_id, granted_at, scan_id
            FROM fresh ORDER BY user_id, character_id, granted_at, scan_id
            ON CONFLICT (user_id, character_id) DO UPDATE
                SET first_earned_at = EXCLUDED.first_earned_at, scan_id = EXCLUDED.scan_id
                WHERE EXCLUDED.first_earned_at < character_ownership.first_earned_at
            RETURNING 1
        ), mine AS (
            INSERT INTO my_characters (user_id, character_id, times_earned, last_earned_at)
            SELECT user_id, character_id, count(*), max(granted_at) FROM fresh
            GROUP BY user_id, character_id
            ON CONFLICT (user_id, character_id) DO UPDATE
                SET times_earned = my_characters.times_earned + EXCLUDED.times_earned,
                    last_earned_at = greatest(my_characters.last_earned_at, EXCLUDED.last_earned_at)
            RETURNING 1
        )
        SELECT count(*) FROM fresh",
    )
    .bind(&scan_ids)
    .bind(&user_ids)
    .bind(&character_ids)
    .bind(&categories)
    .bind(&news)
    .bind(&times)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(stored as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_with_bad_ids_or_bad_json_are_poison() {
        let good = RewardGrant {
            scan_id: "s1".into(),
            user_id: "auth0|a@b".into(),
            character_id: "petty".into(),
            category: "pet_bottle".into(),
            new: true,
            granted_at: Utc::now(),
        };
        assert!(decode(&serde_json::to_vec(&good).unwrap()).is_ok());
        let bad = |edit: fn(&mut RewardGrant)| {
            let mut g = good.clone();
            edit(&mut g);
            decode(&serde_json::to_vec(&g).unwrap()).unwrap_err()
        };
        assert!(bad(|g| g.scan_id = "a.b".into()).contains("scan_id"));
        assert!(bad(|g| g.user_id.clear()).contains("user_id"));
        assert!(bad(|g| g.character_id = "../x".into()).contains("character_id"));
        assert!(decode(b"{").unwrap_err().contains("undecodable"));
    }
}
