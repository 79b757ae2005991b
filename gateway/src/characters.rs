//! The character catalogue and the caller's collection:
//! `GET /v1/characters` (the `characters` KV bucket), `GET /v1/me/characters`
//! (the persisters' `history.characters`, named from the catalogue), and
//! the admin's `PUT` / `DELETE /v1/admin/characters/{id}`.
//!
//! The admin routes write the bucket, the catalogue's durable home; every
//! streamer's match cache follows it through a KV watch, so a change
//! reaches the next scan's match without a restart. The body is checked
//! field by field ([`bus::wire::Character::from_json`]): a bad one gets 400
//! `invalid_character` with the field first in the message.

use std::time::Duration;

use async_nats::jetstream::kv;
use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use bus::wire::{
    Character, HistoryCharactersRequest, HistoryReply, Localized, OwnedCharacters,
    valid_character_id,
};
use futures::TryStreamExt as _;
use serde_json::json;

use crate::{
    AppState,
    auth::{Admin, User},
    error::ApiError,
};

/// How long `GET /v1/me/characters` waits for a persister.
const COLLECTION_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an error answer waits for another persister's answer.
const ERROR_GRACE: Duration = Duration::from_millis(300);

/// Every character of the bucket, highest priority first.
async fn catalogue(bucket: &kv::Store) -> Result<Vec<Character>, ApiError> {
    let unavailable = |e: String| {
        tracing::warn!(error = %e, "Reading the character catalogue failed.");
        ApiError::Unavailable("the character catalogue cannot be read right now".into())
    };
    let keys: Vec<String> = bucket
        .keys()
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .try_collect()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut characters = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some(value) = bucket
            .get(&key)
            .await
            .map_err(|e| unavailable(e.to_string()))?
            && let Ok(character) = serde_json::from_slice::<Character>(&value)
        {
            characters.push(character);
        }
    }
    characters.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.character_id.cmp(&b.character_id))
    });
    Ok(characters)
}

/// `GET /v1/characters`: the catalogue, `{"characters":[...]}`.
pub async fn list(State(state): State<AppState>, User(_): User) -> Result<Response, ApiError> {
    let characters = catalogue(&state.characters).await?;
    Ok(Json(json!({ "characters": characters })).into_response())
}

/// Asks every persister for the collection and takes the first answer that
/// is one: a persister whose Postgres connection is down answers
/// `unavailable` while another may answer from the same Postgres.
async fn ask_persisters(client: &async_nats::Client, body: Vec<u8>) -> Option<OwnedCharacters> {
    use futures::StreamExt as _;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.ok()?;
    client
        .publish_with_reply(bus::subject::HISTORY_CHARACTERS, inbox, body.into())
        .await
        .ok()?;
    let mut deadline = tokio::time::Instant::now() + COLLECTION_TIMEOUT;
    loop {
        let reply = match tokio::time::timeout_at(deadline, replies.next()).await {
            Ok(Some(reply)) if reply.status.is_none() => reply,
            // No responders, or the subscription ended, or time is up.
            _ => return None,
        };
        match serde_json::from_slice::<HistoryReply<OwnedCharacters>>(&reply.payload) {
            Ok(HistoryReply::Ok(owned)) => return Some(owned),
            Ok(HistoryReply::Err(body)) => {
                tracing::warn!(code = %body.error.code, "A persister could not read the collection.");
                // Another persister may still answer; not for long.
                deadline = deadline.min(tokio::time::Instant::now() + ERROR_GRACE);
            }
            Err(error) => tracing::warn!(%error, "Unreadable history.characters reply."),
        }
    }
}

/// `GET /v1/me/characters`: the caller's collection, first earned first.
pub async fn mine(State(state): State<AppState>, User(user): User) -> Result<Response, ApiError> {
    let request = HistoryCharactersRequest { user_id: user };
    let body = serde_json::to_vec(&request).expect("a request serialises");
    let unavailable =
        || ApiError::Unavailable("the collection is unavailable right now; try again".into());
    let Some(owned) = ask_persisters(&state.client, body).await else {
        return Err(unavailable());
    };
    let mut characters = Vec::with_capacity(owned.characters.len());
    for item in owned.characters {
        // A character an admin deleted since keeps its id as its name.
        let name = match state.characters.get(&item.character_id).await {
            Ok(Some(value)) => serde_json::from_slice::<Character>(&value)
                .map(|c| c.name)
                .ok(),
            _ => None,
        }
        .unwrap_or_else(|| Localized {
            ko: item.character_id.clone(),
            en: item.character_id.clone(),
        });
        characters.push(json!({
            "character_id": item.character_id,
            "name": name,
            "first_earned_at": item.first_earned_at,
            "scan_id": item.scan_id,
            "times_earned": item.times_earned,
        }));
    }
    Ok(Json(json!({ "characters": characters })).into_response())
}

fn bad(message: String) -> ApiError {
    ApiError::BadRequest {
        code: "invalid_character",
        message,
    }
}

/// `PUT /v1/admin/characters/{id}`: creates or replaces a character. The
/// body has the catalogue's fields; `character_id` may be left out, and
/// must equal the path's when given.
pub async fn put(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if !valid_character_id(&id) {
        return Err(bad(
            "character_id: must be 1-64 characters of a-z, 0-9, '_' and '-'".into(),
        ));
    }
    let mut value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest {
            code: "invalid_json",
            message: format!("body: not JSON ({e})"),
        })?;
    if let Some(object) = value.as_object_mut() {
        match object.get("character_id") {
            None => {
                object.insert("character_id".into(), id.clone().into());
            }
            Some(given) if given.as_str() == Some(id.as_str()) => {}
            Some(_) => {
                return Err(bad("character_id: must equal the id in the path".into()));
            }
        }
    }
    let character = Character::from_json(&value).map_err(|e| bad(e.to_string()))?;
    let created = !matches!(state.characters.get(&id).await, Ok(Some(_)));
    let stored = serde_json::to_vec(&character).expect("a character serialises");
    state
        .characters
        .put(&id, stored.into())
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "Writing the character catalogue failed.");
            ApiError::Unavailable("the character catalogue cannot be written right now".into())
        })?;
    metrics::counter!("gateway_character_changes_total", "op" => "put").increment(1);
    tracing::info!(character = %id, %admin, created, "Character stored.");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(character)).into_response())
}

/// `DELETE /v1/admin/characters/{id}`: removes a character from the
/// catalogue (owners keep it in their collections); 404 when there is none.
pub async fn delete(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !valid_character_id(&id) {
        return Err(bad(
            "character_id: must be 1-64 characters of a-z, 0-9, '_' and '-'".into(),
        ));
    }
    let unavailable = |e: String| {
        tracing::warn!(error = %e, "Deleting from the character catalogue failed.");
        ApiError::Unavailable("the character catalogue cannot be written right now".into())
    };
    match state.characters.get(&id).await {
        Ok(Some(_)) => {}
        Ok(None) => return Err(ApiError::NotFound(format!("no character {id:?}"))),
        Err(e) => return Err(unavailable(e.to_string())),
    }
    state
        .characters
        .delete(&id)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    metrics::counter!("gateway_character_changes_total", "op" => "delete").increment(1);
    tracing::info!(character = %id, %admin, "Character deleted.");
    Ok(StatusCode::NO_CONTENT.into_response())
}
