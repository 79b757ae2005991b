//! A user's entries in the bus stores the gateway writes: the KV buckets
//! that name a user (in a key or a value) and the uploaded images. The
//! streamer's own buckets (`chat_context`, `scan_cache`,
//! `character_owners`) are the streamer's to purge (`erase.streamer`):
//! the gateway may not write them.
//!
//! | bucket | key | found by |
//! |---|---|---|
//! | `conversations` | conversation | value = the user id |
//! | `chat_turns` | turn | `TurnIndex.user_id` |
//! | `user_turns` | user key | the key |
//! | `scans` | scan | `ScanOwner.user_id`; the scan's image in `scan_images` goes too |

use std::collections::BTreeMap;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use bus::{
    erase::{keys_where, purge_keys},
    streams,
    subject::user_key,
    wire::{ScanOwner, TurnIndex},
};

/// What was purged, per bucket (every bucket listed, zeros included), and
/// how many images were deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BusErased {
    /// Keys purged per KV bucket.
    pub kv: BTreeMap<&'static str, u64>,
    /// Objects deleted from `scan_images`.
    pub scan_images: u64,
}

/// Purges every entry of `user` from the gateway's KV buckets and deletes
/// their images. Erasing twice purges nothing the second time.
///
/// # Errors
/// When a bucket cannot be read or written; what was purged before stays purged.
pub async fn erase(
    js: &jetstream::Context,
    images: &jetstream::object_store::ObjectStore,
    user: &str,
) -> anyhow::Result<BusErased> {
    let mut out = BusErased::default();

    let conversations = bucket(js, streams::KV_CONVERSATIONS).await?;
    let keys = keys_where(&conversations, ">", |v| v == user.as_bytes()).await?;
    out.kv.insert(
        streams::KV_CONVERSATIONS,
        purge_keys(&conversations, &keys).await?,
    );

    let turns = bucket(js, streams::KV_TURNS).await?;
    let keys = keys_where(&turns, ">", |v| {
        serde_json::from_slice::<TurnIndex>(v).is_ok_and(|t| t.user_id == user)
    })
    .await?;
    out.kv
        .insert(streams::KV_TURNS, purge_keys(&turns, &keys).await?);

    let in_flight = bucket(js, streams::KV_USER_TURNS).await?;
    let keys = keys_where(&in_flight, &user_key(user), |_| true).await?;
    out.kv
        .insert(streams::KV_USER_TURNS, purge_keys(&in_flight, &keys).await?);

    let scans = bucket(js, streams::KV_SCANS).await?;
    let scan_ids = keys_where(&scans, ">", |v| {
        serde_json::from_slice::<ScanOwner>(v).is_ok_and(|s| s.user_id == user)
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
        .insert(streams::KV_SCANS, purge_keys(&scans, &scan_ids).await?);
    Ok(out)
}

async fn bucket(js: &jetstream::Context, name: &str) -> anyhow::Result<kv::Store> {
    js.get_key_value(name)
        .await
        .with_context(|| format!("KV bucket {name} is missing"))
}
