//! Draining completed turns and scans from JetStream into SQLite.
//!
//! It owns the durable pull consumers on `chat.done.>` and `scan.done.>` and
//! the acknowledgement of every message on them; one [`Ingest`] loop runs per
//! consumer, the same code for both kinds of [`Record`]. A batch is decoded,
//! the good records are written in one SQLite transaction, and only after
//! that commit is every message of the batch acked. An undecodable or
//! invalid message is put on `dlq.turns` or `dlq.scans` (and that publish
//! confirmed) before it is terminated. A failed SQLite commit acks nothing:
//! the messages are handed back with a delay, and one that has used all its
//! deliveries goes to the dead-letter stream rather than being dropped.

use std::{future::Future, marker::PhantomData, sync::Arc, time::Duration};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use bus::wire::{ScanRecord, TurnRecord};
use futures::StreamExt as _;
use serde::de::DeserializeOwned;
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{error::WalError, wal::Wal};

/// Expiry of the no-wait fetch. Recent servers read "no-wait with an
/// expiry" as: wait up to this long for the first message, then answer with
/// whatever is there; older ones answer at once. The expiry also arms the
/// client's own timer, so a fetch lost in a reconnect cannot hang.
const FETCH_EXPIRES: Duration = Duration::from_secs(1);
/// How long an idle long poll waits for the next record.
const IDLE_WAIT: Duration = Duration::from_secs(2);
/// Wait between fetches while NATS is failing.
const FETCH_RETRY: Duration = Duration::from_secs(1);
/// Longest redelivery delay after a failed SQLite commit.
const MAX_NAK_DELAY: Duration = Duration::from_secs(30);

/// The metric names of one kind of record. The turn names predate scans and
/// are kept unlabelled, because dashboards and `loadgen` read them as they are.
#[derive(Debug)]
pub struct MetricNames {
    commit_seconds: &'static str,
    commits: &'static str,
    ingested: &'static str,
    superseded: &'static str,
    duplicates: &'static str,
    commit_failures: &'static str,
    dead_letters: &'static str,
}

/// How many records of a batch changed the buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stored {
    /// New rows.
    pub inserted: usize,
    /// Rows replaced by a later record.
    pub superseded: usize,
    /// Records already stored (a redelivery, a repeat, or an older version).
    pub duplicates: usize,
}

/// A kind of record the persister drains: how it is named, checked and stored.
pub trait Record: DeserializeOwned + Send + Sync + 'static {
    /// The dead-letter kind (`dlq.<KIND>`) and the log noun's plural.
    const KIND: &'static str;
    /// Its metric names.
    const METRICS: MetricNames;

    /// Why a decoded record cannot be stored, if it cannot.
    ///
    /// # Errors
    /// A one-line reason, kept in the dead letter.
    fn check(&self) -> Result<(), String>;

    /// Whose record it is, and when they started what it records.
    fn owner(&self) -> (&str, chrono::DateTime<chrono::Utc>);

    /// Commits `records` to the buffer in one transaction.
    fn store(
        wal: &Wal,
        records: Vec<Self>,
    ) -> impl Future<Output = Result<Stored, WalError>> + Send;
}

impl Record for TurnRecord {
    const KIND: &'static str = "turns";
    const METRICS: MetricNames = MetricNames {
        commit_seconds: "persister_commit_seconds",
        commits: "persister_commits_total",
        ingested: "persister_rows_ingested_total",
        superseded: "persister_rows_superseded_total",
        duplicates: "persister_duplicates_total",
        commit_failures: "persister_commit_failures_total",
        dead_letters: "persister_dead_letters_total",
    };

    fn check(&self) -> Result<(), String> {
        for (field, value) in [
            ("turn_id", &self.turn_id),
            ("conversation_id", &self.conversation_id),
            ("user_id", &self.user_id),
        ] {
            if value.is_empty() {
                return Err(format!("invalid turn record: empty {field}"));
            }
        }
        Ok(())
    }

    fn owner(&self) -> (&str, chrono::DateTime<chrono::Utc>) {
        (&self.user_id, self.created_at)
    }

    async fn store(wal: &Wal, records: Vec<Self>) -> Result<Stored, WalError> {
        let stored = wal.insert_turns(records).await?;
        Ok(Stored {
            inserted: stored.inserted,
            superseded: 0,
            duplicates: stored.duplicates,
        })
    }
}

impl Record for ScanRecord {
    const KIND: &'static str = "scans";
    const METRICS: MetricNames = MetricNames {
        commit_seconds: "persister_scan_commit_seconds",
        commits: "persister_scan_commits_total",
        ingested: "persister_scan_rows_ingested_total",
        superseded: "persister_scan_rows_superseded_total",
        duplicates: "persister_scan_duplicates_total",
        commit_failures: "persister_scan_commit_failures_total",
        dead_letters: "persister_scan_dead_letters_total",
    };

    fn check(&self) -> Result<(), String> {
        // The scan id names subjects (`scan.evt.<scan>`) and KV keys; one that
        // cannot is a producer bug, and storing it would only spread it. The
        // user id is a JWT `sub` and may hold dots: it only has to be there.
        bus::subject::token(&self.scan_id).map_err(|e| format!("invalid scan record: {e}"))?;
        if self.user_id.is_empty() {
            return Err("invalid scan record: empty user_id".into());
        }
        Ok(())
    }

    fn owner(&self) -> (&str, chrono::DateTime<chrono::Utc>) {
        (&self.user_id, self.created_at)
    }

    async fn store(wal: &Wal, records: Vec<Self>) -> Result<Stored, WalError> {
        let stored = wal.insert_scans(records).await?;
        Ok(Stored {
            inserted: stored.inserted,
            superseded: stored.superseded,
            duplicates: stored.unchanged,
        })
    }
}

/// The ingest loop of one kind of record and what it needs.
#[derive(Debug)]
pub struct Ingest<R> {
    /// JetStream, for dead letters.
    pub js: jetstream::Context,
    /// Where records are committed before they are acked.
    pub wal: Wal,
    /// Most messages per SQLite transaction.
    pub batch_size: usize,
    /// The consumer's `max_deliver`: the last delivery of a message that
    /// still cannot be stored dead-letters it instead of handing it back.
    pub max_deliver: i64,
    /// Wakes the sync loop after each commit.
    pub committed: Arc<Notify>,
    /// The erasure register, kept current by the persister's follower.
    pub register: bus::register::Register,
    /// The kind of record.
    pub kind: PhantomData<fn() -> R>,
}

impl<R: Record> Ingest<R> {
    /// Fetches and stores batches until `shutdown` fires. The batch in hand
    /// when it fires is finished and acked; no new one is fetched.
    pub async fn run(self, consumer: PullConsumer, shutdown: CancellationToken) {
        let mut failing = false;
        while !shutdown.is_cancelled() {
            match self.next_batch(&consumer, &shutdown).await {
                Ok(messages) => {
                    if failing {
                        tracing::info!(kind = R::KIND, "Fetching records works again.");
                        failing = false;
                    }
                    if !messages.is_empty() {
                        self.handle(messages).await;
                    }
                }
                Err(error) => {
                    // Once per outage; the NATS client logs its reconnects.
                    if !failing {
                        tracing::warn!(kind = R::KIND, %error, "Fetching records failed; retrying.");
                        failing = true;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(FETCH_RETRY) => {}
                    }
                }
            }
        }
        tracing::debug!(kind = R::KIND, "Ingest stopped.");
    }

    /// Whatever is waiting (up to the batch size); when nothing is, waits for
    /// the next message, so an idle persister stores a record as soon as it
    /// arrives while a busy one commits full batches.
    async fn next_batch(
        &self,
        consumer: &PullConsumer,
        shutdown: &CancellationToken,
    ) -> Result<Vec<jetstream::Message>, async_nats::Error> {
        let available = consumer
            .fetch()
            .max_messages(self.batch_size)
            .expires(FETCH_EXPIRES)
            .messages()
            .await?;
        // Not cancellable: these messages are already on their way to us.
        let messages = collect(available).await?;
        if !messages.is_empty() || shutdown.is_cancelled() {
            return Ok(messages);
        }
        let next = consumer
            .batch()
            .max_messages(1)
            .expires(IDLE_WAIT)
            .messages()
            .await?;
        // Cancelling an idle wait can, rarely, strand a message the server
        // sent at that instant; it is redelivered after the consumer's
        // ack_wait, and storing it twice is harmless.
        tokio::select! {
            _ = shutdown.cancelled() => Ok(Vec::new()),
            messages = collect(next) => messages,
        }
    }

    /// Decodes, commits and acknowledges one batch.
    async fn handle(&self, messages: Vec<jetstream::Message>) {
        let names = &R::METRICS;
        let mut good = Vec::with_capacity(messages.len());
        let mut records = Vec::with_capacity(messages.len());
        for message in messages {
            match decode::<R>(&message.payload) {
                Ok(record) => {
                    records.push(record);
                    good.push(message);
                }
                Err(reason) => {
                    metrics::counter!(names.dead_letters, "reason" => "undecodable").increment(1);
                    bus::dlq::terminate(&self.js, R::KIND, &message, &reason).await;
                }
            }
        }
        if good.is_empty() {
            return;
        }
        let rows = records.len();
        let started = Instant::now();
        let stored = match self.bury_erased(&records).await {
            Ok(()) => R::store(&self.wal, records).await,
            Err(error) => Err(error),
        };
        match stored {
            Ok(stored) => {
                metrics::histogram!(names.commit_seconds).record(started.elapsed().as_secs_f64());
                metrics::counter!(names.commits).increment(1);
                metrics::counter!(names.ingested).increment(stored.inserted as u64);
                if stored.superseded > 0 {
                    metrics::counter!(names.superseded).increment(stored.superseded as u64);
                }
                metrics::counter!(names.duplicates).increment(stored.duplicates as u64);
                tracing::debug!(
                    kind = R::KIND,
                    rows,
                    inserted = stored.inserted,
                    superseded = stored.superseded,
                    "Committed to SQLite."
                );
                self.committed.notify_one();
                ack_all(&good).await;
            }
            Err(error) => {
                // An operator must act: the disk is full, or the file is broken.
                metrics::counter!(names.commit_failures).increment(1);
                tracing::error!(kind = R::KIND, %error, rows, path = %self.wal.path().display(), "Committing to SQLite failed; nothing acked, handing the records back.");
                for message in &good {
                    let delivered = bus::dlq::deliveries(message);
                    if self.max_deliver > 0 && delivered >= self.max_deliver as u64 {
                        metrics::counter!(names.dead_letters, "reason" => "sqlite").increment(1);
                        let reason =
                            format!("SQLite commit failed on all {delivered} deliveries: {error}");
                        bus::dlq::terminate(&self.js, R::KIND, message, &reason).await;
                    } else {
                        let delay = nak_delay(delivered);
                        if let Err(error) = message.ack_with(AckKind::Nak(Some(delay))).await {
                            tracing::debug!(%error, "Nak failed; the message is redelivered after ack_wait.");
                        }
                    }
                }
            }
        }
    }
}

impl<R: Record> Ingest<R> {
    /// Leaves a tombstone for each registered user with a record in
    /// `records` made before their erasure, so the tombstone trigger drops
    /// it in the commit: this persister may have missed the erasure (it was
    /// not running) and hold nothing else of theirs.
    async fn bury_erased(&self, records: &[R]) -> Result<(), WalError> {
        let mut buried = std::collections::HashSet::new();
        for record in records {
            let (user_id, created_at) = record.owner();
            if let Some(erased_at) = self.register.erased_at(user_id)
                && created_at <= erased_at
                && buried.insert(user_id)
            {
                self.wal.tombstone(user_id, erased_at).await?;
            }
        }
        Ok(())
    }
}

/// Reads a whole batch. Messages that arrived before an error are kept: they
/// are ours now, and dropping them would only delay them until ack_wait.
async fn collect(
    mut batch: jetstream::consumer::pull::Batch,
) -> Result<Vec<jetstream::Message>, async_nats::Error> {
    let mut messages = Vec::new();
    while let Some(message) = batch.next().await {
        match message {
            Ok(message) => messages.push(message),
            Err(error) if messages.is_empty() => return Err(error),
            Err(error) => {
                tracing::debug!(%error, "A fetch ended early.");
                break;
            }
        }
    }
    Ok(messages)
}

/// Acks every message and waits for the server to confirm each. A lost ack
/// only means a redelivery, which the SQLite insert ignores.
async fn ack_all(messages: &[jetstream::Message]) {
    let results = futures::future::join_all(messages.iter().map(|m| m.double_ack())).await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        tracing::debug!(
            failed,
            "Some acks were not confirmed; those turns will be redelivered and ignored."
        );
    }
}

/// 1 s, 2 s, 4 s ... up to [`MAX_NAK_DELAY`], by delivery count.
fn nak_delay(delivered: u64) -> Duration {
    let exponent = delivered.saturating_sub(1).min(16) as u32;
    Duration::from_secs(1u64 << exponent).min(MAX_NAK_DELAY)
}

/// A record, or why it is not one.
fn decode<R: Record>(payload: &[u8]) -> Result<R, String> {
    let record: R = serde_json::from_slice(payload)
        .map_err(|e| format!("undecodable {} record: {e}", R::KIND))?;
    record.check()?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nak_delay_doubles_by_delivery_and_is_capped() {
        assert_eq!(nak_delay(1), Duration::from_secs(1));
        assert_eq!(nak_delay(3), Duration::from_secs(4));
        assert_eq!(nak_delay(9), MAX_NAK_DELAY);
        assert_eq!(nak_delay(u64::MAX), MAX_NAK_DELAY);
    }

    #[test]
    fn records_without_ids_are_refused() {
        assert!(
            decode::<TurnRecord>(b"{not json")
                .unwrap_err()
                .starts_with("undecodable")
        );
        let record = serde_json::json!({
            "turn_id": "", "conversation_id": "c", "user_id": "u", "request_id": "r",
            "model": "m", "user_text": "", "assistant_text": "", "finish_reason": "stop",
            "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "created_at": "2024-01-01T00:00:00Z", "first_token_at": null,
            "completed_at": "2024-01-01T00:00:01Z"
        });
        let error = decode::<TurnRecord>(record.to_string().as_bytes()).unwrap_err();
        assert_eq!(error, "invalid turn record: empty turn_id");
    }

    #[test]
    fn scans_whose_id_is_not_one_subject_token_are_refused() {
        let scan = |scan_id: &str, user_id: &str| {
            serde_json::json!({
                "scan_id": scan_id, "user_id": user_id, "status": "done", "category": null,
                "confidence": null, "phash": null, "sha256": null, "rule": null,
                "answer": null, "cached": false, "error": null,
                "created_at": "2024-01-01T00:00:00Z", "completed_at": null
            })
            .to_string()
        };
        for bad in ["", "a.b", "a b", "scan.>", "*"] {
            let error = decode::<ScanRecord>(scan(bad, "u").as_bytes()).unwrap_err();
            assert!(error.starts_with("invalid scan record"), "{bad:?}: {error}");
        }
        assert!(decode::<ScanRecord>(scan("s1", "").as_bytes()).is_err());
        // A JWT sub may be an email address: dots are fine in a user id.
        let ok = decode::<ScanRecord>(scan("s1", "a.b@example.com").as_bytes()).unwrap();
        assert_eq!(ok.user_id, "a.b@example.com");
    }
}
