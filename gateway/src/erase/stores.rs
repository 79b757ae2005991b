//! A user's entries in the bus's own stores: the KV buckets that name a
//! user (in a key or a value) and the uploaded images.
//!
//! | bucket | key | found by |
//! |---|---|---|
//! | `conversations` | conversation | value = the user id |
//! | `chat_turns` | turn | `TurnIndex.user_id` |
//! | `chat_context` | conversation | `ConversationContext.user_id` |
//! | `user_turns` | user key | the key |
//! | `scans` | scan | `ScanOwner.user_id`; the scan's image in `scan_images` goes too |
//! | `scan_cache` | perceptual hash | the cached `ScanRecord.user_id` |
//! | `character_owners` | `<user key>.<character>` | the key's first token |
//!
//! Buckets keyed by something else are read whole, newest value per key,
//! through one ordered consumer each (not one request per key). Keys are
//! purged, not deleted: a purge drops every revision of the key, leaving a
//! marker without a value.

use std::collections::BTreeMap;

use anyhow::Context as _;
use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull::OrderedConfig},
    kv,
};
use bus::{
    streams,
    subject::user_key,
    wire::{ConversationContext, ScanOwner, ScanRecord, TurnIndex},
};
use futures::StreamExt as _;

/// How long reading a bucket may go without a message before it counts as
/// read (a key that expired between the count and the read never comes).
const READ_IDLE: std::time::Duration = std::time::Duration::from_secs(3);

/// What was purged, per bucket (every bucket listed, zeros included), and
/// how many images were deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BusErased {
    /// Keys purged per KV bucket.
    pub kv: BTreeMap<&'static str, u64>,
    /// Objects deleted from `scan_images`.
    pub scan_images: u64,
}

/// Purges every entry of `user` from the KV buckets and deletes their
/// images. Erasing twice purges nothing the second time.
///
/// # Errors
/// When a bucket cannot be read or written; what was purged before stays purged.
pub async fn erase(
    js: &jetstream::Context,
    images: &jetstream::object_store::ObjectStore,
    user: &str,
) -> anyhow::Result<BusErased> {
    let mut out = BusErased::default();
    let owned_by = |id: &str| id == user;

    let conversations = bucket(js, streams::KV_CONVERSATIONS).await?;
    let keys = keys_where(&conversations, ">", |_, v| {
        owned_by(&String::from_utf8_lossy(v))
    })
    .await?;
    out.kv.insert(
        streams::KV_CONVERSATIONS,
        purge(&conversations, &keys).await?,
    );

    let turns = bucket(js, streams::KV_TURNS).await?;
    let keys = keys_where(&turns, ">", |_, v| {
        serde_json::from_slice::<TurnIndex>(v).is_ok_and(|t| owned_by(&t.user_id))
    })
    .await?;
    out.kv
        .insert(streams::KV_TURNS, purge(&turns, &keys).await?);

    let context = bucket(js, streams::KV_CONTEXT).await?;
    let keys = keys_where(&context, ">", |_, v| {
        serde_json::from_slice::<ConversationContext>(v).is_ok_and(|c| owned_by(&c.user_id))
    })
    .await?;
    out.kv
        .insert(streams::KV_CONTEXT, purge(&context, &keys).await?);

    let in_flight = bucket(js, streams::KV_USER_TURNS).await?;
    let key = user_key(user);
    let keys = keys_where(&in_flight, &key, |_, _| true).await?;
    out.kv
        .insert(streams::KV_USER_TURNS, purge(&in_flight, &keys).await?);

    let scans = bucket(js, streams::KV_SCANS).await?;
    let scan_ids = keys_where(&scans, ">", |_, v| {
        serde_json::from_slice::<ScanOwner>(v).is_ok_and(|s| owned_by(&s.user_id))
    })
    .await?;
    // The image first: once the owner entry is gone, nothing names it.
    for scan_id in &scan_ids {
        match images.delete(scan_id).await {
            Ok(()) => out.scan_images += 1,
            Err(e) if e.kind() == jetstream::object_store::DeleteErrorKind::NotFound => {}
            Err(e) => return Err(e).context("cannot delete an uploaded image"),
        }
    }
    out.kv
        .insert(streams::KV_SCANS, purge(&scans, &scan_ids).await?);

    let cache = bucket(js, streams::KV_SCAN_CACHE).await?;
    let keys = keys_where(&cache, ">", |_, v| {
        serde_json::from_slice::<ScanRecord>(v).is_ok_and(|r| owned_by(&r.user_id))
    })
    .await?;
    out.kv
        .insert(streams::KV_SCAN_CACHE, purge(&cache, &keys).await?);

    let owners = bucket(js, streams::KV_CHARACTER_OWNERS).await?;
    let keys = keys_where(&owners, &format!("{key}.>"), |_, _| true).await?;
    out.kv
        .insert(streams::KV_CHARACTER_OWNERS, purge(&owners, &keys).await?);
    Ok(out)
}

async fn bucket(js: &jetstream::Context, name: &str) -> anyhow::Result<kv::Store> {
    js.get_key_value(name)
        .await
        .with_context(|| format!("KV bucket {name} is missing"))
}

/// The keys matching `filter` whose newest value passes `keep` (purged and
/// deleted keys are skipped).
async fn keys_where(
    kv: &kv::Store,
    filter: &str,
    keep: impl Fn(&str, &[u8]) -> bool,
) -> anyhow::Result<Vec<String>> {
    let consumer = kv
        .stream
        .create_consumer(OrderedConfig {
            filter_subject: format!("{}{filter}", kv.prefix),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot read KV bucket {}", kv.name))?;
    // The newest value of each key at this moment; what is written after
    // it is not this erasure's to find.
    let mut left = consumer.cached_info().num_pending;
    let mut messages = consumer
        .messages()
        .await
        .with_context(|| format!("cannot read KV bucket {}", kv.name))?;
    let mut keys = Vec::new();
    while left > 0 {
        let message = match tokio::time::timeout(READ_IDLE, messages.next()).await {
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
        if !removed && keep(key, &message.payload) {
            keys.push(key.to_owned());
        }
    }
    Ok(keys)
}

async fn purge(kv: &kv::Store, keys: &[String]) -> anyhow::Result<u64> {
    for key in keys {
        kv.purge(key)
            .await
            .with_context(|| format!("cannot purge a key of KV bucket {}", kv.name))?;
    }
    Ok(keys.len() as u64)
}
