//! `DELETE /v1/me`: erases the caller's conversations, turns, scans,
//! rewards and images everywhere they live, and says what went.
//!
//! The order matters:
//! 0. The erasure register (KV bucket `erasures`, [`bus::register`]): the
//!    user's key and when. First, because it is what reaches whatever the
//!    steps below cannot: a persister that is down (it checks its file
//!    against the register before it syncs), a grant still queued in
//!    `REWARDS`, a turn still being generated (its conversation's context).
//!    When it cannot be written, 503 and nothing was erased.
//! 1. Every live persister's SQLite file (`erase.local`, scatter-gather like
//!    history). First, because a persister copies its SQLite rows to
//!    Postgres: rows left there would come back after Postgres was erased.
//!    Each persister also keeps a tombstone, so records of the user's
//!    earlier turns and scans still on their way are dropped on arrival.
//!    When a live persister does not answer, the request fails with 503
//!    and nothing is queued for Postgres (a retry is safe).
//! 2. Postgres, through the `ERASE` work queue (`erase.pg.<user key>`), so
//!    it survives a Postgres outage: a persister erases it when Postgres
//!    answers. The answer waits [`POSTGRES_WAIT`] for the report on
//!    `erase.done.<erase id>`, and says `"postgres":"pending"` without it.
//! 3. The bus's KV entries and images: the gateway's own buckets
//!    ([`stores`]), then the streamer's (`erase.streamer`; the gateway may
//!    not write them). A streamer that does not answer makes it a 503.
//! 4. `erase.notice`: every gateway forgets the user's remembered
//!    conversation owners, this one included.
//!
//! Response: `{"erase_id","sqlite":{"persisters","turns","scans"},
//! "postgres":{<table>: n...}|"pending","kv":{<bucket>: n...},
//! "object_store":{"scan_images": n}}`.

mod stores;

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use async_nats::jetstream;
use axum::{Json, extract::State};
use bus::{
    subject,
    wire::{EraseNotice, EraseRequest, ErrorBody, HistoryReply, PostgresErased, StreamerErased},
};
use futures::StreamExt as _;
use serde::Serialize;

use crate::{AppState, auth::User, error::ApiError};

/// How long the answer waits for the Postgres part before saying `pending`.
pub const POSTGRES_WAIT: Duration = Duration::from_secs(5);
/// How long a streamer may take to purge its buckets.
const STREAMER_WAIT: Duration = Duration::from_secs(10);

/// `DELETE /v1/me`'s answer: what was erased, per store.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Erasure {
    /// Names this erasure; the Postgres audit row (`erasures`) carries it.
    erase_id: String,
    /// Every live persister's SQLite file, summed.
    sqlite: SqliteReport,
    /// Rows deleted per Postgres table, or `"pending"`: queued, and done
    /// when Postgres answers.
    postgres: PostgresPart,
    /// Keys purged per KV bucket (every bucket that can name a user).
    kv: BTreeMap<String, u64>,
    /// Objects deleted per object store.
    object_store: ObjectStoreReport,
}

/// The SQLite part of an [`Erasure`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct SqliteReport {
    /// Persisters that erased their file (every live one).
    persisters: usize,
    /// Turn rows deleted.
    turns: u64,
    /// Scan rows deleted.
    scans: u64,
}

/// The Postgres part of an [`Erasure`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
enum PostgresPart {
    /// Rows deleted per table.
    Done(PostgresErased),
    /// Queued; done when Postgres answers.
    Pending(Pending),
}

/// `"pending"`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum Pending {
    /// Queued in `ERASE`.
    Pending,
}

/// The object-store part of an [`Erasure`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ObjectStoreReport {
    /// Uploaded images deleted.
    scan_images: u64,
}

/// `DELETE /v1/me`.
#[utoipa::path(delete, path = "/v1/me", operation_id = "eraseMe", tag = "account",
    responses(
        (status = 200, description = "Erased; `postgres` is `\"pending\"` while Postgres is down (it completes when Postgres returns). Twice is fine: zeros", body = Erasure),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
        (status = 503, description = "`unavailable`: a persister or the streamer did not answer, or the bus failed; retrying is safe", body = ErrorBody),
    ))]
pub async fn erase_me(
    State(state): State<AppState>,
    User(user): User,
) -> Result<Json<Erasure>, ApiError> {
    let request = EraseRequest {
        erase_id: uuid::Uuid::new_v4().to_string(),
        user_id: user.clone(),
        requested_at: chrono::Utc::now(),
    };
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        tracing::warn!(erase_id = %request.erase_id, error = %e, "{what} failed.");
        ApiError::Unavailable(format!("{what} failed; nothing was lost, try again"))
    };

    bus::register::record(&state.js, &user, request.requested_at)
        .await
        .map_err(|e| unavailable("Recording the erasure", &format!("{e:#}")))?;

    let local = state
        .history
        .erase_local(&request)
        .await
        .map_err(|e| unavailable("Asking the persisters", &e))?;
    if !local.complete() {
        tracing::warn!(erase_id = %request.erase_id, answered = local.answered, expected = local.expected, "Not every persister erased its buffer.");
        return Err(ApiError::Unavailable(format!(
            "{} of {} persisters erased their buffer; try again",
            local.answered, local.expected
        )));
    }

    // Listen before queueing, or a fast persister's report could be missed.
    let done_subject =
        subject::erase_done(&request.erase_id).context("a uuid is a subject token")?;
    let mut done = state
        .client
        .subscribe(done_subject)
        .await
        .map_err(|e| unavailable("Subscribing to the erasure report", &e))?;
    let payload = serde_json::to_vec(&request).context("an erase request serialises")?;
    let publish = jetstream::message::PublishMessage::build()
        .payload(payload.into())
        .message_id(&request.erase_id);
    state
        .js
        .send_publish(subject::erase_pg(&user), publish)
        .await
        .map_err(|e| unavailable("Queueing the Postgres erasure", &e))?
        .await
        .map_err(|e| unavailable("Queueing the Postgres erasure", &e))?;

    let mut bus = stores::erase(&state.js, &state.scan_images, &user)
        .await
        .map_err(|e| unavailable("Erasing the bus's stores", &format!("{e:#}")))?;
    let streamer = ask_streamer(&state.client, &request)
        .await
        .map_err(|e| unavailable("Erasing the streamer's buckets", &format!("{e:#}")))?;
    bus.kv
        .insert(bus::streams::KV_CONTEXT, streamer.chat_context);
    bus.kv
        .insert(bus::streams::KV_SCAN_CACHE, streamer.scan_cache);
    bus.kv
        .insert(bus::streams::KV_CHARACTER_OWNERS, streamer.character_owners);

    state.owners.forget_user(&user);
    let notice = serde_json::to_vec(&EraseNotice {
        user_id: user.clone(),
    })
    .context("a notice serialises")?;
    if let Err(error) = state
        .client
        .publish(subject::ERASE_NOTICE, notice.into())
        .await
    {
        // The other nodes' memory is the only thing at stake, and the
        // conversations are gone from the bucket they would fall back to.
        tracing::warn!(erase_id = %request.erase_id, %error, "Publishing the erase notice failed.");
    }

    let postgres = match tokio::time::timeout(POSTGRES_WAIT, done.next()).await {
        Ok(Some(message)) => serde_json::from_slice::<PostgresErased>(&message.payload)
            .map_or(PostgresPart::Pending(Pending::Pending), PostgresPart::Done),
        _ => PostgresPart::Pending(Pending::Pending),
    };
    let outcome = match postgres {
        PostgresPart::Done(_) => "done",
        PostgresPart::Pending(_) => "pending",
    };
    metrics::counter!("gateway_erasures_total", "postgres" => outcome).increment(1);
    tracing::info!(erase_id = %request.erase_id, postgres = outcome, "Erased a user.");
    Ok(Json(Erasure {
        erase_id: request.erase_id,
        sqlite: SqliteReport {
            persisters: local.answered,
            turns: local.erased.turns,
            scans: local.erased.scans,
        },
        postgres,
        kv: bus.kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        object_store: ObjectStoreReport {
            scan_images: bus.scan_images,
        },
    }))
}

/// Asks one streamer to purge the user from the buckets only streamers write.
async fn ask_streamer(
    client: &async_nats::Client,
    request: &EraseRequest,
) -> anyhow::Result<StreamerErased> {
    let body = serde_json::to_vec(request)?;
    let answer = tokio::time::timeout(
        STREAMER_WAIT,
        client.request(subject::ERASE_STREAMER, body.into()),
    )
    .await
    .context("no streamer answered in time")??;
    match serde_json::from_slice::<HistoryReply<StreamerErased>>(&answer.payload)? {
        HistoryReply::Ok(erased) => Ok(erased),
        HistoryReply::Err(body) => anyhow::bail!("{} ({})", body.error.message, body.error.code),
    }
}

/// Follows `erase.notice` until `state`'s shutdown: forgets the erased
/// user's remembered conversation owners on this node.
pub fn follow_notices(state: &AppState) {
    let client = state.client.clone();
    let owners = state.owners.clone();
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let mut notices = match client.subscribe(subject::ERASE_NOTICE).await {
            Ok(notices) => notices,
            Err(error) => {
                tracing::error!(%error, "Cannot follow erase notices; erased owners stay remembered on this node.");
                return;
            }
        };
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = notices.next() => match next {
                    Some(message) => message,
                    None => return,
                },
            };
            if let Ok(notice) = serde_json::from_slice::<EraseNotice>(&message.payload) {
                let forgotten = owners.forget_user(&notice.user_id);
                tracing::debug!(forgotten, "Forgot an erased user's conversation owners.");
            }
        }
    });
}
