//! `history.characters`: a user's collection from Postgres
//! (`character_ownership` joined with `my_characters`), first earned first.
//! Every persister reads the same Postgres, so the asker takes the first
//! answer; while Postgres is unreachable the answer is `unavailable`
//! (the grants wait in JetStream meanwhile, nothing is lost).

use std::time::Duration;

use bus::wire::{HistoryCharactersRequest, HistoryReply, OwnedCharacter, OwnedCharacters};
use futures::StreamExt as _;
use sqlx::{PgPool, Row as _};
use tokio_util::sync::CancellationToken;

/// Longest a read waits for Postgres.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers `history.characters` until `shutdown` fires.
///
/// # Errors
/// When the subscription cannot be made.
pub async fn run(
    client: async_nats::Client,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut requests = client.subscribe(bus::subject::HISTORY_CHARACTERS).await?;
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
        let (client, pool) = (client.clone(), pool.clone());
        tokio::spawn(async move {
            let answer = answer(&pool, &message.payload).await;
            let body = serde_json::to_vec(&answer).expect("an answer serialises");
            if let Err(error) = client.publish(reply, body.into()).await {
                tracing::debug!(%error, "Characters reply not sent.");
            }
        });
    }
}

async fn answer(pool: &PgPool, payload: &[u8]) -> HistoryReply<OwnedCharacters> {
    let request: HistoryCharactersRequest = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => {
            return HistoryReply::error(
                "invalid_request",
                format!("not a history.characters request: {e}"),
            );
        }
    };
    if request.user_id.is_empty() {
        return HistoryReply::error("invalid_request", "user_id is empty");
    }
    match tokio::time::timeout(READ_TIMEOUT, read(pool, &request.user_id)).await {
        Ok(Ok(characters)) => HistoryReply::Ok(OwnedCharacters { characters }),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Reading a collection from Postgres failed.");
            HistoryReply::error("unavailable", "the collection cannot be read right now")
        }
        Err(_) => HistoryReply::error("unavailable", "the collection cannot be read right now"),
    }
}

async fn read(pool: &PgPool, user_id: &str) -> Result<Vec<OwnedCharacter>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT o.character_id, o.first_earned_at, o.scan_id,
                COALESCE(m.times_earned, 1) AS times_earned,
                COALESCE(m.last_earned_at, o.first_earned_at) AS last_earned_at
         FROM character_ownership o
         LEFT JOIN my_characters m USING (user_id, character_id)
         WHERE o.user_id = $1
         ORDER BY o.first_earned_at, o.character_id",
    )
    .bind(user_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(OwnedCharacter {
                character_id: row.try_get("character_id")?,
                first_earned_at: row.try_get("first_earned_at")?,
                scan_id: row.try_get("scan_id")?,
                times_earned: row.try_get::<i32, _>("times_earned")?.max(0) as u32,
                last_earned_at: row.try_get("last_earned_at")?,
            })
        })
        .collect()
}
