//! Draining completed turns from JetStream into SQLite.
//!
//! It owns the durable pull consumer on `chat.done.>` and the acknowledgement
//! of every message on it. A batch is decoded, the good records are written in
//! one SQLite transaction, and only after that commit is every message of the
//! batch acked. An undecodable message is put on `dlq.turns` (and that publish
//! confirmed) before it is terminated. A failed SQLite commit acks nothing:
//! the messages are handed back with a delay, and one that has used all its
//! deliveries goes to the dead-letter stream rather than being dropped.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use bus::wire::{DeadLetter, TurnRecord};
use chrono::Utc;
use futures::StreamExt as _;
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::wal::Wal;

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
/// The dead-letter kind of this consumer: `dlq.turns`.
const DLQ_KIND: &str = "turns";

/// The ingest loop and what it needs.
#[derive(Debug)]
pub struct Ingest {
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
}

impl Ingest {
    /// Fetches and stores batches until `shutdown` fires. The batch in hand
    /// when it fires is finished and acked; no new one is fetched.
    pub async fn run(self, consumer: PullConsumer, shutdown: CancellationToken) {
        let mut failing = false;
        while !shutdown.is_cancelled() {
            match self.next_batch(&consumer, &shutdown).await {
                Ok(messages) => {
                    if failing {
                        tracing::info!("Fetching turn records works again.");
                        failing = false;
                    }
                    if !messages.is_empty() {
                        self.handle(messages).await;
                    }
                }
                Err(error) => {
                    // Once per outage; the NATS client logs its reconnects.
                    if !failing {
                        tracing::warn!(%error, "Fetching turn records failed; retrying.");
                        failing = true;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(FETCH_RETRY) => {}
                    }
                }
            }
        }
        tracing::debug!("Ingest stopped.");
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
        let mut good = Vec::with_capacity(messages.len());
        let mut records = Vec::with_capacity(messages.len());
        for message in messages {
            match decode(&message.payload) {
                Ok(record) => {
                    records.push(record);
                    good.push(message);
                }
                Err(reason) => {
                    metrics::counter!("persister_dead_letters_total", "reason" => "undecodable")
                        .increment(1);
                    self.dead_letter(&message, &reason).await;
                }
            }
        }
        if good.is_empty() {
            return;
        }
        let rows = records.len();
        let started = Instant::now();
        match self.wal.insert_turns(records).await {
            Ok(stored) => {
                metrics::histogram!("persister_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("persister_commits_total").increment(1);
                metrics::counter!("persister_rows_ingested_total")
                    .increment(stored.inserted as u64);
                metrics::counter!("persister_duplicates_total").increment(stored.duplicates as u64);
                tracing::debug!(
                    rows,
                    inserted = stored.inserted,
                    "Committed turns to SQLite."
                );
                self.committed.notify_one();
                ack_all(&good).await;
            }
            Err(error) => {
                // An operator must act: the disk is full, or the file is broken.
                metrics::counter!("persister_commit_failures_total").increment(1);
                tracing::error!(%error, rows, path = %self.wal.path().display(), "Committing turns to SQLite failed; nothing acked, handing them back.");
                for message in &good {
                    let delivered = deliveries(message);
                    if self.max_deliver > 0 && delivered >= self.max_deliver as u64 {
                        metrics::counter!("persister_dead_letters_total", "reason" => "sqlite")
                            .increment(1);
                        let reason =
                            format!("SQLite commit failed on all {delivered} deliveries: {error}");
                        self.dead_letter(message, &reason).await;
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

    /// Puts `message` on `dlq.turns` with `reason`, then terminates it; if
    /// the dead letter is not confirmed, hands the message back instead.
    async fn dead_letter(&self, message: &jetstream::Message, reason: &str) {
        let delivered = deliveries(message);
        tracing::warn!(subject = %message.subject, error = reason, "Dead-lettering a turn record.");
        let letter = DeadLetter {
            subject: message.subject.to_string(),
            error: reason.to_owned(),
            deliveries: delivered,
            payload: String::from_utf8_lossy(&message.payload).into_owned(),
            failed_at: Utc::now(),
        };
        let mut headers = async_nats::HeaderMap::new();
        // One dead letter per stored message, however often this runs for it.
        if let Ok(info) = message.info() {
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                format!("persister-turns:{}", info.stream_sequence).as_str(),
            );
        }
        let subject = bus::subject::dlq(DLQ_KIND).expect("static kind is a valid token");
        let stored = match serde_json::to_vec(&letter) {
            Ok(body) => match self
                .js
                .publish_with_headers(subject, headers, body.into())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        let kind = match stored {
            Ok(()) => AckKind::Term,
            Err(error) => {
                tracing::warn!(%error, "Dead letter not stored; handing the message back.");
                AckKind::Nak(Some(Duration::from_secs(5)))
            }
        };
        if let Err(error) = message.ack_with(kind).await {
            tracing::debug!(%error, "Term/nak failed; the message will be redelivered.");
        }
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

fn deliveries(message: &jetstream::Message) -> u64 {
    message
        .info()
        .map(|i| i.delivered.max(1) as u64)
        .unwrap_or(1)
}

/// 1 s, 2 s, 4 s ... up to [`MAX_NAK_DELAY`], by delivery count.
fn nak_delay(delivered: u64) -> Duration {
    let exponent = delivered.saturating_sub(1).min(16) as u32;
    Duration::from_secs(1u64 << exponent).min(MAX_NAK_DELAY)
}

/// A turn record, or why it is not one.
fn decode(payload: &[u8]) -> Result<TurnRecord, String> {
    let record: TurnRecord =
        serde_json::from_slice(payload).map_err(|e| format!("undecodable turn record: {e}"))?;
    for (field, value) in [
        ("turn_id", &record.turn_id),
        ("conversation_id", &record.conversation_id),
        ("user_id", &record.user_id),
    ] {
        if value.is_empty() {
            return Err(format!("invalid turn record: empty {field}"));
        }
    }
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
        assert!(decode(b"{not json").unwrap_err().starts_with("undecodable"));
        let record = serde_json::json!({
            "turn_id": "", "conversation_id": "c", "user_id": "u", "request_id": "r",
            "model": "m", "user_text": "", "assistant_text": "", "finish_reason": "stop",
            "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "created_at": "2024-01-01T00:00:00Z", "first_token_at": null,
            "completed_at": "2024-01-01T00:00:01Z"
        });
        let error = decode(record.to_string().as_bytes()).unwrap_err();
        assert_eq!(error, "invalid turn record: empty turn_id");
    }
}
