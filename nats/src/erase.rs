//! Asking every live persister to erase a user from its SQLite file
//! (`erase.local`), the first part of `DELETE /v1/me`, and finding and
//! purging a user's KV entries ([`keys_where`], [`purge_keys`]), which the
//! gateway and the streamer each do for the buckets they write.
//!
//! Each persister holds its own SQLite file, so like history the request
//! goes to all of them (no queue group) and the asker counts the answers
//! against the live persisters' heartbeats. The Postgres part travels on the
//! `ERASE` work queue instead (durable: it must survive a Postgres outage);
//! the SQLite part cannot wait, because a persister whose SQLite still holds
//! the rows would copy them back into Postgres after they were erased there.

use std::time::Duration;

use crate::{
    history::HistoryClient,
    subject,
    wire::{EraseRequest, HistoryReply, SqliteErased},
};

/// How long [`HistoryClient::erase_local`] waits for the persisters.
pub const ERASE_LOCAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The persisters' answers to one `erase.local`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalErasure {
    /// How many persisters were live (from their heartbeats) when asked.
    pub expected: usize,
    /// How many erased their file and said so.
    pub answered: usize,
    /// Their counts, summed.
    pub erased: SqliteErased,
}

impl LocalErasure {
    /// True when every live persister erased its file.
    pub fn complete(&self) -> bool {
        self.answered >= self.expected
    }
}

impl HistoryClient {
    /// Asks every live persister to erase `request.user_id` from its SQLite
    /// file and sums what they report. An error answer counts as no answer.
    ///
    /// # Errors
    /// When the request cannot be sent.
    pub async fn erase_local(&self, request: &EraseRequest) -> anyhow::Result<LocalErasure> {
        let expected = self.expected();
        let replies = self
            .ask(
                subject::ERASE_LOCAL,
                serde_json::to_vec(request)?,
                ERASE_LOCAL_TIMEOUT,
            )
            .await?;
        let mut out = LocalErasure {
            expected,
            ..LocalErasure::default()
        };
        for reply in replies {
            match serde_json::from_slice::<HistoryReply<SqliteErased>>(&reply) {
                Ok(HistoryReply::Ok(erased)) => {
                    out.answered += 1;
                    out.erased.turns += erased.turns;
                    out.erased.scans += erased.scans;
                }
                Ok(HistoryReply::Err(body)) => tracing::warn!(
                    code = %body.error.code,
                    message = %body.error.message,
                    "A persister could not erase its SQLite file."
                ),
                Err(error) => tracing::warn!(%error, "An erase.local answer is not JSON."),
            }
        }
        Ok(out)
    }
}

/// The keys of KV bucket `kv` matching `filter` (`>` for all) whose newest
/// value passes `keep`; purged and deleted keys are skipped. The bucket is
/// read through one ordered consumer (the newest value per key, as of the
/// call), not one request per key.
///
/// # Errors
/// When the bucket cannot be read.
pub async fn keys_where(
    kv: &async_nats::jetstream::kv::Store,
    filter: &str,
    keep: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<Vec<String>> {
    use anyhow::Context as _;
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    use futures::StreamExt as _;

    let consumer = kv
        .stream
        .create_consumer(OrderedConfig {
            filter_subject: format!("{}{filter}", kv.prefix),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot read KV bucket {}", kv.name))?;
    // What is pending now is every key's newest value; a key written later
    // is not this call's to find.
    let mut left = consumer.cached_info().num_pending;
    let mut messages = consumer
        .messages()
        .await
        .with_context(|| format!("cannot read KV bucket {}", kv.name))?;
    let mut keys = Vec::new();
    while left > 0 {
        // A key that expired between the count and the read never comes.
        let message = match tokio::time::timeout(KV_READ_IDLE, messages.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(message)) => {
                message.with_context(|| format!("cannot read KV bucket {}", kv.name))?
            }
        };
        left -= 1;
        let removed = message
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
        let Some(key) = message.subject.as_str().strip_prefix(kv.prefix.as_str()) else {
            continue;
        };
        if !removed && keep(&message.payload) {
            keys.push(key.to_owned());
        }
    }
    Ok(keys)
}

/// How long [`keys_where`] waits for the next entry before it stops.
const KV_READ_IDLE: Duration = Duration::from_secs(3);

/// Purges `keys` from `kv` (every revision; a marker without a value
/// stays) and returns how many.
///
/// # Errors
/// When a purge fails; the keys before it stay purged.
pub async fn purge_keys(
    kv: &async_nats::jetstream::kv::Store,
    keys: &[String],
) -> anyhow::Result<u64> {
    use anyhow::Context as _;
    for key in keys {
        kv.purge(key)
            .await
            .with_context(|| format!("cannot purge a key of KV bucket {}", kv.name))?;
    }
    Ok(keys.len() as u64)
}
