//! The streamer's part of `DELETE /v1/me`: purging the user's entries from
//! the buckets only streamers write (`chat_context`, `scan_cache`,
//! `character_owners`), answering `erase.streamer`.
//!
//! One streamer answers each request (queue group `streamer`); the purge is
//! idempotent, so a retried request does no harm. A turn of the user still
//! being generated while the erasure runs does not write its
//! conversation's context when it completes: the gateway recorded the
//! erasure in the register first, and the context writer checks it
//! ([`crate::context`]); its record is dropped by the persisters.

use async_nats::jetstream;
use bus::{
    erase::{keys_where, purge_keys},
    streams,
    subject::{self, user_key},
    wire::{ConversationContext, EraseRequest, HistoryReply, ScanRecord, StreamerErased},
};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// Answers `erase.streamer` until `shutdown` fires.
pub async fn serve(
    client: async_nats::Client,
    js: jetstream::Context,
    shutdown: CancellationToken,
) {
    let mut requests = match client
        .queue_subscribe(subject::ERASE_STREAMER, "streamer".into())
        .await
    {
        Ok(requests) => requests,
        Err(error) => {
            tracing::error!(%error, "Cannot answer erase.streamer; erasures will fail with 503.");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = requests.next() => match next {
                Some(message) => message,
                None => return,
            },
        };
        let Some(reply) = message.reply.clone() else {
            continue;
        };
        let answer = match serde_json::from_slice::<EraseRequest>(&message.payload) {
            Ok(request) => match erase(&js, &request.user_id).await {
                Ok(erased) => {
                    tracing::info!(erase_id = %request.erase_id, ?erased, "Purged a user's streamer buckets.");
                    HistoryReply::Ok(erased)
                }
                Err(error) => {
                    tracing::warn!(erase_id = %request.erase_id, error = %format!("{error:#}"), "Purging a user's streamer buckets failed.");
                    HistoryReply::error("unavailable", format!("{error:#}"))
                }
            },
            Err(error) => HistoryReply::error("bad_request", error.to_string()),
        };
        if let Ok(body) = serde_json::to_vec(&answer)
            && let Err(error) = client.publish(reply, body.into()).await
        {
            tracing::warn!(%error, "Answering erase.streamer failed.");
        }
    }
}

/// Purges `user`'s entries from the three buckets.
async fn erase(js: &jetstream::Context, user: &str) -> anyhow::Result<StreamerErased> {
    let context = js.get_key_value(streams::KV_CONTEXT).await?;
    let keys = keys_where(&context, ">", |v| {
        serde_json::from_slice::<ConversationContext>(v).is_ok_and(|c| c.user_id == user)
    })
    .await?;
    let chat_context = purge_keys(&context, &keys).await?;

    let cache = js.get_key_value(streams::KV_SCAN_CACHE).await?;
    let keys = keys_where(&cache, ">", |v| {
        serde_json::from_slice::<ScanRecord>(v).is_ok_and(|r| r.user_id == user)
    })
    .await?;
    let scan_cache = purge_keys(&cache, &keys).await?;

    let owners = js.get_key_value(streams::KV_CHARACTER_OWNERS).await?;
    let keys = keys_where(&owners, &format!("{}.>", user_key(user)), |_| true).await?;
    let character_owners = purge_keys(&owners, &keys).await?;
    Ok(StreamerErased {
        chat_context,
        scan_cache,
        character_owners,
    })
}
