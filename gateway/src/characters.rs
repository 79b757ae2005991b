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
use bus::wire::ErrorBody;
use bus::wire::{
    Character, HistoryCharactersRequest, HistoryReply, Localized, OwnedCharacters,
    valid_character_id,
};
use futures::TryStreamExt as _;
use serde::Serialize;

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

/// `GET /v1/characters`'s body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CharacterList {
    /// Highest priority first.
    characters: Vec<Character>,
}

/// One character of the caller's collection.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MyCharacter {
    /// The character.
    character_id: String,
    /// Its name; a character since deleted from the catalogue keeps its id.
    name: Localized,
    /// When the caller first earned it.
    first_earned_at: chrono::DateTime<chrono::Utc>,
    /// The scan that first earned it.
    scan_id: String,
    /// How many scans earned it.
    times_earned: u32,
}

/// `GET /v1/me/characters`'s body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MyCharacterList {
    /// First earned first.
    characters: Vec<MyCharacter>,
}

/// `GET /v1/characters`: the catalogue, `{"characters":[...]}`.
#[utoipa::path(get, path = "/v1/characters", operation_id = "listCharacters", tag = "characters",
    responses(
        (status = 200, description = "The catalogue, highest priority first", body = CharacterList),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    User(_): User,
) -> Result<Json<CharacterList>, ApiError> {
    let characters = catalogue(&state.characters).await?;
    Ok(Json(CharacterList { characters }))
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
#[utoipa::path(get, path = "/v1/me/characters", operation_id = "listMyCharacters", tag = "characters",
    responses(
        (status = 200, description = "The caller's characters, first earned first", body = MyCharacterList),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
        (status = 503, description = "`unavailable`: no persister answered", body = ErrorBody),
    ))]
pub async fn mine(
    State(state): State<AppState>,
    User(user): User,
) -> Result<Json<MyCharacterList>, ApiError> {
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
        characters.push(MyCharacter {
            character_id: item.character_id,
            name,
            first_earned_at: item.first_earned_at,
            scan_id: item.scan_id,
            times_earned: item.times_earned,
        });
    }
    Ok(Json(MyCharacterList { characters }))
}

/// The body of `PUT /v1/admin/characters/{id}`: a [`Character`] whose
/// `character_id` may be left out (the path names it). Checked field by
/// field by [`Character::from_json`]; this type only describes it.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct CharacterUpdate {
    /// Must equal the path's id when given.
    #[schema(pattern = "^[a-z0-9_-]{1,64}$")]
    character_id: Option<String>,
    /// The name in Korean and English.
    #[schema(inline)]
    name: Name,
    /// A short description in Korean and English.
    #[schema(inline)]
    description: Description,
    /// Waste categories it can be earned from, each once (a repeat is refused).
    #[schema(min_items = 1, inline)]
    categories: Vec<EarnedFrom>,
    /// Among the characters matching a scan's category, the highest wins.
    priority: i32,
}

/// A character's name in both languages.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Name {
    #[schema(min_length = 1, max_length = 80)]
    ko: String,
    #[schema(min_length = 1, max_length = 80)]
    en: String,
}

/// A character's description in both languages.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Description {
    #[schema(min_length = 1, max_length = 500)]
    ko: String,
    #[schema(min_length = 1, max_length = 500)]
    en: String,
}

/// The disposal categories a character can be earned from
/// ([`bus::wire::WASTE_CATEGORIES`] less `unknown`; a unit test keeps
/// them equal).
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum EarnedFrom {
    PetBottle,
    Plastic,
    Glass,
    Paper,
    PaperPack,
    MetalCan,
    Vinyl,
    Styrofoam,
    FoodWaste,
    Clothing,
    Battery,
    Electronics,
    General,
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
#[utoipa::path(put, path = "/v1/admin/characters/{id}", operation_id = "putCharacter", tag = "characters",
    params(("id" = String, Path, description = "1-64 of a-z, 0-9, `_`, `-`", pattern = "^[a-z0-9_-]{1,64}$")),
    request_body(content = CharacterUpdate, description = "The character; `character_id` may be left out"),
    responses(
        (status = 200, description = "Replaced", body = Character),
        (status = 201, description = "Created", body = Character),
        (status = 400, description = "`invalid_character` (the message names the field), `invalid_json`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the admin role", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ))]
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
#[utoipa::path(delete, path = "/v1/admin/characters/{id}", operation_id = "deleteCharacter", tag = "characters",
    params(("id" = String, Path, description = "1-64 of a-z, 0-9, `_`, `-`", pattern = "^[a-z0-9_-]{1,64}$")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`invalid_character`: a malformed id", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the admin role", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ))]
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

#[cfg(test)]
mod tests {
    use utoipa::PartialSchema as _;

    #[test]
    fn the_documented_categories_are_the_earnable_ones() {
        let schema = serde_json::to_value(super::EarnedFrom::schema()).unwrap();
        let documented: Vec<&str> = schema["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let earnable: Vec<&str> = bus::wire::WASTE_CATEGORIES
            .iter()
            .copied()
            .filter(|c| *c != bus::wire::UNKNOWN_CATEGORY)
            .collect();
        assert_eq!(documented, earnable);
    }
}
